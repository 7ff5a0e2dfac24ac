//! `stripelock debug replay`: scenario scripts through the lock engine.

use std::path::PathBuf;
use std::process::ExitCode;

use lockengine::script::{self, Options};

#[derive(Debug, Clone, Copy)]
pub struct Mode {
    pub check: bool,
    pub bless: bool,
    pub echo: bool,
    pub json: bool,
}

/// Exit codes: 0 all well, 1 a trace differs from its expectation (with `--check`),
/// 2 a file could not be read or a line is malformed.
pub fn run(files: &[PathBuf], mode: Mode) -> ExitCode {
    let mut worst = 0u8;
    for file in files {
        let name = file.display();
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: cannot read {name}: {e}");
                worst = 2;
                continue;
            }
        };
        let options = Options { check_invariants: true, ..Options::default() };
        let steps = match script::run(&text, options) {
            Ok(steps) => steps,
            Err(e) => {
                eprintln!("error: {name}: {e}");
                worst = 2;
                continue;
            }
        };
        if mode.bless {
            let blessed = script::bless(&text, &steps);
            if blessed != text
                && let Err(e) = std::fs::write(file, blessed)
            {
                eprintln!("error: cannot write {name}: {e}");
                worst = 2;
            }
            continue;
        }
        let mismatches = script::mismatches(&steps);
        if mode.json {
            let trace: Vec<&String> = steps.iter().flat_map(|s| &s.actual).collect();
            let value = serde_json::json!({
                "file": name.to_string(),
                "commands": steps.len(),
                "trace": trace,
                "mismatches": if mode.check { mismatches.len() } else { 0 },
            });
            println!("{value}");
        } else if mode.check {
            if mismatches.is_empty() {
                println!("ok {name} ({} commands)", steps.len());
            } else {
                println!("FAIL {name}: {} commands differ (- expected, + actual)", mismatches.len());
                for m in &mismatches {
                    print!("{m}");
                }
            }
        } else {
            if files.len() > 1 {
                println!("== {name}");
            }
            for step in &steps {
                if mode.echo {
                    println!("# {}", step.command);
                }
                print!("{step}");
            }
        }
        if mode.check && !mismatches.is_empty() {
            worst = worst.max(1);
        }
    }
    ExitCode::from(worst)
}
