//! Seed 004's choice of the server that carries out a stripe row's write for a gateway: the
//! server that wrote the row last (it likely still holds the row's stripe lock cached, with its
//! version) unless it is busier than the least busy candidate by more than [`SLACK`]; otherwise
//! the least busy candidate, this server first on a tie (no hop), then the layout's order.
//!
//! A server's load is its queue depth: the stripe writes it has scheduled or running. A gateway
//! knows it from two sources: what each server reported with its last answer (trusted for
//! [`REPORT_FRESH_MS`]), and the writes the gateway itself has sent there and not yet seen
//! answered. The larger counts. Pure: time comes in as milliseconds.

use std::collections::{HashMap, VecDeque};

/// How much busier than the least busy candidate the last delegate may be and still be chosen.
pub const SLACK: u32 = 1;
/// How long a server's reported load is believed.
pub const REPORT_FRESH_MS: u64 = 2_000;
/// Stripes whose last delegate is remembered; the oldest is forgotten first.
pub const STRIPES_REMEMBERED: usize = 4_096;

/// A stripe row: file id and row.
pub type Stripe = (u64, u64);

#[derive(Debug)]
pub struct Delegation {
    me: u64,
    reported: HashMap<u64, (u32, u64)>,
    outstanding: HashMap<u64, u32>,
    last: HashMap<Stripe, u64>,
    order: VecDeque<Stripe>,
    remembered: usize,
}

impl Delegation {
    pub fn new(me: u64) -> Delegation {
        Delegation {
            me,
            reported: HashMap::new(),
            outstanding: HashMap::new(),
            last: HashMap::new(),
            order: VecDeque::new(),
            remembered: STRIPES_REMEMBERED,
        }
    }

    /// Remembers the last delegate of at most `stripes` stripes.
    pub fn remembering(mut self, stripes: usize) -> Delegation {
        self.remembered = stripes.max(1);
        self
    }

    /// Server `server`'s load as this gateway knows it at `now_ms`.
    pub fn load(&self, server: u64, now_ms: u64) -> u32 {
        let reported = match self.reported.get(&server) {
            Some(&(load, at)) if now_ms.saturating_sub(at) <= REPORT_FRESH_MS => load,
            _ => 0,
        };
        reported.max(self.outstanding.get(&server).copied().unwrap_or(0))
    }

    /// The server that last carried out a write of `stripe`, if remembered.
    pub fn last(&self, stripe: Stripe) -> Option<u64> {
        self.last.get(&stripe).copied()
    }

    /// Chooses who writes `stripe` among `candidates` (not empty) and counts the write as
    /// outstanding there until [`Delegation::done`].
    pub fn choose(&mut self, stripe: Stripe, candidates: &[u64], now_ms: u64) -> u64 {
        assert!(!candidates.is_empty(), "a stripe write needs a candidate server");
        let least = candidates.iter().map(|&s| self.load(s, now_ms)).min().unwrap_or(0);
        let chosen = match self.last(stripe) {
            Some(last) if candidates.contains(&last) && self.load(last, now_ms) <= least + SLACK => last,
            _ => {
                let me = candidates.iter().copied().filter(|&s| s == self.me);
                let rest = candidates.iter().copied().filter(|&s| s != self.me);
                me.chain(rest).find(|&s| self.load(s, now_ms) == least).unwrap_or(candidates[0])
            }
        };
        *self.outstanding.entry(chosen).or_insert(0) += 1;
        chosen
    }

    /// Server `server` has `load` stripe writes scheduled or running (as of `now_ms`).
    pub fn report(&mut self, server: u64, load: u32, now_ms: u64) {
        self.reported.insert(server, (load, now_ms));
    }

    /// The write of `stripe` sent to `server` has been answered, with the load the server
    /// reported (`None` if it did not answer); on success the server becomes the stripe's last
    /// delegate.
    pub fn done(&mut self, stripe: Stripe, server: u64, reported: Option<u32>, succeeded: bool, now_ms: u64) {
        if let Some(n) = self.outstanding.get_mut(&server) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.outstanding.remove(&server);
            }
        }
        if let Some(load) = reported {
            self.report(server, load, now_ms);
        }
        if succeeded && self.last.insert(stripe, server).is_none() {
            self.order.push_back(stripe);
            while self.order.len() > self.remembered {
                if let Some(old) = self.order.pop_front() {
                    self.last.remove(&old);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Stripe = (7, 0);

    #[test]
    fn idle_cluster_writes_here_then_keeps_the_last_delegate() {
        let mut d = Delegation::new(2);
        assert_eq!(d.choose(S, &[1, 2, 3], 0), 2, "a tie goes to this server");
        d.done(S, 2, Some(0), true, 0);
        // Server 1 reports itself idle and this server busy by one: within the slack.
        d.reported.insert(2, (1, 10));
        assert_eq!(d.choose(S, &[1, 2, 3], 10), 2);
    }

    #[test]
    fn a_busy_last_delegate_loses_the_stripe_to_the_least_loaded() {
        let mut d = Delegation::new(9);
        d.done(S, 1, Some(0), true, 0);
        // Writes pile up at server 1 (outstanding, not yet answered).
        assert_eq!(d.choose(S, &[1, 2, 3], 0), 1);
        assert_eq!(d.choose(S, &[1, 2, 3], 0), 1, "1 outstanding is within the slack of 0");
        assert_eq!(d.choose(S, &[1, 2, 3], 0), 2, "2 outstanding is not: the least loaded, in order");
        assert_eq!(d.load(1, 0), 2);
        assert_eq!(d.load(2, 0), 1);
        // A reported queue counts as well.
        d.reported.insert(3, (5, 0));
        assert_eq!(d.choose((7, 1), &[3, 2], 0), 2);
    }

    #[test]
    fn old_reports_are_not_believed() {
        let mut d = Delegation::new(9);
        d.done(S, 1, Some(10), true, 0);
        assert_eq!(d.load(1, REPORT_FRESH_MS), 10);
        assert_eq!(d.load(1, REPORT_FRESH_MS + 1), 0);
        assert_eq!(d.choose(S, &[2, 1], REPORT_FRESH_MS + 1), 1, "the last delegate, idle as far as known");
    }

    #[test]
    fn a_failed_write_does_not_make_a_delegate_and_memory_is_bounded() {
        let mut d = Delegation::new(9);
        d.done(S, 1, None, false, 0);
        assert_eq!(d.last(S), None);
        for row in 0..(STRIPES_REMEMBERED as u64 + 10) {
            d.done((1, row), 3, None, true, 0);
        }
        assert_eq!(d.last.len(), STRIPES_REMEMBERED);
        assert_eq!(d.last((1, 0)), None, "the oldest is forgotten");
        assert_eq!(d.last((1, STRIPES_REMEMBERED as u64 + 9)), Some(3));
        assert!(d.outstanding.is_empty());
    }
}
