//! Property tests: random operation sequences run through the engine and through a naive
//! reference model (a plain list of locks, every check a full scan), comparing every decision
//! after every step, with `check_invariants` after each step.
//!
//! Deadlock victims are taken from the engine, and the model checks that each victim really was
//! on a wait-for cycle and that no cycle is left afterwards (which victim is youngest is pinned
//! by the scenario files).

use std::collections::BTreeMap;

use lockengine::{ByteRange, Engine, EngineError, Input, LockId, Mode, Output, PosixKind, PosixOwner, SessionId};
use proptest::prelude::*;

const SESSIONS: u64 = 3;
const RESOURCES: [&str; 2] = ["r0", "r1"];
const LOCK_IDS: u64 = 10;

#[derive(Debug, Clone)]
enum Op {
    Lock { lock: u64, session: u64, res: usize, range: ByteRange, mode: Mode, nowait: bool },
    Convert { lock: u64, mode: Mode, range: Option<ByteRange> },
    Release { lock: u64 },
    Cancel { lock: u64 },
    Cache { lock: u64 },
    Advance { ms: u64 },
    Renew { session: u64 },
    FenceAck { session: u64 },
    Open { session: u64 },
    Epoch,
}

fn range_strategy() -> impl Strategy<Value = ByteRange> {
    (0u64..8, 1u64..6, prop::bool::weighted(0.15)).prop_map(|(s, len, eof)| {
        if eof { ByteRange { start: s, end: u64::MAX } } else { ByteRange { start: s, end: s + len } }
    })
}

fn mode_strategy() -> impl Strategy<Value = Mode> {
    prop::sample::select(Mode::ALL.to_vec())
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..LOCK_IDS, 0..SESSIONS, 0..RESOURCES.len(), range_strategy(), mode_strategy(), prop::bool::weighted(0.2))
            .prop_map(|(lock, session, res, range, mode, nowait)| Op::Lock { lock, session, res, range, mode, nowait }),
        3 => (0..LOCK_IDS, mode_strategy(), prop::option::of(range_strategy()))
            .prop_map(|(lock, mode, range)| Op::Convert { lock, mode, range }),
        5 => (0..LOCK_IDS).prop_map(|lock| Op::Release { lock }),
        1 => (0..LOCK_IDS).prop_map(|lock| Op::Cancel { lock }),
        1 => (0..LOCK_IDS).prop_map(|lock| Op::Cache { lock }),
        2 => (1u64..400).prop_map(|ms| Op::Advance { ms }),
        2 => (0..SESSIONS).prop_map(|session| Op::Renew { session }),
        1 => (0..SESSIONS).prop_map(|session| Op::FenceAck { session }),
        1 => (0..SESSIONS).prop_map(|session| Op::Open { session }),
        1 => Just(Op::Epoch),
    ]
}

#[derive(Debug, Clone)]
struct MLock {
    session: u64,
    res: usize,
    grant: Option<(Mode, ByteRange, u64)>,
    /// (mode, range, queue class, arrival)
    req: Option<(Mode, ByteRange, u8, u64)>,
    cached: bool,
    revoke_sent: bool,
}

#[derive(Debug, Clone)]
struct MSession {
    lease: u64,
    deadline: u64,
    fencing: bool,
}

/// A decision, with tokens reduced to "a new one" or "the lock's own".
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Seen {
    Granted(u64, Mode, ByteRange, bool, bool),
    Converted(u64, Mode, ByteRange, bool),
    Queued(u64),
    Busy(u64, Vec<u64>),
    Revoke(u64),
    Released(u64),
    Cancelled(u64),
    Expired(u64),
    Fence(u64),
    Error(u16),
}

#[derive(Debug, Default)]
struct Model {
    now: u64,
    seq: u64,
    locks: BTreeMap<u64, MLock>,
    sessions: BTreeMap<u64, MSession>,
}

impl Model {
    fn blockers(&self, me: Option<u64>, res: usize, mode: Mode, range: ByteRange, pos: (u8, u64)) -> Vec<u64> {
        let mut found: Vec<u64> = self
            .locks
            .iter()
            .filter(|(id, l)| Some(**id) != me && l.res == res)
            .filter(|(_, l)| {
                let granted = l.grant.is_some_and(|(m, r, _)| r.overlaps(range) && !mode.compatible(m));
                let earlier =
                    l.req.is_some_and(|(m, r, c, s)| (c, s) < pos && r.overlaps(range) && !mode.compatible(m));
                granted || earlier
            })
            .map(|(id, _)| *id)
            .collect();
        found.sort();
        found
    }

