//! The second round's training options, through the training loop itself (`lenet::train::train`)
//! on a slice of the shipped MNIST: the chunks the loop builds (each step's learning rate and
//! momentum from the schedule, each image's shift from the augmentation draw), exact resumes
//! with all of them, the validation split, early stopping (`--patience`, `--until`),
//! `--save-best`, and the checkpoint metadata that carries them. The GPU tests fail when
//! LENET_REQUIRE_GPU=1 and there is no adapter, and say "skipped" otherwise.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Result;
use lenet::augment::shift_for;
use lenet::backend::{Backend, Chunk, StepStats};
use lenet::checkpoint::{load_checkpoint, parse_checkpoint, save_checkpoint};
use lenet::cpu::{CpuBackend, Fast, Reference};
use lenet::data::{Dataset, Mnist};
use lenet::model::{epoch_order, Params, TrainState, ValidationRecord};
use lenet::ops::{Batch, GatherArgs, Ops};
use lenet::optim::{OptStep, Optimizer, OptimizerKind, Sgd};
use lenet::schedule::{LrSchedule, ScheduleState};
use lenet::train::{split_validation, train, StopReason, TrainConfig, TrainReport};

/// The first `n_train` training and `n_test` test images of the shipped MNIST.
fn mnist(n_train: usize, n_test: usize) -> Mnist {
    common::small_mnist(n_train, n_test)
}

/// A backend that records every chunk it is given, and raises `interrupt` (as a signal would)
/// once it has been given `interrupt_after` chunks.
struct Recording<B: Backend> {
    inner: B,
    chunks: Vec<Chunk>,
    interrupt: Option<(Arc<AtomicBool>, usize)>,
}

impl<B: Backend> Recording<B> {
    fn new(inner: B) -> Self {
        Recording { inner, chunks: Vec::new(), interrupt: None }
    }
}

impl<B: Backend> Backend for Recording<B> {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn adapter(&self) -> String {
        self.inner.adapter()
    }
    fn load_state(&mut self, state: &TrainState) -> Result<()> {
        self.inner.load_state(state)
    }
    fn store_state(&mut self, state: &mut TrainState) -> Result<()> {
        self.inner.store_state(state)
    }
    fn submit(&mut self, chunk: &Chunk) -> Result<()> {
        self.chunks.push(chunk.clone());
        if let Some((flag, after)) = &self.interrupt {
            if self.chunks.len() >= *after {
                flag.store(true, Ordering::SeqCst);
            }
        }
        self.inner.submit(chunk)
    }
    fn finish(&mut self) -> Result<Option<Vec<StepStats>>> {
        self.inner.finish()
    }
    fn logits(&mut self, data: &Dataset) -> Result<Vec<f32>> {
        self.inner.logits(data)
    }
}

/// One step of a recorded run: its samples, their shifts, its optimizer scalars.
type Step = (Vec<u32>, Vec<i32>, OptStep);

/// The recorded chunks as steps (how a run is cut into chunks depends on where it stopped).
fn steps_of(chunks: &[Chunk]) -> Vec<Step> {
    chunks
        .iter()
        .flat_map(|c| {
            (0..c.steps.len()).map(move |s| {
                let b = c.batch;
                (
                    c.indices[s * b..(s + 1) * b].to_vec(),
                    c.shifts[2 * s * b..2 * (s + 1) * b].to_vec(),
                    c.steps[s],
                )
            })
        })
        .collect()
}

fn sgd(lr: f64) -> Optimizer {
    Optimizer { kind: OptimizerKind::Sgd(Sgd { momentum: 0.9, nesterov: true, weight_decay: 5e-4 }), lr }
}

/// A fresh run's state with the given recipe.
fn start(opt: Optimizer, batch: usize, schedule: LrSchedule, shift: u32, validation: usize) -> TrainState {
    let mut s = TrainState::new(Params::init(3), opt, 7, batch, true);
    s.schedule = schedule;
    s.augment_shift = shift;
    s.validation = validation;
    s
}

fn config(epochs: u64) -> TrainConfig {
    // Chunks of one step, as the loop made them for these small epochs before chunks were sized
    // by time (issue 20): the tests compare chunks and interrupt after a number of them.
    TrainConfig { epochs, plain_progress: true, chunk_steps: Some(1), ..TrainConfig::default() }
}

