//! The stripelock client: connect to any server of a cluster, open a session, take and release
//! byte-range locks, and receive revokes, with the session kept across a server's failure.
//!
//! ```no_run
//! # async fn demo() -> Result<(), client::ClientError> {
//! use client::{LockOptions, Mode, Session};
//! let session = Session::open(&["127.0.0.1:7001".to_string()], 10_000).await?;
//! let grant = session.lock("/jobs/nightly", 0..u64::MAX, Mode::EX, LockOptions::default()).await?;
//! println!("token {} ({})", grant.token, grant.signed_token);
//! session.unlock(grant.lock).await?;
//! session.close().await;
//! # Ok(()) }
//! ```
//!
//! One task owns the gRPC stream. Requests carry increasing ids; until a request's ack arrives
//! it is kept, and after a reconnect (to the next server in the list, resuming the session) it
//! is sent again with the same id, which the cluster answers without applying it twice.
//! Heartbeats go out every third of the lease.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use std::ops::Range;
use std::time::Duration;
pub use wire::Connector;

pub use lockengine::{Mode, PosixKind};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
pub use wire::ErrorCode;
use wire::convert;
use wire::v1 as pb;
use wire::v1::client_message::Body as Up;
use wire::v1::server_message::Body as Down;

/// A granted lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The session's number for the lock (what `unlock` and `convert` take).
    pub lock: u64,
    pub mode: Mode,
    pub range: Range<u64>,
    /// The fencing token: strictly increases across conflicting grants.
    pub token: u64,
    /// The token signed by the cluster (`slt1.…`), for storage; empty before bootstrap ends.
    pub signed_token: String,
    /// Granted by the server the session is attached to, from its cached whole-file read lock
    /// ([`LockOptions::gateway`]); such a lock is lost ([`Event::Lost`]) if that server goes.
    pub via_gateway: bool,
    /// The resource's lock value block as the grant found it: `None` when it was never set, or
    /// when a writer lost its lock without setting it (then whatever it guarded must be
    /// checked again).
    pub value: Option<Vec<u8>>,
}

/// Something the cluster tells the session without being asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Someone waits for this cached lock: release it when done with it.
    Revoke { lock: u64 },
    /// A waiting request was granted (also sent to `lock`'s caller).
    Granted(Grant),
    /// The session's lease ran out: its locks are fenced and will be dropped.
    Expired,
    /// A lock served by a server's gateway is gone: that server lost its lease, was revoked
    /// without the lock being released, or the session moved to another server.
    Lost { lock: u64, reason: String },
}

#[derive(Debug, Clone, Default)]
pub struct LockOptions {
    /// Fail at once if the lock cannot be granted now.
    pub nowait: bool,
    /// Give up (and cancel the request) after this long.
    pub timeout: Option<Duration>,
    /// For PR: let the server this session is attached to grant it from its own cached
    /// whole-file read lock (seed 002). Many readers then cost one log entry instead of one
    /// each, and a write lock there takes the read lock's place in a single entry. The lock
    /// lasts only while that server's lease does. Ignored for other modes and with `nowait`.
    pub gateway: bool,
}

/// Why a call failed. Every refusal keeps the cluster's [`ErrorCode`] ([`ClientError::code`]),
/// so a caller can tell busy from deadlock from a limit without reading the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// No server answered; the text says which were tried and what each did.
    #[error("{0}")]
    Unreachable(String),
    #[error("locked by others: {}", .0.join("; "))]
    Busy(Vec<String>),
    #[error("timed out waiting; still blocked")]
    TimedOut,
    #[error("refused: this request would deadlock")]
    Deadlock,
    /// The cluster refused the request (or, when opening a session, the session: a lease out
    /// of its bounds, a limit reached; trying another server would give the same answer).
    #[error("refused ({code}): {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("the request was cancelled")]
    Cancelled,
    #[error("the session expired: its locks are lost")]
    Expired,
    #[error("the session is closed")]
    Closed,
    #[error("the lock is lost: {0}")]
    Lost(String),
    /// The server sent a value this client does not know (an error code, a lock mode): a newer
    /// server, or a damaged message. Never read as some default.
    #[error("the server sent {what} {value}, which this client does not know; upgrade the client")]
    Unknown { what: &'static str, value: i32 },
}

impl ClientError {
    /// The cluster's code for the failure. Failures the client itself sees get the nearest
    /// code: no server answered is `unavailable`, a wait that timed out or was cancelled is
    /// `busy`, a closed or expired session is `session-expired`.
    pub fn code(&self) -> ErrorCode {
        match self {
            ClientError::Unreachable(_) | ClientError::Lost(_) => ErrorCode::Unavailable,
            ClientError::Busy(_) | ClientError::TimedOut | ClientError::Cancelled => ErrorCode::Busy,
            ClientError::Deadlock => ErrorCode::Deadlock,
            ClientError::Refused { code, .. } => *code,
            ClientError::Expired | ClientError::Closed => ErrorCode::SessionExpired,
            ClientError::Unknown { .. } => ErrorCode::Internal,
        }
    }

    /// Whether the same call, made again unchanged a little later, may succeed.
    pub fn is_retryable(&self) -> bool {
        self.code().is_retryable()
    }

    /// A refused gRPC call (of the files service, say) as a client error with the code it
    /// carries and the server's message.
    pub fn from_status(status: &tonic::Status) -> ClientError {
        match wire::refusal_of(status) {
            Ok((code, _)) => ClientError::Refused { code, message: status.message().to_string() },
            Err(unknown) => ClientError::Unknown { what: "error code", value: unknown.0 },
        }
    }
}

/// How long one server gets to open (or resume) a session and answer, before the client moves
/// on to the next: well under the lease, so a server that accepts connections but does not
/// answer (paused, overloaded) cannot hold a client past its lease.
pub fn answer_deadline(lease_ms: u64) -> Duration {
    Duration::from_millis((lease_ms / 2).clamp(250, 1_000))
}

/// How long `Session::open` keeps going round the servers (an election takes a few seconds).
pub const OPEN_PATIENCE: Duration = Duration::from_secs(10);

/// Who this process is, as lock tables and conflict messages show it: `pid 1234 on host`.
pub fn process_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown host".into());
    format!("pid {} on {host}", std::process::id())
}

enum Want {
    /// Resolved by the lock's grant or refusal.
    Lock(oneshot::Sender<Result<Grant, ClientError>>),
    /// Resolved by the request's ack (or a refusal).
    Done(oneshot::Sender<Result<(), ClientError>>),
    /// Resolved by the POSIX request's answer (a queued one later, by its grant or end).
    Posix(oneshot::Sender<Result<PosixOutcome, ClientError>>),
    Nothing,
}

/// A queued F_SETLKW: its request, its caller, and its generation (a new wait of the same
/// owner and resource is a new generation).
struct PosixWait {
    body: Up,
    tx: oneshot::Sender<Result<PosixOutcome, ClientError>>,
    generation: u64,
}

/// The answer to a POSIX (fcntl) request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PosixOutcome {
    Granted,
    Unlocked,
    /// F_GETLK: nothing conflicts.
    Free,
    /// F_SETLK or F_GETLK: `owner` of `session` holds `range` as `kind`.
    Busy {
        session: u64,
        owner: u64,
        range: Range<u64>,
        kind: PosixKind,
    },
    /// F_SETLKW: waiting would close a cycle of waiters (EDEADLK).
    Deadlock,
    /// F_SETLKW: the wait was cancelled ([`Session::posix_cancel`], or the session ended).
    Cancelled,
}

