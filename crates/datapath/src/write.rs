//! Writes at an offset of a file (seed 004). The gateway that takes the write checks the
//! client's token (PW or EX on the range written), cuts the write at stripe-row boundaries and
//! hands each row to a server chosen by load ([`Delegation`]): itself or another. That server
//! schedules the row's write, and in its turn:
//!
//! 1. takes the row's stripe lock (EX on `PATH#FILE/ROW`), whose value block holds the row's
//!    stripe version (the patent's timestamp); the lock stays cached here afterwards, so the
//!    next write of the row here costs no lock round trip;
//! 2. checks with the lock table that the client's lock still holds the range: a write whose
//!    lock is gone is stale and is dropped, never written (also as soon as a note says another
//!    write landed on the row);
//! 3. reads the units written and the row's parity, and if the parity's version is the stripe
//!    version and it covers the versions of the data read, updates parity from the change;
//!    otherwise (an interrupted write, a repair, a first write) recomputes it from all the data;
//! 4. writes the data units, then the parity, under the stripe lock's fencing token, each
//!    expecting the version it read; then sets the new stripe version into the value block.
//!
//! A crash between the data and the parity writes leaves parity that does not cover the data's
//! versions: reads then never rebuild from it, and the next write of the row recomputes it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chunks::UnitId;
use client::{Grant, LockOptions, Mode, Session};
use layout::stripe::{self, PlanError, RowWrite, UnitRead as Fetched, UnitWrite, role_name};
use lockengine::ByteRange;
use lockservice::{FileMeta, Op};
use tokio::sync::watch;
use tonic::Status;
use wire::ErrorCode;
use wire::convert::{range_to_pb, unit_ref};
use wire::v1 as pb;

use crate::admission::{Admission, Refused};
use crate::delegation::{Delegation, Stripe};
use crate::errors::row_code;
use crate::shared::{Shared, stripe_resource};

/// How long a stripe write waits for its turn and its stripe lock before giving up.
const STRIPE_WAIT: Duration = Duration::from_secs(30);
/// Lease of a server's stripe session.
const STRIPE_SESSION_LEASE_MS: u64 = 10_000;
/// How long a stripe write waits for this server to apply the grant of the client's lock.
const TOKEN_WAIT: Duration = Duration::from_secs(5);

/// A server's stripe writes: whom its gateway delegates to, the session its stripe locks are
/// held in, the writes it has scheduled, and seed 003's admission of writes under its lease.
pub struct Stripes {
    shared: Arc<Shared>,
    delegation: Mutex<Delegation>,
    session: tokio::sync::Mutex<Option<Session>>,
    /// One write of a stripe at a time on this server; entries go when nobody waits.
    turns: Mutex<HashMap<Stripe, Arc<tokio::sync::Mutex<()>>>>,
    scheduled: Mutex<HashMap<Stripe, Vec<Scheduled>>>,
    next_ticket: std::sync::atomic::AtomicU64,
    /// Stripe lock resources kept cached, oldest first.
    cached: Mutex<(VecDeque<String>, HashSet<String>)>,
    /// Seed 003: state-changing operations admitted under this server's lease.
    admission: Mutex<Admission>,
    admitted: tokio::sync::Notify,
    /// Whether the test hold (`Env::hold_first_stripe_write_ms_for_test`) was used.
    held_for_test: std::sync::atomic::AtomicBool,
}

/// A write waiting for its turn or its stripe lock.
struct Scheduled {
    ticket: u64,
    path: String,
    range: ByteRange,
    token: u64,
    drop: watch::Sender<bool>,
    /// Past its check under the stripe lock: a note no longer drops it.
    running: bool,
}

impl std::fmt::Debug for Stripes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Stripes({})", self.shared.id())
    }
}

impl Stripes {
    pub fn new(shared: Arc<Shared>) -> Stripes {
        let limits = &shared.config.limits;
        let delegation = Delegation::new(shared.id()).remembering(limits.stripes_remembered);
        let admission = Admission::with_max(limits.writes_in_flight_max);
        Stripes {
            shared,
            delegation: Mutex::new(delegation),
            session: tokio::sync::Mutex::new(None),
            turns: Mutex::new(HashMap::new()),
            scheduled: Mutex::new(HashMap::new()),
            next_ticket: Default::default(),
            cached: Mutex::new((VecDeque::new(), HashSet::new())),
            admission: Mutex::new(admission),
            admitted: tokio::sync::Notify::new(),
            held_for_test: Default::default(),
        }
    }
}

/// A scheduled write's place; leaving it (drop) unschedules the write.
struct Ticket<'a> {
    svc: &'a Stripes,
    stripe: Stripe,
    ticket: u64,
}

impl Ticket<'_> {
    fn start(&self) {
        if let Some(list) = self.svc.scheduled.lock().expect("scheduled").get_mut(&self.stripe)
            && let Some(s) = list.iter_mut().find(|s| s.ticket == self.ticket)
        {
            s.running = true;
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut scheduled = self.svc.scheduled.lock().expect("scheduled");
        if let Some(list) = scheduled.get_mut(&self.stripe) {
            list.retain(|s| s.ticket != self.ticket);
            if list.is_empty() {
                scheduled.remove(&self.stripe);
            }
        }
        self.svc.shared.stats.stripe_load.fetch_sub(1, Ordering::Relaxed);
        let mut turns = self.svc.turns.lock().expect("turns");
        if turns.get(&self.stripe).is_some_and(|t| Arc::strong_count(t) == 1) {
            turns.remove(&self.stripe);
        }
    }
}

