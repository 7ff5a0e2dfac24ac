//! The lock table and its step function. Everything here is deterministic: no clock, no
//! randomness, no iteration over a hash map that could leak into the order of outputs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use rangemap::RangeMap;
use rustc_hash::{FxHashMap, FxHashSet};

use crate::index::RangeIndex;
use crate::table::LockTable;
use crate::{
    ByteRange, EngineError, Input, LimitKind, Limits, LockId, Mode, Output, PosixKind, PosixOwner, SessionId, Subject,
    TOKEN_EPOCH_SHIFT, Token, ValueBlock,
};

pub(crate) type ResIdx = u32;

/// A node of the wait-for graph: whoever holds locks and waits for others.
/// DLM locks are owned by their session; POSIX locks by their (session, owner) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OwnerKey {
    Session(SessionId),
    Posix(PosixOwner),
}

/// One waiting request: a DLM lock (new or converting) or a blocked POSIX request (by arrival number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum WaitKey {
    Lock(LockId),
    Posix(u64),
}

/// Place in a resource's queue: the convert queue (class 0) is served before new requests
/// (class 1), each in arrival order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct QueuePos {
    pub(crate) class: u8,
    pub(crate) seq: u64,
}

const CONVERT: u8 = 0;
const NEW: u8 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Grant {
    pub(crate) mode: Mode,
    pub(crate) range: ByteRange,
    pub(crate) token: Token,
}

#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub(crate) mode: Mode,
    pub(crate) range: ByteRange,
    pub(crate) pos: QueuePos,
    /// Who this request waits for, as of the last scan of its resource: conflicting granted
    /// locks and conflicting earlier requests.
    pub(crate) blockers: Vec<LockId>,
    /// The owners of those blockers, less the holders of cached locks (a cached lock is given
    /// up on revoke, so waiting for it cannot deadlock). These are this request's edges of the
    /// wait-for graph, kept incrementally.
    pub(crate) edges: Vec<OwnerKey>,
}

#[derive(Debug, Clone)]
pub(crate) struct Lock {
    pub(crate) session: SessionId,
    pub(crate) res: ResIdx,
    /// `None` while a new request waits.
    pub(crate) grant: Option<Grant>,
    /// A waiting new request, or a pending conversion of a granted lock.
    pub(crate) request: Option<Request>,
    pub(crate) cached: bool,
    pub(crate) revoke_sent: bool,
    /// The value block this PW/EX holder will write on release or downgrade.
    pub(crate) value: Option<Box<[u8]>>,
}

#[derive(Debug, Clone)]
pub(crate) struct PosixWait {
    pub(crate) owner: PosixOwner,
    pub(crate) res: ResIdx,
    pub(crate) range: ByteRange,
    pub(crate) kind: PosixKind,
    pub(crate) blockers: Vec<PosixOwner>,
}

#[derive(Debug, Clone)]
pub(crate) struct Session {
    pub(crate) lease_ms: u64,
    pub(crate) deadline_ms: u64,
    /// Expired: its locks still block others until storage acknowledges the fence.
    pub(crate) fencing: bool,
    /// Every DLM lock of the session, granted or waiting.
    pub(crate) locks: FxHashSet<LockId>,
    pub(crate) waiting: BTreeSet<LockId>,
    pub(crate) posix_waits: BTreeSet<u64>,
    /// Resources on which some POSIX owner of this session holds ranges, with the owner count.
    pub(crate) posix_resources: BTreeMap<ResIdx, u32>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Resource {
    pub(crate) name: Arc<str>,
    pub(crate) granted: RangeIndex,
    /// Pending requests (new and converting), by requested range.
    pub(crate) waiting: RangeIndex,
    pub(crate) queue: BTreeMap<QueuePos, LockId>,
    pub(crate) value: Option<Box<[u8]>>,
    pub(crate) value_invalid: bool,
    pub(crate) posix: BTreeMap<PosixOwner, RangeMap<u64, PosixKind>>,
    pub(crate) posix_queue: BTreeSet<u64>,
    pub(crate) live: bool,
}

impl Resource {
    fn is_empty(&self) -> bool {
        self.granted.is_empty() && self.queue.is_empty() && self.posix.is_empty() && self.posix_queue.is_empty()
    }

    pub(crate) fn value_block(&self) -> ValueBlock {
        match (&self.value, self.value_invalid) {
            (_, true) => ValueBlock::Invalid,
            (None, false) => ValueBlock::Empty,
            (Some(v), false) => ValueBlock::Value(v.clone()),
        }
    }

