//! Commands that run or talk to a cluster: `server`, `up`, `lock`, `locks`, `status`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use client::{ClientError, LockOptions, Mode, Session};
use lockengine::Limits;
use server::ServerConfig;
use tokio::sync::watch;
use wire::v1 as pb;

/// File in the data directory of `up` that names the cluster's servers.
pub const CLUSTER_FILE: &str = "cluster";
pub const DEFAULT_DATA: &str = "stripelock-data";

/// Where the cluster is: `--cluster`, else `STRIPELOCK_CLUSTER`, else what `up` wrote.
pub fn cluster_addrs(flag: Option<&str>) -> Result<Vec<String>> {
    let text = match flag {
        Some(f) => f.to_string(),
        None => match std::env::var("STRIPELOCK_CLUSTER") {
            Ok(v) if !v.trim().is_empty() => v,
            _ => {
                let path = Path::new(DEFAULT_DATA).join(CLUSTER_FILE);
                std::fs::read_to_string(&path).with_context(|| {
                    format!(
                        "no cluster given: pass --cluster HOST:PORT[,..], set STRIPELOCK_CLUSTER, \
                         or run `stripelock up` in this directory (it writes {})",
                        path.display()
                    )
                })?
            }
        },
    };
    let addrs: Vec<String> =
        text.split([',', '\n', ' ']).map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
    if addrs.is_empty() {
        bail!("the cluster address list is empty");
    }
    Ok(addrs)
}

fn init_logs(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STRIPELOCK_LOG").unwrap_or_else(|_| default.into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// `--peers 1=127.0.0.1:7001,2=...`
pub fn parse_peers(s: &str) -> Result<BTreeMap<u64, String>> {
    let mut peers = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part.split_once('=').with_context(|| format!("peer `{part}` is not ID=HOST:PORT"))?;
        let id: u64 = id.parse().with_context(|| format!("peer id `{id}` is not a number"))?;
        if id == 0 {
            bail!("server ids start at 1");
        }
        addr.parse::<SocketAddr>().with_context(|| format!("peer address `{addr}` is not HOST:PORT"))?;
        peers.insert(id, addr.to_string());
    }
    Ok(peers)
}

pub struct ServerArgs {
    pub id: u64,
    pub listen: Option<SocketAddr>,
    pub data: PathBuf,
    pub peers: String,
    pub bootstrap: bool,
    pub heartbeat_ms: u64,
    pub tick_ms: u64,
    pub snapshot_every: u64,
    pub gateway_lease_ms: u64,
    /// Tests only: see `Env::break_stale_write_check_for_negative_control`.
    pub break_stale_write_check: bool,
}

/// A server's settings as a TOML file holds them (and as flags give them: every one optional).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    pub id: Option<u64>,
    /// `"1=127.0.0.1:7001,2=..."`, as the flag takes it.
    pub peers: Option<String>,
    pub data: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub bootstrap: Option<bool>,
    pub heartbeat_ms: Option<u64>,
    pub tick_ms: Option<u64>,
    pub snapshot_every: Option<u64>,
    pub gateway_lease_ms: Option<u64>,
}

