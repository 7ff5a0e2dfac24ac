//! An interval index of the locks on one resource, so a conflict check costs O(log n + k)
//! rather than a scan of every lock.
//!
//! It is a treap (a binary search tree on `(start, id)` that is also a heap on a priority drawn
//! from the id) whose every node knows the largest `end` below it. A query skips any subtree
//! whose largest end is at or before the query's start, and stops going right once starts reach
//! the query's end. Nodes live in one vector and point at each other by index, so the index
//! allocates only when it grows, and queries never allocate.
//!
//! Hand-written rather than taken from a crate: `iset` (the candidate) allocates on every query
//! and measured 2.3x slower with 10,000 ranges than with 10; the engine's goal is 2x.

use crate::{ByteRange, LockId};

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Node {
    start: u64,
    end: u64,
    id: LockId,
    /// The largest `end` in this node's subtree.
    max_end: u64,
    left: u32,
    right: u32,
}

#[derive(Debug, Clone)]
pub(crate) struct RangeIndex {
    nodes: Vec<Node>,
    /// Slots of removed nodes, reused before the vector grows.
    free: Vec<u32>,
    root: u32,
}

impl Default for RangeIndex {
    fn default() -> RangeIndex {
        RangeIndex { nodes: Vec::new(), free: Vec::new(), root: NIL }
    }
}

