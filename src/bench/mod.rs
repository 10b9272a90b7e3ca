//! Per-op kernel benchmarks, shared by `lenet bench` and `cargo bench --bench layers`.
//!
//! The rows are the op calls of one training step at the benchmarked batch: on a GPU, the
//! dispatches of the trainer's own recorded step, grouped by the op call that recorded them;
//! without one, the calls [`crate::opcheck::step_cases`] sees the network make. Each row is
//! validated by [`crate::opcheck::check`] (the same op, same shape, against the CPU reference)
//! before anything is timed; then the GPU row replays exactly the step's dispatches (N
//! back-to-back in one compute pass, timestamp queries where offered) and the CPU row runs the
//! fast CPU op. The whole step closes the table, validated by its gradients
//! ([`step::check_step`]) and on the GPU timed as training runs it ([`replay`]), before the
//! rows.

pub mod peak;
pub mod replay;
pub mod report;
pub mod step;

use std::time::Instant;

use anyhow::{Context as _, Result};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

pub use report::{today_utc, Report, Row, Unit};

use crate::backend::{Backend, Chunk, OpsBackend};
use crate::cpu::backend::cpu_description;
use crate::cpu::{CpuBackend, Fast, Reference};
use crate::data::Dataset;
use crate::gpu::kernels::{Dispatch, STEP_STRIDE};
use crate::gpu::timing::{median, time_calls, PassTimer, StepPassTimer, TimingMethod};
use crate::gpu::{GpuBackend, GpuContext, GpuOps};
use crate::model::{layer_shapes, LayerShape, Params, TrainState, LENET5};
use crate::opcheck::{self, OpCase, Staged};
use crate::optim::{Adam, Optimizer, OptimizerKind};
use replay::{PassTimes, StepPlan, StepReplayer};

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub batch: usize,
    /// Timed samples per row (after one warm-up call); fewer when `budget_s` runs out.
    pub iters: usize,
    /// Back-to-back GPU launches per timed pass (amortises the pass's own start and end).
    pub calls_per_pass: usize,
    /// Wall-clock seconds after which a row stops taking samples (it keeps at least 3).
    pub budget_s: f64,
    /// Time the CPU ops too.
    pub cpu: bool,
    pub seed: u64,
    /// Seconds of continuous step replays before the GPU's step is timed.
    pub warmup_s: f64,
    /// Consecutive steps per timed pass of the GPU's step.
    pub steps_per_pass: usize,
    /// The GPU kernels to time (None: the trainer's default for the adapter).
    pub kernels: Option<crate::gpu::Variant>,
}

impl BenchConfig {
    pub fn new(batch: usize, iters: usize) -> Self {
        BenchConfig {
            batch,
            iters,
            calls_per_pass: 10,
            budget_s: 1.0,
            cpu: true,
            seed: 1,
            warmup_s: replay::MIN_WARMUP_S,
            steps_per_pass: replay::MIN_STEPS_PER_PASS,
            kernels: None,
        }
    }
}

/// FLOPs of one training step (convolutions and linear layers; the rest is memory traffic):
/// forward and weight gradient for every layer, input gradient for all but the first.
pub fn step_flops(batch: usize) -> f64 {
    let macs: usize = layer_shapes(batch).iter().map(LayerShape::macs).sum();
    let first = layer_shapes(batch)[0].macs();
    2.0 * (3 * macs - first) as f64
}

/// The layer an op call belongs to, from its shape.
fn layer_of(case: &OpCase, batch: usize) -> String {
    let shapes = layer_shapes(batch);
    let find = |want: LayerShape| shapes.iter().position(|s| *s == want).map(|i| LENET5[i].name.to_string());
    let name = match case {
        OpCase::Gather { .. } => Some("input".to_string()),
        OpCase::ConvReluPool(s)
        | OpCase::GatherConvReluPool { s, .. }
        | OpCase::ConvBackwardFromPool { s, .. } => find(LayerShape::Conv(*s)),
        OpCase::Linear { s, .. } | OpCase::LinearXent { s, .. } | OpCase::LinearBackward { s, .. } => {
            find(LayerShape::Linear(*s))
        }
        OpCase::SoftmaxXent { .. } => Some("loss".to_string()),
        OpCase::TrunkForward { s, .. } | OpCase::TrunkBackward(s) => {
            let (first, last) = (find(LayerShape::Conv(s.conv1)), find(LayerShape::Conv(s.conv2)));
            first.zip(last).map(|(a, b)| format!("{a}-{b}"))
        }
        OpCase::Head(h) => {
            let (first, last) = (find(LayerShape::Linear(h.layer(0))), find(LayerShape::Linear(h.layer(2))));
            first.zip(last).map(|(a, b)| format!("{a}-{b}"))
        }
        OpCase::Update { .. } => Some("all".to_string()),
    };
    name.unwrap_or_else(|| "?".into())
}

