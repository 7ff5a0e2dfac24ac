//! The FUSE file system: each request becomes namespace RPCs, data-path RPCs under extent
//! locks, or fcntl locks of the lock engine.
//!
//! Extent locks (Lustre's way): reading a file takes PR on its whole path, writing takes PW; the
//! mount keeps them (`Session::keep_cached`) until another session's conflicting request revokes
//! them. On a revoke the mount waits for the I/O it is doing on the file, gives the lock back, and
//! drops the kernel's pages of the file (FUSE notify inval). It does not drop them *before* giving
//! the lock back: a read of that file blocked on a new lock holds a page lock the inval would
//! wait for, and the new lock waits for this release. What keeps a reader from stale pages in
//! that window is the attribute check the kernel makes on every read (attributes are never
//! cached, AUTO_INVAL_DATA is on): a writer moves the file's mtime forward, strictly, at its
//! first write under each write lock and at close, so a read after a write elsewhere sees a new
//! mtime and drops its pages.

use std::collections::{BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use client::{ClientError, Event, LockOptions, Mode, PosixKind, PosixOutcome, Session};
use fuse3::raw::prelude::*;
use fuse3::{Errno, Result, SetAttr, Timestamp};
use futures::stream::{self, Stream};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use wire::ErrorCode;
use wire::v1 as pb;
use wire::v1::files_client::FilesClient;
use wire::v1::locks_client::LocksClient;

use crate::inodes::{Inodes, ROOT, entry_id, fuse_ino};
use crate::notify::Notifier;
use crate::posix::{self, Interrupts, Owners};

/// Attributes and entries are never cached by the kernel (see the module comment).
const TTL: Duration = Duration::ZERO;
/// Largest write the kernel sends at once.
const MAX_WRITE: u32 = 1 << 20;
/// Bytes a read fetches at once (aligned), kept for the reads that follow while the read lock
/// it was read under is held (the kernel asks 128 KiB at a time; the data path serves whole
/// stripe rows).
const READ_CHUNK: u64 = 8 << 20;
/// Sequential writes are gathered up to this many bytes before they are sent (whole stripe
/// rows then, without reading old data for parity); sent earlier on close, fsync, a read, a
/// truncate, or when another session needs the file (a revoke).
const WRITE_CHUNK: usize = 8 << 20;
/// Gathered writes of one file sent and not answered yet, at most: the next run is gathered
/// from the kernel while these travel. An error of one is returned by the next write, fsync or
/// close of the file, as a write-back cache does.
const WRITES_IN_FLIGHT: usize = 2;
/// Most files with a fetched chunk kept.
const READ_CACHE_FILES: usize = 8;
/// Bytes zeroed per write when a truncate cuts a file shorter.
const ZERO_CHUNK: u64 = 4 << 20;
/// Most extent locks a mount keeps; beyond it, the least recently used idle one goes back.
pub const EXTENTS_MAX: usize = 4096;
/// How long a call may keep failing over between servers before the caller gets EIO.
const FAILOVER: Duration = Duration::from_secs(20);
/// Longest name in a directory.
const NAME_MAX: usize = 255;
/// Most locked paths under a directory revoked before it is renamed.
const LOCKED_UNDER_MAX: usize = 1024;
/// The name a file unlinked while open through a mount has until its last close there, with
/// its entry id in hex after it.
const UNLINKED_PREFIX: &str = ".stripelock-unlinked-";

#[derive(Debug)]
struct Held {
    lock: u64,
    mode: Mode,
    token: String,
    /// The inode that last used it (whose kernel pages a revoke drops).
    ino: u64,
    /// The file's mtime was moved forward since this lock was granted.
    touched: bool,
}

#[derive(Debug, Default)]
struct Extent {
    held: Option<Held>,
    used: u64,
}

#[derive(Debug)]
struct Dirty {
    token: String,
    start: u64,
    bytes: Vec<u8>,
}

impl Dirty {
    fn end(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }
}

/// A gathered write sent and not answered yet.
#[derive(Debug)]
struct Sending {
    start: u64,
    end: u64,
    task: tokio::task::JoinHandle<Result<()>>,
}

/// The chunk after the last one read, being fetched (read-ahead) under the lock of `token`.
#[derive(Debug)]
struct Ahead {
    token: String,
    start: u64,
    task: tokio::task::JoinHandle<Result<Bytes>>,
}

#[derive(Debug)]
struct Handle {
    ino: u64,
    flags: u32,
    /// Engine owners that took fcntl locks through this open file (OFD locks are dropped on
    /// its release; FLUSH carries no owner for them).
    owners: BTreeSet<u64>,
    /// Written through since the last time the mtime moved.
    wrote: bool,
    /// The first read through it moves the file's atime (see [`atime_due`]).
    atime_due: bool,
}

/// A directory opened: its entries as of OPENDIR, so offsets stay put while it is read.
#[derive(Debug)]
struct DirHandle {
    entries: Vec<(u64, FileType, OsString, Option<pb::Node>)>,
}

/// What `status` shows of a mount, and tests read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MountStats {
    pub open_files: u64,
    pub extent_locks: u64,
    pub fcntl_locked_files: u64,
}

pub struct StripeFs {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for StripeFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StripeFs(session {})", self.inner.session.id())
    }
}

pub(crate) struct Inner {
    pub(crate) session: Session,
    servers: Vec<FilesClient<Channel>>,
    /// The same servers' lock service (its lock table, to find the locks under a directory).
    tables: Vec<LocksClient<Channel>>,
    addrs: Vec<String>,
    current: AtomicUsize,
    inodes: Mutex<Inodes>,
    handles: Mutex<HashMap<u64, Handle>>,
    dirs: Mutex<HashMap<u64, DirHandle>>,
    next_fh: AtomicU64,
    owners: Mutex<Owners>,
    interrupts: Mutex<Interrupts>,
    /// Extent locks by the path they are on: one per path, whichever inode is there (two
    /// locks of one session on a path would both be granted, and the older token's writes
    /// refused once the newer one wrote).
    extents: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Extent>>>>,
    clock: AtomicU64,
    /// Per path: the token of the lock a chunk was read under, where it starts, its bytes. Valid
    /// only while that same lock is held and nothing was written through this mount since.
    reads: Mutex<HashMap<String, (String, u64, Bytes)>>,
    /// Per path: bytes written but not sent yet (one contiguous run), under the write lock whose
    /// token they carry. Only touched under the file's extent mutex.
    dirty: Mutex<HashMap<String, Dirty>>,
    /// Per path: gathered writes on their way (at most [`WRITES_IN_FLIGHT`], never overlapping).
    /// Only touched under the file's extent mutex; waited for wherever `dirty` is sent.
    sending: Mutex<HashMap<String, Vec<Sending>>>,
    /// Per path: the next chunk of a sequential read, fetched while the kernel takes this one.
    ahead: Mutex<HashMap<String, Ahead>>,
    pub(crate) notifier: Mutex<Option<Notifier>>,
    expired: std::sync::atomic::AtomicBool,
    /// The longest an F_SETLKW waits (`mount --lock-wait-max`); `None`: no limit.
    lock_wait_max: Option<Duration>,
    /// Reads never move atime (`mount --noatime`).
    noatime: bool,
    /// Files unlinked while open here, by inode: renamed to a hidden name in their directory
    /// (NFS's "silly rename") and removed at their last close here.
    unlinked: Mutex<HashMap<u64, String>>,
}

fn errno(e: i32) -> Errno {
    Errno::from(e)
}

