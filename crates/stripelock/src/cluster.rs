//! Commands that talk to a cluster: `lock`, `locks`, `status`, `evict`; what they share.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use client::{ClientError, ErrorCode, LockOptions, Mode, Session};
use lockengine::Limits;
use tokio::sync::watch;
use wire::v1 as pb;

/// File in the data directory of `up` that names the cluster's servers.
pub const CLUSTER_FILE: &str = "cluster";
pub const DEFAULT_DATA: &str = "stripelock-data";

/// Where the cluster is: `--cluster`, else `STRIPELOCK_CLUSTER`, else what `up` wrote.
pub fn cluster_addrs(flag: Option<&str>) -> Result<Vec<String>> {
    let mut from_default = false;
    let text = match flag {
        Some(f) => f.to_string(),
        None => match std::env::var("STRIPELOCK_CLUSTER") {
            Ok(v) if !v.trim().is_empty() => v,
            _ => {
                from_default = true;
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
    for a in &addrs {
        check_addr(a)?;
    }
    // Mutual TLS as the flag (or STRIPELOCK_TLS_DIR) says, or as the `up` directory the
    // addresses came from does.
    let default_tls = Path::new(DEFAULT_DATA).join("tls");
    let dir =
        TLS_DIR.get().cloned().or_else(|| (from_default && default_tls.join("ca.pem").exists()).then_some(default_tls));
    if let Some(dir) = dir {
        let name =
            std::env::var("STRIPELOCK_TLS_NAME").ok().filter(|n| !n.is_empty()).unwrap_or_else(|| "client".into());
        wire::use_tls(wire::Tls::from_dir(&dir, &name)?);
    }
    Ok(addrs)
}

static TLS_DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// `--tls-dir` (or STRIPELOCK_TLS_DIR): the certificates client commands connect with.
pub fn set_tls_dir(dir: std::path::PathBuf) {
    let _ = TLS_DIR.set(dir);
}

/// `HOST:PORT` with a port from 1 to 65535.
fn check_addr(a: &str) -> Result<()> {
    let Some((host, port)) = a.rsplit_once(':') else {
        bail!("cluster address `{a}` has no port: write HOST:PORT, e.g. 127.0.0.1:7001");
    };
    if host.is_empty() {
        bail!("cluster address `{a}` has no host: write HOST:PORT, e.g. 127.0.0.1:7001");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => bail!("cluster address `{a}` has a bad port `{port}`: ports run from 1 to 65535"),
    }
}

pub(crate) fn init_logs(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STRIPELOCK_LOG").unwrap_or_else(|_| default.into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
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

pub(crate) fn free_port() -> Result<u16> {
    Ok(wire::unused_port()?)
}

/// `A..B`, `A..` or `all`; says which number is wrong, and never wraps one that is too large.
pub fn parse_range(s: &str) -> Result<std::ops::Range<u64>> {
    if s == "all" {
        return Ok(0..u64::MAX);
    }
    let Some((a, b)) = s.split_once("..") else {
        bail!("range `{s}` is not A..B, A.. or all (bytes A to B, B excluded)");
    };
    let number = |n: &str| -> Result<u64> {
        if n.is_empty() || !n.bytes().all(|c| c.is_ascii_digit()) {
            bail!("range `{s}`: `{n}` is not a byte offset (digits only)");
        }
        n.parse::<u64>()
            .map_err(|_| anyhow::anyhow!("range `{s}`: {n} is past the largest byte offset, {} (2^64 - 1)", u64::MAX))
    };
    let start = number(a)?;
    let end = if b.is_empty() { u64::MAX } else { number(b)? };
    if start >= end {
        bail!("range `{s}` is empty or inverted: it needs start < end");
    }
    Ok(start..end)
}

/// `lock`'s own exit codes, apart from the command's, as timeout(1) keeps 124–127.
pub mod exit {
    /// The lock was lost while the command ran (the session expired or was evicted, or the
    /// server whose cache granted a `--gateway` read went away); the command was signalled as
    /// `--on-lost` says.
    pub const LOST: u8 = 121;
    /// The lock was not available: held by others with `--nowait`, `--timeout` passed, or the
    /// request would deadlock (`--conflict-exit-code` changes it).
    pub const NOT_AVAILABLE: u8 = 124;
    /// `stripelock lock` itself failed: bad arguments, no server answered, a lease outside the
    /// cluster's bounds.
    pub const FAILED: u8 = 125;
    /// The command was found but could not be run.
    pub const CANNOT_RUN: u8 = 126;
    /// The command was not found.
    pub const NOT_FOUND: u8 = 127;
}

/// What `lock` does to its command when the lock is lost under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnLost {
    /// Say so and let the command run on (it runs without the lock).
    Warn,
    /// SIGTERM to the command's process group, SIGKILL after the grace.
    Term,
    /// SIGKILL to the command's process group at once.
    Kill,
}

/// `stripelock lock`'s arguments.
#[derive(Debug, clap::Args)]
pub struct LockArgs {
    /// The resource (a path).
    pub path: String,
    #[arg(long, default_value = "all")]
    pub range: String,
    /// NL, CR, CW, PR, PW or EX.
    #[arg(long, default_value = "EX")]
    pub mode: String,
    /// Fail at once, saying who holds it, if the lock is taken.
    #[arg(long)]
    pub nowait: bool,
    /// With --mode PR: let the server grant it from its own cached read lock on the whole
    /// file (no log write per reader); the lock then lasts only while that server's lease
    /// does. Not with --nowait (such a read goes to the log).
    #[arg(long)]
    pub gateway: bool,
    /// Give up after this long (e.g. 30s), counting from the start, reaching the cluster
    /// included; 0 means one try, like --nowait.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<std::time::Duration>,
    /// Exit code when the lock is not available.
    #[arg(long, default_value_t = exit::NOT_AVAILABLE)]
    pub conflict_exit_code: u8,
    /// Session lease: the lock is released this long after this process dies (within the
    /// cluster's bounds, by default 500ms to 10m).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub lease: std::time::Duration,
    /// What to do to the command if the lock is lost while it runs (exit 121 in each case).
    #[arg(long, value_enum, default_value = "term")]
    pub on_lost: OnLost,
    /// After SIGTERM (lock lost, or this process told to stop), SIGKILL if the command has
    /// not ended within this.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub grace: std::time::Duration,
    /// Servers HOST:PORT,... (default: STRIPELOCK_CLUSTER, else ./stripelock-data/cluster).
    #[arg(long)]
    pub cluster: Option<String>,
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// A lock path as the engine names resources: absolute, not empty, no NUL.
pub fn check_lock_path(path: &str) -> Result<()> {
    if path.is_empty() {
        bail!("the lock path is empty: give an absolute path such as /jobs/nightly");
    }
    if !path.starts_with('/') {
        bail!("lock path `{path}` is relative: lock paths start with / (try /{path})");
    }
    if path.contains('\0') {
        bail!("lock path `{}` contains a NUL byte", path.escape_debug());
    }
    let max = Limits::default().resource_name_bytes_max;
    if path.len() > max {
        bail!("lock path is {} bytes long; the most is {max}", path.len());
    }
    Ok(())
}

/// The argument that makes `stripelock` the guard of a locked command: it asks the kernel to
/// kill it when its parent (the `lock` client) dies, then becomes the command.
pub const GUARD_ARG: &str = "__exec-guarded";

/// Runs as `stripelock __exec-guarded PARENT_PID PROGRAM ARGS...`: sets PR_SET_PDEATHSIG so the
/// command dies with the `lock` client that holds its lock (even by SIGKILL), then execs it
/// (the death signal survives exec). Exit 127 if the program is not found, 126 if it cannot run.
pub fn exec_guarded(args: &[std::ffi::OsString]) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let parent: Option<i32> = args.first().and_then(|a| a.to_str()).and_then(|a| a.parse().ok());
    let (Some(parent), Some(program)) = (parent, args.get(1)) else {
        eprintln!("stripelock: {GUARD_ARG} is internal to `stripelock lock`: {GUARD_ARG} PARENT_PID PROGRAM [ARGS]");
        return ExitCode::from(exit::FAILED);
    };
    if let Err(e) = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL)) {
        eprintln!("stripelock: cannot tie the command to its lock holder (PR_SET_PDEATHSIG): {e}");
        return ExitCode::from(exit::FAILED);
    }
    // The holder may have died before the line above, and then nothing would kill us.
    if rustix::process::getppid().map(|p| p.as_raw_pid()) != Some(parent) {
        eprintln!("stripelock: the lock holder (pid {parent}) is gone; not running the command");
        return ExitCode::from(exit::LOST);
    }
    let err = std::process::Command::new(program).args(&args[2..]).exec();
    eprintln!("stripelock: cannot run `{}`: {err}", program.to_string_lossy());
    ExitCode::from(if err.kind() == std::io::ErrorKind::NotFound { exit::NOT_FOUND } else { exit::CANNOT_RUN })
}

/// `lock`: hold a lock while a command runs, like flock(1), and stop the command when the lock
/// is lost or this process is told to stop. Its own failures exit 125 (see [`exit`]).
pub fn lock(args: LockArgs) -> ExitCode {
    match lock_and_run(args) {
        Ok(code) => code,
        // Refused for another reason than the lock being taken (busy and deadlock exit
        // NOT_AVAILABLE above): `lock`'s own failure, with the code's sentence.
        Err(e) => {
            ExitCode::from(crate::refusal::report(&e, false, "stripelock lock: ", |_| exit::FAILED, exit::FAILED))
        }
    }
}

/// The command `lock` runs: its pid, and whether it leads a process group of its own.
#[derive(Debug, Clone, Copy)]
struct Cmd {
    pid: Option<u32>,
    own_group: bool,
}

/// Sends `signal` to the command's process group (it and whatever it started), or to the
/// command alone when it shares this process's group (a terminal's foreground job).
fn signal_cmd(cmd: Cmd, signal: rustix::process::Signal) {
    let Some(pid) = cmd.pid.and_then(|p| rustix::process::Pid::from_raw(p as i32)) else { return };
    let _ = if cmd.own_group {
        rustix::process::kill_process_group(pid, signal)
    } else {
        rustix::process::kill_process(pid, signal)
    };
}

fn lock_and_run(args: LockArgs) -> Result<ExitCode> {
    use rustix::process::Signal;
    use tokio::signal::unix::{SignalKind, signal};
    let addrs = cluster_addrs(args.cluster.as_deref())?;
    check_lock_path(&args.path)?;
    let range = parse_range(&args.range)?;
    let mode = Mode::parse(&args.mode.to_uppercase())
        .with_context(|| format!("mode `{}` is not one of NL CR CW PR PW EX", args.mode))?;
    let Some((program, rest)) = args.command.split_first() else {
        bail!("no command to run: stripelock lock PATH -- COMMAND...")
    };
    if args.gateway && mode != Mode::PR {
        bail!("--gateway serves shared reads only: use it with --mode PR, not {mode}");
    }
    // A zero timeout is one try, as with --nowait.
    let nowait = args.nowait || args.timeout.is_some_and(|t| t.is_zero());
    if args.gateway && nowait {
        bail!("--gateway does not take --nowait (or a zero --timeout): such a read goes to the log; drop --gateway");
    }
    let lease_ms = u64::try_from(args.lease.as_millis()).unwrap_or(u64::MAX);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sighup = signal(SignalKind::hangup())?;
        let deadline = args.timeout.filter(|t| !t.is_zero()).map(|t| tokio::time::Instant::now() + t);
        let until_deadline = async move {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let not_available = |why: &str, code: ErrorCode| {
            eprintln!("stripelock: {mode} {} on {} is not available: {why}", args.range, args.path);
            let sentence = crate::refusal::sentence(code);
            eprintln!("stripelock: {code}: {sentence} (exit {})", args.conflict_exit_code);
            ExitCode::from(args.conflict_exit_code)
        };
        // Open the session: within --timeout, and a signal ends the wait.
        let session = tokio::select! {
            s = Session::open(&addrs, lease_ms) => s.context("cannot open a session")?,
            () = until_deadline => {
                return Ok(not_available("timed out while reaching the cluster", ErrorCode::Unavailable));
            }
            _ = sigterm.recv() => return Ok(ExitCode::from(128 + 15)),
            _ = sigint.recv() => return Ok(ExitCode::from(128 + 2)),
            _ = sighup.recv() => return Ok(ExitCode::from(128 + 1)),
        };
        let left = deadline.map(|d| d.saturating_duration_since(tokio::time::Instant::now()));
        let options = LockOptions { nowait, timeout: left, gateway: args.gateway };
        let asked = tokio::select! {
            r = session.lock(&args.path, range.clone(), mode, options) => Ok(r),
            _ = sigterm.recv() => Err(15),
            _ = sigint.recv() => Err(2),
            _ = sighup.recv() => Err(1),
        };
        let grant = match asked {
            Ok(Ok(g)) => g,
            // Held by others, timed out waiting, or a deadlock: the lock is not available.
            Ok(Err(e)) if matches!(e.code(), ErrorCode::Busy | ErrorCode::Deadlock) => {
                let code = not_available(&e.to_string(), e.code());
                if matches!(e, ClientError::TimedOut | ClientError::Deadlock) {
                    // Say who is in the way now, as --nowait does.
                    for line in holders(&addrs, &args.path, session.id()).await {
                        eprintln!("  {line}");
                    }
                }
                bounded(session.close()).await;
                return Ok(code);
            }
            Ok(Err(e)) => {
                bounded(session.close()).await;
                return Err(e).context("cannot take the lock");
            }
            Err(signo) => {
                // Closing cancels the waiting request.
                bounded(session.close()).await;
                return Ok(ExitCode::from(128 + signo));
            }
        };

        // The command runs under the guard, which ties its life to this process's, and in its
        // own process group (so it and what it starts can be stopped together) unless it reads
        // a terminal: a job outside the terminal's foreground group could not read it.
        use std::io::IsTerminal;
        let own_group = !std::io::stdin().is_terminal();
        let exe = std::env::current_exe().context("cannot find the stripelock executable")?;
        let mut command = tokio::process::Command::new(exe);
        command
            .arg(GUARD_ARG)
            .arg(std::process::id().to_string())
            .arg(program)
            .args(rest)
            .env("STRIPELOCK_TOKEN", &grant.signed_token)
            .env("STRIPELOCK_TOKEN_NUMBER", grant.token.to_string());
        if own_group {
            command.process_group(0);
        }
        let mut child = command.spawn().with_context(|| format!("cannot start `{program}`"))?;
        let pgid = Cmd { pid: child.id(), own_group };

        let mut events = session.events();
        let mut check = tokio::time::interval(Duration::from_millis(50));
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut lost = false;
        let mut signalled: Option<u8> = None;
        let mut kill_at: Option<tokio::time::Instant> = None;
        let path = args.path.clone();
        let status = loop {
            let mut lose_now: Option<String> = None;
            let mut stop: Option<(u8, Signal)> = None;
            tokio::select! {
                st = child.wait() => break st,
                ev = events.recv() => match ev {
                    Ok(client::Event::Expired) => {
                        lose_now = Some("the session expired (its lease ran out, or an operator evicted it)".into());
                    }
                    Ok(client::Event::Lost { lock, reason }) if lock == grant.lock => lose_now = Some(reason),
                    _ => {}
                },
                _ = check.tick() => {
                    if session.lease_left().is_zero() {
                        lose_now = Some(format!(
                            "no renewal of the session's {} lease was acknowledged in time (this process was \
                             paused, or the cluster did not answer)",
                            humantime::format_duration(args.lease)
                        ));
                    }
                    if kill_at.is_some_and(|t| tokio::time::Instant::now() >= t) {
                        kill_at = None;
                        eprintln!("stripelock: `{program}` did not stop within {}; killing it", humantime::format_duration(args.grace));
                        signal_cmd(pgid, Signal::KILL);
                    }
                }
                _ = sigterm.recv() => stop = Some((15, Signal::TERM)),
                _ = sigint.recv() => stop = Some((2, Signal::INT)),
                _ = sighup.recv() => stop = Some((1, Signal::HUP)),
            }
            if let Some(why) = lose_now
                && !lost
            {
                lost = true;
                eprintln!("stripelock: the lock on {path} is lost: {why}");
                match args.on_lost {
                    OnLost::Warn => eprintln!("stripelock: --on-lost warn: `{program}` runs on without the lock"),
                    OnLost::Term => {
                        eprintln!(
                            "stripelock: stopping `{program}` (SIGTERM, SIGKILL after {})",
                            humantime::format_duration(args.grace)
                        );
                        signal_cmd(pgid, Signal::TERM);
                        kill_at.get_or_insert(tokio::time::Instant::now() + args.grace);
                    }
                    OnLost::Kill => {
                        eprintln!("stripelock: killing `{program}`");
                        signal_cmd(pgid, Signal::KILL);
                    }
                }
            }
            if let Some((signo, sig)) = stop {
                if signalled.is_some() {
                    // Asked twice: no more grace.
                    signal_cmd(pgid, Signal::KILL);
                } else {
                    signalled = Some(signo);
                    signal_cmd(pgid, sig);
                    kill_at.get_or_insert(tokio::time::Instant::now() + args.grace);
                }
            }
        };
        // The command is over: now the lock can go (at once, not after the lease).
        if !lost {
            let _ = bounded(session.unlock(grant.lock)).await;
        }
        bounded(session.close()).await;
        let status = status.with_context(|| format!("cannot wait for `{program}`"))?;
        if let Some(signo) = signalled {
            return Ok(ExitCode::from(128 + signo));
        }
        if lost {
            return Ok(ExitCode::from(exit::LOST));
        }
        use std::os::unix::process::ExitStatusExt;
        Ok(match (status.code(), status.signal()) {
            (Some(c), _) => ExitCode::from(c as u8),
            (None, Some(sig)) => ExitCode::from(128u8.saturating_add(sig as u8)),
            (None, None) => ExitCode::from(exit::FAILED),
        })
    })
}