    pub(crate) fn waiter_count(&self) -> usize {
        self.queue.len() + self.posix_queue.len()
    }
}

/// The lock engine. Its one mutating entry point is [`Engine::step`].
#[derive(Debug, Clone)]
pub struct Engine {
    pub(crate) limits: Limits,
    pub(crate) now_ms: u64,
    pub(crate) epoch: u64,
    pub(crate) last_token: Token,
    pub(crate) next_seq: u64,
    pub(crate) sessions: FxHashMap<SessionId, Session>,
    pub(crate) expiry: BTreeSet<(u64, SessionId)>,
    pub(crate) locks: LockTable<Lock>,
    pub(crate) names: FxHashMap<Arc<str>, ResIdx>,
    pub(crate) resources: Vec<Resource>,
    pub(crate) free: Vec<ResIdx>,
    pub(crate) posix_waits: BTreeMap<u64, PosixWait>,
    /// Resources an input touched, to serve and maybe free before the step ends (may repeat).
    pub(crate) dirty: Vec<ResIdx>,
    /// Scratch for `settle`, kept to avoid allocating on every step.
    touched: Vec<ResIdx>,
    /// Negative control only: drop an expired session's locks without waiting for the fence.
    skip_fence_wait: bool,
    /// Sessions expire when their deadline passes in the engine's time (`Renew` moves it). Off
    /// when leases are kept outside the engine (the lock service's leader keeps them in memory
    /// and expires a session with `Evict`): then time never expires anyone here.
    expire_by_time: bool,
}

impl Default for Engine {
    fn default() -> Engine {
        Engine::new(Limits::default())
    }
}

impl Engine {
    pub fn new(limits: Limits) -> Engine {
        Engine {
            limits,
            now_ms: 0,
            epoch: 0,
            last_token: 0,
            next_seq: 0,
            sessions: FxHashMap::default(),
            expiry: BTreeSet::new(),
            locks: LockTable::default(),
            names: FxHashMap::default(),
            resources: Vec::new(),
            free: Vec::new(),
            posix_waits: BTreeMap::new(),
            dirty: Vec::new(),
            touched: Vec::new(),
            skip_fence_wait: false,
            expire_by_time: true,
        }
    }

    /// Leases are kept outside: no session expires by time, only by `Evict` (a restored engine
    /// needs this again; it is how the engine is run, not part of its state).
    pub fn keep_leases_outside(&mut self) {
        self.expire_by_time = false;
    }

    /// Every session that is neither closed nor expired, with the lease it asked for.
    pub fn live_sessions(&self) -> impl Iterator<Item = (SessionId, u64)> + '_ {
        self.sessions.iter().filter(|(_, s)| !s.fencing).map(|(id, s)| (*id, s.lease_ms))
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Applies one input at time `now_ms` and returns the effects, in order.
    pub fn step(&mut self, now_ms: u64, input: Input) -> Vec<Output> {
        let mut out = Vec::new();
        self.step_into(now_ms, input, &mut out);
        out
    }

    /// [`Engine::step`], appending to a caller's buffer so a hot loop allocates nothing.
    ///
    /// Time never goes back: a `now_ms` below the engine's clock is taken as the engine's clock
    /// (a new Raft leader's clock may lag the old one's; replicas still apply identically).
    pub fn step_into(&mut self, now_ms: u64, input: Input, out: &mut Vec<Output>) {
        self.now_ms = self.now_ms.max(now_ms);
        self.expire_sessions(out);
        let subject = subject_of(&input);
        if let Err(error) = self.apply(input, out) {
            out.push(Output::Rejected { subject, error });
        }
        self.settle(out);
    }

