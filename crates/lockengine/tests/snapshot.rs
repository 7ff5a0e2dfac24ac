//! A snapshot taken at any point and restored (through JSON, as Raft would ship it) gives an
//! engine that answers every later input exactly as the original does: outputs, tokens, order.

use lockengine::{ByteRange, Engine, EngineSnapshot, Input, LockId, Mode, PosixKind, PosixOwner, SessionId};
use proptest::prelude::*;

fn range() -> impl Strategy<Value = ByteRange> {
    (0u64..12, 1u64..6, prop::bool::weighted(0.15))
        .prop_map(|(s, len, eof)| ByteRange { start: s, end: if eof { u64::MAX } else { s + len } })
}

fn input() -> impl Strategy<Value = (u64, Input)> {
    let session = (0u64..3).prop_map(SessionId);
    let lock = (0u64..12).prop_map(LockId);
    let res = prop::sample::select(vec!["a", "b", "c"]).prop_map(str::to_string);
    let mode = prop::sample::select(Mode::ALL.to_vec());
    let kind = prop::sample::select(vec![PosixKind::Read, PosixKind::Write, PosixKind::Unlock]);
    let owner = (0u64..3, 0u64..2).prop_map(|(s, o)| PosixOwner { session: SessionId(s), owner: o });
    let input = prop_oneof![
        6 => (lock.clone(), session.clone(), res.clone(), range(), mode.clone(), prop::bool::weighted(0.2))
            .prop_map(|(lock, session, resource, range, mode, nowait)| Input::Lock { lock, session, resource, range, mode, nowait }),
        2 => (lock.clone(), mode, prop::option::of(range())).prop_map(|(lock, mode, range)| Input::Convert { lock, mode, range }),
        4 => lock.clone().prop_map(|lock| Input::Release { lock }),
        1 => lock.clone().prop_map(|lock| Input::Cancel { lock }),
        1 => lock.clone().prop_map(|lock| Input::Cache { lock }),
        1 => (lock, "[a-z]{1,3}").prop_map(|(lock, v)| Input::SetValue { lock, value: v.into_bytes() }),
        3 => (owner.clone(), res.clone(), range(), kind, prop::bool::ANY)
            .prop_map(|(owner, resource, range, kind, wait)| Input::Posix { owner, resource, range, kind, wait }),
        1 => (owner, res, range()).prop_map(|(owner, resource, range)| Input::PosixTest { owner, resource, range, kind: PosixKind::Write }),
        1 => session.clone().prop_map(|session| Input::Renew { session }),
        1 => session.clone().prop_map(|session| Input::FenceAck { session }),
        1 => session.clone().prop_map(|session| Input::OpenSession { session, lease_ms: 500 }),
        1 => session.prop_map(|session| Input::CloseSession { session }),
        1 => (1u64..4).prop_map(|epoch| Input::SetEpoch { epoch }),
    ];
    (0u64..200, input)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    #[test]
    fn restored_engine_is_indistinguishable(
        before in prop::collection::vec(input(), 0..80),
        after in prop::collection::vec(input(), 1..80),
    ) {
        let mut original = Engine::default();
        let mut now = 0;
        for s in 0..3 {
            original.step(0, Input::OpenSession { session: SessionId(s), lease_ms: 500 });
        }
        for (dt, input) in before {
            now += dt;
            original.step(now, input);
        }
        let snapshot = original.snapshot();
        let json = serde_json::to_string(&snapshot).expect("serialize");
        let shipped: EngineSnapshot = serde_json::from_str(&json).expect("deserialize");
        prop_assert_eq!(&shipped, &snapshot);
        let mut restored = Engine::restore(&shipped).expect("restore");
        restored.check_invariants();
        prop_assert_eq!(restored.snapshot(), snapshot);
        for (dt, input) in after {
            now += dt;
            let a = original.step(now, input.clone());
            let b = restored.step(now, input);
            restored.check_invariants();
            prop_assert_eq!(a, b);
        }
        prop_assert_eq!(restored.snapshot(), original.snapshot());
    }
}

#[test]
fn restore_refuses_another_version() {
    let mut snapshot = Engine::default().snapshot();
    snapshot.version += 1;
    let err = Engine::restore(&snapshot).unwrap_err();
    assert!(err.to_string().contains("format version 2 is not 1"), "{err}");
}

