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

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockengine::{Input, SessionId};
use lockservice::Op;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::Status;
use wire::ErrorCode;
use wire::v1 as pb;

use crate::lease::{LeaderLeases, StorageEvent, storage_lease_end, storage_lease_ms_left};
use crate::locks::Fencing as Fenced;
use crate::shared::Shared;
use crate::volume::Volume;

/// How long the leader waits for one storage server to acknowledge a fence before it tries
/// again on a later tick.
const FENCE_DEADLINE: Duration = Duration::from_millis(500);

/// The fencing duties of a server: as a storage server, keeping its storage lease; as the
/// leader, granting storage leases and sending fences.
#[derive(Clone)]
pub struct Fencing {
    shared: Arc<Shared>,
    volume: Volume,
    /// Seed 003, while this server leads: the storage leases it granted and the fences
    /// acknowledged.
    leader: Arc<Mutex<LeaderLeases>>,
    /// When this leader first saw each session it is fencing (for the fence's latency).
    fencing_since: Arc<Mutex<std::collections::HashMap<SessionId, Instant>>>,
}

impl std::fmt::Debug for Fencing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fencing({})", self.shared.id())
    }
}

impl Fencing {
    pub fn new(volume: Volume) -> Fencing {
        Fencing { shared: volume.shared.clone(), volume, leader: Default::default(), fencing_since: Default::default() }
    }

    fn storage_lease(&self) -> Duration {
        Duration::from_millis(self.shared.config.storage_lease_ms)
    }

    /// The leader's answer to a storage lease renewal from `server`.
    pub async fn answer_lease(&self, server: u64) -> Result<pb::StorageLeaseReply, Status> {
        let not_leader =
            || ErrorCode::NotLeader.status(format!("server {} is not the leader; ask the leader", self.shared.id()));
        let before = self.shared.locks.leadership();
        if !before.leading {
            return Err(not_leader());
        }
        // Confirms with a majority that this server still leads: a deposed leader must not hand
        // out a lease its successor does not count on.
        self.shared
            .locks
            .confirm_leadership()
            .await
            .map_err(|e| ErrorCode::Unavailable.status(format!("leadership not confirmed: {e}")))?;
        let after = self.shared.locks.leadership();
        if !after.leading || after.term != before.term {
            return Err(not_leader());
        }
        let term = before.term;
        let (applied_index, fencing) = {
            let f = self.shared.locks.fencing();
            let fencing = f
                .sessions
                .into_iter()
                .map(|s| pb::FencedSession { session: s.0, highest_token: f.last_token })
                .collect();
            (f.applied_index, fencing)
        };
        let now = Instant::now();
        self.leader.lock().expect("leader leases").granted(term, server, now, now + self.storage_lease());
        Ok(pb::StorageLeaseReply { lease_ms: self.shared.config.storage_lease_ms, applied_index, fencing })
    }

    /// Keeps this server's storage lease: renews it from the leader every third of the lease
    /// (sooner while it holds none), recording the fences the answer carries before taking it.
    pub async fn renew_storage_lease(self, mut stop: watch::Receiver<bool>) {
        let period = self.storage_lease() / 3;
        loop {
            let sent = Instant::now();
            let sent_ms = self.shared.locks.now_ms();
            let answer = match self.shared.locks.leadership().leader {
                Some(leader) if leader == self.shared.id() => self.answer_lease(leader).await,
                Some(leader) => match self.shared.storage(leader) {
                    Ok(mut c) => {
                        let ask = c.renew_storage_lease(pb::StorageLeaseRequest { server: self.shared.id() });
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
                    match self.volume.record_fences(fenced).await {
                        Ok(()) => {
                            self.volume.lease.grant(storage_lease_end(sent, reply.lease_ms), reply.applied_index);
                            if let Some(observe) = &self.shared.config.env.storage_observer {
                                let until_ms = sent_ms + storage_lease_ms_left(reply.lease_ms);
                                observe(StorageEvent::Lease { server: self.shared.id(), until_ms });
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
        let mut tick = tokio::time::interval(Duration::from_millis(self.shared.config.tick_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            if !self.shared.locks.leadership().leading {
                continue;
            }
            let term = self.shared.locks.leadership().term;
            let Fenced { sessions: fencing, last_token: highest, .. } = self.shared.locks.fencing();
            {
                let mut l = self.leader.lock().expect("leader leases");
                l.leading(term, Instant::now());
                l.keep_only(&fencing);
            }
            {
                let mut since = self.fencing_since.lock().expect("fencing since");
                since.retain(|s, _| fencing.contains(s));
                for s in &fencing {
                    since.entry(*s).or_insert_with(Instant::now);
                }
            }
            if fencing.is_empty() {
                continue;
            }
            if self.shared.config.env.skip_storage_fence_for_negative_control {
                self.ack_fences(&fencing).await;
                continue;
            }
            let members: Vec<u64> = self.shared.locks.members().keys().copied().collect();
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
                    let done = if member == this.shared.id() {
                        this.volume.record_fences(fenced).await
                    } else {
                        let req = pb::FenceRequest {
                            sessions: fenced
                                .iter()
                                .map(|&(session, highest_token)| pb::FencedSession { session, highest_token })
                                .collect(),
                        };
                        match this.shared.storage(member) {
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
            match self.shared.locks.propose_here(Op::Engine(Input::FenceAck { session })).await {
                Ok(_) => {
                    metrics::counter!("stripelock_fences_total").increment(1);
                    if let Some(since) = self.fencing_since.lock().expect("fencing since").remove(&session) {
                        metrics::histogram!("stripelock_fence_seconds").record(since.elapsed().as_secs_f64());
                    }
                }
                Err(e) => tracing::debug!("fence ack of {session:?}: {e}"),
            }
        }
    }
}

/// How soon a storage server asks again after a renewal failed.
const RETRY: Duration = Duration::from_millis(100);
