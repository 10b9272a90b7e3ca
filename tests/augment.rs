//! The shift draw of src/augment.rs against its Python twin in scripts/torch_reference.py: the
//! PyTorch side of a parity run shifts its batches by what tests/fixtures/augment_shifts.json
//! records (`torch_reference.py fixtures tests/fixtures`), so the two must agree exactly, integer
//! for integer. The fixture covers seeds and epochs above 2^32 (both halves enter the key), P from
//! 1 to 27, and positions built so that dx's or dy's first word falls in the rejected tail. It
//! also holds one image shifted by the script at a few offsets, for the sign convention.

use lenet::augment::{epoch_key, shift_for, shift_image};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixtures {
    source: Vec<u8>,
    shifted: Vec<Shifted>,
    draws: Vec<Draw>,
}

#[derive(Deserialize)]
struct Shifted {
    dx: i32,
    dy: i32,
    pixels: Vec<u8>,
}

#[derive(Deserialize)]
struct Draw {
    seed: String,
    epoch: String,
    position: u32,
    max_shift: u32,
    epoch_key: u32,
    dx: i32,
    dy: i32,
}

fn fixtures() -> Fixtures {
    serde_json::from_str::<Fixtures>(include_str!("fixtures/augment_shifts.json"))
        .expect("augment_shifts.json parses")
}

fn draws() -> Vec<Draw> {
    fixtures().draws
}

#[test]
fn the_rust_shift_is_the_python_shift() {
    let fixtures = fixtures();
    assert!(fixtures.shifted.len() >= 5);
    for shifted in &fixtures.shifted {
        let mut ours = vec![0xAA; 28 * 28];
        shift_image(&mut ours, &fixtures.source, 28, shifted.dx, shifted.dy);
        assert_eq!(ours, shifted.pixels, "shift ({}, {})", shifted.dx, shifted.dy);
    }
}

#[test]
fn the_rust_draw_is_the_python_draw() {
    let draws = draws();
    assert!(draws.len() >= 400);
    let mut failures = Vec::new();
    for d in &draws {
        let (seed, epoch): (u64, u64) = (d.seed.parse().unwrap(), d.epoch.parse().unwrap());
        let ours = (epoch_key(seed, epoch), shift_for(seed, epoch, d.position, d.max_shift));
        if ours != (d.epoch_key, (d.dx, d.dy)) {
            failures.push(format!(
                "seed {seed} epoch {epoch} position {} P {}: key {} shift {:?}, Python key {} shift {:?}",
                d.position,
                d.max_shift,
                ours.0,
                ours.1,
                d.epoch_key,
                (d.dx, d.dy)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} draws differ:\n{}",
        failures.len(),
        draws.len(),
        failures.join("\n")
    );
}

#[test]
fn the_fixture_reaches_the_edges() {
    let draws = draws();
    assert!(draws.iter().any(|d| d.seed.parse::<u64>().unwrap() > u32::MAX as u64));
    assert!(draws.iter().any(|d| d.epoch.parse::<u64>().unwrap() > u32::MAX as u64));
    for p in [1, 2, 27] {
        assert!(draws.iter().any(|d| d.max_shift == p && d.dx.abs() == p as i32), "no dx = +-{p}");
        assert!(draws.iter().any(|d| d.max_shift == p && d.dy.abs() == p as i32), "no dy = +-{p}");
    }
    assert!(draws.iter().all(|d| d.dx.unsigned_abs() <= d.max_shift && d.dy.unsigned_abs() <= d.max_shift));
}
