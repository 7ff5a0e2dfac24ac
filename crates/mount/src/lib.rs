//! `stripelock mount`: the cluster's namespace as a FUSE file system (issue 13).
//!
//! One mount is one client session on one server (moving to another when it fails, locks kept),
//! plus a Files connection to the same server. Directories, names and attributes are the
//! replicated namespace's (`lockservice::names`); file data goes through the striped, fenced
//! data path under extent locks the mount keeps until revoked (`fs.rs`); fcntl locks are the
//! lock engine's POSIX locks, on a resource per file, so they hold across every mount.
//!
//! FUSE layer: fuse3 (async; it passes FUSE_INTERRUPT on, which a blocked F_SETLKW needs) used
//! through its raw inode API, mounted with mount(2) as root; kernel notifications go through our
//! own descriptor (`notify.rs`). flock(2) stays local to each mount: fuse3 does not negotiate
//! FUSE_FLOCK_LOCKS, so the kernel never forwards flock requests (docs/decisions.md).

mod fs;
pub mod inodes;
mod notify;
pub mod posix;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use client::Session;
use fuse3::MountOptions;
use fuse3::raw::{MountHandle, Session as FuseSession};

pub use fs::{EXTENTS_MAX, MountStats};

/// What to mount and where.
#[derive(Debug, Clone)]
pub struct Options {
    pub dir: PathBuf,
    /// The cluster's servers, the one to attach to first.
    pub servers: Vec<String>,
    pub lease_ms: u64,
    /// The longest an F_SETLKW waits (the cluster ends it; the call fails with ENOLCK).
    /// `None`: no limit, as POSIX has it.
    pub lock_wait_max: Option<std::time::Duration>,
    /// Reads never move atime (else as relatime: see [`fs`]'s `atime_due`).
    pub noatime: bool,
}

/// A mounted file system.
pub struct Mounted {
    handle: Option<MountHandle>,
    inner: Arc<fs::Inner>,
    dir: PathBuf,
}

impl std::fmt::Debug for Mounted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mounted({})", self.dir.display())
    }
}

/// Mounts the cluster at `opts.dir`. Needs root (mount(2)) and /dev/fuse.
pub async fn mount(opts: Options) -> Result<Mounted> {
    if opts.servers.is_empty() {
        bail!("no server to attach to");
    }
    let meta = std::fs::metadata(&opts.dir).with_context(|| format!("{} cannot be mounted on", opts.dir.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory; mount on a directory", opts.dir.display());
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .context("/dev/fuse cannot be opened (is the fuse module loaded, and is this root?)")?;
    let name = format!("mount {} {}", opts.dir.display(), client::process_name());
    let session = Session::open_named(&opts.servers, opts.lease_ms, client::Connector::default(), name)
        .await
        .context("no session could be opened with the cluster")?;
    let inner = Arc::new(fs::Inner::new(session, opts.servers.clone(), opts.lock_wait_max, opts.noatime)?);
    let mut mo = MountOptions::default();
    mo.fs_name("stripelock")
        .custom_options("subtype=stripelock")
        .allow_other(true)
        .default_permissions(true)
        .nonempty(false);
    let fs = fs::StripeFs { inner: inner.clone() };
    let handle = FuseSession::new(mo).mount(fs, &opts.dir).await.with_context(|| {
        format!("mounting on {} failed (it must be an empty directory, and this must run as root)", opts.dir.display())
    })?;
    match notify::Notifier::open() {
        Ok(n) => *inner.notifier.lock().expect("notifier") = Some(n),
        Err(e) => tracing::warn!("kernel cache notifications are off ({e}); readers rely on mtime checks alone"),
    }
    tokio::spawn(fs::watch_events(inner.clone()));
    Ok(Mounted { handle: Some(handle), inner, dir: opts.dir })
}

impl Mounted {
    pub fn session(&self) -> u64 {
        self.inner.session.id()
    }

    /// The server the mount talks to now.
    pub fn server(&self) -> String {
        self.inner.server()
    }

    pub fn stats(&self) -> MountStats {
        self.inner.stats()
    }

    /// Waits until the mount ends: unmounted from outside (`umount`), or [`Mounted::unmount`].
    pub async fn wait(&mut self) -> Result<()> {
        if let Some(h) = self.handle.as_mut() {
            h.await.context("the FUSE session ended with an error")?;
        }
        self.handle = None;
        Ok(())
    }

    /// Unmounts (lazily, so a shell inside the directory does not keep it mounted), waits for
    /// the FUSE session to end, and closes the cluster session (its locks are released).
    pub async fn unmount(mut self) -> Result<()> {
        detach(&self.dir)?;
        if let Some(h) = self.handle.as_mut() {
            let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
        }
        self.handle = None;
        if let Some(inner) = Arc::into_inner(self.inner) {
            inner.session.close().await;
        }
        Ok(())
    }
}

/// A lazy unmount of `dir` (umount -l).
pub fn detach(dir: &Path) -> Result<()> {
    match rustix::mount::unmount(dir, rustix::mount::UnmountFlags::DETACH) {
        Ok(()) => Ok(()),
        // Already unmounted.
        Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOENT => Ok(()),
        Err(e) => Err(std::io::Error::from(e)).with_context(|| format!("unmounting {} failed", dir.display())),
    }
}
