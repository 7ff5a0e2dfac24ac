//! The replicated state machine: the lock engine plus what the service needs beside it (the
//! session counter, the cluster secret, the answers to recent requests for idempotent retries).
//!
//! It lives in memory; openraft restores it from the last persisted snapshot and replays the
//! log after it. Every replica applies every entry and so computes the same outputs; each
//! server hands the outputs addressed to its own clients' sessions to them (`Applied`).

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::{Stream, TryStreamExt};
use lockengine::{ByteRange, Engine, EngineSnapshot, Input, Limits, Output, SessionId};
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::type_config::alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::{EntryPayload, OptionalSend};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::codec::{self, Record};
use crate::env::{ApplyEvent, Env};
use crate::names::{Attr, NameOp, Names, Namespace, View};
use crate::store::Store;
use crate::types::{
    C, Command, FileMeta, NamespaceError, Op, Origin, Reply, RowSet, SnapshotData, Stub, io_error, stripe_resource,
};

/// One applied entry, as the local server's sessions see it.
#[derive(Debug, Clone)]
pub struct Applied {
    pub index: u64,
    pub origin: Option<Origin>,
    pub reply: Reply,
}

/// The state that is replicated.
#[derive(Debug)]
pub struct State {
    pub engine: Engine,
    pub next_session: u64,
    pub secret: Option<[u8; 32]>,
    /// Per session: the replies to its most recent requests, for retries.
    answered: BTreeMap<SessionId, Answered>,
    /// Gateway sessions and the server each belongs to.
    pub gateways: BTreeMap<SessionId, u64>,
    /// Who opened each client session that said (`pid 1234 on host`).
    pub clients: BTreeMap<SessionId, String>,
    /// The namespace: path → file.
    pub files: BTreeMap<String, FileMeta>,
    /// Directories, symlinks and attributes beside the files (issue 13).
    pub names: Names,
    /// Files whose bytes are on the secondary tier, by id (issue 14).
    pub stubs: BTreeMap<u64, Stub>,
    /// Of a stub, the rows striped again by partial recalls (a write or `recall --range`):
    /// those rows are read and written in their units, the others still from the tier.
    pub recalled: BTreeMap<u64, RowSet>,
    /// Stripe units left behind by degraded writes, by file id: row → mask of role indices
    /// (issue 16). Marks of files gone from the namespace are dropped by the resync that
    /// finds them.
    pub stale: BTreeMap<u64, BTreeMap<u64, u8>>,
    /// How many rows `stale` holds.
    stale_rows: usize,
    /// Servers whose volume came back empty: every unit on them is stale until rebuilt.
    pub wiped: std::collections::BTreeSet<u64>,
    /// The volume each server last ran on (`Op::VolumeSeen`).
    pub volumes: BTreeMap<u64, u64>,
    /// Who created each file, by id, when a client's certificate said (`Op::Owned`, issue 15).
    pub owners: BTreeMap<u64, String>,
    /// The bytes of the files each owner created (derived from `owners` and `files`).
    stored: BTreeMap<String, u64>,
    next_file: u64,
    /// Files being put, by path, with their id and writer session (derived from `files`).
    putting: BTreeMap<String, (u64, SessionId)>,
    /// Unfinished puts rolled back because their writer's session ended.
    pub puts_rolled_back: u64,
    pub last_applied: Option<LogIdOf<C>>,
    pub last_membership: StoredMembershipOf<C>,
    /// The term of the leader that proposed the last applied entry.
    pub applied_term: u64,
    /// Negative control of the simulation (see `Env`).
    break_fencing: bool,
}

/// The replicated state as a snapshot record (`codec`: its version comes first; the field
/// order is the format, docs/formats.md). Format version 3 added `names` after the version 2
/// record (`CoreSnapshot`), which is read as a namespace of files only; version 5 added `stubs`
/// after the version 3 and 4 record (`NamedSnapshot`), read as a state with no stubs; version
/// 6 added `stale`, `wiped` and `volumes` after the version 5 record (`StubbedSnapshot`), read as a state
/// with no marks; version 7 added `owners` after the version 6 record (`MarkedSnapshot`), read
/// as a state whose files have no owners; version 8 added `recalled` after the version 7 record
/// (`OwnedSnapshot`), read as a state whose stubs have no rows striped again.
#[derive(Serialize, Deserialize)]
struct StateSnapshot {
    owned: OwnedSnapshot,
    recalled: Vec<(u64, Vec<(u64, u64)>)>,
}

/// The snapshot record of format version 7.
#[derive(Serialize, Deserialize)]
struct OwnedSnapshot {
    marked: MarkedSnapshot,
    owners: Vec<(u64, String)>,
}

/// The snapshot record of format version 6.
#[derive(Serialize, Deserialize)]
struct MarkedSnapshot {
    core: CoreSnapshot,
    names: Names,
    stubs: Vec<(u64, Stub)>,
    stale: Vec<(u64, Vec<(u64, u8)>)>,
    wiped: Vec<u64>,
    volumes: Vec<(u64, u64)>,
}

/// The snapshot record of format version 5.
#[derive(Serialize, Deserialize)]
struct StubbedSnapshot {
    core: CoreSnapshot,
    names: Names,
    stubs: Vec<(u64, Stub)>,
}

/// The snapshot record of format versions 3 and 4.
#[derive(Serialize, Deserialize)]
struct NamedSnapshot {
    core: CoreSnapshot,
    names: Names,
}

/// The snapshot record of format version 2.
#[derive(Serialize, Deserialize)]
struct CoreSnapshot {
    engine: EngineSnapshot,
    next_session: u64,
    secret: Option<[u8; 32]>,
    answered: Vec<(SessionId, Answered)>,
    gateways: Vec<(SessionId, u64)>,
    files: Vec<(String, FileMeta)>,
    next_file: u64,
    puts_rolled_back: u64,
    clients: Vec<(SessionId, String)>,
}

/// Longest client description kept per session.
const CLIENT_NAME_MAX: usize = 128;

/// Most files the namespace holds.
pub const FILES_MAX: usize = 1_000_000;

/// How many recent requests of a session keep their replies.
const ANSWERED_WINDOW: usize = 64;

/// A session's answered requests. Requests of one session can be applied out of order: after a
/// client moves to another server and resends, the first server may still commit its copy. So
/// a request is a retry only if its own number was applied, not merely a higher one.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Answered {
    /// Every request at or below this number is taken as answered (its reply was forgotten).
    floor: u64,
    replies: BTreeMap<u64, Reply>,
}

impl Answered {
    /// The reply to `request` if it was applied (an empty one if it is too old to remember).
    fn get(&self, request: u64) -> Option<Reply> {
        match self.replies.get(&request) {
            Some(r) => Some(r.clone()),
            None => (request <= self.floor).then(Reply::default),
        }
    }

    fn insert(&mut self, request: u64, reply: Reply) {
        self.replies.insert(request, reply);
        while self.replies.len() > ANSWERED_WINDOW {
            if let Some((oldest, _)) = self.replies.pop_first() {
                self.floor = self.floor.max(oldest);
            }
        }
    }
}

impl State {
    fn new(limits: Limits, break_fencing: bool) -> State {
        let mut engine = Engine::new(limits);
        // The leader keeps leases in memory and expires sessions with `Evict` (`leases.rs`).
        engine.keep_leases_outside();
        if break_fencing {
            engine.break_fencing_for_negative_control();
        }
        State {
            break_fencing,
            engine,
            next_session: 0,
            secret: None,
            answered: BTreeMap::new(),
            gateways: BTreeMap::new(),
            clients: BTreeMap::new(),
            files: BTreeMap::new(),
            names: Names::default(),
            stubs: BTreeMap::new(),
            recalled: BTreeMap::new(),
            stale: BTreeMap::new(),
            stale_rows: 0,
            wiped: Default::default(),
            volumes: BTreeMap::new(),
            owners: BTreeMap::new(),
            stored: BTreeMap::new(),
            next_file: 0,
            putting: BTreeMap::new(),
            puts_rolled_back: 0,
            last_applied: None,
            last_membership: StoredMembershipOf::<C>::default(),
            applied_term: 0,
        }
    }

