//! Protocol outcomes that reject a request. Each has a stable numeric code for the wire; the
//! message says what went wrong and what to do.

use serde::{Deserialize, Serialize};

use crate::LimitKind;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum EngineError {
    #[error("empty or inverted range {start}..{end}: a range needs start < end")]
    BadRange { start: u64, end: u64 },
    #[error("unknown session: open it first")]
    UnknownSession,
    #[error("session already open")]
    SessionExists,
    #[error("session expired: its locks are being fenced; open a new session")]
    SessionExpired,
    #[error("unknown lock")]
    UnknownLock,
    #[error("lock id already in use: pick a new id, or convert the lock")]
    LockExists,
    #[error("lock belongs to another session")]
    NotOwner,
    #[error("lock is not granted yet: cancel it instead")]
    NotGranted,
    #[error("lock has no waiting request to cancel")]
    NothingToCancel,
    #[error("lock is already converting: wait for it or cancel the conversion")]
    AlreadyConverting,
    #[error("only a PW or EX holder may set the value block")]
    NotWriter,
    #[error("value block of {len} bytes is over the limit of {max}")]
    ValueTooLarge { len: usize, max: usize },
    #[error("resource name of {len} bytes is over the limit of {max}")]
    NameTooLong { len: usize, max: usize },
    #[error("epoch {requested} is below the current epoch {current}: epochs never go back")]
    EpochBackwards { requested: u64, current: u64 },
    #[error("session is not being fenced: nothing to acknowledge")]
    NotFencing,
    #[error("{kind} limit ({max}) reached: {}", kind.advice())]
    Limit { kind: LimitKind, max: u64 },
}

impl EngineError {
    /// Stable wire code. Never renumber; add new codes at the end.
    pub fn code(&self) -> u16 {
        match self {
            EngineError::BadRange { .. } => 1,
            EngineError::UnknownSession => 2,
            EngineError::SessionExists => 3,
            EngineError::SessionExpired => 4,
            EngineError::UnknownLock => 5,
            EngineError::LockExists => 6,
            EngineError::NotOwner => 7,
            EngineError::NotGranted => 8,
            EngineError::NothingToCancel => 9,
            EngineError::AlreadyConverting => 10,
            EngineError::NotWriter => 11,
            EngineError::ValueTooLarge { .. } => 12,
            EngineError::NameTooLong { .. } => 13,
            EngineError::EpochBackwards { .. } => 14,
            EngineError::NotFencing => 15,
            EngineError::Limit { .. } => 16,
        }
    }
}
