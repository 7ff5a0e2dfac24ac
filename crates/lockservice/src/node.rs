//! One lock server: its Raft node, its state machine, the Raft service, and the leader's duties.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockengine::{Limits, SessionId};
use openraft::async_runtime::WatchReceiver;
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::type_config::alias::{SnapshotOf, VoteOf};
use openraft::{Raft, ServerState, SnapshotPolicy};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::{Request, Response, Status};
use wire::v1::RaftPayload;
use wire::v1::raft_client::RaftClient;
use wire::v1::raft_server::RaftServer;

use crate::env::Env;
pub use crate::errors::ProposeError;
use crate::forward::{Forwarder, Outcome, Route};
use crate::machine::Machine;
use crate::network::{
    APPEND_ENTRIES, FULL_SNAPSHOT, Network, PRE_VOTE, PROPOSE, READ_INDEX, REJOIN, RENEW, VOTE, decode,
    decode_snapshot, encode,
};
use crate::renew::Renewer;
use crate::store::Store;
use crate::types::{C, Command, NodeAddr, NodeId, Op, Reply, SnapshotData};

pub type StripeRaft = Raft<C, Machine>;

/// How a lock server is set up.
#[derive(Debug, Clone)]
pub struct Config {
    pub id: NodeId,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Every server of the cluster, this one included: id → address.
    pub peers: BTreeMap<NodeId, String>,
    /// Initialize the cluster (membership and secret) if it has never been initialized.
    pub bootstrap: bool,
    /// Raft heartbeat; elections time out after 3–6 of these.
    pub heartbeat_ms: u64,
    /// How often the leader stamps time into the log (so leases expire without traffic).
    pub tick_ms: u64,
    /// Take a snapshot every this many entries; the log before it is then purged.
    pub snapshot_every: u64,
    /// Lease of the server's gateway session, whose cached read locks serve its clients.
    pub gateway_lease_ms: u64,
    /// The shortest and longest session lease a client may ask for; others are refused.
    pub lease_min_ms: u64,
    pub lease_max_ms: u64,
    /// Bytes of lock records the server means to hold at most: near it, holders are asked to
    /// keep fewer idle cached locks (`lru.rs`).
    pub lock_memory_budget: u64,
    /// What each client identity may use (issue 15); no limit by default.
    pub quota: crate::quota::Quota,
    pub limits: Limits,
    /// The outside world as the server sees it; real by default, simulated in the simulation.
    pub env: Env,
}

/// A running server's shared parts.
#[derive(Clone)]
pub struct Node {
    pub id: NodeId,
    pub addr: String,
    pub raft: StripeRaft,
    pub machine: Machine,
    pub config: Arc<Config>,
    leaders: Arc<Mutex<HashMap<NodeId, RaftClient<tonic::transport::Channel>>>>,
    /// This server's ordered stream of commands to the leader (`forward.rs`).
    forwarder: Forwarder,
    /// Session renewals, and the leader's lease table (`renew.rs`).
    pub renewer: Renewer,
    /// This server lost its Raft state and does not vote until readmitted (`rejoin.rs`).
    pub(crate) rejoining: Arc<AtomicBool>,
    /// On the leader: one readmission of a rejoining server at a time.
    pub(crate) readmitting: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Node({})", self.id)
    }
}

