//! The segment store (issue 16): a [`Device`] that appends every put to one of a few large
//! segment files and makes a batch of them durable with one `fdatasync` (group commit), instead
//! of a file, a sync, a rename and a directory sync per unit.
//!
//! - **Segments** `seg-NNNNNNNN.log`: a 16-byte header, then records (a put: name and bytes; a
//!   delete: the name), each with a checksum of its header and of its body. Records are only
//!   appended; past `segment_bytes` the active segment is synced and a new one begun.
//! - **Group commit**: a put appends under the store's lock, then waits until a sync that began
//!   after its append has finished; the first waiter to find none running runs it for everyone.
//! - **Index**: name → where its newest record is, in memory, and persisted in redb
//!   (`index.redb`) at checkpoints (each new segment, each compaction) together with the
//!   position it covers. Opening loads it and replays the records past that position; a torn
//!   record at the end of the last segment (a crash mid-append) is cut off there.
//! - **Compaction**: a background thread copies the live records out of the segment with the
//!   most overwritten bytes once the volume's garbage passes a quarter of its live bytes (and at
//!   least one segment), checkpoints, and deletes that segment.
//!
//! The byte layout is drawn in docs/formats.md. Reads see a put once it is appended, as readers
//! of a file see a write before its fsync; a put returns only once it is durable.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};

use redb::{Database, Durability, ReadableTable, TableDefinition};

use crate::device::Device;

/// The segment and index format this code writes and reads.
pub const SEGMENT_FORMAT_VERSION: u16 = 1;
/// A segment is closed and a new one begun past this size, unless configured.
pub const SEGMENT_BYTES_DEFAULT: u64 = 64 << 20;
/// Longest blob name.
pub const NAME_BYTES_MAX: usize = 1024;

const SEG_MAGIC: [u8; 4] = *b"SLSG";
const REC_MAGIC: [u8; 4] = *b"SLRC";
const SEG_HEADER: u64 = 16;
const REC_HEADER: usize = 28;
const KIND_PUT: u8 = 1;
const KIND_DELETE: u8 = 2;
const INDEX: TableDefinition<&str, &[u8]> = TableDefinition::new("segment_index_v1");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("segment_meta_v1");

/// Where a blob's newest record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    seg: u32,
    /// Where the record starts in its segment.
    off: u64,
    name_len: u16,
    len: u32,
    seq: u64,
}

impl Loc {
    fn record_bytes(&self) -> u64 {
        REC_HEADER as u64 + u64::from(self.name_len) + u64::from(self.len)
    }

