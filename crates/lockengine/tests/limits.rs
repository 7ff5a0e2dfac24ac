//! Every limit refuses the request that would pass it, says which limit, and changes nothing:
//! the table after the refusal is the table before it.

use lockengine::script::{Options, Replay};
use lockengine::{Limits, ResourceView};

fn replay(limits: Limits) -> Replay {
    Replay::new(Options { limits, check_invariants: true })
}

fn run(r: &mut Replay, lines: &[&str]) -> Vec<String> {
    lines.iter().flat_map(|l| r.run_line(0, l).expect("well-formed")).collect()
}

fn table(r: &Replay) -> (Vec<ResourceView>, lockengine::Stats) {
    (r.engine().resources(""), r.engine().stats())
}

#[test]
fn locks_per_session() {
    let mut r = replay(Limits { locks_per_session_max: 2, ..Limits::default() });
    run(&mut r, &["session A", "lock L1 A /f 0..10 EX", "lock L2 A /g 0..10 EX"]);
    let before = table(&r);
    let out = run(&mut r, &["lock L3 A /h 0..10 EX"]);
    assert_eq!(out, ["error L3 locks per session limit (2) reached: release locks or raise locks_per_session_max"]);
    assert_eq!(table(&r), before);
    // Waiting requests count too; after a release there is room again.
    run(&mut r, &["release L1"]);
    assert_eq!(run(&mut r, &["lock L3 A /h 0..10 EX"]), ["granted L3 EX 0..10 token=3"]);
}

#[test]
fn waiters_per_resource() {
    let mut r = replay(Limits { waiters_per_resource_max: 1, ..Limits::default() });
    run(&mut r, &["session A", "session B", "session C", "lock L1 A /f all EX", "lock L2 B /f all EX"]);
    let before = table(&r);
    let out = run(&mut r, &["lock L3 C /f all EX"]);
    assert!(out[0].starts_with("error L3 waiters per resource limit (1) reached"), "{out:?}");
    assert_eq!(table(&r), before);
    // A conversion that would wait counts as a waiter as well.
    run(&mut r, &["lock L4 C /f2 all PR", "lock L5 A /f2 all PR", "lock L6 B /f2 all EX"]);
    let out = run(&mut r, &["convert L4 EX"]);
    assert!(out[0].starts_with("error L4 waiters per resource limit (1) reached"), "{out:?}");
}

#[test]
fn ranges_per_posix_owner() {
    let mut r = replay(Limits { ranges_per_owner_max: 2, ..Limits::default() });
    run(&mut r, &["session A", "posix A:p /f 0..10 w", "posix A:p /f 20..30 w"]);
    let before = table(&r);
    let out = run(&mut r, &["posix A:p /f 40..50 w"]);
    assert!(out[0].starts_with("error A:p ranges per POSIX owner limit (2) reached"), "{out:?}");
    // Splitting a range in two by unlocking its middle would also pass the limit.
    let out = run(&mut r, &["posix A:p /f 3..5 u"]);
    assert!(out[0].starts_with("error A:p ranges per POSIX owner limit (2) reached"), "{out:?}");
    assert_eq!(table(&r), before);
    // Merging stays within it: 10..20 joins the two ranges into one.
    assert_eq!(run(&mut r, &["posix A:p /f 10..20 w"]), ["posix-granted A:p /f 10..20 w"]);
    assert_eq!(r.engine().resources("/f")[0].posix.len(), 1);
}

#[test]
fn resources_and_sessions() {
    let mut r = replay(Limits { resources_max: 2, sessions_max: 1, ..Limits::default() });
    run(&mut r, &["session A", "lock L1 A /f all PR", "lock L2 A /g all PR"]);
    let before = table(&r);
    let out = run(&mut r, &["lock L3 A /h all PR"]);
    assert!(out[0].starts_with("error L3 resources limit (2) reached"), "{out:?}");
    assert_eq!(table(&r), before);
    // An existing resource still takes locks.
    assert_eq!(run(&mut r, &["lock L4 A /f all PR"]), ["granted L4 PR all token=3"]);
    let out = run(&mut r, &["session B"]);
    assert!(out[0].starts_with("error B sessions limit (1) reached"), "{out:?}");
}

#[test]
fn value_block_and_name_sizes() {
    let mut r = replay(Limits { value_block_bytes_max: 4, resource_name_bytes_max: 8, ..Limits::default() });
    run(&mut r, &["session A", "lock L1 A /f all EX"]);
    assert_eq!(run(&mut r, &["lvb L1 12345"]), ["error L1 value block of 5 bytes is over the limit of 4"]);
    assert_eq!(
        run(&mut r, &["lock L2 A /123456789 all EX"]),
        ["error L2 resource name of 10 bytes is over the limit of 8"]
    );
    assert_eq!(r.engine().stats().resources, 1);
}