impl Node {
    pub async fn start(config: Config) -> std::io::Result<Node> {
        let (store, rejoining) = match &config.env.database {
            Some(db) => (Store::in_memory(db.clone())?, false),
            None => {
                std::fs::create_dir_all(&config.data_dir)?;
                let rejoining = crate::rejoin::must_rejoin(&config.data_dir)?;
                if rejoining && config.peers.keys().all(|id| *id == config.id) {
                    return Err(std::io::Error::other(format!(
                        "server {} lost its Raft database ({}) and there is no other server to catch up from; \
                         to start an empty cluster here instead, remove {} and {}",
                        config.id,
                        config.data_dir.join(crate::rejoin::DATABASE_FILE).display(),
                        config.data_dir.join(crate::rejoin::JOINED_FILE).display(),
                        config.data_dir.join(crate::rejoin::REJOINING_FILE).display(),
                    )));
                }
                (Store::open(&config.data_dir.join(crate::rejoin::DATABASE_FILE))?, rejoining)
            }
        };
        let machine = Machine::new(store.clone(), config.id, config.limits.clone(), &config.env)?;
        let (election_min, election_max) =
            config.env.election_timeout_ms.unwrap_or((config.heartbeat_ms * 3, config.heartbeat_ms * 6));
        let raft_config = openraft::Config {
            cluster_name: "stripelock".into(),
            heartbeat_interval: config.heartbeat_ms,
            election_timeout_min: election_min,
            election_timeout_max: election_max,
            // A snapshot of a million locks is tens of MiB: sending and installing it on a busy
            // machine takes seconds, and a timed-out install starts over from nothing.
            install_snapshot_timeout: 60_000,
            // Asked for by `snapshot_if_due`, at an interval that grows with the table.
            snapshot_policy: SnapshotPolicy::Never,
            // Entries kept behind a snapshot: a follower that lags by fewer catches up from the
            // log, not from a whole-table snapshot (issue 12: followers busy with their own
            // snapshot during a 1M fill fell behind by more than 1,000 and got one).
            max_in_snapshot_log_to_keep: config.snapshot_every.saturating_mul(2).min(20_000),
            purge_batch_size: config.snapshot_every.min(256),
            replication_lag_threshold: config.snapshot_every.max(1_000),
            // Send entries to followers as soon as the leader's append returns, before its own
            // flush: the two flushes overlap (see store.rs).
            broadcast_submitted_on_append: Some(true),
            // A server that was paused or cut off asks whether it could win before it raises its
            // term, so its return does not depose a healthy leader.
            enable_pre_vote: Some(true),
            // A follower whose log went back (its database was wiped) is replicated to again from
            // the start instead of stopping replication; it votes only once readmitted (rejoin.rs).
            allow_log_reversion: Some(true),
            // A restarted leader stands for election like anyone else, in a new term. Restored in
            // its old term, it could renew a session whose expiry its earlier incarnation had
            // appended but not committed: its own term's entries are applied already, so "applied
            // an entry of my term" no longer means "applied every expiry that may still commit"
            // (simulation seed 1868: an acknowledged renewal, then that expiry committed).
            enable_leader_restore: Some(false),
            ..Default::default()
        }
        .validate()
        .map_err(std::io::Error::other)?;
        let network = Network { connector: config.env.connector.clone() };
        let raft = Raft::new(config.id, Arc::new(raft_config), network, store, machine.clone())
            .await
            .map_err(std::io::Error::other)?;
        let addr = config.peers.get(&config.id).cloned().unwrap_or_else(|| config.listen.to_string());
        let leader_of: crate::forward::LeaderOf = {
            let (raft, peers) = (raft.clone(), config.peers.clone());
            Arc::new(move || leader_and_address(&raft, &peers))
        };
        let forwarder = Forwarder::start(config.env.connector.clone(), leader_of);
        let renewer = Renewer::new(config.env.break_fresh_lease_for_negative_control);
        let node = Node {
            id: config.id,
            addr,
            raft,
            machine,
            config: Arc::new(config),
            leaders: Default::default(),
            forwarder,
            renewer,
            rejoining: Arc::new(AtomicBool::new(rejoining)),
            readmitting: Default::default(),
        };
        tokio::spawn(node.renewer.clone().run(node.clone()));
        if node.config.env.database.is_none() {
            let joined =
                crate::rejoin::mark_joined(node.raft.clone(), node.config.data_dir.clone(), node.rejoining.clone());
            tokio::spawn(joined);
        }
        if rejoining {
            let (me, asker) = (node.clone(), node.clone());
            let targets = move || {
                let mut addrs: Vec<String> = me.leader_address().map(|(_, a)| a).into_iter().collect();
                addrs.extend(me.config.peers.iter().filter(|(id, _)| **id != me.id).map(|(_, a)| a.clone()));
                addrs
            };
            let ask = move |addr: String| {
                let node = asker.clone();
                async move { node.ask_readmit(&addr).await }
            };
            let asking = crate::rejoin::ask_until_readmitted(
                node.id,
                node.config.data_dir.clone(),
                node.rejoining.clone(),
                targets,
                ask,
            );
            tokio::spawn(asking);
        }
        Ok(node)
    }

