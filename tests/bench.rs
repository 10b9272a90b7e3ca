//! The benchmark library at a tiny batch: a row for every op call of a training step (the
//! network's own list), each validated and timed, on the CPU and (when there is an adapter) on
//! the GPU; `lenet bench --json`; and the whole-step validation, which must catch a flipped,
//! zeroed, halved or 1%-scaled gradient.

mod common;

use lenet::backend::{Backend, Chunk, OpsBackend};
use lenet::bench::step::{check_step, StepResult};
use lenet::bench::{run, BenchConfig, Report};
use lenet::cpu::{Fast, Reference};
use lenet::data::Dataset;
use lenet::model::{param_specs, LayerKind, Params, TrainState, LENET5};
use lenet::optim::{Adam, Optimizer};

fn tiny() -> BenchConfig {
    let mut cfg = BenchConfig::new(4, 3);
    cfg.calls_per_pass = 2;
    cfg.budget_s = 0.05;
    cfg
}

/// Layer and direction of every op call of a training step, in order, then the whole step: the
/// layers of the network's table ([`LENET5`]) forward, the output layer's fused step, the others
/// backward in reverse, the update.
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

fn positive(x: Option<f64>) -> bool {
    x.is_some_and(|v| v.is_finite() && v > 0.0)
}

fn check_rows(r: &Report, gpu: bool) {
    let table = r.table();
    let got: Vec<(String, String)> = r.rows.iter().map(|x| (x.layer.clone(), x.direction.clone())).collect();
    assert_eq!(got, expected_rows(), "\n{table}");
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
    if std::env::var_os(lenet::gpu::v2::KERNELS_ENV).is_none() {
        // Unset, the adapter's kind picks the kernels: v2 on lavapipe, mixed on a GPU.
        let want = lenet::gpu::Variant::default_for(ctx.adapter_info.device_type);
        assert_eq!(r.kernels, Some(want.to_string()), "on {}", ctx.adapter_info.name);
    }
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
    assert_eq!(rows.len(), expected_rows().len());
    assert!(rows.iter().all(|r| r["validated"] == "ok"));
    assert!(stderr.contains("conv2") && stderr.contains("CPU us") && !stderr.contains("GPU us"));
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
    let mut fast = OpsBackend::with_ops(Fast::default(), "cpu", "fast".into(), &data).unwrap();
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
