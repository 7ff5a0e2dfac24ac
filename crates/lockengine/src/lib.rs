//! The lock engine: stripelock's distributed lock manager core, without any I/O.
//!
//! One mutating entry point, [`Engine::step`]: `(now_ms, Input) -> Vec<Output>`. The engine never
//! reads a clock, a socket or a random source, and its outputs depend only on its inputs, so a
//! Raft log of inputs replays to the same state on every replica and a simulation replays a
//! seed exactly.
//!
//! What it keeps: sessions with leases, resources (named, with byte ranges over u64), DLM locks
//! in the six VMS modes with FIFO queues (convert queue first), conversions in place, cached
//! locks and revokes, a value block per resource, fencing tokens, POSIX owners, and the wait-for
//! graph across both kinds of lock.
//!
//! Invariants, checked by [`Engine::check_invariants`]: no two incompatible grants overlap;
//! every grant belongs to a live or fencing session and no waiter to an expired one; tokens
//! strictly increase across grants of a resource, across epochs too; a request waits only while
//! something blocks it; the wait-for graph has no cycle; nothing exceeds its [`Limits`].
//!
//! [`script`] runs the text scenarios of `stripelock debug replay` and the engine's tests.

mod deadlock;
mod engine;
mod error;
mod index;
mod invariants;
mod io;
pub mod lease;
mod limits;
mod posix;
pub mod script;
mod snapshot;
mod table;
mod types;
mod view;

pub use engine::{Engine, OwnerKey};
pub use error::EngineError;
pub use io::{Input, Output, Subject, ValueBlock};
pub use limits::{LimitKind, Limits};
pub use snapshot::{
    EngineSnapshot, LockRecord, PosixRecord, PosixWaitRecord, RestoreError, SNAPSHOT_VERSION, SessionRecord,
    ValueRecord,
};
pub use types::{ByteRange, LockId, Mode, PosixKind, PosixOwner, SessionId, TOKEN_EPOCH_SHIFT, Token};
pub use view::{LockView, PosixView, ResourceView, Stats};