    fn revoke_cached(&mut self, blockers: &[u64], seen: &mut Vec<Seen>) {
        for b in blockers {
            let l = self.locks.get_mut(b).unwrap();
            if l.grant.is_some() && l.cached && !l.revoke_sent && l.req.is_none() {
                l.revoke_sent = true;
                seen.push(Seen::Revoke(*b));
            }
        }
    }

    fn live(&self, s: u64) -> Result<(), EngineError> {
        match self.sessions.get(&s) {
            None => Err(EngineError::UnknownSession),
            Some(m) if m.fencing => Err(EngineError::SessionExpired),
            Some(_) => Ok(()),
        }
    }

    fn owned(&self, lock: u64) -> Result<&MLock, EngineError> {
        let l = self.locks.get(&lock).ok_or(EngineError::UnknownLock)?;
        self.live(l.session)?;
        Ok(l)
    }

    fn expire(&mut self, seen: &mut Vec<Seen>) {
        let mut due: Vec<(u64, u64)> = self
            .sessions
            .iter()
            .filter(|(_, s)| !s.fencing && s.deadline < self.now)
            .map(|(id, s)| (s.deadline, *id))
            .collect();
        due.sort();
        for (_, s) in due {
            self.sessions.get_mut(&s).unwrap().fencing = true;
            seen.push(Seen::Expired(s));
            seen.push(Seen::Fence(s));
            let waiting: Vec<u64> =
                self.locks.iter().filter(|(_, l)| l.session == s && l.req.is_some()).map(|(id, _)| *id).collect();
            for id in waiting {
                self.drop_request(id);
                seen.push(Seen::Cancelled(id));
            }
        }
    }