/// An operation admitted under the lease; its end is measured when this is dropped.
pub struct Admitted<'a> {
    svc: &'a Stripes,
    started: std::time::Instant,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        let took = self.started.elapsed().as_millis() as u64;
        let mut a = self.svc.admission.lock().expect("admission");
        a.done(took);
        self.svc.shared.stats.writes_in_flight.store(a.in_flight(), Ordering::Relaxed);
        self.svc.shared.stats.worst_write_ms.store(a.worst_ms(), Ordering::Relaxed);
        drop(a);
        self.svc.admitted.notify_waiters();
    }
}

/// Why a row's read-modify-write failed, and whether it had written anything by then.
struct RmwError {
    status: Status,
    wrote: bool,
}

impl RmwError {
    fn before(status: Status) -> RmwError {
        RmwError { status, wrote: false }
    }
}

pub(crate) fn version_of(value: &Option<Vec<u8>>) -> Option<u64> {
    value.as_deref().and_then(|v| <[u8; 8]>::try_from(v).ok()).map(u64::from_le_bytes)
}

impl Stripes {
    /// The claims of a token that may write bytes `start..end` of `path` (PW or EX over them).
    fn writer_claims(
        &self,
        path: &str,
        token: &str,
        start: u64,
        end: u64,
    ) -> Result<(token::Claims, ByteRange), Status> {
        let claims = self.shared.claims(path, token)?;
        let range = ByteRange::new(start, end).map_err(|e| ErrorCode::BadRequest.status(e.to_string()))?;
        if !claims.mode.is_write() || !claims.range.contains(range) {
            return Err(ErrorCode::Denied.status(format!(
                "writing bytes {start}..{end} of {path} needs PW or EX covering them; the token is for {} {}",
                claims.mode, claims.range
            )));
        }
        Ok((claims, range))
    }

    /// A client's write of `data` at `offset` of `path` (the Write call).
    pub async fn write_at(self: &Arc<Self>, r: pb::WriteRequest) -> Result<pb::WriteReply, Status> {
        let write_bytes_max = self.shared.config.limits.write_bytes_max;
        if r.data.len() > write_bytes_max {
            return Err(ErrorCode::TooLarge.status(format!(
                "a write carries at most {write_bytes_max} bytes; this one has {}: split it",
                r.data.len()
            )));
        }
        let end = r.offset.checked_add(r.data.len() as u64).filter(|e| *e < u64::MAX).ok_or_else(|| {
            ErrorCode::TooLarge.status(format!(
                "{} bytes at offset {} run past the largest file",
                r.data.len(),
                r.offset
            ))
        })?;
        // An empty write still needs a token for the byte it would start at.
        self.writer_claims(&r.path, &r.token, r.offset, end.max(r.offset + 1))?;
        if !r.data.is_empty() {
            self.shared.check_file_size(&r.path, end)?;
        }
        // A stub too (seed 001): each row the write touches that is still on the tier is
        // striped again first, under its stripe lock (`recall_for_write`).
        let f = self.shared.file(&r.path)?;
        if !f.complete {
            return Err(ErrorCode::Busy.status(format!("{} is still being put; write once the put is done", r.path)));
        }
        if r.data.is_empty() {
            return Ok(pb::WriteReply { size: f.size, rows: Vec::new() });
        }
        // Growing the file adds to its owner's bytes (issue 15): refused before a byte lands.
        let what = format!("this write to {} (bytes {}..{end})", r.path, r.offset);
        self.shared.admit_bytes(Some(f.id), "", end.saturating_sub(f.size), &what)?;
        let row_bytes = f.layout.row_bytes();
        let rows = r.offset / row_bytes..=(end - 1) / row_bytes;
        let mut parts = Vec::new();
        for row in rows {
            let lo = r.offset.max(row * row_bytes);
            let hi = end.min((row + 1) * row_bytes);
            let data = r.data.slice((lo - r.offset) as usize..(hi - r.offset) as usize);
            parts.push(pb::StripeWrite {
                path: r.path.clone(),
                file: f.id,
                row,
                offset: lo,
                data,
                token: r.token.clone(),
                gateway: self.shared.id(),
            });
        }
        let written = {
            use futures::StreamExt;
            futures::stream::iter(parts)
                .map(|p| self.delegate(&f, p))
                .buffered(self.shared.config.limits.rows_in_flight)
                .collect::<Vec<_>>()
                .await
        };
        // A write that fails part-way says which bytes landed and which did not (rows are
        // written independently, so some may have landed).
        if let Some(failed) = written.iter().position(Result::is_err) {
            let row_bytes = f.layout.row_bytes();
            let span = |row: u64| (r.offset.max(row * row_bytes), end.min((row + 1) * row_bytes));
            let first_row = r.offset / row_bytes;
            let (mut done, mut not) = (Vec::new(), Vec::new());
            for (i, w) in written.iter().enumerate() {
                let (a, b) = span(first_row + i as u64);
                let list = if w.is_ok() { &mut done } else { &mut not };
                match list.last_mut() {
                    Some((_, e)) if *e == a => *e = b,
                    _ => list.push((a, b)),
                }
            }
            let show = |l: &[(u64, u64)]| l.iter().map(|(a, b)| format!("{a}..{b}")).collect::<Vec<_>>().join(", ");
            let e = written.into_iter().nth(failed).expect("present").expect_err("failed");
            let landed = if done.is_empty() {
                "nothing was written".to_string()
            } else {
                format!("bytes {} of {} were written", show(&done), r.path)
            };
            let size_note = if done.iter().any(|(_, b)| *b > f.size) {
                " (the file's size was not changed, so written bytes past its end are not part of it)"
            } else {
                ""
            };
            return Err(wire::reword(
                &e,
                format!("{}; {landed}{size_note}; bytes {} were not", e.message(), show(&not)),
            ));
        }
        let rows = written.into_iter().collect::<Result<Vec<_>, Status>>()?;
        let mut size = f.size;
        if end > f.size {
            let reply = self
                .shared
                .locks
                .propose(Op::GrowFile { path: r.path.clone(), id: f.id, size: end })
                .await
                .map_err(|e| e.status())?;
            if let Some(e) = reply.error {
                return Err(e.status());
            }
            self.shared.applied(reply.index).await;
            size = self.shared.file(&r.path)?.size;
        }
        Ok(pb::WriteReply { size, rows })
    }

