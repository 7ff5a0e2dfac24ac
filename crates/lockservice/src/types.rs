//! What the replicated log carries, and the openraft type configuration.

use std::collections::BTreeMap;
use std::fmt;

use lockengine::{Input, LockId, Output, SessionId};
use serde::{Deserialize, Serialize};
use tonic::Status;
use wire::ErrorCode;

/// How a server is reached; stored in the Raft membership.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NodeAddr {
    pub addr: String,
}

/// Who asked for a command: a session and its request number, for idempotent retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    pub session: SessionId,
    pub request: u64,
}

/// One entry of the log. `now_ms` is stamped by the leader that proposes it, so every replica
/// gives the engine the same time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub now_ms: u64,
    pub origin: Option<Origin>,
    pub op: Op,
}

/// Encoded by variant index (`codec`): variants are only ever added at the end, with a format
/// version bump, and never reordered (docs/formats.md lists them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// The cluster secret for signing tokens, proposed once by the bootstrapping server.
    Bootstrap { secret: [u8; 32] },
    /// Opens a session; the state machine picks its number. `client` says who opened it (`pid
    /// 1234 on host`), for lock tables and conflict messages.
    OpenSession { lease_ms: u64, client: String },
    /// Opens the gateway session of server `server` (so tables can say whose it is).
    OpenGatewaySession { lease_ms: u64, server: u64 },
    /// An input for the lock engine.
    Engine(Input),
    /// A gateway gives up its read lock `release` and, in the same entry, a client's write
    /// request is made (seed 002's trade of a whole-file read lock for a range write lock).
    Handover { release: LockId, request: Input },
    /// Adds a file to the namespace (refused if the path exists); the state machine picks its id.
    /// `writer` is the session whose lock the put holds: if it ends before the put completes,
    /// every replica takes the unfinished file out of the namespace (issue 10).
    CreateFile { path: String, layout: layout::Layout, writer: Option<SessionId> },
    /// The put of file `id` at `path` is done: it has `size` bytes.
    CompleteFile { path: String, id: u64, size: u64 },
    /// Takes file `id` out of the namespace.
    RemoveFile { path: String, id: u64 },
    /// File `id`'s units moved to the servers of `layout` (a rebuild onto another server).
    SetLayout { path: String, id: u64, layout: layout::Layout },
    /// A write ended at byte `size` of file `id`: its size becomes at least that.
    GrowFile { path: String, id: u64, size: u64 },
    /// A change a mount makes to the namespace (issue 13): directories, symlinks, renames,
    /// attributes.
    Name(NameOp),
    /// File `id`'s bytes are on the secondary tier as `stub` says (issue 14, format version 5).
    /// Applied only if the migrator's write lock `token` still holds the whole file, the file is
    /// still `id`, complete, striped, and `stub.size` bytes long: a migrator whose lease ran out
    /// cannot leave a stub (seed 003 applied to the tier).
    Migrated { path: String, id: u64, token: u64, stub: Stub },
    /// File `id` is striped again over `layout` (a recall), under write lock `token`.
    Recalled { path: String, id: u64, token: u64, layout: layout::Layout },
    /// Units of file `id` a write could not reach (their servers were down) and so left
    /// behind: per row, a mask of role indices (data units 0..k, then P, Q). Reads never use a
    /// marked unit; resync rebuilds it and clears the mark (issue 16, format version 6, like
    /// md's write-intent bitmap). Applied only while file `id` is in the namespace, and refused
    /// past [`STALE_ROWS_MAX`] marked rows.
    MarkStale { id: u64, rows: Vec<(u64, u8)> },
    /// The marked units of `rows` were rebuilt: their marks are cleared.
    ClearStale { id: u64, rows: Vec<(u64, u8)> },
    /// Server `server` runs on the volume named `volume` (a random number the volume was made
    /// with). A server seen before with another volume lost its disk (wiped or replaced):
    /// every unit on it is stale until `ServerRebuilt`.
    VolumeSeen { server: u64, volume: u64 },
    /// Every unit on server `server` was rebuilt after `ServerWiped`.
    ServerRebuilt { server: u64 },
    /// `op`, a `CreateFile` or a `Name(NameOp::Create)`, asked for by a client whose
    /// certificate names `owner`: the file it creates is `owner`'s, and its bytes count against
    /// `owner`'s bytes-stored quota (issue 15, format version 7). Any other op inside is
    /// applied as it is, the owner ignored.
    Owned { owner: String, op: Box<Op> },
    /// Rows `rows.0..rows.1` of the stubbed file `id` are striped again (a partial recall,
    /// issue 14, format version 8): their units hold the object's bytes, and reads and writes
    /// of those rows use the units from now on. Applied only while `id` is still a stub at
    /// `path` and the write lock `token` on `resource` still holds: the file's own path (over
    /// the rows' bytes) or the stripe lock of the one row recalled ([`stripe_resource`]).
    RecalledRows { path: String, id: u64, resource: String, token: u64, rows: (u64, u64) },
}

