//! The client-facing gRPC service: sessions as bidirectional streams, status and the lock table.
//!
//! A session's requests are proposed to the Raft log (forwarded to the leader by `Node`); its
//! answers and events come from this server's own application of the log, filtered to the
//! session. Tokens are signed here with the replicated cluster secret.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use lockengine::{ByteRange, Input, LockId, Mode, Output, PosixKind, PosixOwner, SessionId, Subject, ValueBlock};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use wire::v1 as pb;
use wire::v1::client_message::Body as Up;
use wire::v1::server_message::Body as Down;

use wire::ErrorCode;
use wire::convert::{
    mode_from_pb, mode_to_pb, posix_kind_from_pb, posix_kind_to_pb, range_from_pb, range_to_pb, value_to_pb,
};

use crate::errors::{ProposeError, engine_code};
use crate::forward::Route;
use crate::gateway_rt::GatewayRt;
use crate::lru::{Lru, LruState};
use crate::machine::{Applied, output_session};
use crate::node::Node;
use crate::types::{Op, Origin, client_lock_id, engine_lock_id};
use crate::waits::{self, Deadlines, Due};

/// Longest lease a client may ask for, and the shortest, unless the server's config says
/// otherwise (`lease_max_ms`, `lease_min_ms`).
pub const LEASE_MS_MAX: u64 = 600_000;
pub const LEASE_MS_MIN: u64 = 500;

/// A lease in the unit a person gave it ("10m", "500ms").
fn lease_text(ms: u64) -> String {
    if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1_000) && ms > 0 {
        format!("{}s", ms / 1_000)
    } else {
        format!("{ms}ms")
    }
}
/// Messages queued to one client before the server stops waiting for it.
const DOWN_QUEUE: usize = 1024;
/// Requests of one session on their way to the log at once; the next waits for the first.
const IN_FLIGHT_MAX: usize = 256;

/// Tests only (`Env::crash_after_release_ack_for_test`): the process dies right after it
/// acknowledged a release, before the release left it.
async fn crash_for_test() {
    tracing::warn!("test hook: crashing right after acknowledging a release");
    // Long enough for the acknowledgement to leave.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    std::process::abort();
}

/// What another part of the server adds to `status` (the data path's counters).
pub type StatusPart = Arc<dyn Fn(&mut pb::StatusReply) + Send + Sync>;

#[derive(Clone)]
pub struct LockService {
    node: Node,
    gateway: GatewayRt,
    status_parts: Vec<StatusPart>,
    /// The LRU size this server asks its sessions to keep, with its budget and use (`lru.rs`).
    lru: watch::Receiver<LruState>,
    /// Each identity's use against its quota on this server.
    quota: Arc<crate::quota::QuotaBook>,
}

impl std::fmt::Debug for LockService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockService").field("node", &self.node).finish_non_exhaustive()
    }
}

impl LockService {
    pub fn new(node: Node) -> LockService {
        let gateway = GatewayRt::start(node.clone(), node.config.gateway_lease_ms);
        let lru = start_lru(node.clone());
        let quota = Arc::new(crate::quota::QuotaBook::new(node.config.quota));
        LockService { node, gateway, status_parts: Vec::new(), lru, quota }
    }

    /// Lets `part` fill in its fields of every `status` reply.
    pub fn with_status(mut self, part: StatusPart) -> LockService {
        self.status_parts.push(part);
        self
    }

    pub fn server(self) -> pb::locks_server::LocksServer<LockService> {
        pb::locks_server::LocksServer::new(self)
    }
}

/// How often a server looks at its lock table to size its holders' LRUs.
const LRU_EVERY: Duration = Duration::from_secs(1);

/// Sizes the holders' LRUs from the lock table, once a second, for as long as the server runs.
fn start_lru(node: Node) -> watch::Receiver<LruState> {
    let mut lru = Lru::new(node.config.lock_memory_budget);
    let first = {
        let (sessions, locks) = node.machine.state().engine.size();
        lru.step(locks as u64, sessions as u64)
    };
    let (tx, rx) = watch::channel(first);
    tokio::spawn(async move {
        let mut every = tokio::time::interval(LRU_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = tx.closed() => return,
            }
            let (sessions, locks) = node.machine.state().engine.size();
            let next = lru.step(locks as u64, sessions as u64);
            tx.send_if_modified(|s| std::mem::replace(s, next) != next);
        }
    });
    rx
}

fn lru_message(size: u64) -> pb::ServerMessage {
    pb::ServerMessage { request_id: 0, body: Some(Down::LruSize(pb::LruSize { max_cached: size })) }
}

