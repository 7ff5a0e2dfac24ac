//! Seed 000 at run time. A read without a lock is served by each storage server only for the
//! bytes it knows are free of write locks ([`LockFreeCache`]); on a miss it asks the leader,
//! whose lock table is the authority, and caches a "free". The leader, when it grants a write
//! lock on a file, consults the file's layout (the striping table) and sends an invalidate only
//! to the servers whose stripe units the locked range touches.

use std::sync::atomic::Ordering;
use std::time::Duration;

use lockengine::ByteRange;
use tonic::Status;
use wire::v1 as pb;

use crate::files::FilesService;

/// How long the leader waits for a server to take an invalidate.
const INVALIDATE_TIMEOUT: Duration = Duration::from_secs(2);

fn range_of(r: Option<pb::Range>) -> Result<ByteRange, Status> {
    let r = r.ok_or_else(|| Status::invalid_argument("no range"))?;
    ByteRange::new(r.start, r.end).map_err(|e| Status::invalid_argument(e.to_string()))
}

impl FilesService {
    /// Checks that `range` of `path` may be read without a lock here: known free, or the leader
    /// says so (and it is remembered).
    pub(crate) async fn check_unlocked_read(&self, path: &str, range: ByteRange) -> Result<(), Status> {
        let now = self.node.config.env.now_ms();
        let epoch = {
            let cache = self.node.lock_free.lock().expect("lock-free cache");
            if cache.is_free(path, range, now) {
                return Ok(());
            }
            cache.epoch()
        };
        let leader = self.node.leader().ok_or_else(|| {
            Status::unavailable("no leader is known to ask whether the bytes are locked; try again in a moment")
        })?;
        let q =
            pb::LockFreeQuery { path: path.to_string(), range: Some(pb::Range { start: range.start, end: range.end }) };
        let answer = if leader == self.node.id {
            self.lock_free_here(q)?
        } else {
            self.peer(leader)?.lock_free(q).await?.into_inner()
        };
        if !answer.free {
            return Err(Status::failed_precondition(format!(
                "bytes {range} of {path} are locked for writing ({}); read them under a lock (without --no-lock)",
                answer.holder
            )));
        }
        let mut cache = self.node.lock_free.lock().expect("lock-free cache");
        cache.insert(path, range, epoch, self.node.config.env.now_ms());
        self.node.data.lock_free_ranges.store(cache.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The leader's answer: whether a write lock is granted on any byte of the range.
    pub(crate) fn lock_free_here(&self, q: pb::LockFreeQuery) -> Result<pb::LockFreeAnswer, Status> {
        if !self.node.is_leader() {
            return Err(Status::failed_precondition("not the leader; ask the leader"));
        }
        let range = range_of(q.range)?;
        let state = self.node.machine.state();
        Ok(match state.engine.write_holder(&q.path, range) {
            None => pb::LockFreeAnswer { free: true, holder: String::new() },
            Some((session, held)) => {
                pb::LockFreeAnswer { free: false, holder: format!("session {} holds {held}", session.0) }
            }
        })
    }

    /// An invalidate from the leader: forget what the new write lock overlaps.
    pub(crate) fn invalidated(&self, note: pb::InvalidateNote) -> Result<(), Status> {
        let range = range_of(note.range)?;
        let mut cache = self.node.lock_free.lock().expect("lock-free cache");
        cache.invalidate(&note.path, range);
        self.node.data.invalidations_received.fetch_add(1, Ordering::Relaxed);
        self.node.data.lock_free_ranges.store(cache.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Sends invalidations for write locks as this server applies them, while it leads.
    pub(crate) fn start_invalidations(&self) {
        let mut grants = self.node.machine.write_grants();
        let this = self.clone();
        tokio::spawn(async move {
            while let Some(g) = grants.recv().await {
                if !this.node.is_leader() || this.node.config.env.break_invalidate_for_negative_control {
                    continue;
                }
                let touched = g.layout.servers_touching(g.range.start..g.range.end);
                for server in touched {
                    let note = pb::InvalidateNote {
                        path: g.path.clone(),
                        range: Some(pb::Range { start: g.range.start, end: g.range.end }),
                    };
                    this.node.data.invalidations_sent.fetch_add(1, Ordering::Relaxed);
                    if server == this.node.id {
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
