//! What a full lock table costs beyond memory (issue 12, `bench lock --held N`): each server's
//! last snapshot (size, time to build, time to restore), and with `--disrupt`, on a cluster run
//! by `stripelock up` on this machine (which restarts what it kills): leader failover (SIGKILL
//! → the first grant of a new session), the killed leader's restart (snapshot restore, then back
//! in step with the log), and a follower restarted with its Raft database wiped (the leader's
//! snapshot installed, then back in step).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use wire::v1 as pb;

use crate::cluster::status_from;

/// One server's last snapshot, from its `status`.
pub(crate) struct SnapshotFigures {
    pub server: u64,
    pub bytes: u64,
    pub locks: u64,
    pub build_ms: u64,
    pub restore_ms: u64,
}

/// A server brought back: how long until it answered, its snapshot restore, and until it had
/// applied everything the leader had committed when it answered.
pub(crate) struct Return {
    pub server: u64,
    pub answered_ms: u64,
    pub restore_ms: u64,
    pub snapshot_bytes: u64,
    pub in_step_ms: u64,
}

pub(crate) struct Disrupted {
    pub killed_leader: u64,
    /// SIGKILL of the leader → the first grant of a new session on the other servers.
    pub failover_ms: u64,
    pub leader_back: Return,
    /// The wiped follower's return, or why it was not seen within the bound.
    pub wiped: Result<Return, String>,
}

pub(crate) async fn snapshots(addrs: &[String]) -> Vec<SnapshotFigures> {
    let mut out = Vec::new();
    for a in addrs {
        if let Ok(s) = status_from(a).await {
            out.push(SnapshotFigures {
                server: s.server_id,
                bytes: s.snapshot_bytes,
                locks: s.snapshot_locks,
                build_ms: s.snapshot_build_ms,
                restore_ms: s.snapshot_restore_ms,
            });
        }
    }
    out
}

async fn statuses(addrs: &[String]) -> Vec<(String, pb::StatusReply)> {
    let mut out = Vec::new();
    for a in addrs {
        if let Ok(s) = status_from(a).await {
            out.push((a.clone(), s));
        }
    }
    out
}

fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let ok = std::process::Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status()?.success();
    if !ok {
        bail!("kill -{sig} {pid} failed");
    }
    Ok(())
}

/// Waits until `addr` answers again as a process other than `old_pid`, then until it has applied
/// what the leader had committed when it answered and votes again (a wiped server is readmitted
/// by the leader once it has caught up, `lockservice/src/rejoin.rs`).
async fn back_in_step(
    addrs: &[String],
    addr: &str,
    old_pid: u32,
    since: Instant,
    bound: Duration,
) -> anyhow::Result<Return> {
    let deadline = Instant::now() + bound;
    let answered = loop {
        if let Ok(s) = status_from(addr).await
            && s.pid != old_pid
        {
            break s;
        }
        if Instant::now() > deadline {
            bail!("{addr} did not come back within {bound:?} (is the cluster run by `stripelock up`?)");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let answered_ms = since.elapsed().as_millis() as u64;
    let target =
        statuses(addrs).await.iter().find(|(_, s)| s.leader_id == s.server_id).map_or(0, |(_, s)| s.commit_index);
    let at = Instant::now();
    let last = loop {
        let s = status_from(addr).await.ok();
        if let Some(s) = &s
            && s.applied_index >= target
            && !s.rejoining
        {
            break s.clone();
        }
        if Instant::now() > deadline {
            let at = s.map_or(0, |s| s.applied_index);
            bail!("{addr} did not catch up with index {target} within {bound:?} (it had applied {at})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    Ok(Return {
        server: answered.server_id,
        answered_ms,
        restore_ms: last.snapshot_restore_ms,
        snapshot_bytes: last.snapshot_bytes,
        in_step_ms: answered_ms + at.elapsed().as_millis() as u64,
    })
}

/// Kills the leader and measures failover and its return; then wipes a follower's Raft database
/// and measures its return. Only for a local cluster run by `stripelock up`.
pub(crate) async fn disrupt(addrs: &[String]) -> anyhow::Result<Disrupted> {
    let all = statuses(addrs).await;
    let (leader_addr, leader) =
        all.iter().find(|(_, s)| s.leader_id == s.server_id).cloned().context("no server says it leads")?;
    if all.len() < 3 {
        bail!("--disrupt needs three servers answering, {} do", all.len());
    }
    let others: Vec<String> = addrs.iter().filter(|a| **a != leader_addr).cloned().collect();
    signal(leader.pid, "KILL")?;
    let killed = Instant::now();
    let mut n = 0u64;
    let failover_ms = loop {
        if killed.elapsed() > Duration::from_secs(60) {
            bail!("no grant within 60 s of killing the leader");
        }
        n += 1;
        let attempt = async {
            let s = client::Session::open(&others, 10_000).await?;
            let resource = format!("/bench/failover/{n}");
            let g = s.lock(&resource, 0..u64::MAX, client::Mode::EX, client::LockOptions::default()).await?;
            s.unlock(g.lock).await?;
            s.close().await;
            Ok::<_, client::ClientError>(())
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(())) => break killed.elapsed().as_millis() as u64,
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let leader_back = back_in_step(addrs, &leader_addr, leader.pid, killed, Duration::from_secs(600)).await?;

    // A follower that is not the bootstrapping server 1 (`up` restarts it with --bootstrap).
    let now = statuses(addrs).await;
    let (f_addr, f) = now
        .iter()
        .find(|(_, s)| s.leader_id != s.server_id && s.server_id != 1)
        .cloned()
        .context("no follower other than server 1 answers")?;
    // Stopped first, so `up` cannot restart it before its database is gone.
    signal(f.pid, "STOP")?;
    let db = std::path::Path::new(&f.data_dir).join("raft.redb");
    std::fs::remove_file(&db).with_context(|| format!("cannot remove {}", db.display()))?;
    signal(f.pid, "KILL")?;
    let wiped_at = Instant::now();
    let wiped =
        back_in_step(addrs, &f_addr, f.pid, wiped_at, Duration::from_secs(120)).await.map_err(|e| format!("{e:#}"));
    Ok(Disrupted { killed_leader: leader.server_id, failover_ms, leader_back, wiped })
}
