//! `stripelock server`: one server of a cluster, its settings from flags over a TOML file over
//! the defaults, checked before anything starts; and the test-only switches it reads from the
//! environment.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use lockengine::Limits;
use server::ServerConfig;

use crate::cluster::{init_logs, stop_signal};

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

/// A server's lock-memory budget unless its config says otherwise: about a million locks.
pub const LOCK_MEMORY_BUDGET_DEFAULT: u64 = 1 << 30;

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
    pub file_bytes_max: u64,
    pub orphan_grace_ms: u64,
    pub lease_min_ms: u64,
    pub lease_max_ms: u64,
    pub lock_memory_budget: u64,
    /// Issue 16: resync's pace, bytes/s (0: no limit).
    pub resync_bytes_per_s: u64,
    pub chunk_store: server::ChunkStoreKind,
    /// The secondary tier (default: the directory `tier` beside the data directory).
    pub tier: Option<tier::Place>,
    /// Seed 001: stripe a stub again in the background once it is read (default true).
    pub recall_on_read: bool,
    /// Seed 001: the migration policy this server runs while it leads.
    pub tier_policy: Option<crate::tiercmd::ServerPolicy>,
    /// Where metrics and the status page are served over HTTP.
    pub http: Option<SocketAddr>,
    /// Mutual TLS (issue 15); `None` only when asked for with `insecure`.
    pub tls: Option<wire::Tls>,
    /// With TLS, who may use the HTTP port.
    pub http_clients: wire::HttpClients,
    /// Each client identity's quota.
    pub quota: server::Quota,
    /// Tests only: see `Env::break_stale_write_check_for_negative_control`.
    pub break_stale_write_check: bool,
    /// Tests only: see `Env::break_invalidate_for_negative_control`.
    pub break_invalidate: bool,
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
    pub file_bytes_max: Option<u64>,
    pub orphan_grace_ms: Option<u64>,
    /// The shortest and longest session lease a client may ask for (default 500 and 600000).
    pub lease_min_ms: Option<u64>,
    pub lease_max_ms: Option<u64>,
    /// Lock memory the server means to use at most: `"512MiB"`, `"2GiB"` (default 1GiB).
    pub lock_memory_budget: Option<String>,
    /// Resync's pace per second while this server leads: `"100MiB"` (default 256MiB; `"0"`
    /// for no limit).
    pub resync_rate: Option<String>,
    /// How units are kept on disk: `"segments"` (default) or `"files"` (one file per unit).
    pub chunk_store: Option<String>,
    /// The secondary tier (seed 001): a directory every server reaches (default: `tier` beside
    /// the data directory, which the servers of `up` share), or `s3://BUCKET`.
    pub tier: Option<String>,
    /// An S3 tier's endpoint, for an S3-protocol server other than AWS's (`http://host:port`).
    pub tier_endpoint: Option<String>,
    /// An S3 tier's region (default us-east-1).
    pub tier_region: Option<String>,
    /// After a read of a stub, stripe the whole file again in the background (default true).
    pub recall_on_read: Option<bool>,
    /// The migration policy this server runs while it leads, as `--tier-policy` takes it:
    /// `"older-than=30d,larger-than=1MiB,under=/archive,every=1h"`.
    pub tier_policy: Option<String>,
    /// Where metrics (`/metrics`) and the status page (`/`) are served over HTTP.
    pub http: Option<SocketAddr>,
    /// With TLS, who may use the HTTP port: `"certified"` (a certificate of the cluster's CA,
    /// the default) or `"any"` (any client, over TLS: a browser on this host).
    pub http_clients: Option<String>,
    /// Mutual TLS with this directory's CA and `server` certificate.
    pub tls_dir: Option<PathBuf>,
    /// Plain HTTP/2 without TLS, said on purpose.
    pub insecure: Option<bool>,
    /// What each client identity may use: `"sessions=100,locks=100000,waiters=1000,rps=5000,bytes=10GiB"`.
    pub quota: Option<String>,
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
        let file_bytes_max = flags.file_bytes_max.or(f.file_bytes_max).unwrap_or(server::FILE_BYTES_MAX_DEFAULT);
        if file_bytes_max == 0 || file_bytes_max == u64::MAX {
            bail!("file_bytes_max must be between 1 and {}, not {file_bytes_max}", u64::MAX - 1);
        }
        let orphan_grace_ms = flags.orphan_grace_ms.or(f.orphan_grace_ms).unwrap_or(server::ORPHAN_GRACE_MS_DEFAULT);
        if orphan_grace_ms != 0 && orphan_grace_ms < 100 {
            bail!("orphan_grace_ms must be 0 (keep orphan units) or at least 100, not {orphan_grace_ms}");
        }
        let lease_min_ms = flags.lease_min_ms.or(f.lease_min_ms).unwrap_or(server::LEASE_MS_MIN);
        let lease_max_ms = flags.lease_max_ms.or(f.lease_max_ms).unwrap_or(server::LEASE_MS_MAX);
        if lease_min_ms < 100 {
            bail!("lease_min_ms must be at least 100 (a session renews every third of its lease), not {lease_min_ms}");
        }
        if lease_max_ms < lease_min_ms || lease_max_ms > 86_400_000 {
            bail!(
                "lease_max_ms must be between lease_min_ms ({lease_min_ms}) and 86400000 (a day), not {lease_max_ms}"
            );
        }
        let lock_memory_budget = match flags.lock_memory_budget.or(f.lock_memory_budget) {
            None => LOCK_MEMORY_BUDGET_DEFAULT,
            Some(text) => crate::size::parse_bytes(&text).context("lock_memory_budget")?,
        };
        if lock_memory_budget < 64 << 10 {
            bail!("lock_memory_budget must be at least 64KiB (64 locks), not {lock_memory_budget} bytes");
        }
        let resync_bytes_per_s = match flags.resync_rate.or(f.resync_rate) {
            None => server::RESYNC_BYTES_PER_S_DEFAULT,
            Some(text) => crate::size::parse_bytes(&text).context("resync_rate")?,
        };
        let heartbeat_ms = flags.heartbeat_ms.or(f.heartbeat_ms).unwrap_or(100);
        if heartbeat_ms == 0 {
            bail!("heartbeat_ms must be above 0");
        }
        let endpoint = flags.tier_endpoint.or(f.tier_endpoint);
        let region = flags.tier_region.or(f.tier_region);
        let tier = match flags.tier.or(f.tier) {
            Some(t) => Some(tier::Place::parse(&t, endpoint, region).map_err(|e| anyhow::anyhow!("tier: {e}"))?),
            None if endpoint.is_some() || region.is_some() => {
                bail!("tier_endpoint and tier_region are for an S3 tier: give --tier s3://BUCKET too")
            }
            None => None,
        };
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
            file_bytes_max,
            orphan_grace_ms,
            lease_min_ms,
            lease_max_ms,
            lock_memory_budget,
            resync_bytes_per_s,
            chunk_store: match flags.chunk_store.or(f.chunk_store) {
                None => server::ChunkStoreKind::default(),
                Some(text) => {
                    text.parse().map_err(|e: server::UnknownChunkStore| anyhow::anyhow!("chunk_store: {e}"))?
                }
            },
            tier,
            recall_on_read: flags.recall_on_read.or(f.recall_on_read).unwrap_or(true),
            http: flags.http.or(f.http),
            http_clients: match flags.http_clients.or(f.http_clients) {
                None => wire::HttpClients::default(),
                Some(text) => {
                    text.parse().map_err(|e: wire::UnknownHttpClients| anyhow::anyhow!("http_clients: {e}"))?
                }
            },
            quota: match flags.quota.or(f.quota) {
                Some(q) => server::Quota::parse(&q)?,
                None => Default::default(),
            },
            tls: match (flags.tls_dir.or(f.tls_dir), flags.insecure.or(f.insecure).unwrap_or(false)) {
                (Some(_), true) => bail!("give tls_dir or insecure, not both"),
                (Some(dir), false) => Some(wire::Tls::from_dir(&dir, "server")?),
                (None, true) => None,
                (None, false) => bail!(
                    "no TLS: give --tls-dir DIR (made by `stripelock certs init --dir DIR`), or --insecure to serve \
                     plain HTTP/2 that anyone who reaches the port may use"
                ),
            },
            tier_policy: flags
                .tier_policy
                .or(f.tier_policy)
                .map(|p| crate::tiercmd::ServerPolicy::parse(&p))
                .transpose()?,
            break_stale_write_check: false,
            break_invalidate: false,
        })
    }
}

