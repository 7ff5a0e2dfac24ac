//! Versioned binary records: every log entry, meta record, state snapshot and Raft message a
//! server writes is one byte, the format version, then the postcard encoding of the value
//! (docs/formats.md draws each). A record of a version this build does not read is refused with
//! an error that names the version found and the versions read, never guessed at.
//!
//! postcard is positional: a struct is its fields in order with no names, an enum is its variant
//! index then its fields, and a missing field is an error, not a default. So any change to an
//! encoded type (here, in `lockengine`'s inputs, outputs and snapshot, in `layout::Layout`, or in
//! openraft's types on an upgrade of it) bumps [`FORMAT_VERSION`], and `decode` keeps reading
//! the previous version (`tests::encodings_are_pinned` fails on a change that did not).

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The format version this build writes. Version 1 names the JSON of earlier builds, which had
/// no version byte; a record starting with `{` or `[` is reported as version 1.
pub const FORMAT_VERSION: u8 = 2;

/// The oldest format version this build reads.
pub const FORMAT_VERSION_OLDEST: u8 = 2;

/// Which format versions a codec writes and reads. Always [`Format::CURRENT`], except in tests
/// that play a build of another version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format {
    /// The version written, and the newest read.
    pub version: u8,
    /// The oldest version read.
    pub oldest: u8,
}

/// What a record is, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    LogEntry {
        index: u64,
    },
    Vote,
    Committed,
    Purged,
    SnapshotMeta,
    Snapshot,
    /// A Raft message between servers, by its name.
    Message(&'static str),
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Record::LogEntry { index } => write!(f, "log entry {index}"),
            Record::Vote => f.write_str("the vote record"),
            Record::Committed => f.write_str("the commit point record"),
            Record::Purged => f.write_str("the purge point record"),
            Record::SnapshotMeta => f.write_str("the snapshot meta record"),
            Record::Snapshot => f.write_str("the state snapshot"),
            Record::Message(name) => write!(f, "a Raft {name} message"),
        }
    }
}

/// A record that cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{what} is empty: it has no format version")]
    Empty { what: Record },
    #[error("{what} has format version {found}; this stripelock reads {reads}: {}", reads.advice(*found))]
    Version { what: Record, found: u8, reads: Format },
    #[error("{what} (format version {version}) does not decode: {source}")]
    Decode {
        what: Record,
        version: u8,
        #[source]
        source: postcard::Error,
    },
    #[error("{what} (format version {version}) has {extra} bytes after its end")]
    Trailing { what: Record, version: u8, extra: usize },
    #[error("{what} cannot be encoded: {source}")]
    Encode {
        what: Record,
        #[source]
        source: postcard::Error,
    },
}

impl From<FormatError> for std::io::Error {
    /// Kept as the error's source, so a caller can still match on it.
    fn from(e: FormatError) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.oldest == self.version {
            write!(f, "format version {}", self.version)
        } else {
            write!(f, "format versions {} to {}", self.oldest, self.version)
        }
    }
}

impl Format {
    pub const CURRENT: Format = Format { version: FORMAT_VERSION, oldest: FORMAT_VERSION_OLDEST };

    /// What to do about a record of version `found`, which this build does not read.
    fn advice(self, found: u8) -> &'static str {
        if found > self.version {
            "it was written by a newer stripelock; upgrade this server"
        } else if found == 1 {
            "it is the JSON of a stripelock from before versioned binary formats, which this one no longer reads"
        } else {
            "it was written by an older stripelock whose format this one no longer reads"
        }
    }

    /// The version byte, then `value`.
    pub fn encode<T: Serialize>(self, what: Record, value: &T) -> Result<Vec<u8>, FormatError> {
        postcard::to_extend(value, vec![self.version]).map_err(|source| FormatError::Encode { what, source })
    }

    /// `value` as [`Format::encode`] does, then `tail` as it is, to the end (for bytes that are
    /// already a record of their own, such as a snapshot: never encoded twice).
    pub fn encode_with_tail<T: Serialize>(self, what: Record, value: &T, tail: &[u8]) -> Result<Vec<u8>, FormatError> {
        let mut bytes = self.encode(what, value)?;
        bytes.extend_from_slice(tail);
        Ok(bytes)
    }

    /// Reads a record written by [`Format::encode`]: refuses a version outside the ones read and
    /// bytes past the value's end.
    pub fn decode<T: DeserializeOwned>(self, what: Record, bytes: &[u8]) -> Result<T, FormatError> {
        let (value, version, rest) = self.decode_head(what, bytes)?;
        if !rest.is_empty() {
            return Err(FormatError::Trailing { what, version, extra: rest.len() });
        }
        Ok(value)
    }

    /// Reads a record written by [`Format::encode_with_tail`]: the value and the tail.
    pub fn decode_with_tail<'a, T: DeserializeOwned>(
        self,
        what: Record,
        bytes: &'a [u8],
    ) -> Result<(T, &'a [u8]), FormatError> {
        let (value, _, rest) = self.decode_head(what, bytes)?;
        Ok((value, rest))
    }

    fn decode_head<'a, T: DeserializeOwned>(
        self,
        what: Record,
        bytes: &'a [u8],
    ) -> Result<(T, u8, &'a [u8]), FormatError> {
        let (&version, body) = bytes.split_first().ok_or(FormatError::Empty { what })?;
        match version {
            // Every version read decodes alike so far. A change to an encoded type adds an arm
            // here that decodes the previous version's types and converts them.
            v if (self.oldest..=self.version).contains(&v) => {
                let (value, rest) =
                    postcard::take_from_bytes(body).map_err(|source| FormatError::Decode { what, version, source })?;
                Ok((value, version, rest))
            }
            b'{' | b'[' => Err(FormatError::Version { what, found: 1, reads: self }),
            found => Err(FormatError::Version { what, found, reads: self }),
        }
    }
}

/// [`Format::CURRENT`]`.encode`.
pub fn encode<T: Serialize>(what: Record, value: &T) -> Result<Vec<u8>, FormatError> {
    Format::CURRENT.encode(what, value)
}

/// [`Format::CURRENT`]`.decode`.
pub fn decode<T: DeserializeOwned>(what: Record, bytes: &[u8]) -> Result<T, FormatError> {
    Format::CURRENT.decode(what, bytes)
}