impl ServerArgs {
    /// Flags over the file over the defaults; says which setting is missing or wrong.
    pub fn resolve(file: Option<&Path>, flags: ServerFile) -> Result<ServerArgs> {
        let f = match file {
            None => ServerFile::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("{} is not a valid server config", path.display()))?
            }
        };
        let missing = |key: &str| match file {
            Some(path) => anyhow::anyhow!("no {key}: give --{key} or set `{key}` in {}", path.display()),
            None => anyhow::anyhow!("no {key}: give --{key}, or a config file with --config"),
        };
        let snapshot_every = flags.snapshot_every.or(f.snapshot_every).unwrap_or(5_000);
        if !(10..=10_000_000).contains(&snapshot_every) {
            bail!("snapshot_every must be between 10 and 10000000, not {snapshot_every}");
        }
        let gateway_lease_ms = flags.gateway_lease_ms.or(f.gateway_lease_ms).unwrap_or(10_000);
        if !(server::LEASE_MS_MIN..=server::LEASE_MS_MAX).contains(&gateway_lease_ms) {
            bail!(
                "gateway_lease_ms must be between {} and {}, not {gateway_lease_ms}",
                server::LEASE_MS_MIN,
                server::LEASE_MS_MAX
            );
        }
        let heartbeat_ms = flags.heartbeat_ms.or(f.heartbeat_ms).unwrap_or(100);
        if heartbeat_ms == 0 {
            bail!("heartbeat_ms must be above 0");
        }
        Ok(ServerArgs {
            id: flags.id.or(f.id).ok_or_else(|| missing("id"))?,
            listen: flags.listen.or(f.listen),
            data: flags.data.or(f.data).ok_or_else(|| missing("data"))?,
            peers: flags.peers.or(f.peers).ok_or_else(|| missing("peers"))?,
            bootstrap: flags.bootstrap.or(f.bootstrap).unwrap_or(false),
            heartbeat_ms,
            tick_ms: flags.tick_ms.or(f.tick_ms).unwrap_or(200).max(1),
            snapshot_every,
            gateway_lease_ms,
            break_stale_write_check: false,
        })
    }
}

/// Stops on SIGINT or SIGTERM.
pub(crate) async fn stop_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        let _ = tx.send(true);
    });
    rx
}

pub fn server(args: ServerArgs) -> Result<ExitCode> {
    init_logs("warn,server=info");
    let peers = parse_peers(&args.peers)?;
    let own = peers.get(&args.id).with_context(|| format!("--peers has no entry for this server's id {}", args.id))?;
    let listen = match args.listen {
        Some(l) => l,
        None => own.parse()?,
    };
    // One server per data directory, held until this process ends; the lock file names our pid,
    // so `up` can stop a server started by hand, and a second server can say whose it is.
    std::fs::create_dir_all(&args.data).with_context(|| format!("cannot create {}", args.data.display()))?;
    let _pid_lock = match crate::up::take_pid_lock(&args.data.join(crate::up::SERVER_PID))? {
        Ok(lock) => lock,
        Err(pid) => bail!(
            "{} is in use by another server process{}; stop it, or give another --data directory",
            args.data.display(),
            pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
        ),
    };
    let data_dir = args.data.canonicalize().with_context(|| format!("cannot resolve {}", args.data.display()))?;
    let config = ServerConfig {
        id: args.id,
        listen,
        data_dir,
        peers,
        bootstrap: args.bootstrap,
        heartbeat_ms: args.heartbeat_ms,
        tick_ms: args.tick_ms,
        snapshot_every: args.snapshot_every,
        gateway_lease_ms: args.gateway_lease_ms,
        limits: Limits::default(),
        env: server::Env {
            break_stale_write_check_for_negative_control: args.break_stale_write_check,
            ..server::Env::default()
        },
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let stop = stop_signal().await;
        server::run(config, stop).await
    })
    .context("server failed")?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `A..B`, `A..` or `all`.
pub fn parse_range(s: &str) -> Result<std::ops::Range<u64>> {
    let r = lockengine::script::parse_range(s).with_context(|| format!("range `{s}` is not A..B, A.. or all"))?;
    if r.start >= r.end {
        bail!("range `{s}` is empty or inverted: it needs start < end");
    }
    Ok(r.start..r.end)
}

pub struct LockArgs {
    pub path: String,
    pub range: String,
    pub mode: String,
    pub nowait: bool,
    pub gateway: bool,
    pub timeout: Option<Duration>,
    pub conflict_exit_code: u8,
    pub lease: Duration,
    pub cluster: Option<String>,
    pub command: Vec<String>,
}

