//! The error codes every service shares (`ErrorCode` in the proto), as a Rust enum without the
//! proto's UNSPECIFIED, and how a refused gRPC call carries one: the `stripelock-error-bin`
//! metadata entry of its status holds an encoded [`v1::ErrorDetail`](crate::v1::ErrorDetail).
//!
//! A number this build does not know, or UNSPECIFIED, is refused ([`UnknownErrorCode`]), never
//! read as some default.

use serde::{Deserialize, Serialize};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

use crate::v1 as pb;

/// Why a request was refused. See `enum ErrorCode` in proto/stripelock.proto for each meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    Busy,
    Deadlock,
    NotLeader,
    SessionExpired,
    Fenced,
    StaleToken,
    BadToken,
    Denied,
    Limit,
    TooLarge,
    NotFound,
    Exists,
    Conflict,
    BadRequest,
    Unavailable,
    VersionMismatch,
    Corrupt,
    Internal,
    NotDir,
    IsDir,
    NotEmpty,
    Quota,
}

/// A number on the wire that is not an error code this build knows (or is UNSPECIFIED).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("error code {0} is not one this client knows (a newer server, or a damaged message); upgrade the client")]
pub struct UnknownErrorCode(pub i32);

/// The metadata key of a status's [`pb::ErrorDetail`].
pub const ERROR_DETAIL_KEY: &str = "stripelock-error-bin";

impl ErrorCode {
    pub const ALL: [ErrorCode; 22] = [
        ErrorCode::Busy,
        ErrorCode::Deadlock,
        ErrorCode::NotLeader,
        ErrorCode::SessionExpired,
        ErrorCode::Fenced,
        ErrorCode::StaleToken,
        ErrorCode::BadToken,
        ErrorCode::Denied,
        ErrorCode::Limit,
        ErrorCode::TooLarge,
        ErrorCode::NotFound,
        ErrorCode::Exists,
        ErrorCode::Conflict,
        ErrorCode::BadRequest,
        ErrorCode::Unavailable,
        ErrorCode::VersionMismatch,
        ErrorCode::Corrupt,
        ErrorCode::Internal,
        ErrorCode::NotDir,
        ErrorCode::IsDir,
        ErrorCode::NotEmpty,
        ErrorCode::Quota,
    ];