/// Tests only (issue 11's negative control): set, the leader acknowledges fences without
/// sending them to storage (`Env::skip_storage_fence_for_negative_control`).
pub const SKIP_STORAGE_FENCE_ENV: &str = "STRIPELOCK_TEST_SKIP_STORAGE_FENCE_FOR_NEGATIVE_CONTROL";
/// Tests only: milliseconds the first stripe write a server carries out is held after its lock
/// check (`Env::hold_first_stripe_write_ms_for_test`).
pub const HOLD_STRIPE_WRITE_ENV: &str = "STRIPELOCK_TEST_HOLD_STRIPE_WRITE_MS";
/// Tests only: while the file this names exists, the server removes it and aborts right after
/// it acknowledged a release as ordered (`Env::crash_after_release_ack_for_test`).
pub const CRASH_AFTER_RELEASE_ACK_ENV: &str = "STRIPELOCK_TEST_CRASH_AFTER_RELEASE_ACK";
/// Tests only (a negative control): set, a server stays relaxed on the migration signal's revoke
/// (`Env::break_signal_for_negative_control`).
pub const BREAK_SIGNAL_ENV: &str = "STRIPELOCK_TEST_BREAK_SIGNAL_FOR_NEGATIVE_CONTROL";
/// Tests only: milliseconds a server holds a migration's stub back once its object is complete
/// (`Env::hold_migrate_commit_ms_for_test`).
pub const HOLD_MIGRATE_COMMIT_ENV: &str = "STRIPELOCK_TEST_HOLD_MIGRATE_COMMIT_MS";

