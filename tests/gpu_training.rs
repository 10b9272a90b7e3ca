//! Whole training steps on the GPU backend against the CPU network (`lenet::cpu::network`), on a
//! synthetic MNIST-shaped data set: gradients, parameters, losses, evaluation logits,
//! determinism, and the one-submit-one-wait-per-chunk contract.

mod common;

use common::*;
use lenet::cpu::network::{self, Activations, Gradients};
use lenet::data::Dataset;
use lenet::gpu::GpuBackend;
use lenet::model::*;
use lenet::train::{Backend, StepStats};

const SEED: u64 = 5;
const BATCH: usize = 8;

/// MNIST-like images: mostly zero background, bright strokes, random labels.
fn dataset(n: usize, seed: u64) -> Dataset {
    let mut r = rng(seed);
    let images = (0..n * IMAGE_PIXELS)
        .map(|_| {
            let x = r_u32(&mut r);
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

fn r_u32(r: &mut rand_chacha::ChaCha8Rng) -> u32 {
    use rand_core::Rng;
    r.next_u32()
}

fn indices(n_data: usize, steps: usize, seed: u64) -> Vec<u32> {
    let mut r = rng(seed);
    (0..steps * BATCH).map(|_| below(&mut r, n_data as u32)).collect()
}

/// The CPU reference: `steps` steps from `state`; returns each step's stats and the last step's
/// parameter gradients.
fn cpu_train(
    state: &mut TrainState,
    data: &Dataset,
    idx: &[u32],
    adam: &AdamConfig,
) -> (Vec<StepStats>, Params) {
    let mut acts = Activations::new(BATCH);
    let mut grads = Gradients::new(BATCH);
    let mut stats = Vec::new();
    for batch in idx.chunks(BATCH) {
        let pixels: Vec<u8> = batch.iter().flat_map(|&i| data.image(i as usize).to_vec()).collect();
        let labels: Vec<u32> = batch.iter().map(|&i| data.labels[i as usize] as u32).collect();
        acts.set_input(&pixels);
        network::forward(&state.params, &mut acts);
        let r = network::backward(&state.params, &acts, &labels, &mut grads);
        network::adam_step(state, &grads.params, adam);
        stats.push(StepStats { loss: r.loss, correct: r.correct });
    }
    (stats, grads.params.clone())
}

fn gpu_backend(data: &Dataset, state: &TrainState) -> Option<GpuBackend> {
    let ctx = gpu()?;
    let mut g = GpuBackend::new(ctx, data).unwrap();
    g.load_state(state).unwrap();
    Some(g)
}

fn max_abs(x: &[f32]) -> f32 {
    x.iter().fold(0.0, |m, v| m.max(v.abs()))
}

/// Gradients agree to within 1e-4 of each tensor's largest gradient: the backward pass sums
/// thousands of products in another order (and the GPU may fuse multiply-adds), so an element
/// near zero is only as exact as the scale of the sums that produced it.
fn assert_grads_close(gpu: &Params, cpu: &Params) {
    for (i, spec) in PARAM_SPECS.iter().enumerate() {
        let scale = max_abs(&cpu.tensors[i]);
        assert!(scale > 0.0, "{}: all-zero gradient", spec.name);
        assert_close_with(&format!("grad {}", spec.name), &gpu.tensors[i], &cpu.tensors[i], |_| {
            1e-7 + 1e-4 * scale
        });
    }
}

#[test]
fn one_training_step_matches_cpu() {
    let data = dataset(64, 1);
    let adam = AdamConfig::default();
    let start = TrainState::new(Params::init(SEED), SEED, BATCH, false);
    let Some(mut g) = gpu_backend(&data, &start) else { return };
    let idx = indices(data.len(), 1, 2);

    let mut cpu_state = start.clone();
    let (cpu_stats, cpu_grads) = cpu_train(&mut cpu_state, &data, &idx, &adam);
    let gpu_stats = g.train_steps(&idx, BATCH, 1, &adam).unwrap();
    assert_eq!(gpu_stats.len(), 1);
    assert_eq!(gpu_stats[0].correct, cpu_stats[0].correct);
    assert!(
        (gpu_stats[0].loss - cpu_stats[0].loss).abs() <= tol(cpu_stats[0].loss),
        "{gpu_stats:?} {cpu_stats:?}"
    );

    let gpu_grads = g.gradients().unwrap();
    assert_grads_close(&gpu_grads, &cpu_grads);

    let mut gpu_state = start.clone();
    g.store_state(&mut gpu_state).unwrap();
    // Adam's first step is p -= lr * g / (|g| + eps): insensitive to the gradient's rounding
    // unless the gradient is itself within its tolerance of zero, where the step may
    // legitimately land anywhere in [-lr, lr].
    for (i, spec) in PARAM_SPECS.iter().enumerate() {
        let gscale = max_abs(&cpu_grads.tensors[i]);
        let (gp, cp) = (&gpu_state.params.tensors[i], &cpu_state.params.tensors[i]);
        assert_close_with(&format!("param {}", spec.name), gp, cp, |k| {
            let uncertain = cpu_grads.tensors[i][k].abs() <= 10.0 * (1e-7 + 1e-4 * gscale);
            tol(cp[k]) + if uncertain { 2.0 * adam.lr } else { 0.0 }
        });
        let (gm, cm) = (&gpu_state.adam_m.tensors[i], &cpu_state.adam_m.tensors[i]);
        assert_close_with(&format!("adam_m {}", spec.name), gm, cm, |_| 1e-7 + 1e-4 * 0.1 * gscale);
    }
}

#[test]
fn twenty_steps_match_cpu_and_evaluation_agrees() {
    let data = dataset(96, 3);
    let test = dataset(50, 4);
    let adam = AdamConfig::default();
    let start = TrainState::new(Params::init(SEED), SEED, BATCH, false);
    let Some(mut g) = gpu_backend(&data, &start) else { return };
    let steps = 20;
    let idx = indices(data.len(), steps, 6);

    let mut cpu_state = start.clone();
    let (cpu_stats, _) = cpu_train(&mut cpu_state, &data, &idx, &adam);
    // Two chunks (12 + 8 steps), as the training loop would send them.
    let mut gpu_stats = g.train_steps(&idx[..12 * BATCH], BATCH, 1, &adam).unwrap();
    gpu_stats.extend(g.train_steps(&idx[12 * BATCH..], BATCH, 13, &adam).unwrap());
    assert_eq!(gpu_stats.len(), steps);
    for (s, (gs, cs)) in gpu_stats.iter().zip(&cpu_stats).enumerate() {
        // Differences of ~1e-6 in the parameters grow a little over the steps.
        assert!((gs.loss - cs.loss).abs() <= 1e-4 + 1e-3 * cs.loss.abs(), "step {s}: gpu {gs:?} cpu {cs:?}");
        assert_eq!(gs.correct, cs.correct, "step {s}: gpu {gs:?} cpu {cs:?}");
    }
    let mut gpu_state = start.clone();
    g.store_state(&mut gpu_state).unwrap();
    // After 20 Adam steps each parameter has moved by up to ~20 * lr; the GPU and CPU paths
    // agree to a small fraction of that.
    let mut worst = 0f32;
    for (i, spec) in PARAM_SPECS.iter().enumerate() {
        let (gp, cp) = (&gpu_state.params.tensors[i], &cpu_state.params.tensors[i]);
        assert_close_with(&format!("param {} after {steps} steps", spec.name), gp, cp, |k| {
            1e-5 + 1e-4 * cp[k].abs() + 0.05 * adam.lr
        });
        for (a, b) in gp.iter().zip(cp) {
            worst = worst.max((a - b).abs());
        }
    }
    eprintln!("largest parameter difference after {steps} steps: {worst:e}");

    // Evaluation: the GPU's logits for the CPU-trained parameters equal the CPU forward pass.
    g.load_state(&cpu_state).unwrap();
    let gpu_logits = g.logits(&test).unwrap();
    let mut acts = Activations::new(test.len());
    acts.set_input(&test.images);
    network::forward(&cpu_state.params, &mut acts);
    assert_close("eval logits", &gpu_logits, &acts.logits);
    let argmax = |l: &[f32]| -> Vec<usize> {
        l.chunks(CLASSES)
            .map(|r| r.iter().enumerate().fold(0, |best, (c, &v)| if v > r[best] { c } else { best }))
            .collect()
    };
    assert_eq!(argmax(&gpu_logits), argmax(&acts.logits), "predicted classes");
    // Cached: a second evaluation of the same set gives the same bits.
    assert_eq!(g.logits(&test).unwrap(), gpu_logits);
}

#[test]
fn evaluation_in_several_batches() {
    // More images than one evaluation batch (2048), with a partial last batch.
    let data = dataset(16, 7);
    let test = dataset(2048 + 37, 8);
    let start = TrainState::new(Params::init(SEED + 1), SEED, BATCH, false);
    let Some(mut g) = gpu_backend(&data, &start) else { return };
    let before = (g.submits(), g.host_waits());
    let logits = g.logits(&test).unwrap();
    assert_eq!((g.submits() - before.0, g.host_waits() - before.1), (1, 1), "one submit and one wait");
    let mut acts = Activations::new(test.len());
    acts.set_input(&test.images);
    network::forward(&start.params, &mut acts);
    assert_close("eval logits", &logits, &acts.logits);
}

#[test]
fn identical_runs_give_identical_bits() {
    let data = dataset(64, 9);
    let adam = AdamConfig::default();
    let start = TrainState::new(Params::init(SEED + 2), SEED, BATCH, false);
    let idx = indices(data.len(), 20, 10);
    let mut results = Vec::new();
    for _ in 0..2 {
        let Some(mut g) = gpu_backend(&data, &start) else { return };
        let stats = g.train_steps(&idx, BATCH, 1, &adam).unwrap();
        let mut s = start.clone();
        g.store_state(&mut s).unwrap();
        let bits: Vec<u32> = s
            .params
            .flatten()
            .iter()
            .chain(&s.adam_m.flatten())
            .chain(&s.adam_v.flatten())
            .map(|x| x.to_bits())
            .collect();
        let stat_bits: Vec<(u32, u32)> = stats.iter().map(|s| (s.loss.to_bits(), s.correct)).collect();
        results.push((bits, stat_bits));
    }
    assert!(results[0] == results[1], "two identical GPU runs differ");
}

#[test]
fn a_chunk_costs_one_submit_and_one_host_wait() {
    let data = dataset(32, 11);
    let adam = AdamConfig::default();
    let start = TrainState::new(Params::init(SEED), SEED, BATCH, false);
    let Some(mut g) = gpu_backend(&data, &start) else { return };
    for (steps, first) in [(5usize, 1u64), (7, 6), (3, 13)] {
        let idx = indices(data.len(), steps, steps as u64);
        let before = (g.submits(), g.host_waits());
        let stats = g.train_steps(&idx, BATCH, first, &adam).unwrap();
        assert_eq!(stats.len(), steps);
        assert!(stats.iter().all(|s| s.loss.is_finite() && s.correct as usize <= BATCH));
        assert_eq!((g.submits() - before.0, g.host_waits() - before.1), (1, 1), "chunk of {steps} steps");
    }
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let data = dataset(16, 12);
    let adam = AdamConfig::default();
    let start = TrainState::new(Params::init(SEED), SEED, BATCH, false);
    let Some(mut g) = gpu_backend(&data, &start) else { return };
    assert!(g.train_steps(&[16; BATCH], BATCH, 1, &adam).is_err(), "index past the data set");
    assert!(g.train_steps(&[0; BATCH], 0, 1, &adam).is_err(), "batch 0");
    let mut bad = data.clone();
    bad.labels[0] = 10;
    assert!(GpuBackend::new(g.context().clone(), &bad).is_err(), "label 10");
    // A batch whose activations exceed the largest storage binding.
    let huge = (g.context().max_binding() / (6 * 28 * 28 * 4)) as usize + 1;
    let idx = vec![0u32; huge];
    let err = g.train_steps(&idx, huge, 1, &adam).unwrap_err();
    assert!(format!("{err:#}").contains("batch"), "{err:#}");
}

#[test]
fn kernel_timings_cover_every_dispatch() {
    let data = dataset(16, 13);
    let start = TrainState::new(Params::init(SEED), SEED, BATCH, false);
    let Some(mut g) = gpu_backend(&data, &start) else { return };
    let t = g.time_kernels(4, 2).unwrap();
    assert_eq!(t.len(), lenet::gpu::trainer::STEP_DISPATCHES.len());
    assert!(t.iter().all(|k| k.seconds > 0.0 && k.batch == 4), "{t:?}");
}

/// The trainer's fused kernels (conv+pool forward, pool backward inside the conv backward, the
/// split weight gradients whose slice count depends on the batch) at batch sizes that divide
/// no workgroup size, including a single image: the gradients of one step agree with the CPU.
#[test]
fn step_gradients_match_cpu_at_several_batch_sizes() {
    let data = dataset(80, 6);
    let params = Params::init(SEED + 1);
    for batch in [1usize, 13, 67] {
        let start = TrainState::new(params.clone(), SEED, batch, false);
        let Some(mut g) = gpu_backend(&data, &start) else { return };
        let idx: Vec<u32> = (0..batch as u32).map(|i| (7 * i + 3) % data.len() as u32).collect();

        let mut acts = Activations::new(batch);
        let mut grads = Gradients::new(batch);
        let pixels: Vec<u8> = idx.iter().flat_map(|&i| data.image(i as usize).to_vec()).collect();
        let labels: Vec<u32> = idx.iter().map(|&i| data.labels[i as usize] as u32).collect();
        acts.set_input(&pixels);
        network::forward(&params, &mut acts);
        let cpu = network::backward(&params, &acts, &labels, &mut grads);

        let stats = g.train_steps(&idx, batch, 1, &AdamConfig::default()).unwrap();
        assert_eq!(stats[0].correct, cpu.correct, "batch {batch}");
        assert!((stats[0].loss - cpu.loss).abs() <= tol(cpu.loss), "batch {batch}: {stats:?} vs {cpu:?}");
        assert_grads_close(&g.gradients().unwrap(), &grads.params);
    }
}