/// Runs `state` on the CPU with `data` (and `held_out` images of it for validation).
fn run_cpu(
    data: &Mnist,
    state: &mut TrainState,
    cfg: &TrainConfig,
    interrupt_after: Option<usize>,
) -> (TrainReport, Vec<Chunk>) {
    let mut data = Mnist { train: data.train.clone(), test: data.test.clone() };
    let validation =
        (state.validation > 0).then(|| split_validation(&mut data.train, state.validation).unwrap());
    let flag = Arc::new(AtomicBool::new(false));
    let mut backend = Recording::new(CpuBackend::new(&data.train).unwrap());
    backend.interrupt = interrupt_after.map(|n| (flag.clone(), n));
    let report = train(&mut backend, state, &data, validation.as_ref(), cfg, &flag).unwrap();
    (report, backend.chunks)
}

#[test]
fn the_default_recipe_builds_the_chunks_it_always_did() {
    let data = mnist(320, 50);
    let opt = Optimizer::default();
    let mut state = TrainState::new(Params::init(3), opt, 7, 32, true);
    let dir = tempfile::tempdir().unwrap();
    let save = dir.path().join("run.safetensors");
    let cfg = TrainConfig { save: Some(save.clone()), ..config(2) };
    let (report, chunks) = run_cpu(&data, &mut state, &cfg, None);
    let steps = steps_of(&chunks);
    assert_eq!(steps.len(), 20);
    for (i, (indices, shifts, step)) in steps.iter().enumerate() {
        let t = i as u64 + 1;
        // Constant Adam 1e-3 with torch's bias corrections, unshifted images, the seed's order.
        assert_eq!(*step, opt.step(t, 1e-3, None), "step {t}");
        assert!(shifts.iter().all(|&s| s == 0), "step {t} is shifted");
        let order = epoch_order(320, 7, i as u64 / 10, true);
        assert_eq!(indices[..], order[(i % 10) * 32..(i % 10 + 1) * 32], "step {t}");
    }
    assert_eq!((report.stop_reason, report.val_accuracy, report.best_val_accuracy), (None, None, None));
    // The checkpoint has no key of the new options: the same file as before they existed.
    let bytes = std::fs::read(&save).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let keys: Vec<&String> = header.metadata().as_ref().unwrap().keys().collect();
    for new in ["lr_schedule", "schedule_steps", "augment_shift", "validation", "best_val_loss"] {
        assert!(!keys.iter().any(|k| k.as_str() == new), "{new} in a default checkpoint: {keys:?}");
    }
}

#[test]
fn each_step_takes_its_schedules_lr_and_momentum() {
    let data = mnist(384, 50);
    for opt in [Optimizer { lr: 4e-3, ..Optimizer::default() }, sgd(0.05)] {
        for schedule in [LrSchedule::Cosine, LrSchedule::OneCycle] {
            let mut state = start(opt, 32, schedule, 0, 0);
            let (report, chunks) = run_cpu(&data, &mut state, &config(2), None);
            let got: Vec<OptStep> = steps_of(&chunks).into_iter().map(|s| s.2).collect();
            // The schedule spans the run: 2 epochs of 12 steps.
            assert_eq!(state.schedule_steps, 24);
            let expected = |total: u64| -> Vec<OptStep> {
                ScheduleState::new(schedule, opt.lr, total)
                    .take(24)
                    .enumerate()
                    .map(|(k, h)| opt.step(k as u64 + 1, h.lr, h.momentum))
                    .collect()
            };
            assert_eq!(got, expected(24), "{opt} {schedule}");
            // The comparison sees a schedule one step too long, or no momentum cycling.
            assert_ne!(got, expected(25), "{opt} {schedule}: a schedule of 25 steps passes too");
            let uncycled: Vec<OptStep> = ScheduleState::new(schedule, opt.lr, 24)
                .enumerate()
                .map(|(k, h)| opt.step(k as u64 + 1, h.lr, None))
                .collect();
            assert_eq!(got == uncycled, schedule == LrSchedule::Cosine, "{opt} {schedule}");
            // The log's lr column is each step's lr.
            let lrs: Vec<f64> =
                report.history.iter().filter(|r| r.kind == "train").map(|r| r.lr.unwrap()).collect();
            let want: Vec<f64> = ScheduleState::new(schedule, opt.lr, 24).map(|h| h.lr).collect();
            assert_eq!(lrs, want);
        }
    }
}

