//! Whole training steps on the GPU backend (the recorded program, replayed per step) against
//! the CPU backend, on a synthetic MNIST-shaped data set: losses, gradients, parameters,
//! evaluation logits, determinism, both optimizers, pipelined chunks, and the
//! one-submit-one-wait-per-chunk contract. And the network run through the GPU's ops one call
//! at a time (`OpsBackend<GpuOps>`) gives the same bits as the replayed program.

mod common;

use common::*;
use lenet::backend::{Backend, Chunk, OpsBackend, StepStats};
use lenet::cpu::CpuBackend;
use lenet::data::Dataset;
use lenet::gpu::{GpuBackend, GpuOps, Variant};
use lenet::model::*;
use lenet::optim::{Optimizer, OptimizerKind, Sgd};

const SEED: u64 = 5;
const BATCH: usize = 8;

/// MNIST-like images: mostly zero background, bright strokes, random labels.
fn dataset(n: usize, seed: u64) -> Dataset {
    use rand_core::Rng;
    let mut r = rng(seed);
    let images = (0..n * IMAGE_PIXELS)
        .map(|_| {
            let x = r.next_u32();
            if x.is_multiple_of(4) {
                (x >> 8) as u8
            } else {
                0
            }
        })
        .collect();
    let labels = (0..n).map(|_| below(&mut r, 10) as u8).collect();
    Dataset { images, labels, rows: IMAGE_SIDE, cols: IMAGE_SIDE }
}

/// `steps` steps of random samples with random shifts of up to 2 pixels, from step `first`.
fn chunk(opt: &Optimizer, n_data: usize, batch: usize, steps: usize, first: u64, seed: u64) -> Chunk {
    let mut r = rng(seed);
    Chunk {
        batch,
        indices: (0..steps * batch).map(|_| below(&mut r, n_data as u32)).collect(),
        shifts: (0..2 * steps * batch).map(|_| below(&mut r, 5) as i32 - 2).collect(),
        steps: (0..steps as u64).map(|s| opt.step(first + s, opt.lr, None)).collect(),
    }
}

/// With the adapter's default kernels.
fn gpu_backend(data: &Dataset, state: &TrainState) -> Option<GpuBackend> {
    let ctx = gpu()?;
    let mut g = GpuBackend::new(ctx, data).unwrap();
    g.load_state(state).unwrap();
    Some(g)
}

fn gpu_backend_with(data: &Dataset, state: &TrainState, variant: Variant) -> Option<GpuBackend> {
    let ctx = gpu()?;
    let mut g = GpuBackend::with_variant(ctx, data, variant).unwrap();
    g.load_state(state).unwrap();
    Some(g)
}

fn cpu_backend(data: &Dataset, state: &TrainState) -> CpuBackend {
    let mut c = CpuBackend::new(data).unwrap();
    c.load_state(state).unwrap();
    c
}

fn max_abs(x: &[f32]) -> f32 {
    x.iter().fold(0.0, |m, v| m.max(v.abs()))
}

/// Gradients agree to within 1e-4 of each tensor's largest gradient: the backward pass sums
/// thousands of products in another order (and the GPU may fuse multiply-adds), so an element
/// near zero is only as exact as the scale of the sums that produced it.
fn assert_grads_close(gpu: &Params, cpu: &Params) {
    for (i, spec) in param_specs().iter().enumerate() {
        let scale = max_abs(&cpu.tensors[i]);
        assert!(scale > 0.0, "{}: all-zero gradient", spec.name);
        assert_close_with(&format!("grad {}", spec.name), &gpu.tensors[i], &cpu.tensors[i], |_| {
            1e-7 + 1e-4 * scale
        });
    }
}

fn assert_stats_close(gpu: &[StepStats], cpu: &[StepStats], loss_tol: impl Fn(f32) -> f32) {
    assert_eq!(gpu.len(), cpu.len());
    for (s, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        assert!((g.loss - c.loss).abs() <= loss_tol(c.loss), "step {s}: gpu {g:?} cpu {c:?}");
        assert_eq!(g.correct, c.correct, "step {s}: gpu {g:?} cpu {c:?}");
    }
}