    /// Hands one row's write to the server chosen for it (perhaps this one).
    async fn delegate(self: &Arc<Self>, f: &FileMeta, part: pb::StripeWrite) -> Result<pb::StripeWritten, Status> {
        let stripe = (f.id, part.row);
        let mut candidates: Vec<u64> = f.layout.servers().to_vec();
        if !candidates.contains(&self.shared.id()) {
            candidates.push(self.shared.id());
        }
        let now = self.shared.locks.now_ms();
        let own_load = self.shared.stats.stripe_load.load(Ordering::Relaxed);
        let target = {
            let mut d = self.delegation.lock().expect("delegation");
            d.report(self.shared.id(), own_load, now);
            d.choose(stripe, &candidates, now)
        };
        let row = part.row;
        let result = if target == self.shared.id() {
            self.write_stripe_here(part).await
        } else {
            self.shared.stats.stripe_writes_delegated.fetch_add(1, Ordering::Relaxed);
            let delegated = match self.shared.peer(target) {
                Ok(mut c) => c.write_stripe(part.clone()).await.map(|r| r.into_inner()),
                Err(e) => Err(e),
            };
            match delegated {
                // A delegate that cannot be reached (or cannot write now) is no reason to fail:
                // this server carries the write out itself. Writing the same bytes again under
                // the same client lock is harmless should the delegate have got some way.
                Err(e) if matches!(wire::code_of(&e), Ok(ErrorCode::Unavailable | ErrorCode::Busy)) => {
                    self.write_stripe_here(part).await
                }
                Err(e) => Err(wire::reword(&e, format!("row {row}, delegated to server {target}: {}", e.message()))),
                ok => ok,
            }
        };
        let now = self.shared.locks.now_ms();
        let mut d = self.delegation.lock().expect("delegation");
        // Done by the target, not by this server in its place.
        let by_target = result.as_ref().ok().filter(|w| w.server == target);
        d.done(stripe, target, by_target.map(|w| w.load), by_target.is_some(), now);
        result
    }

    /// Carries out one row's write here (a WriteStripe call, or this gateway's own choice), in a
    /// task of its own: a caller that gives up (a client's call cancelled, its connection cut)
    /// does not cut the write off between its data and its parity, its repair, its marks or
    /// the return of its stripe lock (the fault campaign found rows left with parity behind and
    /// stripe locks kept by writes dropped half-way).
    pub async fn write_stripe_here(self: &Arc<Self>, req: pb::StripeWrite) -> Result<pb::StripeWritten, Status> {
        let this = self.clone();
        tokio::spawn(async move { this.write_stripe_inner(req).await })
            .await
            .map_err(|e| ErrorCode::Internal.status(format!("a stripe write task failed: {e}")))?
    }

