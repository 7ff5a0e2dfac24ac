//! Resync (issue 16): the leader rebuilds the stripe units degraded writes left behind, once
//! their servers answer again, and clears their marks; and rebuilds every unit of a server
//! whose volume came back empty (`Op::ServerWiped`), then says so (`Op::ServerRebuilt`).
//!
//! A row is resynced under its stripe lock, as a write would be: its units are read with the
//! stale ones taken as lost, the row solved from the rest and its parity, and each stale unit
//! restored with the bytes and version the row's parity covers (so the parity needs no
//! rewrite). The mark is cleared while the lock is still held, so a degraded write of the row
//! that comes after marks it again rather than being cleared by this resync.
//!
//! Rows go in parallel ([`ROWS_IN_FLIGHT`]), throttled to `Limits::resync_bytes_per_s`;
//! progress (rows, bytes, rate, time left) is in `status`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use layout::stripe::{self, StoredUnit, UnitRead as Fetched};
use lockservice::{FileMeta, Op};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::Status;

use crate::shared::Shared;
use crate::write::Stripes;

/// How often the leader looks for marked rows.
const EVERY: Duration = Duration::from_millis(500);
/// Marked rows taken per round.
const ROWS_PER_ROUND: usize = 256;
/// Rows resynced at once: each waits mostly on round trips (its stripe lock, reads, the
/// restore's sync, the mark's clearing), so more than a write's `rows_in_flight` (`bench io`:
/// 4 in flight resynced at 34 MB/s, 16 at 56 MB/s).
const ROWS_IN_FLIGHT: usize = 16;

/// One row to resync: the file, its path, the row and the roles to rebuild there.
struct Job {
    path: String,
    file: FileMeta,
    row: u64,
    /// Roles to restore; for a wiped server also its units that are not marked.
    mask: u8,
}

/// Runs while the server does; works only while it leads.
pub async fn run(shared: Arc<Shared>, stripes: Arc<Stripes>, mut stop: watch::Receiver<bool>) {
    let mut throttle = Throttle::new(shared.config.limits.resync_bytes_per_s);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(EVERY) => {}
        }
        if *stop.borrow() || !shared.locks.leadership().leading {
            continue;
        }
        let marks = shared.locks.stale_marks(ROWS_PER_ROUND);
        let wiped = shared.locks.wiped();
        if marks.is_empty() && wiped.is_empty() {
            throttle.idle(&shared);
            continue;
        }
        let up = shared.up_members().await;
        let mut jobs = Vec::new();
        let mut gone: Vec<(u64, Vec<(u64, u8)>)> = Vec::new();
        for (id, row, mask) in marks {
            match shared.locks.locate(id).and_then(|e| shared.locks.file(&e.path).map(|f| (e.path, f))) {
                Some((path, file)) if file.id == id => {
                    jobs.push(Job { path, file, row, mask });
                }
                // The file left the namespace: its marks mean nothing now.
                _ => match gone.last_mut() {
                    Some((g, rows)) if *g == id => rows.push((row, mask)),
                    _ => gone.push((id, vec![(row, mask)])),
                },
            }
        }
        for (id, rows) in gone {
            let _ = shared.locks.propose(Op::ClearStale { id, rows }).await;
        }
        // Only rows whose stale units' servers answer now.
        jobs.retain(|j| {
            j.file
                .layout
                .roles()
                .enumerate()
                .all(|(i, r)| j.mask & (1 << i) == 0 || up.contains(&j.file.layout.server(j.row, r)))
        });
        let full = wiped.iter().copied().filter(|s| up.contains(s)).collect::<BTreeSet<u64>>();
        throttle.pending(jobs.len() as u64);
        let done = resync_rows(&shared, &stripes, jobs, &mut throttle).await;
        if done.is_err() {
            continue;
        }
        for server in full {
            if rebuild_server(&shared, &stripes, server, &mut throttle, &stop).await {
                match shared.locks.propose(Op::ServerRebuilt { server }).await {
                    Ok(_) => tracing::info!(server, "every unit of the server's wiped volume is rebuilt"),
                    Err(e) => tracing::warn!(server, "could not record the server's rebuild: {e}"),
                }
            }
        }
    }
}

