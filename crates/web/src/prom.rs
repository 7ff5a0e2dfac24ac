//! `/metrics`: the process's metrics recorder (installed once) renders what the code counts as
//! it goes (`metrics::counter!` and `histogram!` where things happen: lock requests, grants,
//! waits, revokes, fences, data-path bytes), plus gauges set from the server's status at each
//! scrape. Names carry their unit (`_seconds`, `_bytes`, `_total`).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use wire::v1 as pb;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Latency buckets, seconds: 100 µs to 30 s.
const SECONDS: &[f64] =
    &[0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Installs this process's recorder (once; a process with another recorder keeps it, and
/// `/metrics` then shows only the status gauges' text).
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| match PrometheusBuilder::new().set_buckets(SECONDS).and_then(|b| b.install_recorder()) {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!("no metrics recorder: {e}");
                None
            }
        })
        .as_ref()
}

/// The Prometheus text: the status as gauges and counters, then what was recorded.
pub fn render(s: &pb::StatusReply, follower_lag: &[(u64, u64)]) -> String {
    use metrics::{counter, gauge};
    let g = |name: &'static str, v: f64| gauge!(name).set(v);
    let c = |name: &'static str, v: u64| counter!(name).absolute(v);
    g("stripelock_is_leader", f64::from(u8::from(s.leader_id == s.server_id)));
    g("stripelock_raft_term", s.term as f64);
    g("stripelock_raft_commit_index", s.commit_index as f64);
    g("stripelock_raft_applied_index", s.applied_index as f64);
    g("stripelock_raft_log_entries", s.log_entries as f64);
    g("stripelock_raft_snapshot_index", s.snapshot_index as f64);
    for (follower, lag) in follower_lag {
        gauge!("stripelock_raft_follower_lag_entries", "follower" => follower.to_string()).set(*lag as f64);
    }
    g("stripelock_snapshot_bytes", s.snapshot_bytes as f64);
    g("stripelock_snapshot_locks", s.snapshot_locks as f64);
    g("stripelock_snapshot_build_seconds", s.snapshot_build_ms as f64 / 1e3);
    g("stripelock_sessions", s.sessions as f64);
    g("stripelock_sessions_fencing", s.sessions_fencing as f64);
    g("stripelock_resources", s.resources as f64);
    g("stripelock_locks_held", s.locks_granted as f64);
    g("stripelock_locks_cached", s.locks_cached as f64);
    // Issue 15: each identity's bytes (the 100 largest); one that left the list reads 0.
    static STORED: std::sync::Mutex<std::collections::BTreeSet<String>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut seen = STORED.lock().expect("stored identities");
    for gone in seen.iter().filter(|o| !s.stored.iter().any(|i| &i.identity == *o)) {
        gauge!("stripelock_stored_bytes", "identity" => gone.clone()).set(0.0);
    }
    seen.retain(|o| s.stored.iter().any(|i| &i.identity == o));
    for i in &s.stored {
        gauge!("stripelock_stored_bytes", "identity" => i.identity.clone()).set(i.bytes as f64);
        seen.insert(i.identity.clone());
    }
    drop(seen);
    g("stripelock_quota_bytes", s.bytes_quota as f64);
    g("stripelock_locks_waiting", s.requests_waiting as f64);
    g("stripelock_lock_memory_used_bytes", s.lock_memory_used as f64);
    g("stripelock_lock_memory_budget_bytes", s.lock_memory_budget as f64);
    g("stripelock_lock_cache_lru_size", s.lru_size as f64);
    g("stripelock_gateway_files", s.gateway_files as f64);
    g("stripelock_gateway_readers", s.gateway_readers as f64);
    c("stripelock_gateway_grants_total", s.gateway_grants);
    c("stripelock_gateway_handovers_total", s.gateway_handovers);
    counter!("stripelock_stripe_writes_total", "where" => "here").absolute(s.stripe_writes);
    counter!("stripelock_stripe_writes_total", "where" => "delegated").absolute(s.stripe_writes_delegated);
    counter!("stripelock_stripe_writes_total", "where" => "dropped").absolute(s.stripe_writes_dropped);
    g("stripelock_stripe_writes_running", f64::from(s.stripe_load));
    g("stripelock_writes_in_flight", f64::from(s.writes_in_flight));
    g("stripelock_admission_limit_writes", f64::from(s.writes_admitted_max));
    g("stripelock_worst_write_seconds", s.worst_write_ms as f64 / 1e3);
    c("stripelock_invalidations_received_total", s.invalidations_received);
    c("stripelock_invalidations_sent_total", s.invalidations_sent);
    g("stripelock_lock_free_ranges", s.lock_free_ranges as f64);
    c("stripelock_tier_read_bytes_total", s.tier_bytes_read);
    c("stripelock_tier_recalled_bytes_total", s.tier_bytes_recalled);
    c("stripelock_tier_recalled_rows_total", s.tier_rows_recalled);
    c("stripelock_files_migrated_total", s.files_migrated);
    c("stripelock_files_recalled_total", s.files_recalled);
    g("stripelock_metadata_relaxed", f64::from(u8::from(s.metadata_relaxed)));
    c("stripelock_metadata_round_trips_total", s.metadata_round_trips);
    g("stripelock_mounts", s.mounts.len() as f64);
    g("stripelock_rejoining", f64::from(u8::from(s.rejoining)));
    g("stripelock_stale_rows", s.stale_rows as f64);
    g("stripelock_wiped_servers", s.wiped_servers.len() as f64);
    c("stripelock_resync_rows_total", s.resync_rows_done);
    c("stripelock_resync_bytes_total", s.resync_bytes);
    c("stripelock_resync_rows_failed_total", s.resync_rows_failed);
    g("stripelock_resync_rate_bytes_per_second", s.resync_rate as f64);
    g("stripelock_resync_eta_seconds", s.resync_eta_ms as f64 / 1e3);
    match install() {
        Some(h) => h.render(),
        None => String::new(),
    }
}