fn posix_outcome(a: &pb::PosixAnswer) -> Result<PosixOutcome, ClientError> {
    use pb::posix_answer::Outcome as O;
    Ok(match O::try_from(a.outcome).map_err(|_| ClientError::Unknown { what: "posix outcome", value: a.outcome })? {
        O::Granted => PosixOutcome::Granted,
        O::Unlocked => PosixOutcome::Unlocked,
        O::Free => PosixOutcome::Free,
        O::Busy => PosixOutcome::Busy {
            session: a.conflict_session,
            owner: a.conflict_owner,
            range: a.range.as_ref().map_or(0..u64::MAX, |r| r.start..r.end),
            kind: convert::posix_kind_from_pb(a.kind).map_err(unknown)?,
        },
        O::Deadlock => PosixOutcome::Deadlock,
        O::Cancelled => PosixOutcome::Cancelled,
        O::Queued => return Err(ClientError::Refused { code: ErrorCode::Internal, message: "queued".into() }),
    })
}

struct Call {
    body: Up,
    lock: Option<u64>,
    want: Want,
}

impl Call {
    /// A release the client decided on itself (a revoked idle lock, one beyond the LRU size, a
    /// grant it cannot read): nobody waits for its answer.
    fn release(lock: u64) -> Call {
        Call { body: Up::Release(pb::LockRef { lock }), lock: None, want: Want::Nothing }
    }
}

/// An open session. Dropping it stops heartbeats; the cluster then expires the session after
/// its lease. Prefer [`Session::close`].
#[derive(Debug, Clone)]
pub struct Session {
    id: u64,
    lease_ms: u64,
    /// When the newest acknowledged renewal (or the opening) was sent.
    renewed: std::sync::Arc<std::sync::Mutex<tokio::time::Instant>>,
    calls: mpsc::Sender<Call>,
    events: broadcast::Sender<Event>,
    numbers: std::sync::Arc<std::sync::Mutex<Numbers>>,
    cache: std::sync::Arc<std::sync::Mutex<Cache>>,
}

/// Locks this session keeps cached, by number. A `lock` that one of them covers is granted here,
/// with no message to the cluster; `unlock` puts it back. A revoke releases an idle one at once
/// and an in-use one at its `unlock`.
#[derive(Debug, Default)]
struct Cache {
    /// Every grant this session holds, with its resource (what `cache` needs to know).
    held: HashMap<u64, (String, Grant)>,
    cached: HashMap<u64, Cached>,
    /// Gateway locks lost while held and not yet unlocked by the application.
    lost: BTreeSet<u64>,
    /// The most idle cached locks the servers let this session keep (`None`: not told yet).
    limit: Option<u64>,
    /// Counts uses, to order cached locks by their last.
    clock: u64,
}

impl Cache {
    /// Forgets a lost gateway lock; true if it was held.
    fn lose(&mut self, lock: u64) -> bool {
        self.cached.remove(&lock);
        let held = self.held.remove(&lock).is_some();
        if held {
            self.lost.insert(lock);
        }
        held
    }
}

#[derive(Debug)]
struct Cached {
    resource: String,
    grant: Grant,
    in_use: bool,
    revoked: bool,
    /// When it was last put back idle ([`Cache::clock`]): the least recent goes first.
    used_at: u64,
}

impl Cache {
    /// A cached lock covering the request, taken into use.
    fn take(&mut self, resource: &str, range: &Range<u64>, mode: Mode) -> Option<Grant> {
        let c = self.cached.values_mut().find(|c| {
            !c.in_use
                && !c.revoked
                && c.resource == resource
                && c.grant.range.start <= range.start
                && range.end <= c.grant.range.end
                && mode.at_most(c.grant.mode)
        })?;
        c.in_use = true;
        Some(c.grant.clone())
    }

    /// Takes out of the cache the least recently used idle locks beyond the servers' limit
    /// (issue 12: lock memory that stays bounded); the caller releases them.
    fn trim(&mut self) -> Vec<u64> {
        let Some(limit) = self.limit else { return Vec::new() };
        let mut idle: Vec<(u64, u64)> =
            self.cached.iter().filter(|(_, c)| !c.in_use && !c.revoked).map(|(l, c)| (c.used_at, *l)).collect();
        let Some(over) = idle.len().checked_sub(limit as usize).filter(|n| *n > 0) else { return Vec::new() };
        idle.sort_unstable();
        let out: Vec<u64> = idle[..over].iter().map(|(_, l)| *l).collect();
        for l in &out {
            self.cached.remove(l);
            self.held.remove(l);
        }
        out
    }
}

/// Lock numbers in use; a freed number is reused, so numbers stay small.
#[derive(Debug, Default)]
struct Numbers {
    used: BTreeSet<u64>,
}

impl Numbers {
    fn take(&mut self) -> u64 {
        let mut n = 1;
        for &u in &self.used {
            if u != n {
                break;
            }
            n += 1;
        }
        self.used.insert(n);
        n
    }
}

impl Session {
    /// Opens a session on the first server of `servers` (`host:port`) that answers. Each server
    /// gets [`answer_deadline`]; the servers are tried in turn, the ones that did not answer
    /// last, for up to [`OPEN_PATIENCE`].
    /// The session is recorded as opened by this process ([`process_name`]).
    pub async fn open(servers: &[String], lease_ms: u64) -> Result<Session, ClientError> {
        Session::open_named(servers, lease_ms, Connector::tcp(Duration::from_secs(1)), process_name()).await
    }

    /// Like `open`, reaching the servers through `connector` (the simulation's network), and
    /// saying nothing of who opens it (a simulation must not log real pids).
    pub async fn open_with(servers: &[String], lease_ms: u64, connector: Connector) -> Result<Session, ClientError> {
        Session::open_named(servers, lease_ms, connector, String::new()).await
    }

