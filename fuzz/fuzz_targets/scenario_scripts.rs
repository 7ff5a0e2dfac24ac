//! Scenario scripts (the replay format) drive the engine: any text either fails to parse with a
//! line number or runs with the engine's invariants checked after every step.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lockengine::script::{Options, run};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if text.len() > 4096 {
        return;
    }
    let _ = run(text, Options { limits: lockengine::Limits::default(), check_invariants: true });
});