    /// Initializes a fresh cluster from this server: membership of every peer, then the secret.
    pub async fn bootstrap(&self) -> std::io::Result<()> {
        if self.rejoining() {
            // Initializing again would start a second cluster; the leader readmits it instead.
            tracing::warn!("server {} lost its Raft database: rejoining instead of bootstrapping", self.id);
            return Ok(());
        }
        if self.raft.is_initialized().await.map_err(std::io::Error::other)? {
            return Ok(());
        }
        let members: BTreeMap<NodeId, NodeAddr> =
            self.config.peers.iter().map(|(id, addr)| (*id, NodeAddr { addr: addr.clone() })).collect();
        if let Err(e) = self.raft.initialize(members).await {
            tracing::info!("initialize: {e}");
        }
        let secret = match self.config.env.secret {
            Some(s) => s,
            None => random_secret()?,
        };
        // Wait for a leader, then propose the secret (only the first bootstrap entry counts).
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match self.propose(Op::Bootstrap { secret }, None).await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    tracing::debug!("bootstrap: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        Err(std::io::Error::other("no leader elected within 30 s of bootstrap"))
    }

    /// Whether this server lost its Raft state and is waiting to be readmitted (not voting).
    pub fn rejoining(&self) -> bool {
        self.rejoining.load(Ordering::SeqCst)
    }

    /// The leader as this server knows it, with its address.
    pub(crate) fn leader_address(&self) -> Option<(NodeId, String)> {
        leader_and_address(&self.raft, &self.config.peers)
    }

    /// Asks the server at `addr` (the leader) to readmit this one; waits while it catches up.
    pub(crate) async fn ask_readmit(&self, addr: &str) -> Result<(), ProposeError> {
        let channel = self.config.env.connector.channel(addr).map_err(|e| unreached(addr, &e.to_string()))?;
        let payload = encode(REJOIN, &self.id).map_err(unreadable)?;
        let reply = RaftClient::new(channel).rejoin(payload).await.map_err(|s| unreached(addr, s.message()))?;
        decode::<Result<(), ProposeError>>(REJOIN, reply.get_ref()).map_err(unreadable)?
    }

    pub fn is_leader(&self) -> bool {
        let m = self.raft.metrics().borrow_watched().clone();
        m.state == ServerState::Leader
    }

    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow_watched().current_leader
    }

    /// The current Raft term as this server knows it.
    pub fn term(&self) -> u64 {
        self.raft.metrics().borrow_watched().current_term
    }