/// The engine input for one client request of `session`.
fn input_of(session: SessionId, body: Up) -> Result<Input, Status> {
    let lock_id = |n: u64| {
        engine_lock_id(session, n).ok_or_else(|| ErrorCode::TooLarge.status(format!("lock number {n} is too large")))
    };
    Ok(match body {
        Up::Open(_) => return Err(ErrorCode::Exists.status("the session is already open")),
        Up::Heartbeat(_) => Input::Renew { session },
        Up::Close(_) => Input::CloseSession { session },
        Up::Lock(l) => Input::Lock {
            lock: lock_id(l.lock)?,
            session,
            resource: l.resource,
            range: range_from_pb(l.range)?,
            mode: mode_from_pb(l.mode)?,
            nowait: l.nowait,
        },
        Up::Convert(c) => Input::Convert {
            lock: lock_id(c.lock)?,
            mode: mode_from_pb(c.mode)?,
            range: c.range.map(|r| range_from_pb(Some(r))).transpose()?,
        },
        Up::Release(l) => Input::Release { lock: lock_id(l.lock)? },
        Up::Cancel(l) => Input::Cancel { lock: lock_id(l.lock)? },
        Up::Cache(l) => Input::Cache { lock: lock_id(l.lock)? },
        Up::SetValue(v) => Input::SetValue { lock: lock_id(v.lock)?, value: v.value },
        Up::Posix(p) => Input::Posix {
            owner: PosixOwner { session, owner: p.owner },
            resource: p.resource,
            range: range_from_pb(p.range)?,
            kind: posix_kind_from_pb(p.kind)?,
            wait: p.wait,
        },
        Up::PosixTest(p) => Input::PosixTest {
            owner: PosixOwner { session, owner: p.owner },
            resource: p.resource,
            range: range_from_pb(p.range)?,
            kind: posix_kind_from_pb(p.kind)?,
        },
        Up::PosixCancel(p) => {
            Input::PosixCancel { owner: PosixOwner { session, owner: p.owner }, resource: p.resource }
        }
    })
}

/// What to propose for one client message, after the gateway has had its say: `None` when the
/// gateway answered it itself (a read lock from its cache, the release of one), a handover when a
/// write can take the place of the gateway's idle read lock, else the request as it is.
fn gateway_step(gateway: &GatewayRt, session: SessionId, request: u64, body: Up) -> Result<Option<Op>, Status> {
    let served = |lock: u64| gateway.serves(session, lock);
    match body {
        Up::Lock(l) if l.gateway && !l.nowait && mode_from_pb(l.mode)? == Mode::PR => {
            engine_lock_id(session, l.lock)
                .ok_or_else(|| ErrorCode::TooLarge.status(format!("lock number {} is too large", l.lock)))?;
            gateway.read(session, request, l.lock, l.resource, range_from_pb(l.range)?);
            Ok(None)
        }
        Up::Release(l) | Up::Cancel(l) if served(l.lock) => {
            gateway.release(session, l.lock, request);
            Ok(None)
        }
        Up::Cache(l) if served(l.lock) => {
            // The server keeps the file's read lock cached already; the client's cache of it
            // lives in the client.
            gateway.ack(session, request);
            Ok(None)
        }
        Up::Convert(pb::ConvertRequest { lock, .. }) | Up::SetValue(pb::SetValue { lock, .. }) if served(lock) => {
            Err(ErrorCode::Conflict.status(format!(
                "lock {lock} is a read lock served from this server's cache and cannot change in place; \
                 release it and ask for a write lock"
            )))
        }
        Up::Close(c) => {
            gateway.unregister_all(session);
            Ok(Some(Op::Engine(input_of(session, Up::Close(c))?)))
        }
        body => {
            let input = input_of(session, body)?;
            Ok(Some(match input {
                Input::Lock { .. } => gateway.write_op(session, request, input),
                other => Op::Engine(other),
            }))
        }
    }
}

/// Turns the outputs of one applied entry into messages for `session`. An entry the session
/// itself proposed ends with an `Ack` of its request, after every answer to it, so a client
/// knows a request is done once its ack arrives.
fn messages_for(node: &Node, session: SessionId, applied: &Applied) -> Vec<pb::ServerMessage> {
    let mine = applied.origin.is_some_and(|o| o.session == session);
    let request_id = if mine { applied.origin.map_or(0, |o| o.request) } else { 0 };
    let mut out = Vec::new();
    for o in &applied.reply.outputs {
        let for_me = match o {
            Output::Rejected { .. } => mine,
            other => output_session(other) == Some(session),
        };
        if !for_me {
            continue;
        }
        if let Some(body) = body_of(node, o) {
            out.push(pb::ServerMessage { request_id, body: Some(body) });
        }
    }
    if mine {
        out.push(pb::ServerMessage { request_id, body: Some(Down::Ack(pb::Ack {})) });
    }
    out
}

fn lock_ref(lock: LockId) -> pb::LockRef {
    pb::LockRef { lock: client_lock_id(lock) }
}

fn granted(
    node: &Node,
    lock: LockId,
    mode: Mode,
    range: ByteRange,
    token: u64,
    value: &ValueBlock,
    reused: bool,
) -> pb::Granted {
    let session = SessionId(lock.0 >> crate::types::CLIENT_LOCK_BITS);
    let signed_token = sign(node, lock, session, mode, range, token).unwrap_or_default();
    pb::Granted {
        lock: client_lock_id(lock),
        mode: mode_to_pb(mode),
        range: Some(range_to_pb(range)),
        token,
        signed_token,
        value: Some(value_to_pb(value)),
        reused,
        gateway: false,
    }
}

