//! The runtime of in-memory leases (`leases.rs`): heartbeats from this server's sessions (and,
//! on the leader, batches forwarded by followers) queue here; one task takes everything queued
//! at once. On the leader it records the batch in the lease table, confirms leadership once
//! (a ReadIndex round) and answers; on a follower it forwards the batch to the leader in one
//! RPC. The leader's tick expires sessions whose lease ran out, by proposing `Evict`.

use std::future::Future;
use std::sync::{Arc, Mutex};

use lockengine::SessionId;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use crate::errors::ProposeError;
use crate::forward::Route;
use crate::leases::Leases;
use crate::machine::Machine;

/// What the lease keeper asks of its server (the node implements it).
pub trait Server: Clone + Send + Sync + 'static {
    /// Where a command submitted now would go: this server's core (it leads) or the leader.
    fn route(&self) -> Route;
    fn machine(&self) -> &Machine;
    fn is_leader(&self) -> bool;
    fn term(&self) -> u64;
    /// A ReadIndex round: a majority confirms this server still leads.
    fn confirm_leadership(&self) -> impl Future<Output = Result<(), ProposeError>> + Send;
    /// A batch of renewals handed to the leader; per session, whether it renewed it.
    fn forward_renewals(
        &self,
        sessions: Vec<SessionId>,
    ) -> impl Future<Output = Result<Vec<bool>, ProposeError>> + Send;
    /// Proposes the expiry of `session` (an `Evict` entry) on this server, the leader.
    fn expire(&self, session: SessionId) -> impl Future<Output = Result<(), ProposeError>> + Send;
}

/// Whether a session was renewed: `false` when it is closed, expired or expiring.
pub type Renewed = Result<bool, ProposeError>;

/// Most renewals one batch carries (a follower's RPC, a ReadIndex round).
const BATCH_MAX: usize = 4_096;

struct Waiting {
    session: SessionId,
    /// Forwarded by a follower: answered here or refused, never forwarded again.
    here_only: bool,
    answer: oneshot::Sender<Renewed>,
}

/// A renewal recorded in the table, to be answered once leadership is confirmed.
struct Recorded {
    term: u64,
    renewed: bool,
    answer: oneshot::Sender<Renewed>,
}

#[derive(Default)]
struct Inner {
    table: Mutex<Leases>,
    queue: Mutex<Vec<Waiting>>,
    wake: Notify,
    /// Recorded renewals waiting for the next ReadIndex round.
    confirming: Mutex<Vec<Recorded>>,
    confirm_wake: Notify,
}

/// Batches of renewals a follower has with the leader at once.
const FORWARDS_IN_FLIGHT: usize = 8;

/// The server's lease keeper: its queue of renewals and, while it leads, its lease table.
#[derive(Clone)]
pub struct Renewer {
    inner: Arc<Inner>,
    /// The leader's monotonic clock starts here.
    base: Instant,
}

impl std::fmt::Debug for Renewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Renewer").finish_non_exhaustive()
    }
}