    /// Like `open_with`, recording the session as opened by `client_name`.
    pub async fn open_named(
        servers: &[String],
        lease_ms: u64,
        connector: Connector,
        client_name: String,
    ) -> Result<Session, ClientError> {
        if servers.is_empty() {
            return Err(ClientError::Unreachable("no server address given".into()));
        }
        let asked = tokio::time::Instant::now();
        let mut order = servers.to_vec();
        let give_up = asked + OPEN_PATIENCE;
        let (conn, opened) = loop {
            match connect(&connector, &mut order, 0, lease_ms, &client_name, Vec::new()).await {
                Ok(c) => break c,
                Err(ClientError::Unreachable(_))
                    if tokio::time::Instant::now() + Duration::from_millis(100) < give_up =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let servers = &order;
        let renewed = std::sync::Arc::new(std::sync::Mutex::new(asked));
        let (calls_tx, calls_rx) = mpsc::channel(256);
        let (events, _) = broadcast::channel(1024);
        let numbers = std::sync::Arc::new(std::sync::Mutex::new(Numbers::default()));
        let cache = std::sync::Arc::new(std::sync::Mutex::new(Cache::default()));
        let actor = Actor {
            cache: cache.clone(),
            outbox: Vec::new(),
            fresh_locks: BTreeSet::new(),
            granted_tokens: BTreeMap::new(),
            servers: servers.to_vec(),
            connector,
            session: opened.session,
            lease_ms: opened.lease_ms,
            heartbeat: Duration::from_millis(opened.heartbeat_ms.max(50)),
            next_request: 1,
            unacked: BTreeMap::new(),
            waiting_locks: BTreeMap::new(),
            posix_waits: BTreeMap::new(),
            posix_recancels: BTreeSet::new(),
            posix_rewaits: BTreeMap::new(),
            resent_upto: 0,
            next_gen: 0,
            gateway_waits: BTreeMap::new(),
            events: events.clone(),
            numbers: numbers.clone(),
            beats: BTreeMap::new(),
            renewed: renewed.clone(),
        };
        tokio::spawn(actor.run(conn, calls_rx));
        Ok(Session { id: opened.session, lease_ms: opened.lease_ms, calls: calls_tx, events, numbers, cache, renewed })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// How much of the session's lease is left, counted from when its newest acknowledged
    /// renewal was sent, less `lockengine::lease`'s drift margin (so it runs out here before the
    /// cluster can expire the session). Zero once it has run out.
    pub fn lease_left(&self) -> Duration {
        self.lease_valid_until().saturating_duration_since(tokio::time::Instant::now())
    }

    /// When the session's lease runs out as this client counts it (see [`Session::lease_left`]):
    /// until then its locks are its own.
    pub fn lease_valid_until(&self) -> tokio::time::Instant {
        let renewed = *self.renewed.lock().expect("renewed");
        renewed + Duration::from_millis(lockengine::lease::valid_until_ms(0, self.lease_ms))
    }

    pub fn lease_ms(&self) -> u64 {
        self.lease_ms
    }

    /// Events nobody asked for: revokes, late grants, expiry.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    async fn call(&self, body: Up, lock: Option<u64>, want: Want) -> Result<(), ClientError> {
        self.calls.send(Call { body, lock, want }).await.map_err(|_| ClientError::Closed)
    }

    /// Takes a lock on `range` of `resource` (`0..u64::MAX` is the whole file).
    pub async fn lock(
        &self,
        resource: &str,
        range: Range<u64>,
        mode: Mode,
        options: LockOptions,
    ) -> Result<Grant, ClientError> {
        let timeout = options.timeout;
        let give_up = async move {
            match timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        match self.lock_until(resource, range, mode, options, give_up).await {
            Err(ClientError::Cancelled) if timeout.is_some() => Err(ClientError::TimedOut),
            other => other,
        }
    }

    /// Like [`Session::lock`], but a waiting request is cancelled (`ClientError::Cancelled`)
    /// when `give_up` completes, instead of after a timeout.
    pub async fn lock_until(
        &self,
        resource: &str,
        range: Range<u64>,
        mode: Mode,
        options: LockOptions,
        give_up: impl std::future::Future<Output = ()>,
    ) -> Result<Grant, ClientError> {
        if let Some(g) = self.cache.lock().expect("cache").take(resource, &range, mode) {
            return Ok(g);
        }
        let n = self.numbers.lock().expect("numbers").take();
        let (tx, rx) = oneshot::channel();
        let body = Up::Lock(pb::LockRequest {
            lock: n,
            resource: resource.to_string(),
            range: Some(convert::span_to_pb(&range)),
            mode: convert::mode_to_pb(mode),
            nowait: options.nowait,
            gateway: options.gateway,
            // The server ends the wait too, should this client's cancel never reach it.
            wait_ms: options.timeout.map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1)),
        });
        self.call(body, Some(n), Want::Lock(tx)).await?;
        let mut rx = rx;
        let result = tokio::select! {
            r = &mut rx => r.unwrap_or(Err(ClientError::Closed)),
            () = give_up => {
                // Cancel, then see how the race ended: a grant that slipped in is released.
                self.call(Up::Cancel(pb::LockRef { lock: n }), None, Want::Nothing).await?;
                match rx.await.unwrap_or(Err(ClientError::Closed)) {
                    Ok(g) => {
                        let _ = self.unlock(g.lock).await;
                        Err(ClientError::Cancelled)
                    }
                    Err(e) => Err(e),
                }
            }
        };
        match &result {
            Ok(g) => {
                self.cache.lock().expect("cache").held.insert(g.lock, (resource.to_string(), g.clone()));
            }
            Err(_) => {
                self.numbers.lock().expect("numbers").used.remove(&n);
            }
        }
        result
    }

    /// Converts a held lock in place (mode and, optionally, range).
    pub async fn convert(&self, lock: u64, mode: Mode, range: Option<Range<u64>>) -> Result<Grant, ClientError> {
        let (tx, rx) = oneshot::channel();
        let body = Up::Convert(pb::ConvertRequest {
            lock,
            mode: convert::mode_to_pb(mode),
            range: range.as_ref().map(convert::span_to_pb),
        });
        self.call(body, Some(lock), Want::Lock(tx)).await?;
        rx.await.unwrap_or(Err(ClientError::Closed))
    }

    /// Releases a held lock. A cached lock goes back to the cache instead, unless it was revoked
    /// meanwhile.
    pub async fn unlock(&self, lock: u64) -> Result<(), ClientError> {
        let beyond = 'cached: {
            let mut cache = self.cache.lock().expect("cache");
            cache.clock += 1;
            let now = cache.clock;
            if let Some(c) = cache.cached.get_mut(&lock) {
                if !c.revoked {
                    c.in_use = false;
                    c.used_at = now;
                    break 'cached Some(cache.trim());
                }
                cache.cached.remove(&lock);
            }
            let held = cache.held.remove(&lock);
            if held.is_none() && cache.lost.remove(&lock) {
                // A gateway lock already lost: nothing to release.
                self.numbers.lock().expect("numbers").used.remove(&lock);
                return Ok(());
            }
            None
        };
        if let Some(beyond) = beyond {
            // Back in the cache; what is beyond the LRU size goes back to the cluster, least
            // recently used first, as if revoked.
            for lock in beyond {
                let _ = self.calls.send(Call::release(lock)).await;
            }
            return Ok(());
        }
        // Answered once the release is in order on its way to the log (the server's `Ordered`):
        // it takes effect before any later request of this session and before any conflicting
        // grant. The session keeps it, and resends it on a resume, until it is applied; only
        // then may the lock's number be used again.
        let (tx, rx) = oneshot::channel();
        self.call(Up::Release(pb::LockRef { lock }), None, Want::Done(tx)).await?;
        rx.await.unwrap_or(Err(ClientError::Closed))
    }

    /// Sets the value block a held PW or EX lock writes back to its resource when released.
    pub async fn set_value(&self, lock: u64, value: Vec<u8>) -> Result<(), ClientError> {
        let (tx, rx) = oneshot::channel();
        self.call(Up::SetValue(pb::SetValue { lock, value: value.clone() }), None, Want::Done(tx)).await?;
        rx.await.unwrap_or(Err(ClientError::Closed))?;
        // A lock this session keeps cached is granted again from the cache with the value it
        // now guards.
        let mut cache = self.cache.lock().expect("cache");
        if let Some((_, g)) = cache.held.get_mut(&lock) {
            g.value = Some(value.clone());
        }
        if let Some(c) = cache.cached.get_mut(&lock) {
            c.grant.value = Some(value);
        }
        Ok(())
    }

