//! `up`: a local cluster of N servers on 127.0.0.1, supervised until Ctrl-C or SIGTERM. A data
//! directory is kept to one `up` and a server's directory to one server by lock files
//! (`pidlock.rs`).

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cluster::{CLUSTER_FILE, free_port};
use crate::pidlock::{SERVER_PID, lock_holder, take_pid_lock};

/// Held by `up` in its data directory for as long as it runs.
pub const UP_LOCK: &str = "up.lock";

/// First wait before restarting a server that failed; doubled after each failure up to the
/// maximum, and back to the first once a server has run `BACKOFF_RESET_AFTER`.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(30);
/// How often `up` looks at its servers.
const POLL: Duration = Duration::from_millis(200);
/// How long servers get to stop on SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Whether process `pid` is a `stripelock server` whose arguments name `dir` (as given, relative
/// to its working directory, or absolute). Checked before signalling a pid read from a file, so
/// a reused pid is never signalled.
pub fn is_server_of(pid: u32, dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let Ok(cwd) = std::fs::read_link(format!("/proc/{pid}/cwd")) else { return false };
    let Ok(dir) = dir.canonicalize() else { return false };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let is_server = args.iter().any(|a| *a == b"server");
    let names_dir = args.iter().any(|a| {
        let a = String::from_utf8_lossy(a);
        let a = a.strip_prefix("--data=").unwrap_or(&a);
        cwd.join(a).canonicalize().is_ok_and(|p| p == dir)
    });
    is_server && names_dir
}

fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill").args([sig, &pid.to_string()]).status();
}

/// One server `up` looks after.
struct Slot {
    id: usize,
    addr: String,
    dir: PathBuf,
    /// The server's data directory as passed to it (absolute).
    dir_abs: PathBuf,
    child: Option<Child>,
    started: Instant,
    backoff: Duration,
    /// When to start it again (`None`: now, if it is not running).
    restart_at: Option<Instant>,
    /// A server someone else started in this directory, by pid.
    outside: Option<u32>,
    /// It stopped cleanly (someone asked it to): not restarted.
    retired: bool,
    /// Its metrics and status page (`--http`).
    http: String,
    /// The cluster's certificates (`--tls-dir`).
    tls_dir: PathBuf,
}

impl Slot {
    fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id).or(self.outside)
    }

    /// A server running in this directory that `up` did not start, if any.
    fn running_outside(&self) -> Option<u32> {
        let pid = lock_holder(&self.dir.join(SERVER_PID))?;
        Some(pid).filter(|p| is_server_of(*p, &self.dir_abs))
    }

    /// Starts the server unless one already runs in its directory.
    fn start(&mut self, exe: &Path, peers: &str) {
        if let Some(pid) = self.running_outside() {
            if self.outside != Some(pid) {
                eprintln!(
                    "stripelock up: server {} is running outside this `up` (pid {pid}); it is left running \
                     and stopped with the cluster",
                    self.id
                );
            }
            self.outside = Some(pid);
            self.restart_at = Some(Instant::now() + Duration::from_secs(1));
            return;
        }
        self.outside = None;
        match self.spawn(exe, peers) {
            Ok(child) => {
                self.child = Some(child);
                self.started = Instant::now();
                self.restart_at = None;
            }
            Err(e) => {
                eprintln!("stripelock up: cannot start server {}: {e:#}; trying again in {:?}", self.id, self.backoff);
                self.schedule_restart();
            }
        }
    }

    fn spawn(&self, exe: &Path, peers: &str) -> Result<Child> {
        std::fs::create_dir_all(&self.dir)?;
        // Appended to, never truncated: the log of a server that crashed is what explains it.
        let mut log = OpenOptions::new().create(true).append(true).open(self.log_path())?;
        writeln!(log, "--- stripelock up (pid {}) starts server {}", std::process::id(), self.id)?;
        let mut cmd = std::process::Command::new(exe);
        cmd.args(["server", "--id", &self.id.to_string(), "--data"]).arg(&self.dir_abs).args(["--peers", peers]);
        // The status page on this host's loopback takes any browser (over TLS): a browser has no
        // certificate of the cluster's CA.
        cmd.args(["--http", &self.http, "--http-clients", "any"]).arg("--tls-dir").arg(&self.tls_dir);
        if self.id == 1 {
            cmd.arg("--bootstrap");
        }
        Ok(cmd.stdout(log.try_clone()?).stderr(log).spawn()?)
    }

    fn schedule_restart(&mut self) {
        self.restart_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    /// Notices a server that ended and decides when to start it again.
    fn check(&mut self) {
        let Some(child) = &mut self.child else { return };
        let Ok(Some(status)) = child.try_wait() else { return };
        self.child = None;
        if status.success() {
            // It was asked to stop (SIGTERM or SIGINT end a server cleanly): not a crash.
            eprintln!("stripelock up: server {} stopped ({status}); not restarting it", self.id);
            self.retired = true;
            return;
        }
        let ran = self.started.elapsed();
        if ran >= BACKOFF_RESET_AFTER {
            self.backoff = BACKOFF_FIRST;
        }
        eprintln!(
            "stripelock up: server {} exited ({status}) after {:.1} s; restarting it in {:.1} s; its log: {}",
            self.id,
            ran.as_secs_f64(),
            self.backoff.as_secs_f64(),
            self.log_path().display()
        );
        self.schedule_restart();
    }
}

