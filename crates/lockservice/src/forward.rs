//! Ordered submission of commands (issue 12). A session's requests are pipelined: each is put
//! in order on its way to the log and the next goes before the first is committed. Order holds
//! because every command travels one *route* at a time, and a route keeps order and fails as a
//! suffix:
//!
//! - **Local** (this server leads in term T): written into its own Raft core, conditioned on
//!   the leader being the one of term T; the core takes them in the order written, and once one
//!   is refused for leadership every later one is too. A suffix of the log cut by a later leader
//!   cuts them as a suffix too.
//! - **Forward** (generation G of this server's stream to the leader): one long-lived stream;
//!   the leader writes each batch in the order sent, conditioned on the leadership it had when
//!   the stream opened, and ends the stream at the first refusal. When the stream breaks every
//!   command still unanswered fails and the generation moves on; a command given for an older
//!   generation fails at once.
//!
//! A caller that sees its route change waits for what it has in flight on the old one before it
//! submits on the new one (`service.rs`), so no command overtakes an earlier one across routes.
//! A command that failed may still be committed (its leader appended it before it fell): it is
//! resent with its origin, and applied once.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::{Stream, StreamExt};
use openraft::impls::ProgressResponder;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use wire::ErrorCode;
use wire::v1::RaftPayload;
use wire::v1::raft_client::RaftClient;

use crate::errors::ProposeError;
use crate::machine::Machine;
use crate::network::{decode, encode};
use crate::types::{C, Command, NodeId, Reply};

/// Names of the stream's messages, for errors.
pub const FORWARDED: &str = "forwarded batch";
pub const FORWARD_RESULT: &str = "forwarded result";

/// Where a command goes now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Local { term: u64 },
    Forward { generation: u64 },
}

/// A command's outcome, once it is committed and applied (or refused).
pub type Outcome = oneshot::Receiver<Result<Reply, ProposeError>>;

/// Commands this server has on its way to the leader, at most; a submitter then waits.
const QUEUED: usize = 4_096;
/// How long the oldest unanswered command may wait before the stream is given up: a leader that
/// accepts connections but does not answer (paused, cut off) must not hold commands for ever.
/// A leader change is seen sooner, by the check every `CHECK_EVERY`; this covers a leader that
/// hangs and is not replaced. Not shorter: a loaded leader (a snapshot of a million locks, a
/// slow fsync) answered nothing for over a second, and giving the stream up then made every
/// session on this server reconnect and resend, which kept it from ever catching up.
const ANSWER_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);
/// How often the forwarding task looks at who leads and at its deadline.
const CHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

type Done = oneshot::Sender<Result<Reply, ProposeError>>;

struct Item {
    generation: u64,
    cmd: Command,
    done: oneshot::Sender<Result<Reply, ProposeError>>,
}

/// This server's stream of commands to the leader.
#[derive(Clone)]
pub struct Forwarder {
    generation: Arc<AtomicU64>,
    items: mpsc::Sender<Item>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Forwarder(generation {})", self.generation.load(Ordering::Relaxed))
    }
}

/// Who leads, as this server sees it: id and address.
pub type LeaderOf = Arc<dyn Fn() -> Option<(NodeId, String)> + Send + Sync>;