/// `lock`: hold a lock while a command runs, like flock(1).
pub fn lock(args: LockArgs) -> Result<ExitCode> {
    let addrs = cluster_addrs(args.cluster.as_deref())?;
    let range = parse_range(&args.range)?;
    let mode = Mode::parse(&args.mode.to_uppercase())
        .with_context(|| format!("mode `{}` is not one of NL CR CW PR PW EX", args.mode))?;
    let Some((program, rest)) = args.command.split_first() else {
        bail!("no command to run: stripelock lock PATH -- COMMAND...")
    };
    if args.gateway && mode != Mode::PR {
        bail!("--gateway serves shared reads only: use it with --mode PR, not {mode}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let session = Session::open(&addrs, args.lease.as_millis() as u64).await?;
        let options = LockOptions { nowait: args.nowait, timeout: args.timeout, gateway: args.gateway };
        let grant = match session.lock(&args.path, range.clone(), mode, options).await {
            Ok(g) => g,
            Err(e @ (ClientError::Busy(_) | ClientError::TimedOut | ClientError::Deadlock)) => {
                eprintln!("stripelock: {} {} on {} is not available: {e}", mode, args.range, args.path);
                if matches!(e, ClientError::TimedOut | ClientError::Deadlock) {
                    // Say who is in the way now, as --nowait does.
                    for line in holders(&addrs, &args.path, session.id()).await {
                        eprintln!("  {line}");
                    }
                }
                session.close().await;
                return Ok(ExitCode::from(args.conflict_exit_code));
            }
            Err(e) => {
                session.close().await;
                return Err(e).context("cannot take the lock");
            }
        };
        // Say so if the lock is lost while the command runs (the session expired, or the server
        // whose cache granted a --gateway read went away).
        let mut events = session.events();
        let (lock_no, path) = (grant.lock, args.path.clone());
        let watcher = tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(client::Event::Expired) => {
                        eprintln!("stripelock: warning: the session expired; the lock on {path} is lost");
                    }
                    Ok(client::Event::Lost { lock, reason }) if lock == lock_no => {
                        eprintln!("stripelock: warning: the lock on {path} is lost: {reason}");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    _ => {}
                }
            }
        });
        let status = tokio::process::Command::new(program)
            .args(rest)
            .env("STRIPELOCK_TOKEN", &grant.signed_token)
            .env("STRIPELOCK_TOKEN_NUMBER", grant.token.to_string())
            .status()
            .await;
        watcher.abort();
        let _ = session.unlock(grant.lock).await;
        session.close().await;
        let status = status.with_context(|| format!("cannot run `{program}`"))?;
        Ok(match status.code() {
            Some(c) => ExitCode::from(c as u8),
            None => ExitCode::from(128),
        })
    })
}

/// Who holds or waits for `path`, other than `me`, one line each.
async fn holders(addrs: &[String], path: &str, me: u64) -> Vec<String> {
    let Ok(mut c) = any_server(addrs).await else { return Vec::new() };
    let Ok(table) = c.table(pb::TableRequest { prefix: path.to_string() }).await else { return Vec::new() };
    table
        .into_inner()
        .resources
        .iter()
        .filter(|r| r.name == path)
        .flat_map(|r| &r.locks)
        .filter(|l| l.session != me)
        .map(|l| {
            if l.granted {
                format!(
                    "session {} holds {} {} (token {})",
                    l.session,
                    mode_name(l.mode),
                    range_text(&l.range),
                    l.token
                )
            } else {
                format!("session {} waits for {} {}", l.session, mode_name(l.wait_mode), range_text(&l.wait_range))
            }
        })
        .collect()
}

async fn locks_client(addr: &str) -> Result<pb::locks_client::LocksClient<tonic::transport::Channel>> {
    let endpoint =
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect_timeout(Duration::from_secs(1));
    Ok(pb::locks_client::LocksClient::new(endpoint.connect().await?))
}

