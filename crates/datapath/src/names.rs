//! The namespace as a mount sees it (issue 13): an entry by path, a directory's entries, and
//! the changes a mount makes (mkdir, symlink, create, unlink, rmdir, rename, setattr), each one
//! replicated namespace entry through the leader. Reads answer from this server's applied state
//! after a read barrier (it has applied everything committed before the call, so a name made
//! through another server is seen); while no leader answers, from its state as it is.

use lockservice::Op;
use lockservice::names::{Entry, Kind, NameOp, valid_path};
use tonic::Status;
use wire::ErrorCode;
use wire::v1 as pb;

use crate::shared::Shared;

/// Most entries one ReadDir answer carries.
pub const READDIR_PAGE: usize = 1024;

pub fn node_of(e: &Entry) -> pb::Node {
    pb::Node {
        path: e.path.clone(),
        ino: e.attr.ino,
        kind: match e.kind {
            Kind::File => pb::NodeKind::File,
            Kind::Dir => pb::NodeKind::Dir,
            Kind::Symlink => pb::NodeKind::Symlink,
            Kind::Special => pb::NodeKind::Special,
        } as i32,
        size: e.size,
        mode: e.attr.mode,
        uid: e.attr.uid,
        gid: e.attr.gid,
        atime_ns: e.attr.atime_ns,
        mtime_ns: e.attr.mtime_ns,
        ctime_ns: e.attr.ctime_ns,
        nlink: e.attr.nlink,
        target: e.target.clone().unwrap_or_default(),
        rdev: e.rdev,
    }
}

fn check(path: &str, shared: &Shared) -> Result<(), Status> {
    if path != "/" && !valid_path(path) || path.len() > shared.config.limits.path_bytes_max {
        return Err(ErrorCode::BadRequest.status(format!(
            "`{path}` is not a path of the namespace: it must start with /, have no empty, `.` or `..` part, and be \
             at most {} bytes",
            shared.config.limits.path_bytes_max
        )));
    }
    Ok(())
}

/// Waits until this server has applied what was committed before now; when it cannot tell (no
/// leader answers), reads go on from its state as it is.
async fn barrier(shared: &Shared) {
    if let Err(e) = shared.locks.read_barrier().await {
        tracing::debug!("a namespace read without a barrier: {e}");
    }
}

pub async fn lookup(shared: &Shared, path: &str, ino: u64) -> Result<pb::Node, Status> {
    barrier(shared).await;
    if path.is_empty() && ino != 0 {
        return match shared.locks.locate(ino) {
            Some(e) => Ok(node_of(&e)),
            None => Err(ErrorCode::NotFound.status(format!("no entry has id {ino} any more"))),
        };
    }
    check(path, shared)?;
    match shared.locks.entry(path) {
        Some(e) => Ok(node_of(&e)),
        None => Err(ErrorCode::NotFound.status(format!("no such file or directory: {path}"))),
    }
}

pub async fn read_dir(shared: &Shared, r: &pb::ReadDirRequest) -> Result<pb::NodeList, Status> {
    check(&r.path, shared)?;
    barrier(shared).await;
    match shared.locks.entry(&r.path) {
        Some(e) if e.kind == Kind::Dir => {}
        Some(_) => return Err(ErrorCode::NotDir.status(format!("{} is not a directory", r.path))),
        None => return Err(ErrorCode::NotFound.status(format!("no such directory: {}", r.path))),
    }
    let limit = match r.limit as usize {
        0 => READDIR_PAGE,
        n => n.min(READDIR_PAGE),
    };
    let (entries, more) = shared.locks.list(&r.path, &r.after, limit);
    Ok(pb::NodeList { nodes: entries.iter().map(node_of).collect(), more })
}

/// Makes one change; answers with the entry as it is after it (for unlink and rmdir, as it was).
pub async fn change(
    shared: &Shared,
    layout_for: impl Fn(&str) -> Result<layout::Layout, Status>,
    identity: &str,
    c: pb::NameChange,
) -> Result<pb::Node, Status> {
    use pb::name_change::Op as C;
    let Some(op) = c.op else { return Err(ErrorCode::BadRequest.status("the change names no operation")) };
    let (op, path) = match op {
        C::Mkdir(m) => (NameOp::Mkdir { path: m.path.clone(), mode: m.mode, uid: m.uid, gid: m.gid }, m.path),
        C::Symlink(m) => {
            if m.target.is_empty() || m.target.len() > shared.config.limits.path_bytes_max || m.target.contains('\0') {
                return Err(
                    ErrorCode::BadRequest.status("a symlink's target must be 1 to path_bytes_max bytes, no NUL")
                );
            }
            (NameOp::Symlink { path: m.path.clone(), target: m.target, uid: m.uid, gid: m.gid }, m.path)
        }
        C::Create(m) => {
            check(&m.path, shared)?;
            let layout = layout_for(&m.path)?;
            (NameOp::Create { path: m.path.clone(), layout, mode: m.mode, uid: m.uid, gid: m.gid }, m.path)
        }
        C::Unlink(p) => (NameOp::Unlink { path: p.path.clone() }, p.path),
        C::Rmdir(p) => (NameOp::Rmdir { path: p.path.clone() }, p.path),
        C::Rename(r) => {
            check(&r.from, shared)?;
            (NameOp::Rename { from: r.from, to: r.to.clone(), flags: r.flags }, r.to)
        }
        C::Setattr(s) => (
            NameOp::SetAttr {
                path: s.path.clone(),
                ino: s.ino,
                mode: s.mode,
                uid: s.uid,
                gid: s.gid,
                atime_ns: s.atime_ns,
                mtime_ns: s.mtime_ns,
                size: s.size,
                touch: s.touch,
            },
            s.path,
        ),
        C::Mknod(m) => {
            (NameOp::Mknod { path: m.path.clone(), mode: m.mode, rdev: m.rdev, uid: m.uid, gid: m.gid }, m.path)
        }
        C::Access(p) => (NameOp::Access { path: p.path.clone(), ino: p.ino }, p.path),
    };
    check(&path, shared)?;
    if let NameOp::SetAttr { size: Some(size), .. } = &op {
        shared.check_file_size(&path, *size)?;
        if let Some(f) = shared.locks.file(&path) {
            let what = format!("making {path} {size} bytes long");
            shared.admit_bytes(Some(f.id), identity, size.saturating_sub(f.size), &what)?;
        }
    }
    let before = match &op {
        NameOp::Unlink { path } | NameOp::Rmdir { path } => shared.locks.entry(path),
        _ => None,
    };
    // A file created is its creator's (issue 15).
    let op = match op {
        NameOp::Create { .. } => Op::Owned { owner: identity.to_string(), op: Box::new(Op::Name(op)) },
        op => Op::Name(op),
    };
    let reply = shared.locks.propose(op).await.map_err(|e| e.status())?;
    if let Some(e) = reply.error {
        return Err(e.status());
    }
    shared.applied(reply.index).await;
    match before.or_else(|| shared.locks.entry(&path)) {
        Some(e) => Ok(node_of(&e)),
        // Changed again by someone else since: the change itself was made.
        None => Ok(pb::Node { path, ino: reply.file.unwrap_or(0), ..Default::default() }),
    }
}
