//! The Raft log, vote, commit point and snapshots, persisted in one redb database per server.
//!
//! `append` commits the entries without waiting for the disk, so they are readable and the leader
//! can send them to followers at once; one flusher thread then makes them durable and only then
//! tells openraft they are flushed. Appends that arrive while a flush runs share the next one
//! (group commit), and a leader's flush overlaps its followers' instead of preceding them. The
//! vote, truncation and purge commit durably before they return.
//!
//! Every record is versioned (`codec`); the database's own layout version (its tables and keys)
//! is the `format` key. Both are drawn in docs/formats.md.

use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;

use openraft::OptionalSend;
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::type_config::alias::{EntryOf, LogIdOf, SnapshotMetaOf, VoteOf};
use redb::{Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::{Format, Record};
use crate::types::{C, io_error};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log_v1");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta_v1");

/// Keys of `META`.
const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "last_purged";
const SNAPSHOT_META: &str = "snapshot_meta";
/// The snapshot's bytes as the state machine made them (a record of their own).
const SNAPSHOT_DATA: &str = "snapshot_data";
/// The layout version of the database (its tables and keys, and that every record is versioned),
/// as ASCII decimal digits: what builds before 2 also read (as JSON), so they refuse this layout
/// with their own message. A database of another layout is refused.
const LAYOUT: &str = "format";
const LAYOUT_VERSION: u64 = 2;

/// A database this build cannot open.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "{name} has database layout version {found}; this stripelock reads layout version {LAYOUT_VERSION}: {}",
        if *found > LAYOUT_VERSION {
            "it was written by a newer stripelock; upgrade this server"
        } else {
            "it holds the JSON records of a stripelock from before versioned binary formats, which this one does not read"
        }
    )]
    Version { name: String, found: u64 },
    #[error("{name} has an unreadable database layout version {found:?}")]
    Unreadable { name: String, found: Vec<u8> },
}

#[derive(Clone)]
pub struct Store {
    db: Arc<redb::Database>,
    /// To the flusher thread; `None` for a database whose commits are durable at once.
    flushes: Option<std::sync::mpsc::Sender<IOFlushed<C>>>,
    /// The record format written and read: `Format::CURRENT`, but in tests that play a build of
    /// another version.
    format: Format,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl Store {
    pub fn open(path: &Path) -> io::Result<Store> {
        let db = Arc::new(redb::Database::create(path).map_err(io_error)?);
        let (flushes, pending) = std::sync::mpsc::channel();
        let flusher_db = db.clone();
        std::thread::Builder::new().name("raft-log-flush".into()).spawn(move || flusher(&flusher_db, &pending))?;
        Store::init(Store { db, flushes: Some(flushes), format: Format::CURRENT }, &path.display().to_string())
    }

    /// A store in a database the caller keeps (an in-memory one in the simulation, which lives
    /// on across a simulated crash): appends are reported flushed as soon as they commit.
    pub fn in_memory(db: Arc<redb::Database>) -> io::Result<Store> {
        Store::init(Store { db, flushes: None, format: Format::CURRENT }, "the in-memory database")
    }

    fn init(store: Store, name: &str) -> io::Result<Store> {
        let tx = store.db.begin_write().map_err(io_error)?;
        tx.open_table(LOG).map_err(io_error)?;
        tx.open_table(META).map_err(io_error)?;
        tx.commit().map_err(io_error)?;
        match store.raw(LAYOUT)? {
            None => store.put_raw(LAYOUT, LAYOUT_VERSION.to_string().as_bytes(), Durability::Immediate)?,
            Some(bytes) => {
                let name = name.to_string();
                let found: u64 = std::str::from_utf8(&bytes)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| LayoutError::Unreadable { name: name.clone(), found: bytes.clone() })
                    .map_err(io::Error::other)?;
                if found != LAYOUT_VERSION {
                    return Err(io::Error::other(LayoutError::Version { name, found }));
                }
            }
        }
        Ok(store)
    }

    /// The same database read and written as a build of another record format would (tests).
    #[cfg(test)]
    pub(crate) fn with_format(self, format: Format) -> Store {
        Store { format, ..self }
    }

    fn raw(&self, key: &str) -> io::Result<Option<Vec<u8>>> {
        let tx = self.db.begin_read().map_err(io_error)?;
        let table = tx.open_table(META).map_err(io_error)?;
        Ok(table.get(key).map_err(io_error)?.map(|v| v.value().to_vec()))
    }