#[test]
fn each_image_is_shifted_by_the_draw_of_its_epoch_and_position() {
    let data = mnist(320, 50);
    let mut state = start(Optimizer::default(), 32, LrSchedule::Constant, 2, 0);
    let (_, chunks) = run_cpu(&data, &mut state, &config(2), None);
    let steps = steps_of(&chunks);
    let mut seen = std::collections::BTreeSet::new();
    for (i, (_, shifts, _)) in steps.iter().enumerate() {
        let (epoch, step_in_epoch) = (i as u64 / 10, i % 10);
        for j in 0..32 {
            let position = (step_in_epoch * 32 + j) as u32;
            let (dx, dy) = shift_for(7, epoch, position, 2);
            assert_eq!((shifts[2 * j], shifts[2 * j + 1]), (dx, dy), "step {}, image {j}", i + 1);
            seen.insert((dx, dy));
        }
    }
    // Every offset of the 5x5 square occurs; the second epoch draws anew.
    assert_eq!(seen.len(), 25);
    assert_ne!(steps[0].1, steps[10].1);
}

/// A run interrupted after `after` chunks and resumed from its checkpoint ends in the same
/// bits, builds the same steps and reports the same validation record as the whole run.
fn assert_resume_is_exact(data: &Mnist, fresh: &TrainState, cfg: &TrainConfig, after: usize) {
    let dir = tempfile::tempdir().unwrap();
    let (whole_ckpt, ckpt) = (dir.path().join("whole.st"), dir.path().join("run.st"));
    let mut whole = fresh.clone();
    let whole_cfg = TrainConfig { save: Some(whole_ckpt.clone()), ..cfg.clone() };
    let (whole_report, whole_chunks) = run_cpu(data, &mut whole, &whole_cfg, None);

    let mut first = fresh.clone();
    let split_cfg = TrainConfig { save: Some(ckpt.clone()), ..cfg.clone() };
    let (report, mut chunks) = run_cpu(data, &mut first, &split_cfg, Some(after));
    assert_eq!(report.stop_reason, Some(StopReason::Signal));
    let mut resumed = load_checkpoint(&ckpt).unwrap().into_train_state().unwrap();
    assert!(resumed.step > 0 && resumed.step < whole.step, "interrupted at step {}", resumed.step);
    // As `lenet train --resume` does: a schedule runs to its end, a constant lr to --epochs.
    let resume_cfg = match resumed.schedule {
        LrSchedule::Constant => TrainConfig { epochs: cfg.epochs - resumed.epoch, ..split_cfg.clone() },
        _ => TrainConfig { steps: Some(resumed.schedule_steps - resumed.step), ..split_cfg.clone() },
    };
    let (resumed_report, rest) = run_cpu(data, &mut resumed, &resume_cfg, None);
    chunks.extend(rest);
    assert!(steps_of(&chunks) == steps_of(&whole_chunks), "the resumed run built other steps");
    assert!(std::fs::read(&ckpt).unwrap() == std::fs::read(&whole_ckpt).unwrap(), "checkpoints differ");
    assert_eq!(resumed.record, whole.record);
    assert_eq!(
        (resumed_report.stop_reason, resumed_report.best_val_step, resumed_report.test_accuracy),
        (whole_report.stop_reason, whole_report.best_val_step, whole_report.test_accuracy)
    );
}

#[test]
fn a_resumed_run_continues_schedule_shifts_and_validation_exactly() {
    // 416 images, 96 held out: 10 steps an epoch at batch 32, one step a chunk.
    let data = mnist(416, 50);
    let cfg = config(3);
    for (opt, schedule) in [
        (Optimizer { lr: 4e-3, ..Optimizer::default() }, LrSchedule::OneCycle),
        (sgd(0.05), LrSchedule::Cosine),
        (Optimizer { kind: lenet::optim::AdamW::default().into(), lr: 3e-3 }, LrSchedule::OneCycle),
        (
            Optimizer {
                kind: lenet::optim::RmsProp { momentum: 0.9, centered: true, ..Default::default() }.into(),
                lr: 1e-4,
            },
            LrSchedule::Cosine,
        ),
    ] {
        let fresh = start(opt, 32, schedule, 2, 96);
        // Interrupted mid-epoch, and at an epoch's end (after its evaluation).
        for after in [4, 9] {
            assert_resume_is_exact(&data, &fresh, &cfg, after);
        }
    }
}

