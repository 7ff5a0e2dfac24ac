//! `stripelock bench io`: the data path measured in one run. It starts its own cluster of five
//! servers (4+1) in a directory of its own, and prints parity rates beside a memory copy,
//! striped sequential write and read beside a raw sequential write to the same disk, a read
//! and a write with one server killed, the resync of that server when it returns, and the
//! rebuild of it when it returns with a wiped volume, each with the goal it is held to.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use client::{LockOptions, Mode, Session};
use tokio_stream::StreamExt;
use wire::v1 as pb;

use crate::files::{files_client, lock};

const SERVERS: usize = 5;
const CHUNK: usize = 1 << 20;

/// ISA-L's figures on this machine, as the issue gives them (GB/s): XOR 4+1 and RS 4+2.
const ISAL_XOR_GBPS: f64 = 16.0;
const ISAL_RS_GBPS: f64 = 9.0;

struct Bench {
    dir: PathBuf,
    addrs: Vec<String>,
    children: Vec<Option<Child>>,
}

impl Drop for Bench {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Bench {
    fn start(dir: &Path) -> Result<Bench> {
        if dir.exists() {
            bail!("{} exists; give a --dir that does not (it is removed afterwards)", dir.display());
        }
        std::fs::create_dir_all(dir)?;
        let addrs: Vec<String> = (0..SERVERS)
            .map(|_| crate::cluster::free_port().map(|p| format!("127.0.0.1:{p}")))
            .collect::<Result<_>>()?;
        let mut b = Bench { dir: dir.to_path_buf(), addrs, children: Vec::new() };
        for id in 1..=SERVERS {
            let child = b.spawn(id)?;
            b.children.push(Some(child));
        }
        Ok(b)
    }

    fn spawn(&self, id: usize) -> Result<Child> {
        let peers: String =
            self.addrs.iter().enumerate().map(|(i, a)| format!("{}={a}", i + 1)).collect::<Vec<_>>().join(",");
        let data = self.dir.join(format!("server-{id}"));
        std::fs::create_dir_all(&data)?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(data.join("server.log"))?;
        let mut cmd = std::process::Command::new(std::env::current_exe()?);
        // Resync unthrottled: its rate is one of the figures.
        cmd.args(["server", "--id", &id.to_string(), "--peers", &peers, "--insecure", "--resync-rate", "0", "--data"])
            .arg(&data);
        if id == 1 {
            cmd.arg("--bootstrap");
        }
        cmd.stdout(log.try_clone()?).stderr(log).spawn().with_context(|| format!("cannot start server {id}"))
    }

