//! A server's data volume: its stripe units of every file, each stored as one record with a
//! crc32c of its bytes (checked on every read), a version, and the highest fencing token it has
//! accepted. A write must carry a token signed by the cluster, for a write mode, covering what
//! it writes, and not older than that highest token; otherwise it is refused and nothing changes.
//! So a holder whose lock was given to someone else (its session expired and was fenced) can no
//! longer land a write, however late it arrives.
//!
//! The record layout is drawn in docs/formats.md. Records live behind [`Device`], a narrow trait
//! of named blobs: a directory of files, memory, or a fault-injecting wrapper for tests.

pub mod device;
pub mod fences;
pub mod segments;

use std::io;

pub use device::{Device, DirDevice, FaultyDevice, MemDevice};
pub use fences::{FENCES_BLOB, FENCES_FORMAT_VERSION, FenceTable, Fences};
use layout::Role;
use lockengine::{ByteRange, Mode};
pub use segments::{SegDevice, SegOptions};
use token::{ClusterKey, SignedToken, TokenError};

/// The record format this code writes and reads.
pub const FORMAT_VERSION: u16 = 1;
const MAGIC: [u8; 4] = *b"SLUN";
/// The fixed part of the header, before the covered versions.
const FIXED: usize = 52;

/// One stripe unit: which file, which row, which part of the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnitId {
    pub file: u64,
    pub row: u64,
    pub role: Role,
}

impl UnitId {
    /// The unit's blob name: `FILE/ROW.ROLE`, numbers in hex (`d3` is data unit 3).
    pub fn name(&self) -> String {
        let role = match self.role {
            Role::Data(j) => format!("d{j}"),
            Role::P => "p".into(),
            Role::Q => "q".into(),
        };
        format!("{:016x}/{:016x}.{role}", self.file, self.row)
    }

    pub fn parse(name: &str) -> Option<UnitId> {
        let (file, rest) = name.split_once('/')?;
        let (row, role) = rest.split_once('.')?;
        let role = match role {
            "p" => Role::P,
            "q" => Role::Q,
            d => Role::Data(d.strip_prefix('d')?.parse().ok()?),
        };
        Some(UnitId { file: u64::from_str_radix(file, 16).ok()?, row: u64::from_str_radix(row, 16).ok()?, role })
    }
}

/// A unit as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    pub bytes: Vec<u8>,
    /// Bumped by every accepted write; 0 for a unit only ever fenced.
    pub version: u64,
    /// The highest fencing token accepted (by a write or a fence).
    pub highest_token: u64,
    /// For a parity unit: the version of each data unit of the row it was computed from, so a
    /// reconstruction can tell a parity that missed a write (a write hole) from a current one.
    /// Empty for a data unit.
    pub covers: Vec<u64>,
}

impl Unit {
    /// A unit never written.
    pub fn empty() -> Unit {
        Unit { bytes: Vec::new(), version: 0, highest_token: 0, covers: Vec::new() }
    }
}

/// What a write's lock must cover: the resource the data belongs to (a file's path, or a stripe
/// row's lock) and the byte range of it being written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Authority<'a> {
    pub resource: &'a str,
    pub range: ByteRange,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("the write's fencing token is not valid ({0}); take the lock again for a new token")]
    BadToken(TokenError),
    #[error("the write's token is for a {0} lock; writing needs PW or EX")]
    NotWriter(Mode),
    #[error("the write's token covers {held_resource} {held_range}, not {resource} {range}")]
    NotCovered { held_resource: String, held_range: ByteRange, resource: String, range: ByteRange },
    #[error(
        "fencing token {given} is older than {highest}, the newest unit {unit} has accepted: a later lock \
         holder has written or fenced it; the write is refused and changed nothing"
    )]
    Stale { unit: String, given: u64, highest: u64 },
    #[error("unit {unit} is at version {found}, not {expected}: another write came first; read it again")]
    VersionMismatch { unit: String, expected: u64, found: u64 },
    #[error("unit {unit} is damaged ({what}); rebuild it from its row (stripelock scrub --repair)")]
    Corrupt { unit: String, what: String },
    #[error("unit {unit} has record format {version}; this stripelock reads format {FORMAT_VERSION}")]
    Format { unit: String, version: u16 },
    #[error(
        "session {session} was fenced: its lease ran out (or it was evicted) and its locks may now be held by \
         another client, so this storage server refuses every change made under its tokens; nothing was \
         changed. Take the lock again and redo the change"
    )]
    Fenced { session: u64 },
    #[error(
        "session {session} has ended (it was closed, or it expired and was fenced): its locks are gone, so this \
         storage server refuses changes made under its tokens; nothing was changed. Take the lock again and redo \
         the change"
    )]
    SessionEnded { session: u64 },
    #[error(
        "the fence table has format {version}; this stripelock reads format {}: a newer stripelock wrote it",
        fences::FENCES_FORMAT_VERSION
    )]
    FencesFormat { version: u16 },
    #[error("the data volume failed: {0}")]
    Io(String),
}