/// What a row computes, in a few words.
/// Times the dispatches `ds` replayed (`calls` per timed pass) into the row's GPU columns.
fn time_gpu(
    row: &mut Row,
    timer: &PassTimer,
    ds: &[Dispatch],
    calls: usize,
    iters: usize,
    budget_s: f64,
) -> Result<()> {
    let m = time_calls(
        timer,
        &|p| {
            for d in ds {
                d.record(p, 0);
            }
        },
        calls,
        iters,
        budget_s,
    )?;
    fill_gpu(row, m.seconds, m.min, m.max, m.calls);
    Ok(())
}

/// A row's GPU columns from its median, fastest and slowest time (seconds) and samples.
fn fill_gpu(row: &mut Row, median: f64, min: f64, max: f64, calls: usize) {
    row.gpu_us = Some(median * 1e6);
    row.gpu_min_us = Some(min * 1e6);
    row.gpu_max_us = Some(max * 1e6);
    row.gpu_rate = Some(rate(row.work, median));
    row.gpu_calls = calls;
}

fn rate(work: f64, seconds: f64) -> f64 {
    work / seconds * 1e-9
}

fn new_row(case: &OpCase, batch: usize) -> Row {
    let (unit, work) = match case.flops() {
        Some(f) => (Unit::GflopPerS, f),
        None => (Unit::GbPerS, case.bytes()),
    };
    Row {
        layer: layer_of(case, batch),
        direction: case.direction(),
        op: case.op().into(),
        gpu_kernels: Vec::new(),
        unit,
        work,
        gpu_us: None,
        gpu_rate: None,
        gpu_calls: 0,
        gpu_min_us: None,
        gpu_max_us: None,
        cpu_us: None,
        cpu_rate: None,
        cpu_calls: 0,
        cpu_min_us: None,
        cpu_max_us: None,
        cpu_share: None,
        gpu_share: None,
        cpu_peak_fraction: None,
        validated: "n/a".into(),
        worst_ratio: None,
    }
}

/// Wall times of one call of `f`: median, min, max (seconds) and samples.
struct CpuTimes {
    median: f64,
    min: f64,
    max: f64,
    samples: usize,
}

impl CpuTimes {
    fn fill(&self, row: &mut Row) {
        row.cpu_us = Some(self.median * 1e6);
        row.cpu_min_us = Some(self.min * 1e6);
        row.cpu_max_us = Some(self.max * 1e6);
        row.cpu_rate = Some(rate(row.work, self.median));
        row.cpu_calls = self.samples;
    }
}

/// Wall times of one call of `f`, after one warm-up call.
fn time_cpu(cfg: &BenchConfig, f: &mut dyn FnMut() -> Result<()>) -> Result<CpuTimes> {
    f()?;
    let mut s = Vec::new();
    let start = Instant::now();
    while s.len() < cfg.iters.max(1) {
        let t = Instant::now();
        f()?;
        s.push(t.elapsed().as_secs_f64());
        if s.len() >= 3 && start.elapsed().as_secs_f64() > cfg.budget_s {
            break;
        }
    }
    let samples = s.len();
    let min = s.iter().copied().fold(f64::INFINITY, f64::min);
    let max = s.iter().copied().fold(0.0, f64::max);
    Ok(CpuTimes { median: median(&mut s), min, max, samples })
}

fn random_dataset(n: usize, seed: u64) -> Dataset {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Dataset {
        images: (0..n * 784).map(|_| rng.next_u32() as u8).collect(),
        labels: (0..n).map(|_| (rng.next_u32() % 10) as u8).collect(),
        rows: 28,
        cols: 28,
    }
}

