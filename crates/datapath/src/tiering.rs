//! Seed 001 on the data path (issue 14): a file's bytes copied to the secondary tier and
//! committed as a stub, read from the tier while stubbed, and striped again by a recall. The
//! rows themselves are read and written by the Files service (`files.rs`), which hands them here.
//!
//! Seed 003 applied to the tier: the object store cannot check fencing tokens, so the copy is
//! made only under the migrator's write lock on the whole file, and the stub is committed by a
//! conditional log entry (`Op::Migrated`) that the state machine refuses once that lock no
//! longer holds. A migrator paused past its lease leaves at most an object no stub names
//! (`tier gc` removes it), never a stub naming a partial object: the object is complete and
//! hashed before the entry is proposed.

use bytes::Bytes;
use futures::{Stream, StreamExt};
use layout::stripe::{StoredUnit, UnitWrite, encode_row};
use lockservice::{FileMeta, Op, RowSet, Stub};
use tier::{Tier, TierError};
use tokio::sync::mpsc;
use tonic::Status;
use wire::ErrorCode;
use wire::v1 as pb;

use crate::shared::Shared;

/// Bytes one read of a stub asks the tier for at a time.
pub const READ_PIECE: u64 = 8 << 20;

pub fn tier_status(e: TierError) -> Status {
    let code = match &e {
        TierError::Missing { .. } => ErrorCode::NotFound,
        TierError::Size { .. }
        | TierError::Checksum { .. }
        | TierError::RowChecksum { .. }
        | TierError::RowSums { .. } => ErrorCode::Corrupt,
        TierError::Store { .. } | TierError::Open { .. } => ErrorCode::Unavailable,
    };
    code.status(e.to_string())
}

