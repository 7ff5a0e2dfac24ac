//! `stripelock bench parity`: how fast one core computes and uses stripe parity, from memory,
//! beside a memory copy of the same bytes (the ceiling any pass over them has).

use std::hint::black_box;
use std::time::{Duration, Instant};

use layout::parity::{encode, reconstruct, update};

/// Bytes of data processed per second by `f`, run for `budget` (one call processes `bytes`).
fn rate(budget: Duration, bytes: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm the caches and the page tables
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget {
        f();
        n += 1;
    }
    (n as f64 * bytes as f64) / start.elapsed().as_secs_f64()
}

/// Deterministic filler, so a run does not depend on a random source.
fn units(count: usize, len: usize) -> Vec<Vec<u8>> {
    (0..count).map(|j| (0..len).map(|i| ((i * 31 + j * 17) ^ (i >> 7)) as u8).collect()).collect()
}

/// Each case's key, label and bytes per second.
pub type Figures = Vec<(&'static str, &'static str, f64)>;

/// Measures every case for `budget` each.
pub fn measure(budget: Duration, unit: usize) -> Figures {
    let data = units(4, unit);
    let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    let bytes = 4 * unit;
    let mut copy = vec![0u8; bytes];
    let flat: Vec<u8> = data.concat();
    let memcpy = rate(budget, bytes, || {
        copy.copy_from_slice(black_box(&flat));
        black_box(&copy);
    });
    let (mut p, mut q) = (vec![0u8; unit], vec![0u8; unit]);
    let xor = rate(budget, bytes, || {
        encode(black_box(&refs), Some(&mut p), None);
        black_box(&p);
    });
    let pq = rate(budget, bytes, || {
        encode(black_box(&refs), Some(&mut p), Some(&mut q));
        black_box((&p, &q));
    });
    encode(&refs, Some(&mut p), Some(&mut q));
    // A partial write of one unit: the parity update reads old data and writes new parity.
    let new = units(1, unit).pop().expect("one unit");
    let rmw = rate(budget, unit, || {
        update(2, black_box(&data[2]), black_box(&new), Some(&mut p), Some(&mut q));
        black_box((&p, &q));
    });
    // Degraded reads: one data unit lost (from P), then two (from P and Q), from the row's true
    // parity (the update case above applied its delta any number of times).
    encode(&refs, Some(&mut p), Some(&mut q));
    let mut row: Vec<Vec<u8>> = data.iter().cloned().chain([p.clone(), q.clone()]).collect();
    let one = rate(budget, bytes, || {
        let mut refs: Vec<&mut [u8]> = row.iter_mut().map(Vec::as_mut_slice).collect();
        reconstruct(&mut refs, &[1], 4, 2).expect("one lost");
        black_box(&refs);
    });
    let two = rate(budget, bytes, || {
        let mut refs: Vec<&mut [u8]> = row.iter_mut().map(Vec::as_mut_slice).collect();
        reconstruct(&mut refs, &[0, 3], 4, 2).expect("two lost");
        black_box(&refs);
    });
    assert_eq!(row[..4], data[..], "the rebuilt units are the originals");
    vec![
        ("memcpy_gbps", "memory copy of the row's data (baseline)", memcpy),
        ("xor_4_1_gbps", "XOR parity, 4+1, encode", xor),
        ("pq_4_2_gbps", "P+Q parity, 4+2, encode", pq),
        ("pq_update_gbps", "P+Q update after a one-unit write (per unit)", rmw),
        ("rebuild_1_of_4_2_gbps", "4+2 row with one data unit lost, rebuilt", one),
        ("rebuild_2_of_4_2_gbps", "4+2 row with two data units lost, rebuilt", two),
    ]
}

pub fn parity(budget: Duration, unit: usize, json: bool) {
    let figures = measure(budget, unit);
    let (memcpy, xor, pq) = (figures[0].2, figures[1].2, figures[2].2);
    if json {
        let mut map = serde_json::Map::new();
        for (key, _, value) in &figures {
            map.insert(key.to_string(), serde_json::json!((value / 1e9 * 100.0).round() / 100.0));
        }
        map.insert("unit_bytes".into(), serde_json::json!(unit));
        map.insert("xor_vs_memcpy".into(), serde_json::json!(((xor / memcpy) * 100.0).round() / 100.0));
        map.insert("pq_vs_memcpy".into(), serde_json::json!(((pq / memcpy) * 100.0).round() / 100.0));
        println!("{}", serde_json::Value::Object(map));
    } else {
        println!("{:<50} {:>10}  (one core, {} KiB units, from memory)", "case", "GB/s", unit / 1024);
        for (_, label, value) in &figures {
            println!("{label:<50} {:>10.2}", value / 1e9);
        }
        println!("{:<50} {:>10.2}", "XOR encode / memory copy", xor / memcpy);
        println!("{:<50} {:>10.2}", "P+Q encode / memory copy", pq / memcpy);
    }
}
