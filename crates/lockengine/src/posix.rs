//! POSIX (fcntl) byte-range locks: per-owner ranges that merge and split, F_GETLK, F_SETLKW
//! waiters. They live beside the DLM locks of a resource and never conflict with them (as
//! Lustre keeps flock locks apart from extent locks), but share the wait-for graph.
//!
//! Blocked requests are served in arrival order but, as in Linux, are not checked against each
//! other: a non-blocking F_SETLK may succeed while an F_SETLKW on the same bytes waits.

use std::ops::Range;

use rangemap::RangeMap;

use crate::engine::{PosixWait, ResIdx, WaitKey};
use crate::{ByteRange, Engine, EngineError, LimitKind, Output, PosixKind, PosixOwner};

impl Engine {
    /// The locks of other owners that conflict with `kind` on `range`, lowest start first.
    fn posix_conflicts(
        &self,
        res: ResIdx,
        owner: PosixOwner,
        range: ByteRange,
        kind: PosixKind,
    ) -> Vec<(PosixOwner, Range<u64>, PosixKind)> {
        let mut found = Vec::new();
        for (other, map) in &self.resources[res as usize].posix {
            if *other == owner {
                continue;
            }
            for (r, k) in map.overlapping(range.as_range()) {
                if kind.conflicts(*k) {
                    found.push((*other, r.clone(), *k));
                }
            }
        }
        found.sort_by_key(|(o, r, _)| (r.start, *o));
        found
    }

    /// Sets `kind` (or unlocks) on `range` for `owner`: the owner's own ranges are replaced,
    /// merged with neighbours of the same kind, or split. Fails, changing nothing, if the owner
    /// would hold more ranges than allowed.
    fn posix_set(
        &mut self,
        res: ResIdx,
        owner: PosixOwner,
        range: ByteRange,
        kind: PosixKind,
    ) -> Result<(), EngineError> {
        let max = self.limits.ranges_per_owner_max;
        let r = &mut self.resources[res as usize];
        let existing = r.posix.get(&owner);
        let before = existing.map_or(0, |m| m.len());
        let mut map = match existing {
            // An insert or remove adds at most two ranges (splitting one around it).
            Some(m) if (before as u64) + 2 > max => m.clone(),
            Some(_) => r.posix.remove(&owner).expect("exists"),
            None if kind == PosixKind::Unlock => return Ok(()),
            None => RangeMap::new(),
        };
        match kind {
            PosixKind::Unlock => map.remove(range.as_range()),
            _ => map.insert(range.as_range(), kind),
        }
        if map.len() as u64 > max {
            return Err(EngineError::Limit { kind: LimitKind::RangesPerOwner, max });
        }
        let session = self.sessions.get_mut(&owner.session).expect("live owner");
        match (before, map.is_empty()) {
            (0, false) => *session.posix_resources.entry(res).or_insert(0) += 1,
            (b, true) if b > 0 => {
                let count = session.posix_resources.get_mut(&res).expect("counted");
                *count -= 1;
                if *count == 0 {
                    session.posix_resources.remove(&res);
                }
            }
            _ => {}
        }
        let r = &mut self.resources[res as usize];
        if map.is_empty() {
            r.posix.remove(&owner);
        } else {
            r.posix.insert(owner, map);
        }
        self.dirty.push(res);
        Ok(())
    }

