//! A server's gateway cache of shared read locks (seed 002), as a pure state machine.
//!
//! Clients that ask for a read lock "through the gateway" are served by the server they are
//! attached to. That server holds one whole-file PR lock per file in the engine, under its own
//! gateway session, and grants its clients' read locks from it locally: the first reader costs
//! one log entry, every later one none. The gateway's lock is marked cached in the engine, so a
//! conflicting request anywhere revokes it; the gateway then passes the revoke on to its
//! readers and releases the file lock when the last of them is done. A local client that asks to
//! write a file whose cached lock no reader is using gets its write lock in the same log entry
//! that releases the gateway's read lock ([`Effect::Handover`]): the read lock is traded for the
//! write lock atomically, with no window in which another server's request slips in.
//!
//! Local grants last only while the gateway session's lease is valid on this server's clock
//! (seed 003): the lease is counted from when a renewal was *sent*, less a margin for clock
//! drift, so it runs out here before the cluster expires the session. When it runs out, or the
//! cluster expires the session anyway, every local grant is lost and the clients are told.
//!
//! Time and messages come in, effects go out; `crate::gateway_rt` carries them out.

use std::collections::BTreeMap;

use lockengine::{ByteRange, Input, LockId, Mode, Output, SessionId, Subject, ValueBlock, lease};

use crate::types::engine_lock_id;

/// A client's lock, by its session and the session's number for it.
pub type ClientLock = (SessionId, u64);

/// A read request a client sent through the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRequest {
    pub client: SessionId,
    /// The client's number for the lock.
    pub lock: u64,
    /// The client's request number, answered by an ack.
    pub request: u64,
    pub resource: String,
    pub range: ByteRange,
}

/// Something for the runtime to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Tell a client something, in order.
    Send { client: SessionId, message: ToClient },
    /// Open the gateway's own session (its lease is the gateway's).
    OpenSession { lease_ms: u64 },
    /// Propose an engine input as the gateway's session, with the gateway's request number.
    Propose { request: u64, input: Input },
    /// Release `release` (the gateway's idle read lock) and make the client's request in one
    /// log entry, answered to the client as its own request.
    Handover { release: LockId, client: SessionId, request: u64, input: Input },
    /// The gateway session was given up (its lease ran out here): close it in the cluster.
    Abandon { session: SessionId },
}

/// What a client is told about a lock the gateway serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToClient {
    /// A read lock granted from the gateway's lock; `request` is 0 for a late grant.
    Granted {
        request: u64,
        lock: u64,
        resource: String,
        range: ByteRange,
        token: u64,
        value: ValueBlock,
        gateway_lock: LockId,
    },
    /// The request is done (after its answer, if it had one).
    Ack {
        request: u64,
    },
    Released {
        request: u64,
        lock: u64,
    },
    Cancelled {
        request: u64,
        lock: u64,
    },
    /// Someone elsewhere wants to write: release this read lock when done with it.
    Revoke {
        lock: u64,
    },
    /// The lock (granted or waited for) is gone: the gateway's lease ran out, its session
    /// expired, or its request was refused.
    Lost {
        lock: u64,
        why: String,
    },
    /// The request for lock `lock` was refused at once.
    Rejected {
        request: u64,
        lock: u64,
        error: lockengine::EngineError,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Asked of the engine; not granted yet.
    Requested,
    Granted {
        token: u64,
    },
    /// A release (or handover) was proposed; nothing more is granted from it.
    Releasing,
}

