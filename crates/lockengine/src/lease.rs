//! Seed 003's lease as its holder counts it: one rule for every holder (a client session, a
//! server's gateway cache, a server's stripe writes). A renewal counts from the moment it was
//! *sent*, on the holder's own clock, and ends a drift margin before the lease does, so it runs
//! out at the holder before the cluster (which counts from when it received the renewal, on
//! the leader's clock) can expire the session and give its locks to another.
//!
//! Pure arithmetic on milliseconds.

/// Lease time held back for clock drift between a holder and the cluster's leader: a tenth of
/// the lease, at least 50 ms.
pub fn drift_margin_ms(lease_ms: u64) -> u64 {
    (lease_ms / 10).max(50)
}

/// The holder's clock reading at which a lease renewed by a request sent at `sent_ms` stops
/// being valid for it.
pub fn valid_until_ms(sent_ms: u64, lease_ms: u64) -> u64 {
    sent_ms.saturating_add(lease_ms.saturating_sub(drift_margin_ms(lease_ms)))
}

/// How much of that lease is left at `now_ms` (0: it has run out; do nothing that needs it).
pub fn left_ms(sent_ms: u64, lease_ms: u64, now_ms: u64) -> u64 {
    valid_until_ms(sent_ms, lease_ms).saturating_sub(now_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_ends_a_margin_before_the_cluster_counts_it_out() {
        assert_eq!(drift_margin_ms(10_000), 1_000);
        assert_eq!(drift_margin_ms(100), 50);
        assert_eq!(valid_until_ms(1_000, 10_000), 10_000);
        assert_eq!(left_ms(1_000, 10_000, 9_000), 1_000);
        assert_eq!(left_ms(1_000, 10_000, 10_000), 0);
        // Never past the cluster's own count, even for a tiny lease.
        assert!(valid_until_ms(0, 30) <= 30);
        assert_eq!(valid_until_ms(u64::MAX - 5, 1_000), u64::MAX);
    }
}