/// Found by the `engine_snapshots` fuzz target: a snapshot holding an empty byte range (here a
/// POSIX lock's, a grant's, a wait's) made restore panic inside the interval map; it is
/// refused as inconsistent.
#[test]
fn restore_refuses_an_empty_range_instead_of_panicking() {
    let mut e = Engine::default();
    let s = SessionId(1);
    e.step(0, Input::OpenSession { session: s, lease_ms: 10_000 });
    let owner = PosixOwner { session: s, owner: 1 };
    let range = ByteRange { start: 0, end: 10 };
    e.step(1, Input::Posix { owner, resource: "p".into(), range, kind: PosixKind::Write, wait: false });
    e.step(2, Input::Lock { lock: LockId(1), session: s, resource: "l".into(), range, mode: Mode::EX, nowait: false });
    e.step(3, Input::OpenSession { session: SessionId(2), lease_ms: 10_000 });
    let other = SessionId(2);
    e.step(
        4,
        Input::Lock { lock: LockId(2), session: other, resource: "l".into(), range, mode: Mode::EX, nowait: false },
    );
    let good: EngineSnapshot = e.snapshot();
    Engine::restore(&good).expect("the snapshot as taken restores");
    let empty = ByteRange { start: 5, end: 5 };
    let mut posix = good.clone();
    posix.posix[0].ranges[0].0 = empty;
    let mut grant = good.clone();
    grant.locks[0].grant.as_mut().expect("a grant").1 = empty;
    let mut wait = good.clone();
    wait.locks[1].request.as_mut().expect("a waiter").1 = empty;
    for (what, bad) in [("posix", posix), ("grant", grant), ("wait", wait)] {
        let err = Engine::restore(&bad).err().unwrap_or_else(|| panic!("{what}: an empty range restored"));
        assert!(err.to_string().contains("empty byte range"), "{what}: {err}");
    }
}

/// Found by the same fuzz target: two POSIX waits with one sequence number (on two resources)
/// restored into one wait queued twice, and serving the second queue panicked.
#[test]
fn restore_refuses_a_posix_wait_listed_twice() {
    let mut e = Engine::default();
    let (a, b) = (SessionId(1), SessionId(2));
    e.step(0, Input::OpenSession { session: a, lease_ms: 10_000 });
    e.step(0, Input::OpenSession { session: b, lease_ms: 10_000 });
    let range = ByteRange { start: 0, end: 10 };
    let (oa, ob) = (PosixOwner { session: a, owner: 1 }, PosixOwner { session: b, owner: 1 });
    e.step(1, Input::Posix { owner: oa, resource: "p".into(), range, kind: PosixKind::Write, wait: false });
    e.step(2, Input::Posix { owner: ob, resource: "p".into(), range, kind: PosixKind::Write, wait: true });
    let good = e.snapshot();
    assert_eq!(good.posix_waits.len(), 1, "one waiter");
    Engine::restore(&good).expect("the snapshot as taken restores");
    let mut twice = good.clone();
    let mut again = twice.posix_waits[0].clone();
    again.resource = "q".into();
    twice.posix_waits.push(again);
    let Err(err) = Engine::restore(&twice) else { panic!("a wait listed twice restored") };
    assert!(err.to_string().contains("appears twice"), "{err}");
}

/// Found by the same fuzz target (its 10M-run pass): a snapshot listing one lock id twice, both
/// granted, indexed the second grant under an id the range index already held, which panicked
/// ("indexed twice") before the duplicate was noticed. Refused now before anything is indexed.
#[test]
fn restore_refuses_a_lock_listed_twice_before_indexing_it() {
    let mut e = Engine::default();
    let s = SessionId(1);
    e.step(0, Input::OpenSession { session: s, lease_ms: 10_000 });
    let range = ByteRange { start: 0, end: 10 };
    e.step(1, Input::Lock { lock: LockId(1), session: s, resource: "l".into(), range, mode: Mode::PR, nowait: false });
    let good = e.snapshot();
    Engine::restore(&good).expect("the snapshot as taken restores");
    let mut twice = good.clone();
    twice.locks.push(good.locks[0].clone());
    let Err(err) = Engine::restore(&twice) else { panic!("a lock listed twice restored") };
    assert!(err.to_string().contains("appears twice"), "{err}");
}
