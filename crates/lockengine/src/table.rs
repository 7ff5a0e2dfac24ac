//! The table of all locks: a slab of lock records with a small hash map from id to slot.
//! Keeping the records out of the hash map keeps its probes in cache when a session holds tens
//! of thousands of locks, and a freed slot is reused warm by the next lock.

use std::ops::Index;

use rustc_hash::FxHashMap;

use crate::LockId;

/// Generic over the record (the engine's `Lock`), so the table knows nothing of the engine.
#[derive(Debug, Clone)]
pub(crate) struct LockTable<Lock> {
    slots: FxHashMap<LockId, u32>,
    records: Vec<Option<Lock>>,
    free: Vec<u32>,
}

impl<Lock> Default for LockTable<Lock> {
    fn default() -> Self {
        LockTable { slots: FxHashMap::default(), records: Vec::new(), free: Vec::new() }
    }
}

impl<Lock> LockTable<Lock> {
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn get(&self, id: &LockId) -> Option<&Lock> {
        self.slots.get(id).map(|&s| self.records[s as usize].as_ref().expect("live slot"))
    }

    pub(crate) fn get_mut(&mut self, id: &LockId) -> Option<&mut Lock> {
        self.slots.get(id).map(|&s| self.records[s as usize].as_mut().expect("live slot"))
    }

    pub(crate) fn insert(&mut self, id: LockId, lock: Lock) {
        let slot = match self.free.pop() {
            Some(slot) => {
                self.records[slot as usize] = Some(lock);
                slot
            }
            None => {
                self.records.push(Some(lock));
                (self.records.len() - 1) as u32
            }
        };
        let previous = self.slots.insert(id, slot);
        assert!(previous.is_none(), "lock {id:?} inserted twice");
    }

    pub(crate) fn remove(&mut self, id: &LockId) -> Option<Lock> {
        let slot = self.slots.remove(id)?;
        self.free.push(slot);
        self.records[slot as usize].take()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&LockId, &Lock)> {
        self.slots.iter().map(|(id, &s)| (id, self.records[s as usize].as_ref().expect("live slot")))
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &Lock> {
        self.iter().map(|(_, l)| l)
    }
}

impl<Lock> Index<&LockId> for LockTable<Lock> {
    type Output = Lock;

    fn index(&self, id: &LockId) -> &Lock {
        self.get(id).unwrap_or_else(|| panic!("no lock {id:?}"))
    }
}
