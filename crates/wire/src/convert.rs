//! Every conversion between the wire's messages and the domain's types, in one place: lock
//! modes, byte ranges, lock value blocks, POSIX lock kinds, stripe unit names. A value this
//! build does not know is an error, never read as some default (a lock of an unknown mode taken
//! for NL would be used as if it protected nothing).

use chunks::UnitId;
use layout::Role;
use lockengine::{ByteRange, Mode, PosixKind, ValueBlock};
use tonic::Status;

use crate::ErrorCode;
use crate::v1 as pb;

/// A message field this build cannot turn into a domain value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("unknown {what} {value}: the peer is of a newer version than this build")]
    Unknown { what: &'static str, value: i32 },
    #[error("{what} is required")]
    Missing { what: &'static str },
    #[error("{0}")]
    Range(#[from] lockengine::EngineError),
    #[error("unit role {role} index {index} is not valid")]
    Unit { role: u32, index: u32 },
}

impl ConvertError {
    /// A request carrying such a field is a bad request.
    pub fn status(&self) -> Status {
        ErrorCode::BadRequest.status(self.to_string())
    }
}

impl From<ConvertError> for Status {
    fn from(e: ConvertError) -> Status {
        e.status()
    }
}

pub fn mode_to_pb(m: Mode) -> i32 {
    m as i32
}

pub fn mode_from_pb(m: i32) -> Result<Mode, ConvertError> {
    usize::try_from(m)
        .ok()
        .and_then(|i| Mode::ALL.get(i).copied())
        .ok_or(ConvertError::Unknown { what: "lock mode", value: m })
}

pub fn range_to_pb(r: ByteRange) -> pb::Range {
    pb::Range { start: r.start, end: r.end }
}

/// A client's byte range (`start..end`; it may be empty or run to `u64::MAX`, the server judges).
pub fn span_to_pb(r: &std::ops::Range<u64>) -> pb::Range {
    pb::Range { start: r.start, end: r.end }
}

/// A range the message must carry: missing or empty is an error.
pub fn range_from_pb(r: Option<pb::Range>) -> Result<ByteRange, ConvertError> {
    let r = r.ok_or(ConvertError::Missing { what: "a range" })?;
    Ok(ByteRange::new(r.start, r.end)?)
}

pub fn value_to_pb(v: &ValueBlock) -> pb::ValueBlock {
    let (state, value) = match v {
        ValueBlock::Empty => (pb::value_block::State::Empty, Vec::new()),
        ValueBlock::Value(b) => (pb::value_block::State::Value, b.to_vec()),
        ValueBlock::Invalid => (pb::value_block::State::Invalid, Vec::new()),
    };
    pb::ValueBlock { state: state.into(), value }
}

/// The value a grant carries, if any (an empty or invalidated block carries none).
pub fn value_from_pb(v: &pb::ValueBlock) -> Result<Option<Vec<u8>>, ConvertError> {
    match pb::value_block::State::try_from(v.state) {
        Ok(pb::value_block::State::Value) => Ok(Some(v.value.clone())),
        Ok(pb::value_block::State::Empty | pb::value_block::State::Invalid) => Ok(None),
        Err(_) => Err(ConvertError::Unknown { what: "value block state", value: v.state }),
    }
}

pub fn posix_kind_to_pb(k: PosixKind) -> i32 {
    match k {
        PosixKind::Read => 0,
        PosixKind::Write => 1,
        PosixKind::Unlock => 2,
    }
}

pub fn posix_kind_from_pb(k: i32) -> Result<PosixKind, ConvertError> {
    match k {
        0 => Ok(PosixKind::Read),
        1 => Ok(PosixKind::Write),
        2 => Ok(PosixKind::Unlock),
        _ => Err(ConvertError::Unknown { what: "POSIX lock kind", value: k }),
    }
}

pub fn unit_ref(id: &UnitId) -> pb::UnitRef {
    let (role, index) = match id.role {
        Role::Data(j) => (0, u32::from(j)),
        Role::P => (1, 0),
        Role::Q => (2, 0),
    };
    pb::UnitRef { file: id.file, row: id.row, role, index }
}

pub fn unit_id(u: Option<pb::UnitRef>) -> Result<UnitId, ConvertError> {
    let u = u.ok_or(ConvertError::Missing { what: "a unit" })?;
    let role = match (u.role, u8::try_from(u.index)) {
        (0, Ok(j)) if j < layout::DATA_MAX => Role::Data(j),
        (1, _) => Role::P,
        (2, _) => Role::Q,
        _ => return Err(ConvertError::Unit { role: u.role, index: u.index }),
    };
    Ok(UnitId { file: u.file, row: u.row, role })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_goes_there_and_back_and_unknown_ones_are_errors() {
        for m in Mode::ALL {
            assert_eq!(mode_from_pb(mode_to_pb(m)), Ok(m));
        }
        assert_eq!(mode_from_pb(6), Err(ConvertError::Unknown { what: "lock mode", value: 6 }));
        assert_eq!(mode_from_pb(-1).map_err(|e| e.status().code()), Err(tonic::Code::InvalidArgument));
        for k in [PosixKind::Read, PosixKind::Write, PosixKind::Unlock] {
            assert_eq!(posix_kind_from_pb(posix_kind_to_pb(k)), Ok(k));
        }
        assert!(posix_kind_from_pb(3).is_err());
        let r = ByteRange::new(5, 9).unwrap();
        assert_eq!(range_from_pb(Some(range_to_pb(r))), Ok(r));
        assert_eq!(range_from_pb(None), Err(ConvertError::Missing { what: "a range" }));
        assert!(range_from_pb(Some(pb::Range { start: 9, end: 9 })).is_err());
        assert_eq!(value_from_pb(&value_to_pb(&ValueBlock::Value(vec![1, 2].into()))), Ok(Some(vec![1, 2])));
        assert_eq!(value_from_pb(&value_to_pb(&ValueBlock::Invalid)), Ok(None));
        assert!(value_from_pb(&pb::ValueBlock { state: 9, value: Vec::new() }).is_err());
        for role in [Role::Data(0), Role::Data(layout::DATA_MAX - 1), Role::P, Role::Q] {
            let id = UnitId { file: 3, row: 7, role };
            assert_eq!(unit_id(Some(unit_ref(&id))), Ok(id));
        }
        assert!(unit_id(Some(pb::UnitRef { file: 1, row: 1, role: 0, index: u32::from(layout::DATA_MAX) })).is_err());
        assert!(unit_id(Some(pb::UnitRef { file: 1, row: 1, role: 3, index: 0 })).is_err());
        assert!(unit_id(None).is_err());
    }
}
