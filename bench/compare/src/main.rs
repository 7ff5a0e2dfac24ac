//! `compare SYSTEM ADDRS CLIENTS SECONDS [LABEL]`: lock+unlock cycles per second, p50 and p99,
//! with one connection per client, as JSON on one line (its "system" is LABEL, or SYSTEM).
//! - `etcd`: one key per client (nothing contends); its v3lock service, Lock(name, lease) then
//!   Unlock(key) (2 Raft writes a cycle). ADDRS may list several members, comma-separated.
//! - `etcd-shared`: every client on one key, so each cycle is a hand-off from the last holder.
//! - `etcd-keepalive`: lease renewals, each client a LeaseKeepAlive stream of its own lease with
//!   4 renewals outstanding; "cycles" are renewals.
//! - `redis`: SET key value NX PX 30000 then DEL, one key per client.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

fn report(kind: &str, clients: usize, mut lat: Vec<u64>, secs: f64) {
    lat.sort_unstable();
    let pct = |p: f64| if lat.is_empty() { 0 } else { lat[((lat.len() - 1) as f64 * p).round() as usize] };
    println!(
        "{{\"system\":\"{kind}\",\"clients\":{clients},\"cycles_per_s\":{:.0},\"p50_us\":{},\"p99_us\":{}}}",
        lat.len() as f64 / secs,
        pct(0.5),
        pct(0.99)
    );
}

async fn etcd(label: &str, addrs: &str, clients: usize, secs: u64, shared: bool) -> Result<()> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    let addrs: Vec<String> = addrs.split(',').map(str::to_string).collect();
    for i in 0..clients {
        // Clients spread over the members, as stripelock's spread over its servers.
        let mut addrs = addrs.clone();
        let n = addrs.len();
        addrs.rotate_left(i % n);
        tasks.push(tokio::spawn(async move {
            let mut c = etcd_client::Client::connect(addrs, None).await?;
            let lease = c.lease_grant(60, None).await?.id();
            let name = if shared { "/bench/etcd/shared".to_string() } else { format!("/bench/etcd/{i}") };
            let mut lat = Vec::new();
            while start.elapsed() < Duration::from_secs(secs) {
                let t = Instant::now();
                let opts = etcd_client::LockOptions::new().with_lease(lease);
                let key = c.lock(name.as_str(), Some(opts)).await?.key().to_vec();
                c.unlock(key).await?;
                lat.push(t.elapsed().as_micros() as u64);
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    report(label, clients, all, start.elapsed().as_secs_f64());
    Ok(())
}

async fn etcd_keepalive(label: &str, addrs: &str, clients: usize, secs: u64) -> Result<()> {
    let addrs: Vec<String> = addrs.split(',').map(str::to_string).collect();
    let opened = std::sync::Arc::new(tokio::sync::Barrier::new(clients));
    let mut tasks = Vec::new();
    for i in 0..clients {
        let mut addrs = addrs.clone();
        let n = addrs.len();
        addrs.rotate_left(i % n);
        let opened = opened.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = etcd_client::Client::connect(addrs, None).await?;
            let lease = c.lease_grant(60, None).await?.id();
            let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
            opened.wait().await;
            let start = Instant::now();
            let mut sent = std::collections::VecDeque::new();
            let mut lat = Vec::new();
            loop {
                while sent.len() < 4 && start.elapsed() < Duration::from_secs(secs) {
                    keeper.keep_alive().await?;
                    sent.push_back(Instant::now());
                }
                let Some(at) = sent.pop_front() else { break };
                if stream.message().await?.is_none() {
                    bail!("the keep-alive stream ended");
                }
                if start.elapsed() < Duration::from_secs(secs) {
                    lat.push(at.elapsed().as_micros() as u64);
                }
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    report(label, clients, all, secs as f64);
    Ok(())
}

async fn redis(addr: &str, clients: usize, secs: u64) -> Result<()> {
    let client = redis::Client::open(format!("redis://{addr}/"))?;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..clients {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = client.get_multiplexed_async_connection().await?;
            let key = format!("bench:redis:{i}");
            let mut lat = Vec::new();
            while start.elapsed() < Duration::from_secs(secs) {
                let t = Instant::now();
                let ok: Option<String> =
                    redis::cmd("SET").arg(&key).arg("owner").arg("NX").arg("PX").arg(30_000).query_async(&mut c).await?;
                if ok.is_none() {
                    bail!("{key} was held");
                }
                let _: i64 = redis::cmd("DEL").arg(&key).query_async(&mut c).await?;
                lat.push(t.elapsed().as_micros() as u64);
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    report("redis", clients, all, start.elapsed().as_secs_f64());
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (kind, addr, clients, secs, label) = match args.as_slice() {
        [_, kind, addr, clients, secs] => (kind, addr, clients, secs, kind),
        [_, kind, addr, clients, secs, label] => (kind, addr, clients, secs, label),
        _ => bail!("usage: compare etcd|etcd-shared|etcd-keepalive|redis HOST:PORT[,HOST:PORT...] CLIENTS SECONDS [LABEL]"),
    };
    let clients: usize = clients.parse().context("CLIENTS")?;
    let secs: u64 = secs.parse().context("SECONDS")?;
    match kind.as_str() {
        "etcd" => etcd(label, addr, clients, secs, false).await,
        "etcd-shared" => etcd(label, addr, clients, secs, true).await,
        "etcd-keepalive" => etcd_keepalive(label, addr, clients, secs).await,
        "redis" => redis(addr, clients, secs).await,
        other => bail!("unknown system {other}"),
    }
}