/// The signed token for a grant, if the cluster secret is known yet.
fn sign(node: &Node, lock: LockId, session: SessionId, mode: Mode, range: ByteRange, token: u64) -> Option<String> {
    let state = node.machine.state();
    let key = token::ClusterKey::from_bytes(state.secret?);
    let resource = state.engine.resource_of(lock)?.to_string();
    drop(state);
    key.sign(token::Claims { token, session, mode, range, resource }).ok().map(|t| t.to_string())
}

fn body_of(node: &Node, o: &Output) -> Option<Down> {
    Some(match o {
        Output::Granted { lock, mode, range, token, value, reused, .. } => {
            Down::Granted(granted(node, *lock, *mode, *range, *token, value, *reused))
        }
        Output::Converted { lock, mode, range, token, value, .. } => {
            Down::Converted(granted(node, *lock, *mode, *range, *token, value, false))
        }
        Output::Queued { lock, .. } => Down::Queued(lock_ref(*lock)),
        Output::Busy { lock, blockers, .. } => Down::Busy(pb::Busy {
            lock: client_lock_id(*lock),
            blockers: blockers.iter().map(|b| b.0).collect(),
            blocker_descriptions: describe(node, blockers),
        }),
        Output::Revoke { lock, .. } => Down::Revoke(lock_ref(*lock)),
        Output::Deadlock { lock, .. } => Down::Deadlock(lock_ref(*lock)),
        Output::Released { lock, .. } => Down::Released(lock_ref(*lock)),
        Output::Cancelled { lock, .. } => Down::Cancelled(lock_ref(*lock)),
        Output::Expired { session } => Down::Expired(pb::SessionEvent { session: session.0 }),
        // Not for clients: the leader fences storage from `fencing_sessions()` (fencing.rs).
        Output::Fence { .. } => return None,
        Output::PosixGranted { owner, resource, range, kind } => posix(0, *owner, resource, *range, *kind, None),
        Output::PosixUnlocked { owner, resource, range } => posix(1, *owner, resource, *range, PosixKind::Unlock, None),
        Output::PosixQueued { owner, resource, range, kind } => posix(2, *owner, resource, *range, *kind, None),
        Output::PosixBusy { owner, conflict, range, kind } => posix(3, *owner, "", *range, *kind, Some(*conflict)),
        Output::PosixFree { owner } => posix(4, *owner, "", ByteRange::ALL, PosixKind::Unlock, None),
        Output::PosixDeadlock { owner } => posix(5, *owner, "", ByteRange::ALL, PosixKind::Unlock, None),
        Output::PosixCancelled { owner, resource, range } => {
            posix(6, *owner, resource, *range, PosixKind::Unlock, None)
        }
        Output::Rejected { subject, error } => {
            let what = match subject {
                Subject::Lock(l) => format!("lock {}: ", client_lock_id(*l)),
                Subject::Owner(o) => format!("owner {}: ", o.owner),
                Subject::Session(_) | Subject::Epoch => String::new(),
            };
            Down::Rejected(pb::Rejected {
                code: u32::from(error.code()),
                message: format!("{what}{error}"),
                error: engine_code(error).into(),
            })
        }
    })
}

fn posix(
    outcome: i32,
    owner: PosixOwner,
    resource: &str,
    range: ByteRange,
    kind: PosixKind,
    conflict: Option<PosixOwner>,
) -> Down {
    Down::Posix(pb::PosixAnswer {
        outcome,
        session: owner.session.0,
        owner: owner.owner,
        resource: resource.to_string(),
        range: Some(range_to_pb(range)),
        kind: posix_kind_to_pb(kind),
        conflict_session: conflict.map_or(0, |c| c.session.0),
        conflict_owner: conflict.map_or(0, |c| c.owner),
    })
}

/// "session 3 holds EX 0..100 (lock 1)" for each blocker, for a person to read.
fn describe(node: &Node, blockers: &[LockId]) -> Vec<String> {
    let state = node.machine.state();
    blockers
        .iter()
        .map(|b| {
            let session = b.0 >> crate::types::CLIENT_LOCK_BITS;
            let who = match (state.gateways.get(&SessionId(session)), state.clients.get(&SessionId(session))) {
                (Some(server), _) => format!("the gateway of server {server} (session {session}, for its readers)"),
                (None, Some(client)) => format!("session {session} ({client})"),
                (None, None) => format!("session {session}"),
            };
            let view = state.engine.session_locks(SessionId(session)).into_iter().find(|v| v.lock == *b);
            match view {
                Some(v) => match (v.granted, v.waiting) {
                    (Some((m, r, t)), _) => {
                        format!("{who} holds {m} {r} (lock {}, token {t})", client_lock_id(*b))
                    }
                    (None, Some((m, r, _))) => {
                        format!("{who} waits for {m} {r} (lock {})", client_lock_id(*b))
                    }
                    (None, None) => format!("{who} (lock {})", client_lock_id(*b)),
                },
                None => format!("{who} (lock {})", client_lock_id(*b)),
            }
        })
        .collect()
}

