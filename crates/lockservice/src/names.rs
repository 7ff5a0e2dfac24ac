//! The namespace beside the files (issue 13): directories, symbolic links and every entry's
//! attributes (mode, owner, times), and the changes a mount makes to them — mkdir, rmdir,
//! symlink, create, unlink, rename, setattr. Pure: the caller passes the time the leader stamped
//! on the entry, so every replica computes the same namespace.
//!
//! Entries are keyed by their full path (`/a/b`); the root `/` is implicit. An entry's id is its
//! inode number for a mount (files keep the id that names their units). A directory holds what
//! is under its path; it is empty when no key starts with `path/`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::types::{FileMeta, NamespaceError};

/// Permission bits a mode keeps (with setuid, setgid, sticky).
pub const MODE_BITS: u32 = 0o7777;
/// The file type bits of a mode (`S_IFMT`), kept only by special files.
pub const TYPE_BITS: u32 = 0o170000;
/// The types a special file may have: FIFO, character device, block device, socket.
pub const SPECIAL_TYPES: [u32; 4] = [0o010000, 0o020000, 0o060000, 0o140000];

/// An entry's attributes. Times are ns since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attr {
    pub ino: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime_ns: u64,
    pub mtime_ns: u64,
    pub ctime_ns: u64,
    /// For a directory: 2 + its subdirectories; else 1.
    pub nlink: u32,
}

impl Attr {
    fn new(ino: u64, mode: u32, uid: u32, gid: u32, now_ns: u64, nlink: u32) -> Attr {
        Attr { ino, mode: mode & MODE_BITS, uid, gid, atime_ns: now_ns, mtime_ns: now_ns, ctime_ns: now_ns, nlink }
    }

    /// The attributes of a file put before files had any (or by `put`): 0644, root, time 0.
    pub fn of_put(ino: u64, now_ns: u64) -> Attr {
        Attr::new(ino, 0o644, 0, 0, now_ns, 1)
    }
}

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// A FIFO, socket or device: its type is in its mode's [`TYPE_BITS`].
    Special,
}

/// One entry as a mount sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    pub kind: Kind,
    pub attr: Attr,
    /// Files: their bytes; symlinks: the target's length; directories: 0.
    pub size: u64,
    pub target: Option<String>,
    /// Devices: the device number.
    pub rdev: u64,
}

/// Directories, symlinks and attributes. Files themselves stay in the state's `files`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Names {
    pub root: Attr,
    pub dirs: BTreeMap<String, Attr>,
    /// Entries without data: symlinks (attributes, target) and special files (attributes whose
    /// mode has [`TYPE_BITS`], the device number in decimal; kept here so that adding them
    /// changed no snapshot format).
    pub links: BTreeMap<String, (Attr, String)>,
    /// Attributes of files, by file id.
    pub file_attrs: BTreeMap<u64, Attr>,
}

impl Default for Names {
    fn default() -> Names {
        Names {
            root: Attr::new(0, 0o755, 0, 0, 0, 2),
            dirs: BTreeMap::new(),
            links: BTreeMap::new(),
            file_attrs: BTreeMap::new(),
        }
    }
}

pub use crate::types::{NameOp, RENAME_EXCHANGE, RENAME_NOREPLACE};

