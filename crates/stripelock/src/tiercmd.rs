//! `migrate` and `recall` (seed 001, issue 14): each file under an EX lock on all of it, moved to
//! the secondary tier (a stub stays in the namespace) or striped again. Progress on a terminal,
//! one line per file, `--json` for scripts; the exit code is 1 if any file failed.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use client::Mode;
use wire::v1 as pb;

use crate::cluster::{cluster_addrs, status_error};
use crate::files::{files_client, human, lock};

/// `migrate --older-than D [--larger-than S] [--under DIR] [--max N]`: the policy's choice.
#[derive(Debug, Clone)]
pub struct Pick {
    pub older_than: std::time::Duration,
    pub larger_than: Option<String>,
    pub under: Option<String>,
    pub max: Option<usize>,
}

/// The files `pick` chooses now: every file under its directory, with its times from the
/// namespace, through the pure policy (`tier::policy`).
async fn picked(addrs: &[String], pick: &Pick) -> Result<Vec<String>> {
    let larger_than = match &pick.larger_than {
        Some(t) => crate::size::parse_bytes(t).context("--larger-than")?,
        None => 0,
    };
    let policy = tier::Policy {
        older_than_ns: pick.older_than.as_nanos().min(u128::from(u64::MAX)) as u64,
        larger_than,
        under: pick.under.clone(),
        max: pick.max.unwrap_or(10_000),
    };
    let mut c = files_client(addrs).await?;
    let prefix = match pick.under.as_deref() {
        None | Some("/") => String::new(),
        Some(d) => d.trim_end_matches('/').to_string(),
    };
    let files = c.list(pb::PathRequest { path: prefix, ino: 0 }).await.map_err(status_error)?.into_inner().files;
    let mut facts = Vec::with_capacity(files.len());
    for f in files.into_iter().filter(|f| f.complete) {
        let n = match c.lookup(pb::PathRequest { path: f.path.clone(), ino: 0 }).await {
            Ok(n) => n.into_inner(),
            // Gone since it was listed.
            Err(_) => continue,
        };
        facts.push(tier::FileFacts {
            path: f.path,
            id: f.file,
            size: f.size,
            atime_ns: n.atime_ns,
            mtime_ns: n.mtime_ns,
            migrated: !f.tier_key.is_empty(),
        });
    }
    let now_ns = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as u64;
    Ok(tier::cold(&policy, now_ns, facts).into_iter().map(|f| f.path).collect())
}

