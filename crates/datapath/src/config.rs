//! How a server's data path is set up, and every bound it keeps, in one [`Limits`].

use std::path::PathBuf;
use std::sync::Arc;

use crate::lease::StorageEvent;

/// How a server's data path is set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// The server's data directory; its units are kept in `volume/` there (the segment store),
    /// or in `units/` (one file per unit).
    pub data_dir: PathBuf,
    /// How this server keeps its units.
    pub chunk_store: ChunkStoreKind,
    /// The secondary tier (seed 001): a directory every server of the cluster reaches, or S3.
    pub tier: tier::Place,
    /// Hold the migration-signal lock and serve file metadata relaxed while it is held
    /// (`signal.rs`); off, every read re-validates with the leader (strict mode always).
    pub migration_signal: bool,
    /// Seed 001: after a read of a stub, stripe the whole file again in the background.
    pub recall_on_read: bool,
    /// How often the leader's fencing duty runs (the lock service's tick).
    pub tick_ms: u64,
    /// How long units of a file no longer in the namespace are kept before they are deleted
    /// (checked every this often; a file must be missing at two checks); 0 keeps them.
    pub orphan_grace_ms: u64,
    /// Seed 003: how long a storage lease lasts (see `fencing.rs`); the leader waits at most
    /// this long for a storage server that does not acknowledge a fence.
    pub storage_lease_ms: u64,
    pub limits: Limits,
    /// The outside world as the data path sees it; real by default, simulated in tests.
    pub env: Env,
}

/// How a server keeps its stripe units on its disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ChunkStoreKind {
    /// Append-only segments with group commit and a redb index (`volume/`; issue 16).
    #[default]
    Segments,
    /// One file per unit, each put a temporary file, a sync and a rename (`units/`): slower,
    /// but every unit is a file to look at.
    Files,
}

/// A chunk store named that is neither.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a chunk store: give `segments` (the default) or `files`")]
pub struct UnknownChunkStore(pub String);

impl std::str::FromStr for ChunkStoreKind {
    type Err = UnknownChunkStore;

    fn from_str(s: &str) -> Result<ChunkStoreKind, UnknownChunkStore> {
        match s {
            "segments" => Ok(ChunkStoreKind::Segments),
            "files" => Ok(ChunkStoreKind::Files),
            other => Err(UnknownChunkStore(other.to_string())),
        }
    }
}

/// Every bound of the data path: what one request may carry, how much is kept in flight, and
/// how large each cache and queue may grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest file a put or a write may make, in bytes (issue 10: an offset of 2^62 made a
    /// file of 4.6 EB that no scrub could finish).
    pub file_bytes_max: u64,
    /// Longest path of a file.
    pub path_bytes_max: usize,
    /// Longest write one call carries.
    pub write_bytes_max: usize,
    /// Rows a put, get, rebuild or write keeps in flight at once.
    pub rows_in_flight: usize,
    /// Stripe locks a server keeps cached; past this the oldest idle one is given back.
    pub stripe_locks_cached: usize,
    /// Seed 003: writes in flight under one lease, whatever the lease would allow.
    pub writes_in_flight_max: u32,
    /// Seed 000: lock-free ranges a server remembers.
    pub lock_free_ranges_max: usize,
    /// Stripes whose last delegate a gateway remembers.
    pub stripes_remembered: usize,
    /// Issue 16: how fast resync rebuilds what degraded writes left behind, bytes/s (0: as
    /// fast as it goes).
    pub resync_bytes_per_s: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            file_bytes_max: FILE_BYTES_MAX_DEFAULT,
            path_bytes_max: 4096,
            write_bytes_max: WRITE_BYTES_MAX,
            rows_in_flight: 4,
            stripe_locks_cached: 1024,
            writes_in_flight_max: crate::admission::IN_FLIGHT_MAX,
            lock_free_ranges_max: crate::lockcache::ENTRIES_MAX,
            stripes_remembered: crate::delegation::STRIPES_REMEMBERED,
            resync_bytes_per_s: RESYNC_BYTES_PER_S_DEFAULT,
        }
    }
}

