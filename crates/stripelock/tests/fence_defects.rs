//! Issue 11, fence before re-grant enforced by storage (seed 003), with real `stripelock server`
//! processes on loopback (127.0.0.1 only) and a real `stripelock lock` client stopped with
//! SIGSTOP by its own PID. A write of the client is held back at the server carrying it out
//! (the test-only hook `STRIPELOCK_TEST_HOLD_STRIPE_WRITE_MS`, after the lock check and before
//! any unit is written) past the client's lease; the client's session expires and is fenced;
//! another client takes the lock and writes another row; when the held write is let go, storage
//! must refuse it on every unit. The negative control (`STRIPELOCK_TEST_SKIP_STORAGE_FENCE_…`:
//! the leader acknowledges fences without storage, as before issue 11) shows the stale bytes
//! landing, so the test can tell the difference.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use client::{LockOptions, Mode, Session};
use wire::v1 as pb;

mod common;
use common::*;

const HOLD_ENV: &str = "STRIPELOCK_TEST_HOLD_STRIPE_WRITE_MS";
const SKIP_ENV: &str = "STRIPELOCK_TEST_SKIP_STORAGE_FENCE_FOR_NEGATIVE_CONTROL";
/// How long each server holds the first stripe write it carries out.
const HOLD_MS: u64 = 5_000;
/// Stripe unit 4 KiB, 2 data + 1 parity: a row is 8 KiB; the file has two rows.
const ROW: usize = 8 << 10;

fn sig(pid: u32, signal: &str) {
    let ok = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().unwrap().success();
    assert!(ok, "kill -{signal} {pid} failed");
}

async fn files_at(c: &Cluster, id: u64) -> pb::files_client::FilesClient<tonic::transport::Channel> {
    let addr = &c.servers[id as usize - 1].addr;
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
    pb::files_client::FilesClient::new(endpoint.connect().await.unwrap())
}

async fn read_with(c: &Cluster, gateway: u64, path: &str, token: &str) -> Vec<u8> {
    let mut files = files_at(c, gateway).await;
    let mut stream =
        files.get(pb::GetRequest { path: path.into(), token: token.into(), range: None }).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        out.extend_from_slice(&m.data);
    }
    out
}

/// Puts `/f`: two rows of 2+1 with 4 KiB units, of noise from `seed`; returns its bytes.
fn put_two_rows(c: &Cluster, seed: u64) -> Vec<u8> {
    let old = noise(2 * ROW, seed);
    let local = c.dir.join("put.bin");
    std::fs::write(&local, &old).unwrap();
    let put = run_at(
        c,
        1,
        &["put", local.to_str().unwrap(), "/f", "--stripe-unit", "4KiB", "--data", "2", "--parity", "1"],
        b"",
    );
    assert!(put.status.success(), "put: {}", String::from_utf8_lossy(&put.stderr));
    old
}

/// What happened to the held write of a client whose session was fenced meanwhile.
struct Outcome {
    /// The held write's answer.
    stale: Result<(), tonic::Status>,
    /// The file as it was put.
    old: Vec<u8>,
    /// The file afterwards.
    now: Vec<u8>,
    /// The stale write's bytes (at 0) and the second client's (in the second row).
    stale_bytes: (usize, Vec<u8>),
    new_bytes: (usize, Vec<u8>),
}

