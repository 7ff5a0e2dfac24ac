//! The house rules ARCHITECTURE.md states, checked on the sources: no import cycle between the
//! modules of any crate, and the lock service and the data path in crates of their own, the
//! data path reaching the lock service only through its trait.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn crates_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("crates/").to_path_buf()
}

/// The text of a source file without its comments (line comments, doc comments, block
/// comments), so a module named in prose is not taken for a use of it. String literals are kept
/// as they are; none of ours spells `crate::`.
fn code_of(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    let mut in_string = false;
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            if c == '\\' {
                if let Some(n) = chars.next() {
                    out.push(n);
                }
            } else if c == '"' {
                in_string = false;
            }
            continue;
        }
        match (c, chars.peek()) {
            ('"', _) => {
                in_string = true;
                out.push(c);
            }
            ('/', Some('/')) => {
                for n in chars.by_ref() {
                    if n == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            ('/', Some('*')) => {
                chars.next();
                let mut last = ' ';
                for n in chars.by_ref() {
                    if last == '*' && n == '/' {
                        break;
                    }
                    last = n;
                }
            }
            _ => out.push(c),
        }
    }
    out
}

/// The names a path starting at `crate::` reaches first: `crate::a::X` gives `a`, and
/// `crate::{a::X, b}` gives `a` and `b`.
fn first_segments(code: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = code.as_bytes();
    let mut at = 0;
    while let Some(found) = code[at..].find("crate::") {
        let start = at + found;
        at = start + "crate::".len();
        // `foo_crate::x` is another path.
        if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
            continue;
        }
        if code[at..].starts_with('{') {
            // A use tree: the first segment of each top-level branch.
            let mut depth = 0;
            let mut branch_start = true;
            let mut name = String::new();
            for c in code[at..].chars() {
                match c {
                    '{' => {
                        depth += 1;
                        if depth == 1 {
                            branch_start = true;
                        }
                    }
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            if !name.is_empty() {
                                names.insert(std::mem::take(&mut name));
                            }
                            break;
                        }
                    }
                    ',' if depth == 1 => {
                        if !name.is_empty() {
                            names.insert(std::mem::take(&mut name));
                        }
                        branch_start = true;
                    }
                    c if depth == 1 && branch_start && (c.is_alphanumeric() || c == '_') => name.push(c),
                    c if depth == 1 && branch_start && !c.is_whitespace() && !name.is_empty() => {
                        names.insert(std::mem::take(&mut name));
                        branch_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            let name: String = code[at..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                names.insert(name);
            }
        }
    }
    names
}

/// One crate's modules (one file each; none of ours nests) and what each uses of the others.
struct Crate {
    name: String,
    /// Module → modules it uses. The root (`lib`/`main`) is a module too, except that its
    /// `mod` declarations and re-exports are not uses.
    uses: BTreeMap<String, BTreeSet<String>>,
}

fn read_crate(dir: &Path) -> Crate {
    let src = dir.join("src");
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(&src).expect("src/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "rs") {
            let module = path.file_stem().expect("stem").to_string_lossy().into_owned();
            files.insert(module, code_of(&std::fs::read_to_string(&path).expect("source")));
        }
    }
    assert!(
        std::fs::read_dir(&src).expect("src/").all(|e| !e.expect("entry").path().is_dir()),
        "{}: nested modules; teach this test to read them",
        src.display()
    );
    // Items the root re-exports, by name → the module they come from.
    let mut reexported: BTreeMap<String, String> = BTreeMap::new();
    for root in ["lib", "main"] {
        let Some(code) = files.get(root) else { continue };
        for line in code.lines().map(str::trim).filter(|l| l.starts_with("pub use ")) {
            let path = line.trim_start_matches("pub use ").trim_end_matches(';');
            let Some((module, items)) = path.split_once("::") else { continue };
            let items = items.trim_start_matches('{').trim_end_matches('}');
            for item in items.split(',') {
                let item = item.trim();
                let name = item.rsplit("::").next().unwrap_or(item).rsplit(" as ").next().unwrap_or(item).trim();
                if !name.is_empty() {
                    reexported.insert(name.to_string(), module.to_string());
                }
            }
        }
    }
    let mut uses = BTreeMap::new();
    for (module, code) in &files {
        let code = if module == "lib" || module == "main" {
            code.lines()
                .filter(|l| {
                    let l = l.trim_start();
                    !(l.starts_with("pub use ") || l.starts_with("mod ") || l.starts_with("pub mod "))
                })
                .collect::<Vec<_>>()
                .join("\n")
        } else {
            code.clone()
        };
        let used: BTreeSet<String> = first_segments(&code)
            .into_iter()
            .map(|name| {
                if files.contains_key(&name) {
                    name
                } else if let Some(m) = reexported.get(&name) {
                    m.clone()
                } else if files.contains_key("lib") {
                    "lib".to_string()
                } else {
                    "main".to_string()
                }
            })
            .filter(|m| m != module)
            .collect();
        uses.insert(module.clone(), used);
    }
    Crate { name: dir.file_name().expect("name").to_string_lossy().into_owned(), uses }
}

