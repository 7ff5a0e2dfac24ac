//! Issue 11: a refusal of the cluster reaches the user as its code, a sentence saying what to do,
//! and the documented exit code (README, "When the cluster says no"), not as prose to parse.
//! Real `stripelock server` processes on loopback (127.0.0.1 only).

use std::process::Command;

use client::{LockOptions, Mode, Session};

mod common;
use common::*;

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Asserts the run exited with `exit` and said the code's name and part of its sentence.
fn refused(out: &std::process::Output, exit: i32, code: &str, sentence: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(exit), "{}", text(out));
    assert!(stderr.contains(&format!("{code}: ")) && stderr.contains(sentence), "{}", text(out));
}

#[test]
fn an_address_nobody_serves_is_unavailable() {
    let addr = format!("127.0.0.1:{}", free_port());
    let out = Command::new(&*EXE).args(["stat", "/a", "--cluster", &addr]).output().unwrap();
    refused(&out, 115, "unavailable", "no server could serve it now");
    let out = Command::new(&*EXE).args(["ls", "/", "--json", "--cluster", &addr]).output().unwrap();
    assert_eq!(out.status.code(), Some(115), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json prints the error as JSON");
    assert_eq!(json["error"]["code"], "unavailable", "{json}");
    assert_eq!(json["error"]["exit_code"], 115, "{json}");
}

#[test]
fn refusals_give_their_exit_code_and_sentence() {
    serial(async {
        let c = Cluster::start_with(3, "refusals", &["--file-bytes-max", "1024"]).await;
        let dir = c.dir.clone();
        let small = dir.join("small");
        let big = dir.join("big");
        std::fs::write(&small, b"hello").unwrap();
        std::fs::write(&big, vec![7u8; 2048]).unwrap();

        // rm of a file that does not exist: not-found.
        let out = run_at(&c, 1, &["rm", "/missing"], b"");
        refused(&out, 111, "not-found", "it does not exist");

        // A put over the cluster's largest file: too-large, also in --json.
        let out = run_at(&c, 1, &["put", big.to_str().unwrap(), "/big", "--json"], b"");
        refused(&out, 110, "too-large", "larger than the cluster allows");
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json prints the error as JSON");
        assert_eq!(json["error"]["code"], "too-large", "{json}");

        // A put to a path that exists: exists.
        let out = run_at(&c, 1, &["put", small.to_str().unwrap(), "/small"], b"");
        assert!(out.status.success(), "{}", text(&out));
        let out = run_at(&c, 2, &["put", small.to_str().unwrap(), "/small"], b"");
        refused(&out, 112, "exists", "remove it first");

        // `lock --nowait` on a held lock: busy, with lock's own not-available exit code.
        let holder = Session::open(&c.addrs(), 10_000).await.unwrap();
        holder.lock("/held", 0..u64::MAX, Mode::EX, LockOptions::default()).await.unwrap();
        let cluster = c.addrs().join(",");
        let out = Command::new(&*EXE)
            .args(["lock", "/held", "--nowait", "--cluster", &cluster, "--", "true"])
            .output()
            .unwrap();
        refused(&out, 124, "busy", "others hold a conflicting lock");
        holder.close().await;
    });
}