/// Resyncs `jobs`, a few rows at a time. `Err` if this server stopped leading.
async fn resync_rows(shared: &Shared, stripes: &Stripes, jobs: Vec<Job>, throttle: &mut Throttle) -> Result<(), ()> {
    let mut rows = futures::stream::iter(jobs)
        .map(|j| async move {
            let r = resync_row(shared, stripes, &j).await;
            (j, r)
        })
        .buffer_unordered(ROWS_IN_FLIGHT);
    while let Some((j, r)) = rows.next().await {
        match r {
            Ok(bytes) => throttle.done(shared, bytes).await,
            Err(e) => {
                shared.stats.resync_rows_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("resync of row {} of {}: {}", j.row, j.path, e.message());
            }
        }
        if !shared.locks.leadership().leading {
            return Err(());
        }
    }
    Ok(())
}

/// Every row of every file with a unit on `server` (whose volume came back empty). True once
/// all were rebuilt.
async fn rebuild_server(
    shared: &Shared,
    stripes: &Stripes,
    server: u64,
    throttle: &mut Throttle,
    stop: &watch::Receiver<bool>,
) -> bool {
    let files: Vec<(String, FileMeta)> = shared
        .locks
        .files("")
        .into_iter()
        .filter(|(_, f)| f.complete && f.layout.servers().contains(&server))
        .collect();
    let mut failed = false;
    for (path, file) in files {
        if *stop.borrow() || !shared.locks.leadership().leading {
            return false;
        }
        // Of a stub, only its rows striped again (the rest are on the tier, no unit to rebuild).
        let on_tier = shared.locks.stub(file.id).map(|s| (s, shared.locks.recalled_rows(file.id)));
        let striped = |row: u64| !on_tier.as_ref().is_some_and(|(s, r)| crate::tiering::row_on_tier(s, r, row));
        let l = &file.layout;
        let jobs: Vec<Job> = (0..l.rows(file.size))
            .map(|row| {
                let mask = l
                    .roles()
                    .enumerate()
                    .fold(0u8, |m, (i, r)| if l.server(row, r) == server { m | 1 << i } else { m });
                Job { path: path.clone(), file: file.clone(), row, mask }
            })
            .filter(|j| j.mask != 0 && striped(j.row))
            .collect();
        throttle.pending(jobs.len() as u64);
        let failed_before = shared.stats.resync_rows_failed.load(Ordering::Relaxed);
        if resync_rows(shared, stripes, jobs, throttle).await.is_err() {
            return false;
        }
        failed |= shared.stats.resync_rows_failed.load(Ordering::Relaxed) != failed_before;
    }
    !failed
}

/// Rebuilds the stale units of one row under its stripe lock and clears their marks. Returns
/// the bytes restored.
async fn resync_row(shared: &Shared, stripes: &Stripes, j: &Job) -> Result<u64, Status> {
    let hold = stripes.hold_row(j.file.id, j.row).await?;
    let result =
        resync_held(shared, j, &hold.grant.signed_token, &hold.resource, crate::write::version_of(&hold.grant.value))
            .await;
    stripes.let_go(hold).await;
    result
}