/// The directory holding `path` (`/` for a top-level entry).
pub fn parent_of(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

/// `dir` joined with `name`.
pub fn join(dir: &str, name: &str) -> String {
    if dir == "/" { format!("/{name}") } else { format!("{dir}/{name}") }
}

/// Whether `path` is `/a/b` shaped: absolute, no empty, `.` or `..` component, no NUL.
pub fn valid_path(path: &str) -> bool {
    path.starts_with('/')
        && path.len() > 1
        && !path.contains('\0')
        && path[1..].split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// The key range of everything under directory `dir`.
fn under(dir: &str) -> String {
    if dir == "/" { "/".to_string() } else { format!("{dir}/") }
}

fn err_path(path: &str) -> String {
    path.to_string()
}

/// The namespace's view over the state's files and the names beside them.
#[derive(Debug)]
pub struct Namespace<'a> {
    pub files: &'a mut BTreeMap<String, FileMeta>,
    pub names: &'a mut Names,
    pub next_id: &'a mut u64,
    pub files_max: usize,
}

impl Namespace<'_> {
    fn view(&self) -> View<'_> {
        View { files: self.files, names: self.names }
    }

    fn kind(&self, path: &str) -> Option<Kind> {
        self.view().kind(path)
    }

    fn is_empty_dir(&self, dir: &str) -> bool {
        self.view().is_empty_dir(dir)
    }

    fn dir_attr(&mut self, dir: &str) -> Option<&mut Attr> {
        if dir == "/" { Some(&mut self.names.root) } else { self.names.dirs.get_mut(dir) }
    }

    /// The parent of `path` must be a directory.
    fn check_parent(&self, path: &str) -> Result<(), NamespaceError> {
        let parent = parent_of(path);
        match self.kind(parent) {
            Some(Kind::Dir) => Ok(()),
            Some(_) => Err(NamespaceError::NotDir { path: err_path(parent) }),
            None => Err(NamespaceError::NotFound { path: err_path(parent) }),
        }
    }

    fn check_new(&self, path: &str) -> Result<(), NamespaceError> {
        if !valid_path(path) {
            return Err(NamespaceError::BadName { path: err_path(path) });
        }
        self.check_parent(path)?;
        if self.kind(path).is_some() {
            return Err(NamespaceError::Exists { path: err_path(path) });
        }
        if self.files.len() + self.names.dirs.len() + self.names.links.len() >= self.files_max {
            return Err(NamespaceError::FilesLimit { max: self.files_max as u64 });
        }
        Ok(())
    }

    /// A directory's entries changed: its mtime and ctime are now.
    fn touch_dir(&mut self, dir: &str, now_ns: u64, nlink_delta: i32) {
        if let Some(a) = self.dir_attr(dir) {
            a.mtime_ns = now_ns;
            a.ctime_ns = now_ns;
            a.nlink = a.nlink.saturating_add_signed(nlink_delta);
        }
    }

    fn new_id(&mut self) -> u64 {
        *self.next_id += 1;
        *self.next_id
    }

    /// Creates every missing directory above `path` (a `put` of `/a/b/c` makes `/a` and `/a/b`),
    /// as `mkdir -p` would. Fails if one of them is a file or a symlink.
    pub fn make_parents(&mut self, path: &str, now_ns: u64) -> Result<(), NamespaceError> {
        let parent = parent_of(path);
        if parent == "/" {
            return Ok(());
        }
        match self.kind(parent) {
            Some(Kind::Dir) => return Ok(()),
            Some(_) => return Err(NamespaceError::NotDir { path: err_path(parent) }),
            None => {}
        }
        self.make_parents(parent, now_ns)?;
        let ino = self.new_id();
        self.names.dirs.insert(parent.to_string(), Attr::new(ino, 0o755, 0, 0, now_ns, 2));
        self.touch_dir(parent_of(parent), now_ns, 1);
        Ok(())
    }

    /// Applies `op`; returns the id of the entry it concerns.
    pub fn apply(&mut self, op: NameOp, now_ms: u64) -> Result<u64, NamespaceError> {
        let now_ns = now_ms.saturating_mul(1_000_000);
        match op {
            NameOp::Mkdir { path, mode, uid, gid } => {
                self.check_new(&path)?;
                let ino = self.new_id();
                self.names.dirs.insert(path.clone(), Attr::new(ino, mode, uid, gid, now_ns, 2));
                self.touch_dir(parent_of(&path), now_ns, 1);
                Ok(ino)
            }
            NameOp::Symlink { path, target, uid, gid } => {
                self.check_new(&path)?;
                let ino = self.new_id();
                self.names.links.insert(path.clone(), (Attr::new(ino, 0o777, uid, gid, now_ns, 1), target));
                self.touch_dir(parent_of(&path), now_ns, 0);
                Ok(ino)
            }
            NameOp::Create { path, layout, mode, uid, gid } => {
                self.check_new(&path)?;
                let id = self.new_id();
                self.files.insert(path.clone(), FileMeta { id, size: 0, layout, complete: true, writer: None });
                self.names.file_attrs.insert(id, Attr::new(id, mode, uid, gid, now_ns, 1));
                self.touch_dir(parent_of(&path), now_ns, 0);
                Ok(id)
            }
            NameOp::Unlink { path } => {
                let id = match self.kind(&path) {
                    Some(Kind::File) => {
                        let f = self.files.remove(&path).expect("a file");
                        self.names.file_attrs.remove(&f.id);
                        f.id
                    }
                    Some(Kind::Symlink | Kind::Special) => self.names.links.remove(&path).expect("a link").0.ino,
                    Some(Kind::Dir) => return Err(NamespaceError::IsDir { path }),
                    None => return Err(NamespaceError::NotFound { path }),
                };
                self.touch_dir(parent_of(&path), now_ns, 0);
                Ok(id)
            }
            NameOp::Rmdir { path } => {
                if path == "/" {
                    return Err(NamespaceError::Busy { path });
                }
                match self.kind(&path) {
                    Some(Kind::Dir) => {}
                    Some(_) => return Err(NamespaceError::NotDir { path }),
                    None => return Err(NamespaceError::NotFound { path }),
                }
                if !self.is_empty_dir(&path) {
                    return Err(NamespaceError::NotEmpty { path });
                }
                let a = self.names.dirs.remove(&path).expect("a dir");
                self.touch_dir(parent_of(&path), now_ns, -1);
                Ok(a.ino)
            }
            NameOp::Rename { from, to, flags } => self.rename(&from, &to, flags, now_ns),
            NameOp::SetAttr { path, ino, mode, uid, gid, atime_ns, mtime_ns, size, touch } => {
                let kind = self.kind(&path).ok_or_else(|| NamespaceError::NotFound { path: path.clone() })?;
                if let Some(size) = size {
                    match kind {
                        Kind::File => {}
                        Kind::Dir => return Err(NamespaceError::IsDir { path }),
                        Kind::Symlink | Kind::Special => return Err(NamespaceError::BadName { path }),
                    }
                    let f = self.files.get_mut(&path).expect("a file");
                    if ino != 0 && f.id != ino {
                        return Err(NamespaceError::NotFound { path });
                    }
                    if !f.complete {
                        return Err(NamespaceError::PutGone { path });
                    }
                    f.size = size;
                }
                let attr = self.attr_mut(&path, kind, now_ns).expect("exists");
                if ino != 0 && attr.ino != ino {
                    return Err(NamespaceError::NotFound { path });
                }
                if let Some(m) = mode {
                    attr.mode = (attr.mode & TYPE_BITS) | (m & MODE_BITS);
                }
                if let Some(u) = uid {
                    attr.uid = u;
                }
                if let Some(g) = gid {
                    attr.gid = g;
                }
                if let Some(t) = atime_ns {
                    attr.atime_ns = t;
                }
                if let Some(t) = mtime_ns {
                    attr.mtime_ns = t;
                }
                if (size.is_some() || touch) && mtime_ns.is_none() {
                    attr.mtime_ns = now_ns.max(attr.mtime_ns + 1);
                }
                attr.ctime_ns = now_ns;
                Ok(attr.ino)
            }
            NameOp::Mknod { path, mode, rdev, uid, gid } => {
                if !SPECIAL_TYPES.contains(&(mode & TYPE_BITS)) {
                    return Err(NamespaceError::BadName { path });
                }
                self.check_new(&path)?;
                let ino = self.new_id();
                let mut attr = Attr::new(ino, mode, uid, gid, now_ns, 1);
                attr.mode |= mode & TYPE_BITS;
                self.names.links.insert(path.clone(), (attr, rdev.to_string()));
                self.touch_dir(parent_of(&path), now_ns, 0);
                Ok(ino)
            }
            NameOp::Access { path, ino } => {
                let kind = self.kind(&path).ok_or_else(|| NamespaceError::NotFound { path: path.clone() })?;
                let attr = self.attr_mut(&path, kind, now_ns).expect("exists");
                if ino != 0 && attr.ino != ino {
                    return Err(NamespaceError::NotFound { path });
                }
                attr.atime_ns = attr.atime_ns.max(now_ns);
                Ok(attr.ino)
            }
        }
    }

    /// The attributes of the entry at `path`; a file without any (put before attributes
    /// existed) gets them now.
    fn attr_mut(&mut self, path: &str, kind: Kind, now_ns: u64) -> Option<&mut Attr> {
        match kind {
            Kind::Dir => self.dir_attr(path),
            Kind::Symlink | Kind::Special => self.names.links.get_mut(path).map(|(a, _)| a),
            Kind::File => {
                let id = self.files.get(path)?.id;
                Some(self.names.file_attrs.entry(id).or_insert_with(|| Attr::of_put(id, now_ns)))
            }
        }
    }

    fn rename(&mut self, from: &str, to: &str, flags: u32, now_ns: u64) -> Result<u64, NamespaceError> {
        if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0
            || flags == RENAME_NOREPLACE | RENAME_EXCHANGE
            || !valid_path(to)
            || !valid_path(from)
        {
            return Err(NamespaceError::BadName { path: to.to_string() });
        }
        let from_kind = self.kind(from).ok_or_else(|| NamespaceError::NotFound { path: from.to_string() })?;
        self.check_parent(to)?;
        let to_kind = self.kind(to);
        let ino = self.attr_mut(from, from_kind, now_ns).expect("exists").ino;
        if from == to {
            return if flags & RENAME_EXCHANGE != 0 || to_kind.is_none() {
                Ok(ino)
            } else if flags & RENAME_NOREPLACE != 0 {
                Err(NamespaceError::Exists { path: to.to_string() })
            } else {
                Ok(ino)
            };
        }
        // A directory cannot move under itself; nor can anything move onto an ancestor of it.
        if from_kind == Kind::Dir && to.starts_with(&under(from)) {
            return Err(NamespaceError::BadName { path: to.to_string() });
        }
        if let Some(k) = to_kind
            && k == Kind::Dir
            && from.starts_with(&under(to))
        {
            return Err(NamespaceError::NotEmpty { path: to.to_string() });
        }
        if flags & RENAME_EXCHANGE != 0 {
            let Some(to_kind) = to_kind else { return Err(NamespaceError::NotFound { path: to.to_string() }) };
            if to_kind == Kind::Dir && from.starts_with(&under(to)) {
                return Err(NamespaceError::BadName { path: to.to_string() });
            }
            let a = self.take_subtree(from);
            let b = self.take_subtree(to);
            self.put_subtree(a, from, to);
            self.put_subtree(b, to, from);
            let (df, dt) = (i32::from(from_kind == Kind::Dir), i32::from(to_kind == Kind::Dir));
            self.touch_dir(parent_of(from), now_ns, dt - df);
            self.touch_dir(parent_of(to), now_ns, df - dt);
            self.set_ctime(to, to_kind, now_ns);
            self.set_ctime(from, from_kind, now_ns);
            return Ok(ino);
        }
        if let Some(to_kind) = to_kind {
            if flags & RENAME_NOREPLACE != 0 {
                return Err(NamespaceError::Exists { path: to.to_string() });
            }
            match (from_kind, to_kind) {
                (Kind::Dir, Kind::Dir) => {
                    if !self.is_empty_dir(to) {
                        return Err(NamespaceError::NotEmpty { path: to.to_string() });
                    }
                    self.names.dirs.remove(to);
                    self.touch_dir(parent_of(to), now_ns, -1);
                }
                (Kind::Dir, _) => return Err(NamespaceError::NotDir { path: to.to_string() }),
                (_, Kind::Dir) => return Err(NamespaceError::IsDir { path: to.to_string() }),
                (_, Kind::File) => {
                    let f = self.files.remove(to).expect("a file");
                    self.names.file_attrs.remove(&f.id);
                }
                (_, Kind::Symlink | Kind::Special) => {
                    self.names.links.remove(to);
                }
            }
        }
        if from_kind == Kind::File && self.files.get(from).is_some_and(|f| !f.complete) {
            return Err(NamespaceError::PutGone { path: from.to_string() });
        }
        let moved = self.take_subtree(from);
        self.put_subtree(moved, from, to);
        let d = i32::from(from_kind == Kind::Dir);
        self.touch_dir(parent_of(from), now_ns, -d);
        self.touch_dir(parent_of(to), now_ns, d);
        self.set_ctime(to, from_kind, now_ns);
        Ok(ino)
    }

    fn set_ctime(&mut self, path: &str, kind: Kind, now_ns: u64) {
        if let Some(a) = self.attr_mut(path, kind, now_ns) {
            a.ctime_ns = now_ns;
        }
    }

    /// Everything at `path` and under it, taken out.
    fn take_subtree(&mut self, path: &str) -> Subtree {
        fn take<V>(m: &mut BTreeMap<String, V>, path: &str) -> Vec<(String, V)> {
            let p = under(path);
            let mut keys: Vec<String> =
                m.range(p.clone()..).take_while(|(k, _)| k.starts_with(&p)).map(|(k, _)| k.clone()).collect();
            if m.contains_key(path) {
                keys.push(path.to_string());
            }
            keys.into_iter()
                .map(|k| {
                    let v = m.remove(&k).expect("listed");
                    (k, v)
                })
                .collect()
        }
        Subtree {
            files: take(self.files, path),
            dirs: take(&mut self.names.dirs, path),
            links: take(&mut self.names.links, path),
        }
    }

    /// Puts back what `take_subtree(from)` took, under `to`.
    fn put_subtree(&mut self, t: Subtree, from: &str, to: &str) {
        let re = |k: &str| format!("{to}{}", &k[from.len()..]);
        for (k, v) in t.files {
            self.files.insert(re(&k), v);
        }
        for (k, v) in t.dirs {
            self.names.dirs.insert(re(&k), v);
        }
        for (k, v) in t.links {
            self.names.links.insert(re(&k), v);
        }
    }
}