impl Forwarder {
    /// Starts the task that keeps the stream to whoever leads.
    pub fn start(connector: wire::Connector, leader: LeaderOf) -> Forwarder {
        let (items, rx) = mpsc::channel(QUEUED);
        let generation = Arc::new(AtomicU64::new(1));
        tokio::spawn(run(rx, generation.clone(), connector, leader));
        Forwarder { generation, items }
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Puts `cmd` on the stream of `generation`: it fails if that stream has broken since.
    pub async fn submit(&self, generation: u64, cmd: Command) -> Result<Outcome, ProposeError> {
        let (done, outcome) = oneshot::channel();
        self.items
            .send(Item { generation, cmd, done })
            .await
            .map_err(|_| ProposeError::Stopped { reason: "the forwarding task has ended".into() })?;
        Ok(outcome)
    }
}

fn broken(leader: NodeId, reason: impl Into<String>) -> ProposeError {
    ProposeError::LeaderUnreachable { leader, reason: reason.into() }
}

/// The forwarding task: one stream at a time, to the leader of the moment.
async fn run(mut rx: mpsc::Receiver<Item>, generation: Arc<AtomicU64>, connector: wire::Connector, leader: LeaderOf) {
    while let Some(first) = rx.recv().await {
        let current = generation.load(Ordering::Relaxed);
        if first.generation != current {
            let _ = first.done.send(Err(broken(0, "the stream it was given to has broken")));
            continue;
        }
        let Some((leader_id, addr)) = leader() else {
            let _ = first.done.send(Err(ProposeError::NoLeader));
            generation.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let channel = match connector.channel(&addr) {
            Ok(c) => c,
            Err(e) => {
                let _ = first.done.send(Err(broken(leader_id, e.to_string())));
                generation.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        let (out, out_rx) = mpsc::channel::<RaftPayload>(64);
        // Ordered, so that failing what is left is done the same way on every run (the simulation
        // replays a seed exactly).
        let mut pending: BTreeMap<u64, (Done, tokio::time::Instant)> = BTreeMap::new();
        let mut next_seq = 0u64;
        let mut batch = vec![first];
        // Takes what else is queued, so one message carries many commands.
        while batch.len() < 256
            && let Ok(item) = rx.try_recv()
        {
            batch.push(item);
        }
        let send_batch = |batch: Vec<Item>, pending: &mut BTreeMap<_, _>, next_seq: &mut u64| {
            let mut cmds = Vec::with_capacity(batch.len());
            for item in batch {
                if item.generation != current {
                    let _ = item.done.send(Err(broken(leader_id, "the stream it was given to has broken")));
                    continue;
                }
                *next_seq += 1;
                pending.insert(*next_seq, (item.done, tokio::time::Instant::now()));
                cmds.push((*next_seq, item.cmd));
            }
            encode(FORWARDED, &cmds).ok()
        };
        let Some(payload) = send_batch(batch, &mut pending, &mut next_seq) else {
            generation.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let _ = out.send(payload).await;
        let mut client = RaftClient::new(channel);
        let answers = tokio::time::timeout(ANSWER_DEADLINE, client.propose_stream(ReceiverStream::new(out_rx))).await;
        let reason = match answers {
            Err(_) => format!("the leader did not take the stream within {ANSWER_DEADLINE:?}"),
            Ok(Err(s)) => s.message().to_string(),
            Ok(Ok(answers)) => {
                let mut answers = answers.into_inner();
                let mut check = tokio::time::interval(CHECK_EVERY);
                loop {
                    tokio::select! {
                        _ = check.tick() => {
                            if leader().map(|(id, _)| id) != Some(leader_id) {
                                break "the leader changed".to_string();
                            }
                            if pending.values().next().is_some_and(|(_, at)| at.elapsed() > ANSWER_DEADLINE) {
                                break format!("no answer within {ANSWER_DEADLINE:?}");
                            }
                        }
                        answer = answers.next() => match answer {
                            Some(Ok(p)) => match decode::<(u64, Result<Reply, ProposeError>)>(FORWARD_RESULT, &p) {
                                Ok((seq, result)) => {
                                    if let Some((done, _)) = pending.remove(&seq) {
                                        let _ = done.send(result);
                                    }
                                }
                                Err(e) => break e.to_string(),
                            },
                            Some(Err(s)) => break s.message().to_string(),
                            None => break "the leader ended the stream".to_string(),
                        },
                        item = rx.recv() => {
                            let Some(item) = item else { return };
                            let mut batch = vec![item];
                            while batch.len() < 256 && let Ok(item) = rx.try_recv() {
                                batch.push(item);
                            }
                            let Some(payload) = send_batch(batch, &mut pending, &mut next_seq) else {
                                break "a command could not be encoded".to_string();
                            };
                            // A leader that stopped reading fills the stream: given up like one
                            // that stopped answering.
                            match tokio::time::timeout(ANSWER_DEADLINE, out.send(payload)).await {
                                Ok(Ok(())) => {}
                                Ok(Err(_)) => break "the stream to the leader closed".to_string(),
                                Err(_) => break format!("the leader took nothing for {ANSWER_DEADLINE:?}"),
                            }
                        }
                    }
                }
            }
        };
        // Everything unanswered fails; what comes next goes on a new stream.
        generation.fetch_add(1, Ordering::Relaxed);
        for (_, (done, _)) in std::mem::take(&mut pending) {
            let _ = done.send(Err(broken(leader_id, reason.clone())));
        }
        tracing::debug!(leader = leader_id, "forward stream ended: {reason}");
    }
}

/// How the leader's own core answered a write.
pub fn outcome_of(
    r: Result<openraft::raft::ClientWriteResult<C>, oneshot::error::RecvError>,
) -> Result<Reply, ProposeError> {
    match r {
        Ok(Ok(resp)) => Ok(resp.data),
        Ok(Err(e)) => Err(ProposeError::refused_by_core(&e)),
        Err(_) => Err(ProposeError::Stopped { reason: "the Raft core dropped the command".into() }),
    }
}

/// The term of a leadership.
pub fn leader_term(leader: &openraft::raft::Leader<C, Machine>) -> u64 {
    use openraft::vote::RaftLeaderId;
    leader.to_committed_leader_id().term()
}

/// Writes `cmd` into this server's core in order, if it still leads in `term`.
pub async fn write_local(raft: &openraft::Raft<C, Machine>, term: u64, cmd: Command) -> Result<Outcome, ProposeError> {
    let leader = raft.as_leader().map_err(|_| ProposeError::Refused {
        code: ErrorCode::NotLeader,
        message: "this server no longer leads".into(),
    })?;
    if leader_term(&leader) != term {
        return Err(ProposeError::Refused {
            code: ErrorCode::NotLeader,
            message: format!("the term is no longer {term}"),
        });
    }
    let (responder, rx) = ProgressResponder::<C, _>::complete_only();
    raft.write(cmd)
        .responder(responder)
        .with_leader(leader.to_committed_leader_id())
        .await
        .map_err(|e| ProposeError::Stopped { reason: e.to_string() })?;
    let (done, outcome) = oneshot::channel();
    tokio::spawn(async move {
        let _ = done.send(outcome_of(rx.await));
    });
    Ok(outcome)
}

pub type ResultStream = Pin<Box<dyn Stream<Item = Result<RaftPayload, Status>> + Send>>;

/// The leader's side of a follower's stream: writes each command in the order sent, under the
/// leadership it has now, and answers each; ends the stream at the first refusal.
pub fn serve_stream(
    raft: openraft::Raft<C, Machine>,
    now_ms: Arc<dyn Fn() -> u64 + Send + Sync>,
    mut incoming: tonic::Streaming<RaftPayload>,
) -> Result<ResultStream, Status> {
    let leader = raft
        .as_leader()
        .map_err(|_| wire::not_leader_status(None, "this server does not lead; forward to the leader"))?;
    let leader_id = leader.to_committed_leader_id();
    let (waits, mut waiting) = mpsc::channel::<(u64, oneshot::Receiver<openraft::raft::ClientWriteResult<C>>)>(QUEUED);
    let (answers, answers_rx) = mpsc::channel::<Result<RaftPayload, Status>>(64);
    tokio::spawn(async move {
        while let Some(Ok(payload)) = incoming.next().await {
            let Ok(batch) = decode::<Vec<(u64, Command)>>(FORWARDED, &payload) else { return };
            for (seq, cmd) in batch {
                // Stamped with this leader's clock; a follower's clock is not the log's.
                let cmd = Command { now_ms: now_ms(), ..cmd };
                let (responder, rx) = ProgressResponder::<C, _>::complete_only();
                if raft.write(cmd).responder(responder).with_leader(leader_id).await.is_err() {
                    return;
                }
                if waits.send((seq, rx)).await.is_err() {
                    return;
                }
            }
        }
    });
    tokio::spawn(async move {
        while let Some((seq, rx)) = waiting.recv().await {
            let result = outcome_of(rx.await);
            let refused = result.is_err();
            let Ok(payload) = encode(FORWARD_RESULT, &(seq, result)) else { return };
            if answers.send(Ok(payload)).await.is_err() || refused {
                // Dropping the queue of waits ends the reader too: nothing after a refusal.
                return;
            }
        }
    });
    Ok(Box::pin(ReceiverStream::new(answers_rx)))
}