    async fn write_stripe_inner(&self, req: pb::StripeWrite) -> Result<pb::StripeWritten, Status> {
        let end = req.offset.saturating_add(req.data.len() as u64);
        let (claims, range) = self.writer_claims(&req.path, &req.token, req.offset, end)?;
        let f = self.shared.file(&req.path)?;
        if f.id != req.file {
            return Err(ErrorCode::Conflict
                .status(format!("{} was replaced while the write was on its way; write again", req.path)));
        }
        let row_bytes = f.layout.row_bytes();
        if req.offset < req.row * row_bytes || end > (req.row + 1) * row_bytes {
            return Err(ErrorCode::BadRequest.status(format!("{}..{end} is not inside row {}", req.offset, req.row)));
        }
        // The client's lock was granted by an entry this server may not have applied yet (its
        // session lives on another server, and a cached stripe lock needs no round trip that
        // would bring this server up to date). Judged on a table that has not seen the grant,
        // a live write would look stale and be dropped (issue 10: 3.5% of concurrent writes
        // were), so wait until the table holds the grant's token first.
        if !self.seen_token(claims.token).await {
            return Err(ErrorCode::Unavailable.status(format!(
                "server {} has not caught up with the log to the grant of token {} in {} s; try again",
                self.shared.id(),
                claims.token,
                TOKEN_WAIT.as_secs()
            )));
        }
        let stripe = (f.id, req.row);
        let (ticket, mut dropped) = self.schedule(stripe, &req.path, range, claims.token);
        let turn = self.turns.lock().expect("turns").entry(stripe).or_default().clone();
        let give_up = |mut dropped: watch::Receiver<bool>| async move {
            tokio::select! {
                _ = dropped.wait_for(|d| *d) => {}
                () = tokio::time::sleep(STRIPE_WAIT) => {}
            }
        };
        let stale = |why: &str| {
            self.shared.stats.stripe_writes_dropped.fetch_add(1, Ordering::Relaxed);
            ErrorCode::StaleToken.status(format!(
                "the write of {}..{end} of {} was dropped: the lock it was written under (token {}) is gone{why}; \
                 nothing was written. Take the lock again and rewrite",
                req.offset, req.path, claims.token
            ))
        };
        // Our turn on this server, then the stripe lock.
        let _turn = tokio::select! {
            t = turn.lock_owned() => t,
            () = give_up(dropped.clone()) => {
                return Err(if *dropped.borrow() { stale(" (another write landed on the row)") } else { busy(&req) });
            }
        };
        let session = self.stripe_session().await?;
        let resource = stripe_resource(f.id, req.row);
        let grant = match session
            .lock_until(&resource, 0..u64::MAX, Mode::EX, LockOptions::default(), give_up(dropped.clone()))
            .await
        {
            Ok(g) => g,
            Err(client::ClientError::Cancelled) if *dropped.borrow_and_update() => {
                return Err(stale(" (another write landed on the row)"));
            }
            Err(client::ClientError::Cancelled) => return Err(busy(&req)),
            Err(e) => {
                self.reset_stripe_session(&session).await;
                return Err(
                    ErrorCode::Unavailable.status(format!("the stripe lock of row {} failed: {e}; try again", req.row))
                );
            }
        };
        // Seed 004: the write's timestamp is checked with the lock manager. A lock that is gone
        // means a later holder may have written, or may write, these bytes.
        let holds = self.shared.config.env.break_stale_write_check_for_negative_control
            || self.shared.locks.write_lock_holds(&req.path, range, claims.token);
        if !holds {
            self.put_back(&session, &grant, &resource).await;
            return Err(stale(""));
        }
        ticket.start();
        self.hold_for_test().await;
        let admitted = match self.admit().await {
            Ok(a) => a,
            Err(e) => {
                self.put_back(&session, &grant, &resource).await;
                return Err(e);
            }
        };
        let result = match self.recall_for_write(&f, &req, &grant, &resource).await {
            Ok(g) => self.rmw(&f, &req, &g, &resource).await,
            Err(e) => Err(RmwError::before(e)),
        };
        // A write that failed part-way left the row's parity behind its data: recompute it
        // now, so the row does not wait for its next write to be redundant again.
        let repaired = match &result {
            Err(e) if e.wrote => self.repair_row(&f, &req, &grant, &resource).await,
            _ => None,
        };
        drop(admitted);
        let value = match &result {
            Ok((version, _)) => Some(version.to_le_bytes().to_vec()),
            // An empty value never matches a parity version: the next write recomputes.
            Err(e) if e.wrote => Some(repaired.map_or_else(Vec::new, |v| v.to_le_bytes().to_vec())),
            Err(_) => None,
        };
        if let Some(value) = value
            && let Err(e) = session.set_value(grant.lock, value).await
        {
            self.reset_stripe_session(&session).await;
            return Err(
                ErrorCode::Unavailable.status(format!("row {}: setting its stripe version failed: {e}", req.row))
            );
        }
        self.put_back(&session, &grant, &resource).await;
        let (version, recomputed) = result.map_err(|e| e.status)?;
        self.shared.stats.stripe_writes.fetch_add(1, Ordering::Relaxed);
        self.tell_landed(&f, req.row, version);
        Ok(pb::StripeWritten {
            row: req.row,
            server: self.shared.id(),
            version,
            load: self.shared.stats.stripe_load.load(Ordering::Relaxed).saturating_sub(1),
            recomputed,
        })
    }

    /// Tests only (`Env::hold_first_stripe_write_ms_for_test`): holds the first stripe write
    /// carried out here, after its lock check and before it writes a unit.
    async fn hold_for_test(&self) {
        if let Some(ms) = self.shared.config.env.hold_first_stripe_write_ms_for_test
            && !self.held_for_test.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(ms, "test hook: holding a stripe write");
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }

    /// Waits, up to [`TOKEN_WAIT`], until this server has applied the grant that issued `token`.
    async fn seen_token(&self, token: u64) -> bool {
        let mut applied = self.shared.locks.applied_index();
        let deadline = tokio::time::Instant::now() + TOKEN_WAIT;
        loop {
            if self.shared.locks.last_token() >= token {
                return true;
            }
            if !matches!(tokio::time::timeout_at(deadline, applied.changed()).await, Ok(Ok(()))) {
                return false;
            }
        }
    }

