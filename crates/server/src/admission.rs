//! Seed 003's bound on state-changing operations. A server writes (stripe writes, put rows,
//! rebuilt and repaired units) only while its lease is valid, and admits at most as many at
//! once as can finish before the lease runs out: (lease left − drift margin) ÷ the worst
//! operation time measured recently. Storage that cannot check fencing tokens is then never
//! written after the server's lease, and with it its locks, could have passed to another.
//!
//! Pure: the lease left and the operation times come in as milliseconds.

use std::collections::VecDeque;

/// Lease time held back for clock drift between this server and the cluster's leader.
pub const DRIFT_MARGIN_MS: u64 = 200;
/// The worst operation time assumed before any has been measured.
pub const WORST_ASSUMED_MS: u64 = 100;
/// Operation times remembered for the worst case.
pub const WINDOW: usize = 64;
/// Admitted at once, at most, however long the lease.
pub const IN_FLIGHT_MAX: u32 = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The lease (less the drift margin) has run out: nothing may be started.
    LeaseOut,
    /// As many are in flight as can finish in the lease left.
    Full { limit: u32 },
}

#[derive(Debug, Default)]
pub struct Admission {
    in_flight: u32,
    recent: VecDeque<u64>,
}

impl Admission {
    /// The longest recent operation, in ms (at least 1).
    pub fn worst_ms(&self) -> u64 {
        self.recent.iter().copied().max().unwrap_or(WORST_ASSUMED_MS).max(1)
    }

    /// How many may be in flight with `lease_left_ms` of lease.
    pub fn limit(&self, lease_left_ms: u64) -> u32 {
        let usable = lease_left_ms.saturating_sub(DRIFT_MARGIN_MS);
        u32::try_from(usable / self.worst_ms()).unwrap_or(u32::MAX).min(IN_FLIGHT_MAX)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Admits one operation, or says why not.
    pub fn admit(&mut self, lease_left_ms: u64) -> Result<(), Refused> {
        if lease_left_ms <= DRIFT_MARGIN_MS {
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
        assert_eq!(a.admit(DRIFT_MARGIN_MS), Err(Refused::LeaseOut));
        assert_eq!(a.admit(0), Err(Refused::LeaseOut));
        assert_eq!(a.in_flight(), 0);
    }

    #[test]
    fn admits_what_can_finish_in_the_lease_left() {
        let mut a = Admission::default();
        // 200 ms margin, 100 ms assumed per operation: 1000 ms left admits 8.
        for _ in 0..8 {
            a.admit(1_000).unwrap();
        }
        assert_eq!(a.admit(1_000), Err(Refused::Full { limit: 8 }));
        // Less lease left, fewer admitted: the 8 in flight are already too many for 500 ms.
        assert_eq!(a.admit(500), Err(Refused::Full { limit: 3 }));
        a.done(250);
        assert_eq!(a.worst_ms(), 250, "a slow operation lowers the limit");
        assert_eq!(a.limit(1_000), 3);
        assert_eq!(a.admit(1_000), Err(Refused::Full { limit: 3 }));
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
}
