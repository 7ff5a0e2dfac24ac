//! Seeing the cluster (issue 15): each server's `/metrics` in the Prometheus text format, the
//! status page loaded in real headless Chromium (a held lock and a waiter in its DOM, the
//! wait-for graph drawn, a screenshot kept), and `stripelock top`.

mod common;
use std::io::{Read, Write};
use std::time::Duration;

use client::{LockOptions, Mode, Session};
use common::*;

/// The body of `GET path` from `addr` (HTTP/1.1, read to the end).
fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "GET {path}: {}", answer.lines().next().unwrap_or_default());
    answer.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
}

fn chromium() -> Option<String> {
    ["chromium", "chromium-browser", "google-chrome"].into_iter().find_map(|exe| {
        let found = std::process::Command::new("sh").args(["-c", &format!("command -v {exe}")]).output().ok()?;
        let path = String::from_utf8_lossy(&found.stdout).trim().to_string();
        (!path.is_empty()).then_some(path)
    })
}

#[test]
fn metrics_the_status_page_in_a_browser_and_top_show_a_holder_and_its_waiter() {
    serial(async {
        let c = Cluster::start(3, "web").await;
        let holder = Session::open(&c.addrs(), 10_000).await.unwrap();
        let waiter = Session::open(&c.addrs(), 10_000).await.unwrap();
        let held = holder.lock("/web/res", 0..u64::MAX, Mode::EX, LockOptions::default()).await.unwrap();
        let waiting = tokio::spawn(async move {
            let g = waiter.lock("/web/res", 0..100, Mode::PR, LockOptions::default()).await;
            (waiter, g)
        });
        // Until the waiter is in the table.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let t = c.table(1, "/web/res").await.unwrap();
            if count(&t, false) == 1 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the waiter did not queue");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (hs, ws) = (holder.id(), c.table(1, "/web/res").await.unwrap().edges[0].waiter.clone());

        // /metrics, Prometheus text, with units in the names; the lock request was counted once,
        // on the server its session is attached to.
        let mut granted = 0;
        for s in &c.servers {
            let m = http_get(&s.http, "/metrics");
            for name in
                ["stripelock_raft_term", "stripelock_sessions", "stripelock_locks_held", "stripelock_writes_in_flight"]
            {
                assert!(m.contains(&format!("# TYPE {name} gauge")), "server {}: no {name} in\n{m}", s.id);
            }
            assert!(m.contains("stripelock_locks_waiting 1"), "server {}:\n{m}", s.id);
            granted += m
                .lines()
                .filter(|l| l.starts_with("stripelock_lock_requests_total{") && l.contains("mode=\"EX\""))
                .filter(|l| l.contains("outcome=\"granted\""))
                .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
                .sum::<u64>();
            if m.contains("stripelock_lock_answer_seconds_bucket") {
                assert!(m.contains("le=\"0.005\""), "a histogram with its buckets:\n{m}");
            }
        }
        assert!(granted >= 1, "the EX grant was counted");

        // The JSON the page reads.
        let page = &c.servers[1].http;
        let cluster: serde_json::Value = serde_json::from_str(&http_get(page, "/api/cluster")).unwrap();
        assert_eq!(cluster["servers"].as_array().unwrap().len(), 3, "{cluster}");
        assert!(cluster["servers"].as_array().unwrap().iter().all(|s| s["health"] == "ok"), "{cluster}");
        assert_eq!(cluster["busiest"][0]["name"], "/web/res", "{cluster}");
        let r: serde_json::Value = serde_json::from_str(&http_get(page, "/api/resource?name=%2Fweb%2Fres")).unwrap();
        assert_eq!((r["holders"][0]["session"].as_u64(), r["holders"][0]["mode"].as_str()), (Some(hs), Some("EX")));
        assert_eq!(r["waiters"][0]["mode"], "PR", "{r}");
        let svg = http_get(page, "/api/waitfor.svg");
        assert!(svg.contains(&format!("data-waiter=\"{ws}\"")), "{svg}");

        // `top`, one screen and as JSON.
        let top = cli(&c, &["top", "--once"]);
        assert!(top.contains("/web/res") && top.contains(&format!("{ws} → session {hs}")), "{top}");
        let top: serde_json::Value = serde_json::from_str(&cli(&c, &["top", "--json"])).unwrap();
        assert_eq!(top["busiest"][0]["waiting"], 1, "{top}");

        // The page in a real browser: the DOM after its scripts ran holds the holder and the
        // waiter of the chosen resource, and the wait-for graph's edge.
        match chromium() {
            None => eprintln!("SKIPPED: no chromium (apt-get install chromium); the page was not loaded in a browser"),
            Some(exe) => {
                let url = format!("http://{page}/?resource=%2Fweb%2Fres");
                let browse = |extra: &[&str]| {
                    let out = std::process::Command::new(&exe)
                        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
                        .args(["--virtual-time-budget=5000", "--window-size=1200,1400"])
                        .args(extra)
                        .arg(&url)
                        .output()
                        .unwrap();
                    assert!(out.status.success(), "chromium: {}", String::from_utf8_lossy(&out.stderr));
                    String::from_utf8_lossy(&out.stdout).to_string()
                };
                let dom = browse(&["--dump-dom"]);
                assert!(dom.contains(&format!("class=\"holder\" data-session=\"{hs}\"")), "no holder row in\n{dom}");
                assert!(dom.contains("class=\"waiter\" data-session="), "no waiter row in\n{dom}");
                assert!(dom.contains(&format!("data-waiter=\"{ws}\"")), "no wait-for edge in\n{dom}");
                assert!(dom.contains("(leader)"), "no leader in\n{dom}");
                let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
                let _ = std::fs::remove_file(&shot);
                browse(&[&format!("--screenshot={}", shot.display())]);
                let png = std::fs::read(&shot).unwrap();
                assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a screenshot of the page");
                eprintln!("the status page's screenshot: {}", shot.display());
            }
        }

        holder.unlock(held.lock).await.unwrap();
        let (waiter, g) = waiting.await.unwrap();
        assert!(g.is_ok(), "the waiter is granted once the holder lets go");

        // A lock kept idle in its holder's cache is counted as cached; a scrub's bytes are
        // counted as its progress, on the server that carried it out.
        let kept = holder.lock("/web/cached", 0..1, Mode::PR, LockOptions::default()).await.unwrap();
        holder.cache(kept.lock).await.unwrap();
        let gauge = |m: &str, name: &str| -> f64 {
            m.lines()
                .filter(|l| l.starts_with(name) && !l.starts_with('#'))
                .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
                .sum()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while gauge(&http_get(&c.servers[0].http, "/metrics"), "stripelock_locks_cached ") < 1.0 {
            assert!(std::time::Instant::now() < deadline, "the cached lock was not counted");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let local = c.dir.join("web.in");
        std::fs::write(&local, vec![7u8; 3 << 20]).unwrap();
        cli(&c, &["put", local.to_str().unwrap(), "/web/file"]);
        cli(&c, &["scrub", "/web/file"]);
        let scrubbed: f64 = c
            .servers
            .iter()
            .map(|s| gauge(&http_get(&s.http, "/metrics"), "stripelock_work_bytes_total{work=\"scrub\"}"))
            .sum();
        assert!(scrubbed >= (3 << 20) as f64, "scrub's progress: {scrubbed} bytes counted");
        // The file is its creator's (`anonymous`, without TLS): its bytes are counted for it.
        let m = http_get(&c.servers[0].http, "/metrics");
        assert_eq!(gauge(&m, "stripelock_stored_bytes{identity=\"anonymous\"}"), (3 << 20) as f64, "{m}");
        for s in &c.servers {
            let m = http_get(&s.http, "/metrics");
            assert_eq!(
                gauge(&m, "stripelock_work_running{work=\"scrub\"}"),
                0.0,
                "no scrub runs once it is done:\n{m}"
            );
        }
        waiter.close().await;
        holder.close().await;
    });
}
