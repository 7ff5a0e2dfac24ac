//! `cargo run -p sim -- --seed N` replays one seed; `--seeds A..B` runs a range;
//! `--break-fencing` runs the negative control. Exit 1 on the first violation.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut seeds = 0..100u64;
    let mut cfg = sim::Config::default();
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
            ("--break-fencing", _) => cfg.break_fencing = true,
            _ => return usage(),
        }
        i += 1;
    }
    let count = seeds.end - seeds.start;
    for seed in seeds {
        match sim::run(seed, &cfg) {
            Ok(r) if count == 1 => println!(
                "seed {seed}: ok — {} entries, {} grants, {} expiries, {} leader changes, {} restores, digest {:016x}",
                r.entries, r.grants, r.expiries, r.leader_changes, r.restores, r.digest
            ),
            Ok(_) => {}
            Err(v) => {
                println!("VIOLATION {v}");
                println!(
                    "replay: cargo run -p sim -- --seed {seed}{}",
                    if cfg.break_fencing { " --break-fencing" } else { "" }
                );
                return ExitCode::from(1);
            }
        }
    }
    if count > 1 {
        println!("{count} seeds: 0 violations");
    }
    ExitCode::SUCCESS
}

fn usage() -> ExitCode {
    eprintln!("usage: sim [--seed N | --seeds A..B] [--break-fencing]");
    ExitCode::from(2)
}
