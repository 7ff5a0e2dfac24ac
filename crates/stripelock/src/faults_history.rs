//! The fault campaign's history and its checker (pure: records in, violations out).
//!
//! Every worker appends one JSON line per thing it saw, stamped with the machine's monotonic
//! clock in microseconds (one clock for every network namespace of the machine, so the
//! histories of different processes can be compared). The checker then asks:
//! - **Mutual exclusion.** A lock is valid, as its holder may use it, from when the grant
//!   reached the holder until it sent the release or its session's lease (as the client
//!   counts it, drift margin included) ran out, whichever came first. No two conflicting
//!   locks on overlapping bytes of one resource may be valid at once.
//! - **Tokens.** A conflicting grant that came after another one ended carries a larger token.
//! - **No stale write accepted.** Of two acknowledged writes to overlapping bytes of a file,
//!   where one was acknowledged before the other was sent, the later one carries the larger
//!   token (a write with an older token landing later is a write storage should have refused).
//! - **No lost update.** Each counter is incremented under an EX lock (read it, write it plus
//!   one): no two acknowledged increments wrote the same value, and the counter ends at a
//!   value some increment wrote, at least the highest acknowledged one.
//! - **No acknowledged write lost, files read back as the history says.** Each worker writes
//!   its own file with data drawn from (worker, sequence number); replaying its writes in order
//!   (an acknowledged write sets its bytes, one whose answer never came lets them be either
//!   the old or the new value) must give the file's final bytes.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// One line of a worker's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// A lock the worker held from `t_grant` to `t_end` (µs).
    Held { worker: u64, resource: String, start: u64, end: u64, mode: String, token: u64, t_grant: u64, t_end: u64 },
    /// A session the worker opened (the leak check looks for its locks at the end).
    Session { worker: u64, session: u64 },
    /// A lock request that was not granted (timed out, refused, the session lost).
    Refused { worker: u64, resource: String, why: String },
    /// A counter increment: read `read` (asked at `t_read`) under the lock with `token`, wrote
    /// `read + 1`.
    Incr { worker: u64, file: String, token: u64, read: u64, t_read: u64, t_sent: u64, t_answer: u64, acked: bool },
    /// A write of `len` bytes at `offset` of the worker's own file, data `data_of(worker, seq, len)`.
    Write {
        worker: u64,
        file: String,
        seq: u64,
        offset: u64,
        len: u64,
        token: u64,
        t_sent: u64,
        t_answer: u64,
        acked: bool,
    },
}