    fn kill(&mut self, id: usize) {
        if let Some(mut c) = self.children[id - 1].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(s) = Session::open(&self.addrs, 5_000).await {
                let g = s.lock("/bench/ready", 0..1, Mode::NL, LockOptions::default()).await;
                s.close().await;
                if g.is_ok_and(|g| !g.signed_token.is_empty()) {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("the bench cluster did not come up in 30 s; see {}/server-*/server.log", self.dir.display())
    }

    /// The leader's status.
    async fn leader_status(&self) -> Result<pb::StatusReply> {
        let leader = self.leader().await? as usize;
        let ch = wire::endpoint(&self.addrs[leader - 1])?.connect().await?;
        Ok(pb::locks_client::LocksClient::new(ch).status(pb::StatusRequest {}).await?.into_inner())
    }

    /// Waits until the leader's status satisfies `done` (up to 10 minutes); returns it and the
    /// time waited.
    async fn until(&self, what: &str, done: impl Fn(&pb::StatusReply) -> bool) -> Result<(pb::StatusReply, Duration)> {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(600) {
            if let Ok(st) = self.leader_status().await
                && done(&st)
            {
                return Ok((st, start.elapsed()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("{what} did not happen in 10 minutes; see {}/server-*/server.log", self.dir.display())
    }

    async fn leader(&self) -> Result<u64> {
        for a in &self.addrs {
            let Ok(ch) = wire::endpoint(a)?.connect().await else {
                continue;
            };
            let st = pb::locks_client::LocksClient::new(ch).status(pb::StatusRequest {}).await?.into_inner();
            if st.leader_id != 0 {
                return Ok(st.leader_id);
            }
        }
        bail!("no leader")
    }
}

/// A sequential write of `bytes` to a file in `dir`, 1 MiB at a time, then fdatasync: the raw
/// rate the disk gives one writer.
fn raw_write(dir: &Path, bytes: usize, block: &[u8]) -> Result<f64> {
    let path = dir.join("raw.bin");
    let start = Instant::now();
    let mut f = std::fs::File::create(&path)?;
    let mut done = 0;
    while done < bytes {
        f.write_all(block)?;
        done += block.len();
    }
    f.sync_data()?;
    let rate = done as f64 / start.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(rate)
}

/// 4 KiB writes at random 4 KiB-aligned places of a 64 MiB file, each followed by
/// fdatasync, for `SMALL_SECONDS`: the raw rate of small synced writes. Writes per second.
fn raw_small_writes(dir: &Path) -> Result<f64> {
    use std::os::unix::fs::FileExt;
    let path = dir.join("raw-small.bin");
    let f = std::fs::File::create(&path)?;
    f.set_len(64 << 20)?;
    f.sync_all()?;
    let block = [0x5au8; 4096];
    let (mut x, mut n) = (0x2545_f491_4f6c_dd1du64, 0u64);
    let start = Instant::now();
    while start.elapsed() < SMALL_SECONDS && n < SMALL_MAX {
        f.write_all_at(&block, (xorshift(&mut x) % (16 << 10)) * 4096)?;
        f.sync_data()?;
        n += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(rate)
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// How long each small-write figure runs, and at most how many writes.
const SMALL_SECONDS: Duration = Duration::from_secs(3);
const SMALL_MAX: u64 = 100_000;

/// 4 KiB writes at random 4 KiB-aligned places of `path` (`bytes` long), one at a time under
/// one EX lock, each acknowledged (durable on every server it touched) before the next, for
/// `SMALL_SECONDS`. Writes per second.
async fn small_writes(b: &Bench, path: &str, bytes: usize) -> Result<f64> {
    let (s, g) = lock(&b.addrs, path, Mode::EX).await?;
    let mut client = files_client(&b.addrs).await?;
    let data = bytes::Bytes::from(vec![0xa5u8; 4096]);
    let (mut x, mut n) = (0x9e37_79b9_7f4a_7c15u64, 0u64);
    let start = Instant::now();
    while start.elapsed() < SMALL_SECONDS && n < SMALL_MAX {
        let offset = (xorshift(&mut x) % (bytes as u64 / 4096)) * 4096;
        let req = pb::WriteRequest { path: path.into(), token: g.signed_token.clone(), offset, data: data.clone() };
        client.write(req).await.map_err(|e| anyhow::anyhow!("{}", e.message()))?;
        n += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let _ = s.unlock(g.lock).await;
    s.close().await;
    Ok(rate)
}

async fn put(b: &Bench, path: &str, bytes: usize, block: &[u8]) -> Result<f64> {
    let (s, g) = lock(&b.addrs, path, Mode::EX).await?;
    let mut client = files_client(&b.addrs).await?;
    let n = bytes / CHUNK;
    let token = g.signed_token.clone();
    let chunks = (0..n).map(move |i| pb::PutChunk {
        path: if i == 0 { path.to_string() } else { String::new() },
        token: if i == 0 { token.clone() } else { String::new() },
        data: block.to_vec().into(),
        ..Default::default()
    });
    let start = Instant::now();
    client.put(tokio_stream::iter(chunks.collect::<Vec<_>>())).await.map_err(|e| anyhow::anyhow!("{}", e.message()))?;
    let rate = bytes as f64 / start.elapsed().as_secs_f64();
    let _ = s.unlock(g.lock).await;
    s.close().await;
    Ok(rate)
}

/// Reads the file; returns bytes per second and rows rebuilt.
async fn get(b: &Bench, path: &str) -> Result<(f64, u64)> {
    let (s, g) = lock(&b.addrs, path, Mode::PR).await?;
    let mut client = files_client(&b.addrs).await?;
    let start = Instant::now();
    let mut stream = client
        .get(pb::GetRequest { path: path.into(), token: g.signed_token.clone(), range: None })
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.message()))?
        .into_inner();
    let (mut bytes, mut rebuilt) = (0u64, 0u64);
    while let Some(m) = stream.next().await {
        let m = m.map_err(|e| anyhow::anyhow!("{}", e.message()))?;
        bytes += m.data.len() as u64;
        rebuilt += m.rebuilt_rows as u64;
    }
    let rate = bytes as f64 / start.elapsed().as_secs_f64();
    let _ = s.unlock(g.lock).await;
    s.close().await;
    Ok((rate, rebuilt))
}

/// What `bench io` measured in its cluster (rates in bytes/s).
struct Figures {
    write: f64,
    read: f64,
    /// 4 KiB partial writes a second.
    small: f64,
    degraded: f64,
    rebuilt_rows: u64,
    degraded_write: f64,
    marked: u64,
    /// As the leader measured it: bytes rebuilt over the time from its first row to its last.
    resync: f64,
    resync_bytes: u64,
    /// From the restart of the server to the last mark cleared.
    resync_wall: Duration,
    rebuild: f64,
    rebuild_bytes: u64,
    rebuild_wall: Duration,
}

pub fn io(size_mib: usize, dir: &Path, json: bool) -> Result<()> {
    let bytes = size_mib.max(16) << 20;
    let block: Vec<u8> = (0..CHUNK).map(|i| (i * 131 + (i >> 9)) as u8).collect();
    let say = |what: &str| {
        if !json {
            eprintln!("measuring {what} ...");
        }
    };
    say("parity");
    let parity = crate::bench_parity::measure(Duration::from_millis(500), 1 << 20);
    let (memcpy, xor, pq) = (parity[0].2, parity[1].2, parity[2].2);
    let mut b = Bench::start(dir)?;
    say("raw disk");
    let raw = raw_write(dir, bytes, &block)?;
    let raw_small = raw_small_writes(dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let f = rt.block_on(async {
        b.ready().await?;
        say("striped write");
        let write = put(&b, "/bench/io", bytes, &block).await?;
        say("striped read");
        let (read, _) = get(&b, "/bench/io").await?;
        say("small writes");
        let small = small_writes(&b, "/bench/io", bytes).await?;
        // A server other than the leader goes down.
        let leader = b.leader().await? as usize;
        let victim = (1..=SERVERS).find(|s| *s != leader).expect("five servers");
        b.kill(victim);
        say("degraded read");
        let (degraded, rebuilt_rows) = get(&b, "/bench/io").await?;
        say("degraded write");
        let degraded_write = put(&b, "/bench/io2", bytes, &block).await?;
        let marked = b.leader_status().await?.stale_rows;
        // It comes back with its volume: resync rebuilds the units the degraded write skipped.
        say("resync");
        let before = b.leader_status().await?.resync_bytes;
        let child = b.spawn(victim)?;
        b.children[victim - 1] = Some(child);
        let (st, resync_wall) = b.until("resync", |s| s.stale_rows == 0).await?;
        let resync_bytes = st.resync_bytes - before;
        let resync = st.resync_rate as f64;
        // It goes down again and comes back with an empty volume: every unit of it is rebuilt.
        say("rebuild of a wiped server");
        b.kill(victim);
        std::fs::remove_dir_all(b.dir.join(format!("server-{victim}/volume")))?;
        let before = b.leader_status().await?.resync_bytes;
        let child = b.spawn(victim)?;
        b.children[victim - 1] = Some(child);
        b.until("the wiped server's report", |s| !s.wiped_servers.is_empty() || s.resync_bytes > before).await?;
        let (st, rebuild_wall) = b.until("the wiped server's rebuild", |s| s.wiped_servers.is_empty()).await?;
        let rebuild_bytes = st.resync_bytes - before;
        let rebuild = st.resync_rate as f64;
        Ok::<_, anyhow::Error>(Figures {
            write,
            read,
            small,
            degraded,
            rebuilt_rows,
            degraded_write,
            marked,
            resync,
            resync_bytes,
            resync_wall,
            rebuild,
            rebuild_bytes,
            rebuild_wall,
        })
    })?;
    let Figures {
        write,
        read,
        small,
        degraded,
        rebuilt_rows,
        degraded_write,
        marked,
        resync,
        resync_bytes,
        resync_wall,
        rebuild,
        rebuild_bytes,
        rebuild_wall,
    } = f;
    drop(b);
    let mb = |x: f64| x / 1e6;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "size_bytes": bytes,
                "memcpy_gbps": memcpy / 1e9, "xor_4_1_gbps": xor / 1e9, "pq_4_2_gbps": pq / 1e9,
                "xor_vs_isal": xor / 1e9 / ISAL_XOR_GBPS, "pq_vs_isal": pq / 1e9 / ISAL_RS_GBPS,
                "raw_write_mbps": mb(raw), "striped_write_mbps": mb(write), "striped_read_mbps": mb(read),
                "degraded_read_mbps": mb(degraded), "degraded_rows_rebuilt": rebuilt_rows,
                "degraded_write_mbps": mb(degraded_write), "rows_marked_stale": marked,
                "resync_mbps": mb(resync), "resync_bytes": resync_bytes, "resync_wall_s": resync_wall.as_secs_f64(),
                "rebuild_mbps": mb(rebuild), "rebuild_bytes": rebuild_bytes, "rebuild_wall_s": rebuild_wall.as_secs_f64(),
                "small_writes_per_s": small, "raw_small_synced_writes_per_s": raw_small,
                "small_vs_raw": small / raw_small,
                "write_vs_raw": write / raw, "degraded_vs_read": degraded / read,
                "degraded_write_vs_write": degraded_write / write, "resync_vs_raw": resync / raw,
                "rebuild_vs_raw": rebuild / raw,
            })
        );
    } else {
        println!("{:<46} {:>12}  against", "case", "rate");
        println!("{:<46} {:>9.1} GB/s", "memory copy (baseline)", memcpy / 1e9);
        println!(
            "{:<46} {:>9.1} GB/s  {:.2}x ISA-L's {ISAL_XOR_GBPS} GB/s (goal >= 0.7x)",
            "XOR parity 4+1",
            xor / 1e9,
            xor / 1e9 / ISAL_XOR_GBPS
        );
        println!(
            "{:<46} {:>9.1} GB/s  {:.2}x ISA-L's {ISAL_RS_GBPS} GB/s (goal >= 0.7x)",
            "P+Q parity 4+2",
            pq / 1e9,
            pq / 1e9 / ISAL_RS_GBPS
        );
        println!("{:<46} {:>9.0} MB/s", format!("raw sequential write, {size_mib} MiB + fdatasync"), mb(raw));
        println!(
            "{:<46} {:>9.0} MB/s  {:.2}x raw (goal >= 0.7x)",
            "striped write 4+1, 5 servers (user data)",
            mb(write),
            write / raw
        );
        println!("{:<46} {:>9.0} MB/s", "striped read 4+1", mb(read));
        println!("{:<46} {:>9.0} /s", "raw 4 KiB write + fdatasync, random places", raw_small);
        println!(
            "{:<46} {:>9.0} /s    {:.2}x raw 4 KiB synced writes (one at a time, each acknowledged)",
            "striped 4 KiB partial writes",
            small,
            small / raw_small
        );
        println!(
            "{:<46} {:>9.0} MB/s  {:.2}x normal read (goal >= 0.8x); {rebuilt_rows} rows rebuilt",
            "read with one server down",
            mb(degraded),
            degraded / read
        );
        println!(
            "{:<46} {:>9.0} MB/s  {:.2}x normal write (goal >= 0.6x); {marked} rows marked stale",
            "write with one server down (user data)",
            mb(degraded_write),
            degraded_write / write
        );
        println!(
            "{:<46} {:>9.0} MB/s  {:.2}x raw (goal >= 300 MB/s and >= 0.6x); {} in {:.1} s from restart",
            "resync of the returning server",
            mb(resync),
            resync / raw,
            server::human_bytes(resync_bytes),
            resync_wall.as_secs_f64()
        );
        println!(
            "{:<46} {:>9.0} MB/s  {:.2}x raw (goal >= 300 MB/s and >= 0.6x); {} in {:.1} s from restart",
            "rebuild of a server back with a wiped volume",
            mb(rebuild),
            rebuild / raw,
            server::human_bytes(rebuild_bytes),
            rebuild_wall.as_secs_f64()
        );
    }
    Ok(())
}