fn hex(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Copies `f`'s bytes (`rows`, in order, each cut to the file's end) to the tier under a key of
/// this attempt (the lock's token), with each row's crc32c beside it, then commits the stub.
/// On any failure the object is deleted and the file stays striped as it was.
pub async fn migrate(
    shared: &Shared,
    path: &str,
    f: &FileMeta,
    lock_token: u64,
    mut rows: impl Stream<Item = Result<Bytes, Status>> + Unpin,
) -> Result<Stub, Status> {
    let tier = shared.tier()?;
    let key = Tier::key(f.id, lock_token);
    let copied = async {
        let mut w = tier.writer(&key).await.map_err(tier_status)?.with_row_sums(f.layout.row_bytes());
        while let Some(row) = rows.next().await {
            w.write(row?).await.map_err(tier_status)?;
        }
        w.finish().await.map_err(tier_status)
    }
    .await;
    let written = match copied {
        Ok(w) if w.size == f.size => w,
        Ok(w) => {
            let _ = tier.delete(&key).await;
            return Err(ErrorCode::Internal.status(format!("{} bytes of {path} copied, not {}", w.size, f.size)));
        }
        Err(e) => {
            let _ = tier.delete(&key).await;
            return Err(e);
        }
    };
    if let Some(ms) = shared.config.env.hold_migrate_commit_ms_for_test {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    let stub =
        Stub { key: key.clone(), size: written.size, blake3: written.blake3, layout: f.layout.clone(), migrated_ms: 0 };
    let op = Op::Migrated { path: path.to_string(), id: f.id, token: lock_token, stub: stub.clone() };
    let committed = match shared.locks.propose(op).await {
        Ok(reply) => match reply.error {
            None => Ok(reply.index),
            Some(e) => Err(e.status()),
        },
        Err(e) => Err(e.status()),
    };
    match committed {
        Ok(index) => {
            shared.applied(index).await;
            Ok(stub)
        }
        Err(e) => {
            // Not committed (or not known to be: then `tier gc` decides once the log has).
            if e.code() != tonic::Code::Unavailable {
                let _ = tier.delete(&key).await;
            }
            Err(e)
        }
    }
}

/// The reply of a migration.
pub fn migrated(stub: &Stub, removed: pb::RemoveReply) -> pb::MigrateReply {
    pb::MigrateReply {
        key: stub.key.clone(),
        size: stub.size,
        blake3: hex(&stub.blake3),
        units_deleted: removed.units_deleted,
        errors: removed.errors,
    }
}

/// Bytes `start..end` of a stubbed file, read from its object `READ_PIECE` at a time and sent
/// on `tx`; bytes past the object (a write grew the stub) read as zeros. Whether all were sent
/// (false: an error was sent, or the reader went away).
pub async fn read_stub(
    shared: &Shared,
    stub: &Stub,
    start: u64,
    end: u64,
    tx: &mpsc::Sender<Result<pb::FileData, Status>>,
) -> bool {
    let tier = match shared.tier() {
        Ok(t) => t,
        Err(e) => {
            let _ = tx.send(Err(e)).await;
            return false;
        }
    };
    let mut at = start;
    while at < end {
        let to = (at + READ_PIECE).min(end);
        let piece = if at >= stub.size {
            Ok(Bytes::from(vec![0; (to - at) as usize]))
        } else {
            let inside = to.min(stub.size);
            tier.get_range(&stub.key, at..inside).await.map_err(tier_status).map(|data| {
                shared.stats.tier_bytes_read.fetch_add(inside - at, std::sync::atomic::Ordering::Relaxed);
                if inside == to {
                    data
                } else {
                    let mut v = data.to_vec();
                    v.resize((to - at) as usize, 0);
                    Bytes::from(v)
                }
            })
        };
        let failed = piece.is_err();
        let sent = tx.send(piece.map(|data| pb::FileData { data, rebuilt_rows: 0 })).await;
        if sent.is_err() || failed {
            return false;
        }
        at = to;
    }
    true
}

/// The rows of a stubbed file, read back from its object (`row_bytes` each, the last one
/// shorter), each checked against its crc32c, and all against the stub's blake3 as they go:
/// the last row comes only if the whole object hashed right.
pub fn recall_rows(
    shared: &Shared,
    stub: Stub,
    row_bytes: u64,
) -> impl Stream<Item = Result<(u64, Bytes), Status>> + '_ {
    futures::stream::unfold((0u64, blake3::Hasher::new(), false), move |(row, mut hasher, done)| {
        let stub = stub.clone();
        async move {
            if done {
                return None;
            }
            let start = row * row_bytes;
            if start >= stub.size {
                return None;
            }
            let end = (start + row_bytes).min(stub.size);
            let got = match shared.tier() {
                Ok(t) => t.get_rows(&stub.key, stub.size, row_bytes, row..row + 1).await.map_err(tier_status),
                Err(e) => Err(e),
            };
            let got = got.and_then(|(data, _)| {
                hasher.update(&data);
                if end == stub.size && hasher.finalize().as_bytes() != &stub.blake3 {
                    return Err(ErrorCode::Corrupt
                        .status(format!("the tier object {} does not hash to its stub's blake3", stub.key)));
                }
                Ok((row, data))
            });
            let failed = got.is_err();
            Some((got, (row + 1, hasher, failed)))
        }
    })
}

/// Whether row `row` of a stub is still on the tier: inside the object and not striped again
/// by a partial recall. Rows past the object (a write grew the stub) are striped.
pub fn row_on_tier(stub: &Stub, recalled: &RowSet, row: u64) -> bool {
    row < stub.size.div_ceil(stub.layout.row_bytes()) && !recalled.contains(row)
}

/// Row `row` of a stub's object (the last row shorter), checked against the crc32c written
/// beside the object (objects of builds before row checksums: its length only), so a damaged
/// row is refused before parity is computed over it. Counted as recalled bytes.
pub async fn fetch_row(shared: &Shared, stub: &Stub, row: u64) -> Result<Bytes, Status> {
    let rb = stub.layout.row_bytes();
    let (data, _) = shared.tier()?.get_rows(&stub.key, stub.size, rb, row..row + 1).await.map_err(tier_status)?;
    shared.stats.tier_bytes_recalled.fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
    Ok(data)
}