/// The validation losses and accuracies a run logged, with their steps.
fn val_rows(report: &TrainReport) -> Vec<(u64, f64, f64)> {
    report.history.iter().filter(|r| r.kind == "val").map(|r| (r.step, r.loss, r.accuracy)).collect()
}

#[test]
fn validation_holds_out_the_last_images_and_the_test_set_is_scored_once() {
    let data = mnist(1000, 50);
    let mut train_part = data.train.clone();
    let held = split_validation(&mut train_part, 200).unwrap();
    assert_eq!((train_part.len(), held.len()), (800, 200));
    assert_eq!(held.labels[..], data.train.labels[800..]);
    assert_eq!(held.images[..], data.train.images[800 * 784..]);
    assert!(split_validation(&mut data.train.clone(), 1000).is_err());

    let mut state = start(Optimizer::default(), 64, LrSchedule::Constant, 0, 200);
    let (report, chunks) = run_cpu(&data, &mut state, &config(3), None);
    // floor(800 / 64) = 12 steps an epoch, from the first 800 images only.
    assert_eq!(report.steps, 36);
    assert!(steps_of(&chunks).iter().all(|(indices, _, _)| indices.iter().all(|&i| i < 800)));
    assert_eq!(val_rows(&report).iter().map(|r| r.0).collect::<Vec<_>>(), [12, 24, 36]);
    let tests: Vec<u64> = report.history.iter().filter(|r| r.kind == "test").map(|r| r.step).collect();
    assert_eq!(tests, [36]);
    assert_eq!(report.val_accuracy, Some(val_rows(&report)[2].2));
    let best = val_rows(&report).into_iter().fold((0.0, 0), |b, r| if r.2 > b.0 { (r.2, r.0) } else { b });
    assert_eq!((report.best_val_accuracy, report.best_val_step), (Some(best.0), Some(best.1)));
}

/// A tiny training set learned by heart at a high lr: the validation loss soon rises.
fn overfitting_run() -> (Mnist, TrainState) {
    (
        mnist(160 + 300, 50),
        start(Optimizer { lr: 1e-2, ..Optimizer::default() }, 32, LrSchedule::Constant, 0, 300),
    )
}

#[test]
fn patience_stops_when_the_validation_loss_has_not_improved_for_that_many_evaluations() {
    let (data, fresh) = overfitting_run();
    let mut state = fresh.clone();
    let (full, _) = run_cpu(&data, &mut state, &config(30), None);
    assert_eq!(full.stop_reason, None);
    // Where patience 3 must stop, worked out from the log: the third evaluation in a row
    // without a new lowest loss.
    let rows = val_rows(&full);
    let (mut best, mut since, mut stop) = (f64::INFINITY, 0, None);
    for &(step, loss, _) in &rows {
        if loss < best {
            (best, since) = (loss, 0);
        } else {
            since += 1;
        }
        if since == 3 {
            stop = Some(step);
            break;
        }
    }
    let stop = stop.expect("the validation loss rises in 30 epochs of 5 steps");
    let cfg = TrainConfig { patience: Some(3), ..config(30) };
    let mut state = fresh.clone();
    let (report, _) = run_cpu(&data, &mut state, &cfg, None);
    assert_eq!(report.stop_reason, Some(StopReason::Patience));
    assert!(report.stopped_early);
    assert_eq!(report.stopped_at.map(|p| (p.step, p.epoch)), Some((stop, stop / 5)));
    assert_eq!(state.step, stop);
    assert_eq!(val_rows(&report), rows[..val_rows(&report).len()]);
    // Stopping early still scores the test set, once.
    assert_eq!(
        report.history.iter().filter(|r| r.kind == "test").map(|r| r.step).collect::<Vec<_>>(),
        [stop]
    );
    assert!(report.test_accuracy.is_some());
    // And a run interrupted two evaluations without improvement in (the count is in the
    // checkpoint) and resumed stops at the same step, in the same bits.
    assert_resume_is_exact(&data, &fresh, &cfg, stop as usize - 3);
}

