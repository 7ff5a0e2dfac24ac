//! Parity of one stripe row: P is the XOR of the data units; Q is Σ g^j · D_j over GF(2^8) with
//! g = 2 and the polynomial 0x11d, as Linux md's raid6 computes it. Q is made by Horner's rule
//! (multiply by g, add the next unit), where multiplying by g is a shift and a conditional XOR
//! done eight bytes at a time; reconstruction and single-unit updates multiply by other
//! constants through `reed-solomon-erasure`'s GF(2^8) tables.
//!
//! Units of a row are given in role order: data 0..k, then P, then Q.

use reed_solomon_erasure::galois_8 as gf;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParityError {
    #[error("{missing} units of the row are missing and its parity can rebuild at most {parity}")]
    TooManyMissing { missing: usize, parity: usize },
    #[error("the row's units are not all {expected} bytes long")]
    Length { expected: usize },
    #[error("a row has {given} units, and this layout's rows have {expected}")]
    Width { given: usize, expected: usize },
}

const LANE: usize = 8;

/// `acc ^= src`.
pub fn xor_into(acc: &mut [u8], src: &[u8]) {
    assert_eq!(acc.len(), src.len(), "xor of unequal units");
    let mut a = acc.chunks_exact_mut(LANE);
    let mut s = src.chunks_exact(LANE);
    for (a, s) in (&mut a).zip(&mut s) {
        let x = u64::from_ne_bytes((&*a).try_into().expect("lane")) ^ u64::from_ne_bytes(s.try_into().expect("lane"));
        a.copy_from_slice(&x.to_ne_bytes());
    }
    for (a, s) in a.into_remainder().iter_mut().zip(s.remainder()) {
        *a ^= s;
    }
}

/// Multiplies eight field elements by g = 2 at once.
#[inline]
fn times_g(x: u64) -> u64 {
    let high = x & 0x8080_8080_8080_8080;
    ((x ^ high) << 1) ^ ((high >> 7) * 0x1d)
}

/// `q = q · g ^ d`, bytewise.
fn times_g_xor(q: &mut [u8], d: &[u8]) {
    let mut a = q.chunks_exact_mut(LANE);
    let mut s = d.chunks_exact(LANE);
    for (a, s) in (&mut a).zip(&mut s) {
        let x = times_g(u64::from_ne_bytes((&*a).try_into().expect("lane")))
            ^ u64::from_ne_bytes(s.try_into().expect("lane"));
        a.copy_from_slice(&x.to_ne_bytes());
    }
    for (a, s) in a.into_remainder().iter_mut().zip(s.remainder()) {
        *a = gf::mul(*a, 2) ^ s;
    }
}

/// Computes P (if `p` is given) and Q (if `q` is given) of `data`.
pub fn encode(data: &[&[u8]], p: Option<&mut [u8]>, q: Option<&mut [u8]>) {
    let Some((first, rest)) = data.split_first() else { return };
    if let Some(p) = p {
        p.copy_from_slice(first);
        for d in rest {
            xor_into(p, d);
        }
    }
    if let Some(q) = q {
        let (last, below) = data.split_last().expect("not empty");
        q.copy_from_slice(last);
        for d in below.iter().rev() {
            times_g_xor(q, d);
        }
    }
}

/// g^j.
fn g_pow(j: usize) -> u8 {
    gf::exp(2, j)
}

/// Brings P and Q up to date after data unit `j` changed from `old` to `new` (a partial-stripe
/// write's read-modify-write): `P ^= old ^ new`, `Q ^= g^j · (old ^ new)`.
pub fn update(j: usize, old: &[u8], new: &[u8], p: Option<&mut [u8]>, q: Option<&mut [u8]>) {
    let mut delta = old.to_vec();
    xor_into(&mut delta, new);
    if let Some(p) = p {
        xor_into(p, &delta);
    }
    if let Some(q) = q {
        gf::mul_slice_xor(g_pow(j), &delta, q);
    }
}

/// `buf = c · buf`, in place (the field's slice kernels want distinct input and output).
fn scale(c: u8, buf: &mut [u8]) {
    let mut tmp = [0u8; 4096];
    for chunk in buf.chunks_mut(tmp.len()) {
        let tmp = &mut tmp[..chunk.len()];
        gf::mul_slice(c, chunk, tmp);
        chunk.copy_from_slice(tmp);
    }
}