/// Reading the namespace: the state's files and the names beside them.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    pub files: &'a BTreeMap<String, FileMeta>,
    pub names: &'a Names,
}

impl View<'_> {
    pub fn kind(&self, path: &str) -> Option<Kind> {
        if path == "/" || self.names.dirs.contains_key(path) {
            Some(Kind::Dir)
        } else if self.files.contains_key(path) {
            Some(Kind::File)
        } else if let Some((a, _)) = self.names.links.get(path) {
            Some(if a.mode & TYPE_BITS == 0 { Kind::Symlink } else { Kind::Special })
        } else {
            None
        }
    }

    pub fn is_empty_dir(&self, dir: &str) -> bool {
        let p = under(dir);
        let first = |m: Option<&String>| m.is_some_and(|k| k.starts_with(&p));
        !first(self.files.range(p.clone()..).next().map(|(k, _)| k))
            && !first(self.names.dirs.range(p.clone()..).next().map(|(k, _)| k))
            && !first(self.names.links.range(p.clone()..).next().map(|(k, _)| k))
    }

    /// The entry at `path`.
    pub fn entry(&self, path: &str) -> Option<Entry> {
        let mut rdev = 0;
        let (kind, attr, size, target) = match self.kind(path)? {
            Kind::Dir => (Kind::Dir, if path == "/" { self.names.root } else { self.names.dirs[path] }, 0, None),
            Kind::Symlink => {
                let (a, t) = &self.names.links[path];
                (Kind::Symlink, *a, t.len() as u64, Some(t.clone()))
            }
            Kind::Special => {
                let (a, dev) = &self.names.links[path];
                rdev = dev.parse().unwrap_or(0);
                (Kind::Special, *a, 0, None)
            }
            Kind::File => {
                let f = &self.files[path];
                let attr = self.names.file_attrs.get(&f.id).copied().unwrap_or_else(|| Attr::of_put(f.id, 0));
                (Kind::File, attr, f.size, None)
            }
        };
        Some(Entry { path: path.to_string(), kind, attr, size, target, rdev })
    }

    /// The entry whose id is `ino`, wherever it is now (a walk of the whole namespace: for the
    /// rare open file whose name changed elsewhere).
    pub fn locate(&self, ino: u64) -> Option<Entry> {
        if ino == self.names.root.ino {
            return self.entry("/");
        }
        let path = self
            .files
            .iter()
            .find(|(_, f)| self.names.file_attrs.get(&f.id).map_or(f.id, |a| a.ino) == ino)
            .map(|(p, _)| p)
            .or_else(|| self.names.dirs.iter().find(|(_, a)| a.ino == ino).map(|(p, _)| p))
            .or_else(|| self.names.links.iter().find(|(_, (a, _))| a.ino == ino).map(|(p, _)| p))?;
        self.entry(path)
    }

    /// Up to `limit` entries directly in directory `dir` whose names sort after `after`, by
    /// name, and whether more follow.
    pub fn list(&self, dir: &str, after: &str, limit: usize) -> (Vec<Entry>, bool) {
        let p = under(dir);
        let from = format!("{p}{after}");
        let direct = |k: &&String| !k[p.len()..].contains('/') && k[p.len()..] > *after;
        let mut paths: Vec<&String> = Vec::new();
        fn keys<'m, V>(m: &'m BTreeMap<String, V>, from: &str, p: &str) -> impl Iterator<Item = &'m String> {
            m.range(from.to_string()..).map(|(k, _)| k).take_while(move |k| k.starts_with(p))
        }
        paths.extend(keys(self.files, &from, &p).filter(direct).take(limit + 1));
        paths.extend(keys(&self.names.dirs, &from, &p).filter(direct).take(limit + 1));
        paths.extend(keys(&self.names.links, &from, &p).filter(direct).take(limit + 1));
        paths.sort();
        let more = paths.len() > limit;
        (paths.into_iter().take(limit).filter_map(|k| self.entry(k)).collect(), more)
    }
}

