//! `stripelock bench engine`: how fast the lock engine decides, on one core, with no I/O.
//! Each case runs for a fixed time and counts lock+release cycles (or hand-offs).

use std::hint::black_box;
use std::time::{Duration, Instant};

use lockengine::{ByteRange, Engine, Input, Limits, LockId, Mode, Output, SessionId};

struct Bench {
    engine: Engine,
    out: Vec<Output>,
    next_lock: u64,
}

impl Bench {
    fn new() -> Bench {
        let limits = Limits { locks_per_session_max: 1 << 20, ..Limits::default() };
        Bench { engine: Engine::new(limits), out: Vec::with_capacity(16), next_lock: 0 }
    }

    fn step(&mut self, input: Input) -> &[Output] {
        self.out.clear();
        self.engine.step_into(0, input, &mut self.out);
        &self.out
    }

    fn session(&mut self, id: u64) -> SessionId {
        let s = SessionId(id);
        self.step(Input::OpenSession { session: s, lease_ms: u64::MAX / 4 });
        s
    }

    fn lock(&mut self, session: SessionId, resource: &str, range: ByteRange, mode: Mode) -> LockId {
        self.next_lock += 1;
        let lock = LockId(self.next_lock);
        let out = self.step(Input::Lock { lock, session, resource: resource.to_string(), range, mode, nowait: false });
        assert!(matches!(out.first(), Some(Output::Granted { .. }) | Some(Output::Queued { .. })), "{out:?}");
        lock
    }

    fn release(&mut self, lock: LockId) {
        let out = self.step(Input::Release { lock });
        debug_assert!(matches!(out.first(), Some(Output::Released { .. })), "{out:?}");
    }
}

fn range(i: u64) -> ByteRange {
    ByteRange::new(i * 4096, i * 4096 + 4096).expect("non-empty")
}

/// Runs `op` in batches until `budget` has passed; returns operations per second.
fn measure(budget: Duration, mut op: impl FnMut(u64)) -> f64 {
    // Warm up caches and allocator free lists first.
    for i in 0..1_000 {
        op(i);
    }
    let start = Instant::now();
    let mut done = 0u64;
    while start.elapsed() < budget {
        for _ in 0..1_000 {
            op(done);
            done += 1;
        }
    }
    done as f64 / start.elapsed().as_secs_f64()
}

fn uncontended(budget: Duration) -> f64 {
    let mut b = Bench::new();
    let s = b.session(1);
    let names: Vec<String> = (0..1024).map(|i| format!("/bench/file-{i}")).collect();
    measure(budget, |i| {
        let lock = b.lock(s, &names[(i % 1024) as usize], ByteRange::ALL, Mode::EX);
        b.release(lock);
    })
}

/// Owner `i % n` releases its range and takes it again while every other owner holds theirs.
fn held_by_many(budget: Duration, owners: u64, shared: bool) -> f64 {
    let mut b = Bench::new();
    let mode = if shared { Mode::PR } else { Mode::EX };
    let sessions: Vec<SessionId> = (0..owners).map(|i| b.session(i + 1)).collect();
    let mut held: Vec<LockId> = sessions
        .iter()
        .enumerate()
        .map(|(i, &s)| b.lock(s, "/bench/shared", if shared { range(0) } else { range(i as u64) }, mode))
        .collect();
    measure(budget, |i| {
        let k = (i % owners) as usize;
        b.release(held[k]);
        held[k] = b.lock(sessions[k], "/bench/shared", if shared { range(0) } else { range(k as u64) }, mode);
    })
}

/// Two sessions pass EX on one range back and forth: each hand-off is one release that grants
/// the other session's queued request, plus the next request queueing.
fn handoff(budget: Duration) -> f64 {
    let mut b = Bench::new();
    let s = [b.session(1), b.session(2)];
    let mut holder = b.lock(s[0], "/bench/handoff", ByteRange::ALL, Mode::EX);
    let mut waiter = b.lock(s[1], "/bench/handoff", ByteRange::ALL, Mode::EX);
    measure(budget, |i| {
        b.release(holder);
        black_box(&b.out);
        holder = waiter;
        waiter = b.lock(s[(i % 2) as usize], "/bench/handoff", ByteRange::ALL, Mode::EX);
    })
}

/// Acquire+release of one more range on a resource already holding `n` disjoint granted ranges.
fn beside(budget: Duration, n: u64) -> f64 {
    let mut b = Bench::new();
    let s = b.session(1);
    for i in 0..n {
        b.lock(s, "/bench/crowded", range(2 * i), Mode::EX);
    }
    let t = b.session(2);
    measure(budget, |i| {
        let lock = b.lock(t, "/bench/crowded", range(2 * (i % n) + 1), Mode::EX);
        b.release(lock);
    })
}

