//! Per-identity quotas (issue 15): an identity (its certificate's name) over its quota of
//! sessions, locks or requests per second is refused with the quota code and a sentence, while
//! another identity is not; a bounded flood leaves the servers' memory in bounds.

mod common;
use client::{ErrorCode, LockOptions, Mode, Session};
use common::*;

fn certs(args: &[&str]) {
    let out = std::process::Command::new(&*EXE).arg("certs").args(args).output().unwrap();
    assert!(out.status.success(), "certs {args:?}: {}", String::from_utf8_lossy(&out.stderr));
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

#[test]
fn an_identity_over_its_quota_is_refused_and_nobody_else_notices() {
    serial(async {
        let tls = std::env::temp_dir().join(format!("stripelock-quota-certs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tls);
        certs(&["init", "--dir", tls.to_str().unwrap()]);
        for name in ["flood", "alice"] {
            certs(&["issue", name, "--dir", tls.to_str().unwrap()]);
        }
        let c = Cluster::start_tls(3, "quota", &tls, &["--quota", "sessions=3,locks=20,rps=300"]).await;

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
        // A bounded flood of session opens (all refused) leaves each server's memory in bounds.
        let pids: Vec<String> = (1..=3).map(|id| c.pid(id)).collect();
        let before: Vec<u64> = pids.iter().map(|p| rss_kib(p)).collect();
        let flood: Vec<_> = (0..4)
            .map(|_| {
                let mut cmd = std::process::Command::new("sh");
                let one = format!(
                    "STRIPELOCK_TLS_DIR={} STRIPELOCK_TLS_NAME=flood {} lock /q/x --cluster {} -- true",
                    tls.display(),
                    &*EXE,
                    c.addrs().join(",")
                );
                cmd.args(["-c", &format!("for i in $(seq 25); do {one} 2>/dev/null; done")]).spawn().unwrap()
            })
            .collect();
        for mut f in flood {
            f.wait().unwrap();
        }
        for (pid, before) in pids.iter().zip(before) {
            let grew = rss_kib(pid).saturating_sub(before);
            assert!(grew < 64 << 10, "server {pid} grew {grew} KiB under the flood");
        }
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
        let _ = std::fs::remove_dir_all(&tls);
    });
}
