//! Issue 20, through the library: a state no run can reach is caught at the chunk where it
//! arises (on the CPU and the GPU) and on load, naming its tensor; a stop signal is honoured
//! within the bound that chunks sized by measured time give; and chunking never changes the
//! bits. Each test plants the fault it is about.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use lenet::backend::{Backend, Chunk, StepStats};
use lenet::checkpoint::{check_state_tensor, load_checkpoint, save_checkpoint, CheckpointError};
use lenet::cpu::CpuBackend;
use lenet::data::{Dataset, Mnist};
use lenet::gpu::GpuBackend;
use lenet::model::{param_specs, Params, TrainState};
use lenet::optim::{Optimizer, OptimizerKind, Sgd};
use lenet::train::{error_line, train, TrainConfig, CHUNK_SECONDS};

fn config(steps: u64, save: &Path) -> TrainConfig {
    TrainConfig {
        epochs: 1,
        steps: Some(steps),
        save: Some(save.to_path_buf()),
        plain_progress: true,
        eval_every: 0,
        ..TrainConfig::default()
    }
}

fn fresh(opt: Optimizer, batch: usize) -> TrainState {
    TrainState::new(Params::init(4), opt, 4, batch, true)
}

/// The index of a parameter tensor by its name.
fn tensor(name: &str) -> usize {
    param_specs().iter().position(|s| s.name == name).unwrap()
}

#[test]
fn the_state_check_names_the_first_bad_value_and_its_rule() {
    assert!(check_state_tensor("adam.v.fc1.bias", &[0.0, 1.0, 3e38], true).is_ok());
    let f = check_state_tensor("adam.v.fc1.bias", &[0.0, -1e-30, f32::NAN], true).unwrap_err();
    assert_eq!((f.index, f.negative), (1, true));
    assert!(f.to_string().contains("adam.v.fc1.bias") && f.to_string().contains("below 0"), "{f}");
    // A negative value is fine where the rule allows it (a weight, Adam's first moment).
    assert!(check_state_tensor("adam.m.fc1.bias", &[-1.0], false).is_ok());
    let f = check_state_tensor("fc1.bias", &[-1.0, f32::INFINITY], false).unwrap_err();
    assert_eq!((f.index, f.negative), (1, false));
    assert!(f.to_string().contains("not a finite number"), "{f}");
}

/// Trains `state` for 3 steps with the given backend, saving to `save`: the run's error line.
fn run_expecting_error(
    backend: &mut dyn Backend,
    mnist: &Mnist,
    state: &mut TrainState,
    save: &Path,
) -> String {
    let cfg = TrainConfig { chunk_steps: Some(1), ..config(3, save) };
    let err = train(backend, state, mnist, None, &cfg, &AtomicBool::new(false)).unwrap_err();
    error_line(&err)
}

/// Adam's second moment at inf: the update divides by sqrt(inf), so the weights stop moving
/// while the loss stays finite. Before issue 20 this trained "successfully" and then failed to
/// save with a message blaming the file (or exited 0 without --save).
fn plant_inf_second_moment(state: &mut TrainState) {
    state.moments[1].tensors[tensor("fc1.weight")][7] = f32::INFINITY;
}

/// A negative second moment: sqrt of it is NaN.
fn plant_negative_second_moment(state: &mut TrainState) {
    state.moments[1].tensors[tensor("conv2.weight")][3] = -4.0;
}

fn assert_caught_at_the_first_chunk(line: &str, tensor: &str, save: &Path) {
    assert!(line.contains("diverged at step 1 (epoch 1)"), "not caught at its chunk: {line}");
    assert!(line.contains(tensor), "does not name the tensor {tensor}: {line}");
    assert!(line.contains("nothing was saved"), "{line}");
    assert!(!save.exists(), "a diverged state was saved");
}

#[test]
fn a_state_no_run_reaches_stops_the_cpu_run_at_its_chunk_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let mnist = common::small_mnist(256, 0);
    let save = dir.path().join("run.st");
    for (plant, name) in [
        (plant_inf_second_moment as fn(&mut TrainState), "adam.v.fc1.weight"),
        (plant_negative_second_moment, "adam.v.conv2.weight"),
    ] {
        let mut state = fresh(Optimizer::default(), 32);
        plant(&mut state);
        let mut backend = CpuBackend::new(&mnist.train).unwrap();
        let line = run_expecting_error(&mut backend, &mnist, &mut state, &save);
        assert_caught_at_the_first_chunk(&line, name, &save);
    }
    // SGD's momentum buffer may be negative; a NaN in it is caught too.
    let mut state =
        fresh(Optimizer { kind: OptimizerKind::Sgd(Sgd { momentum: 0.9, ..Sgd::default() }), lr: 0.01 }, 32);
    state.moments[0].tensors[tensor("fc2.bias")][0] = f32::NAN;
    let mut backend = CpuBackend::new(&mnist.train).unwrap();
    let line = run_expecting_error(&mut backend, &mnist, &mut state, &save);
    assert_caught_at_the_first_chunk(&line, "sgd.momentum.fc2.bias", &save);
}