/// The deterministic data of a worker's write number `seq`.
pub fn data_of(worker: u64, seq: u64, len: u64) -> Vec<u8> {
    let mut x =
        worker.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seq.wrapping_mul(0xBF58_476D_1CE4_E5B9) ^ 0x94D0_49BB_1331_11EB;
    let mut out = Vec::with_capacity(len as usize);
    while out.len() < len as usize {
        // splitmix64
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(len as usize);
    out
}

/// A counter's text: 16 decimal digits.
pub const COUNTER_LEN: u64 = 16;

pub fn counter_text(v: u64) -> Vec<u8> {
    format!("{v:016}").into_bytes()
}

pub fn counter_value(bytes: &[u8]) -> Option<u64> {
    std::str::from_utf8(bytes).ok()?.trim_matches(char::from(0)).parse().ok()
}

/// What the cluster holds at the end.
#[derive(Debug, Default)]
pub struct Finals {
    /// Each counter file's final value.
    pub counters: BTreeMap<String, u64>,
    /// Each worker file's final bytes, and its size when the campaign began (zeros).
    pub files: BTreeMap<String, Vec<u8>>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Verdict {
    pub grants: u64,
    /// Grants that reached their holder only after its lease had run out.
    pub late_grants: u64,
    pub refused: u64,
    pub increments_acked: u64,
    pub increments_unknown: u64,
    pub writes_acked: u64,
    pub writes_unknown: u64,
    pub violations: Vec<String>,
}

fn conflicts(a: &str, b: &str) -> bool {
    let mode = |s: &str| lockengine::Mode::ALL.into_iter().find(|m| m.name() == s);
    match (mode(a), mode(b)) {
        (Some(a), Some(b)) => !a.compatible(b),
        _ => true,
    }
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// At most this many violations of one kind are listed (the count says how many there were).
const LISTED: usize = 20;

#[derive(Default)]
struct Found {
    list: Vec<String>,
    by_kind: BTreeMap<&'static str, u64>,
}

impl Found {
    fn add(&mut self, kind: &'static str, text: String) {
        let n = self.by_kind.entry(kind).or_default();
        *n += 1;
        if (*n as usize) <= LISTED {
            self.list.push(format!("{kind}: {text}"));
        }
    }

    fn into_list(mut self) -> Vec<String> {
        for (kind, n) in &self.by_kind {
            if *n as usize > LISTED {
                self.list.push(format!("{kind}: … {} more", *n as usize - LISTED));
            }
        }
        self.list
    }
}

pub fn check(records: &[Record], finals: &Finals) -> Verdict {
    let mut v = Verdict::default();
    let mut found = Found::default();
    check_locks(records, &mut v, &mut found);
    check_fenced_writes(records, &mut found);
    check_counters(records, finals, &mut v, &mut found);
    check_files(records, finals, &mut v, &mut found);
    v.violations = found.into_list();
    v
}

/// Mutual exclusion and token order over the locks the workers held.
fn check_locks(records: &[Record], v: &mut Verdict, found: &mut Found) {
    let mut by_resource: BTreeMap<&str, Vec<&Record>> = BTreeMap::new();
    let mut tokens: BTreeMap<(u64, u64), &Record> = BTreeMap::new();
    for r in records {
        match r {
            Record::Held { worker, token, t_grant, t_end, .. } => {
                v.grants += 1;
                if let Some(Record::Held { resource: first, t_grant: at, .. }) = tokens.insert((*worker, *token), r) {
                    found.add(
                        "one grant answered two lock requests",
                        format!(
                            "worker {worker} was given token {token} at {at} µs ({first}) and again at {t_grant} µs"
                        ),
                    );
                }
                // A grant that reached its holder after its lease ran out was never the
                // holder's to use (storage refuses its writes): not a valid lock.
                if t_end <= t_grant {
                    v.late_grants += 1;
                    continue;
                }
                by_resource.entry(r_resource(r)).or_default().push(r);
            }
            Record::Refused { .. } => v.refused += 1,
            _ => {}
        }
    }
    for (resource, mut held) in by_resource {
        held.sort_by_key(|r| match r {
            Record::Held { t_grant, .. } => *t_grant,
            _ => 0,
        });
        // Sweep in grant order keeping the locks still valid; each later grant meets them.
        let mut open: Vec<&Record> = Vec::new();
        let mut ended: Vec<&Record> = Vec::new();
        for r in held {
            let Record::Held { worker, start, end, mode, token, t_grant, t_end, .. } = r else { continue };
            let mut still = Vec::with_capacity(open.len());
            for o in open.drain(..) {
                let Record::Held { t_end: o_end, .. } = o else { continue };
                if *o_end > *t_grant { still.push(o) } else { ended.push(o) }
            }
            open = still;
            for o in &open {
                let Record::Held { worker: ow, start: os, end: oe, mode: om, token: ot, .. } = o else { continue };
                if overlaps((*start, *end), (*os, *oe)) && conflicts(mode, om) {
                    found.add(
                        "two conflicting locks valid at once",
                        format!(
                            "{resource}: worker {worker} {mode} {start}..{end} token {token} granted while worker {ow} \
                             {om} {os}..{oe} token {ot} was still valid"
                        ),
                    );
                }
            }
            // Token order against every conflicting lock that had ended (kept bounded: the
            // newest few hundred are the ones a bug would show against).
            if ended.len() > 512 {
                ended.drain(..ended.len() - 512);
            }
            for o in &ended {
                let Record::Held { start: os, end: oe, mode: om, token: ot, .. } = o else { continue };
                if overlaps((*start, *end), (*os, *oe)) && conflicts(mode, om) && token <= ot {
                    found.add(
                        "token not above an earlier conflicting token",
                        format!(
                            "{resource}: worker {worker} {mode} {start}..{end} got token {token} after {om} token {ot}"
                        ),
                    );
                }
            }
            let _ = t_end;
            open.push(r);
        }
    }
}

fn r_resource(r: &Record) -> &str {
    match r {
        Record::Held { resource, .. } | Record::Refused { resource, .. } => resource,
        Record::Incr { file, .. } | Record::Write { file, .. } => file,
        Record::Session { .. } => "",
    }
}

/// A lock as the fenced-write check needs it: (grant time, token, start, end, mode).
type GrantAt<'a> = (u64, u64, u64, u64, &'a str);

/// Fence before re-grant: once a conflicting lock on the bytes was granted to another holder
/// (a larger token), a write sent under the older lock must be refused. One acknowledged is a
/// write storage took with a fenced token.
fn check_fenced_writes(records: &[Record], found: &mut Found) {
    // Per file: (grant time, token, start, end, mode) of every lock held, by grant time.
    let mut grants: BTreeMap<&str, Vec<GrantAt<'_>>> = BTreeMap::new();
    for r in records {
        if let Record::Held { resource, start, end, mode, token, t_grant, .. } = r {
            grants.entry(resource).or_default().push((*t_grant, *token, *start, *end, mode));
        }
    }
    for g in grants.values_mut() {
        g.sort_unstable();
    }
    for r in records {
        let (worker, file, token, range, t_sent) = match r {
            Record::Incr { worker, file, token, t_sent, acked: true, .. } => {
                (worker, file, token, (0, COUNTER_LEN), t_sent)
            }
            Record::Write { worker, file, token, offset, len, t_sent, acked: true, .. } => {
                (worker, file, token, (*offset, offset + len), t_sent)
            }
            _ => continue,
        };
        let Some(g) = grants.get(file.as_str()) else { continue };
        let before = g.partition_point(|(t, ..)| t < t_sent);
        if let Some((_, newer, ..)) =
            g[..before].iter().find(|(_, t, s, e, m)| t > token && overlaps((*s, *e), range) && conflicts(m, "PW"))
        {
            found.add(
                "write accepted with a fenced token",
                format!(
                    "{file}: worker {worker}'s write of bytes {}..{} under token {token} was acknowledged, sent after a \
                     conflicting lock (token {newer}) had been granted to another holder",
                    range.0, range.1
                ),
            );
        }
    }
}

/// Acknowledged writes to overlapping bytes, in answer order, must carry growing tokens.
fn check_token_order(file: &str, mut acked: Vec<(u64, u64, u64, u64, u64)>, found: &mut Found) {
    // (t_sent, t_answer, token, start, end)
    acked.sort_by_key(|a| a.1);
    for (i, b) in acked.iter().enumerate() {
        for a in acked[..i].iter().rev().take(256) {
            if a.1 < b.0 && overlaps((a.3, a.4), (b.3, b.4)) && b.2 < a.2 {
                found.add(
                    "write accepted with a stale token",
                    format!(
                        "{file}: bytes {}..{} written with token {} after a write with token {} was acknowledged",
                        b.3, b.4, b.2, a.2
                    ),
                );
            }
        }
    }
}

fn check_counters(records: &[Record], finals: &Finals, v: &mut Verdict, found: &mut Found) {
    let mut by_file: BTreeMap<&str, Vec<&Record>> = BTreeMap::new();
    for r in records {
        if let Record::Incr { file, .. } = r {
            by_file.entry(file).or_default().push(r);
        }
    }
    for (file, final_value) in &finals.counters {
        let incs = by_file.remove(file.as_str()).unwrap_or_default();
        let mut wrote: BTreeMap<u64, u64> = BTreeMap::new();
        let mut possible: BTreeSet<u64> = BTreeSet::from([0]);
        let mut acked = Vec::new();
        let mut highest = 0;
        for r in incs {
            let Record::Incr { worker, read, token, t_sent, t_answer, acked: ok, .. } = r else { continue };
            possible.insert(read + 1);
            if *ok {
                v.increments_acked += 1;
                highest = highest.max(read + 1);
                acked.push((*t_sent, *t_answer, *token, 0, COUNTER_LEN));
                if let Some(other) = wrote.insert(read + 1, *worker) {
                    found.add(
                        "lost update",
                        format!(
                            "{file}: workers {other} and {worker} both read {read} under an EX lock and both \
                             writes of {} were acknowledged",
                            read + 1
                        ),
                    );
                }
            } else {
                v.increments_unknown += 1;
            }
        }
        if *final_value < highest {
            found.add(
                "acknowledged write lost",
                format!("{file} ends at {final_value} but an acknowledged increment wrote {highest}"),
            );
        }
        if !possible.contains(final_value) {
            found.add("file reads back wrong", format!("{file} ends at {final_value}, a value no increment wrote"));
        }
        // A read asked after an increment was acknowledged sees at least what it wrote.
        let mut done: Vec<(u64, u64)> = incs_acked_answers(by_file_all(records, file));
        done.sort_unstable();
        let mut best = Vec::with_capacity(done.len());
        let mut m = 0;
        for (_, w) in &done {
            m = m.max(*w);
            best.push(m);
        }
        for r in by_file_all(records, file) {
            let Record::Incr { worker, read, t_read, .. } = r else { continue };
            let before = done.partition_point(|(t, _)| t < t_read);
            if before > 0 && *read < best[before - 1] {
                found.add(
                    "acknowledged write lost",
                    format!(
                        "{file}: worker {worker} read {read} under its lock after an increment to {} was acknowledged",
                        best[before - 1]
                    ),
                );
            }
        }
        check_token_order(file, acked, found);
    }
}

fn by_file_all<'a>(records: &'a [Record], file: &'a str) -> impl Iterator<Item = &'a Record> + 'a {
    records.iter().filter(move |r| matches!(r, Record::Incr { file: f, .. } if f == file))
}

/// (when answered, the value written) of a counter's acknowledged increments.
fn incs_acked_answers<'a>(incs: impl Iterator<Item = &'a Record>) -> Vec<(u64, u64)> {
    incs.filter_map(|r| match r {
        Record::Incr { read, t_answer, acked: true, .. } => Some((*t_answer, read + 1)),
        _ => None,
    })
    .collect()
}

