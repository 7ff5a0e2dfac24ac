//! Issue 12: leases without log writes. A heartbeat renews its session in the leader's memory;
//! only an expiry is a log entry. What must hold, with real server processes and a hand-driven
//! session stream (so the test decides exactly when heartbeats stop):
//! - heartbeats write nothing to the log;
//! - no session expires early because the leader changed: a new leader gives every session a
//!   full lease from its election, never less than what the old leader acknowledged;
//! - a session whose heartbeats stop does expire, and its lock then goes to the next waiter.

mod common;

use std::time::{Duration, Instant};

use common::{Cluster, serial};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use wire::v1 as pb;
use wire::v1::client_message::Body as Up;
use wire::v1::server_message::Body as Down;

const LEASE_MS: u64 = 4_000;
/// What a holder may count on: the lease less its drift margin (`lockengine::lease`).
const VALID_MS: u64 = LEASE_MS - LEASE_MS / 10;

/// A session stream driven by hand: the test sends each message and sees each answer, with the
/// time it came.
struct RawSession {
    up: mpsc::Sender<pb::ClientMessage>,
    down: mpsc::UnboundedReceiver<(Instant, pb::ServerMessage)>,
    /// Everything seen so far.
    seen: Vec<(Instant, pb::ServerMessage)>,
    id: u64,
}

impl RawSession {
    async fn open(addr: &str) -> RawSession {
        RawSession::open_with(
            addr,
            pb::OpenSession {
                resume_session: 0,
                lease_ms: LEASE_MS,
                client_name: "leases test".into(),
                ..Default::default()
            },
        )
        .await
    }

    async fn open_with(addr: &str, open: pb::OpenSession) -> RawSession {
        let (up, rx) = mpsc::channel(16);
        up.send(pb::ClientMessage { request_id: 1, body: Some(Up::Open(open)) }).await.unwrap();
        let mut client = pb::locks_client::LocksClient::connect(format!("http://{addr}")).await.unwrap();
        let mut stream = client.session(ReceiverStream::new(rx)).await.unwrap().into_inner();
        let (tx, down) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Ok(m)) = stream.next().await {
                if tx.send((Instant::now(), m)).is_err() {
                    return;
                }
            }
        });
        let mut s = RawSession { up, down, seen: Vec::new(), id: 0 };
        let opened = s.until(1, |b| matches!(b, Down::Opened(_))).await;
        let Some(Down::Opened(o)) = opened.body else { unreachable!() };
        s.id = o.session;
        s
    }

    async fn send(&self, request_id: u64, body: Up) {
        self.up.send(pb::ClientMessage { request_id, body: Some(body) }).await.unwrap();
    }

    /// Waits (up to 10 s) for a message to `request` that `want` accepts.
    async fn until(&mut self, request: u64, want: impl Fn(&Down) -> bool) -> pb::ServerMessage {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let next = tokio::time::timeout_at(deadline, self.down.recv()).await;
            let Ok(Some((at, m))) = next else { panic!("no answer to request {request}; seen {:?}", self.seen) };
            self.seen.push((at, m.clone()));
            if m.request_id == request && m.body.as_ref().is_some_and(&want) {
                return m;
            }
        }
    }

    /// Takes what has arrived without waiting.
    fn drain(&mut self) {
        while let Ok(m) = self.down.try_recv() {
            self.seen.push(m);
        }
    }

    /// Renews once and returns when the heartbeat was sent, after its ack (not a refusal).
    async fn heartbeat(&mut self, request: u64) -> Instant {
        let sent = Instant::now();
        self.send(request, Up::Heartbeat(pb::Heartbeat {})).await;
        self.until(request, |b| matches!(b, Down::Ack(_))).await;
        let refused =
            self.seen.iter().any(|(_, m)| m.request_id == request && matches!(m.body, Some(Down::Rejected(_))));
        assert!(!refused, "heartbeat {request} was refused: {:?}", self.seen);
        sent
    }
}

fn lock(request: u64, resource: &str) -> Up {
    Up::Lock(pb::LockRequest {
        lock: request,
        resource: resource.into(),
        range: Some(pb::Range { start: 0, end: u64::MAX }),
        mode: pb::Mode::Ex as i32,
        nowait: false,
        gateway: false,
        wait_ms: 0,
    })
}