    fn schedule(
        &self,
        stripe: Stripe,
        path: &str,
        range: ByteRange,
        token: u64,
    ) -> (Ticket<'_>, watch::Receiver<bool>) {
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(false);
        self.scheduled.lock().expect("scheduled").entry(stripe).or_default().push(Scheduled {
            ticket,
            path: path.to_string(),
            range,
            token,
            drop: tx,
            running: false,
        });
        self.shared.stats.stripe_load.fetch_add(1, Ordering::Relaxed);
        (Ticket { svc: self, stripe, ticket }, rx)
    }

    /// Drops the writes scheduled here for `stripe` whose lock is gone (a write landed on it).
    pub fn drop_stale_writes(&self, stripe: Stripe) {
        if self.shared.config.env.break_stale_write_check_for_negative_control {
            return;
        }
        let scheduled = self.scheduled.lock().expect("scheduled");
        let Some(list) = scheduled.get(&stripe) else { return };
        let locks = &self.shared.locks;
        // Every scheduled write's grant was applied here before it was scheduled; the token
        // check only keeps that true should the order ever change.
        let seen = locks.last_token();
        for s in list.iter().filter(|s| !s.running && s.token <= seen) {
            if !locks.write_lock_holds(&s.path, s.range, s.token) {
                let _ = s.drop.send(true);
            }
        }
    }

