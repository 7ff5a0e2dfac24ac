//! Lock memory that stays bounded (issue 12, after Lustre's LRU resize): each holder keeps its
//! idle cached locks in an LRU whose size the servers set from their lock-memory budget. As the
//! lock table nears the budget the size is halved each round, and holders give back their least
//! recently used cached locks; when memory frees it doubles again, up to each session's fair
//! share. Pure: the runtime feeds it the table's size once a second and sends what it returns.

/// Bytes a lock record costs a server, for the budget: our goal's bound (≤ 1 KiB a lock), above
/// what `stripelock bench lock --held` measured (485–743 B at 10k–100k locks).
pub const BYTES_PER_LOCK: u64 = 1_024;

/// The smallest LRU size a holder is ever asked for: enough to keep its hot locks.
pub const LRU_MIN: u64 = 16;

/// Above this share of the budget (in tenths) holders are asked to shrink; below the lower one
/// their LRUs may grow again.
const HIGH_TENTHS: u64 = 9;
const LOW_TENTHS: u64 = 6;

/// What a server decided about its holders' LRUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LruState {
    /// The lock-memory budget, bytes.
    pub budget: u64,
    /// Lock records the table holds, in bytes at [`BYTES_PER_LOCK`] each.
    pub used: u64,
    /// The most idle cached locks each holder may keep.
    pub size: u64,
}

/// The LRU controller of one server.
#[derive(Debug, Clone)]
pub struct Lru {
    budget: u64,
    size: u64,
}

impl Lru {
    pub fn new(budget_bytes: u64) -> Lru {
        Lru { budget: budget_bytes, size: 0 }
    }

    fn budget_locks(&self) -> u64 {
        (self.budget / BYTES_PER_LOCK).max(1)
    }

    /// Each session's share of the lower mark: what a holder may keep when memory is free.
    fn fair(&self, sessions: u64) -> u64 {
        (self.budget_locks() * LOW_TENTHS / 10 / sessions.max(1)).max(LRU_MIN)
    }

    /// One round: the table holds `locks` lock records over `sessions` live sessions. Returns
    /// the state, whose `size` is what holders are asked to keep from now on.
    pub fn step(&mut self, locks: u64, sessions: u64) -> LruState {
        let (budget, fair) = (self.budget_locks(), self.fair(sessions));
        self.size = if self.size == 0 {
            fair
        } else if locks >= budget * HIGH_TENTHS / 10 {
            (self.size.min(fair) / 2).max(LRU_MIN)
        } else if locks <= budget * LOW_TENTHS / 10 {
            self.size.saturating_mul(2).min(fair)
        } else {
            self.size.min(fair)
        };
        LruState { budget: self.budget, used: locks.saturating_mul(BYTES_PER_LOCK), size: self.size }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_shrinks_near_the_budget_and_grows_back_when_memory_frees() {
        // 1,000 locks' worth, 4 sessions: a fair share is 600 / 4 = 150.
        let mut lru = Lru::new(1_000 * BYTES_PER_LOCK);
        assert_eq!(lru.step(0, 4).size, 150);
        assert_eq!(lru.step(700, 4).size, 150, "between the marks nothing changes");
        let s = lru.step(950, 4);
        assert_eq!((s.size, s.used, s.budget), (75, 950 * BYTES_PER_LOCK, 1_000 * BYTES_PER_LOCK));
        assert_eq!(lru.step(920, 4).size, 37, "halved every round while over the upper mark");
        assert_eq!(lru.step(990, 4).size, 18);
        assert_eq!(lru.step(990, 4).size, LRU_MIN, "never below the floor");
        assert_eq!(lru.step(800, 4).size, LRU_MIN, "between the marks it holds");
        assert_eq!(lru.step(500, 4).size, 32, "doubles once below the lower mark");
        assert_eq!(lru.step(500, 4).size, 64);
        assert_eq!(lru.step(100, 4).size, 128);
        assert_eq!(lru.step(100, 4).size, 150, "up to the fair share, no further");
        // More sessions, smaller shares, at once.
        assert_eq!(lru.step(100, 10).size, 60);
    }

    #[test]
    fn a_tiny_budget_still_lets_a_holder_keep_its_floor() {
        let mut lru = Lru::new(10);
        assert_eq!(lru.step(0, 1).size, LRU_MIN);
        assert_eq!(lru.step(1_000, 1).size, LRU_MIN);
    }
}
