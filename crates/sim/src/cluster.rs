//! The real servers and clients in a deterministic simulation: every server runs its openraft
//! node, its in-memory redb store and both tonic services; every client is the `client` crate;
//! they talk HTTP/2 over turmoil's simulated TCP, on simulated time, with openraft's random
//! draws and tokio's scheduler seeded from the run's seed (tokio's needs `--cfg tokio_unstable`,
//! set in `.cargo/config.toml`).
//!
//! Faults, drawn from the seed: a server crashes and restarts from its store; a server is cut off
//! from its peers; a link between two servers holds its messages for a while; a client pauses
//! past its lease while it holds a lock (it is cut off from every server). Then the faults stop
//! and the cluster heals. A cut link holds its messages and delivers them when it heals, as TCP
//! does; turmoil's `partition` would instead drop segments from inside a live connection, which
//! no real TCP connection does.
//!
//! Every server reports each entry it applies. The checker asserts: every server that applied an
//! index computed the same outputs; in log order, no two conflicting grants are valid at once,
//! tokens strictly increase across conflicting grants (over leader changes too), no grant goes
//! to an expired session; every grant a client was told of is in the log with that token; and
//! after the faults stop every request completes.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use client::{ClientError, Connector, LockOptions, Mode, Session};
use lockengine::{ByteRange, Input, LockId, Output, SessionId};
use server::{ApplyEvent, DataConfig, DataEnv, DataLimits, LockConfig, LockEnv, ServerConfig, StorageEvent};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::checker::{Checker, Grant};
use crate::{Rng, Violation};

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub servers: u64,
    pub clients: usize,
    pub resources: usize,
    pub lease_ms: u64,
    /// How long faults are injected, then how long the cluster has to heal.
    pub fault_ms: u64,
    pub heal_ms: u64,
    /// Negative control: the engine drops an expired holder's locks before it is fenced.
    pub break_fencing: bool,
    /// The gateways' negative control: give a revoked read lock back with readers still on it.
    pub break_gateway: bool,
    /// Storage's negative control: the leader acknowledges fences without storage.
    pub break_storage_fence: bool,
    /// The leases' negative control: a new leader expires the sessions it inherits at once.
    pub break_fresh_lease: bool,
}

