//! Per-layer kernel benchmarks, shared by `lenet bench` and `cargo bench --bench layers`.
//!
//! For every layer and direction of a training step at one batch size: validate the GPU kernel
//! against the fast CPU op on the same random inputs (via the [`crate::gpu::ops`] wrappers), then
//! time the dispatch the GPU trainer really records (resident buffers, N back-to-back launches in
//! one compute pass, timestamp queries where offered), and time the CPU op beside it. Rates are
//! GFLOP/s (2 FLOPs per multiply-accumulate) for convolutions and linear layers, GB/s (bytes
//! read + written, counted once) for the memory-bound ops.

use std::time::Instant;

use anyhow::Context as _;
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use wgpu::util::DeviceExt;

use crate::cpu::backend::{cpu_description, CpuBackend};
use crate::cpu::fast;
use crate::cpu::network::{forward, Activations};
use crate::data::Dataset;
use crate::gpu::kernels::{Builder, Dispatch, View};
use crate::gpu::timing::{median, time_calls, PassTimer, TimingMethod};
use crate::gpu::trainer::STEP_DISPATCHES;
use crate::gpu::{ops as gops, GpuBackend, GpuContext};
use crate::model::*;
use crate::train::Backend;

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
}

impl BenchConfig {
    pub fn new(batch: usize, iters: usize) -> Self {
        BenchConfig { batch, iters, calls_per_pass: 10, budget_s: 1.0, cpu: true, seed: 1 }
    }
}

/// The unit of a row's rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Unit {
    #[serde(rename = "GFLOP/s")]
    GflopPerS,
    #[serde(rename = "GB/s")]
    GbPerS,
}

/// One layer and direction.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    pub layer: String,
    pub direction: String,
    /// The GPU dispatch timed (a name from the trainer's step), or "" when none.
    pub gpu_kernel: String,
    pub unit: Unit,
    /// FLOPs or bytes of one call.
    pub work: f64,
    pub gpu_us: Option<f64>,
    pub gpu_rate: Option<f64>,
    pub gpu_calls: usize,
    pub cpu_us: Option<f64>,
    pub cpu_rate: Option<f64>,
    pub cpu_calls: usize,
    /// "ok", "n/a" (nothing to compare) or "FAILED: why".
    pub validated: String,
    pub note: String,
}

impl Row {
    pub fn failed(&self) -> bool {
        self.validated.starts_with("FAILED")
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    /// The GPU adapter, or None for a CPU-only run.
    pub adapter: Option<String>,
    pub cpu: String,
    /// "timestamps", "wall_clock", or "cpu_only".
    pub timing: String,
    pub batch: usize,
    pub iters: usize,
    /// Seconds of wall time after which a row stopped taking samples.
    pub budget_s: f64,
    pub date: String,
    pub rows: Vec<Row>,
}

impl Report {
    pub fn any_failed(&self) -> bool {
        self.rows.iter().any(Row::failed)
    }

    pub fn header(&self) -> String {
        let gpu = match &self.adapter {
            Some(a) => format!("GPU {a}, timing: {}", self.timing_words()),
            None => "no GPU (CPU only)".into(),
        };
        format!(
            "lenet bench, {}, batch {}, median per call of up to {} samples per row (a row stops after ~{} s), \
             rates: 2 FLOPs per MAC or bytes read+written\n{gpu}\nCPU: {} (wall clock, one call per sample)",
            self.date, self.batch, self.iters, self.budget_s, self.cpu
        )
    }

    fn timing_words(&self) -> String {
        match self.timing.as_str() {
            "timestamps" => TimingMethod::Timestamps.to_string(),
            "wall_clock" => TimingMethod::WallClock.to_string(),
            t => t.to_string(),
        }
    }

    /// An aligned text table, header first.
    pub fn table(&self) -> String {
        let f = |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |x| format!("{x:.prec$}"));
        let mut lines = vec![vec![
            "layer".to_string(),
            "direction".into(),
            "GPU us".into(),
            "GPU rate".into(),
            "CPU us".into(),
            "CPU rate".into(),
            "unit".into(),
            "validated".into(),
            "kernel / note".into(),
        ]];
        for r in &self.rows {
            let unit = match r.unit {
                Unit::GflopPerS => "GFLOP/s",
                Unit::GbPerS => "GB/s",
            };
            let mut note = r.gpu_kernel.clone();
            if !r.note.is_empty() {
                if !note.is_empty() {
                    note.push_str("; ");
                }
                note.push_str(&r.note);
            }
            lines.push(vec![
                r.layer.clone(),
                r.direction.clone(),
                f(r.gpu_us, 1),
                f(r.gpu_rate, 2),
                f(r.cpu_us, 1),
                f(r.cpu_rate, 2),
                unit.into(),
                r.validated.clone(),
                note,
            ]);
        }
        // A CPU-only run shows CPU figures only.
        let numeric: &[usize] = if self.adapter.is_some() { &[2, 3, 4, 5] } else { &[2, 3] };
        if self.adapter.is_none() {
            for l in &mut lines {
                l.drain(2..4);
            }
        }
        let cols = lines[0].len();
        let width: Vec<usize> =
            (0..cols).map(|c| lines.iter().map(|l| l[c].chars().count()).max().unwrap_or(0)).collect();
        let mut out = self.header();
        out.push('\n');
        for (i, l) in lines.iter().enumerate() {
            let mut s = String::new();
            for c in 0..cols {
                let w = width[c];
                // Text left, numbers right.
                if numeric.contains(&c) {
                    s.push_str(&format!("{:>w$}  ", l[c]));
                } else if c + 1 == cols {
                    s.push_str(&l[c]);
                } else {
                    s.push_str(&format!("{:<w$}  ", l[c]));
                }
            }
            out.push_str(s.trim_end());
            out.push('\n');
            if i == 0 {
                out.push_str(&"-".repeat(width.iter().sum::<usize>() + 2 * cols));
                out.push('\n');
            }
        }
        out
    }
}

