//! A server that lost its Raft state comes back safely (issue 12: a wiped follower catches up).
//!
//! A server whose `raft.redb` is gone has forgotten its log and its votes. Raft's safety rests
//! on both: if it voted as if nothing had happened, it could help elect a server that lacks an
//! entry the cluster committed with its help (openraft's FAQ, "wipe out the data of ONE node").
//! So a server that had joined (`raft.joined` in its data directory) and finds its database
//! missing starts *rejoining* (`raft.rejoining`, kept across restarts until done):
//! - it answers no vote or pre-vote request;
//! - it asks the leader to readmit it: the leader turns it into a non-voting learner, lets
//!   replication start over from nothing (openraft's `allow_log_reversion`), waits until it
//!   holds everything committed when it was demoted (the leader's snapshot, then the log), and
//!   makes it a voter again;
//! - then it votes again.
//!
//! What is not caught: a data directory wiped whole (no `raft.joined` left) looks like a server's
//! first start; replace such a server's disk by restoring `raft.joined` first.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::{ChangeMembers, Raft};
use wire::ErrorCode;

use crate::errors::ProposeError;
use crate::machine::Machine;
use crate::types::{C, NodeId};

/// Written once the server has applied an entry: from then on it is a member with a past.
pub const JOINED_FILE: &str = "raft.joined";
/// Present while the server is rejoining (it votes again once it is removed).
pub const REJOINING_FILE: &str = "raft.rejoining";
/// The Raft database's file name in the data directory.
pub const DATABASE_FILE: &str = "raft.redb";

/// The longest a leader waits for a rejoining server to catch up before it gives up (the server
/// asks again).
const CATCH_UP_BOUND: Duration = Duration::from_secs(600);

/// Whether the server with this data directory must rejoin, decided before its database is
/// opened (which creates it): it had joined and its database is gone, or an earlier rejoin did
/// not finish. Records the decision on disk first, so a crash cannot forget it.
pub fn must_rejoin(data_dir: &Path) -> std::io::Result<bool> {
    let rejoining = data_dir.join(REJOINING_FILE);
    if rejoining.exists() {
        return Ok(true);
    }
    if data_dir.join(DATABASE_FILE).exists() || !data_dir.join(JOINED_FILE).exists() {
        return Ok(false);
    }
    write_durably(&rejoining, b"this server lost its Raft database and is rejoining\n")?;
    Ok(true)
}

