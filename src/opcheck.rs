//! One check per op of [`Ops`]: seeded random inputs, the op run on an implementation and on the
//! reference, every output compared element by element with a tolerance derived from f32
//! rounding, and every output element checked as written (outputs start as NaN). The same
//! check serves tests/ops.rs (every implementation, several shapes) and `lenet bench` (the
//! kernels it is about to time, at the benchmarked batch). [`Trace`] lists the ops a piece of
//! code calls, so the bench's rows are the network's own op calls.
//!
//! Tolerances. Let u = 2^-24 (f32's unit roundoff). Two implementations of a sum of n terms
//! t_k that add in different orders differ by rounding only; summed in any order, the error of
//! each is about u * sqrt(sum_k S_k^2) for the partial sums S_k, which
//! [`reduction_bound`] bounds by u * sqrt(n * sum_k t_k^2) (the partial sums of terms of
//! random signs grow like sqrt(k)), so each element may differ by
//! `4 u sqrt(n sum t^2) + 8 u |x|` (both sides' errors, and the rounding of the result itself).
//! sum t^2 is the op itself applied to the squared inputs (each term of a sum of products is a
//! product). Ops with exp, log, sqrt or a division add those functions' accuracy on a GPU
//! (WGSL allows exp 3 + 2|x| ULP, log 3 ULP near 1, sqrt and division 2.5 ULP), as stated where
//! they are used. A planted 1% error is far outside every bound (tests/ops.rs shows it fails).

use anyhow::{bail, ensure, Context as _, Result};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

use crate::cpu::reference as r;
use crate::cpu::Reference;
use crate::data::Dataset;
pub use crate::opcase::{relu_mask_of, update_shapes, OpCase};
use crate::ops::*;
use crate::optim::{self, OptStep, Optimizer, Scale};

/// f32's unit roundoff.
pub const U: f64 = f32::EPSILON as f64 / 2.0;

/// The cases tests/ops.rs checks every implementation on, grouped by op: LeNet-5's shapes and
/// others (a single image, odd batches and channel counts, 3x3 kernels that the GPU's general
/// kernels take, sides no workgroup size divides, several partial counts). A new op adds its
/// cases here.
pub fn test_cases() -> Vec<OpCase> {
    let conv = |batch, cin, cout, side, kernel, padding| ConvShape {
        batch,
        in_channels: cin,
        out_channels: cout,
        height: side,
        width: side,
        kernel,
        padding,
    };
    let lin = |batch, in_features, out_features| LinearShape { batch, in_features, out_features };
    let convs = [
        conv(1, 1, 6, 28, 5, 2),
        conv(13, 1, 6, 28, 5, 2),
        conv(3, 6, 16, 14, 5, 0),
        conv(37, 6, 16, 14, 5, 0),
        conv(2, 3, 5, 10, 3, 1),
        conv(5, 2, 7, 12, 5, 0),
        // Two groups of 8 output channels, the second part-filled (v2's weight gradient), and
        // more than 16 (v2's backward falls back to the first kernels).
        conv(4, 3, 12, 10, 3, 1),
        conv(2, 2, 20, 8, 3, 1),
    ];
    let linears = [lin(1, 400, 120), lin(37, 400, 120), lin(13, 120, 84), lin(5, 84, 10), lin(17, 33, 19)];
    let mut cases = vec![
        OpCase::Gather { batch: 1, images: 3, side: 28, max_shift: 0 },
        OpCase::Gather { batch: 37, images: 50, side: 28, max_shift: 3 },
    ];
    cases.extend(convs.map(OpCase::ConvReluPool));
    cases.extend([1, 13, 40].map(|b| OpCase::GatherConvReluPool {
        s: conv(b, 1, 6, 28, 5, 2),
        images: 64,
        max_shift: 2,
    }));
    cases.extend(
        linears.iter().flat_map(|&s| [OpCase::Linear { s, relu: true }, OpCase::Linear { s, relu: false }]),
    );
    cases.extend([
        OpCase::SoftmaxXent { batch: 1, classes: 10 },
        OpCase::SoftmaxXent { batch: 300, classes: 10 },
        OpCase::SoftmaxXent { batch: 7, classes: 3 },
        OpCase::LinearXent { s: lin(1, 84, 10), mask: Some(true) },
        OpCase::LinearXent { s: lin(67, 84, 10), mask: Some(true) },
        OpCase::LinearXent { s: lin(9, 20, 10), mask: Some(false) },
        OpCase::LinearXent { s: lin(5, 84, 10), mask: None },
        // Batches large enough that a kernel's group of images spans several tiles or staging
        // rounds (v3: 16 images a group at 600, two tiles of 8; 69 a group at 1100, two rounds).
        OpCase::LinearXent { s: lin(600, 20, 10), mask: Some(true) },
        OpCase::LinearBackward { s: lin(1100, 33, 19), mask: Some(true) },
    ]);
    cases.extend(
        linears
            .iter()
            .flat_map(|&s| [Some(true), Some(false), None].map(|mask| OpCase::LinearBackward { s, mask })),
    );
    cases.extend(
        convs.iter().flat_map(|&s| [true, false].map(|dinput| OpCase::ConvBackwardFromPool { s, dinput })),
    );
    // The training batch 256, where conv_v2.wgsl's weight gradient sums 2 images a partial (128
    // partials) beside 256 input-gradient workgroups, and 1100, 9 images a partial (123, the
    // last part-filled): every other case sums one image a partial.
    let conv2 = conv(256, 6, 16, 14, 5, 0);
    cases.extend([true, false].map(|dinput| OpCase::ConvBackwardFromPool { s: conv2, dinput }));
    cases.push(OpCase::ConvBackwardFromPool { s: conv(1100, 1, 6, 28, 5, 2), dinput: false });
    // The fused head: LeNet-5's at the batches of issue 22 (1100: 64 workgroups of 18 images,
    // the last two empty), a small odd one, and one wider than head.wgsl holds (run layer by
    // layer).
    let head = |batch, features| OpCase::Head(HeadShape { batch, features });
    cases.extend([1, 13, 67, 256, 1100].map(|b| head(b, [400, 120, 84, 10])));
    cases.extend([head(5, [33, 20, 12, 7]), head(3, [500, 16, 8, 4])]);
    // The fused trunk: LeNet-5's at those batches (1100: 1,100 workgroups of one image), and a
    // smaller one (run layer by layer).
    let trunk =
        |batch| TrunkShape { conv1: conv(batch, 1, 6, 28, 5, 2), conv2: conv(batch, 6, 16, 14, 5, 0) };
    let small = TrunkShape { conv1: conv(3, 1, 4, 12, 3, 1), conv2: conv(3, 4, 6, 6, 3, 0) };
    for s in [1, 13, 67, 256, 1100].map(trunk).into_iter().chain([small]) {
        cases.push(OpCase::TrunkForward { s, images: s.conv1.batch + 7, max_shift: 2 });
    }
    cases.extend([1, 13, 67, 256, 1100].map(trunk).into_iter().chain([small]).map(OpCase::TrunkBackward));
    // Every optimizer with its defaults on those shapes, and the settings that take other
    // branches of its update.
    let shapes = [
        (vec![150, 6, 2400, 16], vec![1, 1, 1, 1]),
        (vec![150, 6, 1000], vec![3, 3, 1]),
        // Sixteen partials and more are added eight loads at a time (optim.wgsl): a full round,
        // rounds and a remainder.
        (vec![2400, 16, 850], vec![8, 17, 33]),
    ];
    let update = |kind: optim::OptimizerKind, lens: &[usize], partials: &[usize]| OpCase::Update {
        lens: lens.to_vec(),
        partials: partials.to_vec(),
        step: optimizer_step(kind),
    };
    for d in optim::RULES {
        cases.extend(shapes.iter().map(|(lens, partials)| update(d.default_kind(), lens, partials)));
    }
    let sgd = |momentum, nesterov, weight_decay| optim::Sgd { momentum, nesterov, weight_decay }.into();
    let rmsprop = |weight_decay, momentum, centered| {
        optim::RmsProp { weight_decay, momentum, centered, ..Default::default() }.into()
    };
    cases.extend([
        update(sgd(0.9, false, 0.0), &[150, 6, 2400], &[1, 1, 1]),
        update(sgd(0.9, true, 5e-4), &[150, 6], &[4, 1]),
        update(sgd(0.0, false, 1e-2), &[77], &[1]),
        update(optim::AdamW { weight_decay: 0.1, ..Default::default() }.into(), &[150, 6], &[4, 1]),
        update(rmsprop(1e-2, 0.9, false), &[150, 6], &[4, 1]),
        update(rmsprop(0.0, 0.0, true), &[150, 6, 1000], &[3, 3, 1]),
        update(rmsprop(5e-4, 0.9, true), &[77], &[1]),
    ]);
    cases
}

/// How an output compared: the largest |diff| / tolerance over its elements (below 1 passes).
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub worst_ratio: f64,
    /// The output and element of the worst ratio.
    pub worst_at: String,
}