#[test]
fn until_stops_at_the_first_evaluation_reaching_the_accuracy() {
    let data = mnist(1000, 300);
    for validation in [0, 200] {
        let fresh =
            start(Optimizer { lr: 3e-3, ..Optimizer::default() }, 50, LrSchedule::Constant, 0, validation);
        let mut state = fresh.clone();
        let (full, _) = run_cpu(&data, &mut state, &config(6), None);
        let kind = if validation > 0 { "val" } else { "test" };
        let evals: Vec<(u64, f64)> =
            full.history.iter().filter(|r| r.kind == kind).map(|r| (r.step, r.accuracy)).collect();
        // A target the third evaluation reaches first (between the 2nd's accuracy and the 3rd's).
        assert!(evals[2].1 > evals[0].1.max(evals[1].1), "{evals:?}");
        let target = (evals[0].1.max(evals[1].1) + evals[2].1) / 2.0;
        let mut state = fresh.clone();
        let (report, _) = run_cpu(&data, &mut state, &TrainConfig { until: Some(target), ..config(6) }, None);
        assert_eq!(report.stop_reason, Some(StopReason::Until), "{kind}");
        let reached = report.time_to_accuracy.expect("reached");
        assert_eq!((reached.step, reached.epoch, reached.accuracy), (evals[2].0, 3, evals[2].1));
        assert!(
            reached.seconds > 0.0 && reached.train_seconds > 0.0 && reached.train_seconds <= reached.seconds
        );
        assert_eq!(state.step, evals[2].0);
        // A target no evaluation reaches: the run goes to its end and says so.
        let mut state = fresh.clone();
        let (report, _) = run_cpu(&data, &mut state, &TrainConfig { until: Some(1.0), ..config(2) }, None);
        assert_eq!((report.stop_reason, report.time_to_accuracy), (None, None));
    }
}

#[test]
fn save_best_keeps_the_checkpoint_of_the_best_validation_accuracy() {
    let (data, fresh) = overfitting_run();
    let dir = tempfile::tempdir().unwrap();
    let best_path = dir.path().join("best.st");
    let mut state = fresh.clone();
    let cfg = TrainConfig { save_best: Some(best_path.clone()), ..config(30) };
    let (report, _) = run_cpu(&data, &mut state, &cfg, None);
    let rows = val_rows(&report);
    let first_best = rows.iter().fold((-1.0, 0), |b, r| if r.2 > b.0 { (r.2, r.0) } else { b });
    assert_ne!(first_best.1, report.steps, "the test needs a best evaluation before the last");
    // The run ends on the best checkpoint's state (its weights were scored and are kept).
    assert_eq!((report.scored_weights, report.scored_step, state.step), ("best", first_best.1, first_best.1));
    let best = load_checkpoint(&best_path).unwrap().into_train_state().unwrap();
    assert_eq!((best.step, best.record.best_accuracy), (first_best.1, Some(first_best)));
    // It is the run's state at that step: the same as a run stopped there.
    let mut stopped = fresh.clone();
    run_cpu(&data, &mut stopped, &TrainConfig { steps: Some(first_best.1), ..config(30) }, None);
    assert!(best.params == stopped.params && best.moments == stopped.moments);
}

#[test]
fn checkpoints_carry_the_options_and_refuse_bad_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.st");
    let mut state = start(sgd(0.05), 32, LrSchedule::OneCycle, 3, 5000);
    state.moments = vec![Params::init(5)];
    (state.step, state.epoch, state.step_in_epoch, state.schedule_steps) = (1000, 5, 65, 2000);
    state.record = ValidationRecord {
        best_loss: Some(0.031_234_567_890_123_4),
        evals_since_best_loss: 2,
        best_accuracy: Some((0.9912, 935)),
        best_loss_step: Some(870),
        evals_since_best_accuracy: 1,
    };
    save_checkpoint(&path, &state).unwrap();
    assert_eq!(load_checkpoint(&path).unwrap().into_train_state().unwrap(), state);

    // Each value out of its bounds, planted in the metadata, is refused with its name.
    let bytes = std::fs::read(&path).unwrap();
    let with = |key: &str, value: &str| -> Vec<u8> {
        let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
        header["__metadata__"][key] = serde_json::Value::String(value.into());
        let text = serde_json::to_vec(&header).unwrap();
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend(text);
        out.extend(&bytes[8 + len..]);
        out
    };
    for (key, value, needle) in [
        ("lr_schedule", "linear", "linear"),
        ("schedule_steps", "999", "past the end"),
        ("augment_shift", "28", "augment_shift"),
        ("validation", "-1", "validation"),
        ("best_val_loss", "NaN", "best_val_loss"),
        ("best_val_step", "1001", "best_val_step"),
        ("best_val_accuracy", "1.5", "best_val_accuracy"),
    ] {
        let err = parse_checkpoint(Path::new("x.st"), &with(key, value)).unwrap_err().to_string();
        assert!(err.contains(needle) && err.starts_with("x.st"), "{key} = {value}: {err}");
    }
    assert!(parse_checkpoint(Path::new("x.st"), &with("schedule_steps", "1000")).is_ok());
}