async fn held_write_of_a_fenced_client(name: &str, skip_storage_fence: bool) -> Outcome {
    let hold = HOLD_MS.to_string();
    let mut env = vec![(HOLD_ENV, hold.as_str())];
    if skip_storage_fence {
        env.push((SKIP_ENV, "1"));
    }
    let c = Cluster::start_with_env(3, name, &[], &env).await;
    let cluster = c.addrs().join(",");
    let old = put_two_rows(&c, 11);

    // Client A: `stripelock lock /f` (EX over the whole file, a 1 s lease) whose command hands
    // its token to the test.
    let token_file = c.dir.join("token-a");
    let script = format!("echo $STRIPELOCK_TOKEN > {}.tmp && mv {0}.tmp {0}; sleep 60", token_file.display());
    let mut a: Child = Command::new(&*EXE)
        .args(["lock", "/f", "--lease", "1s", "--cluster", &cluster, "--", "sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let token_a = loop {
        if let Ok(t) = std::fs::read_to_string(&token_file)
            && !t.trim().is_empty()
        {
            break t.trim().to_string();
        }
        assert!(Instant::now() < deadline, "client A never got its lock");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // A's write of the first row, in flight: held at the server carrying it out.
    let stale_bytes = (0, vec![0xaa; 100]);
    let mut gateway = files_at(&c, 1).await;
    let req = pb::WriteRequest { path: "/f".into(), token: token_a, offset: 0, data: stale_bytes.1.clone().into() };
    let stale = tokio::spawn(async move { gateway.write(req).await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!stale.is_finished(), "the write was not held: {:?}", stale.await);

    // A stops; its lease runs out; its session is fenced; B gets the lock.
    sig(a.id(), "STOP");
    let started = Instant::now();
    let b = Session::open(&c.addrs(), 10_000).await.unwrap();
    let opts = LockOptions { timeout: Some(Duration::from_secs(4)), ..Default::default() };
    let g = b.lock("/f", 0..u64::MAX, Mode::EX, opts).await.expect("A's lease ran out and it was fenced: /f is free");
    let regrant = started.elapsed();
    assert!(regrant < Duration::from_millis(HOLD_MS - 1_000), "the re-grant took {regrant:?}, longer than the hold");

    // B writes the second row.
    let new_bytes = (ROW + 100, vec![0xbb; 200]);
    let mut files = files_at(&c, 2).await;
    let req = pb::WriteRequest {
        path: "/f".into(),
        token: g.signed_token.clone(),
        offset: new_bytes.0 as u64,
        data: new_bytes.1.clone().into(),
    };
    files.write(req).await.expect("B's write");

    // The held write is let go.
    let stale = tokio::time::timeout(Duration::from_secs(HOLD_MS / 1000 + 20), stale)
        .await
        .expect("the held write never answered")
        .unwrap();
    let now = read_with(&c, 3, "/f", &g.signed_token).await;
    b.unlock(g.lock).await.unwrap();
    b.close().await;
    sig(a.id(), "CONT");
    let _ = a.kill();
    let _ = a.wait();
    Outcome { stale, old, now, stale_bytes, new_bytes }
}

fn splice(mut v: Vec<u8>, (at, bytes): &(usize, Vec<u8>)) -> Vec<u8> {
    v[*at..*at + bytes.len()].copy_from_slice(bytes);
    v
}

/// The held write of a fenced client is refused on every unit: the file holds exactly the
/// second client's bytes and the untouched old ones.
#[test]
fn a_held_write_of_a_fenced_client_is_refused_by_storage() {
    serial(async {
        let o = held_write_of_a_fenced_client("fence-held", false).await;
        let e = o.stale.expect_err("the fenced client's held write was carried out");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert!(
            e.message().contains("fenced") || e.message().contains("has ended"),
            "refused for another reason: {e:?}"
        );
        assert!(e.message().contains("Take the lock again"), "the refusal says what to do: {e:?}");
        let expected = splice(o.old.clone(), &o.new_bytes);
        assert!(o.now.len() == expected.len(), "size {} != {}", o.now.len(), expected.len());
        let wrong: Vec<usize> = (0..expected.len()).filter(|&i| o.now[i] != expected[i]).collect();
        assert!(
            wrong.is_empty(),
            "{} bytes differ from the second client's write over the old file (first at {}): stale bytes landed",
            wrong.len(),
            wrong[0]
        );
    });
}

/// The negative control: with the storage fence skipped (the leader acknowledges fences
/// itself, as before issue 11), the same held write lands after the lock was given to another.
#[test]
fn negative_control_without_the_storage_fence_stale_bytes_land() {
    serial(async {
        let o = held_write_of_a_fenced_client("fence-skipped", true).await;
        assert!(o.stale.is_ok(), "without the storage fence the held write should land: {:?}", o.stale);
        let expected = splice(splice(o.old.clone(), &o.new_bytes), &o.stale_bytes);
        assert!(o.now == expected, "the stale bytes did not land as expected");
    });
}

/// Issue 16 (docs/reliability.md, finding 6): a row's stripe write runs in a task of its own.
/// A caller that gives up while its write is under way (its call dropped while the server
/// holds the write after its lock check, as a cut connection or a client killed mid-call does)
/// must not take the write with it: the row's stripe lock is given back or kept cached, and the
/// next write to that row goes through at once. When the handler ran the write itself, dropping
/// it left the stripe lock held by the server and the row stalled for good.
#[test]
fn a_write_whose_caller_gives_up_does_not_leave_its_row_locked() {
    serial(async {
        let c = Cluster::start_with_env(3, "fence-cancelled", &[], &[(HOLD_ENV, "2000")]).await;
        let old = put_two_rows(&c, 12);
        let s = Session::open(&c.addrs(), 10_000).await.unwrap();
        let g = s.lock("/f", 0..u64::MAX, Mode::EX, LockOptions::default()).await.unwrap();
        let write = |offset: usize, data: Vec<u8>| pb::WriteRequest {
            path: "/f".into(),
            token: g.signed_token.clone(),
            offset: offset as u64,
            data: data.into(),
        };
        // The first write is held at the server carrying it out; its caller gives up.
        let mut gateway = files_at(&c, 1).await;
        let first = (0, vec![0xaa; 100]);
        let req = write(first.0, first.1.clone());
        let call = tokio::spawn(async move { gateway.write(req).await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!call.is_finished(), "the write was not held: {:?}", call.await);
        call.abort();
        // Past the hold, a write to the same row must go through promptly.
        tokio::time::sleep(Duration::from_millis(2_000)).await;
        let second = (200, vec![0xbb; 100]);
        let mut gateway = files_at(&c, 1).await;
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(10), gateway.write(write(second.0, second.1.clone())))
            .await
            .expect("the row stayed locked after its first write's caller gave up")
            .expect("the second write");
        let took = started.elapsed();
        let now = read_with(&c, 2, "/f", &g.signed_token).await;
        s.unlock(g.lock).await.unwrap();
        s.close().await;
        assert!(took < Duration::from_secs(5), "the second write took {took:?}");
        // The abandoned write landed whole or not at all; the second one landed.
        let with_second = splice(old.clone(), &second);
        assert!(
            now == with_second || now == splice(with_second.clone(), &first),
            "the row holds neither the old bytes nor the abandoned write's around the second write"
        );
    });
}