/// One step on `backend` from `state` on the batch `0..batch`: loss, gradients, parameters.
fn one_step(backend: &mut dyn Backend, state: &TrainState) -> Result<(f32, TrainState)> {
    backend.load_state(state)?;
    let b = state.batch;
    let opt = state.optimizer;
    let chunk = Chunk {
        batch: b,
        indices: (0..b as u32).collect(),
        shifts: vec![0; 2 * b],
        steps: vec![opt.step(1, opt.lr, None)],
    };
    let loss = backend.train_steps(&chunk)?[0].loss;
    let mut after = state.clone();
    backend.store_state(&mut after)?;
    Ok((loss, after))
}

fn record_check(row: &mut Row, result: Result<opcheck::Outcome>) {
    match result {
        Ok(o) => {
            row.validated = "ok".into();
            row.worst_ratio = Some(o.worst_ratio);
        }
        Err(e) => row.validated = format!("FAILED: {e:#}"),
    }
}

/// The GPU trainer's recorded step, replayed in passes of consecutive steps as a chunk of
/// training runs it (the k-th step at the k-th step-uniform slot).
struct TrainerSteps<'a> {
    timer: StepPassTimer,
    dispatches: &'a [Dispatch],
    clock: Instant,
}

impl StepReplayer for TrainerSteps<'_> {
    fn pass(&mut self, slots: &[u32]) -> Result<PassTimes> {
        let ds = self.dispatches;
        self.timer.time(&|pass, k| {
            let offset = slots[k] * STEP_STRIDE as u32;
            for d in ds {
                d.record(pass, offset);
            }
        })
    }

    fn now(&self) -> f64 {
        self.clock.elapsed().as_secs_f64()
    }
}

