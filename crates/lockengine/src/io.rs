//! The engine's inputs and outputs: everything that crosses the step function.

use serde::{Deserialize, Serialize};

use crate::{ByteRange, EngineError, LockId, Mode, PosixKind, PosixOwner, SessionId, Token};

/// One message into the engine. Time arrives beside it, as the `now_ms` argument of `step`.
/// The server's Raft log encodes it by variant index (docs/formats.md): add variants at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Input {
    /// Only advances time: expires sessions whose lease has passed.
    Tick,
    OpenSession {
        session: SessionId,
        lease_ms: u64,
    },
    /// Heartbeat: the lease runs again from now.
    Renew {
        session: SessionId,
    },
    /// Graceful close: releases the session's locks and cancels its waiters at once.
    CloseSession {
        session: SessionId,
    },
    /// The epoch (Raft term) goes into the high bits of every later token. Never decreases.
    SetEpoch {
        epoch: u64,
    },
    /// Acquire a new lock, or re-use a cached one (same id, same session, covered range/mode).
    Lock {
        lock: LockId,
        session: SessionId,
        resource: String,
        range: ByteRange,
        mode: Mode,
        nowait: bool,
    },
    /// Convert a granted lock in place, range included (`None` keeps the range).
    Convert {
        lock: LockId,
        mode: Mode,
        range: Option<ByteRange>,
    },
    Release {
        lock: LockId,
    },
    /// Cancel a waiting request or a pending conversion.
    Cancel {
        lock: LockId,
    },
    /// The holder keeps the lock but is not using it; a conflicting request revokes it.
    Cache {
        lock: LockId,
    },
    /// A PW/EX holder's new value block, written to the resource on release or downgrade.
    SetValue {
        lock: LockId,
        value: Vec<u8>,
    },
    /// An operator ends a live session as if its lease had run out (`stripelock evict`): its
    /// waiters are cancelled and its locks are fenced, exactly as on expiry.
    Evict {
        session: SessionId,
    },
    /// Storage has fenced the expired session: its locks may now be dropped.
    FenceAck {
        session: SessionId,
    },
    /// fcntl F_SETLK (`wait == false`) or F_SETLKW (`wait == true`); `PosixKind::Unlock` is F_UNLCK.
    Posix {
        owner: PosixOwner,
        resource: String,
        range: ByteRange,
        kind: PosixKind,
        wait: bool,
    },
    /// fcntl F_GETLK.
    PosixTest {
        owner: PosixOwner,
        resource: String,
        range: ByteRange,
        kind: PosixKind,
    },
    /// The waiting F_SETLKW of `owner` on `resource` gives up (its caller was interrupted):
    /// `PosixCancelled` if it still waited; nothing if it was answered already.
    PosixCancel {
        owner: PosixOwner,
        resource: String,
    },
}

/// The value block as a grant sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ValueBlock {
    /// Never written.
    Empty,
    Value(Box<[u8]>),
    /// A PW/EX holder's session expired: the last value may not reflect what it wrote.
    Invalid,
}

/// What a request is rejected about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Subject {
    Session(SessionId),
    Lock(LockId),
    Owner(PosixOwner),
    Epoch,
}

/// One effect for the runtime to carry out, in order. Each names the session it is for (a lock's
/// holder, a POSIX owner's session), so a runtime can route it without a table of its own.
/// Server snapshots encode it by variant index (docs/formats.md): add variants at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Output {
    /// A new grant, or (with `reused`) a cached lock taken back into use by its holder.
    Granted {
        session: SessionId,
        lock: LockId,
        mode: Mode,
        range: ByteRange,
        token: Token,
        value: ValueBlock,
        reused: bool,
    },
    Converted {
        session: SessionId,
        lock: LockId,
        mode: Mode,
        range: ByteRange,
        token: Token,
        value: ValueBlock,
    },
    Queued {
        session: SessionId,
        lock: LockId,
    },
    /// A `nowait` request that would have to wait; nothing changed.
    Busy {
        session: SessionId,
        lock: LockId,
        blockers: Vec<LockId>,
    },
    /// Ask the holder of a cached lock to release it: someone is waiting.
    Revoke {
        session: SessionId,
        lock: LockId,
    },
    /// The request closed a wait-for cycle and was chosen as the victim.
    Deadlock {
        session: SessionId,
        lock: LockId,
    },
    Released {
        session: SessionId,
        lock: LockId,
    },
    Cancelled {
        session: SessionId,
        lock: LockId,
    },
    Expired {
        session: SessionId,
    },
    /// Storage must refuse the session's writes, then acknowledge with `Input::FenceAck`.
    Fence {
        session: SessionId,
    },
    PosixGranted {
        owner: PosixOwner,
        resource: String,
        range: ByteRange,
        kind: PosixKind,
    },
    PosixUnlocked {
        owner: PosixOwner,
        resource: String,
        range: ByteRange,
    },
    PosixQueued {
        owner: PosixOwner,
        resource: String,
        range: ByteRange,
        kind: PosixKind,
    },
    PosixBusy {
        owner: PosixOwner,
        conflict: PosixOwner,
        range: ByteRange,
        kind: PosixKind,
    },
    PosixFree {
        owner: PosixOwner,
    },
    PosixDeadlock {
        owner: PosixOwner,
    },
    /// A blocked POSIX request dropped because its session expired or closed.
    PosixCancelled {
        owner: PosixOwner,
        resource: String,
        range: ByteRange,
    },
    Rejected {
        subject: Subject,
        error: EngineError,
    },
}