    fn drop_request(&mut self, id: u64) {
        let l = self.locks.get_mut(&id).unwrap();
        l.req = None;
        if l.grant.is_none() {
            self.locks.remove(&id);
        }
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn apply(&mut self, op: &Op, seen: &mut Vec<Seen>) -> Result<(), EngineError> {
        match *op {
            Op::Open { session } => {
                if self.sessions.contains_key(&session) {
                    return Err(EngineError::SessionExists);
                }
                self.sessions.insert(session, MSession { lease: 1000, deadline: self.now + 1000, fencing: false });
            }
            Op::Renew { session } => {
                self.live(session)?;
                let s = self.sessions.get_mut(&session).unwrap();
                s.deadline = self.now + s.lease;
            }
            Op::FenceAck { session } => {
                match self.sessions.get(&session) {
                    None => return Err(EngineError::UnknownSession),
                    Some(s) if !s.fencing => return Err(EngineError::NotFencing),
                    _ => {}
                }
                self.sessions.remove(&session);
                let ids: Vec<u64> =
                    self.locks.iter().filter(|(_, l)| l.session == session).map(|(id, _)| *id).collect();
                for id in ids {
                    self.locks.remove(&id);
                    seen.push(Seen::Released(id));
                }
            }
            Op::Advance { .. } | Op::Epoch => {}
            Op::Lock { lock, session, res, range, mode, nowait } => {
                self.live(session)?;
                if range.start >= range.end {
                    return Err(EngineError::BadRange { start: range.start, end: range.end });
                }
                if let Some(l) = self.locks.get(&lock) {
                    if l.session != session {
                        return Err(EngineError::NotOwner);
                    }
                    return match l.grant {
                        Some((m, r, _))
                            if l.res == res && l.cached && l.req.is_none() && r.contains(range) && mode.at_most(m) =>
                        {
                            self.locks.get_mut(&lock).unwrap().cached = false;
                            seen.push(Seen::Granted(lock, m, r, false, true));
                            Ok(())
                        }
                        _ => Err(EngineError::LockExists),
                    };
                }
                let pos = (1, self.next_seq());
                let blockers = self.blockers(None, res, mode, range, pos);
                let mut l = MLock { session, res, grant: None, req: None, cached: false, revoke_sent: false };
                if blockers.is_empty() {
                    l.grant = Some((mode, range, 0));
                    self.locks.insert(lock, l);
                    seen.push(Seen::Granted(lock, mode, range, true, false));
                } else if nowait {
                    seen.push(Seen::Busy(lock, blockers.clone()));
                    self.revoke_cached(&blockers, seen);
                } else {
                    l.req = Some((mode, range, pos.0, pos.1));
                    self.locks.insert(lock, l);
                    seen.push(Seen::Queued(lock));
                    self.revoke_cached(&blockers, seen);
                }
            }
            Op::Convert { lock, mode, range } => {
                let l = self.owned(lock)?;
                let (gm, gr, _) = l.grant.ok_or(EngineError::NotGranted)?;
                if l.req.is_some() {
                    return Err(EngineError::AlreadyConverting);
                }
                let res = l.res;
                let range = range.unwrap_or(gr);
                if range.start >= range.end {
                    return Err(EngineError::BadRange { start: range.start, end: range.end });
                }
                let down = mode.at_most(gm) && gr.contains(range);
                let pos = (0, self.next_seq());
                let blockers = if down { Vec::new() } else { self.blockers(Some(lock), res, mode, range, pos) };
                let l = self.locks.get_mut(&lock).unwrap();
                l.cached = false;
                l.revoke_sent = false;
                if blockers.is_empty() {
                    l.grant = Some((mode, range, 0));
                    l.revoke_sent = false;
                    seen.push(Seen::Converted(lock, mode, range, !down));
                } else {
                    l.req = Some((mode, range, pos.0, pos.1));
                    seen.push(Seen::Queued(lock));
                    self.revoke_cached(&blockers, seen);
                }
            }
            Op::Release { lock } => {
                let l = self.owned(lock)?;
                if l.grant.is_none() {
                    return Err(EngineError::NotGranted);
                }
                self.locks.remove(&lock);
                seen.push(Seen::Released(lock));
            }
            Op::Cancel { lock } => {
                let l = self.owned(lock)?;
                if l.req.is_none() {
                    return Err(EngineError::NothingToCancel);
                }
                self.drop_request(lock);
                seen.push(Seen::Cancelled(lock));
            }
            Op::Cache { lock } => {
                let l = self.owned(lock)?;
                if l.grant.is_none() {
                    return Err(EngineError::NotGranted);
                }
                if l.req.is_some() {
                    return Err(EngineError::AlreadyConverting);
                }
                self.locks.get_mut(&lock).unwrap().cached = true;
            }
        }
        Ok(())
    }

    /// Serves every queue in order until nothing more can be granted (a conversion granted
    /// late in a pass may free a range an earlier waiter wants, so passes repeat).
    fn settle(&mut self, seen: &mut Vec<Seen>) {
        loop {
            let before = seen.len();
            self.settle_pass(seen);
            if !seen[before..].iter().any(|s| matches!(s, Seen::Granted(..) | Seen::Converted(..))) {
                return;
            }
        }
    }

    fn settle_pass(&mut self, seen: &mut Vec<Seen>) {
        for res in 0..RESOURCES.len() {
            let mut queue: Vec<((u8, u64), u64)> = self
                .locks
                .iter()
                .filter(|(_, l)| l.res == res)
                .filter_map(|(id, l)| l.req.map(|(_, _, c, s)| ((c, s), *id)))
                .collect();
            queue.sort();
            for (pos, id) in queue {
                let (mode, range, _, _) = self.locks[&id].req.unwrap();
                let blockers = self.blockers(Some(id), res, mode, range, pos);
                if blockers.is_empty() {
                    let l = self.locks.get_mut(&id).unwrap();
                    l.req = None;
                    match l.grant {
                        Some((gm, gr, _)) => {
                            let up = !(mode.at_most(gm) && gr.contains(range));
                            l.grant = Some((mode, range, 0));
                            l.revoke_sent = false;
                            seen.push(Seen::Converted(id, mode, range, up));
                        }
                        None => {
                            l.grant = Some((mode, range, 0));
                            seen.push(Seen::Granted(id, mode, range, true, false));
                        }
                    }
                } else {
                    self.revoke_cached(&blockers, seen);
                }
            }
        }
    }

    /// Owners (sessions) each waiting owner waits for.
    fn edges(&self) -> BTreeMap<u64, Vec<u64>> {
        let mut edges: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for (id, l) in &self.locks {
            if let Some((m, r, c, s)) = l.req {
                for b in self.blockers(Some(*id), l.res, m, r, (c, s)) {
                    if !self.releasable(b) {
                        edges.entry(l.session).or_default().push(self.locks[&b].session);
                    }
                }
            }
        }
        edges
    }

    fn on_cycle(&self, lock: u64) -> bool {
        let edges = self.edges();
        let start = self.locks[&lock].session;
        let l = &self.locks[&lock];
        let (m, r, c, s) = l.req.unwrap();
        let firsts: Vec<u64> = self
            .blockers(Some(lock), l.res, m, r, (c, s))
            .iter()
            .filter(|b| !self.releasable(**b))
            .map(|b| self.locks[b].session)
            .collect();
        let mut stack = firsts;
        let mut seen = std::collections::BTreeSet::new();
        while let Some(o) = stack.pop() {
            if o == start {
                return true;
            }
            if seen.insert(o) {
                stack.extend(edges.get(&o).cloned().unwrap_or_default());
            }
        }
        false
    }

    /// A cached lock is given up on revoke: waiting for it is no wait-for edge.
    fn releasable(&self, lock: u64) -> bool {
        let l = &self.locks[&lock];
        l.cached && l.grant.is_some() && l.req.is_none()
    }

    fn has_cycle(&self) -> bool {
        self.locks.iter().any(|(id, l)| l.req.is_some() && self.on_cycle(*id))
    }
}

fn input_of(op: &Op, epoch: &mut u64) -> Input {
    match *op {
        Op::Lock { lock, session, res, range, mode, nowait } => Input::Lock {
            lock: LockId(lock),
            session: SessionId(session),
            resource: RESOURCES[res].to_string(),
            range,
            mode,
            nowait,
        },
        Op::Convert { lock, mode, range } => Input::Convert { lock: LockId(lock), mode, range },
        Op::Release { lock } => Input::Release { lock: LockId(lock) },
        Op::Cancel { lock } => Input::Cancel { lock: LockId(lock) },
        Op::Cache { lock } => Input::Cache { lock: LockId(lock) },
        Op::Advance { .. } => Input::Tick,
        Op::Renew { session } => Input::Renew { session: SessionId(session) },
        Op::FenceAck { session } => Input::FenceAck { session: SessionId(session) },
        Op::Open { session } => Input::OpenSession { session: SessionId(session), lease_ms: 1000 },
        Op::Epoch => {
            *epoch += 1;
            Input::SetEpoch { epoch: *epoch }
        }
    }
}

/// Whether a grant carries a new token (above every earlier one) or keeps the lock's own; any
/// other token is a failure.
fn token_is_new(
    lock: LockId,
    token: u64,
    last: &mut u64,
    tokens: &mut BTreeMap<u64, u64>,
) -> Result<bool, TestCaseError> {
    if token > *last {
        *last = token;
        tokens.insert(lock.0, token);
        return Ok(true);
    }
    prop_assert_eq!(tokens.get(&lock.0), Some(&token), "{:?} got an old token that is not its own", lock);
    Ok(false)
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let mut engine = Engine::default();
    let mut model = Model::default();
    let mut epoch = 0;
    let mut last_token = 0u64;
    let mut tokens: BTreeMap<u64, u64> = BTreeMap::new();
    for s in 0..SESSIONS {
        engine.step(0, Input::OpenSession { session: SessionId(s), lease_ms: 1000 });
        model.sessions.insert(s, MSession { lease: 1000, deadline: 1000, fencing: false });
    }
    for (i, op) in ops.iter().enumerate() {
        if let Op::Advance { ms } = op {
            model.now += ms;
        }
        // Who each output must be addressed to: the holder of its lock before the step, or the
        // session of a lock this step creates.
        let mut holders: BTreeMap<u64, u64> = model.locks.iter().map(|(id, l)| (*id, l.session)).collect();
        if let Op::Lock { lock, session, .. } = op {
            holders.entry(*lock).or_insert(*session);
        }
        let outputs = engine.step(model.now, input_of(op, &mut epoch));
        engine.check_invariants();
        for o in &outputs {
            if let Output::Granted { session, lock, .. }
            | Output::Converted { session, lock, .. }
            | Output::Queued { session, lock }
            | Output::Busy { session, lock, .. }
            | Output::Revoke { session, lock }
            | Output::Deadlock { session, lock }
            | Output::Released { session, lock }
            | Output::Cancelled { session, lock } = o
            {
                prop_assert_eq!(Some(&session.0), holders.get(&lock.0), "{:?} addressed to the wrong session", o);
            }
        }

        let mut want = Vec::new();
        model.expire(&mut want);
        if let Err(e) = model.apply(op, &mut want) {
            want.push(Seen::Error(e.code()));
        }
        model.settle(&mut want);

        let mut got = Vec::new();
        let mut victims = Vec::new();
        for o in &outputs {
            got.push(match o {
                Output::Granted { lock, mode, range, token, reused, .. } => Seen::Granted(
                    lock.0,
                    *mode,
                    *range,
                    token_is_new(*lock, *token, &mut last_token, &mut tokens)?,
                    *reused,
                ),
                Output::Converted { lock, mode, range, token, .. } => {
                    Seen::Converted(lock.0, *mode, *range, token_is_new(*lock, *token, &mut last_token, &mut tokens)?)
                }
                Output::Queued { lock, .. } => Seen::Queued(lock.0),
                Output::Busy { lock, blockers, .. } => Seen::Busy(lock.0, blockers.iter().map(|b| b.0).collect()),
                Output::Revoke { lock, .. } => Seen::Revoke(lock.0),
                Output::Released { lock, .. } => Seen::Released(lock.0),
                Output::Cancelled { lock, .. } => Seen::Cancelled(lock.0),
                Output::Expired { session } => Seen::Expired(session.0),
                Output::Fence { session } => Seen::Fence(session.0),
                Output::Rejected { error, .. } => Seen::Error(error.code()),
                Output::Deadlock { lock, .. } => {
                    victims.push(lock.0);
                    continue;
                }
                other => return Err(TestCaseError::fail(format!("unexpected output {other:?}"))),
            });
        }
        // The engine's victims: each must be on a cycle in the model; once all are gone, none is left.
        for v in &victims {
            prop_assert!(model.locks.get(v).is_some_and(|l| l.req.is_some()), "victim {} not waiting in model", v);
            prop_assert!(model.on_cycle(*v), "victim {} was on no cycle (step {})", v, i);
            model.drop_request(*v);
            want.retain(|s| *s != Seen::Queued(*v));
            got.retain(|s| *s != Seen::Queued(*v));
            model.settle(&mut want);
        }
        prop_assert!(!model.has_cycle(), "cycle left after step {} {:?}", i, op);
        want.sort();
        got.sort();
        prop_assert_eq!(got, want, "step {} {:?}", i, op);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_naive_model(ops in prop::collection::vec(op_strategy(), 1..120)) {
        run(&ops)?;
    }
}

// ---- POSIX owners against a per-byte model -------------------------------------------------

const BYTES: u64 = 16;

#[derive(Debug, Clone)]
struct PosixOp {
    owner: u64,
    start: u64,
    len: u64,
    kind: PosixKind,
}

fn posix_op() -> impl Strategy<Value = PosixOp> {
    (0u64..3, 0..BYTES, 1u64..8, prop::sample::select(vec![PosixKind::Read, PosixKind::Write, PosixKind::Unlock]))
        .prop_map(|(owner, start, len, kind)| PosixOp { owner, start, len: len.min(BYTES - start).max(1), kind })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// F_SETLK against a model that keeps, per byte, each owner's lock: merging and splitting
    /// must leave exactly the bytes the model says, and grant or refuse exactly when it says.
    #[test]
    fn posix_matches_byte_model(ops in prop::collection::vec(posix_op(), 1..80)) {
        let mut engine = Engine::default();
        engine.step(0, Input::OpenSession { session: SessionId(1), lease_ms: 1_000_000 });
        let mut bytes: Vec<[Option<PosixKind>; 3]> = vec![[None; 3]; BYTES as usize];
        for op in &ops {
            let owner = PosixOwner { session: SessionId(1), owner: op.owner };
            let range = ByteRange::new(op.start, op.start + op.len).unwrap();
            let out = engine.step(0, Input::Posix { owner, resource: "f".into(), range, kind: op.kind, wait: false });
            engine.check_invariants();
            let span = op.start as usize..(op.start + op.len) as usize;
            let conflict = op.kind != PosixKind::Unlock && bytes[span.clone()].iter().any(|b| {
                (0..3).any(|o| o != op.owner as usize && b[o].is_some_and(|k| k.conflicts(op.kind)))
            });
            if conflict {
                prop_assert!(matches!(out[0], Output::PosixBusy { .. }), "{:?}", out);
            } else {
                prop_assert!(matches!(out[0], Output::PosixGranted { .. } | Output::PosixUnlocked { .. }), "{:?}", out);
                for b in &mut bytes[span] {
                    b[op.owner as usize] = if op.kind == PosixKind::Unlock { None } else { Some(op.kind) };
                }
            }
            // The engine's view, byte by byte, must equal the model's; ranges of one owner never
            // touch with the same kind (they would have merged).
            let view = engine.resources("f");
            let mut seen: Vec<[Option<PosixKind>; 3]> = vec![[None; 3]; BYTES as usize];
            let mut last: BTreeMap<u64, (u64, PosixKind)> = BTreeMap::new();
            for r in view.iter().flat_map(|v| &v.posix) {
                if let Some((end, kind)) = last.get(&r.owner.owner) {
                    prop_assert!(!(*end == r.range.start && *kind == r.kind), "unmerged neighbours {:?}", r);
                }
                last.insert(r.owner.owner, (r.range.end, r.kind));
                for b in r.range.start..r.range.end {
                    seen[b as usize][r.owner.owner as usize] = Some(r.kind);
                }
            }
            prop_assert_eq!(seen, bytes.clone());
        }
    }
}
