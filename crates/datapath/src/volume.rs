//! A storage server's volume and what guards it (seed 003): the fence table, recorded durably
//! in the volume, and the storage lease. Every state-changing request passes [`Volume::admit_change`]
//! before it is carried out and [`Volume::gate`] in the task that carries it out. Also the
//! collection of units whose file has left the namespace.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use chunks::{ChunkError, ChunkStore, Device, Fences, UnitId};
use lockengine::SessionId;
use tonic::Status;
use wire::ErrorCode;

use crate::errors::chunk_status;
use crate::lease::{StorageEvent, StorageLease};
use crate::shared::Shared;

/// How long a state-changing request waits for this server to hold its storage lease.
const LEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// This server's volume, its fence table and its storage lease.
#[derive(Clone)]
pub struct Volume {
    pub shared: Arc<Shared>,
    device: Arc<dyn Device>,
    /// Seed 003: the sessions fenced on this volume, recorded durably in it.
    fences: Arc<Fences>,
    /// Seed 003: this server's storage lease, renewed from the leader.
    pub lease: Arc<StorageLease>,
    /// Issue 16: the name this volume was made with (a random number kept in it), `None` for
    /// a volume handed in by the environment (the simulation).
    pub name: Option<u64>,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Volume({})", self.shared.id())
    }
}

/// The volume's name, made at random when the volume is (a new or wiped disk) and kept in it.
fn volume_name(device: &dyn Device) -> std::io::Result<u64> {
    const KEY: &str = "volume";
    if let Some(b) = device.get(KEY).map_err(std::io::Error::other)?
        && let Ok(b) = <[u8; 8]>::try_from(&b[..])
    {
        return Ok(u64::from_le_bytes(b));
    }
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.write_u32(std::process::id());
    let name = h.finish();
    device.put(KEY, &name.to_le_bytes()).map_err(std::io::Error::other)?;
    Ok(name)
}

/// Opens the chunk store of data directory `data`. A `units/` directory of files found by the
/// segment store is moved into it, blob by blob (each durable before the directory goes), so a
/// volume made by an older stripelock keeps its units; a segment volume is not read as files.
fn open_device(data: &std::path::Path, kind: crate::ChunkStoreKind) -> std::io::Result<Arc<dyn Device>> {
    let files = data.join("units");
    let segments = data.join("volume");
    match kind {
        crate::ChunkStoreKind::Files => {
            if segments.join("index.redb").exists() {
                return Err(std::io::Error::other(format!(
                    "{} holds a segment volume; start this server with --chunk-store segments (the default)",
                    segments.display()
                )));
            }
            Ok(Arc::new(chunks::DirDevice::open(&files)?))
        }
        crate::ChunkStoreKind::Segments => {
            let device = chunks::SegDevice::open(&segments)?;
            if files.is_dir() {
                let old = chunks::DirDevice::open(&files)?;
                let names = old.list()?;
                tracing::info!("moving {} blobs of {} into the segment store", names.len(), files.display());
                for name in &names {
                    if let Some(bytes) = old.get(name)? {
                        device.put(name, &bytes)?;
                    }
                }
                std::fs::remove_dir_all(&files)?;
            }
            Ok(Arc::new(device))
        }
    }
}

/// Runs blocking volume work off the async threads.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, Status> + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ErrorCode::Internal.status(format!("storage task failed: {e}")))?
}

impl Volume {
    /// Opens this server's volume (`DATA/volume` or `DATA/units` as configured, or the one the
    /// environment hands in) and loads its fence table.
    pub fn open(shared: Arc<Shared>) -> std::io::Result<Volume> {
        let (device, name): (Arc<dyn Device>, Option<u64>) = match &shared.config.env.volume {
            Some(v) => (v.clone(), None),
            None => {
                let device = open_device(&shared.config.data_dir, shared.config.chunk_store)?;
                let name = volume_name(&*device)?;
                (device, Some(name))
            }
        };
        let fences = Fences::load(&*device).map_err(std::io::Error::other)?;
        Ok(Volume { shared, device, fences: Arc::new(fences), lease: Default::default(), name })
    }