/// The first server of the list that answers.
async fn any_server(addrs: &[String]) -> Result<pb::locks_client::LocksClient<tonic::transport::Channel>> {
    let mut last = None;
    for a in addrs {
        match locks_client(a).await {
            Ok(c) => return Ok(c),
            Err(e) => last = Some(e.context(format!("server {a}"))),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no servers")).context("no server of the cluster answered"))
}

fn mode_name(m: i32) -> &'static str {
    Mode::ALL.get(m as usize).map_or("?", |m| m.name())
}

fn range_text(r: &Option<pb::Range>) -> String {
    r.as_ref().map_or("-".into(), |r| lockengine::ByteRange { start: r.start, end: r.end }.to_string())
}

/// `locks`: holders, waiters, tokens and the wait-for graph.
pub fn locks(prefix: &str, cluster: Option<&str>, json: bool) -> Result<ExitCode> {
    let addrs = cluster_addrs(cluster)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let table = rt.block_on(async {
        let mut c = any_server(&addrs).await?;
        Ok::<_, anyhow::Error>(c.table(pb::TableRequest { prefix: prefix.to_string() }).await?.into_inner())
    })?;
    if json {
        let resources: Vec<_> = table
            .resources
            .iter()
            .map(|r| {
                let locks: Vec<_> = r
                    .locks
                    .iter()
                    .map(|l| {
                        serde_json::json!({
                            "lock": l.lock, "session": l.session,
                            "granted": l.granted.then(|| serde_json::json!({"mode": mode_name(l.mode), "range": range_text(&l.range), "token": l.token})),
                            "waiting": l.waiting.then(|| serde_json::json!({"mode": mode_name(l.wait_mode), "range": range_text(&l.wait_range), "blockers": l.blockers})),
                            "cached": l.cached,
                            "gateway_of": (l.gateway_of != 0).then_some(l.gateway_of),
                        })
                    })
                    .collect();
                serde_json::json!({"resource": r.name, "locks": locks})
            })
            .collect();
        let edges: Vec<_> =
            table.edges.iter().map(|e| serde_json::json!({"waiter": e.waiter, "holder": e.holder})).collect();
        println!("{}", serde_json::json!({"resources": resources, "wait_for": edges}));
        return Ok(ExitCode::SUCCESS);
    }
    if table.resources.is_empty() {
        println!("no locks{}", if prefix.is_empty() { String::new() } else { format!(" under {prefix}") });
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<28} {:<8} {:<6} {:<8} {:<5} {:<24} {:>16}  note",
        "resource", "session", "lock", "state", "mode", "range", "token"
    );
    for r in &table.resources {
        for l in &r.locks {
            if l.granted {
                let note = if l.waiting {
                    format!("converting to {} {}", mode_name(l.wait_mode), range_text(&l.wait_range))
                } else if l.cached {
                    "cached".into()
                } else {
                    String::new()
                };
                let note = if l.gateway_of != 0 {
                    format!("{note}{}gateway of server {}", if note.is_empty() { "" } else { ", " }, l.gateway_of)
                } else {
                    note
                };
                println!(
                    "{:<28} {:<8} {:<6} {:<8} {:<5} {:<24} {:>16}  {note}",
                    r.name,
                    l.session,
                    l.lock,
                    "held",
                    mode_name(l.mode),
                    range_text(&l.range),
                    l.token
                );
            } else {
                let blockers: Vec<String> = l
                    .blockers
                    .iter()
                    .map(|b| {
                        format!("{}/{}", b >> server::CLIENT_LOCK_BITS, server::client_lock_id(lockengine::LockId(*b)))
                    })
                    .collect();
                println!(
                    "{:<28} {:<8} {:<6} {:<8} {:<5} {:<24} {:>16}  behind session/lock {}",
                    r.name,
                    l.session,
                    l.lock,
                    "waiting",
                    mode_name(l.wait_mode),
                    range_text(&l.wait_range),
                    "-",
                    blockers.join(",")
                );
            }
        }
        for p in &r.posix {
            let kind = ["r", "w", "u"].get(p.kind as usize).unwrap_or(&"?");
            let state = if p.granted { "held" } else { "waiting" };
            println!(
                "{:<28} {:<8} {:<6} {:<8} {:<5} {:<24} {:>16}  POSIX owner {}",
                r.name,
                p.session,
                "-",
                state,
                kind,
                range_text(&p.range),
                "-",
                p.owner
            );
        }
    }
    if !table.edges.is_empty() {
        println!("\nwait-for graph:");
        for e in &table.edges {
            println!("  {} -> {}", e.waiter, e.holder);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `status`: every server's view, and which one leads.
pub fn status(cluster: Option<&str>, json: bool) -> Result<ExitCode> {
    let addrs = cluster_addrs(cluster)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let replies: Vec<(String, Result<pb::StatusReply>)> = rt.block_on(async {
        let mut out = Vec::new();
        for a in &addrs {
            let r = async {
                let mut c = locks_client(a).await?;
                Ok::<_, anyhow::Error>(c.status(pb::StatusRequest {}).await?.into_inner())
            }
            .await;
            out.push((a.clone(), r));
        }
        out
    });
    let up = replies.iter().filter(|(_, r)| r.is_ok()).count();
    if json {
        let servers: Vec<_> = replies
            .iter()
            .map(|(a, r)| match r {
                Ok(s) => serde_json::json!({
                    "address": a, "up": true, "id": s.server_id, "leader": s.leader_id, "term": s.term,
                    "commit_index": s.commit_index, "applied_index": s.applied_index, "sessions": s.sessions,
                    "sessions_fencing": s.sessions_fencing, "resources": s.resources, "locks_granted": s.locks_granted,
                    "requests_waiting": s.requests_waiting, "last_token": s.last_token,
                    "log_entries": s.log_entries, "snapshot_index": s.snapshot_index,
                    "pid": s.pid, "data_dir": s.data_dir,
                    "gateway": {
                        "session": s.gateway_session, "files": s.gateway_files, "readers": s.gateway_readers,
                        "grants": s.gateway_grants, "handovers": s.gateway_handovers,
                    },
                    "stripe_writes": {
                        "done": s.stripe_writes, "delegated": s.stripe_writes_delegated,
                        "dropped": s.stripe_writes_dropped, "load": s.stripe_load,
                    },
                    "lock_cache": {
                        "invalidations_received": s.invalidations_received, "lock_free_ranges": s.lock_free_ranges,
                        "invalidations_sent": s.invalidations_sent,
                    },
                    "admission": {
                        "writes_in_flight": s.writes_in_flight, "writes_admitted_max": s.writes_admitted_max,
                        "worst_write_ms": s.worst_write_ms,
                    },
                }),
                Err(e) => serde_json::json!({"address": a, "up": false, "error": format!("{e:#}")}),
            })
            .collect();
        println!("{}", serde_json::json!({"servers": servers, "up": up, "total": addrs.len()}));
    } else {
        println!(
            "{:<4} {:<22} {:<8} {:>5} {:>8} {:>8} {:>8} {:>7} {:>7} {:>7} {:>12} {:>13}",
            "id",
            "address",
            "role",
            "term",
            "commit",
            "applied",
            "sessions",
            "fencing",
            "locks",
            "waiting",
            "cached-reads",
            "stripe-writes"
        );
        for (a, r) in &replies {
            match r {
                Ok(s) => {
                    let role = if s.leader_id == s.server_id { "leader" } else { "follower" };
                    println!(
                        "{:<4} {:<22} {:<8} {:>5} {:>8} {:>8} {:>8} {:>7} {:>7} {:>7} {:>12} {:>13}",
                        s.server_id,
                        a,
                        role,
                        s.term,
                        s.commit_index,
                        s.applied_index,
                        s.sessions,
                        s.sessions_fencing,
                        s.locks_granted,
                        s.requests_waiting,
                        s.gateway_readers,
                        s.stripe_writes
                    );
                }
                Err(e) => println!("{:<4} {:<22} {:<8} {e:#}", "?", a, "DOWN"),
            }
        }
        println!("\n{up} of {} servers answer", addrs.len());
    }
    Ok(if up == 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
}
