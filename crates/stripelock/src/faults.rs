//! `stripelock bench faults`: the fault campaign (issue 15). Servers and clients run in network
//! namespaces of their own joined by a bridge; the workers (`faults_worker.rs`) lock, write and read
//! while a nemesis injects one fault after another; then the history checker (`faults_history.rs`)
//! judges what they saw and what the cluster holds, scrub checks parity, the lock table must be
//! empty of the workers' locks, and the recovery figures are measured.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use client::{LockOptions, Mode, Session};
use serde_json::json;

use crate::faults_history::{self as history, COUNTER_LEN, Finals, Record, Verdict};
use crate::faults_net::{self as net, Net};

#[derive(Debug, Clone)]
pub struct FaultArgs {
    pub servers: u64,
    pub clients: u64,
    pub seconds: u64,
    pub seed: u64,
    pub lease_ms: u64,
    /// Servers run with fencing switched off (storage takes fenced and stale tokens, the
    /// lock check before a stripe write is skipped): the checker must find violations.
    pub negative_control: bool,
    pub recovery: bool,
    pub dir: Option<PathBuf>,
    pub keep: bool,
    pub json: bool,
}

/// One counter all clients contend for: a paused holder's waiters take it over at once.
const COUNTERS: u64 = 1;
const FILE_BYTES: u64 = 64 * 1024;
/// The server whose data directory is a small tmpfs, filled by the disk-full fault.
const TMPFS_MIB: u64 = 768;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    IsolateLeader,
    SplitHalves,
    OneWay,
    Loss,
    Delay,
    LinkDown,
    KillServer,
    PauseServer,
    PauseClient,
    KillClient,
    DiskFull,
}

const FAULTS: [Fault; 11] = [
    Fault::IsolateLeader,
    Fault::SplitHalves,
    Fault::OneWay,
    Fault::Loss,
    Fault::Delay,
    Fault::LinkDown,
    Fault::KillServer,
    Fault::PauseServer,
    Fault::PauseClient,
    Fault::KillClient,
    Fault::DiskFull,
];

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::IsolateLeader => "isolate-leader",
            Fault::SplitHalves => "split-halves",
            Fault::OneWay => "one-way-loss",
            Fault::Loss => "random-loss",
            Fault::Delay => "delay",
            Fault::LinkDown => "link-down",
            Fault::KillServer => "kill-server",
            Fault::PauseServer => "pause-server",
            Fault::PauseClient => "pause-client",
            Fault::KillClient => "kill-client",
            Fault::DiskFull => "disk-full",
        }
    }
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

struct Node {
    id: u64,
    addr: String,
    data: PathBuf,
    child: Option<Child>,
}

struct Worker {
    id: u64,
    child: Option<Child>,
}

/// Everything the campaign started; dropping it stops the processes and removes the network.
struct Campaign {
    args: FaultArgs,
    net: Net,
    exe: PathBuf,
    dir: PathBuf,
    tls: PathBuf,
    peers: String,
    nodes: Vec<Node>,
    workers: Vec<Worker>,
    tmpfs: Option<PathBuf>,
    started: Instant,
    /// Workers stop at this instant (the nemesis some seconds before).
    workers_until: Instant,
    notes: Vec<String>,
    /// Set when the cluster did not come back once the faults were undone.
    unhealed: Option<String>,
}