/// Adam's defaults and the state they start from at SEED.
fn adam_start() -> (Optimizer, TrainState) {
    let opt = Optimizer::default();
    (opt, TrainState::new(Params::init(SEED), opt, SEED, BATCH, false))
}

#[test]
fn one_training_step_matches_cpu_at_several_batch_sizes() {
    let data = dataset(80, 1);
    let opt = Optimizer::default();
    // Batch sizes no workgroup size divides, a single image, and more than one split; every
    // choice of kernels.
    for (batch, variant) in [1usize, 13, 67].into_iter().flat_map(|b| Variant::ALL.map(|v| (b, v))) {
        let start = TrainState::new(Params::init(SEED), opt, SEED, batch, false);
        let Some(mut g) = gpu_backend_with(&data, &start, variant) else { return };
        let mut c = cpu_backend(&data, &start);
        let ch = chunk(&opt, data.len(), batch, 1, 1, batch as u64);
        let gs = g.train_steps(&ch).unwrap();
        let cs = c.train_steps(&ch).unwrap();
        assert_stats_close(&gs, &cs, tol);
        assert_grads_close(&g.gradients().unwrap(), &c.gradients().unwrap());
        let (mut gpu_state, mut cpu_state) = (start.clone(), start.clone());
        g.store_state(&mut gpu_state).unwrap();
        c.store_state(&mut cpu_state).unwrap();
        let cpu_grads = c.gradients().unwrap();
        // Adam's first step is p -= lr * g / (|g| + eps): insensitive to the gradient's rounding
        // unless the gradient is itself within its tolerance of zero, where the step may
        // legitimately land anywhere in [-lr, lr].
        for (i, spec) in param_specs().iter().enumerate() {
            let gscale = max_abs(&cpu_grads.tensors[i]);
            let (gp, cp) = (&gpu_state.params.tensors[i], &cpu_state.params.tensors[i]);
            assert_close_with(&format!("batch {batch} {variant}: param {}", spec.name), gp, cp, |k| {
                let uncertain = cpu_grads.tensors[i][k].abs() <= 10.0 * (1e-7 + 1e-4 * gscale);
                tol(cp[k]) + if uncertain { 2.0 * opt.lr as f32 } else { 0.0 }
            });
        }
    }
}

/// 20 steps in two pipelined chunks against the CPU, for Adam and for SGD with Nesterov
/// momentum and weight decay; then evaluation of the CPU's parameters on the GPU.
#[test]
fn twenty_steps_match_cpu_for_both_optimizers_and_evaluation_agrees() {
    let data = dataset(96, 3);
    let test = dataset(50, 4);
    let sgd = Optimizer {
        kind: OptimizerKind::Sgd(Sgd { momentum: 0.9, nesterov: true, weight_decay: 5e-4 }),
        lr: 0.05,
    };
    for opt in [Optimizer::default(), sgd] {
        let start = TrainState::new(Params::init(SEED), opt, SEED, BATCH, false);
        let Some(mut g) = gpu_backend(&data, &start) else { return };
        let mut c = cpu_backend(&data, &start);
        let (a, b) = (chunk(&opt, data.len(), BATCH, 12, 1, 6), chunk(&opt, data.len(), BATCH, 8, 13, 7));
        // Both chunks submitted before either is waited for, as the training loop does.
        g.submit(&a).unwrap();
        g.submit(&b).unwrap();
        let mut gs = g.finish().unwrap().unwrap();
        gs.extend(g.finish().unwrap().unwrap());
        assert!(g.finish().unwrap().is_none());
        let mut cs = c.train_steps(&a).unwrap();
        cs.extend(c.train_steps(&b).unwrap());
        // Differences of ~1e-6 in the parameters grow a little over the steps.
        assert_stats_close(&gs, &cs, |l| 1e-4 + 1e-3 * l.abs());
        let (mut gpu_state, mut cpu_state) = (start.clone(), start.clone());
        g.store_state(&mut gpu_state).unwrap();
        c.store_state(&mut cpu_state).unwrap();
        // After 20 steps each parameter has moved by up to ~20 * lr; the GPU and CPU paths
        // agree to a small fraction of one step.
        for (i, spec) in param_specs().iter().enumerate() {
            let (gp, cp) = (&gpu_state.params.tensors[i], &cpu_state.params.tensors[i]);
            assert_close_with(&format!("{opt}: param {} after 20 steps", spec.name), gp, cp, |k| {
                1e-5 + 1e-4 * cp[k].abs() + 0.05 * opt.lr as f32
            });
        }
        // Evaluation: the GPU's logits for the CPU-trained parameters equal the CPU's.
        g.load_state(&cpu_state).unwrap();
        let gpu_logits = g.logits(&test).unwrap();
        let cpu_logits = c.logits(&test).unwrap();
        assert_close("eval logits", &gpu_logits, &cpu_logits);
        // Cached: a second evaluation of the same set gives the same bits.
        assert_eq!(g.logits(&test).unwrap(), gpu_logits);
    }
}

