//! Lock scenarios as text: the format of `stripelock debug replay` and of the engine's scenario
//! tests. A script is one command per line; the lines after a command that start with `> ` are
//! the trace it is expected to produce. Names (sessions, locks, owners) are mapped to numbers in
//! order of first appearance, and mapped back when the trace is printed.
//!
//! ```text
//! session A lease=5000
//! lock L1 A /f 0..100 EX
//! > granted L1 EX 0..100 token=1
//! ```
//!
//! Besides the commands of the issue, `close <S>` closes a session gracefully, `evict <S>`
//! ends it as an operator would (fenced like an expiry), and `tick` steps the engine without
//! advancing time.

use std::fmt::{self, Write as _};

use rustc_hash::FxHashMap;

use crate::{
    ByteRange, Engine, Input, Limits, LockId, Mode, Output, PosixKind, PosixOwner, SessionId, Subject, ValueBlock,
};

/// A malformed script line: its number (from 1) and what was expected there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ScriptError {
    pub line: usize,
    pub message: String,
}

/// One command of a script, with the trace it produced and the trace the script expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub line: usize,
    pub command: String,
    pub expected: Vec<String>,
    pub actual: Vec<String>,
}

/// How to run a script.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub limits: Limits,
    /// Run `check_invariants` after every step (tests do; it costs a full table walk).
    pub check_invariants: bool,
}

/// Maps script names to engine numbers and back.
#[derive(Debug, Default)]
struct Names {
    sessions: FxHashMap<String, u64>,
    session_names: Vec<String>,
    locks: FxHashMap<String, u64>,
    lock_names: Vec<String>,
    owners: FxHashMap<(u64, String), u64>,
    owner_names: FxHashMap<(u64, u64), String>,
}

impl Names {
    fn session(&mut self, name: &str) -> SessionId {
        let next = self.session_names.len() as u64 + 1;
        let id = *self.sessions.entry(name.to_string()).or_insert(next);
        if id == next {
            self.session_names.push(name.to_string());
        }
        SessionId(id)
    }

    fn lock(&mut self, name: &str) -> LockId {
        let next = self.lock_names.len() as u64 + 1;
        let id = *self.locks.entry(name.to_string()).or_insert(next);
        if id == next {
            self.lock_names.push(name.to_string());
        }
        LockId(id)
    }

    fn owner(&mut self, session: &str, owner: &str) -> PosixOwner {
        let session = self.session(session);
        let next = self.owner_names.len() as u64 + 1;
        let owner_id = *self.owners.entry((session.0, owner.to_string())).or_insert(next);
        self.owner_names.entry((session.0, owner_id)).or_insert_with(|| owner.to_string());
        PosixOwner { session, owner: owner_id }
    }

    fn session_name(&self, s: SessionId) -> &str {
        &self.session_names[s.0 as usize - 1]
    }

    fn lock_name(&self, l: LockId) -> &str {
        &self.lock_names[l.0 as usize - 1]
    }

    fn owner_name(&self, o: PosixOwner) -> String {
        format!("{}:{}", self.session_name(o.session), self.owner_names[&(o.session.0, o.owner)])
    }
}

/// A script being run: the engine, the clock and the names.
#[derive(Debug)]
pub struct Replay {
    engine: Engine,
    now_ms: u64,
    names: Names,
    check_invariants: bool,
}

