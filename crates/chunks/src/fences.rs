//! The fence table of a data volume (seed 003, fence before re-grant): the sessions the lock
//! service has fenced, each with the highest token issued when it was fenced. Once a session is
//! recorded here, every state-changing request carrying one of its tokens is refused, on every
//! unit, whether or not a newer holder has written there (the per-unit token floor only stops a
//! stale write where the newer holder wrote first).
//!
//! The table is one blob, [`FENCES_BLOB`], replaced atomically by the [`Device`]: it is recorded
//! durably before the storage server acknowledges a fence. Its record layout is in
//! docs/formats.md. In memory it sits behind a read-write lock: a state-changing request holds
//! the read side from its check until its unit is stored ([`Fences::admit`]), and recording a
//! fence takes the write side, so once a fence is acknowledged no request of that session is
//! still in flight here.

use std::collections::BTreeMap;
use std::sync::{RwLock, RwLockReadGuard};

use crate::{ChunkError, Device};

/// The blob the fence table is kept in (not a unit name: units are `FILE/ROW.ROLE`).
pub const FENCES_BLOB: &str = "fences";
/// The fence table format this code writes and reads.
pub const FENCES_FORMAT_VERSION: u16 = 1;
const MAGIC: [u8; 4] = *b"SLFT";
/// Most sessions one table holds: a request to fence more is refused (the lock service's own
/// session limit keeps far below it; entries of sessions known to have ended are pruned).
pub const FENCES_MAX: usize = 1 << 20;

/// Fenced sessions: session id → highest token issued when it was fenced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FenceTable {
    pub sessions: BTreeMap<u64, u64>,
}

/// Encodes the table (layout in docs/formats.md).
pub fn encode_fences(t: &FenceTable) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + 16 * t.sessions.len());
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&FENCES_FORMAT_VERSION.to_le_bytes());
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(&(t.sessions.len() as u64).to_le_bytes());
    for (session, token) in &t.sessions {
        b.extend_from_slice(&session.to_le_bytes());
        b.extend_from_slice(&token.to_le_bytes());
    }
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes and checks a fence table: magic, format version, length, checksum.
pub fn decode_fences(b: &[u8]) -> Result<FenceTable, ChunkError> {
    let corrupt = |what: &str| ChunkError::Corrupt { unit: FENCES_BLOB.to_string(), what: what.to_string() };
    if b.len() < 20 {
        return Err(corrupt("shorter than a fence table header"));
    }
    if b[..4] != MAGIC {
        return Err(corrupt("not a fence table"));
    }
    let version = u16::from_le_bytes([b[4], b[5]]);
    if version != FENCES_FORMAT_VERSION {
        return Err(ChunkError::FencesFormat { version });
    }
    let n = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
    let body = usize::try_from(n).ok().and_then(|n| n.checked_mul(16)).and_then(|l| l.checked_add(16));
    if body.is_none_or(|l| l + 4 != b.len()) {
        return Err(corrupt("length differs from the header's"));
    }
    let body = b.len() - 4;
    if crc32c::crc32c(&b[..body]) != u32::from_le_bytes(b[body..].try_into().expect("4 bytes")) {
        return Err(corrupt("checksum mismatch"));
    }
    let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    let sessions = (0..n as usize).map(|i| (u64_at(16 + 16 * i), u64_at(24 + 16 * i))).collect();
    Ok(FenceTable { sessions })
}

/// The fence table of one volume, loaded once and kept in memory, recorded durably on change.
#[derive(Debug, Default)]
pub struct Fences {
    table: RwLock<FenceTable>,
}

/// A state-changing request admitted past the fence table: fences wait until it is dropped.
#[derive(Debug)]
pub struct Admitted<'a> {
    _guard: RwLockReadGuard<'a, FenceTable>,
}

impl Fences {
    /// Reads the table from `device` (empty if it has none).
    pub fn load(device: &dyn Device) -> Result<Fences, ChunkError> {
        let table = match device.get(FENCES_BLOB)? {
            None => FenceTable::default(),
            Some(b) => decode_fences(&b)?,
        };
        Ok(Fences { table: RwLock::new(table) })
    }