/// The lock resource of row `row` of file `file`, which a write of the row holds (seed 004).
pub fn stripe_resource(file: u64, row: u64) -> String {
    format!("#stripe/{file}/{row}")
}

/// Row numbers of a file, as merged half-open ranges: the rows of a stub striped again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RowSet(BTreeMap<u64, u64>);

impl RowSet {
    pub fn from_ranges(ranges: impl IntoIterator<Item = (u64, u64)>) -> RowSet {
        let mut s = RowSet::default();
        for (a, b) in ranges {
            s.insert(a, b);
        }
        s
    }

    /// Adds rows `a..b`, merging with the ranges they touch.
    pub fn insert(&mut self, mut a: u64, mut b: u64) {
        if a >= b {
            return;
        }
        // A range starting at or before `b` and ending at or after `a` merges.
        let touching: Vec<(u64, u64)> =
            self.0.range(..=b).rev().take_while(|(_, e)| **e >= a).map(|(s, e)| (*s, *e)).collect();
        for (s, e) in touching {
            self.0.remove(&s);
            a = a.min(s);
            b = b.max(e);
        }
        self.0.insert(a, b);
    }

    pub fn contains(&self, row: u64) -> bool {
        self.0.range(..=row).next_back().is_some_and(|(_, e)| *e > row)
    }

    /// How many rows.
    pub fn len(&self) -> u64 {
        self.0.iter().map(|(a, b)| b - a).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.0.iter().map(|(a, b)| (*a, *b))
    }
}

/// Most rows the namespace keeps marked stale at once (a write that would mark more fails
/// with the limit's error rather than grow the state without bound).
pub const STALE_ROWS_MAX: usize = 4_000_000;