/// A cycle among `uses`, if there is one, as the modules along it.
fn find_cycle(uses: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        m: &str,
        uses: &BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == m) {
            let mut cycle = path[i..].to_vec();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for next in uses.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, uses, done, path) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    uses.keys().find_map(|m| visit(m, uses, &mut done, &mut Vec::new()))
}

fn all_crates() -> Vec<Crate> {
    let mut crates: Vec<Crate> = std::fs::read_dir(crates_dir())
        .expect("crates/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.join("src").is_dir())
        .map(|p| read_crate(&p))
        .collect();
    crates.sort_by(|a, b| a.name.cmp(&b.name));
    crates
}

#[test]
fn no_crate_has_an_import_cycle() {
    let crates = all_crates();
    assert!(crates.iter().any(|c| c.name == "lockservice") && crates.iter().any(|c| c.name == "datapath"));
    let cycles: Vec<String> = crates
        .iter()
        .filter_map(|c| find_cycle(&c.uses).map(|cycle| format!("{}: {}", c.name, cycle.join(" → "))))
        .collect();
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    // The negative control of the test above: a made-up crate with one.
    let code = "use crate::{b::X, c};\nfn f() { crate::d::g(); }\n// crate::e is prose\n";
    let names = first_segments(&code_of(code));
    assert_eq!(names, ["b", "c", "d"].into_iter().map(String::from).collect());
    let uses: BTreeMap<String, BTreeSet<String>> =
        [("a", vec!["b"]), ("b", vec!["c"]), ("c", vec!["a"]), ("d", vec![])]
            .into_iter()
            .map(|(m, u)| (m.to_string(), u.into_iter().map(String::from).collect()))
            .collect();
    assert_eq!(find_cycle(&uses), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
    let mut acyclic = uses.clone();
    acyclic.get_mut("c").expect("c").clear();
    assert_eq!(find_cycle(&acyclic), None);
}

/// The crates the lock service and the data path may not mix: the data path reaches the lock
/// service through `datapath::LockService`, implemented by the server's wiring.
#[test]
fn the_lock_service_and_the_data_path_keep_to_their_crates() {
    let manifest = |name: &str| std::fs::read_to_string(crates_dir().join(name).join("Cargo.toml")).expect("manifest");
    let deps = |name: &str| -> BTreeSet<String> {
        let text = manifest(name);
        let mut in_deps = false;
        let mut deps = BTreeSet::new();
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('[') {
                in_deps = line == "[dependencies]";
                continue;
            }
            if in_deps && let Some((dep, _)) = line.split_once(['.', '=']) {
                deps.insert(dep.trim().to_string());
            }
        }
        deps
    };
    let lockservice = deps("lockservice");
    // `layout` it may: a file's layout is part of the namespace it replicates.
    for dp in ["datapath", "chunks", "server"] {
        assert!(!lockservice.contains(dp), "the lock service depends on {dp}");
    }
    let datapath = deps("datapath");
    assert!(
        !datapath.contains("openraft") && !datapath.contains("redb"),
        "the data path reaches into Raft: {datapath:?}"
    );
    // The data path names no part of the node: only the trait's methods and the log's types.
    let src = crates_dir().join("datapath").join("src");
    for entry in std::fs::read_dir(&src).expect("src/") {
        let path = entry.expect("entry").path();
        let code = code_of(&std::fs::read_to_string(&path).expect("source"));
        for forbidden in ["lockservice::Node", "lockservice::Machine", ".machine.", "lockservice::State", ".engine."] {
            assert!(!code.contains(forbidden), "{} uses {forbidden}", path.display());
        }
    }
}

/// Errors are types: no `Result<_, String>` and no string-typed error field in the lock
/// service, the data path and the client.
#[test]
fn no_error_is_a_string() {
    for name in ["lockservice", "datapath", "client", "wire"] {
        let src = crates_dir().join(name).join("src");
        for entry in std::fs::read_dir(&src).expect("src/") {
            let path = entry.expect("entry").path();
            let code = code_of(&std::fs::read_to_string(&path).expect("source"));
            let squeezed: String = code.chars().filter(|c| !c.is_whitespace()).collect();
            let string_result = squeezed
                .split("Result<")
                .skip(1)
                .any(|r| r.split('>').next().is_some_and(|args| args.ends_with(",String")));
            assert!(!string_result, "{} has a Result<_, String>", path.display());
            for bad in ["error:Option<String>", "error:String", "Err(String)"] {
                assert!(!squeezed.contains(bad), "{} carries an error as a String ({bad})", path.display());
            }
        }
    }
}