/// Tests only (issue 16's negative control): set, resync clears the marks of degraded writes
/// without rebuilding their units (`Env::break_resync_for_negative_control`).
pub const BREAK_RESYNC_ENV: &str = "STRIPELOCK_TEST_BREAK_RESYNC_FOR_NEGATIVE_CONTROL";

/// A test switch from the environment, if set and not empty; announced, so nobody runs with
/// one unawares.
fn test_switch(name: &str) -> Option<String> {
    let v = std::env::var(name).ok().filter(|v| !v.is_empty())?;
    tracing::warn!("{name}={v} is set: a switch for tests only, never for real use");
    Some(v)
}

pub fn server(args: ServerArgs) -> Result<ExitCode> {
    init_logs("warn,server=info");
    let peers = parse_peers(&args.peers)?;
    let own =
        peers.get(&args.id).with_context(|| format!("--peers has no entry for this server's id {}", args.id))?.clone();
    let listen = match args.listen {
        Some(l) => l,
        None => own.parse()?,
    };
    // One server per data directory, held until this process ends; the lock file names our pid,
    // so `up` can stop a server started by hand, and a second server can say whose it is.
    std::fs::create_dir_all(&args.data).with_context(|| format!("cannot create {}", args.data.display()))?;
    let _pid_lock = match crate::pidlock::take_pid_lock(&args.data.join(crate::pidlock::SERVER_PID))? {
        Ok(lock) => lock,
        Err(pid) => bail!(
            "{} is in use by another server process{}; stop it, or give another --data directory",
            args.data.display(),
            pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
        ),
    };
    let data_dir = args.data.canonicalize().with_context(|| format!("cannot resolve {}", args.data.display()))?;
    match &args.tls {
        // The server's own calls (to peers, its policy) go over TLS as this server.
        Some(tls) => {
            wire::use_tls(tls.clone());
        }
        None => tracing::warn!("serving without TLS (--insecure): anyone who reaches the port may use it"),
    }
    let config = ServerConfig {
        tls: args.tls.clone(),
        http: args.http,
        http_clients: args.http_clients,
        locks: server::LockConfig {
            id: args.id,
            listen,
            data_dir: data_dir.clone(),
            peers,
            bootstrap: args.bootstrap,
            heartbeat_ms: args.heartbeat_ms,
            tick_ms: args.tick_ms,
            snapshot_every: args.snapshot_every,
            gateway_lease_ms: args.gateway_lease_ms,
            lease_min_ms: args.lease_min_ms,
            lease_max_ms: args.lease_max_ms,
            lock_memory_budget: args.lock_memory_budget,
            quota: args.quota,
            limits: Limits::default(),
            env: server::LockEnv {
                break_fresh_lease_for_negative_control: false,
                crash_after_release_ack_for_test: test_switch(CRASH_AFTER_RELEASE_ACK_ENV).map(PathBuf::from),
                ..server::LockEnv::default()
            },
        },
        data: server::DataConfig {
            tier: match &args.tier {
                Some(t) => t.clone(),
                // Beside the data directory: the servers of `up` (and of a test cluster), whose
                // data directories are siblings, share it.
                None => server::TierPlace::Dir(data_dir.parent().unwrap_or(&data_dir).join("tier")),
            },
            migration_signal: true,
            recall_on_read: args.recall_on_read,
            data_dir,
            chunk_store: args.chunk_store,
            tick_ms: args.tick_ms,
            orphan_grace_ms: args.orphan_grace_ms,
            storage_lease_ms: server::STORAGE_LEASE_MS_DEFAULT,
            limits: server::DataLimits {
                file_bytes_max: args.file_bytes_max,
                resync_bytes_per_s: args.resync_bytes_per_s,
                ..server::DataLimits::default()
            },
            env: server::DataEnv {
                break_stale_write_check_for_negative_control: args.break_stale_write_check,
                skip_storage_fence_for_negative_control: test_switch(SKIP_STORAGE_FENCE_ENV).is_some(),
                hold_first_stripe_write_ms_for_test: test_switch(HOLD_STRIPE_WRITE_ENV)
                    .map(|v| v.parse().with_context(|| format!("{HOLD_STRIPE_WRITE_ENV}={v} is not milliseconds")))
                    .transpose()?,
                break_invalidate_for_negative_control: args.break_invalidate,
                break_signal_for_negative_control: test_switch(BREAK_SIGNAL_ENV).is_some(),
                hold_migrate_commit_ms_for_test: test_switch(HOLD_MIGRATE_COMMIT_ENV)
                    .map(|v| v.parse().with_context(|| format!("{HOLD_MIGRATE_COMMIT_ENV}={v} is not milliseconds")))
                    .transpose()?,
                break_resync_for_negative_control: test_switch(BREAK_RESYNC_ENV).is_some(),
                ..server::DataEnv::default()
            },
        },
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let policy = args.tier_policy.clone();
    rt.block_on(async move {
        let stop = stop_signal().await;
        if let Some(policy) = policy {
            tokio::spawn(crate::tiercmd::serve_policy(own, args.id, policy, stop.clone()));
        }
        server::run(config, stop).await
    })
    .context("server failed")?;
    Ok(ExitCode::SUCCESS)
}