impl From<io::Error> for ChunkError {
    fn from(e: io::Error) -> ChunkError {
        ChunkError::Io(e.to_string())
    }
}

fn role_bytes(role: Role) -> (u8, u8) {
    match role {
        Role::Data(j) => (0, j),
        Role::P => (1, 0),
        Role::Q => (2, 0),
    }
}

/// Encodes a unit's record (layout in docs/formats.md).
pub fn encode(id: &UnitId, unit: &Unit) -> Vec<u8> {
    let mut b = Vec::with_capacity(FIXED + 8 * unit.covers.len() + 4 + unit.bytes.len());
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    let (role, index) = role_bytes(id.role);
    b.push(role);
    b.push(index);
    b.extend_from_slice(&id.file.to_le_bytes());
    b.extend_from_slice(&id.row.to_le_bytes());
    b.extend_from_slice(&unit.version.to_le_bytes());
    b.extend_from_slice(&unit.highest_token.to_le_bytes());
    b.extend_from_slice(&(unit.bytes.len() as u32).to_le_bytes());
    b.extend_from_slice(&crc32c::crc32c(&unit.bytes).to_le_bytes());
    b.extend_from_slice(&(unit.covers.len() as u16).to_le_bytes());
    b.extend_from_slice(&[0, 0]);
    for v in &unit.covers {
        b.extend_from_slice(&v.to_le_bytes());
    }
    let header_crc = crc32c::crc32c(&b);
    b.extend_from_slice(&header_crc.to_le_bytes());
    b.extend_from_slice(&unit.bytes);
    b
}

/// Decodes and checks a record: magic, format, both checksums, and that it is the unit it is
/// stored as.
pub fn decode(id: &UnitId, b: &[u8]) -> Result<Unit, ChunkError> {
    let unit = id.name();
    let corrupt = |what: &str| ChunkError::Corrupt { unit: unit.clone(), what: what.to_string() };
    if b.len() < FIXED + 4 {
        return Err(corrupt("shorter than a record header"));
    }
    let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    let covered = u16::from_le_bytes([b[48], b[49]]) as usize;
    let header = FIXED + 8 * covered;
    if b.len() < header + 4 {
        return Err(corrupt("shorter than its header"));
    }
    if crc32c::crc32c(&b[..header]) != u32_at(header) {
        return Err(corrupt("header checksum mismatch"));
    }
    if b[..4] != MAGIC {
        return Err(corrupt("not a unit record"));
    }
    let version = u16::from_le_bytes([b[4], b[5]]);
    if version != FORMAT_VERSION {
        return Err(ChunkError::Format { unit, version });
    }
    if (b[6], b[7]) != role_bytes(id.role) || u64_at(8) != id.file || u64_at(16) != id.row {
        return Err(corrupt("the record belongs to another unit"));
    }
    let len = u32_at(40) as usize;
    let data = &b[header + 4..];
    if data.len() != len {
        return Err(corrupt("length differs from the header's"));
    }
    if crc32c::crc32c(data) != u32_at(44) {
        return Err(corrupt("data checksum mismatch"));
    }
    let covers = (0..covered).map(|i| u64_at(FIXED + 8 * i)).collect();
    Ok(Unit { bytes: data.to_vec(), version: u64_at(24), highest_token: u64_at(32), covers })
}

/// The units of one server, checked against fencing tokens signed with the cluster's key.
#[derive(Debug)]
pub struct ChunkStore<D> {
    device: D,
    key: ClusterKey,
    /// The negative control of the stale-token test: accept any token. Never set outside a test.
    fencing_off: bool,
}

impl<D: Device> ChunkStore<D> {
    pub fn new(device: D, key: ClusterKey) -> ChunkStore<D> {
        ChunkStore { device, key, fencing_off: false }
    }

