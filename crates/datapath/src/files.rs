//! The gateway's data path: files put, read, listed and removed through any server. A file is
//! cut into stripe rows of its layout; each row's data units and parity go to the layout's
//! servers through their storage service, in parallel. Reads take the data units and, when one
//! cannot be read (its server is down, or its record is damaged or missing), rebuild the row
//! from parity, but only from parity computed from the versions the surviving units are at.
//!
//! Every call carries the fencing token of a lock the caller holds on the file's path (EX on the
//! whole file for put and rm). The gateway checks it before it does anything, and every storage
//! server checks it again before it writes a unit.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;

use chunks::UnitId;
use futures::Stream;
use layout::stripe::{StoredUnit, UnitRead as Fetched, is_hole, role_index, role_name, solve_row, units_in_file};
use layout::{Layout, Role};
use lockservice::{FileMeta, Op};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use wire::ErrorCode;
use wire::convert::{span_to_pb, unit_ref};
use wire::v1 as pb;

use crate::config::{DEFAULT_UNIT, MESSAGE_BYTES_MAX};

/// The lease of the session a background recall holds its lock in.
const RECALL_LEASE_MS: u64 = 10_000;
/// How long a background recall waits for the file's readers and writers to let it go.
const RECALL_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(60);
use crate::errors::row_code;
use crate::names;
use crate::shared::Shared;
use crate::tiering;
use crate::write::Stripes;

/// The files service of one server: the gateway of the data path for its clients.
#[derive(Clone)]
pub struct FilesService {
    shared: Arc<Shared>,
    stripes: Arc<Stripes>,
}

impl std::fmt::Debug for FilesService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FilesService({})", self.shared.id())
    }
}

fn stat_of(path: &str, f: &FileMeta, locks: &dyn crate::locks::Locks) -> pb::FileStat {
    let stub = locks.stub(f.id);
    let tier_rows = stub.as_ref().map_or(0, |s| s.size.div_ceil(s.layout.row_bytes()));
    let tier_rows_recalled = if stub.is_some() { locks.recalled_rows(f.id).len() } else { 0 };
    pb::FileStat {
        tier_rows,
        tier_rows_recalled,
        path: path.to_string(),
        file: f.id,
        size: f.size,
        stripe_unit: f.layout.unit(),
        data_units: f.layout.data() as u32,
        parity_units: f.layout.parity() as u32,
        servers: f.layout.servers().to_vec(),
        complete: f.complete,
        tier_key: stub.as_ref().map(|s| s.key.clone()).unwrap_or_default(),
        tier_blake3: stub.map(|s| s.blake3.iter().map(|b| format!("{b:02x}")).collect()).unwrap_or_default(),
    }
}

fn check_path(path: &str, path_bytes_max: usize) -> Result<(), Status> {
    if !path.starts_with('/') || path.len() > path_bytes_max || path.contains('\0') {
        return Err(ErrorCode::BadRequest.status(format!(
            "`{path}` is not a file path: it must start with / and be at most {path_bytes_max} bytes"
        )));
    }
    if path.ends_with('/') || path.contains("//") {
        return Err(ErrorCode::BadRequest.status(format!(
            "`{path}` names a directory, not a file (it ends with / or has an empty component); give the \
             file's own path"
        )));
    }
    Ok(())
}

/// The size and free space of the file system holding `dir` (0, 0 when it cannot be read).
fn volume_space(dir: &std::path::Path) -> (u64, u64) {
    match rustix::fs::statvfs(dir) {
        Ok(s) => (s.f_blocks.saturating_mul(s.f_frsize), s.f_bavail.saturating_mul(s.f_frsize)),
        Err(_) => (0, 0),
    }
}

