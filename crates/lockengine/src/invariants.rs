//! `check_invariants`: the lock table's own consistency, asserted after every step in tests and
//! in the simulation. A failure is a bug in the engine, so it panics with what it found.

use rustc_hash::FxHashSet;

use crate::Engine;
use crate::engine::{OwnerKey, WaitKey};

impl Engine {
    /// Panics if the table is inconsistent: two incompatible grants overlap, a grant belongs to
    /// no live or fencing session, a token is above the last one issued, a queue, index or
    /// session list disagrees with the locks, a waiter could be granted but is not, a waiter
    /// belongs to an expired session, a limit is exceeded, or the wait-for graph has a cycle.
    pub fn check_invariants(&self) {
        let mut live = 0;
        for (idx, r) in self.resources.iter().enumerate() {
            if !r.live {
                assert!(self.free.contains(&(idx as u32)), "dead resource {idx} not on the free list");
                continue;
            }
            live += 1;
            assert_eq!(self.names.get(&r.name), Some(&(idx as u32)), "name map disagrees for {}", r.name);
            assert!(!self.is_resource_empty(idx as u32), "empty resource {} kept", r.name);
            assert!(
                r.waiter_count() as u64 <= self.limits.waiters_per_resource_max,
                "waiters over limit on {}",
                r.name
            );
            for (range, id) in r.granted.iter() {
                let l = self.locks.get(&id).unwrap_or_else(|| panic!("granted index names missing lock {id:?}"));
                let g = l.grant.unwrap_or_else(|| panic!("granted index names ungranted {id:?}"));
                assert_eq!((g.range, l.res), (range, idx as u32), "granted index range of {id:?}");
                for other in r.granted.overlapping(range) {
                    let og = self.locks[&other].grant.expect("granted");
                    assert!(
                        other == id || g.mode.compatible(og.mode),
                        "{id:?} {} and {other:?} {} overlap on {}",
                        g.mode,
                        og.mode,
                        r.name
                    );
                }
            }
            assert_eq!(r.waiting.len(), r.queue.len(), "waiting index and queue sizes differ on {}", r.name);
            for (pos, id) in &r.queue {
                let req = self.locks[id].request.as_ref().unwrap_or_else(|| panic!("queued {id:?} has no request"));
                assert_eq!(req.pos, *pos, "queue position of {id:?}");
                let now = self.blockers(idx as u32, Some(*id), req.mode, req.range, req.pos);
                assert!(!now.is_empty(), "{id:?} waits on {} but nothing blocks it", r.name);
                assert_eq!(now, req.blockers, "stale blockers of {id:?}");
                assert_eq!(self.edge_owners(&now), req.edges, "stale wait-for edges of {id:?}");
            }
            let owners: Vec<_> = r.posix.iter().collect();
            for (i, (a, am)) in owners.iter().enumerate() {
                assert!(!am.is_empty(), "empty POSIX map kept");
                assert!(am.len() as u64 <= self.limits.ranges_per_owner_max, "POSIX ranges over limit");
                let s = self.sessions.get(&a.session).unwrap_or_else(|| panic!("POSIX owner without session"));
                assert!(s.posix_resources.contains_key(&(idx as u32)), "session does not list POSIX resource");
                for (b, bm) in &owners[i + 1..] {
                    for (ra, ka) in am.iter() {
                        for (rb, kb) in bm.overlapping(ra) {
                            assert!(!ka.conflicts(*kb), "POSIX {a:?} {ra:?} and {b:?} {rb:?} conflict");
                        }
                    }
                }
            }
        }
        assert_eq!(live, self.names.len(), "live resources and names differ");

        for (id, l) in self.locks.iter() {
            let s = self.sessions.get(&l.session).unwrap_or_else(|| panic!("{id:?} belongs to no session"));
            assert!(s.locks.contains(id), "session does not list {id:?}");
            assert!(self.resources[l.res as usize].live, "{id:?} on a freed resource");
            assert!(l.grant.is_some() || l.request.is_some(), "{id:?} neither granted nor waiting");
            if let Some(g) = l.grant {
                assert!(g.token > 0 && g.token <= self.last_token, "token of {id:?} out of order");
            }
            if l.request.is_some() {
                assert!(!s.fencing, "{id:?} waits for an expired session");
                assert!(s.waiting.contains(id), "session does not list waiting {id:?}");
            } else {
                assert!(!s.waiting.contains(id), "session lists granted {id:?} as waiting");
            }
        }

        let mut expiring = 0;
        for (sid, s) in &self.sessions {
            assert!(s.locks.len() as u64 <= self.limits.locks_per_session_max, "locks over limit");
            for lock in &s.locks {
                assert_eq!(self.locks.get(lock).map(|l| l.session), Some(*sid), "session lists a foreign lock");
            }
            if !s.fencing {
                expiring += 1;
                assert!(self.expiry.contains(&(s.deadline_ms, *sid)), "live session missing from expiry");
                assert!(s.deadline_ms >= self.now_ms, "session past its lease not expired");
            } else {
                assert!(s.posix_waits.is_empty(), "expired session still waits");
            }
        }
        assert_eq!(expiring, self.expiry.len(), "expiry set has stale entries");

        for (seq, w) in &self.posix_waits {
            assert!(self.resources[w.res as usize].posix_queue.contains(seq), "POSIX wait not queued");
            assert!(!w.blockers.is_empty(), "POSIX wait with no blocker");
        }

        let mut owners: FxHashSet<OwnerKey> = FxHashSet::default();
        for (id, l) in self.locks.iter() {
            if l.request.is_some() {
                owners.insert(self.owner_of_wait(WaitKey::Lock(*id)));
            }
        }
        for seq in self.posix_waits.keys() {
            owners.insert(self.owner_of_wait(WaitKey::Posix(*seq)));
        }
        for owner in owners {
            assert!(self.cycle_through(owner).is_none(), "wait-for cycle through {owner:?}");
        }
    }

    fn is_resource_empty(&self, idx: u32) -> bool {
        let r = &self.resources[idx as usize];
        r.granted.is_empty() && r.queue.is_empty() && r.posix.is_empty() && r.posix_queue.is_empty()
    }
}