#[test]
fn evaluation_in_several_batches_costs_one_submit_and_one_wait() {
    // More images than one evaluation batch (2048), with a partial last batch.
    let data = dataset(16, 7);
    let test = dataset(2048 + 37, 8);
    let start = TrainState::new(Params::init(SEED + 1), Optimizer::default(), SEED, BATCH, false);
    let Some(mut g) = gpu_backend(&data, &start) else { return };
    let logits = g.logits(&test).unwrap();
    let before = g.sync_counts();
    assert_eq!(g.logits(&test).unwrap(), logits);
    let after = g.sync_counts();
    assert_eq!((after.submits - before.submits, after.host_waits - before.host_waits), (1, 1));
    let mut c = cpu_backend(&data, &start);
    assert_close("eval logits", &logits, &c.logits(&test).unwrap());
}

#[test]
fn identical_runs_give_identical_bits() {
    let data = dataset(64, 9);
    let opt = Optimizer::default();
    let start = TrainState::new(Params::init(SEED + 2), opt, SEED, BATCH, false);
    let ch = chunk(&opt, data.len(), BATCH, 20, 1, 10);
    let mut results = Vec::new();
    for _ in 0..2 {
        let Some(mut g) = gpu_backend(&data, &start) else { return };
        let stats = g.train_steps(&ch).unwrap();
        let mut s = start.clone();
        g.store_state(&mut s).unwrap();
        let bits: Vec<u32> = std::iter::once(&s.params)
            .chain(&s.moments)
            .flat_map(|p| p.flatten())
            .map(f32::to_bits)
            .collect();
        let stat_bits: Vec<(u32, u32)> = stats.iter().map(|s| (s.loss.to_bits(), s.correct)).collect();
        results.push((bits, stat_bits));
    }
    assert!(results[0] == results[1], "two identical GPU runs differ");
}

/// The network run through the GPU's ops one call at a time (each op's dispatches run as it is
/// called) and the GPU backend's recorded program replayed give the same bits: the replay
/// (step uniforms at dynamic offsets, chunked indices) changes nothing but the scheduling.
#[test]
fn the_replayed_program_equals_the_ops_called_one_at_a_time() {
    let data = dataset(40, 14);
    let opt = Optimizer::default();
    let start = TrainState::new(Params::init(SEED), opt, SEED, 5, false);
    let Some(mut g) = gpu_backend(&data, &start) else { return };
    let ctx = g.context().clone();
    let mut one_at_a_time =
        OpsBackend::with_ops(GpuOps::new(ctx).unwrap(), "gpu", "ops".into(), &data).unwrap();
    one_at_a_time.load_state(&start).unwrap();
    let ch = chunk(&opt, data.len(), 5, 3, 1, 15);
    let a = g.train_steps(&ch).unwrap();
    let b = one_at_a_time.train_steps(&ch).unwrap();
    assert_eq!(a, b);
    let (mut sa, mut sb) = (start.clone(), start.clone());
    g.store_state(&mut sa).unwrap();
    one_at_a_time.store_state(&mut sb).unwrap();
    assert!(sa == sb, "the program and the ops disagree");
}