fn errno_of_code(code: ErrorCode) -> Errno {
    errno(match code {
        ErrorCode::NotFound => libc::ENOENT,
        ErrorCode::Exists => libc::EEXIST,
        ErrorCode::NotDir => libc::ENOTDIR,
        ErrorCode::IsDir => libc::EISDIR,
        ErrorCode::NotEmpty => libc::ENOTEMPTY,
        ErrorCode::BadRequest => libc::EINVAL,
        ErrorCode::TooLarge => libc::EFBIG,
        ErrorCode::Limit => libc::ENOSPC,
        ErrorCode::Busy => libc::EAGAIN,
        ErrorCode::Deadlock => libc::EDEADLK,
        ErrorCode::Denied => libc::EACCES,
        // Over the owner's bytes-stored quota (issue 15), as a file system's disk quota.
        ErrorCode::Quota => libc::EDQUOT,
        _ => libc::EIO,
    })
}

fn errno_of_status(s: &tonic::Status) -> Errno {
    let e = errno_of_code(ClientError::from_status(s).code());
    if e == errno(libc::EIO) {
        tracing::warn!("EIO for a refusal: {}", s.message());
    }
    e
}

fn errno_of_client(e: &ClientError) -> Errno {
    // Over a lock quota or limit: fcntl(2)'s "too many segment locks open".
    let no_locks = matches!(e.code(), ErrorCode::Quota | ErrorCode::Limit);
    if !no_locks && !matches!(e, ClientError::Busy(_) | ClientError::Deadlock | ClientError::Cancelled) {
        tracing::warn!("EIO for a lock refusal: {e}");
    }
    match e {
        ClientError::Busy(_) => errno(libc::EAGAIN),
        ClientError::Deadlock => errno(libc::EDEADLK),
        ClientError::Cancelled => errno(libc::EINTR),
        _ if no_locks => errno(libc::ENOLCK),
        _ => errno(libc::EIO),
    }
}

/// Whether a refused call is worth making again on another server: the server cannot serve
/// now, or the call never got an answer from one (the connection broke: the server died).
fn retry_elsewhere(s: &tonic::Status) -> bool {
    let code = ClientError::from_status(s).code();
    !wire::from_server(s) || matches!(code, ErrorCode::Unavailable | ErrorCode::NotLeader)
}

fn ns_of(t: Timestamp) -> u64 {
    if t.sec < 0 { 0 } else { (t.sec as u64).saturating_mul(1_000_000_000).saturating_add(u64::from(t.nsec)) }
}

fn ts(ns: u64) -> Timestamp {
    Timestamp::new((ns / 1_000_000_000) as i64, (ns % 1_000_000_000) as u32)
}

fn kind_of(n: &pb::Node) -> FileType {
    match pb::NodeKind::try_from(n.kind) {
        Ok(pb::NodeKind::Dir) => FileType::Directory,
        Ok(pb::NodeKind::Symlink) => FileType::Symlink,
        Ok(pb::NodeKind::Special) => match n.mode & libc::S_IFMT {
            libc::S_IFIFO => FileType::NamedPipe,
            libc::S_IFCHR => FileType::CharDevice,
            libc::S_IFBLK => FileType::BlockDevice,
            _ => FileType::Socket,
        },
        _ => FileType::RegularFile,
    }
}

fn attr_of(n: &pb::Node) -> FileAttr {
    FileAttr {
        ino: fuse_ino(n.ino),
        size: n.size,
        blocks: n.size.div_ceil(512),
        atime: ts(n.atime_ns),
        mtime: ts(n.mtime_ns),
        ctime: ts(n.ctime_ns),
        kind: kind_of(n),
        perm: (n.mode & 0o7777) as u16,
        nlink: n.nlink.max(1),
        uid: n.uid,
        gid: n.gid,
        rdev: n.rdev as u32,
        blksize: MAX_WRITE,
    }
}

/// Whether a read now should move the atime of a file with these attributes, as Linux's
/// relatime has it: the atime is not after the last change (mtime or ctime), or is a day old.
fn atime_due(n: &pb::Node, now_ns: u64) -> bool {
    const DAY_NS: u64 = 24 * 3600 * 1_000_000_000;
    n.atime_ns <= n.mtime_ns || n.atime_ns <= n.ctime_ns || now_ns.saturating_sub(n.atime_ns) >= DAY_NS
}

fn now_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

fn join(dir: &str, name: &OsStr) -> Result<String> {
    let name = name.to_str().ok_or_else(|| errno(libc::EINVAL))?;
    if name.len() > NAME_MAX {
        return Err(errno(libc::ENAMETOOLONG));
    }
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(errno(libc::EINVAL));
    }
    Ok(if dir == "/" { format!("/{name}") } else { format!("{dir}/{name}") })
}

impl Inner {
    pub(crate) fn new(
        session: Session,
        addrs: Vec<String>,
        lock_wait_max: Option<Duration>,
        noatime: bool,
    ) -> anyhow::Result<Inner> {
        let mut servers = Vec::new();
        let mut tables = Vec::new();
        for a in &addrs {
            let ch = wire::endpoint(a)?.connect_timeout(Duration::from_secs(1)).connect_lazy();
            tables.push(LocksClient::new(ch.clone()).max_decoding_message_size(64 << 20));
            servers.push(FilesClient::new(ch).max_decoding_message_size(80 << 20).max_encoding_message_size(80 << 20));
        }
        Ok(Inner {
            session,
            servers,
            tables,
            addrs,
            current: AtomicUsize::new(0),
            inodes: Mutex::new(Inodes::default()),
            handles: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            owners: Mutex::new(Owners::default()),
            interrupts: Mutex::new(Interrupts::default()),
            extents: Mutex::new(HashMap::new()),
            clock: AtomicU64::new(0),
            reads: Mutex::new(HashMap::new()),
            dirty: Mutex::new(HashMap::new()),
            sending: Mutex::new(HashMap::new()),
            ahead: Mutex::new(HashMap::new()),
            notifier: Mutex::new(None),
            expired: std::sync::atomic::AtomicBool::new(false),
            lock_wait_max,
            noatime,
            unlinked: Mutex::new(HashMap::new()),
        })
    }

    pub(crate) fn stats(&self) -> MountStats {
        MountStats {
            open_files: self.handles.lock().expect("handles").len() as u64,
            extent_locks: self.extents.lock().expect("extents").len() as u64,
            fcntl_locked_files: self.owners.lock().expect("owners").locked_files() as u64,
        }
    }

    /// The server the mount talks to now.
    pub(crate) fn server(&self) -> String {
        self.addrs[self.current.load(Ordering::Relaxed) % self.addrs.len()].clone()
    }

