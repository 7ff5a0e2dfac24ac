//! The data path's defects of issue 10, each pinned by a test that failed before its fix: real
//! `stripelock server` processes on loopback (127.0.0.1 only), stopped with SIGSTOP/SIGCONT or
//! killed with SIGKILL by their own PIDs. Tests of this file run one at a time (two cores, and
//! elections want their timing), on small files with short leases so each takes a few seconds.

use client::{LockOptions, Mode, Session};
use std::time::{Duration, Instant};
use wire::v1 as pb;

mod common;
use common::*;

/// Puts `data` at `path` with extra put flags; returns the stat as JSON.
fn put(c: &Cluster, path: &str, data: &[u8], flags: &[&str]) -> serde_json::Value {
    let local = c.dir.join("put.bin");
    std::fs::write(&local, data).unwrap();
    let mut args = vec!["put", local.to_str().unwrap(), path, "--json"];
    args.extend_from_slice(flags);
    serde_json::from_str(&cli(c, &args)).unwrap()
}

async fn files_at(c: &Cluster, id: u64) -> pb::files_client::FilesClient<tonic::transport::Channel> {
    let addr = &c.servers[id as usize - 1].addr;
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
    pb::files_client::FilesClient::new(endpoint.connect().await.unwrap())
}

/// The whole file as server `gateway` returns it.
async fn read_all(c: &Cluster, gateway: u64, path: &str) -> Result<Vec<u8>, tonic::Status> {
    let s = Session::open(&c.addrs_from(gateway), 5_000).await.unwrap();
    let g = s.lock(path, 0..u64::MAX, Mode::PR, LockOptions::default()).await.unwrap();
    let mut files = files_at(c, gateway).await;
    let result = async {
        let mut stream =
            files.get(pb::GetRequest { path: path.into(), token: g.signed_token, range: None }).await?.into_inner();
        let mut out = Vec::new();
        while let Some(m) = stream.message().await? {
            out.extend_from_slice(&m.data);
        }
        Ok(out)
    }
    .await;
    s.close().await;
    result
}

/// The servers a new file at `path` is laid out on with `width` units a row, in a cluster of
/// `n` servers with ids 1..=n (the gateway's choice: FNV-1a of the path picks the first).
fn layout_servers(path: &str, n: u64, width: u64) -> Vec<u64> {
    let h = path.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    (0..width).map(|i| (h % n + i) % n + 1).collect()
}

// ---------------------------------------------------------------------------------------------
// Concurrent writers: a delegate whose table lags the client's grant.

#[test]
fn a_live_write_is_not_dropped_by_a_delegate_behind_the_log() {
    serial(a_live_write_is_not_dropped_by_a_delegate_behind_the_log_body());
}

