//! The multi-process test harness: real `stripelock server` processes on loopback, each test
//! with its own cluster on free ports in its own temporary directory, one test at a time.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use client::{LockOptions, Mode, Session};
use wire::v1 as pb;

pub static SERIAL: Mutex<()> = Mutex::new(());

/// Runs one test's body on its own runtime, one test at a time.
pub fn serial(body: impl std::future::Future<Output = ()>) {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap().block_on(body);
}

/// The binary under test: this build's, or `STRIPELOCK_EXE` (to show that a test fails on
/// an older build, e.g. `STRIPELOCK_EXE=/tmp/old/stripelock cargo test --test lock_defects`).
pub static EXE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    std::env::var("STRIPELOCK_EXE").unwrap_or_else(|_| env!("CARGO_BIN_EXE_stripelock").to_string())
});

pub struct Server {
    pub id: u64,
    pub addr: String,
    /// Its metrics and status page (`--http`).
    pub http: String,
    pub data: PathBuf,
    pub child: Option<Child>,
}

pub struct Cluster {
    pub dir: PathBuf,
    pub peers: String,
    pub servers: Vec<Server>,
    /// More `stripelock server` arguments for every server.
    pub extra: Vec<String>,
    /// Environment variables for every server (the test-only switches).
    pub env: Vec<(String, String)>,
    /// Mutual TLS with this directory's certificates (`certs init`); plain HTTP/2 if `None`.
    pub tls: Option<PathBuf>,
}

pub fn free_port() -> u16 {
    wire::unused_port().unwrap()
}

impl Cluster {
    pub async fn start(n: u64, name: &str) -> Cluster {
        Cluster::start_with(n, name, &[]).await
    }

    pub async fn start_with(n: u64, name: &str, extra: &[&str]) -> Cluster {
        Cluster::start_with_env(n, name, extra, &[]).await
    }

    /// A cluster whose servers also see the environment variables `env`.
    pub async fn start_with_env(n: u64, name: &str, extra: &[&str], env: &[(&str, &str)]) -> Cluster {
        Cluster::start_inner(n, name, extra, env, None).await
    }

    /// A cluster over mutual TLS with the certificates in `tls`; this test process connects as
    /// its `client` from now on (one identity per process).
    pub async fn start_tls(n: u64, name: &str, tls: &std::path::Path, extra: &[&str]) -> Cluster {
        Cluster::start_tls_with_env(n, name, tls, extra, &[]).await
    }