/// Runs a cleanup step for at most 3 s: a process asked to stop must not hang on the cluster.
async fn bounded<T>(f: impl std::future::Future<Output = T>) -> Option<T> {
    tokio::time::timeout(Duration::from_secs(3), f).await.ok()
}

/// Who holds or waits for `path`, other than `me`, one line each.
async fn holders(addrs: &[String], path: &str, me: u64) -> Vec<String> {
    let Ok(table) = table_any(addrs, path).await else { return Vec::new() };
    table
        .resources
        .iter()
        .filter(|r| r.name == path)
        .flat_map(|r| &r.locks)
        .filter(|l| l.session != me)
        .map(|l| {
            let who = if l.client.is_empty() {
                format!("session {}", l.session)
            } else {
                format!("session {} ({})", l.session, l.client)
            };
            if l.granted {
                format!("{who} holds {} {} (token {})", mode_name(l.mode), range_text(&l.range), l.token)
            } else {
                format!("{who} waits for {} {}", mode_name(l.wait_mode), range_text(&l.wait_range))
            }
        })
        .collect()
}

/// How long one server gets to answer a read of its table or status: a server that accepts
/// connections but does not answer (paused, overloaded) is passed over after this.
const READ_DEADLINE: Duration = Duration::from_millis(1500);

