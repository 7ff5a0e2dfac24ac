//! Issue 12: lock memory that stays bounded. Each holder keeps its idle cached locks in an LRU
//! whose size the servers set from their lock-memory budget (`--lock-memory-budget`): near the
//! budget they shrink it and the holder gives back its least recently used cached locks; when
//! memory frees they grow it again. `status` shows budget, use and the LRU size.

mod common;

use std::time::{Duration, Instant};

use client::{LockOptions, Mode, Session};
use common::{Cluster, serial};
use wire::v1 as pb;

const LEASE_MS: u64 = 10_000;

/// Idle cached locks of `session` in the table of server `id`.
async fn cached_of(c: &Cluster, id: u64, session: u64) -> usize {
    let t = c.table(id, "/m/").await.expect("the table");
    t.resources.iter().flat_map(|r| &r.locks).filter(|l| l.session == session && l.granted && l.cached).count()
}

/// Polls `status` of server `id` until `check` holds, up to 15 s.
async fn until_status(c: &Cluster, id: u64, what: &str, check: impl Fn(&pb::StatusReply) -> bool) -> pb::StatusReply {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = c.status(id).await;
        if let Some(s) = &s
            && check(s)
        {
            return s.clone();
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn holders_lrus_shrink_near_the_budget_and_grow_back_when_memory_frees() {
    serial(async {
        // 256 lock records' worth (1 KiB each): small enough to reach in a test.
        let c = Cluster::start_with(3, "lock-memory", &["--lock-memory-budget", "256KiB"]).await;
        let leader = c.leader().await;
        let first = until_status(&c, leader, "an LRU size", |s| s.lru_size > 0).await;
        assert_eq!(first.lock_memory_budget, 256 << 10, "{first:?}");
        let fair = first.lru_size;
        assert!((16..=200).contains(&fair), "fair share {fair} of a 256-lock budget: {first:?}");

        // A caches far more than its LRU may keep: it keeps only the most recent, and the lock
        // it used last is one of them.
        let a = Session::open(&c.addrs_from(leader), LEASE_MS).await.unwrap();
        for i in 0..170 {
            let g = a.lock(&format!("/m/a{i}"), 0..u64::MAX, Mode::EX, LockOptions::default()).await.unwrap();
            a.cache(g.lock).await.unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // The share shrinks as sessions open: A's own counts.
            let now = c.status(leader).await.unwrap().lru_size;
            let kept = cached_of(&c, leader, a.id()).await;
            if kept <= now as usize {
                assert!(kept < 170, "nothing was given back: {kept} cached, LRU size {now}");
                break;
            }
            assert!(Instant::now() < deadline, "session {} keeps {kept} cached locks, LRU size {now}", a.id());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let last = a.lock("/m/a169", 0..u64::MAX, Mode::EX, LockOptions::default()).await.unwrap();
        assert!(a.is_cached(last.lock), "the most recently used cached lock was given back first");
        a.unlock(last.lock).await.unwrap();

        // B holds enough (not cached) to bring the table near the budget: the LRU shrinks, and
        // A gives back more.
        let b = Session::open(&c.addrs_from(leader), LEASE_MS).await.unwrap();
        let mut held = Vec::new();
        for i in 0..230 {
            held.push(b.lock(&format!("/m/b{i}"), 0..u64::MAX, Mode::EX, LockOptions::default()).await.unwrap().lock);
        }
        // The server samples its table once a second: wait for a sample that counts all of B's.
        let pressed =
            until_status(&c, leader, "a smaller LRU size", |s| s.lru_size < fair && s.lock_memory_used >= 230 * 1024)
                .await;
        assert!(pressed.lock_memory_used >= 230 * 1024, "{pressed:?}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = c.status(leader).await.unwrap().lru_size;
            if cached_of(&c, leader, a.id()).await <= now as usize {
                break;
            }
            assert!(Instant::now() < deadline, "session {} did not shrink to {now}", a.id());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // Memory frees: the LRU grows again.
        for l in held {
            b.unlock(l).await.unwrap();
        }
        b.close().await;
        let grown = until_status(&c, leader, "the LRU grown back", |s| {
            s.lru_size > pressed.lru_size && s.lock_memory_used < pressed.lock_memory_used
        })
        .await;
        println!("LRU size: {fair} at first, {} near the budget, {} after", pressed.lru_size, grown.lru_size);
    });
}