#[test]
fn the_gpu_gathers_the_loops_shifted_batch_bit_for_bit() {
    let data = mnist(320, 50);
    let mut state = start(Optimizer::default(), 32, LrSchedule::Constant, 3, 0);
    let (_, chunks) = run_cpu(&data, &mut state, &TrainConfig { steps: Some(1), ..config(1) }, None);
    let (indices, shifts, _) = steps_of(&chunks).remove(0);
    assert!(shifts.iter().any(|&s| s != 0));
    fn gather<O: Ops>(ops: &mut O, data: &Dataset, indices: &[u32], shifts: &[i32]) -> Vec<f32> {
        let set = ops.upload_data("train", data).unwrap();
        let (i, s) = (ops.upload("indices", indices).unwrap(), ops.upload("shifts", shifts).unwrap());
        let mut input = ops.alloc("input", indices.len() * 784).unwrap();
        let mut labels = ops.alloc::<u32>("labels", indices.len()).unwrap();
        let batch = Batch { data: &set, indices: &i, shifts: &s, batch: indices.len() };
        ops.gather(GatherArgs { input: &mut input, labels: &mut labels, batch: &batch }).unwrap();
        ops.read(&input).unwrap()
    }
    let bits = |x: Vec<f32>| x.into_iter().map(f32::to_bits).collect::<Vec<_>>();
    let reference = bits(gather(&mut Reference, &data.train, &indices, &shifts));
    // The shifts matter: the same images unshifted are another batch.
    assert_ne!(reference, bits(gather(&mut Reference, &data.train, &indices, &vec![0; shifts.len()])));
    assert_eq!(bits(gather(&mut Fast, &data.train, &indices, &shifts)), reference);
    let Some(ctx) = common::gpu() else { return };
    for variant in [lenet::gpu::Variant::V1, lenet::gpu::Variant::Mixed] {
        let mut gpu = lenet::gpu::GpuOps::with_variant(ctx.clone(), variant).unwrap();
        assert_eq!(bits(gather(&mut gpu, &data.train, &indices, &shifts)), reference, "{variant:?}");
    }
}

#[test]
fn an_augmented_scheduled_run_builds_the_same_chunks_and_losses_on_cpu_and_gpu() {
    let Some(ctx) = common::gpu() else { return };
    let data = mnist(160 + 32, 20);
    let fresh = start(Optimizer { lr: 4e-3, ..Optimizer::default() }, 16, LrSchedule::OneCycle, 2, 32);
    let mut cpu_state = fresh.clone();
    let (cpu, cpu_chunks) = run_cpu(&data, &mut cpu_state, &config(2), None);

    let mut gpu_data = Mnist { train: data.train.clone(), test: data.test.clone() };
    let validation = split_validation(&mut gpu_data.train, 32).unwrap();
    let flag = AtomicBool::new(false);
    let mut gpu = Recording::new(lenet::gpu::GpuBackend::new(ctx, &gpu_data.train).unwrap());
    let mut gpu_state = fresh.clone();
    let report = train(&mut gpu, &mut gpu_state, &gpu_data, Some(&validation), &config(2), &flag).unwrap();
    // The loop hands both backends the same steps, bit for bit.
    assert!(gpu.chunks == cpu_chunks, "the loop built other chunks for the GPU");
    // The GPU rounds differently (sums in another order, fused multiply-adds): the losses of 20
    // steps agree as the GPU-vs-CPU training tests' do, to 1e-4 + 1e-3 |loss|.
    let losses = |r: &TrainReport| -> Vec<f64> { r.history.iter().map(|row| row.loss).collect() };
    let (g, c) = (losses(&report), losses(&cpu));
    assert_eq!(g.len(), c.len());
    for (i, (g, c)) in g.iter().zip(&c).enumerate() {
        assert!((g - c).abs() <= 1e-4 + 1e-3 * c.abs(), "row {i}: gpu {g} cpu {c}");
    }
    // That tolerance sees a GPU that ignores the shifts.
    let Some(ctx) = common::gpu() else { return };
    let mut unshifted = Unshifted(lenet::gpu::GpuBackend::new(ctx, &gpu_data.train).unwrap());
    let mut state = fresh.clone();
    let report = train(&mut unshifted, &mut state, &gpu_data, Some(&validation), &config(2), &flag).unwrap();
    let g = losses(&report);
    assert!(
        g.iter().zip(&c).any(|(g, c)| (g - c).abs() > 1e-4 + 1e-3 * c.abs()),
        "a run without its shifts passes the tolerance"
    );
}

