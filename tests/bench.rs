//! The benchmark library at a tiny batch: a row for every op call of a training step (the
//! network's own list), each validated and timed, on the CPU and (when there is an adapter) on
//! the GPU; `lenet bench --json`; and the whole-step validation, which must catch a flipped,
//! zeroed, halved or 1%-scaled gradient.

mod common;

use lenet::backend::{Backend, Chunk, OpsBackend};
use lenet::bench::replay::{measure_steps, PassTimes, Spread, StepPlan, StepReplayer};
use lenet::bench::step::{check_step, StepResult};
use lenet::bench::{run, BenchConfig, Report};
use lenet::cpu::{Fast, Reference};
use lenet::data::Dataset;
use lenet::gpu::timing::deltas;
use lenet::model::{param_specs, LayerKind, Params, TrainState, LENET5};
use lenet::optim::{Adam, Optimizer};

fn tiny() -> BenchConfig {
    let mut cfg = BenchConfig::new(4, 3);
    cfg.calls_per_pass = 2;
    cfg.budget_s = 0.05;
    cfg.warmup_s = 0.05;
    cfg
}

/// Layer and direction of every op call of a training step run layer by layer (the GPU's
/// per-layer kernels), in order, then the whole step: the layers of the network's table
/// ([`LENET5`]) forward, the output layer's fused step, the others backward in reverse, the
/// update.
fn expected_rows() -> Vec<(String, String)> {
    let last = LENET5.len() - 1;
    let mut rows = Vec::new();
    for (i, layer) in LENET5.iter().enumerate() {
        let direction = match layer.kind {
            LayerKind::ConvReluPool { .. } if i == 0 => "gather+fwd+relu+pool",
            LayerKind::ConvReluPool { .. } => "forward+relu+pool",
            LayerKind::Linear { .. } if i == last => "fwd+xent+bwd",
            LayerKind::Linear { relu: true, .. } => "forward+relu",
            LayerKind::Linear { relu: false, .. } => "forward",
        };
        rows.push((layer.name.to_string(), direction.to_string()));
    }
    for layer in LENET5[..last].iter().rev() {
        let direction = match layer.kind {
            LayerKind::ConvReluPool { .. } => "backward from pool",
            LayerKind::Linear { .. } => "backward",
        };
        rows.push((layer.name.to_string(), direction.to_string()));
    }
    rows.push(("all".into(), "adam update".into()));
    rows.push(("step".into(), "fwd+bwd+adam".into()));
    rows
}

/// The rows of a step of fused passes (the GPU's default kernels, and the fast CPU path's
/// step): the trunk forward, the head's whole step, the trunk backward (each named by its
/// first and last layer of the table), the update, the step.
fn expected_fused_rows() -> Vec<(String, String)> {
    let span = |a: usize, b: usize| format!("{}-{}", LENET5[a].name, LENET5[b].name);
    let last = LENET5.len() - 1;
    vec![
        (span(0, 1), "gather+fwd+pool, x2".into()),
        (span(2, last), "fwd+xent+bwd, x3".into()),
        (span(0, 1), "bwd from pool, x2".into()),
        ("all".into(), "adam update".into()),
        ("step".into(), "fwd+bwd+adam".into()),
    ]
}

fn positive(x: Option<f64>) -> bool {
    x.is_some_and(|v| v.is_finite() && v > 0.0)
}

fn check_rows(r: &Report, gpu: bool) {
    let table = r.table();
    let got: Vec<(String, String)> = r.rows.iter().map(|x| (x.layer.clone(), x.direction.clone())).collect();
    // The CPU's step is the fused passes; the GPU's is the family's kernels or the layers'.
    let fused = !gpu || r.kernels.as_deref() == Some("fused");
    assert_eq!(got, if fused { expected_fused_rows() } else { expected_rows() }, "\n{table}");
    for row in &r.rows {
        assert_eq!(row.validated, "ok", "{} {}\n{table}", row.layer, row.direction);
        assert!(
            positive(row.cpu_us) && positive(row.cpu_rate),
            "{} {}: CPU time\n{table}",
            row.layer,
            row.direction
        );
        if gpu {
            assert!(
                positive(row.gpu_us) && positive(row.gpu_rate),
                "{} {}: GPU time\n{table}",
                row.layer,
                row.direction
            );
            assert!(!row.gpu_kernels.is_empty());
        } else {
            assert!(row.gpu_us.is_none());
        }
    }
    assert!(table.lines().all(|l| l.chars().count() <= 100), "the table is wider than 100 columns:\n{table}");
}