#[test]
fn a_state_no_run_reaches_stops_the_gpu_run_at_its_chunk_naming_the_tensor() {
    let Some(ctx) = common::gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mnist = common::small_mnist(64, 0);
    let save = dir.path().join("run.st");
    let mut state = fresh(Optimizer::default(), 8);
    plant_inf_second_moment(&mut state);
    let mut backend = GpuBackend::new(ctx.clone(), &mnist.train).unwrap();
    let line = run_expecting_error(&mut backend, &mnist, &mut state, &save);
    assert_caught_at_the_first_chunk(&line, "adam.v.fc1.weight", &save);
    // The check rides on the chunk's read-back: still one submit and one wait per chunk.
    let mut state = fresh(Optimizer::default(), 8);
    let mut backend = GpuBackend::new(ctx, &mnist.train).unwrap();
    let cfg = TrainConfig { chunk_steps: Some(2), ..config(6, &save) };
    let report = train(&mut backend, &mut state, &mnist, None, &cfg, &AtomicBool::new(false)).unwrap();
    // 3 chunks, and the final read of the state.
    assert_eq!((report.submits, report.host_waits), (4, 4), "{report:?}");
}

/// A checkpoint file with `state`'s tensors, written without the save's own checks (a file
/// another tool or a bit flip produced).
fn write_raw(path: &Path, state: &TrainState) {
    use safetensors::tensor::{Dtype, TensorView};
    save_checkpoint(path, &fresh(state.optimizer, state.batch)).unwrap();
    let bytes = std::fs::read(path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let names = state.optimizer.state_names();
    for (prefix, p) in std::iter::once(String::new())
        .zip([&state.params])
        .chain(names.iter().map(|n| format!("{n}.")).zip(&state.moments))
    {
        for (t, spec) in p.tensors.iter().zip(param_specs()) {
            tensors.push((
                format!("{prefix}{}", spec.name),
                spec.shape.clone(),
                t.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ));
        }
    }
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, meta).unwrap()).unwrap();
}

#[test]
fn a_checkpoint_with_an_impossible_state_is_refused_on_load_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.st");
    // The control: the same file with a possible state loads.
    let good = fresh(Optimizer::default(), 32);
    write_raw(&path, &good);
    assert!(load_checkpoint(&path).is_ok());

    let mut negative = good.clone();
    plant_negative_second_moment(&mut negative);
    write_raw(&path, &negative);
    let Err(err) = load_checkpoint(&path) else { panic!("a negative second moment was loaded") };
    assert!(matches!(err, CheckpointError::ImpossibleState { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("adam.v.conv2.weight") && msg.contains("below 0") && !msg.contains('\n'), "{msg}");

    let mut infinite = good.clone();
    plant_inf_second_moment(&mut infinite);
    write_raw(&path, &infinite);
    let Err(err) = load_checkpoint(&path) else { panic!("an infinite second moment was loaded") };
    let msg = err.to_string();
    assert!(msg.contains("adam.v.fc1.weight") && msg.contains("non-finite"), "{msg}");

    // Adam's first moment and SGD's momentum may be negative.
    let mut m_negative = good.clone();
    m_negative.moments[0].tensors[0][0] = -3.0;
    write_raw(&path, &m_negative);
    assert!(load_checkpoint(&path).is_ok());
}

/// The CPU backend at a slow adapter's pace: each step takes `per_step` longer. The extra time
/// is spent in `submit`, as the CPU path computes, or, `like_a_gpu`, in `finish`, as a GPU's
/// host waits for the chunk it queued earlier.
struct Slow {
    inner: CpuBackend,
    per_step: Duration,
    like_a_gpu: bool,
    queued: std::collections::VecDeque<usize>,
    /// When each chunk's steps were done.
    done_at: Vec<Instant>,
}

impl Backend for Slow {
    fn kind(&self) -> &'static str {
        "cpu"
    }
    fn adapter(&self) -> String {
        "slow".into()
    }
    fn load_state(&mut self, state: &TrainState) -> Result<()> {
        self.inner.load_state(state)
    }
    fn store_state(&mut self, state: &mut TrainState) -> Result<()> {
        self.inner.store_state(state)
    }
    fn submit(&mut self, chunk: &Chunk) -> Result<()> {
        if self.like_a_gpu {
            self.queued.push_back(chunk.steps.len());
        } else {
            std::thread::sleep(self.per_step * chunk.steps.len() as u32);
        }
        self.inner.submit(chunk)
    }
    fn finish(&mut self) -> Result<Option<Vec<StepStats>>> {
        if let Some(steps) = self.queued.pop_front() {
            std::thread::sleep(self.per_step * steps as u32);
            self.done_at.push(Instant::now());
        }
        self.inner.finish()
    }
    fn logits(&mut self, data: &Dataset) -> Result<Vec<f32>> {
        self.inner.logits(data)
    }
}