/// Rebuilds the units of a row listed in `lost` from the others, in place. `units` holds the
/// `data` data units, then P, then Q (as many as `parity`), all of one length; the lost ones'
/// contents are ignored and overwritten.
pub fn reconstruct(units: &mut [&mut [u8]], lost: &[usize], data: usize, parity: usize) -> Result<(), ParityError> {
    if units.len() != data + parity {
        return Err(ParityError::Width { given: units.len(), expected: data + parity });
    }
    let mut lost: Vec<usize> = lost.to_vec();
    lost.sort_unstable();
    lost.dedup();
    if lost.is_empty() {
        return Ok(());
    }
    if lost.len() > parity {
        return Err(ParityError::TooManyMissing { missing: lost.len(), parity });
    }
    let len = units[0].len();
    if units.iter().any(|u| u.len() != len) || lost.iter().any(|i| *i >= units.len()) {
        return Err(ParityError::Length { expected: len });
    }
    let lost_data: Vec<usize> = lost.iter().copied().filter(|i| *i < data).collect();
    let (p, q) = (data, data + 1);
    let p_lost = lost.contains(&p);
    match lost_data[..] {
        [] => {}
        [x] if !p_lost => {
            // D_x = P ^ the other data units.
            let dx = std::mem::take(&mut units[x]);
            dx.copy_from_slice(&*units[p]);
            for (i, u) in units[..data].iter().enumerate() {
                if i != x {
                    xor_into(dx, u);
                }
            }
            units[x] = dx;
        }
        [x] => {
            // P is gone too: D_x = g^-x · (Q ^ Σ_{i≠x} g^i · D_i).
            let dx = std::mem::take(&mut units[x]);
            dx.copy_from_slice(&*units[q]);
            for (i, u) in units[..data].iter().enumerate() {
                if i != x {
                    gf::mul_slice_xor(g_pow(i), u, dx);
                }
            }
            scale(gf::div(1, g_pow(x)), dx);
            units[x] = dx;
        }
        [x, y] => {
            // P' = D_x ^ D_y and Q' = g^x·D_x ^ g^y·D_y, so
            // D_x = (g^(y-x)·P' ^ g^-x·Q') / (g^(y-x) ^ 1) and D_y = P' ^ D_x.
            let dx = std::mem::take(&mut units[x]);
            let dy = std::mem::take(&mut units[y]);
            dy.copy_from_slice(&*units[p]);
            dx.copy_from_slice(&*units[q]);
            for (i, u) in units[..data].iter().enumerate() {
                if i != x && i != y {
                    xor_into(dy, u);
                    gf::mul_slice_xor(g_pow(i), u, dx);
                }
            }
            let gyx = g_pow(y - x);
            let denominator = gyx ^ 1;
            scale(gf::div(gf::div(1, g_pow(x)), denominator), dx);
            gf::mul_slice_xor(gf::div(gyx, denominator), dy, dx);
            xor_into(dy, dx);
            units[x] = dx;
            units[y] = dy;
        }
        _ => unreachable!("at most two units are lost"),
    }
    // The data is whole again: recompute whatever parity was lost.
    let need_q = parity == 2 && lost.contains(&q);
    if p_lost || need_q {
        let (d, rest) = units.split_at_mut(data);
        let d: Vec<&[u8]> = d.iter().map(|u| &**u).collect();
        let (pp, qq) = match rest {
            [pp, qq] => (pp, Some(qq)),
            [pp] => (pp, None),
            _ => unreachable!("parity is 1 or 2 when a parity unit is lost"),
        };
        encode(&d, p_lost.then_some(&mut **pp), if need_q { qq.map(|q| &mut **q) } else { None });
    }
    Ok(())
}

/// Whether a whole row's parity matches its data (scrub).
pub fn verify(units: &[&[u8]], data: usize, parity: usize) -> bool {
    if units.len() != data + parity || parity == 0 {
        return units.len() == data + parity;
    }
    let len = units[0].len();
    let mut p = vec![0; len];
    let mut q = vec![0; len];
    encode(&units[..data], Some(&mut p), (parity == 2).then_some(&mut q[..]));
    p == units[data] && (parity < 2 || q == units[data + 1])
}