/// A file's bytes on the secondary tier: the object, its size and blake3 hash, and the layout
/// the file had.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stub {
    pub key: String,
    pub size: u64,
    pub blake3: [u8; 32],
    pub layout: layout::Layout,
    /// When the stub was committed (the leader's clock), ms.
    pub migrated_ms: u64,
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.op {
            Op::Bootstrap { .. } => write!(f, "bootstrap@{}", self.now_ms),
            Op::OpenSession { lease_ms, client } => write!(f, "open(lease={lease_ms}, {client:?})@{}", self.now_ms),
            Op::OpenGatewaySession { lease_ms, server } => {
                write!(f, "open-gateway(server={server}, lease={lease_ms})@{}", self.now_ms)
            }
            Op::Engine(input) => write!(f, "{input:?}@{}", self.now_ms),
            Op::Handover { release, request } => write!(f, "handover({release:?}, {request:?})@{}", self.now_ms),
            Op::CreateFile { path, layout, writer } => {
                write!(f, "create({path}, {layout:?}, writer={writer:?})@{}", self.now_ms)
            }
            Op::CompleteFile { path, id, size } => write!(f, "complete({path}, {id}, {size})@{}", self.now_ms),
            Op::RemoveFile { path, id } => write!(f, "remove({path}, {id})@{}", self.now_ms),
            Op::SetLayout { path, id, layout } => write!(f, "set-layout({path}, {id}, {layout:?})@{}", self.now_ms),
            Op::GrowFile { path, id, size } => write!(f, "grow({path}, {id}, {size})@{}", self.now_ms),
            Op::Name(op) => write!(f, "{op:?}@{}", self.now_ms),
            Op::Migrated { path, id, token, stub } => {
                write!(f, "migrated({path}, {id}, token={token}, {})@{}", stub.key, self.now_ms)
            }
            Op::Recalled { path, id, token, .. } => write!(f, "recalled({path}, {id}, token={token})@{}", self.now_ms),
            Op::RecalledRows { path, id, resource, token, rows } => write!(
                f,
                "recalled-rows({path}, {id}, rows {}..{}, {resource} token={token})@{}",
                rows.0, rows.1, self.now_ms
            ),
            Op::MarkStale { id, rows } => write!(f, "mark-stale({id}, {rows:?})@{}", self.now_ms),
            Op::ClearStale { id, rows } => write!(f, "clear-stale({id}, {rows:?})@{}", self.now_ms),
            Op::VolumeSeen { server, volume } => write!(f, "volume-seen({server}, {volume:x})@{}", self.now_ms),
            Op::ServerRebuilt { server } => write!(f, "server-rebuilt({server})@{}", self.now_ms),
            Op::Owned { owner, op } => {
                let inner = Command { now_ms: self.now_ms, origin: self.origin, op: (**op).clone() };
                write!(f, "as {owner:?}: {inner}")
            }
        }
    }
}

/// What applying a command gave: the session opened, the engine's outputs, and whether the
/// command was a retry of one already applied (then `outputs` are the original ones).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Reply {
    pub session: Option<SessionId>,
    pub outputs: Vec<Output>,
    pub duplicate: bool,
    /// Log index the command was applied at.
    pub index: u64,
    /// For a namespace command: the file it concerns.
    pub file: Option<u64>,
    /// For a namespace command that was refused: why. (Such commands carry no origin, so a
    /// reply with an error is never kept among a session's answered requests in a snapshot.)
    pub error: Option<NamespaceError>,
}

/// Why the state machine refused a namespace command. Part of `Reply`, so it is replicated
/// data: add variants, never change one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum NamespaceError {
    #[error("{path} exists; remove it first (stripelock rm {path})")]
    Exists { path: String },
    #[error("the namespace holds its limit of {max} files")]
    FilesLimit { max: u64 },
    #[error("the session putting {path} has ended; take the lock again")]
    WriterEnded { path: String },
    #[error("{path} is no longer the file being written (it was removed)")]
    PutGone { path: String },
    #[error("{path} is no longer the file written (it was removed or replaced)")]
    FileReplaced { path: String },
    #[error("no such file or directory: {path}")]
    NotFound { path: String },
    #[error("{path} is not a directory")]
    NotDir { path: String },
    #[error("{path} is a directory")]
    IsDir { path: String },
    #[error("directory {path} is not empty")]
    NotEmpty { path: String },
    #[error(
        "{path} is not a name this namespace takes (a path /a/b with no empty, `.` or `..` part), or the change asked of it is impossible"
    )]
    BadName { path: String },
    #[error("{path} cannot be changed so (it is the root)")]
    Busy { path: String },
    /// Appended in format version 5 (issue 14).
    #[error("{path} was not {what}: {why}")]
    TierRefused { path: String, what: String, why: String },
    /// Appended in format version 6 (issue 16).
    #[error(
        "{max} stripe rows are marked stale already (written while a server was down); bring the servers back \
         so resync can clear them, or rebuild onto others"
    )]
    StaleLimit { max: u64 },
}