fn check_files(records: &[Record], finals: &Finals, v: &mut Verdict, found: &mut Found) {
    let mut by_file: BTreeMap<&str, Vec<&Record>> = BTreeMap::new();
    for r in records {
        if let Record::Write { file, .. } = r {
            by_file.entry(file).or_default().push(r);
        }
    }
    for (file, bytes) in &finals.files {
        let mut writes = by_file.remove(file.as_str()).unwrap_or_default();
        // A worker's writes, in the order it made them.
        writes.sort_by_key(|r| match r {
            Record::Write { t_sent, .. } => *t_sent,
            _ => 0,
        });
        // Per byte: the values it may hold (the first is the newest).
        let mut model: Vec<Vec<u8>> = vec![vec![0]; bytes.len()];
        let mut acked = Vec::new();
        for r in writes {
            let Record::Write { worker, seq, offset, len, token, t_sent, t_answer, acked: ok, .. } = r else {
                continue;
            };
            let data = data_of(*worker, *seq, *len);
            let at = *offset as usize;
            if at + data.len() > model.len() {
                model.resize(at + data.len(), vec![0]);
            }
            for (i, b) in data.iter().enumerate() {
                let m = &mut model[at + i];
                if *ok {
                    *m = vec![*b];
                } else if !m.contains(b) {
                    m.push(*b);
                }
            }
            if *ok {
                v.writes_acked += 1;
                acked.push((*t_sent, *t_answer, *token, *offset, offset + len));
            } else {
                v.writes_unknown += 1;
            }
        }
        let mut wrong = None;
        for (i, m) in model.iter().enumerate() {
            let got = bytes.get(i).copied().unwrap_or(0);
            if !m.contains(&got) {
                wrong = Some((i, got, m.clone()));
                break;
            }
        }
        if bytes.len() > model.len() {
            wrong = Some((model.len(), bytes[model.len()], vec![]));
        }
        if let Some((i, got, want)) = wrong {
            found.add(
                "file reads back wrong",
                format!("{file}: byte {i} is {got:#04x}, the history allows only {want:02x?}"),
            );
        }
        check_token_order(file, acked, found);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(worker: u64, mode: &str, range: (u64, u64), token: u64, t: (u64, u64)) -> Record {
        Record::Held {
            worker,
            resource: "/r".into(),
            start: range.0,
            end: range.1,
            mode: mode.into(),
            token,
            t_grant: t.0,
            t_end: t.1,
        }
    }

    fn incr(worker: u64, read: u64, token: u64, t: (u64, u64), acked: bool) -> Record {
        Record::Incr {
            worker,
            file: "/c".into(),
            token,
            read,
            t_read: t.0.saturating_sub(1),
            t_sent: t.0,
            t_answer: t.1,
            acked,
        }
    }

    fn counters(v: u64) -> Finals {
        Finals { counters: BTreeMap::from([("/c".to_string(), v)]), ..Default::default() }
    }

    #[test]
    fn overlapping_exclusive_locks_are_a_violation_and_disjoint_ones_are_not() {
        let ok = [held(1, "EX", (0, 10), 1, (0, 100)), held(2, "EX", (0, 10), 2, (101, 200))];
        assert!(check(&ok, &Finals::default()).violations.is_empty());
        let shared = [held(1, "PR", (0, 10), 1, (0, 100)), held(2, "PR", (0, 10), 2, (50, 200))];
        assert!(check(&shared, &Finals::default()).violations.is_empty());
        let apart = [held(1, "EX", (0, 10), 1, (0, 100)), held(2, "EX", (10, 20), 2, (50, 200))];
        assert!(check(&apart, &Finals::default()).violations.is_empty());
        let bad = [held(1, "EX", (0, 10), 1, (0, 100)), held(2, "PR", (5, 20), 2, (99, 200))];
        let v = check(&bad, &Finals::default());
        assert_eq!(v.violations.len(), 1, "{:?}", v.violations);
        assert!(v.violations[0].starts_with("two conflicting locks valid at once"));
    }

    #[test]
    fn one_token_given_twice_is_a_violation_and_a_grant_after_the_lease_is_not_a_lock() {
        let twice = [held(1, "EX", (0, 10), 5, (0, 100)), held(1, "EX", (0, 10), 5, (200, 300))];
        let v = check(&twice, &Finals::default());
        assert!(v.violations.iter().any(|s| s.starts_with("one grant answered two")), "{:?}", v.violations);
        let late = [held(1, "EX", (0, 10), 5, (0, 300)), held(2, "EX", (0, 10), 4, (350, 350))];
        let v = check(&late, &Finals::default());
        assert!(v.violations.is_empty(), "{:?}", v.violations);
        assert_eq!(v.late_grants, 1);
    }

    #[test]
    fn a_later_conflicting_grant_with_a_smaller_token_is_a_violation() {
        let bad = [held(1, "EX", (0, 10), 5, (0, 100)), held(2, "PW", (0, 10), 4, (101, 200))];
        let v = check(&bad, &Finals::default());
        assert!(v.violations.iter().any(|s| s.starts_with("token not above")), "{:?}", v.violations);
    }

    #[test]
    fn counters_catch_a_lost_update_a_lost_write_and_a_stale_token() {
        let good = [incr(1, 0, 1, (0, 10), true), incr(2, 1, 2, (20, 30), true), incr(1, 2, 3, (40, 50), false)];
        assert!(check(&good, &counters(2)).violations.is_empty());
        assert!(check(&good, &counters(3)).violations.is_empty(), "the unanswered increment may have landed");
        let lost = check(&good, &counters(1));
        assert!(lost.violations.iter().any(|s| s.starts_with("acknowledged write lost")), "{:?}", lost.violations);
        let twice = [incr(1, 0, 1, (0, 10), true), incr(2, 0, 2, (20, 30), true)];
        let v = check(&twice, &counters(1));
        assert!(v.violations.iter().any(|s| s.starts_with("lost update")), "{:?}", v.violations);
        // A stale write that landed unanswered sets the counter back: a later reader sees it.
        let back = [incr(1, 0, 1, (0, 10), true), incr(2, 1, 2, (20, 30), true), incr(3, 1, 3, (40, 50), false)];
        let v = check(&back, &counters(2));
        assert!(v.violations.iter().any(|s| s.starts_with("acknowledged write lost")), "{:?}", v.violations);
        let stale = [incr(1, 0, 5, (0, 10), true), incr(2, 1, 4, (20, 30), true)];
        let v = check(&stale, &counters(2));
        assert!(v.violations.iter().any(|s| s.starts_with("write accepted with a stale token")), "{:?}", v.violations);
    }

    #[test]
    fn files_follow_their_history_and_unanswered_writes_may_or_may_not_land() {
        let w = |seq, offset, len, acked, t| Record::Write {
            worker: 7,
            file: "/f".into(),
            seq,
            offset,
            len,
            token: seq,
            t_sent: t,
            t_answer: t + 1,
            acked,
        };
        let history = [w(1, 0, 8, true, 10), w(2, 4, 8, false, 20)];
        let mut first = data_of(7, 1, 8);
        first.resize(16, 0);
        let mut both = first.clone();
        both[4..12].copy_from_slice(&data_of(7, 2, 8));
        for bytes in [first.clone(), both] {
            let f = Finals { files: BTreeMap::from([("/f".to_string(), bytes)]), ..Default::default() };
            assert!(check(&history, &f).violations.is_empty());
        }
        let mut lost = first;
        lost[0] ^= 1;
        let f = Finals { files: BTreeMap::from([("/f".to_string(), lost)]), ..Default::default() };
        let v = check(&history, &f);
        assert!(v.violations.iter().any(|s| s.starts_with("file reads back wrong")), "{:?}", v.violations);
    }

    #[test]
    fn a_write_acknowledged_after_its_lock_went_to_another_is_a_violation() {
        let h = |worker, token, t| Record::Held {
            worker,
            resource: "/c".into(),
            start: 0,
            end: COUNTER_LEN,
            mode: "EX".into(),
            token,
            t_grant: t,
            t_end: t + 5,
        };
        let (first, second) = (h(1, 1, 0), h(2, 2, 100));
        let late = incr(1, 0, 1, (150, 160), true);
        let v = check(&[first.clone(), second.clone(), late], &counters(1));
        assert!(v.violations.iter().any(|s| s.starts_with("write accepted with a fenced token")), "{:?}", v.violations);
        let refused = incr(1, 0, 1, (150, 160), false);
        assert!(check(&[first, second, refused], &counters(0)).violations.is_empty());
    }

    #[test]
    fn records_round_trip_as_json_lines() {
        let r = incr(3, 9, 11, (1, 2), true);
        let line = serde_json::to_string(&r).unwrap();
        assert!(line.contains("\"kind\":\"incr\""), "{line}");
        assert_eq!(serde_json::from_str::<Record>(&line).unwrap(), r);
    }
}
