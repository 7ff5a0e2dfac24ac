//! What every part of a server's data path shares: the lock service (through [`Locks`]), the
//! configuration, the counters `status` shows, the lock-free range cache, and one channel per
//! peer server. Also the checks every call starts with: the caller's token, the file, its size.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use lockengine::ByteRange;
use lockservice::FileMeta;
use tonic::Status;
use tonic::transport::Channel;
use wire::ErrorCode;
use wire::v1 as pb;
use wire::v1::files_client::FilesClient;
use wire::v1::storage_client::StorageClient;

use crate::config::{Config, MESSAGE_BYTES_MAX, human_bytes};
use crate::lockcache::LockFreeCache;
use crate::locks::Locks;

/// A server's data path, shared by its services and duties.
pub struct Shared {
    pub locks: Arc<dyn Locks>,
    pub config: Config,
    pub stats: DataStats,
    /// Seed 000: ranges of files this server knows are free of write locks.
    pub lock_free: Mutex<LockFreeCache>,
    channels: Mutex<HashMap<u64, Channel>>,
    /// The secondary tier, or why it cannot be opened.
    tier: Result<tier::Tier, tier::TierError>,
    /// Seed 001: relaxed or strict file metadata (`signal.rs`).
    pub meta_mode: MetaMode,
    /// Seed 001: files this server is recalling in the background after a read.
    pub recalling: Mutex<std::collections::HashSet<u64>>,
    /// The members whose storage answered when last asked, and when that was.
    up: Mutex<Option<(tokio::time::Instant, std::collections::BTreeSet<u64>)>>,
}

/// How long a member's storage may take to answer before a new file is placed elsewhere.
const PROBE: std::time::Duration = std::time::Duration::from_millis(500);
/// How long the answer is remembered.
const PROBE_KEPT: std::time::Duration = std::time::Duration::from_secs(1);

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataPath({})", self.locks.id())
    }
}

/// Counters of the data path since the server started, for `status`.
#[derive(Debug, Default)]
pub struct DataStats {
    /// Stripe writes carried out here, delegated elsewhere by this gateway, and dropped here
    /// because the lock they were written under was gone.
    pub stripe_writes: AtomicU64,
    pub stripe_writes_delegated: AtomicU64,
    pub stripe_writes_dropped: AtomicU64,
    /// Stripe writes scheduled or running here now.
    pub stripe_load: AtomicU32,
    /// Seed 001: bytes read from the secondary tier for readers of stubs, and files migrated
    /// and recalled through this server.
    pub tier_bytes_read: AtomicU64,
    /// Bytes read from the tier to stripe rows of stubs again (partial recalls), and the rows.
    pub tier_bytes_recalled: AtomicU64,
    pub tier_rows_recalled: AtomicU64,
    pub migrated: AtomicU64,
    pub recalled: AtomicU64,
    /// Seed 000: invalidations received, and lock-free ranges cached now.
    pub invalidations_received: AtomicU64,
    pub lock_free_ranges: AtomicU64,
    /// Seed 000, on the leader: invalidations sent.
    pub invalidations_sent: AtomicU64,
    /// Seed 003, as of the last admission: writes in flight, the most the lease admitted, and
    /// the worst recent write time (ms).
    pub writes_in_flight: AtomicU32,
    pub writes_admitted_max: AtomicU32,
    pub worst_write_ms: AtomicU64,
    /// Issue 16, on the leader: rows and bytes resync rebuilt, rows it could not yet, its
    /// measured rate (bytes/s) and the time left at that rate (ms).
    pub resync_rows_done: AtomicU64,
    pub resync_bytes: AtomicU64,
    pub resync_rows_failed: AtomicU64,
    pub resync_rate: AtomicU64,
    pub resync_eta_ms: AtomicU64,
}

impl DataStats {
    /// Fills in the data path's fields of a `status` reply.
    pub fn fill(&self, reply: &mut pb::StatusReply) {
        use std::sync::atomic::Ordering::Relaxed;
        reply.stripe_writes = self.stripe_writes.load(Relaxed);
        reply.stripe_writes_delegated = self.stripe_writes_delegated.load(Relaxed);
        reply.stripe_writes_dropped = self.stripe_writes_dropped.load(Relaxed);
        reply.stripe_load = self.stripe_load.load(Relaxed);
        reply.invalidations_received = self.invalidations_received.load(Relaxed);
        reply.lock_free_ranges = self.lock_free_ranges.load(Relaxed);
        reply.invalidations_sent = self.invalidations_sent.load(Relaxed);
        reply.writes_in_flight = self.writes_in_flight.load(Relaxed);
        reply.writes_admitted_max = self.writes_admitted_max.load(Relaxed);
        reply.worst_write_ms = self.worst_write_ms.load(Relaxed);
        reply.tier_bytes_read = self.tier_bytes_read.load(Relaxed);
        reply.tier_bytes_recalled = self.tier_bytes_recalled.load(Relaxed);
        reply.tier_rows_recalled = self.tier_rows_recalled.load(Relaxed);
        reply.files_migrated = self.migrated.load(Relaxed);
        reply.files_recalled = self.recalled.load(Relaxed);
        reply.resync_rows_done = self.resync_rows_done.load(Relaxed);
        reply.resync_bytes = self.resync_bytes.load(Relaxed);
        reply.resync_rows_failed = self.resync_rows_failed.load(Relaxed);
        reply.resync_rate = self.resync_rate.load(Relaxed);
        reply.resync_eta_ms = self.resync_eta_ms.load(Relaxed);
    }
}

