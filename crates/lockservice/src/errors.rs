//! The lock service's errors as types, and the wire code of each: the engine's refusals and a
//! proposal that could not be committed (the namespace's refusals are replicated data, in
//! `types`).
//! Every refusal a client sees carries a [`wire::ErrorCode`]; retrying is decided by that code,
//! never by reading a message.

use lockengine::EngineError;
use serde::{Deserialize, Serialize};
use tonic::Status;
use wire::ErrorCode;

use crate::types::{C, NodeId};

/// The wire code of an engine refusal (its finer `EngineError::code` travels beside it).
pub fn engine_code(e: &EngineError) -> ErrorCode {
    match e {
        EngineError::BadRange { .. } => ErrorCode::BadRequest,
        EngineError::UnknownSession | EngineError::SessionExpired => ErrorCode::SessionExpired,
        EngineError::SessionExists | EngineError::LockExists => ErrorCode::Exists,
        EngineError::UnknownLock => ErrorCode::NotFound,
        EngineError::NotOwner | EngineError::NotWriter => ErrorCode::Denied,
        EngineError::NotGranted
        | EngineError::NothingToCancel
        | EngineError::AlreadyConverting
        | EngineError::NotFencing
        | EngineError::EpochBackwards { .. } => ErrorCode::Conflict,
        EngineError::ValueTooLarge { .. } | EngineError::NameTooLong { .. } => ErrorCode::TooLarge,
        EngineError::Limit { .. } => ErrorCode::Limit,
    }
}

/// Why a command could not be committed. Retrying it (a command with an origin is applied once
/// however often it is proposed) makes sense only when [`ProposeError::is_retryable`] says so;
/// a refusal the leader sent back keeps the leader's code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ProposeError {
    #[error("no leader is known yet; the cluster may be electing one or may have lost its majority")]
    NoLeader,
    /// The leader did not answer the forwarded command (down, paused, cut off).
    #[error("the leader (server {leader}) could not be reached: {reason}")]
    LeaderUnreachable { leader: NodeId, reason: String },
    /// The leader answered with a refusal: it was no longer the leader, it was stopping, it
    /// could not read the command.
    #[error("{message}")]
    Refused { code: ErrorCode, message: String },
    /// This server's own Raft node has stopped (shut down, or a storage fault).
    #[error("this server has stopped: {reason}")]
    Stopped { reason: String },
}

impl ProposeError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ProposeError::NoLeader | ProposeError::LeaderUnreachable { .. } => ErrorCode::Unavailable,
            ProposeError::Refused { code, .. } => *code,
            ProposeError::Stopped { .. } => ErrorCode::Internal,
        }
    }

    /// Whether proposing the same command again may succeed: decided by the code alone, so a
    /// refusal forwarded from the leader is retried exactly when the leader's own would be.
    pub fn is_retryable(&self) -> bool {
        self.code().is_retryable()
    }

    pub fn status(&self) -> Status {
        self.code().status(self.to_string())
    }

    /// How this server's own core refused a command written into it.
    pub(crate) fn refused_by_core(e: &openraft::errors::ClientWriteError<C>) -> ProposeError {
        // Discarded on a leader change (it may commit yet) or not this leader's: either way
        // whoever leads next takes it, resent with its origin.
        let code = match e {
            openraft::errors::ClientWriteError::ForwardToLeader(_)
            | openraft::errors::ClientWriteError::LogEntryDiscarded(_) => ErrorCode::NotLeader,
            _ => ErrorCode::Internal,
        };
        ProposeError::Refused { code, message: e.to_string() }
    }

    /// How the leader answers a forwarded command that its own Raft node would not commit.
    pub(crate) fn at_leader(e: &openraft::errors::RaftError<C, openraft::errors::ClientWriteError<C>>) -> ProposeError {
        let message = e.to_string();
        if e.forward_to_leader().is_some() {
            return ProposeError::Refused { code: ErrorCode::NotLeader, message };
        }
        match e.fatal() {
            // Stopping (shut down): whoever leads next takes the command.
            Some(openraft::errors::Fatal::Stopped) => ProposeError::Refused { code: ErrorCode::Unavailable, message },
            _ => ProposeError::Refused { code: ErrorCode::Internal, message },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::NamespaceError;

    /// Forwarding keeps the leader's code, and only a retryable code is retried: a leader that
    /// could not read the command is not asked again and again for five seconds.
    #[test]
    fn a_forwarded_refusal_is_retried_only_when_its_code_is_retryable() {
        let refused = |code| ProposeError::Refused { code, message: String::new() };
        assert!(refused(ErrorCode::NotLeader).is_retryable());
        assert!(refused(ErrorCode::Unavailable).is_retryable());
        for code in [ErrorCode::BadRequest, ErrorCode::Internal, ErrorCode::Limit, ErrorCode::Denied] {
            assert!(!refused(code).is_retryable(), "{code}");
            assert_eq!(refused(code).code(), code);
        }
        assert!(ProposeError::NoLeader.is_retryable());
        assert!(ProposeError::LeaderUnreachable { leader: 2, reason: "timeout".into() }.is_retryable());
        assert!(!ProposeError::Stopped { reason: "raft stopped".into() }.is_retryable());
    }

    #[test]
    fn every_engine_refusal_has_a_code_and_keeps_it_on_the_wire() {
        let e = EngineError::Limit { kind: lockengine::LimitKind::LocksPerSession, max: 3 };
        assert_eq!(engine_code(&e), ErrorCode::Limit);
        assert_eq!(engine_code(&EngineError::SessionExpired), ErrorCode::SessionExpired);
        let s = NamespaceError::NotFound { path: "/a".into() }.status();
        assert_eq!(wire::code_of(&s), Ok(ErrorCode::NotFound));
    }
}