/// Today's date (UTC) as YYYY-MM-DD, from the system clock.
pub fn today_utc() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    // Howard Hinnant's civil_from_days.
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Median wall time of one call of `f`, after one warm-up call.
fn time_cpu(cfg: &BenchConfig, f: &mut dyn FnMut()) -> (f64, usize) {
    f();
    let mut s = Vec::new();
    let start = Instant::now();
    while s.len() < cfg.iters.max(1) {
        let t = Instant::now();
        f();
        s.push(t.elapsed().as_secs_f64());
        if s.len() >= 3 && start.elapsed().as_secs_f64() > cfg.budget_s {
            break;
        }
    }
    let n = s.len();
    (median(&mut s), n)
}

fn uniform(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| lo + (hi - lo) * ((rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32)).collect()
}

fn max_abs(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// Every element written (no NaN poison left) and |gpu - cpu| <= 1e-5 + 1e-4|cpu| + `allowance`,
/// where `allowance` covers the rounding of a reduction in another order.
fn compare(what: &str, gpu: &[f32], cpu: &[f32], allowance: f32) -> Result<(), String> {
    if gpu.len() != cpu.len() {
        return Err(format!("{what}: length {} vs {}", gpu.len(), cpu.len()));
    }
    for (i, (&g, &c)) in gpu.iter().zip(cpu).enumerate() {
        if g.is_nan() && !c.is_nan() {
            return Err(format!("{what}[{i}] not written"));
        }
        let tol = 1e-5 + 1e-4 * c.abs() + allowance;
        if (g - c).abs() > tol {
            return Err(format!("{what}[{i}]: gpu {g} cpu {c} |diff| {:.3e} > {tol:.3e}", (g - c).abs()));
        }
    }
    Ok(())
}

/// Rounding allowance for outputs that each sum `n` products of terms bounded by `a` and `b`:
/// the error of a sum grows like eps * sqrt(n * sum of squares) <= eps * n * a * b.
fn reduction(n: usize, a: &[f32], b: &[f32]) -> f32 {
    f32::EPSILON * n as f32 * max_abs(a) * max_abs(b)
}

fn nan(n: usize) -> Vec<f32> {
    vec![f32::NAN; n]
}

/// Random inputs at the benchmarked batch: activations from a real CPU forward pass on random
/// pixels (so ReLU masks and max-pool argmaxes are consistent), random upstream gradients.
struct Inputs {
    b: usize,
    params: Params,
    pixels: Vec<u8>,
    labels: Vec<u32>,
    acts: Activations,
    dlogits: Vec<f32>,
    dfc2: Vec<f32>,
    dfc1: Vec<f32>,
    dpool2: Vec<f32>,
    dconv2: Vec<f32>,
    dpool1: Vec<f32>,
    dconv1: Vec<f32>,
    adam_grad: Vec<f32>,
    adam_m: Vec<f32>,
    adam_v: Vec<f32>,
}

impl Inputs {
    fn new(b: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let params = Params::init(seed);
        let pixels: Vec<u8> = (0..b * IMAGE_PIXELS).map(|_| rng.next_u32() as u8).collect();
        let labels: Vec<u32> = (0..b).map(|_| rng.next_u32() % CLASSES as u32).collect();
        let mut acts = Activations::new(b);
        acts.set_input(&pixels);
        forward(&params, &mut acts);
        let mut g = |n: usize| uniform(&mut rng, n, -1.0, 1.0);
        let (c1, c2) = (conv1_shape(b), conv2_shape(b));
        let n = param_count();
        let mut r = Inputs {
            b,
            dlogits: g(b * CLASSES),
            dfc2: g(b * FC2_OUT),
            dfc1: g(b * FC1_OUT),
            dpool2: g(b * FC1_IN),
            dconv2: g(c2.output_len()),
            dpool1: g(c2.input_len()),
            dconv1: g(c1.output_len()),
            adam_grad: g(n),
            adam_m: g(n),
            adam_v: vec![],
            params,
            pixels,
            labels,
            acts,
        };
        r.adam_v = uniform(&mut rng, n, 0.0, 1.0);
        r
    }
}

type Check = Box<dyn Fn(&GpuContext) -> Result<(), String>>;

/// One row before it runs.
struct Spec {
    layer: &'static str,
    direction: &'static str,
    /// Prefix of the trainer's dispatch name ([`STEP_DISPATCHES`]); None: a standalone kernel.
    step_kernel: Option<&'static str>,
    unit: Unit,
    work: f64,
    cpu: Option<Box<dyn FnMut()>>,
    check: Option<Check>,
    note: &'static str,
}

fn specs(inp: &std::sync::Arc<Inputs>) -> Vec<Spec> {
    let b = inp.b;
    let (c1, c2) = (conv1_shape(b), conv2_shape(b));
    let mut v = Vec::new();
    let flops = |macs: usize| 2.0 * macs as f64;
    let bytes = |n: usize| n as f64;

    // gather: u8 pixels (packed) + index + label in, f32 pixels + u32 label out.
    {
        let i = inp.clone();
        let idx: Vec<u32> = (0..b as u32).collect();
        let mut acts = Activations::new(b);
        let mut px = Vec::with_capacity(b * IMAGE_PIXELS);
        let cpu = move || {
            px.clear();
            for &j in &idx {
                px.extend_from_slice(&i.pixels[j as usize * IMAGE_PIXELS..][..IMAGE_PIXELS]);
            }
            acts.set_input(&px);
        };
        let i = inp.clone();
        let check: Check = Box::new(move |ctx| {
            let labels_u8: Vec<u8> = i.labels.iter().map(|&l| l as u8).collect();
            let idx: Vec<u32> = (0..i.b as u32).rev().collect();
            let mut x = nan(i.b * IMAGE_PIXELS);
            let mut l = vec![u32::MAX; i.b];
            gops::gather_batch(ctx, &mut x, &mut l, &i.pixels, &labels_u8, IMAGE_PIXELS, &idx)
                .map_err(|e| format!("{e:#}"))?;
            let mut want = Vec::new();
            for &j in &idx {
                want.extend(
                    i.pixels[j as usize * IMAGE_PIXELS..][..IMAGE_PIXELS].iter().map(|&p| p as f32 / 255.0),
                );
            }
            compare("input", &x, &want, 0.0)?;
            let want_l: Vec<u32> = idx.iter().map(|&j| i.labels[j as usize]).collect();
            if l != want_l {
                return Err("labels differ".into());
            }
            Ok(())
        });
        v.push(Spec {
            layer: "input",
            direction: "gather",
            step_kernel: Some("gather"),
            unit: Unit::GbPerS,
            work: bytes(b * (IMAGE_PIXELS + 4 + 4) + b * (IMAGE_PIXELS * 4 + 4)),
            cpu: Some(Box::new(cpu)),
            check: Some(check),
            note: "",
        });
    }

    // Convolutions forward (bias and ReLU fused, as the trainer runs them).
    for (layer, s, w, bias, kern) in [
        ("conv1", c1, ParamId::Conv1Weight, ParamId::Conv1Bias, "conv1_forward"),
        ("conv2", c2, ParamId::Conv2Weight, ParamId::Conv2Bias, "conv2_forward"),
    ] {
        let (i1, i2) = (inp.clone(), inp.clone());
        let xs: fn(&Inputs) -> &Vec<f32> =
            if layer == "conv1" { |i: &Inputs| &i.acts.input } else { |i: &Inputs| &i.acts.pool1 };
        let mut out = vec![0.0; s.output_len()];
        let cpu =
            move || fast::conv2d_relu_forward(&mut out, xs(&i1), i1.params.get(w), i1.params.get(bias), s);
        let check: Check = Box::new(move |ctx| {
            let (x, wt, bs) = (xs(&i2), i2.params.get(w), i2.params.get(bias));
            let mut want = vec![0.0; s.output_len()];
            fast::conv2d_relu_forward(&mut want, x, wt, bs, s);
            let mut got = nan(s.output_len());
            gops::conv2d_bias_relu_forward(ctx, &mut got, x, wt, bs, s).map_err(|e| format!("{e:#}"))?;
            compare("out", &got, &want, reduction(s.in_channels * 25, x, wt) + max_abs(bs) * 1e-6)
        });
        v.push(Spec {
            layer,
            direction: "forward",
            step_kernel: Some(kern),
            unit: Unit::GflopPerS,
            work: flops(s.macs()),
            cpu: Some(Box::new(cpu)),
            check: Some(check),
            note: "bias+ReLU fused",
        });
        // Max-pool forward after each conv.
        let pool = if layer == "conv1" { "pool1" } else { "pool2" };
        let (ch, side) = (s.out_channels, s.out_height());
        let ys: fn(&Inputs) -> &Vec<f32> =
            if layer == "conv1" { |i: &Inputs| &i.acts.conv1 } else { |i: &Inputs| &i.acts.conv2 };
        let (i1, i2) = (inp.clone(), inp.clone());
        let n_out = b * ch * side * side / 4;
        let (mut o, mut a) = (vec![0.0; n_out], vec![0u32; n_out]);
        let cpu = move || fast::maxpool2x2_forward(&mut o, &mut a, ys(&i1), b, ch, side, side);
        let check: Check = Box::new(move |ctx| {
            let x = ys(&i2);
            let (mut wo, mut wa) = (vec![0.0; n_out], vec![0u32; n_out]);
            fast::maxpool2x2_forward(&mut wo, &mut wa, x, b, ch, side, side);
            let (mut go, mut ga) = (nan(n_out), vec![u32::MAX; n_out]);
            gops::maxpool2x2_forward(ctx, &mut go, &mut ga, x, b, ch, side, side)
                .map_err(|e| format!("{e:#}"))?;
            compare("out", &go, &wo, 0.0)?;
            match ga.iter().zip(&wa).position(|(g, w)| g != w) {
                Some(k) => Err(format!("argmax[{k}]: gpu {} cpu {}", ga[k], wa[k])),
                None => Ok(()),
            }
        });
        v.push(Spec {
            layer: pool,
            direction: "forward",
            step_kernel: Some(if layer == "conv1" { "pool1_forward" } else { "pool2_forward" }),
            unit: Unit::GbPerS,
            work: bytes(4 * (4 * n_out) + 8 * n_out),
            cpu: Some(Box::new(cpu)),
            check: Some(check),
            note: "with argmax",
        });
    }

    // Linear layers forward.
    type Pick = fn(&Inputs) -> &Vec<f32>;
    let fcs: [(&str, Pick, usize, usize, ParamId, ParamId, bool); 3] = [
        ("fc1", |i| &i.acts.pool2, FC1_IN, FC1_OUT, ParamId::Fc1Weight, ParamId::Fc1Bias, true),
        ("fc2", |i| &i.acts.fc1, FC1_OUT, FC2_OUT, ParamId::Fc2Weight, ParamId::Fc2Bias, true),
        ("fc3", |i| &i.acts.fc2, FC2_OUT, FC3_OUT, ParamId::Fc3Weight, ParamId::Fc3Bias, false),
    ];
    for &(layer, xs, fin, fout, w, bias, relu) in &fcs {
        let (i1, i2) = (inp.clone(), inp.clone());
        let mut out = vec![0.0; b * fout];
        let cpu = move || {
            let (x, wt, bs) = (xs(&i1), i1.params.get(w), i1.params.get(bias));
            if relu {
                fast::linear_relu_forward(&mut out, x, wt, bs, b, fin, fout)
            } else {
                fast::linear_forward(&mut out, x, wt, bs, b, fin, fout)
            }
        };
        let check: Check = Box::new(move |ctx| {
            let (x, wt, bs) = (xs(&i2), i2.params.get(w), i2.params.get(bias));
            let mut want = vec![0.0; b * fout];
            let mut got = nan(b * fout);
            if relu {
                fast::linear_relu_forward(&mut want, x, wt, bs, b, fin, fout);
                gops::linear_relu_forward(ctx, &mut got, x, wt, bs, b, fin, fout)
            } else {
                fast::linear_forward(&mut want, x, wt, bs, b, fin, fout);
                gops::linear_forward(ctx, &mut got, x, wt, bs, b, fin, fout)
            }
            .map_err(|e| format!("{e:#}"))?;
            compare("out", &got, &want, reduction(fin, x, wt))
        });
        v.push(Spec {
            layer,
            direction: "forward",
            step_kernel: Some(match layer {
                "fc1" => "fc1_forward",
                "fc2" => "fc2_forward",
                _ => "fc3_forward",
            }),
            unit: Unit::GflopPerS,
            work: flops(b * fin * fout),
            cpu: Some(Box::new(cpu)),
            check: Some(check),
            note: if relu { "bias+ReLU fused" } else { "bias" },
        });
    }

    // ReLU alone (the trainer fuses it; timed here as a standalone kernel on conv1's output).
    {
        let n = c1.output_len();
        let i1 = inp.clone();
        let mut out = vec![0.0; n];
        let cpu = move || fast::relu_forward(&mut out, &i1.dconv1);
        let i2 = inp.clone();
        let check: Check = Box::new(move |ctx| {
            let mut want = vec![0.0; n];
            fast::relu_forward(&mut want, &i2.dconv1);
            let mut got = nan(n);
            gops::relu_forward(ctx, &mut got, &i2.dconv1).map_err(|e| format!("{e:#}"))?;
            compare("out", &got, &want, 0.0)
        });
        v.push(Spec {
            layer: "relu1",
            direction: "forward",
            step_kernel: None,
            unit: Unit::GbPerS,
            work: bytes(8 * n),
            cpu: Some(Box::new(cpu)),
            check: Some(check),
            note: "standalone kernel (fused into conv/linear in the step)",
        });
        let (i1, i2) = (inp.clone(), inp.clone());
        let mut dx = vec![0.0; n];
        let cpu = move || fast::relu_backward(&mut dx, &i1.dconv1, &i1.acts.conv1);
        let check: Check = Box::new(move |ctx| {
            let mut want = vec![0.0; n];
            fast::relu_backward(&mut want, &i2.dconv1, &i2.acts.conv1);
            let mut got = nan(n);
            gops::relu_backward(ctx, &mut got, &i2.dconv1, &i2.acts.conv1).map_err(|e| format!("{e:#}"))?;
            compare("dinp", &got, &want, 0.0)
        });
        v.push(Spec {
            layer: "relu1",
            direction: "backward",
            step_kernel: None,
            unit: Unit::GbPerS,
            work: bytes(12 * n),
            cpu: Some(Box::new(cpu)),
            check: Some(check),
            note: "standalone kernel (fused into pool/linear backward in the step)",
        });
    }

    // Softmax cross-entropy (loss and dlogits in one kernel).
    {
        let (i1, i2) = (inp.clone(), inp.clone());
        let mut dz = vec![0.0; b * CLASSES];
        let cpu = move || {
            fast::softmax_xent_forward_backward(&mut dz, &i1.acts.logits, &i1.labels, b, CLASSES);
        };
        let check: Check = Box::new(move |ctx| {
            let mut want = vec![0.0; b * CLASSES];
            let w = fast::softmax_xent_forward_backward(&mut want, &i2.acts.logits, &i2.labels, b, CLASSES);
            let mut got = nan(b * CLASSES);
            let g =
                gops::softmax_xent_forward_backward(ctx, &mut got, &i2.acts.logits, &i2.labels, b, CLASSES)
                    .map_err(|e| format!("{e:#}"))?;
            compare("dlogits", &got, &want, 0.0)?;
            compare("loss", &[g.loss], &[w.loss], f32::EPSILON * b as f32 * (w.loss.abs() + 1.0))?;
            if g.correct != w.correct {
                return Err(format!("correct: gpu {} cpu {}", g.correct, w.correct));
            }
            Ok(())
        });
        v.push(Spec {
            layer: "loss",
            direction: "softmax_xent",
            step_kernel: Some("softmax_xent"),
            unit: Unit::GbPerS,
            work: bytes(b * (CLASSES * 8 + 4) + 8),
            cpu: Some(Box::new(cpu)),
            check: Some(check),
            note: "forward+backward",
        });
    }

    // Linear layers backward, from fc3 down.
    let dys: [Pick; 3] = [|i| &i.dfc1, |i| &i.dfc2, |i| &i.dlogits];
    for (k, &(layer, xs, fin, fout, w, _bias, _)) in fcs.iter().enumerate().rev() {
        let dy = dys[k];
        // Weight gradient (and bias).
        let (i1, i2) = (inp.clone(), inp.clone());
        let (mut dw, mut db) = (vec![0.0; fin * fout], vec![0.0; fout]);
        let cpu = move || fast::linear_backward_weight(&mut dw, &mut db, dy(&i1), xs(&i1), b, fin, fout);
        let check: Check = Box::new(move |ctx| {
            let (g, x) = (dy(&i2), xs(&i2));
            let (mut wdw, mut wdb) = (vec![0.0; fin * fout], vec![0.0; fout]);
            fast::linear_backward_weight(&mut wdw, &mut wdb, g, x, b, fin, fout);
            let (mut gdw, mut gdb) = (nan(fin * fout), nan(fout));
            gops::linear_backward_weight(ctx, &mut gdw, &mut gdb, g, x, b, fin, fout)
                .map_err(|e| format!("{e:#}"))?;
            compare("dweight", &gdw, &wdw, reduction(b, g, x))?;
            compare("dbias", &gdb, &wdb, reduction(b, g, &[1.0]))
        });
        v.push(Spec {
            layer,
            direction: "backward-weight",
            step_kernel: Some(["fc1_backward_weight", "fc2_backward_weight", "fc3_backward_weight"][k]),
            unit: Unit::GflopPerS,
            work: flops(b * fin * fout),
            cpu: Some(Box::new(cpu)),
            check: Some(check),
            note: "and bias",
        });
        // Input gradient; through the previous layer's ReLU except for fc1 (into pool2).
        let prev_relu = k > 0;
        let (i1, i2) = (inp.clone(), inp.clone());
        let mut dx = vec![0.0; b * fin];
        let cpu = move || {
            fast::linear_backward_input(&mut dx, dy(&i1), i1.params.get(w), b, fin, fout);
            if prev_relu {
                fast::relu_backward_in_place(&mut dx, xs(&i1));
            }
        };
        let check: Check = Box::new(move |ctx| {
            let (g, wt, x) = (dy(&i2), i2.params.get(w), xs(&i2));
            let mut want = vec![0.0; b * fin];
            fast::linear_backward_input(&mut want, g, wt, b, fin, fout);
            let mut got = nan(b * fin);
            if prev_relu {
                fast::relu_backward_in_place(&mut want, x);
                gops::linear_relu_backward_input(ctx, &mut got, g, wt, x, b, fin, fout)
            } else {
                gops::linear_backward_input(ctx, &mut got, g, wt, b, fin, fout)
            }
            .map_err(|e| format!("{e:#}"))?;
            compare("dinp", &got, &want, reduction(fout, g, wt))
        });
        v.push(Spec {
            layer,
            direction: "backward-input",
            step_kernel: Some(["fc1_backward_input", "fc2_backward_input", "fc3_backward_input"][k]),
            unit: Unit::GflopPerS,
            work: flops(b * fin * fout),
            cpu: Some(Box::new(cpu)),
            check: Some(check),
            note: if prev_relu { "ReLU backward fused" } else { "" },
        });
    }

    // Convolutions backward, conv2 then conv1, each after its max-pool's backward.
    struct ConvBack {
        conv: &'static str,
        pool: &'static str,
        s: ConvShape,
        dpooled: Pick,
        pooled: Pick,
        argmax: fn(&Inputs) -> &Vec<u32>,
        conv_out: Pick,
        dconv: Pick,
        x: Pick,
        w: ParamId,
    }
    let backs = [
        ConvBack {
            conv: "conv2",
            pool: "pool2",
            s: c2,
            dpooled: |i| &i.dpool2,
            pooled: |i| &i.acts.pool2,
            argmax: |i| &i.acts.pool2_argmax,
            conv_out: |i| &i.acts.conv2,
            dconv: |i| &i.dconv2,
            x: |i| &i.acts.pool1,
            w: ParamId::Conv2Weight,
        },
        ConvBack {
            conv: "conv1",
            pool: "pool1",
            s: c1,
            dpooled: |i| &i.dpool1,
            pooled: |i| &i.acts.pool1,
            argmax: |i| &i.acts.pool1_argmax,
            conv_out: |i| &i.acts.conv1,
            dconv: |i| &i.dconv1,
            x: |i| &i.acts.input,
            w: ParamId::Conv1Weight,
        },
    ];
    for cb in backs {
        let ConvBack { conv, pool, s, dpooled, pooled, argmax, conv_out, dconv, x, w } = cb;
        let (ch, side) = (s.out_channels, s.out_height());
        let n_in = s.output_len();
        let (i1, i2) = (inp.clone(), inp.clone());
        let mut dx = vec![0.0; n_in];
        let cpu = move || {
            fast::maxpool2x2_relu_backward(&mut dx, dpooled(&i1), argmax(&i1), pooled(&i1), b, ch, side, side)
        };
        let check: Check = Box::new(move |ctx| {
            let mut want = vec![0.0; n_in];
            fast::maxpool2x2_relu_backward(
                &mut want,
                dpooled(&i2),
                argmax(&i2),
                pooled(&i2),
                b,
                ch,
                side,
                side,
            );
            let mut got = nan(n_in);
            gops::maxpool2x2_relu_backward(
                ctx,
                &mut got,
                dpooled(&i2),
                argmax(&i2),
                conv_out(&i2),
                b,
                ch,
                side,
                side,
            )
            .map_err(|e| format!("{e:#}"))?;
            compare("dinp", &got, &want, 0.0)
        });
        v.push(Spec {
            layer: pool,
            direction: "backward",
            step_kernel: Some(if pool == "pool2" { "pool2_backward" } else { "pool1_backward" }),
            unit: Unit::GbPerS,
            work: bytes(8 * (n_in / 4) + 4 * n_in + 4 * n_in),
            cpu: Some(Box::new(cpu)),
            check: Some(check),
            note: "ReLU backward fused; bytes: dout+argmax+ReLU output+dinp",
        });
        let (i1, i2) = (inp.clone(), inp.clone());
        let (mut dw, mut db) = (vec![0.0; s.weight_len()], vec![0.0; s.out_channels]);
        let cpu = move || fast::conv2d_backward_weight(&mut dw, &mut db, dconv(&i1), x(&i1), s);
        let check: Check = Box::new(move |ctx| {
            let (g, xi) = (dconv(&i2), x(&i2));
            let (mut wdw, mut wdb) = (vec![0.0; s.weight_len()], vec![0.0; s.out_channels]);
            fast::conv2d_backward_weight(&mut wdw, &mut wdb, g, xi, s);
            let (mut gdw, mut gdb) = (nan(s.weight_len()), nan(s.out_channels));
            gops::conv2d_backward_weight(ctx, &mut gdw, &mut gdb, g, xi, s).map_err(|e| format!("{e:#}"))?;
            let per = s.batch * s.out_height() * s.out_width();
            compare("dweight", &gdw, &wdw, reduction(per, g, xi))?;
            compare("dbias", &gdb, &wdb, reduction(per, g, &[1.0]))
        });
        v.push(Spec {
            layer: conv,
            direction: "backward-weight",
            step_kernel: Some(if conv == "conv2" {
                "conv2_backward_weight"
            } else {
                "conv1_backward_weight"
            }),
            unit: Unit::GflopPerS,
            work: flops(s.macs()),
            cpu: Some(Box::new(cpu)),
            check: Some(check),
            note: "and bias",
        });
        if conv == "conv2" {
            let (i1, i2) = (inp.clone(), inp.clone());
            let mut dx = vec![0.0; s.input_len()];
            let cpu = move || fast::conv2d_backward_input(&mut dx, dconv(&i1), i1.params.get(w), s);
            let check: Check = Box::new(move |ctx| {
                let (g, wt) = (dconv(&i2), i2.params.get(w));
                let mut want = vec![0.0; s.input_len()];
                fast::conv2d_backward_input(&mut want, g, wt, s);
                let mut got = nan(s.input_len());
                gops::conv2d_backward_input(ctx, &mut got, g, wt, s).map_err(|e| format!("{e:#}"))?;
                compare("dinp", &got, &want, reduction(s.out_channels * 25, g, wt))
            });
            v.push(Spec {
                layer: conv,
                direction: "backward-input",
                step_kernel: Some("conv2_backward_input"),
                unit: Unit::GflopPerS,
                work: flops(s.macs()),
                cpu: Some(Box::new(cpu)),
                check: Some(check),
                note: "",
            });
        } else {
            v.push(Spec {
                layer: conv,
                direction: "backward-input",
                step_kernel: None,
                unit: Unit::GflopPerS,
                work: flops(s.macs()),
                cpu: None,
                check: None,
                note: "not run in training: conv1's input is the image, no gradient needed",
            });
        }
    }

    // Adam over every parameter.
    {
        let n = param_count();
        let cfg = AdamConfig::default();
        let i1 = inp.clone();
        let (mut p, mut m, mut vv) = (i1.params.flatten(), i1.adam_m.clone(), i1.adam_v.clone());
        let cpu = move || fast::adam_update(&mut p, &i1.adam_grad, &mut m, &mut vv, &cfg, cfg.step(3));
        let i2 = inp.clone();
        let check: Check = Box::new(move |ctx| {
            let (mut wp, mut wm, mut wv) = (i2.params.flatten(), i2.adam_m.clone(), i2.adam_v.clone());
            let (mut gp, mut gm, mut gv) = (wp.clone(), wm.clone(), wv.clone());
            fast::adam_update(&mut wp, &i2.adam_grad, &mut wm, &mut wv, &cfg, cfg.step(3));
            gops::adam_update(ctx, &mut gp, &i2.adam_grad, &mut gm, &mut gv, &cfg, cfg.step(3))
                .map_err(|e| format!("{e:#}"))?;
            compare("param", &gp, &wp, 0.0)?;
            compare("m", &gm, &wm, 0.0)?;
            compare("v", &gv, &wv, 0.0)
        });
        v.push(Spec {
            layer: "adam",
            direction: "update",
            step_kernel: Some("adam"),
            unit: Unit::GbPerS,
            work: bytes(n * 4 * 7),
            cpu: Some(Box::new(cpu)),
            check: Some(check),
            note: "reads param,grad,m,v; writes param,m,v",
        });
    }
    v
}

/// FLOPs of one training step (convolutions and linear layers; the rest is memory traffic).
pub fn step_flops(batch: usize) -> f64 {
    let (c1, c2) = (conv1_shape(batch), conv2_shape(batch));
    let fc = batch * (FC1_IN * FC1_OUT + FC1_OUT * FC2_OUT + FC2_OUT * FC3_OUT);
    // forward + weight gradient for all; input gradient for all but conv1.
    2.0 * (2 * c1.macs() + 3 * c2.macs() + 3 * fc) as f64
}

/// A data set of `n` random images and labels.
fn random_dataset(n: usize, inp: &Inputs) -> Dataset {
    Dataset {
        images: inp.pixels[..n * IMAGE_PIXELS].to_vec(),
        labels: inp.labels[..n].iter().map(|&l| l as u8).collect(),
        rows: IMAGE_SIDE,
        cols: IMAGE_SIDE,
    }
}

/// Standalone kernels for rows the step does not run as a dispatch of their own (ReLU, and
/// max-pooling, which the trainer fuses into the convolutions): resident buffers built here.
fn standalone_dispatch(ctx: &GpuContext, spec: &Spec, inp: &Inputs) -> Option<Dispatch> {
    let b = Builder {
        device: &ctx.device,
        kernels: &ctx.kernels,
        max_dim: ctx.limits.max_compute_workgroups_per_dimension,
    };
    let buf = |label: &str, data: &[u8]| {
        View::whole(&ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: data,
            usage: wgpu::BufferUsages::STORAGE,
        }))
    };
    let f32s = |label: &str, data: &[f32]| buf(label, bytemuck::cast_slice(data));
    let zeros = |label: &str, n: usize| f32s(label, &vec![0.0; n]);
    let n = inp.dconv1.len();
    let a = &inp.acts;
    // (conv output, pooled output, pooled argmax, pooled gradient, channels, side) of each pool.
    let pool = |layer| match layer {
        "pool1" => Some((&a.conv1, &a.pool1, &a.pool1_argmax, &inp.dpool1, CONV1_CHANNELS, CONV1_SIDE)),
        "pool2" => Some((&a.conv2, &a.pool2, &a.pool2_argmax, &inp.dpool2, CONV2_CHANNELS, CONV2_SIDE)),
        _ => None,
    };
    match (spec.layer, spec.direction) {
        ("relu1", "forward") => {
            Some(b.relu_forward(&zeros("relu1_out", n), &f32s("relu1_inp", &inp.dconv1), n))
        }
        ("relu1", "backward") => Some(b.relu_backward(
            &zeros("relu1_dinp", n),
            &f32s("relu1_dout", &inp.dconv1),
            &f32s("relu1_out", &inp.acts.conv1),
            n,
        )),
        (layer, "forward") => {
            let (conv, pooled, _, _, ch, side) = pool(layer)?;
            let argmax = buf("pool_argmax", bytemuck::cast_slice(&vec![0u32; pooled.len()]));
            Some(b.pool_forward(
                &zeros("pool_out", pooled.len()),
                &argmax,
                &f32s("pool_inp", conv),
                inp.b * ch,
                side,
                side,
            ))
        }
        (layer, "backward") => {
            let (conv, _, argmax, dpooled, ch, side) = pool(layer)?;
            Some(b.pool_backward(
                &zeros("pool_dinp", conv.len()),
                &f32s("pool_dout", dpooled),
                &buf("pool_argmax", bytemuck::cast_slice(argmax)),
                Some(&f32s("pool_relu_out", conv)),
                inp.b * ch,
                side,
                side,
            ))
        }
        _ => None,
    }
}

