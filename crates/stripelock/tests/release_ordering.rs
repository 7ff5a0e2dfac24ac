//! Issue 12: a release is acknowledged to its client once it is in order on its way to the log,
//! not once it is committed. What must still hold, with real server processes:
//! - no conflicting waiter is granted before the release is committed;
//! - a crash of the server right after it acknowledged a release grants nothing twice, and the
//!   release still takes effect (the client resends it on resume until it is applied).

mod common;

use std::time::Duration;

use client::{LockOptions, Mode, Session};
use common::{Cluster, count, serial, until_table};

const LEASE_MS: u64 = 10_000;

/// With both followers stopped nothing commits: the holder's unlock still returns (the release
/// is in order), but the waiter on the same server is not granted until the followers are back
/// and the release is committed.
#[test]
fn a_release_returns_before_it_commits_and_no_waiter_is_granted_before_it_does() {
    serial(async {
        let c = Cluster::start(3, "release-ordered").await;
        let leader = c.leader().await;
        let a = Session::open(&c.addrs_from(leader), LEASE_MS).await.unwrap();
        let b = Session::open(&c.addrs_from(leader), LEASE_MS).await.unwrap();
        let held = a.lock("/r", 0..u64::MAX, Mode::EX, LockOptions::default()).await.unwrap();
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.lock("/r", 0..u64::MAX, Mode::EX, LockOptions::default()).await })
        };
        until_table(&c, leader, "/r", "the waiter queued", |t| count(t, false) == 1).await;
        let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
        for f in &followers {
            c.signal(*f, "STOP");
        }
        let started = std::time::Instant::now();
        let unlocked = tokio::time::timeout(Duration::from_secs(2), a.unlock(held.lock)).await;
        let took = started.elapsed();
        // Nothing can commit now; the waiter must still wait.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let granted_early = waiter.is_finished();
        for f in &followers {
            c.signal(*f, "CONT");
        }
        assert!(
            matches!(unlocked, Ok(Ok(()))),
            "the unlock did not return while the release could not commit: {unlocked:?} after {took:?}"
        );
        assert!(!granted_early, "the waiter was granted before the release was committed");
        let grant = tokio::time::timeout(Duration::from_secs(10), waiter).await.unwrap().unwrap().unwrap();
        assert!(grant.token > held.token, "the waiter's token {} is not past the holder's {}", grant.token, held.token);
        let t = until_table(&c, leader, "/r", "the waiter alone holds /r", |t| count(t, true) == 1).await;
        assert_eq!(count(&t, false), 0, "{t:?}");
    });
}

/// The server the holder's session is on (the leader) acknowledges its release as ordered and
/// dies before the release left it (a test hook). The release takes effect anyway, because the
/// client keeps it and resends it on resume until it is applied: the waiter is granted, once,
/// and the holder's lock is gone.
#[test]
fn a_crash_right_after_acknowledging_a_release_grants_nothing_twice_and_loses_no_release() {
    serial(async {
        let dir = std::env::temp_dir().join(format!("stripelock-release-crash-flag-{}", std::process::id()));
        let flag = dir.join("crash");
        std::fs::create_dir_all(&dir).unwrap();
        let c = Cluster::start_with_env(
            3,
            "release-crash",
            &[],
            &[("STRIPELOCK_TEST_CRASH_AFTER_RELEASE_ACK", flag.to_str().unwrap())],
        )
        .await;
        let leader = c.leader().await;
        let other = (1..=3).find(|id| *id != leader).unwrap();
        let a = Session::open(&c.addrs_from(leader), LEASE_MS).await.unwrap();
        let b = Session::open(&c.addrs_from(other), LEASE_MS).await.unwrap();
        let mut b_events = b.events();
        let held = a.lock("/r", 0..u64::MAX, Mode::EX, LockOptions::default()).await.unwrap();
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.lock("/r", 0..u64::MAX, Mode::EX, LockOptions::default()).await })
        };
        until_table(&c, other, "/r", "the waiter queued", |t| count(t, false) == 1).await;
        std::fs::write(&flag, b"").unwrap();
        a.unlock(held.lock).await.expect("the release is acknowledged before the crash");
        // The leader aborts right after its acknowledgement.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while flag.exists() || c.status(leader).await.is_some() {
            assert!(std::time::Instant::now() < deadline, "the server acknowledging the release did not crash");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let grant = tokio::time::timeout(Duration::from_secs(15), waiter)
            .await
            .expect("the release was lost: the waiter is never granted")
            .unwrap()
            .unwrap();
        assert!(grant.token > held.token);
        let t = until_table(&c, other, "/r", "the waiter alone holds /r", |t| count(t, true) == 1).await;
        assert_eq!(count(&t, false), 0, "a request still waits: {t:?}");
        let holders: Vec<u64> =
            t.resources.iter().flat_map(|r| &r.locks).filter(|l| l.granted).map(|l| l.session).collect();
        assert_eq!(holders, vec![b.id()], "someone other than the waiter holds /r: {t:?}");
        // Granted once: no second grant of the lock shows up as an event.
        tokio::time::sleep(Duration::from_millis(500)).await;
        while let Ok(e) = b_events.try_recv() {
            assert!(!matches!(e, client::Event::Granted(_)), "a second grant: {e:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    });
}