pub fn engine(budget: Duration, json: bool) {
    let figures = [
        ("uncontended_acquire_release_per_s", "uncontended acquire+release, distinct resources", uncontended(budget)),
        ("disjoint_64_owners_per_s", "64 owners on disjoint ranges of one resource", held_by_many(budget, 64, false)),
        ("shared_16_pr_holders_per_s", "16 PR holders sharing one range", held_by_many(budget, 16, true)),
        ("ex_handoff_2_sessions_per_s", "EX hand-off between 2 sessions", handoff(budget)),
        ("beside_10_ranges_per_s", "acquire+release beside 10 granted ranges", beside(budget, 10)),
        ("beside_10000_ranges_per_s", "acquire+release beside 10,000 granted ranges", beside(budget, 10_000)),
    ];
    let ratio = figures[4].2 / figures[5].2;
    if json {
        let mut map = serde_json::Map::new();
        for (key, _, value) in &figures {
            map.insert(key.to_string(), serde_json::json!(value.round()));
        }
        map.insert("ratio_10_over_10000".into(), serde_json::json!((ratio * 100.0).round() / 100.0));
        map.insert("seconds_per_case".into(), serde_json::json!(budget.as_secs_f64()));
        println!("{}", serde_json::Value::Object(map));
    } else {
        println!("{:<50} {:>14}", "case (one core, in memory)", "ops/s");
        for (_, label, value) in &figures {
            println!("{label:<50} {value:>14.0}");
        }
        println!("{:<50} {ratio:>14.2}", "10-range rate / 10,000-range rate (goal <= 2)");
    }
}

/// What the clients of a case lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    /// EX on a resource of its own each: every lock and unlock is a log entry.
    Own,
    /// EX on one resource for all: hand-offs.
    Contended,
    /// PR on one file through the attached server's gateway cache (seed 002): after the first
    /// reader per server, no log entry.
    GatewayReads,
}

impl Workload {
    fn label(self) -> &'static str {
        match self {
            Workload::Own => "EX, one each",
            Workload::Contended => "EX, one shared",
            Workload::GatewayReads => "PR via gateway",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Workload::Own => "ex_own",
            Workload::Contended => "ex_contended",
            Workload::GatewayReads => "pr_gateway",
        }
    }
}

