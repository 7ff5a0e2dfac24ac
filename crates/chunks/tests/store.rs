//! The chunk store: fencing (a stale, forged, read-mode or misdirected token changes nothing, and
//! with fencing switched off the stale write lands: the negative control), checksums on every
//! read (a flipped byte anywhere in a record is found, never returned), versions, failed writes,
//! and the same behaviour on a directory of files as in memory.

use chunks::{Authority, ChunkError, ChunkStore, Device, DirDevice, FaultyDevice, MemDevice, Unit, UnitId};
use layout::Role;
use lockengine::{ByteRange, Mode, SessionId};
use token::{Claims, ClusterKey, SignedToken};

const FILE: &str = "/data/f";

fn key() -> ClusterKey {
    ClusterKey::from_bytes([7; 32])
}

fn token(number: u64, mode: Mode, range: ByteRange) -> SignedToken {
    key().sign(Claims { token: number, session: SessionId(3), mode, range, resource: FILE.into() }).unwrap()
}

fn unit(row: u64) -> UnitId {
    UnitId { file: 42, row, role: Role::Data(1) }
}

fn whole() -> Authority<'static> {
    Authority { resource: FILE, range: ByteRange::new(0, 4096).unwrap() }
}

#[test]
fn a_stale_token_is_refused_and_changes_nothing() {
    let store = ChunkStore::new(MemDevice::default(), key());
    let old = token(10, Mode::EX, ByteRange::ALL);
    let new = token(11, Mode::EX, ByteRange::ALL);
    assert_eq!(store.write(&unit(0), whole(), &old, b"first", &[], None), Ok(1));
    assert_eq!(store.write(&unit(0), whole(), &new, b"second", &[], None), Ok(2));
    let refused = store.write(&unit(0), whole(), &old, b"late write", &[], None).unwrap_err();
    assert_eq!(refused, ChunkError::Stale { unit: unit(0).name(), given: 10, highest: 11 });
    assert!(refused.to_string().contains("changed nothing"), "{refused}");
    let u = store.read(&unit(0)).unwrap().unwrap();
    assert_eq!((u.bytes.as_slice(), u.version, u.highest_token), (&b"second"[..], 2, 11));
}

#[test]
fn negative_control_without_fencing_the_stale_write_lands() {
    let mut store = ChunkStore::new(MemDevice::default(), key());
    store.disable_fencing_for_negative_control();
    store.write(&unit(0), whole(), &token(11, Mode::EX, ByteRange::ALL), b"second", &[], None).unwrap();
    store.write(&unit(0), whole(), &token(10, Mode::EX, ByteRange::ALL), b"late write", &[], None).unwrap();
    assert_eq!(store.read(&unit(0)).unwrap().unwrap().bytes, b"late write");
}

#[test]
fn a_fence_refuses_older_tokens_before_any_new_write() {
    let store = ChunkStore::new(MemDevice::default(), key());
    store.write(&unit(0), whole(), &token(5, Mode::PW, ByteRange::ALL), b"a", &[], None).unwrap();
    store.fence(&unit(0), 9).unwrap();
    assert!(matches!(
        store.write(&unit(0), whole(), &token(8, Mode::PW, ByteRange::ALL), b"b", &[], None),
        Err(ChunkError::Stale { given: 8, highest: 9, .. })
    ));
    assert_eq!(store.read(&unit(0)).unwrap().unwrap().bytes, b"a");
    // A fence of a unit never written leaves an empty unit at version 0 with the floor.
    store.fence(&unit(1), 9).unwrap();
    assert_eq!(
        store.read(&unit(1)).unwrap().unwrap(),
        Unit { bytes: vec![], version: 0, highest_token: 9, covers: vec![] }
    );
}

#[test]
fn forged_read_mode_and_misdirected_tokens_are_refused() {
    let store = ChunkStore::new(MemDevice::default(), key());
    let other = ClusterKey::from_bytes([8; 32]);
    let forged = other.sign(Claims {
        token: 99,
        session: SessionId(3),
        mode: Mode::EX,
        range: ByteRange::ALL,
        resource: FILE.into(),
    });
    assert!(matches!(store.write(&unit(0), whole(), &forged.unwrap(), b"x", &[], None), Err(ChunkError::BadToken(_))));
    assert_eq!(
        store.write(&unit(0), whole(), &token(5, Mode::PR, ByteRange::ALL), b"x", &[], None),
        Err(ChunkError::NotWriter(Mode::PR))
    );
    let narrow = token(5, Mode::PW, ByteRange::new(0, 100).unwrap());
    assert!(matches!(store.write(&unit(0), whole(), &narrow, b"x", &[], None), Err(ChunkError::NotCovered { .. })));
    let elsewhere = Authority { resource: "/data/g", range: ByteRange::new(0, 10).unwrap() };
    assert!(matches!(
        store.write(&unit(0), elsewhere, &token(5, Mode::EX, ByteRange::ALL), b"x", &[], None),
        Err(ChunkError::NotCovered { .. })
    ));
    assert_eq!(store.read(&unit(0)).unwrap(), None, "nothing was written");
}