impl NamespaceError {
    pub fn code(&self) -> ErrorCode {
        match self {
            NamespaceError::Exists { .. } => ErrorCode::Exists,
            NamespaceError::FilesLimit { .. } => ErrorCode::Limit,
            NamespaceError::WriterEnded { .. } => ErrorCode::SessionExpired,
            NamespaceError::PutGone { .. } | NamespaceError::FileReplaced { .. } => ErrorCode::Conflict,
            NamespaceError::NotFound { .. } => ErrorCode::NotFound,
            NamespaceError::NotDir { .. } => ErrorCode::NotDir,
            NamespaceError::IsDir { .. } => ErrorCode::IsDir,
            NamespaceError::NotEmpty { .. } => ErrorCode::NotEmpty,
            NamespaceError::BadName { .. } => ErrorCode::BadRequest,
            NamespaceError::Busy { .. } => ErrorCode::Busy,
            NamespaceError::TierRefused { .. } => ErrorCode::Conflict,
            NamespaceError::StaleLimit { .. } => ErrorCode::Limit,
        }
    }

    pub fn status(&self) -> Status {
        self.code().status(self.to_string())
    }
}

/// A file of the namespace: its id (which names its units), size and layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    pub id: u64,
    pub size: u64,
    pub layout: layout::Layout,
    /// False from creation until the put that writes it is done.
    pub complete: bool,
    /// While not complete: the session of the put's lock (see `Op::CreateFile`).
    pub writer: Option<SessionId>,
}

openraft::declare_raft_types!(
    /// The stripelock Raft group's types.
    pub TypeConfig:
        D = Command,
        R = Reply,
        NodeId = u64,
        Node = NodeAddr,
        AsyncRuntime = crate::rt::Rt,
);

pub type C = TypeConfig;
pub type NodeId = u64;
pub type SnapshotData = Vec<u8>;

/// Lock ids on the wire are per session (small numbers a client reuses); in the engine they are
/// cluster-wide: the session's number above the client's.
pub const CLIENT_LOCK_BITS: u32 = 20;

pub fn engine_lock_id(session: SessionId, client_lock: u64) -> Option<lockengine::LockId> {
    (client_lock < (1 << CLIENT_LOCK_BITS) && session.0 < (1 << (64 - CLIENT_LOCK_BITS)))
        .then_some(lockengine::LockId((session.0 << CLIENT_LOCK_BITS) | client_lock))
}

pub fn client_lock_id(lock: lockengine::LockId) -> u64 {
    lock.0 & ((1 << CLIENT_LOCK_BITS) - 1)
}

pub fn io_error(e: impl fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// A change a mount makes to the namespace. Encoded by variant index inside `Op::Name`:
/// variants are only added at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NameOp {
    Mkdir {
        path: String,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    Symlink {
        path: String,
        target: String,
        uid: u32,
        gid: u32,
    },
    /// An empty, complete file with the layout the server chose.
    Create {
        path: String,
        layout: layout::Layout,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    /// Takes a file or a symlink out (a file's units are collected as orphans).
    Unlink {
        path: String,
    },
    Rmdir {
        path: String,
    },
    /// rename(2) and renameat2's RENAME_NOREPLACE (1) and RENAME_EXCHANGE (2).
    Rename {
        from: String,
        to: String,
        flags: u32,
    },
    /// `ino` (when not 0) must still be the entry's id: a stale path is refused, not obeyed.
    /// `size` only for files, after the mount has zeroed what a shrink cuts off.
    SetAttr {
        path: String,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        atime_ns: Option<u64>,
        mtime_ns: Option<u64>,
        size: Option<u64>,
        /// The file's data changed: mtime and ctime become now, and mtime always moves forward
        /// (a mount's kernel drops cached pages when it sees the mtime change).
        touch: bool,
    },
    /// A read: the entry's atime becomes now, its ctime stays (format version 4). `ino` as in
    /// `SetAttr`.
    Access {
        path: String,
        ino: u64,
    },
    /// mknod(2)/mkfifo(3) of a FIFO, socket, character or block device: an entry without data
    /// (format version 4). `mode` carries the type bits (`S_IFIFO` …) with the permissions.
    Mknod {
        path: String,
        mode: u32,
        rdev: u64,
        uid: u32,
        gid: u32,
    },
}

pub const RENAME_NOREPLACE: u32 = 1;
pub const RENAME_EXCHANGE: u32 = 2;
