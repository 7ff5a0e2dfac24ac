//! Seed 000's soft lock state at a storage server: ranges of files it has learnt from the
//! leader are free of write locks, so it can check a read without a lock locally. The leader
//! invalidates a range when it grants a write lock on it, and only at the servers whose stripe
//! units the range touches; the others keep their entries.
//!
//! An answer is cached only if no invalidation arrived while it was asked (the epoch did not
//! move), so an invalidation overtaken by the answer it voids is not lost.
//! Entries also age out after [`ENTRY_TTL_MS`], which bounds the harm of an invalidation lost
//! on the network, and there are at most `Limits::lock_free_ranges_max` ([`ENTRIES_MAX`] by default). Pure: time comes in as milliseconds.

use std::collections::HashMap;

use lockengine::ByteRange;

/// How long a lock-free entry is trusted without news.
pub const ENTRY_TTL_MS: u64 = 10_000;
/// Entries kept at most; past it the cache starts again empty (entries are only hints).
pub const ENTRIES_MAX: usize = 65_536;

#[derive(Debug)]
pub struct LockFreeCache {
    /// Per file: lock-free ranges and when each was learnt.
    files: HashMap<String, Vec<(ByteRange, u64)>>,
    /// Invalidations received, of any file.
    epoch: u64,
    entries: usize,
    entries_max: usize,
}

impl Default for LockFreeCache {
    fn default() -> LockFreeCache {
        LockFreeCache::with_capacity(ENTRIES_MAX)
    }
}

impl LockFreeCache {
    /// A cache of at most `entries_max` ranges.
    pub fn with_capacity(entries_max: usize) -> LockFreeCache {
        LockFreeCache { files: HashMap::new(), epoch: 0, entries: 0, entries_max: entries_max.max(1) }
    }

    /// Whether `range` of `path` is known free of write locks at `now_ms`.
    pub fn is_free(&self, path: &str, range: ByteRange, now_ms: u64) -> bool {
        self.files
            .get(path)
            .is_some_and(|v| v.iter().any(|(r, at)| r.contains(range) && now_ms.saturating_sub(*at) < ENTRY_TTL_MS))
    }

    /// The epoch, to read before asking the leader.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Caches the leader's "free" answer for `range`, unless an invalidation came in since
    /// `epoch` was read. Returns whether it did.
    pub fn insert(&mut self, path: &str, range: ByteRange, epoch: u64, now_ms: u64) -> bool {
        if self.epoch != epoch {
            return false;
        }
        if self.entries >= self.entries_max {
            self.files.clear();
            self.entries = 0;
        }
        let v = self.files.entry(path.to_string()).or_default();
        v.retain(|(r, at)| !range.contains(*r) && now_ms.saturating_sub(*at) < ENTRY_TTL_MS);
        v.push((range, now_ms));
        self.entries = self.files.values().map(Vec::len).sum();
        true
    }

    /// A write lock was granted on `range` of `path`: forget what overlaps it.
    pub fn invalidate(&mut self, path: &str, range: ByteRange) {
        self.epoch += 1;
        if let Some(v) = self.files.get_mut(path) {
            v.retain(|(r, _)| !r.overlaps(range));
            if v.is_empty() {
                self.files.remove(path);
            }
        }
        self.entries = self.files.values().map(Vec::len).sum();
    }

    /// Lock-free ranges held now.
    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(a: u64, b: u64) -> ByteRange {
        ByteRange::new(a, b).unwrap()
    }

    #[test]
    fn an_invalidation_forgets_only_what_it_overlaps() {
        let mut c = LockFreeCache::default();
        assert!(c.insert("/f", r(0, 100), 0, 0));
        assert!(c.insert("/f", r(100, 200), 0, 0));
        assert!(c.insert("/g", r(0, 100), 0, 0));
        assert!(c.is_free("/f", r(10, 20), 1) && c.is_free("/f", r(150, 160), 1));
        c.invalidate("/f", r(50, 60));
        assert!(!c.is_free("/f", r(10, 20), 1));
        assert!(c.is_free("/f", r(150, 160), 1), "a range the lock does not touch stays");
        assert!(c.is_free("/g", r(0, 100), 1), "another file stays");
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn an_answer_overtaken_by_an_invalidation_is_not_cached() {
        let mut c = LockFreeCache::default();
        let e = c.epoch();
        c.invalidate("/g", r(0, 10));
        assert!(!c.insert("/f", r(0, 100), e, 0));
        assert!(!c.is_free("/f", r(0, 1), 0));
        assert!(c.insert("/f", r(0, 100), c.epoch(), 0));
    }

    #[test]
    fn entries_age_out_and_stay_bounded() {
        let mut c = LockFreeCache::default();
        c.insert("/f", r(0, 100), 0, 0);
        assert!(c.is_free("/f", r(0, 100), ENTRY_TTL_MS - 1));
        assert!(!c.is_free("/f", r(0, 100), ENTRY_TTL_MS));
        for i in 0..(ENTRIES_MAX as u64 + 5) {
            c.insert(&format!("/many/{i}"), r(0, 1), 0, ENTRY_TTL_MS);
        }
        assert!(c.len() <= ENTRIES_MAX);
        assert!(c.is_free(&format!("/many/{}", ENTRIES_MAX + 4), r(0, 1), ENTRY_TTL_MS));
    }
}
