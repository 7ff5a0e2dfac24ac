//! Runs a server's [`Gateway`]: carries its proposals through the node (retrying, since each
//! carries the gateway session's request number and a retry is answered from memory), feeds it
//! the applied entries that concern its session and the passing of time, and sends what it tells
//! clients down their session streams.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use lockengine::{ByteRange, Input, LockId, Mode, SessionId};
use tokio::sync::mpsc;
use tonic::Status;
use wire::v1 as pb;
use wire::v1::server_message::Body as Down;

use crate::gateway::{Effect, Gateway, ReadRequest, ToClient};
use crate::node::Node;
use crate::types::{Op, Origin};

/// Where a client session's messages go: its stream's queue, and which stream it is.
type ClientTx = (u64, mpsc::Sender<Result<pb::ServerMessage, Status>>);

/// How often the gateway looks at its lease.
const TICK: Duration = Duration::from_millis(100);

#[derive(Clone)]
pub struct GatewayRt {
    node: Node,
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    core: Gateway,
    clients: HashMap<SessionId, ClientTx>,
    next_stream: u64,
}

impl std::fmt::Debug for GatewayRt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GatewayRt({})", self.node.id)
    }
}

impl GatewayRt {
    /// A gateway whose session has a lease of `lease_ms`; it opens the session on first use.
    pub fn start(node: Node, lease_ms: u64) -> GatewayRt {
        let mut core = Gateway::with_limits(lease_ms, &node.config.limits);
        if node.config.env.break_gateway_for_negative_control {
            core.break_for_negative_control();
        }
        let inner = Arc::new(Mutex::new(Inner { core, clients: HashMap::new(), next_stream: 0 }));
        let rt = GatewayRt { node, inner };
        let weak = Arc::downgrade(&rt.inner);
        let node = rt.node.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let rt = GatewayRt { node: node.clone(), inner };
                let now = rt.now_ms();
                rt.with(|core, out| core.tick(now, out));
            }
        });
        rt
    }

    fn now_ms(&self) -> u64 {
        self.node.config.env.now_ms()
    }

    /// Runs `f` on the core and carries out what it asks for.
    fn with<R>(&self, f: impl FnOnce(&mut Gateway, &mut Vec<Effect>) -> R) -> R {
        let mut out = Vec::new();
        let (r, sends) = {
            let mut inner = self.inner.lock().expect("gateway lock");
            let r = f(&mut inner.core, &mut out);
            // Messages are queued while the lock is held, so each client sees them in order.
            let mut rest = Vec::new();
            for e in out {
                match e {
                    Effect::Send { client, message } => {
                        if let Some((_, tx)) = inner.clients.get(&client)
                            && let Err(mpsc::error::TrySendError::Full(msg)) =
                                tx.try_send(Ok(self.message(client, message)))
                        {
                            // A client this far behind is cut off; it resumes and is resynchronised.
                            tracing::debug!("gateway: session {} fell behind; dropping {msg:?}", client.0);
                            inner.clients.remove(&client);
                        }
                    }
                    other => rest.push(other),
                }
            }
            (r, rest)
        };
        for e in sends {
            self.carry_out(e);
        }
        r
    }

    fn carry_out(&self, e: Effect) {
        match e {
            Effect::Send { .. } => unreachable!("sent under the lock"),
            Effect::OpenSession { lease_ms } => {
                let rt = self.clone();
                tokio::spawn(async move { rt.open(lease_ms).await });
            }
            Effect::Propose { request, input } => {
                let rt = self.clone();
                tokio::spawn(async move { rt.propose(request, input).await });
            }
            Effect::Abandon { session } => {
                let node = self.node.clone();
                tokio::spawn(async move {
                    let _ = node.propose(Op::Engine(Input::CloseSession { session }), None).await;
                });
            }
            Effect::Handover { .. } => unreachable!("handovers are proposed by the client's stream"),
        }
    }

    async fn open(&self, lease_ms: u64) {
        let sent = self.now_ms();
        let reply = self.node.propose(Op::OpenGatewaySession { lease_ms, server: self.node.id }, None).await;
        match reply.map(|r| r.session) {
            Ok(Some(session)) => {
                // Attached before the gateway's first request, so no answer is missed.
                let applied = self.node.machine.attach(session);
                self.spawn_listener(session, applied);
                let now = self.now_ms();
                self.with(|core, out| core.opened(now, sent, session, out));
            }
            Ok(None) => self.with(|core, out| core.open_failed("no session number in the reply", out)),
            Err(e) => {
                let why = e.to_string();
                self.with(|core, out| core.open_failed(&why, out));
            }
        }
    }

    fn spawn_listener(&self, session: SessionId, mut applied: mpsc::Receiver<Arc<crate::machine::Applied>>) {
        let weak: Weak<Mutex<Inner>> = Arc::downgrade(&self.inner);
        let node = self.node.clone();
        tokio::spawn(async move {
            loop {
                let next = applied.recv().await;
                let Some(inner) = weak.upgrade() else { return };
                let rt = GatewayRt { node: node.clone(), inner };
                if rt.with(|core, _| core.session()) != Some(session) {
                    break;
                }
                let now = rt.now_ms();
                match next {
                    Some(a) => rt.with(|core, out| core.applied(now, &a.reply.outputs, out)),
                    None => {
                        // Fell behind the log: what the gateway believes may be stale.
                        rt.with(|core, out| core.lost_track(out));
                        break;
                    }
                }
            }
            drop(applied);
            node.machine.detach(session);
        });
    }

    async fn propose(&self, request: u64, input: Input) {
        if let Input::Renew { session } = input {
            // Renewed in the leader's memory, not the log; a refusal means the session is gone
            // (its expiry reaches the gateway through the log).
            // Retried while no leader answers (an election): counted from the first send, so
            // a late answer only makes the gateway more careful than the leader.
            let mut renewed = self.node.renew(session).await;
            for _ in 0..10 {
                let Err(e) = &renewed else { break };
                tracing::debug!("gateway renewal of session {}: {e}; retrying", session.0);
                tokio::time::sleep(Duration::from_millis(100)).await;
                renewed = self.node.renew(session).await;
            }
            self.with(|core, _| core.proposed(request, renewed == Ok(true)));
            return;
        }
        loop {
            let Some(session) = self.with(|core, _| core.session()) else { return };
            let origin = Origin { session, request };
            match self.node.propose(Op::Engine(input.clone()), Some(origin)).await {
                Ok(_) => {
                    self.with(|core, _| core.proposed(request, true));
                    return;
                }
                Err(e) => {
                    tracing::debug!("gateway request {request} ({input:?}): {e}; retrying");
                    self.with(|core, _| core.proposed(request, false));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// A client's session stream starts; returns its stream number for `unregister`. Local
    /// locks of an earlier stream of the same session end here.
    pub fn register(&self, client: SessionId, tx: mpsc::Sender<Result<pb::ServerMessage, Status>>) -> u64 {
        self.with(|core, out| core.client_gone(client, out));
        let mut inner = self.inner.lock().expect("gateway lock");
        inner.next_stream += 1;
        let stream = inner.next_stream;
        inner.clients.insert(client, (stream, tx));
        stream
    }

    /// A client's session stream ended: its local locks end with it.
    pub fn unregister(&self, client: SessionId, stream: u64) {
        let current = self.inner.lock().expect("gateway lock").clients.get(&client).map(|(s, _)| *s);
        if current == Some(stream) {
            self.inner.lock().expect("gateway lock").clients.remove(&client);
            self.with(|core, out| core.client_gone(client, out));
        }
    }

    /// The session is closing: its local locks end now.
    pub fn unregister_all(&self, client: SessionId) {
        self.with(|core, out| core.client_gone(client, out));
    }

    /// Acknowledges a request the gateway has nothing to do for.
    pub fn ack(&self, client: SessionId, request: u64) {
        self.with(|_, out| out.push(Effect::Send { client, message: ToClient::Ack { request } }));
    }

    pub fn stats(&self) -> crate::gateway::GatewayStats {
        self.inner.lock().expect("gateway lock").core.stats()
    }

    pub fn serves(&self, client: SessionId, lock: u64) -> bool {
        self.inner.lock().expect("gateway lock").core.serves(client, lock)
    }

    pub fn read(&self, client: SessionId, request: u64, lock: u64, resource: String, range: ByteRange) {
        let now = self.now_ms();
        let req = ReadRequest { client, lock, request, resource, range };
        self.with(|core, out| core.read(now, req, out));
    }

    /// The log entry to propose for a client's write request: a handover when this gateway holds
    /// an idle read lock on the file, else the request itself.
    pub fn write_op(&self, client: SessionId, request: u64, input: Input) -> Op {
        match self.with(|core, _| core.write(client, request, input.clone())) {
            Some(Effect::Handover { release, input, .. }) => Op::Handover { release, request: input },
            _ => Op::Engine(input),
        }
    }

    /// A handover could not be committed: the gateway's lock is released the ordinary way.
    pub fn handover_failed(&self, release: LockId) {
        self.with(|core, out| core.handover_failed(release, out));
    }

    /// Releases (or cancels) a lock the gateway serves; false when it serves no such lock.
    pub fn release(&self, client: SessionId, lock: u64, request: u64) -> bool {
        self.with(|core, out| core.release(client, lock, request, out)).is_some()
    }

    /// The wire message for what the core tells a client.
    fn message(&self, client: SessionId, m: ToClient) -> pb::ServerMessage {
        let (request_id, body) = match m {
            ToClient::Granted { request, lock, resource, range, token, value, gateway_lock: _ } => {
                let signed_token = self.sign(client, &resource, range, token).unwrap_or_default();
                let g = pb::Granted {
                    lock,
                    mode: wire::convert::mode_to_pb(Mode::PR),
                    range: Some(wire::convert::range_to_pb(range)),
                    token,
                    signed_token,
                    value: Some(wire::convert::value_to_pb(&value)),
                    reused: false,
                    gateway: true,
                };
                (request, Down::Granted(g))
            }
            ToClient::Ack { request } => (request, Down::Ack(pb::Ack {})),
            ToClient::Released { request, lock } => (request, Down::Released(pb::LockRef { lock })),
            ToClient::Cancelled { request, lock } => (request, Down::Cancelled(pb::LockRef { lock })),
            ToClient::Revoke { lock } => (0, Down::Revoke(pb::LockRef { lock })),
            ToClient::Lost { lock, why } => (0, Down::Lost(pb::LockLost { lock, reason: why })),
            ToClient::Rejected { request, lock, error } => {
                let rejected = pb::Rejected {
                    code: u32::from(error.code()),
                    message: format!("lock {lock}: {error}"),
                    error: crate::errors::engine_code(&error).into(),
                };
                (request, Down::Rejected(rejected))
            }
        };
        pb::ServerMessage { request_id, body: Some(body) }
    }

    /// A token for a local read grant: the gateway's token, signed for the client's session.
    fn sign(&self, client: SessionId, resource: &str, range: ByteRange, token: u64) -> Option<String> {
        let secret = self.node.machine.state().secret?;
        let key = token::ClusterKey::from_bytes(secret);
        let claims = token::Claims { token, session: client, mode: Mode::PR, range, resource: resource.to_string() };
        key.sign(claims).ok().map(|t| t.to_string())
    }
}
