//! Issue 16: writes that keep going with servers down, and the resync of a server that returns.
//! Real `stripelock server` processes on loopback, killed with SIGKILL by their own PIDs; every
//! read is compared with a local model of the file.
//!
//! Each test: kill `m` servers of a k+m layout (4+1 on five servers, 4+2 on six), put a 64 MiB
//! file and make 100 partial writes (some across rows), reading everything back byte-identical
//! while degraded;
//! restart the servers, wait for resync to clear every mark, then kill `m` *other* servers and
//! read everything again: right bytes now prove resync rebuilt the right units. The negative
//! control runs the same with resync clearing marks without rebuilding, and must be caught.

use std::time::{Duration, Instant};

mod common;
use common::*;

const FILE_BYTES: usize = 64 << 20;

/// The whole file as the cluster returns it through `cat`, or the CLI's error.
fn cat(c: &Cluster, path: &str) -> Result<Vec<u8>, String> {
    let out = run_at(c, c.live(), &["cat", path], b"");
    if out.status.success() { Ok(out.stdout) } else { Err(String::from_utf8_lossy(&out.stderr).into_owned()) }
}

/// Whether the file reads back as the model; a sentence saying where it differs if not.
fn check(c: &Cluster, path: &str, model: &[u8]) -> Result<(), String> {
    let got = cat(c, path)?;
    if got.len() != model.len() {
        return Err(format!("{path} reads {} bytes, the model has {}", got.len(), model.len()));
    }
    match got.iter().zip(model).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(at) => {
            let wrong = got.iter().zip(model).filter(|(a, b)| a != b).count();
            Err(format!("{path} differs from the model at byte {at} ({wrong} bytes differ)"))
        }
    }
}

/// The leader's count of rows marked stale.
async fn stale_rows(c: &Cluster) -> u64 {
    let leader = c.leader().await;
    c.status(leader).await.map_or(u64::MAX, |s| s.stale_rows)
}

