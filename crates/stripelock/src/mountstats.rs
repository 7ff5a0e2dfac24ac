//! Where each mount on this host keeps its counts for `status` (open files are known only to the
//! mount itself): one JSON file per mount, written each second, removed on unmount.

use std::path::Path;

/// Where each mount on this host keeps its counts for `status` (open files are known only to
/// the mount itself).
pub const MOUNTS_DIR: &str = "/run/stripelock/mounts";

pub fn write_stats(file: &Path, dir: &Path, m: &mount::Mounted) {
    let s = m.stats();
    let v = serde_json::json!({
        "dir": dir, "pid": std::process::id(), "session": m.session(), "server": m.server(),
        "open_files": s.open_files, "extent_locks": s.extent_locks, "fcntl_locked_files": s.fcntl_locked_files,
    });
    let _ = std::fs::create_dir_all(MOUNTS_DIR);
    let tmp = file.with_extension("tmp");
    if std::fs::write(&tmp, v.to_string()).is_ok() {
        let _ = std::fs::rename(&tmp, file);
    }
}

/// The counts of the mounts on this host, by session.
pub fn local_mounts() -> std::collections::BTreeMap<u64, serde_json::Value> {
    let mut out = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(MOUNTS_DIR).into_iter().flatten().flatten() {
        if let Ok(text) = std::fs::read_to_string(e.path())
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            && let Some(session) = v["session"].as_u64()
        {
            out.insert(session, v);
        }
    }
    out
}
