//! Issue 10's defects of `up` and of server startup, tried on real processes: `stripelock up`
//! runs as a child of the test with its own temporary --data directory. The tests stop only
//! processes they started (up, and the servers up reports or a test started by hand), by pid,
//! and every wait is bounded. One test at a time: two cores, and elections want their timing.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const EXE: &str = env!("CARGO_BIN_EXE_stripelock");

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("stripelock-up-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `f` every 50 ms until it holds or `timeout` passes.
fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn accepts(addr: &str) -> bool {
    TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_millis(200)).is_ok()
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
}

/// Whether `pid` is a live process whose command line names `dir` (so a test never signals a
/// process it did not start, even if a pid was reused).
fn runs_in(pid: u32, dir: &Path) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains(dir.to_str().unwrap()))
}

struct ServerRow {
    id: u64,
    addr: String,
    pid: u32,
}

/// A `stripelock up --json` of the test, stopped by pid when dropped.
struct Up {
    child: Child,
    dir: PathBuf,
    data: PathBuf,
    stderr: PathBuf,
    servers: Vec<ServerRow>,
}

impl Up {
    fn start(name: &str) -> Up {
        let dir = temp_dir(name);
        let data = dir.join("data");
        let stderr = dir.join("up.stderr");
        let child = Command::new(EXE)
            .args(["up", "--servers", "3", "--json", "--data"])
            .arg(&data)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let mut up = Up { child, dir, data, stderr, servers: Vec::new() };
        // The first line of stdout is the JSON table; read it on a thread so the wait is bounded.
        let stdout = up.child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(15)).expect("up printed no table in 15 s");
        let table: serde_json::Value = serde_json::from_str(&line).expect("up's table is JSON");
        up.servers = table["servers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| ServerRow {
                id: s["id"].as_u64().unwrap(),
                addr: s["address"].as_str().unwrap().to_string(),
                pid: s["pid"].as_u64().unwrap() as u32,
            })
            .collect();
        assert_eq!(up.servers.len(), 3);
        for s in &up.servers {
            assert!(eventually(Duration::from_secs(15), || accepts(&s.addr)), "server {} never listened", s.id);
        }
        up
    }

    fn server_dir(&self, id: u64) -> PathBuf {
        self.data.join(format!("server-{id}"))
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn peers(&self) -> String {
        self.servers.iter().map(|s| format!("{}={}", s.id, s.addr)).collect::<Vec<_>>().join(",")
    }

    /// SIGTERM to up, and how it ended (`None`: still running after `timeout`).
    fn stop(&mut self, timeout: Duration) -> Option<ExitStatus> {
        signal(self.child.id(), "-TERM");
        wait_exit(&mut self.child, timeout)
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if self.stop(Duration::from_secs(10)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Whatever of ours is left (servers of a failed test), by pid and only if it runs in our
        // directory.
        let mut pids: Vec<u32> = self.servers.iter().map(|s| s.pid).collect();
        for id in 1..=3 {
            if let Ok(text) = std::fs::read_to_string(self.server_dir(id).join("server.pid"))
                && let Ok(pid) = text.trim().parse()
            {
                pids.push(pid);
            }
        }
        for pid in pids {
            if runs_in(pid, &self.dir) {
                signal(pid, "-KILL");
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn append(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
    writeln!(f, "{text}").unwrap();
}

/// Issue 10: a second `up` on the same data directory printed a normal table while its servers
/// failed with "Address already in use", kept running, and truncated the running cluster's logs.
/// Now it refuses at once, naming the `up` that holds the directory, and touches no log.
#[test]
fn a_second_up_on_the_same_data_dir_is_refused_and_leaves_the_logs_alone() {
    let _one = serial();
    let first = Up::start("second");
    for s in &first.servers {
        append(&first.server_dir(s.id).join("server.log"), "MARKER before the second up");
    }
    let mut second = Command::new(EXE)
        .args(["up", "--servers", "3", "--data"])
        .arg(&first.data)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_exit(&mut second, Duration::from_secs(10));
    if status.is_none() {
        signal(second.id(), "-TERM");
        let _ = wait_exit(&mut second, Duration::from_secs(8));
        let _ = second.kill();
        let _ = second.wait();
    }
    let output = second.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let status = status.expect("the second up kept running");
    assert!(!status.success(), "the second up succeeded: {stderr}");
    let pid = first.child.id().to_string();
    assert!(stderr.contains("in use") && stderr.contains(&pid), "no sentence naming up's pid {pid}: {stderr}");
    assert!(output.stdout.is_empty(), "the second up printed a table: {}", String::from_utf8_lossy(&output.stdout));
    for s in &first.servers {
        let log = std::fs::read_to_string(first.server_dir(s.id).join("server.log")).unwrap();
        assert!(log.contains("MARKER"), "server {}'s log was truncated", s.id);
        assert!(accepts(&s.addr), "server {} went away", s.id);
    }
}

/// Issue 10: a killed server was reported but not restarted, and its log was empty (a start
/// truncated it). Now `up` says so with the exit status and the log's path, starts it again, and
/// the log keeps what was in it.
#[test]
fn up_restarts_a_killed_server_and_appends_to_its_log() {
    let _one = serial();
    let up = Up::start("restart");
    let victim = &up.servers[1];
    let log = up.server_dir(victim.id).join("server.log");
    append(&log, "MARKER before the kill");
    signal(victim.pid, "-KILL");
    assert!(
        eventually(Duration::from_secs(5), || up.stderr().contains(&format!("server {} exited", victim.id))),
        "up did not notice: {}",
        up.stderr()
    );
    assert!(
        eventually(Duration::from_secs(10), || accepts(&victim.addr)),
        "server {} was not restarted: {}",
        victim.id,
        up.stderr()
    );
    let said = up.stderr();
    assert!(said.contains("signal: 9") && said.contains("restarting"), "{said}");
    assert!(said.contains(log.to_str().unwrap()) || said.contains("server-2/server.log"), "no log path: {said}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("MARKER"), "the restart truncated the log: {text}");
    let pid: u32 =
        std::fs::read_to_string(up.server_dir(victim.id).join("server.pid")).unwrap().trim().parse().unwrap();
    assert_ne!(pid, victim.pid);
    assert!(runs_in(pid, &up.dir), "server.pid does not name the restarted server");
}

/// Issue 10: a server restarted by hand in a server's directory was not stopped with the
/// cluster. Now `up` leaves it running (no second server fights it for the directory) and stops
/// it, by the pid in its directory, when the cluster stops.
#[test]
fn up_stops_a_server_restarted_by_hand() {
    let _one = serial();
    let mut up = Up::start("by-hand");
    let victim = &up.servers[1];
    let (id, addr, dir) = (victim.id, victim.addr.clone(), up.server_dir(victim.id));
    signal(victim.pid, "-KILL");
    assert!(eventually(Duration::from_secs(5), || !accepts(&addr)), "server {id} did not die");
    let mut by_hand = Command::new(EXE)
        .args(["server", "--id", &id.to_string(), "--peers", &up.peers(), "--data"])
        .arg(&dir)
        .arg("--tls-dir")
        .arg(dir.parent().unwrap().join("tls"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let hand_pid = by_hand.id();
    let started = eventually(Duration::from_secs(10), || accepts(&addr));
    // Give up's restart a chance to collide with it.
    std::thread::sleep(Duration::from_millis(1_500));
    let still_running = by_hand.try_wait().unwrap().is_none();
    let up_status = up.stop(Duration::from_secs(12));
    let stopped = wait_exit(&mut by_hand, Duration::from_secs(3));
    if stopped.is_none() && runs_in(hand_pid, &up.dir) {
        let _ = by_hand.kill();
        let _ = by_hand.wait();
    }
    assert!(started && still_running, "the server started by hand did not run: {}", up.stderr());
    assert!(up_status.is_some(), "up did not stop in 12 s");
    assert!(stopped.is_some(), "the server started by hand outlived the cluster: {}", up.stderr());
    assert!(up.stderr().contains("running outside"), "{}", up.stderr());
}

/// Issue 10: `status --json` did not say which process serves which directory.
#[test]
fn status_json_names_each_servers_pid_and_data_dir() {
    let _one = serial();
    let up = Up::start("status");
    let cluster = up.servers.iter().map(|s| s.addr.clone()).collect::<Vec<_>>().join(",");
    let mut status = Command::new(EXE)
        .env("STRIPELOCK_TLS_DIR", up.server_dir(1).parent().unwrap().join("tls"))
        .args(["status", "--json", "--cluster", &cluster])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if wait_exit(&mut status, Duration::from_secs(20)).is_none() {
        let _ = status.kill();
    }
    let output = status.wait_with_output().unwrap();
    let json: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)));
    for s in &up.servers {
        let row = json["servers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["address"] == s.addr.as_str())
            .unwrap_or_else(|| panic!("no row for {}: {json}", s.addr));
        assert_eq!(row["pid"].as_u64(), Some(s.pid as u64), "{row}");
        let dir = up.server_dir(s.id).canonicalize().unwrap();
        assert_eq!(row["data_dir"].as_str().map(PathBuf::from), Some(dir), "{row}");
    }
}

/// Issue 10: a second server on a data directory in use failed on its port (or the database)
/// without saying whose the directory is. Now it refuses at once, naming the pid holding it.
#[test]
fn a_server_refuses_a_data_dir_another_server_uses() {
    let _one = serial();
    let dir = temp_dir("server-dir");
    let data = dir.join("server-1");
    let port = |_| wire::unused_port().unwrap();
    let (a, b) = (port(0), port(1));
    let peers = format!("1=127.0.0.1:{a}");
    let spawn = |listen: u16, bootstrap: bool| {
        let mut cmd = Command::new(EXE);
        cmd.args(["server", "--id", "1", "--peers", &peers, "--listen", &format!("127.0.0.1:{listen}"), "--insecure"])
            .arg("--data")
            .arg(&data)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if bootstrap {
            cmd.arg("--bootstrap");
        }
        cmd.spawn().unwrap()
    };
    let mut first = spawn(a, true);
    let listening = eventually(Duration::from_secs(10), || accepts(&format!("127.0.0.1:{a}")));
    let mut second = spawn(b, false);
    let status = wait_exit(&mut second, Duration::from_secs(10));
    for child in [&mut second, &mut first] {
        if matches!(child.try_wait(), Ok(None)) {
            signal(child.id(), "-KILL");
            let _ = child.wait();
        }
    }
    let stderr = String::from_utf8_lossy(&second.wait_with_output().unwrap().stderr).to_string();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(listening, "the first server never listened");
    let status = status.expect("the second server kept running on a directory in use");
    assert!(!status.success());
    let pid = first.id().to_string();
    assert!(stderr.contains("in use") && stderr.contains(&pid), "no sentence naming pid {pid}: {stderr}");
}
