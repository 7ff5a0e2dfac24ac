//! Seed 003's bound on state-changing operations. A server writes (stripe writes, put rows,
//! rebuilt and repaired units) only while its lease is valid, and admits at most as many at
//! once as can finish before the lease runs out: the lease left (as `lockengine::lease` counts
//! it, a drift margin before the cluster's count ends) ÷ the worst operation time measured
//! recently. Storage that cannot check fencing tokens is then never
//! written after the server's lease, and with it its locks, could have passed to another.
//!
//! Pure: the lease left and the operation times come in as milliseconds.

use std::collections::VecDeque;

/// The worst operation time assumed before any has been measured.
pub const WORST_ASSUMED_MS: u64 = 100;
/// Operation times remembered for the worst case.
pub const WINDOW: usize = 64;
/// Admitted at once, at most, however long the lease.
pub const IN_FLIGHT_MAX: u32 = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The lease has run out: nothing may be started.
    LeaseOut,
    /// As many are in flight as can finish in the lease left.
    Full { limit: u32 },
}

#[derive(Debug)]
pub struct Admission {
    in_flight: u32,
    recent: VecDeque<u64>,
    in_flight_max: u32,
}

impl Default for Admission {
    fn default() -> Admission {
        Admission::with_max(IN_FLIGHT_MAX)
    }
}

impl Admission {
    /// Admits at most `in_flight_max` at once, however long the lease.
    pub fn with_max(in_flight_max: u32) -> Admission {
        Admission { in_flight: 0, recent: VecDeque::new(), in_flight_max }
    }

    /// The longest recent operation, in ms (at least 1).
    pub fn worst_ms(&self) -> u64 {
        self.recent.iter().copied().max().unwrap_or(WORST_ASSUMED_MS).max(1)
    }

    /// How many may be in flight with `lease_left_ms` of lease.
    pub fn limit(&self, lease_left_ms: u64) -> u32 {
        u32::try_from(lease_left_ms / self.worst_ms()).unwrap_or(u32::MAX).min(self.in_flight_max)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Admits one operation, or says why not.
    pub fn admit(&mut self, lease_left_ms: u64) -> Result<(), Refused> {
        if lease_left_ms == 0 {
            return Err(Refused::LeaseOut);
        }
        let limit = self.limit(lease_left_ms);
        if self.in_flight >= limit {
            return Err(Refused::Full { limit });
        }
        self.in_flight += 1;
        Ok(())
    }

    /// An admitted operation ended after `took_ms`.
    pub fn done(&mut self, took_ms: u64) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.recent.push_back(took_ms);
        if self.recent.len() > WINDOW {
            self.recent.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_lease_no_writes() {
        let mut a = Admission::default();
        assert_eq!(a.admit(0), Err(Refused::LeaseOut));
        assert_eq!(a.in_flight(), 0);
    }

    #[test]
    fn admits_what_can_finish_in_the_lease_left() {
        let mut a = Admission::default();
        // 100 ms assumed per operation: 1000 ms left admits 10.
        for _ in 0..10 {
            a.admit(1_000).unwrap();
        }
        assert_eq!(a.admit(1_000), Err(Refused::Full { limit: 10 }));
        // Less lease left, fewer admitted: the 10 in flight are already too many for 500 ms.
        assert_eq!(a.admit(500), Err(Refused::Full { limit: 5 }));
        a.done(250);
        assert_eq!(a.worst_ms(), 250, "a slow operation lowers the limit");
        assert_eq!(a.limit(1_000), 4);
        assert_eq!(a.admit(1_000), Err(Refused::Full { limit: 4 }));
    }

    #[test]
    fn the_worst_case_is_recent() {
        let mut a = Admission::default();
        a.admit(10_000).unwrap();
        a.done(5_000);
        for _ in 0..WINDOW {
            a.admit(10_000).unwrap();
            a.done(10);
        }
        assert_eq!(a.worst_ms(), 10, "an old slow operation is forgotten after {WINDOW}");
        assert_eq!(a.limit(600_000), IN_FLIGHT_MAX);
    }

    /// Operations arriving at `arrive_ms` that take `took_ms` each, at a storage that carries them
    /// out one after another (the worst case: they share its disk), under a lease that ends at
    /// `lease_end_ms`; `admit` decides each (a refused one is dropped). Returns the first
    /// operation that would still be running when the lease ends: a write storage could accept
    /// after the holder's locks may have passed to another.
    fn late_operation(
        ops: &[(u64, u64)],
        lease_end_ms: u64,
        mut admit: impl FnMut(&mut Admission, u64) -> Result<(), Refused>,
    ) -> Option<(usize, u64)> {
        let mut a = Admission::default();
        // The slowest operation has been measured once, as a running server would have.
        let slowest = ops.iter().map(|o| o.1).max().unwrap_or(1);
        a.admit(u64::MAX).unwrap();
        a.done(slowest);
        let mut running: Vec<u64> = Vec::new();
        let mut busy_until = 0u64;
        let mut ops: Vec<(usize, (u64, u64))> = ops.iter().copied().enumerate().collect();
        ops.sort_by_key(|(_, (t, _))| *t);
        for (i, (at, took)) in ops {
            running.retain(|&end| {
                if end <= at {
                    a.done(slowest);
                    false
                } else {
                    true
                }
            });
            if admit(&mut a, lease_end_ms.saturating_sub(at)).is_err() {
                continue;
            }
            busy_until = busy_until.max(at) + took;
            if busy_until > lease_end_ms {
                return Some((i, busy_until));
            }
            running.push(busy_until);
        }
        None
    }

    proptest::proptest! {
        #[test]
        fn nothing_admitted_outlives_the_lease(
            ops in proptest::collection::vec((0u64..2_000, 1u64..300), 1..200),
            lease_end in 100u64..3_000,
        ) {
            let late = late_operation(&ops, lease_end, Admission::admit);
            proptest::prop_assert!(late.is_none(), "operation {:?} ends after the lease ({lease_end} ms)", late);
        }
    }

    /// The negative control: admitting without the bound (only refusing once the lease is out)
    /// lets a burst of writes run past the lease, and the check above catches it.
    #[test]
    fn admitting_without_the_bound_is_caught() {
        let burst: Vec<(u64, u64)> = (0..50).map(|_| (0, 100)).collect();
        let unbounded =
            |a: &mut Admission, left: u64| if left == 0 { Err(Refused::LeaseOut) } else { a.admit(u64::MAX) };
        assert!(late_operation(&burst, 1_000, unbounded).is_some(), "an unbounded admission was not caught");
        assert_eq!(late_operation(&burst, 1_000, Admission::admit), None);
    }
}
