//! The history checker both simulations share. It reads grants, releases, expiries and fence
//! acknowledgements in log order and fails on: two conflicting grants valid at once (a grant
//! stays valid, as storage sees it, until its holder releases it or, if the holder expired,
//! until the holder is fenced); a token not above every earlier conflicting token; a grant to
//! an expired session; and (seed 003, fence before re-grant enforced by storage) a fence
//! acknowledged while some storage server had neither recorded it nor let its storage lease
//! run out, so could still have admitted a write of the fenced session.

use std::collections::{BTreeMap, BTreeSet};

use lockengine::{ByteRange, LockId, Mode, SessionId};

#[derive(Debug, Clone)]
pub struct Grant {
    pub session: SessionId,
    pub resource: String,
    pub range: ByteRange,
    pub mode: Mode,
    pub token: u64,
}

#[derive(Debug, Default)]
pub struct Checker {
    /// Grants valid as storage sees them, by lock.
    valid: BTreeMap<LockId, Grant>,
    /// Released locks of sessions that expired but were not yet fenced: still valid for storage.
    zombies: BTreeMap<LockId, Grant>,
    expired: BTreeSet<SessionId>,
    fenced: BTreeSet<SessionId>,
    /// Every grant ever, per resource: (range, mode, token).
    history: BTreeMap<String, Vec<(ByteRange, Mode, u64)>>,
    /// Per storage server: the sessions it recorded as fenced, and when its newest storage
    /// lease ends (ms of the simulation's true time; 0: it never held one).
    storage: BTreeMap<u64, StorageState>,
    /// Fence acknowledgements checked against storage.
    pub fence_acks_checked: u64,
}

#[derive(Debug, Default)]
struct StorageState {
    fenced: BTreeSet<SessionId>,
    lease_until_ms: u64,
}

impl Checker {
    pub fn grant(&mut self, lock: LockId, g: Grant) -> Result<(), String> {
        if self.expired.contains(&g.session) {
            return Err(format!("{lock:?} granted to expired session {:?}", g.session));
        }
        for (other, o) in self.valid.iter().chain(self.zombies.iter()) {
            if *other != lock && o.resource == g.resource && o.range.overlaps(g.range) && !o.mode.compatible(g.mode) {
                let zombie =
                    if self.zombies.contains_key(other) { " (its holder expired and is not fenced yet)" } else { "" };
                return Err(format!(
                    "{lock:?} {} {} granted while {other:?} {} {} is valid{zombie}",
                    g.mode, g.range, o.mode, o.range
                ));
            }
        }
        let history = self.history.entry(g.resource.clone()).or_default();
        if let Some(old) = self.valid.get(&lock)
            && old.token == g.token
        {
            // A downgrade or a local re-use keeps its token.
        } else {
            for (range, mode, token) in history.iter() {
                if range.overlaps(g.range) && !mode.compatible(g.mode) && *token >= g.token {
                    return Err(format!("{lock:?} got token {} after a conflicting token {token}", g.token));
                }
            }
        }
        history.push((g.range, g.mode, g.token));
        self.valid.insert(lock, g);
        Ok(())
    }

    pub fn released(&mut self, lock: LockId) {
        if let Some(g) = self.valid.remove(&lock)
            && self.expired.contains(&g.session)
            && !self.fenced.contains(&g.session)
        {
            self.zombies.insert(lock, g);
        }
    }

    pub fn expired(&mut self, session: SessionId) {
        self.expired.insert(session);
    }

    /// A storage server the checker must see fence every session (before any fence of it).
    pub fn storage_server(&mut self, server: u64) {
        self.storage.entry(server).or_default();
    }

    /// Storage server `server` recorded `sessions` as fenced.
    pub fn storage_fenced(&mut self, server: u64, sessions: impl IntoIterator<Item = SessionId>) {
        self.storage.entry(server).or_default().fenced.extend(sessions);
    }

    /// Storage server `server` took a storage lease ending at `until_ms`.
    pub fn storage_lease(&mut self, server: u64, until_ms: u64) {
        let s = self.storage.entry(server).or_default();
        s.lease_until_ms = s.lease_until_ms.max(until_ms);
    }

    /// The leader acknowledged `session`'s fence at `now_ms`: every storage server must have
    /// recorded it or be past its storage lease. Then the holder's locks stop being valid.
    pub fn fence_acked(&mut self, session: SessionId, now_ms: u64) -> Result<(), String> {
        self.fence_acks_checked += 1;
        for (server, s) in &self.storage {
            if !s.fenced.contains(&session) && s.lease_until_ms > now_ms {
                return Err(format!(
                    "the fence of {session:?} was acknowledged at {now_ms} ms while storage server {server} had not \
                     recorded it and held a storage lease until {} ms: it could still admit the session's writes",
                    s.lease_until_ms
                ));
            }
        }
        self.fenced(session);
        Ok(())
    }

    pub fn fenced(&mut self, session: SessionId) {
        self.fenced.insert(session);
        self.zombies.retain(|_, g| g.session != session);
    }
}
