//! Notifications to the kernel on a second descriptor of the mount's FUSE connection (fuse3's
//! own notifier writes under the lock its replies need, and can hang the mount; see
//! docs/plans/mount-research.md §2.4). The descriptor is the very one fuse3 reads, fetched with
//! pidfd_getfd; each notification is one write, made off the async threads.

use std::fs::File;
use std::io::Write;
use std::sync::Arc;

use rustix::process::{PidfdFlags, PidfdGetfdFlags, getpid, pidfd_getfd, pidfd_open};

/// FUSE_NOTIFY_INVAL_INODE.
const INVAL_INODE: i32 = 2;

#[derive(Debug, Clone)]
pub struct Notifier {
    dev: Arc<File>,
}

impl Notifier {
    /// The notifier of this process's FUSE connection (the one `/dev/fuse` it has open).
    pub fn open() -> std::io::Result<Notifier> {
        let mut fds = Vec::new();
        for e in std::fs::read_dir("/proc/self/fd")? {
            let e = e?;
            if std::fs::read_link(e.path()).is_ok_and(|t| t == std::path::Path::new("/dev/fuse"))
                && let Ok(n) = e.file_name().to_string_lossy().parse::<i32>()
            {
                fds.push(n);
            }
        }
        let [fd] = fds[..] else {
            return Err(std::io::Error::other(format!(
                "expected one /dev/fuse descriptor in this process, found {}",
                fds.len()
            )));
        };
        let pidfd = pidfd_open(getpid(), PidfdFlags::empty())?;
        let dev = pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty())?;
        Ok(Notifier { dev: Arc::new(File::from(dev)) })
    }

    /// Drops the kernel's cached attributes and pages of `ino` (all of them). Blocking: call it
    /// from a blocking thread, never while a request of that inode waits on the caller.
    pub fn inval_inode(&self, ino: u64) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(40);
        buf.extend_from_slice(&40u32.to_le_bytes());
        buf.extend_from_slice(&INVAL_INODE.to_le_bytes());
        buf.extend_from_slice(&0u64.to_le_bytes());
        buf.extend_from_slice(&ino.to_le_bytes());
        buf.extend_from_slice(&0i64.to_le_bytes());
        buf.extend_from_slice(&0i64.to_le_bytes());
        match (&*self.dev).write(&buf) {
            Ok(_) => Ok(()),
            // Not cached by the kernel: nothing to drop.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
