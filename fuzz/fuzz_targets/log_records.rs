//! The versioned records of the Raft log: a log entry's command and an op, decoded from any
//! bytes, refuse or decode, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lockservice::codec::{Record, decode};
use lockservice::{Command, Op};

fuzz_target!(|data: &[u8]| {
    let _ = decode::<Command>(Record::LogEntry { index: 1 }, data);
    let _ = decode::<Op>(Record::LogEntry { index: 2 }, data);
});