    fn apply(&mut self, input: Input, out: &mut Vec<Output>) -> Result<(), EngineError> {
        // Ranges arrive as plain pairs: an empty or inverted one is refused before anything.
        if let Input::Lock { range, .. }
        | Input::Convert { range: Some(range), .. }
        | Input::Posix { range, .. }
        | Input::PosixTest { range, .. } = &input
        {
            ByteRange::new(range.start, range.end)?;
        }
        match input {
            Input::Tick => Ok(()),
            Input::OpenSession { session, lease_ms } => self.open_session(session, lease_ms),
            Input::Renew { session } => {
                let now = self.now_ms;
                let s = self.live_session_mut(session)?;
                let old = s.deadline_ms;
                s.deadline_ms = now.saturating_add(s.lease_ms);
                let new = s.deadline_ms;
                self.expiry.remove(&(old, session));
                self.expiry.insert((new, session));
                Ok(())
            }
            Input::CloseSession { session } => self.close_session(session, out),
            Input::SetEpoch { epoch } => {
                if epoch < self.epoch {
                    return Err(EngineError::EpochBackwards { requested: epoch, current: self.epoch });
                }
                self.epoch = epoch;
                Ok(())
            }
            Input::Lock { lock, session, resource, range, mode, nowait } => {
                self.lock(lock, session, resource, range, mode, nowait, out)
            }
            Input::Convert { lock, mode, range } => self.convert(lock, mode, range, out),
            Input::Release { lock } => self.release(lock, out),
            Input::Cancel { lock } => self.cancel(lock, out),
            Input::Cache { lock } => {
                let l = self.owned_lock(lock)?;
                if l.grant.is_none() {
                    return Err(EngineError::NotGranted);
                }
                // A holder asking for more is using the lock: it cannot also be idle in a cache.
                if l.request.is_some() {
                    return Err(EngineError::AlreadyConverting);
                }
                let res = l.res;
                self.locks.get_mut(&lock).expect("checked").cached = true;
                // A waiter may already be blocked by this lock: the scan sends the revoke.
                self.dirty.push(res);
                Ok(())
            }
            Input::SetValue { lock, value } => {
                let max = self.limits.value_block_bytes_max;
                let l = self.owned_lock(lock)?;
                match l.grant {
                    None => return Err(EngineError::NotGranted),
                    Some(g) if !g.mode.is_write() => return Err(EngineError::NotWriter),
                    Some(_) => {}
                }
                if value.len() > max {
                    return Err(EngineError::ValueTooLarge { len: value.len(), max });
                }
                self.locks.get_mut(&lock).expect("checked").value = Some(value.into_boxed_slice());
                Ok(())
            }
            Input::FenceAck { session } => self.fence_ack(session, out),
            Input::Evict { session } => {
                let deadline = self.check_live(session)?.deadline_ms;
                self.expiry.remove(&(deadline, session));
                self.start_fencing(session, out);
                Ok(())
            }
            Input::Posix { owner, resource, range, kind, wait } => self.posix(owner, resource, range, kind, wait, out),
            Input::PosixTest { owner, resource, range, kind } => self.posix_test(owner, &resource, range, kind, out),
            Input::PosixCancel { owner, resource } => self.posix_cancel(owner, &resource, out),
        }
    }

    // ---- sessions -------------------------------------------------------------------------

    fn open_session(&mut self, session: SessionId, lease_ms: u64) -> Result<(), EngineError> {
        if self.sessions.contains_key(&session) {
            return Err(EngineError::SessionExists);
        }
        if self.sessions.len() as u64 >= self.limits.sessions_max {
            return Err(EngineError::Limit { kind: LimitKind::Sessions, max: self.limits.sessions_max });
        }
        let deadline_ms = self.now_ms.saturating_add(lease_ms);
        self.sessions.insert(
            session,
            Session {
                lease_ms,
                deadline_ms,
                fencing: false,
                locks: FxHashSet::default(),
                waiting: BTreeSet::new(),
                posix_waits: BTreeSet::new(),
                posix_resources: BTreeMap::new(),
            },
        );
        self.expiry.insert((deadline_ms, session));
        Ok(())
    }

    pub(crate) fn live_session_mut(&mut self, session: SessionId) -> Result<&mut Session, EngineError> {
        match self.sessions.get_mut(&session) {
            None => Err(EngineError::UnknownSession),
            Some(s) if s.fencing => Err(EngineError::SessionExpired),
            Some(s) => Ok(s),
        }
    }

    pub(crate) fn check_live(&self, session: SessionId) -> Result<&Session, EngineError> {
        match self.sessions.get(&session) {
            None => Err(EngineError::UnknownSession),
            Some(s) if s.fencing => Err(EngineError::SessionExpired),
            Some(s) => Ok(s),
        }
    }

    /// A lock whose session is live: an expired session can change nothing until it is fenced.
    fn owned_lock(&self, lock: LockId) -> Result<&Lock, EngineError> {
        let l = self.locks.get(&lock).ok_or(EngineError::UnknownLock)?;
        self.check_live(l.session)?;
        Ok(l)
    }

