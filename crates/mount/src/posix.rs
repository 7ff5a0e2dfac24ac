//! fcntl locks as the kernel forwards them, mapped onto the lock engine's POSIX owners. Pure.
//!
//! The kernel names a lock owner by a number unique within one mount (a scrambled pointer to
//! the process's file table, or to the open file for OFD locks). The engine's owner is ours:
//! a counter in the high 32 bits, the pid that first used it in the low 32, so that F_GETLK on
//! any mount can report the holder's pid (the kernel shows 0 for a pid not in its namespace).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// The end the kernel gives for "to the end of the file" (OFFSET_MAX).
pub const OFFSET_MAX: u64 = i64::MAX as u64;

/// The kernel's inclusive `start..=end` as the engine's half-open range.
pub fn range_of(start: u64, end: u64) -> Range<u64> {
    let end = if end >= OFFSET_MAX { u64::MAX } else { end + 1 };
    start..end.max(start + 1)
}

/// The engine's range as the kernel's inclusive end.
pub fn kernel_end(r: &Range<u64>) -> u64 {
    if r.end == u64::MAX { OFFSET_MAX } else { r.end.saturating_sub(1) }
}

/// The pid inside an engine owner.
pub fn pid_of(owner: u64) -> u32 {
    (owner & 0xffff_ffff) as u32
}

/// The resource fcntl locks of entry `id` live on (apart from the data path's extent locks,
/// which are on the path: a rename must not change which locks conflict).
pub fn resource(id: u64) -> String {
    format!("#fcntl/{id}")
}

/// Kernel lock owners and what they hold.
#[derive(Debug, Default)]
pub struct Owners {
    next: u64,
    by_kernel: HashMap<u64, u64>,
    /// Engine owner → the inodes it may hold locks on (so FLUSH of a file nobody locked costs
    /// nothing).
    holds: HashMap<u64, BTreeSet<u64>>,
}

impl Owners {
    /// The engine owner for kernel owner `k`, made now (with `pid`) if new.
    pub fn owner(&mut self, k: u64, pid: u32) -> u64 {
        if let Some(o) = self.by_kernel.get(&k) {
            return *o;
        }
        self.next += 1;
        let o = (self.next << 32) | u64::from(pid);
        self.by_kernel.insert(k, o);
        o
    }

    pub fn known(&self, k: u64) -> Option<u64> {
        self.by_kernel.get(&k).copied()
    }

    pub fn took(&mut self, owner: u64, ino: u64) {
        self.holds.entry(owner).or_default().insert(ino);
    }

    /// Whether `owner` may hold locks on `ino`; forgets it (the caller unlocks everything).
    pub fn drop_file(&mut self, owner: u64, ino: u64) -> bool {
        let Some(set) = self.holds.get_mut(&owner) else { return false };
        let had = set.remove(&ino);
        if set.is_empty() {
            self.holds.remove(&owner);
            self.by_kernel.retain(|_, o| *o != owner);
        }
        had
    }

    pub fn locked_files(&self) -> usize {
        self.holds.values().map(BTreeSet::len).sum()
    }
}

/// FUSE_INTERRUPT against blocked F_SETLKW requests. The interrupt may arrive before the
/// request registers (the kernel sends both; they are served by separate tasks): it then
/// leaves a mark the request finds.
#[derive(Debug, Default)]
pub struct Interrupts {
    waiting: HashMap<u64, oneshot::Sender<()>>,
    early: BTreeMap<u64, Instant>,
}

/// How long an interrupt that found no request is kept for one that registers late.
const EARLY_KEEP: Duration = Duration::from_secs(30);

impl Interrupts {
    /// Registers request `unique`; the receiver fires when it is interrupted (at once if it was
    /// already).
    pub fn register(&mut self, unique: u64) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        if self.early.remove(&unique).is_some() {
            let _ = tx.send(());
        } else {
            self.waiting.insert(unique, tx);
        }
        rx
    }

    pub fn done(&mut self, unique: u64) {
        self.waiting.remove(&unique);
    }

    pub fn interrupt(&mut self, unique: u64, now: Instant) {
        if let Some(tx) = self.waiting.remove(&unique) {
            let _ = tx.send(());
            return;
        }
        self.early.retain(|_, at| now.duration_since(*at) < EARLY_KEEP);
        self.early.insert(unique, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_map_both_ways() {
        assert_eq!(range_of(0, OFFSET_MAX), 0..u64::MAX);
        assert_eq!(range_of(10, 19), 10..20);
        assert_eq!(kernel_end(&(10..20)), 19);
        assert_eq!(kernel_end(&(0..u64::MAX)), OFFSET_MAX);
    }

    #[test]
    fn owners_carry_their_pid_and_are_forgotten_with_their_last_file() {
        let mut o = Owners::default();
        let a = o.owner(0xdead, 4242);
        assert_eq!(pid_of(a), 4242);
        assert_eq!(o.owner(0xdead, 1), a);
        assert_ne!(o.owner(0xbeef, 4242), a);
        o.took(a, 7);
        o.took(a, 8);
        assert!(!o.drop_file(a, 9));
        assert!(o.drop_file(a, 7));
        assert_eq!(o.known(0xdead), Some(a));
        assert!(o.drop_file(a, 8));
        assert_eq!(o.known(0xdead), None);
    }

    #[test]
    fn an_interrupt_before_its_request_registers_is_not_lost() {
        let now = Instant::now();
        let mut i = Interrupts::default();
        i.interrupt(5, now);
        let mut rx = i.register(5);
        assert!(rx.try_recv().is_ok());
        let mut rx = i.register(6);
        assert!(rx.try_recv().is_err());
        i.interrupt(6, now);
        assert!(rx.try_recv().is_ok());
    }
}
