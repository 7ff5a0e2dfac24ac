//! Server-side deadlines of blocking waits (`LockRequest.wait_ms`, `PosixRequest.wait_ms`): the
//! server a session is attached to cancels a request that still waits when its deadline passes,
//! so the wait ends even if the client's own cancel never arrives (issue 13). Kept in memory per
//! session stream; a client that moves to another server sends its waits again there, with
//! their limits. Pure: time comes in as an argument (tokio's `Instant`, the runtime's clock,
//! simulated in the simulation; never the wall clock, which would make a seed replay differently).

use std::collections::{BTreeMap, HashMap};
use tokio::time::Instant;

use lockengine::{LockId, PosixOwner};

/// Deadlines kept per session stream, at most; past it, those of requests no longer waiting
/// are dropped first ([`Deadlines::prune`]), then new ones are not kept (the client's own
/// timer still ends those waits).
pub const DEADLINES_MAX: usize = 4096;

/// A wait whose deadline passed: cancel it if it still waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due {
    Lock(LockId),
    Posix { owner: PosixOwner, resource: String },
}

#[derive(Debug, Default)]
pub struct Deadlines {
    /// By deadline, then arrival (one deadline may hold several).
    due: BTreeMap<(Instant, u64), (Due, u64)>,
    next: u64,
    /// The newest F_SETLKW of each owner on each resource that has a deadline, by its number: a
    /// deadline of an older one never cancels a newer wait of the same owner there.
    posix_newest: HashMap<(PosixOwner, String), u64>,
    /// The same for lock numbers, which a client uses again once a request has ended: the
    /// deadline of an earlier request never cancels a later one under the same number.
    lock_newest: HashMap<LockId, u64>,
}

impl Deadlines {
    pub fn len(&self) -> usize {
        self.due.len()
    }

    /// A lock request under number `lock`; with `at`, one that waits at most until then. Every
    /// request counts: it makes the deadline of an earlier request under that number void.
    /// False if a deadline was asked for and not kept (full).
    pub fn lock(&mut self, lock: LockId, at: Option<Instant>) -> bool {
        let Some(at) = at else {
            self.lock_newest.remove(&lock);
            return true;
        };
        if self.due.len() >= DEADLINES_MAX {
            self.lock_newest.remove(&lock);
            return false;
        }
        self.next += 1;
        self.lock_newest.insert(lock, self.next);
        self.due.insert((at, self.next), (Due::Lock(lock), self.next));
        true
    }

    /// A POSIX request of `owner` on `resource`; with `at`, a wait that ends then. Every request
    /// counts (with or without a deadline): it makes an older deadline of the same owner there
    /// void. False if a deadline was asked for and not kept (full).
    pub fn posix(&mut self, owner: PosixOwner, resource: &str, at: Option<Instant>) -> bool {
        let key = (owner, resource.to_string());
        let Some(at) = at else {
            self.posix_newest.remove(&key);
            return true;
        };
        if self.due.len() >= DEADLINES_MAX {
            self.posix_newest.remove(&key);
            return false;
        }
        self.next += 1;
        self.posix_newest.insert(key, self.next);
        self.due.insert((at, self.next), (Due::Posix { owner, resource: resource.to_string() }, self.next));
        true
    }

    /// The earliest deadline kept.
    pub fn next_due(&self) -> Option<Instant> {
        self.due.keys().next().map(|(at, _)| *at)
    }

    /// The first wait whose deadline is at or before `now`, if any (void ones are skipped).
    pub fn take_due(&mut self, now: Instant) -> Option<Due> {
        while let Some(entry) = self.due.first_entry() {
            if entry.key().0 > now {
                return None;
            }
            let (due, n) = entry.remove();
            match &due {
                Due::Lock(lock) => {
                    if self.lock_newest.get(lock) == Some(&n) {
                        self.lock_newest.remove(lock);
                        return Some(due);
                    }
                }
                Due::Posix { owner, resource } => {
                    let key = (*owner, resource.clone());
                    if self.posix_newest.get(&key) == Some(&n) {
                        self.posix_newest.remove(&key);
                        return Some(due);
                    }
                }
            }
        }
        None
    }

