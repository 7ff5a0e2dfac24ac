//! Every scenario under tests/scenarios/ must reproduce its expected trace exactly, with
//! `check_invariants` after every step. A new case is a new file (see `lockengine::script`).

use std::path::Path;

use lockengine::script::{self, Options};

#[test]
fn scenarios_reproduce_their_traces() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("scenario directory")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "scn"))
        .collect();
    files.sort();
    assert!(files.len() >= 40, "expected at least 40 scenario files, found {}", files.len());
    let mut failures = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("readable scenario");
        let steps = script::run(&text, Options { check_invariants: true, ..Options::default() })
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(steps.iter().any(|s| !s.expected.is_empty()), "{} expects nothing", file.display());
        for m in script::mismatches(&steps) {
            failures.push(format!("{}: {m}", file.display()));
        }
    }
    assert!(failures.is_empty(), "traces differ (- expected, + actual):\n{}", failures.join("\n"));
}

#[test]
fn malformed_line_names_its_number() {
    let err = script::run("session A\nlock L1 A /f 0..10\n", Options::default()).unwrap_err();
    assert_eq!(err.line, 2);
    assert!(err.message.contains("lock <L> <S> <resource> <range> <mode>"), "{}", err.message);
    let err = script::run("at 10\nat 5\n", Options::default()).unwrap_err();
    assert_eq!(err.line, 2);
    assert!(err.message.contains("time goes back"), "{}", err.message);
}

/// The engine is a pure core: no async runtime, no clock, no sockets, no files, no threads.
#[test]
fn engine_is_sans_io() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("manifest");
    let deps = manifest.split("[dependencies]").nth(1).expect("dependencies").split("\n[").next().unwrap_or("");
    for line in deps.lines().filter(|l| l.contains('=')) {
        let name = line.split(['=', '.']).next().unwrap_or("").trim();
        assert!(
            ["rangemap", "rustc-hash", "serde", "thiserror"].contains(&name),
            "unexpected engine dependency `{name}`"
        );
    }
    for entry in std::fs::read_dir(root.join("src")).expect("src") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("source");
        for banned in ["std::time", "Instant", "SystemTime", "std::net", "std::fs", "std::thread", "tokio", "rand::"] {
            assert!(!text.contains(banned), "{} mentions `{banned}`", path.display());
        }
    }
}