/// FNV-1a, to spread files' layouts over the servers.
fn spread(path: &str) -> u64 {
    path.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

impl FilesService {
    /// Stripes the stub at `path` again under `token` (a write lock on the whole file): every
    /// row of the object is read and hashed (the recall checks the object against its stub),
    /// each row still on the tier is stored again over the layout the file had, under its
    /// stripe lock (rows partial recalls striped are kept: they may have been written since),
    /// then the recall is committed, only if the object hashed right (until then readers read
    /// those rows from the tier, and the write lock keeps writers out). Returns the file's size.
    async fn recall_file(&self, path: &str, token: &str) -> Result<u64, Status> {
        use futures::StreamExt;
        self.shared.check_token(path, token, true)?;
        let lock_token = self.shared.claims(path, token)?.token;
        let f = self.shared.file(path)?;
        let Some(stub) = self.shared.locks.stub(f.id) else {
            return Err(ErrorCode::Conflict.status(format!("{path} is not on the secondary tier")));
        };
        let recalled = self.shared.locks.recalled_rows(f.id);
        let (stub_ref, recalled, id) = (&stub, &recalled, f.id);
        let mut rows = Box::pin(tiering::recall_rows(&self.shared, stub.clone(), stub.layout.row_bytes()))
            .map(|row| async move {
                let (row, data) = row?;
                if tiering::row_on_tier(stub_ref, recalled, row) {
                    self.stripes.recall_row(path, id, row, Some(data), false).await?;
                }
                Ok::<(), Status>(())
            })
            .buffered(self.shared.config.limits.rows_in_flight);
        while let Some(r) = rows.next().await {
            r?;
        }
        tiering::recalled(&self.shared, path, &f, &stub, lock_token).await?;
        self.shared.stats.recalled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(stub.size)
    }

    /// `recall --range`: the rows of the stub at `path` holding bytes `g` striped again, each
    /// under its stripe lock; the rest stays on the tier.
    async fn recall_range(&self, path: &str, f: &FileMeta, g: pb::Range) -> Result<pb::RecallReply, Status> {
        use futures::StreamExt;
        if g.start > g.end {
            return Err(ErrorCode::BadRequest.status(format!("range {}..{} ends before it starts", g.start, g.end)));
        }
        let Some(stub) = self.shared.locks.stub(f.id) else {
            return Ok(pb::RecallReply { size: f.size, already_striped: true, ..Default::default() });
        };
        let rb = stub.layout.row_bytes();
        let rows_total = stub.size.div_ceil(rb);
        let end = g.end.min(stub.size);
        let rows = if g.start >= end { 0..0 } else { g.start / rb..(end - 1) / rb + 1 };
        let recalled = self.shared.locks.recalled_rows(f.id);
        let todo: Vec<u64> = rows.filter(|r| tiering::row_on_tier(&stub, &recalled, *r)).collect();
        let done: Vec<Result<bool, Status>> = futures::stream::iter(todo)
            .map(|row| self.stripes.recall_row(path, f.id, row, None, true))
            .buffered(self.shared.config.limits.rows_in_flight)
            .collect()
            .await;
        let mut rows_recalled = 0;
        for d in done {
            rows_recalled += u64::from(d?);
        }
        let rows_on_tier = match self.shared.locks.stub(f.id) {
            Some(_) => rows_total - self.shared.locks.recalled_rows(f.id).len().min(rows_total),
            None => 0,
        };
        if rows_on_tier == 0 {
            // Every row is striped: the background recall ends the stub (checking the object).
            self.recall_after_read(path, f.id);
        }
        Ok(pb::RecallReply { size: f.size, already_striped: false, rows_recalled, rows_on_tier, rows: rows_total })
    }

    /// Reads `rows` of `f` from their units and sends bytes `span` of them on `tx`, in order.
    /// Whether all were sent (false: an error was sent, or the reader went away).
    async fn send_rows(
        &self,
        path: &str,
        f: &FileMeta,
        rows: std::ops::Range<u64>,
        (start, end): (u64, u64),
        unlocked: bool,
        tx: &mpsc::Sender<Result<pb::FileData, Status>>,
    ) -> bool {
        use futures::StreamExt;
        let row_bytes = f.layout.row_bytes();
        let mut reads = futures::stream::iter(rows)
            .map(|row| async move {
                self.read_row(path, f, row, unlocked).await.map(|(mut data, rebuilt)| {
                    let base = row * row_bytes;
                    data.truncate((end - base).min(row_bytes) as usize);
                    let data = data.split_off(start.saturating_sub(base) as usize);
                    pb::FileData { data: data.into(), rebuilt_rows: rebuilt as u32 }
                })
            })
            .buffered(self.shared.config.limits.rows_in_flight);
        while let Some(result) = reads.next().await {
            if let Ok(d) = &result {
                metrics::counter!("stripelock_data_bytes_total", "op" => "read").increment(d.data.len() as u64);
                if d.rebuilt_rows > 0 {
                    metrics::counter!("stripelock_degraded_rows_read_total").increment(u64::from(d.rebuilt_rows));
                }
            }
            let failed = result.is_err();
            if tx.send(result).await.is_err() || failed {
                return false;
            }
        }
        true
    }

    /// Seed 001's transparent recall: after a read of the stub at `path` (file `id`) is served
    /// from the tier, the whole file is striped again in the background. One recall per file
    /// on this server however many read it; across servers, the recall's write lock on the
    /// file lets one through, and the others then find no stub and stop.
    fn recall_after_read(&self, path: &str, id: u64) {
        if !self.shared.config.recall_on_read || !self.shared.recalling.lock().expect("recalling").insert(id) {
            return;
        }
        let (this, path) = (self.clone(), path.to_string());
        tokio::spawn(async move {
            match this.recall_in_background(&path, id).await {
                Ok(true) => tracing::info!("{path} recalled from the secondary tier after a read"),
                Ok(false) => {}
                Err(e) => tracing::warn!("the background recall of {path} stopped: {}", e.message()),
            }
            this.shared.recalling.lock().expect("recalling").remove(&id);
        });
    }

    /// The recall `recall_after_read` starts, under a write lock of a session of this server's
    /// own. Whether it recalled the file (not if someone else did first).
    async fn recall_in_background(&self, path: &str, id: u64) -> Result<bool, Status> {
        use client::{LockOptions, Mode, Session};
        let addrs = [self.shared.locks.address().to_string()];
        let connector = self.shared.locks.connector().clone();
        let session = Session::open_named(&addrs, RECALL_LEASE_MS, connector, format!("recall of {path}"))
            .await
            .map_err(|e| e.code().status(e.to_string()))?;
        let recalled = async {
            // Readers holding the file keep it until they give it back (a revoke asks them to).
            let options = LockOptions { timeout: Some(RECALL_LOCK_WAIT), ..LockOptions::default() };
            let grant =
                session.lock(path, 0..u64::MAX, Mode::EX, options).await.map_err(|e| e.code().status(e.to_string()))?;
            // What was done before the grant (another server's recall, a rename) is seen here.
            self.shared.locks.read_barrier().await.map_err(|e| e.status())?;
            match self.shared.file(path) {
                Ok(f) if f.id == id && self.shared.locks.stub(id).is_some() => {}
                _ => return Ok(false),
            }
            self.recall_file(path, &grant.signed_token).await.map(|_| true)
        }
        .await;
        session.close().await;
        recalled
    }

    pub fn new(shared: Arc<Shared>) -> FilesService {
        let stripes = Arc::new(Stripes::new(shared.clone()));
        FilesService { shared, stripes }
    }

    /// This server's stripe writes (resync holds rows through them).
    pub(crate) fn stripes(&self) -> Arc<Stripes> {
        self.stripes.clone()
    }

    pub fn server(self) -> pb::files_server::FilesServer<FilesService> {
        pb::files_server::FilesServer::new(self)
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX)
    }

    /// The layout of a new file: the requested shape (or the cluster's default) over servers
    /// chosen by the path, so files spread over a larger cluster.
    fn choose_layout(&self, path: &str, first: &pb::PutChunk, up: &BTreeSet<u64>) -> Result<Layout, Status> {
        let ids: Vec<u64> = self.shared.locks.members().keys().copied().collect();
        let n = ids.len();
        let (k0, m0) = Layout::default_shape(n);
        let m = match first.parity_units_plus_one {
            0 => None,
            p => Some(u8::try_from(p - 1).map_err(|_| ErrorCode::BadRequest.status("parity must be 0, 1 or 2"))?),
        };
        let k = match first.data_units {
            0 => None,
            k => Some(u8::try_from(k).map_err(|_| ErrorCode::BadRequest.status("too many data units"))?),
        };
        // Parity not asked for is the cluster's default, never less: a layout that does not fit
        // is refused rather than quietly stored without parity (issue 10: `--data 5` on five
        // servers gave 5+0). Only an explicit parity of 0 stores none.
        let (k, m) = match (k, m) {
            (Some(k), Some(m)) => (k, m),
            (Some(k), None) => (k, m0),
            (None, Some(m)) => ((n as u8).saturating_sub(m).clamp(1, 8), m),
            (None, None) => (k0, m0),
        };
        if k as usize + m as usize > n {
            let fits = n.saturating_sub(m as usize);
            let hint = match (first.data_units, first.parity_units_plus_one) {
                (0, _) => format!("give fewer parity units (at most {})", n.saturating_sub(1).min(2)),
                (_, 0) if fits >= 1 => {
                    format!("give --data {fits} or fewer to keep {m} parity unit(s), or --parity 0 to store no parity")
                }
                _ if fits >= 1 => format!("give --data {fits} or fewer, or fewer parity units"),
                _ => "give fewer parity units".to_string(),
            };
            return Err(ErrorCode::BadRequest.status(format!(
                "a {k}+{m} layout ({k} data and {m} parity units a row, each on its own server) needs {} \
                 servers; this cluster has {n}: {hint}",
                k as usize + m as usize
            )));
        }
        let unit = if first.stripe_unit == 0 { DEFAULT_UNIT } else { first.stripe_unit };
        // From a place on the ring the path picks, servers that answer first: with one down,
        // a 3+1 file on five servers goes on the four that are up.
        let start = (spread(path) % n as u64) as usize;
        let mut ring: Vec<u64> = (0..n).map(|i| ids[(start + i) % n]).collect();
        ring.sort_by_key(|id| !up.contains(id));
        let servers: Vec<u64> = ring[..k as usize + m as usize].to_vec();
        Layout::new(unit, k, m, servers).map_err(|e| ErrorCode::BadRequest.status(e.to_string()))
    }

    /// Writes one row and its parity to fresh units. `data` is the row's bytes, `row_bytes` long
    /// but for the file's last row, which may be shorter: its units are stored only up to the
    /// end of the file, a unit wholly past it not at all, and parity as long as the longest data
    /// unit (issue 10: a 1-byte file took five 1 MiB units). A stored unit reads as its bytes
    /// padded with zeros to the stripe unit, and P and Q of zeros are zeros, so nothing is lost.
    async fn write_row(&self, path: &str, f: &FileMeta, row: u64, data: Vec<u8>, token: &str) -> Result<(), Status> {
        let l = &f.layout;
        let start = row * l.row_bytes();
        let range = span_to_pb(&(start..start + l.row_bytes()));
        let _admitted = self.stripes.admit().await?;
        let mut writes = Vec::new();
        for layout::stripe::UnitWrite { role, bytes, covers, .. } in layout::stripe::encode_row(l, &data) {
            let server = l.server(row, role);
            let mut client = self.shared.storage(server)?;
            let req = pb::WriteUnitRequest {
                unit: Some(unit_ref(&UnitId { file: f.id, row, role })),
                resource: path.to_string(),
                range: Some(range),
                token: token.to_string(),
                data: bytes.into(),
                covers,
                expect_version_plus_one: 1,
                client_token: String::new(),
            };
            writes.push(async move {
                let r = client.write_unit(req).await.map_err(|e| {
                    wire::reword(&e, format!("server {server} refused row {row} {}: {}", role_name(role), e.message()))
                });
                (role, r)
            });
        }
        // Units whose servers did not answer are marked stale, and the put goes on while the
        // row's parity rebuilds them (issue 16); any other refusal fails it.
        let mut down: Vec<(Role, Status)> = Vec::new();
        for (role, r) in futures::future::join_all(writes).await {
            match r {
                Ok(_) => {}
                Err(e) if wire::code_of(&e) == Ok(ErrorCode::Unavailable) => down.push((role, e)),
                Err(e) => return Err(e),
            }
        }
        if down.is_empty() {
            return Ok(());
        }
        let roles: Vec<Role> = down.iter().map(|(r, _)| *r).collect();
        self.shared.mark_stale(f, path, row, &roles).await.map_err(|refused| {
            let (_, e) = &down[0];
            wire::reword(e, format!("{}; {}", e.message(), refused.message()))
        })?;
        Ok(())
    }

    /// The data of one row, rebuilt from parity if a unit cannot be read. Returns whether it was.
    /// For a reader without a lock, `unlocked` is true: each server checks the bytes it holds
    /// are free of write locks.
    async fn read_row(&self, path: &str, f: &FileMeta, row: u64, unlocked: bool) -> Result<(Vec<u8>, bool), Status> {
        let l = &f.layout;
        let k = l.data() as usize;
        let as_reader = unlocked.then_some(path);
        // Units wholly past the end of the file hold no byte a reader gets: not read at first.
        let in_file = units_in_file(l, row, f.size);
        let reads = (0..in_file).map(|j| self.shared.fetch_as(f, row, Role::Data(j as u8), as_reader));
        let mut fetched: Vec<Fetched> = futures::future::join_all(reads).await;
        if let Some(Fetched::Refused(why)) = fetched.iter().find(|u| matches!(u, Fetched::Refused(_))) {
            return Err(ErrorCode::Busy.status(why.clone()));
        }
        if fetched.iter().all(|u| matches!(u, Fetched::Ok(_))) {
            let mut out = Vec::with_capacity(l.row_bytes() as usize);
            for u in fetched {
                let Fetched::Ok(u) = u else { unreachable!("checked") };
                out.extend_from_slice(&u.bytes);
            }
            out.resize(l.row_bytes() as usize, 0);
            return Ok((out, false));
        }
        let rest = (in_file..k).map(|j| Role::Data(j as u8)).chain(l.roles().skip(k));
        let rest: Vec<_> = rest.map(|r| self.shared.fetch_as(f, row, r, as_reader)).collect();
        fetched.extend(futures::future::join_all(rest).await);
        if let Some(Fetched::Refused(why)) = fetched.iter().find(|u| matches!(u, Fetched::Refused(_))) {
            return Err(ErrorCode::Busy.status(why.clone()));
        }
        if is_hole(l, &fetched) {
            // A write past the end skipped this row; it reads as zeros.
            return Ok((vec![0; l.row_bytes() as usize], false));
        }
        let solved = solve_row(l, &fetched, in_file)
            .map_err(|why| row_code(&why).status(format!("row {row} of {path} cannot be read: {why}")))?;
        Ok((solved.data.concat(), true))
    }

    /// Every unit of a row, fetched at once.
    async fn fetch_row(&self, f: &FileMeta, row: u64) -> Vec<Fetched> {
        futures::future::join_all(f.layout.roles().map(|r| self.shared.fetch(f, row, r))).await
    }

    /// Stores a recomputed unit `id` of `path` on `server`.
    async fn restore(&self, path: &str, server: u64, id: UnitId, unit: StoredUnit, token: &str) -> Result<(), Status> {
        let (row, role) = (id.row, id.role);
        let _admitted = self.stripes.admit().await?;
        let mut client = self.shared.storage(server)?;
        let req = pb::RestoreUnitRequest {
            unit: Some(unit_ref(&id)),
            resource: path.to_string(),
            token: token.to_string(),
            data: unit.bytes.into(),
            version: unit.version,
            covers: unit.covers,
        };
        client
            .restore_unit(req)
            .await
            .map(|_| ())
            .map_err(|e| wire::reword(&e, format!("row {row} {} on server {server}: {}", role_name(role), e.message())))
    }

    async fn scrub_file(
        &self,
        path: &str,
        f: &FileMeta,
        repair: bool,
        token: &str,
        rate_bytes_per_s: u64,
        on_tier: Option<(&lockservice::Stub, &lockservice::RowSet)>,
    ) -> pb::ScrubReport {
        let l = &f.layout;
        let k = l.data() as usize;
        let roles: Vec<Role> = l.roles().collect();
        // Of a stub, only the rows striped again (the others have no units: the object is
        // checked instead).
        let striped = |row: &u64| on_tier.is_none_or(|(stub, recalled)| !tiering::row_on_tier(stub, recalled, *row));
        let mut report =
            pb::ScrubReport { rows: (0..l.rows(f.size)).filter(striped).count() as u64, ..Default::default() };
        let running = crate::progress::Running::start(crate::progress::Work::Scrub);
        // Rows are read a few at once (issue 16: scrub in parallel), checked in order.
        use futures::StreamExt;
        let mut rows = futures::stream::iter((0..l.rows(f.size)).filter(striped))
            .map(|row| async move { (row, self.fetch_row(f, row).await) })
            .buffered(self.shared.config.limits.rows_in_flight.max(1));
        let started = tokio::time::Instant::now();
        while let Some((row, fetched)) = rows.next().await {
            // `--rate`: no faster than asked, measured from the start.
            if rate_bytes_per_s > 0 {
                let due = std::time::Duration::from_secs_f64(report.bytes_checked as f64 / rate_bytes_per_s as f64);
                tokio::time::sleep_until(started + due).await;
            }
            if is_hole(l, &fetched) {
                // No write ever reached the row: nothing to check.
                continue;
            }
            let in_file = units_in_file(l, row, f.size);
            let solved = solve_row(l, &fetched, in_file);
            // A data unit never written (past the end of the file) is not stored: not missing.
            let absent = |i: usize| solved.as_ref().is_ok_and(|s| i < k && s.absent[i]);
            for (i, u) in fetched.iter().enumerate() {
                match u {
                    Fetched::Ok(_) => {
                        report.units_checked += 1;
                        report.bytes_checked += l.unit() as u64;
                        running.done(l.unit() as u64);
                    }
                    Fetched::Missing(_) if absent(i) => {}
                    Fetched::Damaged(why) | Fetched::Missing(why) => report.damaged.push(why.clone()),
                    Fetched::Refused(why) => report.unavailable.push(why.clone()),
                    Fetched::Unavailable(why) => report.unavailable.push(why.clone()),
                }
            }
            let solved = match solved {
                Ok(s) => s,
                Err(why) => {
                    if fetched.iter().any(|u| matches!(u, Fetched::Damaged(_) | Fetched::Missing(_))) {
                        report.unrepairable.push(format!("row {row}: {why}"));
                    }
                    continue;
                }
            };
            // What each unit should be, from the data (authoritative once whole).
            let parity = solved.parity(l);
            for (i, role) in roles.iter().enumerate() {
                let expected = if i < k {
                    StoredUnit { bytes: solved.data[i].clone(), version: solved.versions[i], covers: Vec::new() }
                } else {
                    parity[i - k].clone()
                };
                let wrong = match &fetched[i] {
                    Fetched::Ok(u) if i >= k && (u.covers != expected.covers || u.bytes != expected.bytes) => {
                        // Parity that covers other versions than the data's was left behind by
                        // an interrupted write (reads never rebuild from it); parity that covers
                        // the data's versions and differs is damage.
                        let why = if u.covers != expected.covers {
                            "is behind its row's data (an interrupted write; the row has no redundancy until it is \
                             written again or repaired)"
                        } else {
                            "does not match its row"
                        };
                        report.parity_mismatches.push(format!(
                            "row {row} {} on server {}: {why}",
                            role_name(*role),
                            l.server(row, *role)
                        ));
                        true
                    }
                    Fetched::Ok(_) | Fetched::Unavailable(_) | Fetched::Refused(_) => false,
                    Fetched::Missing(_) if i < k && solved.absent[i] => false,
                    Fetched::Damaged(_) | Fetched::Missing(_) => true,
                };
                if wrong && repair {
                    match self
                        .restore(path, l.server(row, *role), UnitId { file: f.id, row, role: *role }, expected, token)
                        .await
                    {
                        Ok(()) => report.repaired += 1,
                        Err(e) => report.unrepairable.push(e.message().to_string()),
                    }
                }
            }
        }
        report
    }
}

