//! Finite-difference checks of every backward op of the CPU reference (src/reference.rs),
//! of the whole network's gradient with respect to every parameter tensor (src/network.rs, on
//! the reference ops and on the fast ones), and of the max-pool tie rule. The optimizers against
//! the torch formulas are in tests/optimizers.rs.
//!
//! Per-op checks are in f32. The objective is L = sum(out * R) for a fixed random R, accumulated
//! in f64. Convolution, linear, max-pool and ReLU are linear (or piecewise linear) in the
//! perturbed input, so a central difference has no truncation error; only the f32 rounding of
//! the outputs remains, which a large step (0.1 for the linear ops) makes small next to the
//! gradient. Piecewise-linear ops get inputs whose kinks (ReLU's zero, max-pool's ties) are
//! further away than the step. The denominator is the difference actually represented in f32.
//!
//! The whole-network check is in f64: an independent f64 twin of the loss (written here from
//! the layer definitions, not from the implementation) is differentiated numerically with a
//! step of 1e-6 (truncation ~1e-12, rounding ~1e-10) and compared with the f32 analytic
//! gradient, which differs from the exact one by f32 rounding (~1e-6 relative). Random inputs
//! and parameters keep ReLU kinks and pool ties away from the evaluation point.

// The checks perturb x[i] in place and compare with grad[i]: index loops are the clear form.
#![allow(clippy::needless_range_loop)]

use lenet::backend::{Backend, Chunk, OpsBackend};
use lenet::cpu::{fast, reference as ops, Fast, Reference};
use lenet::data::Dataset;
use lenet::model::*;
use lenet::ops::{ConvLayerArgs, Ops};
use lenet::optim::Optimizer;
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

fn unit(rng: &mut ChaCha8Rng) -> f32 {
    (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32
}

fn uniform(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| lo + (hi - lo) * unit(rng)).collect()
}

fn weighted_sum(out: &[f32], r: &[f32]) -> f64 {
    out.iter().zip(r).map(|(&o, &r)| o as f64 * r as f64).sum()
}

/// Central difference of `f` with respect to `x[i]`, with the step actually taken in f32.
fn central_diff(x: &mut [f32], i: usize, h: f32, mut f: impl FnMut(&[f32]) -> f64) -> f64 {
    let orig = x[i];
    x[i] = orig + h;
    let plus_x = x[i];
    let plus = f(x);
    x[i] = orig - h;
    let minus_x = x[i];
    let minus = f(x);
    x[i] = orig;
    (plus - minus) / (plus_x as f64 - minus_x as f64)
}

#[track_caller]
fn check(what: &str, analytic: f32, numeric: f64, abs: f64, rel: f64) {
    let err = (analytic as f64 - numeric).abs();
    assert!(
        err <= abs + rel * numeric.abs(),
        "{what}: analytic {analytic} numeric {numeric} (error {err:e})"
    );
}

/// Checks a layer's analytic gradients `grads` (input, weight, bias) against central differences
/// of `loss(input, weight, bias)` at every element of each of `args`, in that order, with a step
/// of 0.1 (the layers are linear in each argument); `what` prefixes each element's name.
fn check_layer_gradients(
    what: &str,
    args: [&[f32]; 3],
    grads: [&[f32]; 3],
    mut loss: impl FnMut(&[f32], &[f32], &[f32]) -> f64,
) {
    for (k, name) in ["dinp", "dweight", "dbias"].into_iter().enumerate() {
        let mut perturbed = args[k].to_vec();
        for i in 0..perturbed.len() {
            let n = central_diff(&mut perturbed, i, 0.1, |x| {
                let mut at = args;
                at[k] = x;
                loss(at[0], at[1], at[2])
            });
            check(&format!("{what}{name}[{i}]"), grads[k][i], n, 2e-5, 2e-4);
        }
    }
}

/// Up to `count` distinct random indices below `n` (all of them if n <= count).
fn sample(rng: &mut ChaCha8Rng, n: usize, count: usize) -> Vec<usize> {
    if n <= count {
        return (0..n).collect();
    }
    let mut v: Vec<usize> = Vec::new();
    while v.len() < count {
        let i = rng.next_u32() as usize % n;
        if !v.contains(&i) {
            v.push(i);
        }
    }
    v
}

