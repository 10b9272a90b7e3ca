//! Per-kernel times and whole-chunk ms/step of the GPU training step on synthetic data.
//!
//! `cargo run --release --example gpu_step_speed [batches...]` (default: 64 256). Environment:
//! `CHUNK` steps per chunk (default 4), `CHUNKS` timed chunks (default 3, the median is printed),
//! `ITERS` launches per kernel timing (default 3), `LENET_ADAPTER` as for `lenet`.

use std::time::Instant;

use lenet::data::Dataset;
use lenet::gpu::trainer::STEP_DISPATCHES;
use lenet::gpu::GpuBackend;
use lenet::model::*;
use lenet::train::Backend;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// MNIST-shaped noise: a quarter of the pixels lit, labels cycling 0..9.
fn synthetic(n: usize) -> Dataset {
    let mut s = 0x9e37_79b9_u32;
    let images = (0..n * IMAGE_PIXELS)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            if s.is_multiple_of(4) {
                (s >> 8) as u8
            } else {
                0
            }
        })
        .collect();
    let labels = (0..n).map(|i| (i % CLASSES) as u8).collect();
    Dataset { images, labels, rows: IMAGE_SIDE, cols: IMAGE_SIDE }
}

fn main() -> anyhow::Result<()> {
    let batches: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let batches = if batches.is_empty() { vec![64, 256] } else { batches };
    let chunk = env_usize("CHUNK", 4);
    let chunks = env_usize("CHUNKS", 3);
    let iters = env_usize("ITERS", 3);
    let data = synthetic(1024);
    let mut g = GpuBackend::open(None, &data)?;
    println!("adapter: {}  dispatches/step: {}", g.adapter(), STEP_DISPATCHES.len());
    let state = TrainState::new(Params::init(1), 1, 64, false);
    let adam = AdamConfig::default();
    for &batch in &batches {
        let timings = g.time_kernels(batch, iters)?;
        let total: f64 = timings.iter().map(|t| t.seconds).sum();
        println!("batch {batch}: per-kernel (ms, {iters} launches each)");
        for t in &timings {
            println!("  {:<28} {:9.3}", t.name, t.seconds * 1e3);
        }
        println!("  {:<28} {:9.3}", "sum", total * 1e3);
        g.load_state(&state)?;
        let idx: Vec<u32> = (0..chunk * batch).map(|i| (i * 7 % data.len()) as u32).collect();
        g.train_steps(&idx, batch, 1, &adam)?; // builds the program, warms up
        let mut per_step = Vec::new();
        for c in 0..chunks {
            let t = Instant::now();
            let stats = g.train_steps(&idx, batch, 1 + ((c + 1) * chunk) as u64, &adam)?;
            per_step.push(t.elapsed().as_secs_f64() / stats.len() as f64);
        }
        per_step.sort_by(f64::total_cmp);
        println!(
            "batch {batch}: {:.3} ms/step (median of {chunks} chunks of {chunk} steps)",
            per_step[per_step.len() / 2] * 1e3
        );
    }
    Ok(())
}