    fn put_raw(&self, key: &str, bytes: &[u8], durability: Durability) -> io::Result<()> {
        let mut tx = self.db.begin_write().map_err(io_error)?;
        tx.set_durability(durability).map_err(io_error)?;
        tx.open_table(META).map_err(io_error)?.insert(key, bytes).map_err(io_error)?;
        tx.commit().map_err(io_error)
    }

    fn get<T: DeserializeOwned>(&self, key: &str, what: Record) -> io::Result<Option<T>> {
        match self.raw(key)? {
            None => Ok(None),
            Some(bytes) => Ok(Some(self.format.decode(what, &bytes)?)),
        }
    }

    fn put<T: Serialize>(&self, key: &str, what: Record, value: &T, durability: Durability) -> io::Result<()> {
        self.put_raw(key, &self.format.encode(what, value)?, durability)
    }

    /// The last snapshot persisted: its meta and bytes.
    pub fn snapshot(&self) -> io::Result<Option<(SnapshotMetaOf<C>, Vec<u8>)>> {
        let tx = self.db.begin_read().map_err(io_error)?;
        let table = tx.open_table(META).map_err(io_error)?;
        let (Some(meta), Some(data)) =
            (table.get(SNAPSHOT_META).map_err(io_error)?, table.get(SNAPSHOT_DATA).map_err(io_error)?)
        else {
            return Ok(None);
        };
        let meta = self.format.decode(Record::SnapshotMeta, meta.value())?;
        Ok(Some((meta, data.value().to_vec())))
    }

    /// Persists a snapshot before openraft may purge the log it covers: its meta as a record,
    /// and its bytes as they are (they are a versioned record already), in one transaction.
    pub fn save_snapshot(&self, meta: &SnapshotMetaOf<C>, bytes: &[u8]) -> io::Result<()> {
        let meta = self.format.encode(Record::SnapshotMeta, meta)?;
        let tx = self.db.begin_write().map_err(io_error)?;
        {
            let mut table = tx.open_table(META).map_err(io_error)?;
            table.insert(SNAPSHOT_META, meta.as_slice()).map_err(io_error)?;
            table.insert(SNAPSHOT_DATA, bytes).map_err(io_error)?;
        }
        tx.commit().map_err(io_error)
    }

    /// Whether commits are durable at once (the simulation's in-memory database).
    pub fn is_in_memory(&self) -> bool {
        self.flushes.is_none()
    }

    /// Number of log entries kept (for status and for the bound-on-log test).
    pub fn log_len(&self) -> io::Result<u64> {
        let tx = self.db.begin_read().map_err(io_error)?;
        tx.open_table(LOG).map_err(io_error)?.len().map_err(io_error)
    }
}

/// Makes appended entries durable, oldest first, many appends per flush, and reports each.
fn flusher(db: &redb::Database, pending: &std::sync::mpsc::Receiver<IOFlushed<C>>) {
    let flush = || -> io::Result<()> {
        // A durable commit persists every non-durable commit before it.
        let tx = db.begin_write().map_err(io_error)?;
        tx.open_table(META).map_err(io_error)?.insert("flush", [1u8].as_slice()).map_err(io_error)?;
        tx.commit().map_err(io_error)
    };
    while let Ok(first) = pending.recv() {
        let mut batch = vec![first];
        batch.extend(pending.try_iter());
        match flush() {
            Ok(()) => batch.into_iter().for_each(|cb| cb.io_completed(Ok(()))),
            Err(e) => {
                for cb in batch {
                    cb.io_completed(Err(io::Error::new(e.kind(), e.to_string())));
                }
            }
        }
    }
}

impl RaftLogReader<C> for Store {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<EntryOf<C>>, io::Error> {
        let tx = self.db.begin_read().map_err(io_error)?;
        let table = tx.open_table(LOG).map_err(io_error)?;
        let mut entries = Vec::new();
        for item in table.range(range).map_err(io_error)? {
            let (k, v) = item.map_err(io_error)?;
            entries.push(self.format.decode(Record::LogEntry { index: k.value() }, v.value())?);
        }
        Ok(entries)
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<C>>, io::Error> {
        self.get(VOTE, Record::Vote)
    }
}

impl RaftLogStorage<C> for Store {
    type LogReader = Store;

