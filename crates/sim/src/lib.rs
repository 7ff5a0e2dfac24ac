//! Deterministic simulations of the replicated lock service. This module's is at the level of its log: clients
//! with sessions and heartbeats, a leader that stamps its (skewed) clock into entries, ticks and
//! acknowledges fences once every storage server has recorded them or is past its storage lease
//! (storage servers that renew their leases from the leader, learn the sessions fencing with
//! each renewal, take fences after a delay, and go down now and then), leader changes that raise the
//! epoch, requests that are delayed or lost, clients that pause past their lease, and replicas
//! that apply the same log (one of them rebuilt from a snapshot now and then). Everything is
//! drawn from one seed, so a seed replays a run exactly.
//!
//! A checker reads the history and fails the run on: two conflicting grants valid at once (a
//! grant stays valid, as storage sees it, until its holder releases it or is fenced); a token
//! not above every earlier conflicting token; a grant to an expired session; a fence
//! acknowledged while a storage server neither recorded it nor was past its lease; replicas that
//! disagree; and, after the faults stop, a request that never completes.
//!
//! This one takes the log as given, in one order, and is fast (thousands of seeds a minute).
//! [`cluster`] runs the real servers and clients instead, over turmoil's simulated network.

pub mod checker;
pub mod cluster;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use checker::{Checker, Grant};

use lockengine::{ByteRange, Engine, Input, LockId, Mode, Output, SessionId};

/// splitmix64: small, fast, and the same on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub clients: usize,
    pub resources: usize,
    pub lease_ms: u64,
    /// How long faults are injected, then how long the cluster has to heal.
    pub fault_ms: u64,
    pub heal_ms: u64,
    pub replicas: usize,
    /// Negative control: the engine drops an expired holder's locks before it is fenced.
    pub break_fencing: bool,
    /// Storage servers, each with its fence table and storage lease.
    pub storage_servers: usize,
    pub storage_lease_ms: u64,
    /// Negative control: the leader acknowledges fences after a while, without storage.
    pub break_storage_fence: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            clients: 5,
            resources: 3,
            lease_ms: 300,
            fault_ms: 6_000,
            heal_ms: 4_000,
            replicas: 3,
            break_fencing: false,
            storage_servers: 3,
            storage_lease_ms: 150,
            break_storage_fence: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub seed: u64,
    pub at_ms: u64,
    pub what: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "seed {} at {} ms: {}", self.seed, self.at_ms, self.what)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub entries: u64,
    pub grants: u64,
    pub expiries: u64,
    /// Fence acknowledgements checked against every storage server's fence table and lease.
    pub fence_acks: u64,
    pub leader_changes: u64,
    pub restores: u64,
    /// A digest of every output, to show two runs of a seed are identical.
    pub digest: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ClientState {
    /// No session yet (or it expired): open one.
    Closed,
    Idle,
    Waiting {
        lock: LockId,
    },
    Holding {
        lock: LockId,
        until_ms: u64,
    },
}

#[derive(Debug)]
struct Client {
    session: SessionId,
    state: ClientState,
    next_lock: u64,
    paused_until: u64,
    next_heartbeat: u64,
}

struct World {
    seed: u64,
    cfg: Config,
    rng: Rng,
    now: u64,
    replicas: Vec<Engine>,
    clients: Vec<Client>,
    /// Requests on their way to the log: (arrival time, input).
    inflight: VecDeque<(u64, Input)>,
    term: u64,
    skew: i64,
    next_session: u64,
    /// Only with `break_storage_fence`: when the leader acknowledges a fence without storage.
    fence_due: BTreeMap<SessionId, u64>,
    last_arrival: BTreeMap<SessionId, u64>,
    checker: Checker,
    report: Report,
    storage: Vec<StorageNode>,
    /// The leader's view: the end of the storage lease it granted each storage server, when it
    /// took over (it assumes each holds a lease until then plus the lease), and which storage
    /// servers recorded each fencing session.
    granted: Vec<u64>,
    leader_since: u64,
    acked: BTreeMap<SessionId, BTreeSet<usize>>,
}

/// A storage server: its fence table and its storage lease (seed 003).
#[derive(Debug, Clone, Default)]
struct StorageNode {
    fenced: BTreeSet<SessionId>,
    lease_until: u64,
    next_renewal: u64,
    down_until: u64,
}

