//! Where unit records are kept: a narrow trait of named blobs, with a directory of files for
//! real use, memory for tests, and a wrapper that injects faults.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Named blobs. `put` replaces a blob atomically and durably: after it returns, a crash leaves
/// the new bytes; before, the old ones (never a mix).
pub trait Device: Send + Sync {
    fn get(&self, name: &str) -> io::Result<Option<Vec<u8>>>;
    fn put(&self, name: &str, bytes: &[u8]) -> io::Result<()>;
    fn delete(&self, name: &str) -> io::Result<()>;
    /// Every name, in order.
    fn list(&self) -> io::Result<Vec<String>>;
    /// Deletes several blobs (a store may make them durable together).
    fn delete_many(&self, names: &[String]) -> io::Result<()> {
        names.iter().try_for_each(|n| self.delete(n))
    }
}

impl<T: Device + ?Sized> Device for std::sync::Arc<T> {
    fn get(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        (**self).get(name)
    }

    fn put(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        (**self).put(name, bytes)
    }

    fn delete(&self, name: &str) -> io::Result<()> {
        (**self).delete(name)
    }

    fn list(&self) -> io::Result<Vec<String>> {
        (**self).list()
    }

    fn delete_many(&self, names: &[String]) -> io::Result<()> {
        (**self).delete_many(names)
    }
}

/// Blobs as files under a directory: `NAME` is a relative path of `/`-separated parts, each
/// `[0-9a-z.]`. A put writes `NAME.PID.N.tmp` (a name of its own), syncs it, renames it over
/// `NAME` and syncs the directory.
#[derive(Debug)]
pub struct DirDevice {
    root: PathBuf,
}

impl DirDevice {
    /// Opens the volume at `root` (made if missing), removing what puts cut short by a crash
    /// left behind (their `.tmp` files; the blobs they were replacing are whole).
    pub fn open(root: &Path) -> io::Result<DirDevice> {
        std::fs::create_dir_all(root)?;
        for path in files_under(root)? {
            if path.extension().is_some_and(|e| e == "tmp") {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(DirDevice { root: root.to_path_buf() })
    }

    fn path(&self, name: &str) -> io::Result<PathBuf> {
        let ok = !name.is_empty()
            && name.split('/').all(|part| {
                !part.is_empty()
                    && part != "."
                    && part != ".."
                    && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.')
            });
        if !ok {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("`{name}` is not a unit name")));
        }
        Ok(self.root.join(name))
    }
}

/// Every file under `root`, at any depth.
fn files_under(root: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                dirs.push(entry.path());
            } else {
                out.push(entry.path());
            }
        }
    }
    Ok(out)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl Device for DirDevice {
    fn get(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.path(name)?) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn put(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        use std::io::Write;
        let path = self.path(name)?;
        let dir = path.parent().expect("under the root").to_path_buf();
        std::fs::create_dir_all(&dir)?;
        // A name of its own for each put: two puts of one name at once (or of a unit and its
        // row's other role, which share a stem) must not rename each other's file away.
        static PUTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = PUTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let file = path.file_name().expect("a blob name").to_string_lossy();
        let tmp = dir.join(format!("{file}.{}.{n}.tmp", std::process::id()));
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_data()?;
        }
        std::fs::rename(&tmp, &path)?;
        sync_dir(&dir)
    }

    fn delete(&self, name: &str) -> io::Result<()> {
        let path = self.path(name)?;
        match std::fs::remove_file(&path) {
            Ok(()) => sync_dir(path.parent().expect("under the root")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let mut out: Vec<String> = files_under(&self.root)?
            .into_iter()
            .filter(|path| path.extension().is_none_or(|e| e != "tmp"))
            .map(|path| path.strip_prefix(&self.root).expect("under the root").to_string_lossy().replace('\\', "/"))
            .collect();
        out.sort();
        Ok(out)
    }
}

/// Blobs in memory.
#[derive(Debug, Default)]
pub struct MemDevice {
    blobs: Mutex<BTreeMap<String, Vec<u8>>>,
}

impl Device for MemDevice {
    fn get(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        Ok(self.blobs.lock().expect("blobs").get(name).cloned())
    }

    fn put(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        self.blobs.lock().expect("blobs").insert(name.to_string(), bytes.to_vec());
        Ok(())
    }

    fn delete(&self, name: &str) -> io::Result<()> {
        self.blobs.lock().expect("blobs").remove(name);
        Ok(())
    }

    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.blobs.lock().expect("blobs").keys().cloned().collect())
    }
}

/// A device that fails on command: puts fail while `fail_puts` is above zero (counting down),
/// and `flip` corrupts a stored byte as a bad disk would.
#[derive(Debug, Default)]
pub struct FaultyDevice<D> {
    inner: D,
    fail_puts: Mutex<u64>,
}

impl<D: Device> FaultyDevice<D> {
    pub fn new(inner: D) -> FaultyDevice<D> {
        FaultyDevice { inner, fail_puts: Mutex::new(0) }
    }

    /// The next `n` puts fail (and store nothing).
    pub fn fail_next_puts(&self, n: u64) {
        *self.fail_puts.lock().expect("faults") = n;
    }

    /// XORs `mask` into byte `at` of blob `name` (wrapping `at` to its length). False if absent.
    pub fn flip(&self, name: &str, at: usize, mask: u8) -> io::Result<bool> {
        let Some(mut b) = self.inner.get(name)? else { return Ok(false) };
        if b.is_empty() {
            return Ok(false);
        }
        let at = at % b.len();
        b[at] ^= mask.max(1);
        self.inner.put(name, &b)?;
        Ok(true)
    }
}

impl<D: Device> Device for FaultyDevice<D> {
    fn get(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        self.inner.get(name)
    }

    fn put(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        {
            let mut n = self.fail_puts.lock().expect("faults");
            if *n > 0 {
                *n -= 1;
                return Err(io::Error::other("injected write failure"));
            }
        }
        self.inner.put(name, bytes)
    }

    fn delete(&self, name: &str) -> io::Result<()> {
        self.inner.delete(name)
    }

    fn list(&self) -> io::Result<Vec<String>> {
        self.inner.list()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Puts of one name at once, and of names sharing a stem (a row's `d0` and `p`), all land;
    /// with one `.tmp` name per stem, one rename took the other's file away (ENOENT).
    #[test]
    fn concurrent_puts_of_one_name_all_succeed_and_a_reopen_clears_leftovers() {
        let root = std::env::temp_dir().join(format!("stripelock-dirdevice-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dev = DirDevice::open(&root).unwrap();
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let dev = &dev;
                s.spawn(move || {
                    for i in 0..50u8 {
                        let name = if t % 2 == 0 { "0001/0002.d0" } else { "0001/0002.p" };
                        dev.put(name, &[t, i]).unwrap();
                    }
                });
            }
        });
        assert_eq!(dev.list().unwrap(), vec!["0001/0002.d0".to_string(), "0001/0002.p".to_string()]);
        // A put cut short by a crash leaves its temporary file; opening the volume removes it.
        std::fs::write(root.join("0001/0002.p.1.2.tmp"), b"half").unwrap();
        DirDevice::open(&root).unwrap();
        assert!(!root.join("0001/0002.p.1.2.tmp").exists());
        assert_eq!(dev.get("0001/0002.p").unwrap().map(|b| b.len()), Some(2));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
