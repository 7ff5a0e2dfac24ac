//! The lock service and its CLI under the faults a reliability engineer tries from outside:
//! paused servers (SIGSTOP), a paused or killed `lock` client, leases out of bounds, eviction,
//! a follower that comes back, and the `lock` command's arguments and exit codes. Real server
//! processes on loopback; one test at a time.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::*;

fn sig(pid: u32, name: &str) {
    let ok = Command::new("kill").args([&format!("-{name}"), &pid.to_string()]).status().unwrap().success();
    assert!(ok, "kill -{name} {pid} failed");
}

fn alive(pid: u32) -> bool {
    // A zombie still has /proc/PID; its state line says Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// Runs `stripelock ARGS` to the end with a bound; returns its output and how long it took.
fn run(args: &[&str], bound: Duration) -> (Output, Duration) {
    let start = Instant::now();
    let mut child = Command::new(&*EXE).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > bound {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "`stripelock {}` still running after {bound:?}; stderr: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (child.wait_with_output().unwrap(), start.elapsed())
}

fn text(out: &Output) -> String {
    format!("stdout: {}\nstderr: {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Starts `stripelock lock PATH ARGS -- sh -c SCRIPT` in the background.
fn spawn_lock(cluster: &str, path: &str, args: &[&str], script: &str) -> Child {
    Command::new(&*EXE)
        .args(["lock", path, "--cluster", cluster])
        .args(args)
        .args(["--", "sh", "-c", script])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for a file the locked command writes its pid into.
fn read_pid(file: &std::path::Path) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(pid) = std::fs::read_to_string(file).ok().and_then(|s| s.trim().parse().ok()) {
            return pid;
        }
        assert!(Instant::now() < deadline, "the locked command never started ({})", file.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_exit(child: &mut Child, bound: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + bound;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process {} did not exit within {bound:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_gone(pid: u32, bound: Duration) -> bool {
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn cluster_from(c: &Cluster, first: u64) -> String {
    c.addrs_from(first).join(",")
}

#[test]
fn a_paused_leader_does_not_stall_clients() {
    serial(async {
        let c = Cluster::start(3, "paused-leader").await;
        let leader = c.leader().await;
        let pid = c.servers[leader as usize - 1].child.as_ref().unwrap().id();
        // Someone holds /busy, for the --timeout case below.
        let holder = client::Session::open(&c.addrs_from(leader % 3 + 1), 10_000).await.unwrap();
        holder.lock("/busy", 0..u64::MAX, client::Mode::EX, Default::default()).await.unwrap();
        sig(pid, "STOP");
        // The others elect a new leader.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut found = false;
            for s in c.servers.iter().filter(|s| s.id != leader) {
                if let Some(st) = c.status(s.id).await
                    && st.leader_id != 0
                    && st.leader_id != leader
                {
                    found = true;
                }
            }
            if found {
                break;
            }
            assert!(Instant::now() < deadline, "no new leader within 10 s of pausing {leader}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The paused server first in the list: every command answers within 3 s.
        let cluster = cluster_from(&c, leader);
        let (out, took) =
            run(&["lock", "/p", "--nowait", "--cluster", &cluster, "--", "true"], Duration::from_secs(20));
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        assert!(took < Duration::from_secs(3), "lock --nowait took {took:?}");
        let (out, took) = run(&["locks", "--cluster", &cluster], Duration::from_secs(20));
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        assert!(took < Duration::from_secs(3), "locks took {took:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("/busy"), "{}", text(&out));
        let (out, took) = run(&["status", "--json", "--cluster", &cluster], Duration::from_secs(20));
        assert!(took < Duration::from_secs(3), "status took {took:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["up"], 2, "{v}");
        let paused = &v["servers"][0];
        assert_eq!(paused["up"], false, "{v}");
        assert!(paused["error"].as_str().unwrap().contains("no answer within"), "{v}");
        // --timeout bounds the whole command, reaching the cluster included.
        let (out, took) =
            run(&["lock", "/busy", "--timeout", "2s", "--cluster", &cluster, "--", "true"], Duration::from_secs(20));
        assert_eq!(out.status.code(), Some(124), "{}", text(&out));
        assert!(took < Duration::from_millis(2_900), "lock --timeout 2s took {took:?}");
        sig(pid, "CONT");
        holder.close().await;
    });
}

#[test]
fn a_lost_lock_stops_the_command() {
    serial(async {
        let c = Cluster::start(3, "lost-lock").await;
        let cluster = c.addrs().join(",");
        let marks = c.dir.join("marks");
        let pidfile = c.dir.join("pid");
        let script =
            format!("echo $$ > {}; while true; do echo x >> {}; sleep 0.05; done", pidfile.display(), marks.display());
        let mut client = spawn_lock(&cluster, "/p", &["--lease", "2s"], &script);
        let cmd = read_pid(&pidfile);
        // The client is paused past its lease; its command is not (its own process group).
        sig(client.id(), "STOP");
        tokio::time::sleep(Duration::from_millis(3_500)).await;
        // Someone else has the lock now.
        let other = client::Session::open(&c.addrs(), 10_000).await.unwrap();
        let opts = client::LockOptions { timeout: Some(Duration::from_secs(5)), ..Default::default() };
        other.lock("/p", 0..u64::MAX, client::Mode::EX, opts).await.expect("the lease ran out: /p is free");
        sig(client.id(), "CONT");
        let status = wait_exit(&mut client, Duration::from_secs(10));
        assert_eq!(status.code(), Some(121), "exit status of a client whose lock was lost");
        assert!(wait_gone(cmd, Duration::from_secs(5)), "the command runs on after its lock was lost");
        let mut stderr = String::new();
        std::io::Read::read_to_string(client.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        assert!(stderr.contains("the lock on /p is lost"), "{stderr}");
        // Nothing more is written once the client has exited.
        let len = std::fs::metadata(&marks).unwrap().len();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(std::fs::metadata(&marks).unwrap().len(), len, "the command still writes");
        other.close().await;

        // --on-lost warn: the command runs on, and the exit code still says the lock was lost.
        let pidfile = c.dir.join("pid-warn");
        let script = format!("echo $$ > {}; sleep 5", pidfile.display());
        let mut client = spawn_lock(&cluster, "/w", &["--lease", "1s", "--on-lost", "warn"], &script);
        let cmd = read_pid(&pidfile);
        sig(client.id(), "STOP");
        tokio::time::sleep(Duration::from_millis(2_000)).await;
        sig(client.id(), "CONT");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(alive(cmd), "--on-lost warn stopped the command");
        let status = wait_exit(&mut client, Duration::from_secs(10));
        assert_eq!(status.code(), Some(121));
    });
}

#[test]
fn the_command_dies_with_its_client_and_a_stopped_client_releases_at_once() {
    serial(async {
        let c = Cluster::start(3, "child-dies").await;
        let cluster = c.addrs().join(",");
        // SIGKILL of the client: the command goes with it.
        let pidfile = c.dir.join("pid-kill");
        let mut client = spawn_lock(&cluster, "/k", &[], &format!("echo $$ > {}; sleep 60", pidfile.display()));
        let cmd = read_pid(&pidfile);
        client.kill().unwrap();
        client.wait().unwrap();
        assert!(wait_gone(cmd, Duration::from_secs(3)), "the command outlived its killed client");

        // SIGTERM (and SIGINT) of the client: the command stops and the lock is free at once,
        // not after the 10 s lease.
        for (name, code) in [("TERM", 143), ("INT", 130)] {
            let pidfile = c.dir.join(format!("pid-{name}"));
            let mut client =
                spawn_lock(&cluster, "/t", &["--lease", "30s"], &format!("echo $$ > {}; sleep 60", pidfile.display()));
            let cmd = read_pid(&pidfile);
            let asked = Instant::now();
            sig(client.id(), name);
            let status = wait_exit(&mut client, Duration::from_secs(10));
            assert_eq!(status.code(), Some(code), "SIG{name}");
            assert!(wait_gone(cmd, Duration::from_secs(1)), "the command outlived SIG{name} of its client");
            let (out, _) =
                run(&["lock", "/t", "--nowait", "--cluster", &cluster, "--", "true"], Duration::from_secs(10));
            assert_eq!(out.status.code(), Some(0), "after SIG{name}: {}", text(&out));
            assert!(asked.elapsed() < Duration::from_secs(6), "the lock came back only after {:?}", asked.elapsed());
        }
    });
}

#[test]
fn leases_are_bounded_and_an_operator_can_evict_a_holder() {
    serial(async {
        let c = Cluster::start(3, "evict").await;
        let cluster = c.addrs().join(",");
        for lease in ["99999999d", "0s", "1ms", "11m"] {
            let (out, took) =
                run(&["lock", "/l", "--lease", lease, "--cluster", &cluster, "--", "true"], Duration::from_secs(20));
            assert_eq!(out.status.code(), Some(125), "--lease {lease}: {}", text(&out));
            assert!(String::from_utf8_lossy(&out.stderr).contains("outside this cluster's bounds"), "{}", text(&out));
            assert!(took < Duration::from_secs(3), "--lease {lease} took {took:?}");
        }

        // A holder with a long lease is killed (its command dies with it): its lock would stay
        // for the lease. The operator evicts it.
        let pidfile = c.dir.join("pid");
        let mut holder =
            spawn_lock(&cluster, "/l", &["--lease", "5m"], &format!("echo $$ > {}; sleep 60", pidfile.display()));
        read_pid(&pidfile);
        holder.kill().unwrap();
        holder.wait().unwrap();
        let (out, _) = run(&["lock", "/l", "--nowait", "--cluster", &cluster, "--", "true"], Duration::from_secs(10));
        assert_eq!(out.status.code(), Some(124), "{}", text(&out));
        // The conflict names the holder's process and host, not just a session number.
        let holder_pid = holder.id().to_string();
        assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("pid {holder_pid} on")), "{}", text(&out));

        let (out, _) = run(&["evict", "--holders", "/l", "--json", "--cluster", &cluster], Duration::from_secs(20));
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let evicted = v["evicted"].as_array().unwrap();
        assert_eq!(evicted.len(), 1, "{v}");
        assert_eq!(evicted[0]["locks_fenced"], 1, "{v}");
        assert!(evicted[0]["client"].as_str().unwrap().contains(&format!("pid {holder_pid} on")), "{v}");
        let session = evicted[0]["session"].as_u64().unwrap();
        let (out, took) =
            run(&["lock", "/l", "--timeout", "3s", "--cluster", &cluster, "--", "true"], Duration::from_secs(10));
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        assert!(took < Duration::from_secs(3), "{took:?}");

        // Evicting it again, or a session that never was, says so.
        let (out, _) = run(&["evict", &session.to_string(), "--cluster", &cluster], Duration::from_secs(20));
        assert_ne!(out.status.code(), Some(0));
        assert!(String::from_utf8_lossy(&out.stderr).contains("is not live"), "{}", text(&out));

        // A live client that is evicted loses its lock: its command is stopped and it exits 121.
        let pidfile = c.dir.join("pid-live");
        let mut live = spawn_lock(&cluster, "/m", &[], &format!("echo $$ > {}; sleep 60", pidfile.display()));
        let cmd = read_pid(&pidfile);
        let (out, _) = run(&["evict", "--holders", "/m", "--cluster", &cluster], Duration::from_secs(20));
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        assert_eq!(wait_exit(&mut live, Duration::from_secs(10)).code(), Some(121));
        assert!(wait_gone(cmd, Duration::from_secs(3)));
    });
}

#[test]
fn a_paused_follower_does_not_force_an_election_when_it_returns() {
    serial(async {
        let c = Cluster::start(3, "prevote").await;
        let leader = c.leader().await;
        let before = c.status(leader).await.unwrap().term;
        let follower = leader % 3 + 1;
        let pid = c.servers[follower as usize - 1].child.as_ref().unwrap().id();
        sig(pid, "STOP");
        // Several election timeouts (300–600 ms here) pass while it is paused.
        tokio::time::sleep(Duration::from_millis(2_000)).await;
        sig(pid, "CONT");
        tokio::time::sleep(Duration::from_millis(2_000)).await;
        let after = c.status(leader).await.unwrap();
        assert_eq!((after.leader_id, after.term), (leader, before), "the returning follower forced an election");
        let back = c.status(follower).await.unwrap();
        assert_eq!((back.leader_id, back.term), (leader, before));
    });
}

#[test]
fn lock_checks_its_arguments_and_keeps_its_own_exit_codes() {
    // No cluster needed: each of these is refused before any server is asked.
    let no_cluster = "127.0.0.1:9";
    for (args, says) in [
        (vec!["lock", "", "--cluster", no_cluster, "--", "true"], "the lock path is empty"),
        (vec!["lock", "jobs/x", "--cluster", no_cluster, "--", "true"], "is relative"),
        (
            vec!["lock", "/x", "--mode", "PR", "--gateway", "--nowait", "--cluster", no_cluster, "--", "true"],
            "--gateway",
        ),
        (
            vec!["lock", "/x", "--range", "0..99999999999999999999999", "--cluster", no_cluster, "--", "true"],
            "past the largest byte offset",
        ),
        (vec!["lock", "/x", "--cluster", "127.0.0.1:99999", "--", "true"], "bad port `99999`"),
        (vec!["lock", "/x", "--no-such-flag", "--", "true"], "--no-such-flag"),
    ] {
        let (out, _) = run(&args, Duration::from_secs(10));
        assert_eq!(out.status.code(), Some(125), "{args:?}: {}", text(&out));
        assert!(String::from_utf8_lossy(&out.stderr).contains(says), "{args:?}: {}", text(&out));
    }
    // No server: one sentence per server, no repetition.
    let (out, _) = run(&["lock", "/x", "--cluster", "127.0.0.1:9", "--", "true"], Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(125), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("tcp connect error: tcp connect error"), "{err}");

    serial(async {
        let c = Cluster::start(3, "lock-args").await;
        let cluster = c.addrs().join(",");
        // A zero timeout on a free lock is one try, and it succeeds.
        let (out, _) =
            run(&["lock", "/z", "--timeout", "0s", "--cluster", &cluster, "--", "true"], Duration::from_secs(10));
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        // The command's own status comes through; a missing command is 127.
        let (out, _) = run(&["lock", "/z", "--cluster", &cluster, "--", "sh", "-c", "exit 3"], Duration::from_secs(10));
        assert_eq!(out.status.code(), Some(3), "{}", text(&out));
        let (out, _) = run(&["lock", "/z", "--cluster", &cluster, "--", "/no/such/program"], Duration::from_secs(10));
        assert_eq!(out.status.code(), Some(127), "{}", text(&out));
    });
}