impl World {
    fn fail(&self, what: String) -> Violation {
        Violation { seed: self.seed, at_ms: self.now, what }
    }

    fn resource_name(i: usize) -> String {
        format!("/sim/{i}")
    }

    /// Appends one entry: every replica applies it; they must agree; the checker reads it.
    fn append(&mut self, input: Input) -> Result<Vec<Output>, Violation> {
        let stamp = (self.now as i64 + self.skew).max(0) as u64;
        if let Input::FenceAck { session } = input {
            self.checker.fence_acked(session, self.now).map_err(|e| self.fail(e))?;
            self.report.fence_acks += 1;
        }
        let outputs = self.replicas[0].step(stamp, input.clone());
        for r in 1..self.replicas.len() {
            if self.replicas[r].step(stamp, input.clone()) != outputs {
                return Err(self.fail(format!("replica {r} disagrees on {input:?}")));
            }
        }
        self.report.entries += 1;
        if self.report.entries.is_multiple_of(64) {
            self.replicas[0].check_invariants();
        }
        for o in &outputs {
            self.report.digest = self.report.digest.rotate_left(7) ^ fnv(&format!("{o:?}"));
            self.observe(o)?;
        }
        Ok(outputs)
    }

    fn observe(&mut self, o: &Output) -> Result<(), Violation> {
        match o {
            Output::Granted { session, lock, mode, range, token, .. }
            | Output::Converted { session, lock, mode, range, token, .. } => {
                let Some(resource) = self.replicas[0].resource_of(*lock).map(str::to_string) else {
                    return Err(self.fail(format!("{lock:?} granted on no known resource")));
                };
                let g = Grant { session: *session, resource, range: *range, mode: *mode, token: *token };
                self.checker.grant(*lock, g).map_err(|e| self.fail(e))?;
                self.report.grants += 1;
                if let Some(c) = self.clients.iter_mut().find(|c| c.session == *session)
                    && c.state == (ClientState::Waiting { lock: *lock })
                {
                    let hold = 5 + self.rng.below(60);
                    c.state = ClientState::Holding { lock: *lock, until_ms: self.now + hold };
                }
            }
            Output::Released { lock, .. } => self.checker.released(*lock),
            Output::Busy { session, lock, .. }
            | Output::Deadlock { session, lock }
            | Output::Cancelled { session, lock } => {
                if let Some(c) = self.clients.iter_mut().find(|c| c.session == *session)
                    && c.state == (ClientState::Waiting { lock: *lock })
                {
                    c.state = ClientState::Idle;
                }
            }
            Output::Expired { session } => {
                self.checker.expired(*session);
                self.report.expiries += 1;
                if self.cfg.break_storage_fence {
                    // The negative control: acknowledged after a while, storage or not.
                    let delay = 1 + self.rng.below(80);
                    self.fence_due.insert(*session, self.now + delay);
                }
                if let Some(c) = self.clients.iter_mut().find(|c| c.session == *session) {
                    c.state = ClientState::Closed;
                }
            }
            Output::Rejected { subject: lockengine::Subject::Lock(lock), .. } => {
                for c in &mut self.clients {
                    if c.state == (ClientState::Waiting { lock: *lock }) {
                        c.state = ClientState::Idle;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// A request from `session` on its way to the log: maybe lost, maybe late, but never ahead
    /// of an earlier request of the same session (a session is one ordered stream).
    fn send(&mut self, session: SessionId, input: Input, faults: bool) {
        if faults && self.rng.chance(3) {
            return; // lost
        }
        let delay = if faults { self.rng.below(30) } else { self.rng.below(3) };
        let earliest = self.last_arrival.get(&session).copied().unwrap_or(0);
        let at = (self.now + delay).max(earliest);
        self.last_arrival.insert(session, at);
        let pos = self.inflight.iter().position(|(t, _)| *t > at).unwrap_or(self.inflight.len());
        self.inflight.insert(pos, (at, input));
    }

    fn client_step(&mut self, i: usize, faults: bool) -> Result<(), Violation> {
        let now = self.now;
        if self.clients[i].paused_until > now {
            return Ok(());
        }
        if faults && self.rng.chance(1) && self.rng.chance(20) {
            // A pause (GC, VM freeze, partition) of up to twice the lease.
            self.clients[i].paused_until = now + self.rng.below(2 * self.cfg.lease_ms);
            return Ok(());
        }
        if self.clients[i].state == ClientState::Closed {
            self.next_session += 1;
            let session = SessionId(self.next_session);
            self.clients[i].session = session;
            self.clients[i].state = ClientState::Idle;
            self.clients[i].next_heartbeat = now + self.cfg.lease_ms / 3;
            // Opening is synchronous in the real service (the client waits for its session).
            self.append(Input::OpenSession { session, lease_ms: self.cfg.lease_ms })?;
            return Ok(());
        }
        let session = self.clients[i].session;
        if now >= self.clients[i].next_heartbeat {
            self.clients[i].next_heartbeat = now + self.cfg.lease_ms / 3;
            self.send(session, Input::Renew { session }, faults);
        }
        match self.clients[i].state.clone() {
            ClientState::Idle if faults && self.rng.chance(10) => {
                self.clients[i].next_lock += 1;
                let lock = LockId((session.0 << 20) | self.clients[i].next_lock);
                let resource = self.rng.below(self.cfg.resources as u64) as usize;
                let start = self.rng.below(12);
                let range = if self.rng.chance(20) {
                    ByteRange::ALL
                } else {
                    ByteRange::new(start, start + 1 + self.rng.below(6)).expect("non-empty")
                };
                let mode = [Mode::CR, Mode::PR, Mode::PW, Mode::EX][self.rng.below(4) as usize];
                let nowait = self.rng.chance(15);
                self.clients[i].state = ClientState::Waiting { lock };
                let input = Input::Lock { lock, session, resource: Self::resource_name(resource), range, mode, nowait };
                self.send(session, input, faults);
            }
            ClientState::Holding { lock, until_ms } if now >= until_ms || !faults => {
                self.clients[i].state = ClientState::Idle;
                self.send(session, Input::Release { lock }, faults);
            }
            ClientState::Waiting { lock } if !faults && self.rng.chance(2) => {
                // Healing: a waiter that lost its request (or waits long) cancels and moves on.
                self.send(session, Input::Cancel { lock }, faults);
                self.clients[i].state = ClientState::Idle;
            }
            _ => {}
        }
        Ok(())
    }

    fn leader_step(&mut self, faults: bool) -> Result<(), Violation> {
        if faults && self.rng.chance(1) && self.rng.chance(10) {
            // A new leader: a new term, the epoch of every later token, and its own clock.
            self.term += 1;
            self.skew = self.rng.below(100) as i64 - 50;
            self.report.leader_changes += 1;
            // It knows nothing of its predecessor's storage leases.
            self.leader_since = self.now;
            self.granted.iter_mut().for_each(|g| *g = 0);
            self.append(Input::SetEpoch { epoch: self.term })?;
        }
        self.storage_step(faults)?;
        if self.now.is_multiple_of(20) {
            self.append(Input::Tick)?;
        }
        if faults && self.replicas.len() > 1 && self.rng.chance(1) && self.rng.chance(5) {
            // A replica installs a snapshot of replica 0 instead of its own history.
            let r = 1 + self.rng.below(self.replicas.len() as u64 - 1) as usize;
            let snapshot = self.replicas[0].snapshot();
            let mut restored = Engine::restore(&snapshot).map_err(|e| self.fail(format!("restore: {e}")))?;
            if self.cfg.break_fencing {
                restored.break_fencing_for_negative_control();
            }
            self.replicas[r] = restored;
            self.report.restores += 1;
        }
        Ok(())
    }
}

impl World {
    /// Storage servers go down and come back, renew their leases (recording the sessions
    /// fencing that each answer carries), and take the leader's fences after a delay; the
    /// leader acknowledges a fence once every storage server recorded it or is past its lease.
    fn storage_step(&mut self, faults: bool) -> Result<(), Violation> {
        let lease = self.cfg.storage_lease_ms;
        let fencing = self.replicas[0].fencing_sessions();
        for n in 0..self.storage.len() {
            if faults && self.rng.chance(1) && self.rng.chance(5) {
                self.storage[n].down_until = self.now + self.rng.below(4 * lease);
            }
            if self.storage[n].down_until > self.now {
                continue;
            }
            if self.now >= self.storage[n].next_renewal {
                // The answer carries the sessions fencing; they are recorded before the lease
                // is taken, which ends the drift margin before the leader's view of it.
                let until = self.now + lease - lease / 10;
                self.storage[n].fenced.extend(fencing.iter().copied());
                self.storage[n].lease_until = until;
                self.storage[n].next_renewal = self.now + lease / 3;
                self.granted[n] = self.now + lease;
                self.checker.storage_fenced(n as u64, fencing.iter().copied());
                self.checker.storage_lease(n as u64, until);
            }
        }
        if self.cfg.break_storage_fence {
            let due: Vec<SessionId> = self.fence_due.iter().filter(|(_, t)| **t <= self.now).map(|(s, _)| *s).collect();
            for s in due {
                self.fence_due.remove(&s);
                self.append(Input::FenceAck { session: s })?;
            }
            return Ok(());
        }
        self.acked.retain(|s, _| fencing.contains(s));
        for s in fencing {
            for n in 0..self.storage.len() {
                let up = self.storage[n].down_until <= self.now;
                if up && !self.acked.get(&s).is_some_and(|a| a.contains(&n)) && self.rng.chance(10) {
                    self.storage[n].fenced.insert(s);
                    self.checker.storage_fenced(n as u64, [s]);
                    self.acked.entry(s).or_default().insert(n);
                }
            }
            let horizon = |n: usize| self.granted[n].max(self.leader_since + lease);
            let missing = (0..self.storage.len())
                .any(|n| !self.acked.get(&s).is_some_and(|a| a.contains(&n)) && self.now < horizon(n));
            if !missing {
                self.append(Input::FenceAck { session: s })?;
            }
        }
        Ok(())
    }
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// Runs one seed.
pub fn run(seed: u64, cfg: &Config) -> Result<Report, Violation> {
    let mut replicas: Vec<Engine> = (0..cfg.replicas.max(1)).map(|_| Engine::default()).collect();
    if cfg.break_fencing {
        replicas.iter_mut().for_each(Engine::break_fencing_for_negative_control);
    }
    let mut w = World {
        seed,
        cfg: cfg.clone(),
        rng: Rng::new(seed),
        now: 0,
        replicas,
        clients: (0..cfg.clients)
            .map(|_| Client {
                session: SessionId(0),
                state: ClientState::Closed,
                next_lock: 0,
                paused_until: 0,
                next_heartbeat: 0,
            })
            .collect(),
        inflight: VecDeque::new(),
        term: 1,
        skew: 0,
        next_session: 0,
        fence_due: BTreeMap::new(),
        last_arrival: BTreeMap::new(),
        checker: Checker::default(),
        report: Report::default(),
        storage: vec![StorageNode::default(); cfg.storage_servers],
        granted: vec![0; cfg.storage_servers],
        leader_since: 0,
        acked: BTreeMap::new(),
    };
    for n in 0..cfg.storage_servers {
        w.checker.storage_server(n as u64);
    }
    w.append(Input::SetEpoch { epoch: 1 })?;
    let end = cfg.fault_ms + cfg.heal_ms;
    while w.now < end {
        let faults = w.now < cfg.fault_ms;
        while let Some((t, _)) = w.inflight.front()
            && *t <= w.now
        {
            let (_, input) = w.inflight.pop_front().expect("front");
            w.append(input)?;
        }
        w.leader_step(faults)?;
        for i in 0..w.clients.len() {
            w.client_step(i, faults)?;
        }
        w.now += 1;
    }
    // Healed: nothing may still wait, in any client or in the table.
    let stuck: Vec<_> =
        w.clients.iter().filter(|c| matches!(c.state, ClientState::Waiting { .. })).map(|c| c.session).collect();
    if !stuck.is_empty() {
        return Err(w.fail(format!("sessions {stuck:?} still wait {} ms after the faults stopped", cfg.heal_ms)));
    }
    let waiting = w.replicas[0].stats().requests_waiting;
    if waiting > 0 {
        return Err(w.fail(format!("{waiting} requests still queued after healing")));
    }
    w.replicas[0].check_invariants();
    Ok(w.report)
}