#[derive(Debug)]
struct File {
    lock: LockId,
    held: Held,
    value: ValueBlock,
    /// The engine asked for it back: no new local grants, release once readers are done.
    revoked: bool,
    readers: BTreeMap<ClientLock, ByteRange>,
    /// Requests waiting for the file lock, in arrival order.
    waiters: Vec<ReadRequest>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Session {
    Closed,
    Opening,
    Open {
        id: SessionId,
        /// Local grants are made only before this time (this server's clock).
        valid_until_ms: u64,
        next_renew_ms: u64,
        /// The renewal in flight: its request number and when it was sent.
        renewing: Option<(u64, u64)>,
    },
}

/// The gateway's state on one server.
#[derive(Debug)]
pub struct Gateway {
    lease_ms: u64,
    session: Session,
    /// Requests that arrived while no session was open.
    pending: Vec<ReadRequest>,
    files: BTreeMap<String, File>,
    /// Which file each local lock (granted or waiting) is on.
    local: BTreeMap<ClientLock, String>,
    next_request: u64,
    next_lock: u64,
    /// The negative control: release on revoke at once, readers or not, and tell no one.
    broken: bool,
    /// Most read locks (granted, waiting or pending) it keeps for its clients at once, and most
    /// requests waiting on one file: past them a read is refused with the limit, so no queue
    /// grows without bound (the engine's `locks_per_session_max` and
    /// `waiters_per_resource_max`, since the gateway's session holds these for its readers).
    locks_max: u64,
    waiters_max: u64,
    stats: GatewayStats,
}

/// What a gateway has done, for `status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GatewayStats {
    pub session: Option<SessionId>,
    /// Files it holds (or asked for) a read lock on.
    pub files: u64,
    /// Read locks granted from its cache now.
    pub readers: u64,
    /// Read locks granted from its cache since the server started.
    pub grants: u64,
    /// Write requests that took the place of its idle read lock.
    pub handovers: u64,
}

impl Gateway {
    pub fn new(lease_ms: u64) -> Gateway {
        Gateway::with_limits(lease_ms, &lockengine::Limits::default())
    }

    /// A gateway whose queues stop at `limits` (see the `locks_max` field).
    pub fn with_limits(lease_ms: u64, limits: &lockengine::Limits) -> Gateway {
        Gateway {
            locks_max: limits.locks_per_session_max,
            waiters_max: limits.waiters_per_resource_max,
            lease_ms,
            session: Session::Closed,
            pending: Vec::new(),
            files: BTreeMap::new(),
            local: BTreeMap::new(),
            next_request: 0,
            next_lock: 0,
            broken: false,
            stats: GatewayStats::default(),
        }
    }

    pub fn stats(&self) -> GatewayStats {
        GatewayStats {
            session: self.session(),
            files: self.files.len() as u64,
            readers: self.readers() as u64,
            ..self.stats
        }
    }

    /// The simulation's negative control: a gateway that gives its read lock back as soon as
    /// it is revoked, with its readers still reading. The simulation's checker must catch it.
    pub fn break_for_negative_control(&mut self) {
        self.broken = true;
    }

    /// The gateway's engine session, when one is open.
    pub fn session(&self) -> Option<SessionId> {
        match self.session {
            Session::Open { id, .. } => Some(id),
            _ => None,
        }
    }

    /// Whether `lock` of `client` is one the gateway serves (granted or waiting).
    pub fn serves(&self, client: SessionId, lock: u64) -> bool {
        self.local.contains_key(&(client, lock))
    }

    /// Local read locks granted now, for status.
    pub fn readers(&self) -> usize {
        self.files.values().map(|f| f.readers.len()).sum()
    }

    fn request_number(&mut self) -> u64 {
        self.next_request += 1;
        self.next_request
    }

    fn can_grant(&self, now_ms: u64) -> bool {
        matches!(self.session, Session::Open { valid_until_ms, .. } if now_ms < valid_until_ms)
    }

    /// A client asks for a read lock on `range` of a file.
    pub fn read(&mut self, now_ms: u64, req: ReadRequest, out: &mut Vec<Effect>) {
        self.admit(now_ms, req, false, out);
    }