/// `migrate`: the paths given, or those the policy picks; `--dry-run` only names them.
pub fn migrate(
    paths: Vec<String>,
    pick: Option<Pick>,
    dry_run: bool,
    cluster: Option<&str>,
    json: bool,
) -> Result<ExitCode> {
    let paths = match &pick {
        None => paths,
        Some(p) => {
            let addrs = cluster_addrs(cluster)?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(picked(&addrs, p))?
        }
    };
    if dry_run {
        if json {
            println!("{}", serde_json::json!({ "would_migrate": paths }));
        } else if paths.is_empty() {
            println!("nothing to migrate");
        } else {
            for p in &paths {
                println!("would migrate {p}");
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    if paths.is_empty() {
        if json {
            println!("{}", serde_json::json!({ "files": [], "failed": 0 }));
        } else {
            println!("nothing to migrate: no file matches");
        }
        return Ok(ExitCode::SUCCESS);
    }
    run(Action::Migrate, &paths, cluster, json)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Migrate,
    Recall,
}

pub fn run(action: Action, paths: &[String], cluster: Option<&str>, json: bool) -> Result<ExitCode> {
    let addrs = cluster_addrs(cluster)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let out = if json { Out::Json } else { Out::Text };
    let failed = rt.block_on(run_async(action, &addrs, paths, out))?;
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Where a batch reports: lines for a person, one JSON object, or the server's log (the
/// policy a server runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Out {
    Text,
    Json,
    Log,
}

/// Migrates or recalls `paths`, one at a time; answers how many failed.
pub async fn run_async(action: Action, addrs: &[String], paths: &[String], out: Out) -> Result<u64> {
    let json = out != Out::Text;
    // Seed 001: the migration signal in EX for the whole batch, so every server turns strict
    // (re-validating file metadata with the leader) before any file moves.
    let signal = match action {
        Action::Migrate => Some(take_signal(addrs).await?),
        Action::Recall => None,
    };
    let mut failed = 0;
    let mut results = Vec::new();
    for (i, path) in paths.iter().enumerate() {
        if out == Out::Text && std::io::stderr().is_terminal() && paths.len() > 1 {
            eprint!("\r{action:?}: file {} of {} ({path}){:20}", i + 1, paths.len(), "");
        }
        let started = Instant::now();
        let outcome = one(action, addrs, path).await;
        let secs = started.elapsed().as_secs_f64();
        match outcome {
            Ok(done) => {
                let rate = done.size as f64 / secs.max(1e-6) / 1e6;
                if !json {
                    match action {
                        Action::Migrate => println!(
                            "migrated {path}: {} to {} (blake3 {}…) in {secs:.2} s, {rate:.0} MB/s; {} units freed",
                            human(done.size),
                            done.key,
                            &done.blake3[..16.min(done.blake3.len())],
                            done.units_deleted
                        ),
                        Action::Recall if done.key == ALREADY => {
                            println!("{path} is striped already: it is not on the secondary tier")
                        }
                        Action::Recall => {
                            println!(
                                "recalled {path}: {} striped again in {secs:.2} s, {rate:.0} MB/s",
                                human(done.size)
                            )
                        }
                    }
                    for e in &done.errors {
                        eprintln!("stripelock: warning: {e}; those units are collected later");
                    }
                }
                let already = done.key == ALREADY;
                let key = if already { "" } else { done.key.as_str() };
                results.push(serde_json::json!({
                    "path": path, "ok": true, "bytes": done.size, "key": key, "blake3": done.blake3,
                    "units_deleted": done.units_deleted, "seconds": secs, "mb_per_s": rate,
                    "already_striped": already,
                }));
            }
            Err(e) => {
                failed += 1;
                if !json {
                    eprintln!(
                        "stripelock: {path} was not {}: {e:#}",
                        if action == Action::Migrate { "migrated" } else { "recalled" }
                    );
                }
                results.push(serde_json::json!({"path": path, "ok": false, "error": format!("{e:#}")}));
            }
        }
    }
    if let Some((session, grant)) = signal {
        let _ = session.unlock(grant.lock).await;
        session.close().await;
    }
    match out {
        Out::Json => println!("{}", serde_json::json!({ "files": results, "failed": failed })),
        Out::Log => {
            for r in &results {
                match r["ok"].as_bool() {
                    Some(true) => tracing::info!("{action:?} {}: {} bytes", r["path"], r["bytes"]),
                    _ => tracing::warn!("{action:?} {} failed: {}", r["path"], r["error"]),
                }
            }
        }
        Out::Text => {}
    }
    Ok(failed)
}

/// How long a migrator waits for every server to give up relaxed mode.
const SIGNAL_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The migration signal in EX (every server strict until it is released).
async fn take_signal(addrs: &[String]) -> Result<(client::Session, client::Grant)> {
    let session = client::Session::open(addrs, 10_000).await.context("no session could be opened with the cluster")?;
    let opts = client::LockOptions { timeout: Some(SIGNAL_WAIT), ..Default::default() };
    match session.lock(server::SIGNAL_RESOURCE, 0..u64::MAX, Mode::EX, opts).await {
        Ok(g) => Ok((session, g)),
        Err(e) => {
            session.close().await;
            anyhow::bail!(
                "the servers did not all turn to strict metadata within {SIGNAL_WAIT:?} (the migration signal {} was \
                 not granted: {e}); nothing was migrated",
                server::SIGNAL_RESOURCE
            )
        }
    }
}

/// The key `one` answers for a recall of a file that is striped already.
const ALREADY: &str = "(striped already)";

async fn one(action: Action, addrs: &[String], path: &str) -> Result<pb::MigrateReply> {
    let (session, grant) = lock(addrs, path, Mode::EX).await?;
    let result = async {
        let mut c = files_client(addrs).await?;
        let req = pb::TierRequest { path: path.to_string(), token: grant.signed_token.clone(), range: None };
        match action {
            Action::Migrate => Ok(c.migrate(req).await.map_err(status_error)?.into_inner()),
            Action::Recall => {
                let r = c.recall(req).await.map_err(status_error)?.into_inner();
                // Striped already (e.g. recalled in the background after a read): nothing done.
                let key = if r.already_striped { ALREADY.to_string() } else { String::new() };
                Ok(pb::MigrateReply { size: r.size, key, ..Default::default() })
            }
        }
    }
    .await;
    let _ = session.unlock(grant.lock).await;
    session.close().await;
    result
}

/// `recall --range A..B`: of each file, the rows holding those bytes striped again, under a
/// read lock on the bytes (the server takes each row's stripe lock); answers how many failed.
pub fn recall_range(
    paths: &[String],
    range: std::ops::Range<u64>,
    cluster: Option<&str>,
    json: bool,
) -> Result<ExitCode> {
    let addrs = cluster_addrs(cluster)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (results, failed) = rt.block_on(async {
        let (mut results, mut failed) = (Vec::new(), 0u64);
        for path in paths {
            let started = Instant::now();
            let outcome = async {
                let (session, grant) = crate::files::lock_range(&addrs, path, range.clone(), Mode::PR).await?;
                let r = async {
                    let mut c = files_client(&addrs).await?;
                    let req = pb::TierRequest {
                        path: path.to_string(),
                        token: grant.signed_token.clone(),
                        range: Some(pb::Range { start: range.start, end: range.end }),
                    };
                    Ok::<_, anyhow::Error>(c.recall(req).await.map_err(status_error)?.into_inner())
                }
                .await;
                let _ = session.unlock(grant.lock).await;
                session.close().await;
                r
            }
            .await;
            let secs = started.elapsed().as_secs_f64();
            match outcome {
                Ok(r) => {
                    if !json {
                        if r.already_striped {
                            println!("{path} is striped already: it is not on the secondary tier");
                        } else {
                            println!(
                                "recalled bytes {}..{} of {path}: {} rows striped again in {secs:.2} s; {} of its {} \
                                 rows still on the tier{}",
                                range.start,
                                range.end,
                                r.rows_recalled,
                                r.rows_on_tier,
                                r.rows,
                                if r.rows_on_tier == 0 { " (the stub ends in the background)" } else { "" }
                            );
                        }
                    }
                    results.push(serde_json::json!({
                        "path": path, "ok": true, "already_striped": r.already_striped,
                        "rows_recalled": r.rows_recalled, "rows_on_tier": r.rows_on_tier, "rows": r.rows,
                        "seconds": secs,
                    }));
                }
                Err(e) => {
                    failed += 1;
                    if !json {
                        eprintln!(
                            "stripelock: bytes {}..{} of {path} were not recalled: {e:#}",
                            range.start, range.end
                        );
                    }
                    results.push(serde_json::json!({"path": path, "ok": false, "error": format!("{e:#}")}));
                }
            }
        }
        (results, failed)
    });
    if json {
        println!("{}", serde_json::json!({ "files": results, "failed": failed }));
    }
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// `tier gc`: asked of one server (every server sees the same tier and the same stubs).
pub fn gc(grace: std::time::Duration, dry_run: bool, cluster: Option<&str>, json: bool) -> Result<ExitCode> {
    let addrs = cluster_addrs(cluster)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let r = rt.block_on(async {
        let mut c = files_client(&addrs).await?;
        let req = pb::TierGcRequest { grace_ms: grace.as_millis() as u64, dry_run };
        Ok::<_, anyhow::Error>(c.tier_gc(req).await.map_err(status_error)?.into_inner())
    })?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "objects": r.objects, "named": r.named, "young": r.young, "dry_run": dry_run,
                "deleted": r.deleted, "bytes_deleted": r.bytes_deleted, "staged_removed": r.staged_removed,
            })
        );
    } else {
        let verb = if dry_run { "would delete" } else { "deleted" };
        println!(
            "{} objects on the tier: {} named by stubs, {} younger than the grace period, {verb} {} and {} \
             interrupted uploads ({})",
            r.objects,
            r.named,
            r.young,
            r.deleted.len(),
            r.staged_removed,
            human(r.bytes_deleted)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `bench tier-raw`: object_store put and get of `mib` MiB in `dir`, as a migration and a recall
/// move bytes (8 MiB parts hashed with blake3; reads of 8 MiB), without the cluster.
pub fn bench_raw(dir: &std::path::Path, mib: u64, json: bool) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        let tier = tier::Tier::local(dir)?;
        let key = tier::Tier::key(u64::MAX, std::process::id().into());
        let part: Vec<u8> = (0..tier::store::PART_BYTES).map(|i| (i * 31 % 251) as u8).collect();
        let part = bytes::Bytes::from(part);
        let total = mib << 20;
        let started = Instant::now();
        let mut w = tier.writer(&key).await?;
        let mut written = 0;
        while written < total {
            let n = (total - written).min(part.len() as u64) as usize;
            w.write(part.slice(..n)).await?;
            written += n as u64;
        }
        w.finish().await?;
        let put_s = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let mut at = 0;
        while at < total {
            let to = (at + (8 << 20)).min(total);
            tier.get_range(&key, at..to).await?;
            at = to;
        }
        let get_s = started.elapsed().as_secs_f64();
        tier.delete(&key).await?;
        let (put, get) = (total as f64 / put_s / 1e6, total as f64 / get_s / 1e6);
        if json {
            println!("{}", serde_json::json!({"bytes": total, "put_mb_per_s": put, "get_mb_per_s": get}));
        } else {
            println!("object_store put {}: {put:.0} MB/s; get: {get:.0} MB/s", human(total));
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// One pass of the policy: the files it picks now, migrated. Answers how many it picked and
/// how many of those failed.
pub async fn policy_pass(addrs: &[String], pick: &Pick, out: Out) -> Result<(usize, u64)> {
    let paths = picked(addrs, pick).await?;
    if paths.is_empty() {
        if out == Out::Json {
            println!("{}", serde_json::json!({ "files": [], "failed": 0 }));
        }
        return Ok((0, 0));
    }
    let failed = run_async(Action::Migrate, addrs, &paths, out).await?;
    Ok((paths.len(), failed))
}

/// `tier run`: the policy applied now and then every `every` until SIGINT or SIGTERM (or
/// once). Exit 1 if the last pass had a failure.
pub fn run_policy(
    pick: Pick,
    every: std::time::Duration,
    once: bool,
    cluster: Option<&str>,
    json: bool,
) -> Result<ExitCode> {
    let addrs = cluster_addrs(cluster)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let mut stop = crate::cluster::stop_signal().await;
        let out = if json { Out::Json } else { Out::Text };
        loop {
            let (picked, failed) = tokio::select! {
                r = policy_pass(&addrs, &pick, out) => r?,
                _ = stop.changed() => return Ok(ExitCode::SUCCESS),
            };
            if !json {
                println!("tier run: {picked} files picked, {} migrated, {failed} failed", picked as u64 - failed);
            }
            if once {
                return Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) });
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => return Ok(ExitCode::SUCCESS),
            }
        }
    })
}

