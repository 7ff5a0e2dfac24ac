//! `put`, `get`, `cat`, `stat`, `ls`, `rm`: files through any server's gateway. Each command
//! takes its lock first (EX on the file to write or remove it, PR through the server's gateway
//! cache to read it) and hands the lock's signed token to the gateway, which every storage
//! server checks again before it writes.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use client::{ClientError, LockOptions, Mode, Session};
use layout::{Layout, Role};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use wire::v1 as pb;
use wire::v1::files_client::FilesClient;

use crate::cluster::cluster_addrs;

/// Bytes per message of a put.
const CHUNK: usize = 1 << 20;
/// How long a command waits for its lock.
const LOCK_WAIT: Duration = Duration::from_secs(30);

/// `64KiB`, `1MiB`, `4096`: a size in bytes.
pub fn parse_size(text: &str) -> Result<u32> {
    u32::try_from(crate::size::parse_bytes(text)?).with_context(|| format!("{text} is too large"))
}

pub(crate) fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

pub(crate) async fn files_client(addrs: &[String]) -> Result<FilesClient<Channel>> {
    let mut failures = Vec::new();
    for a in addrs {
        let endpoint = wire::endpoint(a)?.connect_timeout(Duration::from_secs(1));
        match endpoint.connect().await {
            Ok(ch) => {
                return Ok(FilesClient::new(ch)
                    .max_decoding_message_size(server::MESSAGE_BYTES_MAX)
                    .max_encoding_message_size(server::MESSAGE_BYTES_MAX));
            }
            Err(e) => failures.push(format!("server {a}: {}", crate::cluster::transport_text(&e))),
        }
    }
    Err(ClientError::Unreachable(wire::tls_hint(format!(
        "no server of the cluster answered ({})",
        failures.join("; ")
    )))
    .into())
}

use crate::cluster::status_error;

/// Opens a session and takes `mode` on the whole of `path`; says who blocks if it cannot.
pub(crate) async fn lock(addrs: &[String], path: &str, mode: Mode) -> Result<(Session, client::Grant)> {
    lock_range(addrs, path, 0..u64::MAX, mode).await
}

/// Opens a session and takes `mode` on `range` of `path` (a shared read through the server's
/// gateway cache when whole); says who blocks if it cannot.
pub(crate) async fn lock_range(
    addrs: &[String],
    path: &str,
    range: std::ops::Range<u64>,
    mode: Mode,
) -> Result<(Session, client::Grant)> {
    let session = Session::open(addrs, 10_000).await?;
    let whole = range == (0..u64::MAX);
    let options = LockOptions { timeout: Some(LOCK_WAIT), gateway: mode == Mode::PR && whole, ..Default::default() };
    let what = if whole { path.to_string() } else { format!("bytes {}..{} of {path}", range.start, range.end) };
    match session.lock(path, range, mode, options).await {
        Ok(g) => Ok((session, g)),
        Err(e) => {
            session.close().await;
            match e {
                ClientError::TimedOut => Err(anyhow::Error::new(ClientError::TimedOut).context(format!(
                    "{what} stayed locked by others for {LOCK_WAIT:?}; see `stripelock locks {path}`"
                ))),
                e => Err(e).with_context(|| format!("cannot lock {what}")),
            }
        }
    }
}

/// Progress on standard error, at most twice a second, only on a terminal.
struct Progress {
    what: &'static str,
    total: Option<u64>,
    done: u64,
    shown: Instant,
    on: bool,
}

impl Progress {
    fn new(what: &'static str, total: Option<u64>, json: bool) -> Progress {
        Progress { what, total, done: 0, shown: Instant::now(), on: !json && std::io::stderr().is_terminal() }
    }

    fn add(&mut self, n: u64) {
        self.done += n;
        if self.on && self.shown.elapsed() > Duration::from_millis(500) {
            self.shown = Instant::now();
            match self.total {
                Some(t) if t > 0 => {
                    eprint!("\r{} {} of {} ({}%)   ", self.what, human(self.done), human(t), self.done * 100 / t)
                }
                _ => eprint!("\r{} {}   ", self.what, human(self.done)),
            }
        }
    }

