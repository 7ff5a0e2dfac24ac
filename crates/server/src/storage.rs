//! The storage service: this server's stripe units (its data volume), read and written by the
//! gateways of every server. Every write is checked by the chunk store against the fencing token
//! it carries, signed with the replicated cluster secret.
//!
//! Every state-changing request (write, restore, delete) is admitted only while this server
//! holds its storage lease, and refused if a token it carries (its own, and for a write under a
//! stripe lock the client's it is made for) belongs to a session in the volume's fence table or
//! one this server's state shows as ended (seed 003; see `fencing.rs`). A delete is bound to its
//! file like a write: its token's resource must name the file, unless the file has already left
//! the namespace (its units are then orphans, collected anyway).

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};

use chunks::{Authority, ChunkError, ChunkStore, Device, Fences, UnitId};
use layout::Role;
use lockengine::ByteRange;
use tonic::{Request, Response, Status};
use wire::ErrorCode;
use wire::v1 as pb;

use crate::fencing::{LeaderLeases, StorageLease};
use crate::files::FilesService;
use crate::node::Node;

/// Largest unit message (a 64 MiB stripe unit and its header).
pub const MESSAGE_BYTES_MAX: usize = (64 << 20) + (1 << 20);

#[derive(Clone)]
pub struct StorageService {
    pub(crate) node: Node,
    pub(crate) volume: Arc<dyn Device>,
    /// For reads without a lock: this server's gateway asks the leader (seed 000).
    pub(crate) files: FilesService,
    /// Seed 003: the sessions fenced on this volume, recorded durably in it.
    pub(crate) fences: Arc<Fences>,
    /// Seed 003: this server's storage lease, renewed from the leader.
    pub(crate) lease: Arc<StorageLease>,
    /// Seed 003, while this server leads: the storage leases it granted and the fences
    /// acknowledged.
    pub(crate) leader: Arc<Mutex<LeaderLeases>>,
}

impl std::fmt::Debug for StorageService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StorageService({})", self.node.id)
    }
}

pub fn unit_id(u: Option<pb::UnitRef>) -> Result<UnitId, Status> {
    let u = u.ok_or_else(|| ErrorCode::BadRequest.status("no unit named"))?;
    let role = match (u.role, u8::try_from(u.index)) {
        (0, Ok(j)) if j < layout::DATA_MAX => Role::Data(j),
        (1, _) => Role::P,
        (2, _) => Role::Q,
        _ => return Err(ErrorCode::BadRequest.status(format!("unit role {} index {} is not valid", u.role, u.index))),
    };
    Ok(UnitId { file: u.file, row: u.row, role })
}

pub fn unit_ref(id: &UnitId) -> pb::UnitRef {
    let (role, index) = match id.role {
        Role::Data(j) => (0, j as u32),
        Role::P => (1, 0),
        Role::Q => (2, 0),
    };
    pb::UnitRef { file: id.file, row: id.row, role, index }
}

/// The wire code of a chunk store refusal.
pub fn chunk_code(e: &ChunkError) -> ErrorCode {
    match e {
        ChunkError::BadToken(_) => ErrorCode::BadToken,
        ChunkError::NotWriter(_) | ChunkError::NotCovered { .. } => ErrorCode::Denied,
        ChunkError::Stale { .. } => ErrorCode::StaleToken,
        ChunkError::Fenced { .. } | ChunkError::SessionEnded { .. } => ErrorCode::Fenced,
        ChunkError::VersionMismatch { .. } => ErrorCode::VersionMismatch,
        ChunkError::Corrupt { .. } | ChunkError::Format { .. } | ChunkError::FencesFormat { .. } => ErrorCode::Corrupt,
        ChunkError::Io(_) => ErrorCode::Unavailable,
    }
}

pub fn chunk_status(e: ChunkError) -> Status {
    chunk_code(&e).status(e.to_string())
}

impl StorageService {
    pub fn new(node: Node, files: FilesService) -> std::io::Result<StorageService> {
        let volume: Arc<dyn Device> = match &node.config.env.volume {
            Some(v) => v.clone(),
            None => Arc::new(chunks::DirDevice::open(&node.config.data_dir.join("units"))?),
        };
        let fences = Fences::load(&*volume).map_err(std::io::Error::other)?;
        Ok(StorageService {
            node,
            volume,
            files,
            fences: Arc::new(fences),
            lease: Default::default(),
            leader: Default::default(),
        })
    }