#[test]
fn cpu_rows_all_present_and_timed() {
    let r = run(&tiny(), None).unwrap();
    assert_eq!(r.timing, "cpu_only");
    assert!(r.adapter.is_none());
    check_rows(&r, false);
}

#[test]
fn gpu_rows_all_present_validated_and_timed() {
    let Some(ctx) = common::gpu() else { return };
    let r = run(&tiny(), Some(&ctx)).unwrap();
    assert!(r.adapter.is_some());
    assert!(r.timing == "timestamps" || r.timing == "wall_clock", "{}", r.timing);
    check_rows(&r, true);
    // The step row times the trainer's whole program: every dispatch the op rows time.
    let step = r.rows.last().unwrap();
    let ops: usize = r.rows[..r.rows.len() - 1].iter().map(|x| x.gpu_kernels.len()).sum();
    assert_eq!(step.gpu_kernels.len(), ops);
    assert_eq!(r.step_dispatches, Some(ops));
    assert!(r.table().contains(&ctx.adapter_info.name));
    // The step as training runs it: a warm-up, then at least 3 passes of 23 consecutive steps.
    let t = r.step_timing.as_ref().expect("the GPU's step was timed");
    assert!(t.warmup_s >= tiny().warmup_s && t.warmup_passes >= 1, "{t:?}");
    assert!(t.passes >= 3 && t.steps_per_pass == 23, "{t:?}");
    let per_pass = if t.per_step_timestamps { t.steps_per_pass } else { 1 };
    assert_eq!(t.per_step.samples, t.passes * per_pass, "{t:?}");
    assert_eq!(step.gpu_us, Some(t.per_step.median * 1e6));
    assert!(r.step_timing_method.is_some());
    for row in &r.rows {
        let (lo, mid, hi) = (row.gpu_min_us.unwrap(), row.gpu_us.unwrap(), row.gpu_max_us.unwrap());
        assert!(lo <= mid && mid <= hi, "{} {}: {lo} {mid} {hi}", row.layer, row.direction);
    }
    // Without --kernels, the adapter's kind picks the kernels.
    let want = lenet::gpu::Variant::default_for(ctx.adapter_info.device_type);
    assert_eq!(r.kernels, Some(want.to_string()), "on {}", ctx.adapter_info.name);
}

#[test]
fn cli_bench_cpu_json_is_all_of_stdout_and_the_table_goes_to_stderr() {
    let out = std::process::Command::new(common::lenet_exe())
        .args(["bench", "--backend", "cpu", "--batch", "8", "--iters", "2", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is one JSON document");
    assert_eq!(v["batch"], 8);
    assert_eq!(v["timing"], "cpu_only");
    assert!(v["adapter"].is_null());
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), expected_fused_rows().len());
    assert!(rows.iter().all(|r| r["validated"] == "ok"));
    assert!(stderr.contains("conv1-conv2") && stderr.contains("CPU us") && !stderr.contains("GPU us"));
}

/// One step from the same state on a random batch, on the fast path ("got") and the reference
/// ("want").
fn two_steps() -> (StepResult, StepResult, f64) {
    let batch = 16;
    let mut r = common::rng(3);
    let data = Dataset {
        images: common::bytes(&mut r, batch * 784),
        labels: (0..batch).map(|_| common::below(&mut r, 10) as u8).collect(),
        rows: 28,
        cols: 28,
    };
    let opt = Optimizer::default();
    let state = TrainState::new(Params::init(4), opt, 0, batch, false);
    let chunk = Chunk {
        batch,
        indices: (0..batch as u32).collect(),
        shifts: vec![0; 2 * batch],
        steps: vec![opt.step(1, opt.lr, None)],
    };
    let mut fast = OpsBackend::with_ops(Fast, "cpu", "fast".into(), &data).unwrap();
    let mut reference = OpsBackend::with_ops(Reference, "cpu", "reference".into(), &data).unwrap();
    let result = |b: &mut dyn Backend, grads: Params| {
        let mut after = state.clone();
        b.store_state(&mut after).unwrap();
        (grads, after.params)
    };
    fast.load_state(&state).unwrap();
    let fl = fast.train_steps(&chunk).unwrap()[0].loss;
    let fg = fast.gradients().unwrap();
    let (fg, fp) = result(&mut fast, fg);
    reference.load_state(&state).unwrap();
    let rl = reference.train_steps(&chunk).unwrap()[0].loss;
    let rg = reference.gradients().unwrap();
    let (rg, rp) = result(&mut reference, rg);
    (StepResult { loss: fl, grads: fg, params: fp }, StepResult { loss: rl, grads: rg, params: rp }, opt.lr)
}

