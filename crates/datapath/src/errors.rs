//! The wire codes of the data path's own refusals: a chunk store's, and a row that cannot be
//! solved. (Every other refusal already carries its code.)

use chunks::ChunkError;
use tonic::Status;
use wire::ErrorCode;

/// The wire code of a chunk store refusal.
pub fn chunk_code(e: &ChunkError) -> ErrorCode {
    match e {
        ChunkError::BadToken(_) => ErrorCode::BadToken,
        ChunkError::NotWriter(_) | ChunkError::NotCovered { .. } => ErrorCode::Denied,
        ChunkError::Stale { .. } => ErrorCode::StaleToken,
        ChunkError::Fenced { .. } | ChunkError::SessionEnded { .. } => ErrorCode::Fenced,
        ChunkError::VersionMismatch { .. } => ErrorCode::VersionMismatch,
        ChunkError::Corrupt { .. } | ChunkError::Format { .. } | ChunkError::FencesFormat { .. } => ErrorCode::Corrupt,
        ChunkError::Io(_) => ErrorCode::Unavailable,
    }
}

pub fn chunk_status(e: ChunkError) -> Status {
    chunk_code(&e).status(e.to_string())
}

/// The code of a row that cannot be read: corrupt when a unit is known bad, unavailable when
/// units were only on servers that did not answer (it may be read once they are back).
pub fn row_code(e: &layout::stripe::SolveError) -> ErrorCode {
    match e {
        layout::stripe::SolveError::TooManyLost { damaged: true, .. } => ErrorCode::Corrupt,
        layout::stripe::SolveError::TooManyLost { damaged: false, .. } => ErrorCode::Unavailable,
        layout::stripe::SolveError::Parity(_) => ErrorCode::Internal,
    }
}
