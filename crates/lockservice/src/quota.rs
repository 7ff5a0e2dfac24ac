//! Per-identity quotas (issue 15). An identity is the common name of the certificate a client
//! connected with (mutual TLS); without TLS every client is `anonymous`. A server enforces, for
//! each identity: the sessions it has open in the cluster (counted in the replicated state,
//! where each session's client text ends with ` [as NAME]`), and on this server the locks its
//! sessions attached here hold or wait for, how many of those wait, and its requests per second. Over a quota, the
//! request is refused with the quota code and a sentence naming the quota; nobody else notices.
//!
//! Bytes stored are counted in the replicated state: each file is its creator's (`Op::Owned`),
//! and an identity's bytes are the sizes of the files it created that are still there (a sparse
//! file counts its whole size). A put or a write that would take the file's owner past its
//! quota is refused before any byte is written. The check reads this server's applied state, so
//! writes of one owner in flight at once through several servers can pass it together: the
//! quota can be passed by at most what those writes add.
//!
//! A refusal is cheap, but a client that retries at once can send thousands a second and take
//! the server's time from everyone else. So refusals of one identity that follow each other
//! within a second are answered late, each twice as late as the one before, from 5 ms up to
//! 200 ms (a backoff the server enforces; a client waiting for its answer sends no more; below
//! the 250 ms a client waits for an answer at the least before it asks another server),
//! for at most [`HELD_MAX`] requests of one identity at once (beyond, at once: held requests
//! cost memory).

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::time::Instant;

/// The identity of clients without a certificate.
pub const ANONYMOUS: &str = "anonymous";

/// A request refused for its identity's quota, or a quota setting that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    #[error("{identity} has {open} sessions open, its quota")]
    Sessions { identity: String, open: u64 },
    #[error("{identity} holds or waits for {held} locks on this server, its quota")]
    Locks { identity: String, held: u64 },
    #[error(
        "{identity} has {waiting} lock requests waiting on this server, its quota; it may ask again once one is \
         granted or cancelled"
    )]
    Waiters { identity: String, waiting: u64 },
    #[error("{identity} is over its quota of {rps} requests per second on this server")]
    Rate { identity: String, rps: u32 },
    #[error(
        "{owner} has {stored} bytes stored in the files it created and its quota is {max} bytes; {what} would \
         add {adding}: remove or truncate some of {owner}'s files, or ask for a larger quota"
    )]
    Bytes { owner: String, stored: u64, adding: u64, max: u64, what: String },
    #[error("quota: {0} (e.g. sessions=100,locks=100000,waiters=1000,rps=5000,bytes=10GiB)")]
    Setting(String),
}

/// The limits every identity gets (none by default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quota {
    pub sessions: Option<u64>,
    pub locks: Option<u64>,
    /// Lock requests waiting (queued behind a conflicting holder), on this server.
    pub waiters: Option<u64>,
    pub requests_per_second: Option<u32>,
    /// Bytes in the files an identity created, cluster-wide.
    pub bytes: Option<u64>,
}

impl Quota {
    /// `sessions=100,locks=100000,waiters=1000,rps=5000,bytes=10GiB` (any of them; bytes take a unit: B,
    /// KiB, MiB, GiB, TiB).
    pub fn parse(text: &str) -> Result<Quota, QuotaError> {
        let bad = QuotaError::Setting;
        let mut q = Quota::default();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| bad(format!("`{part}` is not KEY=N")))?;
            let n: u64 = if k == "bytes" {
                bytes_of(v).ok_or_else(|| bad(format!("bytes={v} is not a size (e.g. 1048576, 512MiB, 10GiB)")))?
            } else {
                v.parse().map_err(|_| bad(format!("{k}={v} is not a count")))?
            };
            if n == 0 {
                return Err(bad(format!("{k}=0 would refuse everything; leave it out for no limit")));
            }
            match k {
                "sessions" => q.sessions = Some(n),
                "locks" => q.locks = Some(n),
                "waiters" => q.waiters = Some(n),
                "bytes" => q.bytes = Some(n),
                "rps" => {
                    q.requests_per_second = Some(u32::try_from(n).map_err(|_| bad(format!("rps={n} is too large")))?)
                }
                _ => return Err(bad(format!("unknown key `{k}` (sessions, locks, waiters, rps, bytes)"))),
            }
        }
        Ok(q)
    }
}