    fn encode(&self) -> [u8; 26] {
        let mut b = [0u8; 26];
        b[0..4].copy_from_slice(&self.seg.to_le_bytes());
        b[4..12].copy_from_slice(&self.off.to_le_bytes());
        b[12..14].copy_from_slice(&self.name_len.to_le_bytes());
        b[14..18].copy_from_slice(&self.len.to_le_bytes());
        b[18..26].copy_from_slice(&self.seq.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> io::Result<Loc> {
        if b.len() != 26 {
            return Err(invalid("an index entry of the wrong size"));
        }
        Ok(Loc {
            seg: u32::from_le_bytes(b[0..4].try_into().expect("4")),
            off: u64::from_le_bytes(b[4..12].try_into().expect("8")),
            name_len: u16::from_le_bytes(b[12..14].try_into().expect("2")),
            len: u32::from_le_bytes(b[14..18].try_into().expect("4")),
            seq: u64::from_le_bytes(b[18..26].try_into().expect("8")),
        })
    }
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

fn db_error(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("the volume's index (redb): {e}"))
}

/// A record's header (docs/formats.md): magic, kind, name and body lengths, sequence number,
/// the body's crc32c and the header's own.
fn record_header(kind: u8, name_len: u16, len: u32, seq: u64, body_crc: u32) -> [u8; REC_HEADER] {
    let mut h = [0u8; REC_HEADER];
    h[0..4].copy_from_slice(&REC_MAGIC);
    h[4] = kind;
    h[6..8].copy_from_slice(&name_len.to_le_bytes());
    h[8..12].copy_from_slice(&len.to_le_bytes());
    h[12..20].copy_from_slice(&seq.to_le_bytes());
    h[20..24].copy_from_slice(&body_crc.to_le_bytes());
    let crc = crc32c::crc32c(&h[..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

/// A record header read back, if its checksum and magic hold.
fn parse_header(h: &[u8]) -> Option<(u8, u16, u32, u64, u32)> {
    if h.len() < REC_HEADER || h[0..4] != REC_MAGIC {
        return None;
    }
    if crc32c::crc32c(&h[..24]) != u32::from_le_bytes(h[24..28].try_into().expect("4")) {
        return None;
    }
    let kind = h[4];
    if kind != KIND_PUT && kind != KIND_DELETE {
        return None;
    }
    Some((
        kind,
        u16::from_le_bytes(h[6..8].try_into().expect("2")),
        u32::from_le_bytes(h[8..12].try_into().expect("4")),
        u64::from_le_bytes(h[12..20].try_into().expect("8")),
        u32::from_le_bytes(h[20..24].try_into().expect("4")),
    ))
}

fn segment_header(number: u32) -> [u8; SEG_HEADER as usize] {
    let mut h = [0u8; SEG_HEADER as usize];
    h[0..4].copy_from_slice(&SEG_MAGIC);
    h[4..6].copy_from_slice(&SEGMENT_FORMAT_VERSION.to_le_bytes());
    h[8..12].copy_from_slice(&number.to_le_bytes());
    let crc = crc32c::crc32c(&h[..12]);
    h[12..16].copy_from_slice(&crc.to_le_bytes());
    h
}

fn segment_name(number: u32) -> String {
    format!("seg-{number:08x}.log")
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Settings of a segment store.
#[derive(Debug, Clone, Copy)]
pub struct SegOptions {
    /// A segment is closed past this many bytes.
    pub segment_bytes: u64,
    /// Compact in a background thread.
    pub compact: bool,
}

impl Default for SegOptions {
    fn default() -> SegOptions {
        SegOptions { segment_bytes: SEGMENT_BYTES_DEFAULT, compact: true }
    }
}

/// Which segment compaction should empty, if any: the volume's garbage (bytes of closed
/// segments no index entry points to) must pass a quarter of its live bytes and one segment;
/// then the closed segment with the most garbage. `segs` is (number, length, live bytes).
pub fn compaction_victim(segs: &[(u32, u64, u64)], active: u32, segment_bytes: u64) -> Option<u32> {
    let live: u64 = segs.iter().map(|s| s.2).sum();
    let garbage = |s: &(u32, u64, u64)| s.1.saturating_sub(SEG_HEADER + s.2);
    let closed = segs.iter().filter(|s| s.0 != active);
    let total: u64 = closed.clone().map(garbage).sum();
    if total <= segment_bytes.max(live / 4) {
        return None;
    }
    closed.max_by_key(|s| (garbage(s), std::cmp::Reverse(s.0))).map(|s| s.0)
}

#[derive(Debug)]
struct Seg {
    file: Arc<File>,
    len: u64,
    live: u64,
}

#[derive(Debug, Default)]
struct State {
    index: BTreeMap<String, Loc>,
    segs: BTreeMap<u32, Seg>,
    active: u32,
    seq: u64,
    /// Segments appended to since the last group sync began.
    dirty: BTreeMap<u32, Arc<File>>,
    /// Index changes since the last checkpoint (None: deleted).
    changed: BTreeMap<String, Option<Loc>>,
}

#[derive(Debug, Default)]
struct SyncState {
    started: u64,
    done: u64,
    syncing: bool,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    options: SegOptions,
    db: Database,
    state: Mutex<State>,
    sync: Mutex<SyncState>,
    synced: Condvar,
    /// A sync failed: what was written since is in an unknown state, so every later change is
    /// refused until the server is restarted (and replays what is really on disk).
    poisoned: Mutex<Option<String>>,
    /// Wakes the compactor.
    wake: Condvar,
    wake_flag: Mutex<bool>,
    /// Serializes compaction with itself (the background thread and `compact_now`).
    compacting: Mutex<()>,
    stats: Mutex<SegStats>,
}

/// What a segment store has done, for tests, `status` and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SegStats {
    pub puts: u64,
    pub syncs: u64,
    pub segments_compacted: u64,
    pub bytes_copied: u64,
    pub records_replayed: u64,
    pub torn_bytes_cut: u64,
}

/// Blobs in append-only segments with group commit and a redb index. Cloning shares the store.
#[derive(Debug, Clone)]
pub struct SegDevice {
    inner: Arc<Inner>,
}

impl SegDevice {
    /// Opens (or makes) the store at `root` with default options.
    pub fn open(root: &Path) -> io::Result<SegDevice> {
        SegDevice::open_with(root, SegOptions::default())
    }

    /// Opens (or makes) the store at `root`: loads the index, replays what was appended after
    /// its last checkpoint, cuts a torn record off the end, and drops segments nothing uses.
    pub fn open_with(root: &Path, options: SegOptions) -> io::Result<SegDevice> {
        std::fs::create_dir_all(root)?;
        let db = Database::create(root.join("index.redb")).map_err(db_error)?;
        let (checkpoint, index) = load_index(&db)?;
        let mut numbers: Vec<u32> = Vec::new();
        for entry in std::fs::read_dir(root)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if let Some(hex) = name.strip_prefix("seg-").and_then(|n| n.strip_suffix(".log"))
                && let Ok(n) = u32::from_str_radix(hex, 16)
            {
                numbers.push(n);
            }
        }
        numbers.sort_unstable();
        let mut segs = BTreeMap::new();
        let mut r = Replayed { index, changed: BTreeMap::new(), seq: checkpoint.2, stats: SegStats::default() };
        let last = numbers.last().copied();
        for &n in &numbers {
            let path = root.join(segment_name(n));
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            let mut head = [0u8; SEG_HEADER as usize];
            let size = file.metadata()?.len();
            if size < SEG_HEADER || file.read_exact_at(&mut head, 0).is_err() || head != segment_header(n) {
                if Some(n) == last && size <= SEG_HEADER {
                    // Made but never written: a crash while a new segment was begun.
                    std::fs::remove_file(&path)?;
                    continue;
                }
                return Err(invalid(format!(
                    "{} is not a segment of format {SEGMENT_FORMAT_VERSION} (bad header); the volume cannot be opened",
                    path.display()
                )));
            }
            let mut len = size;
            if n >= checkpoint.0 {
                let from = if n == checkpoint.0 { checkpoint.1.max(SEG_HEADER) } else { SEG_HEADER };
                let end = replay(&file, from, size, n, &mut r)?;
                if end < size {
                    if Some(n) != last {
                        warn(&format!(
                            "segment {} has a damaged record at byte {end} (of {size}); what follows it is dropped",
                            path.display()
                        ));
                    }
                    r.stats.torn_bytes_cut += size - end;
                    file.set_len(end)?;
                    file.sync_all()?;
                    len = end;
                }
            }
            segs.insert(n, Seg { file: Arc::new(file), len, live: 0 });
        }
        let Replayed { index, changed, seq, stats } = r;
        for loc in index.values() {
            if let Some(s) = segs.get_mut(&loc.seg) {
                s.live += loc.record_bytes();
            }
        }
        let mut state = State { index, segs, active: 0, seq, changed, ..State::default() };
        let replayed = stats.records_replayed > 0 || stats.torn_bytes_cut > 0;
        let inner = Arc::new(Inner {
            root: root.to_path_buf(),
            options,
            db,
            state: Mutex::new(State::default()),
            sync: Mutex::new(SyncState::default()),
            synced: Condvar::new(),
            poisoned: Mutex::new(None),
            wake: Condvar::new(),
            wake_flag: Mutex::new(false),
            compacting: Mutex::new(()),
            stats: Mutex::new(stats),
        });
        // A fresh segment to append to: the old last one may end in a record cut short.
        let next = state.segs.keys().next_back().map_or(1, |n| n + 1);
        inner.begin_segment(&mut state, next)?;
        inner.checkpoint_locked(&mut state, replayed || checkpoint.0 == 0)?;
        // Segments nothing points to: a compaction that checkpointed but had not yet deleted.
        let unused: Vec<u32> =
            state.segs.iter().filter(|(n, s)| **n != state.active && s.live == 0).map(|(n, _)| *n).collect();
        for n in unused {
            state.segs.remove(&n);
            std::fs::remove_file(root.join(segment_name(n)))?;
        }
        sync_dir(root)?;
        *inner.state.lock().expect("segment state") = state;
        if options.compact {
            let weak = Arc::downgrade(&inner);
            std::thread::Builder::new().name("segment-compactor".into()).spawn(move || compactor(weak))?;
        }
        Ok(SegDevice { inner })
    }

    /// What this store has done so far.
    pub fn stats(&self) -> SegStats {
        *self.inner.stats.lock().expect("segment stats")
    }

    /// Bytes in segments, and bytes of them that index entries point to.
    pub fn space(&self) -> (u64, u64) {
        let state = self.inner.state.lock().expect("segment state");
        state.segs.values().fold((0, 0), |(a, b), s| (a + s.len, b + s.live))
    }

    /// Runs compaction until nothing is worth compacting; returns segments emptied.
    pub fn compact_now(&self) -> io::Result<u64> {
        let mut n = 0;
        while self.inner.compact_once()? {
            n += 1;
        }
        Ok(n)
    }

    /// Where the store lives.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Deletes several blobs with one sync.
    pub fn delete_many(&self, names: &[String]) -> io::Result<()> {
        let mut any = false;
        for name in names {
            any |= self.inner.append(KIND_DELETE, name, &[], None)?.is_some();
        }
        if any {
            self.inner.wait_durable()?;
        }
        Ok(())
    }
}

fn warn(what: &str) {
    eprintln!("stripelock: warning: {what}");
}

/// The checkpoint (segment, offset, sequence) and the index it covers.
type Checkpoint = (u32, u64, u64);

fn load_index(db: &Database) -> io::Result<(Checkpoint, BTreeMap<String, Loc>)> {
    let tx = db.begin_write().map_err(db_error)?;
    let mut checkpoint = (0, 0, 0);
    let mut index = BTreeMap::new();
    {
        let mut meta = tx.open_table(META).map_err(db_error)?;
        let format = meta.get("format").map_err(db_error)?.map(|v| v.value().to_vec());
        match format {
            Some(v) => {
                let version = u16::from_le_bytes(v[..].try_into().map_err(|_| invalid("a bad format entry"))?);
                if version != SEGMENT_FORMAT_VERSION {
                    return Err(invalid(format!(
                        "the volume's segment format is {version}; this stripelock reads format {SEGMENT_FORMAT_VERSION}"
                    )));
                }
            }
            None => {
                meta.insert("format", SEGMENT_FORMAT_VERSION.to_le_bytes().as_slice()).map_err(db_error)?;
            }
        }
        if let Some(v) = meta.get("checkpoint").map_err(db_error)? {
            let b = v.value();
            if b.len() != 20 {
                return Err(invalid("a bad checkpoint entry in the volume's index"));
            }
            checkpoint = (
                u32::from_le_bytes(b[0..4].try_into().expect("4")),
                u64::from_le_bytes(b[4..12].try_into().expect("8")),
                u64::from_le_bytes(b[12..20].try_into().expect("8")),
            );
        }
        let table = tx.open_table(INDEX).map_err(db_error)?;
        for row in table.iter().map_err(db_error)? {
            let (k, v) = row.map_err(db_error)?;
            index.insert(k.value().to_string(), Loc::decode(v.value())?);
        }
    }
    tx.commit().map_err(db_error)?;
    Ok((checkpoint, index))
}

/// Applies the records of segment `n` from `from`; returns where the last whole record ends.
/// The index as a replay leaves it, with what it changed: the checkpoint made after it must
/// persist those changes, as it moves the replay's starting point past their records.
struct Replayed {
    index: BTreeMap<String, Loc>,
    changed: BTreeMap<String, Option<Loc>>,
    seq: u64,
    stats: SegStats,
}

fn replay(file: &File, from: u64, size: u64, n: u32, r: &mut Replayed) -> io::Result<u64> {
    let mut at = from;
    let mut head = [0u8; REC_HEADER];
    while at + REC_HEADER as u64 <= size {
        file.read_exact_at(&mut head, at)?;
        let Some((kind, name_len, len, rec_seq, body_crc)) = parse_header(&head) else { break };
        let body_len = u64::from(name_len) + u64::from(len);
        if at + REC_HEADER as u64 + body_len > size {
            break;
        }
        let mut body = vec![0u8; body_len as usize];
        file.read_exact_at(&mut body, at + REC_HEADER as u64)?;
        if crc32c::crc32c(&body) != body_crc {
            break;
        }
        let Ok(name) = std::str::from_utf8(&body[..name_len as usize]) else { break };
        let loc = Loc { seg: n, off: at, name_len, len, seq: rec_seq };
        if kind == KIND_PUT {
            r.index.insert(name.to_string(), loc);
            r.changed.insert(name.to_string(), Some(loc));
        } else {
            r.index.remove(name);
            r.changed.insert(name.to_string(), None);
        }
        r.seq = r.seq.max(rec_seq);
        r.stats.records_replayed += 1;
        at += REC_HEADER as u64 + body_len;
    }
    Ok(at)
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("segment state")
    }

    fn check_poisoned(&self) -> io::Result<()> {
        match &*self.poisoned.lock().expect("poisoned") {
            Some(e) => Err(io::Error::other(format!(
                "the volume failed to sync ({e}); what was written since is uncertain, so it takes no more changes: \
                 restart the server"
            ))),
            None => Ok(()),
        }
    }

    /// Makes segment `n` and appends to it from now on (the old active one is synced first).
    fn begin_segment(&self, state: &mut State, n: u32) -> io::Result<()> {
        if let Some(old) = state.segs.get(&state.active) {
            old.file.set_len(old.len)?;
            old.file.sync_data()?;
        }
        let path = self.root.join(segment_name(n));
        // Truncated, not new: a segment begun when the disk was full may have been left half made.
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
        file.write_all_at(&segment_header(n), 0)?;
        file.sync_all()?;
        sync_dir(&self.root)?;
        state.segs.insert(n, Seg { file: Arc::new(file), len: SEG_HEADER, live: 0 });
        state.active = n;
        Ok(())
    }

    /// Persists the index changes since the last checkpoint, with the position they cover, once
    /// every segment is synced (so no entry points to bytes a crash could lose). `force` writes
    /// the position even with no change.
    fn checkpoint_locked(&self, state: &mut State, force: bool) -> io::Result<()> {
        if state.changed.is_empty() && !force {
            return Ok(());
        }
        for f in state.dirty.values() {
            f.sync_data()?;
        }
        if let Some(active) = state.segs.get(&state.active) {
            active.file.sync_data()?;
        }
        let mut tx = self.db.begin_write().map_err(db_error)?;
        tx.set_durability(Durability::Immediate).map_err(db_error)?;
        {
            let mut table = tx.open_table(INDEX).map_err(db_error)?;
            for (name, loc) in &state.changed {
                match loc {
                    Some(loc) => {
                        table.insert(name.as_str(), loc.encode().as_slice()).map_err(db_error)?;
                    }
                    None => {
                        table.remove(name.as_str()).map_err(db_error)?;
                    }
                }
            }
            let mut meta = tx.open_table(META).map_err(db_error)?;
            let len = state.segs.get(&state.active).map_or(SEG_HEADER, |s| s.len);
            let mut b = [0u8; 20];
            b[0..4].copy_from_slice(&state.active.to_le_bytes());
            b[4..12].copy_from_slice(&len.to_le_bytes());
            b[12..20].copy_from_slice(&state.seq.to_le_bytes());
            meta.insert("checkpoint", b.as_slice()).map_err(db_error)?;
        }
        tx.commit().map_err(db_error)?;
        state.changed.clear();
        Ok(())
    }

    /// Appends one record; with `only_if`, only while the blob's newest record is still that
    /// one (compaction's copies). Returns its place, or None when nothing was appended (a delete
    /// of a missing blob, or a copy overtaken).
    fn append(&self, kind: u8, name: &str, bytes: &[u8], only_if: Option<Loc>) -> io::Result<Option<Loc>> {
        self.check_poisoned()?;
        if name.is_empty() || name.len() > NAME_BYTES_MAX {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("`{name}` is not a blob name")));
        }
        let len =
            u32::try_from(bytes.len()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a blob past 4 GiB"))?;
        let mut body = Vec::with_capacity(REC_HEADER + name.len() + bytes.len());
        body.resize(REC_HEADER, 0);
        body.extend_from_slice(name.as_bytes());
        body.extend_from_slice(bytes);
        let body_crc = crc32c::crc32c(&body[REC_HEADER..]);
        let mut state = self.state();
        let old = state.index.get(name).copied();
        if (only_if.is_some() && old != only_if) || (kind == KIND_DELETE && old.is_none()) {
            return Ok(None);
        }
        let total = body.len() as u64;
        let active_len = state.segs.get(&state.active).map_or(SEG_HEADER, |s| s.len);
        if active_len > SEG_HEADER && active_len + total > self.options.segment_bytes {
            let next = state.active + 1;
            self.begin_segment(&mut state, next)?;
            self.checkpoint_locked(&mut state, true)?;
            self.wake_compactor();
        }
        let seq = state.seq + 1;
        body[..REC_HEADER].copy_from_slice(&record_header(kind, name.len() as u16, len, seq, body_crc));
        let n = state.active;
        let seg = state.segs.get_mut(&n).expect("the active segment");
        let off = seg.len;
        seg.file.write_all_at(&body, off)?;
        seg.len += total;
        let file = seg.file.clone();
        state.seq = seq;
        state.dirty.insert(n, file);
        let loc = Loc { seg: n, off, name_len: name.len() as u16, len, seq };
        if let Some(old) = old
            && let Some(s) = state.segs.get_mut(&old.seg)
        {
            s.live -= old.record_bytes();
        }
        if kind == KIND_PUT {
            state.segs.get_mut(&n).expect("the active segment").live += total;
            state.index.insert(name.to_string(), loc);
            state.changed.insert(name.to_string(), Some(loc));
        } else {
            state.index.remove(name);
            state.changed.insert(name.to_string(), None);
        }
        Ok(Some(loc))
    }

    /// Waits until a sync that began after the caller's appends has finished, running it if no
    /// other caller is.
    fn wait_durable(&self) -> io::Result<()> {
        let mut s = self.sync.lock().expect("sync state");
        let target = s.started + 1;
        loop {
            self.check_poisoned()?;
            if s.done >= target {
                return Ok(());
            }
            if s.syncing {
                s = self.synced.wait(s).expect("sync state");
                continue;
            }
            s.syncing = true;
            s.started += 1;
            let me = s.started;
            drop(s);
            let files: Vec<Arc<File>> = std::mem::take(&mut self.state().dirty).into_values().collect();
            let result = files.iter().try_for_each(|f| f.sync_data());
            if let Err(e) = &result {
                *self.poisoned.lock().expect("poisoned") = Some(e.to_string());
            }
            self.stats.lock().expect("segment stats").syncs += 1;
            s = self.sync.lock().expect("sync state");
            s.syncing = false;
            s.done = me;
            self.synced.notify_all();
            result?;
        }
    }

    fn wake_compactor(&self) {
        *self.wake_flag.lock().expect("wake") = true;
        self.wake.notify_one();
    }

    fn read_record(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        let (loc, file) = {
            let state = self.state();
            let Some(loc) = state.index.get(name).copied() else { return Ok(None) };
            let Some(seg) = state.segs.get(&loc.seg) else {
                return Err(invalid(format!("`{name}` is in segment {}, which is missing", loc.seg)));
            };
            (loc, seg.file.clone())
        };
        let mut rec = vec![0u8; loc.record_bytes() as usize];
        file.read_exact_at(&mut rec, loc.off)?;
        let damaged = |what: &str| {
            invalid(format!("`{name}`'s record (segment {}, byte {}) is damaged: {what}", loc.seg, loc.off))
        };
        let Some((kind, name_len, len, seq, body_crc)) = parse_header(&rec[..REC_HEADER]) else {
            return Err(damaged("header checksum mismatch"));
        };
        if kind != KIND_PUT || name_len != loc.name_len || len != loc.len || seq != loc.seq {
            return Err(damaged("the header is not the index's"));
        }
        if crc32c::crc32c(&rec[REC_HEADER..]) != body_crc {
            return Err(damaged("body checksum mismatch"));
        }
        if &rec[REC_HEADER..REC_HEADER + name_len as usize] != name.as_bytes() {
            return Err(damaged("the record belongs to another name"));
        }
        rec.drain(..REC_HEADER + name_len as usize);
        Ok(Some(rec))
    }

    /// Empties the segment compaction picks, if any: copies its live records to the active
    /// segment, checkpoints, deletes it. True if one was emptied.
    fn compact_once(&self) -> io::Result<bool> {
        let _one = self.compacting.lock().expect("compacting");
        let (victim, entries) = {
            let state = self.state();
            let segs: Vec<(u32, u64, u64)> = state.segs.iter().map(|(n, s)| (*n, s.len, s.live)).collect();
            let Some(victim) = compaction_victim(&segs, state.active, self.options.segment_bytes) else {
                return Ok(false);
            };
            let entries: Vec<(String, Loc)> =
                state.index.iter().filter(|(_, l)| l.seg == victim).map(|(n, l)| (n.clone(), *l)).collect();
            (victim, entries)
        };
        let mut copied = 0u64;
        for (name, loc) in entries {
            // A damaged record is copied as it is: its owner's own checksums still catch it.
            let bytes = match self.read_record(&name) {
                Ok(Some(b)) => b,
                Ok(None) => continue,
                Err(_) => {
                    let file = self.state().segs.get(&victim).map(|s| s.file.clone());
                    let Some(file) = file else { continue };
                    let mut b = vec![0u8; loc.len as usize];
                    file.read_exact_at(&mut b, loc.off + REC_HEADER as u64 + u64::from(loc.name_len))?;
                    b
                }
            };
            if self.append(KIND_PUT, &name, &bytes, Some(loc))?.is_some() {
                copied += bytes.len() as u64;
            }
        }
        let mut state = self.state();
        if state.index.values().any(|l| l.seg == victim) {
            // Overtaken by a put while copying: leave it for the next round.
            return Ok(false);
        }
        self.checkpoint_locked(&mut state, true)?;
        state.segs.remove(&victim);
        std::fs::remove_file(self.root.join(segment_name(victim)))?;
        sync_dir(&self.root)?;
        drop(state);
        let mut stats = self.stats.lock().expect("segment stats");
        stats.segments_compacted += 1;
        stats.bytes_copied += copied;
        Ok(true)
    }
}

/// The compaction thread: runs after each new segment (and every few seconds) while the store
/// is open.
fn compactor(weak: Weak<Inner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        {
            let flag = inner.wake_flag.lock().expect("wake");
            let (mut flag, _) = inner.wake.wait_timeout(flag, std::time::Duration::from_secs(5)).expect("wake");
            *flag = false;
        }
        loop {
            match inner.compact_once() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    warn(&format!("segment compaction failed: {e}"));
                    break;
                }
            }
        }
        drop(inner);
    }
}