/// `up`: N servers on 127.0.0.1 in child processes, restarted when they fail, until Ctrl-C or
/// SIGTERM.
pub fn up(servers: u32, data: &Path, json: bool) -> Result<ExitCode> {
    if !(1..=9).contains(&servers) {
        bail!("--servers must be between 1 and 9, got {servers}");
    }
    std::fs::create_dir_all(data).with_context(|| format!("cannot create {}", data.display()))?;
    // One `up` per data directory: a second one would find every port taken and, before this
    // lock, truncated the running servers' logs.
    let _up_lock = match take_pid_lock(&data.join(UP_LOCK))? {
        Ok(lock) => lock,
        Err(pid) => bail!(
            "{} is in use by another `stripelock up`{}; stop that one first, or give another --data directory",
            data.display(),
            pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
        ),
    };
    let data_abs = data.canonicalize().with_context(|| format!("cannot resolve {}", data.display()))?;
    let cluster_file = data.join(CLUSTER_FILE);
    // A data directory that held a cluster keeps its addresses, so the servers find their logs.
    let mut addrs: Vec<String> = std::fs::read_to_string(&cluster_file)
        .map(|t| t.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
        .unwrap_or_default();
    if addrs.len() != servers as usize {
        if !addrs.is_empty() {
            bail!(
                "{} holds a cluster of {} servers; use --servers {} or another --data directory",
                data.display(),
                addrs.len(),
                addrs.len()
            );
        }
        addrs = (0..servers).map(|_| free_port().map(|p| format!("127.0.0.1:{p}"))).collect::<Result<_>>()?;
    }
    let peers: String = addrs.iter().enumerate().map(|(i, a)| format!("{}={a}", i + 1)).collect::<Vec<_>>().join(",");
    let exe = std::env::current_exe().context("cannot find the stripelock executable")?;
    // Mutual TLS from the start: the cluster's CA and certificates, made once.
    if !data.join("tls").join("ca.pem").exists() {
        crate::certscmd::init_in(&data.join("tls"))?;
    }
    let https = (0..servers).map(|_| free_port().map(|p| format!("127.0.0.1:{p}"))).collect::<Result<Vec<_>>>()?;
    let mut slots: Vec<Slot> = addrs
        .iter()
        .enumerate()
        .map(|(i, addr)| Slot {
            id: i + 1,
            addr: addr.clone(),
            dir: data.join(format!("server-{}", i + 1)),
            dir_abs: data_abs.join(format!("server-{}", i + 1)),
            child: None,
            started: Instant::now(),
            backoff: BACKOFF_FIRST,
            restart_at: None,
            outside: None,
            retired: false,
            http: https[i].clone(),
            tls_dir: data_abs.join("tls"),
        })
        .collect();
    for slot in &mut slots {
        slot.start(&exe, &peers);
    }
    std::fs::write(&cluster_file, addrs.join(","))?;
    if json {
        let list: Vec<_> = slots
            .iter()
            .map(|s| {
                let page = format!("https://{}/", s.http);
                serde_json::json!({"id": s.id, "address": s.addr, "data": s.dir, "pid": s.pid(), "status_page": page})
            })
            .collect();
        println!("{}", serde_json::json!({"cluster": addrs.join(","), "servers": list}));
    } else {
        println!("{:<4} {:<22} {:<8} {:<30} data", "id", "address", "pid", "status page and /metrics");
        for s in &slots {
            let pid = s.pid().map_or("-".to_string(), |p| p.to_string());
            println!("{:<4} {:<22} {pid:<8} {:<30} {}", s.id, s.addr, format!("https://{}/", s.http), s.dir.display());
        }
        println!("\ncluster: {}  (written to {})", addrs.join(","), cluster_file.display());
        println!("try:     stripelock lock /jobs/nightly -- sleep 5     (from this directory)");
        println!("watch:   stripelock top, or the status pages above in a browser");
        println!(
            "         (HTTPS with certificates of this cluster's own CA, {}: import it, or accept the warning)",
            slots.first().map_or_else(String::new, |s| s.tls_dir.join("ca.pem").display().to_string())
        );
        println!("stop:    Ctrl-C  (a server that fails is restarted; its log is DIR/server-N/server.log)");
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mut stop = crate::cluster::stop_signal().await;
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                _ = tokio::time::sleep(POLL) => {}
            }
            if *stop.borrow() {
                break;
            }
            let now = Instant::now();
            for slot in &mut slots {
                slot.check();
                if slot.child.is_none() && !slot.retired && slot.restart_at.is_none_or(|at| at <= now) {
                    slot.start(&exe, &peers);
                }
            }
        }
    });
    stop_all(&mut slots);
    eprintln!("cluster stopped");
    Ok(ExitCode::SUCCESS)
}

