//! `cargo run -p sim -- --seed N` replays one seed of the cluster simulation (real servers and
//! clients over turmoil); `--seeds A..B` runs a range, each seed in a process of its own (`--jobs
//! J` at once) so that no seed's run depends on the ones before it; `--break-fencing`,
//! `--break-gateway`, `--break-storage-fence` and `--break-fresh-lease` run the negative controls; `--log` runs the faster log-level simulation instead. Exit 1 on the first
//! violation.

use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    // `SIM_LOG=lockservice=debug` prints the servers' own log lines (to stderr), for a seed
    // being replayed.
    if let Ok(filter) = std::env::var("SIM_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .without_time()
            .with_writer(std::io::stderr)
            .init();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut seeds = 0..100u64;
    let mut break_fencing = false;
    let mut break_storage_fence = false;
    let mut break_gateway = false;
    let mut break_fresh_lease = false;
    let mut log_level = false;
    let mut jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut i = 0;
    while i < args.len() {
        match (args[i].as_str(), args.get(i + 1)) {
            ("--seed", Some(n)) => {
                let Ok(n) = n.parse() else { return usage() };
                seeds = n..n + 1;
                i += 1;
            }
            ("--seeds", Some(r)) => {
                let Some((a, b)) = r.split_once("..").and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
                else {
                    return usage();
                };
                seeds = a..b;
                i += 1;
            }
            ("--jobs", Some(n)) => {
                let Ok(n) = n.parse::<usize>() else { return usage() };
                jobs = n.max(1);
                i += 1;
            }
            ("--break-fencing", _) => break_fencing = true,
            ("--break-storage-fence", _) => break_storage_fence = true,
            ("--break-gateway", _) => break_gateway = true,
            ("--break-fresh-lease", _) => break_fresh_lease = true,
            ("--log", _) => log_level = true,
            _ => return usage(),
        }
        i += 1;
    }
    if !log_level && !cfg!(tokio_unstable) {
        eprintln!(
            "note: built without --cfg tokio_unstable (is RUSTFLAGS set? it overrides .cargo/config.toml): \
             tokio's scheduling is not seeded, so a seed may not replay exactly"
        );
    }
    let count = seeds.end - seeds.start;
    let mut breaks = Vec::new();
    if break_fencing {
        breaks.push("--break-fencing");
    }
    if break_gateway {
        breaks.push("--break-gateway");
    }
    if break_storage_fence {
        breaks.push("--break-storage-fence");
    }
    if break_fresh_lease {
        breaks.push("--break-fresh-lease");
    }
    let flags: String =
        (log_level.then_some("--log").into_iter().chain(breaks.iter().copied())).map(|f| format!(" {f}")).collect();
    let started = Instant::now();
    if count > 1 && !log_level {
        return run_processes(seeds, jobs, &breaks, started);
    }
    for seed in seeds {
        let t = Instant::now();
        let result = if log_level {
            let cfg = sim::Config { break_fencing, break_storage_fence, ..sim::Config::default() };
            sim::run(seed, &cfg).map(|r| {
                format!(
                    "{} entries, {} grants, {} expiries, {} fence-acks, {} leader changes, {} restores, digest {:016x}",
                    r.entries, r.grants, r.expiries, r.fence_acks, r.leader_changes, r.restores, r.digest
                )
            })
        } else {
            let cfg = sim::cluster::ClusterConfig {
                break_fencing,
                break_gateway,
                break_storage_fence,
                break_fresh_lease,
                ..Default::default()
            };
            sim::cluster::run(seed, &cfg).map(|r| {
                format!(
                    "{} entries, {} grants ({} seen by clients), {} gateway-reads, {} expiries, {} fence-acks, \
                     {} crashes, {} partitions, {} pauses, {} epochs, digest {:016x}",
                    r.entries,
                    r.grants,
                    r.client_grants,
                    r.gateway_reads,
                    r.expiries,
                    r.fence_acks,
                    r.crashes,
                    r.partitions,
                    r.pauses,
                    r.epochs,
                    r.digest
                )
            })
        };
        match result {
            Ok(line) => println!("seed {seed}: ok in {:.1} s: {line}", t.elapsed().as_secs_f64()),
            Err(v) => {
                println!("VIOLATION {v}");
                println!("replay: cargo run -p sim -- --seed {seed}{flags}");
                return ExitCode::from(1);
            }
        }
    }
    if count > 1 {
        println!("{count} seeds: 0 violations ({:.0} s)", started.elapsed().as_secs_f64());
    }
    ExitCode::SUCCESS
}

/// Runs each seed as `sim --seed N` in a child process, `jobs` at a time, printing results in
/// seed order; stops at the first violation.
fn run_processes(seeds: std::ops::Range<u64>, jobs: usize, breaks: &[&str], started: Instant) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("cannot find this program to run the seeds: {e}");
            return ExitCode::from(2);
        }
    };
    let count = seeds.end - seeds.start;
    let mut next = seeds.start;
    let mut running: std::collections::VecDeque<(u64, std::process::Child)> = Default::default();
    loop {
        while running.len() < jobs && next < seeds.end {
            let mut cmd = std::process::Command::new(&exe);
            cmd.args(["--seed", &next.to_string()]).args(breaks).stdout(std::process::Stdio::piped());
            match cmd.spawn() {
                Ok(child) => running.push_back((next, child)),
                Err(e) => {
                    eprintln!("cannot start seed {next}: {e}");
                    return ExitCode::from(2);
                }
            }
            next += 1;
        }
        let Some((seed, child)) = running.pop_front() else { break };
        let out = match child.wait_with_output() {
            Ok(o) => o,
            Err(e) => {
                eprintln!("seed {seed}: {e}");
                return ExitCode::from(2);
            }
        };
        print!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            for (_, mut c) in running {
                let _ = c.kill();
                let _ = c.wait();
            }
            return ExitCode::from(1);
        }
    }
    println!("{count} seeds: 0 violations ({:.0} s)", started.elapsed().as_secs_f64());
    ExitCode::SUCCESS
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: sim [--seed N | --seeds A..B] [--jobs J] [--break-fencing] [--break-gateway] [--break-storage-fence] [--log]"
    );
    ExitCode::from(2)
}
