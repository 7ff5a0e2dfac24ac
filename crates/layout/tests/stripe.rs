//! The row planner against a model that recomputes everything: random sequences of writes to
//! one row, some interrupted between their data and parity writes, applied to an in-memory
//! store the way storage applies them (version checks, versions bumped). After every complete
//! write the stored data must be the model's bytes and the parity exactly the parity of that
//! data, covering the data's versions; and a read that loses up to `m` units must give the
//! model's bytes or refuse, never other bytes.

use layout::stripe::{
    self, Plan, RowWrite, StoredUnit, UnitRead, plan_degraded, plan_new_row, plan_recompute, plan_update, solve_row,
    update_roles,
};
use layout::{Layout, Role, parity};
use proptest::prelude::*;

/// One row's units as storage keeps them, in role order.
struct Store {
    units: Vec<Option<StoredUnit>>,
}

impl Store {
    fn read(&self, l: &Layout, role: Role) -> UnitRead {
        match &self.units[stripe::role_index(l, role)] {
            Some(u) => UnitRead::Ok(u.clone()),
            None => UnitRead::Missing(format!("{} missing", stripe::role_name(role))),
        }
    }

    /// Stores one unit as the chunk store does: refused unless at the expected version.
    fn write(&mut self, l: &Layout, w: &stripe::UnitWrite) {
        let slot = &mut self.units[stripe::role_index(l, w.role)];
        let now = slot.as_ref().map_or(0, |u| u.version);
        if let Some(e) = w.expect {
            assert_eq!(e, now, "{} expected at version {e}, is at {now}", stripe::role_name(w.role));
        }
        *slot = Some(StoredUnit { bytes: w.bytes.clone(), version: now + 1, covers: w.covers.clone() });
    }
}

/// Plans a write as the runtime does: update if it can, else read everything and recompute.
fn plan(l: &Layout, store: &Store, w: &RowWrite, stripe: Option<u64>, existing: bool) -> Plan {
    let read: Vec<UnitRead> =
        update_roles(l, w).into_iter().map(|r| stripe::fresh(l, store.read(l, r), r, existing)).collect();
    if let Some(p) = plan_update(l, w, &read, stripe, existing) {
        return p;
    }
    let all: Vec<UnitRead> = l.roles().map(|r| store.read(l, r)).collect();
    plan_recompute(l, w, all, stripe, existing, l.data() as usize).expect("every unit is readable")
}

fn shapes() -> impl Strategy<Value = Layout> {
    (1u8..=5, 0u8..=2, prop_oneof![Just(512u32), Just(1024)]).prop_map(|(k, m, unit)| {
        let servers = (1..=(k + m) as u64).collect();
        Layout::new(unit, k, m, servers).expect("a valid layout")
    })
}

/// A write: where in the row, how long, its byte, and whether it is cut short after its data.
type Step = (u64, u64, u8, bool);

