//! One client of the fault campaign (`stripelock bench faults-worker`, run by the campaign in a
//! network namespace of its own): until its deadline it increments counters under EX locks,
//! writes its own file under PW byte-range locks (an unanswered write is tried again until it
//! is acknowledged), and takes and drops locks of every mode on random ranges, and appends
//! what it saw to `DIR/history-ID.jsonl` (see `faults_history.rs`).

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use client::{ClientError, LockOptions, Mode, Session};
use tokio::sync::mpsc;
use tokio::time::Instant;
use wire::v1 as pb;
use wire::v1::files_client::FilesClient;

use crate::faults_history::{COUNTER_LEN, Record, counter_text, counter_value, data_of};

#[derive(Debug, Clone)]
pub struct WorkerArgs {
    pub id: u64,
    pub cluster: Vec<String>,
    pub dir: PathBuf,
    pub seconds: u64,
    pub lease_ms: u64,
    pub counters: u64,
    pub file_bytes: u64,
    /// Only take EX on this resource and hold it until killed (the recovery figures' holder).
    pub hold: Option<String>,
}

/// Microseconds of the machine's monotonic clock (the same in every network namespace).
pub fn now_us() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000 + t.tv_nsec as u64 / 1_000
}

/// An instant on the same clock as [`now_us`].
pub fn at_us(i: Instant) -> u64 {
    let (now, n) = (Instant::now(), now_us());
    if i <= now { n.saturating_sub((now - i).as_micros() as u64) } else { n + (i - now).as_micros() as u64 }
}

/// How long one call may take before its answer counts as lost.
const CALL: Duration = Duration::from_secs(4);
/// How long a lock request waits.
const LOCK_WAIT: Duration = Duration::from_secs(3);
/// After the deadline, how long an unanswered write of the worker's own file is still tried.
const GRACE: Duration = Duration::from_secs(20);

/// A small deterministic generator (each task its own).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A task's way to the cluster: a session and a files client, opened again after a failure,
/// starting at the next server each time.
struct Conn {
    worker: u64,
    out: Out,
    addrs: Vec<String>,
    lease_ms: u64,
    turn: usize,
    session: Option<Session>,
    files: Option<FilesClient<tonic::transport::Channel>>,
}

impl Conn {
    fn new(a: &WorkerArgs, out: &Out, turn: usize) -> Conn {
        Conn {
            worker: a.id,
            out: out.clone(),
            addrs: a.cluster.clone(),
            lease_ms: a.lease_ms,
            turn,
            session: None,
            files: None,
        }
    }

    fn rotated(&mut self) -> Vec<String> {
        self.turn += 1;
        let mut a = self.addrs.clone();
        let n = a.len();
        a.rotate_left(self.turn % n);
        a
    }

    async fn session(&mut self) -> Option<Session> {
        if self.session.is_none() {
            let addrs = self.rotated();
            match tokio::time::timeout(CALL * 2, Session::open(&addrs, self.lease_ms)).await {
                Ok(Ok(s)) => {
                    let _ = self.out.send(Record::Session { worker: self.worker, session: s.id() });
                    self.session = Some(s);
                }
                _ => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    return None;
                }
            }
        }
        self.session.clone()
    }

    async fn files(&mut self) -> Option<FilesClient<tonic::transport::Channel>> {
        if self.files.is_none() {
            let addrs = self.rotated();
            match tokio::time::timeout(CALL, crate::files::files_client(&addrs)).await {
                Ok(Ok(c)) => self.files = Some(c),
                _ => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    return None;
                }
            }
        }
        self.files.clone()
    }

    /// After a lock error: a session that is gone or unreachable is opened again.
    async fn lock_failed(&mut self, e: &ClientError) {
        if !matches!(e, ClientError::TimedOut | ClientError::Busy(_) | ClientError::Deadlock)
            && let Some(s) = self.session.take()
        {
            let _ = tokio::time::timeout(Duration::from_secs(1), s.close()).await;
        }
    }

    async fn close(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), s.close()).await;
        }
    }
}

type Out = mpsc::UnboundedSender<Record>;

/// Takes `mode` on `range` of `resource`; a refusal is recorded.
async fn lock(
    conn: &mut Conn,
    out: &Out,
    worker: u64,
    resource: &str,
    range: std::ops::Range<u64>,
    mode: Mode,
) -> Option<(Session, client::Grant, u64)> {
    let session = conn.session().await?;
    let options = LockOptions { timeout: Some(LOCK_WAIT), ..Default::default() };
    match tokio::time::timeout(LOCK_WAIT + CALL, session.lock(resource, range, mode, options)).await {
        Ok(Ok(g)) => Some((session, g, now_us())),
        Ok(Err(e)) => {
            let _ = out.send(Record::Refused { worker, resource: resource.into(), why: e.code().to_string() });
            conn.lock_failed(&e).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            None
        }
        Err(_) => {
            let _ = out.send(Record::Refused { worker, resource: resource.into(), why: "no answer".into() });
            conn.lock_failed(&ClientError::Closed).await;
            None
        }
    }
}

