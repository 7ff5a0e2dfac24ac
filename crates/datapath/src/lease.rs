//! Seed 003's storage leases, as plain state: when a lease a storage server took ends on its
//! own clock, the grants it holds, and the leader's view of the leases it granted and the fences
//! each member acknowledged. Time comes in as `Instant`s; `fencing.rs` carries them out.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use lockengine::SessionId;
use tokio::time::Instant;

/// How long a storage lease lasts, counted from when its renewal was sent. The leader waits at
/// most this long (after its last grant to it) for a storage server that does not acknowledge a
/// fence; a new leader at most this long after taking over.
pub const STORAGE_LEASE_MS_DEFAULT: u64 = 2_000;

/// When a storage lease ends on the storage server's own clock: seed 003's one lease rule
/// (`lockengine::lease`), counted from when the renewal was sent, less the drift margin.
pub fn storage_lease_end(sent: Instant, lease_ms: u64) -> Instant {
    sent + Duration::from_millis(storage_lease_ms_left(lease_ms))
}

/// How many milliseconds of a fresh lease of `lease_ms` a storage server may use.
pub fn storage_lease_ms_left(lease_ms: u64) -> u64 {
    lockengine::lease::valid_until_ms(0, lease_ms)
}

/// What a storage server did about fences, for an observer (the simulation's checker).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageEvent {
    /// Server `server` recorded these sessions as fenced, durably.
    Fenced { server: u64, sessions: Vec<u64> },
    /// Server `server` took a storage lease that ends at `until_ms` on the environment's clock.
    Lease { server: u64, until_ms: u64 },
}

/// A storage server's leases: the last few grants, each `(ends at, index to apply first)`.
#[derive(Debug, Default)]
pub struct StorageLease {
    grants: Mutex<VecDeque<(Instant, u64)>>,
    changed: tokio::sync::Notify,
}

/// Grants kept: the newest may wait for its index while an older one is still usable.
const GRANTS_KEPT: usize = 2;

impl StorageLease {
    pub fn grant(&self, until: Instant, index: u64) {
        let mut g = self.grants.lock().expect("storage lease");
        g.push_back((until, index));
        while g.len() > GRANTS_KEPT {
            g.pop_front();
        }
        drop(g);
        self.changed.notify_waiters();
    }

    /// Whether a change may be admitted now, with `applied` the local applied index.
    pub fn valid(&self, now: Instant, applied: u64) -> bool {
        self.grants.lock().expect("storage lease").iter().any(|&(until, index)| now < until && applied >= index)
    }

    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }
}

/// The leader's view of the storage leases it (and only it, in its term) has granted, and of
/// the fences each member has acknowledged.
#[derive(Debug, Default)]
pub struct LeaderLeases {
    term: u64,
    /// When this server was first seen leading in `term`.
    since: Option<Instant>,
    granted: BTreeMap<u64, Instant>,
    /// Per fencing session, the members that recorded its fence (durable, so kept across terms).
    acked: BTreeMap<SessionId, BTreeSet<u64>>,
}

impl LeaderLeases {
    /// Notes that this server leads in `term` at `now`: a new term forgets the grants of the old
    /// one and assumes every member holds a lease until `now + lease`.
    pub fn leading(&mut self, term: u64, now: Instant) {
        if self.since.is_none() || self.term != term {
            self.term = term;
            self.since = Some(now);
            self.granted.clear();
        }
    }

    /// Records a lease granted to `member` in `term`, ending at `until` on the leader's clock.
    pub fn granted(&mut self, term: u64, member: u64, now: Instant, until: Instant) {
        self.leading(term, now);
        let g = self.granted.entry(member).or_insert(until);
        *g = (*g).max(until);
    }

    /// Until when `member` may hold a storage lease, as far as this leader knows.
    pub fn horizon(&self, member: u64, lease: Duration) -> Option<Instant> {
        let since = self.since? + lease;
        Some(self.granted.get(&member).map_or(since, |g| (*g).max(since)))
    }

    pub fn acked(&mut self, member: u64, sessions: &[SessionId]) {
        for s in sessions {
            self.acked.entry(*s).or_default().insert(member);
        }
    }

    /// Forgets acknowledgements of sessions no longer fencing.
    pub fn keep_only(&mut self, fencing: &[SessionId]) {
        self.acked.retain(|s, _| fencing.contains(s));
    }

    /// The members that must still record `session`'s fence before it may be acknowledged: those
    /// that have not, and may still hold a storage lease at `now`.
    pub fn missing(&self, session: SessionId, members: &[u64], now: Instant, lease: Duration) -> Vec<u64> {
        let acked = self.acked.get(&session);
        members
            .iter()
            .copied()
            .filter(|m| !acked.is_some_and(|a| a.contains(m)))
            .filter(|m| self.horizon(*m, lease).is_none_or(|h| now < h))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_millis(2_000);

    #[tokio::test(start_paused = true)]
    async fn a_fence_waits_for_every_member_or_its_lease() {
        let t0 = Instant::now();
        let mut l = LeaderLeases::default();
        let s = SessionId(7);
        let members = [1, 2, 3];
        l.leading(4, t0);
        // A new leader assumes every member holds a lease until its start plus the lease.
        assert_eq!(l.missing(s, &members, t0, LEASE), vec![1, 2, 3]);
        l.acked(1, &[s]);
        l.acked(2, &[s]);
        assert_eq!(l.missing(s, &members, t0 + LEASE / 2, LEASE), vec![3]);
        assert!(l.missing(s, &members, t0 + LEASE, LEASE).is_empty(), "member 3 is past its lease");
        // A grant in this term extends what member 3 may hold.
        l.granted(4, 3, t0 + LEASE / 2, t0 + LEASE / 2 + LEASE);
        assert_eq!(l.missing(s, &members, t0 + LEASE, LEASE), vec![3]);
        assert!(l.missing(s, &members, t0 + LEASE / 2 + LEASE, LEASE).is_empty());
        // A new term forgets the old term's grants and starts counting again.
        l.leading(5, t0 + 3 * LEASE);
        assert_eq!(l.missing(s, &members, t0 + 3 * LEASE, LEASE), vec![3]);
        l.keep_only(&[]);
        assert_eq!(l.missing(s, &members, t0 + 3 * LEASE, LEASE), vec![1, 2, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_storage_lease_is_valid_only_once_its_index_is_applied_and_before_it_ends() {
        let t0 = Instant::now();
        let lease = StorageLease::default();
        assert!(!lease.valid(t0, 100), "no lease yet");
        let end = storage_lease_end(t0, 2_000);
        assert_eq!(end, t0 + Duration::from_millis(1_800), "the drift margin comes off");
        lease.grant(end, 10);
        assert!(!lease.valid(t0, 9), "the log up to the leader's index is not applied yet");
        assert!(lease.valid(t0, 10));
        assert!(!lease.valid(end, 10), "ended");
        // A newer grant waiting for its index does not hide an older one still valid.
        lease.grant(end + Duration::from_millis(500), 20);
        assert!(lease.valid(t0, 10));
        assert!(!lease.valid(end, 10));
        assert!(lease.valid(end, 20));
    }
}