/// Runs every row in three phases, so that no timing follows a long single-threaded CPU
/// computation: (1) every validation (each row's op against the CPU reference, the whole step
/// against the reference's step); (2) the GPU's timing: the step as the trainer runs it
/// ([`replay`]: a warm-up of continuous step replays, then passes of consecutive steps), then
/// each row's dispatches; (3) the CPU's timing. Errors only for set-up failures; a failed
/// validation is in its row.
pub fn run(cfg: &BenchConfig, gpu: Option<&GpuContext>) -> Result<Report> {
    anyhow::ensure!(cfg.batch > 0 && cfg.iters > 0, "batch and iterations must be at least 1");
    anyhow::ensure!(cfg.steps_per_pass > 0, "a timed pass needs at least one step");
    crate::cpu::isa::check()?;
    let b = cfg.batch;
    // A batch per step of a timed pass (the validation step reads the first).
    let data = random_dataset(b * cfg.steps_per_pass, cfg.seed);
    let optimizer = Optimizer { kind: OptimizerKind::Adam(Adam::default()), lr: 1e-3 };
    let state = TrainState::new(Params::init(cfg.seed), optimizer, cfg.seed, b, false);

    // The rows: the GPU trainer's recorded step (after one real step), or the CPU's op calls.
    let mut gpu_backend = match gpu {
        Some(ctx) => Some(
            match cfg.kernels {
                Some(v) => GpuBackend::with_variant(ctx.clone(), &data, v),
                None => GpuBackend::new(ctx.clone(), &data),
            }
            .context("the GPU trainer")?,
        ),
        None => None,
    };
    // (loss, state after, gradients) of one step, then a chunk of `steps_per_pass` steps: the
    // program the timing replays, with a step uniform per step as training writes them.
    let gpu_step = match gpu_backend.as_mut() {
        Some(be) => {
            let (loss, after) = one_step(be, &state).context("a GPU training step")?;
            let grads = be.gradients()?;
            let steps = (0..cfg.steps_per_pass as u64).map(|s| optimizer.step(2 + s, optimizer.lr, None));
            let chunk = Chunk {
                batch: b,
                indices: (0..(b * cfg.steps_per_pass) as u32).collect(),
                shifts: vec![0; 2 * b * cfg.steps_per_pass],
                steps: steps.collect(),
            };
            be.train_steps(&chunk).context("a chunk of GPU training steps")?;
            Some((loss, after, grads))
        }
        None => None,
    };
    let mut rows = Vec::new();
    let mut step_dispatches = None;
    // (case, dispatch range) per row.
    let groups: Vec<(OpCase, std::ops::Range<usize>)> =
        match gpu_backend.as_ref().and_then(|be| be.step_program()) {
            Some((ds, _)) => {
                step_dispatches = Some(ds.len());
                let mut groups: Vec<(OpCase, std::ops::Range<usize>)> = Vec::new();
                for (i, d) in ds.iter().enumerate() {
                    let case = d.case.clone().context("a dispatch without its op")?;
                    match groups.last_mut() {
                        Some((c, r)) if *c == case && r.end == i => r.end = i + 1,
                        _ => groups.push((case, i..i + 1)),
                    }
                }
                groups
            }
            None => opcheck::step_cases(Fast, b, &optimizer)?.into_iter().map(|c| (c, 0..0)).collect(),
        };

    // (1) Validation. The ops that validate each row run the kernels the trainer records.
    let mut gpu_ops = match (gpu, gpu_backend.as_ref()) {
        (Some(ctx), Some(be)) => Some(GpuOps::with_variant(ctx.clone(), be.variant())?),
        _ => None,
    };
    for (case, range) in &groups {
        let mut row = new_row(case, b);
        match (gpu_ops.as_mut(), gpu_backend.as_ref()) {
            (Some(ops), Some(be)) => {
                let (ds, _) = be.step_program().expect("the program the rows came from");
                row.gpu_kernels = ds[range.clone()].iter().map(|d| d.kernel.clone()).collect();
                record_check(&mut row, opcheck::check(ops, case, cfg.seed));
            }
            // No GPU: the CPU op is the one validated.
            _ => record_check(&mut row, opcheck::check(&mut Fast, case, cfg.seed)),
        }
        rows.push(row);
    }
    // The whole training step: forward, backward and Adam.
    let step_case = OpCase::SoftmaxXent { batch: b, classes: 10 };
    let mut step_row = new_row(&step_case, b);
    step_row.layer = "step".into();
    step_row.direction = "fwd+bwd+adam".into();
    step_row.op = "train_step".into();
    step_row.unit = Unit::GflopPerS;
    step_row.work = step_flops(b);
    // Validated against the reference's step: the GPU's, or without one the fast CPU path's.
    let mut cpu_be = CpuBackend::new(&data)?;
    let mut reference = OpsBackend::with_ops(Reference, "cpu", "reference".into(), &data)?;
    let (ref_loss, ref_after) = one_step(&mut reference, &state)?;
    let want = step::StepResult { loss: ref_loss, grads: reference.gradients()?, params: ref_after.params };
    let got = match gpu_step {
        Some((loss, after, grads)) => step::StepResult { loss, grads, params: after.params },
        None => {
            let (loss, after) = one_step(&mut cpu_be, &state)?;
            step::StepResult { loss, grads: cpu_be.gradients()?, params: after.params }
        }
    };
    record_check_ratio(&mut step_row, step::check_step(&got, &want, optimizer.lr, Adam::default().eps));

    // (2) The GPU's timing: the step first, on a warm GPU, then each validated row.
    let mut step_timing = None;
    let mut step_method = None;
    let timer = gpu.map(|ctx| PassTimer::new(ctx, true));
    if let (Some(ctx), Some(be), Some(timer)) = (gpu, gpu_backend.as_ref(), timer.as_ref()) {
        let (ds, _) = be.step_program().expect("one step ran");
        step_row.gpu_kernels = ds.iter().map(|d| d.kernel.clone()).collect();
        if !step_row.failed() {
            let mut replay = TrainerSteps {
                timer: StepPassTimer::new(ctx, cfg.steps_per_pass),
                dispatches: ds,
                clock: Instant::now(),
            };
            step_method = Some(replay.timer.method());
            let plan = StepPlan {
                warmup_s: cfg.warmup_s,
                steps_per_pass: cfg.steps_per_pass,
                min_passes: 3,
                max_passes: cfg.iters.max(3),
                budget_s: cfg.budget_s * 2.0,
            };
            let t =
                ctx.scoped(|| replay::measure_steps(&mut replay, &plan)).context("timing the GPU's step")?;
            fill_gpu(&mut step_row, t.per_step.median, t.per_step.min, t.per_step.max, t.per_step.samples);
            step_timing = Some(t);
        }
        for ((_, range), row) in groups.iter().zip(rows.iter_mut()) {
            // Time only what validated.
            if !row.failed() {
                time_gpu(row, timer, &ds[range.clone()], cfg.calls_per_pass, cfg.iters, cfg.budget_s)?;
            }
        }
    }

    // (3) The CPU's timing.
    if cfg.cpu {
        for (case, row) in groups.iter().map(|(c, _)| c).zip(rows.iter_mut()) {
            let mut fast = Fast;
            let mut staged = Staged::new(&mut fast, case, &opcheck::inputs(case, cfg.seed))?;
            time_cpu(cfg, &mut || staged.exec(&mut fast))?.fill(row);
        }
        cpu_be.load_state(&state)?;
        let mut t = 0u64;
        let times = time_cpu(cfg, &mut || {
            t += 1;
            let chunk = Chunk {
                batch: b,
                indices: (0..b as u32).collect(),
                shifts: vec![0; 2 * b],
                steps: vec![optimizer.step(t, optimizer.lr, None)],
            };
            cpu_be.train_steps(&chunk).map(|_| ())
        })?;
        times.fill(&mut step_row);
    }
    rows.push(step_row);
    let cpu_peak = cfg.cpu.then(|| peak::measure(crate::cpu::isa::selected(), 0.25));
    let (cpu_images_per_s, gpu_images_per_s, dominant) = shares(&mut rows, b, cpu_peak.as_ref());

    let timing = match &timer {
        Some(t) => match t.method() {
            TimingMethod::Timestamps => "timestamps",
            TimingMethod::WallClock => "wall_clock",
        },
        None => "cpu_only",
    };
    Ok(Report {
        adapter: gpu.map(|c| c.adapter_info.name.clone()),
        adapter_details: gpu.map(|c| c.adapter_info.details()),
        cpu: cpu_description(),
        timing: timing.into(),
        step_timing_method: step_method,
        shader_loop_bounds: gpu.map(|c| c.loop_bounds),
        step_timing,
        kernels: gpu_backend.as_ref().map(|be| be.variant().to_string()),
        batch: b,
        iters: cfg.iters,
        budget_s: cfg.budget_s,
        date: today_utc(),
        step_dispatches,
        rows,
        cpu_threads: rayon::current_num_threads(),
        cpu_isa: crate::cpu::isa::selected().name().into(),
        cpu_peak,
        cpu_images_per_s,
        gpu_images_per_s,
        dominant,
    })
}