async fn locks_client(addr: &str) -> Result<pb::locks_client::LocksClient<tonic::transport::Channel>> {
    let endpoint = wire::endpoint(addr)?.connect_timeout(Duration::from_secs(1));
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| ClientError::Unreachable(format!("server {addr}: {}", transport_text(&e))))?;
    Ok(pb::locks_client::LocksClient::new(channel))
}

/// A refused call as an error whose code the CLI reports (see `refusal`).
pub(crate) fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::Error::new(ClientError::from_status(&s))
}

/// A transport error and its causes, each said once.
pub(crate) fn transport_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    parts.join(": ")
}

/// Runs one read against `addr` within [`READ_DEADLINE`], connection included.
async fn within_deadline<T>(addr: &str, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    match tokio::time::timeout(READ_DEADLINE, f).await {
        // A TLS mismatch is said as one.
        Ok(Err(e)) if wire::tls_hint(transport_text(e.as_ref())) != transport_text(e.as_ref()) => {
            Err(anyhow::Error::new(ClientError::Unreachable(format!(
                "server {addr}: {}",
                wire::tls_hint(transport_text(e.as_ref()))
            ))))
        }
        // A server that did not answer names itself; a refusal is said to come from it.
        Ok(Err(e)) if matches!(e.downcast_ref::<ClientError>(), Some(ClientError::Unreachable(_))) => Err(e),
        Ok(r) => r.with_context(|| format!("server {addr}")),
        Err(_) => Err(anyhow::Error::new(ClientError::Unreachable(format!(
            "server {addr}: no answer within {} ms (it accepts connections but does not answer: paused or overloaded?)",
            READ_DEADLINE.as_millis()
        )))),
    }
}