    /// `start_tls` whose servers also see the environment variables `env`.
    pub async fn start_tls_with_env(
        n: u64,
        name: &str,
        tls: &std::path::Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Cluster {
        wire::use_tls(wire::Tls::from_dir(tls, "client").unwrap());
        Cluster::start_inner(n, name, extra, env, Some(tls.to_path_buf())).await
    }

    async fn start_inner(n: u64, name: &str, extra: &[&str], env: &[(&str, &str)], tls: Option<PathBuf>) -> Cluster {
        let dir = std::env::temp_dir().join(format!("stripelock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let servers: Vec<Server> = (1..=n)
            .map(|id| Server {
                id,
                addr: format!("127.0.0.1:{}", free_port()),
                http: format!("127.0.0.1:{}", free_port()),
                data: dir.join(format!("server-{id}")),
                child: None,
            })
            .collect();
        let peers = servers.iter().map(|s| format!("{}={}", s.id, s.addr)).collect::<Vec<_>>().join(",");
        let extra = extra.iter().map(|s| s.to_string()).collect();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut cluster = Cluster { dir, peers, servers, extra, env, tls };
        for id in 1..=n {
            cluster.spawn(id, id == 1);
        }
        cluster.wait_ready().await;
        cluster
    }

    pub fn spawn(&mut self, id: u64, bootstrap: bool) {
        let peers = self.peers.clone();
        let s = &self.servers[id as usize - 1];
        std::fs::create_dir_all(&s.data).unwrap();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(s.data.join("server.log")).unwrap();
        let mut cmd = Command::new(&*EXE);
        cmd.args([
            "server",
            "--id",
            &id.to_string(),
            "--peers",
            &peers,
            "--heartbeat-ms",
            "100",
            "--tick-ms",
            "100",
            "--data",
        ])
        .arg(&s.data)
        .args(["--http", &s.http])
        .args(&self.extra)
        .envs(self.env.iter().map(|(k, v)| (k, v)))
        .stdout(log.try_clone().unwrap())
        .stderr(log);
        match &self.tls {
            Some(dir) => cmd.arg("--tls-dir").arg(dir),
            None => cmd.arg("--insecure"),
        };
        if bootstrap {
            cmd.arg("--bootstrap");
        }
        self.servers[id as usize - 1].child = Some(cmd.spawn().unwrap());
    }

    pub fn addrs(&self) -> Vec<String> {
        self.servers.iter().map(|s| s.addr.clone()).collect()
    }

    /// Addresses with server `first` at the head (clients connect to the first that answers).
    pub fn addrs_from(&self, first: u64) -> Vec<String> {
        let mut a = vec![self.servers[first as usize - 1].addr.clone()];
        a.extend(self.servers.iter().filter(|s| s.id != first).map(|s| s.addr.clone()));
        a
    }

    pub async fn status(&self, id: u64) -> Option<pb::StatusReply> {
        let addr = &self.servers[id as usize - 1].addr;
        let endpoint =
            wire::endpoint(addr).ok()?.connect_timeout(Duration::from_millis(300)).timeout(Duration::from_secs(2));
        let mut c = pb::locks_client::LocksClient::new(endpoint.connect().await.ok()?);
        c.status(pb::StatusRequest {}).await.ok().map(|r| r.into_inner())
    }

    /// The lock table as server `id` sees it; `None` while it does not answer.
    pub async fn table(&self, id: u64, prefix: &str) -> Option<pb::TableReply> {
        let addr = &self.servers[id as usize - 1].addr;
        let endpoint = wire::endpoint(addr).ok()?.connect_timeout(Duration::from_millis(300));
        let mut c = pb::locks_client::LocksClient::new(endpoint.connect().await.ok()?);
        c.table(pb::TableRequest { prefix: prefix.into() }).await.ok().map(|r| r.into_inner())
    }

    /// The leader as the live servers agree on it, waiting up to 10 s for one.
    pub async fn leader(&self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            for s in self.servers.iter().filter(|s| s.child.is_some()) {
                if let Some(st) = self.status(s.id).await
                    && st.leader_id == st.server_id
                {
                    return st.server_id;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no leader within 10 s; logs in {}", self.dir.display());
    }

    /// Ready when a session can be opened and is given a signed token (bootstrap done).
    pub async fn wait_ready(&self) {
        self.leader().await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(s) = Session::open(&self.addrs(), 5_000).await {
                let g = s.lock("/ready", 0..1, Mode::NL, LockOptions::default()).await;
                s.close().await;
                if g.is_ok_and(|g| !g.signed_token.is_empty()) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("cluster not ready in 20 s; logs in {}", self.dir.display());
    }

    /// The first server still running.
    pub fn live(&self) -> u64 {
        self.servers.iter().find(|s| s.child.is_some()).expect("a live server").id
    }

    pub fn pid(&self, id: u64) -> String {
        self.servers[id as usize - 1].child.as_ref().expect("running").id().to_string()
    }

    /// Sends `signal` (STOP, CONT) to server `id`'s process, by its PID.
    pub fn signal(&self, id: u64, signal: &str) {
        let ok = Command::new("kill").arg(format!("-{signal}")).arg(self.pid(id)).status().unwrap().success();
        assert!(ok, "kill -{signal} of server {id} failed");
    }

    pub fn kill(&mut self, id: u64) {
        let s = &mut self.servers[id as usize - 1];
        let mut child = s.child.take().expect("running");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for s in &mut self.servers {
            if let Some(mut c) = s.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Waits until `check` holds on the table of server `id`, up to 10 s.
pub async fn until_table(
    c: &Cluster,
    id: u64,
    prefix: &str,
    what: &str,
    check: impl Fn(&pb::TableReply) -> bool,
) -> pb::TableReply {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t = c.table(id, prefix).await;
        if let Some(t) = &t
            && check(t)
        {
            return t.clone();
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {t:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn count(t: &pb::TableReply, granted: bool) -> usize {
    t.resources
        .iter()
        .flat_map(|r| &r.locks)
        .filter(|l| if granted { l.granted } else { l.waiting && !l.granted })
        .count()
}

/// Runs the CLI with server `first` at the head of --cluster, `stdin` as its input.
pub fn run_at(c: &Cluster, first: u64, args: &[&str], stdin: &[u8]) -> std::process::Output {
    run_as(c, first, None, args, stdin)
}

/// `run_at` as the identity of the certificate `name` (of a TLS cluster's directory).
pub fn run_as(c: &Cluster, first: u64, name: Option<&str>, args: &[&str], stdin: &[u8]) -> std::process::Output {
    use std::io::Write as _;
    let mut cmd = Command::new(&*EXE);
    if let Some(dir) = &c.tls {
        cmd.env("STRIPELOCK_TLS_DIR", dir);
    }
    if let Some(name) = name {
        cmd.env("STRIPELOCK_TLS_NAME", name);
    }
    let mut child = cmd
        .args(args)
        .arg("--cluster")
        .arg(c.addrs_from(first).join(","))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

/// Deterministic bytes that differ from any other seed's (xorshift).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Runs the CLI with the first live server at the head of --cluster; panics with its stderr if
/// it fails; returns stdout.
pub fn cli(c: &Cluster, args: &[&str]) -> String {
    let out = run_at(c, c.live(), args, b"");
    assert!(out.status.success(), "stripelock {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Runs the CLI expecting it to fail; returns its stderr.
pub fn cli_fails(c: &Cluster, args: &[&str]) -> String {
    let out = run_at(c, c.live(), args, b"");
    assert!(!out.status.success(), "stripelock {args:?} succeeded: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}