/// Waits until no row is marked stale and no server is being rebuilt, up to `within`.
async fn until_resynced(c: &Cluster, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let leader = c.leader().await;
        if let Some(s) = c.status(leader).await
            && s.stale_rows == 0
            && s.wiped_servers.is_empty()
        {
            return;
        }
        assert!(Instant::now() < deadline, "resync did not finish in {within:?}; logs in {}", c.dir.display());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Puts the 64 MiB file with `down` killed, makes 100 partial writes, checks reads while
/// degraded; returns the model.
async fn write_degraded(c: &mut Cluster, path: &str, k: u8, m: u8, down: &[u64]) -> Vec<u8> {
    for &s in down {
        c.kill(s);
    }
    let mut model = noise(FILE_BYTES, u64::from(k) * 10 + u64::from(m));
    let local = c.dir.join("put.bin");
    std::fs::write(&local, &model).unwrap();
    let stat = cli(c, &["put", local.to_str().unwrap(), path, "--data", &k.to_string(), "--parity", &m.to_string()]);
    assert!(!stat.is_empty());
    // 100 partial writes, 1 B to 64 KiB, anywhere (some cross a unit or a row).
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(k);
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..100 {
        let len = 1 + (next() % (64 << 10)) as usize;
        let at = (next() % (FILE_BYTES - len) as u64) as usize;
        let data = noise(len, 1000 + i);
        let out = run_at(c, c.live(), &["write", path, "--offset", &at.to_string()], &data);
        assert!(out.status.success(), "write {i} at {at} failed: {}", String::from_utf8_lossy(&out.stderr));
        model[at..at + len].copy_from_slice(&data);
    }
    if !down.is_empty() {
        assert!(stale_rows(c).await > 0, "writes with servers {down:?} down marked no row stale");
    }
    check(c, path, &model).unwrap_or_else(|e| panic!("degraded read: {e}"));
    model
}

/// The whole scenario; returns how the final read went (after resync and other servers killed).
async fn scenario(
    name: &str,
    servers: u64,
    (k, m): (u8, u8),
    down: &[u64],
    others: &[u64],
    env: &[(&str, &str)],
) -> Result<(), String> {
    let mut c = Cluster::start_with_env(servers, name, &["--resync-rate", "0"], env).await;
    c.wait_ready().await;
    let path = "/degraded";
    let model = write_degraded(&mut c, path, k, m, down).await;
    for &s in down {
        c.spawn(s, false);
    }
    until_resynced(&c, Duration::from_secs(120)).await;
    let mut rebuilt = 0;
    for s in 1..=servers {
        rebuilt += c.status(s).await.map_or(0, |s| s.resync_rows_done);
    }
    assert!(rebuilt > 0, "the marks cleared but no server resynced a row");
    // Every server up: the returned servers' units are read directly now.
    check(&c, path, &model)?;
    for &s in others {
        c.kill(s);
    }
    check(&c, path, &model)
}

#[test]
fn writes_go_on_with_one_of_five_down_and_resync_rebuilds_the_returning_server() {
    serial(async {
        scenario("degraded41", 5, (4, 1), &[3], &[5], &[]).await.unwrap();
    });
}

#[test]
fn writes_go_on_with_two_of_six_down_under_double_parity() {
    serial(async {
        scenario("degraded42", 6, (4, 2), &[2, 4], &[3, 6], &[]).await.unwrap();
    });
}

/// The negative control: resync that clears the marks without rebuilding the units leaves the
/// returning server's old bytes in place, and the checks above catch it.
#[test]
fn a_resync_that_skips_the_marked_units_is_caught() {
    serial(async {
        let env = [("STRIPELOCK_TEST_BREAK_RESYNC_FOR_NEGATIVE_CONTROL", "1")];
        let outcome = scenario("degradedneg", 5, (4, 1), &[3], &[5], &env).await;
        assert!(outcome.is_err(), "resync skipped the marked units and every read was still right");
    });
}

/// A server that returns with an empty volume (its disk wiped) is rebuilt in full: every unit
/// it held comes back (none was marked stale: they were written while it was up); then
/// another server can go.
#[test]
fn a_server_back_with_a_wiped_volume_is_rebuilt_in_full() {
    serial(async {
        let mut c = Cluster::start_with(5, "degradedwipe", &["--resync-rate", "0"]).await;
        c.wait_ready().await;
        let path = "/wiped";
        let mut model = write_degraded(&mut c, path, 4, 1, &[]).await;
        c.kill(2);
        // Writes go on at once with the server down, rows written by the put or by writes alike
        // (nothing was marked stale before it went).
        for (i, at) in [5u64 << 20, (13 << 20) + 4000, 40 << 20].into_iter().enumerate() {
            let data = noise(70_000, 7000 + i as u64);
            let out = run_at(&c, c.live(), &["write", path, "--offset", &at.to_string()], &data);
            assert!(out.status.success(), "write at {at} with server 2 down: {}", String::from_utf8_lossy(&out.stderr));
            model[at as usize..at as usize + data.len()].copy_from_slice(&data);
        }
        check(&c, path, &model).unwrap();
        let units = c.servers[1].data.join("volume");
        assert!(units.exists(), "no volume at {}", units.display());
        std::fs::remove_dir_all(&units).unwrap();
        c.spawn(2, false);
        // The server reports its new volume once it has caught up; then the leader rebuilds it.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let leader = c.leader().await;
            let st = c.status(leader).await;
            if st.is_some_and(|s| s.wiped_servers.contains(&2) || s.resync_rows_done > 0) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "server 2's wiped volume was never reported; logs in {}",
                c.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        until_resynced(&c, Duration::from_secs(120)).await;
        fn bytes_under(dir: &std::path::Path) -> u64 {
            std::fs::read_dir(dir)
                .unwrap()
                .map(|e| {
                    let e = e.unwrap();
                    if e.file_type().unwrap().is_dir() { bytes_under(&e.path()) } else { e.metadata().unwrap().len() }
                })
                .sum()
        }
        // 16 rows of 4 MiB, one 1 MiB unit of each on every server (4+1 on five).
        let back = bytes_under(&units);
        assert!(back > 16 << 20, "the wiped server holds {back} bytes after its rebuild");
        c.kill(4);
        check(&c, path, &model).unwrap();
    });
}

/// Issue 16: a volume of unit files (`--chunk-store files`, the only store before) is moved into
/// the segment store when its server starts with the default: the file reads back
/// byte-identical with `units/` gone from every server; a segment volume is then refused by
/// `--chunk-store files`, saying which store to start with.
#[test]
fn a_volume_of_unit_files_moves_into_segments_when_its_server_starts() {
    serial(async {
        let mut c = Cluster::start_with(3, "chunkmove", &["--chunk-store", "files"]).await;
        c.wait_ready().await;
        let data = noise((3 << 20) + 12_345, 77);
        let local = c.dir.join("move.in");
        std::fs::write(&local, &data).unwrap();
        let out = run_at(&c, 1, &["put", local.to_str().unwrap(), "/moved"], b"");
        assert!(out.status.success(), "put: {}", String::from_utf8_lossy(&out.stderr));
        assert!(c.servers.iter().all(|s| s.data.join("units").is_dir()), "the files store keeps units/");
        for id in 1..=3 {
            c.kill(id);
        }
        c.extra.clear();
        for id in 1..=3 {
            c.spawn(id, false);
        }
        c.wait_ready().await;
        check(&c, "/moved", &data).unwrap();
        for s in &c.servers {
            assert!(!s.data.join("units").exists(), "server {}'s units/ was not moved", s.id);
            assert!(s.data.join("volume").join("index.redb").exists(), "server {} has no segment volume", s.id);
        }
        // Back to files: refused, with the way out.
        c.kill(3);
        c.extra = vec!["--chunk-store".into(), "files".into()];
        c.spawn(3, false);
        let deadline = Instant::now() + Duration::from_secs(20);
        let log = c.servers[2].data.join("server.log");
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("holds a segment volume") {
                assert!(text.contains("--chunk-store segments"), "{text}");
                break;
            }
            assert!(Instant::now() < deadline, "server 3 started on a segment volume as files: {text}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        c.extra.clear();
    });
}