    /// Expires every session whose lease has passed: its waiters are cancelled at once (a waiter
    /// of an expired session is never granted), its granted locks stay until `FenceAck`.
    fn expire_sessions(&mut self, out: &mut Vec<Output>) {
        if !self.expire_by_time {
            return;
        }
        while let Some(&(deadline, session)) = self.expiry.first() {
            if deadline >= self.now_ms {
                break;
            }
            self.expiry.pop_first();
            self.start_fencing(session, out);
        }
    }

    /// A session ends without releasing (its lease ran out, or it was evicted): its waiters are
    /// cancelled, and its granted locks stay until storage acknowledges the fence.
    fn start_fencing(&mut self, session: SessionId, out: &mut Vec<Output>) {
        self.sessions.get_mut(&session).expect("fencing a session that does not exist").fencing = true;
        out.push(Output::Expired { session });
        out.push(Output::Fence { session });
        self.cancel_waits_of(session, out);
        if self.skip_fence_wait {
            self.drop_session(session, true, out);
        }
    }

    /// Breaks fence-before-grant on purpose: an expired session's locks are dropped at once,
    /// before storage has fenced it. Only for the simulation's negative control, which must
    /// see its checker fail; never call it elsewhere.
    #[doc(hidden)]
    pub fn break_fencing_for_negative_control(&mut self) {
        self.skip_fence_wait = true;
    }

    fn cancel_waits_of(&mut self, session: SessionId, out: &mut Vec<Output>) {
        let s = &self.sessions[&session];
        let waiting: Vec<LockId> = s.waiting.iter().copied().collect();
        let posix: Vec<u64> = s.posix_waits.iter().copied().collect();
        for lock in waiting {
            self.drop_request(lock);
            out.push(Output::Cancelled { session, lock });
        }
        for seq in posix {
            let w = self.remove_posix_wait(seq);
            let resource = self.resources[w.res as usize].name.to_string();
            out.push(Output::PosixCancelled { owner: w.owner, resource, range: w.range });
        }
    }

    fn fence_ack(&mut self, session: SessionId, out: &mut Vec<Output>) -> Result<(), EngineError> {
        match self.sessions.get(&session) {
            None => return Err(EngineError::UnknownSession),
            Some(s) if !s.fencing => return Err(EngineError::NotFencing),
            Some(_) => {}
        }
        self.drop_session(session, true, out);
        Ok(())
    }

    fn close_session(&mut self, session: SessionId, out: &mut Vec<Output>) -> Result<(), EngineError> {
        let s = self.check_live(session)?;
        let deadline = s.deadline_ms;
        self.expiry.remove(&(deadline, session));
        self.cancel_waits_of(session, out);
        self.drop_session(session, false, out);
        Ok(())
    }

    /// Removes a session with all its locks, in lock order. `expired` drops a PW/EX holder's
    /// locks without writing its value block and marks the value block invalid.
    fn drop_session(&mut self, session: SessionId, expired: bool, out: &mut Vec<Output>) {
        let s = self.sessions.remove(&session).expect("session checked");
        debug_assert!(s.waiting.is_empty() && s.posix_waits.is_empty());
        let mut locks: Vec<LockId> = s.locks.iter().copied().collect();
        locks.sort_unstable();
        for lock in locks {
            let l = self.locks.remove(&lock).expect("session lock");
            let grant = l.grant.expect("waiters were cancelled");
            let res = &mut self.resources[l.res as usize];
            res.granted.remove(grant.range, lock);
            if grant.mode.is_write() {
                if expired {
                    res.value_invalid = true;
                } else if let Some(v) = l.value {
                    res.value = Some(v);
                    res.value_invalid = false;
                }
            }
            self.dirty.push(l.res);
            out.push(Output::Released { session, lock });
        }
        // Name order, for the same reason as in `settle`.
        let mut posix_resources: Vec<ResIdx> = s.posix_resources.keys().copied().collect();
        posix_resources
            .sort_unstable_by(|a, b| self.resources[*a as usize].name.cmp(&self.resources[*b as usize].name));
        for res in posix_resources {
            let r = &mut self.resources[res as usize];
            let owners: Vec<PosixOwner> = r
                .posix
                .range(PosixOwner { session, owner: 0 }..=PosixOwner { session, owner: u64::MAX })
                .map(|(o, _)| *o)
                .collect();
            for owner in owners {
                let map = r.posix.remove(&owner).expect("listed");
                for (range, _) in map.iter() {
                    out.push(Output::PosixUnlocked {
                        owner,
                        resource: r.name.to_string(),
                        range: ByteRange { start: range.start, end: range.end },
                    });
                }
            }
            self.dirty.push(res);
        }
    }