/// A planted fault: a backend that drops the shifts it is given.
struct Unshifted<B: Backend>(B);

impl<B: Backend> Backend for Unshifted<B> {
    fn kind(&self) -> &'static str {
        self.0.kind()
    }
    fn adapter(&self) -> String {
        self.0.adapter()
    }
    fn load_state(&mut self, state: &TrainState) -> Result<()> {
        self.0.load_state(state)
    }
    fn store_state(&mut self, state: &mut TrainState) -> Result<()> {
        self.0.store_state(state)
    }
    fn submit(&mut self, chunk: &Chunk) -> Result<()> {
        self.0.submit(&Chunk { shifts: vec![0; chunk.shifts.len()], ..chunk.clone() })
    }
    fn finish(&mut self) -> Result<Option<Vec<StepStats>>> {
        self.0.finish()
    }
    fn logits(&mut self, data: &Dataset) -> Result<Vec<f32>> {
        self.0.logits(data)
    }
}

/// Asserts one `error:` line naming `needle`, a non-zero exit and no panic.
fn assert_clear_error(out: &std::process::Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure; stderr:\n{err}");
    assert!(!err.contains("panicked"), "panic:\n{err}");
    let error_lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(error_lines.len(), 1, "expected one error line:\n{err}");
    assert!(err.contains(needle), "error should mention {needle:?}:\n{err}");
}