async fn table_from(addr: &str, prefix: &str) -> Result<pb::TableReply> {
    within_deadline(addr, async {
        let mut c = locks_client(addr).await?;
        Ok(c.table(pb::TableRequest { prefix: prefix.to_string() }).await.map_err(status_error)?.into_inner())
    })
    .await
}

pub async fn status_from(addr: &str) -> Result<pb::StatusReply> {
    within_deadline(addr, async {
        let mut c = locks_client(addr).await?;
        Ok(c.status(pb::StatusRequest {}).await.map_err(status_error)?.into_inner())
    })
    .await
}

/// The lock table from whichever server answers first (every server applies the same log).
pub(crate) async fn table_any(addrs: &[String], prefix: &str) -> Result<pb::TableReply> {
    let asks = addrs.iter().map(|a| Box::pin(table_from(a, prefix)));
    match futures::future::select_ok(asks).await {
        Ok((table, _)) => Ok(table),
        Err(last) => Err(last.context("no server of the cluster answered")),
    }
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
    let table = rt.block_on(table_any(&addrs, prefix))?;
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
                            "client": (!l.client.is_empty()).then_some(&l.client),
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
                let note = if l.client.is_empty() {
                    note
                } else {
                    format!("{note}{}{}", if note.is_empty() { "" } else { ", " }, l.client)
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
    // Every server at once, each within its deadline: a hung one costs no more than that.
    let replies: Vec<(String, Result<pb::StatusReply>)> = rt.block_on(async {
        let asks = addrs.iter().map(|a| async move { (a.clone(), status_from(a).await) });
        futures::future::join_all(asks).await
    });
    let up = replies.iter().filter(|(_, r)| r.is_ok()).count();
    let local = crate::mountstats::local_mounts();
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
                    "file_bytes_max": s.file_bytes_max,
                    "pid": s.pid, "data_dir": s.data_dir, "rejoining": s.rejoining,
                    "gateway": {
                        "session": s.gateway_session, "files": s.gateway_files, "readers": s.gateway_readers,
                        "grants": s.gateway_grants, "handovers": s.gateway_handovers,
                    },
                    "stripe_writes": {
                        "done": s.stripe_writes, "delegated": s.stripe_writes_delegated,
                        "dropped": s.stripe_writes_dropped, "load": s.stripe_load,
                    },
                    "tier": {
                        "bytes_read": s.tier_bytes_read, "migrated": s.files_migrated, "recalled": s.files_recalled,
                        "bytes_recalled": s.tier_bytes_recalled, "rows_recalled": s.tier_rows_recalled,
                        "metadata_mode": if s.metadata_relaxed { "relaxed" } else { "strict" },
                        "metadata_round_trips": s.metadata_round_trips,
                    },
                    "resync": {
                        "stale_rows": s.stale_rows, "wiped_servers": s.wiped_servers,
                        "rows_done": s.resync_rows_done, "bytes": s.resync_bytes,
                        "rows_failed": s.resync_rows_failed, "rate_bytes_per_s": s.resync_rate,
                        "eta_ms": s.resync_eta_ms,
                    },
                    "lock_cache": {
                        "invalidations_received": s.invalidations_received, "lock_free_ranges": s.lock_free_ranges,
                        "invalidations_sent": s.invalidations_sent,
                    },
                    "admission": {
                        "writes_in_flight": s.writes_in_flight, "writes_admitted_max": s.writes_admitted_max,
                        "worst_write_ms": s.worst_write_ms,
                    },
                    "lock_memory": {
                        "budget": s.lock_memory_budget, "used": s.lock_memory_used, "lru_size": s.lru_size,
                    },
                    "last_snapshot": {
                        "bytes": s.snapshot_bytes, "locks": s.snapshot_locks,
                        "build_ms": s.snapshot_build_ms, "restore_ms": s.snapshot_restore_ms,
                    },
                    "mounts": s.mounts.iter().map(|m| mount_json(m, &local)).collect::<Vec<_>>(),
                    "stored": s.stored.iter().map(|i| serde_json::json!({"identity": i.identity, "bytes": i.bytes}))
                        .collect::<Vec<_>>(),
                    "bytes_quota": (s.bytes_quota > 0).then_some(s.bytes_quota),
                }),
                Err(e) => serde_json::json!({
                    "address": a, "up": false, "error": format!("{e:#}"),
                    "code": crate::refusal::code_of(e).map(client::ErrorCode::name),
                }),
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
                    let role = if s.leader_id == s.server_id {
                        "leader"
                    } else if s.rejoining {
                        "rejoin"
                    } else {
                        "follower"
                    };
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
        for s in replies.iter().filter_map(|(_, r)| r.as_ref().ok()).filter(|s| s.rejoining) {
            println!(
                "server {} lost its Raft database and is rejoining: it catches up as a non-voter, then votes again",
                s.server_id
            );
        }
        // Issue 16: what degraded writes left behind, and the leader's resync of it.
        if let Some(s) = replies.iter().filter_map(|(_, r)| r.as_ref().ok()).find(|s| s.leader_id == s.server_id) {
            if s.stale_rows > 0 || !s.wiped_servers.is_empty() {
                let wiped = if s.wiped_servers.is_empty() {
                    String::new()
                } else {
                    let ids: Vec<String> = s.wiped_servers.iter().map(u64::to_string).collect();
                    format!(
                        "; server(s) {} came back with an empty volume and are being rebuilt in full",
                        ids.join(", ")
                    )
                };
                println!(
                    "resync: {} stripe rows have units written while their servers were down{wiped}; rebuilt so far {} \
                     rows ({}) at {}/s, about {} s left",
                    s.stale_rows,
                    s.resync_rows_done,
                    server::human_bytes(s.resync_bytes),
                    server::human_bytes(s.resync_rate),
                    s.resync_eta_ms.div_ceil(1000)
                );
            } else if s.resync_rows_done > 0 {
                println!(
                    "resync: nothing left behind; {} rows ({}) rebuilt since the leader started",
                    s.resync_rows_done,
                    server::human_bytes(s.resync_bytes)
                );
            }
        }
        // Issue 15: who stores what (as the leader has applied it), against the quota.
        if let Some(s) = replies.iter().filter_map(|(_, r)| r.as_ref().ok()).find(|s| s.leader_id == s.server_id)
            && !s.stored.is_empty()
        {
            let of = if s.bytes_quota > 0 {
                format!(" (quota {} each)", server::human_bytes(s.bytes_quota))
            } else {
                String::new()
            };
            let each: Vec<String> =
                s.stored.iter().map(|i| format!("{} {}", i.identity, server::human_bytes(i.bytes))).collect();
            println!("bytes stored by identity{of}: {}", each.join(", "));
        }
        let mut largest: Vec<u64> =
            replies.iter().filter_map(|(_, r)| r.as_ref().ok()).map(|s| s.file_bytes_max).collect();
        largest.sort_unstable();
        largest.dedup();
        if !largest.is_empty() {
            let sizes: Vec<String> = largest.iter().map(|b| server::human_bytes(*b)).collect();
            println!("largest file: {}", sizes.join(" or "));
        }
        let mounts: Vec<(u64, &pb::MountInfo)> = replies
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok())
            .flat_map(|s| s.mounts.iter().map(move |m| (s.server_id, m)))
            .collect();
        if !mounts.is_empty() {
            println!(
                "\n{:<7} {:<8} {:>10} {:>6} {:>11}  mount",
                "server", "session", "open-files", "locks", "fcntl-files"
            );
            for (server, m) in mounts {
                let open = local.get(&m.session).and_then(|v| v["open_files"].as_u64());
                println!(
                    "{:<7} {:<8} {:>10} {:>6} {:>11}  {}",
                    server,
                    m.session,
                    open.map_or("?".to_string(), |n| n.to_string()),
                    m.locks,
                    m.fcntl_locks,
                    m.client.trim_start_matches("mount ")
                );
            }
        }
        for s in replies.iter().filter_map(|(_, r)| r.as_ref().ok()) {
            println!(
                "server {} lock memory: {} of {} used ({} locks at 1 KiB); holders keep at most {} idle cached locks",
                s.server_id,
                server::human_bytes(s.lock_memory_used),
                server::human_bytes(s.lock_memory_budget),
                s.lock_memory_used / 1024,
                s.lru_size
            );
        }
    }
    Ok(if up == 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

fn mount_json(m: &pb::MountInfo, local: &BTreeMap<u64, serde_json::Value>) -> serde_json::Value {
    let here = local.get(&m.session);
    serde_json::json!({
        "session": m.session, "client": m.client, "locks": m.locks, "fcntl_locks": m.fcntl_locks,
        "open_files": here.and_then(|v| v["open_files"].as_u64()),
        "dir": here.and_then(|v| v["dir"].as_str()),
    })
}

/// `evict`: end sessions as if their leases had run out (fenced, then their locks go to the
/// next in line), by number or as every holder of a path, like `etcdctl lease revoke`.
pub fn evict(sessions: &[u64], holders_of: Option<&str>, cluster: Option<&str>, json: bool) -> Result<ExitCode> {
    let addrs = cluster_addrs(cluster)?;
    if sessions.is_empty() && holders_of.is_none() {
        bail!("name the sessions to evict (numbers from `stripelock locks`), or --holders PATH");
    }
    if let Some(p) = holders_of {
        check_lock_path(p)?;
    }
    let request = pb::EvictRequest { sessions: sessions.to_vec(), holders_of: holders_of.unwrap_or("").to_string() };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let reply = rt.block_on(async {
        let mut last = None;
        for a in &addrs {
            // Not within the read deadline: the eviction commits through the log.
            let attempt = tokio::time::timeout(Duration::from_secs(10), async {
                let mut c = locks_client(a).await?;
                Ok::<_, anyhow::Error>(c.evict(request.clone()).await)
            })
            .await;
            match attempt {
                Ok(Ok(Ok(r))) => return Ok(r.into_inner()),
                // The cluster answered no: another server would say the same. A server that
                // cannot serve now (no leader, stopping) is passed over.
                Ok(Ok(Err(status))) if !ClientError::from_status(&status).is_retryable() => {
                    return Err(status_error(status));
                }
                Ok(Ok(Err(status))) => last = Some(status_error(status).context(format!("server {a}"))),
                Ok(Err(e)) => last = Some(e.context(format!("server {a}"))),
                Err(_) => last = Some(ClientError::Unreachable(format!("server {a}: no answer within 10 s")).into()),
            }
        }
        Err(last
            .unwrap_or_else(|| ClientError::Unreachable("no server address given".into()).into())
            .context("no server of the cluster answered"))
    })?;
    if json {
        let list: Vec<_> = reply
            .evicted
            .iter()
            .map(|e| serde_json::json!({"session": e.session, "client": e.client, "locks_fenced": e.locks}))
            .collect();
        println!("{}", serde_json::json!({"evicted": list}));
    } else {
        for e in &reply.evicted {
            let who = if e.client.is_empty() { String::new() } else { format!(" ({})", e.client) };
            println!(
                "evicted session {}{who}: {} lock{} fenced, then given to whoever waits",
                e.session,
                e.locks,
                if e.locks == 1 { "" } else { "s" }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