/// Stops every server of the cluster by pid: those `up` started, and any that someone started by
/// hand in a server's directory (found through its pid file). SIGTERM, then SIGKILL after
/// `STOP_GRACE`.
fn stop_all(slots: &mut [Slot]) {
    let mut outside: Vec<(usize, u32, PathBuf)> = Vec::new();
    for s in slots.iter_mut() {
        if let Some(c) = &s.child {
            signal(c.id(), "-TERM");
        }
        if let Some(pid) = s.running_outside()
            && Some(pid) != s.child.as_ref().map(Child::id)
        {
            signal(pid, "-TERM");
            outside.push((s.id, pid, s.dir_abs.clone()));
        }
    }
    let deadline = Instant::now() + STOP_GRACE;
    for s in slots.iter_mut() {
        let Some(c) = &mut s.child else { continue };
        while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if matches!(c.try_wait(), Ok(None)) {
            eprintln!("server {} did not stop in {} s; killing it", s.id, STOP_GRACE.as_secs());
            let _ = c.kill();
        }
        let _ = c.wait();
    }
    for (id, pid, dir) in outside {
        while Instant::now() < deadline && is_server_of(pid, &dir) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if is_server_of(pid, &dir) {
            eprintln!(
                "server {id} (pid {pid}, not started by this `up`) did not stop in {} s; killing it",
                STOP_GRACE.as_secs()
            );
            signal(pid, "-KILL");
        }
    }
}