/// `4096`, `64KiB`, `10GiB`: a size in bytes.
fn bytes_of(text: &str) -> Option<u64> {
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        _ => return None,
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// Who sent `req`: the common name of the certificate it connected with (mutual TLS), else
/// [`ANONYMOUS`].
pub fn identity_of<T>(req: &tonic::Request<T>) -> String {
    req.peer_certs()
        .and_then(|certs| certs.first().and_then(|der| common_name(der.as_ref())))
        .unwrap_or_else(|| ANONYMOUS.to_string())
}

/// Refuses adding `adding` bytes to `owner`'s files, which hold `stored`, past `max`.
pub fn admit_bytes(owner: &str, stored: u64, adding: u64, max: Option<u64>, what: &str) -> Result<(), QuotaError> {
    match max {
        Some(max) if adding > 0 && stored.saturating_add(adding) > max => {
            Err(QuotaError::Bytes { owner: owner.to_string(), stored, adding, max, what: what.to_string() })
        }
        _ => Ok(()),
    }
}

/// The suffix of a session's client text that names its identity.
pub fn identity_suffix(identity: &str) -> String {
    format!(" [as {identity}]")
}

/// The common name in a DER certificate's subject: the last CommonName attribute (the issuer's
/// comes first in the certificate), if it is a short UTF-8 or printable string.
pub fn common_name(der: &[u8]) -> Option<String> {
    const CN: [u8; 5] = [0x06, 0x03, 0x55, 0x04, 0x03];
    let at = der.windows(CN.len()).rposition(|w| w == CN)? + CN.len();
    let (tag, len) = (*der.get(at)?, *der.get(at + 1)? as usize);
    if !matches!(tag, 0x0c | 0x13 | 0x16) || len >= 0x80 {
        return None;
    }
    let name = std::str::from_utf8(der.get(at + 2..at + 2 + len)?).ok()?;
    Some(name.to_string())
}

/// Refusals of one identity held back at once, at most.
pub const HELD_MAX: u32 = 256;
/// The first and the longest hold of a refusal.
const HOLD_FIRST: std::time::Duration = std::time::Duration::from_millis(5);
const HOLD_MAX: std::time::Duration = std::time::Duration::from_millis(200);
/// Refusals this far apart are not in a row.
const IN_A_ROW: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug)]
struct Usage {
    locks: u64,
    waiters: u64,
    tokens: f64,
    refilled: Instant,
    /// Session opens admitted here and not yet applied (so opens at once cannot all pass).
    opening: u64,
    /// Refusals in a row (each within a second of the last), the last one's time, and how
    /// many are held back now.
    refusals: u32,
    refused: Option<Instant>,
    held: u32,
}

/// This server's count of each identity's locks and request rate.
#[derive(Debug, Default)]
pub struct QuotaBook {
    pub quota: Quota,
    usage: Mutex<HashMap<String, Usage>>,
}

impl QuotaBook {
    pub fn new(quota: Quota) -> QuotaBook {
        QuotaBook { quota, usage: Mutex::new(HashMap::new()) }
    }

    fn with<T>(&self, identity: &str, f: impl FnOnce(&mut Usage) -> T) -> T {
        let mut m = self.usage.lock().expect("quota usage");
        let burst = f64::from(self.quota.requests_per_second.unwrap_or(0));
        let u = m.entry(identity.to_string()).or_insert_with(|| Usage {
            locks: 0,
            waiters: 0,
            tokens: burst,
            refilled: Instant::now(),
            opening: 0,
            refusals: 0,
            refused: None,
            held: 0,
        });
        f(u)
    }

    /// A lock request of `identity`: refused if it is over its rate, its locks, or its waiters
    /// (any request may have to wait: with as many waiting as its quota, an identity asks for
    /// nothing more until one is answered).
    pub fn admit_lock(&self, identity: &str) -> Result<(), QuotaError> {
        let q = self.quota;
        if q.locks.is_none() && q.requests_per_second.is_none() && q.waiters.is_none() {
            return Ok(());
        }
        self.with(identity, |u| {
            if let Some(rps) = q.requests_per_second {
                let now = Instant::now();
                let rate = f64::from(rps);
                u.tokens = (u.tokens + now.duration_since(u.refilled).as_secs_f64() * rate).min(rate);
                u.refilled = now;
                if u.tokens < 1.0 {
                    return Err(QuotaError::Rate { identity: identity.to_string(), rps });
                }
                u.tokens -= 1.0;
            }
            match (q.locks, q.waiters) {
                (Some(max), _) if u.locks >= max => {
                    Err(QuotaError::Locks { identity: identity.to_string(), held: u.locks })
                }
                (_, Some(max)) if u.waiters >= max => {
                    Err(QuotaError::Waiters { identity: identity.to_string(), waiting: u.waiters })
                }
                _ => Ok(()),
            }
        })
    }

