//! The engine's state as plain data, for Raft snapshots: what is kept, not how it is indexed.
//!
//! A restored engine answers every later input exactly as the original would, outputs and
//! tokens included: nothing that decides an output depends on where things sit in memory
//! (resources are served in name order, waits by arrival number, locks by id).

use serde::{Deserialize, Serialize};

use crate::engine::{Grant, Lock, PosixWait, QueuePos, Request, ResIdx, Session};
use crate::{ByteRange, Engine, Limits, LockId, Mode, PosixKind, PosixOwner, SessionId, Token};

/// The version of [`EngineSnapshot`]'s layout; a reader refuses any other.
pub const SNAPSHOT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineSnapshot {
    pub version: u32,
    pub limits: Limits,
    pub now_ms: u64,
    pub epoch: u64,
    pub last_token: Token,
    pub next_seq: u64,
    pub sessions: Vec<SessionRecord>,
    pub locks: Vec<LockRecord>,
    /// Value blocks of resources that have one (or are marked invalid).
    pub values: Vec<ValueRecord>,
    pub posix: Vec<PosixRecord>,
    pub posix_waits: Vec<PosixWaitRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub session: SessionId,
    pub lease_ms: u64,
    pub deadline_ms: u64,
    pub fencing: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRecord {
    pub lock: LockId,
    pub session: SessionId,
    pub resource: String,
    pub grant: Option<(Mode, ByteRange, Token)>,
    /// Mode, range, queue class (0 conversion, 1 new) and arrival number of a waiting request.
    pub request: Option<(Mode, ByteRange, u8, u64)>,
    pub cached: bool,
    pub revoke_sent: bool,
    pub value: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValueRecord {
    pub resource: String,
    pub value: Option<Vec<u8>>,
    pub invalid: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PosixRecord {
    pub resource: String,
    pub owner: PosixOwner,
    pub ranges: Vec<(ByteRange, PosixKind)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PosixWaitRecord {
    pub seq: u64,
    pub owner: PosixOwner,
    pub resource: String,
    pub range: ByteRange,
    pub kind: PosixKind,
}

/// A snapshot that cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    #[error("snapshot format version {found} is not {SNAPSHOT_VERSION}: written by another stripelock release")]
    Version { found: u32 },
    #[error("snapshot is inconsistent: {0}")]
    Inconsistent(&'static str),
}

impl Engine {
    /// The whole state as plain data, in a canonical order (equal engines give equal snapshots).
    pub fn snapshot(&self) -> EngineSnapshot {
        let name = |res: ResIdx| self.resources[res as usize].name.to_string();
        let mut sessions: Vec<SessionRecord> = self
            .sessions
            .iter()
            .map(|(&session, s)| SessionRecord {
                session,
                lease_ms: s.lease_ms,
                deadline_ms: s.deadline_ms,
                fencing: s.fencing,
            })
            .collect();
        sessions.sort_by_key(|s| s.session);
        let mut locks: Vec<LockRecord> = self
            .locks
            .iter()
            .map(|(&lock, l)| LockRecord {
                lock,
                session: l.session,
                resource: name(l.res),
                grant: l.grant.map(|g| (g.mode, g.range, g.token)),
                request: l.request.as_ref().map(|r| (r.mode, r.range, r.pos.class, r.pos.seq)),
                cached: l.cached,
                revoke_sent: l.revoke_sent,
                value: l.value.as_ref().map(|v| v.to_vec()),
            })
            .collect();
        locks.sort_by_key(|l| l.lock);
        let mut values = Vec::new();
        let mut posix = Vec::new();
        for r in self.resources.iter().filter(|r| r.live) {
            if r.value.is_some() || r.value_invalid {
                values.push(ValueRecord {
                    resource: r.name.to_string(),
                    value: r.value.as_ref().map(|v| v.to_vec()),
                    invalid: r.value_invalid,
                });
            }
            for (owner, map) in &r.posix {
                posix.push(PosixRecord {
                    resource: r.name.to_string(),
                    owner: *owner,
                    ranges: map
                        .iter()
                        .map(|(range, kind)| (ByteRange { start: range.start, end: range.end }, *kind))
                        .collect(),
                });
            }
        }
        values.sort_by(|a, b| a.resource.cmp(&b.resource));
        posix.sort_by(|a, b| (&a.resource, a.owner).cmp(&(&b.resource, b.owner)));
        let posix_waits = self
            .posix_waits
            .iter()
            .map(|(&seq, w)| PosixWaitRecord {
                seq,
                owner: w.owner,
                resource: name(w.res),
                range: w.range,
                kind: w.kind,
            })
            .collect();
        EngineSnapshot {
            version: SNAPSHOT_VERSION,
            limits: self.limits.clone(),
            now_ms: self.now_ms,
            epoch: self.epoch,
            last_token: self.last_token,
            next_seq: self.next_seq,
            sessions,
            locks,
            values,
            posix,
            posix_waits,
        }
    }

    /// Rebuilds an engine from a snapshot: indexes, queues and wait-for edges are derived again.
    pub fn restore(snapshot: &EngineSnapshot) -> Result<Engine, RestoreError> {
        use RestoreError::Inconsistent;
        if snapshot.version != SNAPSHOT_VERSION {
            return Err(RestoreError::Version { found: snapshot.version });
        }
        let mut e = Engine::new(snapshot.limits.clone());
        e.now_ms = snapshot.now_ms;
        e.epoch = snapshot.epoch;
        e.last_token = snapshot.last_token;
        e.next_seq = snapshot.next_seq;
        for s in &snapshot.sessions {
            let session = Session {
                lease_ms: s.lease_ms,
                deadline_ms: s.deadline_ms,
                fencing: s.fencing,
                locks: Default::default(),
                waiting: Default::default(),
                posix_waits: Default::default(),
                posix_resources: Default::default(),
            };
            if e.sessions.insert(s.session, session).is_some() {
                return Err(Inconsistent("a session appears twice"));
            }
            if !s.fencing {
                e.expiry.insert((s.deadline_ms, s.session));
            }
        }
        let resource = |e: &mut Engine, name: &str| -> Result<ResIdx, RestoreError> {
            e.resource_for(name.to_string()).map_err(|_| Inconsistent("a resource name is over the limits"))
        };
        // Every range the tables hold is non-empty (an interval map refuses an empty one).
        let ranged = |r: &ByteRange| if r.start < r.end { Ok(()) } else { Err(Inconsistent("an empty byte range")) };
        for l in &snapshot.locks {
            // Before anything is indexed under its id: a second entry would be indexed twice.
            if e.locks.get(&l.lock).is_some() {
                return Err(Inconsistent("a lock appears twice"));
            }
            if let Some((_, range, _)) = &l.grant {
                ranged(range)?;
            }
            if let Some((_, range, _, _)) = &l.request {
                ranged(range)?;
            }
            let res = resource(&mut e, &l.resource)?;
            let s = e.sessions.get_mut(&l.session).ok_or(Inconsistent("a lock of an unknown session"))?;
            s.locks.insert(l.lock);
            let request = l.request.map(|(mode, range, class, seq)| Request {
                mode,
                range,
                pos: QueuePos { class, seq },
                blockers: Vec::new(),
                edges: Vec::new(),
            });
            let r = &mut e.resources[res as usize];
            if let Some((_, range, _)) = l.grant {
                r.granted.insert(range, l.lock);
            }
            if let Some(req) = &request {
                r.waiting.insert(req.range, l.lock);
                r.queue.insert(req.pos, l.lock);
                s.waiting.insert(l.lock);
            }
            if l.grant.is_none() && request.is_none() {
                return Err(Inconsistent("a lock neither granted nor waiting"));
            }
            let lock = Lock {
                session: l.session,
                res,
                grant: l.grant.map(|(mode, range, token)| Grant { mode, range, token }),
                request,
                cached: l.cached,
                revoke_sent: l.revoke_sent,
                value: l.value.clone().map(Vec::into_boxed_slice),
            };
            e.locks.insert(l.lock, lock);
        }
        for v in &snapshot.values {
            let res = resource(&mut e, &v.resource)?;
            let r = &mut e.resources[res as usize];
            r.value = v.value.clone().map(Vec::into_boxed_slice);
            r.value_invalid = v.invalid;
        }
        for p in &snapshot.posix {
            let res = resource(&mut e, &p.resource)?;
            let s = e.sessions.get_mut(&p.owner.session).ok_or(Inconsistent("a POSIX owner of an unknown session"))?;
            *s.posix_resources.entry(res).or_insert(0) += 1;
            let map = e.resources[res as usize].posix.entry(p.owner).or_default();
            for (range, kind) in &p.ranges {
                ranged(range)?;
                map.insert(range.as_range(), *kind);
            }
        }
        for w in &snapshot.posix_waits {
            ranged(&w.range)?;
            if e.posix_waits.contains_key(&w.seq) {
                return Err(Inconsistent("a POSIX wait appears twice"));
            }
            let res = resource(&mut e, &w.resource)?;
            let s = e.sessions.get_mut(&w.owner.session).ok_or(Inconsistent("a POSIX wait of an unknown session"))?;
            s.posix_waits.insert(w.seq);
            e.resources[res as usize].posix_queue.insert(w.seq);
            e.posix_waits
                .insert(w.seq, PosixWait { owner: w.owner, res, range: w.range, kind: w.kind, blockers: Vec::new() });
        }
        // Derive every wait-for edge again. The snapshot was taken between steps, so nothing
        // can be granted and no revoke is unsent: serving the queues must say nothing.
        let mut out = Vec::new();
        let all: Vec<ResIdx> = e.names.values().copied().collect();
        for res in all {
            e.scan(res, &mut out);
        }
        e.dirty.clear();
        if !out.is_empty() {
            return Err(Inconsistent("a waiting request could be granted or a revoke was unsent"));
        }
        if e.resources.iter().any(|r| {
            r.live && r.granted.is_empty() && r.queue.is_empty() && r.posix.is_empty() && r.posix_queue.is_empty()
        }) {
            return Err(Inconsistent("a value block on a resource with no lock"));
        }
        Ok(e)
    }
}
