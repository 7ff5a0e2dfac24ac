//! Fence before re-grant, enforced by storage (seed 003).
//!
//! When a session ends without releasing (its lease ran out, it was evicted, or a revoke timed
//! out), the engine keeps its locks and lists it in `fencing_sessions()` until `FenceAck`. The
//! leader (`fence_duties`, every tick) sends a `Fence` for those sessions to every storage server
//! of the volume (every member of the cluster; itself directly), in parallel, each with a
//! deadline, again on the next tick for those that did not answer. A storage server records the
//! fence durably in its fence table (`chunks::Fences`, a versioned blob of its volume), after
//! every change already admitted there has finished, and then answers; from then on it refuses
//! every write, restore and delete carrying a token of that session, on every unit. Only when
//! every member has acknowledged, or is past its storage lease, does the leader propose
//! `FenceAck`, which lets a conflicting lock be granted.
//!
//! **Storage lease.** A storage server admits state-changing requests only while it holds a
//! storage lease. It renews it from the leader every third of [`STORAGE_LEASE_MS_DEFAULT`]
//! (`RenewStorageLease`); on its own clock the lease ends at [`storage_lease_end`]: counted from
//! when it *sent* the request, less the drift margin, so it always ends before the leader's
//! view of it. The leader answers only after confirming it still leads (a ReadIndex round, so a
//! deposed leader cannot hand out a lease that outlives a successor's assumption), and records
//! `granted_until = its now + lease` for the asker. A leader that has just taken over knows
//! nothing of its predecessor's grants, so it assumes every member holds a lease until its own
//! start as leader plus the lease ([`LeaderLeases`]).
//!
//! **Catching up.** The answer carries the leader's applied index and the sessions fencing at
//! that index. The storage server records those fences before it takes the lease, and treats the
//! lease as valid only once its own state machine has applied up to that index. A server that
//! was down, cut off, or restarted therefore learns what it missed before it admits a write:
//! sessions still fencing are in the answer; sessions fenced and acknowledged while it was away
//! show as ended in its applied state, and the storage service refuses tokens of any session
//! that its state knows (ids come from one counter) and shows as not live. A session newer than
//! its state is governed by the fence table and the lease.
//!
//! A single-server cluster is its own leader: it fences and renews locally.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use lockengine::{Input, SessionId};
use openraft::async_runtime::WatchReceiver;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::Status;
use wire::ErrorCode;
use wire::v1 as pb;

use crate::storage::{StorageService, chunk_status};
use crate::types::Op;

/// How long a storage lease lasts, counted from when its renewal was sent. The leader waits at
/// most this long (after its last grant to it) for a storage server that does not acknowledge a
/// fence; a new leader at most this long after taking over.
pub const STORAGE_LEASE_MS_DEFAULT: u64 = 2_000;

/// When a storage lease ends on the storage server's own clock: seed 003's one lease rule
/// (`lockengine::lease`), counted from when the renewal was sent, less the drift margin.
pub fn storage_lease_end(sent: Instant, lease_ms: u64) -> Instant {
    sent + Duration::from_millis(storage_lease_ms_left(lease_ms))
}

/// How many milliseconds of a fresh lease of `lease_ms` a storage server may use.
pub fn storage_lease_ms_left(lease_ms: u64) -> u64 {
    lockengine::lease::valid_until_ms(0, lease_ms)
}

/// What a storage server did about fences, for an observer (the simulation's checker).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageEvent {
    /// Server `server` recorded these sessions as fenced, durably.
    Fenced { server: u64, sessions: Vec<u64> },
    /// Server `server` took a storage lease that ends at `until_ms` on the environment's clock.
    Lease { server: u64, until_ms: u64 },
}

/// A storage server's leases: the last few grants, each `(ends at, index to apply first)`.
#[derive(Debug, Default)]
pub struct StorageLease {
    grants: Mutex<VecDeque<(Instant, u64)>>,
    changed: tokio::sync::Notify,
}

/// Grants kept: the newest may wait for its index while an older one is still usable.
const GRANTS_KEPT: usize = 2;

impl StorageLease {
    pub fn grant(&self, until: Instant, index: u64) {
        let mut g = self.grants.lock().expect("storage lease");
        g.push_back((until, index));
        while g.len() > GRANTS_KEPT {
            g.pop_front();
        }
        drop(g);
        self.changed.notify_waiters();
    }

    /// Whether a change may be admitted now, with `applied` the local applied index.
    pub fn valid(&self, now: Instant, applied: u64) -> bool {
        self.grants.lock().expect("storage lease").iter().any(|&(until, index)| now < until && applied >= index)
    }