#[test]
fn a_version_check_catches_a_write_that_came_first() {
    let store = ChunkStore::new(MemDevice::default(), key());
    let t = token(5, Mode::EX, ByteRange::ALL);
    assert_eq!(store.write(&unit(0), whole(), &t, b"a", &[], Some(0)), Ok(1));
    assert_eq!(
        store.write(&unit(0), whole(), &t, b"b", &[], Some(0)),
        Err(ChunkError::VersionMismatch { unit: unit(0).name(), expected: 0, found: 1 })
    );
    assert_eq!(store.write(&unit(0), whole(), &t, b"b", &[], Some(1)), Ok(2));
}

#[test]
fn every_flipped_byte_is_found_and_never_returned() {
    let store = ChunkStore::new(FaultyDevice::new(MemDevice::default()), key());
    let t = token(5, Mode::EX, ByteRange::ALL);
    let data: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
    store.write(&unit(0), whole(), &t, &data, &[], None).unwrap();
    let clean = store.device().get(&unit(0).name()).unwrap().unwrap();
    for at in 0..clean.len() {
        for mask in [0x01, 0x80, 0xff] {
            store.device().put(&unit(0).name(), &clean).unwrap();
            assert!(store.device().flip(&unit(0).name(), at, mask).unwrap());
            match store.read(&unit(0)) {
                Err(ChunkError::Corrupt { .. } | ChunkError::Format { .. }) => {}
                other => panic!("byte {at} flipped with {mask:#x} read back as {other:?}"),
            }
        }
    }
    // A parity record, with the data versions it covers in its header.
    let p = UnitId { file: 42, row: 0, role: Role::P };
    store.restore(&p, &Unit { bytes: data.clone(), version: 3, highest_token: 5, covers: vec![3, 1, 2, 3] }).unwrap();
    let parity = store.device().get(&p.name()).unwrap().unwrap();
    for at in 0..parity.len() {
        store.device().put(&p.name(), &parity).unwrap();
        store.device().flip(&p.name(), at, 0x04).unwrap();
        assert!(store.read(&p).is_err(), "byte {at} of a parity record flipped and read back");
    }
    store.device().delete(&p.name()).unwrap();
    store.device().put(&unit(0).name(), &clean).unwrap();
    store.device().flip(&unit(0).name(), 100, 0x10).unwrap();
    let bad = store.scrub().unwrap();
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0].0, unit(0));
}

#[test]
fn a_failed_write_leaves_the_old_unit() {
    let store = ChunkStore::new(FaultyDevice::new(MemDevice::default()), key());
    let t = token(5, Mode::EX, ByteRange::ALL);
    store.write(&unit(0), whole(), &t, b"old", &[], None).unwrap();
    store.device().fail_next_puts(1);
    assert!(matches!(store.write(&unit(0), whole(), &t, b"new", &[], None), Err(ChunkError::Io(_))));
    assert_eq!(store.read(&unit(0)).unwrap().unwrap().bytes, b"old");
}

#[test]
fn a_directory_of_files_keeps_units_across_reopening() {
    let dir = std::env::temp_dir().join(format!("stripelock-chunks-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let t = token(5, Mode::EX, ByteRange::ALL);
    {
        let store = ChunkStore::new(DirDevice::open(&dir).unwrap(), key());
        for row in 0..3 {
            store.write(&unit(row), whole(), &t, format!("row {row}").as_bytes(), &[], None).unwrap();
        }
        let p = UnitId { file: 42, row: 0, role: Role::P };
        store
            .restore(&p, &Unit { bytes: b"parity".to_vec(), version: 1, highest_token: 5, covers: vec![1, 1] })
            .unwrap();
    }
    let store = ChunkStore::new(DirDevice::open(&dir).unwrap(), key());
    assert_eq!(store.units().unwrap().len(), 4);
    let p = UnitId { file: 42, row: 0, role: Role::P };
    assert_eq!(store.read(&p).unwrap().unwrap().covers, vec![1, 1]);
    assert_eq!(store.read(&unit(2)).unwrap().unwrap().bytes, b"row 2");
    assert!(matches!(
        store.write(&unit(2), whole(), &token(4, Mode::EX, ByteRange::ALL), b"late", &[], None),
        Err(ChunkError::Stale { .. })
    ));
    assert_eq!(store.delete_file(42).unwrap(), 4);
    assert!(store.units().unwrap().is_empty());
    assert!(DirDevice::open(&dir).unwrap().put("../escape", b"x").is_err(), "names stay under the root");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unit_names_round_trip() {
    for role in [Role::Data(0), Role::Data(31), Role::P, Role::Q] {
        let id = UnitId { file: u64::MAX, row: 7, role };
        assert_eq!(UnitId::parse(&id.name()), Some(id));
    }
    assert_eq!(UnitId::parse("junk"), None);
}
