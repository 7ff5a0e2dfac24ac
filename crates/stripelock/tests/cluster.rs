//! Multi-process tests: real `stripelock server` processes on loopback, killed with SIGKILL.
//! Each test starts its own cluster on free ports in its own temporary directory; the tests of
//! this file run one at a time (two cores, and elections want their timing).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use client::{ClientError, LockOptions, Mode, Session};
use wire::v1 as pb;

mod common;
use common::*;

#[test]
fn conflicting_locks_serialize_disjoint_and_shared_do_not() {
    serial(conflicting_locks_serialize_disjoint_and_shared_do_not_body());
}

async fn conflicting_locks_serialize_disjoint_and_shared_do_not_body() {
    let c = Cluster::start(3, "serialize").await;
    let a = Session::open(&c.addrs_from(1), 5_000).await.unwrap();
    let b = Session::open(&c.addrs_from(2), 5_000).await.unwrap();

    // Overlapping EX: the second waits until the first is released, then gets a higher token.
    let first = a.lock("/x", 0..100, Mode::EX, LockOptions::default()).await.unwrap();
    match b.lock("/x", 50..150, Mode::EX, LockOptions { nowait: true, timeout: None, ..Default::default() }).await {
        Err(ClientError::Busy(who)) => assert!(who[0].contains(&format!("session {}", a.id())), "{who:?}"),
        other => panic!("expected busy, got {other:?}"),
    }
    let b2 = b.clone();
    let waiter = tokio::spawn(async move { b2.lock("/x", 50..150, Mode::EX, LockOptions::default()).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "an overlapping EX was granted while the first was held");
    a.unlock(first.lock).await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap().unwrap();
    assert!(second.token > first.token, "{} then {}", first.token, second.token);
    b.unlock(second.lock).await.unwrap();

    // Disjoint ranges and shared readers are granted together at once.
    let l1 = a
        .lock("/y", 0..100, Mode::EX, LockOptions { nowait: true, timeout: None, ..Default::default() })
        .await
        .unwrap();
    let l2 = b
        .lock("/y", 100..200, Mode::EX, LockOptions { nowait: true, timeout: None, ..Default::default() })
        .await
        .unwrap();
    let r1 = a
        .lock("/z", 0..u64::MAX, Mode::PR, LockOptions { nowait: true, timeout: None, ..Default::default() })
        .await
        .unwrap();
    let r2 = b
        .lock("/z", 0..u64::MAX, Mode::PR, LockOptions { nowait: true, timeout: None, ..Default::default() })
        .await
        .unwrap();
    let t = until_table(&c, 3, "/", "four grants", |t| count(t, true) >= 4).await;
    assert_eq!(count(&t, true), 4, "{t:?}");
    for (s, l) in [(&a, l1), (&b, l2), (&a, r1), (&b, r2)] {
        s.unlock(l.lock).await.unwrap();
    }
    a.close().await;
    b.close().await;
}

#[test]
fn leader_killed_with_holder_and_two_waiters_loses_nothing() {
    serial(leader_killed_with_holder_and_two_waiters_loses_nothing_body());
}

async fn leader_killed_with_holder_and_two_waiters_loses_nothing_body() {
    let mut c = Cluster::start(3, "failover").await;
    let leader = c.leader().await;
    // Everyone talks to the leader first, so every session must move when it dies.
    let holder = Session::open(&c.addrs_from(leader), 5_000).await.unwrap();
    let w1 = Session::open(&c.addrs_from(leader), 5_000).await.unwrap();
    let w2 = Session::open(&c.addrs_from(leader), 5_000).await.unwrap();
    let held = holder.lock("/f", 0..u64::MAX, Mode::EX, LockOptions::default()).await.unwrap();
    let w1c = w1.clone();
    let first = tokio::spawn(async move { w1c.lock("/f", 0..u64::MAX, Mode::EX, LockOptions::default()).await });
    until_table(&c, leader, "/f", "first waiter queued", |t| count(t, false) == 1).await;
    let w2c = w2.clone();
    let second = tokio::spawn(async move { w2c.lock("/f", 0..u64::MAX, Mode::EX, LockOptions::default()).await });
    until_table(&c, leader, "/f", "second waiter queued", |t| count(t, false) == 2).await;

    c.kill(leader);
    let new_leader = c.leader().await;
    assert_ne!(new_leader, leader);
    // The holder still holds, with the same token; both waiters still wait, in order.
    let t =
        until_table(&c, new_leader, "/f", "table on the new leader", |t| count(t, true) == 1 && count(t, false) == 2)
            .await;
    let row = &t.resources[0].locks;
    let granted = row.iter().find(|l| l.granted).unwrap();
    assert_eq!((granted.session, granted.token), (holder.id(), held.token));

    holder.unlock(held.lock).await.unwrap();
    let g1 = tokio::time::timeout(Duration::from_secs(10), first).await.unwrap().unwrap().unwrap();
    assert!(!second.is_finished(), "the second waiter was granted before the first");
    assert!(g1.token > held.token, "token went from {} to {}", held.token, g1.token);
    // The new term is the tokens' epoch: every grant after failover outranks every one before.
    assert!(g1.token >> 40 > held.token >> 40, "epoch did not rise: {} then {}", held.token, g1.token);
    w1.unlock(g1.lock).await.unwrap();
    let g2 = tokio::time::timeout(Duration::from_secs(10), second).await.unwrap().unwrap().unwrap();
    assert!(g2.token > g1.token, "token went from {} to {}", g1.token, g2.token);
    w2.unlock(g2.lock).await.unwrap();
    for s in [holder, w1, w2] {
        s.close().await;
    }
}

#[test]
fn killed_lock_process_is_released_after_its_lease() {
    serial(killed_lock_process_is_released_after_its_lease_body());
}

async fn killed_lock_process_is_released_after_its_lease_body() {
    let c = Cluster::start(3, "expiry").await;
    let cluster = c.addrs().join(",");
    let lease = Duration::from_secs(2);
    let mut holder = Command::new(&*EXE)
        .args(["lock", "/k", "--lease", "2s", "--cluster", &cluster, "--", "sleep", "60"])
        .spawn()
        .unwrap();
    let t = until_table(&c, 1, "/k", "the lock process to hold /k", |t| count(t, true) == 1).await;
    let first_token = t.resources[0].locks[0].token;
    holder.kill().unwrap();
    holder.wait().unwrap();
    let killed = Instant::now();
    let s = Session::open(&c.addrs(), 5_000).await.unwrap();
    let g = s
        .lock(
            "/k",
            0..u64::MAX,
            Mode::EX,
            LockOptions { nowait: false, timeout: Some(Duration::from_secs(10)), ..Default::default() },
        )
        .await
        .unwrap();
    let waited = killed.elapsed();
    assert!(waited <= lease + Duration::from_secs(1), "released {waited:?} after the kill; lease is {lease:?}");
    assert!(g.token > first_token, "token went from {first_token} to {}", g.token);
    s.close().await;
}

#[test]
fn restarted_server_rejoins_from_its_data() {
    serial(restarted_server_rejoins_from_its_data_body());
}

async fn restarted_server_rejoins_from_its_data_body() {
    let mut c = Cluster::start(3, "rejoin").await;
    let leader = c.leader().await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    c.kill(follower);
    let s = Session::open(&c.addrs_from(leader), 5_000).await.unwrap();
    let mut held = Vec::new();
    for i in 0..20 {
        held.push(s.lock(&format!("/r/{i}"), 0..10, Mode::PW, LockOptions::default()).await.unwrap());
    }
    c.spawn(follower, false);
    // It catches up from its own log and the leader's: the same lock table as the leader's,
    // row for row (sessions, lock ids, modes, ranges, tokens), not just as many locks.
    let t = until_table(&c, follower, "/r/", "the restarted server to catch up", |t| count(t, true) == 20).await;
    let on_leader = c.table(leader, "/r/").await.expect("the leader's table");
    assert_eq!(count(&on_leader, true), 20, "{on_leader:?}");
    assert_eq!(t, on_leader, "the restarted server's table differs from the leader's");
    let mut shown: Vec<u64> = t.resources.iter().map(|r| r.locks[0].token).collect();
    shown.sort_unstable();
    let mut granted: Vec<u64> = held.iter().map(|g| g.token).collect();
    granted.sort_unstable();
    granted.dedup();
    assert_eq!(shown, granted, "the table's tokens are not the 20 distinct ones the client was granted");
    let st = c.status(follower).await.unwrap();
    assert_eq!(st.leader_id, leader, "the restarted server does not follow the leader");
    s.close().await;
}

#[test]
fn lock_command_gives_a_token_that_verifies() {
    serial(lock_command_gives_a_token_that_verifies_body());
}

async fn lock_command_gives_a_token_that_verifies_body() {
    let c = Cluster::start(1, "token").await;
    let cluster = c.addrs().join(",");
    let out = Command::new(&*EXE)
        .args(["lock", "/jobs/nightly", "--cluster", &cluster, "--", "sh", "-c", "printf %s \"$STRIPELOCK_TOKEN\""])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap();
    assert!(token.starts_with("slt1."), "{token:?}");
    let secret = c.servers[0].data.join("cluster.secret");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !secret.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let verify =
        Command::new(&*EXE).args(["token", "verify", &token, "--json", "--secret-file"]).arg(&secret).output().unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
    let v: serde_json::Value = serde_json::from_slice(&verify.stdout).unwrap();
    assert_eq!(
        (v["valid"].as_bool(), v["resource"].as_str(), v["mode"].as_str()),
        (Some(true), Some("/jobs/nightly"), Some("EX"))
    );
    // While another process holds it, --nowait reports the conflict with the chosen exit code.
    let mut holder = Command::new(&*EXE)
        .args(["lock", "/jobs/nightly", "--cluster", &cluster, "--", "sleep", "30"])
        .spawn()
        .unwrap();
    until_table(&c, 1, "/jobs/", "the holder", |t| count(t, true) == 1).await;
    let busy = Command::new(&*EXE)
        .args(["lock", "/jobs/nightly", "--nowait", "--cluster", &cluster, "--conflict-exit-code", "7", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(busy.status.code(), Some(7));
    let said = String::from_utf8_lossy(&busy.stderr);
    assert!(said.contains("not available") && said.contains("holds EX all"), "{said}");
    holder.kill().unwrap();
    holder.wait().unwrap();
}

#[test]
fn cached_lock_is_reused_locally_and_given_up_on_revoke() {
    serial(cached_lock_is_reused_locally_and_given_up_on_revoke_body());
}

async fn cached_lock_is_reused_locally_and_given_up_on_revoke_body() {
    let c = Cluster::start(3, "cache").await;
    let a = Session::open(&c.addrs_from(1), 5_000).await.unwrap();
    let b = Session::open(&c.addrs_from(2), 5_000).await.unwrap();
    let whole = a.lock("/c", 0..u64::MAX, Mode::PR, LockOptions::default()).await.unwrap();
    a.cache(whole.lock).await.unwrap();
    let t =
        until_table(&c, 1, "/c", "the cached lock", |t| t.resources.iter().flat_map(|r| &r.locks).any(|l| l.cached))
            .await;
    let applied_before = c.status(1).await.unwrap().applied_index;
    // A covered read is granted from the cache: same lock, same token, and nothing proposed.
    for _ in 0..100 {
        let again = a.lock("/c", 10..20, Mode::PR, LockOptions::default()).await.unwrap();
        assert_eq!((again.lock, again.token), (whole.lock, whole.token));
        a.unlock(again.lock).await.unwrap();
    }
    let applied_after = c.status(1).await.unwrap().applied_index;
    assert!(
        applied_after - applied_before < 10,
        "local re-grants went to the log: {applied_before} -> {applied_after} ({t:?})"
    );
    // A writer elsewhere revokes it; the idle cached lock is given back and the writer gets in.
    let w = b
        .lock(
            "/c",
            0..100,
            Mode::EX,
            LockOptions { nowait: false, timeout: Some(Duration::from_secs(5)), ..Default::default() },
        )
        .await
        .unwrap();
    assert!(w.token > whole.token);
    b.unlock(w.lock).await.unwrap();
    a.close().await;
    b.close().await;
}

#[test]
fn log_stays_bounded_and_a_lagging_server_catches_up_from_a_snapshot() {
    serial(log_stays_bounded_and_a_lagging_server_catches_up_from_a_snapshot_body());
}

async fn log_stays_bounded_and_a_lagging_server_catches_up_from_a_snapshot_body() {
    let mut c = Cluster::start_with(3, "snapshots", &["--snapshot-every", "50"]).await;
    let leader = c.leader().await;
    let behind = (1..=3).find(|id| *id != leader).unwrap();
    c.kill(behind);
    let s = Session::open(&c.addrs_from(leader), 5_000).await.unwrap();
    for i in 0..300 {
        let g = s.lock(&format!("/s/{}", i % 7), 0..10, Mode::EX, LockOptions::default()).await.unwrap();
        s.unlock(g.lock).await.unwrap();
    }
    let held = s.lock("/s/kept", 0..10, Mode::PW, LockOptions::default()).await.unwrap();
    let st = c.status(leader).await.unwrap();
    assert!(st.snapshot_index > 0, "no snapshot after {} entries", st.applied_index);
    assert!(
        st.log_entries < 250,
        "{} log entries kept after {} applied: the log is not purged",
        st.log_entries,
        st.applied_index
    );
    // The server that was down missed purged entries: it must take a snapshot and catch up.
    c.spawn(behind, false);
    let t = until_table(&c, behind, "/s/kept", "the lagging server to catch up", |t| count(t, true) == 1).await;
    assert_eq!(t.resources[0].locks[0].token, held.token);
    s.close().await;
}

#[test]
fn a_secondary_serves_readers_from_its_cached_read_lock() {
    serial(a_secondary_serves_readers_from_its_cached_read_lock_body());
}

/// Seed 002 end to end: readers attached to a secondary share its one whole-file read lock with
/// no log entry each; a writer elsewhere revokes it and gets in once the last reader is done; a
/// writer attached to the secondary trades the idle read lock for its write lock in one entry;
/// and when the secondary dies its readers are told their locks are lost while the cluster frees
/// the file after the secondary's lease.
async fn a_secondary_serves_readers_from_its_cached_read_lock_body() {
    let c = Cluster::start_with(3, "gateway", &["--gateway-lease-ms", "2000"]).await;
    let leader = c.leader().await;
    let gw = (1..=3).find(|i| *i != leader).unwrap();
    let other = (1..=3).find(|i| *i != leader && *i != gw).unwrap();
    let r1 = Session::open(&c.addrs_from(gw), 5_000).await.unwrap();
    let r2 = Session::open(&c.addrs_from(gw), 5_000).await.unwrap();
    let w = Session::open(&c.addrs_from(other), 5_000).await.unwrap();
    let read = LockOptions { gateway: true, ..Default::default() };

    let g1 = r1.lock("/f", 0..100, Mode::PR, read.clone()).await.unwrap();
    assert!(g1.via_gateway, "{g1:?}");
    // The cluster's table shows the secondary's session holding a cached whole-file PR.
    let gw_session = c.status(gw).await.unwrap().gateway_session;
    assert_ne!(gw_session, 0);
    let t = until_table(&c, leader, "/f", "the gateway's read lock", |t| {
        t.resources.iter().flat_map(|r| &r.locks).any(|l| l.session == gw_session && l.granted && l.cached)
    })
    .await;
    assert!(t.resources.iter().flat_map(|r| &r.locks).all(|l| l.session != r1.id()), "{t:?}");

    // Fifty more reads cost no log entries (the leader's clock ticks are the only ones).
    let before = c.status(gw).await.unwrap();
    for i in 0..50u64 {
        let g = r2.lock("/f", i..i + 10, Mode::PR, read.clone()).await.unwrap();
        assert_eq!(g.token, g1.token, "every reader shares the secondary's lock and token");
        r2.unlock(g.lock).await.unwrap();
    }
    let after = c.status(gw).await.unwrap();
    assert_eq!(after.gateway_grants - before.gateway_grants, 50);
    assert!(after.applied_index - before.applied_index < 10, "reads went to the log: {before:?} -> {after:?}");

    // A writer on another server revokes the read lock; readers are told and the writer waits
    // for the last of them.
    let mut events = r1.events();
    let w2 = w.clone();
    let writer = tokio::spawn(async move { w2.lock("/f", 50..60, Mode::PW, LockOptions::default()).await });
    let revoked = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(client::Event::Revoke { lock }) = events.recv().await
                && lock == g1.lock
            {
                return;
            }
        }
    })
    .await;
    assert!(revoked.is_ok(), "the reader was not told of the revoke");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!writer.is_finished(), "a write was granted under a reader");
    r1.unlock(g1.lock).await.unwrap();
    let wg = tokio::time::timeout(Duration::from_secs(5), writer).await.unwrap().unwrap().unwrap();
    assert!(wg.token > g1.token, "{} then {}", g1.token, wg.token);
    w.unlock(wg.lock).await.unwrap();

    // A writer attached to the secondary takes the place of its idle read lock in one entry.
    let g = r1.lock("/h", 0..u64::MAX, Mode::PR, read.clone()).await.unwrap();
    r1.unlock(g.lock).await.unwrap();
    let handovers = c.status(gw).await.unwrap().gateway_handovers;
    let pw = r2.lock("/h", 0..10, Mode::PW, LockOptions::default()).await.unwrap();
    assert!(!pw.via_gateway && pw.token > g.token);
    assert_eq!(c.status(gw).await.unwrap().gateway_handovers, handovers + 1);
    let t = until_table(&c, gw, "/h", "the write lock alone", |t| count(t, true) == 1).await;
    let only = t.resources.iter().flat_map(|r| &r.locks).find(|l| l.granted).unwrap();
    assert_eq!(only.session, r2.id(), "{t:?}");
    r2.unlock(pw.lock).await.unwrap();

    // The secondary dies with a reader on /f: the reader moves on and is told the lock is lost;
    // the cluster frees the file once the secondary's lease (2 s) has run out and it is fenced.
    let g = r1.lock("/f", 0..100, Mode::PR, read.clone()).await.unwrap();
    let mut events = r1.events();
    let mut c = c;
    c.kill(gw);
    let killed = Instant::now();
    let lost = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(client::Event::Lost { lock, .. }) = events.recv().await
                && lock == g.lock
            {
                return;
            }
        }
    })
    .await;
    assert!(lost.is_ok(), "the reader was not told its lock is lost");
    let wg = w
        .lock("/f", 0..u64::MAX, Mode::EX, LockOptions { timeout: Some(Duration::from_secs(10)), ..Default::default() })
        .await
        .unwrap();
    assert!(wg.token > g.token);
    eprintln!("the file was freed {:?} after the secondary died", killed.elapsed());
    assert!(killed.elapsed() < Duration::from_secs(2 + 3), "freed only after {:?}", killed.elapsed());
    r1.unlock(g.lock).await.unwrap();
    w.unlock(wg.lock).await.unwrap();
    for s in [r1, r2, w] {
        s.close().await;
    }
}

