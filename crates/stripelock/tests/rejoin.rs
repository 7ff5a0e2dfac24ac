//! Issue 12: a follower whose Raft database is wiped catches up again, and votes only once it
//! holds the log. With real server processes:
//! - while the leader is paused, the wiped server refuses its vote, so the one other server cannot
//!   be elected with it (had it voted as if nothing happened, a server missing committed entries
//!   could win);
//! - once the leader answers, it readmits the wiped server (learner → caught up → voter), which
//!   then holds every lock and helps elect the next leader when the old one is killed.

mod common;

use std::time::{Duration, Instant};

use client::{LockOptions, Mode, Session};
use common::{Cluster, serial};

async fn until<T>(what: &str, bound: Duration, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + bound;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {bound:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn a_wiped_follower_votes_only_once_readmitted_with_the_log() {
    serial(async {
        // Snapshots every 20 entries: the wiped server needs the leader's snapshot, not just the log.
        let mut c = Cluster::start_with(3, "rejoin", &["--snapshot-every", "20"]).await;
        let holder = Session::open(&c.addrs(), 30_000).await.unwrap();
        for i in 0..60 {
            holder.lock(&format!("/rejoin/{i}"), 0..1, Mode::PW, LockOptions::default()).await.unwrap();
        }
        let leader = c.leader().await;
        // A follower other than the bootstrapping server 1.
        let wiped = (2..=3).find(|id| *id != leader).unwrap();
        let other = (1..=3).find(|id| *id != leader && *id != wiped).unwrap();
        until("the wiped server applies the locks", Duration::from_secs(10), async || {
            let s = c.status(wiped).await?;
            (s.locks_granted >= 60).then_some(())
        })
        .await;
        c.kill(wiped);
        let data = c.servers[wiped as usize - 1].data.clone();
        std::fs::remove_file(data.join("raft.redb")).unwrap();
        assert!(data.join("raft.joined").exists(), "a server that applied entries marks that it joined");

        // The leader paused: the other follower asks the wiped server for its vote and is refused.
        c.signal(leader, "STOP");
        c.spawn(wiped, false);
        let s = until("the wiped server answers", Duration::from_secs(10), async || c.status(wiped).await).await;
        assert!(s.rejoining, "a server that lost its database says it is rejoining");
        tokio::time::sleep(Duration::from_secs(3)).await;
        for id in [wiped, other] {
            let s = c.status(id).await.unwrap();
            assert_ne!(s.leader_id, id, "server {id} was elected with the wiped server's vote");
        }
        assert!(c.status(wiped).await.unwrap().rejoining);

        // The leader back: it readmits the wiped server once it holds the log.
        c.signal(leader, "CONT");
        until("the wiped server is readmitted", Duration::from_secs(60), async || {
            let s = c.status(wiped).await?;
            let voters = s.servers.iter().filter(|m| m.voter).count();
            (!s.rejoining && voters == 3 && s.locks_granted >= 60).then_some(())
        })
        .await;
        let l = c.status(leader).await.unwrap();
        assert!(l.servers.iter().all(|m| m.voter), "every server is a voter again: {:?}", l.servers);

        // It votes again: with the old leader gone, it and the other follower elect one, and the
        // locks are all still held.
        c.kill(leader);
        let new = until("a new leader", Duration::from_secs(20), async || {
            let s = c.status(wiped).await?;
            (s.leader_id != 0 && s.leader_id != leader).then_some(s.leader_id)
        })
        .await;
        assert!(new == wiped || new == other);
        let contender = Session::open(&c.addrs_from(other), 10_000).await.unwrap();
        let busy =
            contender.lock("/rejoin/7", 0..1, Mode::EX, LockOptions { nowait: true, ..Default::default() }).await;
        assert!(busy.is_err(), "a lock held before the wipe and the failover is still held: {busy:?}");
        holder.close().await;
        contender.close().await;
    });
}