/// Stripes row `row` of the stub at `path` (file `f`) again from `data`, its bytes in the
/// object: stored as a put stores a row (every unit at version 1, parity covering them) over
/// whatever units a migration left behind, under the stripe lock of the row (`resource`,
/// granted as `token`, signed `signed`); then, if `commit`, committed by `Op::RecalledRows`,
/// which the state machine applies only while that lock holds. From then on the row is read
/// and written in its units. The caller holds the row's stripe lock and has checked the row is
/// on the tier. (A whole recall commits its rows together, once the object hashed right.)
#[allow(clippy::too_many_arguments)]
pub async fn stripe_row_again(
    shared: &Shared,
    path: &str,
    f: &FileMeta,
    stub: &Stub,
    row: u64,
    data: &[u8],
    (resource, token, signed): (&str, u64, &str),
    commit: bool,
) -> Result<(), Status> {
    let meta = FileMeta { layout: stub.layout.clone(), ..f.clone() };
    let restores = encode_row(&stub.layout, data).into_iter().map(|UnitWrite { role, bytes, covers, .. }| {
        let unit = StoredUnit { bytes, version: 1, covers };
        shared.restore_unit(&meta, row, role, unit, signed, resource)
    });
    for r in futures::future::join_all(restores).await {
        r.map_err(|e| {
            wire::reword(&e, format!("row {row} of {path} could not be striped again from the tier: {}", e.message()))
        })?;
    }
    if !commit {
        return Ok(());
    }
    let op = Op::RecalledRows {
        path: path.to_string(),
        id: f.id,
        resource: resource.to_string(),
        token,
        rows: (row, row + 1),
    };
    let reply = shared.locks.propose(op).await.map_err(|e| e.status())?;
    if let Some(e) = reply.error {
        return Err(e.status());
    }
    shared.applied(reply.index).await;
    shared.stats.tier_rows_recalled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// Commits a recall: the file is striped again over its old layout.
pub async fn recalled(shared: &Shared, path: &str, f: &FileMeta, stub: &Stub, lock_token: u64) -> Result<(), Status> {
    let op = Op::Recalled { path: path.to_string(), id: f.id, token: lock_token, layout: stub.layout.clone() };
    let reply = shared.locks.propose(op).await.map_err(|e| e.status())?;
    if let Some(e) = reply.error {
        return Err(e.status());
    }
    shared.applied(reply.index).await;
    // The object is kept until `tier gc` finds no stub naming it.
    Ok(())
}

/// `tier gc`: deletes the objects no stub names, once older than `grace_ms` (by the object
/// store's clock of when each was written). Reads the stubs after a read barrier, so a stub
/// committed through another server is seen.
pub async fn gc(shared: &Shared, grace_ms: u64, dry_run: bool) -> Result<pb::TierGcReply, Status> {
    let tier = shared.tier()?;
    shared.locks.read_barrier().await.map_err(|e| e.status())?;
    let objects = tier.list().await.map_err(tier_status)?;
    let named = shared.locks.stub_keys();
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    // An object's row checksums go with it: counted and deleted as part of it (alone only when
    // the object is gone, as a crash between the two deletes leaves them).
    let listed: std::collections::HashSet<String> = objects.iter().map(|o| o.key.clone()).collect();
    let sums_bytes: std::collections::HashMap<String, u64> =
        objects.iter().filter_map(|o| tier::rows::object_of_sums(&o.key).map(|of| (of.to_string(), o.size))).collect();
    let objects: Vec<_> = objects
        .into_iter()
        .filter(|o| tier::rows::object_of_sums(&o.key).is_none_or(|of| !listed.contains(of)))
        .collect();
    let mut reply = pb::TierGcReply { objects: objects.len() as u64, ..Default::default() };
    for o in objects {
        let of = tier::rows::object_of_sums(&o.key).unwrap_or(&o.key);
        if named.contains(of) {
            reply.named += 1;
        } else if now_ms.saturating_sub(o.written_ms) < grace_ms {
            reply.young += 1;
        } else {
            if !dry_run {
                tier.delete(&o.key).await.map_err(tier_status)?;
            }
            reply.bytes_deleted += o.size + sums_bytes.get(&o.key).copied().unwrap_or(0);
            reply.deleted.push(o.key);
        }
    }
    if !dry_run {
        let (n, bytes) = tier.sweep_staged(grace_ms);
        reply.staged_removed = n;
        reply.bytes_deleted += bytes;
    }
    Ok(reply)
}