#[test]
fn conv2d_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for padding in [0, 2] {
        let s =
            ConvShape { batch: 2, in_channels: 3, out_channels: 4, height: 8, width: 7, kernel: 5, padding };
        let inp = uniform(&mut rng, s.input_len(), -1.0, 1.0);
        let w = uniform(&mut rng, s.weight_len(), -0.5, 0.5);
        let b = uniform(&mut rng, s.out_channels, -0.5, 0.5);
        let r = uniform(&mut rng, s.output_len(), -1.0, 1.0);
        let mut out = vec![0.0; s.output_len()];
        let loss = |inp: &[f32], w: &[f32], b: &[f32]| {
            ops::conv2d_forward(&mut out, inp, w, b, s);
            weighted_sum(&out, &r)
        };

        let mut dinp = vec![0.0; s.input_len()];
        ops::conv2d_backward_input(&mut dinp, &r, &w, s);
        let (mut dw, mut db) = (vec![0.0; s.weight_len()], vec![0.0; s.out_channels]);
        ops::conv2d_backward_weight(&mut dw, &mut db, &r, &inp, s);

        // Every input element, corners and padded borders included.
        check_layer_gradients(&format!("pad {padding} "), [&inp, &w, &b], [&dinp, &dw, &db], loss);
    }
}

#[test]
fn maxpool_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (batch, channels, h, w) = (2, 3, 6, 4);
    let n = batch * channels * h * w;
    // Distinct values 0.01 apart in random order: no window has a near-tie within the step.
    let mut inp: Vec<f32> = (0..n).map(|i| i as f32 * 0.01 - 0.5).collect();
    for i in (1..n).rev() {
        inp.swap(i, rng.next_u32() as usize % (i + 1));
    }
    let r = uniform(&mut rng, n / 4, -1.0, 1.0);
    let (mut out, mut argmax) = (vec![0.0; n / 4], vec![0; n / 4]);
    ops::maxpool2x2_forward(&mut out, &mut argmax, &inp, batch, channels, h, w);
    let mut dinp = vec![0.0; n];
    ops::maxpool2x2_backward(&mut dinp, &r, &argmax);
    let mut am = argmax.clone();
    for i in 0..n {
        let num = central_diff(&mut inp, i, 1e-3, |x| {
            ops::maxpool2x2_forward(&mut out, &mut am, x, batch, channels, h, w);
            weighted_sum(&out, &r)
        });
        check(&format!("maxpool dinp[{i}]"), dinp[i], num, 2e-5, 2e-4);
    }
}

#[test]
fn linear_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (batch, fin, fout) = (3, 7, 5);
    let x = uniform(&mut rng, batch * fin, -1.0, 1.0);
    let w = uniform(&mut rng, fout * fin, -0.5, 0.5);
    let b = uniform(&mut rng, fout, -0.5, 0.5);
    let r = uniform(&mut rng, batch * fout, -1.0, 1.0);
    let mut out = vec![0.0; batch * fout];
    let loss = |x: &[f32], w: &[f32], b: &[f32]| {
        ops::linear_forward(&mut out, x, w, b, batch, fin, fout);
        weighted_sum(&out, &r)
    };
    let mut dx = vec![0.0; batch * fin];
    ops::linear_backward_input(&mut dx, &r, &w, batch, fin, fout);
    let (mut dw, mut db) = (vec![0.0; fout * fin], vec![0.0; fout]);
    ops::linear_backward_weight(&mut dw, &mut db, &r, &x, batch, fin, fout);
    check_layer_gradients("linear ", [&x, &w, &b], [&dx, &dw, &db], loss);
}

#[test]
fn relu_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let n = 200;
    // |x| >= 0.05, so a step of 0.01 never crosses the kink; both signs present.
    let mut x: Vec<f32> =
        (0..n).map(|_| (0.05 + unit(&mut rng)) * if rng.next_u32() % 2 == 0 { 1.0 } else { -1.0 }).collect();
    let r = uniform(&mut rng, n, -1.0, 1.0);
    let mut out = vec![0.0; n];
    ops::relu_forward(&mut out, &x);
    assert!(out.contains(&0.0) && out.iter().any(|&y| y > 0.0));
    let mut dx = vec![0.0; n];
    ops::relu_backward(&mut dx, &r, &out);
    let mut o = out.clone();
    for i in 0..n {
        let num = central_diff(&mut x, i, 0.01, |v| {
            ops::relu_forward(&mut o, v);
            weighted_sum(&o, &r)
        });
        check(&format!("relu dinp[{i}]"), dx[i], num, 1e-5, 1e-4);
    }
}

