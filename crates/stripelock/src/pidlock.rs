//! The lock files that keep a data directory to one `up` and a server's directory to one
//! server. A lock file is held with flock(2) for the life of its process and names that
//! process's pid. The kernel drops the lock when the process dies, however it dies, so a stale
//! file never blocks anyone; the pid in it is only believed while the lock is held.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

/// Held by a server in its data directory for as long as it runs; holds its pid.
pub const SERVER_PID: &str = "server.pid";

/// A lock file this process holds (until it is dropped or the process ends).
#[derive(Debug)]
pub struct PidLock {
    _file: File,
}

/// Takes the lock file at `path` and writes this process's pid into it. `Ok(Err(pid))` if another
/// process holds it (`None` when it has not written its pid yet).
pub fn take_pid_lock(path: &Path) -> Result<std::result::Result<PidLock, Option<u32>>> {
    // Not truncated on open: the file may be another process's, whose pid we then read.
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Ok(Err(read_pid(&mut file))),
        Err(TryLockError::Error(e)) => return Err(e).with_context(|| format!("cannot lock {}", path.display())),
    }
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{}", std::process::id())?;
    file.sync_data()?;
    Ok(Ok(PidLock { _file: file }))
}

/// The pid of the process holding the lock file at `path`, if one does.
pub fn lock_holder(path: &Path) -> Option<u32> {
    let mut file = OpenOptions::new().read(true).write(true).open(path).ok()?;
    match file.try_lock() {
        // Nobody holds it: the pid in it, if any, is of a process that has ended.
        Ok(()) => None,
        Err(TryLockError::WouldBlock) => read_pid(&mut file),
        Err(TryLockError::Error(_)) => None,
    }
}

fn read_pid(file: &mut File) -> Option<u32> {
    // The holder writes its pid just after taking the lock: give it a moment.
    for _ in 0..20 {
        let mut text = String::new();
        if file.rewind().is_ok()
            && file.read_to_string(&mut text).is_ok()
            && let Ok(pid) = text.trim().parse()
        {
            return Some(pid);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}