    /// Issue 16: tells the cluster which volume this server runs on, once it has caught up
    /// with the log (`Op::VolumeSeen`). Another volume than the one it was last seen with is
    /// a wiped or replaced disk: every unit on it is then rebuilt by resync, and reads rebuild
    /// them from parity meanwhile.
    pub async fn report_volume(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let Some(name) = self.name else { return };
        let locks = &self.shared.locks;
        loop {
            if *stop.borrow() {
                return;
            }
            if locks.read_barrier().await.is_ok() {
                break;
            }
            tokio::select! {
                _ = stop.changed() => return,
                () = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
            }
        }
        let me = self.shared.id();
        match locks.volume_seen(me) {
            Some(seen) if seen == name => return,
            Some(seen) => tracing::warn!(
                "this server ran on volume {seen:016x} and now runs on {name:016x} (its disk was wiped or \
                 replaced): every unit on it will be rebuilt"
            ),
            None => {}
        }
        for _ in 0..20 {
            match locks.propose(lockservice::Op::VolumeSeen { server: me, volume: name }).await {
                Ok(_) => return,
                Err(e) => tracing::warn!("could not report this server's volume yet: {e}"),
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }

    /// The chunk store with the cluster's key; unavailable until the cluster is bootstrapped.
    pub fn store(&self) -> Result<ChunkStore<Arc<dyn Device>>, Status> {
        Ok(ChunkStore::new(self.device.clone(), self.shared.key()?))
    }

    fn skip_fences(&self) -> bool {
        self.shared.config.env.skip_storage_fence_for_negative_control
    }

    /// Records `fenced` (session, highest token) durably in this volume's fence table, pruning
    /// sessions this server's state shows as ended; answers once it is on disk.
    pub async fn record_fences(&self, fenced: Vec<(u64, u64)>) -> Result<(), Status> {
        if fenced.is_empty() {
            return Ok(());
        }
        let sessions: Vec<u64> = fenced.iter().map(|(s, _)| *s).collect();
        let this = self.clone();
        let record = move || {
            // Ended: known to the state (ids come from one counter), neither live nor still
            // fencing. The storage service refuses their tokens on its own. Still fencing is
            // read first: a session that leaves it in between is kept, not pruned early.
            let ended = {
                let locks = &this.shared.locks;
                let fencing = locks.fencing().sessions;
                let table = this.fences.table();
                table
                    .sessions
                    .keys()
                    .copied()
                    .filter(|s| !fencing.contains(&SessionId(*s)) && locks.session_ended(*s))
                    .collect::<BTreeSet<u64>>()
            };
            this.fences.record(&*this.device, &fenced, |s| ended.contains(&s)).map_err(chunk_status)
        };
        let changed = if sessions.iter().all(|s| self.fences.is_fenced(*s)) {
            false
        } else if self.shared.config.env.volume.is_some() {
            // A volume handed in is memory (tests, the simulation): recorded in place, so a
            // simulated run does not depend on a thread pool's timing and replays exactly.
            record()?
        } else {
            tokio::task::spawn_blocking(record)
                .await
                .map_err(|e| ErrorCode::Internal.status(format!("fence task failed: {e}")))??
        };
        if changed {
            tracing::info!(?sessions, "recorded fences");
        }
        if let Some(observe) = &self.shared.config.env.storage_observer {
            observe(StorageEvent::Fenced { server: self.shared.id(), sessions });
        }
        Ok(())
    }

    /// Waits, up to [`LEASE_WAIT`], until this server holds a valid storage lease (seed 003).
    async fn wait_for_lease(&self) -> Result<(), Status> {
        let deadline = tokio::time::Instant::now() + LEASE_WAIT;
        let mut applied = self.shared.locks.applied_index();
        loop {
            let changed = self.lease.changed();
            if self.lease_valid() {
                return Ok(());
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(ErrorCode::Unavailable.status(format!(
                    "storage server {} holds no storage lease (it has not reached the leader, or has not caught \
                     up with the log, for {} s), so it changes nothing; try again",
                    self.shared.id(),
                    LEASE_WAIT.as_secs()
                )));
            }
            tokio::select! {
                () = changed => {}
                _ = applied.changed() => {}
                () = tokio::time::sleep_until(deadline.min(now + std::time::Duration::from_millis(50))) => {}
            }
        }
    }

    fn lease_valid(&self) -> bool {
        let applied = *self.shared.locks.applied_index().borrow();
        self.lease.valid(tokio::time::Instant::now(), applied)
    }

    /// Refuses tokens of sessions this server's state knows and shows as ended (closed, expired,
    /// fencing, or fenced and acknowledged while this server was away). A session newer than
    /// the state is left to the fence table and the lease.
    fn check_sessions(&self, sessions: &[u64]) -> Result<(), Status> {
        if self.skip_fences() {
            return Ok(());
        }
        match sessions.iter().find(|s| self.shared.locks.session_ended(**s)) {
            Some(&session) => Err(chunk_status(ChunkError::SessionEnded { session })),
            None => Ok(()),
        }
    }

    /// What a state-changing request must pass after its own checks, in its blocking task:
    /// the fence table (held until the change is stored) and the storage lease.
    pub fn gate(&self, sessions: &[u64]) -> Result<chunks::fences::Admitted<'_>, Status> {
        let sessions = if self.skip_fences() { &[] } else { sessions };
        let admitted = self.fences.admit(sessions).map_err(chunk_status)?;
        if !self.lease_valid() {
            return Err(ErrorCode::Unavailable.status(format!(
                "storage server {}'s storage lease ran out while the request waited; try again",
                self.shared.id()
            )));
        }
        Ok(admitted)
    }

    /// The checks every state-changing request passes before it touches the volume.
    pub async fn admit_change(&self, sessions: &[u64]) -> Result<(), Status> {
        self.check_sessions(sessions)?;
        self.wait_for_lease().await?;
        self.check_sessions(sessions)
    }
}

/// The files that units were found of but that the namespace no longer holds: only ids at or
/// below the highest id handed out (ids are never reused, so such a file is gone for good; a
/// higher id may be a file this server has not yet heard of).
pub(crate) fn orphan_files(units: &[UnitId], known: &HashSet<u64>, last_file_id: u64) -> BTreeSet<u64> {
    units.iter().map(|u| u.file).filter(|f| *f <= last_file_id && !known.contains(f)).collect()
}

impl Volume {
    /// Deletes the units of files no longer in the namespace (issue 10: units of a file removed
    /// while this server was down, of a put that failed or was rolled back, stayed for ever).
    /// Every `orphan_grace_ms` it lists its units; a file whose units were orphaned at the last
    /// listing too loses them. A put in flight is safe: its file is in the namespace, and a
    /// unit is stored only once this server's namespace shows its file (`check_resource`).
    pub async fn collect_orphans(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let grace_ms = self.shared.config.orphan_grace_ms;
        if grace_ms == 0 {
            return;
        }
        let mut suspects = BTreeSet::new();
        loop {
            tokio::select! {
                () = tokio::time::sleep(std::time::Duration::from_millis(grace_ms)) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let Ok(store) = self.store() else { continue };
            let Ok(units) = blocking(move || store.units().map_err(chunk_status)).await else { continue };
            let orphans = {
                let ids = self.shared.locks.file_ids();
                orphan_files(&units, &ids.live, ids.last)
            };
            let doomed: Vec<u64> = orphans.intersection(&suspects).copied().collect();
            suspects = orphans;
            if doomed.is_empty() {
                continue;
            }
            let Ok(deleter) = self.store() else { continue };
            let deleted = blocking(move || {
                let mut n = 0;
                for file in doomed {
                    n += deleter.delete_file(file).map_err(chunk_status)?;
                }
                Ok(n)
            })
            .await;
            match deleted {
                Ok(n) => tracing::info!(units = n, "deleted the units of files no longer in the namespace"),
                Err(e) => tracing::warn!("collecting orphan units failed: {}", e.message()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use layout::Role;

    use super::*;

    /// Only files at or below the highest id handed out and missing from the namespace are
    /// orphans: a file this server has not heard of yet (a higher id) keeps its units.
    #[test]
    fn orphans_are_files_gone_from_the_namespace_not_ones_not_yet_seen() {
        let unit = |file, row| UnitId { file, row, role: Role::Data(0) };
        let units = [unit(1, 0), unit(1, 1), unit(2, 0), unit(3, 0), unit(5, 0), unit(9, 0)];
        let known: HashSet<u64> = [2, 5].into_iter().collect();
        assert_eq!(orphan_files(&units, &known, 5), BTreeSet::from([1, 3]));
        assert_eq!(orphan_files(&units, &known, 9), BTreeSet::from([1, 3, 9]));
        assert!(orphan_files(&units, &known, 0).is_empty());
    }
}
