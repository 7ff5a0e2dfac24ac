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
pub const FORMAT_VERSION: u8 = 8;

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
    pub fn decode_with_tail<T: DeserializeOwned>(self, what: Record, bytes: &[u8]) -> Result<(T, &[u8]), FormatError> {
        let (value, _, rest) = self.decode_head(what, bytes)?;
        Ok((value, rest))
    }

    fn decode_head<T: DeserializeOwned>(self, what: Record, bytes: &[u8]) -> Result<(T, u8, &[u8]), FormatError> {
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

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use lockengine::{ByteRange, Input, LockId, Mode, Output, SessionId, ValueBlock};
    use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
    use openraft::type_config::alias::{EntryOf, LogIdOf, SnapshotMetaOf, StoredMembershipOf, VoteOf};
    use openraft::{EntryPayload, Membership};

    use super::*;
    use crate::types::{C, Command, NodeAddr, Op, Origin, Reply};

    fn log_id(term: u64, index: u64) -> LogIdOf<C> {
        openraft::testing::log_id::<C>(term, 1, index)
    }

    fn layout() -> layout::Layout {
        layout::Layout::new(4096, 2, 1, vec![1, 2, 3]).unwrap()
    }

    fn membership() -> Membership<u64, NodeAddr> {
        let nodes: BTreeMap<u64, NodeAddr> =
            (1..=3).map(|id| (id, NodeAddr { addr: format!("127.0.0.1:{}", 7000 + id) })).collect();
        Membership::new(vec![BTreeSet::from([1, 2, 3])], nodes).unwrap()
    }

    pub(crate) fn meta() -> SnapshotMetaOf<C> {
        SnapshotMetaOf::<C> {
            last_log_id: Some(log_id(3, 90)),
            last_membership: StoredMembershipOf::<C>::new(Some(log_id(1, 1)), membership()),
        }
    }

    fn lock(session: u64, lock: u64) -> Input {
        Input::Lock {
            lock: LockId(lock),
            session: SessionId(session),
            resource: "/data/f".into(),
            range: ByteRange { start: 0, end: 4096 },
            mode: Mode::PW,
            nowait: false,
        }
    }

    /// One command of every `Op` variant, in declaration order.
    fn every_op() -> Vec<Op> {
        vec![
            Op::Bootstrap { secret: [7; 32] },
            Op::OpenSession { lease_ms: 10_000, client: "pid 1234 on host".into() },
            Op::OpenGatewaySession { lease_ms: 10_000, server: 2 },
            Op::Engine(lock(1, 1 << 20 | 1)),
            Op::Handover { release: LockId(2 << 20 | 1), request: lock(1, 1 << 20 | 2) },
            Op::CreateFile { path: "/f".into(), layout: layout(), writer: Some(SessionId(1)) },
            Op::CompleteFile { path: "/f".into(), id: 1, size: 9 },
            Op::RemoveFile { path: "/f".into(), id: 1 },
            Op::SetLayout { path: "/f".into(), id: 1, layout: layout() },
            Op::GrowFile { path: "/f".into(), id: 1, size: 12 },
        ]
    }

    fn entries() -> Vec<EntryOf<C>> {
        let mut entries = vec![
            EntryOf::<C> { log_id: log_id(1, 1), payload: EntryPayload::Blank },
            EntryOf::<C> { log_id: log_id(1, 2), payload: EntryPayload::Membership(membership()) },
        ];
        for (i, op) in every_op().into_iter().enumerate() {
            let origin = Some(Origin { session: SessionId(1), request: i as u64 });
            let cmd = Command { now_ms: 1_700_000_000_000 + i as u64, origin, op };
            entries.push(EntryOf::<C> { log_id: log_id(2, 3 + i as u64), payload: EntryPayload::Normal(cmd) });
        }
        entries
    }

    fn reply() -> Reply {
        let granted = Output::Granted {
            session: SessionId(1),
            lock: LockId(1 << 20 | 1),
            mode: Mode::EX,
            range: ByteRange::ALL,
            token: 3 << 40 | 17,
            value: ValueBlock::Value(vec![1, 2, 3].into_boxed_slice()),
            reused: false,
        };
        let error = Some(crate::types::NamespaceError::NotFound { path: "/f".into() });
        Reply { session: None, outputs: vec![granted], duplicate: false, index: 42, file: Some(3), error }
    }

    /// Encodes, decodes and encodes again: the value and the bytes come back the same.
    fn round_trip<T: Serialize + DeserializeOwned>(what: Record, value: &T) -> T {
        let bytes = encode(what, value).unwrap();
        assert_eq!(bytes[0], FORMAT_VERSION, "{what} does not start with the format version");
        let back: T = decode(what, &bytes).unwrap();
        assert_eq!(encode(what, &back).unwrap(), bytes, "{what} changed on a round trip");
        back
    }

    #[test]
    fn every_record_kind_round_trips() {
        for entry in entries() {
            let what = Record::LogEntry { index: entry.log_id.index };
            assert_eq!(round_trip(what, &entry), entry);
        }
        let vote = VoteOf::<C>::new_committed(4, 2);
        assert_eq!(round_trip(Record::Vote, &vote), vote);
        assert_eq!(round_trip(Record::Vote, &VoteOf::<C>::new(5, 3)), VoteOf::<C>::new(5, 3));
        for committed in [None, Some(log_id(4, 77))] {
            assert_eq!(round_trip(Record::Committed, &committed), committed);
        }
        assert_eq!(round_trip(Record::Purged, &log_id(4, 60)), log_id(4, 60));
        assert_eq!(round_trip(Record::SnapshotMeta, &meta()), meta());

        let append = AppendEntriesRequest::<C> {
            vote,
            prev_log_id: Some(log_id(1, 2)),
            entries: entries(),
            leader_commit: Some(log_id(2, 5)),
        };
        let back = round_trip(Record::Message("append-entries"), &append);
        assert_eq!((back.vote, back.prev_log_id, back.leader_commit), (vote, append.prev_log_id, append.leader_commit));
        assert_eq!(back.entries, append.entries);
        for resp in [
            AppendEntriesResponse::<C>::Success,
            AppendEntriesResponse::PartialSuccess(Some(log_id(2, 4))),
            AppendEntriesResponse::Conflict,
            AppendEntriesResponse::HigherVote(VoteOf::<C>::new(6, 3)),
        ] {
            assert_eq!(round_trip(Record::Message("append-entries"), &resp), resp);
        }
        let mut ask = VoteRequest::<C>::new(VoteOf::<C>::new(5, 2), Some(log_id(4, 80)));
        ask.leadership_transfer = true;
        assert_eq!(round_trip(Record::Message("vote"), &ask), ask);
        let answer = VoteResponse::<C>::new(VoteOf::<C>::new(5, 2), Some(log_id(4, 80)), true);
        assert_eq!(round_trip(Record::Message("vote"), &answer), answer);
        let installed = SnapshotResponse::<C>::new(vote);
        assert_eq!(round_trip(Record::Message("full-snapshot"), &installed), installed);
        let cmd = Command { now_ms: 9, origin: None, op: Op::Engine(Input::Tick) };
        assert_eq!(round_trip(Record::Message("forwarded proposal"), &cmd), cmd);
        for result in [Ok(reply()), Err("not the leader".to_string())] {
            assert_eq!(round_trip(Record::Message("forwarded proposal"), &result), result);
        }
    }

    #[test]
    fn a_record_of_a_version_not_read_is_refused_naming_both_versions() {
        let entry = &entries()[3];
        let what = Record::LogEntry { index: 42 };
        let next = Format { version: FORMAT_VERSION + 1, oldest: FORMAT_VERSION + 1 };
        // Written by a newer build, read by this one.
        let newer = next.encode(what, entry).unwrap();
        let e = decode::<EntryOf<C>>(what, &newer).unwrap_err();
        assert!(matches!(e, FormatError::Version { found, .. } if found == FORMAT_VERSION + 1), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!(
                "log entry 42 has format version {}; this stripelock reads format versions {FORMAT_VERSION_OLDEST} to \
                 {}: it was written by a newer stripelock; upgrade this server",
                FORMAT_VERSION + 1,
                FORMAT_VERSION
            )
        );
        // Written by this build, read by a newer one that no longer reads this version.
        let e = next.decode::<EntryOf<C>>(what, &encode(what, entry).unwrap()).unwrap_err();
        let message = e.to_string();
        assert!(
            message.starts_with(&format!(
                "log entry 42 has format version {FORMAT_VERSION}; this stripelock reads format version {}",
                FORMAT_VERSION + 1
            )),
            "{message}"
        );
        assert!(message.contains("older stripelock"), "{message}");
        // The JSON of builds before versioned formats.
        let json = serde_json::to_vec(entry).unwrap();
        let e = decode::<EntryOf<C>>(what, &json).unwrap_err();
        assert!(matches!(e, FormatError::Version { found: 1, .. }), "{e:?}");
        assert!(e.to_string().contains("JSON"), "{e}");
        // Nothing at all, and bytes after the end.
        assert!(matches!(decode::<EntryOf<C>>(what, &[]), Err(FormatError::Empty { .. })));
        let mut long = encode(what, entry).unwrap();
        long.push(0);
        assert!(matches!(decode::<EntryOf<C>>(what, &long), Err(FormatError::Trailing { extra: 1, .. })));
        // A range of versions read is named as one.
        let both = Format { version: FORMAT_VERSION + 1, oldest: FORMAT_VERSION };
        let e = both.decode::<EntryOf<C>>(what, &[FORMAT_VERSION + 2]).unwrap_err();
        assert!(
            e.to_string().contains(&format!("reads format versions {FORMAT_VERSION} to {}", FORMAT_VERSION + 1)),
            "{e}"
        );
    }

    /// The bytes of a sample of every record kind, pinned. postcard is positional: reordering
    /// fields or variants, adding or removing one, or changing a field's type changes them
    /// (renaming does not). If this fails, the change needs a new `FORMAT_VERSION` and a decoder
    /// that still reads the previous one (docs/formats.md, "Changing a format"); then pin the new
    /// bytes here.
    #[test]
    fn encodings_are_pinned() {
        let hex = |bytes: Vec<u8>| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let mut all = String::new();
        for entry in entries() {
            all += &hex(encode(Record::LogEntry { index: 0 }, &entry).unwrap());
            all += "\n";
        }
        all += &hex(encode(Record::Vote, &VoteOf::<C>::new_committed(4, 2)).unwrap());
        all += "\n";
        all += &hex(encode(Record::SnapshotMeta, &meta()).unwrap());
        all += "\n";
        all += &hex(encode(Record::Message("forwarded proposal"), &Ok::<Reply, String>(reply())).unwrap());
        all += "\n";
        assert_eq!(all, PINNED, "an encoding changed; see this test's comment");
    }

    const PINNED: &str = concat!(
        "0801010100\n",
        "0801010202010301020303010e3132372e302e302e313a37303031020e3132372e302e302e313a37303032030e3132372e302e302e313a37303033\n",
        "080201030180d095ffbc31010100000707070707070707070707070707070707070707070707070707070707070707\n",
        "080201040181d095ffbc3101010101904e107069642031323334206f6e20686f7374\n",
        "080201050182d095ffbc3101010202904e02\n",
        "080201060183d095ffbc31010103030581804001072f646174612f660080200400\n",
        "080201070184d095ffbc3101010404818080010582804001072f646174612f660080200400\n",
        "080201080185d095ffbc3101010505022f6680200201030102030101\n",
        "080201090186d095ffbc3101010606022f660109\n",
        "0802010a0187d095ffbc3101010707022f6601\n",
        "0802010b0188d095ffbc3101010808022f66018020020103010203\n",
        "0802010c0189d095ffbc3101010909022f66010c\n",
        "08040201\n",
        "080103015a01010101010301020303010e3132372e302e302e313a37303031020e3132372e302e302e313a37303032030e3132372e302e302e313a3730303300\n",
        "0800000100018180400500ffffffffffffffffff01918080808060010301020300002a01030105022f66\n",
    );
}