/// Renews `session` with the leader and answers heartbeat `request`: an ack once renewed, a
/// refusal and an ack when the session is gone. Unanswered when no leader could be asked: the
/// client's next heartbeat tries again (and a server silent for two moves it elsewhere).
async fn answer_heartbeat(
    node: Node,
    session: SessionId,
    request: u64,
    tx: mpsc::Sender<Result<pb::ServerMessage, Status>>,
) {
    tracing::debug!("heartbeat {request} of session {}", session.0);
    let renewed = match node.renew(session).await {
        Ok(renewed) => renewed,
        Err(e) => {
            tracing::debug!("renewing session {}: {e}", session.0);
            return;
        }
    };
    tracing::debug!("heartbeat {request} of session {}: renewed {renewed}", session.0);
    if !renewed {
        let error = lockengine::EngineError::SessionExpired;
        let rejected = pb::Rejected {
            code: u32::from(error.code()),
            message: format!("session {} has expired or was closed: {error}", session.0),
            error: engine_code(&error).into(),
        };
        let _ = tx.send(Ok(pb::ServerMessage { request_id: request, body: Some(Down::Rejected(rejected)) })).await;
    }
    let _ = tx.send(Ok(pb::ServerMessage { request_id: request, body: Some(Down::Ack(pb::Ack {})) })).await;
}

type DownStream = Pin<Box<dyn Stream<Item = Result<pb::ServerMessage, Status>> + Send>>;

/// A request of the session on its way to the log.
type InFlight = Pin<Box<dyn std::future::Future<Output = Result<(), ProposeError>> + Send>>;

/// Keeps the deadline of a blocking request that carries one (`wait_ms`). A POSIX request
/// without one still counts: it voids the deadline of an older wait of its owner there.
fn note_deadline(node: &Node, session: SessionId, body: &Up, deadlines: &mut Deadlines) {
    let at = |ms: u64| Instant::now() + Duration::from_millis(ms);
    let kept = match body {
        Up::Lock(l) => match engine_lock_id(session, l.lock) {
            Some(lock) => deadlines.lock(lock, (l.wait_ms > 0 && !l.nowait).then(|| at(l.wait_ms))),
            None => true,
        },
        Up::Posix(p) => {
            let owner = PosixOwner { session, owner: p.owner };
            deadlines.posix(owner, &p.resource, (p.wait && p.wait_ms > 0).then(|| at(p.wait_ms)))
        }
        _ => true,
    };
    if !kept {
        // Full: drop what no longer waits, and keep this one if that made room.
        let state = node.machine.state();
        deadlines.prune(|due| match due {
            Due::Lock(lock) => state.engine.lock_waits(*lock),
            Due::Posix { owner, resource } => state.engine.posix_waits_on(*owner, resource),
        });
        drop(state);
        if deadlines.len() < waits::DEADLINES_MAX {
            note_deadline(node, session, body, deadlines);
        } else {
            tracing::warn!(session = session.0, "{} waits with deadlines: this one's is not kept", deadlines.len());
        }
    }
}

#[tonic::async_trait]
impl pb::locks_server::Locks for LockService {
    type SessionStream = DownStream;