/// Issue 10: concurrent writers on disjoint ranges had 3.5% of their writes dropped as stale
/// although their locks were held. The server carrying out a row's write judged the client's
/// lock on its own copy of the lock table, which had not yet applied the grant (the client's
/// session lives on another server, and a cached stripe lock needs no round trip that would
/// bring it up to date). Here that lag is made certain: server X, which holds the row's stripe
/// lock cached, is stopped while the client takes its lock, and resumed with the leader stopped,
/// so it cannot learn the grant until a new leader is elected. The write must wait for the
/// grant and land, not be dropped.
async fn a_live_write_is_not_dropped_by_a_delegate_behind_the_log_body() {
    let c = Cluster::start_with(5, "lag", &[]).await;
    let leader = c.leader().await;
    let path = (0..100)
        .map(|i| format!("/lag{i}"))
        .find(|p| !layout_servers(p, 5, 3).contains(&leader))
        .expect("a path laid out away from the leader");
    let servers = layout_servers(&path, 5, 3);
    let original = noise(8 << 10, 5);
    let stat = put(&c, &path, &original, &["--stripe-unit", "4KiB", "--data", "2", "--parity", "1"]);
    assert_eq!(stat["layout"]["servers"], serde_json::json!(servers), "{stat}");
    let x = servers[0];
    let y = (1..=5).find(|s| *s != x && *s != leader).unwrap();
    // The client's session lives on server y.
    let w = Session::open(&c.addrs_from(y), 10_000).await.unwrap();
    let write = |gateway: u64, at: u64, data: Vec<u8>, token: String| {
        let addr = c.servers[gateway as usize - 1].addr.clone();
        let path = path.clone();
        async move {
            let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
            let mut files = pb::files_client::FilesClient::new(endpoint.connect().await.unwrap());
            files.write(pb::WriteRequest { path, token, offset: at, data: data.into() }).await.map(|r| r.into_inner())
        }
    };
    // A first write through X: X carries it out and keeps the row's stripe lock cached.
    let g = w.lock(&path, 0..10, Mode::PW, LockOptions::default()).await.unwrap();
    let first = write(x, 0, vec![1; 10], g.signed_token.clone()).await.unwrap();
    assert_eq!(first.rows[0].server, x, "{first:?}");
    w.unlock(g.lock).await.unwrap();

    c.signal(x, "STOP");
    let g = w.lock(&path, 100..110, Mode::PW, LockOptions::default()).await.unwrap();
    c.signal(leader, "STOP");
    c.signal(x, "CONT");
    let result =
        tokio::time::timeout(Duration::from_secs(20), write(x, 100, vec![2; 10], g.signed_token.clone())).await;
    c.signal(leader, "CONT");
    let reply = result.expect("the write ends").unwrap_or_else(|e| panic!("a live write failed: {e:?}"));
    assert_eq!(reply.rows[0].server, x, "{reply:?}");
    w.unlock(g.lock).await.unwrap();
    w.close().await;
    let mut expect = original;
    expect[0..10].fill(1);
    expect[100..110].fill(2);
    assert!(read_all(&c, y, &path).await.unwrap() == expect, "the file does not hold both writes");
    let mut dropped = 0;
    for s in 1..=5 {
        dropped += c.status(s).await.map_or(0, |st| st.stripe_writes_dropped);
    }
    assert_eq!(dropped, 0, "a live write was counted as dropped");
}

// ---------------------------------------------------------------------------------------------
// A put whose gateway dies.

/// The files of the namespace under `prefix` as server `id` lists them: (path, complete).
async fn ls(c: &Cluster, id: u64, prefix: &str) -> Vec<(String, bool)> {
    let mut files = files_at(c, id).await;
    let list = files.list(pb::PathRequest { path: prefix.into(), ino: 0 }).await.unwrap().into_inner();
    list.files.into_iter().map(|f| (f.path, f.complete)).collect()
}

#[test]
fn a_put_whose_gateway_and_writer_die_is_rolled_back() {
    serial(a_put_whose_gateway_and_writer_die_is_rolled_back_body());
}