    /// Keeps a held lock cached instead of releasing it: later `lock` calls it covers are
    /// granted locally, with no round trip, until a conflicting request elsewhere revokes it.
    pub async fn cache(&self, lock: u64) -> Result<(), ClientError> {
        // In the cache (in use) before the cluster hears of it: a revoke may follow the request
        // at once, and must find it there.
        {
            let mut cache = self.cache.lock().expect("cache");
            if let Some((resource, grant)) = cache.held.get(&lock).cloned() {
                cache.cached.insert(lock, Cached { resource, grant, in_use: true, revoked: false, used_at: 0 });
            }
        }
        let (tx, rx) = oneshot::channel();
        let sent = self.call(Up::Cache(pb::LockRef { lock }), None, Want::Done(tx)).await;
        let acked = match sent {
            Ok(()) => rx.await.unwrap_or(Err(ClientError::Closed)),
            Err(e) => Err(e),
        };
        if let Err(e) = acked {
            self.cache.lock().expect("cache").cached.remove(&lock);
            return Err(e);
        }
        // Idle now, unless revoked meanwhile: then it goes back at once.
        self.unlock(lock).await
    }

    /// Keeps a held lock cached and in use: it stays held until [`Session::release_now`], and
    /// the cluster sends [`Event::Revoke`] when another session waits for it (a mount keeps
    /// its extent locks so, and drops the kernel's cache of the file before giving one back).
    pub async fn keep_cached(&self, lock: u64) -> Result<(), ClientError> {
        {
            let mut cache = self.cache.lock().expect("cache");
            if let Some((resource, grant)) = cache.held.get(&lock).cloned() {
                cache.cached.insert(lock, Cached { resource, grant, in_use: true, revoked: false, used_at: 0 });
            }
        }
        let (tx, rx) = oneshot::channel();
        let sent = self.call(Up::Cache(pb::LockRef { lock }), None, Want::Done(tx)).await;
        let acked = match sent {
            Ok(()) => rx.await.unwrap_or(Err(ClientError::Closed)),
            Err(e) => Err(e),
        };
        if let Err(e) = acked {
            self.cache.lock().expect("cache").cached.remove(&lock);
            return Err(e);
        }
        Ok(())
    }

    /// Releases a held lock now, whether or not it is kept cached.
    pub async fn release_now(&self, lock: u64) -> Result<(), ClientError> {
        self.cache.lock().expect("cache").cached.remove(&lock);
        self.unlock(lock).await
    }

    /// Whether lock `lock` is one this session keeps cached.
    pub fn is_cached(&self, lock: u64) -> bool {
        self.cache.lock().expect("cache").cached.contains_key(&lock)
    }

    /// Gives back the lock this session keeps cached on `resource`, if it has one not in use
    /// (it returns to the cluster with the value block it guards). Returns whether it did.
    pub async fn release_cached(&self, resource: &str) -> Result<bool, ClientError> {
        let lock = {
            let mut cache = self.cache.lock().expect("cache");
            let Some(lock) = cache.cached.iter().find(|(_, c)| c.resource == resource && !c.in_use).map(|(l, _)| *l)
            else {
                return Ok(false);
            };
            cache.cached.remove(&lock);
            lock
        };
        self.unlock(lock).await.map(|()| true)
    }

    /// A POSIX (fcntl) lock request of `owner` (a number of this session's choosing: a process,
    /// an open file) on `range` of `resource`: F_SETLK, or F_SETLKW with `wait`. A waiting
    /// request is answered when granted, refused as a deadlock, or cancelled.
    pub async fn posix(
        &self,
        owner: u64,
        resource: &str,
        range: Range<u64>,
        kind: PosixKind,
        wait: bool,
    ) -> Result<PosixOutcome, ClientError> {
        self.posix_waiting_at_most(owner, resource, range, kind, wait, None).await
    }

    /// [`Session::posix`] whose wait (`wait == true`) the cluster ends after `limit`, answering
    /// [`PosixOutcome::Cancelled`], even if this client is gone quiet by then.
    pub async fn posix_waiting_at_most(
        &self,
        owner: u64,
        resource: &str,
        range: Range<u64>,
        kind: PosixKind,
        wait: bool,
        limit: Option<Duration>,
    ) -> Result<PosixOutcome, ClientError> {
        let req = pb::PosixRequest {
            owner,
            resource: resource.to_string(),
            range: Some(convert::span_to_pb(&range)),
            kind: convert::posix_kind_to_pb(kind),
            wait,
            wait_ms: limit.map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1)),
        };
        self.posix_call(Up::Posix(req)).await
    }

    /// F_GETLK: the first lock of another owner that conflicts with `kind` on `range`.
    pub async fn posix_test(
        &self,
        owner: u64,
        resource: &str,
        range: Range<u64>,
        kind: PosixKind,
    ) -> Result<PosixOutcome, ClientError> {
        let req = pb::PosixRequest {
            owner,
            resource: resource.to_string(),
            range: Some(convert::span_to_pb(&range)),
            kind: convert::posix_kind_to_pb(kind),
            ..Default::default()
        };
        self.posix_call(Up::PosixTest(req)).await
    }

    /// Gives up the waiting F_SETLKW of `owner` on `resource`: its caller then gets
    /// [`PosixOutcome::Cancelled`], unless it was granted first (then it holds the lock).
    pub async fn posix_cancel(&self, owner: u64, resource: &str) -> Result<(), ClientError> {
        let req = pb::PosixRequest { owner, resource: resource.to_string(), ..Default::default() };
        let (tx, rx) = oneshot::channel();
        self.call(Up::PosixCancel(req), None, Want::Done(tx)).await?;
        rx.await.unwrap_or(Err(ClientError::Closed))
    }

    async fn posix_call(&self, body: Up) -> Result<PosixOutcome, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.call(body, None, Want::Posix(tx)).await?;
        rx.await.unwrap_or(Err(ClientError::Closed))
    }

    /// Releases every lock and ends the session.
    pub async fn close(self) {
        let (tx, rx) = oneshot::channel();
        if self.call(Up::Close(pb::CloseSession {}), None, Want::Done(tx)).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(5), rx).await;
        }
    }
}

type Conn = (mpsc::Sender<pb::ClientMessage>, tonic::Streaming<pb::ServerMessage>);