    /// The negative control for tests: the store stops checking tokens. A test that shows a
    /// stale write refused must fail with this on.
    pub fn disable_fencing_for_negative_control(&mut self) {
        self.fencing_off = true;
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    /// The cluster key tokens are checked with.
    pub fn key(&self) -> &ClusterKey {
        &self.key
    }

    /// Reads a unit, checking its checksums. `None` if this server has never stored it.
    pub fn read(&self, id: &UnitId) -> Result<Option<Unit>, ChunkError> {
        match self.device.get(&id.name()) {
            Ok(None) => Ok(None),
            Ok(Some(b)) => decode(id, &b).map(Some),
            // The store's own checksum caught damage (the segment store): a unit to rebuild.
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                Err(ChunkError::Corrupt { unit: id.name(), what: e.to_string() })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Checks that `token` lets its holder write `authority`, and returns its number.
    pub fn check_token(&self, authority: Authority<'_>, token: &SignedToken) -> Result<u64, ChunkError> {
        if self.fencing_off {
            return Ok(token.claims.token);
        }
        let claims = self.key.verify(token).map_err(ChunkError::BadToken)?;
        if !claims.mode.is_write() {
            return Err(ChunkError::NotWriter(claims.mode));
        }
        if claims.resource != authority.resource || !claims.range.contains(authority.range) {
            return Err(ChunkError::NotCovered {
                held_resource: claims.resource,
                held_range: claims.range,
                resource: authority.resource.to_string(),
                range: authority.range,
            });
        }
        Ok(claims.token)
    }

    /// Replaces a unit's bytes (and, for parity, the data versions it covers) under `token`, if
    /// it is valid for `authority`, not older than any token the unit has accepted, and (with
    /// `expect_version`) the unit is still at that version. Returns the new version. Refused
    /// writes change nothing.
    pub fn write(
        &self,
        id: &UnitId,
        authority: Authority<'_>,
        token: &SignedToken,
        bytes: &[u8],
        covers: &[u64],
        expect_version: Option<u64>,
    ) -> Result<u64, ChunkError> {
        let given = self.check_token(authority, token)?;
        let current = self.read(id)?.unwrap_or_else(Unit::empty);
        if given < current.highest_token && !self.fencing_off {
            return Err(ChunkError::Stale { unit: id.name(), given, highest: current.highest_token });
        }
        if let Some(expected) = expect_version
            && expected != current.version
        {
            return Err(ChunkError::VersionMismatch { unit: id.name(), expected, found: current.version });
        }
        let next = Unit {
            bytes: bytes.to_vec(),
            version: current.version + 1,
            highest_token: current.highest_token.max(given),
            covers: covers.to_vec(),
        };
        self.device.put(&id.name(), &encode(id, &next))?;
        Ok(next.version)
    }

    /// Raises the unit's floor to `token` without writing data (fence before re-grant: every
    /// older token is refused from now on).
    pub fn fence(&self, id: &UnitId, token: u64) -> Result<(), ChunkError> {
        let mut unit = self.read(id)?.unwrap_or_else(Unit::empty);
        if token > unit.highest_token {
            unit.highest_token = token;
            self.device.put(&id.name(), &encode(id, &unit))?;
        }
        Ok(())
    }

    /// Stores a unit recomputed from its row (rebuild, repair) under a token for `authority`
    /// that is not older than any the unit has accepted; keeps the unit's floor.
    pub fn repair(
        &self,
        id: &UnitId,
        authority: Authority<'_>,
        token: &SignedToken,
        mut unit: Unit,
    ) -> Result<(), ChunkError> {
        let given = self.check_token(authority, token)?;
        // A damaged record's floor cannot be read; the token's own number stands in for it.
        let floor = match self.read(id) {
            Ok(Some(u)) => u.highest_token,
            Ok(None) | Err(ChunkError::Corrupt { .. } | ChunkError::Format { .. }) => 0,
            Err(e) => return Err(e),
        };
        if given < floor && !self.fencing_off {
            return Err(ChunkError::Stale { unit: id.name(), given, highest: floor });
        }
        unit.highest_token = floor.max(given);
        self.restore(id, &unit)
    }

    /// Stores a unit as given, for rebuild and repair (which recompute it from its row rather
    /// than take it from a lock holder).
    pub fn restore(&self, id: &UnitId, unit: &Unit) -> Result<(), ChunkError> {
        self.device.put(&id.name(), &encode(id, unit))?;
        Ok(())
    }

    /// Every unit this server stores, in order; names that are not units are skipped.
    pub fn units(&self) -> Result<Vec<UnitId>, ChunkError> {
        Ok(self.device.list()?.iter().filter_map(|n| UnitId::parse(n)).collect())
    }

    /// Deletes every unit of `file`.
    pub fn delete_file(&self, file: u64) -> Result<u64, ChunkError> {
        let names: Vec<String> = self.units()?.into_iter().filter(|u| u.file == file).map(|u| u.name()).collect();
        self.device.delete_many(&names)?;
        Ok(names.len() as u64)
    }

    /// Reads every unit and returns the ones that fail their checks.
    pub fn scrub(&self) -> Result<Vec<(UnitId, ChunkError)>, ChunkError> {
        let mut bad = Vec::new();
        for id in self.units()? {
            if let Err(e) = self.read(&id) {
                if matches!(e, ChunkError::Io(_)) {
                    return Err(e);
                }
                bad.push((id, e));
            }
        }
        Ok(bad)
    }
}