    /// `read`, or (`acked`) the same for a request already acknowledged, whose grant comes late.
    fn admit(&mut self, now_ms: u64, req: ReadRequest, acked: bool, out: &mut Vec<Effect>) {
        let key = (req.client, req.lock);
        let (client, request) = (req.client, req.request);
        let ack = move |out: &mut Vec<Effect>| {
            if !acked {
                out.push(send(client, ToClient::Ack { request }));
            }
        };
        if self.local.contains_key(&key) {
            let error = lockengine::EngineError::LockExists;
            out.push(send(req.client, ToClient::Rejected { request: req.request, lock: req.lock, error }));
            out.push(send(req.client, ToClient::Ack { request: req.request }));
            return;
        }
        let full = if self.local.len() as u64 >= self.locks_max {
            Some((lockengine::LimitKind::LocksPerSession, self.locks_max))
        } else if self.files.get(&req.resource).is_some_and(|f| f.waiters.len() as u64 >= self.waiters_max) {
            Some((lockengine::LimitKind::WaitersPerResource, self.waiters_max))
        } else {
            None
        };
        if let Some((kind, max)) = full {
            let error = lockengine::EngineError::Limit { kind, max };
            out.push(send(req.client, ToClient::Rejected { request: req.request, lock: req.lock, error }));
            ack(out);
            return;
        }
        self.local.insert(key, req.resource.clone());
        let Session::Open { id, .. } = self.session else {
            ack(out);
            self.pending.push(req);
            if self.session == Session::Closed {
                self.session = Session::Opening;
                out.push(Effect::OpenSession { lease_ms: self.lease_ms });
            }
            return;
        };
        let can_grant = self.can_grant(now_ms);
        let file = self.files.get_mut(&req.resource);
        match file {
            Some(f) if can_grant && !f.revoked && matches!(f.held, Held::Granted { .. }) && f.waiters.is_empty() => {
                let Held::Granted { token } = f.held else { unreachable!("matched") };
                f.readers.insert(key, req.range);
                self.stats.grants += 1;
                let request = if acked { 0 } else { req.request };
                out.push(send(req.client, grant(&req, request, token, f)));
                ack(out);
            }
            Some(f) => {
                ack(out);
                f.waiters.push(req);
            }
            None => {
                ack(out);
                let resource = req.resource.clone();
                self.request_file(id, resource, vec![req], out);
            }
        }
    }

    /// Asks the engine for a whole-file PR on `resource` for `waiters`.
    fn request_file(&mut self, session: SessionId, resource: String, waiters: Vec<ReadRequest>, out: &mut Vec<Effect>) {
        self.next_lock += 1;
        let Some(lock) = engine_lock_id(session, self.next_lock) else {
            // This session has used every lock number it has: start over with a new session.
            // Its readers are told their locks are lost; waiting requests are asked again.
            self.pending.extend(waiters);
            self.lapse("the server's gateway used up its session's lock numbers and started a new one", out);
            out.push(Effect::Abandon { session });
            return;
        };
        let request = self.request_number();
        out.push(Effect::Propose {
            request,
            input: Input::Lock {
                lock,
                session,
                resource: resource.clone(),
                range: ByteRange::ALL,
                mode: Mode::PR,
                nowait: false,
            },
        });
        let file = File {
            lock,
            held: Held::Requested,
            value: ValueBlock::Empty,
            revoked: false,
            readers: BTreeMap::new(),
            waiters,
        };
        self.files.insert(resource, file);
    }

    /// A client asks to write (`input` is its `Lock` request). Returns the handover when the
    /// gateway holds an idle read lock on the file; otherwise the request goes to the engine
    /// as usual (and revokes the gateway's lock there if it conflicts).
    pub fn write(&mut self, client: SessionId, request: u64, input: Input) -> Option<Effect> {
        let Input::Lock { resource, mode, .. } = &input else { return None };
        if mode.compatible(Mode::PR) {
            return None;
        }
        let f = self.files.get_mut(resource)?;
        if !matches!(f.held, Held::Granted { .. }) || !f.readers.is_empty() || !f.waiters.is_empty() {
            return None;
        }
        f.held = Held::Releasing;
        self.stats.handovers += 1;
        Some(Effect::Handover { release: f.lock, client, request, input })
    }

    /// A handover was not committed (as far as this server knows): the gateway's lock, which
    /// no longer grants anything, is released the ordinary way. (If the handover did commit, the
    /// release is refused as unknown, and the `Released` already seen ends the file.)
    pub fn handover_failed(&mut self, release: LockId, out: &mut Vec<Effect>) {
        if self.files.values().any(|f| f.lock == release && f.held == Held::Releasing) {
            let request = self.request_number();
            out.push(Effect::Propose { request, input: Input::Release { lock: release } });
        }
    }