/// One measured case against a running cluster.
struct LockCase {
    clients: usize,
    workload: Workload,
    cycles: u64,
    seconds: f64,
    p50_us: u64,
    p99_us: u64,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// `clients` sessions, each doing lock+unlock cycles of `workload` for `duration`. Sessions are
/// spread over the servers in turn.
async fn lock_case(
    addrs: &[String],
    clients: usize,
    workload: Workload,
    duration: Duration,
) -> anyhow::Result<LockCase> {
    let mut sessions = Vec::new();
    for i in 0..clients {
        let mut order = addrs.to_vec();
        order.rotate_left(i % addrs.len());
        sessions.push(client::Session::open(&order, 10_000).await?);
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (i, s) in sessions.iter().cloned().enumerate() {
        let (resource, mode, options) = match workload {
            Workload::Own => (format!("/bench/own/{i}"), client::Mode::EX, client::LockOptions::default()),
            Workload::Contended => ("/bench/contended".to_string(), client::Mode::EX, client::LockOptions::default()),
            Workload::GatewayReads => (
                "/bench/read".to_string(),
                client::Mode::PR,
                client::LockOptions { gateway: true, ..Default::default() },
            ),
        };
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while start.elapsed() < duration {
                let t = Instant::now();
                let g = s.lock(&resource, 0..u64::MAX, mode, options.clone()).await?;
                s.unlock(g.lock).await?;
                latencies.push(t.elapsed().as_micros() as u64);
            }
            Ok::<_, client::ClientError>(latencies)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let seconds = start.elapsed().as_secs_f64();
    for s in sessions {
        s.close().await;
    }
    all.sort_unstable();
    Ok(LockCase {
        clients,
        workload,
        cycles: all.len() as u64,
        seconds,
        p50_us: percentile(&all, 0.5),
        p99_us: percentile(&all, 0.99),
    })
}

/// Re-grants of a cached lock, served by the client library with no round trip.
async fn cached_case(addrs: &[String], duration: Duration) -> anyhow::Result<f64> {
    let s = client::Session::open(addrs, 10_000).await?;
    let g = s.lock("/bench/cached", 0..u64::MAX, client::Mode::PR, client::LockOptions::default()).await?;
    s.cache(g.lock).await?;
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < duration {
        for _ in 0..1_000 {
            let again = s.lock("/bench/cached", 0..4096, client::Mode::PR, client::LockOptions::default()).await?;
            s.unlock(again.lock).await?;
        }
        n += 1_000;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    s.close().await;
    Ok(rate)
}

/// Each server's resident memory (from `/proc`, so only for servers on this machine) and the
/// size of its Raft database, by server id.
async fn server_memory(addrs: &[String]) -> Vec<(u64, Option<u64>, Option<u64>)> {
    let mut out = Vec::new();
    for a in addrs {
        let Ok(st) = crate::cluster::status_from(a).await else { continue };
        let rss = std::fs::read_to_string(format!("/proc/{}/status", st.pid)).ok().and_then(|t| {
            t.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        });
        let db = std::fs::metadata(std::path::Path::new(&st.data_dir).join("raft.redb")).ok().map(|m| m.len());
        out.push((st.server_id, rss.map(|kib| kib * 1024), db));
    }
    out
}

/// One server's memory around a fill: id, resident bytes before and after, Raft database bytes
/// after (`None` where it could not be read).
type ServerMemory = (u64, Option<u64>, Option<u64>, Option<u64>);

/// What filling the table with `held` granted locks took and cost.
struct Filled {
    held: usize,
    seconds: f64,
    servers: Vec<ServerMemory>,
    sessions: Vec<client::Session>,
}

/// Takes `held` EX locks, each on its own range of one of 1,024 resources, over sessions of at
/// most 16,384 locks each spread over the servers, many requests in flight at once.
async fn fill(addrs: &[String], held: usize, json: bool) -> anyhow::Result<Filled> {
    const PER_SESSION: usize = 16_384;
    const IN_FLIGHT: usize = 32;
    let before = server_memory(addrs).await;
    let n_sessions = held.div_ceil(PER_SESSION).max(1);
    let mut sessions = Vec::new();
    for i in 0..n_sessions {
        let mut order = addrs.to_vec();
        order.rotate_left(i % addrs.len());
        sessions.push(client::Session::open(&order, 60_000).await?);
    }
    let start = Instant::now();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (si, s) in sessions.iter().enumerate() {
        let mine = PER_SESSION.min(held - si * PER_SESSION);
        for w in 0..IN_FLIGHT {
            let (s, done) = (s.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                let mut k = w;
                while k < mine {
                    let n = si * PER_SESSION + k;
                    let resource = format!("/bench/held/{}", n % 1024);
                    let at = (n / 1024) as u64;
                    s.lock(&resource, at..at + 1, client::Mode::EX, client::LockOptions::default()).await?;
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    k += IN_FLIGHT;
                }
                Ok::<_, client::ClientError>(())
            }));
        }
    }
    let progress = {
        let done = done.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                if !json {
                    eprintln!("  {} of {held} locks held", done.load(std::sync::atomic::Ordering::Relaxed));
                }
            }
        })
    };
    for t in tasks {
        t.await??;
    }
    progress.abort();
    let seconds = start.elapsed().as_secs_f64();
    // Let the servers settle (flushes, snapshots) before memory is read.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = server_memory(addrs).await;
    let servers = after
        .iter()
        .map(|(id, rss, db)| {
            let was = before.iter().find(|b| b.0 == *id).and_then(|b| b.1);
            (*id, was, *rss, *db)
        })
        .collect();
    Ok(Filled { held, seconds, servers, sessions })
}