    pub(crate) fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }
}

/// The leader's view of the storage leases it (and only it, in its term) has granted, and of
/// the fences each member has acknowledged.
#[derive(Debug, Default)]
pub struct LeaderLeases {
    term: u64,
    /// When this server was first seen leading in `term`.
    since: Option<Instant>,
    granted: BTreeMap<u64, Instant>,
    /// Per fencing session, the members that recorded its fence (durable, so kept across terms).
    acked: BTreeMap<SessionId, BTreeSet<u64>>,
}

impl LeaderLeases {
    /// Notes that this server leads in `term` at `now`: a new term forgets the grants of the old
    /// one and assumes every member holds a lease until `now + lease`.
    pub fn leading(&mut self, term: u64, now: Instant) {
        if self.since.is_none() || self.term != term {
            self.term = term;
            self.since = Some(now);
            self.granted.clear();
        }
    }

    /// Records a lease granted to `member` in `term`, ending at `until` on the leader's clock.
    pub fn granted(&mut self, term: u64, member: u64, now: Instant, until: Instant) {
        self.leading(term, now);
        let g = self.granted.entry(member).or_insert(until);
        *g = (*g).max(until);
    }

    /// Until when `member` may hold a storage lease, as far as this leader knows.
    pub fn horizon(&self, member: u64, lease: Duration) -> Option<Instant> {
        let since = self.since? + lease;
        Some(self.granted.get(&member).map_or(since, |g| (*g).max(since)))
    }

    pub fn acked(&mut self, member: u64, sessions: &[SessionId]) {
        for s in sessions {
            self.acked.entry(*s).or_default().insert(member);
        }
    }

    /// Forgets acknowledgements of sessions no longer fencing.
    pub fn keep_only(&mut self, fencing: &[SessionId]) {
        self.acked.retain(|s, _| fencing.contains(s));
    }

    /// The members that must still record `session`'s fence before it may be acknowledged: those
    /// that have not, and may still hold a storage lease at `now`.
    pub fn missing(&self, session: SessionId, members: &[u64], now: Instant, lease: Duration) -> Vec<u64> {
        let acked = self.acked.get(&session);
        members
            .iter()
            .copied()
            .filter(|m| !acked.is_some_and(|a| a.contains(m)))
            .filter(|m| self.horizon(*m, lease).is_none_or(|h| now < h))
            .collect()
    }
}

/// How long the leader waits for one storage server to acknowledge a fence before it tries
/// again on a later tick.
const FENCE_DEADLINE: Duration = Duration::from_millis(500);

impl StorageService {
    fn storage_lease(&self) -> Duration {
        Duration::from_millis(self.node.config.storage_lease_ms)
    }

    /// Records `fenced` (session, highest token) durably in this volume's fence table, pruning
    /// sessions this server's state shows as ended; answers once it is on disk.
    pub(crate) async fn record_fences(&self, fenced: Vec<(u64, u64)>) -> Result<(), Status> {
        if fenced.is_empty() {
            return Ok(());
        }
        let sessions: Vec<u64> = fenced.iter().map(|(s, _)| *s).collect();
        let this = self.clone();
        let record = move || {
            // Ended: known to the state (ids come from one counter), neither live nor still
            // fencing. The storage service refuses their tokens on its own.
            let ended = {
                let state = this.node.machine.state();
                let fencing = state.engine.fencing_sessions();
                let table = this.fences.table();
                table
                    .sessions
                    .keys()
                    .copied()
                    .filter(|s| {
                        let id = SessionId(*s);
                        *s <= state.next_session && !state.engine.session_is_live(id) && !fencing.contains(&id)
                    })
                    .collect::<BTreeSet<u64>>()
            };
            this.fences.record(&*this.volume, &fenced, |s| ended.contains(&s)).map_err(chunk_status)
        };
        let changed = if sessions.iter().all(|s| self.fences.is_fenced(*s)) {
            false
        } else if self.node.config.env.volume.is_some() {
            // A volume handed in is memory (tests, the simulation): recorded in place, so a
            // simulated run does not depend on a thread pool's timing and replays exactly.
            record()?
        } else {
            tokio::task::spawn_blocking(record)
                .await
                .map_err(|e| ErrorCode::Internal.status(format!("fence task failed: {e}")))??
        };
        if changed {
            tracing::info!(?sessions, "recorded fences");
        }
        if let Some(observe) = &self.node.config.env.storage_observer {
            observe(StorageEvent::Fenced { server: self.node.id, sessions });
        }
        Ok(())
    }