/// Resync's pace unless configured: 256 MiB/s, so writes of clients keep most of the disks.
pub const RESYNC_BYTES_PER_S_DEFAULT: u64 = 256 << 20;

/// The largest file when the server's config does not say (16 TiB).
pub const FILE_BYTES_MAX_DEFAULT: u64 = 16 << 40;
/// Longest write one call carries by default (a client cuts its writes to this).
pub const WRITE_BYTES_MAX: usize = 32 << 20;
/// Largest unit message (a 64 MiB stripe unit and its header): a property of the protocol.
pub const MESSAGE_BYTES_MAX: usize = (64 << 20) + (1 << 20);
/// The stripe unit when a put does not choose one.
pub const DEFAULT_UNIT: u32 = 1 << 20;
/// How long units of a removed file stay before they are collected, unless configured.
pub const ORPHAN_GRACE_MS_DEFAULT: u64 = 60_000;

/// What the data path takes from outside itself besides the lock service: its volume, an
/// observer, and the switches of tests.
#[derive(Clone, Default)]
pub struct Env {
    /// Where this server keeps its stripe units instead of `DATA/units` (memory in tests).
    pub volume: Option<Arc<dyn chunks::Device>>,
    /// Sees what this server's storage does about fences (the simulation's checker).
    pub storage_observer: Option<Arc<dyn Fn(StorageEvent) + Send + Sync>>,
    /// Negative control for tests only: a stripe write is carried out even when the lock it was
    /// written under is gone (seed 004's timestamp check skipped). Never set outside a test.
    pub break_stale_write_check_for_negative_control: bool,
    /// Negative control for tests only: the leader acknowledges fences without sending them to
    /// storage, and storage refuses no token for its session being fenced or ended (fence before
    /// re-grant unenforced, as before issue 11). Never set outside a test.
    pub skip_storage_fence_for_negative_control: bool,
    /// Tests only: the first stripe write this server carries out waits this long after its
    /// lock check and before it writes any unit (a write held back past its client's lease).
    /// Never set outside a test.
    pub hold_first_stripe_write_ms_for_test: Option<u64>,
    /// Negative control for tests only: the leader sends no invalidations (seed 000), so storage
    /// servers keep serving reads without a lock from ranges a write lock now covers. Never set
    /// outside a test.
    pub break_invalidate_for_negative_control: bool,
    /// Negative control for tests only: on the migration signal's revoke this server gives its
    /// PR back but stays relaxed (seed 001's switch to strict skipped). Never set outside a test.
    pub break_signal_for_negative_control: bool,
    /// Tests only: a migration's stub is proposed this long after its object is complete (a
    /// migrator held up past its lease). Never set outside a test.
    pub hold_migrate_commit_ms_for_test: Option<u64>,
    /// Negative control for tests only: resync clears the stale marks of degraded writes
    /// without rebuilding their units (issue 16). Never set outside a test.
    pub break_resync_for_negative_control: bool,
}

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env")
            .field("volume_in_memory", &self.volume.is_some())
            .field("break_stale_write_check_for_negative_control", &self.break_stale_write_check_for_negative_control)
            .field("skip_storage_fence_for_negative_control", &self.skip_storage_fence_for_negative_control)
            .field("hold_first_stripe_write_ms_for_test", &self.hold_first_stripe_write_ms_for_test)
            .field("break_invalidate_for_negative_control", &self.break_invalidate_for_negative_control)
            .field("break_signal_for_negative_control", &self.break_signal_for_negative_control)
            .field("hold_migrate_commit_ms_for_test", &self.hold_migrate_commit_ms_for_test)
            .field("break_resync_for_negative_control", &self.break_resync_for_negative_control)
            .finish_non_exhaustive()
    }
}

/// A size in the largest binary unit that divides it evenly (16 TiB, 3 KiB, 5 B).
pub fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut i = 0;
    let mut n = b;
    while n >= 1024 && n.is_multiple_of(1024) && i + 1 < units.len() {
        n /= 1024;
        i += 1;
    }
    format!("{n} {}", units[i])
}