/// A server's own tier policy (`tier_policy` in its config): `older-than=D` and optionally
/// `larger-than=S`, `under=DIR`, `max=N`, `every=D` (default 1h), comma-separated.
#[derive(Debug, Clone)]
pub struct ServerPolicy {
    pub pick: Pick,
    pub every: std::time::Duration,
}

impl ServerPolicy {
    pub fn parse(text: &str) -> Result<ServerPolicy> {
        let mut older_than = None;
        let mut pick = Pick { older_than: std::time::Duration::ZERO, larger_than: None, under: None, max: None };
        let mut every = std::time::Duration::from_secs(3600);
        let duration = |k: &str, v: &str| {
            humantime::parse_duration(v).with_context(|| format!("tier_policy: {k}={v} is not a duration like 30d"))
        };
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((k, v)) = part.split_once('=') else {
                anyhow::bail!("tier_policy: `{part}` is not KEY=VALUE (e.g. older-than=30d,larger-than=1MiB,every=1h)");
            };
            match k {
                "older-than" => older_than = Some(duration(k, v)?),
                "larger-than" => {
                    crate::size::parse_bytes(v).with_context(|| format!("tier_policy: larger-than={v}"))?;
                    pick.larger_than = Some(v.to_string());
                }
                "under" => pick.under = Some(v.to_string()),
                "max" => pick.max = Some(v.parse().with_context(|| format!("tier_policy: max={v} is not a count"))?),
                "every" => every = duration(k, v)?,
                _ => anyhow::bail!("tier_policy: unknown key `{k}` (older-than, larger-than, under, max, every)"),
            }
        }
        pick.older_than = older_than.context("tier_policy needs older-than=D (e.g. older-than=30d)")?;
        if every < std::time::Duration::from_secs(1) {
            anyhow::bail!("tier_policy: every={every:?} is too often; at least 1s");
        }
        Ok(ServerPolicy { pick, every })
    }
}