/// Host data of a case: named inputs, and after a run, named outputs.
#[derive(Clone, Debug, Default)]
pub struct Host {
    pub f32s: Vec<(&'static str, Vec<f32>)>,
    pub u32s: Vec<(&'static str, Vec<u32>)>,
    pub i32s: Vec<(&'static str, Vec<i32>)>,
    pub data: Option<Dataset>,
}

impl Host {
    fn f(&self, name: &str) -> &[f32] {
        &self.f32s.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("no f32 {name}")).1
    }
    fn u(&self, name: &str) -> &[u32] {
        &self.u32s.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("no u32 {name}")).1
    }
}

fn uniform(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| lo + (hi - lo) * ((rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32)).collect()
}

fn below(rng: &mut ChaCha8Rng, n: u32) -> u32 {
    (rng.next_u64() % n as u64) as u32
}

/// ReLU outputs: non-negative, about a third exactly zero (as a ReLU'd layer's are).
fn relu_like(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    uniform(rng, n, -0.5, 1.0).into_iter().map(|x| x.max(0.0)).collect()
}

fn random_dataset(rng: &mut ChaCha8Rng, images: usize, side: usize) -> Dataset {
    Dataset {
        images: (0..images * side * side).map(|_| rng.next_u32() as u8).collect(),
        labels: (0..images).map(|_| below(rng, 10) as u8).collect(),
        rows: side,
        cols: side,
    }
}

fn batch_picks(rng: &mut ChaCha8Rng, batch: usize, images: usize, max_shift: i32) -> (Vec<u32>, Vec<i32>) {
    let indices = (0..batch).map(|_| below(rng, images as u32)).collect();
    let span = (2 * max_shift + 1) as u32;
    let shifts = (0..2 * batch).map(|_| below(rng, span) as i32 - max_shift).collect();
    (indices, shifts)
}

/// The optimizer scalars of a realistic mid-run step (the 7th, at lr 1e-3 for the adaptive
/// optimizers, 0.05 for SGD).
fn optimizer_step(kind: optim::OptimizerKind) -> OptStep {
    let lr = if matches!(kind, optim::OptimizerKind::Sgd(_)) { 0.05 } else { 1e-3 };
    Optimizer { kind, lr }.step(7, lr, None)
}

/// Seeded random inputs for `case`, shaped as the network's (ReLU outputs where the op reads
/// one, a valid forward pass's argmax where it reads one).
pub fn inputs(case: &OpCase, seed: u64) -> Host {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let rng = &mut rng;
    let mut h = Host::default();
    let weights = |rng: &mut ChaCha8Rng, n: usize, fan_in: usize| {
        let b = 1.0 / (fan_in as f32).sqrt();
        uniform(rng, n, -b, b)
    };
    match case {
        OpCase::Gather { batch, images, side, max_shift } => {
            h.data = Some(random_dataset(rng, *images, *side));
            let (i, s) = batch_picks(rng, *batch, *images, *max_shift);
            h.u32s.push(("indices", i));
            h.i32s.push(("shifts", s));
        }
        OpCase::ConvReluPool(s) => {
            let fan = s.in_channels * s.kernel * s.kernel;
            h.f32s.push(("input", relu_like(rng, s.input_len())));
            h.f32s.push(("weight", weights(rng, s.weight_len(), fan)));
            h.f32s.push(("bias", weights(rng, s.out_channels, fan)));
        }
        OpCase::GatherConvReluPool { s, images, max_shift } => {
            h.data = Some(random_dataset(rng, *images, s.height));
            let (i, sh) = batch_picks(rng, s.batch, *images, *max_shift);
            h.u32s.push(("indices", i));
            h.i32s.push(("shifts", sh));
            let fan = s.in_channels * s.kernel * s.kernel;
            h.f32s.push(("weight", weights(rng, s.weight_len(), fan)));
            h.f32s.push(("bias", weights(rng, s.out_channels, fan)));
        }
        OpCase::Linear { s, .. } => {
            h.f32s.push(("input", relu_like(rng, s.batch * s.in_features)));
            h.f32s.push(("weight", weights(rng, s.weight_len(), s.in_features)));
            h.f32s.push(("bias", weights(rng, s.out_features, s.in_features)));
        }
        OpCase::SoftmaxXent { batch, classes } => {
            h.f32s.push(("logits", uniform(rng, batch * classes, -6.0, 6.0)));
            h.u32s.push(("labels", (0..*batch).map(|_| below(rng, *classes as u32)).collect()));
        }
        OpCase::LinearXent { s, .. } => {
            h.f32s.push(("input", relu_like(rng, s.batch * s.in_features)));
            h.f32s.push(("weight", weights(rng, s.weight_len(), s.in_features)));
            h.f32s.push(("bias", weights(rng, s.out_features, s.in_features)));
            h.u32s.push(("labels", (0..s.batch).map(|_| below(rng, s.out_features as u32)).collect()));
        }
        OpCase::LinearBackward { s, .. } => {
            let scale = 1.0 / s.batch as f32;
            h.f32s.push(("dout", uniform(rng, s.batch * s.out_features, -scale, scale)));
            h.f32s.push(("input", relu_like(rng, s.batch * s.in_features)));
            h.f32s.push(("weight", weights(rng, s.weight_len(), s.in_features)));
        }
        OpCase::ConvBackwardFromPool { s, .. } => {
            let fan = s.in_channels * s.kernel * s.kernel;
            let input = relu_like(rng, s.input_len());
            let weight = weights(rng, s.weight_len(), fan);
            let bias = weights(rng, s.out_channels, fan);
            let (mut conv, mut pooled, mut argmax) =
                (vec![0.0; s.output_len()], vec![0.0; s.pooled_len()], vec![0; s.pooled_len()]);
            let mut pre = vec![0.0; s.output_len()];
            r::conv2d_forward(&mut pre, &input, &weight, &bias, *s);
            r::relu_forward(&mut conv, &pre);
            r::maxpool2x2_forward(
                &mut pooled,
                &mut argmax,
                &conv,
                s.batch,
                s.out_channels,
                s.out_height(),
                s.out_width(),
            );
            let scale = 1.0 / s.batch as f32;
            h.f32s.push(("dpooled", uniform(rng, s.pooled_len(), -scale, scale)));
            h.f32s.push(("conv", conv));
            h.u32s.push(("argmax", argmax));
            h.f32s.push(("input", input));
            h.f32s.push(("weight", weight));
        }
        OpCase::Head(hs) => {
            h.f32s.push(("input", relu_like(rng, hs.batch * hs.features[0])));
            for (k, s) in hs.layers().iter().enumerate() {
                h.f32s.push((HEAD_PARAMS[2 * k], weights(rng, s.weight_len(), s.in_features)));
                h.f32s.push((HEAD_PARAMS[2 * k + 1], weights(rng, s.out_features, s.in_features)));
            }
            h.u32s.push(("labels", (0..hs.batch).map(|_| below(rng, hs.features[3] as u32)).collect()));
        }
        OpCase::TrunkForward { s, images, max_shift } => {
            h.data = Some(random_dataset(rng, *images, s.conv1.height));
            let (i, sh) = batch_picks(rng, s.conv1.batch, *images, *max_shift);
            h.u32s.push(("indices", i));
            h.i32s.push(("shifts", sh));
            for (k, c) in [s.conv1, s.conv2].iter().enumerate() {
                let fan = c.in_channels * c.kernel * c.kernel;
                h.f32s.push((TRUNK_PARAMS[2 * k], weights(rng, c.weight_len(), fan)));
                h.f32s.push((TRUNK_PARAMS[2 * k + 1], weights(rng, c.out_channels, fan)));
            }
        }
        OpCase::TrunkBackward(s) => {
            // A valid forward pass of both layers on an image-like input, and a pooled gradient.
            let mut input = uniform(rng, s.conv1.input_len(), -1.0, 1.0);
            input.iter_mut().for_each(|x| *x = x.max(0.0));
            h.f32s.push(("input", input.clone()));
            let mut layer_input = input;
            for (k, c) in [s.conv1, s.conv2].into_iter().enumerate() {
                let fan = c.in_channels * c.kernel * c.kernel;
                let (weight, bias) = (weights(rng, c.weight_len(), fan), weights(rng, c.out_channels, fan));
                let (mut conv, mut pooled, mut argmax) =
                    (vec![0.0; c.output_len()], vec![0.0; c.pooled_len()], vec![0; c.pooled_len()]);
                r::conv_relu_pool_forward(
                    &mut conv,
                    &mut pooled,
                    &mut argmax,
                    &layer_input,
                    &weight,
                    &bias,
                    c,
                );
                h.f32s.push((TRUNK_PARAMS[2 * k], weight));
                h.f32s.push((["conv1", "conv2"][k], conv));
                h.u32s.push((["argmax1", "argmax2"][k], argmax));
                if k == 0 {
                    h.f32s.push(("pooled1", pooled.clone()));
                }
                layer_input = pooled;
            }
            let scale = 1.0 / s.conv1.batch as f32;
            h.f32s.push(("dpooled", uniform(rng, s.conv2.pooled_len(), -scale, scale)));
        }
        OpCase::Update { lens, partials, step } => {
            let total: usize = lens.iter().sum();
            let grads: usize = lens.iter().zip(partials).map(|(n, p)| n * p).sum();
            h.f32s.push(("param", uniform(rng, total, -0.3, 0.3)));
            h.f32s.push(("grad", uniform(rng, grads, -0.02, 0.02)));
            for state in step.descriptor().states {
                let values = if state.non_negative {
                    // A mean of squared gradients: positive, on the gradients' squared scale, and
                    // above the square of any running mean of gradients below (RMSprop's
                    // centered variance stays positive, as it does in a real run).
                    uniform(rng, total, 2e-4, 6e-4)
                } else {
                    uniform(rng, total, -0.01, 0.01)
                };
                h.f32s.push((state.name, values));
            }
        }
    }
    h
}

/// The trunk cases' parameters (the backward case reads the weights only).
const TRUNK_PARAMS: [&str; 4] = ["w1", "b1", "w2", "b2"];
/// The trunk forward case's f32 and u32 outputs.
const TRUNK_OUTS: [&str; 5] = ["input", "conv1", "pooled1", "conv2", "pooled2"];
const TRUNK_OUTS_U32: [&str; 3] = ["labels", "argmax1", "argmax2"];
/// The trunk backward case's f32 inputs packed with its input gradient, and its gradients.
const TRUNK_ACTS: [&str; 5] = ["dpooled", "conv1", "input", "conv2", "pooled1"];
const TRUNK_GRADS: [&str; 4] = ["dw1", "db1", "dw2", "db2"];

/// The head case's parameters, in [`HeadArgs`] order.
const HEAD_PARAMS: [&str; 6] = ["w1", "b1", "w2", "b2", "w3", "b3"];
/// The head case's activation outputs and their gradients' (after its input, packed with it).
const HEAD_ACTS: [&str; 7] = ["out1", "out2", "logits", "dout1", "dout2", "dlogits", "dinput"];
/// The head case's weight gradients.
const HEAD_GRADS: [&str; 6] = ["dw1", "db1", "dw2", "db2", "dw3", "db3"];

/// Splits a flat host vector into the tensors of `lens` (each `parts` times as long).
fn split<'a>(flat: &'a [f32], lens: &[usize], parts: &[usize]) -> Vec<&'a [f32]> {
    let mut at = 0;
    lens.iter()
        .zip(parts)
        .map(|(n, p)| {
            let s = &flat[at..at + n * p];
            at += n * p;
            s
        })
        .collect()
}