    pub fn server(self) -> pb::storage_server::StorageServer<StorageService> {
        pb::storage_server::StorageServer::new(self)
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX)
    }

    /// The chunk store with the cluster's key; unavailable until the cluster is bootstrapped.
    fn store(&self) -> Result<ChunkStore<Arc<dyn Device>>, Status> {
        let secret = self.node.machine.state().secret.ok_or_else(|| {
            ErrorCode::Unavailable.status("the cluster has no secret yet (it is still starting); try again in a moment")
        })?;
        Ok(ChunkStore::new(self.volume.clone(), token::ClusterKey::from_bytes(secret)))
    }
}

/// How long units of a removed file stay before they are collected, unless configured.
pub const ORPHAN_GRACE_MS_DEFAULT: u64 = 60_000;

/// The files that units were found of but that the namespace no longer holds: only ids at or
/// below the highest id handed out (ids are never reused, so such a file is gone for good; a
/// higher id may be a file this server has not yet heard of).
pub(crate) fn orphan_files(units: &[UnitId], known: &HashSet<u64>, last_file_id: u64) -> BTreeSet<u64> {
    units.iter().map(|u| u.file).filter(|f| *f <= last_file_id && !known.contains(f)).collect()
}

impl StorageService {
    /// Deletes the units of files no longer in the namespace (issue 10: units of a file removed
    /// while this server was down, of a put that failed or was rolled back, stayed for ever).
    /// Every `orphan_grace_ms` it lists its units; a file whose units were orphaned at the last
    /// listing too loses them. A put in flight is safe: its file is in the namespace, and a
    /// unit is stored only once this server's namespace shows its file (`check_resource`).
    pub async fn collect_orphans(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let grace_ms = self.node.config.orphan_grace_ms;
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
                let state = self.node.machine.state();
                let known: HashSet<u64> = state.files.values().map(|f| f.id).collect();
                orphan_files(&units, &known, state.last_file_id())
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

/// How long a storage server waits for its namespace to show a unit's file (it may lag behind
/// the gateway that created it).
const NAMESPACE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl StorageService {
    /// Checks that `resource`, which the write's token must cover, names the unit's file: its
    /// path, or the stripe lock of the unit's row (`PATH#FILE/ROW`). A token for another file or
    /// row then cannot write this unit, whatever the request says.
    async fn check_resource(&self, resource: &str, id: &UnitId) -> Result<(), Status> {
        let stripe_of = |path: &str| crate::write::stripe_resource(path, id.file, id.row);
        let names_it = |state: &crate::machine::State| {
            state.files.get(resource).is_some_and(|f| f.id == id.file)
                || resource.rsplit_once('#').is_some_and(|(path, _)| {
                    state.files.get(path).is_some_and(|f| f.id == id.file) && stripe_of(path) == resource
                })
        };
        let deadline = tokio::time::Instant::now() + NAMESPACE_WAIT;
        let mut applied = self.node.machine.applied_index();
        loop {
            if names_it(&self.node.machine.state()) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline
                || tokio::time::timeout_at(deadline, applied.changed()).await.is_err()
            {
                return Err(ErrorCode::Denied.status(format!(
                    "{resource} is neither the path of file {} nor the stripe lock of its row {}: a token for it \
                     cannot write unit {}",
                    id.file,
                    id.row,
                    id.name()
                )));
            }
        }
    }
}

fn parse_token(text: &str) -> Result<token::SignedToken, Status> {
    text.parse().map_err(|e: token::TokenError| ErrorCode::BadToken.status(format!("the token is not valid: {e}")))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, Status> + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ErrorCode::Internal.status(format!("storage task failed: {e}")))?
}

/// How long a state-changing request waits for this server to hold its storage lease.
const LEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl StorageService {
    /// Waits, up to [`LEASE_WAIT`], until this server holds a valid storage lease (seed 003).
    async fn wait_for_lease(&self) -> Result<(), Status> {
        let deadline = tokio::time::Instant::now() + LEASE_WAIT;
        let mut applied = self.node.machine.applied_index();
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
                    self.node.id,
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
        let applied = *self.node.machine.applied_index().borrow();
        self.lease.valid(tokio::time::Instant::now(), applied)
    }

    /// Refuses tokens of sessions this server's state knows and shows as ended (closed, expired,
    /// fencing, or fenced and acknowledged while this server was away). A session newer than
    /// the state is left to the fence table and the lease.
    fn check_sessions(&self, sessions: &[u64]) -> Result<(), Status> {
        if self.node.config.env.skip_storage_fence_for_negative_control {
            return Ok(());
        }
        let state = self.node.machine.state();
        for &s in sessions {
            if s <= state.next_session && !state.engine.session_is_live(lockengine::SessionId(s)) {
                return Err(chunk_status(ChunkError::SessionEnded { session: s }));
            }
        }
        Ok(())
    }

    /// What a state-changing request must pass after its own checks, in its blocking task:
    /// the fence table (held until the change is stored) and the storage lease.
    fn gate(&self, sessions: &[u64]) -> Result<chunks::fences::Admitted<'_>, Status> {
        let sessions = if self.node.config.env.skip_storage_fence_for_negative_control { &[] } else { sessions };
        let admitted = self.fences.admit(sessions).map_err(chunk_status)?;
        if !self.lease_valid() {
            return Err(ErrorCode::Unavailable.status(format!(
                "storage server {}'s storage lease ran out while the request waited; try again",
                self.node.id
            )));
        }
        Ok(admitted)
    }

