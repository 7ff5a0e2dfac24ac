//! Session leases in the leader's memory (issue 12): a heartbeat renews its session here, not
//! in the log; only an expiry is a log entry (`Evict`, proposed by the leader when a lease runs
//! out). Pure: times are milliseconds of the leader's monotonic clock, given by the caller.
//!
//! The promise kept: a session is never expired while a renewal the cluster acknowledged still
//! covers it, counted from when the holder *sent* it (`lockengine::lease`).
//! - The leader records a renewal on receipt, at `now + lease`, later than the holder's send.
//! - It acknowledges a batch only after confirming with a majority that it still leads, after
//!   recording it. A new leader's election needs a vote from a member of that majority, given
//!   after it answered; so every acknowledged renewal was sent before any later leader was
//!   elected.
//! - A new leader starts every live session with a full fresh lease counted from when it first
//!   looks (after its election): never shorter than what an earlier leader promised.
//! - It renews and expires nothing until it has applied an entry of its own term, so an expiry
//!   an earlier leader proposed and did not see committed is applied before it promises anything
//!   (then that session is no longer live, and its renewals are refused).

use std::collections::{HashMap, HashSet};

use lockengine::SessionId;

/// The leader's lease table for one term.
#[derive(Debug, Default)]
pub struct Leases {
    /// The term the table was counted in; another term starts it afresh.
    term: u64,
    /// Session → the leader's clock reading at which its lease ends.
    deadline: HashMap<SessionId, u64>,
    /// Sessions whose expiry is proposed and not yet applied.
    expiring: HashSet<SessionId>,
    /// Negative control: a new leader gives the sessions it inherits no fresh lease.
    no_fresh_lease: bool,
}

/// A renewal that came too late: the lease had run out, or the session is expiring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLate;

impl Leases {
    /// Breaks the fresh lease at election on purpose, for the simulation's negative control:
    /// sessions a new leader inherits expire at once.
    #[doc(hidden)]
    pub fn break_fresh_lease_for_negative_control(&mut self) {
        self.no_fresh_lease = true;
    }

    /// This server leads `term`: a table of an earlier term is dropped.
    pub fn lead(&mut self, term: u64) {
        if self.term != term {
            self.term = term;
            self.deadline.clear();
            self.expiring.clear();
        }
    }

    /// The server stopped leading: nothing it counted holds any more.
    pub fn step_down(&mut self) {
        self.lead(0);
    }

    pub fn term(&self) -> u64 {
        self.term
    }

    /// Renews a live session (`lease_ms` is its lease) at `now_ms`. A session the table has not
    /// seen yet (opened, or inherited from another leader) gets a full lease from now.
    pub fn renew(&mut self, session: SessionId, lease_ms: u64, now_ms: u64) -> Result<(), TooLate> {
        if self.expiring.contains(&session) {
            return Err(TooLate);
        }
        let until = now_ms.saturating_add(lease_ms);
        match self.deadline.get_mut(&session) {
            Some(d) if *d < now_ms => Err(TooLate),
            Some(d) => {
                *d = (*d).max(until);
                Ok(())
            }
            None => {
                self.deadline.insert(session, until);
                Ok(())
            }
        }
    }

    /// Looks at every live session at `now_ms` and returns those whose lease has run out, to be
    /// expired (each once, until `expiry_failed`). Sessions no longer live leave the table.
    pub fn sweep(&mut self, now_ms: u64, live: impl IntoIterator<Item = (SessionId, u64)>) -> Vec<SessionId> {
        let mut due = Vec::new();
        let mut seen = HashSet::new();
        for (session, lease_ms) in live {
            seen.insert(session);
            let fresh = if self.no_fresh_lease { now_ms } else { now_ms.saturating_add(lease_ms) };
            let deadline = *self.deadline.entry(session).or_insert(fresh);
            if deadline < now_ms && self.expiring.insert(session) {
                due.push(session);
            }
            // Under the negative control an inherited session is due at once.
            if self.no_fresh_lease && deadline == now_ms && self.expiring.insert(session) {
                due.push(session);
            }
        }
        self.deadline.retain(|s, _| seen.contains(s));
        self.expiring.retain(|s| seen.contains(s));
        due.sort();
        due
    }

    /// The expiry of `session` was not committed (leadership lost, say): the next sweep may try
    /// again.
    pub fn expiry_failed(&mut self, session: SessionId) {
        self.expiring.remove(&session);
    }

    /// Sessions the table counts.
    pub fn len(&self) -> usize {
        self.deadline.len()
    }

    pub fn is_empty(&self) -> bool {
        self.deadline.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: SessionId = SessionId(1);

    #[test]
    fn a_renewal_extends_from_when_it_arrives_and_never_shortens() {
        let mut l = Leases::default();
        l.lead(3);
        l.renew(S, 1_000, 100).unwrap();
        assert!(l.sweep(1_100, [(S, 1_000)]).is_empty(), "due exactly at its deadline is not yet past it");
        l.renew(S, 1_000, 600).unwrap();
        assert!(l.sweep(1_500, [(S, 1_000)]).is_empty());
        assert_eq!(l.sweep(1_601, [(S, 1_000)]), vec![S]);
        // Once due, a late renewal cannot save it, and it is proposed once.
        assert_eq!(l.renew(S, 1_000, 1_602), Err(TooLate));
        assert!(l.sweep(1_700, [(S, 1_000)]).is_empty());
        // Its expiry failed to commit: proposed again.
        l.expiry_failed(S);
        assert_eq!(l.sweep(1_800, [(S, 1_000)]), vec![S]);
    }

    #[test]
    fn a_new_term_starts_every_live_session_with_a_full_lease() {
        let mut l = Leases::default();
        l.lead(3);
        l.renew(S, 1_000, 0).unwrap();
        l.lead(4);
        assert!(l.is_empty(), "another term's deadlines are not this leader's");
        // First look at 5_000 (long after the old deadline): a full lease from then.
        assert!(l.sweep(5_000, [(S, 1_000), (SessionId(2), 300)]).is_empty());
        assert!(l.sweep(5_300, [(S, 1_000), (SessionId(2), 300)]).is_empty());
        assert_eq!(l.sweep(5_301, [(S, 1_000), (SessionId(2), 300)]), vec![SessionId(2)]);
        assert_eq!(l.sweep(6_001, [(S, 1_000)]), vec![S]);
        assert_eq!(l.len(), 1, "a session no longer live leaves the table");
        l.step_down();
        assert!(l.is_empty() && l.term() == 0);
    }

    #[test]
    fn the_negative_control_expires_inherited_sessions_at_once() {
        let mut l = Leases::default();
        l.break_fresh_lease_for_negative_control();
        l.lead(2);
        assert_eq!(l.sweep(100, [(S, 1_000)]), vec![S]);
    }
}