    /// Drops the deadlines of requests that no longer wait.
    pub fn prune(&mut self, waits: impl Fn(&Due) -> bool) {
        let (newest, lock_newest) = (&mut self.posix_newest, &mut self.lock_newest);
        self.due.retain(|_, (due, n)| {
            let keep = waits(due);
            if !keep {
                match due {
                    Due::Posix { owner, resource } => {
                        let key = (*owner, resource.clone());
                        if newest.get(&key) == Some(n) {
                            newest.remove(&key);
                        }
                    }
                    Due::Lock(lock) => {
                        if lock_newest.get(lock) == Some(n) {
                            lock_newest.remove(lock);
                        }
                    }
                }
            }
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use lockengine::SessionId;

    use super::*;

    fn owner(n: u64) -> PosixOwner {
        PosixOwner { session: SessionId(1), owner: n }
    }

    #[test]
    fn deadlines_come_due_in_time_order() {
        let t0 = Instant::now();
        let mut d = Deadlines::default();
        d.lock(LockId(2), Some(t0 + Duration::from_millis(20)));
        d.lock(LockId(1), Some(t0 + Duration::from_millis(10)));
        assert_eq!(d.next_due(), Some(t0 + Duration::from_millis(10)));
        assert_eq!(d.take_due(t0 + Duration::from_millis(5)), None);
        assert_eq!(d.take_due(t0 + Duration::from_millis(30)), Some(Due::Lock(LockId(1))));
        assert_eq!(d.take_due(t0 + Duration::from_millis(30)), Some(Due::Lock(LockId(2))));
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn a_newer_posix_request_voids_the_older_deadline() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(1);
        let mut d = Deadlines::default();
        d.posix(owner(7), "f", Some(t0));
        // The same owner asks again on the same file, without a limit: the old deadline must
        // not cancel this wait.
        d.posix(owner(7), "f", None);
        assert_eq!(d.take_due(later), None);
        // With a new limit: only the newest deadline counts.
        d.posix(owner(7), "f", Some(t0));
        d.posix(owner(7), "f", Some(later));
        d.posix(owner(8), "f", Some(t0));
        assert_eq!(d.take_due(later), Some(Due::Posix { owner: owner(8), resource: "f".into() }));
        assert_eq!(d.take_due(later), Some(Due::Posix { owner: owner(7), resource: "f".into() }));
        assert_eq!(d.take_due(later), None);
    }

    #[test]
    fn a_lock_number_used_again_is_not_cancelled_by_the_earlier_deadline() {
        let t0 = Instant::now();
        let mut d = Deadlines::default();
        d.lock(LockId(5), Some(t0));
        // The request ended and the client asked again under number 5, without a limit.
        d.lock(LockId(5), None);
        assert_eq!(d.take_due(t0 + Duration::from_secs(1)), None);
        d.lock(LockId(5), Some(t0));
        d.lock(LockId(5), Some(t0 + Duration::from_secs(2)));
        assert_eq!(d.take_due(t0 + Duration::from_secs(1)), None, "only the newest deadline counts");
        assert_eq!(d.take_due(t0 + Duration::from_secs(2)), Some(Due::Lock(LockId(5))));
    }

    #[test]
    fn deadlines_are_bounded_and_pruned() {
        let t0 = Instant::now();
        let mut d = Deadlines::default();
        for i in 0..DEADLINES_MAX as u64 {
            assert!(d.lock(LockId(i), Some(t0)));
        }
        assert!(!d.lock(LockId(u64::MAX), Some(t0)), "full");
        assert!(!d.posix(owner(1), "f", Some(t0)), "full");
        d.prune(|due| matches!(due, Due::Lock(LockId(n)) if *n < 10));
        assert_eq!(d.len(), 10);
        assert!(d.lock(LockId(99_999), Some(t0)));
    }
}