impl Default for ClusterConfig {
    fn default() -> ClusterConfig {
        ClusterConfig {
            servers: 3,
            clients: 4,
            resources: 2,
            lease_ms: 1_000,
            fault_ms: 8_000,
            heal_ms: 6_000,
            break_fencing: false,
            break_gateway: false,
            break_storage_fence: false,
            break_fresh_lease: false,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterReport {
    pub entries: u64,
    pub grants: u64,
    pub client_grants: u64,
    pub expiries: u64,
    pub crashes: u64,
    pub partitions: u64,
    pub pauses: u64,
    /// Distinct terms seen in tokens (leaders that granted something).
    pub epochs: u64,
    /// Read locks granted from a gateway's cache and checked against the log.
    pub gateway_reads: u64,
    /// Fence acknowledgements checked against what every storage server recorded.
    pub fence_acks: u64,
    /// A digest of the applied history and what clients saw, to show two runs of a seed agree.
    pub digest: u64,
}

const PORT: u16 = 7000;
/// Lease of each server's gateway session (its cached read locks).
const GATEWAY_LEASE_MS: u64 = 2_000;
/// Leader-stamped times start here (a made-up epoch, the same in every run).
const CLOCK_BASE_MS: u64 = 1_700_000_000_000;

/// What the run records, shared by every host (all on this one thread).
#[derive(Debug, Default)]
struct Record {
    /// Index → the first application of it (server, time stamp, input, reply).
    applied: BTreeMap<u64, ApplyEvent>,
    /// Index → when it was first applied: (order among recorded events, true sim ms).
    applied_at: BTreeMap<u64, (u64, u64)>,
    /// What storage servers did about fences: (order among recorded events, event with its
    /// lease end in true sim ms).
    storage: Vec<(u64, StorageEvent)>,
    /// Recorded events so far (their order: hosts run on this one thread).
    events: u64,
    /// The first disagreement between servers.
    disagreement: Option<String>,
    /// Grants clients were told of: (session, client lock number, token).
    told: Vec<(u64, u64, u64)>,
    /// Read locks clients were granted from a server's gateway cache.
    gateway_reads: Vec<GatewayRead>,
    /// Requests that did not complete in time after the faults stopped.
    stuck: Vec<String>,
    /// Session → the latest true sim ms until which its client counted its lease valid (from an
    /// acknowledged renewal, less the drift margin): the cluster must not expire it before.
    lease_beliefs: BTreeMap<u64, u64>,
    /// Clients asking to be paused (cut off) for this many ms, now.
    pause_requests: Vec<(usize, u64)>,
    client_digest: u64,
}

/// A read lock a server's gateway granted a client, as the client saw it.
#[derive(Debug, Clone)]
struct GatewayRead {
    session: u64,
    resource: String,
    range: ByteRange,
    token: u64,
    /// Sim time the client had the grant, and the time it called unlock (`None`: the lock was
    /// reported lost, so when it stopped being valid is the gateway's business).
    from_ms: u64,
    to_ms: Option<u64>,
}

/// Largest clock skew of a server (its stamps run this far ahead of the sim's time at most).
const SKEW_MS_MAX: u64 = 40;

fn fnv(h: u64, s: &str) -> u64 {
    s.bytes().fold(h ^ 0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

fn server_name(id: u64) -> String {
    format!("s{id}")
}

fn client_name(i: usize) -> String {
    format!("c{i}")
}

/// A connector that dials turmoil's network.
fn connector() -> Connector {
    Connector::new(|addr| {
        let target = addr.to_string();
        let endpoint = wire::endpoint(addr)?.connect_timeout(Duration::from_millis(500));
        Ok(endpoint.connect_with_connector_lazy(tower::service_fn(move |_: tonic::codegen::http::Uri| {
            let target = target.clone();
            async move { turmoil::net::TcpStream::connect(target).await.map(hyper_util::rt::TokioIo::new) }
        })))
    })
}

/// A simulated TCP connection as tonic's server takes it.
struct Conn(turmoil::net::TcpStream);

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Runs one seed, on a thread of its own so no thread-local state of an earlier run (hash
/// seeds, the runtime's) can change it: a seed replays the same alone or among others.
pub fn run(seed: u64, cfg: &ClusterConfig) -> Result<ClusterReport, Violation> {
    let cfg = cfg.clone();
    std::thread::Builder::new()
        .name(format!("sim-seed-{seed}"))
        .spawn(move || run_here(seed, &cfg))
        .map_err(|e| Violation { seed, at_ms: 0, what: format!("cannot start the simulation thread: {e}") })?
        .join()
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(Violation { seed, at_ms: 0, what: format!("the simulation panicked: {what}") })
        })
}

fn run_here(seed: u64, cfg: &ClusterConfig) -> Result<ClusterReport, Violation> {
    let fail = |at_ms: u64, what: String| Violation { seed, at_ms, what };
    server::seed_thread_rng(seed);
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(Duration::from_millis(cfg.fault_ms + cfg.heal_ms + 60_000))
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(8))
        .enable_random_order()
        .build();
    let record = Arc::new(Mutex::new(Record::default()));
    let peers: BTreeMap<u64, String> =
        (1..=cfg.servers).map(|id| (id, format!("{}:{PORT}", server_name(id)))).collect();
    let mut rng = Rng::new(seed ^ 0x5eed_c1a5_7e40);

    for id in 1..=cfg.servers {
        // The store outlives a crash of its server, as a disk would.
        let db = Arc::new(
            redb::Database::builder()
                .create_with_backend(redb::backends::InMemoryBackend::new())
                .map_err(|e| fail(0, format!("in-memory database: {e}")))?,
        );
        // Like the database, the data volume outlives the server's crashes.
        let volume: Arc<dyn chunks::Device> = Arc::new(chunks::MemDevice::default());
        let skew_ms = rng.below(SKEW_MS_MAX);
        let (peers, record, break_fencing, break_gateway, break_storage_fence, break_fresh_lease) = (
            peers.clone(),
            record.clone(),
            cfg.break_fencing,
            cfg.break_gateway,
            cfg.break_storage_fence,
            cfg.break_fresh_lease,
        );
        sim.host(server_name(id), move || {
            let observer_record = record.clone();
            let observer = move |e: ApplyEvent| {
                let mut r = observer_record.lock().expect("record");
                match r.applied.get(&e.index) {
                    None => {
                        r.events += 1;
                        let at = (r.events, elapsed_ms());
                        r.applied_at.insert(e.index, at);
                        r.applied.insert(e.index, e);
                    }
                    Some(seen) if seen.reply.outputs != e.reply.outputs || seen.input != e.input => {
                        let what = format!(
                            "server {} applied index {} as {:?} -> {:?}, server {} as {:?} -> {:?}",
                            e.server, e.index, e.input, e.reply.outputs, seen.server, seen.input, seen.reply.outputs
                        );
                        r.disagreement.get_or_insert(what);
                    }
                    Some(_) => {}
                }
            };
            let storage_record = record.clone();
            let storage_observer = move |e: StorageEvent| {
                let mut r = storage_record.lock().expect("record");
                r.events += 1;
                let seq = r.events;
                // The lease's end in true time: this server's clock runs `skew_ms` ahead.
                let e = match e {
                    StorageEvent::Lease { server, until_ms } => {
                        StorageEvent::Lease { server, until_ms: until_ms.saturating_sub(CLOCK_BASE_MS + skew_ms) }
                    }
                    e => e,
                };
                r.storage.push((seq, e));
            };
            let env = LockEnv {
                clock: Some(Arc::new(move || {
                    CLOCK_BASE_MS + skew_ms + turmoil::sim_elapsed().unwrap_or_default().as_millis() as u64
                })),
                connector: connector(),
                database: Some(db.clone()),
                secret: Some([7; 32]),
                election_timeout_ms: None,
                observer: Some(Arc::new(observer)),
                break_fencing_for_negative_control: break_fencing,
                break_gateway_for_negative_control: break_gateway,
                break_fresh_lease_for_negative_control: break_fresh_lease,
                crash_after_release_ack_for_test: None,
            };
            let data_env = DataEnv {
                volume: Some(volume.clone()),
                storage_observer: Some(Arc::new(storage_observer)),
                skip_storage_fence_for_negative_control: break_storage_fence,
                break_stale_write_check_for_negative_control: false,
                break_invalidate_for_negative_control: false,
                hold_first_stripe_write_ms_for_test: None,
                break_signal_for_negative_control: false,
                hold_migrate_commit_ms_for_test: None,
                break_resync_for_negative_control: false,
            };
            let data_dir = std::path::PathBuf::from("/nonexistent");
            let config = ServerConfig {
                http: None,
                tls: None,
                http_clients: Default::default(),
                locks: LockConfig {
                    id,
                    listen: ([0, 0, 0, 0], PORT).into(),
                    data_dir: data_dir.clone(),
                    peers: peers.clone(),
                    bootstrap: id == 1,
                    heartbeat_ms: 50,
                    tick_ms: 100,
                    snapshot_every: 300,
                    gateway_lease_ms: GATEWAY_LEASE_MS,
                    lease_min_ms: server::LEASE_MS_MIN,
                    lease_max_ms: server::LEASE_MS_MAX,
                    lock_memory_budget: 1 << 30,
                    quota: Default::default(),
                    limits: lockengine::Limits::default(),
                    env,
                },
                data: DataConfig {
                    tier: server::TierPlace::Dir(data_dir.join("tier")),
                    // Not simulated: its session and lock traffic would change every seed.
                    migration_signal: false,
                    recall_on_read: false,
                    data_dir,
                    chunk_store: server::ChunkStoreKind::default(),
                    tick_ms: 100,
                    orphan_grace_ms: 0,
                    storage_lease_ms: server::STORAGE_LEASE_MS_DEFAULT,
                    limits: DataLimits::default(),
                    env: data_env,
                },
            };
            async move {
                let listener = turmoil::net::TcpListener::bind(("0.0.0.0", PORT)).await?;
                let incoming = futures::stream::unfold(listener, |l| async move {
                    let next = l.accept().await.map(|(s, _)| Conn(s));
                    Some((next, l))
                });
                let (_keep, stop) = tokio::sync::watch::channel(false);
                server::serve(config, incoming, stop).await?;
                Ok(())
            }
        });
    }

    let servers: Vec<String> = peers.values().cloned().collect();
    let end_ms = cfg.fault_ms + cfg.heal_ms;
    for i in 0..cfg.clients {
        let mut crng = Rng::new(seed.wrapping_mul(31).wrapping_add(i as u64 + 1));
        // Each client starts from a different server.
        let mut order = servers.clone();
        order.rotate_left(i % servers.len());
        let (record, cfg) = (record.clone(), cfg.clone());
        sim.client(client_name(i), async move {
            client_loop(i, &mut crng, &order, &record, &cfg, end_ms).await;
            Ok(())
        });
    }

    // The fault schedule, decided every 50 ms of simulated time until the faults stop.
    let mut report = ClusterReport::default();
    let mut down: BTreeMap<u64, u64> = BTreeMap::new(); // server → restart at
    let mut cut: BTreeMap<u64, u64> = BTreeMap::new(); // server → repair at
    let mut paused: BTreeMap<usize, u64> = BTreeMap::new(); // client → repair at
    let mut held: Option<(u64, u64, u64)> = None; // (a, b, release at)
    let names: Vec<String> = (1..=cfg.servers).map(server_name).collect();
    let mut healed = false;
    loop {
        let done = sim.step().map_err(|e| fail(sim.elapsed().as_millis() as u64, format!("simulation: {e}")))?;
        if done {
            break;
        }
        let now = sim.elapsed().as_millis() as u64;
        let requests = std::mem::take(&mut record.lock().expect("record").pause_requests);
        for (c, ms) in requests {
            if now < cfg.fault_ms && !paused.contains_key(&c) {
                for s in &names {
                    sim.hold(client_name(c), s.as_str());
                }
                paused.insert(c, now + ms);
                report.pauses += 1;
            }
        }
        if !now.is_multiple_of(50) {
            continue;
        }
        // Repairs that are due.
        for (&s, &at) in down.clone().iter() {
            if now >= at || now >= cfg.fault_ms {
                sim.bounce(server_name(s));
                down.remove(&s);
            }
        }
        for (&s, &at) in cut.clone().iter() {
            if now >= at || now >= cfg.fault_ms {
                for other in &names {
                    if *other != server_name(s) {
                        sim.release(server_name(s), other.as_str());
                    }
                }
                cut.remove(&s);
            }
        }
        for (&c, &at) in paused.clone().iter() {
            if now >= at || now >= cfg.fault_ms {
                for s in &names {
                    sim.release(client_name(c), s.as_str());
                }
                paused.remove(&c);
            }
        }
        if let Some((a, b, at)) = held
            && (now >= at || now >= cfg.fault_ms)
        {
            sim.release(server_name(a), server_name(b));
            held = None;
        }
        if now >= cfg.fault_ms {
            healed = true;
            continue;
        }
        // New faults, at most one server out at a time so a majority remains.
        let impaired = down.len() + cut.len();
        if impaired == 0 && held.is_none() && now > 1_000 && rng.chance(5) {
            let s = 1 + rng.below(cfg.servers);
            if rng.chance(50) {
                sim.crash(server_name(s));
                down.insert(s, now + 200 + rng.below(2_000));
                report.crashes += 1;
            } else {
                for other in &names {
                    if *other != server_name(s) {
                        sim.hold(server_name(s), other.as_str());
                    }
                }
                cut.insert(s, now + 200 + rng.below(2_000));
                report.partitions += 1;
            }
        }
        if held.is_none() && cut.is_empty() && rng.chance(2) {
            let a = 1 + rng.below(cfg.servers);
            let b = 1 + (a + rng.below(cfg.servers - 1)) % cfg.servers;
            if a != b && !down.contains_key(&a) && !down.contains_key(&b) {
                sim.hold(server_name(a), server_name(b));
                held = Some((a, b, now + 50 + rng.below(400)));
            }
        }
    }
    let now = sim.elapsed().as_millis() as u64;
    if !healed {
        return Err(fail(now, "the clients ended before the faults did".into()));
    }
    check(seed, cfg.servers, &record.lock().expect("record"), report)
}

/// Reads the recorded history in log order.
fn check(seed: u64, servers: u64, r: &Record, mut report: ClusterReport) -> Result<ClusterReport, Violation> {
    let fail = |at_ms: u64, what: String| Violation { seed, at_ms, what };
    if let Some(d) = &r.disagreement {
        return Err(fail(0, d.clone()));
    }
    let mut checker = Checker::default();
    let mut resource_of: BTreeMap<LockId, String> = BTreeMap::new();
    let mut logged: BTreeMap<(u64, u64), Vec<u64>> = BTreeMap::new(); // (session, client lock) → tokens
    let mut epochs = std::collections::BTreeSet::new();
    let mut digest = 0u64;
    let trace = std::env::var("SIM_TRACE").is_ok_and(|s| s.is_empty() || s == seed.to_string());
    // Each grant's span in stamped time, for the gateway reads: (session, resource, range, mode,
    // from, to); open ones by lock.
    let mut spans: Vec<(SessionId, String, ByteRange, Mode, u64, u64)> = Vec::new();
    let mut open: BTreeMap<LockId, (SessionId, String, ByteRange, Mode, u64)> = BTreeMap::new();
    let mut gateway_tokens: BTreeMap<u64, (String, SessionId)> = BTreeMap::new();
    for server in 1..=servers {
        checker.storage_server(server);
    }
    let mut storage_events = r.storage.iter().peekable();
    for (index, e) in &r.applied {
        let server = e.server;
        let at = e.now_ms.saturating_sub(CLOCK_BASE_MS);
        // What storage servers recorded before this entry was first applied.
        let (seq, applied_ms) = r.applied_at.get(index).copied().unwrap_or((u64::MAX, u64::MAX));
        while let Some((_, event)) = storage_events.next_if(|(s, _)| *s < seq) {
            match event {
                StorageEvent::Fenced { server, sessions } => {
                    checker.storage_fenced(*server, sessions.iter().map(|s| SessionId(*s)))
                }
                StorageEvent::Lease { server, until_ms } => checker.storage_lease(*server, *until_ms),
            }
        }
        if trace {
            eprintln!(
                "{index} s{server} @{at} req {:?} {:?} -> {:?}{}",
                e.origin.map(|o| o.request),
                e.input,
                e.reply.outputs,
                if e.reply.duplicate { " (dup)" } else { "" }
            );
        }
        report.entries += 1;
        digest = fnv(digest.rotate_left(5), &format!("{index}{:?}{:?}", e.input, e.reply.outputs));
        if e.reply.duplicate {
            // A retry answered from memory: nothing was applied.
            continue;
        }
        match &e.input {
            Some(Input::Lock { lock, resource, .. }) => {
                // A lock number still in use is refused (`LockExists`) and keeps its resource.
                let refused =
                    e.reply.outputs.iter().any(
                        |o| matches!(o, Output::Rejected { subject: lockengine::Subject::Lock(l), .. } if l == lock),
                    );
                if !refused {
                    resource_of.insert(*lock, resource.clone());
                }
            }
            Some(Input::FenceAck { session }) => {
                checker.fence_acked(*session, applied_ms).map_err(|w| fail(at, format!("index {index}: {w}")))?;
                report.fence_acks += 1;
            }
            _ => {}
        }
        for o in &e.reply.outputs {
            match o {
                Output::Granted { session, lock, mode, range, token, .. }
                | Output::Converted { session, lock, mode, range, token, .. } => {
                    let Some(resource) = resource_of.get(lock).cloned() else {
                        return Err(fail(at, format!("{lock:?} granted at index {index} on no known resource")));
                    };
                    let g = Grant { session: *session, resource, range: *range, mode: *mode, token: *token };
                    checker.grant(*lock, g.clone()).map_err(|w| fail(at, format!("index {index}: {w}")))?;
                    if let Some((s, res, rg, m, from)) = open.remove(lock) {
                        spans.push((s, res, rg, m, from, at));
                    }
                    open.insert(*lock, (*session, g.resource.clone(), *range, *mode, at));
                    if *mode == Mode::PR && *range == ByteRange::ALL {
                        gateway_tokens.insert(*token, (g.resource, *session));
                    }
                    report.grants += 1;
                    epochs.insert(token >> 40);
                    logged.entry((session.0, server::client_lock_id(*lock))).or_default().push(*token);
                }
                Output::Released { lock, .. } => {
                    checker.released(*lock);
                    if let Some((s, res, rg, m, from)) = open.remove(lock) {
                        spans.push((s, res, rg, m, from, at));
                    }
                }
                Output::Expired { session } => {
                    // Leases live in the leader's memory (issue 12): whatever leader expired
                    // it, no acknowledged renewal may still cover the session.
                    if let Some(until) = r.lease_beliefs.get(&session.0).filter(|u| **u > applied_ms) {
                        return Err(fail(
                            at,
                            format!(
                                "index {index}: session {} expired at {applied_ms} ms while its client held an \
                                 acknowledged lease until {until} ms",
                                session.0
                            ),
                        ));
                    }
                    checker.expired(*session);
                    report.expiries += 1;
                }
                _ => {}
            }
        }
    }
    for (session, lock, token) in &r.told {
        if !logged.get(&(*session, *lock)).is_some_and(|t| t.contains(token)) {
            return Err(fail(
                0,
                format!("session {session} was told it holds lock {lock} with token {token}, which no entry granted"),
            ));
        }
    }
    spans.extend(open.into_values().map(|(s, res, rg, m, from)| (s, res, rg, m, from, u64::MAX)));
    for read in &r.gateway_reads {
        // The token is that of a whole-file PR some (gateway) session was granted in the log ...
        let Some((resource, gateway)) = gateway_tokens.get(&read.token) else {
            return Err(fail(
                read.from_ms,
                format!(
                    "session {} was granted a read of {} from a gateway with token {}, which no entry granted",
                    read.session, read.resource, read.token
                ),
            ));
        };
        if *resource != read.resource {
            return Err(fail(
                read.from_ms,
                format!("gateway token {} is for {resource}, not {}", read.token, read.resource),
            ));
        }
        // ... and while the client used it, no conflicting lock was held by anyone else. A stamp
        // may run up to the largest skew ahead of the sim's time.
        let Some(to) = read.to_ms else { continue };
        for (s, res, rg, m, from, until) in &spans {
            if s != gateway
                && *res == read.resource
                && rg.overlaps(read.range)
                && !m.compatible(Mode::PR)
                && *from < to
                && until.saturating_sub(SKEW_MS_MAX) > read.from_ms
            {
                return Err(fail(
                    read.from_ms,
                    format!(
                        "session {} read {} {} from a gateway over {}..{} ms while session {} held {m} {rg} over {from}..{until} ms",
                        read.session, read.resource, read.range, read.from_ms, to, s.0
                    ),
                ));
            }
        }
        report.gateway_reads += 1;
    }
    if let Some(s) = r.stuck.first() {
        return Err(fail(0, s.clone()));
    }
    report.client_grants = r.told.len() as u64;
    report.epochs = epochs.len() as u64;
    report.digest = digest ^ r.client_digest;
    Ok(report)
}

fn elapsed_ms() -> u64 {
    turmoil::sim_elapsed().unwrap_or_default().as_millis() as u64
}

/// One client: sessions, locks on a few small ranges of a few files, short holds, and now and
/// then a pause past its lease while it holds a lock.
async fn client_loop(
    me: usize,
    rng: &mut Rng,
    servers: &[String],
    record: &Arc<Mutex<Record>>,
    cfg: &ClusterConfig,
    end_ms: u64,
) {
    let note = |what: String| {
        let mut r = record.lock().expect("record");
        r.client_digest = fnv(r.client_digest.rotate_left(3), &what);
    };
    let stuck = |what: String| record.lock().expect("record").stuck.push(format!("client {me}: {what}"));
    // What the client believes of its lease, for the checker.
    let believe = |s: &Session| {
        let left = s.lease_left().as_millis() as u64;
        if left == 0 {
            return; // The client knows its lease is gone.
        }
        let until = elapsed_ms() + left;
        let mut r = record.lock().expect("record");
        let belief = r.lease_beliefs.entry(s.id()).or_insert(0);
        *belief = (*belief).max(until);
    };
    // After the faults stop: time for the cluster to settle, then every request must complete
    // within this bound.
    let settle_ms = cfg.fault_ms + 3 * cfg.lease_ms + 1_000;
    let bound = Duration::from_millis(4 * cfg.lease_ms + 2_000);
    let mut session: Option<Session> = None;
    tokio::time::sleep(Duration::from_millis(200 + rng.below(300))).await;
    while elapsed_ms() < end_ms {
        let started = elapsed_ms();
        let strict = started >= settle_ms;
        let s = match &session {
            Some(s) => s.clone(),
            None => match tokio::time::timeout(bound, Session::open_with(servers, cfg.lease_ms, connector())).await {
                Ok(Ok(s)) => {
                    note(format!("open {}", s.id()));
                    session = Some(s.clone());
                    s
                }
                Ok(Err(e)) => {
                    if strict {
                        stuck(format!("cannot open a session {} ms after the faults stopped: {e}", started));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(_) => {
                    if strict {
                        stuck(format!("opening a session took over {bound:?} after the faults stopped"));
                    }
                    continue;
                }
            },
        };
        let resource = format!("/sim/{}", rng.below(cfg.resources as u64));
        let start = rng.below(12);
        let range = if rng.chance(20) { 0..u64::MAX } else { start..start + 1 + rng.below(6) };
        let mode = [Mode::CR, Mode::PR, Mode::PW, Mode::EX][rng.below(4) as usize];
        let options = LockOptions {
            nowait: rng.chance(15),
            timeout: Some(Duration::from_millis(300 + rng.below(2 * cfg.lease_ms))),
            // Under the gateway's negative control every read goes through a gateway.
            gateway: rng.chance(50) || cfg.break_gateway,
        };
        let mut events = s.events();
        let outcome = tokio::time::timeout(bound, s.lock(&resource, range.clone(), mode, options)).await;
        believe(&s);
        match outcome {
            Ok(Ok(g)) => {
                let from_ms = elapsed_ms();
                if !g.via_gateway {
                    let mut r = record.lock().expect("record");
                    r.told.push((s.id(), g.lock, g.token));
                }
                note(format!("grant {} {} {}", s.id(), g.lock, g.token));
                if !strict && rng.chance(4) {
                    // A pause past the lease while holding (a GC pause, a frozen VM).
                    let ms = cfg.lease_ms + 200 + rng.below(cfg.lease_ms);
                    record.lock().expect("record").pause_requests.push((me, ms));
                }
                // Under the gateway's negative control, reads from a gateway are held longer, so
                // a writer's revoke finds readers on the lock often enough to be caught (with
                // short reads one seed in forty was). Other runs draw as before.
                let hold_ms = if cfg.break_gateway && g.via_gateway { 150 + rng.below(300) } else { 5 + rng.below(80) };
                tokio::time::sleep(Duration::from_millis(hold_ms)).await;
                let to_ms = elapsed_ms();
                believe(&s);
                let unlocked = tokio::time::timeout(bound, s.unlock(g.lock)).await;
                believe(&s);
                if g.via_gateway {
                    // Held until unlock was called, unless it was lost (then the gateway, not
                    // the client, knows when it ended) or the session expired meanwhile.
                    let mut lost = !matches!(unlocked, Ok(Ok(())));
                    while let Ok(ev) = events.try_recv() {
                        lost |= matches!(ev, client::Event::Lost { lock, .. } if lock == g.lock);
                    }
                    let read = GatewayRead {
                        session: s.id(),
                        resource: resource.clone(),
                        range: ByteRange::new(range.start, range.end).expect("a valid range"),
                        token: g.token,
                        from_ms,
                        to_ms: (!lost).then_some(to_ms),
                    };
                    note(format!("gateway read {} {} {} lost={lost}", s.id(), g.lock, g.token));
                    record.lock().expect("record").gateway_reads.push(read);
                }
                match unlocked {
                    Ok(Ok(())) => {}
                    Ok(Err(ClientError::Expired | ClientError::Closed)) => session = None,
                    Ok(Err(e)) => note(format!("unlock {e}")),
                    Err(_) if strict => stuck(format!("unlock took over {bound:?} after the faults stopped")),
                    Err(_) => session = None,
                }
            }
            Ok(Err(ClientError::Expired | ClientError::Closed | ClientError::Unreachable(_))) => {
                if strict {
                    stuck(format!("lock failed {started} ms in, after the faults stopped: session lost"));
                }
                session = None;
            }
            Ok(Err(e)) => note(format!("refused {e}")),
            Err(_) => {
                if strict {
                    stuck(format!("lock {resource} {range:?} {mode} pending over {bound:?} after the faults stopped"));
                }
                session = None;
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.below(40))).await;
    }
    if let Some(s) = session {
        let _ = tokio::time::timeout(Duration::from_secs(2), s.close()).await;
    }
}
