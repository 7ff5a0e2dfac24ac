//! The wait-for graph over lock owners, and breaking its cycles.
//!
//! Edges are the `blockers` each waiting request keeps (refreshed by every scan of its
//! resource), so the graph is always current without being rebuilt. A cycle can only be closed
//! by a new edge, so it is searched for from the owner of each request whose blockers grew.

use rustc_hash::FxHashSet;

use crate::engine::{OwnerKey, WaitKey};
use crate::{Engine, Output};

impl Engine {
    pub(crate) fn owner_of_wait(&self, wait: WaitKey) -> OwnerKey {
        match wait {
            WaitKey::Lock(id) => OwnerKey::Session(self.locks[&id].session),
            WaitKey::Posix(seq) => OwnerKey::Posix(self.posix_waits[&seq].owner),
        }
    }

    fn is_waiting(&self, wait: WaitKey) -> bool {
        match wait {
            WaitKey::Lock(id) => self.locks.get(&id).is_some_and(|l| l.request.is_some()),
            WaitKey::Posix(seq) => self.posix_waits.contains_key(&seq),
        }
    }

    fn wait_seq(&self, wait: WaitKey) -> u64 {
        match wait {
            WaitKey::Lock(id) => self.locks[&id].request.as_ref().expect("waiting").pos.seq,
            WaitKey::Posix(seq) => seq,
        }
    }

    pub(crate) fn waits_of(&self, owner: OwnerKey) -> Vec<WaitKey> {
        match owner {
            OwnerKey::Session(s) => match self.sessions.get(&s) {
                Some(s) => s.waiting.iter().map(|&l| WaitKey::Lock(l)).collect(),
                None => Vec::new(),
            },
            OwnerKey::Posix(o) => match self.sessions.get(&o.session) {
                Some(s) => s
                    .posix_waits
                    .iter()
                    .filter(|seq| self.posix_waits[seq].owner == o)
                    .map(|&seq| WaitKey::Posix(seq))
                    .collect(),
                None => Vec::new(),
            },
        }
    }

    pub(crate) fn blocker_owners(&self, wait: WaitKey) -> Vec<OwnerKey> {
        let mut owners: Vec<OwnerKey> = match wait {
            WaitKey::Lock(id) => self.locks[&id].request.as_ref().expect("waiting").edges.clone(),
            WaitKey::Posix(seq) => self.posix_waits[&seq].blockers.iter().map(|&o| OwnerKey::Posix(o)).collect(),
        };
        owners.sort_unstable();
        owners.dedup();
        owners
    }

    /// A cycle through `start`, as its list of edges, if there is one.
    pub(crate) fn cycle_through(&self, start: OwnerKey) -> Option<Vec<(OwnerKey, OwnerKey)>> {
        let mut parent: Vec<(OwnerKey, OwnerKey)> = Vec::new();
        let mut seen = FxHashSet::default();
        let mut stack = vec![start];
        seen.insert(start);
        while let Some(owner) = stack.pop() {
            for wait in self.waits_of(owner) {
                for next in self.blocker_owners(wait) {
                    if next == start {
                        let mut edges = vec![(owner, start)];
                        let mut at = owner;
                        while at != start {
                            let &(from, _) = parent.iter().find(|(_, to)| *to == at).expect("path");
                            edges.push((from, at));
                            at = from;
                        }
                        return Some(edges);
                    }
                    if seen.insert(next) {
                        parent.push((owner, next));
                        stack.push(next);
                    }
                }
            }
        }
        None
    }

    /// Fails the youngest request on every wait-for cycle through the owner of `wait`, until
    /// none is left. Returns whether `wait` itself is still waiting.
    pub(crate) fn break_cycles(&mut self, wait: WaitKey, out: &mut Vec<Output>) -> bool {
        loop {
            if !self.is_waiting(wait) {
                return false;
            }
            let Some(edges) = self.cycle_through(self.owner_of_wait(wait)) else {
                return true;
            };
            let this = &*self;
            let victim = edges
                .iter()
                .flat_map(|&(from, to)| {
                    this.waits_of(from).into_iter().filter(move |&w| this.blocker_owners(w).contains(&to))
                })
                .max_by_key(|&w| this.wait_seq(w))
                .expect("every edge of a cycle is some request");
            let res = match victim {
                WaitKey::Lock(lock) => {
                    let (res, session) = (self.locks[&lock].res, self.locks[&lock].session);
                    self.drop_request(lock);
                    out.push(Output::Deadlock { session, lock });
                    res
                }
                WaitKey::Posix(seq) => {
                    let w = self.remove_posix_wait(seq);
                    out.push(Output::PosixDeadlock { owner: w.owner });
                    w.res
                }
            };
            // The victim's resource must be served again before the next search: requests
            // queued behind the victim still name it as a blocker until their edges are redone.
            for grown in self.scan(res, out) {
                self.break_cycles(grown, out);
            }
        }
    }

    /// Every edge of the wait-for graph: (waiter, holder it waits for), sorted.
    pub fn wait_for_edges(&self) -> Vec<(OwnerKey, OwnerKey)> {
        let mut waits: Vec<WaitKey> = self
            .locks
            .iter()
            .filter(|(_, l)| l.request.is_some())
            .map(|(&id, _)| WaitKey::Lock(id))
            .chain(self.posix_waits.keys().map(|&s| WaitKey::Posix(s)))
            .collect();
        waits.sort_unstable();
        let mut edges: Vec<(OwnerKey, OwnerKey)> = waits
            .into_iter()
            .flat_map(|w| {
                let from = self.owner_of_wait(w);
                self.blocker_owners(w).into_iter().map(move |to| (from, to))
            })
            .collect();
        edges.sort_unstable();
        edges.dedup();
        edges
    }
}