    // ---- resources ------------------------------------------------------------------------

    pub(crate) fn lookup(&self, name: &str) -> Option<ResIdx> {
        self.names.get(name).copied()
    }

    /// The resource named `name`, created if new. A new resource is marked dirty so that it is
    /// freed again at the end of the step if the request left nothing on it.
    pub(crate) fn resource_for(&mut self, name: String) -> Result<ResIdx, EngineError> {
        if let Some(&idx) = self.names.get(name.as_str()) {
            return Ok(idx);
        }
        if name.len() > self.limits.resource_name_bytes_max {
            return Err(EngineError::NameTooLong { len: name.len(), max: self.limits.resource_name_bytes_max });
        }
        if self.names.len() as u64 >= self.limits.resources_max {
            return Err(EngineError::Limit { kind: LimitKind::Resources, max: self.limits.resources_max });
        }
        let name: Arc<str> = Arc::from(name);
        let idx = match self.free.pop() {
            Some(idx) => idx,
            None => {
                self.resources.push(Resource::default());
                (self.resources.len() - 1) as ResIdx
            }
        };
        let r = &mut self.resources[idx as usize];
        debug_assert!(!r.live && r.is_empty());
        r.name = name.clone();
        r.live = true;
        self.names.insert(name, idx);
        self.dirty.push(idx);
        Ok(idx)
    }

    fn free_if_empty(&mut self, idx: ResIdx) {
        let r = &mut self.resources[idx as usize];
        if !r.live || !r.is_empty() {
            return;
        }
        self.names.remove(&r.name);
        // Keep the allocations of the indexes for the next resource in this slot.
        r.granted.clear();
        r.waiting.clear();
        r.value = None;
        r.value_invalid = false;
        r.live = false;
        r.name = Arc::from("");
        self.free.push(idx);
    }

    pub(crate) fn next_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// Strictly above every token issued before, with the epoch in the high bits.
    fn next_token(&mut self) -> Token {
        let token = (self.last_token + 1).max(self.epoch << TOKEN_EPOCH_SHIFT);
        self.last_token = token;
        token
    }

    // ---- DLM requests ---------------------------------------------------------------------

    /// Everyone a request for `mode` on `range` at queue position `pos` would wait for:
    /// conflicting granted locks, then conflicting requests queued before it. Sorted, no repeats.
    pub(crate) fn blockers(
        &self,
        res: ResIdx,
        me: Option<LockId>,
        mode: Mode,
        range: ByteRange,
        pos: QueuePos,
    ) -> Vec<LockId> {
        let r = &self.resources[res as usize];
        let mut found = Vec::new();
        r.granted.for_each_overlapping(range, &mut |id| {
            if Some(id) != me && !mode.compatible(self.locks[&id].grant.expect("granted").mode) {
                found.push(id);
            }
        });
        if !r.queue.is_empty() {
            r.waiting.for_each_overlapping(range, &mut |id| {
                let req = self.locks[&id].request.as_ref().expect("waiting");
                if Some(id) != me && req.pos < pos && !mode.compatible(req.mode) {
                    found.push(id);
                }
            });
        }
        if found.len() > 1 {
            found.sort_unstable();
            found.dedup();
        }
        found
    }