    /// Applies one command. A retried request (same session and request number, or older) is
    /// not applied again: its first reply is returned.
    fn apply(&mut self, cmd: Command, index: u64) -> Reply {
        if let Some(origin) = cmd.origin
            && let Some(mut reply) = self.answered.get(&origin.session).and_then(|a| a.get(origin.request))
        {
            reply.duplicate = true;
            return reply;
        }
        let mut reply = Reply { index, ..Reply::default() };
        let (op, owner) = match cmd.op {
            Op::Owned { owner, op } => (*op, Some(owner)),
            op => (op, None),
        };
        let removed_file = matches!(&op, Op::RemoveFile { .. });
        let creates = matches!(&op, Op::CreateFile { .. } | Op::Name(NameOp::Create { .. }));
        // The files whose size this command may change, or which it may take out, as they are.
        let sized = sized_paths(&op);
        let before: Vec<(u64, u64)> = sized.iter().filter_map(|p| self.files.get(p).map(|f| (f.id, f.size))).collect();
        match op {
            Op::Bootstrap { secret } => {
                // Only the first one counts: a second bootstrap cannot change the key.
                self.secret.get_or_insert(secret);
            }
            Op::OpenSession { lease_ms, client } => {
                self.next_session += 1;
                let session = SessionId(self.next_session);
                reply.outputs = self.engine.step(cmd.now_ms, Input::OpenSession { session, lease_ms });
                if self.engine.session_is_live(session) && !client.is_empty() {
                    let mut client = client;
                    if client.len() > CLIENT_NAME_MAX {
                        let mut end = CLIENT_NAME_MAX;
                        while !client.is_char_boundary(end) {
                            end -= 1;
                        }
                        client.truncate(end);
                    }
                    self.clients.insert(session, client);
                }
                reply.session = Some(session);
            }
            Op::OpenGatewaySession { lease_ms, server } => {
                self.next_session += 1;
                let session = SessionId(self.next_session);
                reply.outputs = self.engine.step(cmd.now_ms, Input::OpenSession { session, lease_ms });
                if self.engine.session_is_live(session) {
                    self.gateways.insert(session, server);
                }
                reply.session = Some(session);
            }
            Op::Engine(input) => {
                let ends = match input {
                    Input::CloseSession { session } | Input::FenceAck { session } => Some(session),
                    _ => None,
                };
                reply.outputs = self.engine.step(cmd.now_ms, input);
                if let Some(session) = ends
                    && !self.engine.session_is_live(session)
                {
                    self.answered.remove(&session);
                    self.gateways.remove(&session);
                    self.clients.remove(&session);
                }
            }
            Op::Handover { release, request } => {
                // The gateway's lock may already be gone (revoked and released, or its session
                // expired): then only the request counts, and the refusal of the release is
                // nobody's business.
                let mut outputs = self.engine.step(cmd.now_ms, Input::Release { lock: release });
                outputs.retain(|o| !matches!(o, Output::Rejected { .. }));
                outputs.extend(self.engine.step(cmd.now_ms, request));
                reply.outputs = outputs;
            }
            Op::CreateFile { path, layout, writer } => {
                if self.names_view().kind(&path).is_some() {
                    reply.error = Some(NamespaceError::Exists { path: path.clone() });
                } else if self.files.len() >= FILES_MAX {
                    reply.error = Some(NamespaceError::FilesLimit { max: FILES_MAX as u64 });
                } else if let Some(w) = writer
                    && !self.engine.session_is_live(w)
                {
                    reply.error = Some(NamespaceError::WriterEnded { path: path.clone() });
                } else {
                    let now_ns = cmd.now_ms.saturating_mul(1_000_000);
                    match self.namespace().make_parents(&path, now_ns) {
                        Err(e) => reply.error = Some(e),
                        Ok(()) => {
                            self.next_file += 1;
                            let id = self.next_file;
                            if let Some(w) = writer {
                                self.putting.insert(path.clone(), (id, w));
                            }
                            self.files.insert(path, FileMeta { id, size: 0, layout, complete: false, writer });
                            self.names.file_attrs.insert(id, Attr::of_put(id, now_ns));
                            reply.file = Some(id);
                        }
                    }
                }
            }
            Op::CompleteFile { path, id, size } => match self.files.get_mut(&path) {
                Some(f) if f.id == id => {
                    f.size = size;
                    f.complete = true;
                    f.writer = None;
                    self.putting.remove(&path);
                    reply.file = Some(id);
                }
                _ => reply.error = Some(NamespaceError::PutGone { path }),
            },
            Op::GrowFile { path, id, size } => match self.files.get_mut(&path) {
                Some(f) if f.id == id && f.complete => {
                    f.size = f.size.max(size);
                    if let Some(a) = self.names.file_attrs.get_mut(&id) {
                        a.mtime_ns = cmd.now_ms.saturating_mul(1_000_000);
                        a.ctime_ns = a.mtime_ns;
                    }
                    reply.file = Some(id);
                }
                _ => reply.error = Some(NamespaceError::FileReplaced { path }),
            },
            Op::RemoveFile { path, id } => match self.files.get(&path) {
                Some(f) if f.id == id => {
                    self.files.remove(&path);
                    self.names.file_attrs.remove(&id);
                    self.putting.remove(&path);
                    reply.file = Some(id);
                }
                _ => reply.error = Some(NamespaceError::NotFound { path }),
            },
            Op::SetLayout { path, id, layout } => match self.files.get_mut(&path) {
                Some(f) if f.id == id => {
                    // A unit moved to another server was rebuilt there: its mark goes.
                    let moved: Vec<(u64, u8)> = self.stale.get(&id).map_or_else(Vec::new, |marks| {
                        marks
                            .keys()
                            .map(|&row| {
                                let mask = f.layout.roles().enumerate().fold(0u8, |m, (i, r)| {
                                    if f.layout.server(row, r) != layout.server(row, r) { m | 1 << i } else { m }
                                });
                                (row, mask)
                            })
                            .collect()
                    });
                    f.layout = layout;
                    self.clear_stale(id, moved.into_iter());
                    reply.file = Some(id);
                }
                _ => reply.error = Some(NamespaceError::NotFound { path }),
            },
            Op::Migrated { path, id, token, stub } => match self.migrate(&path, id, token, stub, cmd.now_ms) {
                Ok(()) => {
                    // Its units are freed: no mark means anything any more.
                    self.clear_all_stale(id);
                    reply.file = Some(id);
                }
                Err(why) => {
                    reply.error = Some(NamespaceError::TierRefused { path, what: "migrated".into(), why: why.into() })
                }
            },
            // Marks stay: the rows a partial recall striped again may have been written with a
            // server down since (the migration cleared every earlier mark).
            Op::Recalled { path, id, token, layout } => match self.recall(&path, id, token, layout) {
                Ok(()) => reply.file = Some(id),
                Err(why) => {
                    reply.error = Some(NamespaceError::TierRefused { path, what: "recalled".into(), why: why.into() })
                }
            },
            Op::RecalledRows { path, id, resource, token, rows } => {
                match self.recall_rows(&path, id, &resource, token, rows) {
                    Ok(()) => reply.file = Some(id),
                    Err(why) => {
                        reply.error =
                            Some(NamespaceError::TierRefused { path, what: "recalled".into(), why: why.into() })
                    }
                }
            }
            Op::MarkStale { id, rows } => {
                if !self.names.file_attrs.contains_key(&id) {
                    reply.error = Some(NamespaceError::NotFound { path: format!("file {id}") });
                } else if self.stale_rows + rows.len() > crate::types::STALE_ROWS_MAX {
                    reply.error = Some(NamespaceError::StaleLimit { max: crate::types::STALE_ROWS_MAX as u64 });
                } else {
                    let marks = self.stale.entry(id).or_default();
                    for (row, mask) in rows {
                        let m = marks.entry(row).or_insert(0);
                        self.stale_rows += usize::from(*m == 0 && mask != 0);
                        *m |= mask;
                    }
                    marks.retain(|_, m| *m != 0);
                    if marks.is_empty() {
                        self.stale.remove(&id);
                    }
                    reply.file = Some(id);
                }
            }
            Op::ClearStale { id, rows } => {
                self.clear_stale(id, rows.into_iter());
                reply.file = Some(id);
            }
            Op::VolumeSeen { server, volume } => {
                if self.volumes.insert(server, volume).is_some_and(|before| before != volume) {
                    self.wiped.insert(server);
                }
            }
            Op::ServerRebuilt { server } => {
                self.wiped.remove(&server);
            }
            // Nested: the inner one's owner is ignored (only creations have owners).
            Op::Owned { op, .. } => return self.apply(Command { op: *op, ..cmd }, index),
            Op::Name(op) => {
                let renamed = matches!(&op, NameOp::Rename { .. });
                let removes = matches!(&op, NameOp::Rename { .. } | NameOp::Unlink { .. });
                match self.namespace().apply(op, cmd.now_ms) {
                    Ok(id) => reply.file = Some(id),
                    Err(e) => reply.error = Some(e),
                }
                if renamed {
                    // Files being put keep their writer wherever a rename moved them.
                    self.putting = putting_of(&self.files);
                }
                if removes && reply.error.is_none() {
                    self.forget_gone_stubs();
                }
            }
        }
        if removed_file {
            self.forget_gone_stubs();
        }
        if let (Some(owner), true, None, Some(id)) = (owner, creates, &reply.error, reply.file) {
            self.owners.insert(id, owner);
        }
        if !sized.is_empty() {
            self.count_stored(&sized, &before);
        }
        self.roll_back_orphaned_puts();
        if let Some(origin) = cmd.origin
            && self.engine.session_is_live(origin.session)
        {
            self.answered.entry(origin.session).or_default().insert(origin.request, reply.clone());
        }
        reply
    }

    /// Drops the stubs of files no longer in the namespace (their objects are then `tier gc`'s).
    /// A walk of the files, made only while some file is on the tier.
    /// Clears the given role bits of file `id`'s marked rows.
    fn clear_stale(&mut self, id: u64, rows: impl Iterator<Item = (u64, u8)>) {
        let Some(marks) = self.stale.get_mut(&id) else { return };
        for (row, mask) in rows {
            if let Some(m) = marks.get_mut(&row) {
                *m &= !mask;
                if *m == 0 {
                    marks.remove(&row);
                    self.stale_rows -= 1;
                }
            }
        }
        if marks.is_empty() {
            self.stale.remove(&id);
        }
    }

    fn clear_all_stale(&mut self, id: u64) {
        if let Some(marks) = self.stale.remove(&id) {
            self.stale_rows -= marks.len();
        }
    }

