//! The mount's inode table: FUSE inode number → path in the namespace, with the kernel's lookup
//! count (FORGET takes it down; an inode no longer known to the kernel is dropped, so the table
//! stays as large as the kernel's own cache). Pure.
//!
//! A FUSE inode number is the entry's id in the namespace + 1, so the root (id 0) is 1.

use std::collections::HashMap;

pub const ROOT: u64 = 1;

pub fn fuse_ino(id: u64) -> u64 {
    id + 1
}

pub fn entry_id(ino: u64) -> u64 {
    ino - 1
}

#[derive(Debug)]
pub struct Inodes {
    paths: HashMap<u64, (String, u64)>,
}

impl Default for Inodes {
    fn default() -> Inodes {
        let mut paths = HashMap::new();
        paths.insert(ROOT, ("/".to_string(), 1));
        Inodes { paths }
    }
}

impl Inodes {
    pub fn path(&self, ino: u64) -> Option<String> {
        self.paths.get(&ino).map(|(p, _)| p.clone())
    }

    /// The kernel learned of `ino` at `path` once more (a LOOKUP, CREATE, MKDIR... answered).
    pub fn looked_up(&mut self, ino: u64, path: &str) {
        let e = self.paths.entry(ino).or_insert_with(|| (path.to_string(), 0));
        e.0 = path.to_string();
        e.1 += 1;
    }

    /// Without counting a lookup: where `ino` is now (after a lookup found it moved).
    pub fn moved(&mut self, ino: u64, path: &str) {
        if let Some(e) = self.paths.get_mut(&ino) {
            e.0 = path.to_string();
        }
    }

    pub fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        if let Some(e) = self.paths.get_mut(&ino) {
            e.1 = e.1.saturating_sub(n);
            if e.1 == 0 {
                self.paths.remove(&ino);
            }
        }
    }

    /// `from` was renamed to `to`: every inode at or under `from` moves. Returns those inodes.
    pub fn renamed(&mut self, from: &str, to: &str) -> Vec<u64> {
        let prefix = format!("{from}/");
        let mut moved = Vec::new();
        for (ino, (p, _)) in self.paths.iter_mut() {
            if p == from {
                *p = to.to_string();
                moved.push(*ino);
            } else if p.starts_with(&prefix) {
                *p = format!("{to}{}", &p[from.len()..]);
                moved.push(*ino);
            }
        }
        moved
    }

    /// A rename that swapped `a` and `b` (RENAME_EXCHANGE).
    pub fn exchanged(&mut self, a: &str, b: &str) -> Vec<u64> {
        let tmp = format!("{a}\0exchange");
        let mut moved = self.renamed(a, &tmp);
        moved.extend(self.renamed(b, a));
        self.renamed(&tmp, b);
        moved
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renames_move_subtrees_and_forget_drops() {
        let mut t = Inodes::default();
        t.looked_up(2, "/a");
        t.looked_up(3, "/a/b");
        t.looked_up(4, "/ab");
        let mut moved = t.renamed("/a", "/z");
        moved.sort();
        assert_eq!(moved, [2, 3]);
        assert_eq!(t.path(2).as_deref(), Some("/z"));
        assert_eq!(t.path(3).as_deref(), Some("/z/b"));
        assert_eq!(t.path(4).as_deref(), Some("/ab"));
        t.exchanged("/z", "/ab");
        assert_eq!(t.path(2).as_deref(), Some("/ab"));
        assert_eq!(t.path(3).as_deref(), Some("/ab/b"));
        assert_eq!(t.path(4).as_deref(), Some("/z"));
        t.looked_up(4, "/z");
        t.forget(4, 1);
        assert!(t.path(4).is_some());
        t.forget(4, 1);
        assert!(t.path(4).is_none());
        t.forget(ROOT, 9);
        assert_eq!(t.path(ROOT).as_deref(), Some("/"));
    }
}