    /// Makes a Files call, moving to the next server while the one asked cannot serve.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: Fn(FilesClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = Instant::now() + FAILOVER;
        loop {
            let i = self.current.load(Ordering::Relaxed) % self.servers.len();
            match f(self.servers[i].clone()).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) if retry_elsewhere(&s) && Instant::now() < deadline => {
                    let _ = self.current.compare_exchange(i, i + 1, Ordering::Relaxed, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(s) => {
                    tracing::debug!("files call refused: {s}");
                    return Err(errno_of_status(&s));
                }
            }
        }
    }

    fn path(&self, ino: u64) -> Result<String> {
        self.inodes.lock().expect("inodes").path(ino).ok_or_else(|| errno(libc::ENOENT))
    }

    async fn lookup_path(&self, path: &str) -> Result<pb::Node> {
        let req = pb::PathRequest { path: path.to_string(), ino: 0 };
        let mut n = self
            .call(|mut c| {
                let req = req.clone();
                async move { c.lookup(req).await }
            })
            .await?;
        // Bytes written here and not sent yet count in the size the kernel sees.
        if let Some(d) = self.dirty.lock().expect("dirty").get(path) {
            n.size = n.size.max(d.end());
        }
        if let Some(q) = self.sending.lock().expect("sending").get(path) {
            n.size = q.iter().map(|w| w.end).fold(n.size, u64::max);
        }
        Ok(n)
    }

    /// Sends what was written to `path` and not sent yet, and waits for the writes on their way.
    /// Call under the file's extent mutex.
    async fn send_dirty(&self, path: &str) -> Result<()> {
        let sent = self.wait_sent(path, 0, 0..0).await;
        let d = self.dirty.lock().expect("dirty").remove(path);
        let last = match d {
            Some(d) => self.write_at(path, &d.token, d.start, Bytes::from(d.bytes)).await.map(|_| ()),
            None => Ok(()),
        };
        sent.and(last)
    }

    /// Waits for `path`'s writes on their way, oldest first, until at most `keep` are left and
    /// none overlaps `range`. Returns the first error among those waited for.
    async fn wait_sent(&self, path: &str, keep: usize, range: std::ops::Range<u64>) -> Result<()> {
        let mut out = Ok(());
        loop {
            let oldest = {
                let mut sending = self.sending.lock().expect("sending");
                let Some(q) = sending.get_mut(path) else { break };
                let overlaps = q.iter().any(|w| w.start < range.end && range.start < w.end);
                let w = if overlaps || q.len() > keep { Some(q.remove(0)) } else { None };
                if q.is_empty() {
                    sending.remove(path);
                }
                w
            };
            let Some(w) = oldest else { break };
            let r = w.task.await.unwrap_or_else(|e| {
                tracing::warn!("a write to {path} was lost: {e}");
                Err(errno(libc::EIO))
            });
            if out.is_ok() {
                out = r;
            }
        }
        out
    }

    /// Sends gathered bytes without waiting for the answer (at most [`WRITES_IN_FLIGHT`] on
    /// their way per file). Call under the file's extent mutex.
    async fn send_async(self: &Arc<Self>, path: &str, d: Dirty) -> Result<()> {
        let (start, end) = (d.start, d.end());
        self.wait_sent(path, WRITES_IN_FLIGHT - 1, start..end).await?;
        let inner = self.clone();
        let p = path.to_string();
        let task =
            tokio::spawn(async move { inner.write_at(&p, &d.token, d.start, Bytes::from(d.bytes)).await.map(|_| ()) });
        self.sending.lock().expect("sending").entry(path.to_string()).or_default().push(Sending { start, end, task });
        Ok(())
    }

    /// [`Inner::send_dirty`] under the file's extent mutex.
    async fn flush_path(&self, path: &str) -> Result<()> {
        if !self.dirty.lock().expect("dirty").contains_key(path)
            && !self.sending.lock().expect("sending").contains_key(path)
        {
            return Ok(());
        }
        let ext = self.extent(path);
        let _g = ext.lock().await;
        self.send_dirty(path).await
    }

    /// A write: gathered with the bytes before it if it continues them, else those are sent
    /// first; sent once WRITE_CHUNK bytes are gathered. Call under the file's extent mutex.
    async fn buffer_write(self: &Arc<Self>, path: &str, token: &str, at: u64, data: &[u8]) -> Result<()> {
        self.forget_reads(path);
        let before = {
            let mut dirty = self.dirty.lock().expect("dirty");
            match dirty.get(path) {
                Some(d) if d.token == token && d.end() == at => None,
                Some(_) => dirty.remove(path),
                None => None,
            }
        };
        if let Some(d) = before {
            self.send_async(path, d).await?;
        }
        let full = {
            let mut dirty = self.dirty.lock().expect("dirty");
            let d = dirty.entry(path.to_string()).or_insert_with(|| Dirty {
                token: token.to_string(),
                start: at,
                bytes: Vec::with_capacity(WRITE_CHUNK),
            });
            d.bytes.extend_from_slice(data);
            if d.bytes.len() >= WRITE_CHUNK { dirty.remove(path) } else { None }
        };
        if let Some(d) = full {
            self.send_async(path, d).await?;
        }
        Ok(())
    }

    /// The entry `ino` names now (its path, checked to still be the same entry).
    async fn node(&self, ino: u64) -> Result<(String, pb::Node)> {
        let path = self.path(ino)?;
        match self.lookup_path(&path).await {
            Ok(n) if ino == ROOT || fuse_ino(n.ino) == ino => return Ok((path, n)),
            Ok(_) => {}
            Err(e) if e == errno(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        // The path names another entry now, or none: renamed through another mount. Where
        // the entry is now, if it still is.
        let req = pb::PathRequest { path: String::new(), ino: entry_id(ino) };
        let found = self
            .call(|mut c| {
                let req = req.clone();
                async move { c.lookup(req).await }
            })
            .await;
        match found {
            Ok(n) if fuse_ino(n.ino) == ino => {
                tracing::debug!("inode {ino} moved from {path} to {} elsewhere", n.path);
                self.inodes.lock().expect("inodes").moved(ino, &n.path);
                let n = self.lookup_path(&n.path).await?;
                Ok((n.path.clone(), n))
            }
            _ => Err(errno(libc::ESTALE)),
        }
    }

    /// Runs `io` on the path of `ino`; when the path turns out not to name it any more (ESTALE
    /// from [`Inner::with_lock`]: renamed through another mount), finds where it is now and
    /// runs `io` once more there. Answers the path used too.
    async fn at_current_path<T, F, Fut>(&self, ino: u64, io: F) -> Result<(String, T)>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let path = self.path(ino)?;
        match io(path.clone()).await {
            Err(e) if e == errno(libc::ESTALE) => {
                let (path, _) = self.node(ino).await?;
                let out = io(path.clone()).await?;
                Ok((path, out))
            }
            other => other.map(|out| (path, out)),
        }
    }

    async fn change(&self, op: pb::name_change::Op) -> Result<pb::Node> {
        let req = pb::NameChange { op: Some(op) };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.change(req).await }
        })
        .await
    }

    fn entry(&self, path: &str, n: &pb::Node) -> ReplyEntry {
        self.inodes.lock().expect("inodes").looked_up(fuse_ino(n.ino), path);
        ReplyEntry { ttl: TTL, attr: attr_of(n), generation: 0 }
    }

    fn extent(&self, path: &str) -> Arc<tokio::sync::Mutex<Extent>> {
        self.extents.lock().expect("extents").entry(path.to_string()).or_default().clone()
    }

    /// Runs `io` under an extent lock of at least `want` on file `ino`, taking it if needed.
    async fn with_lock<T, F, Fut>(&self, ino: u64, path: &str, want: Mode, io: F) -> Result<T>
    where
        F: FnOnce(String, bool) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        if self.expired.load(Ordering::Relaxed) {
            tracing::warn!("EIO: the session expired; {path} is not written or read");
            return Err(errno(libc::EIO));
        }
        let ext = self.extent(path);
        loop {
            let mut g = ext.lock().await;
            g.used = self.clock.fetch_add(1, Ordering::Relaxed);
            if let Some(h) = &mut g.held
                && (h.mode == want || h.mode == Mode::PW || h.mode == Mode::EX)
            {
                h.ino = ino;
                let token = h.token.clone();
                let first_write = want == Mode::PW && !h.touched;
                let out = io(token, first_write).await;
                if first_write
                    && out.is_ok()
                    && let Some(h) = &mut g.held
                {
                    h.touched = true;
                }
                return out;
            }
            // Not held, or held too weakly (PR, to write): give back what is held, then ask.
            if let Some(old) = g.held.take() {
                let _ = self.session.release_now(old.lock).await;
            }
            drop(g);
            let grant = self
                .session
                .lock(path, 0..u64::MAX, want, LockOptions::default())
                .await
                .map_err(|e| errno_of_client(&e))?;
            tracing::debug!("extent {path}: {want:?} granted as lock {} token {}", grant.lock, grant.token);
            // Recorded before the cluster may revoke it: a revoke comes as soon as the lock is
            // cached if someone waits, and one that found no extent holding the lock would be
            // lost (the waiter would wait forever). Its handler waits for this mutex.
            let mut g = ext.lock().await;
            if let Some(old) = g.held.replace(Held {
                lock: grant.lock,
                mode: grant.mode,
                token: grant.signed_token,
                ino,
                touched: false,
            }) {
                let _ = self.session.release_now(old.lock).await;
            }
            if let Err(e) = self.session.keep_cached(grant.lock).await {
                g.held = None;
                let _ = self.session.release_now(grant.lock).await;
                return Err(errno_of_client(&e));
            }
            // A lock newly granted on a path may come after a rename through another mount
            // moved this file away (the rename held the path first): look again, past a read
            // barrier, before any I/O goes to the path. While the lock is cached it stays true:
            // renaming the path revokes the lock first.
            let names = match self.lookup_path(path).await {
                Ok(n) => ino == ROOT || fuse_ino(n.ino) == ino,
                Err(e) if e == errno(libc::ENOENT) => false,
                Err(e) => {
                    g.held = None;
                    let _ = self.session.release_now(grant.lock).await;
                    return Err(e);
                }
            };
            if !names {
                tracing::debug!("{path} no longer names inode {ino}; its lock goes back");
                g.held = None;
                let _ = self.session.release_now(grant.lock).await;
                return Err(errno(libc::ESTALE));
            }
            drop(g);
            self.trim_extents().await;
        }
    }

    /// Gives back the least recently used extent locks beyond [`EXTENTS_MAX`].
    async fn trim_extents(&self) {
        let over: Vec<(String, Arc<tokio::sync::Mutex<Extent>>)> = {
            let map = self.extents.lock().expect("extents");
            if map.len() <= EXTENTS_MAX {
                return;
            }
            let mut all: Vec<(u64, String, Arc<tokio::sync::Mutex<Extent>>)> =
                map.iter().filter_map(|(p, e)| e.try_lock().ok().map(|g| (g.used, p.clone(), e.clone()))).collect();
            all.sort_by_key(|(used, _, _)| *used);
            let n = map.len() - EXTENTS_MAX;
            all.into_iter().take(n).map(|(_, p, e)| (p, e)).collect()
        };
        for (path, e) in over {
            self.give_back(&path, &e).await;
            self.extents.lock().expect("extents").remove(&path);
        }
    }

    /// Gives back the extent lock of `ino` (after the I/O on it ends), then drops the kernel's
    /// pages of it.
    async fn give_back(&self, path: &str, ext: &tokio::sync::Mutex<Extent>) {
        let mut g = ext.lock().await;
        // What was written and not sent yet goes first, under the lock it was written under.
        if let Err(e) = self.send_dirty(path).await {
            tracing::warn!("writes to {path} not sent before its lock went back: {e}");
        }
        let held = g.held.take();
        drop(g);
        if let Some(h) = held {
            tracing::debug!("extent lock {} given back", h.lock);
            let _ = self.session.release_now(h.lock).await;
            self.inval(h.ino);
        }
    }

    fn inval(&self, ino: u64) {
        let notifier = self.notifier.lock().expect("notifier").clone();
        if let Some(n) = notifier {
            tokio::task::spawn_blocking(move || {
                if let Err(e) = n.inval_inode(ino) {
                    tracing::debug!("inval of inode {ino}: {e}");
                }
            });
        }
    }

    /// A revoke of lock `lock`: find the extent holding it and give it back.
    pub(crate) async fn revoked(&self, lock: u64) {
        let exts: Vec<(String, Arc<tokio::sync::Mutex<Extent>>)> =
            self.extents.lock().expect("extents").iter().map(|(p, e)| (p.clone(), e.clone())).collect();
        for (path, e) in exts {
            let mine = {
                let g = e.lock().await;
                g.held.as_ref().is_some_and(|h| h.lock == lock)
            };
            if mine {
                self.give_back(&path, &e).await;
                return;
            }
        }
    }

    pub(crate) fn expire(&self) {
        self.expired.store(true, Ordering::Relaxed);
    }

    /// Takes EX on each of `paths` (in order, so two renames cannot deadlock), after giving back
    /// this mount's own extent locks on them: every other mount's cached lock on those names
    /// is revoked before an entry there is removed or replaced, so none keeps writing with a
    /// token older than what the next file at that name accepts.
    async fn exclusive(&self, paths: &[&str]) -> Result<Vec<u64>> {
        let mut sorted: Vec<&str> = paths.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut held = Vec::new();
        for p in sorted {
            self.drop_extents(p).await;
            match self.session.lock(p, 0..u64::MAX, Mode::EX, LockOptions::default()).await {
                Ok(g) => held.push(g.lock),
                Err(e) => {
                    self.release_all(held).await;
                    return Err(errno_of_client(&e));
                }
            }
        }
        Ok(held)
    }

    /// Renames `from` to `to` in the namespace, with EX on both names around it, and moves this
    /// mount's inodes and extent locks along.
    async fn rename_path(&self, from: &str, to: &str, flags: u32) -> Result<()> {
        // A directory moves with what is under it: the locks other mounts keep on paths under
        // it are revoked first (their gathered writes sent under the old names), as for the
        // two names themselves.
        let mut names = vec![from.to_string(), to.to_string()];
        for dir in [from, to] {
            names.extend(self.locked_under(dir).await);
        }
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let held = self.exclusive(&names).await?;
        let out = self
            .change(pb::name_change::Op::Rename(pb::RenameRequest {
                from: from.to_string(),
                to: to.to_string(),
                flags,
            }))
            .await;
        self.release_all(held).await;
        out?;
        {
            let mut t = self.inodes.lock().expect("inodes");
            if flags & libc::RENAME_EXCHANGE != 0 {
                t.exchanged(from, to);
            } else {
                t.renamed(from, to);
            }
        }
        // Extent locks are on paths: this mount's under both names go back too.
        self.drop_extents(from).await;
        self.drop_extents(to).await;
        Ok(())
    }

    /// The paths under directory `dir` on which some session holds or awaits a lock, as the
    /// attached server's lock table shows them (at most [`LOCKED_UNDER_MAX`]; none if `dir` is
    /// not a directory or the table cannot be read).
    async fn locked_under(&self, dir: &str) -> Vec<String> {
        let prefix = format!("{}/", dir.trim_end_matches('/'));
        let i = self.current.load(Ordering::Relaxed) % self.tables.len();
        let mut c = self.tables[i].clone();
        let Ok(t) = c.table(pb::TableRequest { prefix: prefix.clone() }).await else {
            return Vec::new();
        };
        let mut out: Vec<String> =
            t.into_inner().resources.into_iter().map(|r| r.name).filter(|n| n.starts_with(&prefix)).collect();
        if out.len() > LOCKED_UNDER_MAX {
            tracing::warn!(
                "{} paths under {dir} are locked; only the first {LOCKED_UNDER_MAX} are revoked before it moves",
                out.len()
            );
            out.truncate(LOCKED_UNDER_MAX);
        }
        out
    }

    /// Removes `path` from the namespace, with EX on it around the change.
    async fn unlink_path(&self, path: &str) -> Result<()> {
        let held = self.exclusive(&[path]).await?;
        let out = self.change(pb::name_change::Op::Unlink(pb::PathRequest { path: path.to_string(), ino: 0 })).await;
        self.release_all(held).await;
        out.map(|_| ())
    }

    fn is_open(&self, ino: u64) -> bool {
        self.handles.lock().expect("handles").values().any(|h| h.ino == ino)
    }

    async fn release_all(&self, locks: Vec<u64>) {
        for l in locks {
            let _ = self.session.release_now(l).await;
        }
    }

    /// Gives back the extent locks on `path` and under it (it was renamed or removed through
    /// this mount).
    async fn drop_extents(&self, path: &str) {
        let under = format!("{path}/");
        let gone: Vec<(String, Arc<tokio::sync::Mutex<Extent>>)> = {
            let mut map = self.extents.lock().expect("extents");
            let keys: Vec<String> = map.keys().filter(|k| *k == path || k.starts_with(&under)).cloned().collect();
            keys.into_iter().filter_map(|k| map.remove(&k).map(|e| (k, e))).collect()
        };
        for (p, e) in gone {
            self.give_back(&p, &e).await;
        }
    }

    async fn touch(&self, path: &str, ino: u64) -> Result<()> {
        self.change(pb::name_change::Op::Setattr(pb::SetAttrRequest {
            path: path.to_string(),
            ino: entry_id(ino),
            touch: true,
            ..Default::default()
        }))
        .await
        .map(|_| ())
    }

    async fn read_at(&self, path: &str, token: String, offset: u64, size: u32) -> Result<Bytes> {
        let req = pb::GetRequest {
            path: path.to_string(),
            token,
            range: Some(pb::Range { start: offset, end: offset.saturating_add(u64::from(size)) }),
        };
        let deadline = Instant::now() + FAILOVER;
        loop {
            let i = self.current.load(Ordering::Relaxed) % self.servers.len();
            let mut c = self.servers[i].clone();
            let attempt = async {
                let mut s = c.get(req.clone()).await?.into_inner();
                let mut parts: Vec<Bytes> = Vec::new();
                while let Some(m) = s.next().await {
                    parts.push(m?.data);
                }
                Ok::<_, tonic::Status>(match parts.len() {
                    0 => Bytes::new(),
                    1 => parts.pop().expect("one part"),
                    _ => Bytes::from(parts.concat()),
                })
            };
            match attempt.await {
                Ok(out) => return Ok(out),
                Err(s) if retry_elsewhere(&s) && Instant::now() < deadline => {
                    let _ = self.current.compare_exchange(i, i + 1, Ordering::Relaxed, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(s) => return Err(errno_of_status(&s)),
            }
        }
    }

    /// A read served from the chunk fetched last under the same lock, or from a new chunk; a
    /// read that continues the chunk before it starts fetching the next one (read-ahead).
    async fn read_cached(self: &Arc<Self>, path: &str, token: String, offset: u64, size: u32) -> Result<Bytes> {
        self.send_dirty(path).await?;
        let end = offset.saturating_add(u64::from(size));
        let sequential_from = {
            let reads = self.reads.lock().expect("reads");
            match reads.get(path) {
                Some((t, start, bytes))
                    if *t == token
                        && *start <= offset
                        && (end <= start + bytes.len() as u64 || (bytes.len() as u64) < READ_CHUNK) =>
                {
                    let from = ((offset - start) as usize).min(bytes.len());
                    let to = ((end - start) as usize).min(bytes.len());
                    return Ok(bytes.slice(from..to));
                }
                Some((t, start, bytes)) if *t == token => Some(start + bytes.len() as u64),
                _ => None,
            }
        };
        let start = offset - offset % READ_CHUNK;
        let len = (end - start).div_ceil(READ_CHUNK) * READ_CHUNK;
        let ahead = {
            let mut ahead = self.ahead.lock().expect("ahead");
            match ahead.remove(path) {
                Some(a) if a.token == token && a.start == start && len == READ_CHUNK => Some(a.task),
                Some(a) => {
                    a.task.abort();
                    None
                }
                None => None,
            }
        };
        let fetched = match ahead {
            Some(task) => task.await.ok().and_then(|r| r.ok()),
            None => None,
        };
        let bytes = match fetched {
            Some(b) => b,
            None => self.read_at(path, token.clone(), start, len as u32).await?,
        };
        let from = ((offset - start) as usize).min(bytes.len());
        let to = ((end - start) as usize).min(bytes.len());
        let out = bytes.slice(from..to);
        let next = start + bytes.len() as u64;
        let full = bytes.len() as u64 == len;
        {
            let mut reads = self.reads.lock().expect("reads");
            if reads.len() >= READ_CACHE_FILES {
                reads.clear();
                for (_, a) in self.ahead.lock().expect("ahead").drain() {
                    a.task.abort();
                }
            }
            reads.insert(path.to_string(), (token.clone(), start, bytes));
        }
        if full && (start == 0 || sequential_from == Some(start)) {
            let inner = self.clone();
            let p = path.to_string();
            let t = token.clone();
            let task = tokio::spawn(async move { inner.read_at(&p, t, next, READ_CHUNK as u32).await });
            self.ahead.lock().expect("ahead").insert(path.to_string(), Ahead { token, start: next, task });
        }
        Ok(out)
    }

    fn forget_reads(&self, path: &str) {
        self.reads.lock().expect("reads").remove(path);
        if let Some(a) = self.ahead.lock().expect("ahead").remove(path) {
            a.task.abort();
        }
    }

    async fn write_at(&self, path: &str, token: &str, offset: u64, data: Bytes) -> Result<u64> {
        self.forget_reads(path);
        let req = pb::WriteRequest { path: path.to_string(), token: token.to_string(), offset, data };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.write(req).await }
        })
        .await
        .map(|r| r.size)
    }

    /// Sets the size of file `ino`: a shrink zeroes what it cuts off first (under the write
    /// lock), so a later growth reads zeros there.
    async fn truncate(&self, ino: u64, path: &str, size: u64) -> Result<()> {
        self.with_lock(ino, path, Mode::PW, |token, _| async move {
            self.send_dirty(path).await?;
            let n = self.lookup_path(path).await?;
            let mut at = size;
            while at < n.size {
                let len = (n.size - at).min(ZERO_CHUNK);
                self.write_at(path, &token, at, Bytes::from(vec![0; len as usize])).await?;
                at += len;
            }
            self.forget_reads(path);
            self.change(pb::name_change::Op::Setattr(pb::SetAttrRequest {
                path: path.to_string(),
                ino: entry_id(ino),
                size: Some(size),
                ..Default::default()
            }))
            .await
            .map(|_| ())
        })
        .await
    }

    async fn unlock_owner(&self, owner: u64, ino: u64) {
        let _ = self.session.posix(owner, &posix::resource(entry_id(ino)), 0..u64::MAX, PosixKind::Unlock, false).await;
    }

    async fn list_dir(&self, path: &str) -> Result<Vec<pb::Node>> {
        let mut out = Vec::new();
        let mut after = String::new();
        loop {
            let req = pb::ReadDirRequest { path: path.to_string(), after: after.clone(), limit: 0 };
            let page = self
                .call(|mut c| {
                    let req = req.clone();
                    async move { c.read_dir(req).await }
                })
                .await?;
            let more = page.more;
            if let Some(last) = page.nodes.last() {
                after = last.path.rsplit('/').next().unwrap_or_default().to_string();
            }
            out.extend(page.nodes);
            if !more {
                return Ok(out);
            }
        }
    }
}