/// Opens (or, with `resume`, reattaches) a session on the first server that answers within
/// [`answer_deadline`]. A server that did not answer goes to the end of `servers`, so the next
/// round starts with the ones that did.
async fn connect(
    connector: &Connector,
    servers: &mut Vec<String>,
    resume: u64,
    lease_ms: u64,
    client_name: &str,
    waiting: Vec<u64>,
) -> Result<(Conn, pb::SessionOpened), ClientError> {
    let mut failures = Vec::new();
    let deadline = answer_deadline(lease_ms);
    for addr in servers.clone() {
        let attempt = tokio::time::timeout(
            deadline,
            connect_one(connector, &addr, resume, lease_ms, client_name, waiting.clone()),
        )
        .await;
        let e = match attempt {
            Ok(Ok(c)) => return Ok(c),
            Ok(Err(e)) => e,
            Err(_) => tonic::Status::deadline_exceeded(format!(
                "no answer within {} ms (it accepts connections but does not answer: paused or overloaded?)",
                deadline.as_millis()
            )),
        };
        match wire::refusal_of(&e) {
            // A resumed session that the cluster says is gone is final, not a server fault.
            Ok((ErrorCode::SessionExpired, _)) => return Err(ClientError::Expired),
            // The cluster itself said no (lease out of bounds, too many sessions): every server
            // would say the same. A server's own fault, or one that cannot serve now, is not
            // the cluster's answer: the next server is asked.
            Ok((code, _)) if wire::from_server(&e) && !code.is_retryable() && code != ErrorCode::Internal => {
                return Err(ClientError::Refused { code, message: e.message().to_string() });
            }
            Ok(_) => {}
            Err(unknown) => return Err(ClientError::Unknown { what: "error code", value: unknown.0 }),
        }
        failures.push(format!("{addr}: {}", status_text(&e)));
        // Try it last next time.
        if let Some(i) = servers.iter().position(|s| *s == addr) {
            let s = servers.remove(i);
            servers.push(s);
        }
    }
    Err(ClientError::Unreachable(wire::tls_hint(format!(
        "no server of the cluster answered ({})",
        failures.join("; ")
    ))))
}

/// A transport error's message with its causes, each said once ("tcp connect error: Connection
/// refused"), not tonic's repetition of the outermost one.
fn status_text(e: &tonic::Status) -> String {
    let mut parts: Vec<String> = vec![e.message().to_string()];
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.retain(|p| !p.is_empty());
    parts.join(": ")
}

async fn connect_one(
    connector: &Connector,
    addr: &str,
    resume: u64,
    lease_ms: u64,
    client_name: &str,
    waiting: Vec<u64>,
) -> Result<(Conn, pb::SessionOpened), tonic::Status> {
    let channel = connector.channel(addr).map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut client = pb::locks_client::LocksClient::new(channel);
    let (tx, rx) = mpsc::channel(256);
    let open = pb::ClientMessage {
        request_id: 0,
        body: Some(Up::Open(pb::OpenSession {
            resume_session: resume,
            lease_ms,
            client_name: client_name.to_string(),
            resync_locks: waiting,
            resync_listed: true,
        })),
    };
    tx.send(open).await.map_err(|_| tonic::Status::unavailable("stream closed"))?;
    let mut down = client.session(ReceiverStream::new(rx)).await?.into_inner();
    match down.next().await {
        Some(Ok(pb::ServerMessage { body: Some(Down::Opened(o)), .. })) => Ok(((tx, down), o)),
        Some(Err(e)) => Err(e),
        _ => Err(tonic::Status::unavailable("the server closed the session stream")),
    }
}

struct Actor {
    /// Heartbeats sent and not yet acknowledged: when each went out.
    beats: BTreeMap<u64, tokio::time::Instant>,
    renewed: std::sync::Arc<std::sync::Mutex<tokio::time::Instant>>,
    servers: Vec<String>,
    connector: Connector,
    session: u64,
    lease_ms: u64,
    heartbeat: Duration,
    next_request: u64,
    /// Requests sent but not acknowledged, in order: resent after a reconnect.
    unacked: BTreeMap<u64, (Up, Option<u64>, Want)>,
    /// POSIX requests queued (F_SETLKW), by owner and resource, with their request: after a
    /// move to another server each is cancelled and asked again, so a grant made meanwhile is
    /// not missed (asking again for a lock the owner holds is granted at once).
    posix_waits: BTreeMap<(u64, String), PosixWait>,
    /// Those cancels: their answers are not the callers'.
    posix_recancels: BTreeSet<u64>,
    /// The waits asked again after a move (request → the wait and its generation then): their
    /// answer resolves that wait only if it is still the same one.
    posix_rewaits: BTreeMap<u64, ((u64, String), u64)>,
    /// The last request sent before the latest move to another server. A POSIX answer that
    /// arrives with one of those requests and is not that request's own may be the replay of
    /// an answer given before (a retried request's original outputs): it resolves no wait (the
    /// waits are asked again after the move and answered directly).
    resent_upto: u64,
    next_gen: u64,
    /// Lock requests acknowledged (queued) but not yet granted or refused.
    waiting_locks: BTreeMap<u64, oneshot::Sender<Result<Grant, ClientError>>>,
    /// Of those, the ones a server's gateway queued (by lock), with their request: that server
    /// alone knows them, so after a move to another server they are asked again.
    gateway_waits: BTreeMap<u64, Up>,
    events: broadcast::Sender<Event>,
    numbers: std::sync::Arc<std::sync::Mutex<Numbers>>,
    cache: std::sync::Arc<std::sync::Mutex<Cache>>,
    /// Releases the actor decided on itself (revoked idle locks, locks beyond the LRU size),
    /// sent like any call once the message that caused them is handled.
    outbox: Vec<Call>,
    /// Lock numbers whose outstanding request is a new lock (not a convert).
    fresh_locks: BTreeSet<u64>,
    /// Per lock number, the largest token of a grant given to a request of this session. A
    /// lock number is reused once its release is applied; a server that has not applied that
    /// release yet (a follower the session moved to) tells of an old grant again, and that old
    /// grant must not answer the number's new request.
    granted_tokens: BTreeMap<u64, u64>,
}

/// A grant as the client shows it; a mode or value state this client does not know is an
/// error, never read as some default (a lock of an unknown mode taken for NL would be used as
/// if it protected nothing).
fn grant_of(g: &pb::Granted) -> Result<Grant, ClientError> {
    let range = g.range.as_ref().map_or(0..u64::MAX, |r| r.start..r.end);
    let mode = convert::mode_from_pb(g.mode).map_err(unknown)?;
    let value = g.value.as_ref().map(convert::value_from_pb).transpose().map_err(unknown)?.flatten();
    Ok(Grant {
        lock: g.lock,
        mode,
        range,
        token: g.token,
        signed_token: g.signed_token.clone(),
        via_gateway: g.gateway,
        value,
    })
}

/// A field of a server's message this client cannot read.
fn unknown(e: convert::ConvertError) -> ClientError {
    match e {
        convert::ConvertError::Unknown { what, value } => ClientError::Unknown { what, value },
        other => ClientError::Refused { code: ErrorCode::Internal, message: other.to_string() },
    }
}

/// A refusal as the client shows it: its code, or an error if the code is not one this client
/// knows.
fn refusal_of(r: pb::Rejected) -> ClientError {
    match ErrorCode::try_from(r.error) {
        Ok(code) => ClientError::Refused { code, message: r.message },
        Err(unknown) => ClientError::Unknown { what: "error code", value: unknown.0 },
    }
}