/// Issue 10: after SIGKILL of the gateway in the middle of a put (its client gone too), the file
/// stayed "being written" forever: `get` refused it, `put` said it existed. The put's writer
/// session ending must roll it back on its own: the path is free again within a few seconds of
/// the lease running out, and a new put of it works.
async fn a_put_whose_gateway_and_writer_die_is_rolled_back_body() {
    let mut c = Cluster::start_with(4, "putdies", &[]).await;
    let leader = c.leader().await;
    // A path laid out away from a server g that is not the leader: g is the gateway killed.
    let (path, gateway) = (0..100)
        .map(|i| format!("/put{i}"))
        .find_map(|p| {
            let servers = layout_servers(&p, 4, 3);
            (1..=4u64).find(|s| *s != leader && !servers.contains(s)).map(|g| (p, g))
        })
        .expect("a path and a gateway outside its layout");
    let home = (1..=4).find(|s| *s != gateway).unwrap();
    let writer = Session::open(&c.addrs_from(home), 1_000).await.unwrap();
    let g = writer.lock(&path, 0..u64::MAX, Mode::EX, LockOptions::default()).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::PutChunk {
        path: path.clone(),
        token: g.signed_token.clone(),
        stripe_unit: 4096,
        data_units: 2,
        parity_units_plus_one: 2,
        data: noise(64 << 10, 3).into(),
    })
    .await
    .unwrap();
    let mut files = files_at(&c, gateway).await;
    let putting = tokio::spawn(async move { files.put(tokio_stream::wrappers::ReceiverStream::new(rx)).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while ls(&c, home, &path).await != [(path.clone(), false)] {
        assert!(Instant::now() < deadline, "the put never created {path}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.kill(gateway);
    // The writer dies too (no close: its lease runs out).
    drop(writer);
    let _ = putting.await;
    drop(tx);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ls(&c, home, &path).await.is_empty() {
        assert!(Instant::now() < deadline, "{path} is still being written 10 s after its writer's lease ran out");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let data = noise(10_000, 4);
    let stat = put(&c, &path, &data, &["--stripe-unit", "4KiB", "--data", "2", "--parity", "1"]);
    assert_eq!(stat["size"], 10_000);
    assert!(read_all(&c, home, &path).await.unwrap() == data);
}

// ---------------------------------------------------------------------------------------------
// Absurd offsets.

#[test]
fn a_write_past_the_largest_file_is_refused_with_the_limit() {
    serial(a_write_past_the_largest_file_is_refused_with_the_limit_body());
}

/// Issue 10: `write --offset 2^62` made a file of 4.6 EB. The servers' `file_bytes_max` (here
/// 1 MiB) bounds what a write or a put may make, the refusal names the limit, `status` reports
/// it, and a write that ends exactly at the limit is still taken.
async fn a_write_past_the_largest_file_is_refused_with_the_limit_body() {
    let c = Cluster::start_with(3, "maxsize", &["--file-bytes-max", "1048576"]).await;
    let status: serde_json::Value = serde_json::from_str(&cli(&c, &["status", "--json"])).unwrap();
    for s in status["servers"].as_array().unwrap() {
        assert_eq!(s["file_bytes_max"], 1 << 20, "{s}");
    }
    assert!(cli(&c, &["status"]).contains("largest file: 1 MiB"));
    put(&c, "/m", &noise(1000, 1), &["--stripe-unit", "4KiB"]);
    for offset in [1u64 << 62, (1 << 63) - 1, (1 << 20) - 5] {
        let out = run_at(&c, 1, &["write", "/m", "--offset", &offset.to_string()], b"0123456789");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a write at {offset} was taken");
        assert!(stderr.contains("1048576 bytes") && stderr.contains("1 MiB"), "{stderr}");
    }
    let out = run_at(&c, 1, &["write", "/m", "--offset", &((1u64 << 20) - 10).to_string(), "--json"], b"0123456789");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stat: serde_json::Value = serde_json::from_str(&cli(&c, &["stat", "/m", "--json"])).unwrap();
    assert_eq!(stat["size"], 1 << 20);
    let big = c.dir.join("big.bin");
    std::fs::write(&big, vec![7u8; (1 << 20) + 1]).unwrap();
    let stderr = cli_fails(&c, &["put", big.to_str().unwrap(), "/big"]);
    assert!(stderr.contains("1048576 bytes"), "{stderr}");
    assert!(ls(&c, 1, "/big").await.is_empty(), "the refused put left its file");
}

// ---------------------------------------------------------------------------------------------
// Layout flags.

#[test]
fn layout_flags_never_drop_parity_unasked_and_impossible_ones_are_refused() {
    serial(layout_flags_never_drop_parity_unasked_and_impossible_ones_are_refused_body());
}

/// Issue 10: on five servers `put --data 5` gave 5+0 (no parity) without a word, and `--data 0`
/// and `--stripe-unit 0` were replaced by defaults. Each is refused with a sentence now; only
/// `--parity 0` stores no parity. The default largest file is 16 TiB.
async fn layout_flags_never_drop_parity_unasked_and_impossible_ones_are_refused_body() {
    let c = Cluster::start_with(5, "layoutflags", &[]).await;
    let data = noise(5000, 2);
    let local = c.dir.join("in.bin");
    std::fs::write(&local, &data).unwrap();
    let l = local.to_str().unwrap();
    let stderr = cli_fails(&c, &["put", l, "/five", "--data", "5"]);
    assert!(stderr.contains("5+1") && stderr.contains("--parity 0") && stderr.contains("--data 4"), "{stderr}");
    let stderr = cli_fails(&c, &["put", l, "/zero", "--data", "0"]);
    assert!(stderr.contains("--data must be from 1"), "{stderr}");
    let stderr = cli_fails(&c, &["put", l, "/zero", "--stripe-unit", "0"]);
    assert!(stderr.contains("--stripe-unit must be a power of two"), "{stderr}");
    let stderr = cli_fails(&c, &["put", l, "/zero", "--stripe-unit", "1000"]);
    assert!(stderr.contains("--stripe-unit must be a power of two"), "{stderr}");
    assert!(cli(&c, &["ls", "/"]).lines().all(|line| !line.contains("/five") && !line.contains("/zero")));
    let none = put(&c, "/five", &data, &["--data", "5", "--parity", "0", "--stripe-unit", "4KiB"]);
    assert_eq!((none["layout"]["data"].as_u64(), none["layout"]["parity"].as_u64()), (Some(5), Some(0)));
    let default = put(&c, "/default", &data, &[]);
    assert_eq!((default["layout"]["data"].as_u64(), default["layout"]["parity"].as_u64()), (Some(4), Some(1)));
    let three = put(&c, "/three", &data, &["--data", "3", "--stripe-unit", "4KiB"]);
    assert_eq!((three["layout"]["data"].as_u64(), three["layout"]["parity"].as_u64()), (Some(3), Some(1)));
    // Not a layout flag, but the same kind of silent surprise: a directory-like path.
    for dir in ["/", "/some/dir/"] {
        let stderr = cli_fails(&c, &["put", l, dir]);
        assert!(stderr.contains("directory"), "{stderr}");
    }
    let status: serde_json::Value = serde_json::from_str(&cli(&c, &["status", "--json"])).unwrap();
    assert_eq!(status["servers"][0]["file_bytes_max"], 16u64 << 40);
    let out = run_at(&c, 1, &["write", "/default", "--offset", &(1u64 << 62).to_string()], b"x");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("16 TiB"));
}

// ---------------------------------------------------------------------------------------------
// Orphan units.

/// How many units of file `id` server `server` keeps on its disk.
fn units_on_disk(c: &Cluster, server: u64, id: u64) -> usize {
    let dir = c.servers[server as usize - 1].data.join("units").join(format!("{id:016x}"));
    std::fs::read_dir(dir)
        .map_or(0, |d| d.filter_map(Result::ok).filter(|e| !e.file_name().to_string_lossy().ends_with(".tmp")).count())
}

#[test]
fn units_of_a_file_removed_while_their_server_was_down_are_collected() {
    serial(units_of_a_file_removed_while_their_server_was_down_are_collected_body());
}

/// Issue 10: units of a file removed while a server was down stayed on that server for good
/// (through scrubs and restarts). Each server now deletes, after a grace period, the units of
/// files that are no longer in the namespace, and only those: a live file keeps every unit.
async fn units_of_a_file_removed_while_their_server_was_down_are_collected_body() {
    let mut c = Cluster::start_with(3, "orphans", &["--orphan-grace-ms", "300", "--chunk-store", "files"]).await;
    let keep = noise(20_000, 8);
    let flags = ["--stripe-unit", "4KiB", "--data", "2", "--parity", "1"];
    let kept = put(&c, "/keep", &keep, &flags)["file"].as_u64().unwrap();
    let gone = put(&c, "/gone", &noise(20_000, 9), &flags)["file"].as_u64().unwrap();
    let kept_units: Vec<usize> = (1..=3).map(|s| units_on_disk(&c, s, kept)).collect();
    assert_eq!(kept_units.iter().sum::<usize>(), 8, "20,000 bytes in 8 KiB rows: two rows of three units, then two");
    assert!(units_on_disk(&c, 3, gone) >= 2);
    c.kill(3);
    let out = run_at(&c, 1, &["rm", "/gone"], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    c.spawn(3, false);
    c.wait_ready().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while units_on_disk(&c, 3, gone) > 0 {
        assert!(Instant::now() < deadline, "server 3 still keeps the units of the removed file");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!((1..=3).map(|s| units_on_disk(&c, s, kept)).collect::<Vec<_>>(), kept_units);
    assert!(read_all(&c, 1, "/keep").await.unwrap() == keep);
}

// ---------------------------------------------------------------------------------------------
// Small files.

/// Bytes server `server` keeps on disk for the units of file `id`.
fn bytes_on_disk(c: &Cluster, server: u64, id: u64) -> u64 {
    let dir = c.servers[server as usize - 1].data.join("units").join(format!("{id:016x}"));
    std::fs::read_dir(dir).map_or(0, |d| d.filter_map(Result::ok).map(|e| e.metadata().unwrap().len()).sum())
}

/// The server of `role` ("d0", "P") in row `row` of `path`, from `stat --json`.
fn server_of(c: &Cluster, path: &str, row: usize, role: &str) -> u64 {
    let stat: serde_json::Value = serde_json::from_str(&cli(c, &["stat", path, "--json"])).unwrap();
    let units = stat["placement"][row]["units"].as_array().unwrap();
    units.iter().find(|u| u["role"] == role).unwrap()["server"].as_u64().unwrap()
}

#[test]
fn a_small_file_is_stored_short_and_reads_with_its_padding_servers_down() {
    serial(a_small_file_is_stored_short_and_reads_with_its_padding_servers_down_body());
}

/// Issue 10: a 1-byte file took five 1 MiB units, and with two servers down a 1-byte 4+1 file
/// could not be read although the lost units held only padding. The last row's units are now
/// stored only up to the end of the file (parity as long as the longest data unit), and units
/// wholly past the end are zeros, not lost: for reads, for a rebuild from parity, for a write
/// that grows the file into them, and for scrub.
async fn a_small_file_is_stored_short_and_reads_with_its_padding_servers_down_body() {
    let mut c = Cluster::start_with(5, "small", &["--chunk-store", "files"]).await;
    let tiny = put(&c, "/tiny", b"x", &[]);
    let tiny_id = tiny["file"].as_u64().unwrap();
    let total: u64 = (1..=5).map(|s| bytes_on_disk(&c, s, tiny_id)).sum();
    assert!(total < 4096, "a 1-byte file takes {total} bytes of units");
    // 5000 bytes, 4 KiB units, 4+1: d0 full, d1 904 bytes, d2 and d3 past the end.
    let mut small = noise(5000, 6);
    let small_stat = put(&c, "/small", &small, &["--stripe-unit", "4KiB"]);
    let small_id = small_stat["file"].as_u64().unwrap();
    let total: u64 = (1..=5).map(|s| bytes_on_disk(&c, s, small_id)).sum();
    assert!(total < 4096 + 904 + 4096 + 1024, "a 5,000-byte file takes {total} bytes of units");
    // A write that grows the file into d2, which was never stored.
    let piece = noise(300, 7);
    let out = run_at(&c, 1, &["write", "/small", "--offset", "9000"], &piece);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    small.resize(9000, 0);
    small.extend_from_slice(&piece);
    assert!(read_all(&c, 1, "/small").await.unwrap() == small);
    let report: serde_json::Value = serde_json::from_str(&cli(&c, &["scrub", "--json"])).unwrap();
    for key in ["damaged", "parity_mismatches", "unrepairable", "unavailable"] {
        assert_eq!(report[key].as_array().map(Vec::len), Some(0), "scrub found {key}: {report}");
    }
    // The 1-byte file with the servers of two padding units down reads back.
    let (d2, d3) = (server_of(&c, "/tiny", 0, "d2"), server_of(&c, "/tiny", 0, "d3"));
    let d0_small = server_of(&c, "/small", 0, "d0");
    c.kill(d2);
    c.kill(d3);
    let got = read_all(&c, server_of(&c, "/tiny", 0, "d0"), "/tiny").await;
    assert_eq!(got.unwrap_or_else(|e| panic!("the 1-byte file cannot be read: {e:?}")), b"x");
    c.spawn(d2, false);
    c.spawn(d3, false);
    c.wait_ready().await;
    // d0 of the small file rebuilt from parity and the zeros of d3 (never stored).
    c.kill(d0_small);
    let gateway = c.live();
    assert!(read_all(&c, gateway, "/small").await.unwrap() == small, "rebuilt from parity, /small came back wrong");
}

// ---------------------------------------------------------------------------------------------
// Smaller: what a part-way write, scrub and rebuild say.

#[test]
fn part_way_failures_say_what_was_done_and_scrub_and_rebuild_report_honestly() {
    serial(part_way_failures_say_what_was_done_and_scrub_and_rebuild_report_honestly_body());
}

/// Issue 10: a write that failed part-way did not say which bytes landed; `scrub` with units it
/// could not check exited 0; `rebuild` showed no progress; messages named units by their Rust
/// names (`Data(3)`). Here one server of a 2+1 file is down: scrub exits 2 and says what it
/// could not check. Since issue 16 a write goes on with one server down, so a row is made to
/// need two lost units (the down server's and one deleted from another server's disk): a write
/// over that row and the next lands in the next and says so. A rebuild prints a progress line a
/// file on standard error, and none with --json.
async fn part_way_failures_say_what_was_done_and_scrub_and_rebuild_report_honestly_body() {
    let mut c = Cluster::start_with(3, "partway", &["--chunk-store", "files"]).await;
    let original = noise(24 << 10, 12);
    let stat = put(&c, "/p", &original, &["--stripe-unit", "4KiB", "--data", "2", "--parity", "1"]);
    let file = stat["file"].as_u64().unwrap();
    let server = |row: usize, role: &str| server_of(&c, "/p", row, role);
    // A write from d1 of row r into d1 of row r + 1 touches d1(r) and P(r), then every unit of
    // row r + 1 (parity rotates: a server outside the first pair holds a unit of the second row).
    let (r, x, first_ok) = (0..2usize)
        .flat_map(|r| (1..=3u64).map(move |x| (r, x)))
        .find_map(|(r, x)| {
            let a = [server(r, "d1"), server(r, "P")].contains(&x);
            let b = [server(r + 1, "d0"), server(r + 1, "d1"), server(r + 1, "P")].contains(&x);
            (a != b).then_some((r, x, !a))
        })
        .expect("a write over two rows of which one needs server x");
    let gateway = (1..=3).find(|s| *s != x).unwrap();
    c.kill(x);
    let out = run_at(&c, gateway, &["scrub"], b"");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "scrub with a server down: {stdout}");
    assert!(stdout.contains("could not be checked"), "{stdout}");
    // The row that needs x also loses the gateway's unit of it: two lost, one parity.
    let needs_x = if first_ok { r + 1 } else { r };
    let dir = c.servers[gateway as usize - 1].data.join("units").join(format!("{file:016x}"));
    let mut deleted = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let e = e.unwrap();
        if e.file_name().to_string_lossy().starts_with(&format!("{needs_x:016x}.")) {
            std::fs::remove_file(e.path()).unwrap();
            deleted += 1;
        }
    }
    assert_eq!(deleted, 1, "server {gateway} holds one unit of row {needs_x}");
    let at = r as u64 * 8192 + 4096 + 100;
    let end = (r as u64 + 1) * 8192 + 4096 + 100;
    let out = run_at(&c, gateway, &["write", "/p", "--offset", &at.to_string()], &vec![9u8; (end - at) as usize]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the write needed a dead server and succeeded");
    let split = (r as u64 + 1) * 8192;
    let (done, not) = if first_ok { ((at, split), (split, end)) } else { ((split, end), (at, split)) };
    assert!(stderr.contains(&format!("bytes {}..{} of /p were written", done.0, done.1)), "{stderr}");
    assert!(stderr.contains(&format!("bytes {}..{} were not", not.0, not.1)), "{stderr}");
    assert!(stderr.contains("parity P") || stderr.contains("data unit"), "{stderr}");
    assert!(!stderr.contains("Data(") && !stderr.contains("Some("), "{stderr}");

    c.spawn(x, false);
    c.wait_ready().await;
    // The deleted unit comes back from the row's others.
    let out = run_at(&c, gateway, &["scrub", "--repair"], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let out = run_at(&c, gateway, &["rebuild", "--server", &x.to_string()], b"");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("rebuild: 1 of 1 files done (/p"), "{stderr}");
    let out = run_at(&c, gateway, &["rebuild", "--server", &x.to_string(), "--json"], b"");
    assert!(out.status.success() && out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["files"], 1);
    // Issue 16: `--rate` keeps a rebuild to the pace asked for, and the progress says the time left.
    let started = std::time::Instant::now();
    let out = run_at(&c, gateway, &["rebuild", "--server", &x.to_string(), "--rate", "8KiB", "--json"], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bytes = report["bytes"].as_u64().unwrap();
    assert!(bytes >= 8 << 10, "{report}");
    let took = started.elapsed().as_secs_f64();
    assert!(took >= 0.9 * (bytes as f64 / 8192.0), "{bytes} bytes at 8 KiB/s took {took:.2} s");
    let out = run_at(&c, gateway, &["rebuild", "--server", &x.to_string()], b"");
    assert!(String::from_utf8_lossy(&out.stderr).contains("s left"), "{}", String::from_utf8_lossy(&out.stderr));
    // And a scrub: paced after each row by the bytes checked so far (the last row is not waited for).
    let started = std::time::Instant::now();
    let out = run_at(&c, gateway, &["scrub", "--rate", "16KiB", "--json"], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bytes = report["bytes_checked"].as_u64().unwrap();
    assert!(bytes >= 32 << 10, "{report}");
    let took = started.elapsed().as_secs_f64();
    let due = (bytes - 3 * 4096) as f64 / 16384.0;
    assert!(took >= 0.9 * due, "{bytes} bytes at 16 KiB/s took {took:.2} s");
}

#[test]
fn a_new_file_is_placed_on_the_servers_that_are_up() {
    serial(a_new_file_is_placed_on_the_servers_that_are_up_body());
}

/// Issue 16: `put --data 3 --parity 1` on five servers with one down failed ("server 5 refused
/// row 0 … tcp connect error") although four servers were up. The gateway now asks which
/// servers answer and lays the file out on those.
async fn a_new_file_is_placed_on_the_servers_that_are_up_body() {
    let mut c = Cluster::start_with(5, "placeup", &[]).await;
    let path = "/placed";
    // Kill a server the file's usual place on the ring would use (not the bootstrap leader).
    let usual = layout_servers(path, 5, 4);
    let down = *usual.iter().find(|s| **s != 1).unwrap();
    c.kill(down);
    let data = noise(300_000, 16);
    let stat = put(&c, path, &data, &["--data", "3", "--parity", "1", "--stripe-unit", "64KiB"]);
    let servers: Vec<u64> = stat["layout"]["servers"].as_array().unwrap().iter().map(|s| s.as_u64().unwrap()).collect();
    assert_eq!(servers.len(), 4, "{stat}");
    assert!(!servers.contains(&down), "server {down} is down but holds a unit of {servers:?}");
    let back = run_at(&c, 1, &["cat", path], b"");
    assert!(back.status.success(), "{}", String::from_utf8_lossy(&back.stderr));
    assert_eq!(back.stdout, data);
}