    fn finish(&self) {
        if self.on {
            eprint!("\r{:60}\r", "");
        }
    }
}

pub struct PutArgs {
    pub local: PathBuf,
    pub path: String,
    pub stripe_unit: Option<String>,
    pub data: Option<u8>,
    pub parity: Option<u8>,
    pub cluster: Option<String>,
    pub json: bool,
}

pub fn put(args: PutArgs) -> Result<ExitCode> {
    let addrs = cluster_addrs(args.cluster.as_deref())?;
    let stripe_unit = args.stripe_unit.as_deref().map(parse_size).transpose()?.unwrap_or(0);
    // 0 means "the default" on the wire, so a 0 given here must be refused, not passed on.
    if args.stripe_unit.is_some()
        && (!stripe_unit.is_power_of_two() || !(layout::UNIT_MIN..=layout::UNIT_MAX).contains(&stripe_unit))
    {
        bail!("--stripe-unit must be a power of two from 512B to 64MiB, not {stripe_unit} bytes");
    }
    if let Some(k) = args.data
        && !(1..=layout::DATA_MAX).contains(&k)
    {
        bail!("--data must be from 1 to {} data units a row, not {k}", layout::DATA_MAX);
    }
    if let Some(p) = args.parity
        && p > 2
    {
        bail!("--parity must be 0 (none), 1 (XOR) or 2 (P+Q), not {p}");
    }
    if args.path.ends_with('/') {
        bail!("`{}` names a directory (it ends with /); give the file's path, e.g. {}name", args.path, args.path);
    }
    let mut file = std::fs::File::open(&args.local).with_context(|| format!("cannot read {}", args.local.display()))?;
    let total = file.metadata().ok().map(|m| m.len());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let (session, grant) = lock(&addrs, &args.path, Mode::EX).await?;
        let started = Instant::now();
        let mut progress = Progress::new("put", total, args.json);
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::PutChunk>(4);
        let first = pb::PutChunk {
            path: args.path.clone(),
            token: grant.signed_token.clone(),
            stripe_unit,
            data_units: args.data.map_or(0, u32::from),
            parity_units_plus_one: args.parity.map_or(0, |p| p as u32 + 1),
            data: Default::default(),
        };
        let reader = tokio::task::spawn_blocking(move || -> Result<()> {
            let mut chunk = first;
            loop {
                let mut buf = vec![0u8; CHUNK];
                let mut n = 0;
                while n < CHUNK {
                    let r = file.read(&mut buf[n..])?;
                    if r == 0 {
                        break;
                    }
                    n += r;
                }
                buf.truncate(n);
                chunk.data = buf.into();
                if tx.blocking_send(chunk).is_err() || n < CHUNK {
                    return Ok(());
                }
                chunk = pb::PutChunk::default();
            }
        });
        let mut client = files_client(&addrs).await?;
        let counted = tokio_stream::wrappers::ReceiverStream::new(rx).map(move |c| {
            progress.add(c.data.len() as u64);
            if c.data.len() < CHUNK {
                progress.finish();
            }
            c
        });
        let result = client.put(counted).await;
        reader.await.context("reading the local file")??;
        let _ = session.unlock(grant.lock).await;
        session.close().await;
        let stat = result.map_err(status_error).with_context(|| format!("put {} failed", args.path))?.into_inner();
        let secs = started.elapsed().as_secs_f64();
        if args.json {
            let mut v = stat_json(&stat);
            v["seconds"] = serde_json::json!((secs * 1000.0).round() / 1000.0);
            println!("{v}");
        } else {
            println!(
                "put {} ({}) as {}: {}+{} layout, {} units, servers {} ({:.0} MB/s)",
                args.local.display(),
                human(stat.size),
                stat.path,
                stat.data_units,
                stat.parity_units,
                human(stat.stripe_unit as u64),
                stat.servers.iter().map(u64::to_string).collect::<Vec<_>>().join(","),
                stat.size as f64 / secs / 1e6
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `get PATH LOCAL` (into a temporary file renamed at the end) or, with no LOCAL, `cat PATH`
/// (of `range` only, if given).
pub fn get(
    path: &str,
    local: Option<&Path>,
    range: Option<std::ops::Range<u64>>,
    no_lock: bool,
    cluster: Option<&str>,
    json: bool,
) -> Result<ExitCode> {
    let addrs = cluster_addrs(cluster)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        // Without a lock the servers check the bytes are free of write locks (seed 000).
        let locked = if no_lock { None } else { Some(lock(&addrs, path, Mode::PR).await?) };
        let token = locked.as_ref().map(|(_, g)| g.signed_token.clone()).unwrap_or_default();
        let result = async {
            let mut client = files_client(&addrs).await?;
            let size = client
                .stat(pb::PathRequest { path: path.to_string(), ino: 0 })
                .await
                .map_err(status_error)?
                .into_inner()
                .size;
            let range = range.as_ref().map(wire::convert::span_to_pb);
            let req = pb::GetRequest { path: path.to_string(), token, range };
            let mut stream = client.get(req).await.map_err(status_error)?.into_inner();
            let tmp = local.map(|l| {
                let mut name = l.file_name().map(|n| n.to_os_string()).unwrap_or_default();
                name.push(".stripelock-part");
                l.with_file_name(name)
            });
            let mut out: Box<dyn Write> = match &tmp {
                Some(t) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(t).with_context(|| format!("cannot write {}", t.display()))?,
                )),
                None => Box::new(std::io::stdout().lock()),
            };
            let mut progress = Progress::new("get", Some(size), json || local.is_none());
            let (mut bytes, mut rebuilt) = (0u64, 0u64);
            let copied = async {
                while let Some(m) = stream.next().await {
                    let m = m.map_err(status_error)?;
                    out.write_all(&m.data)?;
                    bytes += m.data.len() as u64;
                    rebuilt += m.rebuilt_rows as u64;
                    progress.add(m.data.len() as u64);
                }
                out.flush()?;
                Ok::<(), anyhow::Error>(())
            }
            .await;
            progress.finish();
            drop(out);
            if let Err(e) = copied {
                if let Some(t) = &tmp {
                    let _ = std::fs::remove_file(t);
                }
                return Err(e.context(format!("reading {path} failed")));
            }
            if let (Some(t), Some(l)) = (&tmp, local) {
                std::fs::rename(t, l).with_context(|| format!("cannot move {} to {}", t.display(), l.display()))?;
            }
            Ok::<_, anyhow::Error>((bytes, rebuilt))
        }
        .await;
        if let Some((session, grant)) = locked {
            let _ = session.unlock(grant.lock).await;
            session.close().await;
        }
        let (bytes, rebuilt) = result?;
        if let Some(l) = local {
            if json {
                println!("{}", serde_json::json!({"path": path, "local": l, "bytes": bytes, "rebuilt_rows": rebuilt}));
            } else {
                let note = if rebuilt > 0 { format!("; {rebuilt} row(s) rebuilt from parity") } else { String::new() };
                println!("got {path} into {} ({}{note})", l.display(), human(bytes));
            }
        } else if rebuilt > 0 {
            eprintln!("stripelock: {rebuilt} row(s) of {path} were rebuilt from parity (a server is down or damaged)");
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `write PATH --offset N`: standard input written at byte N of PATH, under PW on just the
/// bytes written; each stripe row it touches is read-modify-written by the server the gateway
/// delegates it to.
pub fn write(path: &str, offset: u64, cluster: Option<&str>, json: bool) -> Result<ExitCode> {
    let addrs = cluster_addrs(cluster)?;
    let mut data = Vec::new();
    std::io::stdin().lock().read_to_end(&mut data).context("cannot read standard input")?;
    let end = offset
        .checked_add(data.len() as u64)
        .filter(|e| *e < u64::MAX)
        .with_context(|| format!("{} bytes at offset {offset} run past the largest file", data.len()))?;
    if data.is_empty() {
        if json {
            println!("{}", serde_json::json!({"path": path, "offset": offset, "bytes": 0, "rows": []}));
        } else {
            println!("nothing to write (standard input was empty)");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        // Seed 001: a write to a stub recalls only the rows it touches, at the server.
        let (session, grant) = lock_range(&addrs, path, offset..end, Mode::PW).await?;
        // Where the pieces written so far end (each piece is one call).
        let landed = std::sync::atomic::AtomicU64::new(offset);
        let result = async {
            let mut client = files_client(&addrs).await?;
            let mut progress = Progress::new("write", Some(data.len() as u64), json);
            let (mut rows, mut size) = (Vec::new(), 0);
            let mut at = offset;
            for piece in data.chunks(server::WRITE_BYTES_MAX) {
                let req = pb::WriteRequest {
                    path: path.to_string(),
                    token: grant.signed_token.clone(),
                    offset: at,
                    data: piece.to_vec().into(),
                };
                let reply = client.write(req).await.map_err(status_error)?.into_inner();
                rows.extend(reply.rows);
                size = reply.size;
                at += piece.len() as u64;
                landed.store(at, std::sync::atomic::Ordering::Relaxed);
                progress.add(piece.len() as u64);
            }
            progress.finish();
            Ok::<_, anyhow::Error>((rows, size))
        }
        .await;
        let _ = session.unlock(grant.lock).await;
        session.close().await;
        let landed = landed.into_inner();
        let (rows, size) = result.with_context(|| {
            if landed > offset {
                format!(
                    "writing bytes {offset}..{end} of {path} failed part-way: bytes {offset}..{landed} were written"
                )
            } else {
                format!("writing bytes {offset}..{end} of {path} failed")
            }
        })?;
        if json {
            let rows: Vec<_> = rows
                .iter()
                .map(|r| {
                    serde_json::json!({"row": r.row, "server": r.server, "stripe_version": r.version,
                        "parity_recomputed": r.recomputed})
                })
                .collect();
            println!(
                "{}",
                serde_json::json!({"path": path, "offset": offset, "bytes": data.len(), "size": size, "rows": rows})
            );
        } else {
            let mut by: Vec<u64> = rows.iter().map(|r| r.server).collect();
            by.sort_unstable();
            by.dedup();
            let by: Vec<String> = by.iter().map(u64::to_string).collect();
            println!(
                "wrote {} at offset {offset} of {path} ({} row(s), by server {}); its size is {}",
                human(data.len() as u64),
                rows.len(),
                by.join(", "),
                human(size)
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn stat_json(s: &pb::FileStat) -> serde_json::Value {
    serde_json::json!({
        "path": s.path, "file": s.file, "size": s.size, "complete": s.complete,
        "layout": {"stripe_unit": s.stripe_unit, "data": s.data_units, "parity": s.parity_units, "servers": s.servers},
        "tier_key": s.tier_key, "tier_blake3": s.tier_blake3,
        "tier_rows": s.tier_rows, "tier_rows_recalled": s.tier_rows_recalled,
    })
}

fn layout_of(s: &pb::FileStat) -> Result<Layout> {
    Layout::new(s.stripe_unit, s.data_units as u8, s.parity_units as u8, s.servers.clone()).map_err(Into::into)
}

fn role_name(r: Role) -> String {
    match r {
        Role::Data(j) => format!("d{j}"),
        Role::P => "P".into(),
        Role::Q => "Q".into(),
    }
}

pub fn stat(path: &str, cluster: Option<&str>, json: bool) -> Result<ExitCode> {
    let addrs = cluster_addrs(cluster)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let s = rt.block_on(async {
        let mut c = files_client(&addrs).await?;
        c.stat(pb::PathRequest { path: path.to_string(), ino: 0 }).await.map_err(status_error)
    })?;
    let s = s.into_inner();
    let l = layout_of(&s)?;
    let rows = l.rows(s.size);
    // The placement repeats every `width` rows.
    let shown = rows.min(l.width() as u64);
    if json {
        let mut v = stat_json(&s);
        v["rows"] = serde_json::json!(rows);
        v["placement"] = (0..shown)
            .map(|row| {
                let units: Vec<_> =
                    l.roles().map(|r| serde_json::json!({"role": role_name(r), "server": l.server(row, r)})).collect();
                serde_json::json!({"row": row, "units": units})
            })
            .collect();
        println!("{v}");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{}: {} ({} bytes), file {}{}",
        s.path,
        human(s.size),
        s.size,
        s.file,
        if s.complete { "" } else { ", being written" }
    );
    if !s.tier_key.is_empty() {
        println!(
            "on the secondary tier: object {} (blake3 {}); reads come from there, `stripelock recall {}` stripes it again",
            s.tier_key, s.tier_blake3, s.path
        );
        if s.tier_rows_recalled > 0 {
            println!(
                "{} of its {} rows are striped again (written, or `recall --range`): those are read from their units",
                s.tier_rows_recalled, s.tier_rows
            );
        }
        println!("layout it had (and gets back on recall):");
    }
    println!(
        "layout: {}+{} ({}), stripe unit {}, {} rows of {}",
        s.data_units,
        s.parity_units,
        ["no parity", "XOR parity", "P+Q parity"][s.parity_units as usize % 3],
        human(s.stripe_unit as u64),
        rows,
        human(l.row_bytes())
    );
    let header: Vec<String> = l.roles().map(role_name).collect();
    println!("{:<6} {}", "row", header.iter().map(|h| format!("{h:>8}")).collect::<String>());
    for row in 0..shown {
        let servers: String = l.roles().map(|r| format!("{:>8}", format!("s{}", l.server(row, r)))).collect();
        println!("{row:<6} {servers}");
    }
    if rows > shown {
        println!("(row r places its units as row r mod {})", l.width());
    }
    Ok(ExitCode::SUCCESS)
}

pub fn ls(prefix: &str, cluster: Option<&str>, json: bool) -> Result<ExitCode> {
    let addrs = cluster_addrs(cluster)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (list, dir) = rt.block_on(async {
        let mut c = files_client(&addrs).await?;
        // A directory's own entries (files, directories, symlinks), as a mount shows them; with
        // no PATH, every file, as before directories existed.
        let dir_path = if prefix.is_empty() { "/" } else { prefix.trim_end_matches('/') };
        let dir_path = if dir_path.is_empty() { "/" } else { dir_path };
        let node = c.lookup(pb::PathRequest { path: dir_path.to_string(), ino: 0 }).await.ok().map(|r| r.into_inner());
        if !prefix.is_empty() && node.is_some_and(|n| n.kind == pb::NodeKind::Dir as i32) {
            let mut nodes = Vec::new();
            let mut after = String::new();
            loop {
                let page = c
                    .read_dir(pb::ReadDirRequest { path: dir_path.to_string(), after: after.clone(), limit: 0 })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                if let Some(last) = page.nodes.last() {
                    after = last.path.rsplit('/').next().unwrap_or_default().to_string();
                }
                nodes.extend(page.nodes);
                if !page.more {
                    break;
                }
            }
            return Ok::<_, anyhow::Error>((None, Some(nodes)));
        }
        let list = c.list(pb::PathRequest { path: prefix.to_string(), ino: 0 }).await.map_err(status_error)?;
        Ok((Some(list), None))
    })?;
    if let Some(nodes) = dir {
        return Ok(print_dir(prefix, &nodes, json));
    }
    let list = list.expect("listed");
    let files = list.into_inner().files;
    if json {
        println!("{}", serde_json::Value::Array(files.iter().map(stat_json).collect()));
        return Ok(ExitCode::SUCCESS);
    }
    if files.is_empty() {
        println!("no files{}", if prefix.is_empty() { String::new() } else { format!(" under {prefix}") });
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:<40} {:>12} {:>7} {:>8}  note", "path", "size", "layout", "unit");
    for f in &files {
        println!(
            "{:<40} {:>12} {:>7} {:>8}  {}",
            f.path,
            f.size,
            format!("{}+{}", f.data_units, f.parity_units),
            human(f.stripe_unit as u64),
            if f.complete { "" } else { "being written" }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A directory's entries: kind, mode, size, name.
fn print_dir(dir: &str, nodes: &[pb::Node], json: bool) -> ExitCode {
    let kind = |n: &pb::Node| match pb::NodeKind::try_from(n.kind) {
        Ok(pb::NodeKind::Dir) => "dir",
        Ok(pb::NodeKind::Symlink) => "symlink",
        Ok(pb::NodeKind::Special) => "special",
        _ => "file",
    };
    if json {
        let v: Vec<serde_json::Value> = nodes
            .iter()
            .map(|n| {
                serde_json::json!({"path": n.path, "kind": kind(n), "size": n.size, "mode": format!("{:o}", n.mode),
                    "uid": n.uid, "gid": n.gid, "mtime_ns": n.mtime_ns, "target": (!n.target.is_empty()).then_some(&n.target)})
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
        return ExitCode::SUCCESS;
    }
    if nodes.is_empty() {
        println!("directory {} is empty", if dir.is_empty() { "/" } else { dir });
        return ExitCode::SUCCESS;
    }
    println!("{:<8} {:>5} {:>12}  path", "kind", "mode", "size");
    for n in nodes {
        let target = if n.target.is_empty() { String::new() } else { format!(" -> {}", n.target) };
        println!("{:<8} {:>5o} {:>12}  {}{}", kind(n), n.mode, n.size, n.path, target);
    }
    ExitCode::SUCCESS
}

pub fn rm(path: &str, cluster: Option<&str>, json: bool) -> Result<ExitCode> {
    let addrs = cluster_addrs(cluster)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let (session, grant) = lock(&addrs, path, Mode::EX).await?;
        let result = async {
            let mut c = files_client(&addrs).await?;
            c.remove(pb::RemoveRequest { path: path.to_string(), token: grant.signed_token.clone() })
                .await
                .map_err(status_error)
        }
        .await;
        let _ = session.unlock(grant.lock).await;
        session.close().await;
        let r = result?.into_inner();
        if json {
            println!("{}", serde_json::json!({"path": path, "units_deleted": r.units_deleted, "errors": r.errors}));
        } else {
            println!("removed {path} ({} units deleted)", r.units_deleted);
            for e in &r.errors {
                eprintln!("stripelock: warning: {e}; its units there stay until a scrub");
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

async fn list_files(client: &mut FilesClient<Channel>, prefix: &str) -> Result<Vec<pb::FileStat>> {
    Ok(client
        .list(pb::PathRequest { path: prefix.to_string(), ino: 0 })
        .await
        .map_err(status_error)?
        .into_inner()
        .files)
}

/// Files a scrub or rebuild works on at once.
const FILES_IN_FLIGHT: usize = 4;

/// `work` on each file, `FILES_IN_FLIGHT` at once, as they finish.
fn each_file<'a, T, F, Fut>(files: &'a [pb::FileStat], work: F) -> impl futures::Stream<Item = Result<T>> + 'a
where
    F: FnMut(&'a pb::FileStat) -> Fut + 'a,
    Fut: std::future::Future<Output = Result<T>> + 'a,
{
    futures::StreamExt::buffer_unordered(futures::StreamExt::map(futures::stream::iter(files), work), FILES_IN_FLIGHT)
}

/// One line of progress over files, on a terminal: files and bytes done, the rate so far and
/// the time left at it.
#[allow(clippy::too_many_arguments)]
fn progress(json: bool, what: &str, done: usize, n: usize, path: &str, bytes: u64, all: u64, started: Instant) {
    if !json && std::io::stderr().is_terminal() {
        let rate = bytes as f64 / started.elapsed().as_secs_f64().max(1e-3);
        let left = if rate > 0.0 { all.saturating_sub(bytes) as f64 / rate } else { 0.0 };
        eprint!(
            "\r{what}: {done} of {n} files ({path}), {} of {} at {}/s, about {left:.0} s left{:10}",
            human(bytes),
            human(all),
            human(rate as u64),
            ""
        );
    }
}

fn clear_progress(json: bool) {
    if !json && std::io::stderr().is_terminal() {
        eprint!("\r{:100}\r", "");
    }
}

/// `scrub [PREFIX] [--repair]`: every unit of every file checked against its checksums and its
/// row's parity; with `--repair`, what is damaged is rewritten from the redundancy left.
/// Exit 0 when nothing is (left) wrong, 1 when something is, 2 on an error.
pub fn scrub(prefix: &str, repair: bool, rate: Option<u64>, cluster: Option<&str>, json: bool) -> Result<ExitCode> {
    let addrs = cluster_addrs(cluster)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let mut client = files_client(&addrs).await?;
        let files: Vec<pb::FileStat> = list_files(&mut client, prefix).await?.into_iter().filter(|f| f.complete).collect();
        let started = Instant::now();
        let mut total = pb::ScrubReport::default();
        let mut per_file = Vec::new();
        let all_bytes: u64 = files.iter().map(|f| f.size).sum();
        let (addrs, client) = (&addrs, &client);
        // Several files at once (issue 16), each under its own lock; `--rate` is shared out.
        let share = FILES_IN_FLIGHT.min(files.len()).max(1) as u64;
        let mut scrubs = std::pin::pin!(each_file(&files, |f| async move {
                let (session, grant) = lock(addrs, &f.path, if repair { Mode::EX } else { Mode::PR }).await?;
                let req = pb::ScrubRequest {
                    path: f.path.clone(),
                    token: grant.signed_token.clone(),
                    repair,
                    rate_bytes_per_s: rate.map_or(0, |r| (r / share).max(1)),
                };
                let r = client.clone().scrub(req).await.map_err(status_error);
                let _ = session.unlock(grant.lock).await;
                session.close().await;
                Ok::<_, anyhow::Error>((f, r.with_context(|| format!("scrub of {} failed", f.path))?.into_inner()))
            }));
        let mut done_bytes = 0;
        while let Some(next) = scrubs.next().await {
            let (f, r) = next?;
            done_bytes += f.size;
            progress(json, "scrub", per_file.len() + 1, files.len(), &f.path, done_bytes, all_bytes, started);
            total.rows += r.rows;
            total.units_checked += r.units_checked;
            total.bytes_checked += r.bytes_checked;
            total.repaired += r.repaired;
            for (all, mine) in [
                (&mut total.damaged, &r.damaged),
                (&mut total.parity_mismatches, &r.parity_mismatches),
                (&mut total.unavailable, &r.unavailable),
                (&mut total.unrepairable, &r.unrepairable),
            ] {
                all.extend(mine.iter().map(|m| format!("{}: {m}", f.path)));
            }
            per_file.push(r);
        }
        clear_progress(json);
        let problems = total.damaged.len() + total.parity_mismatches.len();
        let left = if repair { total.unrepairable.len() + problems.saturating_sub(total.repaired as usize) } else { problems };
        let secs = started.elapsed().as_secs_f64();
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "files": per_file.len(), "rows": total.rows, "units_checked": total.units_checked,
                    "bytes_checked": total.bytes_checked, "damaged": total.damaged,
                    "parity_mismatches": total.parity_mismatches, "unavailable": total.unavailable,
                    "repaired": total.repaired, "unrepairable": total.unrepairable, "seconds": secs,
                })
            );
        } else {
            for line in total.damaged.iter().chain(&total.parity_mismatches) {
                println!("bad: {line}");
            }
            for line in &total.unavailable {
                println!("not checked: {line}");
            }
            for line in &total.unrepairable {
                println!("cannot repair: {line}");
            }
            println!(
                "scrubbed {} files, {} rows, {} units ({}) in {secs:.1} s: {} damaged, {} parity mismatches, {} repaired",
                per_file.len(),
                total.rows,
                total.units_checked,
                human(total.bytes_checked),
                total.damaged.len(),
                total.parity_mismatches.len(),
                total.repaired
            );
            if problems > 0 && !repair {
                println!("run `stripelock scrub --repair` to rewrite them from the redundancy left");
            }
            if !total.unavailable.is_empty() {
                println!(
                    "{} units could not be checked (their servers did not answer): scrub again once they are back",
                    total.unavailable.len()
                );
            }
        }
        // 1: damage is left; 2: none found, but not every unit could be checked.
        Ok(if left > 0 {
            ExitCode::from(1)
        } else if !total.unavailable.is_empty() {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        })
    })
}

/// `rebuild --server ID [--onto ID]`: every unit server ID held, regenerated from the rest of
/// its row onto ID itself (its data volume replaced) or onto another server, then verified.
pub fn rebuild(lost: u64, onto: Option<u64>, rate: Option<u64>, cluster: Option<&str>, json: bool) -> Result<ExitCode> {
    let addrs = cluster_addrs(cluster)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let mut client = files_client(&addrs).await?;
        let mut files: Vec<pb::FileStat> =
            list_files(&mut client, "").await?.into_iter().filter(|f| f.complete && f.servers.contains(&lost)).collect();
        // A file that already has a unit of every row on the target cannot move there; it stays
        // readable from parity and is reported.
        let mut skipped = Vec::new();
        if let Some(target) = onto {
            files.retain(|f| {
                let fits = !f.servers.contains(&target);
                if !fits {
                    skipped.push(f.path.clone());
                }
                fits
            });
        }
        let started = Instant::now();
        let (mut units, mut bytes, mut mismatches) = (0u64, 0u64, Vec::new());
        let (addrs, client) = (&addrs, &client);
        // Several files at once (issue 16), each under its own lock; `--rate` is shared out.
        let share = FILES_IN_FLIGHT.min(files.len()).max(1) as u64;
        let mut rebuilds = std::pin::pin!(each_file(&files, |f| async move {
                let (session, grant) = lock(addrs, &f.path, Mode::EX).await?;
                let token = grant.signed_token.clone();
                let mut client = client.clone();
                let result = async {
                    let req = pb::RebuildRequest {
                        path: f.path.clone(),
                        token: token.clone(),
                        lost_server: lost,
                        onto: onto.unwrap_or(0),
                        rate_bytes_per_s: rate.map_or(0, |r| (r / share).max(1)),
                    };
                    let r = client.rebuild(req).await.map_err(status_error)?.into_inner();
                    // Verify under the same lock: every unit readable and every row's parity right.
                    let check = pb::ScrubRequest { path: f.path.clone(), token, repair: false, rate_bytes_per_s: 0 };
                    let s = client.scrub(check).await.map_err(status_error)?.into_inner();
                    Ok::<_, anyhow::Error>((r, s))
                }
                .await;
                let _ = session.unlock(grant.lock).await;
                session.close().await;
                Ok::<_, anyhow::Error>((f, result.with_context(|| format!("rebuilding {} failed", f.path))?))
            }));
        let mut done = 0;
        while let Some(next) = rebuilds.next().await {
            let (f, (r, s)) = next?;
            done += 1;
            units += r.units_rebuilt;
            bytes += r.bytes;
            mismatches.extend(s.damaged.iter().chain(&s.parity_mismatches).map(|m| format!("{}: {m}", f.path)));
            // Progress, a line a file, on standard error (not with --json: its output is the
            // one JSON line on standard output, and its standard error stays quiet).
            if !json {
                clear_progress(json);
                // The time left at the rate so far, from the bytes of the files left (each
                // loses about one unit a row of its `servers.len()`).
                let all: u64 = files.iter().map(|f| f.size / f.servers.len().max(1) as u64).sum();
                let left = all.saturating_sub(bytes);
                let rate_now = bytes as f64 / started.elapsed().as_secs_f64().max(1e-3);
                let eta = if rate_now > 0.0 { left as f64 / rate_now } else { 0.0 };
                eprintln!(
                    "rebuild: {} of {} files done ({}: {} units, {}); {units} units, {} so far at {}/s, about {eta:.0} s left",
                    done,
                    files.len(),
                    f.path,
                    r.units_rebuilt,
                    human(r.bytes),
                    human(bytes),
                    human(rate_now as u64)
                );
            }
        }
        clear_progress(json);
        let secs = started.elapsed().as_secs_f64();
        let target = onto.unwrap_or(lost);
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "lost_server": lost, "onto": target, "files": files.len(), "units_rebuilt": units,
                    "bytes": bytes, "seconds": secs, "mb_per_s": bytes as f64 / secs.max(1e-9) / 1e6,
                    "verify_mismatches": mismatches, "skipped": skipped,
                })
            );
        } else {
            println!(
                "rebuilt {units} units ({}) of {} files from server {lost} onto server {target} in {secs:.1} s ({:.0} MB/s); verified: {} mismatches",
                human(bytes),
                files.len(),
                bytes as f64 / secs.max(1e-9) / 1e6,
                mismatches.len()
            );
            for m in &mismatches {
                println!("mismatch: {m}");
            }
            for p in &skipped {
                println!(
                    "skipped: {p} already has a unit of every row on server {target}; it stays readable from parity \
                     (rebuild it onto another server, or onto server {lost} once it is replaced)"
                );
            }
        }
        Ok(if mismatches.is_empty() && skipped.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
    })
}
