//! A stripe unit's record and a volume's fence table as read from disk: damaged bytes are
//! refused as corrupt, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let id = chunks::UnitId { file: 7, row: 3, role: layout::Role::Data(1) };
    let _ = chunks::decode(&id, data);
    let _ = chunks::fences::decode_fences(data);
});
