//! `stripelock bench flood`: one identity (this process's certificate) opens sessions and sends
//! lock requests as fast as the cluster answers, a bounded number of each, with a bounded
//! number in flight, and counts the answers by code. Run beside other clients it shows what a
//! quota is for: the flooder is refused with the quota code, the others should not notice
//! (tests/quota.rs measures their latency and the servers' memory while it runs).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use client::{LockOptions, Mode, Session};
use futures::StreamExt;
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct FloodArgs {
    pub cluster: Vec<String>,
    /// Session opens to try.
    pub sessions: u64,
    /// Lock requests to send over the sessions it got.
    pub requests: u64,
    pub in_flight: usize,
    /// It stops when this runs out, done or not.
    pub seconds: f64,
    pub json: bool,
}

/// Answers by outcome: `ok`, or the error code's name.
#[derive(Debug, Default)]
struct Tally(BTreeMap<String, u64>);

impl Tally {
    fn add<T>(&mut self, r: &Result<T, client::ClientError>) {
        let key = match r {
            Ok(_) => "ok".to_string(),
            Err(e) => e.code().name().to_string(),
        };
        *self.0.entry(key).or_default() += 1;
    }
}

pub fn run(a: FloodArgs) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    rt.block_on(flood(a))
}

async fn flood(a: FloodArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(a.seconds);
    let in_flight = a.in_flight.max(1);
    let (mut opens, mut requests) = (Tally::default(), Tally::default());
    let mut kept: Vec<Session> = Vec::new();
    // Session opens, all over one connection to each server (HTTP/2 streams), so what is
    // measured is the servers' work, not the handshakes' (a client may open many sessions
    // over one connection).
    let mut channels = std::collections::HashMap::new();
    for addr in &a.cluster {
        channels.insert(addr.clone(), wire::Connector::tcp(Duration::from_secs(1)).channel(addr)?);
    }
    let connector = wire::Connector::new(move |addr| {
        channels
            .get(addr)
            .cloned()
            .ok_or_else(|| wire::BadAddress { addr: addr.into(), reason: "not in --cluster".into() })
    });
    let (cluster, connector) = (&a.cluster, &connector);
    let name = client::process_name();
    let name = &name;
    let mut tries = futures::stream::iter(0..a.sessions)
        .map(|_| async move {
            tokio::time::timeout_at(deadline, Session::open_named(cluster, 10_000, connector.clone(), name.clone()))
                .await
        })
        .buffer_unordered(in_flight);
    while let Some(r) = tries.next().await {
        let Ok(r) = r else { break };
        opens.add(&r);
        if let Ok(s) = r {
            kept.push(s);
        }
    }
    drop(tries);
    let opened_in = started.elapsed();
    // Lock requests, spread over the sessions it got: `nowait` on resources of its own, each
    // granted one released at once.
    let requests_started = Instant::now();
    if let Some(first) = kept.first() {
        let sessions = &kept;
        let mut sent = futures::stream::iter(0..a.requests)
            .map(|i| async move {
                let s = sessions.get(i as usize % sessions.len()).unwrap_or(first);
                let opts = LockOptions { nowait: true, ..Default::default() };
                let r =
                    tokio::time::timeout_at(deadline, s.lock(&format!("/flood/r{}", i % 1024), 0..1, Mode::EX, opts))
                        .await;
                if let Ok(Ok(g)) = &r {
                    let _ = s.unlock(g.lock).await;
                }
                r
            })
            .buffer_unordered(in_flight);
        while let Some(r) = sent.next().await {
            let Ok(r) = r else { break };
            requests.add(&r);
        }
    }
    let requested_in = requests_started.elapsed();
    let held = kept.len();
    for s in kept {
        s.close().await;
    }
    let total = |t: &Tally| t.0.values().sum::<u64>();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "sessions": {"tried": total(&opens), "answers": opens.0, "seconds": opened_in.as_secs_f64()},
                "requests": {"sent": total(&requests), "answers": requests.0, "seconds": requested_in.as_secs_f64()},
                "sessions_held": held,
                "finished": Instant::now() < deadline,
            })
        );
    } else {
        let show = |t: &Tally| t.0.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ");
        println!("session opens: {} in {:.1} s ({})", total(&opens), opened_in.as_secs_f64(), show(&opens));
        println!(
            "lock requests: {} in {:.1} s over {held} sessions ({})",
            total(&requests),
            requested_in.as_secs_f64(),
            show(&requests)
        );
        if Instant::now() >= deadline {
            println!("stopped at --seconds {} before all were sent", a.seconds);
        }
    }
    Ok(ExitCode::SUCCESS)
}