#[test]
fn softmax_xent_dlogits_match_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for batch in [1, 3] {
        let classes = 10;
        let mut logits = uniform(&mut rng, batch * classes, -3.0, 3.0);
        let labels: Vec<u32> = (0..batch).map(|_| rng.next_u32() % classes as u32).collect();
        let mut dl = vec![0.0; batch * classes];
        let (mut losses, mut correct) = (vec![0.0; batch], vec![0; batch]);
        ops::softmax_xent(&mut dl, &mut losses, &mut correct, &logits, &labels, batch, classes);
        let mut scratch = vec![0.0; batch * classes];
        for i in 0..logits.len() {
            // The loss is the batch mean of f32 losses (~2.5e-7 rounding): a step of 1e-2 keeps
            // rounding/step at ~2e-5 and the truncation error (h^2/6 * f''') at ~2e-5.
            let num = central_diff(&mut logits, i, 1e-2, |z| {
                ops::softmax_xent(&mut scratch, &mut losses, &mut correct, z, &labels, batch, classes);
                losses.iter().map(|&l| l as f64).sum::<f64>() / batch as f64
            });
            check(&format!("batch {batch} dlogits[{i}]"), dl[i], num, 2e-4, 1e-2);
        }
    }
}

// ---- The whole network, against an independent f64 twin of the loss. ----

/// conv (stride 1, square kernel, zero padding) + bias + ReLU, one image at a time, in f64.
#[allow(clippy::too_many_arguments)]
fn conv_relu64(
    x: &[f64],
    cin: usize,
    side: usize,
    w: &[f64],
    b: &[f64],
    cout: usize,
    k: usize,
    pad: usize,
) -> Vec<f64> {
    let os = side + 2 * pad + 1 - k;
    let mut out = vec![0.0; cout * os * os];
    for co in 0..cout {
        for oy in 0..os {
            for ox in 0..os {
                let mut acc = b[co];
                for ci in 0..cin {
                    for ky in 0..k {
                        for kx in 0..k {
                            let (iy, ix) =
                                ((oy + ky) as isize - pad as isize, (ox + kx) as isize - pad as isize);
                            if (0..side as isize).contains(&iy) && (0..side as isize).contains(&ix) {
                                acc += w[((co * cin + ci) * k + ky) * k + kx]
                                    * x[(ci * side + iy as usize) * side + ix as usize];
                            }
                        }
                    }
                }
                out[(co * os + oy) * os + ox] = acc.max(0.0);
            }
        }
    }
    out
}

fn pool64(x: &[f64], c: usize, side: usize) -> Vec<f64> {
    let os = side / 2;
    let mut out = vec![0.0; c * os * os];
    for ch in 0..c {
        for y in 0..os {
            for xx in 0..os {
                let at = |dy: usize, dx: usize| x[(ch * side + 2 * y + dy) * side + 2 * xx + dx];
                out[(ch * os + y) * os + xx] = at(0, 0).max(at(0, 1)).max(at(1, 0)).max(at(1, 1));
            }
        }
    }
    out
}

fn dense64(x: &[f64], w: &[f64], b: &[f64], relu: bool) -> Vec<f64> {
    b.iter()
        .enumerate()
        .map(|(o, &bo)| {
            let z = bo + x.iter().zip(&w[o * x.len()..][..x.len()]).map(|(a, b)| a * b).sum::<f64>();
            if relu {
                z.max(0.0)
            } else {
                z
            }
        })
        .collect()
}

/// Mean softmax cross-entropy of LeNet-5 over the batch, in f64. The layers are the layer
/// table's ([`LENET5`], its shapes from [`layer_shapes`]): the topology is stated once, in
/// network.rs; the arithmetic of each kind of layer is written here from its definition.
fn loss64(p: &[Vec<f64>], images: &[f64], labels: &[u32]) -> f64 {
    let shapes = layer_shapes(1);
    let mut total = 0.0;
    for (img, &label) in images.chunks(IMAGE_PIXELS).zip(labels) {
        let mut a = img.to_vec();
        for (l, (layer, shape)) in LENET5.iter().zip(&shapes).enumerate() {
            let (w, b) = layer_params(l);
            a = match (layer.kind, *shape) {
                (LayerKind::ConvReluPool { .. }, LayerShape::Conv(s)) => {
                    let conv = conv_relu64(
                        &a,
                        s.in_channels,
                        s.height,
                        &p[w],
                        &p[b],
                        s.out_channels,
                        s.kernel,
                        s.padding,
                    );
                    pool64(&conv, s.out_channels, s.out_height())
                }
                (LayerKind::Linear { relu, .. }, LayerShape::Linear(_)) => dense64(&a, &p[w], &p[b], relu),
                (kind, shape) => panic!("{}: kind {kind:?} with shape {shape:?}", layer.name),
            };
        }
        let z = a;
        let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + z.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
        total += lse - z[label as usize];
    }
    total / labels.len() as f64
}

