//! An engine snapshot read back from any bytes: refused, or restored into an engine that
//! snapshots to the same thing again and steps on without a panic. (Not `check_invariants`:
//! a snapshot may hold a live session past its lease, which the engine itself never leaves,
//! but the lock service's engine does, keeping leases outside it; the next tick expires it.)
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = postcard::from_bytes::<lockengine::EngineSnapshot>(data)
        && let Ok(mut engine) = lockengine::Engine::restore(&s)
    {
        let again = engine.snapshot();
        let restored = lockengine::Engine::restore(&again).expect("a restored engine's snapshot restores");
        assert_eq!(restored.snapshot(), again, "a snapshot round-trips");
        let now = again.now_ms;
        let _ = engine.step(now.saturating_add(1), lockengine::Input::Tick);
    }
});