impl Replay {
    pub fn new(options: Options) -> Replay {
        Replay {
            engine: Engine::new(options.limits),
            now_ms: 0,
            names: Names::default(),
            check_invariants: options.check_invariants,
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Runs one command line (no comment, no expectation) and returns its trace lines.
    pub fn run_line(&mut self, line_no: usize, line: &str) -> Result<Vec<String>, ScriptError> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let err = |message: String| ScriptError { line: line_no, message };
        let input = match self.parse(&words) {
            Ok(Parsed::Input(input)) => input,
            Ok(Parsed::At(ms)) => {
                if ms < self.now_ms {
                    return Err(err(format!("time goes back: `at {ms}` after `at {}`", self.now_ms)));
                }
                self.now_ms = ms;
                Input::Tick
            }
            Err(message) => return Err(err(message)),
        };
        let outputs = self.engine.step(self.now_ms, input);
        if self.check_invariants {
            self.engine.check_invariants();
        }
        Ok(outputs.iter().map(|o| self.format(o)).collect())
    }

    fn parse(&mut self, w: &[&str]) -> Result<Parsed, String> {
        let Some(&command) = w.first() else {
            return Err("empty command".into());
        };
        let usage = |u: &str| format!("expected `{u}`, found `{}`", w.join(" "));
        let n = self.names_mut();
        let input = match command {
            "session" => {
                const U: &str = "session <S> [lease=<ms>]";
                let lease_ms = match w.get(2) {
                    None => 10_000,
                    Some(opt) => match opt.strip_prefix("lease=").and_then(|v| v.parse().ok()) {
                        Some(ms) => ms,
                        None => return Err(usage(U)),
                    },
                };
                if w.len() < 2 || w.len() > 3 || w[1].contains(':') {
                    return Err(usage(U));
                }
                Input::OpenSession { session: n.session(w[1]), lease_ms }
            }
            "at" => {
                let ms = match w {
                    [_, ms] => ms.parse().map_err(|_| usage("at <ms>"))?,
                    _ => return Err(usage("at <ms>")),
                };
                return Ok(Parsed::At(ms));
            }
            "tick" if w.len() == 1 => Input::Tick,
            "renew" | "fence-ack" | "close" | "evict" if w.len() == 2 => {
                let session = n.session(w[1]);
                match command {
                    "renew" => Input::Renew { session },
                    "close" => Input::CloseSession { session },
                    "evict" => Input::Evict { session },
                    _ => Input::FenceAck { session },
                }
            }
            "epoch" => match w {
                [_, e] => Input::SetEpoch { epoch: e.parse().map_err(|_| usage("epoch <n>"))? },
                _ => return Err(usage("epoch <n>")),
            },
            "lock" => {
                const U: &str = "lock <L> <S> <resource> <range> <mode> [nowait]";
                if !(w.len() == 6 || (w.len() == 7 && w[6] == "nowait")) {
                    return Err(usage(U));
                }
                let range = parse_range(w[4]).ok_or_else(|| usage(U))?;
                let mode = Mode::parse(w[5]).ok_or_else(|| usage(U))?;
                Input::Lock {
                    lock: n.lock(w[1]),
                    session: n.session(w[2]),
                    resource: w[3].to_string(),
                    range,
                    mode,
                    nowait: w.len() == 7,
                }
            }
            "convert" => {
                const U: &str = "convert <L> <mode> [<range>]";
                if !(3..=4).contains(&w.len()) {
                    return Err(usage(U));
                }
                let mode = Mode::parse(w[2]).ok_or_else(|| usage(U))?;
                let range = match w.get(3) {
                    Some(r) => Some(parse_range(r).ok_or_else(|| usage(U))?),
                    None => None,
                };
                Input::Convert { lock: n.lock(w[1]), mode, range }
            }
            "release" | "cancel" | "cache" if w.len() == 2 => {
                let lock = n.lock(w[1]);
                match command {
                    "release" => Input::Release { lock },
                    "cancel" => Input::Cancel { lock },
                    _ => Input::Cache { lock },
                }
            }
            "lvb" => match w {
                [_, l, v] => Input::SetValue { lock: n.lock(l), value: v.as_bytes().to_vec() },
                _ => return Err(usage("lvb <L> <value>")),
            },
            "posix" => {
                const U: &str = "posix <S>:<owner> <resource> <range> <r|w|u> [wait]";
                if !(w.len() == 5 || (w.len() == 6 && w[5] == "wait")) {
                    return Err(usage(U));
                }
                let owner = parse_owner(n, w[1]).ok_or_else(|| usage(U))?;
                let range = parse_range(w[3]).ok_or_else(|| usage(U))?;
                let kind = match w[4] {
                    "r" => PosixKind::Read,
                    "w" => PosixKind::Write,
                    "u" => PosixKind::Unlock,
                    _ => return Err(usage(U)),
                };
                Input::Posix { owner, resource: w[2].to_string(), range, kind, wait: w.len() == 6 }
            }
            "posix-test" => {
                const U: &str = "posix-test <S>:<owner> <resource> <range> <r|w>";
                if w.len() != 5 {
                    return Err(usage(U));
                }
                let owner = parse_owner(n, w[1]).ok_or_else(|| usage(U))?;
                let range = parse_range(w[3]).ok_or_else(|| usage(U))?;
                let kind = match w[4] {
                    "r" => PosixKind::Read,
                    "w" => PosixKind::Write,
                    _ => return Err(usage(U)),
                };
                Input::PosixTest { owner, resource: w[2].to_string(), range, kind }
            }
            "posix-cancel" => {
                const U: &str = "posix-cancel <S>:<owner> <resource>";
                if w.len() != 3 {
                    return Err(usage(U));
                }
                let owner = parse_owner(n, w[1]).ok_or_else(|| usage(U))?;
                Input::PosixCancel { owner, resource: w[2].to_string() }
            }
            "renew" | "fence-ack" | "close" | "evict" => return Err(usage(&format!("{command} <S>"))),
            "release" | "cancel" | "cache" => return Err(usage(&format!("{command} <L>"))),
            "tick" => return Err(usage("tick")),
            other => {
                return Err(format!(
                    "unknown command `{other}`: expected one of session, at, renew, epoch, lock, convert, \
                     release, cancel, cache, lvb, fence-ack, evict, posix, posix-test, posix-cancel, close, tick"
                ));
            }
        };
        Ok(Parsed::Input(input))
    }

    fn names_mut(&mut self) -> &mut Names {
        &mut self.names
    }

    /// One trace line for one engine output.
    pub fn format(&self, o: &Output) -> String {
        let n = &self.names;
        let mut s = String::new();
        let value = |s: &mut String, v: &ValueBlock| match v {
            ValueBlock::Empty => {}
            ValueBlock::Invalid => s.push_str(" lvb=invalid"),
            ValueBlock::Value(v) => {
                let _ = write!(s, " lvb={}", String::from_utf8_lossy(v));
            }
        };
        let _ = match o {
            Output::Granted { lock, mode, range, token, value: v, reused, .. } => {
                let _ = write!(s, "granted {} {mode} {range} token={token}", n.lock_name(*lock));
                value(&mut s, v);
                if *reused {
                    s.push_str(" reused=yes");
                }
                Ok(())
            }
            Output::Converted { lock, mode, range, token, value: v, .. } => {
                let _ = write!(s, "converted {} {mode} {range} token={token}", n.lock_name(*lock));
                value(&mut s, v);
                Ok(())
            }
            Output::Queued { lock, .. } => write!(s, "queued {}", n.lock_name(*lock)),
            Output::Busy { lock, blockers, .. } => {
                let names: Vec<&str> = blockers.iter().map(|b| n.lock_name(*b)).collect();
                write!(s, "busy {} blockers={}", n.lock_name(*lock), names.join(","))
            }
            Output::Revoke { lock, .. } => write!(s, "revoke {}", n.lock_name(*lock)),
            Output::Deadlock { lock, .. } => write!(s, "deadlock {}", n.lock_name(*lock)),
            Output::Released { lock, .. } => write!(s, "released {}", n.lock_name(*lock)),
            Output::Cancelled { lock, .. } => write!(s, "cancelled {}", n.lock_name(*lock)),
            Output::Expired { session } => write!(s, "expired {}", n.session_name(*session)),
            Output::Fence { session } => write!(s, "fence {}", n.session_name(*session)),
            Output::PosixGranted { owner, resource, range, kind } => {
                write!(s, "posix-granted {} {resource} {range} {}", n.owner_name(*owner), kind.letter())
            }
            Output::PosixUnlocked { owner, resource, range } => {
                write!(s, "posix-unlocked {} {resource} {range}", n.owner_name(*owner))
            }
            Output::PosixQueued { owner, resource, range, kind } => {
                write!(s, "posix-queued {} {resource} {range} {}", n.owner_name(*owner), kind.letter())
            }
            Output::PosixBusy { owner, conflict, range, kind } => write!(
                s,
                "posix-busy {} conflict={} {range} {}",
                n.owner_name(*owner),
                n.owner_name(*conflict),
                kind.letter()
            ),
            Output::PosixFree { owner } => write!(s, "posix-free {}", n.owner_name(*owner)),
            Output::PosixDeadlock { owner } => write!(s, "posix-deadlock {}", n.owner_name(*owner)),
            Output::PosixCancelled { owner, resource, range } => {
                write!(s, "posix-cancelled {} {resource} {range}", n.owner_name(*owner))
            }
            Output::Rejected { subject, error } => {
                let what = match subject {
                    Subject::Session(x) => n.session_name(*x).to_string(),
                    Subject::Lock(x) => n.lock_name(*x).to_string(),
                    Subject::Owner(x) => n.owner_name(*x),
                    Subject::Epoch => "epoch".to_string(),
                };
                write!(s, "error {what} {error}")
            }
        };
        s
    }
}

enum Parsed {
    Input(Input),
    At(u64),
}

/// `A..B`, `A..` (to end of file) or `all`.
pub fn parse_range(s: &str) -> Option<ByteRange> {
    if s == "all" {
        return Some(ByteRange::ALL);
    }
    let (a, b) = s.split_once("..")?;
    let start = a.parse().ok()?;
    let end = if b.is_empty() { u64::MAX } else { b.parse().ok()? };
    // Inverted and empty ranges parse; the engine rejects them with its own error.
    Some(ByteRange { start, end })
}

fn parse_owner(n: &mut Names, s: &str) -> Option<PosixOwner> {
    let (session, owner) = s.split_once(':')?;
    (!session.is_empty() && !owner.is_empty()).then(|| n.owner(session, owner))
}

/// Runs a whole script. Commands after the first malformed line are not run.
pub fn run(text: &str, options: Options) -> Result<Vec<Step>, ScriptError> {
    let mut replay = Replay::new(options);
    let mut steps: Vec<Step> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = raw.trim();
        if let Some(expected) = line.strip_prefix('>') {
            let Some(step) = steps.last_mut() else {
                return Err(ScriptError { line: line_no, message: "expected trace before any command".into() });
            };
            step.expected.push(expected.trim().to_string());
            continue;
        }
        let command = line.split('#').next().unwrap_or("").trim();
        if command.is_empty() {
            continue;
        }
        let actual = replay.run_line(line_no, command)?;
        steps.push(Step { line: line_no, command: command.to_string(), expected: Vec::new(), actual });
    }
    Ok(steps)
}

/// The differences between expected and actual traces, one block per mismatching command.
pub fn mismatches(steps: &[Step]) -> Vec<String> {
    steps
        .iter()
        .filter(|s| s.expected != s.actual)
        .map(|s| {
            let mut m = format!("line {}: {}\n", s.line, s.command);
            for e in &s.expected {
                let _ = writeln!(m, "  - {e}");
            }
            for a in &s.actual {
                let _ = writeln!(m, "  + {a}");
            }
            m
        })
        .collect()
}

/// The script with every expectation replaced by the actual trace (for `--bless`).
pub fn bless(text: &str, steps: &[Step]) -> String {
    let mut by_line: FxHashMap<usize, &Step> = FxHashMap::default();
    for s in steps {
        by_line.insert(s.line, s);
    }
    let mut out = String::new();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim_start().starts_with('>') {
            continue;
        }
        out.push_str(raw);
        out.push('\n');
        if let Some(step) = by_line.get(&(i + 1)) {
            for a in &step.actual {
                out.push_str("> ");
                out.push_str(a);
                out.push('\n');
            }
        }
    }
    out
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for a in &self.actual {
            writeln!(f, "{a}")?;
        }
        Ok(())
    }
}