    /// Confirms with a majority that this server still leads (a ReadIndex round): a deposed
    /// leader that has not noticed yet is refused.
    pub async fn confirm_leadership(&self) -> Result<(), ProposeError> {
        self.raft
            .ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex)
            .await
            .map(|_| ())
            .map_err(|e| ProposeError::Refused { code: wire::ErrorCode::NotLeader, message: e.to_string() })
    }

    /// Commits `op` (stamped with the leader's time) and returns its reply, forwarding to the
    /// leader when this server is not it. Retries while a leader is being elected or has not yet
    /// confirmed its lease, up to a few seconds.
    pub async fn propose(&self, op: Op, origin: Option<crate::types::Origin>) -> Result<Reply, ProposeError> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut delay = Duration::from_millis(10);
        loop {
            let attempt = self.propose_once(Command { now_ms: 0, origin, op: op.clone() }).await;
            match attempt {
                // Decided by the code alone: a refusal the leader sent back is retried only when
                // it is one that may pass (it lost leadership, it is stopping), not one that
                // would come back the same (a command it cannot read).
                Err(e) if e.is_retryable() && Instant::now() < deadline => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(200));
                }
                other => return other,
            }
        }
    }

    async fn propose_once(&self, mut cmd: Command) -> Result<Reply, ProposeError> {
        cmd.now_ms = self.config.env.now_ms();
        match self.raft.client_write(cmd.clone()).await {
            Ok(resp) => Ok(resp.data),
            Err(e) => {
                if let Some(f) = e.forward_to_leader() {
                    let Some(leader) = f.leader_id else { return Err(ProposeError::NoLeader) };
                    if leader == self.id {
                        return Err(ProposeError::NoLeader);
                    }
                    let addr = f
                        .leader_node
                        .as_ref()
                        .map(|n| n.addr.clone())
                        .or_else(|| self.config.peers.get(&leader).cloned());
                    let Some(addr) = addr else { return Err(ProposeError::NoLeader) };
                    return self.forward(leader, &addr, &cmd).await;
                }
                Err(ProposeError::Stopped { reason: e.to_string() })
            }
        }
    }

    fn leader_client(&self, leader: NodeId, addr: &str) -> Result<RaftClient<tonic::transport::Channel>, ProposeError> {
        let mut leaders = self.leaders.lock().expect("leaders lock");
        if let Some(c) = leaders.get(&leader) {
            return Ok(c.clone());
        }
        let channel = self
            .config
            .env
            .connector
            .channel(addr)
            .map_err(|e| ProposeError::LeaderUnreachable { leader, reason: e.to_string() })?;
        let c = RaftClient::new(channel);
        leaders.insert(leader, c.clone());
        Ok(c)
    }

    /// Renews `session`'s lease with the leader (no log entry): `Ok(false)` when it is closed,
    /// expired or expiring.
    pub async fn renew(&self, session: SessionId) -> crate::renew::Renewed {
        self.renewer.renew(session, false).await
    }

    /// Hands a batch of renewals to the leader in one RPC; its answer says, per session,
    /// whether it renewed it.
    pub(crate) async fn forward_renewals(&self, sessions: Vec<SessionId>) -> Result<Vec<bool>, ProposeError> {
        self.ask_leader(RENEW, &sessions, |mut c, p| async move { c.renew(p).await }).await?
    }

    /// Sends `value` as the Raft message `name` to the leader (not this server) through `call`
    /// and decodes its answer; a leader that does not answer within the deadline is forgotten.
    async fn ask_leader<T, R, F>(
        &self,
        name: &'static str,
        value: &T,
        call: impl FnOnce(RaftClient<tonic::transport::Channel>, RaftPayload) -> F,
    ) -> Result<R, ProposeError>
    where
        T: serde::Serialize,
        R: serde::de::DeserializeOwned,
        F: std::future::Future<Output = Result<Response<RaftPayload>, Status>>,
    {
        let (leader, addr) = leader_and_address(&self.raft, &self.config.peers).ok_or(ProposeError::NoLeader)?;
        if leader == self.id {
            return Err(ProposeError::NoLeader);
        }
        let client = self.leader_client(leader, &addr)?;
        let payload = encode(name, value).map_err(unreadable)?;
        let reply = tokio::time::timeout(FORWARD_DEADLINE, call(client, payload))
            .await
            .map_err(|_| {
                self.leaders.lock().expect("leaders lock").remove(&leader);
                ProposeError::LeaderUnreachable { leader, reason: format!("no answer within {FORWARD_DEADLINE:?}") }
            })?
            .map_err(|s| ProposeError::LeaderUnreachable { leader, reason: s.message().to_string() })?;
        decode::<R>(name, reply.get_ref()).map_err(unreadable)
    }

    /// Waits until this server has applied every entry committed before the call (Raft's
    /// ReadIndex, asked of the leader when this server follows), so what it then reads from its
    /// state includes every change any server acknowledged earlier.
    pub async fn read_barrier(&self) -> Result<(), ProposeError> {
        let index = if self.is_leader() {
            self.read_index().await?
        } else {
            self.ask_leader::<_, Result<u64, ProposeError>, _>(READ_INDEX, &(), |mut c, p| async move {
                c.read_index(p).await
            })
            .await??
        };
        tokio::time::timeout(FORWARD_DEADLINE, self.applied(index)).await.map_err(|_| ProposeError::Refused {
            code: wire::ErrorCode::Unavailable,
            message: format!("this server has not applied entry {index} within {FORWARD_DEADLINE:?}"),
        })
    }

    /// The leader's read index: confirmed with a majority that it still leads.
    async fn read_index(&self) -> Result<u64, ProposeError> {
        let (read, _) = self
            .raft
            .get_read_log_id(openraft::raft::ReadPolicy::ReadIndex)
            .await
            .map_err(|e| ProposeError::Refused { code: wire::ErrorCode::NotLeader, message: e.to_string() })?;
        Ok(read.index())
    }

    async fn forward(&self, leader: NodeId, addr: &str, cmd: &Command) -> Result<Reply, ProposeError> {
        let mut client = self.leader_client(leader, addr)?;
        let payload = encode(PROPOSE, cmd).map_err(unreadable)?;
        // A leader that accepts connections but does not answer (paused, cut off) must not hold
        // the request: after the deadline it is asked again, of whoever leads by then (a command
        // with an origin is applied once however often it is proposed).
        let reply = tokio::time::timeout(FORWARD_DEADLINE, client.propose(payload))
            .await
            .map_err(|_| {
                self.leaders.lock().expect("leaders lock").remove(&leader);
                ProposeError::LeaderUnreachable { leader, reason: format!("no answer within {FORWARD_DEADLINE:?}") }
            })?
            .map_err(|s| match wire::code_of(&s) {
                // The leader's own refusal (it could not read the command) keeps its code; the
                // transport's failures say only that the leader was not reached.
                Ok(code) if wire::from_server(&s) => ProposeError::Refused { code, message: s.message().to_string() },
                Ok(_) => ProposeError::LeaderUnreachable { leader, reason: s.message().to_string() },
                Err(unknown) => ProposeError::Refused { code: wire::ErrorCode::Internal, message: unknown.to_string() },
            })?;
        decode::<Result<Reply, ProposeError>>(PROPOSE, reply.get_ref()).map_err(unreadable)?
    }

    /// Where a command submitted now goes (`forward.rs`).
    pub fn route(&self) -> Route {
        match self.raft.as_leader() {
            Ok(l) => Route::Local { term: crate::forward::leader_term(&l) },
            Err(_) => Route::Forward { generation: self.forwarder.generation() },
        }
    }

    /// Puts `op` in order on its way to the log by `route`, and returns its outcome to come:
    /// commands submitted on one route are applied in the order submitted, or fail as a suffix.
    /// Fails at once if the route is no longer the current one.
    pub async fn submit(
        &self,
        route: Route,
        op: Op,
        origin: Option<crate::types::Origin>,
    ) -> Result<Outcome, ProposeError> {
        let cmd = Command { now_ms: self.config.env.now_ms(), origin, op };
        match route {
            Route::Local { term } => crate::forward::write_local(&self.raft, term, cmd).await,
            Route::Forward { generation } => self.forwarder.submit(generation, cmd).await,
        }
    }

    /// Waits until this server has applied entry `index` (so its own sessions have seen it).
    pub async fn applied(&self, index: u64) {
        let mut rx = self.machine.applied_index();
        let _ = rx.wait_for(|i| *i >= index).await;
    }

    /// The leader's duties, run on every server and acting only while it leads: expire the
    /// sessions whose lease ran out (`renew.rs`), and snapshot when due. (Fences are the storage
    /// service's duty: `fencing.rs`.)
    pub async fn leader_duties(self, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.config.tick_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let secret_file = self.config.data_dir.join(SECRET_FILE);
        let mut last_snapshot_asked = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            if self.config.env.database.is_none() && !secret_file.exists() {
                let secret = self.machine.state().secret;
                if let Some(secret) = secret
                    && let Err(e) = write_secret(&secret_file, &secret)
                {
                    tracing::warn!("cannot write {}: {e}", secret_file.display());
                }
            }
            self.snapshot_if_due(&mut last_snapshot_asked).await;
            // Leases live in the leader's memory; only an expiry goes into the log.
            self.renewer.expire_due(&self).await;
        }
    }

    /// Asks for a snapshot once the log since the last one is long enough: `snapshot_every`
    /// entries, or a quarter of the lock records the table holds if more, so that the work of a
    /// snapshot (which grows with the table) stays a few units per entry applied (issue 12: at
    /// 550k locks a snapshot every 5,000 entries stalled the cluster).
    async fn snapshot_if_due(&self, last_asked: &mut u64) {
        let (applied, snapshot) = {
            let m = self.raft.metrics().borrow_watched().clone();
            (m.last_applied.map_or(0, |l| l.index), m.snapshot.map_or(0, |l| l.index))
        };
        let (_, locks) = self.machine.state().engine.size();
        let due = self.config.snapshot_every.max(locks as u64 / 4);
        if applied.saturating_sub(snapshot) >= due && applied.saturating_sub(*last_asked) >= due {
            *last_asked = applied;
            if let Err(e) = self.raft.trigger().snapshot().await {
                tracing::debug!("snapshot: {e}");
            }
        }
    }

    /// Proposes on this server only (no forwarding): for the leader's own duties.
    pub async fn propose_here(&self, op: Op) -> Result<Reply, ProposeError> {
        let cmd = Command { now_ms: self.config.env.now_ms(), origin: None, op };
        self.raft.client_write(cmd).await.map(|r| r.data).map_err(|e| ProposeError::Stopped { reason: e.to_string() })
    }

    pub fn raft_service(&self) -> RaftServer<RaftService> {
        RaftServer::new(RaftService { node: self.clone() })
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// Session ids the engine still knows (for tests and status).
    pub fn session_is_live(&self, session: SessionId) -> bool {
        self.machine.state().engine.session_is_live(session)
    }
}