/// Fills each row's share of the step (and its fraction of the CPU's peak); returns the step's
/// CPU and GPU images/s and the line that says what dominates (the GPU's step when timed, else
/// the CPU's). The step row is the last.
fn shares(rows: &mut [Row], batch: usize, peak: Option<&peak::Peak>) -> (Option<f64>, Option<f64>, String) {
    let Some((step, ops)) = rows.split_last_mut() else { return (None, None, String::new()) };
    let (cpu_step, gpu_step) = (step.cpu_us, step.gpu_us);
    for r in ops.iter_mut().chain(std::iter::once(&mut *step)) {
        r.cpu_share = r.cpu_us.zip(cpu_step).map(|(a, s)| a / s);
        r.gpu_share = r.gpu_us.zip(gpu_step).map(|(a, s)| a / s);
        if r.unit == Unit::GflopPerS {
            r.cpu_peak_fraction = r.cpu_rate.zip(peak).map(|(x, p)| x / p.gflops_all);
        }
    }
    let ips = |us: Option<f64>| us.map(|u| batch as f64 / (u * 1e-6));
    let (side, key): (&str, fn(&Row) -> Option<f64>) =
        if gpu_step.is_some() { ("GPU", |r| r.gpu_share) } else { ("CPU", |r| r.cpu_share) };
    let mut ranked: Vec<&Row> = ops.iter().filter(|r| key(r).is_some()).collect();
    ranked.sort_by(|a, b| key(b).partial_cmp(&key(a)).unwrap_or(std::cmp::Ordering::Equal));
    // The largest rows, as many of the top three as fit the table's 100 columns.
    let mut dominant = String::new();
    for r in ranked.iter().take(3) {
        let item = format!("{} {} {:.0}%", r.layer, r.direction, 100.0 * key(r).unwrap_or(0.0));
        let line = if dominant.is_empty() {
            format!("dominant ({side}): {item}")
        } else {
            format!("{dominant}, {item}")
        };
        if line.chars().count() > 100 {
            break;
        }
        dominant = line;
    }
    (ips(cpu_step), ips(gpu_step), dominant)
}

fn record_check_ratio(row: &mut Row, result: Result<f64>) {
    match result {
        Ok(r) => {
            row.validated = "ok".into();
            row.worst_ratio = Some(r);
        }
        Err(e) => row.validated = format!("FAILED: {e:#}"),
    }
}