    /// The gateway missed applied entries (its queue overflowed): it can no longer tell what it
    /// holds, so it gives everything up and starts over with a new session.
    pub fn lost_track(&mut self, out: &mut Vec<Effect>) {
        let Some(id) = self.session() else { return };
        self.lapse("the server fell behind the log", out);
        out.push(Effect::Abandon { session: id });
    }

    /// A client releases (or cancels) a lock. `None` when the gateway does not serve it.
    pub fn release(&mut self, client: SessionId, lock: u64, request: u64, out: &mut Vec<Effect>) -> Option<()> {
        let key = (client, lock);
        let resource = self.local.remove(&key)?;
        if let Some(i) = self.pending.iter().position(|w| (w.client, w.lock) == key) {
            self.pending.remove(i);
            out.push(send(client, ToClient::Cancelled { request, lock }));
        } else if let Some(f) = self.files.get_mut(&resource) {
            if f.readers.remove(&key).is_some() {
                out.push(send(client, ToClient::Released { request, lock }));
            } else if let Some(i) = f.waiters.iter().position(|w| (w.client, w.lock) == key) {
                f.waiters.remove(i);
                out.push(send(client, ToClient::Cancelled { request, lock }));
            }
        }
        out.push(send(client, ToClient::Ack { request }));
        self.release_if_done(&resource, out);
        Some(())
    }

    /// A client's stream ended: its local locks end with it (it is told they are gone when it
    /// resumes elsewhere, because the cluster never had them).
    pub fn client_gone(&mut self, client: SessionId, out: &mut Vec<Effect>) {
        let mine: Vec<ClientLock> = self.local.range((client, 0)..=(client, u64::MAX)).map(|(k, _)| *k).collect();
        for key in mine {
            let resource = self.local.remove(&key).expect("listed");
            self.pending.retain(|w| (w.client, w.lock) != key);
            if let Some(f) = self.files.get_mut(&resource) {
                f.readers.remove(&key);
                f.waiters.retain(|w| (w.client, w.lock) != key);
            }
            self.release_if_done(&resource, out);
        }
    }

    /// A revoked file lock nobody reads any more goes back to the engine.
    fn release_if_done(&mut self, resource: &str, out: &mut Vec<Effect>) {
        let Some(f) = self.files.get_mut(resource) else { return };
        if f.revoked && (f.readers.is_empty() || self.broken) && matches!(f.held, Held::Granted { .. }) {
            f.held = Held::Releasing;
            let lock = f.lock;
            let request = self.request_number();
            out.push(Effect::Propose { request, input: Input::Release { lock } });
        }
    }

    /// The gateway session was opened at `sent_ms` (when it was asked for).
    pub fn opened(&mut self, now_ms: u64, sent_ms: u64, session: SessionId, out: &mut Vec<Effect>) {
        // Lock numbers are the session's own.
        self.next_lock = 0;
        self.session = Session::Open {
            id: session,
            valid_until_ms: lease::valid_until_ms(sent_ms, self.lease_ms),
            next_renew_ms: now_ms + self.lease_ms / 3,
            renewing: None,
        };
        for req in std::mem::take(&mut self.pending) {
            self.local.remove(&(req.client, req.lock));
            self.admit(now_ms, req, true, out);
        }
    }

    /// Opening the session failed (no leader for a while): the waiting requests fail.
    pub fn open_failed(&mut self, why: &str, out: &mut Vec<Effect>) {
        self.session = Session::Closed;
        for w in std::mem::take(&mut self.pending) {
            self.local.remove(&(w.client, w.lock));
            let why = format!("the gateway could not open its session: {why}");
            out.push(send(w.client, ToClient::Lost { lock: w.lock, why }));
        }
    }

    /// Time passes: renew the session, or give it up when its lease ran out here.
    pub fn tick(&mut self, now_ms: u64, out: &mut Vec<Effect>) {
        let Session::Open { id, valid_until_ms, next_renew_ms, renewing } = self.session else { return };
        if now_ms >= valid_until_ms {
            self.lapse("the gateway's lease ran out before it could renew it", out);
            out.push(Effect::Abandon { session: id });
            return;
        }
        if now_ms >= next_renew_ms && renewing.is_none() {
            let request = self.request_number();
            self.session = Session::Open {
                id,
                valid_until_ms,
                next_renew_ms: now_ms + self.lease_ms / 3,
                renewing: Some((request, now_ms)),
            };
            out.push(Effect::Propose { request, input: Input::Renew { session: id } });
        }
    }