/// `stripelock bench lock`: lock+unlock cycles against a running cluster, with `held` more
/// locks granted in the table while it runs.
pub fn lock(
    addrs: Vec<String>,
    clients: &[usize],
    duration: Duration,
    json: bool,
    held: usize,
    disrupt: bool,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (cases, cached, filled, snapshots, disrupted) = rt.block_on(async {
        let filled = if held > 0 {
            if !json {
                eprintln!("filling the table with {held} held locks...");
            }
            Some(fill(&addrs, held, json).await?)
        } else {
            None
        };
        let mut cases = Vec::new();
        for &n in clients {
            for workload in [Workload::Own, Workload::Contended, Workload::GatewayReads] {
                if !json {
                    eprintln!("measuring {n} client(s), {}...", workload.label());
                }
                cases.push(lock_case(&addrs, n, workload, duration).await?);
            }
        }
        let cached = cached_case(&addrs, duration).await?;
        let snapshots = crate::bench_scale::snapshots(&addrs).await;
        let disrupted = if disrupt {
            if !json {
                eprintln!("killing the leader, then wiping a follower (each restarted by `stripelock up`)...");
            }
            Some(crate::bench_scale::disrupt(&addrs).await?)
        } else {
            None
        };
        if let Some(f) = &filled {
            for s in &f.sessions {
                s.clone().close().await;
            }
        }
        Ok::<_, anyhow::Error>((cases, cached, filled, snapshots, disrupted))
    })?;
    let snapshots_json: Vec<_> = snapshots
        .iter()
        .map(|s| {
            serde_json::json!({"server": s.server, "bytes": s.bytes, "locks": s.locks,
                "build_ms": s.build_ms, "restore_ms": s.restore_ms})
        })
        .collect();
    let back_json = |r: &crate::bench_scale::Return| {
        serde_json::json!({"server": r.server, "answered_ms": r.answered_ms, "restore_ms": r.restore_ms,
            "snapshot_bytes": r.snapshot_bytes, "in_step_ms": r.in_step_ms})
    };
    let disrupted_json = disrupted.as_ref().map(|d| {
        serde_json::json!({"killed_leader": d.killed_leader, "failover_ms": d.failover_ms,
            "leader_back": back_json(&d.leader_back),
            "wiped_follower": d.wiped.as_ref().map_or_else(|e| serde_json::json!({"error": e}), back_json)})
    });
    let held_json = filled.as_ref().map(|f| {
        let servers: Vec<_> = f
            .servers
            .iter()
            .map(|(id, before, after, db)| {
                let per_lock = match (before, after) {
                    (Some(b), Some(a)) => Some(a.saturating_sub(*b) as f64 / f.held as f64),
                    _ => None,
                };
                serde_json::json!({"server": id, "rss_before": before, "rss_after": after,
                    "bytes_per_lock": per_lock.map(f64::round), "raft_db_bytes": db})
            })
            .collect();
        serde_json::json!({"held": f.held, "fill_seconds": f.seconds,
            "fill_locks_per_s": (f.held as f64 / f.seconds).round(), "servers": servers})
    });
    if json {
        let list: Vec<_> = cases
            .iter()
            .map(|c| {
                serde_json::json!({
                    "clients": c.clients, "workload": c.workload.key(),
                    "contended": c.workload == Workload::Contended,
                    "cycles_per_s": (c.cycles as f64 / c.seconds).round(),
                    "p50_us": c.p50_us, "p99_us": c.p99_us, "cycles": c.cycles,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"cases": list, "cached_regrant_per_s": cached.round(),
                "seconds_per_case": duration.as_secs_f64(), "held": held_json,
                "snapshots": snapshots_json, "disrupted": disrupted_json})
        );
    } else {
        println!("{:<8} {:<16} {:>12} {:>10} {:>10}", "clients", "locks", "cycles/s", "p50", "p99");
        for c in &cases {
            println!(
                "{:<8} {:<16} {:>12.0} {:>8}µs {:>8}µs",
                c.clients,
                c.workload.label(),
                c.cycles as f64 / c.seconds,
                c.p50_us,
                c.p99_us
            );
        }
        println!("cached re-grant (no round trip): {cached:.0}/s");
        if let Some(f) = &filled {
            println!(
                "held: {} locks taken in {:.1} s ({:.0}/s); per server (resident memory from /proc):",
                f.held,
                f.seconds,
                f.held as f64 / f.seconds
            );
            let mib = |b: Option<u64>| b.map_or("?".to_string(), |b| format!("{:.1} MiB", b as f64 / (1 << 20) as f64));
            for (id, before, after, db) in &f.servers {
                let per_lock = match (before, after) {
                    (Some(b), Some(a)) => format!("{:.0} B/lock", a.saturating_sub(*b) as f64 / f.held as f64),
                    _ => "?".to_string(),
                };
                println!(
                    "  server {id}: RSS {} -> {} ({per_lock}), Raft database {}",
                    mib(*before),
                    mib(*after),
                    mib(*db)
                );
            }
        }
        println!("last snapshot of each server:");
        for x in &snapshots {
            println!(
                "  server {}: {:.1} MiB, {} locks, built in {} ms, last restore {} ms",
                x.server,
                x.bytes as f64 / (1 << 20) as f64,
                x.locks,
                x.build_ms,
                x.restore_ms
            );
        }
        if let Some(d) = &disrupted {
            println!("failover: leader (server {}) killed -> first grant in {} ms", d.killed_leader, d.failover_ms);
            let wiped = d.wiped.as_ref().map_err(|e| println!("  wiped follower restarted: {e}")).ok();
            for (what, r) in [("killed leader restarted", Some(&d.leader_back)), ("wiped follower restarted", wiped)] {
                let Some(r) = r else { continue };
                println!(
                    "  {what} (server {}): answered after {} ms, snapshot restore {} ms ({:.1} MiB), in step with the log after {} ms",
                    r.server,
                    r.answered_ms,
                    r.restore_ms,
                    r.snapshot_bytes as f64 / (1 << 20) as f64,
                    r.in_step_ms
                );
            }
        } else if filled.is_some() {
            println!(
                "(add --disrupt on a cluster run by `stripelock up` to measure failover and a wiped follower's catch-up)"
            );
        }
    }
    Ok(())
}