#[test]
fn a_chunk_costs_one_submit_and_one_host_wait() {
    let data = dataset(32, 11);
    let (opt, start) = adam_start();
    let Some(mut g) = gpu_backend(&data, &start) else { return };
    // The first chunk records the program; then each chunk is one submit and one wait.
    g.train_steps(&chunk(&opt, data.len(), BATCH, 2, 1, 1)).unwrap();
    let mut first = 3;
    for steps in [5usize, 7, 3] {
        let before = g.sync_counts();
        let stats = g.train_steps(&chunk(&opt, data.len(), BATCH, steps, first, steps as u64)).unwrap();
        first += steps as u64;
        assert_eq!(stats.len(), steps);
        assert!(stats.iter().all(|s| s.loss.is_finite() && s.correct as usize <= BATCH));
        let after = g.sync_counts();
        assert_eq!(
            (after.submits - before.submits, after.host_waits - before.host_waits),
            (1, 1),
            "chunk of {steps} steps"
        );
    }
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let data = dataset(16, 12);
    let (opt, start) = adam_start();
    let Some(mut g) = gpu_backend(&data, &start) else { return };
    let mut past = chunk(&opt, data.len(), BATCH, 1, 1, 1);
    past.indices[3] = 16;
    assert!(g.train_steps(&past).is_err(), "index past the data set");
    let mut zero = chunk(&opt, data.len(), BATCH, 1, 1, 1);
    zero.batch = 0;
    assert!(g.train_steps(&zero).is_err(), "batch 0");
    let mut bad = data.clone();
    bad.labels[0] = 10;
    assert!(GpuBackend::new(g.context().clone(), &bad).is_err(), "label 10");
    // A batch whose activations exceed the largest storage binding.
    let huge = (g.context().max_binding() / (6 * 28 * 28 * 4)) as usize + 1;
    let big = Chunk {
        batch: huge,
        indices: vec![0; huge],
        shifts: vec![0; 2 * huge],
        steps: vec![opt.step(1, opt.lr, None)],
    };
    let err = g.train_steps(&big).unwrap_err();
    assert!(format!("{err:#}").contains("batch"), "{err:#}");
}

/// On a device created with exactly WebGPU's default limits (16 KiB of workgroup memory, 8
/// storage buffers per stage, 256 invocations), the fused family runs whole (no kernel falls
/// back) and a step matches the CPU; conv_v2.wgsl's kernels (which need 32 KiB) are not built,
/// so `mixed` runs the naive ones and says why.
#[test]
fn with_webgpu_default_limits_the_family_runs_whole() {
    if gpu().is_none() {
        return;
    }
    let adapter = lenet::gpu::context::find_adapter(None).unwrap();
    let limits = wgpu::Limits::default();
    assert_eq!(limits.max_compute_workgroup_storage_size, 16384);
    assert_eq!(limits.max_storage_buffers_per_shader_stage, 8);
    let ctx = lenet::gpu::GpuContext::with_limits(&adapter, limits).unwrap();
    assert!(!ctx.kernels.has("conv_pool_backward") && ctx.kernels.has("conv_backward_weight_naive"));
    let ops = GpuOps::with_variant(ctx.clone(), Variant::Mixed).unwrap();
    assert_eq!(ops.variant, Variant::V1);
    // Never silent: which kernel could not run, and why.
    let why = ops.fallback.as_deref().unwrap_or_default();
    assert!(why.contains("conv_pool_backward") && why.contains("workgroup memory"), "{why}");

    assert_eq!(ctx.variant(), Variant::Fused);
    assert_eq!(ctx.kernel_fallback(), None);
    for k in ["trunk_forward", "head_step", "trunk_backward"] {
        assert!(ctx.kernels.has(k), "{k} was left out under the default limits");
    }
    let data = dataset(40, 16);
    let (opt, start) = adam_start();
    let mut g = GpuBackend::new(ctx, &data).unwrap();
    assert_eq!(g.variant(), Variant::Fused);
    g.load_state(&start).unwrap();
    let mut c = cpu_backend(&data, &start);
    let ch = chunk(&opt, data.len(), BATCH, 1, 1, 17);
    assert_stats_close(&g.train_steps(&ch).unwrap(), &c.train_steps(&ch).unwrap(), tol);
    assert_grads_close(&g.gradients().unwrap(), &c.gradients().unwrap());
    let kernels: Vec<&str> = g.step_program().unwrap().0.iter().map(|d| d.kernel.as_str()).collect();
    assert_eq!(kernels, ["trunk_forward", "head_step", "trunk_backward", "update_adam"]);
}