    /// The role mask of file `id`'s row `row` marked stale (0: none).
    pub fn stale_mask(&self, id: u64, row: u64) -> u8 {
        self.stale.get(&id).and_then(|m| m.get(&row)).copied().unwrap_or(0)
    }

    /// How many rows are marked stale.
    pub fn stale_rows(&self) -> usize {
        self.stale_rows
    }

    fn forget_gone_stubs(&mut self) {
        if self.stubs.is_empty() {
            return;
        }
        let live: std::collections::HashSet<u64> = self.files.values().map(|f| f.id).collect();
        self.stubs.retain(|id, _| live.contains(id));
        self.recalled.retain(|id, _| live.contains(id));
    }

    /// Commits a stub (`Op::Migrated`) if everything it was made from still holds.
    fn migrate(&mut self, path: &str, id: u64, token: u64, mut stub: Stub, now_ms: u64) -> Result<(), &'static str> {
        let Some(f) = self.files.get(path) else { return Err("it is gone") };
        if f.id != id || !f.complete {
            return Err("it was replaced or is being written");
        }
        if self.stubs.contains_key(&id) {
            return Err("it is on the tier already");
        }
        if f.size != stub.size {
            return Err("its size changed while it was copied");
        }
        if !self.engine.write_lock_holds(path, ByteRange::ALL, token) {
            return Err("the migrator's write lock on it no longer holds (its lease ran out, or it was released)");
        }
        stub.migrated_ms = now_ms;
        self.stubs.insert(id, stub);
        Ok(())
    }

    /// Stripes a stubbed file again (`Op::Recalled`).
    fn recall(&mut self, path: &str, id: u64, token: u64, layout: layout::Layout) -> Result<(), &'static str> {
        let Some(f) = self.files.get_mut(path) else { return Err("it is gone") };
        if f.id != id {
            return Err("it was replaced");
        }
        if !self.stubs.contains_key(&id) {
            return Err("it is not on the tier");
        }
        if !self.engine.write_lock_holds(path, ByteRange::ALL, token) {
            return Err("the recaller's write lock on it no longer holds");
        }
        f.layout = layout;
        self.stubs.remove(&id);
        self.recalled.remove(&id);
        Ok(())
    }

    /// Stripes rows of a stub again (`Op::RecalledRows`), if its recaller's lock still holds.
    fn recall_rows(
        &mut self,
        path: &str,
        id: u64,
        resource: &str,
        token: u64,
        (first, end): (u64, u64),
    ) -> Result<(), &'static str> {
        let Some(f) = self.files.get_mut(path) else { return Err("it is gone") };
        if f.id != id {
            return Err("it was replaced");
        }
        let Some(stub) = self.stubs.get(&id) else { return Err("it is not on the tier (recalled whole already)") };
        if first >= end {
            return Err("no rows were named");
        }
        let row_bytes = stub.layout.row_bytes();
        let holds = if resource == path {
            match ByteRange::new(first.saturating_mul(row_bytes), end.saturating_mul(row_bytes)) {
                Ok(range) => self.engine.write_lock_holds(path, range, token),
                Err(_) => return Err("the rows named are past the largest file"),
            }
        } else if end == first + 1 && resource == stripe_resource(id, first) {
            self.engine.write_lock_holds(resource, ByteRange::ALL, token)
        } else {
            return Err("the lock named is neither the file's nor the stripe lock of the one row recalled");
        };
        if !holds {
            return Err("the recaller's lock on those rows no longer holds");
        }
        f.layout = stub.layout.clone();
        self.recalled.entry(id).or_default().insert(first, end);
        Ok(())
    }

    /// Rows of stub `id` striped again by partial recalls (empty for a file that is not a stub).
    pub fn recalled_rows(&self, id: u64) -> RowSet {
        self.recalled.get(&id).cloned().unwrap_or_default()
    }

    fn namespace(&mut self) -> Namespace<'_> {
        Namespace { files: &mut self.files, names: &mut self.names, next_id: &mut self.next_file, files_max: FILES_MAX }
    }

    /// The namespace, to read.
    pub fn names_view(&self) -> View<'_> {
        View { files: &self.files, names: &self.names }
    }

    /// The highest file id handed out: every file of a lower or equal id that is not in the
    /// namespace is gone for good (ids are never reused).
    pub fn last_file_id(&self) -> u64 {
        self.next_file
    }

    /// Takes out of the namespace every unfinished file whose writer's session has ended
    /// (closed, or expired and being fenced): nobody can complete its put any more, and left
    /// there it would stay "being written" forever (issue 10). Run after every entry, so every
    /// replica removes it at the same index; its units are collected as orphans.
    fn roll_back_orphaned_puts(&mut self) {
        if self.putting.is_empty() {
            return;
        }
        let ended: Vec<(String, u64)> = self
            .putting
            .iter()
            .filter(|(_, (_, w))| !self.engine.session_is_live(*w))
            .map(|(p, (id, _))| (p.clone(), *id))
            .collect();
        for (path, id) in ended {
            self.putting.remove(&path);
            if self.files.get(&path).is_some_and(|f| f.id == id && !f.complete) {
                // Unfinished, so 0 bytes long: its owner's count does not change.
                self.owners.remove(&id);
                self.files.remove(&path);
                self.names.file_attrs.remove(&id);
                self.puts_rolled_back += 1;
            }
        }
    }

    /// The snapshot as stored (tests; the snapshot builder encodes its copy off the lock).
    #[cfg(test)]
    fn to_bytes(&self) -> io::Result<Vec<u8>> {
        Ok(codec::encode(Record::Snapshot, &self.snapshot_data())?)
    }

    fn snapshot_data(&self) -> StateSnapshot {
        StateSnapshot {
            owned: OwnedSnapshot {
                marked: MarkedSnapshot {
                    core: self.core_snapshot(),
                    names: self.names.clone(),
                    stubs: self.stubs.iter().map(|(id, s)| (*id, s.clone())).collect(),
                    stale: self.stale.iter().map(|(id, m)| (*id, m.iter().map(|(r, m)| (*r, *m)).collect())).collect(),
                    wiped: self.wiped.iter().copied().collect(),
                    volumes: self.volumes.iter().map(|(s, v)| (*s, *v)).collect(),
                },
                owners: self.owners.iter().map(|(id, o)| (*id, o.clone())).collect(),
            },
            recalled: self.recalled.iter().map(|(id, rows)| (*id, rows.ranges().collect())).collect(),
        }
    }

    fn core_snapshot(&self) -> CoreSnapshot {
        CoreSnapshot {
            engine: self.engine.snapshot(),
            next_session: self.next_session,
            secret: self.secret,
            answered: self.answered.iter().map(|(s, a)| (*s, a.clone())).collect(),
            gateways: self.gateways.iter().map(|(s, g)| (*s, *g)).collect(),
            files: self.files.iter().map(|(p, f)| (p.clone(), f.clone())).collect(),
            next_file: self.next_file,
            puts_rolled_back: self.puts_rolled_back,
            clients: self.clients.iter().map(|(s, c)| (*s, c.clone())).collect(),
        }
    }

    fn restore(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut recalled = Vec::new();
        let (s, names, stubs, (stale, wiped, volumes), owners) = match bytes.first() {
            Some(2) => (
                codec::decode::<CoreSnapshot>(Record::Snapshot, bytes)?,
                Names::default(),
                Vec::new(),
                Default::default(),
                Vec::new(),
            ),
            Some(3 | 4) => {
                let s: NamedSnapshot = codec::decode(Record::Snapshot, bytes)?;
                (s.core, s.names, Vec::new(), Default::default(), Vec::new())
            }
            Some(5) => {
                let s: StubbedSnapshot = codec::decode(Record::Snapshot, bytes)?;
                (s.core, s.names, s.stubs, Default::default(), Vec::new())
            }
            Some(6) => {
                let s: MarkedSnapshot = codec::decode(Record::Snapshot, bytes)?;
                (s.core, s.names, s.stubs, (s.stale, s.wiped, s.volumes), Vec::new())
            }
            Some(7) => {
                let OwnedSnapshot { marked: s, owners } = codec::decode(Record::Snapshot, bytes)?;
                (s.core, s.names, s.stubs, (s.stale, s.wiped, s.volumes), owners)
            }
            _ => {
                let StateSnapshot { owned: OwnedSnapshot { marked: s, owners }, recalled: rows } =
                    codec::decode(Record::Snapshot, bytes)?;
                recalled = rows;
                (s.core, s.names, s.stubs, (s.stale, s.wiped, s.volumes), owners)
            }
        };
        self.recalled = recalled.into_iter().map(|(id, rows)| (id, RowSet::from_ranges(rows))).collect();
        self.owners = owners.into_iter().collect();
        self.volumes = volumes.into_iter().collect();
        self.names = names;
        self.stubs = stubs.into_iter().collect();
        self.stale = stale.into_iter().map(|(id, rows)| (id, rows.into_iter().collect())).collect();
        self.stale_rows = self.stale.values().map(BTreeMap::len).sum();
        self.wiped = wiped.into_iter().collect();
        self.engine = Engine::restore(&s.engine).map_err(io_error)?;
        self.engine.keep_leases_outside();
        if self.break_fencing {
            self.engine.break_fencing_for_negative_control();
        }
        self.next_session = s.next_session;
        self.secret = s.secret;
        self.answered = s.answered.into_iter().collect();
        self.gateways = s.gateways.into_iter().collect();
        self.files = s.files.into_iter().collect();
        self.next_file = s.next_file;
        self.putting = putting_of(&self.files);
        if bytes.first() == Some(&2) {
            // A namespace of files only: its directories are the files' parents.
            let paths: Vec<String> = self.files.keys().cloned().collect();
            for p in paths {
                let _ = self.namespace().make_parents(&p, 0);
            }
        }
        self.puts_rolled_back = s.puts_rolled_back;
        self.clients = s.clients.into_iter().collect();
        self.stored = stored_of(&self.files, &self.owners);
        Ok(())
    }

    /// The `n` owners with the most bytes, most first.
    pub fn largest_owners(&self, n: usize) -> Vec<(String, u64)> {
        let mut all: Vec<(String, u64)> = self.stored.iter().map(|(o, b)| (o.clone(), *b)).collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }

    /// `owner`'s bytes: the sizes of the files it created that are still there.
    pub fn stored_bytes(&self, owner: &str) -> u64 {
        self.stored.get(owner).copied().unwrap_or(0)
    }

    /// After a command that may change the size of the files at `paths` or take them out, which
    /// were `before` (id, size): their owners' counts follow.
    fn count_stored(&mut self, paths: &[String], before: &[(u64, u64)]) {
        let after: Vec<(u64, u64)> = paths.iter().filter_map(|p| self.files.get(p).map(|f| (f.id, f.size))).collect();
        let size_in = |list: &[(u64, u64)], id: u64| list.iter().find(|(i, _)| *i == id).map(|(_, s)| *s);
        let mut changes: Vec<(u64, u64, Option<u64>)> =
            before.iter().map(|&(id, old)| (id, old, size_in(&after, id))).collect();
        changes
            .extend(after.iter().filter(|(id, _)| size_in(before, *id).is_none()).map(|&(id, new)| (id, 0, Some(new))));
        for (id, old, new) in changes {
            let owner = match new {
                // Taken out (a rename moves a file between two of `paths`, never elsewhere).
                None => self.owners.remove(&id),
                Some(_) => self.owners.get(&id).cloned(),
            };
            let Some(owner) = owner else { continue };
            let total = self.stored.entry(owner.clone()).or_default();
            *total = total.saturating_sub(old).saturating_add(new.unwrap_or(0));
            if *total == 0 {
                self.stored.remove(&owner);
            }
        }
    }
}

