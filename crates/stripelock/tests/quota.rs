//! Per-identity quotas (issue 15): an identity (its certificate's name) over its quota of
//! sessions, locks or requests per second is refused with the quota code and a sentence, while
//! another identity is not; a flood of 10,000 session opens and 20,000 lock requests from one
//! identity leaves another client's p99 within 2x of its baseline and each server's memory
//! within 64 MiB of where it was.

mod common;
use client::{ErrorCode, LockOptions, Mode, Session};
use common::*;

fn certs(args: &[&str]) {
    let out = std::process::Command::new(&*EXE).arg("certs").args(args).output().unwrap();
    assert!(out.status.success(), "certs {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The cluster CA of this test process with `flood` and `alice` issued (one per process: the
/// process connects as its `client` from the first cluster on).
fn our_certs() -> std::path::PathBuf {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let tls = std::env::temp_dir().join(format!("stripelock-quota-certs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tls);
        certs(&["init", "--dir", tls.to_str().unwrap()]);
        for name in ["flood", "alice"] {
            certs(&["issue", name, "--dir", tls.to_str().unwrap()]);
        }
        tls
    })
    .clone()
}

/// `stripelock lock PATH -- CMD…` as identity `name`.
fn lock_as(c: &Cluster, name: &str, path: &str, cmd: &[&str]) -> std::process::Command {
    let mut p = std::process::Command::new(&*EXE);
    p.env("STRIPELOCK_TLS_DIR", c.tls.as_ref().unwrap())
        .env("STRIPELOCK_TLS_NAME", name)
        .args(["lock", path, "--cluster", &c.addrs().join(","), "--"])
        .args(cmd);
    p
}

fn rss_kib(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Lock and unlock `n` times (or until `until` says stop, at most `n`): each pair's time, ms.
async fn lock_pairs(s: &Session, n: usize, mut until: impl FnMut() -> bool) -> Vec<f64> {
    let mut took = Vec::with_capacity(n);
    for i in 0..n {
        if until() {
            break;
        }
        let t = std::time::Instant::now();
        let g = s.lock(&format!("/q/lat{}", i % 16), 0..1, Mode::EX, LockOptions::default()).await.unwrap();
        s.unlock(g.lock).await.unwrap();
        took.push(t.elapsed().as_secs_f64() * 1e3);
    }
    took
}

fn p99(mut ms: Vec<f64>) -> f64 {
    ms.sort_by(f64::total_cmp);
    ms[(ms.len() * 99 / 100).min(ms.len() - 1)]
}

#[test]
fn a_flood_of_10k_sessions_from_one_identity_leaves_the_others_latency_and_the_servers_memory_in_bounds() {
    serial(async {
        let tls = our_certs();
        let c = Cluster::start_tls(3, "flood", &tls, &["--quota", "sessions=50,rps=500"]).await;
        let s = Session::open(&c.addrs(), 10_000).await.unwrap();
        lock_pairs(&s, 50, || false).await;
        let pids: Vec<String> = (1..=3).map(|id| c.pid(id)).collect();
        let before: Vec<u64> = pids.iter().map(|p| rss_kib(p)).collect();
        let baseline = lock_pairs(&s, 500, || false).await;

        // The flood: 10,000 session opens, then 20,000 lock requests over the 50 sessions it
        // got, 256 at once, from another process under the identity `flood`.
        let flood = std::process::Command::new("nice")
            .args(["-n", "19"])
            .arg(&*EXE)
            .env("STRIPELOCK_TLS_DIR", &tls)
            .env("STRIPELOCK_TLS_NAME", "flood")
            .args(["bench", "flood", "--sessions", "10000", "--requests", "20000", "--in-flight", "256"])
            .args(["--seconds", "120", "--json", "--cluster", &c.addrs().join(",")])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = flood.id();
        let running = move || {
            !std::path::Path::new(&format!("/proc/{pid}/stat")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|st| st.contains(") Z "))
        };
        let during = lock_pairs(&s, 100_000, running).await;
        let peak: Vec<u64> = pids.iter().map(|p| rss_kib(p)).collect();
        let out = flood.wait_with_output().unwrap();
        let said: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        eprintln!("flood: {said}");
        let (base, under) = (p99(baseline), p99(during.clone()));
        eprintln!("p99 of a lock and unlock: {base:.2} ms before, {under:.2} ms during ({} samples)", during.len());
        assert_eq!(said["sessions"]["tried"], 10_000, "{said}");
        assert_eq!(said["sessions"]["answers"]["ok"], 50, "{said}");
        assert_eq!(said["sessions"]["answers"]["quota"], 9_950, "{said}");
        assert!(said["requests"]["answers"]["quota"].as_u64() > Some(0), "{said}");
        assert!(during.len() >= 100, "too few samples during the flood: {}", during.len());
        assert!(under <= 2.0 * base, "p99 {under:.2} ms during the flood, {base:.2} ms before");
        for ((pid, before), peak) in pids.iter().zip(before).zip(peak) {
            let after = rss_kib(pid);
            let grew = peak.max(after).saturating_sub(before);
            eprintln!("server {pid}: {before} KiB before, {peak} KiB at the end of the flood, {after} KiB after");
            assert!(grew < 64 << 10, "server {pid} grew {grew} KiB under the flood");
        }
        s.close().await;
    });
}

#[test]
fn an_identity_over_its_quota_is_refused_and_nobody_else_notices() {
    serial(async {
        let tls = our_certs();
        let c = Cluster::start_tls(3, "quota", &tls, &["--quota", "sessions=3,locks=20,waiters=5,rps=300"]).await;

        // Sessions: flood holds three, a fourth is refused (the quota code and its sentence);
        // alice gets in meanwhile.
        let mut held: Vec<_> = (0..3)
            .map(|i| {
                lock_as(&c, "flood", &format!("/q/held{i}"), &["sleep", "30"])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while count(&c.table(1, "/q/held").await.unwrap(), true) < 3 {
            assert!(std::time::Instant::now() < deadline, "flood's three sessions did not take their locks");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let fourth = lock_as(&c, "flood", "/q/fourth", &["true"]).output().unwrap();
        // `lock`'s own failure (125), the cluster's code and its sentence said.
        assert_eq!(fourth.status.code(), Some(125), "{}", String::from_utf8_lossy(&fourth.stderr));
        let why = String::from_utf8_lossy(&fourth.stderr);
        assert!(why.contains("refused (quota): flood has 3 sessions open") && why.contains("raise"), "{why}");
        let alice = lock_as(&c, "alice", "/q/alice", &["true"]).output().unwrap();
        assert!(alice.status.success(), "alice: {}", String::from_utf8_lossy(&alice.stderr));
        for h in &mut held {
            let _ = h.kill();
            let _ = h.wait();
        }

        // Locks on this server: the test's own identity (`client`) holds 20, the 21st is refused
        // with the quota code; releasing one lets the next in.
        let s = Session::open(&c.addrs(), 10_000).await.unwrap();
        let mut grants = Vec::new();
        for i in 0..20 {
            grants.push(s.lock(&format!("/q/l{i}"), 0..1, Mode::EX, LockOptions::default()).await.unwrap());
        }
        let refused = s.lock("/q/l20", 0..1, Mode::EX, LockOptions::default()).await.unwrap_err();
        assert_eq!(refused.code(), ErrorCode::Quota, "{refused}");
        assert!(refused.to_string().contains("20 locks"), "{refused}");
        let alice = lock_as(&c, "alice", "/q/l20", &["true"]).output().unwrap();
        assert!(alice.status.success(), "alice is not held back: {}", String::from_utf8_lossy(&alice.stderr));
        s.unlock(grants.pop().unwrap().lock).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let again = s.lock("/q/l20", 0..1, Mode::EX, LockOptions::default()).await.unwrap();
        s.unlock(again.lock).await.unwrap();
        for g in grants {
            s.unlock(g.lock).await.unwrap();
        }

        // Waiters: with five requests of the test's identity waiting on this server, a sixth
        // request is refused with the quota code while alice may wait; once they are granted,
        // requests pass again.
        let holder = lock_as(&c, "alice", "/q/w", &["sleep", "30"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut holder = KillOnDrop(holder);
        until_table(&c, 1, "/q/w", "alice's lock", |t| count(t, true) == 1).await;
        let waits = futures::future::join_all((0..5).map(|_| s.lock("/q/w", 0..1, Mode::PR, LockOptions::default())));
        let meanwhile = async {
            until_table(&c, 1, "/q/w", "five waiters", |t| count(t, false) == 5).await;
            let sixth = s.lock("/q/elsewhere", 0..1, Mode::EX, LockOptions::default()).await.unwrap_err();
            assert_eq!(sixth.code(), ErrorCode::Quota, "{sixth}");
            assert!(sixth.to_string().contains("5 lock requests waiting"), "{sixth}");
            let alice = std::process::Command::new(&*EXE)
                .env("STRIPELOCK_TLS_DIR", c.tls.as_ref().unwrap())
                .env("STRIPELOCK_TLS_NAME", "alice")
                .args(["lock", "/q/w2", "--timeout", "300ms", "--cluster", &c.addrs().join(","), "--", "true"])
                .output()
                .unwrap();
            assert!(alice.status.success(), "alice is not held back: {}", String::from_utf8_lossy(&alice.stderr));
            let _ = holder.0.kill();
            let _ = holder.0.wait();
        };
        let (granted, ()) = tokio::join!(waits, meanwhile);
        for g in granted {
            s.unlock(g.unwrap().lock).await.unwrap();
        }
        let g = s.lock("/q/elsewhere", 0..1, Mode::EX, LockOptions::default()).await.unwrap();
        s.unlock(g.lock).await.unwrap();
        drop(holder);

        // Requests per second: 300 a second on this server; a burst of 1000 requests at once
        // meets refusals with the quota code, and a second later requests pass again.
        let burst = (0..1000).map(|i| {
            let s = &s;
            async move {
                s.lock(&format!("/q/r{i}"), 0..1, Mode::NL, LockOptions { nowait: true, ..Default::default() }).await
            }
        });
        let mut by_rate = 0;
        for r in futures::future::join_all(burst).await {
            match r {
                Ok(g) => s.unlock(g.lock).await.unwrap(),
                Err(e) if e.code() == ErrorCode::Quota => by_rate += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(by_rate > 0, "a burst of 1000 requests met no rate quota");
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let g = s.lock("/q/r0", 0..1, Mode::NL, LockOptions::default()).await.unwrap();
        s.unlock(g.lock).await.unwrap();
        s.close().await;
    });
}

/// A child process killed (and reaped) however the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The CLI as identity `name`, `stdin` its input.
fn cli_as(c: &Cluster, name: &str, args: &[&str], stdin: &[u8]) -> std::process::Output {
    run_as(c, 1, Some(name), args, stdin)
}

/// Issue 15, bytes stored: the files an identity creates count against its quota; a put or a
/// write past it is refused with the quota code and a sentence before a byte lands (the file
/// as it was, no half-put file left); overwriting what is there adds nothing; another identity
/// is not affected; removing a file gives its bytes back.
#[test]
fn bytes_past_an_identitys_quota_are_refused_and_removing_files_frees_them() {
    serial(async {
        let tls = our_certs();
        let c = Cluster::start_tls(3, "bytes", &tls, &["--quota", "bytes=64KiB"]).await;
        let dir = std::env::temp_dir().join(format!("stripelock-bytes-quota-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let local = |name: &str, len: usize, seed: u64| {
            let p = dir.join(name);
            std::fs::write(&p, noise(len, seed)).unwrap();
            p.to_str().unwrap().to_string()
        };
        let ok = |out: std::process::Output, what: &str| {
            assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
            out.stdout
        };
        let refused = |out: std::process::Output, what: &str| {
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            assert_eq!(out.status.code(), Some(96), "{what} was not refused for its quota: {err}");
            assert!(err.contains("alice has") && err.contains("its quota is 65536 bytes"), "{what}: {err}");
            err
        };
        let a = local("a", 40 << 10, 1);
        ok(cli_as(&c, "alice", &["put", &a, "/q/a"], b""), "alice's first put");
        // 40 KiB + 30 KiB > 64 KiB: refused, and nothing of /q/b stays.
        let b = local("b", 30 << 10, 2);
        let err = refused(cli_as(&c, "alice", &["put", &b, "/q/b"], b""), "alice's second put");
        assert!(err.contains("the put of /q/b"), "{err}");
        let listed = String::from_utf8(ok(cli_as(&c, "alice", &["ls", "/q/"], b""), "ls")).unwrap();
        assert!(!listed.contains("/q/b"), "a refused put left its file: {listed}");
        // Growing /q/a past the quota: refused, the file as it was.
        let err = refused(
            cli_as(&c, "alice", &["write", "/q/a", "--offset", &(40 << 10).to_string()], &noise(30 << 10, 3)),
            "a write growing /q/a",
        );
        assert!(err.contains("this write to /q/a"), "{err}");
        let back = ok(cli_as(&c, "alice", &["cat", "/q/a"], b""), "cat");
        assert_eq!(back, noise(40 << 10, 1), "a refused write changed /q/a");
        // Overwriting bytes already there adds nothing; growing within the quota is fine.
        ok(cli_as(&c, "alice", &["write", "/q/a", "--offset", "0"], &noise(4096, 4)), "an overwrite");
        ok(
            cli_as(&c, "alice", &["write", "/q/a", "--offset", &(40 << 10).to_string()], &noise(8 << 10, 5)),
            "a growth",
        );
        // Another identity stores its own 60 KiB meanwhile.
        let f = local("f", 60 << 10, 6);
        ok(cli_as(&c, "flood", &["put", &f, "/q/flood"], b""), "another identity's put");
        // Removing /q/a gives its 48 KiB back: the put refused before now fits.
        ok(cli_as(&c, "alice", &["rm", "/q/a"], b""), "rm");
        ok(cli_as(&c, "alice", &["put", &b, "/q/b"], b""), "the put after the rm");
        let back = ok(cli_as(&c, "alice", &["cat", "/q/b"], b""), "cat");
        assert_eq!(back, noise(30 << 10, 2));
        // `status` shows who stores what, as the leader has applied it, and the quota.
        let said: serde_json::Value =
            serde_json::from_slice(&ok(cli_as(&c, "alice", &["status", "--json"], b""), "status")).unwrap();
        let leader = said["servers"].as_array().unwrap().iter().find(|s| s["id"] == s["leader"]).expect("a leader");
        assert_eq!(leader["bytes_quota"], 65536, "{leader}");
        let stored = |who: &str| leader["stored"].as_array().unwrap().iter().find(|i| i["identity"] == who).cloned();
        assert_eq!(stored("flood").map(|i| i["bytes"].clone()), Some((60 << 10).into()), "{leader}");
        assert_eq!(stored("alice").map(|i| i["bytes"].clone()), Some((30 << 10).into()), "{leader}");
        let text = String::from_utf8(ok(cli_as(&c, "alice", &["status"], b""), "status")).unwrap();
        assert!(text.contains("bytes stored by identity (quota 64 KiB each): flood 60 KiB, alice 30 KiB"), "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    });
}