    async fn get_log_state(&mut self) -> Result<LogState<C>, io::Error> {
        let last_purged: Option<LogIdOf<C>> = self.get(PURGED, Record::Purged)?;
        let tx = self.db.begin_read().map_err(io_error)?;
        let table = tx.open_table(LOG).map_err(io_error)?;
        let last = match table.last().map_err(io_error)? {
            Some((k, v)) => {
                let what = Record::LogEntry { index: k.value() };
                Some(self.format.decode::<EntryOf<C>>(what, v.value())?.log_id())
            }
            None => last_purged,
        };
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Store {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<C>) -> Result<(), io::Error> {
        self.put(VOTE, Record::Vote, vote, Durability::Immediate)
    }

    /// Not flushed on its own: it rides on the next log append's flush. The commit point only
    /// saves replaying entries after a restart (openraft learns it again from the leader), and an
    /// fsync here would sit between every commit and its apply.
    async fn save_committed(&mut self, committed: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        self.put(COMMITTED, Record::Committed, &committed, Durability::None)
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<C>>, io::Error> {
        Ok(self.get::<Option<LogIdOf<C>>>(COMMITTED, Record::Committed)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = EntryOf<C>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut tx = self.db.begin_write().map_err(io_error)?;
        if self.flushes.is_some() {
            tx.set_durability(Durability::None).map_err(io_error)?;
        }
        {
            let mut table = tx.open_table(LOG).map_err(io_error)?;
            for entry in entries {
                let bytes = self.format.encode(Record::LogEntry { index: entry.index() }, &entry)?;
                table.insert(entry.index(), bytes.as_slice()).map_err(io_error)?;
            }
        }
        tx.commit().map_err(io_error)?;
        match &self.flushes {
            Some(flushes) => flushes.send(callback).map_err(|_| io::Error::other("the log flusher has stopped")),
            None => {
                callback.io_completed(Ok(()));
                Ok(())
            }
        }
    }

    async fn truncate_after(&mut self, last: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        let from = last.map_or(0, |l| l.index() + 1);
        let tx = self.db.begin_write().map_err(io_error)?;
        tx.open_table(LOG).map_err(io_error)?.retain_in(from.., |_, _| false).map_err(io_error)?;
        tx.commit().map_err(io_error)
    }

    async fn purge(&mut self, upto: LogIdOf<C>) -> Result<(), io::Error> {
        let bytes = self.format.encode(Record::Purged, &upto)?;
        let tx = self.db.begin_write().map_err(io_error)?;
        tx.open_table(META).map_err(io_error)?.insert(PURGED, bytes.as_slice()).map_err(io_error)?;
        tx.open_table(LOG).map_err(io_error)?.retain_in(..=upto.index(), |_, _| false).map_err(io_error)?;
        tx.commit().map_err(io_error)
    }
}

#[cfg(test)]
mod tests {
    use lockengine::{Input, SessionId};
    use openraft::EntryPayload;

    use super::*;
    use crate::codec::{FORMAT_VERSION, FORMAT_VERSION_OLDEST, FormatError};
    use crate::types::{Command, Op, Origin};

    fn database() -> Arc<redb::Database> {
        Arc::new(redb::Database::builder().create_with_backend(redb::backends::InMemoryBackend::new()).unwrap())
    }

    fn log_id(index: u64) -> LogIdOf<C> {
        openraft::testing::log_id::<C>(1, 1, index)
    }

    fn entry(index: u64) -> EntryOf<C> {
        let op = if index == 1 {
            Op::OpenSession { lease_ms: 10_000, client: "pid 1 on host".into() }
        } else {
            Op::Engine(Input::Renew { session: SessionId(1) })
        };
        let cmd = Command { now_ms: index, origin: Some(Origin { session: SessionId(1), request: index }), op };
        EntryOf::<C> { log_id: log_id(index), payload: EntryPayload::Normal(cmd) }
    }

    async fn write_log(store: &mut Store) {
        store.append((1..=3).map(entry), IOFlushed::noop()).await.unwrap();
        store.save_vote(&VoteOf::<C>::new_committed(1, 1)).await.unwrap();
    }

    /// The format error inside a store's I/O error.
    fn format_error(e: &io::Error) -> &FormatError {
        e.get_ref().and_then(|e| e.downcast_ref::<FormatError>()).unwrap_or_else(|| panic!("not a format error: {e}"))
    }

    /// Acceptance of issue 11: a log written by this build and read by a build of the next format
    /// version (one that no longer reads this one) is refused, naming both versions.
    #[tokio::test]
    async fn a_log_of_this_build_is_refused_by_a_build_of_the_next_format_version() {
        let db = database();
        write_log(&mut Store::in_memory(db.clone()).unwrap()).await;
        let next = Format { version: FORMAT_VERSION + 1, oldest: FORMAT_VERSION + 1 };
        let mut newer = Store::in_memory(db).unwrap().with_format(next);
        let e = newer.try_get_log_entries(1..).await.unwrap_err();
        assert!(matches!(format_error(&e), FormatError::Version { found, .. } if *found == FORMAT_VERSION), "{e}");
        let message = e.to_string();
        let names = format!(
            "log entry 1 has format version {FORMAT_VERSION}; this stripelock reads format version {}",
            next.version
        );
        assert!(message.starts_with(&names), "{message}");
        assert!(newer.get_log_state().await.unwrap_err().to_string().starts_with("log entry 3 has format version"));
        assert!(newer.read_vote().await.unwrap_err().to_string().starts_with("the vote record has format version"));
    }

    /// And the other way: a log a newer build wrote is refused by this one, which says to upgrade.
    #[tokio::test]
    async fn a_log_of_a_newer_format_version_is_refused() {
        let db = database();
        let next = Format { version: FORMAT_VERSION + 1, oldest: FORMAT_VERSION + 1 };
        write_log(&mut Store::in_memory(db.clone()).unwrap().with_format(next)).await;
        let mut this = Store::in_memory(db).unwrap();
        let e = this.try_get_log_entries(2..3).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "log entry 2 has format version {}; this stripelock reads format versions {FORMAT_VERSION_OLDEST} to \
                 {FORMAT_VERSION}: it was \
                 written by a newer stripelock; upgrade this server",
                next.version
            )
        );
        let e = this.read_vote().await.unwrap_err();
        assert!(matches!(format_error(&e), FormatError::Version { what: Record::Vote, .. }), "{e}");
    }

    /// A database of the JSON layout (every build before versioned formats) is refused at open,
    /// rather than read as empty or misread.
    #[test]
    fn a_database_of_the_json_layout_is_refused_at_open() {
        let db = database();
        let tx = db.begin_write().unwrap();
        tx.open_table(META).unwrap().insert(LAYOUT, b"1".as_slice()).unwrap();
        tx.commit().unwrap();
        let e = Store::in_memory(db).unwrap_err().to_string();
        assert!(e.contains("has database layout version 1; this stripelock reads layout version 2"), "{e}");
        assert!(e.contains("JSON"), "{e}");
    }

    #[tokio::test]
    async fn every_record_round_trips_through_the_store() {
        let db = database();
        let mut store = Store::in_memory(db.clone()).unwrap();
        write_log(&mut store).await;
        store.save_committed(Some(log_id(2))).await.unwrap();
        let meta = SnapshotMetaOf::<C> { last_log_id: Some(log_id(2)), last_membership: Default::default() };
        let snapshot = crate::codec::encode(Record::Snapshot, &"any state").unwrap();
        store.save_snapshot(&meta, &snapshot).unwrap();
        store.purge(log_id(1)).await.unwrap();

        // Read back through a store opened again on the same database.
        let mut store = Store::in_memory(db).unwrap();
        assert_eq!(store.try_get_log_entries(..).await.unwrap(), vec![entry(2), entry(3)]);
        assert_eq!(store.read_vote().await.unwrap(), Some(VoteOf::<C>::new_committed(1, 1)));
        assert_eq!(store.read_committed().await.unwrap(), Some(log_id(2)));
        let state = store.get_log_state().await.unwrap();
        assert_eq!((state.last_purged_log_id, state.last_log_id), (Some(log_id(1)), Some(log_id(3))));
        // The snapshot's bytes are stored as they are: not wrapped, not encoded again.
        assert_eq!(store.snapshot().unwrap(), Some((meta, snapshot.clone())));
        assert_eq!(store.raw(SNAPSHOT_DATA).unwrap(), Some(snapshot));
        assert_eq!(store.raw(LAYOUT).unwrap(), Some(b"2".to_vec()));
        store.save_committed(None).await.unwrap();
        assert_eq!(store.read_committed().await.unwrap(), None);
    }
}
