//! The replicated lock service: the lock engine as the state machine of an openraft group
//! whose log, vote and snapshots live in redb, its sessions served to clients over gRPC, and
//! each server's gateway session caching read locks for its clients (seed 002).
//!
//! Invariants: every change to lock state is a log entry, stamped with the proposing leader's
//! time, so every replica applies the same inputs and computes the same outputs; a server never
//! reads its own clock while applying. Session leases are the exception that is not lock state:
//! renewals live in the leader's memory (`leases.rs`), and only an expiry is an entry. A server answers its own clients from its own
//! application of the log, so a grant is never shown before it is committed.

pub mod codec;
mod env;
mod errors;
mod forward;
pub mod gateway;
mod gateway_rt;
pub mod leases;
pub mod lru;
mod machine;
pub mod names;
mod network;
mod node;
pub mod quota;
mod rejoin;
mod renew;
mod rt;
mod service;
mod store;
mod telemetry;
mod types;
mod waits;

pub use env::{ApplyEvent, Env, wall_ms};
pub use errors::{ProposeError, engine_code};
pub use forward::Route;
pub use machine::{Applied, FILES_MAX, Machine, SnapshotStats, State, WriteGrant};
pub use node::{Config, Node, SECRET_FILE};
pub use rt::seed_thread_rng;
pub use service::{LEASE_MS_MAX, LEASE_MS_MIN, LockService, StatusPart};
pub use store::Store;
pub use types::{
    CLIENT_LOCK_BITS, Command, FileMeta, NamespaceError, NodeAddr, NodeId, Op, Origin, Reply, RowSet, STALE_ROWS_MAX,
    Stub, client_lock_id, engine_lock_id, stripe_resource,
};