    async fn session(&self, req: Request<Streaming<pb::ClientMessage>>) -> Result<Response<DownStream>, Status> {
        use crate::quota::{ANONYMOUS, identity_of, identity_suffix};
        // Who it is: its certificate's name (mutual TLS), else anonymous.
        let identity = identity_of(&req);
        let quota = self.quota.clone();
        let mut up = req.into_inner();
        let first = up.next().await.ok_or_else(|| ErrorCode::BadRequest.status("empty session stream"))??;
        let Some(Up::Open(open)) = first.body else {
            return Err(ErrorCode::BadRequest.status("a session stream must start with OpenSession"));
        };
        let node = self.node.clone();
        let (min, max) = (node.config.lease_min_ms, node.config.lease_max_ms);
        let lease_ms = open.lease_ms;
        if !(min..=max).contains(&lease_ms) {
            // Out of range, not clamped: a client that asked for an hour must not believe it
            // has one.
            return Err(ErrorCode::BadRequest.status(format!(
                "a lease of {} is outside this cluster's bounds, {} to {} (server settings lease_min_ms, \
                 lease_max_ms); ask for a lease within them",
                lease_text(lease_ms),
                lease_text(min),
                lease_text(max)
            )));
        }
        let session = if open.resume_session != 0 {
            let s = SessionId(open.resume_session);
            if !node.session_is_live(s) {
                return Err(ErrorCode::SessionExpired.status(format!(
                    "session {} has expired or was closed: its locks are gone; open a new session",
                    s.0
                )));
            }
            // A resume is a sign of life: renewed before the requests it resends, which its
            // heartbeats would otherwise wait behind. (The client counts nothing from it.)
            if let Err(e) = node.renew(s).await {
                tracing::debug!("renewing resumed session {}: {e}", s.0);
            }
            s
        } else {
            let mut client: String = open.client_name.chars().take(128).collect();
            let mut opening = None;
            if identity != ANONYMOUS || quota.quota.sessions.is_some() {
                let suffix = identity_suffix(&identity);
                let open_now = node.machine.state().clients.values().filter(|c| c.ends_with(&suffix)).count();
                match quota.admit_session(&identity, open_now as u64) {
                    Ok(slot) => opening = Some(slot),
                    Err(why) => {
                        metrics::counter!("stripelock_quota_refusals_total").increment(1);
                        quota.delay_refusal(&identity).await;
                        return Err(ErrorCode::Quota.status(why.to_string()));
                    }
                }
                client.push_str(&suffix);
            }
            let reply = node.propose(Op::OpenSession { lease_ms, client }, None).await.map_err(|e| e.status())?;
            node.applied(reply.index).await;
            drop(opening);
            reply.session.ok_or_else(|| ErrorCode::Internal.status("no session number in the reply"))?
        };
        // Attached before the resync reads the table, so nothing applied after it is missed. (A
        // new session cannot be concerned by an entry before its client has heard of it.)
        let mut applied = node.machine.attach(session);
        let (tx, rx) = mpsc::channel::<Result<pb::ServerMessage, Status>>(DOWN_QUEUE);
        let heartbeat_ms = (lease_ms / 3).max(100);
        let opened = pb::ServerMessage {
            request_id: first.request_id,
            body: Some(Down::Opened(pb::SessionOpened { session: session.0, lease_ms, heartbeat_ms })),
        };
        tx.send(Ok(opened)).await.map_err(|_| Status::cancelled("client went away"))?;
        let mut lru = self.lru.clone();
        let mut lru_sent = lru.borrow_and_update().size;
        tx.send(Ok(lru_message(lru_sent))).await.map_err(|_| Status::cancelled("client went away"))?;
        let gateway = self.gateway.clone();
        let stream = gateway.register(session, tx.clone());
        // A resumed session is told the state of its locks again: what was in flight while it
        // was away may have been granted.
        if open.resume_session != 0 {
            let only = open.resync_listed.then(|| open.resync_locks.iter().copied().collect());
            for msg in resync(&node, session, only) {
                let _ = tx.send(Ok(msg)).await;
            }
        }

        // Down: this server's applied entries, filtered to the session.
        let mut telemetry = crate::telemetry::SessionMetrics::new(quota.clone(), identity.clone());
        let arrivals = telemetry.arrivals.clone();
        let down_tx = tx.clone();
        let down_node = node.clone();
        let down_gateway = gateway.clone();
        tokio::spawn(async move {
            'stream: loop {
                let next = tokio::select! {
                    next = applied.recv() => next,
                    Ok(()) = lru.changed() => {
                        let size = lru.borrow_and_update().size;
                        if size != lru_sent {
                            lru_sent = size;
                            if down_tx.send(Ok(lru_message(size))).await.is_err() {
                                break 'stream;
                            }
                        }
                        continue 'stream;
                    }
                    // The client went away: nothing will read what comes, so stop now rather
                    // than when the session's next entry finds the stream gone.
                    _ = down_tx.closed() => break 'stream,
                };
                match next {
                    Some(a) => {
                        telemetry.applied(session, &a);
                        if a.reply.outputs.iter().any(|o| matches!(o, Output::Expired { session: s } if *s == session))
                        {
                            // Its reads from the gateway's cache end with the session.
                            down_gateway.unregister_all(session);
                        }
                        for msg in messages_for(&down_node, session, &a) {
                            if down_tx.send(Ok(msg)).await.is_err() {
                                break 'stream;
                            }
                        }
                    }
                    // The session was closed or expired: its last messages are out; the
                    // stream ends here.
                    None if !down_node.session_is_live(session) => break 'stream,
                    None => {
                        let _ = down_tx
                            .send(Err(ErrorCode::Unavailable.status(
                                "this session stream fell behind or was replaced by another; \
                                 reconnect and resume the session",
                            )))
                            .await;
                        break 'stream;
                    }
                }
            }
            drop(applied);
            telemetry.finish();
            down_node.machine.detach(session);
        });