/// Releases the lock and records how long it was the holder's.
async fn unlock(out: &Out, worker: u64, resource: &str, session: &Session, g: &client::Grant, t_grant: u64) {
    let t_end = now_us().min(at_us(session.lease_valid_until()));
    let _ = out.send(Record::Held {
        worker,
        resource: resource.into(),
        start: g.range.start,
        end: g.range.end,
        mode: g.mode.name().into(),
        token: g.token,
        t_grant,
        t_end: t_end.max(t_grant),
    });
    let _ = tokio::time::timeout(CALL, session.unlock(g.lock)).await;
}

async fn read_range(
    files: &mut FilesClient<tonic::transport::Channel>,
    path: &str,
    token: &str,
    range: std::ops::Range<u64>,
) -> Option<Vec<u8>> {
    let req = pb::GetRequest { path: path.into(), token: token.into(), range: Some(wire::convert::span_to_pb(&range)) };
    let fetch = async {
        let mut stream = files.get(req).await?.into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream.message().await? {
            out.extend_from_slice(&chunk.data);
        }
        Ok::<_, tonic::Status>(out)
    };
    match tokio::time::timeout(CALL, fetch).await {
        Ok(Ok(bytes)) => Some(bytes),
        Ok(Err(e)) => {
            eprintln!("{} read {path}: {}", now_us(), e.message());
            None
        }
        Err(_) => {
            eprintln!("{} read {path}: no answer in {CALL:?}", now_us());
            None
        }
    }
}

async fn write_at(
    files: &mut FilesClient<tonic::transport::Channel>,
    path: &str,
    token: &str,
    offset: u64,
    data: Vec<u8>,
) -> bool {
    let req = pb::WriteRequest { path: path.into(), token: token.into(), offset, data: data.into() };
    match tokio::time::timeout(CALL, files.write(req)).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => {
            eprintln!("{} write {path}@{offset}: {}", now_us(), e.message());
            false
        }
        Err(_) => {
            eprintln!("{} write {path}@{offset}: no answer in {CALL:?}", now_us());
            false
        }
    }
}

/// Read a counter under EX, think a little, write it plus one.
async fn counters(a: WorkerArgs, out: Out, deadline: Instant) {
    let mut rng = Rng(a.id.wrapping_mul(7919) | 1);
    let mut conn = Conn::new(&a, &out, a.id as usize);
    while Instant::now() < deadline {
        let file = format!("/faults/counter-{}", rng.below(a.counters));
        let Some((session, g, t_grant)) = lock(&mut conn, &out, a.id, &file, 0..COUNTER_LEN, Mode::EX).await else {
            continue;
        };
        if let Some(mut files) = conn.files().await {
            let t_read = now_us();
            match read_range(&mut files, &file, &g.signed_token, 0..COUNTER_LEN).await {
                Some(bytes) => match counter_value(&bytes) {
                    Some(read) => {
                        // A pause here (SIGSTOP past the lease) makes the write below stale:
                        // one increment in three thinks long, so a paused client is often here.
                        let think = if rng.below(3) == 0 { 300 + rng.below(1_200) } else { rng.below(40) };
                        tokio::time::sleep(Duration::from_millis(think)).await;
                        let t_sent = now_us();
                        let acked = write_at(&mut files, &file, &g.signed_token, 0, counter_text(read + 1)).await;
                        let _ = out.send(Record::Incr {
                            worker: a.id,
                            file: file.clone(),
                            token: g.token,
                            read,
                            t_read,
                            t_sent,
                            t_answer: now_us(),
                            acked,
                        });
                        if !acked {
                            conn.files = None;
                        }
                    }
                    None => {
                        let _ = out.send(Record::Refused {
                            worker: a.id,
                            resource: file.clone(),
                            why: format!("counter unreadable: {:?}", String::from_utf8_lossy(&bytes)),
                        });
                    }
                },
                None => conn.files = None,
            }
        }
        unlock(&out, a.id, &file, &session, &g, t_grant).await;
    }
    conn.close().await;
}