    /// Admits a state-changing request carrying tokens of `sessions`, or refuses it if one of
    /// them is fenced. Hold the result until the request's change is stored.
    pub fn admit(&self, sessions: &[u64]) -> Result<Admitted<'_>, ChunkError> {
        let guard = self.table.read().expect("fence table");
        if let Some(&session) = sessions.iter().find(|s| guard.sessions.contains_key(s)) {
            return Err(ChunkError::Fenced { session });
        }
        Ok(Admitted { _guard: guard })
    }

    pub fn is_fenced(&self, session: u64) -> bool {
        self.table.read().expect("fence table").sessions.contains_key(&session)
    }

    /// A copy of the table (for status and tests).
    pub fn table(&self) -> FenceTable {
        self.table.read().expect("fence table").clone()
    }

    /// Records `fenced` (session, highest token) durably, after every request already admitted
    /// has finished, and drops entries `ended` says are no longer needed (sessions the caller's
    /// replicated state shows as ended: it refuses their tokens on its own). Returns whether the
    /// table changed. Nothing changes in memory unless the device stored the new table.
    pub fn record(
        &self,
        device: &dyn Device,
        fenced: &[(u64, u64)],
        ended: impl Fn(u64) -> bool,
    ) -> Result<bool, ChunkError> {
        let mut table = self.table.write().expect("fence table");
        let mut next = table.clone();
        for &(session, token) in fenced {
            let t = next.sessions.entry(session).or_insert(token);
            *t = (*t).max(token);
        }
        let fresh: Vec<u64> = fenced.iter().map(|(s, _)| *s).collect();
        next.sessions.retain(|s, _| fresh.contains(s) || !ended(*s));
        if next == *table {
            return Ok(false);
        }
        if next.sessions.len() > FENCES_MAX {
            return Err(ChunkError::Io(format!(
                "the fence table would hold {} sessions, more than {FENCES_MAX}",
                next.sessions.len()
            )));
        }
        device.put(FENCES_BLOB, &encode_fences(&next))?;
        *table = next;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemDevice;

    #[test]
    fn a_table_reads_back_and_survives_a_reload() {
        let dev = MemDevice::default();
        let f = Fences::load(&dev).unwrap();
        assert!(f.record(&dev, &[(7, 100), (3, 40)], |_| false).unwrap());
        assert!(!f.record(&dev, &[(7, 90)], |_| false).unwrap(), "an older token changes nothing");
        let again = Fences::load(&dev).unwrap();
        assert_eq!(again.table().sessions, BTreeMap::from([(3, 40), (7, 100)]));
        assert!(matches!(again.admit(&[1, 7]), Err(ChunkError::Fenced { session: 7 })));
        assert!(again.admit(&[1, 2]).is_ok());
        // Ended sessions are pruned, fresh ones kept.
        assert!(again.record(&dev, &[(9, 120)], |s| s == 3 || s == 9).unwrap());
        assert_eq!(Fences::load(&dev).unwrap().table().sessions, BTreeMap::from([(7, 100), (9, 120)]));
    }

    #[test]
    fn an_unknown_format_version_is_refused_by_name() {
        let mut b = encode_fences(&FenceTable { sessions: BTreeMap::from([(1, 2)]) });
        b[4] = 9;
        let e = decode_fences(&b).unwrap_err();
        assert_eq!(e, ChunkError::FencesFormat { version: 9 });
        assert!(e.to_string().contains("format 9") && e.to_string().contains("format 1"), "{e}");
        let mut b = encode_fences(&FenceTable::default());
        let last = b.len() - 1;
        b[last] ^= 1;
        assert!(matches!(decode_fences(&b), Err(ChunkError::Corrupt { .. })));
    }

    #[test]
    fn a_failed_put_records_nothing() {
        let dev = crate::FaultyDevice::new(MemDevice::default());
        let f = Fences::load(&dev).unwrap();
        dev.fail_next_puts(1);
        assert!(f.record(&dev, &[(5, 1)], |_| false).is_err());
        assert!(!f.is_fenced(5));
    }
}