impl Drop for Campaign {
    fn drop(&mut self) {
        for c in self
            .workers
            .iter_mut()
            .filter_map(|w| w.child.as_mut())
            .chain(self.nodes.iter_mut().filter_map(|n| n.child.as_mut()))
        {
            let _ = signal(c.id(), rustix::process::Signal::CONT);
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(t) = &self.tmpfs {
            let _ = net::sh("umount", &[&t.to_string_lossy()]);
        }
        self.net.destroy();
    }
}

fn signal(pid: u32, sig: rustix::process::Signal) -> Result<()> {
    let pid = rustix::process::Pid::from_raw(pid as i32).context("no such pid")?;
    rustix::process::kill_process(pid, sig)?;
    Ok(())
}

impl Campaign {
    fn addrs(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    fn cluster_flag(&self) -> String {
        self.addrs().join(",")
    }

    fn say(&self, text: &str) {
        eprintln!("[{:>6.1} s] {text}", self.started.elapsed().as_secs_f64());
    }

    fn spawn_server(&mut self, id: u64, bootstrap: bool) -> Result<()> {
        let n = &self.nodes[id as usize - 1];
        std::fs::create_dir_all(&n.data)?;
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join(format!("server-{id}.log")))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.net.server_ns(id)])
            .arg(&self.exe)
            .args(["server", "--id", &id.to_string(), "--peers", &self.peers, "--data"])
            .arg(&n.data)
            .args(["--http", &format!("{}:8000", self.net.server_ip(id))])
            .args(["--heartbeat-ms", "100", "--tick-ms", "100"])
            .arg("--tls-dir")
            .arg(&self.tls)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if bootstrap {
            cmd.arg("--bootstrap");
        }
        if self.args.negative_control {
            cmd.arg("--break-stale-write-check-for-negative-control")
                .env(crate::servercmd::SKIP_STORAGE_FENCE_ENV, "1");
        }
        self.nodes[id as usize - 1].child = Some(cmd.spawn().context("cannot start a server")?);
        Ok(())
    }

    fn spawn_worker(&mut self, j: u64) -> Result<()> {
        let left = self.workers_until.saturating_duration_since(Instant::now()).as_secs().max(1);
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join(format!("worker-{j}.log")))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.net.client_ns(j)])
            .arg(&self.exe)
            .arg("--tls-dir")
            .arg(&self.tls)
            .args(["bench", "faults-worker", "--id", &j.to_string(), "--cluster", &self.cluster_flag(), "--dir"])
            .arg(&self.dir)
            .args(["--seconds", &left.to_string(), "--lease-ms", &self.args.lease_ms.to_string()])
            .args(["--counters", &COUNTERS.to_string(), "--file-bytes", &FILE_BYTES.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start a worker")?;
        let w = self.workers.iter_mut().find(|w| w.id == j).context("no such worker")?;
        w.child = Some(child);
        Ok(())
    }

    /// A CLI command against the campaign's cluster, from the root namespace; exit codes in
    /// `fine` besides 0 are answers too.
    fn cli_allowing(&self, args: &[&str], fine: &[i32]) -> Result<String> {
        let out = Command::new(&self.exe)
            .arg("--tls-dir")
            .arg(&self.tls)
            .args(args)
            .args(["--cluster", &self.cluster_flag()])
            .output()?;
        if !out.status.success() && !out.status.code().is_some_and(|c| fine.contains(&c)) {
            bail!("`stripelock {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn cli(&self, args: &[&str]) -> Result<String> {
        self.cli_allowing(args, &[])
    }

    /// The leader most servers name, if any.
    async fn leader(&self) -> Option<u64> {
        let asks = self.addrs().into_iter().map(|a| async move { crate::cluster::status_from(&a).await.ok() });
        let replies = futures::future::join_all(asks).await;
        let mut votes = std::collections::BTreeMap::<u64, u64>::new();
        for r in replies.into_iter().flatten() {
            if r.leader_id != 0 {
                *votes.entry(r.leader_id).or_default() += 1;
            }
        }
        votes.into_iter().max_by_key(|(_, n)| *n).map(|(l, _)| l)
    }

    /// Waits until every server answers and names one leader.
    async fn healthy(&self, within: Duration) -> Result<u64> {
        let until = Instant::now() + within;
        loop {
            let asks = self.addrs().into_iter().map(|a| async move { crate::cluster::status_from(&a).await.ok() });
            let replies = futures::future::join_all(asks).await;
            let leaders: std::collections::BTreeSet<u64> =
                replies.iter().map(|r| r.as_ref().map_or(0, |r| r.leader_id)).collect();
            if leaders.len() == 1 && !leaders.contains(&0) {
                return Ok(*leaders.iter().next().unwrap_or(&0));
            }
            if Instant::now() > until {
                bail!("the cluster did not come back within {within:?} (leaders seen: {leaders:?})");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Starts again every server and worker that ended.
    fn restart_dead(&mut self) -> Result<()> {
        for i in 1..=self.nodes.len() as u64 {
            let n = &mut self.nodes[i as usize - 1];
            if let Some(c) = &mut n.child
                && let Ok(Some(status)) = c.try_wait()
            {
                n.child = None;
                let note = format!("server {i} exited by itself ({status}); started again");
                self.say(&note);
                self.notes.push(note);
            }
            if self.nodes[i as usize - 1].child.is_none() {
                self.spawn_server(i, false)?;
            }
        }
        if Instant::now() + Duration::from_secs(2) < self.workers_until {
            for j in 1..=self.workers.len() as u64 {
                let w = &mut self.workers[j as usize - 1];
                let gone = match &mut w.child {
                    Some(c) => matches!(c.try_wait(), Ok(Some(_))),
                    None => true,
                };
                if gone {
                    w.child = None;
                    self.spawn_worker(j)?;
                }
            }
        }
        Ok(())
    }

    /// Injects one fault, holds it, undoes it. Returns what was done.
    async fn inject(&mut self, fault: Fault, rng: &mut Rng) -> Result<String> {
        let servers = self.nodes.len() as u64;
        let hold = Duration::from_millis(1_500 + rng.below(2_500));
        let all_servers: Vec<u64> = (1..=servers).collect();
        let ips = |ids: &[u64]| ids.iter().map(|i| self.net.server_ip(*i)).collect::<Vec<_>>();
        let client_ips: Vec<String> = (1..=self.workers.len() as u64).map(|j| self.net.client_ip(j)).collect();
        let what = match fault {
            Fault::IsolateLeader => {
                let l = self.leader().await.unwrap_or(1);
                let others: Vec<u64> = all_servers.iter().copied().filter(|i| *i != l).collect();
                let mut peers = ips(&others);
                peers.extend(client_ips.clone());
                self.net.cut(l, &peers, true, true)?;
                tokio::time::sleep(hold).await;
                self.net.heal(l);
                format!("isolated the leader (server {l}) from every server and client")
            }
            Fault::SplitHalves => {
                let mut order = all_servers.clone();
                for k in (1..order.len()).rev() {
                    order.swap(k, rng.below(k as u64 + 1) as usize);
                }
                let (a, b) = order.split_at(order.len() / 2);
                for i in a {
                    self.net.cut(*i, &ips(b), true, true)?;
                }
                for i in b {
                    self.net.cut(*i, &ips(a), true, true)?;
                }
                tokio::time::sleep(hold).await;
                for i in &all_servers {
                    self.net.heal(*i);
                }
                format!("split the servers into {a:?} and {b:?}")
            }
            Fault::OneWay => {
                let a = 1 + rng.below(servers);
                let b = 1 + (a + rng.below(servers - 1)) % servers;
                self.net.cut(a, &ips(&[b]), false, true)?;
                tokio::time::sleep(hold).await;
                self.net.heal(a);
                format!("dropped everything server {a} sends to server {b} (one way)")
            }
            Fault::Loss => {
                let a = 1 + rng.below(servers);
                let p = 10 + rng.below(30);
                self.net.lose(a, p)?;
                tokio::time::sleep(hold).await;
                self.net.heal(a);
                format!("dropped {p}% of server {a}'s packets at random")
            }
            Fault::Delay => {
                let a = 1 + rng.below(servers);
                self.net.slow(a, 256, 400)?;
                tokio::time::sleep(hold).await;
                self.net.heal(a);
                format!("slowed server {a}'s link to 256 kbit/s, queueing up to 400 ms")
            }
            Fault::LinkDown => {
                let a = 1 + rng.below(servers);
                self.net.link(a, false)?;
                tokio::time::sleep(hold).await;
                self.net.heal(a);
                format!("took server {a}'s link down")
            }
            Fault::KillServer => {
                let a = if rng.below(2) == 0 { self.leader().await.unwrap_or(1) } else { 1 + rng.below(servers) };
                if let Some(mut c) = self.nodes[a as usize - 1].child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                tokio::time::sleep(hold).await;
                self.spawn_server(a, false)?;
                format!("SIGKILLed server {a} and started it again")
            }
            Fault::PauseServer => {
                let a = 1 + rng.below(servers);
                let pid = self.nodes[a as usize - 1].child.as_ref().map(|c| c.id());
                let pause = Duration::from_millis(self.args.lease_ms * 2 + 500);
                if let Some(pid) = pid {
                    signal(pid, rustix::process::Signal::STOP)?;
                    tokio::time::sleep(pause).await;
                    signal(pid, rustix::process::Signal::CONT)?;
                }
                format!("SIGSTOPped server {a} for {:.1} s, past the leases", pause.as_secs_f64())
            }
            Fault::PauseClient => {
                let j = 1 + rng.below(self.workers.len() as u64);
                let pid = self.workers[j as usize - 1].child.as_ref().map(|c| c.id());
                let pause = Duration::from_millis(self.args.lease_ms * 2 + 500);
                if let Some(pid) = pid {
                    signal(pid, rustix::process::Signal::STOP)?;
                    tokio::time::sleep(pause).await;
                    signal(pid, rustix::process::Signal::CONT)?;
                }
                format!("SIGSTOPped client {j} for {:.1} s, past its lease", pause.as_secs_f64())
            }
            Fault::KillClient => {
                let j = 1 + rng.below(self.workers.len() as u64);
                if let Some(mut c) = self.workers[j as usize - 1].child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                tokio::time::sleep(hold / 2).await;
                format!("SIGKILLed client {j} (started again)")
            }
            Fault::DiskFull => {
                let id = self.nodes.len() as u64;
                let filler = self.nodes[id as usize - 1].data.join("filler");
                let filled = fill(&filler);
                tokio::time::sleep(hold).await;
                let _ = std::fs::remove_file(&filler);
                format!("filled server {id}'s disk ({} MiB to ENOSPC)", filled / (1 << 20))
            }
        };
        Ok(what)
    }
}

/// Writes zeros to `path` until the file system is full; the bytes written.
fn fill(path: &Path) -> u64 {
    use std::io::Write;
    let Ok(mut f) = std::fs::File::create(path) else { return 0 };
    let chunk = vec![0u8; 1 << 20];
    let mut n = 0;
    while f.write_all(&chunk).is_ok() {
        n += chunk.len() as u64;
        if n > (TMPFS_MIB + 64) << 20 {
            break;
        }
    }
    n
}

/// The bytes of `path` (all, or `range`), read under a PR lock from the root namespace.
async fn read_file(addrs: &[String], path: &str, len: u64) -> Result<Vec<u8>> {
    let session = Session::open(addrs, 10_000).await?;
    let options = LockOptions { timeout: Some(Duration::from_secs(20)), ..Default::default() };
    let g = session.lock(path, 0..u64::MAX, Mode::PR, options).await?;
    let mut files = crate::files::files_client(addrs).await?;
    let req = wire::v1::GetRequest {
        path: path.into(),
        token: g.signed_token.clone(),
        range: Some(wire::convert::span_to_pb(&(0..len))),
    };
    let mut out = Vec::new();
    let mut stream = files.get(req).await.map_err(crate::cluster::status_error)?.into_inner();
    while let Some(c) = stream.message().await.map_err(crate::cluster::status_error)? {
        out.extend_from_slice(&c.data);
    }
    let _ = session.unlock(g.lock).await;
    session.close().await;
    Ok(out)
}

fn read_history(dir: &Path) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("history-")) {
            let text = std::fs::read_to_string(&p)?;
            // A worker killed mid-line leaves a torn last line: passed over.
            out.extend(text.lines().filter_map(|l| serde_json::from_str::<Record>(l).ok()));
        }
    }
    Ok(out)
}

#[derive(Debug, Default, serde::Serialize)]
struct Recovery {
    leader_kill_to_first_grant_ms: Vec<u64>,
    holder_death_to_regrant_ms: Vec<u64>,
    storage_loss_to_first_degraded_read_ms: Vec<u64>,
    full_restart_to_all_locks_back_ms: Vec<u64>,
    locks_held_over_restart: u64,
}

pub fn run(args: FaultArgs) -> Result<ExitCode> {
    net::preflight()?;
    if !(3..=5).contains(&args.servers) {
        bail!("--servers must be from 3 to 5, not {}", args.servers);
    }
    if !(1..=8).contains(&args.clients) {
        bail!("--clients must be from 1 to 8, not {}", args.clients);
    }
    if !(10..=3600).contains(&args.seconds) {
        bail!("--seconds must be from 10 to 3600, not {}", args.seconds);
    }
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("stripelock-faults-{}", std::process::id())));
    if dir.exists() {
        bail!("{} exists: give --dir a new directory", dir.display());
    }
    std::fs::create_dir_all(&dir)?;
    let dir = dir.canonicalize()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let result = rt.block_on(campaign(args.clone(), dir.clone()));
    match &result {
        Ok(code) if *code == ExitCode::SUCCESS && !args.keep => {
            let _ = std::fs::remove_dir_all(&dir);
        }
        _ => eprintln!("the campaign's logs and histories are kept in {}", dir.display()),
    }
    result
}