    /// `identity`'s sessions here hold or wait for `delta` more locks (or fewer).
    pub fn locks_changed(&self, identity: &str, delta: i64) {
        if self.quota.locks.is_some() {
            self.with(identity, |u| u.locks = u.locks.saturating_add_signed(delta));
        }
    }

    /// `identity`'s sessions here have `delta` more lock requests waiting (or fewer).
    pub fn waiters_changed(&self, identity: &str, delta: i64) {
        if self.quota.waiters.is_some() {
            self.with(identity, |u| u.waiters = u.waiters.saturating_add_signed(delta));
        }
    }

    /// A new session of `identity`, which has `open` sessions in the cluster now (as applied
    /// here): admitted if those and the opens this server admitted and has not seen applied
    /// yet are under the quota. Keep the slot until the open is applied (or failed).
    pub fn admit_session(&self, identity: &str, open: u64) -> Result<OpeningSlot<'_>, QuotaError> {
        let Some(max) = self.quota.sessions else {
            return Ok(OpeningSlot { book: self, identity: None });
        };
        self.with(identity, |u| {
            if open + u.opening >= max {
                return Err(QuotaError::Sessions { identity: identity.to_string(), open: open + u.opening });
            }
            u.opening += 1;
            Ok(())
        })?;
        Ok(OpeningSlot { book: self, identity: Some(identity.to_string()) })
    }

    /// How long to hold back a refusal of `identity` now, and the hold (keep it while waiting).
    pub fn hold_refusal(&self, identity: &str) -> (std::time::Duration, Option<HeldRefusal<'_>>) {
        let now = Instant::now();
        self.with(identity, |u| {
            u.refusals = match u.refused {
                Some(at) if now.duration_since(at) < IN_A_ROW => u.refusals.saturating_add(1),
                _ => 0,
            };
            u.refused = Some(now);
            if u.held >= HELD_MAX {
                return (std::time::Duration::ZERO, None);
            }
            u.held += 1;
            let hold = HOLD_FIRST.saturating_mul(1 << u.refusals.min(7)).min(HOLD_MAX);
            (hold, Some(HeldRefusal { book: self, identity: identity.to_string() }))
        })
    }

    /// Waits out the hold of a refusal of `identity` (see the module's note).
    pub async fn delay_refusal(&self, identity: &str) {
        let (hold, _held) = self.hold_refusal(identity);
        tokio::time::sleep(hold).await;
    }
}

/// A session open admitted and not yet applied; dropping it ends the reservation.
#[derive(Debug)]
pub struct OpeningSlot<'a> {
    book: &'a QuotaBook,
    identity: Option<String>,
}

impl Drop for OpeningSlot<'_> {
    fn drop(&mut self) {
        if let Some(id) = &self.identity {
            self.book.with(id, |u| u.opening = u.opening.saturating_sub(1));
        }
    }
}

/// A refusal being held back; dropping it frees its place.
#[derive(Debug)]
pub struct HeldRefusal<'a> {
    book: &'a QuotaBook,
    identity: String,
}