    /// The checks every state-changing request passes before it touches the volume.
    async fn admit_change(&self, sessions: &[u64]) -> Result<(), Status> {
        self.check_sessions(sessions)?;
        self.wait_for_lease().await?;
        self.check_sessions(sessions)
    }

    /// The client's token a write under a stripe lock is made for: signed by the cluster, a
    /// write mode, for the unit's file. Required when `resource` is not the file's own path.
    async fn on_behalf_of(&self, resource: &str, text: &str, id: &UnitId) -> Result<Option<u64>, Status> {
        let own_path = self.node.machine.state().files.get(resource).is_some_and(|f| f.id == id.file);
        if text.is_empty() {
            if own_path {
                return Ok(None);
            }
            return Err(ErrorCode::Denied.status(format!(
                "a write of unit {} under the stripe lock {resource} must carry the token of the client it is made \
                 for",
                id.name()
            )));
        }
        let token = parse_token(text)?;
        let claims = self.store()?.key().verify(&token).map_err(|e| chunk_status(ChunkError::BadToken(e)))?;
        if !claims.mode.is_write() {
            return Err(chunk_status(ChunkError::NotWriter(claims.mode)));
        }
        self.check_resource(&claims.resource, id).await?;
        Ok(Some(claims.session.0))
    }

    /// Checks that a delete's `resource` names `file`: its path, while the file is in the
    /// namespace. Once it has left it (a remove is applied before its units are deleted) its
    /// units are orphans, which any valid token may have deleted, as the collector would.
    async fn check_delete_resource(&self, resource: &str, file: u64) -> Result<(), Status> {
        let deadline = tokio::time::Instant::now() + NAMESPACE_WAIT;
        let mut applied = self.node.machine.applied_index();
        loop {
            {
                let state = self.node.machine.state();
                let named = state.files.get(resource).map(|f| f.id);
                let live = state.files.values().any(|f| f.id == file);
                if named == Some(file) || (!live && file <= state.last_file_id()) {
                    return Ok(());
                }
                if live {
                    return Err(ErrorCode::Denied.status(format!(
                        "the token is for {resource}, which does not name file {file}: it cannot delete that file's \
                         units"
                    )));
                }
            }
            if tokio::time::Instant::now() >= deadline
                || tokio::time::timeout_at(deadline, applied.changed()).await.is_err()
            {
                return Err(ErrorCode::Denied.status(format!(
                    "file {file} is not known to storage server {} yet: {resource}'s token cannot delete it",
                    self.node.id
                )));
            }
        }
    }
}