async fn campaign(args: FaultArgs, dir: PathBuf) -> Result<ExitCode> {
    let net = Net::new(args.servers, args.clients);
    let exe = std::env::current_exe().context("cannot find the stripelock executable")?;
    let tls = dir.join("tls");
    crate::certscmd::init_in(&tls).context("cannot make the campaign's certificates")?;
    wire::use_tls(wire::Tls::from_dir(&tls, "client")?);
    let nodes: Vec<Node> = (1..=args.servers)
        .map(|i| Node {
            id: i,
            addr: format!("{}:7000", net.server_ip(i)),
            data: dir.join(format!("s{i}")),
            child: None,
        })
        .collect();
    let peers = nodes.iter().map(|n| format!("{}={}", n.id, n.addr)).collect::<Vec<_>>().join(",");
    let started = Instant::now();
    let workers_until = started + Duration::from_secs(args.seconds + 25);
    let mut c = Campaign {
        net: net.clone(),
        exe,
        dir: dir.clone(),
        tls,
        peers,
        nodes,
        workers: (1..=args.clients).map(|id| Worker { id, child: None }).collect(),
        tmpfs: None,
        started,
        workers_until,
        notes: Vec::new(),
        unhealed: None,
        args: args.clone(),
    };
    net.create().context("cannot make the campaign's network namespaces")?;
    let last = c.nodes[args.servers as usize - 1].data.clone();
    std::fs::create_dir_all(&last)?;
    net::sh("mount", &["-t", "tmpfs", "-o", &format!("size={TMPFS_MIB}m"), "tmpfs", &last.to_string_lossy()])?;
    c.tmpfs = Some(last);
    c.say(&format!(
        "{} servers in namespaces {}..{}, {} clients, subnet {}.0/24{}",
        args.servers,
        net.server_ns(1),
        net.server_ns(args.servers),
        args.clients,
        net.subnet,
        if args.negative_control { "; NEGATIVE CONTROL: fencing switched off in every server" } else { "" }
    ));
    for i in 1..=args.servers {
        c.spawn_server(i, i == 1)?;
    }
    c.healthy(Duration::from_secs(60)).await?;
    // The files the workers use.
    let zeros = dir.join("zeros");
    std::fs::write(&zeros, vec![0u8; FILE_BYTES as usize])?;
    let counter = dir.join("counter");
    std::fs::write(&counter, history::counter_text(0))?;
    for r in 0..COUNTERS {
        c.cli(&["put", &counter.to_string_lossy(), &format!("/faults/counter-{r}")])?;
    }
    for j in 1..=args.clients {
        c.cli(&["put", &zeros.to_string_lossy(), &format!("/faults/data-{j}")])?;
    }
    let sessions_before = crate::cluster::status_from(&c.nodes[0].addr).await.map(|s| s.sessions).unwrap_or(0);
    c.started = Instant::now();
    c.workers_until = c.started + Duration::from_secs(args.seconds + 10);
    for j in 1..=args.clients {
        c.spawn_worker(j)?;
    }
    c.say("workers started; the nemesis begins");
    // The nemesis: every kind of fault in turn, in a shuffled order each round.
    let mut rng = Rng(args.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut faults: Vec<(String, String)> = Vec::new();
    let mut deck: Vec<Fault> = Vec::new();
    let nemesis_until = c.started + Duration::from_secs(args.seconds);
    while Instant::now() < nemesis_until {
        if deck.is_empty() {
            deck = FAULTS.to_vec();
            for k in (1..deck.len()).rev() {
                deck.swap(k, rng.below(k as u64 + 1) as usize);
            }
        }
        // The negative control pauses a client past its lease every other fault: the fault
        // whose harm (a stale holder's write landing) fencing exists to prevent.
        let f = if args.negative_control && faults.len().is_multiple_of(2) {
            Fault::PauseClient
        } else {
            deck.pop().unwrap_or(Fault::Loss)
        };
        let what = c.inject(f, &mut rng).await?;
        faults.push((f.name().to_string(), what.clone()));
        c.say(&format!("fault {}: {what}", faults.len()));
        tokio::time::sleep(Duration::from_millis(700)).await;
        c.restart_dead()?;
    }
    c.say("the nemesis stops; the workers go on a little, then stop");
    for i in 1..=args.servers {
        c.net.heal(i);
    }
    c.restart_dead()?;
    // Workers end by themselves (their deadline, then the grace for writes not yet answered).
    let wait_until = c.workers_until + Duration::from_secs(60);
    for w in &mut c.workers {
        while let Some(ch) = &mut w.child {
            if matches!(ch.try_wait(), Ok(Some(_))) {
                w.child = None;
            } else if Instant::now() > wait_until {
                let _ = ch.kill();
                let _ = ch.wait();
                w.child = None;
            } else {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let ops_seconds = c.started.elapsed().as_secs_f64();
    if let Err(e) = c.healthy(Duration::from_secs(90)).await {
        // Reads need a leader; what is reachable is still checked, and this is a finding.
        let note = format!("after the faults were healed: {e:#}");
        c.say(&note);
        c.unhealed = Some(note);
    }
    c.say("checking the history");
    let addrs = c.addrs();
    let mut finals = Finals::default();
    let mut unreadable = Vec::new();
    for r in 0..COUNTERS {
        let path = format!("/faults/counter-{r}");
        match tokio::time::timeout(Duration::from_secs(30), read_file(&addrs, &path, COUNTER_LEN)).await {
            Ok(Ok(bytes)) => match history::counter_value(&bytes) {
                Some(v) => {
                    finals.counters.insert(path, v);
                }
                None => unreadable.push(format!("{path} holds {bytes:?}, not a counter")),
            },
            Ok(Err(e)) => unreadable.push(format!("{path} could not be read after the faults: {e:#}")),
            Err(_) => unreadable.push(format!("{path} could not be read after the faults within 30 s")),
        }
    }
    for j in 1..=args.clients {
        let path = format!("/faults/data-{j}");
        match tokio::time::timeout(Duration::from_secs(30), read_file(&addrs, &path, FILE_BYTES)).await {
            Ok(Ok(bytes)) => {
                finals.files.insert(path, bytes);
            }
            Ok(Err(e)) => unreadable.push(format!("{path} could not be read after the faults: {e:#}")),
            Err(_) => unreadable.push(format!("{path} could not be read after the faults within 30 s")),
        }
    }
    let records = read_history(&dir)?;
    let mut verdict: Verdict = history::check(&records, &finals);
    if let Some(note) = &c.unhealed {
        verdict.violations.push(format!("the cluster did not heal: {note}"));
    }
    verdict.violations.extend(unreadable);
    // Scrub: every row's parity matches its data.
    // Exit 1: damage found; 2: some units not checked (a server not answering yet): again.
    let mut scrub = serde_json::Value::Null;
    for _ in 0..10 {
        scrub = match c.cli_allowing(&["scrub", "/faults/", "--json"], &[1, 2]) {
            Ok(out) => serde_json::from_str(&out)?,
            Err(e) => {
                verdict.violations.push(format!("scrub failed: {e:#}"));
                break;
            }
        };
        if scrub["unavailable"].as_array().is_none_or(Vec::is_empty) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    if let Some(left) = scrub["unavailable"].as_array().filter(|u| !u.is_empty()) {
        verdict.violations.push(format!("scrub could not check {} units: {:?}", left.len(), left.first()));
    }
    for key in ["damaged", "parity_mismatches"] {
        for bad in scrub[key].as_array().into_iter().flatten() {
            verdict.violations.push(format!("scrub: {key}: {bad}"));
        }
    }
    // Nothing leaked: the workers' locks are gone once their leases have run out.
    tokio::time::sleep(Duration::from_millis(args.lease_ms * 3 + 2_000)).await;
    // (The servers' own sessions keep locks cached: stripe locks, their read caches.)
    let worker_sessions: std::collections::BTreeSet<u64> = records
        .iter()
        .filter_map(|r| match r {
            Record::Session { session, .. } => Some(*session),
            _ => None,
        })
        .collect();
    let table = crate::cluster::table_any(&addrs, "/").await.unwrap_or_default();
    for r in &table.resources {
        for l in r.locks.iter().filter(|l| worker_sessions.contains(&l.session)) {
            verdict.violations.push(format!("lock leaked: {} lock {} of worker session {}", r.name, l.lock, l.session));
        }
        for p in r.posix.iter().filter(|p| worker_sessions.contains(&p.session)) {
            verdict.violations.push(format!("POSIX lock leaked: {} of worker session {}", r.name, p.session));
        }
    }
    let sessions_after = crate::cluster::status_from(&addrs[0]).await.map(|s| s.sessions).unwrap_or(0);
    // Each server may open a few sessions of its own (stripe writes, its read cache).
    if sessions_after > sessions_before + 3 * args.servers {
        verdict.violations.push(format!(
            "sessions leaked: {sessions_before} before the workers, {sessions_after} after they all ended"
        ));
    }
    let lock_ops = verdict.grants + verdict.refused;
    let recovery = if args.recovery && !args.negative_control && c.unhealed.is_none() {
        c.say("measuring recovery");
        match recovery(&mut c).await {
            Ok(r) => Some(r),
            Err(e) => {
                let note = format!("the recovery figures stopped: {e:#}");
                c.say(&note);
                c.notes.push(note);
                None
            }
        }
    } else {
        None
    };
    let mut kinds = std::collections::BTreeMap::<&str, u64>::new();
    for (k, _) in &faults {
        *kinds.entry(k.as_str()).or_default() += 1;
    }
    let report = json!({
        "servers": args.servers, "clients": args.clients, "seconds": args.seconds, "seed": args.seed,
        "negative_control": args.negative_control,
        "lock_ops": lock_ops, "grants": verdict.grants, "refused": verdict.refused,
        "late_grants": verdict.late_grants,
        "lock_ops_per_second": (lock_ops as f64 / ops_seconds).round(),
        "increments_acked": verdict.increments_acked, "increments_unknown": verdict.increments_unknown,
        "writes_acked": verdict.writes_acked, "writes_unknown": verdict.writes_unknown,
        "faults": faults.len(), "fault_kinds": kinds,
        "scrub": {"rows": scrub["rows"], "units": scrub["units_checked"], "unavailable": scrub["unavailable"]},
        "sessions_before": sessions_before, "sessions_after": sessions_after,
        "violations": verdict.violations, "notes": c.notes, "recovery": recovery,
    });
    let path = dir.join("report.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
    if args.json {
        println!("{report}");
    } else {
        print_report(&report, &faults);
    }
    let violations = verdict.violations.len();
    let ok = if args.negative_control { violations > 0 } else { violations == 0 };
    if args.negative_control && !args.json {
        if violations > 0 {
            println!("negative control: the checker found {violations} violations with fencing off, as it must");
        } else {
            println!("negative control FAILED: fencing was off and the checker found nothing");
        }
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn print_report(r: &serde_json::Value, faults: &[(String, String)]) {
    println!(
        "fault campaign: {} servers, {} clients, {} s (seed {})",
        r["servers"], r["clients"], r["seconds"], r["seed"]
    );
    println!(
        "  lock ops       {} ({} granted, {} not granted, {} granted after the lease ran out; {} /s)",
        r["lock_ops"], r["grants"], r["refused"], r["late_grants"], r["lock_ops_per_second"]
    );
    println!("  increments     {} acknowledged, {} unanswered", r["increments_acked"], r["increments_unknown"]);
    println!("  partial writes {} acknowledged, {} unanswered", r["writes_acked"], r["writes_unknown"]);
    println!("  faults         {} ({})", r["faults"], r["fault_kinds"]);
    println!("  scrub          {} rows, {} units", r["scrub"]["rows"], r["scrub"]["units"]);
    println!("  sessions       {} before the workers, {} after", r["sessions_before"], r["sessions_after"]);
    let _ = faults;
    if let Some(rec) = r["recovery"].as_object() {
        for (k, v) in rec {
            println!("  {k:<40} {v}");
        }
    }
    for n in r["notes"].as_array().into_iter().flatten() {
        println!("  note: {}", n.as_str().unwrap_or_default());
    }
    let v = r["violations"].as_array().map_or(0, Vec::len);
    println!("  violations     {v}");
    for line in r["violations"].as_array().into_iter().flatten() {
        println!("    {}", line.as_str().unwrap_or_default());
    }
}

/// Grants of a probe session looping lock/unlock on `resource`: the instants they came.
fn probe(
    addrs: Vec<String>,
    resource: &'static str,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Vec<Instant>> {
    tokio::spawn(async move {
        let mut grants = Vec::new();
        let mut session: Option<Session> = None;
        while !*stop.borrow() {
            if session.is_none() {
                session = tokio::time::timeout(Duration::from_secs(5), Session::open(&addrs, 3_000))
                    .await
                    .ok()
                    .and_then(Result::ok);
                if session.is_none() {
                    continue;
                }
            }
            let s = session.clone().expect("opened");
            let options = LockOptions { timeout: Some(Duration::from_secs(2)), ..Default::default() };
            match tokio::time::timeout(Duration::from_secs(4), s.lock(resource, 0..u64::MAX, Mode::EX, options)).await {
                Ok(Ok(g)) => {
                    grants.push(Instant::now());
                    let _ = tokio::time::timeout(Duration::from_secs(2), s.unlock(g.lock)).await;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok(Err(client::ClientError::TimedOut)) => {}
                _ => session = None,
            }
        }
        grants
    })
}

async fn recovery(c: &mut Campaign) -> Result<Recovery> {
    let mut rec = Recovery::default();
    let addrs = c.addrs();
    // Leader SIGKILL -> the first grant after it.
    for _ in 0..3 {
        c.healthy(Duration::from_secs(60)).await?;
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let p = probe(addrs.clone(), "/probe/leader", stop);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let l = c.healthy(Duration::from_secs(10)).await?;
        let killed = Instant::now();
        if let Some(mut ch) = c.nodes[l as usize - 1].child.take() {
            let _ = ch.kill();
            let _ = ch.wait();
        }
        tokio::time::sleep(Duration::from_secs(8)).await;
        let _ = stop_tx.send(true);
        let grants = p.await?;
        if let Some(first) = grants.iter().find(|g| **g > killed) {
            rec.leader_kill_to_first_grant_ms.push((*first - killed).as_millis() as u64);
        }
        c.spawn_server(l, false)?;
    }
    // A holder's death -> the waiter's grant.
    for _ in 0..3 {
        c.healthy(Duration::from_secs(60)).await?;
        let mut holder = Command::new("ip")
            .args(["netns", "exec", &c.net.client_ns(1)])
            .arg(&c.exe)
            .arg("--tls-dir")
            .arg(&c.tls)
            .args(["bench", "faults-worker", "--id", "99", "--cluster", &c.cluster_flag(), "--dir"])
            .arg(&c.dir)
            .args(["--seconds", "60", "--lease-ms", &c.args.lease_ms.to_string(), "--hold", "/probe/holder"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let mut line = String::new();
        {
            use std::io::BufRead;
            let out = holder.stdout.take().context("holder's output")?;
            let mut reader = std::io::BufReader::new(out);
            tokio::task::block_in_place(|| reader.read_line(&mut line))?;
        }
        if !line.starts_with("held") {
            let _ = holder.kill();
            bail!("the probe holder did not take its lock: {line:?}");
        }
        let session = Session::open(&addrs, 10_000).await?;
        let waiter = {
            let s = session.clone();
            tokio::spawn(async move {
                let options = LockOptions { timeout: Some(Duration::from_secs(30)), ..Default::default() };
                let r = s.lock("/probe/holder", 0..u64::MAX, Mode::EX, options).await;
                (r, Instant::now())
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let killed = Instant::now();
        let _ = holder.kill();
        let _ = holder.wait();
        let (r, at) = waiter.await?;
        if let Ok(g) = r {
            rec.holder_death_to_regrant_ms.push((at - killed).as_millis() as u64);
            let _ = session.unlock(g.lock).await;
        }
        session.close().await;
    }
    // A storage server lost -> the first read that rebuilt from parity.
    let mib = c.dir.join("probe-data");
    std::fs::write(&mib, history::data_of(1, 1, 4 << 20))?;
    c.cli(&["put", &mib.to_string_lossy(), "/probe/data"])?;
    for _ in 0..3 {
        let l = c.healthy(Duration::from_secs(60)).await?;
        let victim = (1..=c.nodes.len() as u64).find(|i| *i != l).unwrap_or(1);
        let killed = Instant::now();
        if let Some(mut ch) = c.nodes[victim as usize - 1].child.take() {
            let _ = ch.kill();
            let _ = ch.wait();
        }
        let others: Vec<String> = c.nodes.iter().filter(|n| n.id != victim).map(|n| n.addr.clone()).collect();
        let until = killed + Duration::from_secs(30);
        while Instant::now() < until {
            if let Ok(Ok(bytes)) =
                tokio::time::timeout(Duration::from_secs(5), read_file(&others, "/probe/data", 4 << 20)).await
                && bytes.len() == 4 << 20
            {
                rec.storage_loss_to_first_degraded_read_ms.push(killed.elapsed().as_millis() as u64);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        c.spawn_server(victim, false)?;
    }
    // A full restart -> every lock held before it is back.
    const HELD: u64 = 100;
    for _ in 0..2 {
        c.healthy(Duration::from_secs(60)).await?;
        let session = Session::open(&addrs, 30_000).await?;
        for k in 0..HELD {
            session.lock(&format!("/probe/restart-{k}"), 0..u64::MAX, Mode::EX, LockOptions::default()).await?;
        }
        for n in &mut c.nodes {
            if let Some(mut ch) = n.child.take() {
                let _ = ch.kill();
                let _ = ch.wait();
            }
        }
        let restarted = Instant::now();
        for i in 1..=c.nodes.len() as u64 {
            c.spawn_server(i, false)?;
        }
        // Back means: the holder's session lives on and the cluster grants again (a new lock
        // to the same session), and the table lists every lock it held.
        let until = restarted + Duration::from_secs(60);
        while Instant::now() < until {
            let options = LockOptions { timeout: Some(Duration::from_secs(1)), ..Default::default() };
            let fresh = tokio::time::timeout(
                Duration::from_secs(2),
                session.lock("/probe/restart-new", 0..u64::MAX, Mode::EX, options),
            )
            .await;
            if let Ok(Ok(g)) = fresh {
                // The table of whichever server answers first, which may still be applying
                // its log: asked again until it lists every lock, for up to 10 s.
                let mut held = 0;
                let asked = Instant::now();
                while asked.elapsed() < Duration::from_secs(10) {
                    let t = crate::cluster::table_any(&addrs, "/probe/restart-").await?;
                    held = t
                        .resources
                        .iter()
                        .filter(|r| r.name != "/probe/restart-new")
                        .flat_map(|r| &r.locks)
                        .filter(|l| l.granted && l.session == session.id())
                        .count() as u64;
                    if held == HELD {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if held != HELD {
                    bail!("after a full restart the holder's session has {held} of its {HELD} locks");
                }
                rec.full_restart_to_all_locks_back_ms.push(restarted.elapsed().as_millis() as u64);
                let _ = session.unlock(g.lock).await;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        rec.locks_held_over_restart = HELD;
        session.close().await;
    }
    Ok(rec)
}