impl Actor {
    async fn run(mut self, conn: Conn, mut calls: mpsc::Receiver<Call>) {
        let (mut up, mut down) = conn;
        let mut beat = tokio::time::interval(self.heartbeat);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Every heartbeat is acknowledged: a server silent for two of them is taken as gone
        // (a connection can hang without breaking), and the session moves to another server.
        let silence_limit = self.heartbeat * 2 + Duration::from_millis(100);
        let mut last_heard = tokio::time::Instant::now();
        loop {
            let silent = tokio::time::sleep_until(last_heard + silence_limit);
            let server_lost = tokio::select! {
                biased;
                // First: a session busy with answers and calls must still renew its lease (the
                // ticks are a third of a lease apart, so they take nothing from the rest).
                _ = beat.tick() => {
                    let id = self.next_request;
                    self.next_request += 1;
                    let body = Up::Heartbeat(pb::Heartbeat {});
                    self.beats.insert(id, tokio::time::Instant::now());
                    let _ = up.send(pb::ClientMessage { request_id: id, body: Some(body.clone()) }).await;
                    self.unacked.insert(id, (body, None, Want::Nothing));
                    false
                }
                msg = down.next() => match msg {
                    Some(Ok(m)) => {
                        last_heard = tokio::time::Instant::now();
                        if self.handle(m) {
                            return;
                        }
                        for call in std::mem::take(&mut self.outbox) {
                            self.send_call(&mut up, call).await;
                        }
                        false
                    }
                    // The stream broke: the server is gone.
                    _ => true,
                },
                _ = silent => {
                    // Start with the next server: this one may still accept connections.
                    self.servers.rotate_left(1);
                    true
                }
                call = calls.recv() => match call {
                    Some(call) => {
                        self.send_call(&mut up, call).await;
                        false
                    }
                    None => return,
                },
            };
            if server_lost {
                // Resume the session on another server and resend what was not acknowledged.
                match self.reconnect().await {
                    Some((u, d)) => {
                        up = u;
                        down = d;
                        last_heard = tokio::time::Instant::now();
                    }
                    None => {
                        self.fail_all(ClientError::Expired);
                        return;
                    }
                }
            }
        }
    }

    /// Sends a call with the next request number; kept until acknowledged.
    async fn send_call(&mut self, up: &mut mpsc::Sender<pb::ClientMessage>, call: Call) {
        let Call { body, lock, want } = call;
        let id = self.next_request;
        self.next_request += 1;
        let _ = up.send(pb::ClientMessage { request_id: id, body: Some(body.clone()) }).await;
        if let (Up::Lock(_), Some(n)) = (&body, lock) {
            self.fresh_locks.insert(n);
        }
        self.unacked.insert(id, (body, lock, want));
    }

