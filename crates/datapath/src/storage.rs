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

use std::sync::Arc;

use chunks::{Authority, ChunkError, UnitId};
use lockengine::ByteRange;
use tonic::{Request, Response, Status};
use wire::ErrorCode;
use wire::convert::{range_from_pb, unit_id};
use wire::v1 as pb;

use crate::config::MESSAGE_BYTES_MAX;
use crate::errors::chunk_status;
use crate::fencing::Fencing;
use crate::shared::{Shared, stripe_resource};
use crate::volume::{Volume, blocking};

/// The storage service of one server: its units, read and written by every server's gateway.
#[derive(Clone)]
pub struct StorageService {
    shared: Arc<Shared>,
    volume: Volume,
    fencing: Fencing,
}

impl std::fmt::Debug for StorageService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StorageService({})", self.shared.id())
    }
}

impl StorageService {
    pub fn new(volume: Volume, fencing: Fencing) -> StorageService {
        StorageService { shared: volume.shared.clone(), volume, fencing }
    }

    pub fn server(self) -> pb::storage_server::StorageServer<StorageService> {
        pb::storage_server::StorageServer::new(self)
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX)
    }
}

fn parse_token(text: &str) -> Result<token::SignedToken, Status> {
    text.parse().map_err(|e: token::TokenError| ErrorCode::BadToken.status(format!("the token is not valid: {e}")))
}

/// How long a storage server waits for its namespace to show a unit's file (it may lag behind
/// the gateway that created it).
const NAMESPACE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl StorageService {
    /// Checks that `resource`, which the write's token must cover, names the unit's file: its
    /// path, or the stripe lock of the unit's row (`#stripe/FILE/ROW`; such a write must also
    /// carry the client's token for the file's path, `on_behalf_of`). A token for another file
    /// or row then cannot write this unit, whatever the request says.
    async fn check_resource(&self, resource: &str, id: &UnitId) -> Result<(), Status> {
        let locks = &self.shared.locks;
        let names_it =
            || locks.file(resource).is_some_and(|f| f.id == id.file) || stripe_resource(id.file, id.row) == resource;
        let deadline = tokio::time::Instant::now() + NAMESPACE_WAIT;
        let mut applied = self.shared.locks.applied_index();
        loop {
            if names_it() {
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

impl StorageService {
    /// The client's token a write under a stripe lock is made for: signed by the cluster, a
    /// write mode, for the unit's file. Required when `resource` is not the file's own path.
    async fn on_behalf_of(&self, resource: &str, text: &str, id: &UnitId) -> Result<Option<u64>, Status> {
        let own_path = self.shared.locks.file(resource).is_some_and(|f| f.id == id.file);
        if text.is_empty() {
            // The file's own lock, or (a row's repair after an interrupted write) parity the
            // stripe lock's holder recomputed from the data stored: no client's bytes in it.
            let repair = resource == stripe_resource(id.file, id.row) && !matches!(id.role, layout::Role::Data(_));
            if own_path || repair {
                return Ok(None);
            }
            return Err(ErrorCode::Denied.status(format!(
                "a write of unit {} under the stripe lock {resource} must carry the token of the client it is made \
                 for",
                id.name()
            )));
        }
        let token = parse_token(text)?;
        let claims = self.shared.key()?.verify(&token).map_err(|e| chunk_status(ChunkError::BadToken(e)))?;
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
        let mut applied = self.shared.locks.applied_index();
        loop {
            {
                // The ids first: a file that leaves the namespace in between is then still
                // seen live, and refused, rather than taken for an orphan too early.
                let ids = self.shared.locks.file_ids();
                let named = self.shared.locks.file(resource).map(|f| f.id);
                let live = ids.live.contains(&file);
                if named == Some(file) || (!live && file <= ids.last) {
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
                    self.shared.id()
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
        let range = range_from_pb(r.range)?;
        let token = parse_token(&r.token)?;
        self.check_resource(&r.resource, &id).await?;
        let client = self.on_behalf_of(&r.resource, &r.client_token, &id).await?;
        let sessions: Vec<u64> = std::iter::once(token.claims.session.0).chain(client).collect();
        self.volume.admit_change(&sessions).await?;
        let store = self.volume.store()?;
        let expect = r.expect_version_plus_one.checked_sub(1);
        let volume = self.volume.clone();
        let version = blocking(move || {
            let _admitted = volume.gate(&sessions)?;
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
            let range = range_from_pb(r.unlocked_range)?;
            self.shared.check_unlocked_read(&r.unlocked_path, range).await?;
        }
        let store = self.volume.store()?;
        let unit = blocking(move || store.read(&id).map_err(chunk_status)).await?;
        Ok(Response::new(match unit {
            Some(u) => pb::UnitData { found: true, data: u.bytes.into(), version: u.version, covers: u.covers },
            None => pb::UnitData::default(),
        }))
    }

    async fn restore_unit(&self, req: Request<pb::RestoreUnitRequest>) -> Result<Response<pb::WriteUnitReply>, Status> {
        let r = req.into_inner();
        let id = unit_id(r.unit)?;
        let token = parse_token(&r.token)?;
        self.check_resource(&r.resource, &id).await?;
        let sessions = [token.claims.session.0];
        self.volume.admit_change(&sessions).await?;
        let store = self.volume.store()?;
        let version = r.version;
        let volume = self.volume.clone();
        blocking(move || {
            let _admitted = volume.gate(&sessions)?;
            let authority = Authority { resource: &r.resource, range: ByteRange::ALL };
            let unit = chunks::Unit { bytes: r.data.into(), version: r.version, highest_token: 0, covers: r.covers };
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
        self.volume.admit_change(&sessions).await?;
        let store = self.volume.store()?;
        let volume = self.volume.clone();
        let units_deleted = blocking(move || {
            let _admitted = volume.gate(&sessions)?;
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
        self.volume.record_fences(fenced).await?;
        Ok(Response::new(pb::FenceReply {}))
    }

    async fn renew_storage_lease(
        &self,
        req: Request<pb::StorageLeaseRequest>,
    ) -> Result<Response<pb::StorageLeaseReply>, Status> {
        Ok(Response::new(self.fencing.answer_lease(req.into_inner().server).await?))
    }
}