struct Subtree {
    files: Vec<(String, FileMeta)>,
    dirs: Vec<(String, Attr)>,
    links: Vec<(String, (Attr, String))>,
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Ns {
        files: BTreeMap<String, FileMeta>,
        names: Names,
        next: u64,
    }

    impl Ns {
        fn new() -> Ns {
            Ns { files: BTreeMap::new(), names: Names::default(), next: 0 }
        }
        fn ns(&mut self) -> Namespace<'_> {
            Namespace { files: &mut self.files, names: &mut self.names, next_id: &mut self.next, files_max: 100 }
        }
        fn apply(&mut self, op: NameOp) -> Result<u64, NamespaceError> {
            self.ns().apply(op, 5)
        }
        fn view(&self) -> View<'_> {
            View { files: &self.files, names: &self.names }
        }
        fn names(&self, dir: &str) -> Vec<String> {
            self.view().list(dir, "", 100).0.into_iter().map(|e| e.path).collect()
        }
    }

    fn layout() -> layout::Layout {
        layout::Layout::new(4096, 2, 1, vec![1, 2, 3]).unwrap()
    }
    fn mkdir(p: &str) -> NameOp {
        NameOp::Mkdir { path: p.into(), mode: 0o755, uid: 1, gid: 1 }
    }
    fn create(p: &str) -> NameOp {
        NameOp::Create { path: p.into(), layout: layout(), mode: 0o644, uid: 1, gid: 1 }
    }
    fn rename(a: &str, b: &str, flags: u32) -> NameOp {
        NameOp::Rename { from: a.into(), to: b.into(), flags }
    }

    #[test]
    fn directories_hold_entries_and_refuse_what_posix_refuses() {
        let mut n = Ns::new();
        n.apply(mkdir("/a")).unwrap();
        assert_eq!(n.apply(mkdir("/a")), Err(NamespaceError::Exists { path: "/a".into() }));
        assert_eq!(n.apply(mkdir("/x/y")), Err(NamespaceError::NotFound { path: "/x".into() }));
        n.apply(create("/a/f")).unwrap();
        assert_eq!(n.apply(mkdir("/a/f/g")), Err(NamespaceError::NotDir { path: "/a/f".into() }));
        n.apply(NameOp::Symlink { path: "/a/l".into(), target: "f".into(), uid: 0, gid: 0 }).unwrap();
        n.apply(mkdir("/a/d")).unwrap();
        n.apply(mkdir("/ab")).unwrap();
        assert_eq!(n.names("/a"), ["/a/d", "/a/f", "/a/l"]);
        assert_eq!(n.names("/"), ["/a", "/ab"]);
        assert_eq!(n.view().entry("/a").unwrap().attr.nlink, 3);
        assert_eq!(n.view().entry("/").unwrap().attr.nlink, 4);
        assert_eq!(n.apply(NameOp::Rmdir { path: "/a".into() }), Err(NamespaceError::NotEmpty { path: "/a".into() }));
        assert_eq!(n.apply(NameOp::Unlink { path: "/a/d".into() }), Err(NamespaceError::IsDir { path: "/a/d".into() }));
        assert_eq!(n.apply(NameOp::Rmdir { path: "/a/f".into() }), Err(NamespaceError::NotDir { path: "/a/f".into() }));
        for p in ["/a/f", "/a/l"] {
            n.apply(NameOp::Unlink { path: p.into() }).unwrap();
        }
        n.apply(NameOp::Rmdir { path: "/a/d".into() }).unwrap();
        n.apply(NameOp::Rmdir { path: "/a".into() }).unwrap();
        assert_eq!(n.names("/"), ["/ab"]);
        assert!(n.names.file_attrs.is_empty());
        assert_eq!(n.apply(mkdir("/a/../b")), Err(NamespaceError::BadName { path: "/a/../b".into() }));
    }

    #[test]
    fn an_entry_is_found_by_its_id_wherever_it_moved() {
        let mut n = Ns::new();
        let d = n.apply(mkdir("/a")).unwrap();
        let f = n.apply(create("/a/f")).unwrap();
        let l = n.apply(NameOp::Symlink { path: "/a/l".into(), target: "f".into(), uid: 0, gid: 0 }).unwrap();
        n.apply(rename("/a", "/b", 0)).unwrap();
        let at = |id: u64| n.view().locate(id).map(|e| e.path);
        assert_eq!((at(d), at(f), at(l)), (Some("/b".into()), Some("/b/f".into()), Some("/b/l".into())));
        assert_eq!(at(n.names.root.ino), Some("/".into()));
        n.apply(NameOp::Unlink { path: "/b/f".into() }).unwrap();
        assert_eq!(n.view().locate(f), None);
    }

    #[test]
    fn rename_moves_subtrees_replaces_and_refuses_as_rename_2_does() {
        let mut n = Ns::new();
        n.apply(mkdir("/a")).unwrap();
        n.apply(mkdir("/a/b")).unwrap();
        let f = n.apply(create("/a/b/f")).unwrap();
        n.apply(create("/g")).unwrap();
        n.apply(mkdir("/e")).unwrap();
        // A directory moves with all it holds; ids stay.
        n.apply(rename("/a", "/z", 0)).unwrap();
        assert_eq!(n.view().entry("/z/b/f").unwrap().attr.ino, f);
        assert!(n.view().entry("/a").is_none());
        // Over an existing file: atomic replace; over a non-empty dir or into itself: refused.
        n.apply(rename("/g", "/z/b/f", 0)).unwrap();
        assert_ne!(n.view().entry("/z/b/f").unwrap().attr.ino, f);
        assert_eq!(n.apply(rename("/e", "/z", 0)), Err(NamespaceError::NotEmpty { path: "/z".into() }));
        assert_eq!(n.apply(rename("/z", "/z/b/q", 0)), Err(NamespaceError::BadName { path: "/z/b/q".into() }));
        assert_eq!(n.apply(rename("/z/b/f", "/e", 0)), Err(NamespaceError::IsDir { path: "/e".into() }));
        n.apply(create("/h")).unwrap();
        assert_eq!(n.apply(rename("/e", "/h", 0)), Err(NamespaceError::NotDir { path: "/h".into() }));
        assert_eq!(
            n.apply(rename("/h", "/z/b/f", RENAME_NOREPLACE)),
            Err(NamespaceError::Exists { path: "/z/b/f".into() })
        );
        // An empty directory is replaced by a directory.
        n.apply(mkdir("/y")).unwrap();
        n.apply(rename("/y", "/e", 0)).unwrap();
        assert_eq!(n.names("/"), ["/e", "/h", "/z"]);
        // Exchange swaps, subtrees included.
        n.apply(create("/e/in-e")).unwrap();
        n.apply(rename("/e", "/z", RENAME_EXCHANGE)).unwrap();
        assert_eq!(n.names("/z"), ["/z/in-e"]);
        assert_eq!(n.names("/e"), ["/e/b"]);
        assert_eq!(n.view().entry("/e/b/f").unwrap().kind, Kind::File);
    }

    #[test]
    fn setattr_changes_what_it_names_and_refuses_a_stale_id() {
        let mut n = Ns::new();
        let id = n.apply(create("/f")).unwrap();
        let set = |ino, size| NameOp::SetAttr {
            path: "/f".into(),
            ino,
            mode: Some(0o4755),
            uid: Some(7),
            gid: None,
            atime_ns: Some(11),
            mtime_ns: None,
            size,
            touch: false,
        };
        assert_eq!(n.apply(set(id + 1, Some(3))), Err(NamespaceError::NotFound { path: "/f".into() }));
        n.apply(set(id, Some(4096))).unwrap();
        let e = n.view().entry("/f").unwrap();
        assert_eq!((e.size, e.attr.mode, e.attr.uid, e.attr.gid, e.attr.atime_ns), (4096, 0o4755, 7, 1, 11));
        // Created at 5 ms, resized at 5 ms: the mtime still moves forward.
        assert_eq!(e.attr.mtime_ns, 5_000_001);
    }

    #[test]
    fn a_put_makes_its_parent_directories() {
        let mut n = Ns::new();
        n.ns().make_parents("/p/q/r", 0).unwrap();
        assert_eq!(n.names("/p"), ["/p/q"]);
        n.apply(create("/p/q/r")).unwrap();
        assert_eq!(n.ns().make_parents("/p/q/r/s", 0), Err(NamespaceError::NotDir { path: "/p/q/r".into() }));
    }

    #[test]
    fn special_files_keep_their_type_and_device_and_an_access_moves_only_atime() {
        let mut n = Ns::new();
        let mknod = |p: &str, mode, rdev| NameOp::Mknod { path: p.into(), mode, rdev, uid: 1, gid: 2 };
        let fifo = n.apply(mknod("/fifo", 0o010644, 0)).unwrap();
        n.apply(mknod("/dev", 0o020600, 259)).unwrap();
        assert_eq!(n.apply(mknod("/bad", 0o100644, 0)), Err(NamespaceError::BadName { path: "/bad".into() }));
        let e = n.view().entry("/dev").unwrap();
        assert_eq!((e.kind, e.attr.mode, e.rdev, e.size), (Kind::Special, 0o020600, 259, 0));
        let chmod = NameOp::SetAttr {
            path: "/fifo".into(),
            ino: fifo,
            mode: Some(0o600),
            uid: None,
            gid: None,
            atime_ns: None,
            mtime_ns: None,
            size: None,
            touch: false,
        };
        n.apply(chmod).unwrap();
        n.apply(rename("/fifo", "/p", 0)).unwrap();
        let e = n.view().entry("/p").unwrap();
        assert_eq!((e.kind, e.attr.mode, e.attr.ino), (Kind::Special, 0o010600, fifo));
        assert_eq!(n.names("/"), ["/dev", "/p"]);
        n.apply(NameOp::Unlink { path: "/p".into() }).unwrap();
        assert_eq!(n.names("/"), ["/dev"]);
        // A read at a later time: atime moves, ctime stays.
        let before = n.view().entry("/dev").unwrap().attr;
        n.ns().apply(NameOp::Access { path: "/dev".into(), ino: before.ino }, 9).unwrap();
        let after = n.view().entry("/dev").unwrap().attr;
        assert_eq!((after.atime_ns, after.ctime_ns, after.mtime_ns), (9_000_000, before.ctime_ns, before.mtime_ns));
        let stale = NameOp::Access { path: "/dev".into(), ino: before.ino + 100 };
        assert_eq!(n.apply(stale), Err(NamespaceError::NotFound { path: "/dev".into() }));
    }
}