fn write_durably(path: &Path, body: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(body)?;
    f.sync_all()?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Writes `raft.joined` in `data_dir` once this server has applied an entry while not rejoining
/// (then returns).
pub async fn mark_joined(raft: Raft<C, Machine>, data_dir: PathBuf, rejoining: Arc<AtomicBool>) {
    let path = data_dir.join(JOINED_FILE);
    if path.exists() {
        return;
    }
    let mut metrics = raft.metrics();
    loop {
        let applied = metrics.borrow_watched().last_applied.is_some();
        if applied && !rejoining.load(Ordering::SeqCst) {
            if let Err(e) = write_durably(&path, b"this server has joined its cluster\n") {
                tracing::warn!("cannot write {}: {e}", path.display());
            }
            return;
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// The rejoining server's side: asks the servers `targets` names (the one it believes leads
/// first, then every peer) to readmit it, through `ask`, until one has; then it votes again.
pub async fn ask_until_readmitted<A, F>(
    id: NodeId,
    data_dir: PathBuf,
    rejoining: Arc<AtomicBool>,
    targets: impl Fn() -> Vec<String>,
    ask: A,
) where
    A: Fn(String) -> F,
    F: std::future::Future<Output = Result<(), ProposeError>>,
{
    tracing::warn!("server {id} lost its Raft database: not voting until the leader has readmitted it");
    let mut delay = Duration::from_millis(200);
    loop {
        for addr in targets() {
            match ask(addr.clone()).await {
                Ok(()) => {
                    let _ = std::fs::remove_file(data_dir.join(REJOINING_FILE));
                    rejoining.store(false, Ordering::SeqCst);
                    tracing::info!("server {id} is a voter again, with the log");
                    return;
                }
                Err(e) => tracing::debug!("rejoin via {addr}: {e}"),
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// The leader's side: demotes `id` to a learner, waits until it holds everything committed at
/// that point, and makes it a voter again. One readmission at a time.
pub async fn readmit(raft: &Raft<C, Machine>, one: &tokio::sync::Mutex<()>, id: NodeId) -> Result<(), ProposeError> {
    let _one = one.lock().await;
    if raft.metrics().borrow_watched().state != openraft::ServerState::Leader {
        return Err(ProposeError::Refused { code: ErrorCode::NotLeader, message: "not the leader".into() });
    }
    let failed = |what: &str, e: &dyn std::fmt::Display| ProposeError::Refused {
        code: ErrorCode::Unavailable,
        message: format!("readmitting server {id}: {what}: {e}"),
    };
    let membership = raft.metrics().borrow_watched().membership_config.clone();
    if membership.membership().get_node(&id).is_none() {
        return Err(ProposeError::Refused {
            code: ErrorCode::BadRequest,
            message: format!("server {id} is not a member of this cluster"),
        });
    }
    let is_voter = membership.membership().voter_ids().any(|v| v == id);
    let target = if is_voter {
        let demoted = raft
            .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), true)
            .await
            .map_err(|e| failed("demoting it to a learner", &e))?;
        demoted.log_id.index
    } else {
        raft.metrics().borrow_watched().local_committed.as_ref().map_or(0, |l| l.index)
    };
    tracing::info!("server {id} is rejoining: a learner until it holds index {target}");
    let deadline = Instant::now() + CATCH_UP_BOUND;
    let mut metrics = raft.metrics();
    loop {
        let m = metrics.borrow_watched().clone();
        if m.state != openraft::ServerState::Leader {
            return Err(ProposeError::Refused { code: ErrorCode::NotLeader, message: "no longer the leader".into() });
        }
        let matched = m.replication.as_ref().and_then(|r| r.get(&id).cloned().flatten()).map_or(0, |l| l.index);
        if matched >= target {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(failed(
                "catching up",
                &format!("it holds index {matched} of {target} after {CATCH_UP_BOUND:?}"),
            ));
        }
        let _ = tokio::time::timeout(left.min(Duration::from_millis(500)), metrics.changed()).await;
    }
    raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), true)
        .await
        .map_err(|e| failed("making it a voter again", &e))?;
    tracing::info!("server {id} rejoined as a voter");
    Ok(())
}

/// Refuses a vote while this server (`id`) is rejoining.
pub fn refuse_vote(rejoining: &AtomicBool, id: NodeId) -> Result<(), tonic::Status> {
    if rejoining.load(Ordering::SeqCst) {
        return Err(ErrorCode::Unavailable.status(format!(
            "server {id} lost its Raft state and is rejoining; it votes again once the leader has readmitted it"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("stripelock-rejoin-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_first_start_is_not_a_rejoin() {
        let d = dir("first");
        assert!(!must_rejoin(&d).unwrap());
        assert!(!d.join(REJOINING_FILE).exists());
    }

    #[test]
    fn a_joined_server_without_its_database_rejoins_until_done() {
        let d = dir("wiped");
        std::fs::write(d.join(JOINED_FILE), b"").unwrap();
        std::fs::write(d.join(DATABASE_FILE), b"").unwrap();
        assert!(!must_rejoin(&d).unwrap(), "database present: an ordinary restart");
        std::fs::remove_file(d.join(DATABASE_FILE)).unwrap();
        assert!(must_rejoin(&d).unwrap());
        // A crash after the new database was created: still rejoining.
        std::fs::write(d.join(DATABASE_FILE), b"").unwrap();
        assert!(must_rejoin(&d).unwrap());
        std::fs::remove_file(d.join(REJOINING_FILE)).unwrap();
        assert!(!must_rejoin(&d).unwrap());
    }
}
