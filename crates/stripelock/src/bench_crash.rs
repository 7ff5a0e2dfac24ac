//! `stripelock bench chunk-crash`: the segment store under kill -9 (issue 16). A writer process
//! (`stripelock debug chunk-writer`) overwrites units from four threads, printing each version
//! once its put has returned; it is killed at a random moment, again and again. After each kill
//! the volume is opened (replaying its tail, cutting a torn record) and every unit must read back
//! whole, at its last acknowledged version or the one put after it (a put cut short by the kill),
//! with exactly the bytes of that version: never garbage, never older.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chunks::segments::{SegDevice, SegOptions};
use chunks::{ChunkStore, Unit, UnitId};
use layout::Role;

/// Units each writer thread owns (rows of its own file).
const ROWS: u64 = 16;
const THREADS: u64 = 4;
/// Small segments, so the writer rolls and compacts many times between kills.
const SEGMENT_BYTES: u64 = 256 << 10;

fn options() -> SegOptions {
    SegOptions { segment_bytes: SEGMENT_BYTES, compact: true }
}

fn key() -> token::ClusterKey {
    token::ClusterKey::from_bytes([7; 32])
}

/// The bytes of version `v` of unit (`file`, `row`): 1 B to 64 KiB, from a hash of the three.
fn content(file: u64, row: u64, v: u64) -> Vec<u8> {
    let mut x = (file.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ row.wrapping_mul(0xc2b2_ae3d_27d4_eb4f) ^ v)
        .wrapping_add(0x1656_67b1_9e37_79f9)
        | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let len = 1 + (next() % 65_536) as usize;
    (0..len).map(|_| next() as u8).collect()
}

fn unit(file: u64, row: u64) -> UnitId {
    UnitId { file, row, role: Role::Data(0) }
}

/// The writer: overwrites its units until killed, printing `FILE ROW VERSION` after each put.
pub fn writer(dir: &Path, seed: u64) -> Result<()> {
    let store = ChunkStore::new(SegDevice::open_with(dir, options())?, key());
    let out = std::sync::Mutex::new(std::io::stdout());
    std::thread::scope(|s| -> Result<()> {
        let mut threads = Vec::new();
        for t in 0..THREADS {
            let (store, out) = (&store, &out);
            threads.push(s.spawn(move || -> Result<()> {
                let mut x = seed.wrapping_mul(31).wrapping_add(t + 1) | 1;
                loop {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let (file, row) = (t + 1, x % ROWS);
                    let id = unit(file, row);
                    let v = store.read(&id)?.map_or(0, |u| u.version) + 1;
                    let u = Unit { bytes: content(file, row, v), version: v, highest_token: 0, covers: Vec::new() };
                    store.restore(&id, &u)?;
                    let mut o = out.lock().expect("stdout");
                    writeln!(o, "{file} {row} {v}")?;
                    o.flush()?;
                }
            }));
        }
        for t in threads {
            t.join().expect("a writer thread")?;
        }
        Ok(())
    })
}

/// What a campaign found.
#[derive(Debug, Default, serde::Serialize)]
pub struct CrashReport {
    pub kills: u64,
    pub acknowledged_puts: u64,
    pub units_checked: u64,
    pub cut_short_puts_found: u64,
    pub records_replayed: u64,
    pub torn_bytes_cut: u64,
    pub violations: Vec<String>,
    pub seconds: f64,
}

/// Kills the writer `kills` times (at most `seconds` in all) and checks the volume after each.
pub fn campaign(kills: u64, seconds: u64, dir: &Path, seed: u64, json: bool) -> Result<std::process::ExitCode> {
    if dir.exists() {
        bail!("{} exists; give --dir a path that does not, it is removed afterwards", dir.display());
    }
    let exe = std::env::current_exe().context("cannot find this stripelock binary")?;
    let start = Instant::now();
    let mut report = CrashReport::default();
    // The newest version each unit is known to have reached (acknowledged or read back).
    let mut floor: BTreeMap<(u64, u64), u64> = BTreeMap::new();
    let mut x = seed | 1;
    let mut rand = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    while report.kills < kills && start.elapsed() < Duration::from_secs(seconds) {
        let mut child = Command::new(&exe)
            .args(["debug", "chunk-writer", "--dir"])
            .arg(dir)
            .args(["--seed", &rand(u64::MAX).to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start the writer")?;
        let stdout = child.stdout.take().expect("piped");
        let reader = std::thread::spawn(move || {
            std::io::BufReader::new(stdout).lines().map_while(Result::ok).collect::<Vec<String>>()
        });
        // Wait for the first acknowledgement's worth of start-up, then a random while more.
        std::thread::sleep(Duration::from_millis(40 + rand(200)));
        child.kill().context("cannot kill the writer")?;
        child.wait()?;
        report.kills += 1;
        for line in reader.join().expect("the reader") {
            let n: Vec<u64> = line.split(' ').filter_map(|w| w.parse().ok()).collect();
            let [file, row, v] = n[..] else { bail!("the writer printed `{line}`") };
            report.acknowledged_puts += 1;
            let f = floor.entry((file, row)).or_default();
            *f = (*f).max(v);
        }
        let dev = SegDevice::open_with(dir, SegOptions { compact: false, ..options() })
            .with_context(|| format!("the volume did not open after kill {}", report.kills))?;
        let stats = dev.stats();
        report.records_replayed += stats.records_replayed;
        report.torn_bytes_cut += stats.torn_bytes_cut;
        let store = ChunkStore::new(dev, key());
        for file in 1..=THREADS {
            for row in 0..ROWS {
                let f = floor.get(&(file, row)).copied().unwrap_or(0);
                report.units_checked += 1;
                let what = format!("kill {}: unit {file}/{row}", report.kills);
                match store.read(&unit(file, row)) {
                    Ok(None) if f == 0 => {}
                    Ok(None) => report.violations.push(format!("{what}: gone, acknowledged at version {f}")),
                    Ok(Some(u)) if u.version < f => {
                        report.violations.push(format!("{what}: version {} read, {f} acknowledged", u.version))
                    }
                    Ok(Some(u)) if u.version > f + 1 => report.violations.push(format!(
                        "{what}: version {} read, only {} was ever put",
                        u.version,
                        f + 1
                    )),
                    Ok(Some(u)) if u.bytes != content(file, row, u.version) => report
                        .violations
                        .push(format!("{what}: version {} has other bytes than it was put with", u.version)),
                    Ok(Some(u)) => {
                        if u.version > f {
                            report.cut_short_puts_found += 1;
                            floor.insert((file, row), u.version);
                        }
                    }
                    Err(e) => report.violations.push(format!("{what}: {e}")),
                }
            }
        }
        if !json && report.kills.is_multiple_of(10) {
            eprintln!(
                "  {} kills, {} puts acknowledged, {} violations",
                report.kills,
                report.acknowledged_puts,
                report.violations.len()
            );
        }
    }
    report.seconds = start.elapsed().as_secs_f64();
    std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("segment store under kill -9: {} kills in {:.1} s", report.kills, report.seconds);
        println!("  puts acknowledged      {}", report.acknowledged_puts);
        println!("  units checked          {}", report.units_checked);
        println!("  cut-short puts found   {} (written, killed before acknowledged)", report.cut_short_puts_found);
        println!("  records replayed       {}", report.records_replayed);
        println!("  torn bytes cut off     {}", report.torn_bytes_cut);
        println!("  violations             {}", report.violations.len());
        for v in report.violations.iter().take(20) {
            println!("    {v}");
        }
    }
    Ok(if report.violations.is_empty() { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::from(1) })
}