    /// The leader's answer to a storage lease renewal from `server`.
    pub(crate) async fn answer_lease(&self, server: u64) -> Result<pb::StorageLeaseReply, Status> {
        let not_leader =
            || ErrorCode::NotLeader.status(format!("server {} is not the leader; ask the leader", self.node.id));
        let term = self.node.raft.metrics().borrow_watched().current_term;
        if !self.node.is_leader() {
            return Err(not_leader());
        }
        // Confirms with a majority that this server still leads: a deposed leader must not hand
        // out a lease its successor does not count on.
        self.node
            .raft
            .ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex)
            .await
            .map_err(|e| ErrorCode::Unavailable.status(format!("leadership not confirmed: {e}")))?;
        if !self.node.is_leader() || self.node.raft.metrics().borrow_watched().current_term != term {
            return Err(not_leader());
        }
        let (applied_index, fencing) = {
            let state = self.node.machine.state();
            let highest = state.engine.last_token();
            let fencing = state
                .engine
                .fencing_sessions()
                .into_iter()
                .map(|s| pb::FencedSession { session: s.0, highest_token: highest })
                .collect();
            (state.last_applied.map_or(0, |l| l.index), fencing)
        };
        let now = Instant::now();
        self.leader.lock().expect("leader leases").granted(term, server, now, now + self.storage_lease());
        Ok(pb::StorageLeaseReply { lease_ms: self.node.config.storage_lease_ms, applied_index, fencing })
    }

    /// Keeps this server's storage lease: renews it from the leader every third of the lease
    /// (sooner while it holds none), recording the fences the answer carries before taking it.
    pub async fn renew_storage_lease(self, mut stop: watch::Receiver<bool>) {
        let period = self.storage_lease() / 3;
        loop {
            let sent = Instant::now();
            let sent_ms = self.node.config.env.now_ms();
            let answer = match self.node.leader() {
                Some(leader) if leader == self.node.id => self.answer_lease(leader).await,
                Some(leader) => match self.files.storage(leader) {
                    Ok(mut c) => {
                        let ask = c.renew_storage_lease(pb::StorageLeaseRequest { server: self.node.id });
                        match tokio::time::timeout(period, ask).await {
                            Ok(r) => r.map(tonic::Response::into_inner),
                            Err(_) => Err(ErrorCode::Unavailable.status("the leader did not answer in time")),
                        }
                    }
                    Err(e) => Err(e),
                },
                None => Err(ErrorCode::Unavailable.status("no leader known")),
            };
            let renewed = match answer {
                Ok(reply) => {
                    let fenced = reply.fencing.iter().map(|f| (f.session, f.highest_token)).collect();
                    match self.record_fences(fenced).await {
                        Ok(()) => {
                            self.lease.grant(storage_lease_end(sent, reply.lease_ms), reply.applied_index);
                            if let Some(observe) = &self.node.config.env.storage_observer {
                                let until_ms = sent_ms + storage_lease_ms_left(reply.lease_ms);
                                observe(StorageEvent::Lease { server: self.node.id, until_ms });
                            }
                            true
                        }
                        Err(e) => {
                            tracing::warn!("cannot record the fences of a storage lease renewal: {}", e.message());
                            false
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!("storage lease renewal: {}", e.message());
                    false
                }
            };
            let wait = if renewed { period.saturating_sub(sent.elapsed()) } else { period.min(RETRY) };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// The leader's fencing duty, every tick while it leads: sends the fences of every fencing
    /// session to each storage server that has not recorded them and may still hold a lease,
    /// in parallel with a deadline, and proposes `FenceAck` for a session once none is left.
    pub async fn fence_duties(self, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.node.config.tick_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            if !self.node.is_leader() {
                continue;
            }
            let term = self.node.raft.metrics().borrow_watched().current_term;
            let (fencing, highest) = {
                let state = self.node.machine.state();
                (state.engine.fencing_sessions(), state.engine.last_token())
            };
            {
                let mut l = self.leader.lock().expect("leader leases");
                l.leading(term, Instant::now());
                l.keep_only(&fencing);
            }
            if fencing.is_empty() {
                continue;
            }
            if self.node.config.env.skip_storage_fence_for_negative_control {
                self.ack_fences(&fencing).await;
                continue;
            }
            let members: Vec<u64> = self.node.config.peers.keys().copied().collect();
            let lease = self.storage_lease();
            let todo: BTreeMap<u64, Vec<SessionId>> = {
                let l = self.leader.lock().expect("leader leases");
                let now = Instant::now();
                let mut todo: BTreeMap<u64, Vec<SessionId>> = BTreeMap::new();
                for &s in &fencing {
                    for m in l.missing(s, &members, now, lease) {
                        todo.entry(m).or_default().push(s);
                    }
                }
                todo
            };
            let this = &self;
            let sends = todo.into_iter().map(|(member, sessions)| {
                let fenced: Vec<(u64, u64)> = sessions.iter().map(|s| (s.0, highest)).collect();
                async move {
                    let done = if member == this.node.id {
                        this.record_fences(fenced).await
                    } else {
                        let req = pb::FenceRequest {
                            sessions: fenced
                                .iter()
                                .map(|&(session, highest_token)| pb::FencedSession { session, highest_token })
                                .collect(),
                        };
                        match this.files.storage(member) {
                            Ok(mut c) => match tokio::time::timeout(FENCE_DEADLINE, c.fence(req)).await {
                                Ok(r) => r.map(|_| ()),
                                Err(_) => Err(ErrorCode::Unavailable.status("no answer in time")),
                            },
                            Err(e) => Err(e),
                        }
                    };
                    (member, sessions, done)
                }
            });
            for (member, sessions, done) in futures::future::join_all(sends).await {
                match done {
                    Ok(()) => self.leader.lock().expect("leader leases").acked(member, &sessions),
                    Err(e) => tracing::debug!("fence of {sessions:?} at server {member}: {}", e.message()),
                }
            }
            let ready: Vec<SessionId> = {
                let l = self.leader.lock().expect("leader leases");
                let now = Instant::now();
                fencing.iter().copied().filter(|s| l.missing(*s, &members, now, lease).is_empty()).collect()
            };
            self.ack_fences(&ready).await;
        }
    }

    async fn ack_fences(&self, sessions: &[SessionId]) {
        for &session in sessions {
            if let Err(e) = self.node.propose_local(Op::Engine(Input::FenceAck { session })).await {
                tracing::debug!("fence ack of {session:?}: {e}");
            }
        }
    }
}

/// How soon a storage server asks again after a renewal failed.
const RETRY: Duration = Duration::from_millis(100);

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_millis(2_000);

    #[tokio::test(start_paused = true)]
    async fn a_fence_waits_for_every_member_or_its_lease() {
        let t0 = Instant::now();
        let mut l = LeaderLeases::default();
        let s = SessionId(7);
        let members = [1, 2, 3];
        l.leading(4, t0);
        // A new leader assumes every member holds a lease until its start plus the lease.
        assert_eq!(l.missing(s, &members, t0, LEASE), vec![1, 2, 3]);
        l.acked(1, &[s]);
        l.acked(2, &[s]);
        assert_eq!(l.missing(s, &members, t0 + LEASE / 2, LEASE), vec![3]);
        assert!(l.missing(s, &members, t0 + LEASE, LEASE).is_empty(), "member 3 is past its lease");
        // A grant in this term extends what member 3 may hold.
        l.granted(4, 3, t0 + LEASE / 2, t0 + LEASE / 2 + LEASE);
        assert_eq!(l.missing(s, &members, t0 + LEASE, LEASE), vec![3]);
        assert!(l.missing(s, &members, t0 + LEASE / 2 + LEASE, LEASE).is_empty());
        // A new term forgets the old term's grants and starts counting again.
        l.leading(5, t0 + 3 * LEASE);
        assert_eq!(l.missing(s, &members, t0 + 3 * LEASE, LEASE), vec![3]);
        l.keep_only(&[]);
        assert_eq!(l.missing(s, &members, t0 + 3 * LEASE, LEASE), vec![1, 2, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_storage_lease_is_valid_only_once_its_index_is_applied_and_before_it_ends() {
        let t0 = Instant::now();
        let lease = StorageLease::default();
        assert!(!lease.valid(t0, 100), "no lease yet");
        let end = storage_lease_end(t0, 2_000);
        assert_eq!(end, t0 + Duration::from_millis(1_800), "the drift margin comes off");
        lease.grant(end, 10);
        assert!(!lease.valid(t0, 9), "the log up to the leader's index is not applied yet");
        assert!(lease.valid(t0, 10));
        assert!(!lease.valid(end, 10), "ended");
        // A newer grant waiting for its index does not hide an older one still valid.
        lease.grant(end + Duration::from_millis(500), 20);
        assert!(lease.valid(t0, 10));
        assert!(!lease.valid(end, 10));
        assert!(lease.valid(end, 20));
    }
}
