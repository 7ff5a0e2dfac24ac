//! The striped data path of a server: files put, read, written at an offset, scrubbed and
//! rebuilt through any server (its files service, the gateway), each server's stripe units on
//! its volume (its storage service), and the duties that keep them safe: fences and storage
//! leases (seed 003), lock-free reads and their invalidation (seed 000), stripe writes under
//! stripe locks, delegated by load (seed 004), collection of orphan units.
//!
//! It reaches the lock service only through [`Locks`]; the server's wiring implements it.
//! Pure parts (admission, delegation, the lock-free cache, lease state) take time as input.

mod admission;
mod config;
mod delegation;
mod errors;
mod fencing;
mod files;
mod lease;
mod lockcache;
mod locks;
mod names;
mod progress;
mod resync;
mod shared;
mod signal;
mod storage;
mod tiering;
mod units;
mod unlocked;
mod volume;
mod write;

use std::sync::Arc;

pub use config::{
    ChunkStoreKind, Config, DEFAULT_UNIT, Env, FILE_BYTES_MAX_DEFAULT, Limits, MESSAGE_BYTES_MAX,
    ORPHAN_GRACE_MS_DEFAULT, RESYNC_BYTES_PER_S_DEFAULT, UnknownChunkStore, WRITE_BYTES_MAX, human_bytes,
};
pub use errors::{chunk_code, row_code};
pub use lease::{STORAGE_LEASE_MS_DEFAULT, StorageEvent};
pub use locks::{Fencing, FileIds, Leadership, Locks};
pub use shared::{DataStats, stripe_resource};
pub use signal::SIGNAL_RESOURCE;

use fencing::Fencing as FenceDuties;
use files::FilesService;
use shared::Shared;
use storage::StorageService;
use volume::Volume;

/// A server's data path, assembled: its two gRPC services and its duties.
#[derive(Debug)]
pub struct DataPath {
    shared: Arc<Shared>,
    files: FilesService,
    storage: StorageService,
    volume: Volume,
    fencing: FenceDuties,
}

impl DataPath {
    /// Opens the volume and sets up the services over `locks`.
    pub fn open(locks: Arc<dyn Locks>, config: Config) -> std::io::Result<DataPath> {
        let shared = Arc::new(Shared::new(locks, config));
        let volume = Volume::open(shared.clone())?;
        let fencing = FenceDuties::new(volume.clone());
        let storage = StorageService::new(volume.clone(), fencing.clone());
        let files = FilesService::new(shared.clone());
        Ok(DataPath { shared, files, storage, volume, fencing })
    }

    /// Starts the duties: invalidations while leading, the storage lease, fences while leading,
    /// and the collection of orphan units when configured. Each stops when `stop` turns true
    /// (the invalidations with the lock service's queue).
    pub fn start_duties(&self, stop: &tokio::sync::watch::Receiver<bool>) {
        self.shared.start_invalidations();
        // Not even spawned when off: the simulation's seeds replay only with the same tasks.
        if self.shared.config.orphan_grace_ms > 0 {
            tokio::spawn(self.volume.clone().collect_orphans(stop.clone()));
        }
        tokio::spawn(self.fencing.clone().renew_storage_lease(stop.clone()));
        tokio::spawn(self.fencing.clone().fence_duties(stop.clone()));
        tokio::spawn(self.volume.clone().report_volume(stop.clone()));
        tokio::spawn(resync::run(self.shared.clone(), self.files.stripes(), stop.clone()));
        if self.shared.config.migration_signal {
            tokio::spawn(signal::hold(self.shared.clone(), stop.clone()));
        }
    }

    pub fn files_server(&self) -> wire::v1::files_server::FilesServer<FilesService> {
        self.files.clone().server()
    }

    pub fn storage_server(&self) -> wire::v1::storage_server::StorageServer<StorageService> {
        self.storage.clone().server()
    }

    /// The data path's counters, as `status` shows them.
    pub fn stats(&self) -> Arc<dyn Fn(&mut wire::v1::StatusReply) + Send + Sync> {
        let shared = self.shared.clone();
        Arc::new(move |reply| {
            shared.stats.fill(reply);
            reply.file_bytes_max = shared.config.limits.file_bytes_max;
            reply.metadata_relaxed = shared.meta_mode.relaxed();
            reply.metadata_round_trips = shared.meta_mode.round_trips();
            reply.stale_rows = shared.locks.stale_rows();
            reply.wiped_servers = shared.locks.wiped().into_iter().collect();
        })
    }
}