type DataStream = Pin<Box<dyn Stream<Item = Result<pb::FileData, Status>> + Send>>;

#[tonic::async_trait]
impl pb::files_server::Files for FilesService {
    async fn put(&self, req: Request<Streaming<pb::PutChunk>>) -> Result<Response<pb::FileStat>, Status> {
        let identity = lockservice::quota::identity_of(&req);
        let mut stream = req.into_inner();
        let first = stream.message().await?.ok_or_else(|| ErrorCode::BadRequest.status("an empty put"))?;
        let path = first.path.clone();
        check_path(&path, self.shared.config.limits.path_bytes_max)?;
        self.shared.check_token(&path, &first.token, true)?;
        let writer = self.shared.claims(&path, &first.token)?.session;
        let up = self.shared.up_members().await;
        let layout = self.choose_layout(&path, &first, &up)?;
        let reply = self
            .shared
            .locks
            .propose(Op::Owned {
                owner: identity.clone(),
                op: Box::new(Op::CreateFile { path: path.clone(), layout: layout.clone(), writer: Some(writer) }),
            })
            .await
            .map_err(|e| e.status())?;
        if let Some(e) = reply.error {
            return Err(e.status());
        }
        let id = reply.file.ok_or_else(|| ErrorCode::Internal.status("no file id in the reply"))?;
        let meta = FileMeta { id, size: 0, layout, complete: false, writer: Some(writer) };
        let written = async {
            use futures::StreamExt;
            let row_bytes = meta.layout.row_bytes() as usize;
            let mut buf = Vec::from(first.data);
            let mut size = buf.len() as u64;
            self.shared.check_file_size(&path, size)?;
            let what = format!("the put of {path}");
            self.shared.admit_bytes(None, &identity, size, &what)?;
            let mut row = 0u64;
            let rows_in_flight = self.shared.config.limits.rows_in_flight;
            // Rows go out `rows_in_flight` at a time, so the servers' syncs overlap.
            let mut in_flight = futures::stream::FuturesUnordered::new();
            loop {
                while buf.len() >= row_bytes {
                    let rest = buf.split_off(row_bytes);
                    let full = std::mem::replace(&mut buf, rest);
                    in_flight.push(self.write_row(&path, &meta, row, full, &first.token));
                    row += 1;
                    while in_flight.len() >= rows_in_flight {
                        in_flight.next().await.expect("not empty")?;
                    }
                }
                match stream.message().await? {
                    Some(chunk) => {
                        size += chunk.data.len() as u64;
                        metrics::counter!("stripelock_data_bytes_total", "op" => "put")
                            .increment(chunk.data.len() as u64);
                        self.shared.check_file_size(&path, size)?;
                        self.shared.admit_bytes(None, &identity, size, &what)?;
                        buf.extend_from_slice(&chunk.data);
                    }
                    None => break,
                }
            }
            if !buf.is_empty() {
                in_flight.push(self.write_row(&path, &meta, row, buf, &first.token));
            }
            while let Some(r) = in_flight.next().await {
                r?;
            }
            Ok::<u64, Status>(size)
        }
        .await;
        let size = match written {
            Ok(size) => size,
            Err(e) => {
                // Nothing half-written stays visible: the file leaves the namespace.
                let _ = self.shared.locks.propose(Op::RemoveFile { path: path.clone(), id }).await;
                let this = self.clone();
                let (p, t) = (path.clone(), first.token.clone());
                tokio::spawn(async move { this.delete_units(&p, &meta, &t).await });
                return Err(e);
            }
        };
        let reply = self
            .shared
            .locks
            .propose(Op::CompleteFile { path: path.clone(), id, size })
            .await
            .map_err(|e| e.status())?;
        if let Some(e) = reply.error {
            return Err(e.status());
        }
        self.shared.applied(reply.index).await;
        let f = self.shared.file(&path)?;
        Ok(Response::new(stat_of(&path, &f, self.shared.locks.as_ref())))
    }

