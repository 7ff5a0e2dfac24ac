//! Read-only views of the lock table, for `stripelock locks` and for tests.

use crate::engine::OwnerKey;
use crate::{ByteRange, Engine, LockId, Mode, PosixKind, PosixOwner, SessionId, Token, ValueBlock};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockView {
    pub lock: LockId,
    pub session: SessionId,
    /// The grant, if any: mode, range, token.
    pub granted: Option<(Mode, ByteRange, Token)>,
    /// The waiting request (new or conversion), if any, and who it waits for.
    pub waiting: Option<(Mode, ByteRange, Vec<LockId>)>,
    pub cached: bool,
    /// A cached lock its holder was asked to give back (a revoke was sent).
    pub revoked: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PosixView {
    pub owner: PosixOwner,
    pub range: ByteRange,
    pub kind: PosixKind,
    /// False for a blocked request.
    pub granted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceView {
    pub name: String,
    /// Granted locks first (by range), then waiting requests in queue order.
    pub locks: Vec<LockView>,
    pub posix: Vec<PosixView>,
    pub value: ValueBlock,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    pub sessions: u64,
    pub sessions_fencing: u64,
    pub resources: u64,
    pub locks_granted: u64,
    /// Granted locks their holders keep idle in their caches (seed 002), among `locks_granted`.
    pub locks_cached: u64,
    pub requests_waiting: u64,
    pub last_token: Token,
}

impl Engine {
    fn lock_view(&self, id: LockId) -> LockView {
        let l = &self.locks[&id];
        LockView {
            lock: id,
            session: l.session,
            granted: l.grant.map(|g| (g.mode, g.range, g.token)),
            waiting: l.request.as_ref().map(|r| (r.mode, r.range, r.blockers.clone())),
            cached: l.cached,
            revoked: l.cached && l.revoke_sent,
        }
    }

    /// Every resource whose name starts with `prefix`, sorted by name.
    pub fn resources(&self, prefix: &str) -> Vec<ResourceView> {
        let mut names: Vec<_> = self.names.iter().filter(|(n, _)| n.starts_with(prefix)).collect();
        names.sort();
        names
            .into_iter()
            .map(|(name, &idx)| {
                let r = &self.resources[idx as usize];
                let mut locks: Vec<LockView> = r.granted.iter().into_iter().map(|(_, id)| self.lock_view(id)).collect();
                locks
                    .extend(r.queue.values().filter(|id| self.locks[id].grant.is_none()).map(|&id| self.lock_view(id)));
                let mut posix: Vec<PosixView> = r
                    .posix
                    .iter()
                    .flat_map(|(owner, map)| {
                        map.iter().map(|(range, kind)| PosixView {
                            owner: *owner,
                            range: ByteRange { start: range.start, end: range.end },
                            kind: *kind,
                            granted: true,
                        })
                    })
                    .collect();
                posix.extend(r.posix_queue.iter().map(|seq| {
                    let w = &self.posix_waits[seq];
                    PosixView { owner: w.owner, range: w.range, kind: w.kind, granted: false }
                }));
                ResourceView { name: name.to_string(), locks, posix, value: r.value_block() }
            })
            .collect()
    }

    /// Whether the PW or EX lock granted with `token` still holds all of `range` of `resource`,
    /// for a session that has not expired: what a write scheduled under that token needs to be
    /// carried out (seed 004's check of a write's timestamp with the lock manager).
    pub fn write_lock_holds(&self, resource: &str, range: ByteRange, token: Token) -> bool {
        let Some(&idx) = self.names.get(resource) else { return false };
        let mut holds = false;
        self.resources[idx as usize].granted.for_each_overlapping(range, &mut |id| {
            let l = &self.locks[&id];
            if let Some(g) = l.grant
                && g.token == token
                && g.mode.is_write()
                && g.range.contains(range)
                && self.session_is_live(l.session)
            {
                holds = true;
            }
        });
        holds
    }

    /// A PW or EX holder of some byte of `range` of `resource`: its session and its range.
    pub fn write_holder(&self, resource: &str, range: ByteRange) -> Option<(SessionId, ByteRange)> {
        let &idx = self.names.get(resource)?;
        let mut holder = None;
        self.resources[idx as usize].granted.for_each_overlapping(range, &mut |id| {
            let l = &self.locks[&id];
            if let Some(g) = l.grant
                && g.mode.is_write()
            {
                holder.get_or_insert((l.session, g.range));
            }
        });
        holder
    }

    /// Whether a PW or EX lock is granted on any byte of `range` of `resource`.
    pub fn write_locked(&self, resource: &str, range: ByteRange) -> bool {
        let Some(&idx) = self.names.get(resource) else { return false };
        let mut locked = false;
        self.resources[idx as usize].granted.for_each_overlapping(range, &mut |id| {
            locked |= self.locks[&id].grant.is_some_and(|g| g.mode.is_write());
        });
        locked
    }

    /// Sessions that have expired and wait for storage to acknowledge their fence, in order.
    pub fn fencing_sessions(&self) -> Vec<SessionId> {
        let mut s: Vec<SessionId> = self.sessions.iter().filter(|(_, s)| s.fencing).map(|(id, _)| *id).collect();
        s.sort_unstable();
        s
    }

    /// How many sessions and lock records (granted or waiting) the table holds: a constant-time
    /// measure of its size, unlike [`Engine::stats`], which walks every lock.
    pub fn size(&self) -> (usize, usize) {
        (self.sessions.len(), self.locks.len())
    }

    /// Whether a session is open and not expired.
    pub fn session_is_live(&self, session: SessionId) -> bool {
        self.sessions.get(&session).is_some_and(|s| !s.fencing)
    }

    /// The lease a live session asked for (`None`: closed, expired or unknown).
    pub fn live_lease_ms(&self, session: SessionId) -> Option<u64> {
        self.sessions.get(&session).filter(|s| !s.fencing).map(|s| s.lease_ms)
    }

    /// Locks of one session, granted or waiting, by id (what a reattaching client is told).
    pub fn session_locks(&self, session: SessionId) -> Vec<LockView> {
        let Some(s) = self.sessions.get(&session) else { return Vec::new() };
        let mut ids: Vec<LockId> = s.locks.iter().copied().collect();
        ids.sort_unstable();
        ids.into_iter().map(|id| self.lock_view(id)).collect()
    }

    /// How many resources `session`'s POSIX owners hold locks on.
    pub fn session_posix_locks(&self, session: SessionId) -> u64 {
        self.sessions.get(&session).map_or(0, |s| s.posix_resources.len() as u64)
    }

    /// Whether `lock` is a new request still waiting (not granted; a pending conversion of a
    /// granted lock does not count).
    pub fn lock_waits(&self, lock: LockId) -> bool {
        self.locks.get(&lock).is_some_and(|l| l.grant.is_none() && l.request.is_some())
    }

    /// Whether POSIX owner `owner` waits (F_SETLKW) on `resource`.
    pub fn posix_waits_on(&self, owner: PosixOwner, resource: &str) -> bool {
        let Some(&res) = self.names.get(resource) else { return false };
        self.sessions.get(&owner.session).is_some_and(|s| {
            s.posix_waits.iter().any(|seq| self.posix_waits.get(seq).is_some_and(|w| w.owner == owner && w.res == res))
        })
    }

    /// The name of the resource a lock is on.
    pub fn resource_of(&self, lock: LockId) -> Option<&str> {
        self.locks.get(&lock).map(|l| &*self.resources[l.res as usize].name)
    }

    /// The newest token issued. Tokens come from one counter in log order, so a replica whose
    /// last token is at least `t` has applied the grant that issued `t`.
    pub fn last_token(&self) -> Token {
        self.last_token
    }

    pub fn stats(&self) -> Stats {
        let waiting = self.locks.values().filter(|l| l.request.is_some()).count() + self.posix_waits.len();
        Stats {
            sessions: self.sessions.len() as u64,
            sessions_fencing: self.sessions.values().filter(|s| s.fencing).count() as u64,
            resources: self.names.len() as u64,
            locks_granted: self.locks.values().filter(|l| l.grant.is_some()).count() as u64,
            locks_cached: self.locks.values().filter(|l| l.grant.is_some() && l.cached).count() as u64,
            requests_waiting: waiting as u64,
            last_token: self.last_token,
        }
    }

    /// Owners that wait, each with who it waits for: the queryable wait-for graph.
    pub fn wait_for_graph(&self) -> Vec<(OwnerKey, Vec<OwnerKey>)> {
        let mut graph: Vec<(OwnerKey, Vec<OwnerKey>)> = Vec::new();
        for (from, to) in self.wait_for_edges() {
            match graph.last_mut() {
                Some((f, tos)) if *f == from => tos.push(to),
                _ => graph.push((from, vec![to])),
            }
        }
        graph
    }
}
