//! Which files to migrate: pure, given the time and the namespace's facts. A file is cold when
//! neither read (atime) nor written (mtime) for `older_than`, larger than `larger_than`, under
//! `under`, and not migrated already. The coldest go first, then the largest, at most `max`.

/// What the policy knows of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileFacts {
    pub path: String,
    pub id: u64,
    pub size: u64,
    pub atime_ns: u64,
    pub mtime_ns: u64,
    /// Already a stub on the secondary tier.
    pub migrated: bool,
}

impl FileFacts {
    /// The last time it was used, read or written.
    pub fn last_use_ns(&self) -> u64 {
        self.atime_ns.max(self.mtime_ns)
    }
}

/// A migration policy (`stripelock migrate --older-than D --larger-than S --under P`, or a
/// server's `tier` configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub older_than_ns: u64,
    /// Only files of more bytes than this (0: any, empty files excepted: they have no data).
    pub larger_than: u64,
    /// Only files at or under this directory (`/` or `None`: everywhere).
    pub under: Option<String>,
    /// At most this many files per pass.
    pub max: usize,
}

/// Whether `path` is `dir` or below it (`dir` with or without a trailing `/`).
fn is_under(path: &str, dir: &str) -> bool {
    let dir = dir.trim_end_matches('/');
    dir.is_empty() || path == dir || (path.starts_with(dir) && path.as_bytes().get(dir.len()) == Some(&b'/'))
}

/// The files `policy` migrates at `now_ns`, coldest first (then largest, then by path).
pub fn cold(policy: &Policy, now_ns: u64, files: impl IntoIterator<Item = FileFacts>) -> Vec<FileFacts> {
    let mut picked: Vec<FileFacts> = files
        .into_iter()
        .filter(|f| {
            !f.migrated
                && f.size > 0
                && f.size > policy.larger_than
                && now_ns.saturating_sub(f.last_use_ns()) >= policy.older_than_ns
                && policy.under.as_deref().is_none_or(|d| is_under(&f.path, d))
        })
        .collect();
    picked.sort_by(|a, b| {
        a.last_use_ns().cmp(&b.last_use_ns()).then(b.size.cmp(&a.size)).then_with(|| a.path.cmp(&b.path))
    });
    picked.truncate(policy.max);
    picked
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const S: u64 = 1_000_000_000;

    fn file(path: &str, size: u64, atime_s: u64, mtime_s: u64) -> FileFacts {
        FileFacts { path: path.into(), id: 0, size, atime_ns: atime_s * S, mtime_ns: mtime_s * S, migrated: false }
    }

    fn policy(older_than_s: u64, larger_than: u64, under: Option<&str>) -> Policy {
        Policy { older_than_ns: older_than_s * S, larger_than, under: under.map(String::from), max: 100 }
    }

    fn paths(v: Vec<FileFacts>) -> Vec<String> {
        v.into_iter().map(|f| f.path).collect()
    }

    #[test]
    fn picks_files_unused_for_long_enough_coldest_first() {
        let files = vec![
            file("/a", 10, 100, 50), // read at 100: warm
            file("/b", 10, 10, 20),  // last used 20
            file("/c", 10, 5, 5),    // last used 5
            file("/d", 0, 1, 1),     // empty: nothing to move
            file("/e", 99, 20, 20),  // as cold as /b, larger: before it
        ];
        assert_eq!(paths(cold(&policy(60, 0, None), 100 * S, files)), ["/c", "/e", "/b"]);
    }

    #[test]
    fn size_directory_migrated_and_max_filter() {
        let mut m = file("/x/m", 10, 0, 0);
        m.migrated = true;
        let files = vec![file("/x/a", 5, 0, 0), file("/x/b", 500, 0, 0), file("/xy/c", 500, 0, 0), m];
        assert_eq!(paths(cold(&policy(1, 100, Some("/x")), 100 * S, files.clone())), ["/x/b"]);
        assert_eq!(paths(cold(&policy(1, 100, Some("/x/")), 100 * S, files.clone())), ["/x/b"]);
        assert_eq!(paths(cold(&policy(1, 0, Some("/")), 100 * S, files.clone())), ["/x/b", "/xy/c", "/x/a"]);
        let one = Policy { max: 1, ..policy(1, 0, None) };
        assert_eq!(paths(cold(&one, 100 * S, files)), ["/x/b"]);
    }

    proptest! {
        /// Everything picked passes every filter, nothing passing is left out (under `max`), and
        /// the order is by last use.
        #[test]
        fn picks_exactly_the_cold_files(
            facts in proptest::collection::vec((0u64..4, 0u64..1000, 0u64..200, 0u64..200, any::<bool>()), 0..40),
            older in 0u64..150,
            larger in 0u64..800,
        ) {
            let dirs = ["/a", "/a/b", "/c", "/ab"];
            let files: Vec<FileFacts> = facts.iter().enumerate().map(|(i, (d, size, at, mt, migrated))| FileFacts {
                path: format!("{}/f{i}", dirs[*d as usize]), id: i as u64, size: *size,
                atime_ns: at * S, mtime_ns: mt * S, migrated: *migrated,
            }).collect();
            let p = policy(older, larger, Some("/a"));
            let now = 200 * S;
            let picked = cold(&p, now, files.clone());
            let passes = |f: &FileFacts| !f.migrated && f.size > larger && f.size > 0
                && now - f.last_use_ns() >= older * S && (f.path.starts_with("/a/"));
            prop_assert!(picked.iter().all(passes));
            prop_assert_eq!(picked.len(), files.iter().filter(|f| passes(f)).count());
            prop_assert!(picked.windows(2).all(|w| w[0].last_use_ns() <= w[1].last_use_ns()));
        }
    }
}