    type GetStream = DataStream;

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<DataStream>, Status> {
        let r = req.into_inner();
        // No token: a read without a lock, which storage checks against write locks (seed 000).
        let unlocked = r.token.is_empty();
        if !unlocked {
            self.shared.check_token(&r.path, &r.token, false)?;
        }
        // Seed 001: strict while a migration runs (this server's copy of the file's layout and
        // stub is checked against the leader's), relaxed otherwise.
        crate::signal::validate(&self.shared).await?;
        let f = self.shared.file(&r.path)?;
        if !f.complete {
            return Err(
                ErrorCode::Busy.status(format!("{} is still being written; try again once its put is done", r.path))
            );
        }
        let (tx, rx) = mpsc::channel(2);
        let this = self.clone();
        // The bytes wanted, clipped to the file; only the rows they touch are read.
        let (start, end) = match r.range {
            Some(g) if g.start > g.end => {
                return Err(ErrorCode::BadRequest.status(format!("range {}..{} ends before it starts", g.start, g.end)));
            }
            Some(g) => (g.start.min(f.size), g.end.min(f.size)),
            None => (0, f.size),
        };
        // A stub's rows still on the tier are read from its object, only the bytes asked for
        // (seed 001's partial recall); rows striped again (by writes, `recall --range`) and
        // rows past the object from their units.
        let on_tier = self.shared.locks.stub(f.id).map(|stub| (stub, self.shared.locks.recalled_rows(f.id)));
        let row_bytes = f.layout.row_bytes();
        let rows = if start == end { 0..0 } else { start / row_bytes..(end - 1) / row_bytes + 1 };
        if let Some((stub, recalled)) = &on_tier
            && rows.clone().any(|row| tiering::row_on_tier(stub, recalled, row))
        {
            // The rest comes back in the background.
            self.recall_after_read(&r.path, f.id);
        }
        tokio::spawn(async move {
            let path = &r.path;
            let Some((stub, recalled)) = on_tier else {
                this.send_rows(path, &f, rows, (start, end), unlocked, &tx).await;
                return;
            };
            // Runs of rows alike (on the tier, or striped), in order.
            let mut row = rows.start;
            while row < rows.end {
                let tiered = tiering::row_on_tier(&stub, &recalled, row);
                let mut next = row + 1;
                while next < rows.end && tiering::row_on_tier(&stub, &recalled, next) == tiered {
                    next += 1;
                }
                let span = (start.max(row * row_bytes), end.min(next * row_bytes));
                let sent = if tiered {
                    tiering::read_stub(&this.shared, &stub, span.0, span.1, &tx).await
                } else {
                    this.send_rows(path, &f, row..next, span, unlocked, &tx).await
                };
                if !sent {
                    return;
                }
                row = next;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn stat(&self, req: Request<pb::PathRequest>) -> Result<Response<pb::FileStat>, Status> {
        let path = req.into_inner().path;
        let f = self.shared.file(&path)?;
        Ok(Response::new(stat_of(&path, &f, self.shared.locks.as_ref())))
    }

    async fn list(&self, req: Request<pb::PathRequest>) -> Result<Response<pb::FileList>, Status> {
        let prefix = req.into_inner().path;
        let files =
            self.shared.locks.files(&prefix).iter().map(|(p, f)| stat_of(p, f, self.shared.locks.as_ref())).collect();
        Ok(Response::new(pb::FileList { files }))
    }

    async fn scrub(&self, req: Request<pb::ScrubRequest>) -> Result<Response<pb::ScrubReport>, Status> {
        let r = req.into_inner();
        self.shared.check_token(&r.path, &r.token, r.repair)?;
        let f = self.shared.file(&r.path)?;
        if let Some(stub) = self.shared.locks.stub(f.id) {
            // A stub is checked against its object: every byte read and hashed; and its rows
            // striped again (by writes, `recall --range`), as a striped file's are.
            let tier = self.shared.tier()?;
            let recalled = self.shared.locks.recalled_rows(f.id);
            let mut report = if recalled.is_empty() {
                pb::ScrubReport::default()
            } else {
                let on_tier = Some((&stub, &recalled));
                self.scrub_file(&r.path, &f, r.repair, &r.token, r.rate_bytes_per_s, on_tier).await
            };
            report.bytes_checked += stub.size;
            if let Err(e) = tier.verify(&stub.key, stub.size, &stub.blake3, stub.layout.row_bytes()).await {
                report.damaged.push(format!("{} (on the secondary tier): {e}", r.path));
            }
            return Ok(Response::new(report));
        }
        if !f.complete {
            return Err(
                ErrorCode::Busy.status(format!("{} is still being written; try again once its put is done", r.path))
            );
        }
        Ok(Response::new(self.scrub_file(&r.path, &f, r.repair, &r.token, r.rate_bytes_per_s, None).await))
    }

    async fn rebuild(&self, req: Request<pb::RebuildRequest>) -> Result<Response<pb::RebuildReport>, Status> {
        let r = req.into_inner();
        self.shared.check_token(&r.path, &r.token, true)?;
        let f = self.shared.striped_file(&r.path)?;
        let l = &f.layout;
        let Some(position) = l.servers().iter().position(|s| *s == r.lost_server) else {
            return Err(ErrorCode::BadRequest.status(format!("server {} holds no unit of {}", r.lost_server, r.path)));
        };
        let target = if r.onto == 0 { r.lost_server } else { r.onto };
        if r.onto != 0 && (l.servers().contains(&r.onto) || !self.shared.locks.members().contains_key(&r.onto)) {
            return Err(ErrorCode::BadRequest.status(format!(
                "server {} cannot take server {}'s place in {}: it is not a server of the cluster outside the file's layout",
                r.onto, r.lost_server, r.path
            )));
        }
        let mut report = pb::RebuildReport::default();
        let rebuild_row = |row: u64| {
            let (f, r) = (&f, &r);
            async move {
                let role = l.role_at(row, position);
                // Whatever the lost server still answers is not used.
                let mut fetched = self.fetch_row(f, row).await;
                let lost = role_index(l, role);
                fetched[lost] = Fetched::Unavailable(format!("row {row} {} is being rebuilt", role_name(role)));
                if is_hole(l, &fetched) {
                    // Nothing was ever written to the row.
                    return Ok(0);
                }
                let solved = solve_row(l, &fetched, units_in_file(l, row, f.size)).map_err(|why| {
                    row_code(&why).status(format!("row {row} of {} cannot be rebuilt: {why}", r.path))
                })?;
                if let Role::Data(j) = role
                    && solved.absent[j as usize]
                {
                    // Never written: there is nothing to restore.
                    return Ok(0);
                }
                let unit = match role {
                    Role::Data(j) => StoredUnit {
                        bytes: solved.data[j as usize].clone(),
                        version: solved.versions[j as usize],
                        covers: Vec::new(),
                    },
                    Role::P => solved.parity(l)[0].clone(),
                    Role::Q => solved.parity(l)[1].clone(),
                };
                let bytes = unit.bytes.len() as u64;
                self.restore(&r.path, target, UnitId { file: f.id, row, role }, unit, &r.token).await?;
                Ok::<u64, Status>(bytes)
            }
        };
        {
            use futures::StreamExt;
            let running = crate::progress::Running::start(crate::progress::Work::Rebuild);
            let mut rows = futures::stream::iter(0..l.rows(f.size))
                .map(rebuild_row)
                .buffer_unordered(self.shared.config.limits.rows_in_flight);
            let started = tokio::time::Instant::now();
            while let Some(bytes) = rows.next().await {
                let bytes = bytes?;
                running.done(bytes);
                report.bytes += bytes;
                report.units_rebuilt += u64::from(bytes > 0);
                // `--rate`: no faster than asked, measured from the start.
                if r.rate_bytes_per_s > 0 {
                    let due = std::time::Duration::from_secs_f64(report.bytes as f64 / r.rate_bytes_per_s as f64);
                    tokio::time::sleep_until(started + due).await;
                }
            }
        }
        let mut servers = l.servers().to_vec();
        servers[position] = target;
        if target != r.lost_server {
            let layout = Layout::new(l.unit(), l.data(), l.parity(), servers.clone())
                .map_err(|e| ErrorCode::Internal.status(e.to_string()))?;
            let reply = self
                .shared
                .locks
                .propose(Op::SetLayout { path: r.path.clone(), id: f.id, layout })
                .await
                .map_err(|e| e.status())?;
            if let Some(e) = reply.error {
                return Err(e.status());
            }
            self.shared.applied(reply.index).await;
        }
        report.servers = servers;
        Ok(Response::new(report))
    }

    async fn lookup(&self, req: Request<pb::PathRequest>) -> Result<Response<pb::Node>, Status> {
        let r = req.into_inner();
        names::lookup(&self.shared, &r.path, r.ino).await.map(Response::new)
    }

    async fn read_dir(&self, req: Request<pb::ReadDirRequest>) -> Result<Response<pb::NodeList>, Status> {
        names::read_dir(&self.shared, &req.into_inner()).await.map(Response::new)
    }

    async fn change(&self, req: Request<pb::NameChange>) -> Result<Response<pb::Node>, Status> {
        let up = self.shared.up_members().await;
        let layout_for = |path: &str| self.choose_layout(path, &pb::PutChunk::default(), &up);
        let identity = lockservice::quota::identity_of(&req);
        names::change(&self.shared, layout_for, &identity, req.into_inner()).await.map(Response::new)
    }

    async fn migrate(&self, req: Request<pb::TierRequest>) -> Result<Response<pb::MigrateReply>, Status> {
        use futures::StreamExt;
        let r = req.into_inner();
        self.shared.check_token(&r.path, &r.token, true)?;
        let lock_token = self.shared.claims(&r.path, &r.token)?.token;
        let f = self.shared.striped_file(&r.path)?;
        if !f.complete {
            return Err(
                ErrorCode::Busy.status(format!("{} is still being put; migrate it once the put is done", r.path))
            );
        }
        let row_bytes = f.layout.row_bytes();
        let (path, meta) = (&r.path, &f);
        let running = crate::progress::Running::start(crate::progress::Work::Migrate);
        let running = &running;
        let rows = futures::stream::iter(0..f.size.div_ceil(row_bytes))
            .map(|row| async move {
                let (mut data, _) = self.read_row(path, meta, row, false).await?;
                data.truncate((meta.size - row * row_bytes).min(row_bytes) as usize);
                running.done(data.len() as u64);
                Ok(bytes::Bytes::from(data))
            })
            .buffered(self.shared.config.limits.rows_in_flight);
        let stub = tiering::migrate(&self.shared, &r.path, &f, lock_token, Box::pin(rows)).await?;
        // The units are freed once the stub is committed (a server down keeps its units until
        // its orphan collection finds the file's units unnamed by any layout in use).
        let removed = self.delete_units(&r.path, &f, &r.token).await;
        self.shared.stats.migrated.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Response::new(tiering::migrated(&stub, removed)))
    }

    async fn recall(&self, req: Request<pb::TierRequest>) -> Result<Response<pb::RecallReply>, Status> {
        let r = req.into_inner();
        if let Some(g) = r.range {
            // Any lock on the file: striping rows again changes no byte of it.
            self.shared.claims(&r.path, &r.token)?;
            let f = self.shared.file(&r.path)?;
            return self.recall_range(&r.path, &f, g).await.map(Response::new);
        }
        self.shared.check_token(&r.path, &r.token, true)?;
        let f = self.shared.file(&r.path)?;
        if self.shared.locks.stub(f.id).is_none() {
            // Under the caller's write lock, so nobody migrates it meanwhile.
            return Ok(Response::new(pb::RecallReply { size: f.size, already_striped: true, ..Default::default() }));
        }
        let size = self.recall_file(&r.path, &r.token).await?;
        Ok(Response::new(pb::RecallReply { size, already_striped: false, ..Default::default() }))
    }

    async fn tier_gc(&self, req: Request<pb::TierGcRequest>) -> Result<Response<pb::TierGcReply>, Status> {
        let r = req.into_inner();
        tiering::gc(&self.shared, r.grace_ms, r.dry_run).await.map(Response::new)
    }

    async fn stat_fs(&self, _req: Request<pb::StatFsRequest>) -> Result<Response<pb::StatFsReply>, Status> {
        let (entries, entries_max) = self.shared.locks.entry_count();
        let (total_bytes, free_bytes) = volume_space(&self.shared.config.data_dir);
        Ok(Response::new(pb::StatFsReply { total_bytes, free_bytes, entries, entries_max }))
    }

    async fn write(&self, req: Request<pb::WriteRequest>) -> Result<Response<pb::WriteReply>, Status> {
        let r = req.into_inner();
        let bytes = r.data.len() as u64;
        let written = self.stripes.write_at(r).await.map(Response::new);
        if written.is_ok() {
            metrics::counter!("stripelock_data_bytes_total", "op" => "write").increment(bytes);
        }
        written
    }

    async fn write_stripe(&self, req: Request<pb::StripeWrite>) -> Result<Response<pb::StripeWritten>, Status> {
        self.stripes.write_stripe_here(req.into_inner()).await.map(Response::new)
    }

    async fn lock_free(&self, req: Request<pb::LockFreeQuery>) -> Result<Response<pb::LockFreeAnswer>, Status> {
        self.shared.lock_free_here(req.into_inner()).map(Response::new)
    }

    async fn invalidate(&self, req: Request<pb::InvalidateNote>) -> Result<Response<pb::Ack>, Status> {
        self.shared.invalidated(req.into_inner()).map(|()| Response::new(pb::Ack {}))
    }

    async fn stripe_landed(&self, req: Request<pb::StripeLandedNote>) -> Result<Response<pb::Ack>, Status> {
        let note = req.into_inner();
        self.stripes.drop_stale_writes((note.file, note.row));
        Ok(Response::new(pb::Ack {}))
    }

    async fn remove(&self, req: Request<pb::RemoveRequest>) -> Result<Response<pb::RemoveReply>, Status> {
        let r = req.into_inner();
        self.shared.check_token(&r.path, &r.token, true)?;
        let f = self.shared.file(&r.path)?;
        let reply = self
            .shared
            .locks
            .propose(Op::RemoveFile { path: r.path.clone(), id: f.id })
            .await
            .map_err(|e| e.status())?;
        if let Some(e) = reply.error {
            return Err(e.status());
        }
        Ok(Response::new(self.delete_units(&r.path, &f, &r.token).await))
    }
}

impl FilesService {
    /// Deletes a file's units on every server of its layout; unreachable servers are reported.
    async fn delete_units(&self, path: &str, f: &FileMeta, token: &str) -> pb::RemoveReply {
        let deletes = f.layout.servers().iter().map(|server| {
            let req = pb::DeleteFileRequest { file: f.id, resource: path.to_string(), token: token.to_string() };
            async move {
                let mut client = self.shared.storage(*server)?;
                client
                    .delete_file(req)
                    .await
                    .map(|r| r.into_inner().units_deleted)
                    .map_err(|e| wire::reword(&e, format!("server {server}: {}", e.message())))
            }
        });
        let mut reply = pb::RemoveReply::default();
        for r in futures::future::join_all(deletes).await {
            match r {
                Ok(n) => reply.units_deleted += n,
                Err(e) => reply.errors.push(e.message().to_string()),
            }
        }
        reply
    }
}