/// `batch` 28x28 images of random pixels, each with a random label.
fn random_images(rng: &mut ChaCha8Rng, batch: usize) -> Dataset {
    let images: Vec<u8> = (0..batch * IMAGE_PIXELS).map(|_| rng.next_u32() as u8).collect();
    let labels: Vec<u8> = (0..batch).map(|_| (rng.next_u32() % 10) as u8).collect();
    Dataset { images, labels, rows: 28, cols: 28 }
}

/// The gradients of one step of `backend` on `pixels`/`labels` from `params`, and its loss.
fn step_gradients<B: Backend + ?Sized>(
    backend: &mut B,
    grads: impl Fn(&mut B) -> Params,
    params: &Params,
    batch: usize,
) -> (f32, Params) {
    let state = TrainState::new(params.clone(), Optimizer::default(), 0, batch, false);
    backend.load_state(&state).unwrap();
    let opt = state.optimizer;
    let chunk = Chunk {
        batch,
        indices: (0..batch as u32).collect(),
        shifts: vec![0; 2 * batch],
        steps: vec![opt.step(1, opt.lr, None)],
    };
    let loss = backend.train_steps(&chunk).unwrap()[0].loss;
    (loss, grads(backend))
}

/// The fast path's training step (its gradients and its loss) has the same bits on 1, 2 and 3
/// threads: every reduction splits its work the same way whatever the pool.
#[test]
fn a_training_step_is_bit_identical_on_any_thread_count() {
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let batch = 37;
    let data = random_images(&mut rng, batch);
    let params = Params::init(9);
    let run = || {
        let mut fast = OpsBackend::with_ops(Fast, "cpu", "fast".into(), &data).unwrap();
        let (loss, grads) = step_gradients(&mut fast, |b| b.gradients().unwrap(), &params, batch);
        (loss.to_bits(), grads)
    };
    let results: Vec<_> = [1, 2, 3]
        .iter()
        .map(|&t| rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap().install(run))
        .collect();
    assert!(results[0].1.all_finite());
    assert!(results.iter().all(|r| *r == results[0]), "the step's bits depend on the thread count");
}

#[test]
fn network_gradient_matches_f64_finite_differences_for_every_parameter_tensor() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let batch = 3;
    let data = random_images(&mut rng, batch);
    let labels: Vec<u32> = data.labels.iter().map(|&l| l as u32).collect();
    let params = Params::init(42);

    let images: Vec<f64> = data.images.iter().map(|&x| (x as f32 / 255.0) as f64).collect();
    let mut p64: Vec<Vec<f64>> =
        params.tensors.iter().map(|t| t.iter().map(|&x| x as f64).collect()).collect();
    let l0 = loss64(&p64, &images, &labels);
    let mut reference = OpsBackend::with_ops(Reference, "cpu", "reference".into(), &data).unwrap();
    let mut fast = OpsBackend::with_ops(Fast, "cpu", "fast".into(), &data).unwrap();
    let runs = [
        ("reference", step_gradients(&mut reference, |b| b.gradients().unwrap(), &params, batch)),
        ("fast", step_gradients(&mut fast, |b| b.gradients().unwrap(), &params, batch)),
    ];
    for (name, (loss, grads)) in &runs {
        assert!((*loss as f64 - l0).abs() < 1e-5 * l0.abs(), "{name} loss: f32 {loss} f64 {l0}");
        let h = 1e-6;
        for (t, spec) in param_specs().iter().enumerate() {
            let g = &grads.tensors[t];
            assert_eq!(g.len(), spec.len());
            assert!(g.iter().all(|x| x.is_finite()));
            // The tensor's gradient scale, for an absolute floor that suits its size.
            let scale = g.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
            assert!(scale > 0.0, "{}: gradient is all zero", spec.name);
            for i in sample(&mut rng, spec.len(), 8) {
                let orig = p64[t][i];
                p64[t][i] = orig + h;
                let plus = loss64(&p64, &images, &labels);
                p64[t][i] = orig - h;
                let minus = loss64(&p64, &images, &labels);
                p64[t][i] = orig;
                let num = (plus - minus) / (2.0 * h);
                check(&format!("{name} {}[{i}]", spec.name), g[i], num, 1e-4 * scale + 1e-7, 2e-3);
            }
        }
    }
}

// ---- Max-pool ties: exactly one element per window, the first in row-major order. ----