    /// Sends a revoke to every cached granted lock among `blockers` not already asked.
    fn revoke_cached(&mut self, blockers: &[LockId], out: &mut Vec<Output>) {
        for id in blockers {
            let l = self.locks.get_mut(id).expect("blocker exists");
            if l.grant.is_some() && l.cached && !l.revoke_sent && l.request.is_none() {
                l.revoke_sent = true;
                out.push(Output::Revoke { session: l.session, lock: *id });
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn lock(
        &mut self,
        lock: LockId,
        session: SessionId,
        resource: String,
        range: ByteRange,
        mode: Mode,
        nowait: bool,
        out: &mut Vec<Output>,
    ) -> Result<(), EngineError> {
        let s = self.check_live(session)?;
        if let Some(l) = self.locks.get(&lock) {
            return self.reuse(lock, l.clone(), session, &resource, range, mode, out);
        }
        if s.locks.len() as u64 >= self.limits.locks_per_session_max {
            return Err(EngineError::Limit {
                kind: LimitKind::LocksPerSession,
                max: self.limits.locks_per_session_max,
            });
        }
        let res = self.resource_for(resource)?;
        let pos = QueuePos { class: NEW, seq: self.next_seq() };
        let blockers = self.blockers(res, None, mode, range, pos);
        if blockers.is_empty() {
            let token = self.next_token();
            self.resources[res as usize].granted.insert(range, lock);
            self.locks.insert(
                lock,
                Lock {
                    session,
                    res,
                    grant: Some(Grant { mode, range, token }),
                    request: None,
                    cached: false,
                    revoke_sent: false,
                    value: None,
                },
            );
            self.sessions.get_mut(&session).expect("live").locks.insert(lock);
            let value = self.resources[res as usize].value_block();
            out.push(Output::Granted { session, lock, mode, range, token, value, reused: false });
            return Ok(());
        }
        if nowait {
            out.push(Output::Busy { session, lock, blockers: blockers.clone() });
            self.revoke_cached(&blockers, out);
            return Ok(());
        }
        self.check_waiter_room(res)?;
        let r = &mut self.resources[res as usize];
        r.waiting.insert(range, lock);
        r.queue.insert(pos, lock);
        self.locks.insert(
            lock,
            Lock {
                session,
                res,
                grant: None,
                request: Some(Request {
                    mode,
                    range,
                    pos,
                    edges: self.edge_owners(&blockers),
                    blockers: blockers.clone(),
                }),
                cached: false,
                revoke_sent: false,
                value: None,
            },
        );
        let s = self.sessions.get_mut(&session).expect("live");
        s.locks.insert(lock);
        s.waiting.insert(lock);
        if self.break_cycles(WaitKey::Lock(lock), out) {
            out.push(Output::Queued { session, lock });
        }
        // Even a deadlock victim was a conflicting request: cached blockers are asked back.
        self.revoke_cached(&blockers, out);
        Ok(())
    }

    /// `lock` on an id the session already holds: a cached lock covering the request is taken
    /// back into use locally, with its token, changing nothing else (a pending revoke stands).
    #[allow(clippy::too_many_arguments)]
    fn reuse(
        &mut self,
        lock: LockId,
        l: Lock,
        session: SessionId,
        resource: &str,
        range: ByteRange,
        mode: Mode,
        out: &mut Vec<Output>,
    ) -> Result<(), EngineError> {
        if l.session != session {
            return Err(EngineError::NotOwner);
        }
        let same_resource = *self.resources[l.res as usize].name == *resource;
        match l.grant {
            Some(g)
                if same_resource
                    && l.cached
                    && l.request.is_none()
                    && g.range.contains(range)
                    && mode.at_most(g.mode) =>
            {
                self.locks.get_mut(&lock).expect("exists").cached = false;
                // In use again: waiting for it may now be part of a deadlock.
                self.dirty.push(l.res);
                let value = self.resources[l.res as usize].value_block();
                out.push(Output::Granted {
                    session,
                    lock,
                    mode: g.mode,
                    range: g.range,
                    token: g.token,
                    value,
                    reused: true,
                });
                Ok(())
            }
            _ => Err(EngineError::LockExists),
        }
    }

    pub(crate) fn check_waiter_room(&self, res: ResIdx) -> Result<(), EngineError> {
        if self.resources[res as usize].waiter_count() as u64 >= self.limits.waiters_per_resource_max {
            return Err(EngineError::Limit {
                kind: LimitKind::WaitersPerResource,
                max: self.limits.waiters_per_resource_max,
            });
        }
        Ok(())
    }

    fn convert(
        &mut self,
        lock: LockId,
        mode: Mode,
        range: Option<ByteRange>,
        out: &mut Vec<Output>,
    ) -> Result<(), EngineError> {
        let l = self.owned_lock(lock)?;
        let grant = l.grant.ok_or(EngineError::NotGranted)?;
        if l.request.is_some() {
            return Err(EngineError::AlreadyConverting);
        }
        let res = l.res;
        let range = range.unwrap_or(grant.range);
        let downgrade = mode.at_most(grant.mode) && grant.range.contains(range);
        let pos = QueuePos { class: CONVERT, seq: self.next_seq() };
        let blockers = if downgrade { Vec::new() } else { self.blockers(res, Some(lock), mode, range, pos) };
        if blockers.is_empty() {
            self.locks.get_mut(&lock).expect("exists").cached = false;
            self.apply_conversion(lock, mode, range, !downgrade, out);
            return Ok(());
        }
        self.check_waiter_room(res)?;
        let edges = self.edge_owners(&blockers);
        // A conversion queues ahead of every new request: their blockers change, so rescan.
        self.dirty.push(res);
        let r = &mut self.resources[res as usize];
        r.waiting.insert(range, lock);
        r.queue.insert(pos, lock);
        let l = self.locks.get_mut(&lock).expect("exists");
        // Asking for more is using the lock: it is no longer idle, and a revoke sent while it
        // was will be sent again if it is cached again.
        l.cached = false;
        l.revoke_sent = false;
        l.request = Some(Request { mode, range, pos, edges, blockers: blockers.clone() });
        let session = l.session;
        self.sessions.get_mut(&session).expect("live").waiting.insert(lock);
        if self.break_cycles(WaitKey::Lock(lock), out) {
            out.push(Output::Queued { session, lock });
        }
        // Even a deadlock victim was a conflicting request: cached blockers are asked back.
        self.revoke_cached(&blockers, out);
        Ok(())
    }

    /// Replaces a lock's grant in place, atomically: there is no moment at which the lock is
    /// released. An upgrade gets a new token; a downgrade keeps its own.
    fn apply_conversion(&mut self, lock: LockId, mode: Mode, range: ByteRange, upgrade: bool, out: &mut Vec<Output>) {
        let token = if upgrade { Some(self.next_token()) } else { None };
        let l = self.locks.get_mut(&lock).expect("exists");
        let old = l.grant.expect("granted");
        let new = Grant { mode, range, token: token.unwrap_or(old.token) };
        l.grant = Some(new);
        l.revoke_sent = false;
        let value =
            if old.mode.is_write() && mode != old.mode && mode.at_most(old.mode) { l.value.take() } else { None };
        let (res, session) = (l.res, l.session);
        let r = &mut self.resources[res as usize];
        if let Some(v) = value {
            r.value = Some(v);
            r.value_invalid = false;
        }
        if old.range != range {
            r.granted.remove(old.range, lock);
            r.granted.insert(range, lock);
        }
        self.dirty.push(res);
        let value = r.value_block();
        out.push(Output::Converted { session, lock, mode, range, token: new.token, value });
    }

    fn release(&mut self, lock: LockId, out: &mut Vec<Output>) -> Result<(), EngineError> {
        let l = self.owned_lock(lock)?;
        if l.grant.is_none() {
            return Err(EngineError::NotGranted);
        }
        if l.request.is_some() {
            self.drop_request(lock);
        }
        let l = self.locks.remove(&lock).expect("exists");
        let grant = l.grant.expect("granted");
        let r = &mut self.resources[l.res as usize];
        r.granted.remove(grant.range, lock);
        if grant.mode.is_write()
            && let Some(v) = l.value
        {
            r.value = Some(v);
            r.value_invalid = false;
        }
        self.sessions.get_mut(&l.session).expect("live").locks.remove(&lock);
        self.dirty.push(l.res);
        out.push(Output::Released { session: l.session, lock });
        Ok(())
    }

    fn cancel(&mut self, lock: LockId, out: &mut Vec<Output>) -> Result<(), EngineError> {
        let l = self.owned_lock(lock)?;
        if l.request.is_none() {
            return Err(EngineError::NothingToCancel);
        }
        let session = l.session;
        self.drop_request(lock);
        out.push(Output::Cancelled { session, lock });
        Ok(())
    }

    /// Removes a lock's waiting request. A new request takes the lock with it; a conversion
    /// leaves the lock granted as it was.
    pub(crate) fn drop_request(&mut self, lock: LockId) {
        let l = self.locks.get_mut(&lock).expect("exists");
        let req = l.request.take().expect("waiting");
        let (session, res, granted) = (l.session, l.res, l.grant.is_some());
        let r = &mut self.resources[res as usize];
        r.waiting.remove(req.range, lock);
        r.queue.remove(&req.pos);
        let s = self.sessions.get_mut(&session).expect("session of lock");
        s.waiting.remove(&lock);
        if !granted {
            s.locks.remove(&lock);
            self.locks.remove(&lock);
        }
        self.dirty.push(res);
    }

    // ---- settling ---------------------------------------------------------------------------

    /// After every input: serve the queues of every resource the input touched, refresh the
    /// wait-for edges, break any cycle the new edges closed, and free empty resources.
    fn settle(&mut self, out: &mut Vec<Output>) {
        let mut touched = std::mem::take(&mut self.touched);
        while !self.dirty.is_empty() {
            let mut batch = std::mem::take(&mut self.dirty);
            if batch.len() > 1 {
                // Name order, not slot order: slots are an accident of history (a replica that
                // restored a snapshot has others), and this order decides the order of tokens.
                batch.sort_unstable_by(|a, b| self.resources[*a as usize].name.cmp(&self.resources[*b as usize].name));
                batch.dedup();
            }
            for &res in &batch {
                touched.push(res);
                for wait in self.scan(res, out) {
                    self.break_cycles(wait, out);
                }
            }
            batch.clear();
            if self.dirty.is_empty() {
                self.dirty = batch;
            }
        }
        touched.sort_unstable();
        touched.dedup();
        for &res in &touched {
            self.free_if_empty(res);
        }
        touched.clear();
        self.touched = touched;
    }

    /// Serves one resource's queues in order: the convert queue, then new requests, then POSIX
    /// waiters. Returns the waits whose set of blocking owners grew (new wait-for edges).
    pub(crate) fn scan(&mut self, res: ResIdx, out: &mut Vec<Output>) -> Vec<WaitKey> {
        let mut grown = Vec::new();
        let r = &self.resources[res as usize];
        if r.queue.is_empty() && r.posix_queue.is_empty() {
            return grown;
        }
        let queue: Vec<(QueuePos, LockId)> = r.queue.iter().map(|(p, l)| (*p, *l)).collect();
        for (pos, lock) in queue {
            let req = self.locks[&lock].request.as_ref().expect("queued");
            let (mode, range) = (req.mode, req.range);
            let blockers = self.blockers(res, Some(lock), mode, range, pos);
            if blockers.is_empty() {
                self.grant_request(lock, out);
                continue;
            }
            self.revoke_cached(&blockers, out);
            let edges = self.edge_owners(&blockers);
            let req = self.locks.get_mut(&lock).expect("queued").request.as_mut().expect("queued");
            if edges.iter().any(|e| !req.edges.contains(e)) {
                grown.push(WaitKey::Lock(lock));
            }
            req.edges = edges;
            req.blockers = blockers;
        }
        self.scan_posix(res, &mut grown, out);
        grown
    }

    /// The wait-for edges a request with these blockers has: their owners, less the holders
    /// of cached locks. Sorted, no repeats.
    pub(crate) fn edge_owners(&self, blockers: &[LockId]) -> Vec<OwnerKey> {
        let mut owners: Vec<OwnerKey> = blockers
            .iter()
            .map(|b| &self.locks[b])
            .filter(|l| !(l.cached && l.grant.is_some() && l.request.is_none()))
            .map(|l| OwnerKey::Session(l.session))
            .collect();
        owners.sort_unstable();
        owners.dedup();
        owners
    }

    /// Grants a waiting request (new or conversion) whose blockers are gone.
    fn grant_request(&mut self, lock: LockId, out: &mut Vec<Output>) {
        let l = self.locks.get_mut(&lock).expect("queued");
        let req = l.request.take().expect("queued");
        let (session, res) = (l.session, l.res);
        let r = &mut self.resources[res as usize];
        r.waiting.remove(req.range, lock);
        r.queue.remove(&req.pos);
        self.sessions.get_mut(&session).expect("waiting session is live").waiting.remove(&lock);
        if self.locks[&lock].grant.is_some() {
            let old = self.locks[&lock].grant.expect("granted");
            let upgrade = !(req.mode.at_most(old.mode) && old.range.contains(req.range));
            self.apply_conversion(lock, req.mode, req.range, upgrade, out);
        } else {
            let token = self.next_token();
            self.resources[res as usize].granted.insert(req.range, lock);
            self.locks.get_mut(&lock).expect("queued").grant = Some(Grant { mode: req.mode, range: req.range, token });
            let value = self.resources[res as usize].value_block();
            out.push(Output::Granted { session, lock, mode: req.mode, range: req.range, token, value, reused: false });
        }
    }
}

fn subject_of(input: &Input) -> Subject {
    match input {
        Input::Tick | Input::SetEpoch { .. } => Subject::Epoch,
        Input::OpenSession { session, .. }
        | Input::Renew { session }
        | Input::CloseSession { session }
        | Input::Evict { session }
        | Input::FenceAck { session } => Subject::Session(*session),
        Input::Lock { lock, .. }
        | Input::Convert { lock, .. }
        | Input::Release { lock }
        | Input::Cancel { lock }
        | Input::Cache { lock }
        | Input::SetValue { lock, .. } => Subject::Lock(*lock),
        Input::Posix { owner, .. } | Input::PosixTest { owner, .. } | Input::PosixCancel { owner, .. } => {
            Subject::Owner(*owner)
        }
    }
}
