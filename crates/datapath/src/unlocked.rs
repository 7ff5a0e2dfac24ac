//! Seed 000 at run time. A read without a lock is served by each storage server only for the
//! bytes it knows are free of write locks ([`LockFreeCache`]); on a miss it asks the leader,
//! whose lock table is the authority, and caches a "free". The leader, when it grants a write
//! lock on a file, consults the file's layout (the striping table) and sends an invalidate only
//! to the servers whose stripe units the locked range touches.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lockengine::ByteRange;
use tonic::Status;
use wire::ErrorCode;
use wire::convert::{range_from_pb, range_to_pb};
use wire::v1 as pb;

use crate::shared::Shared;

/// How long the leader waits for a server to take an invalidate.
const INVALIDATE_TIMEOUT: Duration = Duration::from_secs(2);

impl Shared {
    /// Checks that `range` of `path` may be read without a lock here: known free, or the leader
    /// says so (and it is remembered).
    pub async fn check_unlocked_read(&self, path: &str, range: ByteRange) -> Result<(), Status> {
        let now = self.locks.now_ms();
        let epoch = {
            let cache = self.lock_free.lock().expect("lock-free cache");
            if cache.is_free(path, range, now) {
                return Ok(());
            }
            cache.epoch()
        };
        let leader = self.locks.leadership().leader.ok_or_else(|| {
            ErrorCode::Unavailable
                .status("no leader is known to ask whether the bytes are locked; try again in a moment")
        })?;
        let q = pb::LockFreeQuery { path: path.to_string(), range: Some(range_to_pb(range)) };
        let answer = if leader == self.id() {
            self.lock_free_here(q)?
        } else {
            self.peer(leader)?.lock_free(q).await?.into_inner()
        };
        if !answer.free {
            return Err(ErrorCode::Busy.status(format!(
                "bytes {range} of {path} are locked for writing ({}); read them under a lock (without --no-lock)",
                answer.holder
            )));
        }
        let mut cache = self.lock_free.lock().expect("lock-free cache");
        cache.insert(path, range, epoch, self.locks.now_ms());
        self.stats.lock_free_ranges.store(cache.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The leader's answer: whether a write lock is granted on any byte of the range.
    pub fn lock_free_here(&self, q: pb::LockFreeQuery) -> Result<pb::LockFreeAnswer, Status> {
        if !self.locks.leadership().leading {
            let leader = self
                .locks
                .leadership()
                .leader
                .map(|id| wire::LeaderHint { id, address: self.locks.members().get(&id).cloned().unwrap_or_default() });
            return Err(wire::not_leader_status(leader, "not the leader; ask the leader"));
        }
        let range = range_from_pb(q.range)?;
        Ok(match self.locks.write_holder(&q.path, range) {
            None => pb::LockFreeAnswer { free: true, holder: String::new() },
            Some((session, held)) => {
                pb::LockFreeAnswer { free: false, holder: format!("session {} holds {held}", session.0) }
            }
        })
    }

    /// An invalidate from the leader: forget what the new write lock overlaps.
    pub fn invalidated(&self, note: pb::InvalidateNote) -> Result<(), Status> {
        let range = range_from_pb(note.range)?;
        let mut cache = self.lock_free.lock().expect("lock-free cache");
        cache.invalidate(&note.path, range);
        self.stats.invalidations_received.fetch_add(1, Ordering::Relaxed);
        self.stats.lock_free_ranges.store(cache.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Sends invalidations for write locks as this server applies them, while it leads.
    pub fn start_invalidations(self: &Arc<Self>) {
        let mut grants = self.locks.write_grants();
        let this = self.clone();
        tokio::spawn(async move {
            while let Some(g) = grants.recv().await {
                if !this.locks.leadership().leading || this.config.env.break_invalidate_for_negative_control {
                    continue;
                }
                let touched = g.layout.servers_touching(g.range.start..g.range.end);
                for server in touched {
                    let note = pb::InvalidateNote { path: g.path.clone(), range: Some(range_to_pb(g.range)) };
                    this.stats.invalidations_sent.fetch_add(1, Ordering::Relaxed);
                    if server == this.id() {
                        let _ = this.invalidated(note);
                        continue;
                    }
                    let Ok(mut peer) = this.peer(server) else { continue };
                    tokio::spawn(async move {
                        // A lost invalidate is healed by the entries' age limit.
                        let _ = tokio::time::timeout(INVALIDATE_TIMEOUT, peer.invalidate(note)).await;
                    });
                }
            }
        });
    }
}
