//! What a lock server takes from outside itself besides its configuration: clock, network,
//! disk, randomness, and an observer. A simulation replaces each with a deterministic one.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use lockengine::Input;

use crate::types::{Origin, Reply};

/// Everything a server takes from outside itself besides its configuration: clock, network,
/// disk, randomness. A simulation replaces each with a deterministic one.
#[derive(Clone, Default)]
pub struct Env {
    /// Milliseconds a leader stamps into entries; the wall clock when `None`.
    pub clock: Option<Arc<dyn Fn() -> u64 + Send + Sync>>,
    /// How to reach other servers.
    pub connector: wire::Connector,
    /// A database to keep the Raft state in instead of `DATA/raft.redb` (an in-memory one in the
    /// simulation: commits are then durable at once and no flusher thread runs).
    pub database: Option<Arc<redb::Database>>,
    /// The cluster secret to bootstrap with, instead of one from /dev/urandom.
    pub secret: Option<[u8; 32]>,
    /// Election timeouts (min, max) in ms, instead of 3–6 heartbeats.
    pub election_timeout_ms: Option<(u64, u64)>,
    /// Sees every entry this server applies, with its outputs (the simulation's checker).
    pub observer: Option<Arc<dyn Fn(ApplyEvent) + Send + Sync>>,
    /// Negative control for the simulation only: the engine drops an expired holder's locks
    /// before it is fenced. Never set outside a test.
    pub break_fencing_for_negative_control: bool,
    /// Negative control for the simulation only: a server's gateway gives its read lock back at
    /// once when revoked, leaving its readers holding what is no longer covered. Never set
    /// outside a test.
    pub break_gateway_for_negative_control: bool,
    /// Negative control for the simulation only: a new leader gives the sessions it inherits no
    /// fresh lease and expires them at once. Never set outside a test.
    pub break_fresh_lease_for_negative_control: bool,
    /// Tests only: while this file exists, the process removes it and aborts right after it
    /// acknowledged a release as ordered (issue 12), before the release left it, so only the
    /// client's resend can make it take effect. Never set outside a test.
    pub crash_after_release_ack_for_test: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env")
            .field("simulated_clock", &self.clock.is_some())
            .field("in_memory", &self.database.is_some())
            .field("break_fencing_for_negative_control", &self.break_fencing_for_negative_control)
            .field("break_gateway_for_negative_control", &self.break_gateway_for_negative_control)
            .field("break_fresh_lease_for_negative_control", &self.break_fresh_lease_for_negative_control)
            .field("crash_after_release_ack_for_test", &self.crash_after_release_ack_for_test)
            .finish_non_exhaustive()
    }
}

impl Env {
    pub fn now_ms(&self) -> u64 {
        self.clock.as_ref().map_or_else(wall_ms, |c| c())
    }
}

/// Wall-clock milliseconds. Only a leader reads it, to stamp a command; replicas never do.
pub fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// One entry as applied on one server, for an observer (the simulation's checker).
#[derive(Debug, Clone)]
pub struct ApplyEvent {
    pub server: u64,
    pub index: u64,
    /// The leader's time stamped into the entry.
    pub now_ms: u64,
    /// The engine input the entry carried: `None` for one that is not an engine input (opening
    /// a session, bootstrap); a handover shows its request (its release shows in the outputs).
    pub input: Option<Input>,
    /// Who asked: session and request number.
    pub origin: Option<Origin>,
    pub reply: Reply,
}