/// The paths of the files a command may change the size of, or take out of the namespace.
fn sized_paths(op: &Op) -> Vec<String> {
    match op {
        Op::CompleteFile { path, .. } | Op::GrowFile { path, .. } | Op::RemoveFile { path, .. } => vec![path.clone()],
        Op::Name(NameOp::Unlink { path } | NameOp::SetAttr { path, .. }) => vec![path.clone()],
        Op::Name(NameOp::Rename { from, to, .. }) => vec![from.clone(), to.clone()],
        _ => Vec::new(),
    }
}

/// Each owner's bytes, from the files and their owners.
fn stored_of(files: &BTreeMap<String, FileMeta>, owners: &BTreeMap<u64, String>) -> BTreeMap<String, u64> {
    let mut stored = BTreeMap::<String, u64>::new();
    for f in files.values() {
        if let Some(owner) = owners.get(&f.id)
            && f.size > 0
        {
            *stored.entry(owner.clone()).or_default() += f.size;
        }
    }
    stored
}

/// Files being put, by path, with their id and writer session.
fn putting_of(files: &BTreeMap<String, FileMeta>) -> BTreeMap<String, (u64, SessionId)> {
    files.iter().filter(|(_, f)| !f.complete).filter_map(|(p, f)| f.writer.map(|w| (p.clone(), (f.id, w)))).collect()
}

/// A snapshot as kept: its meta and its bytes.
type StoredSnapshot = (SnapshotMetaOf<C>, Vec<u8>);

/// The state machine handle given to openraft; clones share the state.
#[derive(Clone)]
pub struct Machine {
    state: Arc<Mutex<State>>,
    store: Store,
    snapshot: Arc<Mutex<Option<StoredSnapshot>>>,
    /// The queue of each session attached to this server: an applied entry goes only to the
    /// sessions it concerns (its origin and the sessions its outputs are for).
    routes: Arc<Mutex<BTreeMap<SessionId, mpsc::Sender<Arc<Applied>>>>>,
    index_tx: Arc<watch::Sender<u64>>,
    server: u64,
    observer: Option<Arc<dyn Fn(ApplyEvent) + Send + Sync>>,
    /// Where write locks granted on files go, for the leader's invalidations (seed 000).
    write_grants: Arc<Mutex<Option<mpsc::Sender<WriteGrant>>>>,
    /// The last snapshot built and the last restored, for `status` (measured, never applied).
    snapshot_stats: Arc<Mutex<SnapshotStats>>,
}

/// What the last snapshots cost this server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotStats {
    /// Bytes of the last snapshot built or installed.
    pub bytes: u64,
    /// The lock records it held.
    pub locks: u64,
    /// Time to build the last one (copy, encode, store), ms.
    pub build_ms: u64,
    /// Time to restore the last one installed (at start, or sent by the leader), ms.
    pub restore_ms: u64,
}

/// A PW or EX lock granted (or converted to) on a file of the namespace.
#[derive(Debug, Clone)]
pub struct WriteGrant {
    pub path: String,
    pub range: lockengine::ByteRange,
    pub layout: layout::Layout,
}

/// Write grants queued for the invalidation task before newer ones are dropped (its entries
/// then only age out).
const WRITE_GRANTS_QUEUED: usize = 4_096;

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Machine")
    }
}

/// How many applied entries a slow local session may fall behind before it must resync.
const APPLIED_BACKLOG: usize = 4_096;

impl Machine {
    /// What the last snapshots cost this server.
    pub fn snapshot_stats(&self) -> SnapshotStats {
        *self.snapshot_stats.lock().expect("snapshot stats")
    }

    pub fn new(store: Store, server: u64, limits: Limits, env: &Env) -> io::Result<Machine> {
        let snapshot = store.snapshot()?;
        let (index_tx, _) = watch::channel(0);
        Ok(Machine {
            state: Arc::new(Mutex::new(State::new(limits, env.break_fencing_for_negative_control))),
            store,
            snapshot: Arc::new(Mutex::new(snapshot)),
            routes: Arc::default(),
            index_tx: Arc::new(index_tx),
            server,
            observer: env.observer.clone(),
            write_grants: Arc::default(),
            snapshot_stats: Arc::default(),
        })
    }

    /// The replicated state, for reads. Never hold the guard across an await.
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("state lock poisoned")
    }

    /// Write locks granted on files from now on, as this server applies them.
    pub fn write_grants(&self) -> mpsc::Receiver<WriteGrant> {
        let (tx, rx) = mpsc::channel(WRITE_GRANTS_QUEUED);
        *self.write_grants.lock().expect("write grants") = Some(tx);
        rx
    }

    /// The entries that concern `session`, as this server applies them from now on. A second
    /// attachment replaces the first (whose queue then ends). The queue also ends if the session
    /// falls `APPLIED_BACKLOG` entries behind; its client must then resume the session.
    pub fn attach(&self, session: SessionId) -> mpsc::Receiver<Arc<Applied>> {
        let (tx, rx) = mpsc::channel(APPLIED_BACKLOG);
        self.routes.lock().expect("routes lock").insert(session, tx);
        rx
    }

    /// The sessions attached to this server now.
    pub fn attached(&self) -> Vec<SessionId> {
        self.routes.lock().expect("routes lock").iter().filter(|(_, tx)| !tx.is_closed()).map(|(s, _)| *s).collect()
    }

    /// Forgets `session`'s queue if nobody reads it any more.
    pub fn detach(&self, session: SessionId) {
        let mut routes = self.routes.lock().expect("routes lock");
        if routes.get(&session).is_some_and(|tx| tx.is_closed()) {
            routes.remove(&session);
        }
    }

    /// Hands an applied entry to the queues of the sessions it concerns, then drops the queues
    /// of the sessions in `ended`: nothing will ever concern them again, and a queue kept would
    /// keep its stream's task and buffers alive for good (issue 10: a closed session's queue and
    /// task stayed until the server stopped).
    fn route(&self, applied: Applied, ended: &[SessionId]) {
        let mut sessions: Vec<SessionId> = applied.origin.map(|o| o.session).into_iter().collect();
        sessions.extend(applied.reply.outputs.iter().filter_map(output_session));
        sessions.sort_unstable();
        sessions.dedup();
        let mut routes = self.routes.lock().expect("routes lock");
        let applied = Arc::new(applied);
        for session in sessions {
            if let Some(tx) = routes.get(&session)
                && tx.try_send(applied.clone()).is_err()
            {
                // Full (the session fell behind) or closed (its stream ended): its client
                // resumes and is resynchronised.
                routes.remove(&session);
            }
        }
        for session in ended {
            routes.remove(session);
        }
    }

    /// How many session queues this server holds (one per attached session).
    pub fn attached_sessions(&self) -> usize {
        self.routes.lock().expect("routes lock").len()
    }

    /// The index of the last entry applied on this server.
    pub fn applied_index(&self) -> watch::Receiver<u64> {
        self.index_tx.subscribe()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }
}