    /// A proposal of the gateway's was committed (`ok`) or gave up.
    pub fn proposed(&mut self, request: u64, ok: bool) {
        if let Session::Open { id, valid_until_ms, next_renew_ms, renewing: Some((r, sent_ms)) } = self.session
            && r == request
        {
            let valid_until_ms =
                if ok { valid_until_ms.max(lease::valid_until_ms(sent_ms, self.lease_ms)) } else { valid_until_ms };
            self.session = Session::Open { id, valid_until_ms, next_renew_ms, renewing: None };
        }
    }

    /// Every local lock is lost; the files are forgotten (the cluster drops the gateway's locks
    /// when its session expires). Requests waiting are kept and retried with a new session.
    fn lapse(&mut self, why: &str, out: &mut Vec<Effect>) {
        self.session = Session::Closed;
        let mut retry = std::mem::take(&mut self.pending);
        for (_, f) in std::mem::take(&mut self.files) {
            for (key, _) in f.readers {
                self.local.remove(&key);
                out.push(send(key.0, ToClient::Lost { lock: key.1, why: why.to_string() }));
            }
            retry.extend(f.waiters);
        }
        if !retry.is_empty() {
            self.session = Session::Opening;
            out.push(Effect::OpenSession { lease_ms: self.lease_ms });
        }
        self.pending = retry;
    }

    /// The outputs of one applied entry that concern the gateway's session.
    pub fn applied(&mut self, now_ms: u64, outputs: &[Output], out: &mut Vec<Effect>) {
        let Some(me) = self.session() else { return };
        for o in outputs {
            match o {
                Output::Granted { session, lock, token, value, .. } if *session == me => {
                    let Some((resource, f)) = self.files.iter_mut().find(|(_, f)| f.lock == *lock) else { continue };
                    let resource = resource.clone();
                    f.held = Held::Granted { token: *token };
                    f.value = value.clone();
                    // Idle in the engine's eyes: a conflicting request anywhere revokes it.
                    let request = self.request_number();
                    out.push(Effect::Propose { request, input: Input::Cache { lock: *lock } });
                    let f = self.files.get_mut(&resource).expect("found");
                    for w in std::mem::take(&mut f.waiters) {
                        self.local.remove(&(w.client, w.lock));
                        self.admit(now_ms, w, true, out);
                    }
                }
                Output::Revoke { session, lock } if *session == me => {
                    let Some((resource, f)) = self.files.iter_mut().find(|(_, f)| f.lock == *lock) else { continue };
                    let resource = resource.clone();
                    f.revoked = true;
                    for key in f.readers.keys() {
                        out.push(send(key.0, ToClient::Revoke { lock: key.1 }));
                    }
                    self.release_if_done(&resource, out);
                }
                Output::Released { session, lock } if *session == me => {
                    let Some(resource) = self.files.iter().find(|(_, f)| f.lock == *lock).map(|(r, _)| r.clone())
                    else {
                        continue;
                    };
                    let f = self.files.remove(&resource).expect("found");
                    for key in f.readers.keys() {
                        // Only a handover or a forced release ends a file lock with readers left.
                        self.local.remove(key);
                        if self.broken {
                            continue;
                        }
                        let why = "the server's read lock on the file was released".to_string();
                        out.push(send(key.0, ToClient::Lost { lock: key.1, why }));
                    }
                    if !f.waiters.is_empty() {
                        self.request_file(me, resource, f.waiters, out);
                    }
                }
                Output::Expired { session } if *session == me => {
                    self.lapse("the cluster expired the gateway's session", out);
                }
                Output::Rejected { subject: Subject::Lock(lock), error } => {
                    let Some(resource) = self.files.iter().find(|(_, f)| f.lock == *lock).map(|(r, _)| r.clone())
                    else {
                        continue;
                    };
                    let f = self.files.get(&resource).expect("found");
                    if f.held != Held::Requested {
                        // A release or cache refused because the lock is already gone: its
                        // `Released` (or the session's expiry) says the rest.
                        continue;
                    }
                    let f = self.files.remove(&resource).expect("found");
                    for w in f.waiters {
                        self.local.remove(&(w.client, w.lock));
                        let why = format!("the server's read lock on {resource} was refused: {error}");
                        out.push(send(w.client, ToClient::Lost { lock: w.lock, why }));
                    }
                }
                _ => {}
            }
        }
    }
}

