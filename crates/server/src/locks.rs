//! The lock service as the data path sees it: `datapath::Locks` over the Raft node, answering
//! from this server's applied state. The only place where the two meet.

use std::collections::BTreeMap;

use datapath::{Fencing, FileIds, Leadership, Locks};
use futures::FutureExt;
use futures::future::BoxFuture;
use lockengine::{ByteRange, SessionId};
use lockservice::names::Entry;
use lockservice::{FileMeta, Node, NodeId, Op, ProposeError, Reply, Stub, WriteGrant};
use tokio::sync::{mpsc, watch};

/// A Raft node seen through `datapath::Locks`.
#[derive(Debug, Clone)]
pub struct NodeLocks(pub Node);

impl Locks for NodeLocks {
    fn id(&self) -> NodeId {
        self.0.id
    }

    fn address(&self) -> &str {
        &self.0.addr
    }

    fn members(&self) -> &BTreeMap<NodeId, String> {
        &self.0.config.peers
    }

    fn connector(&self) -> &wire::Connector {
        &self.0.config.env.connector
    }

    fn now_ms(&self) -> u64 {
        self.0.config.env.now_ms()
    }

    fn leadership(&self) -> Leadership {
        Leadership { leading: self.0.is_leader(), leader: self.0.leader(), term: self.0.term() }
    }

    fn confirm_leadership(&self) -> BoxFuture<'_, Result<(), ProposeError>> {
        self.0.confirm_leadership().boxed()
    }

    fn stub(&self, id: u64) -> Option<Stub> {
        self.0.machine.state().stubs.get(&id).cloned()
    }

    fn recalled_rows(&self, id: u64) -> lockservice::RowSet {
        self.0.machine.state().recalled_rows(id)
    }

    fn stale_mask(&self, id: u64, row: u64) -> u8 {
        self.0.machine.state().stale_mask(id, row)
    }

    fn stale_marks(&self, limit: usize) -> Vec<(u64, u64, u8)> {
        let state = self.0.machine.state();
        state.stale.iter().flat_map(|(id, rows)| rows.iter().map(|(r, m)| (*id, *r, *m))).take(limit).collect()
    }

    fn stale_rows(&self) -> u64 {
        self.0.machine.state().stale_rows() as u64
    }

    fn volume_seen(&self, server: u64) -> Option<u64> {
        self.0.machine.state().volumes.get(&server).copied()
    }

    fn wiped(&self) -> std::collections::BTreeSet<u64> {
        self.0.machine.state().wiped.clone()
    }

    fn bytes_quota(&self) -> Option<u64> {
        self.0.config.quota.bytes
    }

    fn owner_of(&self, id: u64) -> Option<(String, u64)> {
        let state = self.0.machine.state();
        state.owners.get(&id).map(|o| (o.clone(), state.stored_bytes(o)))
    }

    fn stored_bytes(&self, owner: &str) -> u64 {
        self.0.machine.state().stored_bytes(owner)
    }

    fn stub_keys(&self) -> std::collections::HashSet<String> {
        self.0.machine.state().stubs.values().map(|s| s.key.clone()).collect()
    }

    fn read_barrier(&self) -> BoxFuture<'_, Result<(), ProposeError>> {
        self.0.read_barrier().boxed()
    }

    fn secret(&self) -> Option<[u8; 32]> {
        self.0.machine.state().secret
    }

    fn applied_index(&self) -> watch::Receiver<u64> {
        self.0.machine.applied_index()
    }

    fn write_grants(&self) -> mpsc::Receiver<WriteGrant> {
        self.0.machine.write_grants()
    }

    fn propose(&self, op: Op) -> BoxFuture<'_, Result<Reply, ProposeError>> {
        self.0.propose(op, None).boxed()
    }

    fn propose_here(&self, op: Op) -> BoxFuture<'_, Result<Reply, ProposeError>> {
        self.0.propose_here(op).boxed()
    }

    fn file(&self, path: &str) -> Option<FileMeta> {
        self.0.machine.state().files.get(path).cloned()
    }

    fn files(&self, prefix: &str) -> Vec<(String, FileMeta)> {
        let state = self.0.machine.state();
        state
            .files
            .range(prefix.to_string()..)
            .take_while(|(p, _)| p.starts_with(prefix))
            .map(|(p, f)| (p.clone(), f.clone()))
            .collect()
    }

    fn file_ids(&self) -> FileIds {
        let state = self.0.machine.state();
        FileIds { live: state.files.values().map(|f| f.id).collect(), last: state.last_file_id() }
    }

    fn entry(&self, path: &str) -> Option<Entry> {
        self.0.machine.state().names_view().entry(path)
    }

    fn locate(&self, ino: u64) -> Option<Entry> {
        self.0.machine.state().names_view().locate(ino)
    }

    fn list(&self, dir: &str, after: &str, limit: usize) -> (Vec<Entry>, bool) {
        self.0.machine.state().names_view().list(dir, after, limit)
    }

    fn entry_count(&self) -> (u64, u64) {
        let state = self.0.machine.state();
        let n = state.files.len() + state.names.dirs.len() + state.names.links.len();
        (n as u64, lockservice::FILES_MAX as u64)
    }

    fn write_lock_holds(&self, path: &str, range: ByteRange, token: u64) -> bool {
        self.0.machine.state().engine.write_lock_holds(path, range, token)
    }

    fn write_holder(&self, path: &str, range: ByteRange) -> Option<(SessionId, ByteRange)> {
        self.0.machine.state().engine.write_holder(path, range)
    }

    fn last_token(&self) -> u64 {
        self.0.machine.state().engine.last_token()
    }

    fn session_ended(&self, session: u64) -> bool {
        let state = self.0.machine.state();
        session <= state.next_session && !state.engine.session_is_live(SessionId(session))
    }

    fn fencing(&self) -> Fencing {
        let state = self.0.machine.state();
        Fencing {
            applied_index: state.last_applied.map_or(0, |l| l.index),
            sessions: state.engine.fencing_sessions(),
            last_token: state.engine.last_token(),
        }
    }
}