#[test]
fn the_step_check_passes_rounding_and_catches_wrong_gradients() {
    let (got, want, lr) = two_steps();
    let eps = Adam::default().eps;
    let ratio = check_step(&got, &want, lr, eps).unwrap();
    assert!(ratio <= 1.0);
    eprintln!("fast vs reference, one step: worst ratio {ratio:.3}");

    // Faults planted in one tensor's gradient, and the parameters an update from it gives.
    type Plant = fn(f32) -> f32;
    let faults: [(&str, Plant); 4] =
        [("flipped sign", |g| -g), ("zeroed", |_| 0.0), ("halved", |g| 0.5 * g), ("1% scale", |g| 1.01 * g)];
    for tensor in 0..param_specs().len() {
        for (name, f) in faults {
            let mut bad = got.clone();
            for (j, g) in bad.grads.tensors[tensor].iter_mut().enumerate() {
                *g = f(*g);
                // Adam's first step with this gradient.
                let p0 = want.params.tensors[tensor][j]
                    + (lr * want.grads.tensors[tensor][j] as f64
                        / (want.grads.tensors[tensor][j].abs() as f64 + eps)) as f32;
                bad.params.tensors[tensor][j] = p0 - (lr * *g as f64 / (g.abs() as f64 + eps)) as f32;
            }
            let r = check_step(&bad, &want, lr, eps);
            assert!(r.is_err(), "tensor {tensor}: a {name} gradient passed ({r:?})");
        }
    }
    // A wrong update with the right gradient (half the step) is caught by the parameters.
    for tensor in 0..param_specs().len() {
        let mut bad = got.clone();
        for (p, w) in bad.params.tensors[tensor].iter_mut().zip(&want.params.tensors[tensor]) {
            *p = 0.5 * (*p + *w) + 0.25 * lr as f32;
        }
        assert!(check_step(&bad, &want, lr, eps).is_err(), "tensor {tensor}: half the update passed");
    }
}

/// A GPU that is not there: each step takes `cold` seconds until `warm_after` seconds of its
/// clock have passed (clocks that dropped while the CPU validated), then `warm`; the first step
/// of every pass also pays `launch`. Records the slots each pass was asked for.
struct FakeSteps {
    clock: f64,
    cold: f64,
    warm: f64,
    warm_after: f64,
    launch: f64,
    per_step: bool,
    passes: Vec<Vec<u32>>,
}

impl FakeSteps {
    fn new(per_step: bool) -> Self {
        FakeSteps {
            clock: 0.0,
            cold: COLD,
            warm: WARM,
            warm_after: 0.25,
            launch: 0.0,
            per_step,
            passes: Vec::new(),
        }
    }
}

impl StepReplayer for FakeSteps {
    fn pass(&mut self, slots: &[u32]) -> anyhow::Result<PassTimes> {
        self.passes.push(slots.to_vec());
        let mut times = Vec::new();
        for k in 0..slots.len() {
            let t = if self.clock < self.warm_after { self.cold } else { self.warm };
            let t = t + if k == 0 { self.launch } else { 0.0 };
            self.clock += t;
            times.push(t);
        }
        Ok(if self.per_step { PassTimes::PerStep(times) } else { PassTimes::Whole(times.iter().sum()) })
    }

    fn now(&self) -> f64 {
        self.clock
    }
}

/// Step times of the fake, in seconds (powers of two: the sums below are exact).
const COLD: f64 = 0.0625;
const WARM: f64 = 0.0078125;

fn plan() -> StepPlan {
    StepPlan { warmup_s: 0.5, steps_per_pass: 23, min_passes: 3, max_passes: 50, budget_s: 1.0 }
}

