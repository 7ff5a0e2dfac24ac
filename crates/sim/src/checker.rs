//! The history checker both simulations share. It reads grants, releases, expiries and fence
//! acknowledgements in log order and fails on: two conflicting grants valid at once (a grant
//! stays valid, as storage sees it, until its holder releases it or, if the holder expired,
//! until the holder is fenced); a token not above every earlier conflicting token; a grant to
//! an expired session.

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

    pub fn fenced(&mut self, session: SessionId) {
        self.fenced.insert(session);
        self.zombies.retain(|_, g| g.session != session);
    }
}