impl Renewer {
    pub fn new(break_fresh_lease: bool) -> Renewer {
        let r = Renewer { inner: Arc::default(), base: Instant::now() };
        if break_fresh_lease {
            r.inner.table.lock().expect("leases").break_fresh_lease_for_negative_control();
        }
        r
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    /// Queues a renewal of `session` and waits for its answer.
    pub async fn renew(&self, session: SessionId, here_only: bool) -> Renewed {
        let (answer, rx) = oneshot::channel();
        self.inner.queue.lock().expect("renewals").push(Waiting { session, here_only, answer });
        self.inner.wake.notify_one();
        rx.await.unwrap_or(Err(ProposeError::Stopped { reason: "the lease keeper stopped".into() }))
    }

    /// Serves the queue for as long as the server runs. Recording never waits: confirming
    /// leadership (a round trip to a majority, slow under load) runs beside it, one round for
    /// everything recorded meanwhile, and a follower keeps several batches with the leader at
    /// once. A renewal waiting behind a slow round could otherwise see its lease run out.
    pub async fn run<N: Server>(self, node: N) {
        tokio::spawn(self.clone().confirm_loop(node.clone()));
        let forwards = Arc::new(tokio::sync::Semaphore::new(FORWARDS_IN_FLIGHT));
        loop {
            let batch: Vec<Waiting> = {
                let mut q = self.inner.queue.lock().expect("renewals");
                let n = q.len().min(BATCH_MAX);
                q.drain(..n).collect()
            };
            if batch.is_empty() {
                self.inner.wake.notified().await;
                continue;
            }
            match node.route() {
                Route::Local { term } if node.machine().state().applied_term == term => self.record(&node, term, batch),
                // Elected, and not yet caught up with its own term: asked again in a moment.
                Route::Local { .. } => {
                    for w in batch {
                        let _ = w.answer.send(Err(ProposeError::NoLeader));
                    }
                }
                Route::Forward { .. } => {
                    let Ok(permit) = forwards.clone().acquire_owned().await else { return };
                    let (me, node) = (self.clone(), node.clone());
                    tokio::spawn(async move {
                        me.forward(&node, batch).await;
                        drop(permit);
                    });
                }
            }
        }
    }

    /// Records a batch in the leader's table now; its answers wait for the next ReadIndex round.
    fn record<N: Server>(&self, node: &N, term: u64, batch: Vec<Waiting>) {
        let results: Vec<bool> = {
            let state = node.machine().state();
            let mut table = self.inner.table.lock().expect("leases");
            table.lead(term);
            let now = self.now_ms();
            batch
                .iter()
                .map(|w| {
                    let renewed = state.engine.live_lease_ms(w.session).map(|lease| table.renew(w.session, lease, now));
                    matches!(renewed, Some(Ok(())))
                })
                .collect()
        };
        let mut confirming = self.inner.confirming.lock().expect("confirming");
        confirming.extend(batch.into_iter().zip(results).map(|(w, renewed)| Recorded {
            term,
            renewed,
            answer: w.answer,
        }));
        drop(confirming);
        self.inner.confirm_wake.notify_one();
    }

    /// Answers recorded renewals, one ReadIndex round for all recorded since the last.
    async fn confirm_loop<N: Server>(self, node: N) {
        loop {
            let recorded: Vec<Recorded> = std::mem::take(&mut *self.inner.confirming.lock().expect("confirming"));
            if recorded.is_empty() {
                self.inner.confirm_wake.notified().await;
                continue;
            }
            // Acknowledged only once a majority confirms this server still leads, in the term
            // it recorded them in (`leases.rs`).
            let confirmed = node.confirm_leadership().await;
            let term = node.term();
            for r in recorded {
                let answer = match &confirmed {
                    Ok(()) if r.term == term => Ok(r.renewed),
                    Ok(()) => Err(not_leader()),
                    Err(e) => Err(e.clone()),
                };
                let _ = r.answer.send(answer);
            }
        }
    }

    async fn forward<N: Server>(&self, node: &N, batch: Vec<Waiting>) {
        let (here_only, to_leader): (Vec<Waiting>, Vec<Waiting>) = batch.into_iter().partition(|w| w.here_only);
        for w in here_only {
            let _ = w.answer.send(Err(not_leader()));
        }
        if to_leader.is_empty() {
            return;
        }
        let sessions: Vec<SessionId> = to_leader.iter().map(|w| w.session).collect();
        match node.forward_renewals(sessions).await {
            Ok(renewed) if renewed.len() == to_leader.len() => {
                for (w, r) in to_leader.into_iter().zip(renewed) {
                    let _ = w.answer.send(Ok(r));
                }
            }
            Ok(_) => {
                let e = ProposeError::Refused {
                    code: wire::ErrorCode::Internal,
                    message: "the leader answered a different number of renewals".into(),
                };
                for w in to_leader {
                    let _ = w.answer.send(Err(e.clone()));
                }
            }
            Err(e) => {
                for w in to_leader {
                    let _ = w.answer.send(Err(e.clone()));
                }
            }
        }
    }

    /// The leader's tick: sessions whose lease ran out are expired (`Evict` in the log). Off
    /// the leader, or before it applied an entry of its own term, the table is dropped or left.
    pub async fn expire_due<N: Server>(&self, node: &N) {
        let Some(term) = ready_term(node) else {
            if !node.is_leader() {
                self.inner.table.lock().expect("leases").step_down();
            }
            return;
        };
        let due = {
            let state = node.machine().state();
            let mut table = self.inner.table.lock().expect("leases");
            table.lead(term);
            table.sweep(self.now_ms(), state.engine.live_sessions())
        };
        for session in due {
            let (node, me) = (node.clone(), self.clone());
            tokio::spawn(async move {
                tracing::info!("session {} expired: no renewal within its lease", session.0);
                if let Err(e) = node.expire(session).await {
                    tracing::debug!("expiring session {}: {e}", session.0);
                    me.inner.table.lock().expect("leases").expiry_failed(session);
                }
            });
        }
    }
}

/// The term this server leads in, once it has applied an entry of that term (so every expiry an
/// earlier leader proposed that will ever commit has been applied here).
fn ready_term<N: Server>(node: &N) -> Option<u64> {
    let term = match node.route() {
        Route::Local { term } => term,
        Route::Forward { .. } => return None,
    };
    (node.machine().state().applied_term == term).then_some(term)
}

fn not_leader() -> ProposeError {
    ProposeError::Refused { code: wire::ErrorCode::NotLeader, message: "this server no longer leads".into() }
}