impl crate::renew::Server for Node {
    fn route(&self) -> Route {
        Node::route(self)
    }
    fn machine(&self) -> &Machine {
        &self.machine
    }
    fn is_leader(&self) -> bool {
        Node::is_leader(self)
    }
    fn term(&self) -> u64 {
        Node::term(self)
    }
    fn confirm_leadership(&self) -> impl std::future::Future<Output = Result<(), ProposeError>> + Send {
        Node::confirm_leadership(self)
    }
    fn forward_renewals(
        &self,
        sessions: Vec<SessionId>,
    ) -> impl std::future::Future<Output = Result<Vec<bool>, ProposeError>> + Send {
        Node::forward_renewals(self, sessions)
    }
    fn expire(&self, session: SessionId) -> impl std::future::Future<Output = Result<(), ProposeError>> + Send {
        let node = self.clone();
        async move { node.propose_here(Op::Engine(lockengine::Input::Evict { session })).await.map(|_| ()) }
    }
}

/// The leader as this server knows it, with its address (from the membership, else the peers).
fn leader_and_address(raft: &StripeRaft, peers: &BTreeMap<NodeId, String>) -> Option<(NodeId, String)> {
    let m = raft.metrics().borrow_watched().clone();
    let leader = m.current_leader?;
    let addr = m
        .membership_config
        .membership()
        .get_node(&leader)
        .map(|n| n.addr.clone())
        .or_else(|| peers.get(&leader).cloned())?;
    Some((leader, addr))
}