async fn resync_held(shared: &Shared, j: &Job, token: &str, resource: &str, lvb: Option<u64>) -> Result<u64, Status> {
    // As of now, under the lock: the file may have changed since the job was made.
    let f = match shared.file(&j.path) {
        Ok(f) if f.id == j.file.id => f,
        _ => return Ok(0),
    };
    let l = &f.layout;
    let marked = shared.locks.stale_mask(f.id, j.row);
    let wiped = shared.stale_roles(&f, j.row) & !marked;
    // Restore what is marked now, and the units of a wiped server this job is for.
    let mask = marked | (j.mask & wiped);
    if mask == 0 {
        return Ok(0);
    }
    if j.row >= l.rows(f.size) {
        // Past the end of the file (it was truncated): nothing to read there.
        clear(shared, &f, j.row, marked).await?;
        return Ok(0);
    }
    let all: Vec<Fetched> = futures::future::join_all(l.roles().map(|r| shared.fetch(&f, j.row, r))).await;
    if stripe::is_hole(l, &all) {
        clear(shared, &f, j.row, marked).await?;
        return Ok(0);
    }
    let in_file = stripe::units_in_file(l, j.row, f.size);
    let solved = stripe::solve_row(l, &all, in_file).map_err(|why| {
        crate::errors::row_code(&why).status(format!("row {} of {} cannot be rebuilt now: {why}", j.row, j.path))
    })?;
    let k = l.data() as usize;
    let mut parity = solved.parity(l);
    // The row's parity version stays what its writes made it: the stripe version.
    let version = all[k..]
        .iter()
        .filter_map(|u| if let Fetched::Ok(u) = u { Some(u.version) } else { None })
        .max()
        .or(lvb)
        .unwrap_or(parity.first().map_or(0, |p| p.version));
    for p in &mut parity {
        p.version = version;
    }
    let mut bytes = 0;
    for (i, role) in l.roles().enumerate().filter(|(i, _)| mask & (1 << i) != 0) {
        if i < k && solved.absent[i] {
            continue;
        }
        let unit = if i < k {
            StoredUnit { bytes: solved.data[i].clone(), version: solved.versions[i], covers: Vec::new() }
        } else {
            parity[i - k].clone()
        };
        bytes += unit.bytes.len() as u64;
        if !shared.config.env.break_resync_for_negative_control {
            shared.restore_unit(&f, j.row, role, unit, token, resource).await?;
        }
    }
    if shared.config.env.break_resync_for_negative_control {
        tracing::warn!("negative control: resync cleared marks without rebuilding");
    }
    clear(shared, &f, j.row, marked).await?;
    Ok(bytes)
}

async fn clear(shared: &Shared, f: &FileMeta, row: u64, mask: u8) -> Result<(), Status> {
    if mask == 0 {
        return Ok(());
    }
    let reply =
        shared.locks.propose(Op::ClearStale { id: f.id, rows: vec![(row, mask)] }).await.map_err(|e| e.status())?;
    if let Some(e) = reply.error {
        return Err(e.status());
    }
    shared.applied(reply.index).await;
    Ok(())
}

/// Resync's pace: at most `rate` bytes/s (0: as fast as it goes), and its progress in the
/// stats.
struct Throttle {
    rate: u64,
    since: Option<Instant>,
    bytes: u64,
    rows_left: u64,
}

impl Throttle {
    fn new(rate: u64) -> Throttle {
        Throttle { rate, since: None, bytes: 0, rows_left: 0 }
    }

    fn idle(&mut self, shared: &Shared) {
        self.since = None;
        self.bytes = 0;
        self.rows_left = 0;
        // The rate stays as the last resync measured it.
        shared.stats.resync_eta_ms.store(0, Ordering::Relaxed);
    }

    fn pending(&mut self, rows: u64) {
        if rows > 0 {
            self.since.get_or_insert_with(Instant::now);
        }
        self.rows_left = rows;
    }

    async fn done(&mut self, shared: &Shared, bytes: u64) {
        let since = *self.since.get_or_insert_with(Instant::now);
        self.bytes += bytes;
        self.rows_left = self.rows_left.saturating_sub(1);
        shared.stats.resync_rows_done.fetch_add(1, Ordering::Relaxed);
        shared.stats.resync_bytes.fetch_add(bytes, Ordering::Relaxed);
        let elapsed = since.elapsed().as_secs_f64().max(1e-3);
        if self.rate > 0 {
            let due = Duration::from_secs_f64(self.bytes as f64 / self.rate as f64);
            if let Some(wait) = due.checked_sub(since.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        let rate = (self.bytes as f64 / elapsed) as u64;
        shared.stats.resync_rate.store(rate, Ordering::Relaxed);
        let rows_done = shared.stats.resync_rows_done.load(Ordering::Relaxed).max(1);
        let per_row = shared.stats.resync_bytes.load(Ordering::Relaxed) / rows_done;
        let left = self.rows_left.saturating_add(shared.locks.stale_rows()) * per_row;
        shared.stats.resync_eta_ms.store((left * 1000).checked_div(rate).unwrap_or(0), Ordering::Relaxed);
    }
}