    pub(crate) fn posix(
        &mut self,
        owner: PosixOwner,
        resource: String,
        range: ByteRange,
        kind: PosixKind,
        wait: bool,
        out: &mut Vec<Output>,
    ) -> Result<(), EngineError> {
        self.check_live(owner.session)?;
        if kind == PosixKind::Unlock {
            if let Some(res) = self.lookup(&resource) {
                self.posix_set(res, owner, range, kind)?;
            }
            out.push(Output::PosixUnlocked { owner, resource, range });
            return Ok(());
        }
        let res = self.resource_for(resource)?;
        let conflicts = self.posix_conflicts(res, owner, range, kind);
        if conflicts.is_empty() {
            self.posix_set(res, owner, range, kind)?;
            let resource = self.resources[res as usize].name.to_string();
            out.push(Output::PosixGranted { owner, resource, range, kind });
            return Ok(());
        }
        if !wait {
            let (conflict, r, k) = conflicts[0].clone();
            out.push(Output::PosixBusy { owner, conflict, range: ByteRange { start: r.start, end: r.end }, kind: k });
            return Ok(());
        }
        self.check_waiter_room(res)?;
        let seq = self.next_seq();
        let mut blockers: Vec<PosixOwner> = conflicts.iter().map(|c| c.0).collect();
        blockers.sort_unstable();
        blockers.dedup();
        self.posix_waits.insert(seq, PosixWait { owner, res, range, kind, blockers });
        self.resources[res as usize].posix_queue.insert(seq);
        self.sessions.get_mut(&owner.session).expect("live").posix_waits.insert(seq);
        if self.break_cycles(WaitKey::Posix(seq), out) {
            let resource = self.resources[res as usize].name.to_string();
            out.push(Output::PosixQueued { owner, resource, range, kind });
        }
        Ok(())
    }

    pub(crate) fn posix_test(
        &mut self,
        owner: PosixOwner,
        resource: &str,
        range: ByteRange,
        kind: PosixKind,
        out: &mut Vec<Output>,
    ) -> Result<(), EngineError> {
        self.check_live(owner.session)?;
        let conflict =
            self.lookup(resource).and_then(|res| self.posix_conflicts(res, owner, range, kind).into_iter().next());
        out.push(match conflict {
            Some((conflict, r, k)) => {
                Output::PosixBusy { owner, conflict, range: ByteRange { start: r.start, end: r.end }, kind: k }
            }
            None => Output::PosixFree { owner },
        });
        Ok(())
    }

    pub(crate) fn posix_cancel(
        &mut self,
        owner: PosixOwner,
        resource: &str,
        out: &mut Vec<Output>,
    ) -> Result<(), EngineError> {
        self.check_live(owner.session)?;
        let Some(res) = self.lookup(resource) else { return Ok(()) };
        let seqs: Vec<u64> = self.sessions[&owner.session]
            .posix_waits
            .iter()
            .copied()
            .filter(|seq| self.posix_waits.get(seq).is_some_and(|w| w.owner == owner && w.res == res))
            .collect();
        for seq in seqs {
            let w = self.remove_posix_wait(seq);
            out.push(Output::PosixCancelled { owner, resource: resource.to_string(), range: w.range });
        }
        Ok(())
    }

    pub(crate) fn remove_posix_wait(&mut self, seq: u64) -> PosixWait {
        let w = self.posix_waits.remove(&seq).expect("posix wait");
        self.resources[w.res as usize].posix_queue.remove(&seq);
        if let Some(s) = self.sessions.get_mut(&w.owner.session) {
            s.posix_waits.remove(&seq);
        }
        self.dirty.push(w.res);
        w
    }

    /// Grants every blocked POSIX request on `res` that no longer conflicts, in arrival order,
    /// and refreshes the blockers of the rest (noting in `grown` those with new edges).
    pub(crate) fn scan_posix(&mut self, res: ResIdx, grown: &mut Vec<WaitKey>, out: &mut Vec<Output>) {
        let queue: Vec<u64> = self.resources[res as usize].posix_queue.iter().copied().collect();
        for seq in queue {
            let w = &self.posix_waits[&seq];
            let (owner, range, kind) = (w.owner, w.range, w.kind);
            let conflicts = self.posix_conflicts(res, owner, range, kind);
            if conflicts.is_empty() {
                self.remove_posix_wait(seq);
                let resource = self.resources[res as usize].name.to_string();
                match self.posix_set(res, owner, range, kind) {
                    Ok(()) => out.push(Output::PosixGranted { owner, resource, range, kind }),
                    Err(error) => out.push(Output::Rejected { subject: crate::Subject::Owner(owner), error }),
                }
                continue;
            }
            let mut blockers: Vec<PosixOwner> = conflicts.iter().map(|c| c.0).collect();
            blockers.sort_unstable();
            blockers.dedup();
            let w = self.posix_waits.get_mut(&seq).expect("waiting");
            if blockers.iter().any(|b| !w.blockers.contains(b)) {
                grown.push(WaitKey::Posix(seq));
            }
            w.blockers = blockers;
        }
    }
}