fn steps() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec((any::<u64>(), 1u64..3000, any::<u8>(), prop::bool::weighted(0.2)), 1..12)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// A row that does not exist yet, planned without reading it, gets exactly the plan the
    /// reading path makes for it; a row known to be written is never planned that way.
    #[test]
    fn a_new_row_is_planned_without_reads_as_the_reading_path_plans_it(
        l in shapes(), at in any::<u64>(), len in 1u64..6000, byte in any::<u8>(), stripe in 1u64..9,
    ) {
        let row_bytes = l.data() as u64 * l.unit() as u64;
        let lo = at % row_bytes;
        let data = vec![byte; len.min(row_bytes - lo) as usize];
        let w = RowWrite { lo, data: &data };
        let empty = Store { units: vec![None; l.width()] };
        let planned = plan_new_row(&l, &w, None).expect("a new row");
        prop_assert_eq!(&planned, &plan(&l, &empty, &w, None, false));
        prop_assert_eq!(plan_new_row(&l, &w, Some(0)), Some(planned));
        prop_assert_eq!(plan_new_row(&l, &w, Some(stripe)), None);
    }

    #[test]
    fn planned_writes_keep_the_row_equal_to_the_model(l in shapes(), steps in steps(), lose in any::<u64>()) {
        let (k, m, unit) = (l.data() as usize, l.parity() as usize, l.unit() as usize);
        let row_bytes = k * unit;
        let mut model = vec![0u8; row_bytes];
        let mut store = Store { units: vec![None; l.width()] };
        let mut stripe: Option<u64> = None;
        let mut existing = false;
        let mut parity_current = true;
        // The row as of the last complete write: what a parity that missed later writes holds.
        let mut at_parity = model.clone();
        for (at, len, byte, cut) in steps {
            let lo = at % row_bytes as u64;
            let len = len.min(row_bytes as u64 - lo);
            let data = vec![byte; len as usize];
            let w = RowWrite { lo, data: &data };
            let p = plan(&l, &store, &w, stripe, existing);
            prop_assert!(p.recomputed || parity_current || m == 0, "parity updated from a stale parity");
            for u in &p.data {
                store.write(&l, u);
            }
            model[lo as usize..(lo + len) as usize].copy_from_slice(&data);
            existing = true;
            if cut && m > 0 {
                // Interrupted after the data: the parity misses it, the stripe version is lost.
                stripe = None;
                parity_current = false;
                continue;
            }
            for u in &p.parity {
                store.write(&l, u);
            }
            stripe = Some(p.version);
            parity_current = true;
            at_parity.clone_from(&model);
            // Data as the model has it; parity exactly the parity of that data, covering it.
            for j in 0..k {
                let got = store.units[j].as_ref().map_or_else(|| vec![0; unit], |u| u.bytes.clone());
                prop_assert_eq!(&got[..], &model[j * unit..(j + 1) * unit], "data unit {}", j);
            }
            if m > 0 {
                let refs: Vec<&[u8]> = model.chunks(unit).collect();
                let (mut pp, mut qq) = (vec![0u8; unit], vec![0u8; unit]);
                parity::encode(&refs, Some(&mut pp), (m == 2).then_some(&mut qq[..]));
                let versions: Vec<u64> = (0..k).map(|j| store.units[j].as_ref().map_or(0, |u| u.version)).collect();
                for (i, want) in [pp, qq].iter().take(m).enumerate() {
                    let u = store.units[k + i].as_ref().expect("parity stored");
                    prop_assert_eq!(&u.bytes, want, "parity {}", i);
                    prop_assert_eq!(&u.covers, &versions);
                    prop_assert_eq!(Some(u.version), stripe, "the stripe version is the parity's");
                }
            }
        }
        // A read that loses up to m units gives the model's bytes, or refuses; never others.
        let lost: Vec<usize> = (0..l.width()).filter(|i| (lose >> i) & 1 == 1).take(m).collect();
        let units: Vec<UnitRead> = l.roles().enumerate().map(|(i, r)| {
            if lost.contains(&i) { UnitRead::Unavailable("lost".into()) } else { store.read(&l, r) }
        }).collect();
        match solve_row(&l, &units, k) {
            Ok(s) if parity_current => prop_assert_eq!(s.data.concat(), model, "a read rebuilt other bytes (lost {:?})", lost),
            // After an interrupted write (which failed, so either outcome is allowed), a unit
            // it changed that is lost can only come back as of the parity: old bytes, never
            // a mix of old parity and new data.
            Ok(s) => for (j, got) in s.data.iter().enumerate() {
                let (new, old) = (&model[j * unit..(j + 1) * unit], &at_parity[j * unit..(j + 1) * unit]);
                prop_assert!(got[..] == *new || got[..] == *old, "data unit {} rebuilt as neither old nor new bytes", j);
            },
            Err(e) => prop_assert!(!parity_current, "a current row refused a read that lost {:?}: {}", lost, e),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Issue 16: writes with servers down. Each write finds some units down (at most `m` with
    /// those already marked), skips them and marks them stale; reads that treat marked units as
    /// lost give the model's bytes; a resync that restores each marked unit from the rest
    /// (its bytes, and for data the version parity covers) leaves a row that survives the loss
    /// of any `m` units.
    #[test]
    fn degraded_writes_then_resync_keep_the_row_equal_to_the_model(
        l in shapes(), steps in prop::collection::vec((any::<u64>(), 1u64..3000, any::<u8>(), any::<u64>()), 1..10),
        lose in any::<u64>(),
    ) {
        let (k, m, unit) = (l.data() as usize, l.parity() as usize, l.unit() as usize);
        prop_assume!(m > 0);
        let row_bytes = k * unit;
        let mut model = vec![0u8; row_bytes];
        let mut store = Store { units: vec![None; l.width()] };
        let mut stale: Vec<bool> = vec![false; l.width()];
        let mut stripe: Option<u64> = None;
        let mut existing = false;
        let read_all = |store: &Store, lost: &dyn Fn(usize) -> bool| -> Vec<UnitRead> {
            l.roles().enumerate().map(|(i, r)| {
                if lost(i) { UnitRead::Unavailable("down or marked stale".into()) } else { store.read(&l, r) }
            }).collect()
        };
        for (at, len, byte, down) in steps {
            let lo = at % row_bytes as u64;
            let len = len.min(row_bytes as u64 - lo);
            let data = vec![byte; len as usize];
            let w = RowWrite { lo, data: &data };
            // This write's servers down: one unit, now and then, on top of the marked ones.
            let extra = (down % 3 == 0).then_some((down / 3) as usize % l.width());
            let lost = |i: usize| stale[i] || extra == Some(i);
            let lost_count = (0..l.width()).filter(|&i| lost(i)).count();
            let planned = plan_degraded(&l, &w, read_all(&store, &lost), stripe, existing, k, false);
            let p = match planned {
                Ok(p) => p,
                Err(e) => {
                    prop_assert!(lost_count > m, "a write with {} of {} units lost was refused: {}", lost_count, m, e);
                    continue;
                }
            };
            for u in p.data.iter().chain(&p.parity) {
                prop_assert!(!lost(stripe::role_index(&l, u.role)), "a lost unit was written");
                store.write(&l, u);
            }
            for r in &p.skipped {
                stale[stripe::role_index(&l, *r)] = true;
            }
            model[lo as usize..(lo + len) as usize].copy_from_slice(&data);
            existing = true;
            stripe = Some(p.version);
            let s = solve_row(&l, &read_all(&store, &|i| stale[i]), k).expect("a degraded row reads");
            prop_assert_eq!(s.data.concat(), model.clone(), "a read with marked units lost gave other bytes");
        }
        // Resync: every marked unit restored from the rest, as the resync of issue 16 does.
        let s = solve_row(&l, &read_all(&store, &|i| stale[i]), k).expect("the row reads");
        let parity = s.parity(&l);
        for (i, r) in l.roles().enumerate().filter(|(i, _)| stale[*i]) {
            let unit = if i < k {
                StoredUnit { bytes: s.data[i].clone(), version: s.versions[i], covers: Vec::new() }
            } else {
                parity[i - k].clone()
            };
            store.units[stripe::role_index(&l, r)] = Some(unit);
        }
        let lost: Vec<usize> = (0..l.width()).filter(|i| (lose >> i) & 1 == 1).take(m).collect();
        let back = solve_row(&l, &read_all(&store, &|i| lost.contains(&i)), k).expect("a resynced row survives m losses");
        prop_assert_eq!(back.data.concat(), model, "after resync, losing {:?} gave other bytes", lost);
    }
}

#[test]
fn a_write_hole_is_recomputed_not_updated() {
    let l = Layout::new(512, 2, 1, vec![1, 2, 3]).unwrap();
    let mut store = Store { units: vec![None; 3] };
    let first = plan(&l, &store, &RowWrite { lo: 0, data: &[7; 1024] }, None, false);
    assert!(first.recomputed, "a new row's parity is computed from its data");
    for u in first.data.iter().chain(&first.parity) {
        store.write(&l, u);
    }
    // The next write's data lands, its parity does not.
    let second = plan(&l, &store, &RowWrite { lo: 10, data: &[9; 5] }, Some(first.version), true);
    assert!(!second.recomputed, "a current row is updated from the change");
    for u in &second.data {
        store.write(&l, u);
    }
    // With the stripe version lost, the update path must refuse and the recompute must fix it.
    let read: Vec<UnitRead> =
        update_roles(&l, &RowWrite { lo: 600, data: &[1] }).into_iter().map(|r| store.read(&l, r)).collect();
    assert_eq!(plan_update(&l, &RowWrite { lo: 600, data: &[1] }, &read, None, true), None);
    // Even with the old stripe version, parity does not cover data unit 0's new version.
    let read0: Vec<UnitRead> =
        update_roles(&l, &RowWrite { lo: 0, data: &[1] }).into_iter().map(|r| store.read(&l, r)).collect();
    assert_eq!(plan_update(&l, &RowWrite { lo: 0, data: &[1] }, &read0, Some(first.version), true), None);
    // A read that loses data unit 1 cannot use the stale parity.
    let units = vec![store.read(&l, Role::Data(0)), UnitRead::Unavailable("down".into()), store.read(&l, Role::P)];
    assert!(solve_row(&l, &units, 2).is_err(), "a stale parity rebuilt a unit");
}

#[test]
fn an_unreachable_parity_stops_a_recompute() {
    let l = Layout::new(512, 2, 1, vec![1, 2, 3]).unwrap();
    let all =
        vec![UnitRead::Missing("d0".into()), UnitRead::Missing("d1".into()), UnitRead::Unavailable("p down".into())];
    let err = plan_recompute(&l, &RowWrite { lo: 0, data: &[1] }, all, None, true, 2).unwrap_err();
    assert!(matches!(err, stripe::PlanError::Unreachable { role: Role::P, .. }), "{err}");
}

#[test]
fn a_write_does_not_rebuild_its_own_lost_unit_from_parity_an_interrupted_write_left_behind() {
    // Found by the fault campaign: data unit 0 written by a write whose parity never landed,
    // then unreadable; the next write touching it rebuilt it from the old parity (the lost
    // unit's version is unknown, so the parity looked consistent) and stored old bytes around
    // its own.
    let l = Layout::new(512, 2, 1, vec![1, 2, 3]).unwrap();
    let mut store = Store { units: vec![None; 3] };
    let first = plan(&l, &store, &RowWrite { lo: 0, data: &[7; 1024] }, None, false);
    for u in first.data.iter().chain(&first.parity) {
        store.write(&l, u);
    }
    let second = plan(&l, &store, &RowWrite { lo: 10, data: &[9; 5] }, Some(first.version), true);
    for u in &second.data {
        store.write(&l, u);
    }
    let w = RowWrite { lo: 100, data: &[3; 4] };
    let all = vec![UnitRead::Damaged("d0 bad".into()), store.read(&l, Role::Data(1)), store.read(&l, Role::P)];
    // The stripe version was lost with the interrupted write: parity is not known current.
    let err = plan_recompute(&l, &w, all.clone(), None, true, 2).unwrap_err();
    assert!(matches!(err, stripe::PlanError::Unreachable { role: Role::Data(0), .. }), "{err}");
    // With parity known current (its version is the stripe version), rebuilding is right.
    let mut current = Store { units: vec![None; 3] };
    let p = plan(&l, &current, &RowWrite { lo: 0, data: &[7; 1024] }, None, false);
    for u in p.data.iter().chain(&p.parity) {
        current.write(&l, u);
    }
    let all = vec![UnitRead::Damaged("d0 bad".into()), current.read(&l, Role::Data(1)), current.read(&l, Role::P)];
    let ok = plan_recompute(&l, &w, all, Some(p.version), true, 2).expect("parity is current");
    let d0 = ok.data.iter().find(|u| u.role == Role::Data(0)).expect("unit 0 written");
    assert_eq!(&d0.bytes[..100], &[7; 100][..], "the rest of unit 0 rebuilt from current parity");
    assert_eq!(&d0.bytes[100..104], &[3; 4][..]);
}
