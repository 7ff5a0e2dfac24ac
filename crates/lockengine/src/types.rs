//! Identifiers, byte ranges and lock modes: the nouns every other module speaks in.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::EngineError;

/// A client or gateway session. The caller (the replicated service) allocates the number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SessionId(pub u64);

/// One DLM lock. The caller allocates the number; it names the lock for its whole life, through
/// waiting, grant, conversions and release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LockId(pub u64);

/// A POSIX (fcntl) lock owner: a process or open file description inside one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PosixOwner {
    pub session: SessionId,
    pub owner: u64,
}

/// A fencing token. Strictly increases across conflicting grants of a resource, across epochs too.
pub type Token = u64;

/// The epoch (the Raft term, later) occupies the bits above this shift in every token.
pub const TOKEN_EPOCH_SHIFT: u32 = 40;

/// A half-open byte range `[start, end)`. `end == u64::MAX` means "to end of file", so the last
/// byte of a 2^64 file cannot be named on its own; no file gets that large.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

impl ByteRange {
    /// The whole file, `0..EOF`.
    pub const ALL: ByteRange = ByteRange { start: 0, end: u64::MAX };

    /// A non-empty range; zero-length and inverted ranges are rejected.
    pub fn new(start: u64, end: u64) -> Result<ByteRange, EngineError> {
        if start < end { Ok(ByteRange { start, end }) } else { Err(EngineError::BadRange { start, end }) }
    }

    /// From `start` to end of file.
    pub fn to_eof(start: u64) -> Result<ByteRange, EngineError> {
        ByteRange::new(start, u64::MAX)
    }

    pub fn overlaps(self, other: ByteRange) -> bool {
        self.start < other.end && other.start < self.end
    }

    pub fn contains(self, other: ByteRange) -> bool {
        self.start <= other.start && other.end <= self.end
    }

    pub fn as_range(self) -> std::ops::Range<u64> {
        self.start..self.end
    }
}

impl fmt::Display for ByteRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.start, self.end) {
            (0, u64::MAX) => write!(f, "all"),
            (s, u64::MAX) => write!(f, "{s}.."),
            (s, e) => write!(f, "{s}..{e}"),
        }
    }
}

/// The six VMS / Linux DLM lock modes, weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Mode {
    /// Null: holds a place, conflicts with nothing.
    NL,
    /// Concurrent read.
    CR,
    /// Concurrent write.
    CW,
    /// Protected read: shared read.
    PR,
    /// Protected write: one writer, concurrent readers (CR) allowed.
    PW,
    /// Exclusive.
    EX,
}

/// `COMPATIBLE[a][b]`: may `a` and `b` be granted on overlapping ranges at once.
const COMPATIBLE: [[bool; 6]; 6] = [
    //  NL    CR     CW     PR     PW     EX
    [true, true, true, true, true, true],      // NL
    [true, true, true, true, true, false],     // CR
    [true, true, true, false, false, false],   // CW
    [true, true, false, true, false, false],   // PR
    [true, true, false, false, false, false],  // PW
    [true, false, false, false, false, false], // EX
];

impl Mode {
    pub const ALL: [Mode; 6] = [Mode::NL, Mode::CR, Mode::CW, Mode::PR, Mode::PW, Mode::EX];

    pub fn compatible(self, other: Mode) -> bool {
        COMPATIBLE[self as usize][other as usize]
    }

    /// PW and EX may write the value block and the data they cover.
    pub fn is_write(self) -> bool {
        matches!(self, Mode::PW | Mode::EX)
    }

    /// `self` is no stronger than `other`: everything compatible with `other` is compatible with
    /// `self`. CW and PR are incomparable, so this is a partial order.
    pub fn at_most(self, other: Mode) -> bool {
        Mode::ALL.iter().all(|&m| !other.compatible(m) || self.compatible(m))
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::NL => "NL",
            Mode::CR => "CR",
            Mode::CW => "CW",
            Mode::PR => "PR",
            Mode::PW => "PW",
            Mode::EX => "EX",
        }
    }

    pub fn parse(s: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.name() == s)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a POSIX request asks for: a read lock, a write lock, or to unlock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PosixKind {
    Read,
    Write,
    Unlock,
}

impl PosixKind {
    /// Two POSIX locks of different owners conflict unless both are read locks.
    pub fn conflicts(self, other: PosixKind) -> bool {
        self == PosixKind::Write || other == PosixKind::Write
    }

    pub fn letter(self) -> &'static str {
        match self {
            PosixKind::Read => "r",
            PosixKind::Write => "w",
            PosixKind::Unlock => "u",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_is_symmetric() {
        for a in Mode::ALL {
            for b in Mode::ALL {
                assert_eq!(a.compatible(b), b.compatible(a), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn strength_order() {
        assert!(Mode::NL.at_most(Mode::EX));
        assert!(Mode::PR.at_most(Mode::PW));
        assert!(Mode::CW.at_most(Mode::PW));
        assert!(!Mode::CW.at_most(Mode::PR));
        assert!(!Mode::PR.at_most(Mode::CW));
        assert!(!Mode::EX.at_most(Mode::PW));
        for m in Mode::ALL {
            assert!(m.at_most(m));
        }
    }

    #[test]
    fn ranges() {
        assert!(ByteRange::new(5, 5).is_err());
        assert!(ByteRange::new(6, 5).is_err());
        let a = ByteRange::new(0, 10).unwrap();
        let b = ByteRange::new(10, 20).unwrap();
        assert!(!a.overlaps(b));
        assert!(ByteRange::ALL.contains(a));
        assert_eq!(ByteRange::ALL.to_string(), "all");
        assert_eq!(ByteRange::to_eof(7).unwrap().to_string(), "7..");
        assert_eq!(a.to_string(), "0..10");
    }
}