    async fn reconnect(&mut self) -> Option<Conn> {
        // Keep trying for most of a lease: after that the session is gone anyway.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(self.lease_ms);
        while tokio::time::Instant::now() < deadline {
            // Only the locks still awaited need telling again: the rest the client knows.
            let waiting: Vec<u64> = self
                .waiting_locks
                .keys()
                .copied()
                .chain(
                    self.unacked.values().filter_map(|(_, lock, want)| lock.filter(|_| matches!(want, Want::Lock(_)))),
                )
                .collect();
            match connect(&self.connector, &mut self.servers, self.session, self.lease_ms, "", waiting).await {
                Ok(((up, down), _)) => {
                    self.gateway_moved();
                    for (id, (body, _, _)) in &self.unacked {
                        let _ = up.send(pb::ClientMessage { request_id: *id, body: Some(body.clone()) }).await;
                    }
                    // A queued F_SETLKW may have been granted while no server could tell us:
                    // cancel it and ask again (granted at once if it was). A wait whose answer
                    // has not come yet is treated alike.
                    self.resent_upto = self.next_request.saturating_sub(1);
                    let unanswered: Vec<u64> = self
                        .unacked
                        .iter()
                        .filter(|(_, (b, _, w))| matches!((b, w), (Up::Posix(p), Want::Posix(_)) if p.wait))
                        .map(|(id, _)| *id)
                        .collect();
                    for id in unanswered {
                        let (body, lock, want) = self.unacked.remove(&id).expect("listed");
                        if let (Up::Posix(p), Want::Posix(tx)) = (&body, want) {
                            let generation = self.next_gen;
                            self.next_gen += 1;
                            let key = (p.owner, p.resource.clone());
                            self.posix_waits.insert(key, PosixWait { body: body.clone(), tx, generation });
                        }
                        self.unacked.insert(id, (body, lock, Want::Nothing));
                    }
                    let waits: Vec<((u64, String), Up, u64)> =
                        self.posix_waits.iter().map(|(k, w)| (k.clone(), w.body.clone(), w.generation)).collect();
                    for (key, body, generation) in waits {
                        let cancel = Up::PosixCancel(pb::PosixRequest {
                            owner: key.0,
                            resource: key.1.clone(),
                            ..Default::default()
                        });
                        for b in [cancel, body] {
                            let id = self.next_request;
                            self.next_request += 1;
                            if matches!(b, Up::PosixCancel(_)) {
                                self.posix_recancels.insert(id);
                            } else {
                                self.posix_rewaits.insert(id, (key.clone(), generation));
                            }
                            let _ = up.send(pb::ClientMessage { request_id: id, body: Some(b.clone()) }).await;
                            self.unacked.insert(id, (b, None, Want::Nothing));
                        }
                    }
                    return Some((up, down));
                }
                Err(ClientError::Expired | ClientError::Refused { .. } | ClientError::Unknown { .. }) => return None,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        None
    }

    /// After a move to another server: the locks the old server's gateway granted are lost,
    /// releasing them is moot, and what its gateway queued is asked of the new server.
    fn gateway_moved(&mut self) {
        let lost: Vec<u64> = {
            let cache = self.cache.lock().expect("cache");
            cache.held.iter().filter(|(_, (_, g))| g.via_gateway).map(|(l, _)| *l).collect()
        };
        for lock in lost {
            if self.cache.lock().expect("cache").lose(lock) {
                let reason = "the session moved to another server; the read lock was that server's".to_string();
                let _ = self.events.send(Event::Lost { lock, reason });
            }
        }
        let moot: Vec<u64> = self
            .unacked
            .iter()
            .filter(|(_, (body, _, _))| match body {
                Up::Release(l) | Up::Cancel(l) => self.cache.lock().expect("cache").lost.contains(&l.lock),
                _ => false,
            })
            .map(|(id, _)| *id)
            .collect();
        for id in moot {
            if let Some((_, _, Want::Done(tx))) = self.unacked.remove(&id) {
                let _ = tx.send(Ok(()));
            }
        }
        for (lock, body) in std::mem::take(&mut self.gateway_waits) {
            let Some(tx) = self.waiting_locks.remove(&lock) else { continue };
            let id = self.next_request;
            self.next_request += 1;
            self.unacked.insert(id, (body, Some(lock), Want::Lock(tx)));
        }
    }

    /// A POSIX answer: to the request it came with if it is about that request's owner (an
    /// entry can answer several owners of this session), else to a queued request.
    fn posix_answer(&mut self, request_id: u64, a: pb::PosixAnswer) {
        use pb::posix_answer::Outcome as O;
        if self.posix_recancels.remove(&request_id) {
            return;
        }
        let about = |owner: u64, resource: &str| owner == a.owner && (a.resource.is_empty() || a.resource == resource);
        if let Some((key, generation)) = self.posix_rewaits.get(&request_id).cloned()
            && about(key.0, &key.1)
        {
            if a.outcome != O::Queued as i32 {
                self.posix_rewaits.remove(&request_id);
                if self.posix_waits.get(&key).is_some_and(|w| w.generation == generation)
                    && let Some(w) = self.posix_waits.remove(&key)
                {
                    let _ = w.tx.send(posix_outcome(&a));
                }
            }
            return;
        }
        let direct = match self.unacked.get(&request_id) {
            Some((Up::Posix(p) | Up::PosixTest(p), _, Want::Posix(_))) => about(p.owner, &p.resource),
            _ => false,
        };
        if direct {
            let (body, lock, want) = self.unacked.remove(&request_id).expect("present");
            let Want::Posix(tx) = want else { unreachable!("checked") };
            if a.outcome == O::Queued as i32 {
                let key = match &body {
                    Up::Posix(p) => (p.owner, p.resource.clone()),
                    _ => (a.owner, a.resource.clone()),
                };
                let generation = self.next_gen;
                self.next_gen += 1;
                self.posix_waits.insert(key, PosixWait { body: body.clone(), tx, generation });
            } else {
                let _ = tx.send(posix_outcome(&a));
            }
            self.unacked.insert(request_id, (body, lock, Want::Nothing));
            return;
        }
        // Only what ends a wait ends one, and never an answer that may be a replay.
        let ends_wait = [O::Granted, O::Deadlock, O::Cancelled].iter().any(|o| *o as i32 == a.outcome);
        if !ends_wait || (request_id != 0 && request_id <= self.resent_upto) {
            return;
        }
        let key = if a.resource.is_empty() {
            self.posix_waits.keys().find(|(o, _)| *o == a.owner).cloned()
        } else {
            Some((a.owner, a.resource.clone())).filter(|k| self.posix_waits.contains_key(k))
        };
        if let Some(key) = key
            && let Some(w) = self.posix_waits.remove(&key)
        {
            let _ = w.tx.send(posix_outcome(&a));
        }
    }

    fn fail_all(&mut self, e: ClientError) {
        for (_, (_, _, want)) in std::mem::take(&mut self.unacked) {
            match want {
                Want::Lock(tx) => {
                    let _ = tx.send(Err(e.clone()));
                }
                Want::Done(tx) => {
                    let _ = tx.send(Err(e.clone()));
                }
                Want::Posix(tx) => {
                    let _ = tx.send(Err(e.clone()));
                }
                Want::Nothing => {}
            }
        }
        for (_, tx) in std::mem::take(&mut self.waiting_locks) {
            let _ = tx.send(Err(e.clone()));
        }
        for (_, w) in std::mem::take(&mut self.posix_waits) {
            let _ = w.tx.send(Err(e.clone()));
        }
        let _ = self.events.send(Event::Expired);
    }

    /// Resolves the lock request for `lock`, wherever it is waiting.
    fn resolve_lock(&mut self, lock: u64, result: Result<Grant, ClientError>) -> bool {
        self.gateway_waits.remove(&lock);
        self.fresh_locks.remove(&lock);
        if let Ok(g) = &result
            && !g.via_gateway
        {
            let t = self.granted_tokens.entry(lock).or_insert(0);
            *t = (*t).max(g.token);
        }
        if let Some(tx) = self.waiting_locks.remove(&lock) {
            let _ = tx.send(result);
            return true;
        }
        let id = self
            .unacked
            .iter()
            .find(|(_, (_, l, w))| *l == Some(lock) && matches!(w, Want::Lock(_)))
            .map(|(id, _)| *id);
        if let Some(id) = id
            && let Some((body, l, Want::Lock(tx))) = self.unacked.remove(&id)
        {
            let _ = tx.send(result);
            // Keep the request until its ack, so a reconnect still resends it.
            self.unacked.insert(id, (body, l, Want::Nothing));
            return true;
        }
        false
    }

    /// Handles one message; returns true when the session is over.
    fn handle(&mut self, m: pb::ServerMessage) -> bool {
        let Some(body) = m.body else { return false };
        // An answer to a request no longer outstanding is a replay: the request was resent after
        // a reconnect and the cluster answered it again from memory. Its outputs are old news
        // (a `Cancelled` of an earlier use of the same lock number, say) and must not be applied
        // to what the number means now.
        if m.request_id != 0 && !self.unacked.contains_key(&m.request_id) {
            return false;
        }
        match body {
            Down::Granted(g)
                if is_an_earlier_uses_grant(
                    &g,
                    self.fresh_locks.contains(&g.lock),
                    self.granted_tokens.get(&g.lock).copied(),
                ) => {}
            Down::Granted(g) | Down::Converted(g) => {
                self.gateway_waits.remove(&g.lock);
                self.numbers.lock().expect("numbers").used.insert(g.lock);
                match grant_of(&g) {
                    Ok(grant) => {
                        // A resumed session is told its locks again: a grant it already holds,
                        // unchanged, is no news.
                        let known = self.cache.lock().expect("cache").held.get(&g.lock).is_some_and(|(_, h)| {
                            h.token == grant.token && h.mode == grant.mode && h.range == grant.range
                        });
                        if known && !self.waiting_locks.contains_key(&g.lock) {
                            return false;
                        }
                        if !self.resolve_lock(g.lock, Ok(grant.clone())) {
                            let _ = self.events.send(Event::Granted(grant));
                        }
                    }
                    Err(e) => {
                        // A lock this client cannot understand is given back, not used.
                        self.resolve_lock(g.lock, Err(e));
                        self.outbox.push(Call::release(g.lock));
                    }
                }
            }
            Down::Busy(b) => {
                let who = if b.blocker_descriptions.is_empty() {
                    b.blockers.iter().map(|l| format!("lock {l}")).collect()
                } else {
                    b.blocker_descriptions
                };
                self.resolve_lock(b.lock, Err(ClientError::Busy(who)));
            }
            Down::Deadlock(l) => {
                self.resolve_lock(l.lock, Err(ClientError::Deadlock));
            }
            Down::Cancelled(l) => {
                self.resolve_lock(l.lock, Err(ClientError::Cancelled));
            }
            Down::Revoke(l) => {
                let idle = {
                    let mut cache = self.cache.lock().expect("cache");
                    match cache.cached.get_mut(&l.lock) {
                        Some(c) if !c.in_use => {
                            cache.cached.remove(&l.lock);
                            cache.held.remove(&l.lock);
                            true
                        }
                        Some(c) => {
                            c.revoked = true;
                            false
                        }
                        None => false,
                    }
                };
                if idle {
                    // Give the idle cached lock back; its number is freed once the release is
                    // applied (its ack), not before: a new lock must not reuse it meanwhile.
                    self.outbox.push(Call::release(l.lock));
                }
                let _ = self.events.send(Event::Revoke { lock: l.lock });
            }
            Down::LruSize(l) => {
                let beyond = {
                    let mut cache = self.cache.lock().expect("cache");
                    cache.limit = Some(l.max_cached);
                    cache.trim()
                };
                for lock in beyond {
                    // Its number is freed once the release is applied (its ack).
                    self.outbox.push(Call::release(lock));
                }
            }
            Down::Rejected(r) => {
                // A refused renewal renews nothing: its ack must not count.
                self.beats.remove(&m.request_id);
                if let Some((body, lock, want)) = self.unacked.remove(&m.request_id) {
                    let e = refusal_of(r);
                    match want {
                        Want::Lock(tx) => {
                            let _ = tx.send(Err(e));
                        }
                        Want::Done(tx) => {
                            let _ = tx.send(Err(e));
                        }
                        Want::Posix(tx) => {
                            let _ = tx.send(Err(e));
                        }
                        Want::Nothing => {}
                    }
                    self.unacked.insert(m.request_id, (body, lock, Want::Nothing));
                }
            }
            Down::Ordered(_) => {
                // A release in order on its way to the log: its caller may go on, but it stays
                // here, resent on a resume, until its ack says it is applied.
                if let Some((body, lock, want)) = self.unacked.remove(&m.request_id) {
                    if let Want::Done(tx) = want {
                        let _ = tx.send(Ok(()));
                    } else {
                        self.unacked.insert(m.request_id, (body, lock, want));
                        return false;
                    }
                    self.unacked.insert(m.request_id, (body, lock, Want::Nothing));
                }
            }
            Down::Ack(_) => {
                self.posix_recancels.remove(&m.request_id);
                self.posix_rewaits.remove(&m.request_id);
                if let Some(sent) = self.beats.remove(&m.request_id) {
                    // The leader renewed it: the lease runs from when it was asked for.
                    let mut renewed = self.renewed.lock().expect("renewed");
                    *renewed = (*renewed).max(sent);
                    self.beats.retain(|id, _| *id > m.request_id);
                }
                if let Some((body, lock, want)) = self.unacked.remove(&m.request_id) {
                    if let Up::Release(l) = &body {
                        // Applied: the number may name a new lock now.
                        self.numbers.lock().expect("numbers").used.remove(&l.lock);
                    }
                    match want {
                        Want::Done(tx) => {
                            let _ = tx.send(Ok(()));
                        }
                        Want::Posix(tx) => {
                            let _ = tx.send(Err(ClientError::Refused {
                                code: ErrorCode::Internal,
                                message: "the server acknowledged a POSIX request without answering it".into(),
                            }));
                        }
                        Want::Lock(tx) => {
                            // Acknowledged but not yet answered: it waits in the queue.
                            if let Some(l) = lock {
                                self.waiting_locks.insert(l, tx);
                                if matches!(&body, Up::Lock(r) if r.gateway) {
                                    self.gateway_waits.insert(l, body);
                                }
                            }
                        }
                        Want::Nothing => {}
                    }
                }
            }
            Down::Expired(_) => {
                self.fail_all(ClientError::Expired);
                return true;
            }
            Down::Lost(l) => {
                self.gateway_waits.remove(&l.lock);
                if !self.resolve_lock(l.lock, Err(ClientError::Lost(l.reason.clone())))
                    && self.cache.lock().expect("cache").lose(l.lock)
                {
                    let _ = self.events.send(Event::Lost { lock: l.lock, reason: l.reason });
                }
            }
            Down::Posix(a) => self.posix_answer(m.request_id, a),
            Down::Queued(_) | Down::Released(_) | Down::Opened(_) | Down::NotLeader(_) => {}
        }
        false
    }
}

/// Whether grant `g` of a lock number whose outstanding request is a new lock (`fresh`), and
/// whose uses so far were given tokens up to `largest_given`, is a grant of one of those earlier
/// uses, told again by a server that has not applied its release yet (a follower the session
/// moved to): then it is not the answer to the new request, whose grant comes later in the log
/// and so carries a larger token (tokens grow with the log). A gateway's grant carries the
/// gateway's own token and is not compared.
fn is_an_earlier_uses_grant(g: &pb::Granted, fresh: bool, largest_given: Option<u64>) -> bool {
    !g.gateway && fresh && largest_given.is_some_and(|t| g.token <= t)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fault campaign found a resumed session taking an old grant of a reused lock number
    /// as the answer to its new request (the counter's lock then "held" by two clients).
    #[test]
    fn an_old_grant_of_a_reused_lock_number_does_not_answer_its_new_request() {
        let g = |token: u64, gateway: bool| pb::Granted { lock: 1, token, gateway, ..Default::default() };
        // The number was granted tokens 5 and then 9; its new request is outstanding.
        assert!(is_an_earlier_uses_grant(&g(9, false), true, Some(9)), "the last use's grant told again");
        assert!(is_an_earlier_uses_grant(&g(5, false), true, Some(9)), "an earlier use's grant told again");
        assert!(!is_an_earlier_uses_grant(&g(10, false), true, Some(9)), "the new request's grant");
        assert!(!is_an_earlier_uses_grant(&g(3, true), true, Some(9)), "a gateway's grant (its own token)");
        assert!(!is_an_earlier_uses_grant(&g(5, false), true, None), "a number never granted before");
        assert!(!is_an_earlier_uses_grant(&g(5, false), false, Some(9)), "a convert's answer");
    }

    fn granted(mode: i32, state: i32) -> pb::Granted {
        pb::Granted {
            lock: 1,
            mode,
            range: Some(pb::Range { start: 0, end: 10 }),
            token: 7,
            value: Some(pb::ValueBlock { state, value: b"v".to_vec() }),
            ..Default::default()
        }
    }

    /// Issue 11: a mode this client did not know was read as NL, a lock that protects nothing.
    #[test]
    fn an_unknown_mode_or_value_state_is_an_error_not_a_default() {
        assert_eq!(
            grant_of(&granted(Mode::EX as i32, 1)).map(|g| (g.mode, g.value)),
            Ok((Mode::EX, Some(b"v".to_vec())))
        );
        assert_eq!(grant_of(&granted(Mode::PR as i32, 2)).map(|g| g.value), Ok(None));
        assert_eq!(grant_of(&granted(6, 1)), Err(ClientError::Unknown { what: "lock mode", value: 6 }));
        assert_eq!(grant_of(&granted(-1, 1)), Err(ClientError::Unknown { what: "lock mode", value: -1 }));
        assert_eq!(grant_of(&granted(0, 9)), Err(ClientError::Unknown { what: "value block state", value: 9 }));
    }

    #[test]
    fn a_refusal_keeps_its_code_and_an_unknown_or_missing_code_is_an_error() {
        let rejected = |error: i32| pb::Rejected { code: 16, message: "lock 1: limit".into(), error };
        assert_eq!(
            refusal_of(rejected(ErrorCode::Limit.into())),
            ClientError::Refused { code: ErrorCode::Limit, message: "lock 1: limit".into() }
        );
        assert!(!refusal_of(rejected(ErrorCode::Limit.into())).is_retryable());
        assert_eq!(refusal_of(rejected(0)), ClientError::Unknown { what: "error code", value: 0 });
        assert_eq!(refusal_of(rejected(4242)), ClientError::Unknown { what: "error code", value: 4242 });
    }

    #[test]
    fn a_refused_call_maps_to_its_code() {
        let e = ClientError::from_status(&ErrorCode::NotFound.status("no such file: /a"));
        assert_eq!(e, ClientError::Refused { code: ErrorCode::NotFound, message: "no such file: /a".into() });
        assert_eq!(
            ClientError::from_status(&ErrorCode::SessionExpired.status("gone")).code(),
            ErrorCode::SessionExpired
        );
        // A transport failure (no detail): the code its gRPC status stands for.
        assert_eq!(
            ClientError::from_status(&tonic::Status::unavailable("connection refused")).code(),
            ErrorCode::Unavailable
        );
        assert!(ClientError::Busy(Vec::new()).is_retryable());
        assert!(!ClientError::Deadlock.is_retryable());
    }
}