/// Partial writes of the worker's own file, each tried until acknowledged.
async fn writes(a: WorkerArgs, out: Out, deadline: Instant, mut seq: u64) {
    let mut rng = Rng(a.id.wrapping_mul(104_729) | 1);
    let mut conn = Conn::new(&a, &out, a.id as usize + 1);
    let file = format!("/faults/data-{}", a.id);
    while Instant::now() < deadline {
        seq += 1;
        let len = 1 + rng.below(4096);
        let offset = rng.below(a.file_bytes - len);
        let data = data_of(a.id, seq, len);
        while Instant::now() < deadline + GRACE {
            let Some((session, g, t_grant)) = lock(&mut conn, &out, a.id, &file, offset..offset + len, Mode::PW).await
            else {
                continue;
            };
            let mut acked = false;
            if let Some(mut files) = conn.files().await {
                let t_sent = now_us();
                acked = write_at(&mut files, &file, &g.signed_token, offset, data.clone()).await;
                let _ = out.send(Record::Write {
                    worker: a.id,
                    file: file.clone(),
                    seq,
                    offset,
                    len,
                    token: g.token,
                    t_sent,
                    t_answer: now_us(),
                    acked,
                });
                if !acked {
                    conn.files = None;
                }
            }
            unlock(&out, a.id, &file, &session, &g, t_grant).await;
            if acked {
                break;
            }
        }
    }
    conn.close().await;
}

/// Locks of every mode on random ranges of a few resources, held a moment.
async fn lockers(a: WorkerArgs, out: Out, deadline: Instant, task: u64) {
    let mut rng = Rng((a.id * 31 + task).wrapping_mul(15_485_863) | 1);
    let mut conn = Conn::new(&a, &out, (a.id + task) as usize);
    while Instant::now() < deadline {
        let resource = format!("/faults/lock-{}", rng.below(6));
        let mode = [Mode::PR, Mode::PR, Mode::PW, Mode::EX, Mode::CR][rng.below(5) as usize];
        let range = if rng.below(10) == 0 {
            0..u64::MAX
        } else {
            let start = rng.below(4096);
            start..start + 1 + rng.below(1024)
        };
        let Some((session, g, t_grant)) = lock(&mut conn, &out, a.id, &resource, range, mode).await else {
            continue;
        };
        tokio::time::sleep(Duration::from_millis(rng.below(6))).await;
        unlock(&out, a.id, &resource, &session, &g, t_grant).await;
    }
    conn.close().await;
}

/// The highest write number this worker's history holds (a restarted worker goes on from it).
fn last_seq(path: &std::path::Path, id: u64) -> u64 {
    let Ok(text) = std::fs::read_to_string(path) else { return 0 };
    text.lines()
        .filter_map(|l| serde_json::from_str::<Record>(l).ok())
        .filter_map(|r| match r {
            Record::Write { worker, seq, .. } if worker == id => Some(seq),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

pub fn run(a: WorkerArgs) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        if let Some(resource) = &a.hold {
            return hold(&a, resource).await;
        }
        let path = a.dir.join(format!("history-{}.jsonl", a.id));
        let seq = last_seq(&path, a.id);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Record>();
        let writer = tokio::task::spawn_blocking(move || -> Result<()> {
            while let Some(r) = rx.blocking_recv() {
                let mut line = serde_json::to_vec(&r)?;
                line.push(b'\n');
                file.write_all(&line)?;
            }
            file.sync_all()?;
            Ok(())
        });
        let deadline = Instant::now() + Duration::from_secs(a.seconds);
        let mut tasks = vec![
            tokio::spawn(counters(a.clone(), tx.clone(), deadline)),
            tokio::spawn(writes(a.clone(), tx.clone(), deadline, seq)),
        ];
        for task in 0..2 {
            tasks.push(tokio::spawn(lockers(a.clone(), tx.clone(), deadline, task)));
        }
        drop(tx);
        for t in tasks {
            t.await?;
        }
        writer.await??;
        Ok(ExitCode::SUCCESS)
    })
}

/// Takes EX on `resource`, says so on standard output, and holds it until killed.
async fn hold(a: &WorkerArgs, resource: &str) -> Result<ExitCode> {
    let session = Session::open(&a.cluster, a.lease_ms).await?;
    let options = LockOptions { timeout: Some(Duration::from_secs(30)), ..Default::default() };
    let g = session.lock(resource, 0..u64::MAX, Mode::EX, options).await?;
    println!("held {resource} token {}", g.token);
    std::io::stdout().flush()?;
    tokio::time::sleep(Duration::from_secs(a.seconds)).await;
    session.close().await;
    Ok(ExitCode::SUCCESS)
}