/// The session holding `resource` as server `id` sees it (0: nobody; `None`: no answer).
async fn holder(c: &Cluster, id: u64, resource: &str) -> Option<u64> {
    let t = c.table(id, resource).await?;
    Some(t.resources.iter().flat_map(|r| &r.locks).find(|l| l.granted).map_or(0, |l| l.session))
}

#[test]
fn heartbeats_write_nothing_to_the_log() {
    serial(async {
        let c = Cluster::start(3, "lease-no-log").await;
        let leader = c.leader().await;
        let follower = (1..=3).find(|id| *id != leader).unwrap();
        let mut on_leader = RawSession::open(&c.addrs_from(leader)[0]).await;
        let mut on_follower = RawSession::open(&c.addrs_from(follower)[0]).await;
        // Let the opens and any bootstrap work settle, then count.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = c.status(leader).await.unwrap().commit_index;
        for i in 0..20 {
            on_leader.heartbeat(10 + i).await;
            on_follower.heartbeat(10 + i).await;
        }
        let after = c.status(leader).await.unwrap().commit_index;
        assert_eq!(before, after, "40 heartbeats moved the commit index from {before} to {after}");
    });
}

/// The holder renews through a follower, the leader acknowledges it and is killed at once, and
/// the holder sends nothing more. The new leader must keep the session (and its lock) for at
/// least the lease the old leader acknowledged, counted from when the heartbeat was sent; then
/// it expires the session, and the lock is freed (after the fence).
#[test]
fn no_session_expires_early_because_the_leader_changed() {
    serial(async {
        let mut c = Cluster::start(3, "lease-failover").await;
        let old = c.leader().await;
        let follower = (1..=3).find(|id| *id != old).unwrap();
        let mut s = RawSession::open(&c.addrs_from(follower)[0]).await;
        s.send(2, lock(2, "/lease")).await;
        s.until(2, |b| matches!(b, Down::Granted(_))).await;
        assert_eq!(holder(&c, follower, "/lease").await, Some(s.id));

        let sent = s.heartbeat(3).await;
        c.kill(old);
        let killed = Instant::now();
        let new = c.leader().await;
        assert_ne!(new, old);
        let elected_after = killed.elapsed();

        // Until the acknowledged lease ends the session holds its lock, on every live server.
        while sent.elapsed() < Duration::from_millis(VALID_MS - 100) {
            for id in (1..=3).filter(|id| *id != old) {
                if let Some(h) = holder(&c, id, "/lease").await {
                    assert_eq!(
                        h,
                        s.id,
                        "server {id} shows /lease held by {h}, not session {}, {:?} after the acknowledged \
                         heartbeat (lease {LEASE_MS} ms; leader {new} elected {elected_after:?} after the kill)",
                        s.id,
                        sent.elapsed()
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        s.drain();
        let expired = s.seen.iter().find(|(_, m)| matches!(m.body, Some(Down::Expired(_))));
        assert!(expired.is_none(), "the session was told it expired early: {:?}", s.seen);

        // With no heartbeat since, it does expire: its lock is gone within the lease from the
        // election, plus the fence's wait for the killed server's storage lease, plus slack.
        let deadline = Instant::now() + Duration::from_millis(LEASE_MS + 10_000);
        loop {
            if holder(&c, new, "/lease").await == Some(0) {
                break;
            }
            assert!(Instant::now() < deadline, "the silent session's lock was never freed: {:?}", s.seen);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let freed = sent.elapsed();
        assert!(freed >= Duration::from_millis(VALID_MS), "freed {freed:?} after the heartbeat");
    });
}

/// A resumed session is told again of the locks it lists as awaited (granted while it was away),
/// and not of the ones it holds and knows: a client holding many locks must not be sent them all
/// on every reconnect (issue 12: at 1M locks such resyncs drowned the servers). A client that
/// lists nothing (an older one) hears of every lock, as before.
#[test]
fn a_resumed_session_hears_again_only_of_the_locks_it_awaits() {
    serial(async {
        let c = Cluster::start(3, "lease-resume").await;
        let addr = c.addrs()[0].clone();
        let mut a = RawSession::open(&addr).await;
        for i in 0..20u64 {
            a.send(10 + i, lock(10 + i, &format!("/resume/{i}"))).await;
            a.until(10 + i, |b| matches!(b, Down::Granted(_))).await;
        }
        let mut b = RawSession::open(&addr).await;
        b.send(2, lock(2, "/resume/contended")).await;
        b.until(2, |m| matches!(m, Down::Granted(_))).await;
        // Lock 40 waits behind b's; then a's stream goes away and b releases.
        a.send(40, lock(40, "/resume/contended")).await;
        a.until(40, |m| matches!(m, Down::Queued(_))).await;
        let id = a.id;
        drop(a);
        b.send(3, Up::Release(pb::LockRef { lock: 2 })).await;
        b.until(3, |m| matches!(m, Down::Ack(_))).await;

        let resume = |listed: bool| pb::OpenSession {
            resume_session: id,
            lease_ms: LEASE_MS,
            client_name: String::new(),
            resync_locks: if listed { vec![40] } else { Vec::new() },
            resync_listed: listed,
        };
        let mut again = RawSession::open_with(&addr, resume(true)).await;
        again.heartbeat(50).await;
        let told: Vec<u64> = again
            .seen
            .iter()
            .filter_map(|(_, m)| match &m.body {
                Some(Down::Granted(g)) => Some(g.lock),
                _ => None,
            })
            .collect();
        assert_eq!(told, vec![40], "a resume that lists lock 40 is told of it alone");
        drop(again);

        let mut old = RawSession::open_with(&addr, resume(false)).await;
        old.heartbeat(60).await;
        let told = old.seen.iter().filter(|(_, m)| matches!(m.body, Some(Down::Granted(_)))).count();
        assert_eq!(told, 21, "a resume that lists nothing is told of every lock: {:?}", old.seen);
    });
}

/// A session kept busy with requests still renews its lease: its heartbeats are not starved by
/// the answers and calls its loop is handling (issue 12: during the 1M fill, busy sessions
/// expired because their loop never reached the heartbeat tick). The lease never runs out on
/// the client's own count, and the cluster keeps the session.
#[test]
fn a_busy_session_still_renews_its_lease() {
    serial(async {
        const LEASE: u64 = 3_000;
        let c = Cluster::start(3, "lease-busy").await;
        let s = client::Session::open(&c.addrs(), LEASE).await.unwrap();
        let started = Instant::now();
        let mut cycles = 0u64;
        let mut least = Duration::from_millis(LEASE);
        // Eight calls in flight at a time for twice the lease: far more than one lease's worth.
        while started.elapsed() < Duration::from_millis(2 * LEASE) {
            let calls = (0..8).map(|i| {
                let s = s.clone();
                async move {
                    let g =
                        s.lock(&format!("/busy/{i}"), 0..1, client::Mode::EX, client::LockOptions::default()).await?;
                    s.unlock(g.lock).await
                }
            });
            for r in futures::future::join_all(calls).await {
                r.expect("a call of the busy session failed");
            }
            cycles += 8;
            least = least.min(s.lease_left());
        }
        assert!(cycles > 16, "only {cycles} cycles in {:?}", started.elapsed());
        assert!(
            least > Duration::ZERO,
            "the busy session's lease ran out on its own count after {cycles} cycles (least left {least:?})"
        );
        let g = s.lock("/busy/after", 0..1, client::Mode::EX, client::LockOptions::default()).await;
        assert!(g.is_ok(), "the busy session was lost: {g:?}");
        s.close().await;
    });
}

/// A blocking request that carries a limit (`wait_ms`) is ended by the server when the limit
/// passes, although its client never cancels it (issue 13: a wait whose client went quiet must
/// not stay in the queue until the session's lease runs out). A request without a limit still
/// waits; a POSIX wait ends the same way; and a newer wait of the same POSIX owner is not
/// cancelled by the deadline of an older one.
#[test]
fn a_wait_ends_at_its_server_side_deadline_without_the_clients_cancel() {
    serial(async {
        let c = Cluster::start(3, "wait-deadline").await;
        let addr = c.addrs()[1].clone();
        let mut a = RawSession::open(&addr).await;
        a.send(2, lock(2, "/deadline/r")).await;
        a.until(2, |m| matches!(m, Down::Granted(_))).await;
        let posix = |owner: u64, wait: bool, wait_ms: u64| {
            Up::Posix(pb::PosixRequest {
                owner,
                resource: "/deadline/p".into(),
                range: Some(pb::Range { start: 0, end: 100 }),
                kind: pb::PosixKind::PosixWrite as i32,
                wait,
                wait_ms,
            })
        };
        a.send(3, posix(1, false, 0)).await;
        a.until(3, |m| matches!(m, Down::Ack(_))).await;

        let mut b = RawSession::open(&addr).await;
        let started = Instant::now();
        b.send(2, Up::Lock(pb::LockRequest { wait_ms: 600, ..lock_request(2, "/deadline/r") })).await;
        b.until(2, |m| matches!(m, Down::Queued(_))).await;
        // Another session's request without a limit, behind it.
        let mut n = RawSession::open(&addr).await;
        n.send(3, lock(3, "/deadline/r")).await;
        n.until(3, |m| matches!(m, Down::Queued(_))).await;
        b.send(4, posix(9, true, 600)).await;
        b.until(4, |m| matches!(m, Down::Posix(p) if p.outcome == 2)).await;
        // Owner 10 waits with a shorter limit.
        b.send(5, posix(10, true, 300)).await;
        b.until(5, |m| matches!(m, Down::Posix(p) if p.outcome == 2)).await;
        b.heartbeat(6).await;

        // Nothing of b's cancels them: the server does, as events (request 0).
        b.until(0, |m| matches!(m, Down::Cancelled(l) if l.lock == 2)).await;
        let waited = b.seen.last().map(|(at, _)| at.duration_since(started)).unwrap();
        assert!(
            waited >= Duration::from_millis(600) && waited < Duration::from_secs(3),
            "lock 2 was cancelled after {waited:?}, not soon after its 600 ms"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        b.drain();
        let posix_ended = |b: &RawSession, owner: u64| {
            b.seen
                .iter()
                .filter(|(_, m)| {
                    m.request_id == 0 && matches!(&m.body, Some(Down::Posix(p)) if p.owner == owner && p.outcome == 6)
                })
                .count()
        };
        assert_eq!(posix_ended(&b, 9), 1, "owner 9's wait ends at its limit: {:?}", b.seen);
        assert_eq!(posix_ended(&b, 10), 1, "owner 10's wait ends at its limit: {:?}", b.seen);
        // Asked again without a limit, owner 10 waits on.
        b.send(7, posix(10, true, 0)).await;
        b.until(7, |m| matches!(m, Down::Posix(p) if p.outcome == 2)).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        b.heartbeat(8).await;
        n.heartbeat(9).await;
        b.drain();
        let ended = n.seen.iter().any(|(_, m)| matches!(&m.body, Some(Down::Cancelled(_))));
        assert!(!ended, "lock 3 had no limit and must still wait: {:?}", n.seen);
        let owner_10_ends = b
            .seen
            .iter()
            .filter(|(_, m)| matches!(&m.body, Some(Down::Posix(p)) if p.owner == 10 && p.outcome == 6))
            .count();
        assert_eq!(owner_10_ends, 1, "owner 10's second wait has no limit and must still wait: {:?}", b.seen);
        // The cluster agrees: lock 3 and owner 10 wait, lock 2 and owner 9 do not.
        let t = c.table(2, "/deadline/r").await.expect("a lock table");
        let waiting: Vec<u64> =
            t.resources.iter().flat_map(|r| &r.locks).filter(|l| l.waiting).map(|l| l.session).collect();
        assert_eq!(waiting, vec![n.id], "only lock 3 still waits: {t:?}");
    });
}

fn lock_request(request: u64, resource: &str) -> pb::LockRequest {
    let Up::Lock(l) = lock(request, resource) else { unreachable!() };
    l
}
