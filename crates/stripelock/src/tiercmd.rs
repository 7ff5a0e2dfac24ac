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
    rt.block_on(async move {
        // Seed 001: the migration signal in EX for the whole batch, so every server turns strict
        // (re-validating file metadata with the leader) before any file moves.
        let signal = match action {
            Action::Migrate => Some(take_signal(&addrs).await?),
            Action::Recall => None,
        };
        let mut failed = 0;
        let mut results = Vec::new();
        for (i, path) in paths.iter().enumerate() {
            if !json && std::io::stderr().is_terminal() && paths.len() > 1 {
                eprint!("\r{action:?}: file {} of {} ({path}){:20}", i + 1, paths.len(), "");
            }
            let started = Instant::now();
            let outcome = one(action, &addrs, path).await;
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
        if json {
            println!("{}", serde_json::json!({ "files": results, "failed": failed }));
        }
        Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
    })
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
        let req = pb::TierRequest { path: path.to_string(), token: grant.signed_token.clone() };
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