fn rate(work: f64, seconds: f64) -> f64 {
    work / seconds * 1e-9
}

/// Runs every row: validation on the GPU (if `gpu` is given), GPU timing, CPU timing, and the
/// whole training step. Errors only for set-up failures; a failed validation is in its row.
pub fn run(cfg: &BenchConfig, gpu: Option<&GpuContext>) -> anyhow::Result<Report> {
    anyhow::ensure!(cfg.batch > 0 && cfg.iters > 0, "batch and iterations must be at least 1");
    let b = cfg.batch;
    let inp = std::sync::Arc::new(Inputs::new(b, cfg.seed));
    let adam = AdamConfig::default();
    let idx: Vec<u32> = (0..b as u32).collect();
    let state = TrainState::new(inp.params.clone(), cfg.seed, b, false);

    // The GPU trainer, after one real training step at this batch: its recorded dispatches.
    let mut timer = None;
    let mut gpu_backend = None;
    let mut gpu_step_loss = None;
    if let Some(ctx) = gpu {
        let mut be = GpuBackend::new(ctx.clone(), &random_dataset(b, &inp)).context("GPU trainer")?;
        be.load_state(&state)?;
        gpu_step_loss = Some(be.train_steps(&idx, b, 1, &adam).context("GPU training step")?[0].loss);
        let mut after = state.clone();
        be.store_state(&mut after)?;
        timer = Some(PassTimer::new(ctx, true));
        gpu_backend = Some((be, after));
    }
    let step_program = gpu_backend.as_ref().and_then(|(be, _)| be.step_dispatches());
    let names: &[&str] = &STEP_DISPATCHES;
    let mut used = vec![false; names.len()];

    let mut rows = Vec::new();
    for mut spec in specs(&inp) {
        let mut row = Row {
            layer: spec.layer.into(),
            direction: spec.direction.into(),
            gpu_kernel: String::new(),
            unit: spec.unit,
            work: spec.work,
            gpu_us: None,
            gpu_rate: None,
            gpu_calls: 0,
            cpu_us: None,
            cpu_rate: None,
            cpu_calls: 0,
            validated: "n/a".into(),
            note: spec.note.into(),
        };
        if let (Some(ctx), Some(timer)) = (gpu, timer.as_ref()) {
            if let Some(check) = &spec.check {
                row.validated = match check(ctx) {
                    Ok(()) => "ok".into(),
                    Err(e) => format!("FAILED: {e}"),
                };
            }
            // Time only what validated.
            let timed = if row.failed() {
                None
            } else if let Some(prefix) = spec.step_kernel {
                let found = names.iter().position(|n| n.starts_with(prefix));
                match (found, step_program) {
                    (Some(k), Some((ds, group))) if k < ds.len() => {
                        used[k] = true;
                        row.gpu_kernel = names[k].into();
                        let d = &ds[k];
                        Some(time_calls(
                            timer,
                            &|p| d.record(p, Some((group, 0))),
                            cfg.calls_per_pass,
                            cfg.iters,
                            cfg.budget_s,
                        )?)
                    }
                    _ => match standalone_dispatch(ctx, &spec, &inp) {
                        // Fused away in the step: time the standalone kernel the ops use.
                        Some(d) => {
                            row.gpu_kernel = d.name.into();
                            row.note =
                                format!("{}; standalone kernel (fused into the conv in the step)", row.note);
                            Some(time_calls(
                                timer,
                                &|p| d.record(p, None),
                                cfg.calls_per_pass,
                                cfg.iters,
                                cfg.budget_s,
                            )?)
                        }
                        None => {
                            row.note = format!("{}; no separate dispatch in the trainer's step", row.note);
                            None
                        }
                    },
                }
            } else if let Some(d) = standalone_dispatch(ctx, &spec, &inp) {
                row.gpu_kernel = d.name.into();
                Some(time_calls(timer, &|p| d.record(p, None), cfg.calls_per_pass, cfg.iters, cfg.budget_s)?)
            } else {
                None
            };
            if let Some(m) = timed {
                row.gpu_us = Some(m.seconds * 1e6);
                row.gpu_rate = Some(rate(spec.work, m.seconds));
                row.gpu_calls = m.calls;
            }
        }
        if cfg.cpu {
            if let Some(f) = spec.cpu.as_mut() {
                let (s, n) = time_cpu(cfg, f.as_mut());
                row.cpu_us = Some(s * 1e6);
                row.cpu_rate = Some(rate(spec.work, s));
                row.cpu_calls = n;
            }
        }
        rows.push(row);
    }

    // Step dispatches no row claimed (a kernel added or renamed in the trainer): time them too.
    if let (Some(timer), Some((ds, group))) = (timer.as_ref(), step_program) {
        for (k, d) in ds.iter().enumerate() {
            if used.get(k).copied().unwrap_or(false) {
                continue;
            }
            let name = names.get(k).copied().unwrap_or(d.name);
            let m = time_calls(
                timer,
                &|p| d.record(p, Some((group, 0))),
                cfg.calls_per_pass,
                cfg.iters,
                cfg.budget_s,
            )?;
            rows.push(Row {
                layer: name.into(),
                direction: "(step dispatch)".into(),
                gpu_kernel: d.name.into(),
                unit: Unit::GbPerS,
                work: 0.0,
                gpu_us: Some(m.seconds * 1e6),
                gpu_rate: None,
                gpu_calls: m.calls,
                cpu_us: None,
                cpu_rate: None,
                cpu_calls: 0,
                validated: "n/a".into(),
                note: "not matched to a layer row".into(),
            });
        }
    }

    // The whole training step: forward + backward + Adam.
    let mut row = Row {
        layer: "step".into(),
        direction: "fwd+bwd+adam".into(),
        gpu_kernel: String::new(),
        unit: Unit::GflopPerS,
        work: step_flops(b),
        gpu_us: None,
        gpu_rate: None,
        gpu_calls: 0,
        cpu_us: None,
        cpu_rate: None,
        cpu_calls: 0,
        validated: "n/a".into(),
        note: String::new(),
    };
    let mut cpu_be = CpuBackend::new(random_dataset(b, &inp));
    cpu_be.load_state(&state)?;
    let cpu_loss = cpu_be.train_steps(&idx, b, 1, &adam)?[0].loss;
    if let (Some((_, after)), Some(gl), Some(timer), Some((ds, group))) =
        (gpu_backend.as_ref(), gpu_step_loss, timer.as_ref(), step_program)
    {
        // Validate: one step from the same state on the same batch: loss, then every parameter
        // (Adam's first step moves each by about lr*sign(grad), so a tiny gradient of the other
        // sign may differ by up to 2*lr).
        let mut cpu_after = state.clone();
        cpu_be.store_state(&mut cpu_after)?;
        let loss_ok = compare("loss", &[gl], &[cpu_loss], 1e-4 * (1.0 + cpu_loss.abs()));
        let (gp, cp) = (after.params.flatten(), cpu_after.params.flatten());
        let params_ok = compare("params", &gp, &cp, 2.0 * adam.lr);
        row.validated = match loss_ok.and(params_ok) {
            Ok(()) => "ok".into(),
            Err(e) => format!("FAILED: {e}"),
        };
        row.gpu_kernel = format!("{} dispatches", ds.len());
        row.note = format!("loss gpu {gl:.6} cpu {cpu_loss:.6}; GPU: the step's dispatches in one pass");
        if !row.failed() {
            let m = time_calls(
                timer,
                &|p| {
                    for d in ds {
                        d.record(p, Some((group, 0)));
                    }
                },
                cfg.calls_per_pass.div_ceil(5),
                cfg.iters,
                cfg.budget_s * 2.0,
            )?;
            row.gpu_us = Some(m.seconds * 1e6);
            row.gpu_rate = Some(rate(row.work, m.seconds));
            row.gpu_calls = m.calls;
        }
    } else {
        row.note = format!("loss cpu {cpu_loss:.6}");
    }
    if cfg.cpu {
        let mut t = 1u64;
        let (s, n) = time_cpu(cfg, &mut || {
            t += 1;
            cpu_be.train_steps(&idx, b, t, &adam).expect("CPU training step");
        });
        row.cpu_us = Some(s * 1e6);
        row.cpu_rate = Some(rate(row.work, s));
        row.cpu_calls = n;
        row.note.push_str("; CPU: CpuBackend::train_steps");
    }
    rows.push(row);

    let timing = match &timer {
        Some(t) => match t.method() {
            TimingMethod::Timestamps => "timestamps",
            TimingMethod::WallClock => "wall_clock",
        },
        None => "cpu_only",
    };
    Ok(Report {
        adapter: gpu.map(|c| c.adapter_info.to_string()),
        cpu: cpu_description(),
        timing: timing.into(),
        batch: b,
        iters: cfg.iters,
        budget_s: cfg.budget_s,
        date: today_utc(),
        rows,
    })
}