impl RaftSnapshotBuilder<C> for Machine {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<C, SnapshotData>, io::Error> {
        // Only the copy is made under the state's lock; applying goes on while it is encoded
        // and stored (off the runtime's threads for a database on disk).
        let started = std::time::Instant::now();
        let (data, meta) = {
            let state = self.state();
            let meta =
                SnapshotMetaOf::<C> { last_log_id: state.last_applied, last_membership: state.last_membership.clone() };
            (state.snapshot_data(), meta)
        };
        let locks = data.owned.marked.core.engine.locks.len() as u64;
        let encode_and_store = {
            let (store, meta) = (self.store.clone(), meta.clone());
            move || -> io::Result<Vec<u8>> {
                let bytes = codec::encode(Record::Snapshot, &data)?;
                // Persist before returning: openraft purges the log the snapshot covers afterwards.
                store.save_snapshot(&meta, &bytes)?;
                Ok(bytes)
            }
        };
        let bytes = if self.store.is_in_memory() {
            // The simulation's: done in place, so a seed replays exactly.
            encode_and_store()?
        } else {
            tokio::task::spawn_blocking(encode_and_store).await.map_err(io::Error::other)??
        };
        {
            let mut stats = self.snapshot_stats.lock().expect("snapshot stats");
            stats.bytes = bytes.len() as u64;
            stats.locks = locks;
            stats.build_ms = started.elapsed().as_millis() as u64;
        }
        *self.snapshot.lock().expect("snapshot lock") = Some((meta.clone(), bytes.clone()));
        Ok(SnapshotOf::<C, SnapshotData> { meta, snapshot: bytes })
    }
}

