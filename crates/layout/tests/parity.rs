//! Parity against its definition, over random rows: Q equals Σ g^j·D_j computed byte by byte,
//! any `parity` lost units come back exactly, an update equals a recomputation, and a row with
//! more lost units than parity says so instead of guessing.

use layout::parity::{ParityError, encode, reconstruct, update, verify};
use proptest::prelude::*;
use reed_solomon_erasure::galois_8 as gf;

/// A row: `data` units of `len` random bytes, with its P and Q.
fn row(data: usize, len: usize, seed: &[u8]) -> (Vec<Vec<u8>>, Vec<u8>, Vec<u8>) {
    let units: Vec<Vec<u8>> = (0..data)
        .map(|j| (0..len).map(|i| seed[(i * 7 + j * 13) % seed.len()].wrapping_mul(j as u8 + 3) ^ i as u8).collect())
        .collect();
    let refs: Vec<&[u8]> = units.iter().map(Vec::as_slice).collect();
    let (mut p, mut q) = (vec![0; len], vec![0; len]);
    encode(&refs, Some(&mut p), Some(&mut q));
    (units, p, q)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn q_is_the_raid6_syndrome(data in 1usize..10, len in 1usize..70, seed in proptest::collection::vec(any::<u8>(), 1..64)) {
        let (units, p, q) = row(data, len, &seed);
        for i in 0..len {
            let mut pp = 0u8;
            let mut qq = 0u8;
            for (j, u) in units.iter().enumerate() {
                pp ^= u[i];
                qq ^= gf::mul(gf::exp(2, j), u[i]);
            }
            prop_assert_eq!(p[i], pp);
            prop_assert_eq!(q[i], qq);
        }
    }

    #[test]
    fn lost_units_come_back(
        data in 1usize..10,
        parity in 0usize..3,
        len in 1usize..70,
        seed in proptest::collection::vec(any::<u8>(), 1..64),
        a in any::<usize>(),
        b in any::<usize>(),
        lose in 0usize..3,
    ) {
        let (units, p, q) = row(data, len, &seed);
        let mut whole: Vec<Vec<u8>> = units.clone();
        whole.extend([p, q].into_iter().take(parity));
        let width = data + parity;
        let mut back = whole.clone();
        let lose = lose.min(parity);
        let first = a % width;
        let second = (first + 1 + b % (width - 1).max(1)) % width;
        let lost: Vec<usize> = [first, second].into_iter().take(lose).collect();
        for i in &lost {
            back[*i].fill(0xa5);
        }
        let mut refs: Vec<&mut [u8]> = back.iter_mut().map(Vec::as_mut_slice).collect();
        reconstruct(&mut refs, &lost, data, parity).unwrap();
        prop_assert_eq!(&back, &whole);
        let refs: Vec<&[u8]> = back.iter().map(Vec::as_slice).collect();
        prop_assert!(verify(&refs, data, parity));
    }

    #[test]
    fn an_update_equals_a_recomputation(
        data in 1usize..10,
        len in 1usize..70,
        seed in proptest::collection::vec(any::<u8>(), 1..64),
        j in any::<usize>(),
        new in proptest::collection::vec(any::<u8>(), 70),
    ) {
        let (mut units, mut p, mut q) = row(data, len, &seed);
        let j = j % data;
        let new = &new[..len];
        update(j, &units[j], new, Some(&mut p), Some(&mut q));
        units[j] = new.to_vec();
        let refs: Vec<&[u8]> = units.iter().map(Vec::as_slice).collect();
        let (mut p2, mut q2) = (vec![0; len], vec![0; len]);
        encode(&refs, Some(&mut p2), Some(&mut q2));
        prop_assert_eq!(p, p2);
        prop_assert_eq!(q, q2);
    }
}

#[test]
fn more_losses_than_parity_is_an_error_not_a_guess() {
    let (units, p, _) = row(4, 32, &[1, 2, 3]);
    let mut all: Vec<Vec<u8>> = units.into_iter().chain([p]).collect();
    let before = all.clone();
    let mut refs: Vec<&mut [u8]> = all.iter_mut().map(Vec::as_mut_slice).collect();
    assert_eq!(reconstruct(&mut refs, &[0, 2], 4, 1), Err(ParityError::TooManyMissing { missing: 2, parity: 1 }));
    assert_eq!(all, before, "nothing was written");
}

#[test]
fn a_flipped_byte_fails_verification() {
    let (units, p, q) = row(4, 64, &[9, 8, 7]);
    let mut all: Vec<Vec<u8>> = units;
    all.push(p);
    all.push(q);
    all[2][10] ^= 0x40;
    let refs: Vec<&[u8]> = all.iter().map(Vec::as_slice).collect();
    assert!(!verify(&refs, 4, 2));
}