/// The resource of a stripe row's lock: named by the file's id, not its path, so a rename
/// does not give the same row a second lock whose tokens are not ordered with the first's
/// (issue 13: a row written under one name refused the other name's older token).
pub use lockservice::stripe_resource;

impl Shared {
    pub fn new(locks: Arc<dyn Locks>, config: Config) -> Shared {
        let lock_free = LockFreeCache::with_capacity(config.limits.lock_free_ranges_max);
        let tier = config.tier.open();
        if let Err(e) = &tier {
            tracing::warn!("no secondary tier: {e}");
        }
        Shared {
            locks,
            config,
            stats: DataStats::default(),
            lock_free: Mutex::new(lock_free),
            channels: Mutex::new(HashMap::new()),
            tier,
            meta_mode: MetaMode::default(),
            recalling: Mutex::new(std::collections::HashSet::new()),
            up: Mutex::new(None),
        }
    }

    /// The members whose storage answers now (issue 16: new files are placed on servers that
    /// are up): each is asked for a unit no file has, and any answer counts, within [`PROBE`].
    /// Remembered for [`PROBE_KEPT`].
    pub async fn up_members(&self) -> std::collections::BTreeSet<u64> {
        if let Some((at, up)) = self.up.lock().expect("up").as_ref()
            && at.elapsed() < PROBE_KEPT
        {
            return up.clone();
        }
        let ids: Vec<u64> = self.locks.members().keys().copied().collect();
        let asks = ids.iter().map(|&id| async move {
            let Ok(mut c) = self.storage(id) else { return None };
            let nothing = chunks::UnitId { file: 0, row: 0, role: layout::Role::P };
            let req = pb::ReadUnitRequest { unit: Some(wire::convert::unit_ref(&nothing)), ..Default::default() };
            match tokio::time::timeout(PROBE, c.read_unit(req)).await {
                Ok(Ok(_)) => Some(id),
                // A refusal is an answer; a transport failure is not.
                Ok(Err(e)) if wire::refusal_of(&e).is_ok() && e.code() != tonic::Code::Unavailable => Some(id),
                _ => None,
            }
        });
        let up: std::collections::BTreeSet<u64> = futures::future::join_all(asks).await.into_iter().flatten().collect();
        *self.up.lock().expect("up") = Some((tokio::time::Instant::now(), up.clone()));
        up
    }

    pub fn id(&self) -> u64 {
        self.locks.id()
    }

    /// Waits until this server has applied entry `index` (so its reads show it).
    pub async fn applied(&self, index: u64) {
        let mut rx = self.locks.applied_index();
        let _ = rx.wait_for(|i| *i >= index).await;
    }

    /// The channel to server `server` (made once, then shared).
    fn channel(&self, server: u64) -> Result<Channel, Status> {
        if let Some(c) = self.channels.lock().expect("channels").get(&server) {
            return Ok(c.clone());
        }
        let addr = self.locks.members().get(&server).ok_or_else(|| {
            ErrorCode::Internal.status(format!("server {server} of the layout is not in this cluster"))
        })?;
        let channel = self.locks.connector().channel(addr).map_err(|e| ErrorCode::Unavailable.status(e.to_string()))?;
        self.channels.lock().expect("channels").insert(server, channel.clone());
        Ok(channel)
    }