    /// The name scripts see (`--json`, messages): `busy`, `not-leader`, `too-large`.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::Busy => "busy",
            ErrorCode::Deadlock => "deadlock",
            ErrorCode::NotLeader => "not-leader",
            ErrorCode::SessionExpired => "session-expired",
            ErrorCode::Fenced => "fenced",
            ErrorCode::StaleToken => "stale-token",
            ErrorCode::BadToken => "bad-token",
            ErrorCode::Denied => "denied",
            ErrorCode::Limit => "limit",
            ErrorCode::TooLarge => "too-large",
            ErrorCode::NotFound => "not-found",
            ErrorCode::Exists => "exists",
            ErrorCode::Conflict => "conflict",
            ErrorCode::BadRequest => "bad-request",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::VersionMismatch => "version-mismatch",
            ErrorCode::Corrupt => "corrupt",
            ErrorCode::Internal => "internal",
            ErrorCode::NotDir => "not-dir",
            ErrorCode::IsDir => "is-dir",
            ErrorCode::NotEmpty => "not-empty",
            ErrorCode::Quota => "quota",
        }
    }

    /// Whether the same request, sent again unchanged a little later, may succeed: the lock may
    /// be freed (busy), a leader elected or found (not-leader), a server come back
    /// (unavailable). A deadlock victim must give up a lock first, so it is not retryable.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorCode::Busy | ErrorCode::NotLeader | ErrorCode::Unavailable)
    }

    /// The gRPC status code a refusal with this code is sent with, for clients that read only
    /// that.
    pub fn grpc_code(self) -> Code {
        match self {
            ErrorCode::Busy | ErrorCode::Conflict | ErrorCode::StaleToken | ErrorCode::Fenced => {
                Code::FailedPrecondition
            }
            ErrorCode::Deadlock | ErrorCode::VersionMismatch => Code::Aborted,
            ErrorCode::NotLeader | ErrorCode::Unavailable => Code::Unavailable,
            ErrorCode::SessionExpired | ErrorCode::NotFound => Code::NotFound,
            ErrorCode::BadToken | ErrorCode::Denied => Code::PermissionDenied,
            ErrorCode::Limit | ErrorCode::Quota => Code::ResourceExhausted,
            ErrorCode::TooLarge => Code::OutOfRange,
            ErrorCode::Exists => Code::AlreadyExists,
            ErrorCode::BadRequest | ErrorCode::NotDir | ErrorCode::IsDir => Code::InvalidArgument,
            ErrorCode::NotEmpty => Code::FailedPrecondition,
            ErrorCode::Corrupt => Code::DataLoss,
            ErrorCode::Internal => Code::Internal,
        }
    }

    /// The code of a status that carries no [`pb::ErrorDetail`]: it did not come from a
    /// stripelock server but from the transport between (connection refused, deadline).
    fn of_transport(code: Code) -> ErrorCode {
        match code {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted => ErrorCode::Unavailable,
            Code::ResourceExhausted => ErrorCode::Limit,
            Code::OutOfRange => ErrorCode::TooLarge,
            Code::InvalidArgument | Code::Unimplemented => ErrorCode::BadRequest,
            _ => ErrorCode::Internal,
        }
    }

    /// A refusal with this code as a gRPC status: the code in the status's metadata, `message`
    /// for a person.
    pub fn status(self, message: impl Into<String>) -> Status {
        detail_status(pb::ErrorDetail { code: pb::ErrorCode::from(self) as i32, ..Default::default() }, message)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl From<ErrorCode> for pb::ErrorCode {
    fn from(c: ErrorCode) -> pb::ErrorCode {
        match c {
            ErrorCode::Busy => pb::ErrorCode::Busy,
            ErrorCode::Deadlock => pb::ErrorCode::Deadlock,
            ErrorCode::NotLeader => pb::ErrorCode::NotLeader,
            ErrorCode::SessionExpired => pb::ErrorCode::SessionExpired,
            ErrorCode::Fenced => pb::ErrorCode::Fenced,
            ErrorCode::StaleToken => pb::ErrorCode::StaleToken,
            ErrorCode::BadToken => pb::ErrorCode::BadToken,
            ErrorCode::Denied => pb::ErrorCode::Denied,
            ErrorCode::Limit => pb::ErrorCode::Limit,
            ErrorCode::TooLarge => pb::ErrorCode::TooLarge,
            ErrorCode::NotFound => pb::ErrorCode::NotFound,
            ErrorCode::Exists => pb::ErrorCode::Exists,
            ErrorCode::Conflict => pb::ErrorCode::Conflict,
            ErrorCode::BadRequest => pb::ErrorCode::BadRequest,
            ErrorCode::Unavailable => pb::ErrorCode::Unavailable,
            ErrorCode::VersionMismatch => pb::ErrorCode::VersionMismatch,
            ErrorCode::Corrupt => pb::ErrorCode::Corrupt,
            ErrorCode::Internal => pb::ErrorCode::Internal,
            ErrorCode::NotDir => pb::ErrorCode::NotDir,
            ErrorCode::IsDir => pb::ErrorCode::IsDir,
            ErrorCode::NotEmpty => pb::ErrorCode::NotEmpty,
            ErrorCode::Quota => pb::ErrorCode::Quota,
        }
    }
}

impl From<ErrorCode> for i32 {
    fn from(c: ErrorCode) -> i32 {
        pb::ErrorCode::from(c) as i32
    }
}

impl TryFrom<pb::ErrorCode> for ErrorCode {
    type Error = UnknownErrorCode;

    fn try_from(c: pb::ErrorCode) -> Result<ErrorCode, UnknownErrorCode> {
        Ok(match c {
            pb::ErrorCode::Unspecified => return Err(UnknownErrorCode(0)),
            pb::ErrorCode::Busy => ErrorCode::Busy,
            pb::ErrorCode::Deadlock => ErrorCode::Deadlock,
            pb::ErrorCode::NotLeader => ErrorCode::NotLeader,
            pb::ErrorCode::SessionExpired => ErrorCode::SessionExpired,
            pb::ErrorCode::Fenced => ErrorCode::Fenced,
            pb::ErrorCode::StaleToken => ErrorCode::StaleToken,
            pb::ErrorCode::BadToken => ErrorCode::BadToken,
            pb::ErrorCode::Denied => ErrorCode::Denied,
            pb::ErrorCode::Limit => ErrorCode::Limit,
            pb::ErrorCode::TooLarge => ErrorCode::TooLarge,
            pb::ErrorCode::NotFound => ErrorCode::NotFound,
            pb::ErrorCode::Exists => ErrorCode::Exists,
            pb::ErrorCode::Conflict => ErrorCode::Conflict,
            pb::ErrorCode::BadRequest => ErrorCode::BadRequest,
            pb::ErrorCode::Unavailable => ErrorCode::Unavailable,
            pb::ErrorCode::VersionMismatch => ErrorCode::VersionMismatch,
            pb::ErrorCode::Corrupt => ErrorCode::Corrupt,
            pb::ErrorCode::Internal => ErrorCode::Internal,
            pb::ErrorCode::NotDir => ErrorCode::NotDir,
            pb::ErrorCode::IsDir => ErrorCode::IsDir,
            pb::ErrorCode::NotEmpty => ErrorCode::NotEmpty,
            pb::ErrorCode::Quota => ErrorCode::Quota,
        })
    }
}

impl TryFrom<i32> for ErrorCode {
    type Error = UnknownErrorCode;

    fn try_from(n: i32) -> Result<ErrorCode, UnknownErrorCode> {
        pb::ErrorCode::try_from(n).map_err(|_| UnknownErrorCode(n))?.try_into()
    }
}

/// Where the leader is, as a NOT_LEADER refusal says.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LeaderHint {
    /// 0 when not known.
    pub id: u64,
    /// Empty when not known.
    pub address: String,
}