fn send(client: SessionId, message: ToClient) -> Effect {
    Effect::Send { client, message }
}

fn grant(req: &ReadRequest, request: u64, token: u64, f: &File) -> ToClient {
    ToClient::Granted {
        request,
        lock: req.lock,
        resource: req.resource.clone(),
        range: req.range,
        token,
        value: f.value.clone(),
        gateway_lock: f.lock,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: u64 = 10_000;
    const GW: SessionId = SessionId(9);
    const A: SessionId = SessionId(1);
    const B: SessionId = SessionId(2);

    fn read(client: SessionId, lock: u64, request: u64, resource: &str) -> ReadRequest {
        ReadRequest { client, lock, request, resource: resource.into(), range: ByteRange::new(0, 100).unwrap() }
    }

    fn sends(out: &[Effect], to: SessionId) -> Vec<ToClient> {
        out.iter()
            .filter_map(|e| match e {
                Effect::Send { client, message } if *client == to => Some(message.clone()),
                _ => None,
            })
            .collect()
    }

    fn proposals(out: &[Effect]) -> Vec<Input> {
        out.iter()
            .filter_map(|e| match e {
                Effect::Propose { input, .. } => Some(input.clone()),
                _ => None,
            })
            .collect()
    }

    /// An open gateway whose lock on `/f` is granted (token 7), with `A` reading from it.
    fn serving() -> (Gateway, LockId) {
        let mut g = Gateway::new(LEASE);
        let mut out = Vec::new();
        g.read(0, read(A, 1, 1, "/f"), &mut out);
        assert_eq!(
            out,
            vec![
                Effect::Send { client: A, message: ToClient::Ack { request: 1 } },
                Effect::OpenSession { lease_ms: LEASE }
            ]
        );
        out.clear();
        g.opened(5, 0, GW, &mut out);
        let [Input::Lock { lock, session, mode: Mode::PR, range: ByteRange::ALL, .. }] = proposals(&out)[..] else {
            panic!("{out:?}")
        };
        assert_eq!(session, GW);
        out.clear();
        let granted = Output::Granted {
            session: GW,
            lock,
            mode: Mode::PR,
            range: ByteRange::ALL,
            token: 7,
            value: ValueBlock::Empty,
            reused: false,
        };
        g.applied(10, &[granted], &mut out);
        assert_eq!(proposals(&out), vec![Input::Cache { lock }], "the file lock is cached so it can be revoked");
        assert!(
            matches!(&sends(&out, A)[..], [ToClient::Granted { request: 0, lock: 1, token: 7, .. }]),
            "a late grant: {out:?}"
        );
        (g, lock)
    }

    #[test]
    fn later_readers_are_granted_locally_with_no_proposal() {
        let (mut g, _) = serving();
        let mut out = Vec::new();
        g.read(20, read(B, 4, 8, "/f"), &mut out);
        assert!(proposals(&out).is_empty(), "{out:?}");
        assert!(matches!(
            &sends(&out, B)[..],
            [ToClient::Granted { request: 8, lock: 4, token: 7, .. }, ToClient::Ack { request: 8 }]
        ));
        assert_eq!(g.readers(), 2);
        assert!(g.serves(B, 4));
    }

    #[test]
    fn a_revoke_waits_for_the_last_reader_then_releases() {
        let (mut g, lock) = serving();
        let mut out = Vec::new();
        g.read(20, read(B, 4, 8, "/f"), &mut out);
        out.clear();
        g.applied(30, &[Output::Revoke { session: GW, lock }], &mut out);
        assert_eq!(sends(&out, A), vec![ToClient::Revoke { lock: 1 }]);
        assert_eq!(sends(&out, B), vec![ToClient::Revoke { lock: 4 }]);
        assert!(proposals(&out).is_empty(), "readers are still reading");
        out.clear();
        // A reader arriving now waits: nothing more is granted from a revoked lock.
        g.read(31, read(A, 2, 3, "/f"), &mut out);
        assert_eq!(sends(&out, A), vec![ToClient::Ack { request: 3 }]);
        out.clear();
        g.release(A, 1, 4, &mut out).unwrap();
        assert!(proposals(&out).is_empty());
        out.clear();
        g.release(B, 4, 9, &mut out).unwrap();
        assert_eq!(proposals(&out), vec![Input::Release { lock }]);
        out.clear();
        // Once released, the waiting reader asks again, behind the writer in the engine.
        g.applied(40, &[Output::Released { session: GW, lock }], &mut out);
        let [Input::Lock { lock: again, .. }] = proposals(&out)[..] else { panic!("{out:?}") };
        assert_ne!(again, lock, "a new lock number");
        assert!(g.serves(A, 2));
    }

    #[test]
    fn a_write_takes_the_place_of_an_idle_read_lock() {
        let (mut g, lock) = serving();
        let mut out = Vec::new();
        let write = Input::Lock {
            lock: LockId(5),
            session: B,
            resource: "/f".into(),
            range: ByteRange::new(10, 20).unwrap(),
            mode: Mode::PW,
            nowait: false,
        };
        // Not while a reader holds it: the request goes to the engine and revokes the lock there.
        assert_eq!(g.write(B, 3, write.clone()), None);
        g.release(A, 1, 2, &mut out).unwrap();
        assert!(proposals(&out).is_empty(), "an unrevoked lock stays cached");
        let handover = g.write(B, 3, write.clone());
        assert_eq!(handover, Some(Effect::Handover { release: lock, client: B, request: 3, input: write.clone() }));
        // Meanwhile a reader waits instead of being granted from a lock being given up.
        out.clear();
        g.read(50, read(A, 2, 4, "/f"), &mut out);
        assert_eq!(sends(&out, A), vec![ToClient::Ack { request: 4 }]);
        assert_eq!(g.write(B, 5, write), None, "only one handover per lock");
        // A read-compatible request never trades the lock away.
        let read_lock = Input::Lock {
            lock: LockId(6),
            session: B,
            resource: "/g".into(),
            range: ByteRange::ALL,
            mode: Mode::CR,
            nowait: false,
        };
        assert_eq!(g.write(B, 6, read_lock), None);
    }

    #[test]
    fn local_grants_end_when_the_lease_runs_out_here() {
        let (mut g, _) = serving();
        let mut out = Vec::new();
        // Renewals go out every third of the lease and extend it from when they were sent.
        g.tick(LEASE / 3 + 10, &mut out);
        let [Input::Renew { session }] = proposals(&out)[..] else { panic!("{out:?}") };
        assert_eq!(session, GW);
        let Effect::Propose { request, .. } = out[0] else { panic!() };
        g.proposed(request, false);
        out.clear();
        // No renewal committed: past lease minus the drift margin, everything is lost.
        let end = lease::valid_until_ms(0, LEASE);
        g.read(end - 1, read(B, 4, 8, "/f"), &mut out);
        assert!(matches!(&sends(&out, B)[..], [ToClient::Granted { .. }, ToClient::Ack { .. }]));
        out.clear();
        g.read(end, read(B, 5, 9, "/f"), &mut out);
        assert_eq!(sends(&out, B), vec![ToClient::Ack { request: 9 }], "no grant once the lease is over here");
        out.clear();
        g.tick(end, &mut out);
        let lost: Vec<_> =
            out.iter().filter(|e| matches!(e, Effect::Send { message: ToClient::Lost { .. }, .. })).collect();
        assert_eq!(lost.len(), 2, "both readers are told: {out:?}");
        assert!(out.contains(&Effect::Abandon { session: GW }));
        assert!(out.contains(&Effect::OpenSession { lease_ms: LEASE }), "the waiting reader asks again");
        assert_eq!(g.readers(), 0);
        assert!(g.serves(B, 5) && !g.serves(B, 4));
    }

    #[test]
    fn a_committed_renewal_extends_the_lease() {
        let (mut g, _) = serving();
        let mut out = Vec::new();
        g.tick(4_000, &mut out);
        let Effect::Propose { request, .. } = out[0] else { panic!("{out:?}") };
        g.proposed(request, true);
        out.clear();
        g.read(12_000, read(B, 4, 8, "/f"), &mut out);
        assert!(matches!(&sends(&out, B)[..], [ToClient::Granted { .. }, ToClient::Ack { .. }]), "{out:?}");
    }

    #[test]
    fn a_gone_client_stops_holding_the_file() {
        let (mut g, lock) = serving();
        let mut out = Vec::new();
        g.applied(30, &[Output::Revoke { session: GW, lock }], &mut out);
        out.clear();
        g.client_gone(A, &mut out);
        assert_eq!(proposals(&out), vec![Input::Release { lock }]);
        assert!(!g.serves(A, 1));
    }

    #[test]
    fn a_gateway_out_of_lock_numbers_starts_a_new_session() {
        let (mut g, _) = serving();
        g.next_lock = (1 << crate::types::CLIENT_LOCK_BITS) - 1;
        let mut out = Vec::new();
        g.read(20, read(B, 4, 8, "/other"), &mut out);
        assert!(out.contains(&Effect::Abandon { session: GW }), "{out:?}");
        assert!(out.contains(&Effect::OpenSession { lease_ms: LEASE }));
        assert!(matches!(sends(&out, A)[..], [ToClient::Lost { lock: 1, .. }]), "the old session's reader is told");
        assert!(g.serves(B, 4), "the new request waits for the new session");
        out.clear();
        g.opened(30, 25, SessionId(10), &mut out);
        assert!(matches!(proposals(&out)[..], [Input::Lock { session: SessionId(10), .. }]), "{out:?}");
    }

    #[test]
    fn an_expired_gateway_session_loses_every_local_lock() {
        let (mut g, _) = serving();
        let mut out = Vec::new();
        g.applied(30, &[Output::Expired { session: GW }], &mut out);
        assert_eq!(sends(&out, A).len(), 1);
        assert!(matches!(sends(&out, A)[0], ToClient::Lost { lock: 1, .. }));
        assert_eq!(g.session(), None);
    }

    /// Past its limits a read is refused with the limit, and nothing is queued for it.
    #[test]
    fn reads_past_the_limits_are_refused_not_queued() {
        let limits = lockengine::Limits { locks_per_session_max: 3, waiters_per_resource_max: 2, ..Default::default() };
        let mut g = Gateway::with_limits(LEASE, &limits);
        let mut out = Vec::new();
        // No session yet: the first reads wait in `pending`, up to the lock limit.
        for (lock, file) in [(1, "/a"), (2, "/b"), (3, "/c"), (4, "/d")] {
            g.read(0, read(A, lock, lock, file), &mut out);
        }
        let refused = |out: &[Effect]| {
            out.iter()
                .filter_map(|e| match e {
                    Effect::Send { message: ToClient::Rejected { lock, error, .. }, .. } => {
                        Some((*lock, error.clone()))
                    }
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            refused(&out),
            vec![(4, lockengine::EngineError::Limit { kind: lockengine::LimitKind::LocksPerSession, max: 3 })]
        );
        assert_eq!(g.pending.len(), 3, "the refused read was queued");
        // Waiters on one file stop at their own limit.
        let mut g =
            Gateway::with_limits(LEASE, &lockengine::Limits { waiters_per_resource_max: 2, ..Default::default() });
        let mut first = Vec::new();
        g.read(0, read(A, 1, 1, "/f"), &mut first);
        g.opened(0, 0, SessionId(9), &mut first);
        let mut out = Vec::new();
        for lock in 2..=4 {
            g.read(0, read(A, lock, lock, "/f"), &mut out);
        }
        // The first read waits for the file lock with the second; the third and fourth are refused.
        let limit = lockengine::EngineError::Limit { kind: lockengine::LimitKind::WaitersPerResource, max: 2 };
        assert_eq!(refused(&out), vec![(3, limit.clone()), (4, limit)]);
    }
}