#[test]
fn maxpool_ties_route_the_gradient_to_the_first_maximum() {
    // One 2x4 plane holding two windows per row pair; batch 2 x 2 channels of 4x4, 16 windows.
    // Window patterns (row-major a b / c d), each a different tie.
    let patterns: [[f32; 4]; 8] = [
        [1.0, 1.0, 1.0, 1.0],     // all tied: a
        [0.0, 2.0, 0.0, 2.0],     // b and d: b
        [0.0, 0.0, 3.0, 3.0],     // c and d: c
        [5.0, 0.0, 0.0, 5.0],     // a and d: a
        [-1.0, -1.0, -2.0, -1.0], // negative ties: a
        [0.0, 0.0, 0.0, 0.0],     // zeros (ReLU outputs): a
        [0.5, 0.7, 0.7, 0.1],     // b and c: b
        [0.1, 0.2, 0.3, 0.4],     // no tie: d
    ];
    let first = [0usize, 1, 2, 0, 0, 0, 1, 3];
    let (batch, channels, h, w) = (2, 2, 4, 4);
    let n = batch * channels * h * w;
    let mut inp = vec![0.0f32; n];
    let mut expected_pos = vec![0usize; n / 4];
    for win in 0..n / 4 {
        let (plane, wy, wx) = (win / 4, (win % 4) / 2, win % 2);
        let pat = win % patterns.len();
        for (j, &val) in patterns[pat].iter().enumerate() {
            inp[(plane * h + 2 * wy + j / 2) * w + 2 * wx + j % 2] = val;
        }
        let j = first[pat];
        expected_pos[win] = (plane * h + 2 * wy + j / 2) * w + 2 * wx + j % 2;
    }
    let dout: Vec<f32> = (0..n / 4).map(|i| 1.0 + i as f32).collect();

    // The fast path pools inside its fused conv + ReLU + pool: through a 1x1 identity
    // convolution (exact: x * 1 + y * 0) of the input moved up by 3 (all positive, so the ReLU
    // passes everything; the same ties and order), its argmax must be the reference's.
    let s = ConvShape {
        batch,
        in_channels: channels,
        out_channels: channels,
        height: h,
        width: w,
        kernel: 1,
        padding: 0,
    };
    let identity: Vec<f32> =
        (0..channels * channels).map(|i| (i / channels == i % channels) as u8 as f32).collect();
    let lifted: Vec<f32> = inp.iter().map(|x| x + 3.0).collect();
    let (mut conv, mut pooled, mut fast_argmax) = (vec![0.0; n], vec![0.0; n / 4], vec![0u32; n / 4]);
    let bias = vec![0.0; channels];
    let l = ConvLayerArgs {
        weight: &identity,
        bias: &bias,
        conv: &mut conv,
        pooled: &mut pooled,
        argmax: &mut fast_argmax,
        s,
    };
    Fast.conv_relu_pool_forward(&lifted, l).unwrap();
    assert_eq!(conv, lifted, "the identity convolution is exact");
    let fast_argmax: Vec<usize> = fast_argmax.iter().map(|&i| i as usize).collect();
    assert_eq!(fast_argmax, expected_pos, "fast argmax");
    {
        let name = "reference";
        let (mut out, mut argmax) = (vec![0.0; n / 4], vec![0u32; n / 4]);
        ops::maxpool2x2_forward(&mut out, &mut argmax, &inp, batch, channels, h, w);
        let am: Vec<usize> = argmax.iter().map(|&i| i as usize).collect();
        assert_eq!(am, expected_pos, "{name} argmax");
        let mut dinp = vec![f32::NAN; n];
        ops::maxpool2x2_backward(&mut dinp, &dout, &argmax);
        // The fast path's pool backward (with the ReLU mask of a positive input: all pass).
        let mut dinp_fast = vec![f32::NAN; n];
        let positive: Vec<f32> = inp.iter().map(|x| x.abs() + 1.0).collect();
        fast::maxpool2x2_relu_backward(&mut dinp_fast, &dout, &argmax, &positive, batch, channels, h, w);
        assert_eq!(dinp, dinp_fast);
        for (win, &pos) in expected_pos.iter().enumerate() {
            let (plane, wy, wx) = (win / 4, (win % 4) / 2, win % 2);
            let cells: Vec<usize> =
                (0..4).map(|j| (plane * h + 2 * wy + j / 2) * w + 2 * wx + j % 2).collect();
            let nonzero: Vec<usize> = cells.iter().copied().filter(|&c| dinp[c] != 0.0).collect();
            assert_eq!(nonzero, vec![pos], "{name}: window {win} gradient goes to exactly one cell");
            assert_eq!(dinp[pos], dout[win]);
        }
    }
}