/// A NOT_LEADER refusal as a gRPC status, naming the leader when it is known.
pub fn not_leader_status(leader: Option<LeaderHint>, message: impl Into<String>) -> Status {
    let leader = leader.unwrap_or_default();
    let detail =
        pb::ErrorDetail { code: pb::ErrorCode::NotLeader as i32, leader_id: leader.id, leader_address: leader.address };
    detail_status(detail, message)
}

fn detail_status(detail: pb::ErrorDetail, message: impl Into<String>) -> Status {
    use prost::Message;
    let code = ErrorCode::try_from(detail.code).map_or(Code::Internal, ErrorCode::grpc_code);
    let mut metadata = MetadataMap::new();
    metadata.insert_bin(ERROR_DETAIL_KEY, MetadataValue::from_bytes(&detail.encode_to_vec()));
    Status::with_metadata(code, message, metadata)
}

/// The same refusal with another message (a gateway saying which server refused what): the
/// gRPC code and the error detail are kept.
pub fn reword(status: &Status, message: impl Into<String>) -> Status {
    Status::with_metadata(status.code(), message, status.metadata().clone())
}

/// Why a call was refused: the code its status carries, with the leader for NOT_LEADER; for a
/// status that carries none (it came from the transport, not a server), the code its gRPC code
/// stands for. A detail that cannot be decoded, or holds a code this build does not know, is an
/// error.
pub fn refusal_of(status: &Status) -> Result<(ErrorCode, Option<LeaderHint>), UnknownErrorCode> {
    use prost::Message;
    let Some(value) = status.metadata().get_bin(ERROR_DETAIL_KEY) else {
        return Ok((ErrorCode::of_transport(status.code()), None));
    };
    let bytes = value.to_bytes().map_err(|_| UnknownErrorCode(-1))?;
    let detail = pb::ErrorDetail::decode(&bytes[..]).map_err(|_| UnknownErrorCode(-1))?;
    let code = ErrorCode::try_from(detail.code)?;
    let leader = (code == ErrorCode::NotLeader && (detail.leader_id != 0 || !detail.leader_address.is_empty()))
        .then(|| LeaderHint { id: detail.leader_id, address: detail.leader_address });
    Ok((code, leader))
}