    /// The storage service of server `server`.
    pub fn storage(&self, server: u64) -> Result<StorageClient<Channel>, Status> {
        Ok(StorageClient::new(self.channel(server)?)
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX))
    }

    /// The files service of another server (to delegate stripe writes to it, to ask the leader).
    pub fn peer(&self, server: u64) -> Result<FilesClient<Channel>, Status> {
        Ok(FilesClient::new(self.channel(server)?)
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX))
    }

    /// The cluster's key; unavailable until the cluster is bootstrapped.
    pub fn key(&self) -> Result<token::ClusterKey, Status> {
        let secret = self.locks.secret().ok_or_else(|| {
            ErrorCode::Unavailable.status("the cluster is still starting (it has no secret yet); try again in a moment")
        })?;
        Ok(token::ClusterKey::from_bytes(secret))
    }

    /// The claims of the caller's token, checked: signed by this cluster, for a lock on `path`.
    pub fn claims(&self, path: &str, text: &str) -> Result<token::Claims, Status> {
        let key = self.key()?;
        let signed: token::SignedToken =
            text.parse().map_err(|e: token::TokenError| ErrorCode::BadToken.status(format!("no valid token: {e}")))?;
        let claims =
            key.verify(&signed).map_err(|e| ErrorCode::BadToken.status(format!("the token is not valid: {e}")))?;
        if claims.resource != path {
            return Err(
                ErrorCode::Denied.status(format!("the token is for a lock on {}, not on {path}", claims.resource))
            );
        }
        Ok(claims)
    }

    /// Checks the caller's token for `path` (for writing: EX or PW on the whole file).
    pub fn check_token(&self, path: &str, text: &str, write: bool) -> Result<(), Status> {
        let claims = self.claims(path, text)?;
        if write && (!claims.mode.is_write() || !claims.range.contains(ByteRange::ALL)) {
            return Err(ErrorCode::Denied.status(format!(
                "writing {path} needs EX (or PW) on the whole file; the token is for {} {}",
                claims.mode, claims.range
            )));
        }
        Ok(())
    }

    /// Refuses to make `path` `end` bytes long past the largest file this server allows.
    /// Refuses `adding` bytes to file `id`'s owner, or for a new file (`id` None) to its
    /// creator `identity`, past the owner's bytes-stored quota (issue 15). `what` says what
    /// would add them, for the error.
    pub fn admit_bytes(&self, id: Option<u64>, identity: &str, adding: u64, what: &str) -> Result<(), Status> {
        let max = self.locks.bytes_quota();
        if max.is_none() || adding == 0 {
            return Ok(());
        }
        let (owner, stored) = match id {
            // A file nobody's certificate created counts for nobody.
            Some(id) => match self.locks.owner_of(id) {
                Some(owned) => owned,
                None => return Ok(()),
            },
            None => (identity.to_string(), self.locks.stored_bytes(identity)),
        };
        lockservice::quota::admit_bytes(&owner, stored, adding, max, what).map_err(|e| {
            metrics::counter!("stripelock_quota_refusals_total").increment(1);
            ErrorCode::Quota.status(e.to_string())
        })
    }

    pub fn check_file_size(&self, path: &str, end: u64) -> Result<(), Status> {
        let max = self.config.limits.file_bytes_max;
        if end > max {
            return Err(ErrorCode::TooLarge.status(format!(
                "{path} would be {end} bytes long, past the largest file this cluster allows, {max} bytes ({}); \
                 the limit is the servers' file_bytes_max",
                human_bytes(max)
            )));
        }
        Ok(())
    }

    pub fn file(&self, path: &str) -> Result<FileMeta, Status> {
        self.locks.file(path).ok_or_else(|| ErrorCode::NotFound.status(format!("no such file: {path}")))
    }

    /// The file at `path`, which must be striped (not a stub on the secondary tier): what
    /// writes, scrubs and rebuilds of its units need.
    pub fn striped_file(&self, path: &str) -> Result<FileMeta, Status> {
        let f = self.file(path)?;
        if self.locks.stub(f.id).is_some() {
            return Err(ErrorCode::Conflict.status(format!(
                "{path} is on the secondary tier (a stub); `stripelock recall {path}` stripes it again"
            )));
        }
        Ok(f)
    }

    /// The secondary tier.
    pub fn tier(&self) -> Result<&tier::Tier, Status> {
        self.tier.as_ref().map_err(|e| ErrorCode::Unavailable.status(format!("this server has no secondary tier: {e}")))
    }
}

/// Seed 001: this server's file metadata mode (relaxed while it holds the migration signal,
/// `signal.rs`) and what strict mode has cost.
#[derive(Debug, Default)]
pub struct MetaMode {
    relaxed: AtomicBool,
    /// Reads that re-validated with the leader (strict mode).
    round_trips: AtomicU64,
}

impl MetaMode {
    pub fn relaxed(&self) -> bool {
        self.relaxed.load(Ordering::SeqCst)
    }

    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    pub(crate) fn count_round_trip(&self) {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn set(&self, relaxed: bool) {
        if self.relaxed.swap(relaxed, Ordering::SeqCst) != relaxed {
            tracing::info!("file metadata: {} mode", if relaxed { "relaxed" } else { "strict" });
        }
    }
}
