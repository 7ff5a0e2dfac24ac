//! `stripelock`: one binary for servers, clients, debugging and benchmarks.

mod bench;
mod bench_crash;
mod bench_io;
mod bench_lease;
mod bench_parity;
mod bench_scale;
mod certscmd;
mod cluster;
mod faults;
mod faults_history;
mod faults_net;
mod faults_worker;
mod files;
mod flood;
mod mountcmd;
mod mountstats;
mod pidlock;
mod refusal;
mod replay;
mod servercmd;
mod size;
mod tiercmd;
mod tokens;
mod topcmd;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "stripelock", version, about = "A clustered file store built around a distributed lock manager")]
struct Cli {
    /// Talk to the cluster over mutual TLS with the certificates in this directory (its CA,
    /// and NAME.pem/NAME.key, NAME from STRIPELOCK_TLS_NAME, default `client`). Without it, a
    /// cluster found through ./stripelock-data/cluster uses ./stripelock-data/tls if present.
    #[arg(long, global = true, env = "STRIPELOCK_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process; `server`'s many flags make its variant the large one.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run a local cluster of N servers on 127.0.0.1 until Ctrl-C.
    Up {
        #[arg(long, default_value_t = 3)]
        servers: u32,
        /// Data directory; the cluster's addresses are written to DIR/cluster.
        #[arg(long, default_value = cluster::DEFAULT_DATA)]
        data: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Run one server. Settings come from flags, or from a TOML file (--config) whose keys are
    /// the flags' names with underscores; a flag given overrides the file.
    Server {
        /// A TOML file of settings (see docs/formats.md).
        #[arg(long)]
        config: Option<PathBuf>,
        /// This server's id (1, 2, ...), as in --peers.
        #[arg(long)]
        id: Option<u64>,
        /// Every server of the cluster: ID=HOST:PORT,... (this one included).
        #[arg(long)]
        peers: Option<String>,
        /// Where the Raft log and snapshots live.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Address to listen on (default: this server's address in --peers).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Initialize a new cluster from this server (membership and the token secret).
        #[arg(long)]
        bootstrap: bool,
        /// Raft heartbeat interval in ms (default 100); elections time out after 3 to 6.
        #[arg(long)]
        heartbeat_ms: Option<u64>,
        /// How often the leader writes time into the log, in ms (default 200), so leases expire
        /// without traffic.
        #[arg(long)]
        tick_ms: Option<u64>,
        /// Snapshot the state every N log entries (default 5000) and purge the log behind it.
        #[arg(long, value_parser = clap::value_parser!(u64).range(10..=10_000_000))]
        snapshot_every: Option<u64>,
        /// Lease of this server's gateway session in ms (default 10000): how long the shared read
        /// locks it grants from its cache outlive it if it dies.
        #[arg(long)]
        gateway_lease_ms: Option<u64>,
        /// The largest file a put or a write through this server may make, in bytes (default
        /// 17592186044416, 16 TiB).
        #[arg(long)]
        file_bytes_max: Option<u64>,
        /// How long the units of a removed file are kept before they are collected, in ms
        /// (default 60000; 0 keeps them).
        #[arg(long)]
        orphan_grace_ms: Option<u64>,
        /// Shortest session lease a client may ask for, in ms (default 500); shorter is refused.
        #[arg(long)]
        lease_min_ms: Option<u64>,
        /// Longest session lease a client may ask for, in ms (default 600000, ten minutes); longer
        /// is refused, so a dead holder's locks come back within it (or at `stripelock evict`).
        #[arg(long)]
        lease_max_ms: Option<u64>,
        /// Lock memory this server means to use at most, e.g. 512MiB (default 1GiB): near it,
        /// holders are asked to keep fewer idle cached locks (their LRU shrinks).
        #[arg(long)]
        lock_memory_budget: Option<String>,
        /// How fast this server, while it leads, rebuilds units written while their servers
        /// were down, once they are back (resync), e.g. `100MiB` (per second; default 256MiB,
        /// `0` for no limit).
        #[arg(long)]
        resync_rate: Option<String>,
        /// How this server keeps units on its disk: `segments` (default: append-only segment
        /// files with group commit and a redb index, in DATA/volume) or `files` (one file per
        /// unit in DATA/units; slower, each unit a file to look at).
        #[arg(long, value_parser = ["segments", "files"])]
        chunk_store: Option<String>,
        /// The secondary tier: a directory every server reaches (default: `tier` beside --data,
        /// shared by the servers of `up`), or s3://BUCKET (a build with `--features s3`; the
        /// credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY).
        #[arg(long)]
        tier: Option<String>,
        /// An S3 tier's endpoint, for an S3-protocol server other than AWS's (http://host:port).
        #[arg(long)]
        tier_endpoint: Option<String>,
        /// An S3 tier's region (default us-east-1).
        #[arg(long)]
        tier_region: Option<String>,
        /// After a read of a file on the secondary tier, stripe the whole file again in the
        /// background (default true; the read itself fetches only what it asks for).
        #[arg(long)]
        recall_on_read: Option<bool>,
        /// Run the migration policy in this server while it leads the cluster, e.g.
        /// `older-than=30d,larger-than=1MiB,under=/archive,every=1h` (as `tier run` does).
        #[arg(long)]
        tier_policy: Option<String>,
        /// Serve Prometheus metrics (/metrics) and the status page (/) on this address, e.g.
        /// 127.0.0.1:9100 (default: none); over HTTPS with the server's certificate when the
        /// server has TLS.
        #[arg(long)]
        http: Option<std::net::SocketAddr>,
        /// With TLS, who may use the HTTP port: `certified` (clients presenting a certificate of
        /// the cluster's CA: mutual TLS, the default) or `any` (any client over TLS, such as a
        /// browser; `up` uses it for its loopback cluster).
        #[arg(long, value_parser = ["certified", "any"])]
        http_clients: Option<String>,
        /// What each client identity (its certificate's name; `anonymous` without TLS) may use:
        /// e.g. sessions=100,locks=100000,waiters=1000,rps=5000,bytes=10GiB (open sessions in the
        /// cluster; locks held or waiting, of those waiting, and lock requests per second on this
        /// server; bytes of the files it created, cluster-wide). Default: no limit.
        #[arg(long)]
        quota: Option<String>,
        /// Serve plain HTTP/2 without TLS: anyone who reaches the port may use it. Without it a
        /// server needs --tls-dir DIR (its CA and `server` certificate, from `certs init`).
        #[arg(long)]
        insecure: bool,
        /// Tests only (a negative control): carry out stripe writes whose lock is gone.
        #[arg(long, hide = true)]
        break_stale_write_check_for_negative_control: bool,
        /// Tests only (a negative control): send no invalidations for write locks.
        #[arg(long, hide = true)]
        break_invalidate_for_negative_control: bool,
    },
    /// Hold a lock while a command runs, like flock(1). The command sees STRIPELOCK_TOKEN; it
    /// runs in its own process group and dies with this process. Exit: the command's status,
    /// or 121 lock lost while it ran, 124 lock not available, 125 this command failed, 126
    /// command cannot run, 127 command not found, 128+N stopped by signal N.
    Lock(cluster::LockArgs),
    /// The lock table: holders, waiters, tokens, and the wait-for graph.
    Locks {
        /// Only resources whose name starts with this.
        #[arg(default_value = "")]
        prefix: String,
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// End sessions as if their leases had run out: their locks are fenced, then go to whoever
    /// waits (like `etcdctl lease revoke`). For a holder that is gone or stuck.
    Evict {
        /// Session numbers (see `stripelock locks`).
        sessions: Vec<u64>,
        /// Evict every session holding a lock on this path (breaks the lock).
        #[arg(long)]
        holders: Option<String>,
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Servers, leader, term, commit index, sessions and lock counts.
    Status {
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Tools for looking inside the lock engine.
    Debug {
        #[command(subcommand)]
        command: DebugCommand,
    },
    /// The cluster's certificates for mutual TLS: a CA, and certificates it signs.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Fencing tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// The secondary tier (seed 001): see also `migrate` and `recall`.
    Tier {
        #[command(subcommand)]
        command: TierCommand,
    },
    /// Store a local file in the cluster, striped with parity (takes EX on PATH).
    Put {
        /// The local file.
        local: PathBuf,
        /// Its path in the cluster (starts with /).
        path: String,
        /// Stripe unit, e.g. 64KiB or 1MiB (default 1MiB).
        #[arg(long)]
        stripe_unit: Option<String>,
        /// Data units per row (default: servers minus parity, at most 8).
        #[arg(long)]
        data: Option<u8>,
        /// Parity units per row: 0 none, 1 XOR, 2 P+Q (default 1, or 2 from six servers on).
        #[arg(long)]
        parity: Option<u8>,
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Copy a file of the cluster to a local file (rebuilding from parity what cannot be read).
    Get {
        path: String,
        local: PathBuf,
        /// Read without taking a lock: each server serves only bytes no one holds a write lock
        /// on (it remembers which are free until the leader says otherwise).
        #[arg(long)]
        no_lock: bool,
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Print a file of the cluster (or bytes A..B of it).
    Cat {
        path: String,
        /// Bytes A..B (end exclusive; `A..` to the end).
        #[arg(long)]
        range: Option<String>,
        /// Read without taking a lock (see `get --no-lock`).
        #[arg(long)]
        no_lock: bool,
        #[arg(long)]
        cluster: Option<String>,
    },
    /// Write standard input at byte N of a file of the cluster, under PW on just those bytes
    /// (each stripe row touched is read-modify-written under its stripe lock).
    Write {
        path: String,
        /// Where in the file the bytes go; past the end grows the file.
        #[arg(long)]
        offset: u64,
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// A file's size, layout and where each unit of its rows lives.
    Stat {
        path: String,
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Mount the cluster's namespace on DIR with FUSE (root; until Ctrl-C, SIGTERM or umount).
    Mount {
        dir: PathBuf,
        /// Attach to this server (its id in `status`); else the first of the cluster that answers.
        #[arg(long)]
        server: Option<u64>,
        /// The longest an F_SETLKW waits: past it the cluster ends the wait and the call fails
        /// with ENOLCK (e.g. `10m`). Default: no limit, as POSIX has it; the wait still ends
        /// with EINTR on a signal, and with the mount's session.
        #[arg(long, value_parser = humantime::parse_duration)]
        lock_wait_max: Option<std::time::Duration>,
        /// Reads never move a file's atime. By default a read moves it as Linux's relatime
        /// does: when it is older than the mtime or ctime, or a day old.
        #[arg(long)]
        noatime: bool,
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// The cluster at a glance, redrawn every --interval: each server's health and the leader,
    /// the busiest resources, who waits for whom (the status page, for a terminal).
    Top {
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
        /// One screen, then exit.
        #[arg(long)]
        once: bool,
        /// Resources and edges shown.
        #[arg(long, default_value_t = 10)]
        rows: usize,
        #[arg(long)]
        cluster: Option<String>,
        /// The status page's data, once, as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move files to the secondary tier (seed 001): each file's bytes go to one object, the file
    /// stays in the namespace as a stub that reads transparently, its stripe units are freed.
    /// With --older-than instead of paths, the policy picks them: files neither read nor
    /// written for that long (e.g. `30d`), coldest first.
    Migrate {
        #[arg(required_unless_present = "older_than")]
        paths: Vec<String>,
        /// Migrate the files unused (atime and mtime) for at least this long, e.g. `30d`, `2h`.
        #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "paths")]
        older_than: Option<std::time::Duration>,
        /// With --older-than: only files larger than this, e.g. `1MiB`.
        #[arg(long, requires = "older_than")]
        larger_than: Option<String>,
        /// With --older-than: only files under this directory.
        #[arg(long, requires = "older_than")]
        under: Option<String>,
        /// With --older-than: at most this many files (default 10000).
        #[arg(long, requires = "older_than")]
        max: Option<usize>,
        /// Print what would be migrated, and migrate nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Stripe files on the secondary tier again (the reverse of `migrate`).
    Recall {
        #[arg(required = true)]
        paths: Vec<String>,
        /// Only the rows holding bytes A..B (end exclusive; `A..` to the end), each under its
        /// stripe lock; the rest stays on the tier. Needs only a read lock on those bytes.
        #[arg(long)]
        range: Option<String>,
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Unmount a `stripelock mount` (plain umount works too).
    Umount { dir: PathBuf },
    /// The entries of directory PATH (files, directories, symlinks), or the files whose path
    /// starts with PATH when it is not a directory; with no PATH, every file.
    Ls {
        #[arg(default_value = "")]
        prefix: String,
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Remove a file and its units (takes EX on PATH).
    Rm {
        path: String,
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Check every unit against its checksums and its row's parity; --repair rewrites what is
    /// damaged from the redundancy left. Exit 1 if anything is (left) wrong, 2 if nothing is
    /// but some units could not be checked (their servers did not answer).
    Scrub {
        /// Only files whose path starts with this.
        #[arg(default_value = "")]
        prefix: String,
        #[arg(long)]
        repair: bool,
        /// At most this much checked a second, e.g. `100MiB` (default: as fast as it goes), so
        /// clients keep the disks.
        #[arg(long)]
        rate: Option<String>,
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Regenerate every unit a lost server held, onto it again (its data replaced) or onto
    /// another server (--onto), then verify each file.
    Rebuild {
        #[arg(long)]
        server: u64,
        #[arg(long)]
        onto: Option<u64>,
        /// At most this much rebuilt a second, e.g. `100MiB` (default: as fast as it goes), so
        /// clients keep the disks.
        #[arg(long)]
        rate: Option<String>,
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Benchmarks that print figures.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Debug, Subcommand)]
enum DebugCommand {
    /// Run lock scenario scripts through the engine and print one trace line per output.
    Replay {
        /// Scenario files (see crates/lockengine/tests/scenarios/ for the format).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Compare each trace with the script's `> ` expectations; exit 1 on any difference.
        #[arg(long, conflicts_with = "bless")]
        check: bool,
        /// Rewrite each script's expectations with the trace it produces now.
        #[arg(long)]
        bless: bool,
        /// Print each command before its trace.
        #[arg(long)]
        echo: bool,
        /// Print one JSON object per file.
        #[arg(long)]
        json: bool,
    },
    /// The writer `bench chunk-crash` kills: overwrites units of a segment store at DIR from
    /// four threads, printing `FILE ROW VERSION` after each put returns, until killed.
    #[command(hide = true)]
    ChunkWriter {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

#[derive(Debug, Subcommand)]
enum TierCommand {
    /// Run the migration policy: the files unused for --older-than (and the other filters)
    /// migrated now, and again every --every until SIGINT or SIGTERM (a server can run the
    /// same with `--tier-policy`).
    Run {
        /// Migrate the files unused (atime and mtime) for at least this long, e.g. `30d`.
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: std::time::Duration,
        /// Only files larger than this, e.g. `1MiB`.
        #[arg(long)]
        larger_than: Option<String>,
        /// Only files under this directory.
        #[arg(long)]
        under: Option<String>,
        /// At most this many files a pass (default 10000).
        #[arg(long)]
        max: Option<usize>,
        /// How long between passes.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        every: std::time::Duration,
        /// One pass, then exit (1 if a file failed).
        #[arg(long)]
        once: bool,
        #[arg(long)]
        cluster: Option<String>,
        /// One JSON object per pass.
        #[arg(long)]
        json: bool,
    },
    /// Delete the tier's objects that no stub names (left by a recall, a removed stub, or a
    /// migration that failed or was refused), once older than --grace.
    Gc {
        /// Keep unnamed objects younger than this (a migration may still be committing one).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        grace: std::time::Duration,
        /// Count what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Make a new CA in DIR, with a `server` and a `client` certificate.
    Init {
        #[arg(long, default_value = "stripelock-data/tls")]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Issue NAME.pem and NAME.key from DIR's CA (a client's name is its identity).
    Issue {
        name: String,
        #[arg(long, default_value = "stripelock-data/tls")]
        dir: PathBuf,
        /// A server's certificate (it names stripelock-server and also acts as a client).
        #[arg(long)]
        server: bool,
        /// Valid for this many days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Tests only: a certificate that expired in 2020.
        #[arg(long, hide = true)]
        expired_for_test: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Check a token's signature against the cluster secret and print what it grants.
    /// Exit 0 valid, 1 signature does not match, 2 not a token or no readable secret.
    Verify {
        /// The token (`slt1.…`); `-` reads it from standard input.
        token: String,
        /// The cluster secret file (64 hex digits).
        #[arg(long)]
        secret_file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// The secondary tier's raw speed, the baseline of `bench/tier.sh`: MIB MiB written to DIR
    /// through object_store (8 MiB parts, blake3 on the way, as a migration does) and read back
    /// 8 MiB at a time (as a recall does), then removed.
    TierRaw {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 1024)]
        mib: u64,
        #[arg(long)]
        json: bool,
    },
    /// Lock+unlock cycles per second and latency against a running cluster.
    Lock {
        /// Client counts to measure, comma-separated.
        #[arg(long, default_value = "1,16,64", value_delimiter = ',')]
        clients: Vec<usize>,
        /// Fill the table with this many granted locks first (held until the end), and report
        /// each server's memory per lock.
        #[arg(long, default_value_t = 0)]
        held: usize,
        /// Then kill the leader (failover: kill -> first grant) and wipe a follower's Raft
        /// database (its catch-up), on a local cluster run by `stripelock up`, which restarts them.
        #[arg(long)]
        disrupt: bool,
        /// Time for each case.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Session lease renewals per second against a running cluster: N sessions, each keeping a
    /// few heartbeats outstanding, spread over the servers.
    Lease {
        /// Sessions renewing at once.
        #[arg(long, default_value_t = 1000)]
        sessions: usize,
        /// Time measured, once every session is open.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// The data path in one run, on a five-server cluster of its own: parity beside memcpy,
    /// striped write and read beside a raw disk write, a read with a server down, a rebuild.
    Io {
        /// MiB to write and read.
        #[arg(long, default_value_t = 256)]
        size: usize,
        /// Where the bench cluster and its raw-write file live (removed afterwards; must not exist).
        #[arg(long, default_value = "stripelock-bench-io")]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// The segment chunk store under kill -9: a writer is killed at random moments KILLS
    /// times; after each, every unit must read back whole at its last acknowledged version (or
    /// the put the kill cut short), never garbage. Exit 1 on any violation.
    ChunkCrash {
        #[arg(long, default_value_t = 50)]
        kills: u64,
        /// Stop after this many seconds even if fewer kills were made.
        #[arg(long, default_value_t = 120)]
        seconds: u64,
        /// Where the volume lives (must not exist; removed afterwards).
        #[arg(long, default_value = "stripelock-chunk-crash")]
        dir: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        json: bool,
    },
    /// Stripe parity throughput (XOR 4+1, P+Q 4+2, update, rebuild) beside a memory copy.
    Parity {
        /// Seconds to spend on each case.
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
        /// Stripe unit size in bytes (a power of two from 512 to 64 MiB).
        #[arg(long, default_value_t = 1 << 20)]
        unit: u32,
        #[arg(long)]
        json: bool,
    },
    /// The fault campaign (run as root; see bench/faults.sh): servers and clients in network
    /// namespaces of their own, a nemesis injecting partitions, packet loss, delay, link loss,
    /// kills, pauses past the lease and a full disk under a mixed workload, then a history
    /// checker, scrub, a leak check and the recovery figures. Exit 0: no violation (with
    /// --negative-control: the checker found violations, as it must with fencing off).
    Faults {
        /// Servers (3 to 5), each in its own network namespace.
        #[arg(long, default_value_t = 5)]
        servers: u64,
        /// Client processes (1 to 8), each in its own network namespace.
        #[arg(long, default_value_t = 3)]
        clients: u64,
        /// How long the nemesis injects faults.
        #[arg(long, default_value_t = 300)]
        seconds: u64,
        /// Seeds the nemesis's choices (which fault, where, how long).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// The workers' session lease.
        #[arg(long, default_value_t = 1_500)]
        lease_ms: u64,
        /// Run every server with fencing switched off; the checker must then find violations.
        #[arg(long)]
        negative_control: bool,
        /// Skip the recovery figures.
        #[arg(long)]
        no_recovery: bool,
        /// Where logs, histories and report.json go (kept on failure or with --keep).
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long)]
        keep: bool,
        #[arg(long)]
        json: bool,
    },
    /// One identity (this process's certificate, STRIPELOCK_TLS_NAME) floods the cluster: opens
    /// --sessions sessions, then sends --requests lock requests over those it got, --in-flight
    /// at once, and counts the answers by code (what a quota refuses shows as `quota`).
    Flood {
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long, default_value_t = 10_000)]
        sessions: u64,
        #[arg(long, default_value_t = 0)]
        requests: u64,
        #[arg(long, default_value_t = 16)]
        in_flight: usize,
        /// Stop after this long, done or not.
        #[arg(long, default_value_t = 120.0)]
        seconds: f64,
        #[arg(long)]
        json: bool,
    },
    /// One client of the fault campaign (started by `bench faults` in its namespace).
    #[command(hide = true)]
    FaultsWorker {
        #[arg(long)]
        id: u64,
        #[arg(long)]
        cluster: String,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        seconds: u64,
        #[arg(long, default_value_t = 1_500)]
        lease_ms: u64,
        #[arg(long, default_value_t = 3)]
        counters: u64,
        #[arg(long, default_value_t = 65_536)]
        file_bytes: u64,
        #[arg(long)]
        hold: Option<String>,
    },
    /// Lock engine throughput, single-threaded, in memory.
    Engine {
        /// Seconds to spend on each case.
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
        #[arg(long)]
        json: bool,
    },
}

/// A bench duration outside 0..=10m, refused with exit code 2.
fn bad_duration(duration: std::time::Duration) -> Option<ExitCode> {
    if duration.is_zero() || duration > std::time::Duration::from_secs(600) {
        eprintln!("error: --duration must be above 0 and at most 10m");
        return Some(ExitCode::from(2));
    }
    None
}

fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == cluster::GUARD_ARG) {
        return cluster::exec_guarded(&argv[2..]);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            let usage = !matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion);
            if usage && argv.get(1).is_some_and(|a| a == "lock") {
                // `lock` keeps 1 and 2 for its command: its own usage errors are 125.
                let _ = e.print();
                return ExitCode::from(cluster::exit::FAILED);
            }
            e.exit();
        }
    };
    if let Some(dir) = &cli.tls_dir {
        cluster::set_tls_dir(dir.clone());
    }
    match cli.command {
        Command::Certs { command: CertsCommand::Init { dir, json } } => report(certscmd::init(&dir, json), json),
        Command::Certs { command: CertsCommand::Issue { name, dir, server, days, expired_for_test, json } } => {
            let how = certscmd::Issue { server, days, expired: expired_for_test };
            report(certscmd::issue(&dir, &name, how, json), json)
        }
        Command::Up { servers, data, json } => report(up::up(servers, &data, json), json),
        Command::Server {
            config,
            id,
            peers,
            data,
            listen,
            bootstrap,
            heartbeat_ms,
            tick_ms,
            snapshot_every,
            gateway_lease_ms,
            file_bytes_max,
            orphan_grace_ms,
            lease_min_ms,
            lease_max_ms,
            lock_memory_budget,
            resync_rate,
            chunk_store,
            tier,
            tier_endpoint,
            tier_region,
            recall_on_read,
            tier_policy,
            http,
            http_clients,
            insecure,
            quota,
            break_stale_write_check_for_negative_control,
            break_invalidate_for_negative_control,
        } => {
            let flags = servercmd::ServerFile {
                id,
                peers,
                data,
                listen,
                bootstrap: bootstrap.then_some(true),
                heartbeat_ms,
                tick_ms,
                snapshot_every,
                gateway_lease_ms,
                file_bytes_max,
                orphan_grace_ms,
                lease_min_ms,
                lease_max_ms,
                lock_memory_budget,
                resync_rate,
                chunk_store,
                tier,
                tier_endpoint,
                tier_region,
                recall_on_read,
                tier_policy,
                http,
                http_clients,
                tls_dir: cli.tls_dir.clone(),
                insecure: insecure.then_some(true),
                quota,
            };
            report(
                servercmd::ServerArgs::resolve(config.as_deref(), flags).and_then(|mut args| {
                    args.break_stale_write_check = break_stale_write_check_for_negative_control;
                    args.break_invalidate = break_invalidate_for_negative_control;
                    servercmd::server(args)
                }),
                false,
            )
        }
        Command::Lock(args) => cluster::lock(args),
        Command::Evict { sessions, holders, cluster, json } => {
            report(cluster::evict(&sessions, holders.as_deref(), cluster.as_deref(), json), json)
        }
        Command::Put { local, path, stripe_unit, data, parity, cluster, json } => {
            report(files::put(files::PutArgs { local, path, stripe_unit, data, parity, cluster, json }), json)
        }
        Command::Get { path, local, no_lock, cluster, json } => {
            report(files::get(&path, Some(&local), None, no_lock, cluster.as_deref(), json), json)
        }
        Command::Cat { path, range, no_lock, cluster } => report(
            range
                .as_deref()
                .map(cluster::parse_range)
                .transpose()
                .and_then(|r| files::get(&path, None, r, no_lock, cluster.as_deref(), false)),
            false,
        ),
        Command::Write { path, offset, cluster, json } => {
            report(files::write(&path, offset, cluster.as_deref(), json), json)
        }
        Command::Stat { path, cluster, json } => report(files::stat(&path, cluster.as_deref(), json), json),
        Command::Mount { dir, server, lock_wait_max, noatime, cluster, json } => {
            report(mountcmd::mount(&dir, cluster.as_deref(), server, lock_wait_max, noatime, json), json)
        }
        Command::Umount { dir } => report(mountcmd::umount(&dir), false),
        Command::Ls { prefix, cluster, json } => report(files::ls(&prefix, cluster.as_deref(), json), json),
        Command::Rm { path, cluster, json } => report(files::rm(&path, cluster.as_deref(), json), json),
        Command::Migrate { paths, older_than, larger_than, under, max, dry_run, cluster, json } => {
            let pick = older_than.map(|d| tiercmd::Pick { older_than: d, larger_than, under, max });
            report(tiercmd::migrate(paths, pick, dry_run, cluster.as_deref(), json), json)
        }
        Command::Top { interval, once, rows, cluster, json } => {
            report(topcmd::top(interval, once, rows, cluster.as_deref(), json), json)
        }
        Command::Recall { paths, range: None, cluster, json } => {
            report(tiercmd::run(tiercmd::Action::Recall, &paths, cluster.as_deref(), json), json)
        }
        Command::Recall { paths, range: Some(range), cluster, json } => report(
            cluster::parse_range(&range).and_then(|r| tiercmd::recall_range(&paths, r, cluster.as_deref(), json)),
            json,
        ),
        Command::Scrub { prefix, repair, rate, cluster, json } => {
            let rate = rate.as_deref().map(size::parse_bytes).transpose();
            report(rate.and_then(|rate| files::scrub(&prefix, repair, rate, cluster.as_deref(), json)), json)
        }
        Command::Rebuild { server, onto, rate, cluster, json } => {
            let rate = rate.as_deref().map(size::parse_bytes).transpose();
            report(rate.and_then(|rate| files::rebuild(server, onto, rate, cluster.as_deref(), json)), json)
        }
        Command::Locks { prefix, cluster, json } => report(cluster::locks(&prefix, cluster.as_deref(), json), json),
        Command::Status { cluster, json } => report(cluster::status(cluster.as_deref(), json), json),
        Command::Debug { command: DebugCommand::Replay { files, check, bless, echo, json } } => {
            replay::run(&files, replay::Mode { check, bless, echo, json })
        }
        Command::Tier {
            command: TierCommand::Run { older_than, larger_than, under, max, every, once, cluster, json },
        } => {
            let pick = tiercmd::Pick { older_than, larger_than, under, max };
            report(tiercmd::run_policy(pick, every, once, cluster.as_deref(), json), json)
        }
        Command::Tier { command: TierCommand::Gc { grace, dry_run, cluster, json } } => {
            report(tiercmd::gc(grace, dry_run, cluster.as_deref(), json), json)
        }
        Command::Token { command: TokenCommand::Verify { token, secret_file, json } } => {
            tokens::verify(&token, &secret_file, json)
        }
        Command::Bench { command: BenchCommand::Lock { clients, duration, cluster, json, held, disrupt } } => {
            if held > 4_000_000 {
                eprintln!("error: --held takes at most 4000000 locks");
                return ExitCode::from(2);
            }
            if clients.is_empty() || clients.iter().any(|c| *c == 0 || *c > 1024) {
                eprintln!("error: --clients takes counts from 1 to 1024");
                return ExitCode::from(2);
            }
            if let Some(bad) = bad_duration(duration) {
                return bad;
            }
            report(
                cluster::cluster_addrs(cluster.as_deref())
                    .and_then(|addrs| bench::lock(addrs, &clients, duration, json, held, disrupt))
                    .map(|()| ExitCode::SUCCESS),
                json,
            )
        }
        Command::Bench { command: BenchCommand::Lease { sessions, duration, cluster, json } } => {
            if sessions == 0 || sessions > 10_000 {
                eprintln!("error: --sessions takes 1 to 10000");
                return ExitCode::from(2);
            }
            if let Some(bad) = bad_duration(duration) {
                return bad;
            }
            report(
                cluster::cluster_addrs(cluster.as_deref())
                    .and_then(|addrs| bench_lease::lease(addrs, sessions, duration, json))
                    .map(|()| ExitCode::SUCCESS),
                json,
            )
        }
        Command::Bench {
            command:
                BenchCommand::Faults {
                    servers,
                    clients,
                    seconds,
                    seed,
                    lease_ms,
                    negative_control,
                    no_recovery,
                    dir,
                    keep,
                    json,
                },
        } => {
            let args = faults::FaultArgs {
                servers,
                clients,
                seconds,
                seed,
                lease_ms,
                negative_control,
                recovery: !no_recovery,
                dir,
                keep,
                json,
            };
            report(faults::run(args), json)
        }
        Command::Bench {
            command: BenchCommand::FaultsWorker { id, cluster, dir, seconds, lease_ms, counters, file_bytes, hold },
        } => {
            let cluster = match cluster::cluster_addrs(Some(&cluster)) {
                Ok(c) => c,
                Err(e) => return report(Err(e), false),
            };
            let args = faults_worker::WorkerArgs { id, cluster, dir, seconds, lease_ms, counters, file_bytes, hold };
            report(faults_worker::run(args), false)
        }
        Command::Bench { command: BenchCommand::Flood { cluster, sessions, requests, in_flight, seconds, json } } => {
            if !(seconds > 0.0 && seconds <= 3600.0) || in_flight == 0 || in_flight > 4096 {
                eprintln!("error: --seconds must be above 0 and at most 3600, --in-flight from 1 to 4096");
                return ExitCode::from(2);
            }
            let cluster = match cluster::cluster_addrs(cluster.as_deref()) {
                Ok(c) => c,
                Err(e) => return report(Err(e), json),
            };
            let args = flood::FloodArgs { cluster, sessions, requests, in_flight, seconds, json };
            report(flood::run(args), json)
        }
        Command::Debug { command: DebugCommand::ChunkWriter { dir, seed } } => {
            report(bench_crash::writer(&dir, seed).map(|()| ExitCode::SUCCESS), false)
        }
        Command::Bench { command: BenchCommand::ChunkCrash { kills, seconds, dir, seed, json } } => {
            report(bench_crash::campaign(kills, seconds, &dir, seed, json), json)
        }
        Command::Bench { command: BenchCommand::Io { size, dir, json } } => {
            report(bench_io::io(size, &dir, json).map(|()| ExitCode::SUCCESS), json)
        }
        Command::Bench { command: BenchCommand::TierRaw { dir, mib, json } } => {
            report(tiercmd::bench_raw(&dir, mib, json), json)
        }
        Command::Bench { command: BenchCommand::Parity { seconds, unit, json } } => {
            if !(seconds > 0.0 && seconds <= 60.0) {
                eprintln!("error: --seconds must be above 0 and at most 60, got {seconds}");
                return ExitCode::from(2);
            }
            if !unit.is_power_of_two() || !(layout::UNIT_MIN..=layout::UNIT_MAX).contains(&unit) {
                eprintln!("error: --unit must be a power of two from 512 to 67108864, got {unit}");
                return ExitCode::from(2);
            }
            bench_parity::parity(std::time::Duration::from_secs_f64(seconds), unit as usize, json);
            ExitCode::SUCCESS
        }
        Command::Bench { command: BenchCommand::Engine { seconds, json } } => {
            if !(seconds > 0.0 && seconds <= 60.0) {
                eprintln!("error: --seconds must be above 0 and at most 60, got {seconds}");
                return ExitCode::from(2);
            }
            bench::engine(std::time::Duration::from_secs_f64(seconds), json);
            ExitCode::SUCCESS
        }
    }
}

/// Prints an error as a sentence (with its causes) and exits with its code: a refusal of the
/// cluster with its code's exit code (README's table) and sentence, anything else 2.
fn report(result: anyhow::Result<ExitCode>, json: bool) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => ExitCode::from(refusal::report(&e, json, "", refusal::exit_code, 2)),
    }
}