/// Whether the status came from a stripelock server (it carries an error detail), not from
/// the transport between.
pub fn from_server(status: &Status) -> bool {
    status.metadata().get_bin(ERROR_DETAIL_KEY).is_some()
}

/// Just the code of [`refusal_of`].
pub fn code_of(status: &Status) -> Result<ErrorCode, UnknownErrorCode> {
    refusal_of(status).map(|(code, _)| code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_the_proto_enum_and_its_number() {
        for code in ErrorCode::ALL {
            let p = pb::ErrorCode::from(code);
            assert_eq!(ErrorCode::try_from(p), Ok(code));
            assert_eq!(ErrorCode::try_from(i32::from(code)), Ok(code));
            assert_eq!(p.as_str_name().trim_start_matches("ERROR_CODE_").replace('_', "-").to_lowercase(), code.name());
        }
        // Every proto value but UNSPECIFIED has a Rust code: the lists cannot drift apart.
        let known = (0..64).filter(|n| pb::ErrorCode::try_from(*n).is_ok()).count();
        assert_eq!(known, ErrorCode::ALL.len() + 1);
    }

    #[test]
    fn unspecified_and_unknown_numbers_are_refused() {
        assert_eq!(ErrorCode::try_from(0), Err(UnknownErrorCode(0)));
        assert_eq!(ErrorCode::try_from(pb::ErrorCode::Unspecified), Err(UnknownErrorCode(0)));
        assert_eq!(ErrorCode::try_from(999), Err(UnknownErrorCode(999)));
        assert_eq!(ErrorCode::try_from(-3), Err(UnknownErrorCode(-3)));
    }

    #[test]
    fn a_status_carries_its_code_and_the_leader_hint() {
        for code in ErrorCode::ALL {
            let s = code.status("why");
            assert_eq!(s.code(), code.grpc_code());
            assert_eq!(refusal_of(&s), Ok((code, None)));
            assert_eq!(code_of(&reword(&s, "server 2: why")), Ok(code));
        }
        let hint = LeaderHint { id: 3, address: "127.0.0.1:7003".into() };
        let s = not_leader_status(Some(hint.clone()), "ask the leader");
        assert_eq!(refusal_of(&s), Ok((ErrorCode::NotLeader, Some(hint))));
    }

    #[test]
    fn a_status_with_an_unknown_code_is_an_error_and_one_without_a_code_is_the_transports() {
        use prost::Message;
        let mut s = Status::unavailable("tcp connect error");
        assert_eq!(code_of(&s), Ok(ErrorCode::Unavailable));
        assert!(!from_server(&s));
        let detail = pb::ErrorDetail { code: 77, ..Default::default() };
        s.metadata_mut().insert_bin(ERROR_DETAIL_KEY, MetadataValue::from_bytes(&detail.encode_to_vec()));
        assert_eq!(code_of(&s), Err(UnknownErrorCode(77)));
        let unspecified = pb::ErrorDetail::default();
        s.metadata_mut().insert_bin(ERROR_DETAIL_KEY, MetadataValue::from_bytes(&unspecified.encode_to_vec()));
        assert_eq!(code_of(&s), Err(UnknownErrorCode(0)));
    }

    #[test]
    fn codes_serialize_by_name() {
        let json = serde_json::to_string(&ErrorCode::SessionExpired).expect("serializes");
        assert_eq!(json, "\"session-expired\"");
    }
}
