//! What the lock service counts for `/metrics` (issue 15), on the server each session is
//! attached to, so a request is counted once in the cluster however many servers apply it:
//! lock requests by mode and outcome, the time to a first answer and the time spent waiting,
//! revokes sent and answered, deadlocks, expiries. Without a recorder installed (the
//! simulation, tests in process) the macros do nothing.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use lockengine::{LockId, Output, SessionId};
use metrics::{counter, histogram};
use tokio::time::Instant;

use crate::machine::Applied;
use crate::quota::QuotaBook;

/// Requests whose arrival a session remembers at most (those a gateway answers never reach
/// the log, so the map is cut back when it fills).
const REMEMBERED_MAX: usize = 4096;

/// When each of a session's lock requests arrived, by request id, with its mode.
#[derive(Debug, Clone, Default)]
pub struct Arrivals(Arc<Mutex<HashMap<u64, (Instant, &'static str)>>>);

impl Arrivals {
    pub fn lock_request(&self, request: u64, mode: i32) {
        let mut m = self.0.lock().expect("arrivals");
        if m.len() >= REMEMBERED_MAX {
            m.clear();
        }
        m.insert(request, (Instant::now(), mode_name(mode)));
    }

    fn take(&self, request: u64) -> Option<(Instant, &'static str)> {
        self.0.lock().expect("arrivals").remove(&request)
    }
}

fn mode_name(m: i32) -> &'static str {
    ["NL", "CR", "CW", "PR", "PW", "EX"].get(m as usize).copied().unwrap_or("?")
}

/// One session's counts, fed every entry applied for it.
#[derive(Debug, Default)]
pub struct SessionMetrics {
    pub arrivals: Arrivals,
    waiting: HashMap<LockId, (Instant, &'static str)>,
    revoked: HashSet<LockId>,
    /// The locks it holds or waits for, counted against its identity's quota on this server.
    held: HashSet<LockId>,
    /// Of those, the ones waiting (against the waiters quota).
    queued: HashSet<LockId>,
    book: Option<(Arc<QuotaBook>, String)>,
}

impl SessionMetrics {
    pub fn new(book: Arc<QuotaBook>, identity: String) -> SessionMetrics {
        SessionMetrics { book: Some((book, identity)), ..SessionMetrics::default() }
    }

    fn hold(&mut self, lock: LockId, holds: bool) {
        let changed = if holds { self.held.insert(lock) } else { self.held.remove(&lock) };
        if changed && let Some((book, identity)) = &self.book {
            book.locks_changed(identity, if holds { 1 } else { -1 });
        }
    }

    fn wait(&mut self, lock: LockId, waits: bool) {
        let changed = if waits { self.queued.insert(lock) } else { self.queued.remove(&lock) };
        if changed && let Some((book, identity)) = &self.book {
            book.waiters_changed(identity, if waits { 1 } else { -1 });
        }
    }

    /// The stream ended: its locks no longer count here.
    pub fn finish(&mut self) {
        if let Some((book, identity)) = &self.book {
            book.locks_changed(identity, -(self.held.len() as i64));
            book.waiters_changed(identity, -(self.queued.len() as i64));
        }
        self.held.clear();
        self.queued.clear();
    }

    pub fn applied(&mut self, session: SessionId, a: &Applied) {
        for o in &a.reply.outputs {
            match o {
                Output::Granted { session: s, lock, .. } if *s == session => {
                    self.hold(*lock, true);
                    self.wait(*lock, false);
                }
                Output::Queued { session: s, lock } if *s == session => {
                    self.hold(*lock, true);
                    self.wait(*lock, true);
                }
                Output::Released { session: s, lock }
                | Output::Cancelled { session: s, lock }
                | Output::Deadlock { session: s, lock }
                    if *s == session =>
                {
                    self.hold(*lock, false);
                    self.wait(*lock, false);
                }
                Output::Expired { session: s } if *s == session => self.finish(),
                _ => {}
            }
        }
        self.count(session, a);
    }

    fn count(&mut self, session: SessionId, a: &Applied) {
        let asked = a.origin.filter(|o| o.session == session).and_then(|o| self.arrivals.take(o.request));
        let mut answered = false;
        for o in &a.reply.outputs {
            let outcome = match o {
                Output::Granted { session: s, lock, .. } | Output::Converted { session: s, lock, .. }
                    if *s == session =>
                {
                    if let Some((since, mode)) = self.waiting.remove(lock) {
                        histogram!("stripelock_lock_wait_seconds", "mode" => mode)
                            .record(since.elapsed().as_secs_f64());
                    }
                    "granted"
                }
                Output::Queued { session: s, lock } if *s == session => {
                    if let Some((since, mode)) = asked {
                        if self.waiting.len() >= REMEMBERED_MAX {
                            self.waiting.clear();
                        }
                        self.waiting.insert(*lock, (since, mode));
                    }
                    "queued"
                }
                Output::Busy { session: s, .. } if *s == session => "busy",
                Output::Deadlock { session: s, lock } if *s == session => {
                    self.waiting.remove(lock);
                    counter!("stripelock_deadlocks_total").increment(1);
                    "deadlock"
                }
                Output::Rejected { .. } if asked.is_some() => "refused",
                Output::Cancelled { session: s, lock } if *s == session => {
                    self.waiting.remove(lock);
                    continue;
                }
                Output::Revoke { session: s, lock } if *s == session => {
                    counter!("stripelock_revokes_sent_total").increment(1);
                    if self.revoked.len() < REMEMBERED_MAX {
                        self.revoked.insert(*lock);
                    }
                    continue;
                }
                Output::Released { session: s, lock } if *s == session => {
                    if self.revoked.remove(lock) {
                        counter!("stripelock_revokes_answered_total").increment(1);
                    }
                    continue;
                }
                Output::Expired { session: s } if *s == session => {
                    counter!("stripelock_sessions_expired_total").increment(1);
                    continue;
                }
                _ => continue,
            };
            // The first answer to a request of this session: its outcome and how long it took.
            if let Some((since, mode)) = asked.filter(|_| !answered) {
                answered = true;
                counter!("stripelock_lock_requests_total", "mode" => mode, "outcome" => outcome).increment(1);
                histogram!("stripelock_lock_answer_seconds", "mode" => mode, "outcome" => outcome)
                    .record(since.elapsed().as_secs_f64());
            }
        }
    }
}