#[test]
fn the_step_is_timed_after_a_warm_up_in_passes_of_consecutive_slots() {
    for per_step in [true, false] {
        let mut gpu = FakeSteps::new(per_step);
        let t = measure_steps(&mut gpu, &plan()).unwrap();
        // Warm-up: whole passes until 0.5 s. The first (4 cold steps, 19 warm) ends at 0.398 s,
        // the second at 0.578 s.
        assert_eq!(t.warmup_passes, 2, "{t:?}");
        assert_eq!(t.warmup_s, 0.25 + 19.0 * WARM + 23.0 * WARM);
        // Then passes of 0.18 s until the 1 s budget is spent: the sixth ends at 1.08 s.
        assert_eq!(t.passes, 6, "{t:?}");
        assert_eq!(gpu.passes.len(), 8);
        let consecutive: Vec<u32> = (0..23).collect();
        assert!(gpu.passes.iter().all(|p| *p == consecutive), "{:?}", gpu.passes);
        assert_eq!(t.steps_per_pass, 23);
        assert_eq!(t.per_step_timestamps, per_step);
        assert_eq!(t.per_step.samples, if per_step { 6 * 23 } else { 6 });
        // Every timed step is a warm one: the cold ones stayed in the warm-up.
        for x in [t.per_step.min, t.per_step.median, t.per_step.max] {
            assert!((x - WARM).abs() < 1e-12, "{t:?}");
        }
    }
    // Planted fault: a warm-up shorter than the GPU's (one pass, where it needs 1.5 s). The cold
    // steps land in the samples, and the checks above would see them.
    let mut gpu = FakeSteps::new(true);
    gpu.warm_after = 1.5;
    let t = measure_steps(&mut gpu, &StepPlan { warmup_s: 0.0, ..plan() }).unwrap();
    assert_eq!(t.per_step.max, COLD, "{t:?}");
}

#[test]
fn at_least_the_minimum_passes_however_slow_and_at_most_the_maximum_however_fast() {
    let mut slow = FakeSteps::new(true);
    slow.warm = 1.0;
    let t = measure_steps(&mut slow, &plan()).unwrap();
    assert_eq!((t.warmup_passes, t.passes), (1, 3), "{t:?}");
    let mut fast = FakeSteps::new(true);
    fast.warm = 1e-6;
    fast.warm_after = 0.0;
    let t = measure_steps(&mut fast, &plan()).unwrap();
    assert_eq!(t.passes, 50, "{t:?}");
    assert!(t.warmup_s >= 0.5);
}

#[test]
fn timestamps_between_steps_keep_a_slow_first_step_out_of_the_median_and_in_the_max() {
    let mut gpu = FakeSteps::new(true);
    gpu.warm_after = 0.0;
    gpu.launch = 0.02;
    let t = measure_steps(&mut gpu, &plan()).unwrap();
    assert!((t.per_step.median - WARM).abs() < 1e-12, "{t:?}");
    assert!((t.per_step.min - WARM).abs() < 1e-12);
    assert!((t.per_step.max - (WARM + 0.02)).abs() < 1e-12);
    // Timed by whole passes, the launch is spread over the pass's 23 steps.
    let mut gpu = FakeSteps::new(false);
    gpu.warm_after = 0.0;
    gpu.launch = 0.023;
    let t = measure_steps(&mut gpu, &plan()).unwrap();
    assert!((t.per_step.median - (WARM + 0.001)).abs() < 1e-12, "{t:?}");
}

#[test]
fn a_pass_with_the_wrong_number_of_step_times_is_an_error() {
    struct Short;
    impl StepReplayer for Short {
        fn pass(&mut self, slots: &[u32]) -> anyhow::Result<PassTimes> {
            Ok(PassTimes::PerStep(vec![0.01; slots.len() - 1]))
        }
        fn now(&self) -> f64 {
            1.0
        }
    }
    let e = measure_steps(&mut Short, &StepPlan { warmup_s: 0.0, ..plan() }).unwrap_err();
    assert!(e.to_string().contains("a pass of 23 steps gave 22 step times"), "{e}");
}

#[test]
fn spread_is_min_median_max_of_the_samples() {
    let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
    assert_eq!((s.min, s.median, s.max, s.samples), (1.0, 2.0, 3.0, 3));
    let s = Spread::of(&[4.0, 1.0, 2.0, 10.0]).unwrap();
    assert_eq!((s.min, s.median, s.max), (1.0, 3.0, 10.0));
    assert!(Spread::of(&[]).is_none());
    assert!(Spread::of(&[1.0, f64::NAN]).is_none());
    assert!(Spread::of(&[1.0, -1.0]).is_none());
}

#[test]
fn timestamps_become_seconds_between_them() {
    let s = deltas(&[100, 150, 150, 400], 0.5).unwrap();
    assert_eq!(s, vec![25.0, 0.0, 125.0]);
    assert!(deltas(&[100, 90], 1.0).unwrap_err().to_string().contains("backwards"));
    assert!(deltas(&[7], 1.0).unwrap().is_empty());
}