/// A fixed mix of the id: priorities look random but are reproducible, so replicas and
/// simulations build identical trees.
fn priority(id: LockId) -> u64 {
    let mut x = id.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl RangeIndex {
    pub(crate) fn len(&self) -> usize {
        self.nodes.len() - self.free.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.root == NIL
    }

    pub(crate) fn clear(&mut self) {
        self.nodes.clear();
        self.free.clear();
        self.root = NIL;
    }

    fn priority_of(&self, n: u32) -> u64 {
        priority(self.nodes[n as usize].id)
    }

    fn key(&self, n: u32) -> (u64, LockId) {
        let node = &self.nodes[n as usize];
        (node.start, node.id)
    }

    fn update(&mut self, n: u32) {
        let node = self.nodes[n as usize];
        let mut max_end = node.end;
        if node.left != NIL {
            max_end = max_end.max(self.nodes[node.left as usize].max_end);
        }
        if node.right != NIL {
            max_end = max_end.max(self.nodes[node.right as usize].max_end);
        }
        self.nodes[n as usize].max_end = max_end;
    }

    /// Joins two trees where every key of `a` is below every key of `b`.
    fn merge(&mut self, a: u32, b: u32) -> u32 {
        if a == NIL {
            return b;
        }
        if b == NIL {
            return a;
        }
        if self.priority_of(a) > self.priority_of(b) {
            let r = self.merge(self.nodes[a as usize].right, b);
            self.nodes[a as usize].right = r;
            self.update(a);
            a
        } else {
            let l = self.merge(a, self.nodes[b as usize].left);
            self.nodes[b as usize].left = l;
            self.update(b);
            b
        }
    }

    pub(crate) fn insert(&mut self, range: ByteRange, id: LockId) {
        let node = Node { start: range.start, end: range.end, id, max_end: range.end, left: NIL, right: NIL };
        let n = match self.free.pop() {
            Some(slot) => {
                self.nodes[slot as usize] = node;
                slot
            }
            None => {
                assert!(self.nodes.len() < NIL as usize, "range index full");
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        };
        self.root = self.insert_into(self.root, n);
    }

    /// Inserts node `n` as a leaf below `t`, then rotates it up while its priority is higher
    /// than its parent's: one walk down, and rotations only near where it lands.
    fn insert_into(&mut self, t: u32, n: u32) -> u32 {
        if t == NIL {
            return n;
        }
        // Without a rotation, the only change to this subtree's largest end is the new node's.
        let end = self.nodes[n as usize].end;
        let max_end = &mut self.nodes[t as usize].max_end;
        *max_end = (*max_end).max(end);
        if self.key(n) < self.key(t) {
            let l = self.insert_into(self.nodes[t as usize].left, n);
            self.nodes[t as usize].left = l;
            if self.priority_of(l) > self.priority_of(t) {
                // Rotate right: l becomes the subtree root.
                self.nodes[t as usize].left = self.nodes[l as usize].right;
                self.nodes[l as usize].right = t;
                self.update(t);
                self.update(l);
                return l;
            }
        } else {
            let r = self.insert_into(self.nodes[t as usize].right, n);
            self.nodes[t as usize].right = r;
            if self.priority_of(r) > self.priority_of(t) {
                self.nodes[t as usize].right = self.nodes[r as usize].left;
                self.nodes[r as usize].left = t;
                self.update(t);
                self.update(r);
                return r;
            }
        }
        t
    }

    pub(crate) fn remove(&mut self, range: ByteRange, id: LockId) {
        let key = (range.start, id);
        let root = self.root;
        let (found, root) = self.remove_from(root, key);
        assert!(
            found != NIL && self.nodes[found as usize].end == range.end,
            "lock {id:?} missing from the index at {range}"
        );
        self.root = root;
        self.release_slot(found);
    }

    /// Removes `key` from the subtree at `t`; returns the removed node and the new subtree.
    fn remove_from(&mut self, t: u32, key: (u64, LockId)) -> (u32, u32) {
        if t == NIL {
            return (NIL, NIL);
        }
        let here = self.key(t);
        if key == here {
            let node = self.nodes[t as usize];
            return (t, self.merge(node.left, node.right));
        }
        let found = if key < here {
            let (found, l) = self.remove_from(self.nodes[t as usize].left, key);
            self.nodes[t as usize].left = l;
            found
        } else {
            let (found, r) = self.remove_from(self.nodes[t as usize].right, key);
            self.nodes[t as usize].right = r;
            found
        };
        // The largest end below `t` can only have dropped if it was the removed node's.
        if found != NIL && self.nodes[found as usize].end >= self.nodes[t as usize].max_end {
            self.update(t);
        }
        (found, t)
    }

    fn release_slot(&mut self, slot: u32) {
        if self.root == NIL {
            self.clear();
        } else {
            self.free.push(slot);
        }
    }

    /// Calls `f` with every lock whose range overlaps `range`, in order of start.
    pub(crate) fn for_each_overlapping(&self, range: ByteRange, f: &mut impl FnMut(LockId)) {
        self.visit(self.root, range, f);
    }

    fn visit(&self, t: u32, range: ByteRange, f: &mut impl FnMut(LockId)) {
        if t == NIL {
            return;
        }
        let node = &self.nodes[t as usize];
        if node.max_end <= range.start {
            return;
        }
        self.visit(node.left, range, f);
        if node.start < range.end {
            if node.end > range.start {
                f(node.id);
            }
            self.visit(node.right, range, f);
        }
    }

    /// Every lock whose range overlaps `range`, in order of start.
    pub(crate) fn overlapping(&self, range: ByteRange) -> Vec<LockId> {
        let mut found = Vec::new();
        self.for_each_overlapping(range, &mut |id| found.push(id));
        found
    }

    /// Every (range, lock), in order of start.
    pub(crate) fn iter(&self) -> Vec<(ByteRange, LockId)> {
        let mut all = Vec::with_capacity(self.len());
        self.in_order(self.root, &mut all);
        all
    }

    fn in_order(&self, t: u32, all: &mut Vec<(ByteRange, LockId)>) {
        if t == NIL {
            return;
        }
        let node = &self.nodes[t as usize];
        self.in_order(node.left, all);
        all.push((ByteRange { start: node.start, end: node.end }, node.id));
        self.in_order(node.right, all);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: u64, e: u64) -> ByteRange {
        ByteRange::new(s, e).unwrap()
    }

    #[test]
    fn overlap_is_byte_overlap() {
        let mut index = RangeIndex::default();
        index.insert(r(0, 10), LockId(0));
        index.insert(r(10, 20), LockId(u64::MAX));
        index.insert(ByteRange::ALL, LockId(7));
        let hits = |index: &RangeIndex, s, e| {
            let mut v: Vec<u64> = index.overlapping(r(s, e)).iter().map(|l| l.0).collect();
            v.sort();
            v
        };
        assert_eq!(hits(&index, 0, 10), vec![0, 7]);
        assert_eq!(hits(&index, 9, 10), vec![0, 7]);
        assert_eq!(hits(&index, 10, 11), vec![7, u64::MAX]);
        assert_eq!(hits(&index, 20, u64::MAX), vec![7]);
        index.remove(ByteRange::ALL, LockId(7));
        assert_eq!(hits(&index, 20, u64::MAX), Vec::<u64>::new());
    }

    /// Random inserts, removes and queries against a plain list.
    #[test]
    fn matches_a_list() {
        let mut seed = 12345u64;
        let mut next = |m: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % m
        };
        let mut index = RangeIndex::default();
        let mut list: Vec<(ByteRange, LockId)> = Vec::new();
        for step in 0..20_000u64 {
            if list.is_empty() || next(3) > 0 {
                let s = next(1000);
                let e = if next(10) == 0 { u64::MAX } else { s + 1 + next(50) };
                let id = LockId(step);
                index.insert(r(s, e), id);
                list.push((r(s, e), id));
            } else {
                let (range, id) = list.swap_remove(next(list.len() as u64) as usize);
                index.remove(range, id);
            }
            let q = {
                let s = next(1100);
                r(s, s + 1 + next(100))
            };
            let mut want: Vec<LockId> = list.iter().filter(|(rg, _)| rg.overlaps(q)).map(|(_, id)| *id).collect();
            let mut got = index.overlapping(q);
            want.sort();
            got.sort();
            assert_eq!(got, want, "step {step}");
            assert_eq!(index.len(), list.len());
        }
    }
}