/// Watches the session's events: revokes give extent locks back; expiry fails later I/O.
pub(crate) async fn watch_events(inner: Arc<Inner>) {
    let mut events = inner.session.events();
    loop {
        match events.recv().await {
            Ok(Event::Revoke { lock }) => {
                let inner = inner.clone();
                tokio::spawn(async move { inner.revoked(lock).await });
            }
            Ok(Event::Expired) => {
                tracing::warn!("the mount's session expired: I/O on its files fails with EIO; mount again");
                inner.expire();
            }
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!("{n} session events were missed");
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

impl Filesystem for StripeFs {
    async fn init(&self, _req: Request) -> Result<ReplyInit> {
        Ok(ReplyInit::new(NonZeroU32::new(MAX_WRITE).expect("non-zero")))
    }

    async fn destroy(&self, _req: Request) {}

    async fn lookup(&self, _req: Request, parent: u64, name: &OsStr) -> Result<ReplyEntry> {
        let path = join(&self.inner.path(parent)?, name)?;
        let n = self.inner.lookup_path(&path).await?;
        Ok(self.inner.entry(&path, &n))
    }

    async fn forget(&self, _req: Request, inode: u64, nlookup: u64) {
        self.inner.inodes.lock().expect("inodes").forget(inode, nlookup);
    }

    async fn batch_forget(&self, _req: Request, inodes: &[(u64, u64)]) {
        let mut t = self.inner.inodes.lock().expect("inodes");
        for (i, n) in inodes {
            t.forget(*i, *n);
        }
    }

    async fn getattr(&self, _req: Request, inode: u64, _fh: Option<u64>, _flags: u32) -> Result<ReplyAttr> {
        let (_, n) = self.inner.node(inode).await?;
        let mut attr = attr_of(&n);
        if self.inner.unlinked.lock().expect("unlinked").contains_key(&inode) {
            // Unlinked while open here: no name links to it any more.
            attr.nlink = 0;
        }
        Ok(ReplyAttr { ttl: TTL, attr })
    }

    async fn setattr(&self, _req: Request, inode: u64, _fh: Option<u64>, set: SetAttr) -> Result<ReplyAttr> {
        let (path, n) = self.inner.node(inode).await?;
        if let Some(size) = set.size {
            if kind_of(&n) != FileType::RegularFile {
                return Err(errno(if kind_of(&n) == FileType::Directory { libc::EISDIR } else { libc::EINVAL }));
            }
            self.inner.truncate(inode, &path, size).await?;
        }
        let rest =
            set.mode.is_some() || set.uid.is_some() || set.gid.is_some() || set.atime.is_some() || set.mtime.is_some();
        let n = if rest || set.ctime.is_some() {
            self.inner
                .change(pb::name_change::Op::Setattr(pb::SetAttrRequest {
                    path: path.clone(),
                    ino: entry_id(inode),
                    mode: set.mode,
                    uid: set.uid,
                    gid: set.gid,
                    atime_ns: set.atime.map(ns_of),
                    mtime_ns: set.mtime.map(ns_of),
                    size: None,
                    touch: false,
                }))
                .await?
        } else {
            self.inner.lookup_path(&path).await?
        };
        Ok(ReplyAttr { ttl: TTL, attr: attr_of(&n) })
    }

    async fn readlink(&self, _req: Request, inode: u64) -> Result<ReplyData> {
        let (_, n) = self.inner.node(inode).await?;
        if kind_of(&n) != FileType::Symlink {
            return Err(errno(libc::EINVAL));
        }
        Ok(ReplyData { data: Bytes::from(n.target.into_bytes()) })
    }

    async fn symlink(&self, req: Request, parent: u64, name: &OsStr, link: &OsStr) -> Result<ReplyEntry> {
        let path = join(&self.inner.path(parent)?, name)?;
        let target = link.to_str().ok_or_else(|| errno(libc::EINVAL))?.to_string();
        let n = self
            .inner
            .change(pb::name_change::Op::Symlink(pb::MakeNode {
                path: path.clone(),
                mode: 0o777,
                uid: req.uid,
                gid: req.gid,
                target,
                rdev: 0,
            }))
            .await?;
        Ok(self.inner.entry(&path, &n))
    }

    async fn mknod(&self, req: Request, parent: u64, name: &OsStr, mode: u32, rdev: u32) -> Result<ReplyEntry> {
        let path = join(&self.inner.path(parent)?, name)?;
        let node = pb::MakeNode {
            path: path.clone(),
            mode: mode & 0o7777,
            uid: req.uid,
            gid: req.gid,
            target: String::new(),
            rdev: 0,
        };
        let op = match mode & libc::S_IFMT {
            0 | libc::S_IFREG => pb::name_change::Op::Create(node),
            // FIFOs, sockets and devices are entries without data; the kernel opens them
            // locally (a FIFO's bytes never reach the cluster).
            t @ (libc::S_IFIFO | libc::S_IFSOCK | libc::S_IFCHR | libc::S_IFBLK) => {
                pb::name_change::Op::Mknod(pb::MakeNode { mode: t | (mode & 0o7777), rdev: u64::from(rdev), ..node })
            }
            _ => return Err(errno(libc::EINVAL)),
        };
        let n = self.inner.change(op).await?;
        Ok(self.inner.entry(&path, &n))
    }

    async fn mkdir(&self, req: Request, parent: u64, name: &OsStr, mode: u32, umask: u32) -> Result<ReplyEntry> {
        let dir = self.inner.path(parent)?;
        let path = join(&dir, name)?;
        let n = self
            .inner
            .change(pb::name_change::Op::Mkdir(pb::MakeNode {
                path: path.clone(),
                mode: mode & !umask & 0o7777,
                uid: req.uid,
                gid: req.gid,
                target: String::new(),
                rdev: 0,
            }))
            .await?;
        Ok(self.inner.entry(&path, &n))
    }

    async fn unlink(&self, _req: Request, parent: u64, name: &OsStr) -> Result<()> {
        let dir = self.inner.path(parent)?;
        let path = join(&dir, name)?;
        // A file open through this mount stays readable and writable through its open files
        // until the last is closed, as POSIX has it: it is renamed out of the way instead (NFS's
        // "silly rename", with the same limit: opens through other mounts lose it).
        if let Ok(n) = self.inner.lookup_path(&path).await
            && kind_of(&n) == FileType::RegularFile
            && self.inner.is_open(fuse_ino(n.ino))
        {
            let hidden = join(&dir, OsStr::new(&format!("{UNLINKED_PREFIX}{:x}", n.ino)))?;
            self.inner.rename_path(&path, &hidden, 0).await?;
            self.inner.unlinked.lock().expect("unlinked").insert(fuse_ino(n.ino), hidden);
            return Ok(());
        }
        self.inner.unlink_path(&path).await
    }

    async fn rmdir(&self, _req: Request, parent: u64, name: &OsStr) -> Result<()> {
        let path = join(&self.inner.path(parent)?, name)?;
        self.inner.change(pb::name_change::Op::Rmdir(pb::PathRequest { path, ino: 0 })).await.map(|_| ())
    }

    async fn rename(&self, req: Request, parent: u64, name: &OsStr, new_parent: u64, new_name: &OsStr) -> Result<()> {
        self.rename2(req, parent, name, new_parent, new_name, 0).await
    }

    async fn rename2(
        &self,
        _req: Request,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: u32,
    ) -> Result<()> {
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 {
            // RENAME_WHITEOUT is for overlay file systems.
            return Err(errno(libc::EINVAL));
        }
        let from = join(&self.inner.path(parent)?, name)?;
        let to = join(&self.inner.path(new_parent)?, new_name)?;
        self.inner.rename_path(&from, &to, flags).await
    }

    async fn link(&self, _req: Request, _inode: u64, _new_parent: u64, _new_name: &OsStr) -> Result<ReplyEntry> {
        // Hard links are not kept by the namespace (an entry is one path).
        Err(errno(libc::EPERM))
    }

    async fn open(&self, _req: Request, inode: u64, flags: u32) -> Result<ReplyOpen> {
        // Close-to-open across mounts: the server this mount asks may not have applied a
        // rename made through another one yet, but a lock on the path is granted only after
        // every conflicting change there (a rename or unlink takes EX on its names). So take the
        // read lock (kept for the reads that follow), then look again: a path that names another
        // entry now answers ESTALE, and the kernel looks the name up again.
        if let Ok(path) = self.inner.path(inode)
            && self.inner.lookup_path(&path).await.is_ok_and(|n| kind_of(&n) == FileType::RegularFile)
        {
            self.inner.with_lock(inode, &path, Mode::PR, |_, _| async { Ok(()) }).await?;
        }
        let (path, n) = self.inner.node(inode).await?;
        match kind_of(&n) {
            FileType::Directory => return Err(errno(libc::EISDIR)),
            FileType::RegularFile => {}
            _ => return Err(errno(libc::EINVAL)),
        }
        if flags & libc::O_TRUNC as u32 != 0 && flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32 {
            self.inner.truncate(inode, &path, 0).await?;
        }
        let atime_due = !self.inner.noatime && atime_due(&n, now_ns());
        let fh = self.inner.next_fh.fetch_add(1, Ordering::Relaxed);
        self.inner
            .handles
            .lock()
            .expect("handles")
            .insert(fh, Handle { ino: inode, flags, owners: BTreeSet::new(), wrote: false, atime_due });
        // No FOPEN_KEEP_CACHE: the kernel drops the file's pages at every open (close-to-open).
        Ok(ReplyOpen { fh, flags: 0 })
    }

    async fn create(&self, req: Request, parent: u64, name: &OsStr, mode: u32, flags: u32) -> Result<ReplyCreated> {
        let path = join(&self.inner.path(parent)?, name)?;
        let made = self
            .inner
            .change(pb::name_change::Op::Create(pb::MakeNode {
                path: path.clone(),
                mode: mode & 0o7777,
                uid: req.uid,
                gid: req.gid,
                target: String::new(),
                rdev: 0,
            }))
            .await;
        let n = match made {
            Ok(n) => n,
            // Made meanwhile through another mount: without O_EXCL, open it.
            Err(e) if e == errno(libc::EEXIST) && flags & libc::O_EXCL as u32 == 0 => {
                let n = self.inner.lookup_path(&path).await?;
                if kind_of(&n) != FileType::RegularFile {
                    return Err(errno(libc::EISDIR));
                }
                if flags & libc::O_TRUNC as u32 != 0 {
                    self.inner.truncate(fuse_ino(n.ino), &path, 0).await?;
                }
                self.inner.lookup_path(&path).await?
            }
            Err(e) => return Err(e),
        };
        let entry = self.inner.entry(&path, &n);
        let fh = self.inner.next_fh.fetch_add(1, Ordering::Relaxed);
        self.inner.handles.lock().expect("handles").insert(
            fh,
            Handle {
                ino: entry.attr.ino,
                flags,
                owners: BTreeSet::new(),
                wrote: false,
                atime_due: !self.inner.noatime,
            },
        );
        Ok(ReplyCreated { ttl: TTL, attr: entry.attr, generation: 0, fh, flags: 0 })
    }

    async fn read(&self, _req: Request, inode: u64, fh: u64, offset: u64, size: u32) -> Result<ReplyData> {
        let inner = &self.inner;
        let (path, data) = inner
            .at_current_path(inode, |path| async move {
                let p = path.clone();
                inner
                    .with_lock(inode, &path, Mode::PR, |token, _| async move {
                        inner.read_cached(&p, token, offset, size).await
                    })
                    .await
            })
            .await?;
        let access =
            self.inner.handles.lock().expect("handles").get_mut(&fh).is_some_and(|h| std::mem::take(&mut h.atime_due));
        if access
            && let Err(e) = self
                .inner
                .change(pb::name_change::Op::Access(pb::PathRequest { path: path.clone(), ino: entry_id(inode) }))
                .await
        {
            tracing::warn!("the atime of {path} was not moved: {e:?}");
        }
        Ok(ReplyData { data })
    }

    async fn write(
        &self,
        _req: Request,
        inode: u64,
        fh: u64,
        offset: u64,
        data: &[u8],
        _write_flags: u32,
        flags: u32,
    ) -> Result<ReplyWrite> {
        let append = flags & libc::O_APPEND as u32 != 0
            || self
                .inner
                .handles
                .lock()
                .expect("handles")
                .get(&fh)
                .is_some_and(|h| h.flags & libc::O_APPEND as u32 != 0);
        let inner = &self.inner;
        inner
            .at_current_path(inode, |path| async move {
                let p = path.clone();
                inner
                    .with_lock(inode, &path, Mode::PW, |token, first| async move {
                        // O_APPEND writes at the end as the cluster knows it, under the write lock.
                        let at = if append { inner.lookup_path(&p).await?.size } else { offset };
                        // A write to a stub recalls only the rows it touches (at the server).
                        inner.buffer_write(&p, &token, at, data).await?;
                        if first {
                            inner.touch(&p, inode).await?;
                        }
                        Ok(())
                    })
                    .await
            })
            .await?;
        if let Some(h) = self.inner.handles.lock().expect("handles").get_mut(&fh) {
            h.wrote = true;
        }
        Ok(ReplyWrite { written: data.len() as u32 })
    }

    async fn statfs(&self, _req: Request, _inode: u64) -> Result<ReplyStatFs> {
        let r = self.inner.call(|mut c| async move { c.stat_fs(pb::StatFsRequest {}).await }).await?;
        let bsize = 4096u64;
        Ok(ReplyStatFs {
            blocks: r.total_bytes / bsize,
            bfree: r.free_bytes / bsize,
            bavail: r.free_bytes / bsize,
            files: r.entries_max,
            ffree: r.entries_max.saturating_sub(r.entries),
            bsize: bsize as u32,
            namelen: NAME_MAX as u32,
            frsize: bsize as u32,
        })
    }

    async fn release(
        &self,
        _req: Request,
        inode: u64,
        fh: u64,
        _flags: u32,
        _lock_owner: u64,
        _flush: bool,
    ) -> Result<()> {
        if let Ok(path) = self.inner.path(inode)
            && let Err(e) = self.inner.flush_path(&path).await
        {
            tracing::warn!("writes to {path} could not be stored at its last close: {e}");
        }
        let h = self.inner.handles.lock().expect("handles").remove(&fh);
        if let Some(h) = h {
            // OFD locks taken through this open file end with it.
            for owner in h.owners {
                if self.inner.owners.lock().expect("owners").drop_file(owner, inode) {
                    self.inner.unlock_owner(owner, inode).await;
                }
            }
            if h.wrote
                && let Ok(path) = self.inner.path(inode)
            {
                let _ = self.inner.touch(&path, inode).await;
            }
        }
        // The last close of a file unlinked while open removes it.
        if !self.inner.is_open(inode) {
            let hidden = self.inner.unlinked.lock().expect("unlinked").remove(&inode);
            if let Some(hidden) = hidden
                && let Err(e) = self.inner.unlink_path(&hidden).await
            {
                tracing::warn!("{hidden}, unlinked while open, could not be removed at its last close: {e}");
            }
        }
        Ok(())
    }

    async fn fsync(&self, _req: Request, inode: u64, _fh: u64, _datasync: bool) -> Result<()> {
        // Gathered writes are sent; the storage servers sync every write before answering it.
        let path = self.inner.path(inode)?;
        self.inner.flush_path(&path).await
    }

    async fn flush(&self, _req: Request, inode: u64, fh: u64, lock_owner: u64) -> Result<()> {
        // close(2) reports a write that could not be stored.
        let sent = match self.inner.path(inode) {
            Ok(path) => self.inner.flush_path(&path).await,
            Err(_) => Ok(()),
        };
        // close(2) of any descriptor drops the process's fcntl locks on the file.
        let owner = self.inner.owners.lock().expect("owners").known(lock_owner);
        if let Some(owner) = owner
            && self.inner.owners.lock().expect("owners").drop_file(owner, inode)
        {
            self.inner.unlock_owner(owner, inode).await;
        }
        let wrote = self.inner.handles.lock().expect("handles").get_mut(&fh).map(|h| std::mem::take(&mut h.wrote));
        if wrote == Some(true)
            && let Ok(path) = self.inner.path(inode)
        {
            self.inner.touch(&path, inode).await?;
        }
        sent
    }

    async fn opendir(&self, _req: Request, inode: u64, _flags: u32) -> Result<ReplyOpen> {
        let (path, n) = self.inner.node(inode).await?;
        if kind_of(&n) != FileType::Directory {
            return Err(errno(libc::ENOTDIR));
        }
        let nodes = self.inner.list_dir(&path).await?;
        let mut entries = vec![
            (inode, FileType::Directory, OsString::from("."), None),
            (ROOT, FileType::Directory, OsString::from(".."), None),
        ];
        for n in nodes {
            let name = n.path.rsplit('/').next().unwrap_or_default().to_string();
            entries.push((fuse_ino(n.ino), kind_of(&n), OsString::from(name), Some(n)));
        }
        let fh = self.inner.next_fh.fetch_add(1, Ordering::Relaxed);
        self.inner.dirs.lock().expect("dirs").insert(fh, DirHandle { entries });
        Ok(ReplyOpen { fh, flags: 0 })
    }

    async fn readdir<'a>(
        &'a self,
        _req: Request,
        _parent: u64,
        fh: u64,
        offset: i64,
    ) -> Result<ReplyDirectory<impl Stream<Item = Result<DirectoryEntry>> + Send + 'a>> {
        let entries: Vec<Result<DirectoryEntry>> = {
            let dirs = self.inner.dirs.lock().expect("dirs");
            let d = dirs.get(&fh).ok_or_else(|| errno(libc::EBADF))?;
            d.entries
                .iter()
                .enumerate()
                .skip(offset.max(0) as usize)
                .map(|(i, (ino, kind, name, _))| {
                    Ok(DirectoryEntry { inode: *ino, kind: *kind, name: name.clone(), offset: i as i64 + 1 })
                })
                .collect()
        };
        Ok(ReplyDirectory { entries: stream::iter(entries) })
    }

    async fn readdirplus<'a>(
        &'a self,
        _req: Request,
        parent: u64,
        fh: u64,
        offset: u64,
        _lock_owner: u64,
    ) -> Result<ReplyDirectoryPlus<impl Stream<Item = Result<DirectoryEntryPlus>> + Send + 'a>> {
        let entries = {
            let dirs = self.inner.dirs.lock().expect("dirs");
            let d = dirs.get(&fh).ok_or_else(|| errno(libc::EBADF))?;
            let entries: Vec<(usize, u64, FileType, OsString, Option<pb::Node>)> = d
                .entries
                .iter()
                .enumerate()
                .skip(offset as usize)
                .map(|(i, (ino, kind, name, node))| (i, *ino, *kind, name.clone(), node.clone()))
                .collect();
            entries
        };
        let dir_attr = match self.inner.node(parent).await {
            Ok((_, n)) => attr_of(&n),
            Err(e) => return Err(e),
        };
        let mut out = Vec::with_capacity(entries.len());
        for (i, ino, kind, name, node) in entries {
            let attr = match &node {
                Some(n) => {
                    // A READDIRPLUS entry counts as a lookup of it.
                    self.inner.inodes.lock().expect("inodes").looked_up(ino, &n.path);
                    attr_of(n)
                }
                None => FileAttr { ino, ..dir_attr },
            };
            out.push(Ok(DirectoryEntryPlus {
                inode: ino,
                generation: 0,
                kind,
                name,
                offset: i as i64 + 1,
                attr,
                entry_ttl: TTL,
                attr_ttl: TTL,
            }));
        }
        Ok(ReplyDirectoryPlus { entries: stream::iter(out) })
    }

    async fn releasedir(&self, _req: Request, _inode: u64, fh: u64, _flags: u32) -> Result<()> {
        self.inner.dirs.lock().expect("dirs").remove(&fh);
        Ok(())
    }

    async fn fsyncdir(&self, _req: Request, _inode: u64, _fh: u64, _datasync: bool) -> Result<()> {
        Ok(())
    }

    async fn access(&self, _req: Request, inode: u64, _mask: u32) -> Result<()> {
        // The kernel checks permissions itself (default_permissions); only existence is ours.
        self.inner.node(inode).await.map(|_| ())
    }

    #[allow(clippy::too_many_arguments)]
    async fn getlk(
        &self,
        req: Request,
        inode: u64,
        _fh: u64,
        lock_owner: u64,
        start: u64,
        end: u64,
        r#type: u32,
        _pid: u32,
    ) -> Result<ReplyLock> {
        let kind = match r#type as i32 {
            libc::F_RDLCK => PosixKind::Read,
            libc::F_WRLCK => PosixKind::Write,
            _ => return Err(errno(libc::EINVAL)),
        };
        let owner = self.inner.owners.lock().expect("owners").owner(lock_owner, req.pid);
        let range = posix::range_of(start, end);
        let out = self
            .inner
            .session
            .posix_test(owner, &posix::resource(entry_id(inode)), range, kind)
            .await
            .map_err(|e| errno_of_client(&e))?;
        Ok(match out {
            PosixOutcome::Busy { owner, range, kind, .. } => ReplyLock {
                start: range.start,
                end: posix::kernel_end(&range),
                r#type: if kind == PosixKind::Write { libc::F_WRLCK } else { libc::F_RDLCK } as u32,
                pid: posix::pid_of(owner),
            },
            _ => ReplyLock { start, end, r#type: libc::F_UNLCK as u32, pid: 0 },
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn setlk(
        &self,
        req: Request,
        inode: u64,
        fh: u64,
        lock_owner: u64,
        start: u64,
        end: u64,
        r#type: u32,
        pid: u32,
        block: bool,
    ) -> Result<()> {
        let resource = posix::resource(entry_id(inode));
        let range = posix::range_of(start, end);
        let kind = match r#type as i32 {
            libc::F_RDLCK => PosixKind::Read,
            libc::F_WRLCK => PosixKind::Write,
            libc::F_UNLCK => {
                let owner = self.inner.owners.lock().expect("owners").known(lock_owner);
                if let Some(owner) = owner {
                    self.inner
                        .session
                        .posix(owner, &resource, range, PosixKind::Unlock, false)
                        .await
                        .map_err(|e| errno_of_client(&e))?;
                }
                return Ok(());
            }
            _ => return Err(errno(libc::EINVAL)),
        };
        let owner = self.inner.owners.lock().expect("owners").owner(lock_owner, if pid == 0 { req.pid } else { pid });
        // Noted before asking: a FLUSH racing the grant must find it.
        self.inner.owners.lock().expect("owners").took(owner, inode);
        if let Some(h) = self.inner.handles.lock().expect("handles").get_mut(&fh) {
            h.owners.insert(owner);
        }
        let mut was_interrupted = false;
        let out = if block {
            let mut interrupted = self.inner.interrupts.lock().expect("interrupts").register(req.unique);
            let limit = self.inner.lock_wait_max;
            let ask = self.inner.session.posix_waiting_at_most(owner, &resource, range, kind, true, limit);
            tokio::pin!(ask);
            let out = tokio::select! {
                out = &mut ask => out,
                _ = &mut interrupted => {
                    was_interrupted = true;
                    // Interrupted (a signal, or the process is dying): stop waiting. A grant that
                    // raced the cancel stands; the caller then holds the lock it asked for.
                    let _ = self.inner.session.posix_cancel(owner, &resource).await;
                    ask.await
                }
            };
            self.inner.interrupts.lock().expect("interrupts").done(req.unique);
            out
        } else {
            self.inner.session.posix(owner, &resource, range, kind, false).await
        };
        match out.map_err(|e| errno_of_client(&e))? {
            PosixOutcome::Granted => Ok(()),
            PosixOutcome::Busy { .. } => Err(errno(libc::EAGAIN)),
            PosixOutcome::Deadlock => Err(errno(libc::EDEADLK)),
            PosixOutcome::Cancelled if was_interrupted => Err(errno(libc::EINTR)),
            // Not by a signal here: the cluster ended the wait at `--lock-wait-max`.
            PosixOutcome::Cancelled => {
                tracing::info!("ENOLCK: owner {owner} waited {:?}, the longest allowed", self.inner.lock_wait_max);
                Err(errno(libc::ENOLCK))
            }
            other => {
                tracing::warn!("EIO: a lock request of owner {owner} was answered {other:?}");
                Err(errno(libc::EIO))
            }
        }
    }

    async fn interrupt(&self, _req: Request, unique: u64) -> Result<()> {
        self.inner.interrupts.lock().expect("interrupts").interrupt(unique, Instant::now());
        Ok(())
    }

    async fn fallocate(
        &self,
        _req: Request,
        _inode: u64,
        _fh: u64,
        _offset: u64,
        _length: u64,
        _mode: u32,
    ) -> Result<()> {
        Err(errno(libc::EOPNOTSUPP))
    }
}
