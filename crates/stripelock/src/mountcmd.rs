//! `mount` and `umount`: the cluster's namespace as a FUSE file system (crates/mount).

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};

use crate::cluster::{cluster_addrs, status_from};
use crate::mountstats::{MOUNTS_DIR, write_stats};

/// The lease of a mount's session: long enough to ride out a leader change, short enough that
/// a dead mount's locks come free soon.
const MOUNT_LEASE_MS: u64 = 10_000;

/// Mounts the cluster on `dir` and serves it until Ctrl-C, SIGTERM or `umount`.
pub fn mount(
    dir: &Path,
    cluster: Option<&str>,
    server: Option<u64>,
    lock_wait_max: Option<std::time::Duration>,
    noatime: bool,
    json: bool,
) -> Result<ExitCode> {
    crate::cluster::init_logs("warn,mount=info");
    let mut addrs = cluster_addrs(cluster)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build()?;
    rt.block_on(async {
        if let Some(id) = server {
            let st = status_from(&addrs[0]).await.or(Err(()));
            let st = match st {
                Ok(s) => s,
                Err(()) => {
                    let mut found = None;
                    for a in &addrs[1..] {
                        if let Ok(s) = status_from(a).await {
                            found = Some(s);
                            break;
                        }
                    }
                    found.context("no server of the cluster answered to say where server {id} is")?
                }
            };
            let Some(s) = st.servers.iter().find(|s| s.id == id) else {
                bail!(
                    "the cluster has no server {id}; its servers are {}",
                    st.servers.iter().map(|s| s.id.to_string()).collect::<Vec<_>>().join(", ")
                );
            };
            addrs.retain(|a| *a != s.address);
            addrs.insert(0, s.address.clone());
        }
        let mut m = mount::mount(mount::Options {
            dir: dir.to_path_buf(),
            servers: addrs,
            lease_ms: MOUNT_LEASE_MS,
            lock_wait_max,
            noatime,
        })
        .await?;
        if json {
            println!(
                "{}",
                serde_json::json!({"mounted": dir, "server": m.server(), "session": m.session(), "pid": std::process::id()})
            );
        } else {
            println!(
                "mounted {} (server {}, session {}); Ctrl-C or `stripelock umount {}` unmounts",
                dir.display(),
                m.server(),
                m.session(),
                dir.display()
            );
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let stats_file = Path::new(MOUNTS_DIR).join(format!("{}.json", m.session()));
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        let ended = loop {
            tokio::select! {
                r = m.wait() => break Some(r),
                _ = tokio::signal::ctrl_c() => break None,
                _ = term.recv() => break None,
                _ = tick.tick() => write_stats(&stats_file, dir, &m),
            }
        };
        let _ = std::fs::remove_file(&stats_file);
        if let Some(r) = ended {
            r?;
            eprintln!("{} was unmounted", dir.display());
            return Ok(ExitCode::SUCCESS);
        }
        m.unmount().await?;
        eprintln!("unmounted {}", dir.display());
        Ok(ExitCode::SUCCESS)
    })
}

/// Unmounts `dir` (lazily: a shell inside it does not keep it mounted); the mount's process
/// then ends and its session releases its locks.
pub fn umount(dir: &Path) -> Result<ExitCode> {
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1).is_some_and(|m| Path::new(m) == dir.canonicalize().unwrap_or(dir.to_path_buf())));
    if !mounted {
        bail!("{} is not mounted", dir.display());
    }
    mount::detach(dir)?;
    Ok(ExitCode::SUCCESS)
}