#[test]
fn impossible_combinations_of_options_get_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    // Refused before any data is read: the data directory does not exist.
    let no_data = ["train", "--backend", "cpu", "--data", "/nonexistent-data-dir"];
    let cases: &[(&[&str], &str)] = &[
        (&["--momentum", "0.9"], "--optimizer sgd"),
        (
            &["--optimizer", "adam", "--weight-decay", "1e-4"],
            "--weight-decay is not a setting of --optimizer adam",
        ),
        (&["--optimizer", "sgd", "--nesterov"], "--nesterov needs --momentum"),
        (&["--optimizer", "sgd", "--momentum", "-0.5"], "--momentum"),
        (&["--optimizer", "sgd", "--weight-decay", "inf"], "--weight-decay"),
        (&["--lr", "0", "--lr-schedule", "cosine"], "--lr"),
        (&["--val", "0"], "--val 0"),
        (&["--augment-shift", "28"], "--augment-shift 28"),
        (&["--patience", "3"], "--patience needs --val"),
        (&["--save-best", "/tmp/x.st"], "--save-best needs --val"),
        (&["--val", "100", "--patience", "0"], "--patience 0"),
        (&["--until", "0"], "--until"),
        (&["--until", "101"], "--until"),
        (&["--until", "ninety"], "--until"),
    ];
    for (extra, needle) in cases {
        let args: Vec<&str> = no_data.iter().chain(extra.iter()).copied().collect();
        let out = common::lenet(&args);
        assert_clear_error(&out, needle);
    }
    // Those that need the data or a checkpoint.
    let ckpt = d("run.st");
    let out = common::lenet(&[
        "train",
        "--backend",
        "cpu",
        "--steps",
        "2",
        "--batch",
        "16",
        "--val",
        "100",
        "--lr-schedule",
        "cosine",
        "--save",
        &ckpt,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cases: &[(&[&str], &str)] = &[
        (&["--val", "60000"], "--val 60000 leaves no images"),
        (&["--val", "59900", "--batch", "128"], "after --val"),
        (&["--resume", &ckpt, "--val", "200"], "--val differs"),
        (&["--resume", &ckpt, "--lr-schedule", "onecycle"], "--lr-schedule differs"),
        (&["--resume", &ckpt, "--augment-shift", "1"], "--augment-shift differs"),
        (&["--resume", &ckpt, "--optimizer", "sgd"], "--optimizer"),
        (&["--resume", &ckpt], "ended at step 2"),
        (&["--save", &d("a.st"), "--save-best", &d("a.st"), "--val", "100"], "same file as --save"),
        (&["--resume", &ckpt, "--save-best", &ckpt], "same file as --resume"),
    ];
    for (extra, needle) in cases {
        let args: Vec<&str> =
            ["train", "--backend", "cpu", "--steps", "1"].iter().chain(extra.iter()).copied().collect();
        assert_clear_error(&common::lenet(&args), needle);
    }
}

#[test]
fn the_metrics_log_numbers_epochs_as_the_terminal_and_has_the_documented_columns() {
    let dir = tempfile::tempdir().unwrap();
    // 320 images, 64 held out: 8 steps an epoch at batch 32.
    let data = common::write_small_mnist(dir.path(), 320, 50);
    let metrics = dir.path().join("m.csv");
    let plot = dir.path().join("p.svg");
    let out = common::lenet(&common::cpu_train(
        &data,
        &[
            "--batch",
            "32",
            "--epochs",
            "2",
            "--val",
            "64",
            "--lr",
            "2e-3",
            "--lr-schedule",
            "cosine",
            "--metrics",
            common::p(&metrics),
            "--plot",
            common::p(&plot),
        ],
    ));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&metrics).unwrap();
    let header = text.lines().next().unwrap();
    // README's "Metrics CSV" section shows the header and describes each column.
    let readme = std::fs::read_to_string(common::repo_path("README.md")).unwrap();
    let section = readme.split("## Metrics CSV").nth(1).expect("README has a Metrics CSV section");
    let section = section.split("\n## ").next().unwrap();
    assert!(section.contains(header), "README's Metrics CSV section lacks the header {header}");
    for column in header.split(',') {
        assert!(section.contains(&format!("`{column}`")), "README does not describe the column {column}");
    }
    let rows: Vec<Vec<&str>> = text.lines().skip(1).map(|l| l.split(',').collect()).collect();
    let lrs: Vec<f64> = ScheduleState::new(LrSchedule::Cosine, 2e-3, 16).map(|h| h.lr).collect();
    let mut clock = 0.0;
    for row in &rows {
        let (step, epoch): (u64, u64) = (row[1].parse().unwrap(), row[2].parse().unwrap());
        let seconds: f64 = row[3].parse().unwrap();
        assert!(seconds >= clock, "the clock went back: {row:?}");
        clock = seconds;
        // Steps 1-8 are epoch 1, as "epoch 1 (8/8 steps)" on the terminal; an evaluation after an
        // epoch carries its number.
        assert_eq!(epoch, (step - 1) / 8 + 1, "{row:?}");
        match row[0] {
            "train" => assert_eq!(row[4].parse::<f64>().unwrap(), lrs[step as usize - 1], "{row:?}"),
            "val" | "test" => assert_eq!(row[4], "", "{row:?}"),
            other => panic!("unknown kind {other}"),
        }
    }
    let kinds: Vec<(&str, &str)> = rows.iter().filter(|r| r[0] != "train").map(|r| (r[0], r[1])).collect();
    assert_eq!(kinds, [("val", "8"), ("val", "16"), ("test", "16")]);
    // The terminal's epoch lines report the same validation figures under the same numbers.
    let stderr = String::from_utf8_lossy(&out.stderr);
    // (The evaluations are on the line under the epoch's, and no line is over 80 columns.)
    let lines: Vec<&str> = stderr.lines().collect();
    for (epoch, row) in [(1, &rows[8]), (2, &rows[17])] {
        let at = lines.iter().position(|l| l.starts_with(&format!("epoch {epoch}/"))).expect("an epoch line");
        let (line, evals) = (lines[at], lines[at + 1]);
        let loss: f64 = row[5].parse().unwrap();
        assert!(
            evals.starts_with("    val loss ") && evals.contains(&format!("val loss {loss:.4}")),
            "{evals} vs {row:?}"
        );
        assert!(line.chars().count() <= 80 && evals.chars().count() <= 80, "{line}\n{evals}");
    }
    // The plot: three panels, the validation points, whole-number step ticks.
    let svg = std::fs::read_to_string(&plot).unwrap();
    let labels: Vec<&str> = svg.split("</text>").filter_map(|t| Some(t.rsplit('>').next()?.trim())).collect();
    for needle in ["loss", "accuracy (%)", "learning rate", "validation", "test"] {
        assert!(labels.contains(&needle), "the plot has no {needle:?}: {labels:?}");
    }
    for tick in ["5", "10", "15"] {
        assert!(labels.contains(&tick), "no step tick {tick}: {labels:?}");
    }
}