/// `--kernels` picks the kernels by name (hidden from the help); an unknown name is one `error:`
/// line naming the choices, before any data is read.
#[test]
fn kernels_by_name_are_a_hidden_option_and_an_unknown_name_is_one_error_line() {
    for cmd in ["train", "bench"] {
        let out = common::lenet(&[cmd, "--kernels", "v2", "--backend", "cpu"]);
        let err = common::stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {err}");
        assert!(err.starts_with("error:") && err.contains("v1, mixed, v3"), "{cmd}: {err}");
        assert_eq!(err.lines().count(), 1, "{cmd}: {err}");
        let help = common::stdout(common::succeeded(&common::lenet(&[cmd, "--help"])));
        assert!(!help.contains("--kernels"), "{cmd} --help shows --kernels");
    }
}

/// The kernels travel with each context (`GpuOptions`, what `--kernels` fills in), not in a
/// process-wide setting: two contexts of one process run the kernels each was opened with, and
/// a context opened without a choice runs its adapter's default.
#[test]
fn each_context_runs_the_kernels_its_options_name() {
    let Some(shared) = gpu() else { return };
    let name = shared.adapter_info.name.clone();
    let data = dataset(8, 1);
    for v in [Variant::V3, Variant::V1] {
        let options = lenet::gpu::GpuOptions { kernels: Some(v), ..Default::default() };
        let ctx = lenet::gpu::GpuContext::open(Some(&name), options).unwrap();
        assert_eq!(ctx.variant(), v);
        assert_eq!(GpuBackend::new(ctx, &data).unwrap().variant(), v);
    }
    let default = Variant::default_for(shared.adapter_info.device_type);
    assert_eq!(shared.variant(), default);
    assert_eq!(GpuBackend::new(shared, &data).unwrap().variant(), default);
}

/// The recorded step of each choice of kernels: how many dispatches, and that the fused head is
/// one of the fused family's (and of no other's): the family's step is its trunk forward, its
/// head, its trunk backward and the update.
#[test]
fn each_choice_of_kernels_records_its_dispatches() {
    let data = dataset(16, 2);
    let (opt, start) = adam_start();
    for (variant, dispatches) in
        [(Variant::V1, 21), (Variant::Mixed, 15), (Variant::V3, 10), (Variant::Fused, 4)]
    {
        let Some(mut g) = gpu_backend_with(&data, &start, variant) else { return };
        g.train_steps(&chunk(&opt, data.len(), BATCH, 1, 1, 3)).unwrap();
        let (ds, _) = g.step_program().expect("a recorded step");
        let kernels: Vec<&str> = ds.iter().map(|d| d.kernel.as_str()).collect();
        assert_eq!(kernels.len(), dispatches, "{variant}: {kernels:?}");
        assert_eq!(kernels.contains(&"head_step"), variant == Variant::Fused, "{variant}: {kernels:?}");
    }
}