#[tonic::async_trait]
impl pb::storage_server::Storage for StorageService {
    async fn write_unit(&self, req: Request<pb::WriteUnitRequest>) -> Result<Response<pb::WriteUnitReply>, Status> {
        let r = req.into_inner();
        let id = unit_id(r.unit)?;
        let range = r.range.ok_or_else(|| ErrorCode::BadRequest.status("no range"))?;
        let range = ByteRange::new(range.start, range.end).map_err(|e| ErrorCode::BadRequest.status(e.to_string()))?;
        let token = parse_token(&r.token)?;
        self.check_resource(&r.resource, &id).await?;
        let client = self.on_behalf_of(&r.resource, &r.client_token, &id).await?;
        let sessions: Vec<u64> = std::iter::once(token.claims.session.0).chain(client).collect();
        self.admit_change(&sessions).await?;
        let store = self.store()?;
        let expect = r.expect_version_plus_one.checked_sub(1);
        let this = self.clone();
        let version = blocking(move || {
            let _admitted = this.gate(&sessions)?;
            let authority = Authority { resource: &r.resource, range };
            store.write(&id, authority, &token, &r.data, &r.covers, expect).map_err(chunk_status)
        })
        .await?;
        Ok(Response::new(pb::WriteUnitReply { version }))
    }

    async fn read_unit(&self, req: Request<pb::ReadUnitRequest>) -> Result<Response<pb::UnitData>, Status> {
        let r = req.into_inner();
        let id = unit_id(r.unit)?;
        if !r.unlocked_path.is_empty() {
            let range =
                r.unlocked_range.ok_or_else(|| ErrorCode::BadRequest.status("an unlocked read needs its range"))?;
            let range =
                ByteRange::new(range.start, range.end).map_err(|e| ErrorCode::BadRequest.status(e.to_string()))?;
            self.files.check_unlocked_read(&r.unlocked_path, range).await?;
        }
        let store = self.store()?;
        let unit = blocking(move || store.read(&id).map_err(chunk_status)).await?;
        Ok(Response::new(match unit {
            Some(u) => pb::UnitData { found: true, data: u.bytes, version: u.version, covers: u.covers },
            None => pb::UnitData::default(),
        }))
    }

    async fn restore_unit(&self, req: Request<pb::RestoreUnitRequest>) -> Result<Response<pb::WriteUnitReply>, Status> {
        let r = req.into_inner();
        let id = unit_id(r.unit)?;
        let token = parse_token(&r.token)?;
        self.check_resource(&r.resource, &id).await?;
        let sessions = [token.claims.session.0];
        self.admit_change(&sessions).await?;
        let store = self.store()?;
        let version = r.version;
        let this = self.clone();
        blocking(move || {
            let _admitted = this.gate(&sessions)?;
            let authority = Authority { resource: &r.resource, range: ByteRange::ALL };
            let unit = chunks::Unit { bytes: r.data, version: r.version, highest_token: 0, covers: r.covers };
            store.repair(&id, authority, &token, unit).map_err(chunk_status)
        })
        .await?;
        Ok(Response::new(pb::WriteUnitReply { version }))
    }

    async fn delete_file(&self, req: Request<pb::DeleteFileRequest>) -> Result<Response<pb::DeleteFileReply>, Status> {
        let r = req.into_inner();
        let token = parse_token(&r.token)?;
        self.check_delete_resource(&r.resource, r.file).await?;
        let sessions = [token.claims.session.0];
        self.admit_change(&sessions).await?;
        let store = self.store()?;
        let this = self.clone();
        let units_deleted = blocking(move || {
            let _admitted = this.gate(&sessions)?;
            store
                .check_token(Authority { resource: &r.resource, range: ByteRange::ALL }, &token)
                .map_err(chunk_status)?;
            store.delete_file(r.file).map_err(chunk_status)
        })
        .await?;
        Ok(Response::new(pb::DeleteFileReply { units_deleted }))
    }

    async fn fence(&self, req: Request<pb::FenceRequest>) -> Result<Response<pb::FenceReply>, Status> {
        let fenced: Vec<(u64, u64)> = req.into_inner().sessions.iter().map(|s| (s.session, s.highest_token)).collect();
        self.record_fences(fenced).await?;
        Ok(Response::new(pb::FenceReply {}))
    }

    async fn renew_storage_lease(
        &self,
        req: Request<pb::StorageLeaseRequest>,
    ) -> Result<Response<pb::StorageLeaseReply>, Status> {
        Ok(Response::new(self.answer_lease(req.into_inner().server).await?))
    }
}

#[cfg(test)]
mod tests {
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