    /// Tells the other servers of the row's layout that a write landed on it.
    fn tell_landed(&self, f: &FileMeta, row: u64, version: u64) {
        let note = pb::StripeLandedNote { file: f.id, row, version, server: self.shared.id() };
        for &server in f.layout.servers() {
            if server == self.shared.id() {
                continue;
            }
            let Ok(mut c) = self.shared.peer(server) else { continue };
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(2), c.stripe_landed(note)).await;
            });
        }
        self.drop_stale_writes((f.id, row));
    }

    /// Seed 003: waits until a state-changing operation may start under this server's lease
    /// (the lease of its stripe session), for up to [`STRIPE_WAIT`].
    pub async fn admit(&self) -> Result<Admitted<'_>, Status> {
        let session = self.stripe_session().await?;
        let deadline = tokio::time::Instant::now() + STRIPE_WAIT;
        loop {
            let notified = self.admitted.notified();
            let left = session.lease_left().as_millis() as u64;
            let verdict = {
                let mut a = self.admission.lock().expect("admission");
                let verdict = a.admit(left);
                let data = &self.shared.stats;
                data.writes_in_flight.store(a.in_flight(), Ordering::Relaxed);
                data.writes_admitted_max.store(a.limit(left), Ordering::Relaxed);
                data.worst_write_ms.store(a.worst_ms(), Ordering::Relaxed);
                verdict
            };
            match verdict {
                Ok(()) => return Ok(Admitted { svc: self, started: std::time::Instant::now() }),
                Err(Refused::LeaseOut) => {
                    self.reset_stripe_session(&session).await;
                    return Err(ErrorCode::Unavailable.status(
                        "this server's lease has run out (its renewals were not acknowledged in time), so it \
                         writes nothing until it holds one again; try again",
                    ));
                }
                Err(Refused::Full { limit }) if tokio::time::Instant::now() >= deadline => {
                    return Err(ErrorCode::Unavailable.status(format!(
                        "this server has {limit} writes in flight, as many as can finish before its lease runs \
                         out, and none ended for {} s; try again",
                        STRIPE_WAIT.as_secs()
                    )));
                }
                Err(Refused::Full { .. }) => {
                    tokio::select! {
                        () = notified => {}
                        () = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                }
            }
        }
    }

    /// The session this server holds its stripe locks in, opened on first use.
    async fn stripe_session(&self) -> Result<Session, Status> {
        let mut s = self.session.lock().await;
        if let Some(s) = &*s {
            return Ok(s.clone());
        }
        let addr = self.shared.locks.address().to_string();
        let session =
            Session::open_with(&[addr], STRIPE_SESSION_LEASE_MS, self.shared.locks.connector().clone()).await.map_err(
                |e| ErrorCode::Unavailable.status(format!("this server could not open its stripe session: {e}")),
            )?;
        *s = Some(session.clone());
        Ok(session)
    }

    /// Forgets a stripe session that failed; the next write opens a new one.
    async fn reset_stripe_session(&self, failed: &Session) {
        let mut s = self.session.lock().await;
        if s.as_ref().is_some_and(|s| s.id() == failed.id()) {
            *s = None;
            let mut cached = self.cached.lock().expect("cached");
            cached.0.clear();
            cached.1.clear();
        }
    }

    /// Keeps a stripe lock cached after its write, giving back the oldest idle one past the limit.
    async fn put_back(&self, session: &Session, grant: &Grant, resource: &str) {
        if session.is_cached(grant.lock) {
            let _ = session.unlock(grant.lock).await;
            return;
        }
        if session.cache(grant.lock).await.is_err() {
            let _ = session.unlock(grant.lock).await;
            return;
        }
        let evict: Vec<String> = {
            let mut cached = self.cached.lock().expect("cached");
            if cached.1.insert(resource.to_string()) {
                cached.0.push_back(resource.to_string());
            }
            let mut evict = Vec::new();
            while cached.0.len() > self.shared.config.limits.stripe_locks_cached {
                if let Some(old) = cached.0.pop_front() {
                    cached.1.remove(&old);
                    evict.push(old);
                }
            }
            evict
        };
        for old in evict {
            let _ = session.release_cached(&old).await;
        }
    }

    /// Seed 001, a write recalls the range it touches: a row of a stub still on the tier is
    /// striped again from the object first, under the stripe lock the write holds (so two
    /// writers of one row do not both restore it, one over the other's bytes). The grant as the
    /// read-modify-write is to see it: the restored row's parity is at version 1.
    async fn recall_for_write(
        &self,
        f: &FileMeta,
        req: &pb::StripeWrite,
        grant: &Grant,
        resource: &str,
    ) -> Result<Grant, Status> {
        let Some(stub) = self.shared.locks.stub(f.id) else { return Ok(grant.clone()) };
        if !crate::tiering::row_on_tier(&stub, &self.shared.locks.recalled_rows(f.id), req.row) {
            return Ok(grant.clone());
        }
        let data = crate::tiering::fetch_row(&self.shared, &stub, req.row).await?;
        let lock = (resource, grant.token, grant.signed_token.as_str());
        crate::tiering::stripe_row_again(&self.shared, &req.path, f, &stub, req.row, &data, lock, true).await?;
        Ok(Grant { value: Some(1u64.to_le_bytes().to_vec()), ..grant.clone() })
    }

    /// The row's read-modify-write, under its stripe lock. Returns the new stripe version and
    /// whether parity was recomputed from all the data.
    async fn rmw(
        &self,
        f: &FileMeta,
        req: &pb::StripeWrite,
        grant: &Grant,
        resource: &str,
    ) -> Result<(u64, bool), RmwError> {
        let l = &f.layout;
        let row = req.row;
        let w = RowWrite { lo: req.offset - row * l.row_bytes(), data: &req.data };
        // A row past the end of the file may not exist yet, and a row inside it that no write
        // ever reached (a hole, every unit missing) neither: their missing units are zeros.
        let size = self.shared.file(&req.path).map_err(RmwError::before)?.size;
        let existing = row < l.rows(size);
        let lvb = version_of(&grant.value);
        // A row past the end that was never written (a file growing): nothing to read.
        let mut wrote = false;
        if !existing && let Some(plan) = stripe::plan_new_row(l, &w, lvb) {
            let (version, recomputed) = (plan.version, plan.recomputed);
            match self.store_plan(f, req, grant, resource, plan).await {
                Ok(()) => return Ok((version, recomputed)),
                // Some unit exists after all: read the row and plan again.
                Err(e) if wire::code_of(&e.status) == Ok(ErrorCode::VersionMismatch) => wrote = e.wrote,
                Err(e) => return Err(e),
            }
        }
        self.rmw_by_reading(f, req, grant, resource, size, lvb).await.map_err(|mut e| {
            e.wrote |= wrote;
            e
        })
    }

    /// [`Stripes::rmw`] that reads the row first: the units the write changes and the parity
    /// (an update), or every unit (a recompute).
    async fn rmw_by_reading(
        &self,
        f: &FileMeta,
        req: &pb::StripeWrite,
        grant: &Grant,
        resource: &str,
        size: u64,
        lvb: Option<u64>,
    ) -> Result<(u64, bool), RmwError> {
        let l = &f.layout;
        let row = req.row;
        let w = RowWrite { lo: req.offset - row * l.row_bytes(), data: &req.data };
        let existing = row < l.rows(size);
        let roles = stripe::update_roles(l, &w);
        let read: Vec<Fetched> = futures::future::join_all(roles.iter().map(|&r| self.shared.fetch(f, row, r)))
            .await
            .into_iter()
            .zip(&roles)
            .map(|(u, &r)| stripe::fresh(l, u, r, existing))
            .collect();
        let plan = match stripe::plan_update(l, &w, &read, lvb, existing) {
            Some(plan) => plan,
            None => {
                // Everything of the row, to recompute its parity from its data.
                let all: Vec<Fetched> =
                    futures::future::join_all(l.roles().map(|r| self.shared.fetch(f, row, r))).await;
                let in_file = stripe::units_in_file(l, row, size);
                // Units on servers that are down (or marked stale) are written around: parity
                // carries their new bytes until resync (issue 16).
                let trust = trust_parity(l, &w, &all, lvb, self.shared.stale_roles(f, row));
                stripe::plan_degraded(l, &w, all, lvb, existing, in_file, trust).map_err(|e| {
                    RmwError::before(match e {
                        PlanError::Unreachable { .. } => ErrorCode::Unavailable.status(format!(
                            "row {row} of {} cannot be written while {e}; bring its server back or rebuild it onto \
                             another",
                            req.path
                        )),
                        PlanError::Unreadable(why) => row_code(&why)
                            .status(format!("row {row} of {} cannot be read to write it: {why}", req.path)),
                    })
                })?
            }
        };
        let (version, recomputed) = (plan.version, plan.recomputed);
        if !plan.skipped.is_empty() {
            self.shared.mark_stale(f, &req.path, row, &plan.skipped).await.map_err(RmwError::before)?;
        }
        self.store_plan(f, req, grant, resource, plan).await?;
        Ok((version, recomputed))
    }

    /// After a write of the row that failed part-way: its parity recomputed from the data as
    /// stored now (carrying no client's token: no client's bytes are in it), under the stripe
    /// lock still held. The row's new stripe version, or `None` if a unit could not be read or
    /// the parity not written (then the next write of the row recomputes it).
    async fn repair_row(&self, f: &FileMeta, req: &pb::StripeWrite, grant: &Grant, resource: &str) -> Option<u64> {
        let l = &f.layout;
        let size = self.shared.file(&req.path).ok()?.size;
        if l.parity() == 0 || req.row >= l.rows(size) {
            return None;
        }
        let all: Vec<Fetched> = futures::future::join_all(l.roles().map(|r| self.shared.fetch(f, req.row, r))).await;
        let in_file = stripe::units_in_file(l, req.row, size);
        let nothing = RowWrite { lo: 0, data: &[] };
        let plan = match stripe::plan_recompute(l, &nothing, all, version_of(&grant.value), true, in_file) {
            Ok(plan) => plan,
            Err(_) => {
                self.mark_parity_behind(f, req).await;
                return None;
            }
        };
        if !plan.data.is_empty() {
            // The row reads as never written (a hole): there is no parity to bring up to date.
            return None;
        }
        let version = plan.version;
        let repair = pb::StripeWrite { token: String::new(), data: Default::default(), ..req.clone() };
        match self.store_plan(f, &repair, grant, resource, plan).await {
            Ok(()) => {
                metrics::counter!("stripelock_parity_recomputes_total", "why" => "interrupted-write").increment(1);
                Some(version)
            }
            Err(e) => {
                tracing::warn!(
                    "row {} of {}: parity left behind after an interrupted write: {}",
                    req.row,
                    req.path,
                    e.status.message()
                );
                self.mark_parity_behind(f, req).await;
                None
            }
        }
    }

    /// After a failed write whose parity could not be recomputed: its parity is marked stale
    /// (behind the data), so no write or read rebuilds a unit from it; resync recomputes it.
    async fn mark_parity_behind(&self, f: &FileMeta, req: &pb::StripeWrite) {
        let parity: Vec<layout::Role> = f.layout.roles().skip(f.layout.data() as usize).collect();
        if parity.is_empty() {
            return;
        }
        let mask = parity.iter().fold(0u8, |m, r| m | 1 << stripe::role_index(&f.layout, *r));
        let op = Op::MarkStale { id: f.id, rows: vec![(req.row, mask)] };
        match self.shared.locks.propose(op).await {
            Ok(reply) => self.shared.applied(reply.index).await,
            Err(e) => {
                tracing::warn!("row {} of {}: its parity is behind and could not be marked: {e}", req.row, req.path)
            }
        }
    }

    /// Writes a planned row's units under its stripe lock: data first, then parity (a crash in
    /// between leaves parity that does not cover the data, which the covers show).
    async fn store_plan(
        &self,
        f: &FileMeta,
        req: &pb::StripeWrite,
        grant: &Grant,
        resource: &str,
        plan: stripe::Plan,
    ) -> Result<(), RmwError> {
        let l = &f.layout;
        let row = req.row;
        let mut wrote = false;
        for batch in [plan.data, plan.parity] {
            let writes = batch.into_iter().map(|UnitWrite { role, bytes, covers, expect }| {
                let server = l.server(row, role);
                let req = pb::WriteUnitRequest {
                    unit: Some(unit_ref(&UnitId { file: f.id, row, role })),
                    resource: resource.to_string(),
                    range: Some(range_to_pb(ByteRange::ALL)),
                    token: grant.signed_token.clone(),
                    data: bytes.into(),
                    covers,
                    expect_version_plus_one: expect.map_or(0, |v| v + 1),
                    // On whose behalf: storage refuses the write once that client is fenced.
                    client_token: req.token.clone(),
                };
                let write = async move {
                    let mut c = self.shared.storage(server)?;
                    c.write_unit(req).await.map_err(|e| {
                        wire::reword(
                            &e,
                            format!("server {server} refused row {row} {}: {}", role_name(role), e.message()),
                        )
                    })
                };
                (role, write)
            });
            let results = futures::future::join_all(writes.map(|(role, w)| async move { (role, w.await) })).await;
            wrote |= !results.is_empty();
            // Units whose servers did not answer are marked stale and the write goes on
            // (issue 16): the parity written next carries their new bytes. Any other refusal
            // fails the write.
            let mut down = Vec::new();
            for (role, r) in results {
                match r {
                    Ok(_) => {}
                    Err(e) if wire::code_of(&e) == Ok(ErrorCode::Unavailable) => down.push((role, e)),
                    Err(e) => return Err(RmwError { status: e, wrote }),
                }
            }
            if !down.is_empty() {
                let roles: Vec<layout::Role> = down.iter().map(|(r, _)| *r).collect();
                if let Err(refused) = self.shared.mark_stale(f, &req.path, row, &roles).await {
                    let (_, e) = down.swap_remove(0);
                    let status = wire::reword(&e, format!("{}; {}", e.message(), refused.message()));
                    return Err(RmwError { status, wrote });
                }
            }
        }
        Ok(())
    }
}