/// Seconds from the stop signal to the saved checkpoint, on a backend of `per_step` a step, with
/// the signal `after` into the run.
fn seconds_from_stop_to_save(
    chunk_steps: Option<u64>,
    per_step: Duration,
    like_a_gpu: bool,
    after: Duration,
) -> (f64, usize) {
    let dir = tempfile::tempdir().unwrap();
    // 2560 images at batch 4: 640 steps an epoch (the old rule made chunks of 64 steps).
    let mnist = common::small_mnist(2560, 0);
    let save = dir.path().join("run.st");
    let inner = CpuBackend::new(&mnist.train).unwrap();
    let mut backend = Slow { inner, per_step, like_a_gpu, queued: Default::default(), done_at: Vec::new() };
    let mut state = fresh(Optimizer::default(), 4);
    let cfg = TrainConfig { chunk_steps, ..config(10_000, &save) };
    let stop = Arc::new(AtomicBool::new(false));
    let signalled = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(after);
            stop.store(true, Ordering::SeqCst);
            Instant::now()
        })
    };
    let report = train(&mut backend, &mut state, &mnist, None, &cfg, &stop).unwrap();
    let saved = Instant::now();
    let signalled = signalled.join().unwrap();
    assert!(report.stopped_early && save.exists(), "{report:?}");
    assert_eq!(load_checkpoint(&save).unwrap().into_train_state().unwrap().step, state.step);
    let chunks_after = backend.done_at.iter().filter(|&&t| t > signalled).count();
    (saved.duration_since(signalled).as_secs_f64(), chunks_after)
}

#[test]
fn a_stop_on_a_slow_backend_saves_within_the_bound() {
    // At most two chunks of CHUNK_SECONDS are in flight when the signal comes; the CPU-like
    // backend here has finished the one queued, so one chunk's time is left, plus the save.
    // The bound allows the whole 2 x CHUNK_SECONDS and 0.5 s for the save on a busy machine.
    let bound = 2.0 * CHUNK_SECONDS + 0.5;
    let fast = Duration::from_millis(40);
    let at = Duration::from_millis(300);
    for like_a_gpu in [false, true] {
        let (sized, _) = seconds_from_stop_to_save(None, fast, like_a_gpu, at);
        assert!(
            sized <= bound,
            "{sized:.2} s from the stop to the saved checkpoint (bound {bound} s, gpu-like {like_a_gpu})"
        );
    }
    // The planted fault: chunks of a fixed 64 steps (the rule before issue 20) keep the run
    // going for up to 64 x 40 ms after the signal, and this test sees it.
    let (fixed, _) = seconds_from_stop_to_save(Some(64), fast, false, at);
    assert!(fixed > bound, "the fixed chunks stopped within {fixed:.2} s: the test cannot tell");
}

#[test]
fn a_stop_waits_for_one_step_when_a_step_is_longer_than_a_chunk_should_be() {
    // A step of 0.8 s (lavapipe at a large batch): chunks are one step, and only one is in
    // flight, so the stop waits for at most the step running (plus the save), not a second one
    // queued behind it.
    let slow = Duration::from_millis(800);
    let bound = 0.8 + 0.5;
    let (waited, chunks_after) = seconds_from_stop_to_save(None, slow, true, Duration::from_millis(3000));
    assert!(waited <= bound, "{waited:.2} s from the stop to the saved checkpoint (bound {bound} s)");
    assert_eq!(chunks_after, 1, "chunks that ran after the stop: one was queued behind the running one");
}

/// The checkpoint after 37 steps with chunks of the given sizes.
fn checkpoint_after_37_steps(
    backend: &mut dyn Backend,
    mnist: &Mnist,
    chunk_steps: Option<u64>,
    path: &Path,
) -> Vec<u8> {
    let mut state = fresh(Optimizer::default(), 8);
    state.augment_shift = 2;
    let cfg = TrainConfig { chunk_steps, ..config(37, path) };
    train(backend, &mut state, mnist, None, &cfg, &AtomicBool::new(false)).unwrap();
    std::fs::read(path).unwrap()
}

#[test]
fn chunk_sizes_never_change_the_bits() {
    let dir = tempfile::tempdir().unwrap();
    let mnist = common::small_mnist(200, 0);
    let path = dir.path().join("c.st");
    let sizes = [Some(1), Some(5), Some(64), None];
    let cpu: Vec<Vec<u8>> = sizes
        .iter()
        .map(|&k| checkpoint_after_37_steps(&mut CpuBackend::new(&mnist.train).unwrap(), &mnist, k, &path))
        .collect();
    for (k, bytes) in sizes.iter().zip(&cpu) {
        assert!(*bytes == cpu[0], "the CPU checkpoint after chunks of {k:?} steps differs from chunks of 1");
    }
    let Some(ctx) = common::gpu() else { return };
    let gpu: Vec<Vec<u8>> = sizes
        .iter()
        .map(|&k| {
            let mut g = GpuBackend::new(ctx.clone(), &mnist.train).unwrap();
            checkpoint_after_37_steps(&mut g, &mnist, k, &path)
        })
        .collect();
    for (k, bytes) in sizes.iter().zip(&gpu) {
        assert!(*bytes == gpu[0], "the GPU checkpoint after chunks of {k:?} steps differs from chunks of 1");
    }
}