impl Drop for HeldRefusal<'_> {
    fn drop(&mut self) {
        self.book.with(&self.identity, |u| u.held = u.held.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_with_its_quota_of_requests_waiting_asks_for_nothing_more() {
        let book = QuotaBook::new(Quota { waiters: Some(2), ..Default::default() });
        book.waiters_changed("flood", 2);
        let e = book.admit_lock("flood").unwrap_err();
        assert!(matches!(e, QuotaError::Waiters { waiting: 2, .. }), "{e:?}");
        assert!(e.to_string().contains("2 lock requests waiting"), "{e}");
        assert!(book.admit_lock("alice").is_ok(), "another identity");
        book.waiters_changed("flood", -1);
        assert!(book.admit_lock("flood").is_ok(), "one was granted");
    }

    #[test]
    fn bytes_past_the_quota_are_refused_naming_the_owner_and_what_to_do() {
        assert!(admit_bytes("alice", 900, 100, Some(1000), "the write").is_ok());
        assert!(admit_bytes("alice", 5000, 0, Some(1000), "an empty write").is_ok(), "adds nothing");
        assert!(admit_bytes("alice", 5000, 1, None, "the write").is_ok(), "no quota");
        let e = admit_bytes("alice", 900, 101, Some(1000), "this write to /f").unwrap_err();
        assert_eq!(
            e.to_string(),
            "alice has 900 bytes stored in the files it created and its quota is 1000 bytes; this write to /f \
             would add 101: remove or truncate some of alice's files, or ask for a larger quota"
        );
    }

    #[test]
    fn a_quota_reads_its_keys_and_refuses_nonsense() {
        let q = Quota::parse("sessions=3, locks=50,rps=10").unwrap();
        assert_eq!(
            q,
            Quota { sessions: Some(3), locks: Some(50), waiters: None, requests_per_second: Some(10), bytes: None }
        );
        assert_eq!(Quota::parse("waiters=7").unwrap().waiters, Some(7));
        assert_eq!(Quota::parse("bytes=64KiB").unwrap().bytes, Some(65536));
        assert_eq!(Quota::parse("bytes=2g").unwrap().bytes, Some(2 << 30));
        assert_eq!(Quota::parse("").unwrap(), Quota::default());
        for bad in ["sessions", "sessions=x", "locks=0", "cpu=1", "bytes=0", "bytes=3PiB", "bytes=99999999999TiB"] {
            assert!(Quota::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn locks_and_rate_are_counted_per_identity() {
        let book = QuotaBook::new(Quota {
            sessions: Some(2),
            locks: Some(2),
            waiters: None,
            requests_per_second: Some(3),
            bytes: None,
        });
        book.admit_lock("a").unwrap();
        book.locks_changed("a", 1);
        book.admit_lock("a").unwrap();
        book.locks_changed("a", 1);
        assert!(book.admit_lock("a").unwrap_err().to_string().contains("2 locks"));
        book.admit_lock("b").unwrap();
        book.locks_changed("a", -1);
        // Three a second: the third request within the second was the last.
        assert!(book.admit_lock("a").unwrap_err().to_string().contains("requests per second"));
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        book.admit_lock("a").unwrap();
        assert!(book.admit_session("a", 2).is_err() && book.admit_session("a", 1).is_ok());
    }

    #[test]
    fn opens_admitted_and_not_yet_applied_count_against_the_quota() {
        let book = QuotaBook::new(Quota { sessions: Some(2), ..Default::default() });
        let first = book.admit_session("a", 0).unwrap();
        let second = book.admit_session("a", 0).unwrap();
        // Two opens on their way: a third is refused though none is applied yet.
        assert!(book.admit_session("a", 0).unwrap_err().to_string().contains("2 sessions"));
        assert!(book.admit_session("b", 0).is_ok(), "another identity is not held back");
        drop(first);
        // The first was applied: one open and one on its way.
        assert!(book.admit_session("a", 1).is_err());
        drop(second);
        assert!(book.admit_session("a", 1).is_ok());
    }

    #[tokio::test]
    async fn refusals_in_a_row_are_held_back_longer_up_to_200_ms_and_in_bounded_number() {
        let book = QuotaBook::new(Quota::default());
        let holds: Vec<_> = (0..9).map(|_| book.hold_refusal("a").0.as_millis()).collect();
        assert_eq!(holds, [5, 10, 20, 40, 80, 160, 200, 200, 200]);
        assert_eq!(book.hold_refusal("b").0.as_millis(), 5, "each identity its own");
        // A second without a refusal starts again from the first hold.
        tokio::time::sleep(IN_A_ROW + std::time::Duration::from_millis(100)).await;
        assert_eq!(book.hold_refusal("a").0.as_millis(), 5);
        // At most HELD_MAX held at once: beyond, refused at once.
        let held: Vec<_> = (0..HELD_MAX).map(|_| book.hold_refusal("c")).collect();
        assert!(held.iter().all(|(_, h)| h.is_some()));
        assert_eq!(book.hold_refusal("c").0, std::time::Duration::ZERO);
        drop(held);
        assert!(book.hold_refusal("c").1.is_some(), "the places are free again");
    }

    #[test]
    fn the_subjects_common_name_is_found_after_the_issuers() {
        let issuer = [0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x02, b'C', b'A'];
        let subject = [0x06, 0x03, 0x55, 0x04, 0x03, 0x13, 0x05, b'a', b'l', b'i', b'c', b'e'];
        let der: Vec<u8> = [&[0x30, 0x10][..], &issuer, &[0x30, 0x00], &subject].concat();
        assert_eq!(common_name(&der).as_deref(), Some("alice"));
        assert_eq!(common_name(&[1, 2, 3]), None);
    }
}