impl RaftStateMachine<C> for Machine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = Machine;

    async fn applied_state(&mut self) -> Result<(Option<LogIdOf<C>>, StoredMembershipOf<C>), io::Error> {
        let state = self.state();
        Ok((state.last_applied, state.last_membership.clone()))
    }

    async fn apply<S>(&mut self, mut entries: S) -> Result<(), io::Error>
    where
        S: Stream<Item = Result<EntryResponder<C>, io::Error>> + Unpin + OptionalSend,
    {
        use openraft::vote::RaftLeaderId;
        while let Some((entry, responder)) = entries.try_next().await? {
            let index = entry.log_id.index;
            // Sessions this entry ended (closed, fenced, or expired): their queues go with it.
            let mut ended: Vec<SessionId> = Vec::new();
            let (origin, reply) = {
                let mut state = self.state();
                state.last_applied = Some(entry.log_id);
                state.applied_term = entry.log_id.leader_id.term();
                // The term is the engine's epoch, so tokens keep increasing across leaders. Every
                // new leader's first entry (a blank one) raises it; replicas see the same entry.
                if state.applied_term > state.engine.epoch() {
                    let (now, epoch) = (state.engine.now_ms(), state.applied_term);
                    state.engine.step(now, Input::SetEpoch { epoch });
                }
                match entry.payload {
                    EntryPayload::Blank => (None, Reply { index, ..Reply::default() }),
                    EntryPayload::Membership(m) => {
                        state.last_membership = StoredMembershipOf::<C>::new(Some(entry.log_id), m);
                        (None, Reply { index, ..Reply::default() })
                    }
                    EntryPayload::Normal(cmd) => {
                        let origin = cmd.origin;
                        let closing = match &cmd.op {
                            Op::Engine(Input::CloseSession { session } | Input::FenceAck { session }) => Some(*session),
                            _ => None,
                        };
                        let seen = self.observer.as_ref().map(|_| {
                            let input = match &cmd.op {
                                Op::Engine(input) | Op::Handover { request: input, .. } => Some(input.clone()),
                                _ => None,
                            };
                            (cmd.now_ms, input)
                        });
                        let reply = state.apply(cmd, index);
                        let grants =
                            (!reply.outputs.is_empty()).then(|| self.write_grants.lock().expect("write grants"));
                        if let Some(tx) = grants.as_ref().and_then(|g| g.as_ref()) {
                            for o in &reply.outputs {
                                let (lock, mode, range) = match o {
                                    Output::Granted { lock, mode, range, .. }
                                    | Output::Converted { lock, mode, range, .. } => (*lock, *mode, *range),
                                    _ => continue,
                                };
                                if !mode.is_write() {
                                    continue;
                                }
                                let Some(path) = state.engine.resource_of(lock) else { continue };
                                if let Some(f) = state.files.get(path) {
                                    let grant = WriteGrant { path: path.to_string(), range, layout: f.layout.clone() };
                                    let _ = tx.try_send(grant);
                                }
                            }
                        }
                        if let (Some(observer), Some((now_ms, input))) = (&self.observer, seen) {
                            let server = self.server;
                            observer(ApplyEvent { server, index, now_ms, input, origin, reply: reply.clone() });
                        }
                        ended = closing
                            .into_iter()
                            .chain(reply.outputs.iter().filter_map(|o| match o {
                                Output::Expired { session } => Some(*session),
                                _ => None,
                            }))
                            .filter(|s| !state.engine.session_is_live(*s))
                            .collect();
                        (origin, reply)
                    }
                }
            };
            if !reply.outputs.is_empty() || origin.is_some() || !ended.is_empty() {
                self.route(Applied { index, origin, reply: reply.clone() }, &ended);
            }
            self.index_tx.send_replace(index);
            if let Some(responder) = responder {
                responder.send(reply);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Machine {
        self.clone()
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMetaOf<C>, snapshot: SnapshotData) -> Result<(), io::Error> {
        self.store.save_snapshot(meta, &snapshot)?;
        let started = std::time::Instant::now();
        let locks = {
            let mut state = self.state();
            state.restore(&snapshot)?;
            state.last_applied = meta.last_log_id;
            state.last_membership = meta.last_membership.clone();
            state.engine.size().1 as u64
        };
        {
            let mut stats = self.snapshot_stats.lock().expect("snapshot stats");
            stats.bytes = snapshot.len() as u64;
            stats.locks = locks;
            stats.restore_ms = started.elapsed().as_millis() as u64;
        }
        if let Some(id) = &meta.last_log_id {
            self.index_tx.send_replace(id.index);
        }
        *self.snapshot.lock().expect("snapshot lock") = Some((meta.clone(), snapshot));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<SnapshotOf<C, SnapshotData>>, io::Error> {
        Ok(self
            .snapshot
            .lock()
            .expect("snapshot lock")
            .clone()
            .map(|(meta, snapshot)| SnapshotOf::<C, SnapshotData> { meta, snapshot }))
    }
}

/// The session an output is for. A rejection goes to whoever sent the request (the entry's
/// origin), so it has none here.
pub fn output_session(output: &Output) -> Option<SessionId> {
    match output {
        Output::Granted { session, .. }
        | Output::Converted { session, .. }
        | Output::Queued { session, .. }
        | Output::Busy { session, .. }
        | Output::Revoke { session, .. }
        | Output::Deadlock { session, .. }
        | Output::Released { session, .. }
        | Output::Cancelled { session, .. }
        | Output::Expired { session }
        | Output::Fence { session } => Some(*session),
        Output::PosixGranted { owner, .. }
        | Output::PosixUnlocked { owner, .. }
        | Output::PosixQueued { owner, .. }
        | Output::PosixBusy { owner, .. }
        | Output::PosixFree { owner }
        | Output::PosixDeadlock { owner }
        | Output::PosixCancelled { owner, .. } => Some(owner.session),
        Output::Rejected { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use lockengine::{ByteRange, LockId, Mode};

    use super::*;

    /// Opens a client session by applying its entry at index `i`.
    fn open_session(state: &mut State, i: u64) -> SessionId {
        let op = Op::OpenSession { lease_ms: 10_000, client: String::new() };
        state.apply(Command { now_ms: 0, origin: None, op }, i).session.unwrap()
    }

    fn lock_cmd(session: SessionId, request: u64, lock: u64, now_ms: u64) -> Command {
        lock_on(session, request, lock, now_ms, "/f")
    }

    fn lock_on(session: SessionId, request: u64, lock: u64, now_ms: u64, resource: &str) -> Command {
        Command {
            now_ms,
            origin: Some(Origin { session, request }),
            op: Op::Engine(Input::Lock {
                lock: LockId((session.0 << crate::types::CLIENT_LOCK_BITS) | lock),
                session,
                resource: resource.into(),
                range: ByteRange::ALL,
                mode: Mode::EX,
                nowait: false,
            }),
        }
    }

    /// A request retried after a lost answer (same session and request number) is answered with
    /// the first reply and changes nothing. A request applied after a higher-numbered one (its
    /// server committed it late, after the client resent elsewhere) is still applied, once.
    #[test]
    fn retried_requests_are_not_applied_twice() {
        let mut state = State::new(Limits::default(), false);
        let open = state.apply(
            Command { now_ms: 0, origin: None, op: Op::OpenSession { lease_ms: 10_000, client: String::new() } },
            1,
        );
        let session = open.session.expect("a session");
        let first = state.apply(lock_cmd(session, 1, 1, 5), 2);
        assert!(matches!(first.outputs.as_slice(), [Output::Granted { .. }]), "{first:?}");
        let tokens_before = state.engine.stats().last_token;
        let retry = state.apply(lock_cmd(session, 1, 1, 6), 3);
        assert!(retry.duplicate);
        assert_eq!(retry.outputs, first.outputs);
        assert_eq!(state.engine.stats().last_token, tokens_before, "the retry was applied again");
        let third = state.apply(lock_on(session, 2, 3, 7, "/g"), 4);
        assert!(matches!(third.outputs.as_slice(), [Output::Granted { .. }]), "{third:?}");
        let late = state.apply(lock_on(session, 3, 2, 8, "/h"), 5);
        assert!(!late.duplicate && matches!(late.outputs.as_slice(), [Output::Granted { .. }]), "{late:?}");
        let late_again = state.apply(lock_on(session, 3, 2, 9, "/h"), 6);
        assert!(late_again.duplicate && late_again.outputs == late.outputs);
        assert_eq!(state.engine.stats().locks_granted, 3);
        // Past the window, an old number is taken as answered (with its reply forgotten).
        for request in 4..4 + ANSWERED_WINDOW as u64 {
            let renew = Command {
                now_ms: 10,
                origin: Some(Origin { session, request }),
                op: Op::Engine(Input::Renew { session }),
            };
            state.apply(renew, 6 + request);
        }
        let ancient = state.apply(lock_cmd(session, 1, 1, 11), 100);
        assert!(ancient.duplicate && ancient.outputs.is_empty(), "{ancient:?}");
        assert_eq!(
            state.engine.stats().last_token,
            late.outputs
                .iter()
                .map(|o| match o {
                    Output::Granted { token, .. } => *token,
                    _ => 0,
                })
                .sum::<u64>()
        );
    }

    /// Issue 14: rows of a stub are striped again one at a time, each only under a write lock
    /// that still holds (the row's stripe lock, or the file's own over the rows' bytes); the
    /// rows are kept in a snapshot, and a whole recall or the file's removal forgets them.
    #[test]
    fn rows_of_a_stub_are_striped_again_only_under_a_lock_that_holds() {
        let mut state = State::new(Limits::default(), false);
        let layout = layout::Layout::new(4096, 2, 1, vec![1, 2, 3]).unwrap();
        let mut index = 10;
        let mut apply = |state: &mut State, op: Op| {
            index += 1;
            state.apply(Command { now_ms: index, origin: None, op }, index)
        };
        let id = apply(&mut state, Op::CreateFile { path: "/f".into(), layout: layout.clone(), writer: None }).file;
        let id = id.unwrap();
        apply(&mut state, Op::CompleteFile { path: "/f".into(), id, size: 10 * 8192 });
        let session = open_session(&mut state, 1);
        let token_of = |reply: Reply| match reply.outputs.as_slice() {
            [Output::Granted { token, .. }] => *token,
            other => panic!("not granted: {other:?}"),
        };
        let whole = token_of(state.apply(lock_cmd(session, 1, 1, 5), 2));
        let stub = Stub { key: "k".into(), size: 10 * 8192, blake3: [0; 32], layout: layout.clone(), migrated_ms: 0 };
        let migrated = apply(&mut state, Op::Migrated { path: "/f".into(), id, token: whole, stub });
        assert!(migrated.error.is_none(), "{migrated:?}");
        let rows = |resource: &str, token: u64, rows: (u64, u64)| Op::RecalledRows {
            path: "/f".into(),
            id,
            resource: resource.into(),
            token,
            rows,
        };
        // Under the file's lock, over rows' bytes it holds.
        assert!(apply(&mut state, rows("/f", whole, (2, 4))).error.is_none());
        assert!(apply(&mut state, rows("/f", whole + 1, (5, 6))).error.is_some(), "a token that is not held");
        // Under row 7's stripe lock: that row only.
        let stripe = token_of(state.apply(lock_on(session, 2, 2, 6, &stripe_resource(id, 7)), 3));
        assert!(apply(&mut state, rows(&stripe_resource(id, 7), stripe, (7, 8))).error.is_none());
        assert!(apply(&mut state, rows(&stripe_resource(id, 7), stripe, (8, 9))).error.is_some(), "another row");
        assert!(apply(&mut state, rows(&stripe_resource(id, 7), stripe, (7, 9))).error.is_some(), "two rows");
        assert!(apply(&mut state, rows("/g", stripe, (7, 8))).error.is_some(), "another resource");
        let striped = state.recalled_rows(id);
        assert_eq!(striped.ranges().collect::<Vec<_>>(), vec![(2, 4), (7, 8)]);
        assert!(striped.contains(3) && !striped.contains(4) && !striped.contains(6) && striped.contains(7));
        assert_eq!(striped.len(), 3);
        // Kept by a snapshot.
        let mut copy = State::new(Limits::default(), false);
        copy.restore(&state.to_bytes().unwrap()).unwrap();
        assert_eq!(copy.recalled_rows(id), striped);
        // Rows merge; a whole recall forgets them, and then no row is recalled any more.
        assert!(apply(&mut state, rows("/f", whole, (4, 7))).error.is_none());
        assert_eq!(state.recalled_rows(id).ranges().collect::<Vec<_>>(), vec![(2, 8)]);
        let recalled = apply(&mut state, Op::Recalled { path: "/f".into(), id, token: whole, layout });
        assert!(recalled.error.is_none(), "{recalled:?}");
        assert!(state.recalled_rows(id).is_empty() && !state.stubs.contains_key(&id));
        assert!(apply(&mut state, rows("/f", whole, (0, 1))).error.is_some(), "not a stub any more");
    }

    /// Issue 15: a file created by a client with an identity counts against that identity's
    /// bytes as it grows, shrinks, is renamed over and taken out; files of nobody count for
    /// nobody; a restored snapshot counts the same.
    #[test]
    fn an_owners_stored_bytes_follow_its_files() {
        let mut state = State::new(Limits::default(), false);
        let layout = layout::Layout::new(4096, 2, 1, vec![1, 2, 3]).unwrap();
        let mut index = 0;
        let mut run = |state: &mut State, op: Op| {
            index += 1;
            let reply = state.apply(Command { now_ms: index, origin: None, op }, index);
            assert!(reply.error.is_none(), "{reply:?}");
            reply.file.unwrap_or(0)
        };
        let owned = |owner: &str, op: Op| Op::Owned { owner: owner.into(), op: Box::new(op) };
        let create = |path: &str| Op::CreateFile { path: path.into(), layout: layout.clone(), writer: None };
        let a = run(&mut state, owned("alice", create("/a")));
        run(&mut state, Op::CompleteFile { path: "/a".into(), id: a, size: 1000 });
        let b = run(&mut state, owned("alice", create("/b")));
        run(&mut state, Op::CompleteFile { path: "/b".into(), id: b, size: 500 });
        let c = run(&mut state, owned("bob", create("/c")));
        run(&mut state, Op::CompleteFile { path: "/c".into(), id: c, size: 70 });
        let n = run(&mut state, create("/nobody's"));
        run(&mut state, Op::CompleteFile { path: "/nobody's".into(), id: n, size: 1 << 30 });
        let made = run(
            &mut state,
            owned(
                "bob",
                Op::Name(NameOp::Create { path: "/m".into(), layout: layout.clone(), mode: 0o644, uid: 0, gid: 0 }),
            ),
        );
        assert_eq!((state.stored_bytes("alice"), state.stored_bytes("bob")), (1500, 70));
        assert_eq!(state.owners.get(&made).map(String::as_str), Some("bob"));
        // Growing, truncating, renaming onto another file (which goes), unlinking.
        run(&mut state, Op::GrowFile { path: "/a".into(), id: a, size: 4000 });
        assert_eq!(state.stored_bytes("alice"), 4500);
        let setattr = |path: &str, size: u64| {
            Op::Name(NameOp::SetAttr {
                path: path.into(),
                ino: 0,
                mode: None,
                uid: None,
                gid: None,
                atime_ns: None,
                mtime_ns: None,
                size: Some(size),
                touch: true,
            })
        };
        run(&mut state, setattr("/m", 30));
        run(&mut state, setattr("/b", 100));
        assert_eq!((state.stored_bytes("alice"), state.stored_bytes("bob")), (4100, 100));
        run(&mut state, Op::Name(NameOp::Rename { from: "/c".into(), to: "/a".into(), flags: 0 }));
        assert_eq!((state.stored_bytes("alice"), state.stored_bytes("bob")), (100, 100));
        assert!(!state.owners.contains_key(&a), "the replaced file's owner stays");
        run(
            &mut state,
            Op::Name(NameOp::Rename { from: "/b".into(), to: "/a".into(), flags: crate::types::RENAME_EXCHANGE }),
        );
        assert_eq!((state.stored_bytes("alice"), state.stored_bytes("bob")), (100, 100));
        let copy_bytes = state.to_bytes().unwrap();
        let mut copy = State::new(Limits::default(), false);
        copy.restore(&copy_bytes).unwrap();
        assert_eq!(copy.stored, state.stored);
        assert_eq!(copy.owners, state.owners);
        // `/a` is alice's `b` since the exchange.
        run(&mut state, Op::Name(NameOp::Unlink { path: "/a".into() }));
        run(&mut state, Op::RemoveFile { path: "/m".into(), id: made });
        assert_eq!((state.stored_bytes("alice"), state.stored_bytes("bob")), (0, 70));
        assert!(state.stored.keys().all(|o| o == "bob"), "{:?}", state.stored);
        assert_eq!(state.owners.len(), 1, "{:?}", state.owners);
    }

    /// Issue 10: a put whose writer's session ends (closed here; expired and fenced alike)
    /// before it completes is rolled back by applying the log, on every replica alike and on
    /// one restored from a snapshot; a completed file and a put of a live session stay.
    #[test]
    fn an_unfinished_put_of_an_ended_session_is_rolled_back() {
        let mut state = State::new(Limits::default(), false);
        let (dying, living) = (open_session(&mut state, 1), open_session(&mut state, 2));
        let layout = layout::Layout::new(4096, 2, 1, vec![1, 2, 3]).unwrap();
        let create = |path: &str, writer| Command {
            now_ms: 1,
            origin: None,
            op: Op::CreateFile { path: path.into(), layout: layout.clone(), writer: Some(writer) },
        };
        let a = state.apply(create("/a", dying), 3).file.unwrap();
        state.apply(create("/b", living), 4);
        let done = state.apply(create("/c", dying), 5).file.unwrap();
        state.apply(
            Command { now_ms: 2, origin: None, op: Op::CompleteFile { path: "/c".into(), id: done, size: 9 } },
            6,
        );
        let mut copy = State::new(Limits::default(), false);
        copy.restore(&state.to_bytes().unwrap()).unwrap();
        let close = Command { now_ms: 3, origin: None, op: Op::Engine(Input::CloseSession { session: dying }) };
        for s in [&mut state, &mut copy] {
            s.apply(close.clone(), 7);
            assert!(!s.files.contains_key("/a"), "the dead writer's unfinished put stayed");
            assert!(s.files.contains_key("/b") && s.files.contains_key("/c"));
            assert_eq!(s.puts_rolled_back, 1);
            assert_eq!(s.last_file_id(), 3);
            // The path is free again; the old id is not reused.
            let again = s.apply(create("/a", living), 8).file.unwrap();
            assert!(again > a);
        }
        // A put for a session already gone is refused outright.
        let refused = state.apply(create("/d", dying), 9);
        assert_eq!(refused.error, Some(NamespaceError::WriterEnded { path: "/d".into() }));
    }

    /// Issue 16: stale marks of degraded writes are ORed per row, survive a snapshot, clear per
    /// role, go with a unit moved by `SetLayout`, and are refused for a file that is not there.
    #[test]
    fn stale_marks_are_kept_per_row_and_cleared_per_role() {
        let mut state = State::new(Limits::default(), false);
        let layout = layout::Layout::new(4096, 2, 1, vec![1, 2, 3]).unwrap();
        let at = |op| Command { now_ms: 1, origin: None, op };
        let id = state.apply(at(Op::CreateFile { path: "/f".into(), layout: layout.clone(), writer: None }), 1);
        let id = id.file.unwrap();
        let mark = |rows: Vec<(u64, u8)>| at(Op::MarkStale { id, rows });
        assert_eq!(state.apply(mark(vec![(0, 0b001), (3, 0b100)]), 2).error, None);
        state.apply(mark(vec![(0, 0b010)]), 3);
        assert_eq!((state.stale_mask(id, 0), state.stale_mask(id, 3), state.stale_mask(id, 1)), (0b011, 0b100, 0));
        assert_eq!(state.stale_rows(), 2);
        // A server first seen with a volume is not wiped; seen again with another, it is.
        state.apply(at(Op::VolumeSeen { server: 2, volume: 0xa }), 4);
        state.apply(at(Op::VolumeSeen { server: 2, volume: 0xa }), 4);
        assert!(state.wiped.is_empty());
        state.apply(at(Op::VolumeSeen { server: 2, volume: 0xb }), 4);
        let mut copy = State::new(Limits::default(), false);
        copy.restore(&state.to_bytes().unwrap()).unwrap();
        assert_eq!((copy.stale_mask(id, 0), copy.stale_mask(id, 3), copy.stale_rows()), (0b011, 0b100, 2));
        assert!(copy.wiped.contains(&2));
        copy.apply(at(Op::ClearStale { id, rows: vec![(0, 0b001), (3, 0b100)] }), 5);
        assert_eq!((copy.stale_mask(id, 0), copy.stale_mask(id, 3), copy.stale_rows()), (0b010, 0, 1));
        // Row 0's data unit 1 is on server 2 (rotation puts row 0's units on 1, 2, 3); moved to
        // server 4, it was rebuilt there and its mark goes.
        let moved = layout::Layout::new(4096, 2, 1, vec![1, 4, 3]).unwrap();
        copy.apply(at(Op::SetLayout { path: "/f".into(), id, layout: moved }), 6);
        assert_eq!(copy.stale_mask(id, 0) & (1 << 1), 0, "{:b}", copy.stale_mask(id, 0));
        copy.apply(at(Op::ServerRebuilt { server: 2 }), 7);
        assert!(copy.wiped.is_empty());
        let gone = copy.apply(at(Op::MarkStale { id: 99, rows: vec![(0, 1)] }), 8);
        assert!(matches!(gone.error, Some(NamespaceError::NotFound { .. })), "{gone:?}");
    }

    /// The state survives a snapshot: sessions, tokens, the secret and the answered requests.
    #[test]
    fn snapshot_round_trip() {
        let mut state = State::new(Limits::default(), false);
        state.apply(Command { now_ms: 0, origin: None, op: Op::Bootstrap { secret: [7; 32] } }, 1);
        let open = state.apply(
            Command { now_ms: 0, origin: None, op: Op::OpenSession { lease_ms: 10_000, client: String::new() } },
            2,
        );
        let session = open.session.expect("a session");
        let first = state.apply(lock_cmd(session, 1, 1, 5), 3);
        let bytes = state.to_bytes().unwrap();
        let mut copy = State::new(Limits::default(), false);
        copy.restore(&bytes).unwrap();
        assert_eq!(copy.secret, Some([7; 32]));
        assert_eq!(copy.next_session, state.next_session);
        assert_eq!(copy.engine.snapshot(), state.engine.snapshot());
        let retry = copy.apply(lock_cmd(session, 1, 1, 6), 4);
        assert!(retry.duplicate && retry.outputs == first.outputs);
    }

    /// A state like a busy cluster's: `sessions` client sessions, each with `locks_each` PW locks
    /// on 4 KiB ranges spread over `files` files, every request with an origin (so the answered
    /// replies are kept), and `files` completed files. Returns it and one entry of each typical
    /// kind: an open, a lock request, a create and a tick.
    fn busy_state(sessions: u64, locks_each: u64, files: u64) -> (State, Vec<Command>) {
        let mut state = State::new(Limits::default(), false);
        let mut index = 0;
        let mut apply = |state: &mut State, cmd: Command| {
            index += 1;
            state.apply(cmd, index)
        };
        apply(&mut state, Command { now_ms: 0, origin: None, op: Op::Bootstrap { secret: [7; 32] } });
        let layout = layout::Layout::new(1 << 20, 4, 2, vec![1, 2, 3, 4, 5, 6]).unwrap();
        let now_ms = 1_764_400_000_000;
        let open =
            |s: u64| Op::OpenSession { lease_ms: 10_000, client: format!("pid {} on host-{}", 40_000 + s, s % 3) };
        let lock = |session: SessionId, n: u64| {
            let i = session.0 * locks_each + n;
            Op::Engine(Input::Lock {
                lock: crate::types::engine_lock_id(session, n).unwrap(),
                session,
                resource: format!("/data/file-{}", i % files),
                range: ByteRange::new(i * 4096, i * 4096 + 4096).unwrap(),
                mode: Mode::PW,
                nowait: false,
            })
        };
        let create =
            |k: u64, writer| Op::CreateFile { path: format!("/data/file-{k}"), layout: layout.clone(), writer };
        for s in 1..=sessions {
            let session = apply(&mut state, Command { now_ms, origin: None, op: open(s) }).session.unwrap();
            for n in 1..=locks_each {
                let origin = Some(Origin { session, request: n });
                let reply = apply(&mut state, Command { now_ms, origin, op: lock(session, n) });
                assert!(matches!(reply.outputs.as_slice(), [Output::Granted { .. }]), "{reply:?}");
            }
        }
        for k in 0..files {
            let origin = Some(Origin { session: SessionId(1), request: locks_each + 1 + k });
            let id = apply(&mut state, Command { now_ms, origin, op: create(k, Some(SessionId(1))) }).file.unwrap();
            let op = Op::CompleteFile { path: format!("/data/file-{k}"), id, size: 64 << 20 };
            apply(&mut state, Command { now_ms, origin: None, op });
        }
        let origin = Some(Origin { session: SessionId(1), request: 1_000_000 });
        let typical = vec![
            Command { now_ms, origin: None, op: open(sessions + 1) },
            Command { now_ms, origin, op: lock(SessionId(1), locks_each + 1) },
            Command { now_ms, origin, op: create(files, Some(SessionId(1))) },
            Command { now_ms, origin: None, op: Op::Engine(Input::Tick) },
        ];
        (state, typical)
    }

    /// The snapshot is the state's encoding, stored and sent as it is (issue 11: it was JSON
    /// stored as a JSON array of its bytes, 3.5 times larger), and restores the same state.
    #[tokio::test]
    async fn the_snapshot_is_stored_and_sent_without_a_second_encoding() {
        let (state, _) = busy_state(50, 10, 20);
        let bytes = state.to_bytes().unwrap();
        assert_eq!(bytes[0], codec::FORMAT_VERSION);
        let json = serde_json::to_vec(&state.snapshot_data()).unwrap();
        assert!(bytes.len() * 2 < json.len(), "{} bytes against {} in JSON", bytes.len(), json.len());

        let db = redb::Database::builder().create_with_backend(redb::backends::InMemoryBackend::new()).unwrap();
        let store = Store::in_memory(Arc::new(db)).unwrap();
        let meta =
            SnapshotMetaOf::<C> { last_log_id: Some(openraft::testing::log_id::<C>(1, 1, 9)), ..Default::default() };
        store.save_snapshot(&meta, &bytes).unwrap();
        let (_, stored) = store.snapshot().unwrap().unwrap();
        assert_eq!(stored, bytes);
        let vote = openraft::type_config::alias::VoteOf::<C>::new_committed(1, 1);
        let sent = crate::network::encode_snapshot(&vote, &meta, &bytes).unwrap();
        assert!(
            sent.data.len() <= bytes.len() + 64,
            "{} bytes sent for a {}-byte snapshot",
            sent.data.len(),
            bytes.len()
        );

        let mut copy = State::new(Limits::default(), false);
        copy.restore(&stored).unwrap();
        assert_eq!(copy.to_bytes().unwrap(), bytes);
    }

    /// Sizes for docs/benchmarks.md: entries and snapshot in the JSON of earlier builds and in
    /// the versioned binary records.
    /// `cargo test -p server --lib -- --ignored --nocapture format_sizes`
    #[test]
    #[ignore = "prints figures"]
    fn format_sizes() {
        use openraft::type_config::alias::{EntryOf, VoteOf};
        let (sessions, locks_each, files) = (1_000, 10, 1_000);
        let (state, typical) = busy_state(sessions, locks_each, files);
        println!("state: {sessions} sessions, {} locks, {files} files", sessions * locks_each);
        println!("| record | JSON (before) | binary (after) | after/before |");
        println!("|---|---|---|---|");
        let row = |what: &str, before: usize, after: usize| {
            println!("| {what} | {before} | {after} | {:.2} |", after as f64 / before as f64);
        };
        for (cmd, name) in typical.into_iter().zip(["OpenSession", "Engine(Lock)", "CreateFile", "Engine(Tick)"]) {
            let index = 123_456;
            let entry = EntryOf::<C> {
                log_id: openraft::testing::log_id::<C>(3, 1, index),
                payload: EntryPayload::Normal(cmd),
            };
            let after = codec::encode(codec::Record::LogEntry { index }, &entry).unwrap().len();
            row(&format!("log entry {name}"), serde_json::to_vec(&entry).unwrap().len(), after);
        }
        let json = serde_json::to_vec(&state.snapshot_data()).unwrap();
        let bytes = state.to_bytes().unwrap();
        row("state snapshot (its bytes)", json.len(), bytes.len());
        let meta = SnapshotMetaOf::<C> {
            last_log_id: Some(openraft::testing::log_id::<C>(3, 1, 123_456)),
            last_membership: openraft::StoredMembership::new(
                Some(openraft::testing::log_id::<C>(1, 1, 1)),
                openraft::Membership::new(
                    vec![[1, 2, 3].into()],
                    (1..=3)
                        .map(|id| (id, crate::types::NodeAddr { addr: format!("10.0.0.{id}:7001") }))
                        .collect::<BTreeMap<_, _>>(),
                )
                .unwrap(),
            ),
        };
        // Before: `(meta, bytes)` as JSON under one key, the bytes an array of numbers. After: the
        // meta record and the bytes as they are.
        let stored_before = serde_json::to_vec(&(&meta, &json)).unwrap().len();
        let stored_after = codec::encode(codec::Record::SnapshotMeta, &meta).unwrap().len() + bytes.len();
        row("snapshot as stored (meta and bytes)", stored_before, stored_after);
        let vote = VoteOf::<C>::new_committed(3, 1);
        let sent_before = serde_json::to_vec(&(&vote, &meta, &json)).unwrap().len();
        let sent_after = crate::network::encode_snapshot(&vote, &meta, &bytes).unwrap().data.len();
        row("full-snapshot message", sent_before, sent_after);
    }

    /// Issue 10 (server memory grew with every short session and stayed): the queue a session's
    /// stream reads on its server was kept after the session ended, and with it the stream's task
    /// and buffers. Now a closed session's queue ends after its last entry, an expired one's after
    /// the expiry, and the closed session's answered requests are gone.
    #[tokio::test]
    async fn an_ended_sessions_queue_and_answers_are_dropped() {
        use openraft::entry::RaftEntry;
        let db = redb::Database::builder().create_with_backend(redb::backends::InMemoryBackend::new()).unwrap();
        let store = Store::in_memory(Arc::new(db)).unwrap();
        let mut machine = Machine::new(store, 1, Limits::default(), &Env::default()).unwrap();
        let mut index = 0;
        let mut apply = async |machine: &mut Machine, cmd: Command| {
            index += 1;
            let entry = openraft::type_config::alias::EntryOf::<C>::new(
                openraft::testing::log_id::<C>(1, 1, index),
                EntryPayload::Normal(cmd),
            );
            machine.apply(futures::stream::iter([Ok((entry, None))])).await.unwrap();
        };
        let open = Command { now_ms: 0, origin: None, op: Op::OpenSession { lease_ms: 1_000, client: String::new() } };
        apply(&mut machine, open.clone()).await;
        apply(&mut machine, open).await;
        let (closed, expired) = (SessionId(1), SessionId(2));
        let mut closed_rx = machine.attach(closed);
        let mut expired_rx = machine.attach(expired);
        assert_eq!(machine.attached_sessions(), 2);

        apply(&mut machine, lock_cmd(closed, 1, 1, 5)).await;
        let close = Command {
            now_ms: 6,
            origin: Some(Origin { session: closed, request: 2 }),
            op: Op::Engine(Input::CloseSession { session: closed }),
        };
        apply(&mut machine, close).await;
        assert!(closed_rx.recv().await.is_some_and(|a| a.index == 3), "the grant");
        assert!(closed_rx.recv().await.is_some_and(|a| a.index == 4), "the close's own answer");
        // Bounded, so that on a failure the test fails rather than waits for good.
        let end = async |rx: &mut mpsc::Receiver<Arc<Applied>>| {
            tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv()).await
        };
        assert!(matches!(end(&mut closed_rx).await, Ok(None)), "the closed session's queue must end");
        assert_eq!(machine.attached_sessions(), 1);
        assert!(!machine.state().answered.contains_key(&closed));

        // Time alone expires nobody here: the leader's lease table proposes the expiry.
        apply(&mut machine, Command { now_ms: 5_000, origin: None, op: Op::Engine(Input::Tick) }).await;
        assert!(machine.state().engine.session_is_live(expired), "a session expired by the log's time");
        apply(&mut machine, Command { now_ms: 5_001, origin: None, op: Op::Engine(Input::Evict { session: expired }) })
            .await;
        let a = expired_rx.recv().await.expect("the expiry");
        assert!(a.reply.outputs.iter().any(|o| matches!(o, Output::Expired { session } if *session == expired)));
        assert!(matches!(end(&mut expired_rx).await, Ok(None)), "the expired session's queue must end");
        assert_eq!(machine.attached_sessions(), 0);
    }

    /// A handover releases the gateway's read lock and grants the client's write in one entry;
    /// when the read lock is already gone, the request alone is made and the client sees no
    /// refusal.
    #[test]
    fn a_handover_trades_a_read_lock_for_a_write_in_one_entry() {
        let mut state = State::new(Limits::default(), false);
        let (gateway, client) = (open_session(&mut state, 1), open_session(&mut state, 2));
        let id = |s: SessionId, n: u64| LockId((s.0 << crate::types::CLIENT_LOCK_BITS) | n);
        let read = Input::Lock {
            lock: id(gateway, 1),
            session: gateway,
            resource: "/f".into(),
            range: ByteRange::ALL,
            mode: Mode::PR,
            nowait: false,
        };
        state.apply(
            Command { now_ms: 1, origin: Some(Origin { session: gateway, request: 1 }), op: Op::Engine(read) },
            3,
        );
        let write = |n: u64| Input::Lock {
            lock: id(client, n),
            session: client,
            resource: "/f".into(),
            range: ByteRange::new(10 * n, 10 * n + 10).unwrap(),
            mode: Mode::PW,
            nowait: false,
        };
        let handover = Op::Handover { release: id(gateway, 1), request: write(1) };
        let reply =
            state.apply(Command { now_ms: 2, origin: Some(Origin { session: client, request: 1 }), op: handover }, 4);
        assert!(
            matches!(
                reply.outputs.as_slice(),
                [Output::Released { session: g, .. }, Output::Granted { session: c, mode: Mode::PW, .. }]
                    if *g == gateway && *c == client
            ),
            "{reply:?}"
        );
        // The read lock is gone now: a second handover naming it is just the request.
        let again = Op::Handover { release: id(gateway, 1), request: write(2) };
        let reply =
            state.apply(Command { now_ms: 3, origin: Some(Origin { session: client, request: 2 }), op: again }, 5);
        assert!(matches!(reply.outputs.as_slice(), [Output::Granted { mode: Mode::PW, .. }]), "{reply:?}");
    }
}