        // Up: each request put in order on its way to the log (or served by the gateway),
        // pipelined: the next goes before the first is committed. Answers and acks come down
        // from this server's own application of the log; a failure ends the stream, and the
        // client resends what was not acknowledged, in order, on resume (`forward.rs`).
        let up_tx = tx;
        let crash_after_release_ack = node.config.env.crash_after_release_ack_for_test.clone();
        tokio::spawn(async move {
            let mut in_flight = futures::stream::FuturesOrdered::new();
            let mut route: Option<Route> = None;
            let mut closing = false;
            let mut deadlines = Deadlines::default();
            let failed = loop {
                let due = deadlines.next_due();
                let next = tokio::select! {
                    biased;
                    Some(outcome) = in_flight.next(), if !in_flight.is_empty() => {
                        if let Err(e) = outcome {
                            break Some(e);
                        }
                        continue;
                    }
                    () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => None,
                    msg = up.next(), if !closing && in_flight.len() < IN_FLIGHT_MAX => {
                        let Some(Ok(msg)) = msg else { break None };
                        Some(msg)
                    }
                    else => break None,
                };
                // A deadline that passed: the request is cancelled as if the client had asked
                // (no request of the client's to answer; the `cancelled` goes to it as an event).
                let Some(msg) = next else {
                    let Some(due) = deadlines.take_due(Instant::now()) else { continue };
                    let cancel = {
                        let state = node.machine.state();
                        match due {
                            Due::Lock(lock) if state.engine.lock_waits(lock) => Some(Input::Cancel { lock }),
                            Due::Posix { owner, resource } if state.engine.posix_waits_on(owner, &resource) => {
                                Some(Input::PosixCancel { owner, resource })
                            }
                            _ => None,
                        }
                    };
                    let Some(cancel) = cancel else { continue };
                    tracing::debug!(session = session.0, "a wait reached its deadline: {cancel:?}");
                    let now = node.route();
                    match node.submit(now, Op::Engine(cancel), None).await {
                        Ok(outcome) => in_flight.push_back(Box::pin(async move {
                            outcome
                                .await
                                .unwrap_or_else(|_| {
                                    Err(ProposeError::Stopped { reason: "the command's outcome was dropped".into() })
                                })
                                .map(|_| ())
                        }) as InFlight),
                        Err(e) => break Some(e),
                    }
                    continue;
                };
                let Some(body) = msg.body else { continue };
                if matches!(body, Up::Heartbeat(_)) {
                    // A renewal lives in the leader's memory, not in the log: answered
                    // on its own, in no order with the requests around it.
                    tokio::spawn(answer_heartbeat(node.clone(), session, msg.request_id, up_tx.clone()));
                    continue;
                }
                note_deadline(&node, session, &body, &mut deadlines);
                closing = matches!(body, Up::Close(_));
                let release = matches!(body, Up::Release(_));
                let request = msg.request_id;
                if let Up::Lock(l) = &body {
                    arrivals.lock_request(request, l.mode);
                    if let Err(why) = quota.admit_lock(&identity) {
                        metrics::counter!("stripelock_quota_refusals_total").increment(1);
                        let rejected =
                            pb::Rejected { code: 0, message: why.to_string(), error: ErrorCode::Quota.into() };
                        let m = pb::ServerMessage { request_id: request, body: Some(Down::Rejected(rejected)) };
                        let ack = pb::ServerMessage { request_id: request, body: Some(Down::Ack(pb::Ack {})) };
                        // Answered late (the quota module says why), while the session's other
                        // requests go on.
                        let (quota, identity, up_tx) = (quota.clone(), identity.clone(), up_tx.clone());
                        tokio::spawn(async move {
                            quota.delay_refusal(&identity).await;
                            if up_tx.send(Ok(m)).await.is_ok() {
                                let _ = up_tx.send(Ok(ack)).await;
                            }
                        });
                        continue;
                    }
                }
                let op = match gateway_step(&gateway, session, request, body) {
                    Ok(Some(op)) => op,
                    Ok(None) => continue,
                    Err(status) => {
                        // Refused before the engine saw it: no engine code, the status's own.
                        let error = wire::code_of(&status).unwrap_or(ErrorCode::Internal).into();
                        let rejected = pb::Rejected { code: 0, message: status.message().to_string(), error };
                        let m = pb::ServerMessage { request_id: request, body: Some(Down::Rejected(rejected)) };
                        let ack = pb::ServerMessage { request_id: request, body: Some(Down::Ack(pb::Ack {})) };
                        if up_tx.send(Ok(m)).await.is_err() || up_tx.send(Ok(ack)).await.is_err() {
                            break None;
                        }
                        continue;
                    }
                };
                let release = release && matches!(op, Op::Engine(Input::Release { .. }));
                let handover = match &op {
                    Op::Handover { release, .. } => Some(*release),
                    _ => None,
                };
                // A new route only once the old one has answered everything on it.
                let now = node.route();
                if route.is_some_and(|r| r != now) {
                    let mut lost = None;
                    while let Some(outcome) = in_flight.next().await {
                        lost = lost.or(outcome.err());
                    }
                    if let Some(e) = lost {
                        break Some(e);
                    }
                }
                route = Some(now);
                if release
                    && let Some(flag) = &crash_after_release_ack
                    && std::fs::remove_file(flag).is_ok()
                {
                    // The worst moment to die: the client has its acknowledgement and the
                    // release has not left this server; only the client's resend saves it.
                    let ordered = pb::ServerMessage { request_id: request, body: Some(Down::Ordered(pb::Ack {})) };
                    let _ = up_tx.send(Ok(ordered)).await;
                    crash_for_test().await;
                }
                let origin = Origin { session, request };
                let outcome = match node.submit(now, op, Some(origin)).await {
                    Ok(outcome) => outcome,
                    Err(e) => {
                        if let Some(release) = handover {
                            gateway.handover_failed(release);
                        }
                        break Some(e);
                    }
                };
                let gateway = gateway.clone();
                in_flight.push_back(Box::pin(async move {
                    let result = outcome.await.unwrap_or_else(|_| {
                        Err(ProposeError::Stopped { reason: "the command's outcome was dropped".into() })
                    });
                    if result.is_err()
                        && let Some(release) = handover
                    {
                        gateway.handover_failed(release);
                    }
                    result.map(|_| ())
                }) as InFlight);
                if release {
                    // In order on its way to the log: the client may go on.
                    let ordered = pb::ServerMessage { request_id: request, body: Some(Down::Ordered(pb::Ack {})) };
                    if up_tx.send(Ok(ordered)).await.is_err() {
                        break None;
                    }
                }
            };
            if let Some(e) = failed {
                let _ = up_tx.send(Err(e.status())).await;
            }
            gateway.unregister(session, stream);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn status(&self, _req: Request<pb::StatusRequest>) -> Result<Response<pb::StatusReply>, Status> {
        use openraft::async_runtime::WatchReceiver;
        let m = self.node.raft.metrics().borrow_watched().clone();
        let (stats, stored) = {
            let state = self.node.machine.state();
            (state.engine.stats(), state.largest_owners(100))
        };
        let gateway = self.gateway.stats();
        let lru = *self.lru.borrow();
        let snap = self.node.machine.snapshot_stats();
        let servers = m
            .membership_config
            .membership()
            .nodes()
            .map(|(id, n)| pb::ServerInfo {
                id: *id,
                address: n.addr.clone(),
                voter: m.membership_config.membership().voter_ids().any(|v| v == *id),
            })
            .collect();
        let mut reply = pb::StatusReply {
            server_id: self.node.id,
            address: self.node.addr.clone(),
            leader_id: m.current_leader.unwrap_or(0),
            term: m.current_term,
            commit_index: m.local_committed.as_ref().map_or(0, |l| l.index),
            applied_index: m.last_applied.as_ref().map_or(0, |l| l.index),
            servers,
            sessions: stats.sessions,
            sessions_fencing: stats.sessions_fencing,
            resources: stats.resources,
            locks_granted: stats.locks_granted,
            locks_cached: stats.locks_cached,
            stored: stored.into_iter().map(|(identity, bytes)| pb::IdentityBytes { identity, bytes }).collect(),
            bytes_quota: self.node.config.quota.bytes.unwrap_or(0),
            requests_waiting: stats.requests_waiting,
            last_token: stats.last_token,
            log_entries: self.node.machine.store().log_len().unwrap_or(0),
            snapshot_index: m.snapshot.as_ref().map_or(0, |l| l.index),
            gateway_session: gateway.session.map_or(0, |s| s.0),
            gateway_files: gateway.files,
            gateway_readers: gateway.readers,
            gateway_grants: gateway.grants,
            gateway_handovers: gateway.handovers,
            pid: std::process::id(),
            lock_memory_budget: lru.budget,
            lock_memory_used: lru.used,
            lru_size: lru.size,
            snapshot_bytes: snap.bytes,
            snapshot_locks: snap.locks,
            snapshot_build_ms: snap.build_ms,
            snapshot_restore_ms: snap.restore_ms,
            rejoining: self.node.rejoining(),
            data_dir: self.node.config.data_dir.display().to_string(),
            ..Default::default()
        };
        {
            let attached = self.node.machine.attached();
            let state = self.node.machine.state();
            for session in attached {
                let Some(client) = state.clients.get(&session).filter(|c| c.starts_with("mount ")) else { continue };
                let locks = state.engine.session_locks(session).iter().filter(|v| v.granted.is_some()).count() as u64;
                let fcntl_locks = state.engine.session_posix_locks(session);
                reply.mounts.push(pb::MountInfo { session: session.0, client: client.clone(), locks, fcntl_locks });
            }
        }
        for part in &self.status_parts {
            part(&mut reply);
        }
        Ok(Response::new(reply))
    }

    async fn table(&self, req: Request<pb::TableRequest>) -> Result<Response<pb::TableReply>, Status> {
        let prefix = req.into_inner().prefix;
        let state = self.node.machine.state();
        let resources = state
            .engine
            .resources(&prefix)
            .into_iter()
            .map(|r| pb::ResourceRow {
                name: r.name,
                locks: r
                    .locks
                    .into_iter()
                    .map(|l| pb::LockRow {
                        lock: client_lock_id(l.lock),
                        session: l.session.0,
                        granted: l.granted.is_some(),
                        mode: l.granted.map_or(0, |g| mode_to_pb(g.0)),
                        range: l.granted.map(|g| range_to_pb(g.1)),
                        token: l.granted.map_or(0, |g| g.2),
                        cached: l.cached,
                        waiting: l.waiting.is_some(),
                        wait_mode: l.waiting.as_ref().map_or(0, |w| mode_to_pb(w.0)),
                        wait_range: l.waiting.as_ref().map(|w| range_to_pb(w.1)),
                        blockers: l.waiting.as_ref().map_or(Vec::new(), |w| w.2.iter().map(|b| b.0).collect()),
                        gateway_of: state.gateways.get(&l.session).copied().unwrap_or(0),
                        client: state.clients.get(&l.session).cloned().unwrap_or_default(),
                    })
                    .collect(),
                posix: r
                    .posix
                    .into_iter()
                    .map(|p| pb::PosixRow {
                        session: p.owner.session.0,
                        owner: p.owner.owner,
                        range: Some(range_to_pb(p.range)),
                        kind: posix_kind_to_pb(p.kind),
                        granted: p.granted,
                    })
                    .collect(),
                value: Some(value_to_pb(&r.value)),
            })
            .collect();
        let edges = state
            .engine
            .wait_for_edges()
            .into_iter()
            .map(|(from, to)| pb::WaitEdge { waiter: owner_name(from), holder: owner_name(to) })
            .collect();
        Ok(Response::new(pb::TableReply { resources, edges }))
    }

    async fn evict(&self, req: Request<pb::EvictRequest>) -> Result<Response<pb::EvictReply>, Status> {
        let req = req.into_inner();
        let mut sessions: Vec<SessionId> = req.sessions.iter().map(|s| SessionId(*s)).collect();
        if !req.holders_of.is_empty() {
            let state = self.node.machine.state();
            let holders = state.engine.resources(&req.holders_of).into_iter().filter(|r| r.name == req.holders_of);
            sessions.extend(holders.flat_map(|r| r.locks).filter(|l| l.granted.is_some()).map(|l| l.session));
        }
        sessions.sort();
        sessions.dedup();
        if sessions.is_empty() {
            return Err(ErrorCode::NotFound.status(if req.holders_of.is_empty() {
                "no session given: name sessions, or a resource whose holders to evict".to_string()
            } else {
                format!("nobody holds a lock on {}", req.holders_of)
            }));
        }
        let mut evicted = Vec::new();
        for session in sessions {
            let (client, locks) = {
                let state = self.node.machine.state();
                if !state.engine.session_is_live(session) {
                    return Err(ErrorCode::SessionExpired.status(format!(
                        "session {} is not live (it expired, was closed, was evicted already or never \
                         existed); `stripelock locks` lists the sessions holding locks",
                        session.0
                    )));
                }
                let client = match state.gateways.get(&session) {
                    Some(server) => format!("the gateway of server {server}"),
                    None => state.clients.get(&session).cloned().unwrap_or_default(),
                };
                let locks = state.engine.session_locks(session).iter().filter(|v| v.granted.is_some()).count();
                (client, locks as u64)
            };
            let reply = self.node.propose(Op::Engine(Input::Evict { session }), None).await.map_err(|e| e.status())?;
            if let Some(Output::Rejected { error, .. }) =
                reply.outputs.iter().find(|o| matches!(o, Output::Rejected { .. }))
            {
                return Err(engine_code(error).status(format!("session {}: {error}", session.0)));
            }
            self.node.applied(reply.index).await;
            evicted.push(pb::EvictedSession { session: session.0, client, locks });
        }
        Ok(Response::new(pb::EvictReply { evicted }))
    }
}

fn owner_name(o: lockengine::OwnerKey) -> String {
    match o {
        lockengine::OwnerKey::Session(s) => format!("session {}", s.0),
        lockengine::OwnerKey::Posix(p) => format!("session {} owner {}", p.session.0, p.owner),
    }
}

/// The current state of a resumed session's locks, as grant and queued messages: of those in
/// `only` (by the client's lock number) if given, else of all.
fn resync(node: &Node, session: SessionId, only: Option<std::collections::HashSet<u64>>) -> Vec<pb::ServerMessage> {
    let views = node.machine.state().engine.session_locks(session);
    let values = Arc::new(ValueBlock::Empty);
    // A revoke sent while the session was moving may have been lost: every cached lock its
    // holder was asked to give back is asked again (else the waiter behind it waits forever).
    let revokes: Vec<pb::ServerMessage> = views
        .iter()
        .filter(|v| v.revoked && v.granted.is_some())
        .map(|v| pb::ServerMessage { request_id: 0, body: Some(Down::Revoke(lock_ref(v.lock))) })
        .collect();
    views
        .into_iter()
        .filter(|v| only.as_ref().is_none_or(|o| o.contains(&client_lock_id(v.lock))))
        .map(|v| {
            let body = match v.granted {
                Some((m, r, t)) => Down::Granted(granted(node, v.lock, m, r, t, &values, false)),
                None => Down::Queued(lock_ref(v.lock)),
            };
            pb::ServerMessage { request_id: 0, body: Some(body) }
        })
        .chain(revokes)
        .collect()
}
