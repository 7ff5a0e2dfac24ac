//! `stripelock bench lease`: session lease renewals per second against a running cluster. Each
//! of N sessions is a raw session stream that keeps a few heartbeats outstanding and counts
//! their acknowledgements (a heartbeat is acknowledged once the renewal is in force), spread over
//! the servers; etcd's LeaseKeepAlive is the peer figure (docs/benchmarks.md).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio_stream::StreamExt;
use wire::v1 as pb;
use wire::v1::client_message::Body as Up;
use wire::v1::server_message::Body as Down;

/// Heartbeats each session keeps outstanding.
const OUTSTANDING: usize = 4;

/// What one session measured.
struct Measured {
    renewals: u64,
    latencies_us: Vec<u64>,
}

async fn one_session(
    addr: String,
    lease_ms: u64,
    opened: std::sync::Arc<tokio::sync::Barrier>,
    duration: Duration,
) -> anyhow::Result<Measured> {
    let channel = wire::endpoint(&addr)?.connect().await.with_context(|| format!("cannot reach {addr}"))?;
    let mut locks = pb::locks_client::LocksClient::new(channel);
    let (up, up_rx) = tokio::sync::mpsc::channel::<pb::ClientMessage>(64);
    let open = pb::OpenSession {
        resume_session: 0,
        lease_ms,
        client_name: "stripelock bench lease".into(),
        ..Default::default()
    };
    up.send(pb::ClientMessage { request_id: 1, body: Some(Up::Open(open)) }).await?;
    let mut down = locks.session(tokio_stream::wrappers::ReceiverStream::new(up_rx)).await?.into_inner();
    match down.next().await {
        Some(Ok(pb::ServerMessage { body: Some(Down::Opened(_)), .. })) => {}
        other => bail!("the session did not open: {other:?}"),
    }
    // Every session is open before any is measured.
    opened.wait().await;
    let start = Instant::now();
    let mut next = 2u64;
    let mut sent: std::collections::BTreeMap<u64, Instant> = std::collections::BTreeMap::new();
    let mut m = Measured { renewals: 0, latencies_us: Vec::new() };
    loop {
        while sent.len() < OUTSTANDING && start.elapsed() < duration {
            up.send(pb::ClientMessage { request_id: next, body: Some(Up::Heartbeat(pb::Heartbeat {})) }).await?;
            sent.insert(next, Instant::now());
            next += 1;
        }
        if sent.is_empty() {
            break;
        }
        match down.next().await {
            Some(Ok(msg)) => {
                if let Some(Down::Ack(_)) = msg.body
                    && let Some(at) = sent.remove(&msg.request_id)
                {
                    if start.elapsed() < duration {
                        m.renewals += 1;
                        m.latencies_us.push(at.elapsed().as_micros() as u64);
                    }
                } else if let Some(Down::Rejected(r)) = msg.body {
                    bail!("a heartbeat was refused: {}", r.message);
                }
            }
            Some(Err(s)) => bail!("the session stream failed: {}", s.message()),
            None => bail!("the server ended the session stream"),
        }
    }
    let close = pb::ClientMessage { request_id: next, body: Some(Up::Close(pb::CloseSession {})) };
    let _ = up.send(close).await;
    Ok(m)
}

/// `stripelock bench lease`.
pub fn lease(addrs: Vec<String>, sessions: usize, duration: Duration, json: bool) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (renewals, seconds, mut latencies) = rt.block_on(async {
        let opened = std::sync::Arc::new(tokio::sync::Barrier::new(sessions));
        let mut tasks = Vec::new();
        for i in 0..sessions {
            let addr = addrs[i % addrs.len()].clone();
            let opened = opened.clone();
            tasks.push(tokio::spawn(one_session(addr, 30_000, opened, duration)));
        }
        let mut renewals = 0;
        let mut latencies = Vec::new();
        for t in tasks {
            let m = t.await??;
            renewals += m.renewals;
            latencies.extend(m.latencies_us);
        }
        Ok::<_, anyhow::Error>((renewals, duration.as_secs_f64(), latencies))
    })?;
    latencies.sort_unstable();
    let p =
        |q: f64| if latencies.is_empty() { 0 } else { latencies[((latencies.len() - 1) as f64 * q).round() as usize] };
    let rate = renewals as f64 / seconds;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "sessions": sessions, "renewals": renewals, "seconds": seconds,
                "renewals_per_s": rate.round(), "p50_us": p(0.5), "p99_us": p(0.99),
                "outstanding_per_session": OUTSTANDING,
            })
        );
    } else {
        println!(
            "{sessions} sessions, {OUTSTANDING} heartbeats outstanding each: {rate:.0} renewals/s, p50 {} µs, p99 {} µs",
            p(0.5),
            p(0.99)
        );
    }
    Ok(())
}
