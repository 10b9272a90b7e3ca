//! `--shader-loop-bounds off`: the kernels compiled without naga's loop bounding compute the
//! same bits as the bounded build. Every loop of the kernels ends by its own bound, so the
//! counter naga adds never fires and taking it out changes no arithmetic.

mod common;

use lenet::backend::{Backend, Chunk};
use lenet::data::Dataset;
use lenet::gpu::shader::LoopBounds;
use lenet::gpu::{GpuBackend, GpuContext};
use lenet::model::{Params, TrainState};
use lenet::optim::Optimizer;

/// Three training steps of batch 13 from `init`'s parameters on `ctx`: the losses and the state
/// after them (parameters and Adam's moments), as bits.
fn three_steps(ctx: GpuContext, init: u64) -> (Vec<u32>, Vec<u32>) {
    let batch = 13;
    let mut r = common::rng(7);
    let data = Dataset {
        images: common::bytes(&mut r, 3 * batch * 784),
        labels: (0..3 * batch).map(|_| common::below(&mut r, 10) as u8).collect(),
        rows: 28,
        cols: 28,
    };
    let opt = Optimizer::default();
    let state = TrainState::new(Params::init(init), opt, 0, batch, false);
    let mut gpu = GpuBackend::new(ctx, &data).unwrap();
    gpu.load_state(&state).unwrap();
    let chunk = Chunk {
        batch,
        indices: (0..3 * batch as u32).rev().collect(),
        shifts: vec![0; 2 * 3 * batch],
        steps: (1..=3).map(|t| opt.step(t, opt.lr, None)).collect(),
    };
    let losses = gpu.train_steps(&chunk).unwrap().iter().map(|s| s.loss.to_bits()).collect();
    let mut after = state.clone();
    gpu.store_state(&mut after).unwrap();
    let bits = std::iter::once(&after.params)
        .chain(&after.moments)
        .flat_map(|p| p.tensors.iter().flatten())
        .map(|x| x.to_bits())
        .collect();
    (losses, bits)
}

#[test]
fn unbounded_loops_give_the_bounded_builds_bits() {
    let Some(bounded) = common::gpu() else { return };
    assert_eq!(bounded.loop_bounds, LoopBounds::Bounded);
    let unbounded = GpuContext::open(Some(&bounded.adapter_info.name), LoopBounds::Unbounded).unwrap();
    assert_eq!(unbounded.loop_bounds, LoopBounds::Unbounded);
    let want = three_steps(bounded.clone(), 5);
    let got = three_steps(unbounded, 5);
    assert_eq!(got.0, want.0, "the losses differ");
    let differ = got.1.iter().zip(&want.1).filter(|(a, b)| a != b).count();
    assert_eq!(differ, 0, "{differ} of {} state values differ", want.1.len());
    // The comparison can fail: another initialisation changes the bits.
    let other = three_steps(bounded, 6);
    assert_ne!(other.1, want.1);
}

#[test]
fn the_bench_says_when_the_loops_are_not_bounded() {
    let Some(bounded) = common::gpu() else { return };
    let unbounded = GpuContext::open(Some(&bounded.adapter_info.name), LoopBounds::Unbounded).unwrap();
    let mut cfg = lenet::bench::BenchConfig::new(2, 1);
    cfg.cpu = false;
    cfg.budget_s = 0.01;
    cfg.warmup_s = 0.01;
    let r = lenet::bench::run(&cfg, Some(&unbounded)).unwrap();
    assert_eq!(r.shader_loop_bounds, Some(LoopBounds::Unbounded));
    assert!(r.header().contains("shader loops not bounded by naga"), "{}", r.header());
    assert!(!r.any_failed(), "{}", r.table());
}