/// A row's stripe lock held for a duty of this server's (resync), not for a client's write:
/// its turn on the row here and the lock, whose token writes the row's units.
pub struct RowHold {
    pub grant: Grant,
    pub resource: String,
    session: Session,
    stripe: Stripe,
    turn: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Stripes {
    /// Takes row `row` of file `file` as a write would (its turn here, then its stripe lock),
    /// waiting at most [`STRIPE_WAIT`].
    pub async fn hold_row(&self, file: u64, row: u64) -> Result<RowHold, Status> {
        let stripe = (file, row);
        let turn = self.turns.lock().expect("turns").entry(stripe).or_default().clone();
        let busy = || {
            ErrorCode::Busy.status(format!(
                "row {row} of file {file} stayed locked for {} s (writes hold it); try again",
                STRIPE_WAIT.as_secs()
            ))
        };
        let turn = tokio::time::timeout(STRIPE_WAIT, turn.lock_owned()).await.map_err(|_| busy())?;
        let session = self.stripe_session().await?;
        let resource = stripe_resource(file, row);
        let grant = match session
            .lock_until(&resource, 0..u64::MAX, Mode::EX, LockOptions::default(), tokio::time::sleep(STRIPE_WAIT))
            .await
        {
            Ok(g) => g,
            Err(client::ClientError::Cancelled) => return Err(busy()),
            Err(e) => {
                self.reset_stripe_session(&session).await;
                return Err(ErrorCode::Unavailable.status(format!("the stripe lock of row {row} failed: {e}")));
            }
        };
        Ok(RowHold { grant, resource, session, stripe, turn: Some(turn) })
    }

    /// Stripes row `row` of the stub at `path` (file `id`) again from the tier, under the row's
    /// stripe lock (`recall --range`, and each row of a whole recall, which does not `commit`
    /// each row: its final entry commits them all). `data`: the row's bytes if already read
    /// from the object. Whether this call striped it (not if it was striped already, or the
    /// file is no longer a stub).
    pub async fn recall_row(
        &self,
        path: &str,
        id: u64,
        row: u64,
        data: Option<bytes::Bytes>,
        commit: bool,
    ) -> Result<bool, Status> {
        let hold = self.hold_row(id, row).await?;
        let result = async {
            // As of now, under the row's lock: a writer may have striped it meanwhile.
            let f = self.shared.file(path)?;
            if f.id != id {
                return Err(ErrorCode::Conflict.status(format!("{path} was replaced during its recall")));
            }
            let Some(stub) = self.shared.locks.stub(id) else { return Ok(false) };
            if !crate::tiering::row_on_tier(&stub, &self.shared.locks.recalled_rows(id), row) {
                return Ok(false);
            }
            let data = match data {
                Some(d) => d,
                None => crate::tiering::fetch_row(&self.shared, &stub, row).await?,
            };
            let lock = (hold.resource.as_str(), hold.grant.token, hold.grant.signed_token.as_str());
            crate::tiering::stripe_row_again(&self.shared, path, &f, &stub, row, &data, lock, commit).await?;
            Ok(true)
        }
        .await;
        // The restored row's stripe version, so its next write updates parity from the change.
        if matches!(result, Ok(true))
            && let Err(e) = hold.session.set_value(hold.grant.lock, 1u64.to_le_bytes().to_vec()).await
        {
            tracing::warn!("row {row} of {path}: its stripe version was not set after its recall: {e}");
        }
        self.let_go(hold).await;
        result
    }

    /// Gives a held row back (its lock stays cached here, as after a write).
    pub async fn let_go(&self, mut hold: RowHold) {
        self.put_back(&hold.session, &hold.grant, &hold.resource).await;
        drop(hold.turn.take());
        let mut turns = self.turns.lock().expect("turns");
        if turns.get(&hold.stripe).is_some_and(|t| Arc::strong_count(t) == 1) {
            turns.remove(&hold.stripe);
        }
    }
}

/// Whether a degraded write may rebuild the touched data units it cannot read from a parity
/// consistent with the units it can, although the stripe version does not say the parity is
/// current (issue 16). Yes if every such unit is marked stale: the write that marked it wrote
/// the parity after (a write that failed to has its parity marked too, and a coordinator that
/// died between left the unit's old bytes both on its disk and in the parity). Yes for a row no
/// stripe write has changed since its put (parity at version 1 over data units at 0 or 1).
/// Otherwise no: the parity may be behind the unit by an interrupted write (the RAID write
/// hole), and would rebuild bytes older than ones readers saw.
fn trust_parity(l: &layout::Layout, w: &RowWrite, all: &[Fetched], lvb: Option<u64>, marked: u8) -> bool {
    let k = l.data() as usize;
    let unreadable_marked = w.touched(l).iter().all(|&j| matches!(all[j], Fetched::Ok(_)) || marked & (1 << j) != 0);
    let parity: Vec<&layout::stripe::StoredUnit> =
        all[k..].iter().filter_map(|u| if let Fetched::Ok(u) = u { Some(u) } else { None }).collect();
    let as_put = lvb.is_none()
        && !parity.is_empty()
        && parity.iter().all(|p| p.version == 1 && p.covers.iter().all(|&c| c <= 1));
    unreadable_marked || as_put
}

fn busy(req: &pb::StripeWrite) -> Status {
    ErrorCode::Busy.status(format!(
        "row {} of {} stayed locked for {} s (another writer holds its stripe lock); try again",
        req.row,
        req.path,
        STRIPE_WAIT.as_secs()
    ))
}