/// A server asked for something (by address, its id unknown) that could not be reached.
fn unreached(addr: &str, why: &str) -> ProposeError {
    ProposeError::Refused { code: wire::ErrorCode::Unavailable, message: format!("{addr} could not be reached: {why}") }
}

/// A message to or from the leader that could not be encoded or read.
fn unreadable(e: crate::codec::FormatError) -> ProposeError {
    ProposeError::Refused { code: wire::ErrorCode::Internal, message: e.to_string() }
}

/// How long a follower waits for the leader to answer a forwarded command before asking again.
const FORWARD_DEADLINE: Duration = Duration::from_secs(1);

/// The cluster secret, in the data directory of every server once it is replicated there
/// (for `stripelock token verify`, and later for storage nodes).
pub const SECRET_FILE: &str = "cluster.secret";

/// Writes the secret as 64 hex digits, readable by the owner only, atomically (write, rename).
fn write_secret(path: &std::path::Path, secret: &[u8; 32]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    writeln!(f, "{hex}")?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}

fn random_secret() -> std::io::Result<[u8; 32]> {
    use std::io::Read;
    let mut secret = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut secret)?;
    Ok(secret)
}

/// The server side of the Raft service: hands each message to the local Raft node.
#[derive(Debug, Clone)]
pub struct RaftService {
    node: Node,
}

impl RaftService {
    /// Refuses a Raft message this server sent itself. A connection to a peer's port on this
    /// host while that peer is down can be a TCP self-connection (the kernel picks the peer's
    /// port as the local one): a leader then got its own append-entries as if from another
    /// leader of its term, and openraft's core panicked (seen in a test whose third server then
    /// found its port taken).
    fn not_from_self(&self, vote: &VoteOf<C>) -> Result<(), Status> {
        if vote.leader_id.node_id == self.node.id {
            return Err(wire::ErrorCode::Unavailable.status(format!(
                "server {} got a Raft message from itself (a TCP connection to a peer's port that connected to itself)",
                self.node.id
            )));
        }
        Ok(())
    }
}

