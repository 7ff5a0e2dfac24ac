//! The narrow face of the lock service that the data path sees: who leads, the namespace, the
//! few questions it asks of the lock table, and proposing a command. The server's wiring
//! implements it over the Raft node; nothing else of the lock service is reachable from here.

use std::collections::{BTreeMap, HashSet};

use futures::future::BoxFuture;
use lockengine::{ByteRange, SessionId};
use lockservice::names::Entry;
use lockservice::{FileMeta, NodeId, Op, ProposeError, Reply, Stub, WriteGrant};
use tokio::sync::{mpsc, watch};

/// Who leads, as this server sees it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leadership {
    /// Whether this server leads.
    pub leading: bool,
    pub leader: Option<NodeId>,
    pub term: u64,
}

/// The sessions being fenced (ended without releasing, their locks kept until `FenceAck`), as of
/// one applied entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fencing {
    pub applied_index: u64,
    pub sessions: Vec<SessionId>,
    /// The highest token the lock table has issued by then.
    pub last_token: u64,
}

/// The files the namespace holds, by id, and the highest id it has handed out (ids are never
/// reused).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileIds {
    pub live: HashSet<u64>,
    pub last: u64,
}

/// What the data path asks of the lock service. Reads answer from this server's own applied
/// state; `propose` commits through the leader.
pub trait Locks: Send + Sync + 'static {
    /// This server's id.
    fn id(&self) -> NodeId;
    /// The address this server's own services are reached at.
    fn address(&self) -> &str;
    /// Every server of the cluster, this one included: id → address.
    fn members(&self) -> &BTreeMap<NodeId, String>;
    /// How to reach other servers.
    fn connector(&self) -> &wire::Connector;
    /// The clock the lock service stamps entries with, in ms.
    fn now_ms(&self) -> u64;
    fn leadership(&self) -> Leadership;
    /// Confirms with a majority that this server still leads (so a deposed leader cannot hand
    /// out a lease its successor does not count on).
    fn confirm_leadership(&self) -> BoxFuture<'_, Result<(), ProposeError>>;
    /// Waits until this server has applied everything committed before the call (a read
    /// barrier: what a mount then looks up includes every change acknowledged to anyone).
    fn read_barrier(&self) -> BoxFuture<'_, Result<(), ProposeError>>;
    /// The cluster secret tokens are signed with; none until the cluster is bootstrapped.
    fn secret(&self) -> Option<[u8; 32]>;
    /// The index of the last entry this server applied, as it changes.
    fn applied_index(&self) -> watch::Receiver<u64>;
    /// The write locks on files this server applies from now on (for invalidations, seed 000).
    fn write_grants(&self) -> mpsc::Receiver<WriteGrant>;
    /// Commits `op` through the leader, wherever it is.
    fn propose(&self, op: Op) -> BoxFuture<'_, Result<Reply, ProposeError>>;
    /// Commits `op` on this server only, which must lead (the leader's own duties).
    fn propose_here(&self, op: Op) -> BoxFuture<'_, Result<Reply, ProposeError>>;
    fn file(&self, path: &str) -> Option<FileMeta>;
    /// The files whose path starts with `prefix`, in path order.
    fn files(&self, prefix: &str) -> Vec<(String, FileMeta)>;
    fn file_ids(&self) -> FileIds;
    /// Where file `id`'s bytes are on the secondary tier, if they are (issue 14).
    fn stub(&self, id: u64) -> Option<Stub>;
    /// Of stub `id`, the rows partial recalls striped again (empty otherwise).
    fn recalled_rows(&self, id: u64) -> lockservice::RowSet;
    /// The object keys every stub names.
    fn stub_keys(&self) -> std::collections::HashSet<String>;
    /// The namespace entry at `path` (file, directory, symlink), `/` included.
    fn entry(&self, path: &str) -> Option<Entry>;
    /// The entry whose id is `ino`, wherever it is now.
    fn locate(&self, ino: u64) -> Option<Entry>;
    /// Up to `limit` entries of directory `dir` whose names sort after `after`, and whether
    /// more follow.
    fn list(&self, dir: &str, after: &str, limit: usize) -> (Vec<Entry>, bool);
    /// How many entries the namespace holds, and the most it takes.
    fn entry_count(&self) -> (u64, u64);
    /// Whether the write lock that issued `token` still holds `range` of `path` (seed 004).
    fn write_lock_holds(&self, path: &str, range: ByteRange, token: u64) -> bool;
    /// A session holding a write lock on some byte of `range` of `path`, and what it holds.
    fn write_holder(&self, path: &str, range: ByteRange) -> Option<(SessionId, ByteRange)>;
    /// The highest token issued so far.
    fn last_token(&self) -> u64;
    /// Whether `session` is known to have ended: an id the state has handed out that is not
    /// live (closed, expired, fencing, or fenced and acknowledged).
    fn session_ended(&self, session: u64) -> bool;
    fn fencing(&self) -> Fencing;
    /// Issue 16: the roles of file `id`'s row `row` marked stale by degraded writes (a mask of
    /// role indices: data units, then P, Q).
    fn stale_mask(&self, id: u64, row: u64) -> u8;
    /// Up to `limit` marked rows, (file id, row, mask), in file and row order.
    fn stale_marks(&self, limit: usize) -> Vec<(u64, u64, u8)>;
    /// How many rows are marked stale.
    fn stale_rows(&self) -> u64;
    /// The volume server `server` was last seen running on (`Op::VolumeSeen`).
    fn volume_seen(&self, server: NodeId) -> Option<u64>;
    /// Servers whose volume came back empty and is not yet rebuilt.
    fn wiped(&self) -> std::collections::BTreeSet<NodeId>;
    /// Issue 15: the bytes each identity may store in the files it created, if limited.
    fn bytes_quota(&self) -> Option<u64>;
    /// Who created file `id` (if a certificate said), and the bytes of that owner's files.
    fn owner_of(&self, id: u64) -> Option<(String, u64)>;
    /// The bytes of the files `owner` created.
    fn stored_bytes(&self, owner: &str) -> u64;
}