impl Device for SegDevice {
    fn get(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        self.inner.read_record(name)
    }

    fn put(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        self.inner.append(KIND_PUT, name, bytes, None)?;
        self.inner.stats.lock().expect("segment stats").puts += 1;
        self.inner.wait_durable()
    }

    fn delete(&self, name: &str) -> io::Result<()> {
        if self.inner.append(KIND_DELETE, name, &[], None)?.is_some() {
            self.inner.wait_durable()?;
        }
        Ok(())
    }

    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.inner.state().index.keys().cloned().collect())
    }

    fn delete_many(&self, names: &[String]) -> io::Result<()> {
        SegDevice::delete_many(self, names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("stripelock-seg-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        root
    }

    #[test]
    fn puts_deletes_and_a_reopen_agree() {
        let root = dir("reopen");
        let opts = SegOptions { segment_bytes: 4096, compact: false };
        {
            let dev = SegDevice::open_with(&root, opts).unwrap();
            for i in 0..40u32 {
                dev.put(&format!("a/{i:04}"), &vec![i as u8; 300 + i as usize]).unwrap();
            }
            dev.delete("a/0003").unwrap();
            dev.put("a/0005", b"again").unwrap();
            assert_eq!(dev.get("a/0005").unwrap().as_deref(), Some(&b"again"[..]));
            assert_eq!(dev.get("a/0003").unwrap(), None);
        }
        // Twice: the first open replays the tail and checkpoints past it, so what it replayed
        // must be in the index the second open loads.
        drop(SegDevice::open_with(&root, opts).unwrap());
        let dev = SegDevice::open_with(&root, opts).unwrap();
        let names = dev.list().unwrap();
        assert_eq!(names.len(), 39);
        assert_eq!(dev.get("a/0005").unwrap().as_deref(), Some(&b"again"[..]));
        assert_eq!(dev.get("a/0039").unwrap(), Some(vec![39u8; 339]));
        assert_eq!(dev.get("a/0003").unwrap(), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_earlier_records_stay() {
        let root = dir("torn");
        let opts = SegOptions { segment_bytes: 1 << 20, compact: false };
        let seg;
        {
            let dev = SegDevice::open_with(&root, opts).unwrap();
            dev.put("x", b"first").unwrap();
            dev.put("y", &[7u8; 1000]).unwrap();
            seg = dev.inner.state().active;
        }
        // Cut the last record in half, as a crash mid-append would.
        let path = root.join(segment_name(seg));
        let len = std::fs::metadata(&path).unwrap().len();
        OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 500).unwrap();
        let dev = SegDevice::open_with(&root, opts).unwrap();
        assert_eq!(dev.get("x").unwrap().as_deref(), Some(&b"first"[..]));
        assert_eq!(dev.get("y").unwrap(), None, "the torn put is gone, not garbage");
        assert!(dev.stats().torn_bytes_cut > 0);
        dev.put("y", b"later").unwrap();
        drop(dev);
        let dev = SegDevice::open_with(&root, opts).unwrap();
        assert_eq!(dev.get("y").unwrap().as_deref(), Some(&b"later"[..]));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_flipped_byte_is_reported_not_returned() {
        let root = dir("flip");
        let dev = SegDevice::open_with(&root, SegOptions { segment_bytes: 1 << 20, compact: false }).unwrap();
        dev.put("x", &[1u8; 4096]).unwrap();
        let loc = dev.inner.state().index["x"];
        let file = dev.inner.state().segs[&loc.seg].file.clone();
        file.write_all_at(&[0xff], loc.off + 100).unwrap();
        let e = dev.get("x").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// Overwrites leave garbage; compaction keeps it within a quarter of the live bytes plus a
    /// segment, and every blob keeps its newest bytes through it and a reopen.
    #[test]
    fn compaction_bounds_the_garbage_and_keeps_every_blob() {
        let root = dir("compact");
        let opts = SegOptions { segment_bytes: 64 << 10, compact: false };
        let dev = SegDevice::open_with(&root, opts).unwrap();
        let mut model = BTreeMap::new();
        for round in 0..30u32 {
            for i in 0..16u32 {
                let bytes = vec![(round * 16 + i) as u8; 2000 + i as usize];
                dev.put(&format!("u/{i}"), &bytes).unwrap();
                model.insert(format!("u/{i}"), bytes);
            }
        }
        let (before, live) = dev.space();
        assert!(before > 4 * live, "{before} bytes for {live} live");
        let emptied = dev.compact_now().unwrap();
        assert!(emptied > 0);
        let (after, live) = dev.space();
        assert!(after <= live + live / 4 + 2 * opts.segment_bytes, "{after} bytes for {live} live");
        for (k, v) in &model {
            assert_eq!(dev.get(k).unwrap().as_ref(), Some(v));
        }
        drop(dev);
        let dev = SegDevice::open_with(&root, opts).unwrap();
        for (k, v) in &model {
            assert_eq!(dev.get(k).unwrap().as_ref(), Some(v), "{k} after reopen");
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// Puts from many threads share syncs: fewer syncs than puts, and all land.
    #[test]
    fn concurrent_puts_share_syncs() {
        let root = dir("group");
        let dev = SegDevice::open_with(&root, SegOptions { segment_bytes: 1 << 20, compact: true }).unwrap();
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let dev = &dev;
                s.spawn(move || {
                    for i in 0..50u8 {
                        dev.put(&format!("{t}/{}", i % 5), &vec![t ^ i; 5000]).unwrap();
                    }
                });
            }
        });
        let st = dev.stats();
        assert_eq!(st.puts, 400);
        assert!(st.syncs < st.puts, "{st:?}");
        assert_eq!(dev.list().unwrap().len(), 40);
        for t in 0..8u8 {
            assert_eq!(dev.get(&format!("{t}/4")).unwrap(), Some(vec![t ^ 49; 5000]));
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_victim_is_the_closed_segment_with_most_garbage_once_past_the_bound() {
        // (number, length, live)
        let segs = [(1, 1000, 900), (2, 1000, 100), (3, 1000, 1000)];
        assert_eq!(compaction_victim(&segs, 3, 4000), None, "garbage under one segment");
        assert_eq!(compaction_victim(&segs, 3, 500), Some(2));
        assert_eq!(compaction_victim(&segs, 2, 500), None, "the active segment is never compacted");
    }
}