fn bad(e: crate::codec::FormatError) -> Status {
    wire::ErrorCode::BadRequest.status(format!("undecodable Raft message: {e}"))
}

/// A Raft call the local node could not serve (stopped, or no longer in the state to).
fn raft_unavailable(e: impl std::fmt::Display) -> Status {
    wire::ErrorCode::Unavailable.status(e.to_string())
}

#[tonic::async_trait]
impl wire::v1::raft_server::Raft for RaftService {
    async fn append_entries(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc: AppendEntriesRequest<C> = decode(APPEND_ENTRIES, req.get_ref()).map_err(bad)?;
        self.not_from_self(&rpc.vote)?;
        let resp = self.node.raft.append_entries(rpc).await.map_err(raft_unavailable)?;
        Ok(Response::new(encode(APPEND_ENTRIES, &resp).map_err(bad)?))
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        crate::rejoin::refuse_vote(&self.node.rejoining, self.node.id)?;
        let rpc: VoteRequest<C> = decode(VOTE, req.get_ref()).map_err(bad)?;
        self.not_from_self(&rpc.vote)?;
        let resp = self.node.raft.vote(rpc).await.map_err(raft_unavailable)?;
        Ok(Response::new(encode(VOTE, &resp).map_err(bad)?))
    }

    async fn pre_vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        crate::rejoin::refuse_vote(&self.node.rejoining, self.node.id)?;
        let rpc: VoteRequest<C> = decode(PRE_VOTE, req.get_ref()).map_err(bad)?;
        self.not_from_self(&rpc.vote)?;
        let resp = self.node.raft.pre_vote(rpc).await.map_err(raft_unavailable)?;
        Ok(Response::new(encode(PRE_VOTE, &resp).map_err(bad)?))
    }

    async fn full_snapshot(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let (vote, meta, snapshot) = decode_snapshot(req.get_ref()).map_err(bad)?;
        self.not_from_self(&vote)?;
        let snapshot = SnapshotOf::<C, SnapshotData> { meta, snapshot };
        let resp = self.node.raft.install_full_snapshot(vote, snapshot).await.map_err(raft_unavailable)?;
        Ok(Response::new(encode(FULL_SNAPSHOT, &resp).map_err(bad)?))
    }

    type ProposeStreamStream = crate::forward::ResultStream;

    async fn propose_stream(
        &self,
        req: Request<tonic::Streaming<RaftPayload>>,
    ) -> Result<Response<Self::ProposeStreamStream>, Status> {
        let env = self.node.config.env.clone();
        let now_ms = Arc::new(move || env.now_ms());
        crate::forward::serve_stream(self.node.raft.clone(), now_ms, req.into_inner()).map(Response::new)
    }

    async fn renew(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let sessions: Vec<SessionId> = decode(RENEW, req.get_ref()).map_err(bad)?;
        let answers = futures::future::join_all(sessions.iter().map(|s| self.node.renewer.renew(*s, true))).await;
        let result: Result<Vec<bool>, ProposeError> = answers.into_iter().collect();
        Ok(Response::new(encode(RENEW, &result).map_err(bad)?))
    }

    async fn read_index(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let () = decode(READ_INDEX, req.get_ref()).map_err(bad)?;
        let result = self.node.read_index().await;
        Ok(Response::new(encode(READ_INDEX, &result).map_err(bad)?))
    }

    async fn rejoin(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let id: NodeId = decode(REJOIN, req.get_ref()).map_err(bad)?;
        let result = crate::rejoin::readmit(&self.node.raft, &self.node.readmitting, id).await;
        Ok(Response::new(encode(REJOIN, &result).map_err(bad)?))
    }

    async fn propose(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let cmd: Command = decode(PROPOSE, req.get_ref()).map_err(bad)?;
        // Re-stamp with this leader's clock; a follower's clock is not the log's.
        let result: Result<Reply, ProposeError> =
            match self.node.raft.client_write(Command { now_ms: self.node.config.env.now_ms(), ..cmd }).await {
                Ok(resp) => Ok(resp.data),
                Err(e) => Err(ProposeError::at_leader(&e)),
            };
        Ok(Response::new(encode(PROPOSE, &result).map_err(bad)?))
    }
}