/// Runs the stripelock CLI against `c`, returning stdout; panics with stderr if it fails.
fn cli(c: &Cluster, args: &[&str]) -> String {
    let out = Command::new(&*EXE).args(args).arg("--cluster").arg(c.addrs().join(",")).output().unwrap();
    assert!(out.status.success(), "stripelock {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn files_survive_a_lost_server_and_two_with_p_plus_q() {
    serial(files_survive_a_lost_server_and_two_with_p_plus_q_body());
}

/// Put 64 MiB files with 4+1 and 3+2 layouts on five servers, get them back byte for byte, then again
/// with one server (4+1) and two servers (3+2) killed, rebuilding from parity; a write carrying a
/// token older than one the storage has accepted is refused and changes nothing; rm removes.
async fn files_survive_a_lost_server_and_two_with_p_plus_q_body() {
    let mut c = Cluster::start(5, "files").await;
    let dir = c.dir.clone();
    let data = noise(64 << 20, 7);
    let local = dir.join("in.bin");
    std::fs::write(&local, &data).unwrap();
    let local_s = local.to_str().unwrap();
    let stat: serde_json::Value =
        serde_json::from_str(&cli(&c, &["put", local_s, "/data/x", "--stripe-unit", "256KiB", "--json"])).unwrap();
    assert_eq!(stat["size"], 64 << 20);
    assert_eq!((stat["layout"]["data"].as_u64(), stat["layout"]["parity"].as_u64()), (Some(4), Some(1)));
    cli(&c, &["put", local_s, "/data/y", "--data", "3", "--parity", "2"]);
    let out = dir.join("out.bin");
    let out_s = out.to_str().unwrap();
    for path in ["/data/x", "/data/y"] {
        let got: serde_json::Value = serde_json::from_str(&cli(&c, &["get", path, out_s, "--json"])).unwrap();
        assert_eq!(got["rebuilt_rows"], 0);
        assert!(std::fs::read(&out).unwrap() == data, "{path} came back different");
    }
    // A range that starts inside one row and ends inside another, and one past the end.
    let part = Command::new(&*EXE)
        .args(["cat", "/data/x", "--range", "1000000..5000000", "--cluster"])
        .arg(c.addrs().join(","))
        .output()
        .unwrap();
    assert!(part.status.success(), "{part:?}");
    assert!(part.stdout == data[1_000_000..5_000_000], "cat --range returned other bytes");
    let tail = Command::new(&*EXE)
        .args(["cat", "/data/x", "--range", "67108000..", "--cluster"])
        .arg(c.addrs().join(","))
        .output()
        .unwrap();
    assert!(tail.stdout == data[67_108_000..], "a range past the end is clipped to the file");
    let listed = cli(&c, &["ls", "/data/"]);
    assert!(listed.contains("/data/x") && listed.contains("/data/y"), "{listed}");

    // A stale token: a lock taken and released, then a newer holder writes; storage refuses the
    // older token for a unit the newer one wrote.
    let a = Session::open(&c.addrs(), 5_000).await.unwrap();
    let old = a.lock("/data/z", 0..u64::MAX, Mode::EX, LockOptions::default()).await.unwrap();
    a.unlock(old.lock).await.unwrap();
    let z = dir.join("z.bin");
    std::fs::write(&z, noise(1 << 16, 9)).unwrap();
    cli(&c, &["put", z.to_str().unwrap(), "/data/z", "--stripe-unit", "4KiB"]);
    let zstat: serde_json::Value = serde_json::from_str(&cli(&c, &["stat", "/data/z", "--json"])).unwrap();
    let server = zstat["placement"][0]["units"][0]["server"].as_u64().unwrap();
    let endpoint =
        tonic::transport::Endpoint::from_shared(format!("http://{}", c.servers[server as usize - 1].addr)).unwrap();
    let mut storage = pb::storage_client::StorageClient::new(endpoint.connect().await.unwrap());
    let unit = pb::UnitRef { file: zstat["file"].as_u64().unwrap(), row: 0, role: 0, index: 0 };
    let before =
        storage.read_unit(pb::ReadUnitRequest { unit: Some(unit), ..Default::default() }).await.unwrap().into_inner();
    let refused = storage
        .write_unit(pb::WriteUnitRequest {
            unit: Some(unit),
            resource: "/data/z".into(),
            range: Some(pb::Range { start: 0, end: 4096 }),
            token: old.signed_token.clone(),
            data: vec![0xee; 4096].into(),
            covers: vec![],
            expect_version_plus_one: 0,
            client_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert_eq!(wire::code_of(&refused), Ok(wire::ErrorCode::StaleToken), "{refused:?}");
    assert!(refused.message().contains("older than"), "{}", refused.message());
    assert_eq!(
        storage.read_unit(pb::ReadUnitRequest { unit: Some(unit), ..Default::default() }).await.unwrap().into_inner(),
        before,
        "the refused write changed the unit"
    );
    // A valid token for another file cannot write this file's units, whatever resource the
    // request names.
    let other = a.lock("/data/other", 0..u64::MAX, Mode::EX, LockOptions::default()).await.unwrap();
    let foreign = storage
        .write_unit(pb::WriteUnitRequest {
            unit: Some(unit),
            resource: "/data/other".into(),
            range: Some(pb::Range { start: 0, end: 4096 }),
            token: other.signed_token.clone(),
            data: vec![0xee; 4096].into(),
            covers: vec![],
            expect_version_plus_one: 0,
            client_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(foreign.code(), tonic::Code::PermissionDenied, "{foreign:?}");
    assert_eq!(wire::code_of(&foreign), Ok(wire::ErrorCode::Denied), "{foreign:?}");
    assert_eq!(
        storage.read_unit(pb::ReadUnitRequest { unit: Some(unit), ..Default::default() }).await.unwrap().into_inner(),
        before,
        "a write under another file's token changed the unit"
    );
    // Nor delete them (issue 11: `rm` checked its token against the resource the request
    // named, not that this resource is the file being deleted).
    let foreign_rm = storage
        .delete_file(pb::DeleteFileRequest {
            file: zstat["file"].as_u64().unwrap(),
            resource: "/data/other".into(),
            token: other.signed_token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(foreign_rm.code(), tonic::Code::PermissionDenied, "{foreign_rm:?}");
    assert!(foreign_rm.message().contains("does not name file"), "{}", foreign_rm.message());
    assert_eq!(
        storage.read_unit(pb::ReadUnitRequest { unit: Some(unit), ..Default::default() }).await.unwrap().into_inner(),
        before,
        "a delete under another file's token removed the unit"
    );
    a.unlock(other.lock).await.unwrap();
    a.close().await;

    // One server down: 4+1 still reads, rebuilding the rows that had a unit there.
    let leader = c.leader().await;
    let victims: Vec<u64> = (1..=5).filter(|s| *s != leader).take(2).collect();
    c.kill(victims[0]);
    let got: serde_json::Value = serde_json::from_str(&cli(&c, &["get", "/data/x", out_s, "--json"])).unwrap();
    assert!(got["rebuilt_rows"].as_u64().unwrap() > 0, "{got}");
    assert!(std::fs::read(&out).unwrap() == data, "4+1 with a server down came back different");
    // Two down: 3+2 still reads.
    c.kill(victims[1]);
    let got: serde_json::Value = serde_json::from_str(&cli(&c, &["get", "/data/y", out_s, "--json"])).unwrap();
    assert!(got["rebuilt_rows"].as_u64().unwrap() > 0, "{got}");
    assert!(std::fs::read(&out).unwrap() == data, "3+2 with two servers down came back different");
    // And 4+1 with two down says so instead of returning anything.
    let failed =
        Command::new(&*EXE).args(["get", "/data/x", out_s, "--cluster"]).arg(c.addrs().join(",")).output().unwrap();
    assert!(!failed.status.success());
    assert!(String::from_utf8_lossy(&failed.stderr).contains("cannot be read"), "{failed:?}");
    assert!(std::fs::read(&out).unwrap() == data, "a failed get replaced the local file");

    let removed = cli(&c, &["rm", "/data/z"]);
    assert!(removed.contains("removed /data/z"), "{removed}");
    assert!(!cli(&c, &["ls", "/data/"]).contains("/data/z"));
}

#[test]
fn scrub_repairs_flipped_bytes_and_rebuild_replaces_a_lost_server() {
    serial(scrub_repairs_flipped_bytes_and_rebuild_replaces_a_lost_server_body());
}

/// Six servers, a 4+1 file on five of them and a 64 MiB 4+2 file on all six. Bytes flipped in the unit files of a stopped server
/// are never returned by a read, each damaged unit is found by scrub and repaired; then a server
/// of the layout is killed and rebuilt onto the sixth, and the file reads back identical with
/// no row needing parity.
async fn scrub_repairs_flipped_bytes_and_rebuild_replaces_a_lost_server_body() {
    let mut c = Cluster::start_with(6, "scrub", &["--chunk-store", "files"]).await;
    let dir = c.dir.clone();
    let data = noise(3 << 20, 11);
    let local = dir.join("in.bin");
    std::fs::write(&local, &data).unwrap();
    let put = ["put", local.to_str().unwrap(), "/data/s", "--stripe-unit", "64KiB", "--data", "4", "--parity", "1"];
    cli(&c, &put);
    let big = noise(64 << 20, 13);
    let big_local = dir.join("big.bin");
    std::fs::write(&big_local, &big).unwrap();
    cli(&c, &["put", big_local.to_str().unwrap(), "/data/q", "--data", "4", "--parity", "2"]);
    let stat: serde_json::Value = serde_json::from_str(&cli(&c, &["stat", "/data/s", "--json"])).unwrap();
    let layout: Vec<u64> = stat["layout"]["servers"].as_array().unwrap().iter().map(|s| s.as_u64().unwrap()).collect();
    let spare = (1..=6).find(|s| !layout.contains(s)).unwrap();
    let leader = c.leader().await;
    let victim = *layout.iter().find(|s| **s != leader).unwrap();

    // Stop the victim, flip a byte in some of its unit files, start it again.
    c.kill(victim);
    let units: Vec<PathBuf> = walk(&c.servers[victim as usize - 1].data.join("units"));
    assert!(units.len() >= 8, "{units:?}");
    let flipped: Vec<&PathBuf> = units.iter().step_by(3).collect();
    for (i, f) in flipped.iter().enumerate() {
        let mut b = std::fs::read(f).unwrap();
        let at = (i * 7919) % b.len();
        b[at] ^= 0x20;
        std::fs::write(f, b).unwrap();
    }
    c.spawn(victim, false);
    c.wait_ready().await;
    let out = dir.join("out.bin");
    let got: serde_json::Value =
        serde_json::from_str(&cli(&c, &["get", "/data/s", out.to_str().unwrap(), "--json"])).unwrap();
    assert!(std::fs::read(&out).unwrap() == data, "a read returned flipped bytes");
    assert!(got["rebuilt_rows"].as_u64().unwrap() > 0, "{got}");
    let scrub = Command::new(&*EXE).args(["scrub", "--json", "--cluster"]).arg(c.addrs().join(",")).output().unwrap();
    assert_eq!(scrub.status.code(), Some(1), "scrub found nothing: {scrub:?}");
    let report: serde_json::Value = serde_json::from_slice(&scrub.stdout).unwrap();
    let bad = report["damaged"].as_array().unwrap().len() + report["parity_mismatches"].as_array().unwrap().len();
    assert_eq!(bad, flipped.len(), "every flipped unit, and only those: {report}");
    let repaired: serde_json::Value = serde_json::from_str(&cli(&c, &["scrub", "--repair", "--json"])).unwrap();
    assert_eq!(repaired["repaired"].as_u64().unwrap() as usize, flipped.len(), "{repaired}");
    let clean: serde_json::Value = serde_json::from_str(&cli(&c, &["scrub", "--json"])).unwrap();
    assert!(
        clean["damaged"].as_array().unwrap().is_empty() && clean["parity_mismatches"].as_array().unwrap().is_empty()
    );

    // Lose the victim for good; rebuild its units onto the spare.
    c.kill(victim);
    let rebuild = Command::new(&*EXE)
        .args(["rebuild", "--server", &victim.to_string(), "--onto", &spare.to_string(), "--json", "--cluster"])
        .arg(c.addrs().join(","))
        .output()
        .unwrap();
    // The 4+2 file already lives on the spare too: it is skipped and reported (exit 1).
    assert_eq!(rebuild.status.code(), Some(1), "{rebuild:?}");
    let rebuilt: serde_json::Value = serde_json::from_slice(&rebuild.stdout).unwrap();
    assert_eq!(rebuilt["skipped"], serde_json::json!(["/data/q"]), "{rebuilt}");
    assert!(rebuilt["units_rebuilt"].as_u64().unwrap() > 0, "{rebuilt}");
    assert!(rebuilt["verify_mismatches"].as_array().unwrap().is_empty(), "{rebuilt}");
    let stat: serde_json::Value = serde_json::from_str(&cli(&c, &["stat", "/data/s", "--json"])).unwrap();
    let now: Vec<u64> = stat["layout"]["servers"].as_array().unwrap().iter().map(|s| s.as_u64().unwrap()).collect();
    assert!(now.contains(&spare) && !now.contains(&victim), "{now:?}");
    let got: serde_json::Value =
        serde_json::from_str(&cli(&c, &["get", "/data/s", out.to_str().unwrap(), "--json"])).unwrap();
    assert_eq!(got["rebuilt_rows"], 0, "the file still needs parity after the rebuild: {got}");
    assert!(std::fs::read(&out).unwrap() == data);

    // The 4+2 file (64 MiB on all six) reads back with the victim and one more server gone.
    let second = (1..=6).find(|s| *s != victim && *s != leader).unwrap();
    c.kill(second);
    let got: serde_json::Value =
        serde_json::from_str(&cli(&c, &["get", "/data/q", out.to_str().unwrap(), "--json"])).unwrap();
    assert!(got["rebuilt_rows"].as_u64().unwrap() > 0, "{got}");
    assert!(std::fs::read(&out).unwrap() == big, "4+2 with two servers down came back different");
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Runs the stripelock CLI with server `first` as the gateway (first of --cluster).
fn cli_at(c: &Cluster, first: u64, args: &[&str], stdin: &[u8]) -> String {
    let out = run_at(c, first, args, stdin);
    assert!(out.status.success(), "stripelock {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

async fn files_at(c: &Cluster, id: u64) -> pb::files_client::FilesClient<tonic::transport::Channel> {
    let addr = &c.servers[id as usize - 1].addr;
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
    pb::files_client::FilesClient::new(endpoint.connect().await.unwrap())
}

/// The whole file as the cluster returns it.
async fn read_all(c: &Cluster, path: &str) -> Vec<u8> {
    let s = Session::open(&c.addrs(), 5_000).await.unwrap();
    let g = s.lock(path, 0..u64::MAX, Mode::PR, LockOptions::default()).await.unwrap();
    let mut files = files_at(c, c.leader().await).await;
    let mut stream =
        files.get(pb::GetRequest { path: path.into(), token: g.signed_token, range: None }).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        out.extend_from_slice(&m.data);
    }
    s.close().await;
    out
}

fn scrub_clean(c: &Cluster) {
    let report: serde_json::Value = serde_json::from_str(&cli(c, &["scrub", "--json"])).unwrap();
    for key in ["damaged", "parity_mismatches", "unrepairable", "unavailable"] {
        assert_eq!(report[key].as_array().map(Vec::len), Some(0), "scrub found {key}: {report}");
    }
}

#[test]
fn concurrent_partial_writes_to_one_stripe_keep_parity_consistent() {
    serial(concurrent_partial_writes_to_one_stripe_keep_parity_consistent_body());
}

/// Two clients write different ranges of the same stripe row at once, many times, through
/// different gateways (`stripelock write`); the file then holds both clients' last bytes, scrub
/// finds parity consistent, and with a server of the row killed the row still reads back
/// right, rebuilt from that parity. A write past the end grows the file with zeros between.
async fn concurrent_partial_writes_to_one_stripe_keep_parity_consistent_body() {
    let mut c = Cluster::start(5, "partial").await;
    let original = noise(1 << 20, 11);
    let local = c.dir.join("in.bin");
    std::fs::write(&local, &original).unwrap();
    cli(&c, &["put", local.to_str().unwrap(), "/p", "--stripe-unit", "16KiB"]);
    // Row 0 is bytes 0..64Ki: client A writes 1000..1500 (unit 0), client B 40000..41000 (unit 2).
    const ROUNDS: u64 = 12;
    let writer = |c: &Cluster, gateway: u64, at: usize, len: usize, seed: u64| {
        let mut last = Vec::new();
        for round in 0..ROUNDS {
            last = noise(len, seed + round);
            let out = cli_at(c, gateway, &["write", "/p", "--offset", &at.to_string(), "--json"], &last);
            let reply: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(reply["rows"][0]["row"], 0, "{reply}");
        }
        last
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| writer(&c, 1, 1000, 500, 100));
        let b = s.spawn(|| writer(&c, 2, 40_000, 1000, 200));
        (a.join().unwrap(), b.join().unwrap())
    });
    let mut expect = original.clone();
    expect[1000..1500].copy_from_slice(&a);
    expect[40_000..41_000].copy_from_slice(&b);
    // Past the end: the file grows; the bytes between read as zeros.
    let tail = noise(3000, 300);
    cli_at(&c, 3, &["write", "/p", "--offset", &((1 << 20) + 70_000).to_string()], &tail);
    expect.resize((1 << 20) + 70_000, 0);
    expect.extend_from_slice(&tail);
    assert!(read_all(&c, "/p").await == expect, "the file does not hold the last bytes of each writer");
    scrub_clean(&c);
    let total: u64 = futures_total(&c, |s| s.stripe_writes).await;
    assert!(total > 2 * ROUNDS, "every row write is counted where it was carried out: {total}");

    // Parity really covers the writes: lose the server of row 0's d0 and read through parity.
    let stat: serde_json::Value = serde_json::from_str(&cli(&c, &["stat", "/p", "--json"])).unwrap();
    let d0 = stat["placement"][0]["units"][0]["server"].as_u64().unwrap();
    c.kill(d0);
    let got: serde_json::Value =
        serde_json::from_str(&cli(&c, &["get", "/p", c.dir.join("out.bin").to_str().unwrap(), "--json"])).unwrap();
    assert!(got["rebuilt_rows"].as_u64().unwrap() > 0, "{got}");
    assert!(std::fs::read(c.dir.join("out.bin")).unwrap() == expect, "rebuilt from parity, row 0 came back wrong");
}

/// The sum over live servers of a status counter.
async fn futures_total(c: &Cluster, f: impl Fn(&pb::StatusReply) -> u64) -> u64 {
    let mut total = 0;
    for s in c.servers.iter().filter(|s| s.child.is_some()) {
        if let Some(st) = c.status(s.id).await {
            total += f(&st);
        }
    }
    total
}

/// Waits until the sum of `f` over live servers is `want`, up to 10 s.
async fn until_total(c: &Cluster, what: &str, want: u64, f: impl Fn(&pb::StatusReply) -> u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let total = futures_total(c, &f).await;
        if total == want {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what} = {want}; it is {total}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A write of `data` at `at` of `path` through server `gateway`, under `token`, in the background.
fn spawn_write(
    c: &Cluster,
    gateway: u64,
    path: &str,
    at: u64,
    data: Vec<u8>,
    token: String,
) -> tokio::task::JoinHandle<Result<pb::WriteReply, tonic::Status>> {
    let addr = c.servers[gateway as usize - 1].addr.clone();
    let path = path.to_string();
    tokio::spawn(async move {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
        let mut files = pb::files_client::FilesClient::new(endpoint.connect().await.unwrap());
        files.write(pb::WriteRequest { path, token, offset: at, data: data.into() }).await.map(|r| r.into_inner())
    })
}

/// A 2+1 file of 64 KiB in 4 KiB units on three servers; returns its file id.
async fn small_file(c: &Cluster, path: &str) -> (u64, Vec<u8>) {
    let original = noise(1 << 16, 21);
    let local = c.dir.join("small.bin");
    std::fs::write(&local, &original).unwrap();
    cli(c, &["put", local.to_str().unwrap(), path, "--stripe-unit", "4KiB", "--data", "2", "--parity", "1"]);
    let stat: serde_json::Value = serde_json::from_str(&cli(c, &["stat", path, "--json"])).unwrap();
    (stat["file"].as_u64().unwrap(), original)
}

#[test]
fn stripe_writes_go_to_the_less_loaded_server() {
    serial(stripe_writes_go_to_the_less_loaded_server_body());
}

/// Seed 004's delegation: a gateway hands a row's write to the server that wrote the row last
/// while that server is not busier than the least loaded one by more than one write; past
/// that, the write goes to the least loaded server. The writes are held back by the test
/// holding the row's stripe lock, so each server's queue is known when the next one is sent.
async fn stripe_writes_go_to_the_less_loaded_server_body() {
    let c = Cluster::start(3, "delegation").await;
    let (id, original) = small_file(&c, "/d").await;
    let w = Session::open(&c.addrs(), 10_000).await.unwrap();
    let mut tokens = Vec::new();
    for i in 0..4u64 {
        let g = w.lock("/d", i * 100..i * 100 + 10, Mode::PW, LockOptions::default()).await.unwrap();
        tokens.push(g.signed_token);
    }
    // A first write through gateway 1 with every server idle: gateway 1 carries it out itself.
    let first = spawn_write(&c, 1, "/d", 0, vec![1; 10], tokens[0].clone()).await.unwrap().unwrap();
    assert_eq!(first.rows[0].server, 1, "{first:?}");

    // Hold row 0's stripe lock so writes queue where they are sent.
    let t = Session::open(&c.addrs(), 10_000).await.unwrap();
    let stripe = t.lock(&format!("#stripe/{id}/0"), 0..u64::MAX, Mode::EX, LockOptions::default()).await.unwrap();
    let mut pending = Vec::new();
    for i in 1..4u64 {
        pending.push(spawn_write(&c, 1, "/d", i * 100, vec![i as u8 + 1; 10], tokens[i as usize].clone()));
        until_total(&c, "stripe writes queued", i, |s| s.stripe_load as u64).await;
    }
    let mut loads = Vec::new();
    for s in 1..=3 {
        loads.push(c.status(s).await.unwrap().stripe_load as u64);
    }
    assert_eq!(loads[0], 2, "two writes stay with the last delegate (1 queued is within the slack): {loads:?}");
    assert_eq!(loads.iter().sum::<u64>(), 3, "{loads:?}");
    assert_eq!(c.status(1).await.unwrap().stripe_writes_delegated, 1, "the third went to a less loaded server");
    t.unlock(stripe.lock).await.unwrap();
    let mut by = Vec::new();
    for p in pending {
        let done = tokio::time::timeout(Duration::from_secs(40), p).await.expect("the write ends");
        by.push(done.unwrap().unwrap().rows[0].server);
    }
    assert_eq!(by[..2], [1, 1], "{by:?}");
    assert_ne!(by[2], 1, "{by:?}");
    let mut expect = original;
    for i in 0..4usize {
        expect[i * 100..i * 100 + 10].fill(i as u8 + 1);
    }
    w.close().await;
    assert!(read_all(&c, "/d").await == expect);
    scrub_clean(&c);
    t.close().await;
}

#[test]
fn a_stale_scheduled_write_is_dropped() {
    serial(a_stale_scheduled_write_is_dropped_body(false));
}

#[test]
fn a_stale_scheduled_write_lands_without_the_check_negative_control() {
    serial(a_stale_scheduled_write_is_dropped_body(true));
}

/// Seed 004's stale writes: a write waits, scheduled, for its row while the lock it was
/// written under expires (its client died). When the row's turn comes, and as soon as another
/// write lands on the row, the server drops it: its bytes never reach the file. With the check
/// switched off (negative control) the same stale bytes land, which the test shows. Storage
/// refuses a write of a fenced session too (issue 11), so the negative control switches that
/// off as well: both defences gone, the stale bytes land.
async fn a_stale_scheduled_write_is_dropped_body(broken: bool) {
    let extra: &[&str] = if broken { &["--break-stale-write-check-for-negative-control"] } else { &[] };
    let env: &[(&str, &str)] =
        if broken { &[("STRIPELOCK_TEST_SKIP_STORAGE_FENCE_FOR_NEGATIVE_CONTROL", "1")] } else { &[] };
    let c = Cluster::start_with_env(3, if broken { "stale-broken" } else { "stale" }, extra, env).await;
    let (id, original) = small_file(&c, "/s").await;
    let t = Session::open(&c.addrs(), 10_000).await.unwrap();
    let stripe = t.lock(&format!("#stripe/{id}/0"), 0..u64::MAX, Mode::EX, LockOptions::default()).await.unwrap();
    // A live writer's write, then a doomed one's, both queued at gateway 1.
    let live = Session::open(&c.addrs(), 10_000).await.unwrap();
    let v = live.lock("/s", 0..10, Mode::PW, LockOptions::default()).await.unwrap();
    let valid = spawn_write(&c, 1, "/s", 0, vec![0xaa; 10], v.signed_token.clone());
    until_total(&c, "the valid write queued", 1, |s| s.stripe_load as u64).await;
    let doomed = Session::open(&c.addrs(), 1_000).await.unwrap();
    let d = doomed.lock("/s", 300..310, Mode::PW, LockOptions::default()).await.unwrap();
    let stale = spawn_write(&c, 1, "/s", 300, vec![0xdd; 10], d.signed_token.clone());
    until_total(&c, "both writes queued", 2, |s| s.stripe_load as u64).await;
    // The doomed client dies: no more heartbeats; its lock goes once its lease runs out.
    drop(doomed);
    until_table(&c, 1, "/s", "the dead client's lock to go", |t| {
        t.resources.iter().filter(|r| r.name == "/s").flat_map(|r| &r.locks).count() == 1
    })
    .await;
    t.unlock(stripe.lock).await.unwrap();
    let valid = tokio::time::timeout(Duration::from_secs(40), valid).await.expect("the valid write ends").unwrap();
    assert!(valid.is_ok(), "{valid:?}");
    let stale = tokio::time::timeout(Duration::from_secs(40), stale).await.expect("the stale write ends").unwrap();
    live.unlock(v.lock).await.unwrap();
    let got = read_all(&c, "/s").await;
    let mut expect = original.clone();
    expect[0..10].fill(0xaa);
    if broken {
        assert!(stale.is_ok(), "without the check the stale write is carried out: {stale:?}");
        assert_eq!(got[300..310], [0xdd; 10], "negative control: the stale bytes landed");
    } else {
        let e = stale.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert_eq!(wire::code_of(&e), Ok(wire::ErrorCode::StaleToken), "{e:?}");
        assert!(e.message().contains("dropped"), "{}", e.message());
        assert!(got == expect, "the stale write changed the file");
        assert_eq!(futures_total(&c, |s| s.stripe_writes_dropped).await, 1);
    }
    scrub_clean(&c);
    live.close().await;
    t.close().await;
}

#[test]
fn a_write_lock_invalidates_only_the_servers_its_range_touches() {
    serial(a_write_lock_invalidates_only_the_servers_its_range_touches_body(false));
}

/// The negative control: with the leader's invalidations switched off, the storage servers keep
/// serving the now write-locked bytes without a lock, and the check below catches that stale
/// read.
#[test]
fn skipping_the_invalidate_serves_a_stale_unlocked_read() {
    serial(a_write_lock_invalidates_only_the_servers_its_range_touches_body(true));
}

/// Seed 000: reads without a lock (`cat --no-lock`) make every server of a 4+1 file remember
/// the ranges of its units as free of write locks. A PW lock on bytes of row 0's first data
/// unit then makes the leader invalidate exactly two servers, that unit's and row 0's parity
/// server; the other three receive nothing and keep serving unlocked reads from what they
/// know, while the locked bytes are refused until the lock goes.
async fn a_write_lock_invalidates_only_the_servers_its_range_touches_body(broken: bool) {
    let extra: &[&str] = if broken { &["--break-invalidate-for-negative-control"] } else { &[] };
    let c = Cluster::start_with(5, "invalidate", extra).await;
    let data = noise(1 << 20, 31);
    let local = c.dir.join("inv.bin");
    std::fs::write(&local, &data).unwrap();
    cli(&c, &["put", local.to_str().unwrap(), "/inv", "--stripe-unit", "16KiB"]);
    let unlocked_cat = |range: &str| {
        Command::new(&*EXE)
            .args(["cat", "/inv", "--no-lock", "--range", range, "--cluster"])
            .arg(c.addrs().join(","))
            .output()
            .unwrap()
    };
    let all = unlocked_cat("0..");
    assert!(all.status.success(), "{all:?}");
    assert!(all.stdout == data, "an unlocked read returned other bytes");
    for s in 1..=5 {
        assert!(c.status(s).await.unwrap().lock_free_ranges > 0, "server {s} remembers nothing lock-free");
    }
    let before = invalidations_received(&c).await;
    let stat: serde_json::Value = serde_json::from_str(&cli(&c, &["stat", "/inv", "--json"])).unwrap();
    let row0 = &stat["placement"][0]["units"];
    let touched = [row0[0]["server"].as_u64().unwrap(), row0[4]["server"].as_u64().unwrap()];
    assert_eq!(row0[4]["role"], "P");

    let w = Session::open(&c.addrs(), 10_000).await.unwrap();
    let g = w.lock("/inv", 100..200, Mode::PW, LockOptions::default()).await.unwrap();
    if broken {
        // Every server still holds its "free" for the bytes: the locked range is served.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let stale = unlocked_cat("100..200");
        assert!(
            stale.status.success() && stale.stdout == data[100..200],
            "without invalidations the locked bytes were still refused: {stale:?}"
        );
        assert_eq!(invalidations_received(&c).await, before, "invalidations arrived though switched off");
        w.close().await;
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after = invalidations_received(&c).await;
    while touched.iter().any(|&s| after[s as usize - 1] == before[s as usize - 1]) {
        assert!(
            Instant::now() < deadline,
            "the touched servers {touched:?} were not invalidated: {before:?} -> {after:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        after = invalidations_received(&c).await;
    }
    // Give a stray invalidation time to arrive before counting the others.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = invalidations_received(&c).await;
    for s in 1..=5u64 {
        let got = after[s as usize - 1] - before[s as usize - 1];
        let want = u64::from(touched.contains(&s));
        assert_eq!(got, want, "server {s}: {got} invalidations (touched: {touched:?}; {before:?} -> {after:?})");
    }
    // The locked bytes are refused without a lock; bytes of other rows are still served.
    let refused = unlocked_cat("100..200");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("locked for writing"), "{refused:?}");
    let other = unlocked_cat("300000..400000");
    assert!(other.status.success(), "{other:?}");
    assert!(other.stdout == data[300_000..400_000]);
    w.unlock(g.lock).await.unwrap();
    let again = unlocked_cat("100..200");
    assert!(again.status.success() && again.stdout == data[100..200], "{again:?}");
    w.close().await;
}

/// Each server's count of invalidations received, in id order.
async fn invalidations_received(c: &Cluster) -> Vec<u64> {
    let mut v = Vec::new();
    for s in &c.servers {
        v.push(c.status(s.id).await.unwrap().invalidations_received);
    }
    v
}

/// A call over an open channel to a server that stops answering without a word (SIGSTOPped:
/// its kernel keeps the connection, nothing reads it) fails within seconds, through the
/// channels' HTTP/2 keepalive, instead of waiting on TCP for many minutes (the fault campaign
/// found a stripe write stuck so, holding its row's stripe lock). Without the keepalive in
/// `wire::Connector::tcp` the second call waits out the test's 30 s bound and the test fails.
#[test]
fn a_call_to_a_paused_server_fails_in_seconds() {
    serial(async {
        let c = Cluster::start(1, "keepalive").await;
        let channel = wire::Connector::tcp(Duration::from_millis(500)).channel(&c.servers[0].addr).unwrap();
        let mut locks = pb::locks_client::LocksClient::new(channel);
        locks.status(pb::StatusRequest {}).await.expect("the server answers before it is paused");
        c.signal(1, "STOP");
        let t = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(30), locks.status(pb::StatusRequest {})).await;
        let took = t.elapsed();
        c.signal(1, "CONT");
        match answer {
            Ok(Err(status)) => eprintln!("the call failed after {took:.1?}: {}", status.message()),
            Ok(Ok(_)) => panic!("a paused server answered"),
            Err(_) => panic!("a call to a paused server was still waiting after {took:.1?}"),
        }
        assert!(took < Duration::from_secs(10), "the call failed only after {took:.1?}");
        // Once it runs again, the channel reconnects.
        let deadline = Instant::now() + Duration::from_secs(10);
        while locks.status(pb::StatusRequest {}).await.is_err() {
            assert!(Instant::now() < deadline, "no answer from the server after SIGCONT");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

/// Unmounts (lazily: a process may still hold it) the tmpfs a test mounted, however it ends.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A server whose disk fills up under its Raft log exits, saying why, instead of answering
/// status forever with its Raft core stopped (found by the fault campaign's disk-full fault);
/// started again once there is space, it catches up. As root only (it mounts a tmpfs).
#[test]
fn a_server_whose_raft_log_cannot_be_written_exits_and_comes_back_once_there_is_space() {
    if !nix_is_root() {
        eprintln!("SKIPPED: needs root to mount a tmpfs for server 3's Raft database");
        return;
    }
    serial(async {
        let mut c = Cluster::start(3, "raft-disk-full").await;
        // Server 3's Raft database moves to a small tmpfs (its log file stays on the disk).
        c.kill(3);
        let small = c.dir.join("small-disk");
        std::fs::create_dir_all(&small).unwrap();
        let ok = Command::new("mount").args(["-t", "tmpfs", "-o", "size=32m", "tmpfs"]).arg(&small).status().unwrap();
        assert!(ok.success(), "mount -t tmpfs failed");
        let _mounted = Tmpfs(small.clone());
        let db = c.servers[2].data.join("raft.redb");
        std::fs::copy(&db, small.join("raft.redb")).unwrap();
        std::fs::remove_file(&db).unwrap();
        std::os::unix::fs::symlink(small.join("raft.redb"), &db).unwrap();
        c.spawn(3, false);
        let deadline = Instant::now() + Duration::from_secs(15);
        while c.status(3).await.is_none() {
            assert!(Instant::now() < deadline, "server 3 did not start on its tmpfs");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Fill the tmpfs, then make log entries (locks through server 1) until server 3 exits.
        let filler = small.join("filler");
        {
            use std::io::Write as _;
            let mut f = std::fs::File::create(&filler).unwrap();
            let block = vec![0u8; 1 << 20];
            while f.write_all(&block).is_ok() {}
            let page = vec![0u8; 4096];
            while f.write(&page).is_ok_and(|n| n > 0) {}
        }
        let s = Session::open(&c.addrs_from(1), 5_000).await.unwrap();
        let t = Instant::now();
        let mut ops = 0u64;
        let status = loop {
            if let Some(status) = c.servers[2].child.as_mut().unwrap().try_wait().unwrap() {
                break status;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60) && ops < 200_000,
                "server 3 still runs after {ops} lock operations in {:.1?} on a full disk",
                t.elapsed()
            );
            let g = s.lock(&format!("/full/{}", ops % 64), 0..1, Mode::EX, LockOptions::default()).await.unwrap();
            s.unlock(g.lock).await.unwrap();
            ops += 2;
        };
        eprintln!("server 3 exited ({status}) after {ops} lock operations in {:.1?}", t.elapsed());
        c.servers[2].child = None;
        assert!(!status.success(), "server 3 exited successfully on a full disk");
        let log = std::fs::read_to_string(c.servers[2].data.join("server.log")).unwrap();
        assert!(log.contains("the Raft core stopped"), "server 3's log does not say why it exited: {log}");
        // Space again: started again, it takes part (its applied index reaches the leader's).
        std::fs::remove_file(&filler).unwrap();
        c.spawn(3, false);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let leader = c.status(1).await.map(|r| r.applied_index);
            let three = c.status(3).await.map(|r| r.applied_index);
            if let (Some(l), Some(t)) = (leader, three)
                && t >= l
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "server 3 did not catch up after space came back: {three:?} < {leader:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        s.close().await;
        c.kill(3);
    });
}

fn nix_is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}