/// Runs `case` on `ops` from `host`'s inputs; returns the outputs, gradients' partials summed.
pub fn run<O: Ops>(ops: &mut O, case: &OpCase, host: &Host) -> Result<Host> {
    let mut staged = Staged::new(ops, case, host)?;
    staged.exec(ops)?;
    staged.outputs(ops)
}

/// A case's buffers on one implementation, for running it (again and again, for timing).
pub struct Staged<O: Ops> {
    case: OpCase,
    ins: Vec<(&'static str, O::Buf<f32>)>,
    ins_u32: Vec<(&'static str, O::Buf<u32>)>,
    ins_i32: Vec<(&'static str, O::Buf<i32>)>,
    outs: Vec<(&'static str, O::Buf<f32>)>,
    outs_u32: Vec<(&'static str, O::Buf<u32>)>,
    data: Option<O::Data>,
    /// Partial counts of the gradient outputs that have more than one.
    partials: Vec<(&'static str, usize)>,
    /// The optimizer cases' tensors, one buffer per tensor: the parameters, their gradients,
    /// and the optimizer's states.
    params: Vec<O::Buf<f32>>,
    grads: Vec<O::Buf<f32>>,
    moments: Vec<Vec<O::Buf<f32>>>,
}

fn take<'a, B>(list: &'a [(&'static str, B)], name: &str) -> &'a B {
    &list.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("no buffer {name}")).1
}

impl<O: Ops> Staged<O> {
    /// Uploads the inputs and makes NaN-filled (or u32::MAX-filled) outputs.
    pub fn new(ops: &mut O, case: &OpCase, host: &Host) -> Result<Self> {
        let mut s = Staged {
            case: case.clone(),
            ins: Vec::new(),
            ins_u32: Vec::new(),
            ins_i32: Vec::new(),
            outs: Vec::new(),
            outs_u32: Vec::new(),
            data: None,
            partials: Vec::new(),
            params: Vec::new(),
            grads: Vec::new(),
            moments: Vec::new(),
        };
        match case {
            OpCase::Head(hs) => s.stage_head(ops, hs, host)?,
            OpCase::TrunkForward { s: t, .. } => s.stage_trunk_forward(ops, t, host)?,
            OpCase::TrunkBackward(t) => s.stage_trunk_backward(ops, t, host)?,
            _ => {
                for (n, v) in &host.f32s {
                    s.ins.push((n, ops.upload(n, v)?));
                }
            }
        }
        if !matches!(case, OpCase::TrunkBackward(_)) {
            for (n, v) in &host.u32s {
                s.ins_u32.push((n, ops.upload(n, v)?));
            }
        }
        for (n, v) in &host.i32s {
            s.ins_i32.push((n, ops.upload(n, v)?));
        }
        if let Some(d) = &host.data {
            s.data = Some(ops.upload_data("data", d)?);
        }
        let mut out = |name: &'static str, len: usize, ops: &mut O| -> Result<()> {
            s.outs.push((name, ops.upload(name, &vec![f32::NAN; len])?));
            Ok(())
        };
        let grads = |s: &mut Self, ops: &mut O, op: GradOp, w: usize, b: usize| -> Result<()> {
            let p = ops.grad_partials(op);
            s.partials.extend([("dweight", p), ("dbias", p)]);
            s.outs.push(("dweight", ops.upload("dweight", &vec![f32::NAN; w * p])?));
            s.outs.push(("dbias", ops.upload("dbias", &vec![f32::NAN; b * p])?));
            Ok(())
        };
        let mut outs_u32 = Vec::new();
        match case {
            OpCase::Gather { batch, side, .. } => {
                out("input", batch * side * side, ops)?;
                outs_u32.push(("labels", *batch));
            }
            OpCase::ConvReluPool(c) => {
                out("conv", c.output_len(), ops)?;
                out("pooled", c.pooled_len(), ops)?;
                outs_u32.push(("argmax", c.pooled_len()));
            }
            OpCase::GatherConvReluPool { s: c, .. } => {
                out("input", c.input_len(), ops)?;
                out("conv", c.output_len(), ops)?;
                out("pooled", c.pooled_len(), ops)?;
                outs_u32.push(("labels", c.batch));
                outs_u32.push(("argmax", c.pooled_len()));
            }
            OpCase::Linear { s: l, .. } => out("out", l.batch * l.out_features, ops)?,
            OpCase::SoftmaxXent { batch, classes } => {
                out("dlogits", batch * classes, ops)?;
                out("losses", *batch, ops)?;
                outs_u32.push(("correct", *batch));
            }
            OpCase::LinearXent { s: l, mask } => {
                out("logits", l.batch * l.out_features, ops)?;
                out("dlogits", l.batch * l.out_features, ops)?;
                out("losses", l.batch, ops)?;
                outs_u32.push(("correct", l.batch));
                if mask.is_some() {
                    out("dinput", l.batch * l.in_features, ops)?;
                }
                grads(&mut s, ops, GradOp::LinearXent(*l), l.weight_len(), l.out_features)?;
            }
            OpCase::LinearBackward { s: l, mask } => {
                if mask.is_some() {
                    out("dinput", l.batch * l.in_features, ops)?;
                }
                grads(&mut s, ops, GradOp::Linear(*l), l.weight_len(), l.out_features)?;
            }
            OpCase::ConvBackwardFromPool { s: c, dinput } => {
                if *dinput {
                    out("dinput", c.input_len(), ops)?;
                }
                grads(&mut s, ops, GradOp::ConvFromPool(*c, *dinput), c.weight_len(), c.out_channels)?;
            }
            // Staged above, packed as the network packs them.
            OpCase::Head(hs) => outs_u32.push(("correct", hs.batch)),
            OpCase::TrunkForward { .. } | OpCase::TrunkBackward(_) => {}
            OpCase::Update { lens, partials, .. } => {
                let ones = vec![1; lens.len()];
                let mut upload = |name: &'static str, parts: &[usize]| -> Result<Vec<O::Buf<f32>>> {
                    split(host.f(name), lens, parts).into_iter().map(|t| ops.upload(name, t)).collect()
                };
                s.params = upload("param", &ones)?;
                s.grads = upload("grad", partials)?;
                for name in moment_names(case) {
                    s.moments.push(upload(name, &ones)?);
                }
            }
        }
        for (name, len) in outs_u32 {
            s.outs_u32.push((name, ops.upload(name, &vec![u32::MAX; len])?));
        }
        Ok(s)
    }

    /// The head case's f32 tensors, packed as the network packs them ([`Ops::upload_packed`]):
    /// the parameters together, the input with the activation outputs (NaN-filled), the weight
    /// gradients together; and the losses.
    fn stage_head(&mut self, ops: &mut O, hs: &HeadShape, host: &Host) -> Result<()> {
        let params: Vec<(String, &[f32])> = HEAD_PARAMS.iter().map(|n| (n.to_string(), host.f(n))).collect();
        self.ins.extend(HEAD_PARAMS.into_iter().zip(ops.upload_packed("params", &params)?));
        let [s1, s2, s3] = hs.layers();
        let lens = [s1.batch * s1.out_features, s2.batch * s2.out_features, s3.batch * s3.out_features];
        let act_lens = [lens[0], lens[1], lens[2], lens[0], lens[1], lens[2], hs.batch * hs.features[0]];
        let nans: Vec<Vec<f32>> = act_lens.iter().map(|&n| vec![f32::NAN; n]).collect();
        let mut acts: Vec<(String, &[f32])> = vec![("input".into(), host.f("input"))];
        acts.extend(HEAD_ACTS.iter().zip(&nans).map(|(n, v)| (n.to_string(), &v[..])));
        let mut bufs = group(ops, ops.fuses(Fusion::Head(*hs)), "acts", &acts)?.into_iter();
        self.ins.push(("input", bufs.next().expect("the input")));
        self.outs.extend(HEAD_ACTS.into_iter().zip(bufs));
        let mut grads = Vec::new();
        for (k, s) in hs.layers().iter().enumerate() {
            let p = ops.grad_partials(GradOp::Head { head: *hs, layer: k });
            grads.push(vec![f32::NAN; p * s.weight_len()]);
            grads.push(vec![f32::NAN; p * s.out_features]);
            self.partials.extend([(HEAD_GRADS[2 * k], p), (HEAD_GRADS[2 * k + 1], p)]);
        }
        let named: Vec<(String, &[f32])> =
            HEAD_GRADS.iter().zip(&grads).map(|(n, v)| (n.to_string(), &v[..])).collect();
        self.outs.extend(HEAD_GRADS.into_iter().zip(ops.upload_packed("grads", &named)?));
        self.outs.push(("losses", ops.upload("losses", &vec![f32::NAN; hs.batch])?));
        Ok(())
    }

    /// The trunk forward case's tensors, packed as the network packs them: the parameters, the
    /// f32 outputs (NaN-filled) and the u32 outputs (u32::MAX-filled).
    fn stage_trunk_forward(&mut self, ops: &mut O, t: &TrunkShape, host: &Host) -> Result<()> {
        let fused = ops.fuses(Fusion::Trunk(*t));
        let params: Vec<(String, &[f32])> = TRUNK_PARAMS.iter().map(|n| (n.to_string(), host.f(n))).collect();
        self.ins.extend(TRUNK_PARAMS.into_iter().zip(ops.upload_packed("params", &params)?));
        let (c1, c2) = (t.conv1, t.conv2);
        let lens = [c1.input_len(), c1.output_len(), c1.pooled_len(), c2.output_len(), c2.pooled_len()];
        let nans: Vec<Vec<f32>> = lens.iter().map(|&n| vec![f32::NAN; n]).collect();
        let named: Vec<(String, &[f32])> =
            TRUNK_OUTS.iter().zip(&nans).map(|(n, v)| (n.to_string(), &v[..])).collect();
        self.outs.extend(TRUNK_OUTS.into_iter().zip(group(ops, fused, "acts", &named)?));
        let lens = [c1.batch, c1.pooled_len(), c2.pooled_len()];
        let maxes: Vec<Vec<u32>> = lens.iter().map(|&n| vec![u32::MAX; n]).collect();
        let named: Vec<(String, &[u32])> =
            TRUNK_OUTS_U32.iter().zip(&maxes).map(|(n, v)| (n.to_string(), &v[..])).collect();
        self.outs_u32.extend(TRUNK_OUTS_U32.into_iter().zip(group(ops, fused, "acts_u32", &named)?));
        Ok(())
    }

    /// The trunk backward case's tensors, packed as the network packs them: the activations
    /// with the input gradient (NaN-filled), the argmaxes, the weights, the gradients.
    fn stage_trunk_backward(&mut self, ops: &mut O, t: &TrunkShape, host: &Host) -> Result<()> {
        let fused = ops.fuses(Fusion::Trunk(*t));
        let nan = vec![f32::NAN; t.conv1.pooled_len()];
        let mut acts: Vec<(String, &[f32])> = TRUNK_ACTS.iter().map(|n| (n.to_string(), host.f(n))).collect();
        acts.push(("dpooled1".into(), &nan));
        let mut bufs = group(ops, fused, "acts", &acts)?;
        self.outs.push(("dpooled1", bufs.pop().expect("the input gradient")));
        self.ins.extend(TRUNK_ACTS.into_iter().zip(bufs));
        let argmaxes: Vec<(String, &[u32])> =
            ["argmax1", "argmax2"].iter().map(|n| (n.to_string(), host.u(n))).collect();
        self.ins_u32
            .extend(["argmax1", "argmax2"].into_iter().zip(group(ops, fused, "acts_u32", &argmaxes)?));
        let weights: Vec<(String, &[f32])> =
            ["w1", "w2"].iter().map(|n| (n.to_string(), host.f(n))).collect();
        self.ins.extend(["w1", "w2"].into_iter().zip(ops.upload_packed("params", &weights)?));
        let mut grads = Vec::new();
        for (k, c) in [t.conv1, t.conv2].iter().enumerate() {
            let p = ops.grad_partials(GradOp::Trunk { trunk: *t, layer: k });
            grads.push(vec![f32::NAN; p * c.weight_len()]);
            grads.push(vec![f32::NAN; p * c.out_channels]);
            self.partials.extend([(TRUNK_GRADS[2 * k], p), (TRUNK_GRADS[2 * k + 1], p)]);
        }
        let named: Vec<(String, &[f32])> =
            TRUNK_GRADS.iter().zip(&grads).map(|(n, v)| (n.to_string(), &v[..])).collect();
        self.outs.extend(TRUNK_GRADS.into_iter().zip(ops.upload_packed("grads", &named)?));
        Ok(())
    }

    /// Runs the op once.
    pub fn exec(&mut self, ops: &mut O) -> Result<()> {
        let Staged { case, ins, ins_u32, ins_i32, outs, outs_u32, data, .. } = self;
        let batch_ref = |batch: usize| Batch {
            data: data.as_ref().expect("a data set"),
            indices: take(ins_u32, "indices"),
            shifts: take(ins_i32, "shifts"),
            batch,
        };
        let (f, u) = (|name: &str| take(ins, name), |name: &str| take(ins_u32, name));
        match case {
            OpCase::Gather { batch, .. } => {
                let [input] = outs_mut(outs, ["input"]);
                let [labels] = outs_mut(outs_u32, ["labels"]);
                ops.gather(GatherArgs { input, labels, batch: &batch_ref(*batch) })
            }
            OpCase::ConvReluPool(s) => {
                let [conv, pooled] = outs_mut(outs, ["conv", "pooled"]);
                let [argmax] = outs_mut(outs_u32, ["argmax"]);
                let l = ConvLayerArgs { weight: f("weight"), bias: f("bias"), conv, pooled, argmax, s: *s };
                ops.conv_relu_pool_forward(f("input"), l)
            }
            OpCase::GatherConvReluPool { s, .. } => {
                let [input, conv, pooled] = outs_mut(outs, ["input", "conv", "pooled"]);
                let [labels, argmax] = outs_mut(outs_u32, ["labels", "argmax"]);
                let l = ConvLayerArgs { weight: f("weight"), bias: f("bias"), conv, pooled, argmax, s: *s };
                ops.gather_conv_relu_pool_forward(GatherArgs { input, labels, batch: &batch_ref(s.batch) }, l)
            }
            OpCase::Linear { s, relu } => {
                let [out] = outs_mut(outs, ["out"]);
                let (input, weight, bias) = (f("input"), f("weight"), f("bias"));
                ops.linear_forward(LinearForwardArgs { input, weight, bias, out, s: *s, relu: *relu })
            }
            OpCase::SoftmaxXent { batch, classes } => {
                let [dlogits, losses] = outs_mut(outs, ["dlogits", "losses"]);
                let [correct] = outs_mut(outs_u32, ["correct"]);
                let (logits, labels, batch, classes) = (f("logits"), u("labels"), *batch, *classes);
                ops.softmax_xent(SoftmaxXentArgs { logits, labels, dlogits, losses, correct, batch, classes })
            }
            OpCase::LinearXent { s, mask } => {
                let [correct] = outs_mut(outs_u32, ["correct"]);
                let names = ["logits", "dlogits", "losses", "dweight", "dbias", "dinput"];
                let [logits, dlogits, losses, dweight, dbias, dinput] = outs_opt(outs, names);
                ops.linear_xent_forward_backward(LinearXentArgs {
                    input: f("input"),
                    weight: f("weight"),
                    bias: f("bias"),
                    labels: u("labels"),
                    logits: logits.expect("staged"),
                    dlogits: dlogits.expect("staged"),
                    losses: losses.expect("staged"),
                    correct,
                    dweight: dweight.expect("staged"),
                    dbias: dbias.expect("staged"),
                    dinput: input_grad(dinput, *mask, f("input")),
                    s: *s,
                })
            }
            OpCase::LinearBackward { s, mask } => {
                let [dweight, dbias, dinput] = outs_opt(outs, ["dweight", "dbias", "dinput"]);
                ops.linear_backward(LinearBackwardArgs {
                    dout: f("dout"),
                    input: f("input"),
                    weight: f("weight"),
                    dweight: dweight.expect("staged"),
                    dbias: dbias.expect("staged"),
                    dinput: input_grad(dinput, *mask, f("input")),
                    s: *s,
                })
            }
            OpCase::ConvBackwardFromPool { s, .. } => {
                let [dweight, dbias, dinput] = outs_opt(outs, ["dweight", "dbias", "dinput"]);
                ops.conv_backward_from_pool(ConvBackwardArgs {
                    dpooled: f("dpooled"),
                    conv: f("conv"),
                    argmax: u("argmax"),
                    input: f("input"),
                    weight: f("weight"),
                    dweight: dweight.expect("staged"),
                    dbias: dbias.expect("staged"),
                    dinput,
                    s: *s,
                })
            }
            OpCase::TrunkForward { s, .. } => {
                let [input, conv1, pooled1, conv2, pooled2] = outs_mut(outs, TRUNK_OUTS);
                let [labels, argmax1, argmax2] = outs_mut(outs_u32, TRUNK_OUTS_U32);
                let (w1, b1, w2, b2) = (f("w1"), f("b1"), f("w2"), f("b2"));
                let conv1 = ConvLayerArgs {
                    weight: w1,
                    bias: b1,
                    conv: conv1,
                    pooled: pooled1,
                    argmax: argmax1,
                    s: s.conv1,
                };
                let conv2 = ConvLayerArgs {
                    weight: w2,
                    bias: b2,
                    conv: conv2,
                    pooled: pooled2,
                    argmax: argmax2,
                    s: s.conv2,
                };
                let gather = GatherArgs { input, labels, batch: &batch_ref(s.conv1.batch) };
                ops.trunk_forward(TrunkForwardArgs { gather, conv1, conv2, s: *s })
            }
            OpCase::TrunkBackward(s) => {
                let [dpooled1, dw1, db1, dw2, db2] = outs_mut(outs, ["dpooled1", "dw1", "db1", "dw2", "db2"]);
                let conv2 = TrunkLayerArgs {
                    conv: f("conv2"),
                    argmax: u("argmax2"),
                    input: f("pooled1"),
                    weight: f("w2"),
                    dweight: dw2,
                    dbias: db2,
                };
                let conv1 = TrunkLayerArgs {
                    conv: f("conv1"),
                    argmax: u("argmax1"),
                    input: f("input"),
                    weight: f("w1"),
                    dweight: dw1,
                    dbias: db1,
                };
                ops.trunk_backward(TrunkBackwardArgs { dpooled: f("dpooled"), conv2, dpooled1, conv1, s: *s })
            }
            OpCase::Head(hs) => {
                let [correct] = outs_mut(outs_u32, ["correct"]);
                let names = [
                    "out1", "out2", "logits", "dout1", "dout2", "dlogits", "dinput", "dw1", "db1", "dw2",
                    "db2", "dw3", "db3", "losses",
                ];
                let [out1, out2, logits, dout1, dout2, dlogits, dinput, dw1, db1, dw2, db2, dw3, db3, losses] =
                    outs_mut(outs, names);
                let layer = |weight, bias, out, dout, dweight, dbias| HeadLayerArgs {
                    weight,
                    bias,
                    out,
                    dout,
                    dweight,
                    dbias,
                };
                ops.head_forward_backward(HeadArgs {
                    input: f("input"),
                    layers: [
                        layer(f("w1"), f("b1"), out1, dout1, dw1, db1),
                        layer(f("w2"), f("b2"), out2, dout2, dw2, db2),
                        layer(f("w3"), f("b3"), logits, dlogits, dw3, db3),
                    ],
                    labels: u("labels"),
                    losses,
                    correct,
                    dinput,
                    s: *hs,
                })
            }
            OpCase::Update { step, .. } => {
                let (params, grads, moments) = (&mut self.params[..], &self.grads[..], &mut self.moments[..]);
                ops.update(UpdateArgs { params, grads, moments, step })
            }
        }
    }

    /// The outputs, read back, with gradient partials summed in order.
    pub fn outputs(&mut self, ops: &mut O) -> Result<Host> {
        let mut h = Host::default();
        for (n, b) in &self.outs {
            let mut v = ops.read(b)?;
            if let Some(&(_, p)) = self.partials.iter().find(|(name, _)| name == n) {
                v = sum_partials(&v, p);
            }
            h.f32s.push((n, v));
        }
        for (n, b) in &self.outs_u32 {
            h.u32s.push((n, ops.read(b)?));
        }
        if !self.params.is_empty() {
            let names = std::iter::once("param").chain(moment_names(&self.case));
            for (name, tensors) in names.zip(std::iter::once(&self.params).chain(&self.moments)) {
                let mut flat = Vec::new();
                for t in tensors {
                    flat.extend(ops.read(t)?);
                }
                h.f32s.push((name, flat));
            }
        }
        Ok(h)
    }
}

/// The in-order sum of `parts` equal parts of `v` (as the optimizer adds partials).
pub fn sum_partials(v: &[f32], parts: usize) -> Vec<f32> {
    let n = v.len() / parts;
    let mut out = v[..n].to_vec();
    for k in 1..parts {
        for (o, x) in out.iter_mut().zip(&v[k * n..(k + 1) * n]) {
            *o += x;
        }
    }
    out
}

/// A group of a fused case's tensors: packed in one allocation where the implementation's fused
/// kernel binds them so, else one upload each (the per-layer kernels may not read and write
/// ranges of one buffer in one dispatch).
fn group<O: Ops, T: Elem>(
    ops: &mut O,
    fused: bool,
    label: &str,
    tensors: &[(String, &[T])],
) -> Result<Vec<O::Buf<T>>> {
    if fused {
        ops.upload_packed(label, tensors)
    } else {
        tensors.iter().map(|(n, v)| ops.upload(n, v)).collect()
    }
}

/// Mutable references to several distinct outputs by name.
fn outs_mut<'a, B, const N: usize>(list: &'a mut [(&'static str, B)], names: [&str; N]) -> [&'a mut B; N] {
    outs_opt(list, names).map(|b| b.expect("output staged"))
}

/// The outputs named, where the case has them.
fn outs_opt<'a, B, const N: usize>(
    list: &'a mut [(&'static str, B)],
    names: [&str; N],
) -> [Option<&'a mut B>; N] {
    let mut found: [Option<&'a mut B>; N] = std::array::from_fn(|_| None);
    for (n, b) in list.iter_mut() {
        if let Some(i) = names.iter().position(|x| x == n) {
            found[i] = Some(b);
        }
    }
    found
}

/// The input gradient of a case with `mask` (see [`OpCase`]), whose mask is the layer's input
/// (random, about half positive).
fn input_grad<'a, B>(
    dinput: Option<&'a mut B>,
    mask: Option<bool>,
    input: &'a B,
) -> Option<InputGradArgs<'a, B>> {
    dinput.map(|dinput| InputGradArgs { dinput, relu_mask: (mask == Some(true)).then_some(input) })
}

/// The optimizer's state tensors of an optimizer case, in [`UpdateArgs::moments`] order.
fn moment_names(case: &OpCase) -> Vec<&'static str> {
    match case {
        OpCase::Update { step, .. } => step.descriptor().states.iter().map(|s| s.name).collect(),
        _ => Vec::new(),
    }
}

/// Runs `case` on `ops` and on the reference from the same seeded inputs and compares every
/// output. Err when an element is unwritten or outside its tolerance, naming it.
pub fn check<O: Ops>(ops: &mut O, case: &OpCase, seed: u64) -> Result<Outcome> {
    let host = inputs(case, seed);
    let got = run(ops, case, &host).with_context(|| format!("running {} on {}", case.op(), ops.name()))?;
    let want = run(&mut Reference, case, &host).context("running the reference")?;
    compare(case, &host, &got, &want)
}

/// Compares `got` with the reference's `want` for `case`'s inputs `host`.
pub fn compare(case: &OpCase, host: &Host, got: &Host, want: &Host) -> Result<Outcome> {
    match case {
        OpCase::Head(hs) => return compare_head(hs, host, got),
        OpCase::TrunkForward { s, images, max_shift } => {
            return compare_trunk_forward(s, *images, *max_shift, host, got)
        }
        OpCase::TrunkBackward(s) => return compare_trunk_backward(s, host, got),
        _ => {}
    }
    let mut worst = Outcome { worst_ratio: 0.0, worst_at: String::new() };
    let bounds = bounds(case, host, want);
    for (name, w) in &want.f32s {
        let g = got.f32s.iter().find(|(n, _)| n == name).map(|(_, v)| v).context("output missing")?;
        ensure!(g.len() == w.len(), "{name}: {} values, expected {}", g.len(), w.len());
        let tol = bounds.iter().find(|(n, _)| n == name).map(|(_, t)| t);
        for (i, (&a, &b)) in g.iter().zip(w).enumerate() {
            ensure!(
                !a.is_nan() || b.is_nan(),
                "{name}[{i}] was not written (still NaN; the reference gives {b})"
            );
            let t = tol.map_or(0.0, |t| t[i]);
            let err = (a as f64 - b as f64).abs();
            ensure!(
                err <= t,
                "{name}[{i}] = {a}, the reference gives {b}: |diff| {err:.3e} > tolerance {t:.3e}"
            );
            let ratio = if t > 0.0 { err / t } else { 0.0 };
            if ratio > worst.worst_ratio || worst.worst_at.is_empty() {
                worst = Outcome { worst_ratio: ratio, worst_at: format!("{name}[{i}]") };
            }
        }
    }
    for (name, w) in &want.u32s {
        let g = got.u32s.iter().find(|(n, _)| n == name).map(|(_, v)| v).context("output missing")?;
        ensure!(g.len() == w.len(), "{name}: {} values, expected {}", g.len(), w.len());
        for (i, (&a, &b)) in g.iter().zip(w).enumerate() {
            ensure!(a != u32::MAX || b == u32::MAX, "{name}[{i}] was not written");
            if a != b && !near_tie(case, name, i, a, b, host, want, &bounds) {
                bail!("{name}[{i}] = {a}, the reference gives {b}");
            }
        }
    }
    Ok(worst)
}

/// The fused head, stage by stage: each layer's forward, the loss with the last layer's
/// backward, and each other layer's backward, checked as the op of its own that computes it
/// (with that op's tolerance) against the reference run on that stage's inputs as `got`
/// computed them. So a fault anywhere in the chain is caught where it arises, and no tolerance
/// has to cover a whole chain's rounding.
fn compare_head(hs: &HeadShape, host: &Host, got: &Host) -> Result<Outcome> {
    let [s1, s2, s3] = hs.layers();
    let f = |h: &Host, n: &str| h.f(n).to_vec();
    let stage = |case: OpCase, f32s, u32s, outs: &[(&'static str, &str)]| {
        compare_stage("head", case, Host { f32s, u32s, ..Host::default() }, got, outs)
    };
    let labels = vec![("labels", host.u("labels").to_vec())];
    let outcomes = [
        stage(
            OpCase::Linear { s: s1, relu: true },
            vec![("input", f(host, "input")), ("weight", f(host, "w1")), ("bias", f(host, "b1"))],
            vec![],
            &[("out", "out1")],
        )?,
        stage(
            OpCase::Linear { s: s2, relu: true },
            vec![("input", f(got, "out1")), ("weight", f(host, "w2")), ("bias", f(host, "b2"))],
            vec![],
            &[("out", "out2")],
        )?,
        stage(
            OpCase::LinearXent { s: s3, mask: Some(true) },
            vec![("input", f(got, "out2")), ("weight", f(host, "w3")), ("bias", f(host, "b3"))],
            labels,
            &[
                ("logits", "logits"),
                ("dlogits", "dlogits"),
                ("losses", "losses"),
                ("correct", "correct"),
                ("dinput", "dout2"),
                ("dweight", "dw3"),
                ("dbias", "db3"),
            ],
        )?,
        stage(
            OpCase::LinearBackward { s: s2, mask: Some(true) },
            vec![("dout", f(got, "dout2")), ("input", f(got, "out1")), ("weight", f(host, "w2"))],
            vec![],
            &[("dinput", "dout1"), ("dweight", "dw2"), ("dbias", "db2")],
        )?,
        // The head's input gradient is unmasked: the conv layer below applies its own ReLU.
        stage(
            OpCase::LinearBackward { s: s1, mask: Some(false) },
            vec![("dout", f(got, "dout1")), ("input", f(host, "input")), ("weight", f(host, "w1"))],
            vec![],
            &[("dinput", "dinput"), ("dweight", "dw1"), ("dbias", "db1")],
        )?,
    ];
    Ok(worst_of(outcomes))
}

/// One stage of a fused op: `case` run by the reference on `sub_host` (the stage's inputs, as
/// the implementation computed them where an earlier stage made them), compared with the
/// implementation's outputs `outs` (the stage's name for each, and its name in `got`).
fn compare_stage(
    fused: &str,
    case: OpCase,
    sub_host: Host,
    got: &Host,
    outs: &[(&'static str, &str)],
) -> Result<Outcome> {
    let want = run(&mut Reference, &case, &sub_host).context("running the reference")?;
    let mut sub_got = Host::default();
    for &(name, from) in outs {
        match got.f32s.iter().find(|(n, _)| *n == from) {
            Some((_, v)) => sub_got.f32s.push((name, v.clone())),
            None => sub_got.u32s.push((name, got.u(from).to_vec())),
        }
    }
    compare(&case, &sub_host, &sub_got, &want)
        .with_context(|| format!("the {fused}'s {} stage", case.direction()))
}

/// The stages' worst outcome.
fn worst_of(outcomes: impl IntoIterator<Item = Outcome>) -> Outcome {
    let worst = Outcome { worst_ratio: 0.0, worst_at: String::new() };
    outcomes.into_iter().fold(worst, |a, b| {
        if b.worst_ratio > a.worst_ratio || a.worst_at.is_empty() {
            b
        } else {
            a
        }
    })
}

/// The fused trunk forward, stage by stage as [`compare_head`]: the gather and conv1, then
/// conv2 on conv1's pooled output as computed.
fn compare_trunk_forward(
    t: &TrunkShape,
    images: usize,
    max_shift: i32,
    host: &Host,
    got: &Host,
) -> Result<Outcome> {
    let f = |h: &Host, n: &str| h.f(n).to_vec();
    let first = Host {
        f32s: vec![("weight", f(host, "w1")), ("bias", f(host, "b1"))],
        u32s: vec![("indices", host.u("indices").to_vec())],
        i32s: host.i32s.clone(),
        data: host.data.clone(),
    };
    let outs = [
        ("input", "input"),
        ("conv", "conv1"),
        ("pooled", "pooled1"),
        ("labels", "labels"),
        ("argmax", "argmax1"),
    ];
    let gathered = compare_stage(
        "trunk",
        OpCase::GatherConvReluPool { s: t.conv1, images, max_shift },
        first,
        got,
        &outs,
    )?;
    let second = Host {
        f32s: vec![("input", f(got, "pooled1")), ("weight", f(host, "w2")), ("bias", f(host, "b2"))],
        ..Host::default()
    };
    let outs = [("conv", "conv2"), ("pooled", "pooled2"), ("argmax", "argmax2")];
    // conv2's argmax indexes the batch's conv2 output from image 0: the reference's, as given.
    let conv2 = compare_stage("trunk", OpCase::ConvReluPool(t.conv2), second, got, &outs)?;
    Ok(worst_of([gathered, conv2]))
}

/// The fused trunk backward, stage by stage as [`compare_head`]: conv2's backward with its
/// input gradient, then conv1's from that gradient as computed.
fn compare_trunk_backward(t: &TrunkShape, host: &Host, got: &Host) -> Result<Outcome> {
    let f = |h: &Host, n: &str| h.f(n).to_vec();
    let u = |n: &str| vec![("argmax", host.u(n).to_vec())];
    let second = Host {
        f32s: vec![
            ("dpooled", f(host, "dpooled")),
            ("conv", f(host, "conv2")),
            ("input", f(host, "pooled1")),
            ("weight", f(host, "w2")),
        ],
        u32s: u("argmax2"),
        ..Host::default()
    };
    let outs = [("dinput", "dpooled1"), ("dweight", "dw2"), ("dbias", "db2")];
    let conv2 = compare_stage(
        "trunk",
        OpCase::ConvBackwardFromPool { s: t.conv2, dinput: true },
        second,
        got,
        &outs,
    )?;
    let first = Host {
        f32s: vec![
            ("dpooled", f(got, "dpooled1")),
            ("conv", f(host, "conv1")),
            ("input", f(host, "input")),
            ("weight", f(host, "w1")),
        ],
        u32s: u("argmax1"),
        ..Host::default()
    };
    let outs = [("dweight", "dw1"), ("dbias", "db1")];
    let conv1 = compare_stage(
        "trunk",
        OpCase::ConvBackwardFromPool { s: t.conv1, dinput: false },
        first,
        got,
        &outs,
    )?;
    Ok(worst_of([conv2, conv1]))
}

/// Whether a differing argmax or correct flag is a tie within rounding: the two candidates'
/// values differ by less than their tolerances.
#[allow(clippy::too_many_arguments)]
fn near_tie(
    case: &OpCase,
    name: &str,
    i: usize,
    a: u32,
    b: u32,
    host: &Host,
    want: &Host,
    bounds: &[(&str, Vec<f64>)],
) -> bool {
    let tol = |out: &str| bounds.iter().find(|(n, _)| *n == out).map(|(_, t)| t);
    match name {
        "argmax" => {
            // Two conv outputs of one window within rounding of each other.
            let (Some(conv), Some(t)) = (want.f32s.iter().find(|(n, _)| *n == "conv"), tol("conv")) else {
                return false;
            };
            let (Some(&x), Some(&y)) = (conv.1.get(a as usize), conv.1.get(b as usize)) else { return false };
            ((x - y).abs() as f64) <= t[a as usize] + t[b as usize]
        }
        "correct" => {
            // The first largest logit may differ when the top two are within rounding.
            let (logits, classes, t) = match case {
                OpCase::SoftmaxXent { classes, .. } => (host.f("logits"), *classes, None),
                OpCase::LinearXent { s, .. } => (want.f("logits"), s.out_features, tol("logits")),
                _ => return false,
            };
            let row = &logits[i * classes..][..classes];
            let mut sorted: Vec<f32> = row.to_vec();
            sorted.sort_by(|x, y| y.total_cmp(x));
            let slack =
                t.map_or(0.0, |t| 2.0 * t[i * classes..][..classes].iter().cloned().fold(0.0, f64::max));
            ((sorted[0] - sorted[1]).abs() as f64) <= slack
        }
        _ => false,
    }
}

/// Squares element-wise (for the sum of squared terms of a bilinear op).
fn sq(x: &[f32]) -> Vec<f32> {
    x.iter().map(|v| v * v).collect()
}

/// The tolerance of a reduction of `n` terms whose squares sum to `sum_sq`, around a result `x`
/// (see the module docs): 4 u sqrt(n sum t^2) + 8 u |x| + a floor of 2^-100 for exact zeros.
pub fn reduction_bound(x: f32, n: usize, sum_sq: f32) -> f64 {
    4.0 * U * (n as f64 * sum_sq.max(0.0) as f64).sqrt() + 8.0 * U * (x as f64).abs() + 1e-30
}

/// Per output, the per-element tolerance.
fn bounds(case: &OpCase, host: &Host, want: &Host) -> Vec<(&'static str, Vec<f64>)> {
    let mut out = Vec::new();
    let reduce = |vals: &[f32], sums: &[f32], n: usize| -> Vec<f64> {
        vals.iter().zip(sums).map(|(&x, &s)| reduction_bound(x, n, s)).collect()
    };
    let linear_fwd = |s: &LinearShape, input: &[f32], weight: &[f32], out: &[f32]| {
        let mut sums = vec![0.0; s.batch * s.out_features];
        let zero = vec![0.0; s.out_features];
        r::linear_forward(&mut sums, &sq(input), &sq(weight), &zero, s.batch, s.in_features, s.out_features);
        reduce(out, &sums, s.in_features + 1)
    };
    let linear_bwd = |s: &LinearShape,
                      dout: &[f32],
                      input: &[f32],
                      weight: &[f32],
                      dw: &[f32],
                      db: &[f32],
                      dinput: Option<&[f32]>| {
        let mut v = Vec::new();
        let (mut sw, mut sb) = (vec![0.0; s.weight_len()], vec![0.0; s.out_features]);
        r::linear_backward_weight(
            &mut sw,
            &mut sb,
            &sq(dout),
            &sq(input),
            s.batch,
            s.in_features,
            s.out_features,
        );
        v.push(("dweight", reduce(dw, &sw, s.batch)));
        v.push(("dbias", reduce(db, &sb, s.batch)));
        if let Some(di) = dinput {
            let mut si = vec![0.0; s.batch * s.in_features];
            r::linear_backward_input(&mut si, &sq(dout), &sq(weight), s.batch, s.in_features, s.out_features);
            v.push(("dinput", reduce(di, &si, s.out_features)));
        }
        v
    };
    // exp, log and the division of softmax on a GPU (WGSL: exp 3 + 2|x| ULP with |x| <= 12
    // here, log 3 ULP, division 2.5 ULP) and the sum of C exponentials: a relative error of
    // (3 + 24 + 2.5 + C) ULP on each probability; 2 ULP = 4 u each, doubled for both sides.
    let softmax = |logits: &[f32], classes: usize, batch: usize, dlogits: &[f32], losses: &[f32]| {
        let rel = 8.0 * U * (30.0 + classes as f64);
        let scale = 1.0 / batch as f64;
        let probs: Vec<f64> = logits
            .chunks(classes)
            .flat_map(|row| {
                let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                let e: Vec<f64> = row.iter().map(|&z| (z as f64 - m).exp()).collect();
                let sum: f64 = e.iter().sum();
                e.into_iter().map(move |x| x / sum)
            })
            .collect();
        let d: Vec<f64> =
            dlogits.iter().zip(&probs).map(|(&g, &p)| rel * p * scale + 8.0 * U * g.abs() as f64).collect();
        // loss = log(sum) - (z_label - max): log's error (3 ULP, absolute 2^-21 away from 1),
        // the sum's, and the subtraction's rounding.
        let l: Vec<f64> = losses.iter().map(|&x| 8.0 * U * x.abs() as f64 + rel + 2f64.powi(-20)).collect();
        vec![("dlogits", d), ("losses", l)]
    };
    match case {
        // Checked stage by stage (compare_head).
        OpCase::Gather { .. } | OpCase::Head(_) | OpCase::TrunkForward { .. } | OpCase::TrunkBackward(_) => {}
        OpCase::ConvReluPool(s) | OpCase::GatherConvReluPool { s, .. } => {
            let input = match case {
                OpCase::ConvReluPool(_) => host.f("input").to_vec(),
                _ => want.f("input").to_vec(),
            };
            let mut sums = vec![0.0; s.output_len()];
            let zero = vec![0.0; s.out_channels];
            r::conv2d_forward(&mut sums, &sq(&input), &sq(host.f("weight")), &zero, *s);
            let conv = reduce(want.f("conv"), &sums, s.in_channels * s.kernel * s.kernel + 1);
            let pooled = want.u("argmax").iter().map(|&i| conv[i as usize]).collect();
            out.push(("conv", conv));
            out.push(("pooled", pooled));
        }
        OpCase::Linear { s, .. } => {
            out.push(("out", linear_fwd(s, host.f("input"), host.f("weight"), want.f("out"))))
        }
        OpCase::SoftmaxXent { batch, classes } => {
            out.extend(softmax(host.f("logits"), *classes, *batch, want.f("dlogits"), want.f("losses")));
        }
        OpCase::LinearXent { s, mask } => {
            let logits_tol = linear_fwd(s, host.f("input"), host.f("weight"), want.f("logits"));
            // The logits' own error moves the softmax: d/dz of (p - y)/B is at most 1/B per unit.
            let max_logit_err = logits_tol.iter().cloned().fold(0.0, f64::max);
            let mut sm =
                softmax(want.f("logits"), s.out_features, s.batch, want.f("dlogits"), want.f("losses"));
            for (name, t) in sm.iter_mut() {
                let extra = if *name == "dlogits" {
                    2.0 * max_logit_err / s.batch as f64
                } else {
                    2.0 * max_logit_err
                };
                t.iter_mut().for_each(|x| *x += extra);
            }
            out.push(("logits", logits_tol));
            out.extend(sm);
            // The backward pass reads dlogits, which may differ by their tolerance: add the
            // propagated difference (|dW| <= sum_b |d dlogits| |x|, likewise for dinput).
            let dl_err = out.iter().find(|(n, _)| *n == "dlogits").map(|(_, t)| t.clone()).unwrap();
            let mut prop_w = vec![0.0f32; s.weight_len()];
            let mut prop_b = vec![0.0f32; s.out_features];
            let dl_err32: Vec<f32> = dl_err.iter().map(|&x| x as f32).collect();
            let abs_in: Vec<f32> = host.f("input").iter().map(|x| x.abs()).collect();
            r::linear_backward_weight(
                &mut prop_w,
                &mut prop_b,
                &dl_err32,
                &abs_in,
                s.batch,
                s.in_features,
                s.out_features,
            );
            let dinput = mask.map(|_| want.f("dinput"));
            let mut grads = linear_bwd(
                s,
                want.f("dlogits"),
                host.f("input"),
                host.f("weight"),
                want.f("dweight"),
                want.f("dbias"),
                dinput,
            );
            for (name, t) in grads.iter_mut() {
                let prop: Vec<f32> = match *name {
                    "dweight" => prop_w.clone(),
                    "dbias" => prop_b.clone(),
                    _ => {
                        let mut p = vec![0.0; s.batch * s.in_features];
                        let abs_w: Vec<f32> = host.f("weight").iter().map(|x| x.abs()).collect();
                        r::linear_backward_input(
                            &mut p,
                            &dl_err32,
                            &abs_w,
                            s.batch,
                            s.in_features,
                            s.out_features,
                        );
                        p
                    }
                };
                t.iter_mut().zip(prop).for_each(|(x, p)| *x += 1.01 * p as f64);
            }
            out.extend(grads);
        }
        OpCase::LinearBackward { s, mask } => {
            let dinput = mask.map(|_| want.f("dinput"));
            out.extend(linear_bwd(
                s,
                host.f("dout"),
                host.f("input"),
                host.f("weight"),
                want.f("dweight"),
                want.f("dbias"),
                dinput,
            ));
        }
        OpCase::ConvBackwardFromPool { s, dinput } => {
            let mut dconv = vec![0.0; s.output_len()];
            r::conv_grad_from_pool(&mut dconv, host.f("dpooled"), host.u("argmax"), host.f("conv"));
            let (mut sw, mut sb) = (vec![0.0; s.weight_len()], vec![0.0; s.out_channels]);
            r::conv2d_backward_weight(&mut sw, &mut sb, &sq(&dconv), &sq(host.f("input")), *s);
            let n = s.batch * s.out_height() * s.out_width();
            out.push(("dweight", reduce(want.f("dweight"), &sw, n)));
            out.push(("dbias", reduce(want.f("dbias"), &sb, n)));
            if *dinput {
                let mut si = vec![0.0; s.input_len()];
                r::conv2d_backward_input(&mut si, &sq(&dconv), &sq(host.f("weight")), *s);
                out.push(("dinput", reduce(want.f("dinput"), &si, s.out_channels * s.kernel * s.kernel)));
            }
        }
        OpCase::Update { lens, partials, step } => {
            // Each element's new state is a few roundings of its inputs: a mean of gradients (m)
            // or of their squares (v) takes 3 each, relative to the sizes of the terms; a sum of
            // steps g/avg (RMSprop's momentum buffer) takes the sqrt's and the division's 2.5 ULP
            // and two roundings more, relative to its old and new values. The parameter moves by d = p_old - p_new: its
            // error is a few roundings of d (sqrt and division may be 2.5 ULP on a GPU), plus
            // the rounding of p itself. The summed partials add one rounding per partial.
            let grads = split(host.f("grad"), lens, partials);
            let g: Vec<f64> = grads
                .iter()
                .zip(lens)
                .flat_map(|(t, &n)| (0..n).map(move |i| t.chunks(n).map(|c| c[i].abs() as f64).sum::<f64>()))
                .collect();
            let parts: Vec<f64> =
                lens.iter().zip(partials).flat_map(|(&n, &p)| std::iter::repeat_n(p as f64, n)).collect();
            let old = |name| host.f(name).iter().map(|&x| x.abs() as f64);
            let states: Vec<(&'static str, Vec<f64>)> = step
                .descriptor()
                .states
                .iter()
                .map(|state| {
                    let bound = old(state.name).zip(&g).zip(&parts).zip(want.f(state.name));
                    let bound = match state.scale {
                        Scale::Grad => bound.map(|(((m, g), p), _)| 8.0 * U * (m + g * p)).collect(),
                        Scale::GradSquared => bound
                            .map(|(((v, g), p), _)| 8.0 * U * (v + g * g * (1.0 + 2.0 * p * U)))
                            .collect(),
                        Scale::Step => {
                            bound.map(|(((b, _), _), &new)| 16.0 * U * (b + new.abs() as f64)).collect()
                        }
                    };
                    (state.name, bound)
                })
                .collect();
            let d: Vec<f64> = host
                .f("param")
                .iter()
                .zip(want.f("param"))
                .map(|(&a, &b)| 4.0 * U * b.abs() as f64 + 64.0 * U * (a as f64 - b as f64).abs())
                .collect();
            out.push(("param", d));
            out.extend(states);
        }
    }
    out
}

/// An [`Ops`] that records the [`OpCase`] of every op called through it, then calls `O`'s.
pub struct Trace<O: Ops> {
    pub inner: O,
    pub calls: Vec<OpCase>,
}

impl<O: Ops> Trace<O> {
    pub fn new(inner: O) -> Self {
        Trace { inner, calls: Vec::new() }
    }
}

impl<O: Ops> Ops for Trace<O> {
    type Buf<T: Elem> = O::Buf<T>;
    type Data = O::Data;

    fn name(&self) -> String {
        self.inner.name()
    }
    fn alloc<T: Elem>(&mut self, label: &str, len: usize) -> Result<O::Buf<T>> {
        self.inner.alloc(label, len)
    }
    fn upload<T: Elem>(&mut self, label: &str, data: &[T]) -> Result<O::Buf<T>> {
        self.inner.upload(label, data)
    }
    fn write<T: Elem>(&mut self, buf: &mut O::Buf<T>, data: &[T]) -> Result<()> {
        self.inner.write(buf, data)
    }
    fn read<T: Elem>(&mut self, buf: &O::Buf<T>) -> Result<Vec<T>> {
        self.inner.read(buf)
    }
    fn len<T: Elem>(&self, buf: &O::Buf<T>) -> usize {
        self.inner.len(buf)
    }
    fn upload_data(&mut self, label: &str, data: &Dataset) -> Result<O::Data> {
        self.inner.upload_data(label, data)
    }
    fn grad_partials(&self, op: GradOp) -> usize {
        self.inner.grad_partials(op)
    }

    fn gather(&mut self, g: Gather<Self>) -> Result<()> {
        // The data set behind the batch is opaque here: a case of as many random images as the
        // batch, shifted by up to 2 pixels, exercises the same kernel.
        let (side, b) = (crate::model::IMAGE_SIDE, g.batch.batch);
        self.calls.push(OpCase::Gather { batch: b, images: b, side, max_shift: 2 });
        self.inner.gather(g)
    }

    fn conv_relu_pool_forward(&mut self, input: &F32<O>, l: ConvLayer<Self>) -> Result<()> {
        self.calls.push(OpCase::ConvReluPool(l.s));
        self.inner.conv_relu_pool_forward(input, l)
    }

    fn gather_conv_relu_pool_forward(&mut self, g: Gather<Self>, l: ConvLayer<Self>) -> Result<()> {
        self.calls.push(OpCase::GatherConvReluPool { s: l.s, images: l.s.batch, max_shift: 2 });
        self.inner.gather_conv_relu_pool_forward(g, l)
    }

    fn linear_forward(&mut self, a: LinearForward<Self>) -> Result<()> {
        self.calls.push(OpCase::Linear { s: a.s, relu: a.relu });
        self.inner.linear_forward(a)
    }

    fn softmax_xent(&mut self, a: SoftmaxXent<Self>) -> Result<()> {
        self.calls.push(OpCase::SoftmaxXent { batch: a.batch, classes: a.classes });
        self.inner.softmax_xent(a)
    }

    fn linear_xent_forward_backward(&mut self, a: LinearXent<Self>) -> Result<()> {
        self.calls.push(OpCase::LinearXent { s: a.s, mask: relu_mask_of(&a.dinput) });
        self.inner.linear_xent_forward_backward(a)
    }

    fn linear_backward(&mut self, a: LinearBackward<Self>) -> Result<()> {
        self.calls.push(OpCase::LinearBackward { s: a.s, mask: relu_mask_of(&a.dinput) });
        self.inner.linear_backward(a)
    }

    fn conv_backward_from_pool(&mut self, a: ConvBackward<Self>) -> Result<()> {
        self.calls.push(OpCase::ConvBackwardFromPool { s: a.s, dinput: a.dinput.is_some() });
        self.inner.conv_backward_from_pool(a)
    }

    // The fused ops are recorded as themselves and run as `O` runs them: the fast CPU path's
    // step is these passes, so the CPU's bench has a row per pass, as the GPU's family has a row
    // per kernel.

    fn trunk_forward(&mut self, a: TrunkForward<Self>) -> Result<()> {
        self.calls.push(OpCase::TrunkForward { s: a.s, images: a.gather.batch.batch, max_shift: 2 });
        self.inner.trunk_forward(a)
    }

    fn head_forward_backward(&mut self, a: Head<Self>) -> Result<()> {
        self.calls.push(OpCase::Head(a.s));
        self.inner.head_forward_backward(a)
    }

    fn trunk_backward(&mut self, a: TrunkBackward<Self>) -> Result<()> {
        self.calls.push(OpCase::TrunkBackward(a.s));
        self.inner.trunk_backward(a)
    }

    fn update(&mut self, a: Update<Self>) -> Result<()> {
        let (lens, partials) = update_shapes(a.params, a.grads, |b| self.inner.len(b));
        self.calls.push(OpCase::Update { lens, partials, step: *a.step });
        self.inner.update(a)
    }
}

/// The ops one training step of LeNet-5 calls at `batch` on `O`, in order (for the bench's rows
/// on the CPU; on the GPU the recorded program carries them).
pub fn step_cases<O: Ops>(ops: O, batch: usize, optimizer: &Optimizer) -> Result<Vec<OpCase>> {
    use crate::model::{Params, TrainState};
    use crate::network::{train_step, Activations, StepOut, Weights};
    let mut t = Trace::new(ops);
    let state = TrainState::new(Params::init(0), *optimizer, 0, batch, false);
    let data = Dataset { images: vec![0; batch * 784], labels: vec![0; batch], rows: 28, cols: 28 };
    let dev = t.upload_data("train", &data)?;
    let mut w = Weights::upload(&mut t, &state.params, &state.moments, batch)?;
    let mut acts = Activations::for_training(&mut t, batch)?;
    let indices: Vec<u32> = (0..batch as u32).collect();
    let indices = t.upload("indices", &indices)?;
    let shifts = t.alloc("shifts", 2 * batch)?;
    let (mut losses, mut correct) = (t.alloc("losses", batch)?, t.alloc("correct", batch)?);
    let b = Batch { data: &dev, indices: &indices, shifts: &shifts, batch };
    let step = optimizer.step(1, optimizer.lr, None);
    train_step(&mut t, &mut w, &mut acts, &b, StepOut { losses: &mut losses, correct: &mut correct }, &step)?;
    Ok(t.calls)
}