/// Runs `policy` in a server (`own` its address, `own_id` its id) every `policy.every` until
/// `stop`; only while this server leads, so the cluster runs it once. Each pass is what
/// `tier run --once` does, through this server, reported in the server's log.
pub async fn serve_policy(
    own: String,
    own_id: u64,
    policy: ServerPolicy,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    tracing::info!("tier policy: {policy:?}");
    loop {
        tokio::select! {
            _ = tokio::time::sleep(policy.every) => {}
            _ = stop.changed() => return,
        }
        match crate::cluster::status_from(&own).await {
            Ok(s) if s.leader_id == own_id => {}
            _ => continue,
        }
        let pass = tokio::select! {
            r = policy_pass(std::slice::from_ref(&own), &policy.pick, Out::Log) => r,
            _ = stop.changed() => return,
        };
        match pass {
            Ok((0, _)) => {}
            Ok((n, failed)) => tracing::info!("tier policy: {n} files picked, {failed} failed"),
            Err(e) => tracing::warn!("tier policy: the pass failed: {e:#}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ServerPolicy;
    use std::time::Duration;

    #[test]
    fn a_server_policy_reads_its_keys_and_refuses_what_it_does_not_know() {
        let p = ServerPolicy::parse("older-than=30d, larger-than=1MiB,under=/archive,max=5,every=10m").unwrap();
        assert_eq!(p.pick.older_than, Duration::from_secs(30 * 86_400));
        assert_eq!(p.pick.larger_than.as_deref(), Some("1MiB"));
        assert_eq!(p.pick.under.as_deref(), Some("/archive"));
        assert_eq!((p.pick.max, p.every), (Some(5), Duration::from_secs(600)));
        assert_eq!(ServerPolicy::parse("older-than=1d").unwrap().every, Duration::from_secs(3600));
        for (bad, says) in [
            ("larger-than=1MiB", "needs older-than"),
            ("older-than=soon", "not a duration"),
            ("older-than=1d,colder=yes", "unknown key `colder`"),
            ("older-than=1d,larger-than=lots", "larger-than=lots"),
            ("older-than=1d,every=10ms", "too often"),
            ("older-than", "not KEY=VALUE"),
        ] {
            let e = format!("{:#}", ServerPolicy::parse(bad).unwrap_err());
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
