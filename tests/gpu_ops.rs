//! Every GPU kernel against its CPU twin in `lenet::cpu::ops`, on fresh seeded random inputs, for
//! batch 1, batches that are not multiples of any workgroup size, the real LeNet-5 shapes and a
//! larger batch. Outputs are poisoned (NaN / u32::MAX) before every run, so an element the kernel
//! forgot fails the comparison.

mod common;

use common::*;
use lenet::cpu::ops as cpu;
use lenet::gpu::ops as gpu;
use lenet::model::{self, AdamConfig, ConvShape};

const BATCHES: [usize; 4] = [1, 7, 13, 64];

fn conv_shapes() -> Vec<ConvShape> {
    let mut v = Vec::new();
    for &b in &BATCHES {
        v.push(model::conv1_shape(b));
        v.push(model::conv2_shape(b));
    }
    // Not LeNet: non-square input, other kernel and padding, several in/out channels.
    v.push(ConvShape {
        batch: 3,
        in_channels: 3,
        out_channels: 5,
        height: 9,
        width: 11,
        kernel: 3,
        padding: 1,
    });
    v
}

fn squares(x: &[f32]) -> Vec<f32> {
    x.iter().map(|v| v * v).collect()
}

#[test]
fn conv2d_forward_and_fused_bias_relu() {
    let Some(ctx) = gpu() else { return };
    let mut r = rng(1);
    for s in conv_shapes() {
        let inp = uniform(&mut r, s.input_len(), -1.0, 1.0);
        let bound = 1.0 / ((s.in_channels * s.kernel * s.kernel) as f32).sqrt();
        let w = uniform(&mut r, s.weight_len(), -bound, bound);
        let b = uniform(&mut r, s.out_channels, -bound, bound);
        let mut want = vec![0.0; s.output_len()];
        cpu::conv2d_forward(&mut want, &inp, &w, &b, s);
        let mut got = nan(s.output_len());
        gpu::conv2d_forward(&ctx, &mut got, &inp, &w, &b, s).unwrap();
        assert_close(&format!("conv2d_forward {s:?}"), &got, &want);

        let mut want_relu = vec![0.0; s.output_len()];
        cpu::relu_forward(&mut want_relu, &want);
        let mut got = nan(s.output_len());
        gpu::conv2d_bias_relu_forward(&ctx, &mut got, &inp, &w, &b, s).unwrap();
        assert_close(&format!("conv2d_bias_relu_forward {s:?}"), &got, &want_relu);
    }
}

#[test]
fn conv2d_backward_input() {
    let Some(ctx) = gpu() else { return };
    let mut r = rng(2);
    for s in conv_shapes() {
        let dout = uniform(&mut r, s.output_len(), -1.0, 1.0);
        let w = uniform(&mut r, s.weight_len(), -0.5, 0.5);
        let mut want = vec![0.0; s.input_len()];
        cpu::conv2d_backward_input(&mut want, &dout, &w, s);
        let mut got = nan(s.input_len());
        gpu::conv2d_backward_input(&ctx, &mut got, &dout, &w, s).unwrap();
        assert_close(&format!("conv2d_backward_input {s:?}"), &got, &want);
    }
}

#[test]
fn conv2d_backward_weight() {
    let Some(ctx) = gpu() else { return };
    let mut r = rng(3);
    for s in conv_shapes() {
        let dout = uniform(&mut r, s.output_len(), -1.0, 1.0);
        let inp = uniform(&mut r, s.input_len(), -1.0, 1.0);
        let (mut want_w, mut want_b) = (vec![0.0; s.weight_len()], vec![0.0; s.out_channels]);
        cpu::conv2d_backward_weight(&mut want_w, &mut want_b, &dout, &inp, s);
        // The sums of squared terms, for the reduction tolerance.
        let (mut sq_w, mut sq_b) = (vec![0.0; s.weight_len()], vec![0.0; s.out_channels]);
        cpu::conv2d_backward_weight(&mut sq_w, &mut sq_b, &squares(&dout), &squares(&inp), s);
        let (mut got_w, mut got_b) = (nan(s.weight_len()), nan(s.out_channels));
        gpu::conv2d_backward_weight(&ctx, &mut got_w, &mut got_b, &dout, &inp, s).unwrap();
        let n = s.batch * s.out_height() * s.out_width();
        assert_close_with(&format!("conv2d_backward_weight dW {s:?}"), &got_w, &want_w, |i| {
            reduction_tol(want_w[i], n, sq_w[i])
        });
        assert_close_with(&format!("conv2d_backward_weight db {s:?}"), &got_b, &want_b, |i| {
            reduction_tol(want_b[i], n, sq_b[i])
        });
    }
}

/// (batch, channels, height, width) of pool1 and pool2 at every test batch, and an odd one.
fn pool_shapes() -> Vec<(usize, usize, usize, usize)> {
    let mut v = Vec::new();
    for &b in &BATCHES {
        v.push((b, model::CONV1_CHANNELS, model::CONV1_SIDE, model::CONV1_SIDE));
        v.push((b, model::CONV2_CHANNELS, model::CONV2_SIDE, model::CONV2_SIDE));
    }
    v.push((3, 5, 6, 12));
    v
}

#[test]
fn maxpool2x2_forward_with_ties() {
    let Some(ctx) = gpu() else { return };
    let mut r = rng(4);
    for (b, c, h, w) in pool_shapes() {
        let n = b * c * h * w;
        // Continuous values, and values from {0, 1, 2} (ties in most windows: the first maximum
        // in row-major order must win, exactly).
        let ties: Vec<f32> = (0..n).map(|_| below(&mut r, 3) as f32).collect();
        for inp in [uniform(&mut r, n, -1.0, 1.0), ties] {
            let (mut want, mut want_arg) = (vec![0.0; n / 4], vec![0u32; n / 4]);
            cpu::maxpool2x2_forward(&mut want, &mut want_arg, &inp, b, c, h, w);
            let (mut got, mut got_arg) = (nan(n / 4), vec![u32::MAX; n / 4]);
            gpu::maxpool2x2_forward(&ctx, &mut got, &mut got_arg, &inp, b, c, h, w).unwrap();
            assert_eq!(got, want, "maxpool2x2_forward values {b}x{c}x{h}x{w}");
            assert_eq!(got_arg, want_arg, "maxpool2x2_forward argmax {b}x{c}x{h}x{w}");
        }
    }
}

#[test]
fn maxpool2x2_backward_and_fused_relu_backward() {
    let Some(ctx) = gpu() else { return };
    let mut r = rng(5);
    for (b, c, h, w) in pool_shapes() {
        let n = b * c * h * w;
        // A ReLU output with exact zeros and ties, pooled as the trainer pools it.
        let conv_out: Vec<f32> =
            uniform(&mut r, n, -1.0, 1.0).iter().map(|x| (x * 2.0).round().max(0.0)).collect();
        let (mut pooled, mut arg) = (vec![0.0; n / 4], vec![0u32; n / 4]);
        cpu::maxpool2x2_forward(&mut pooled, &mut arg, &conv_out, b, c, h, w);
        let dout = uniform(&mut r, n / 4, -1.0, 1.0);

        let mut want = vec![0.0; n];
        cpu::maxpool2x2_backward(&mut want, &dout, &arg);
        let mut got = nan(n);
        gpu::maxpool2x2_backward(&ctx, &mut got, &dout, &arg, b, c, h, w).unwrap();
        assert_eq!(got, want, "maxpool2x2_backward {b}x{c}x{h}x{w}");

        let mut want_masked = vec![0.0; n];
        cpu::relu_backward(&mut want_masked, &want, &conv_out);
        let mut got = nan(n);
        gpu::maxpool2x2_relu_backward(&ctx, &mut got, &dout, &arg, &conv_out, b, c, h, w).unwrap();
        assert_eq!(got, want_masked, "maxpool2x2_relu_backward {b}x{c}x{h}x{w}");
    }
}

/// (batch, in, out): fc1, fc2, fc3 at every test batch, and shapes that are not multiples of 16.
fn linear_shapes() -> Vec<(usize, usize, usize)> {
    let mut v = Vec::new();
    for &b in &BATCHES {
        v.push((b, model::FC1_IN, model::FC1_OUT));
        v.push((b, model::FC1_OUT, model::FC2_OUT));
        v.push((b, model::FC2_OUT, model::FC3_OUT));
    }
    v.push((5, 17, 33));
    v.push((40, 1, 3));
    v
}

#[test]
fn linear_forward_and_fused_relu() {
    let Some(ctx) = gpu() else { return };
    let mut r = rng(6);
    for (b, i, o) in linear_shapes() {
        let inp = uniform(&mut r, b * i, -1.0, 1.0);
        let bound = 1.0 / (i as f32).sqrt();
        let w = uniform(&mut r, o * i, -bound, bound);
        let bias = uniform(&mut r, o, -bound, bound);
        let mut want = vec![0.0; b * o];
        cpu::linear_forward(&mut want, &inp, &w, &bias, b, i, o);
        let mut got = nan(b * o);
        gpu::linear_forward(&ctx, &mut got, &inp, &w, &bias, b, i, o).unwrap();
        assert_close(&format!("linear_forward {b}x{i}->{o}"), &got, &want);

        let mut want_relu = vec![0.0; b * o];
        cpu::relu_forward(&mut want_relu, &want);
        let mut got = nan(b * o);
        gpu::linear_relu_forward(&ctx, &mut got, &inp, &w, &bias, b, i, o).unwrap();
        assert_close(&format!("linear_relu_forward {b}x{i}->{o}"), &got, &want_relu);
    }
}

#[test]
fn linear_backward_input_and_fused_relu_mask() {
    let Some(ctx) = gpu() else { return };
    let mut r = rng(7);
    for (b, i, o) in linear_shapes() {
        let dout = uniform(&mut r, b * o, -1.0, 1.0);
        let w = uniform(&mut r, o * i, -0.3, 0.3);
        let act: Vec<f32> = uniform(&mut r, b * i, -1.0, 1.0).iter().map(|x| x.max(0.0)).collect();
        let mut want = vec![0.0; b * i];
        cpu::linear_backward_input(&mut want, &dout, &w, b, i, o);
        let mut got = nan(b * i);
        gpu::linear_backward_input(&ctx, &mut got, &dout, &w, b, i, o).unwrap();
        assert_close(&format!("linear_backward_input {b}x{i}->{o}"), &got, &want);

        let mut want_masked = vec![0.0; b * i];
        cpu::relu_backward(&mut want_masked, &want, &act);
        let mut got = nan(b * i);
        gpu::linear_relu_backward_input(&ctx, &mut got, &dout, &w, &act, b, i, o).unwrap();
        assert_close(&format!("linear_relu_backward_input {b}x{i}->{o}"), &got, &want_masked);
    }
}

#[test]
fn linear_backward_weight() {
    let Some(ctx) = gpu() else { return };
    let mut r = rng(8);
    for (b, i, o) in linear_shapes() {
        let dout = uniform(&mut r, b * o, -1.0, 1.0);
        let inp = uniform(&mut r, b * i, -1.0, 1.0);
        let (mut want_w, mut want_b) = (vec![0.0; o * i], vec![0.0; o]);
        cpu::linear_backward_weight(&mut want_w, &mut want_b, &dout, &inp, b, i, o);
        let (mut sq_w, mut sq_b) = (vec![0.0; o * i], vec![0.0; o]);
        cpu::linear_backward_weight(&mut sq_w, &mut sq_b, &squares(&dout), &squares(&inp), b, i, o);
        let (mut got_w, mut got_b) = (nan(o * i), nan(o));
        gpu::linear_backward_weight(&ctx, &mut got_w, &mut got_b, &dout, &inp, b, i, o).unwrap();
        assert_close_with(&format!("linear_backward_weight dW {b}x{i}->{o}"), &got_w, &want_w, |k| {
            reduction_tol(want_w[k], b, sq_w[k])
        });
        assert_close_with(&format!("linear_backward_weight db {b}x{i}->{o}"), &got_b, &want_b, |k| {
            reduction_tol(want_b[k], b, sq_b[k])
        });
    }
}

#[test]
fn relu_forward_and_backward() {
    let Some(ctx) = gpu() else { return };
    let mut r = rng(9);
    for n in [1, 7, 255, 257, 64 * 6 * 28 * 28] {
        let inp = uniform(&mut r, n, -1.0, 1.0);
        let mut want = vec![0.0; n];
        cpu::relu_forward(&mut want, &inp);
        let mut got = nan(n);
        gpu::relu_forward(&ctx, &mut got, &inp).unwrap();
        assert_eq!(got, want, "relu_forward {n}");

        let dout = uniform(&mut r, n, -1.0, 1.0);
        let mut want_d = vec![0.0; n];
        cpu::relu_backward(&mut want_d, &dout, &want);
        let mut got_d = nan(n);
        gpu::relu_backward(&ctx, &mut got_d, &dout, &want).unwrap();
        assert_eq!(got_d, want_d, "relu_backward {n}");
    }
}

#[test]
fn softmax_xent_forward_backward() {
    let Some(ctx) = gpu() else { return };
    let mut r = rng(10);
    // 300 > the kernel's 256 invocations: some invocations handle two samples.
    for b in [1, 7, 13, 64, 300] {
        let c = model::CLASSES;
        let logits = uniform(&mut r, b * c, -5.0, 5.0);
        let labels: Vec<u32> = (0..b).map(|_| below(&mut r, c as u32)).collect();
        let mut want = vec![0.0; b * c];
        let want_r = cpu::softmax_xent_forward_backward(&mut want, &logits, &labels, b, c);
        let mut got = nan(b * c);
        let got_r = gpu::softmax_xent_forward_backward(&ctx, &mut got, &logits, &labels, b, c).unwrap();
        assert_close(&format!("softmax_xent dlogits batch {b}"), &got, &want);
        assert_eq!(got_r.correct, want_r.correct, "correct count, batch {b}");
        // The mean loss is a sum over the batch in another order (CPU: f64; GPU: f32 tree).
        let t = tol(want_r.loss);
        assert!(
            (got_r.loss - want_r.loss).abs() <= t,
            "loss batch {b}: gpu {} cpu {}",
            got_r.loss,
            want_r.loss
        );
    }
}

#[test]
fn adam_update() {
    let Some(ctx) = gpu() else { return };
    let mut r = rng(11);
    let config = AdamConfig::default();
    for (n, t) in [(1, 1), (7, 2), (1000, 10), (model::param_count(), 1000)] {
        let grad = uniform(&mut r, n, -1.0, 1.0);
        let param = uniform(&mut r, n, -0.5, 0.5);
        let m = uniform(&mut r, n, -0.1, 0.1);
        let v = uniform(&mut r, n, 0.0, 0.01);
        let step = config.step(t);
        let (mut wp, mut wm, mut wv) = (param.clone(), m.clone(), v.clone());
        cpu::adam_update(&mut wp, &grad, &mut wm, &mut wv, &config, step);
        let (mut gp, mut gm, mut gv) = (param.clone(), m.clone(), v.clone());
        gpu::adam_update(&ctx, &mut gp, &grad, &mut gm, &mut gv, &config, step).unwrap();
        assert_close(&format!("adam param n={n} t={t}"), &gp, &wp);
        assert_close(&format!("adam m n={n} t={t}"), &gm, &wm);
        assert_close(&format!("adam v n={n} t={t}"), &gv, &wv);
        // The update itself, relative to its own size (the parameters dwarf it), plus one
        // rounding of p - update (an ulp of the parameter).
        let upd_gpu: Vec<f32> = gp.iter().zip(&param).map(|(a, b)| a - b).collect();
        let upd_cpu: Vec<f32> = wp.iter().zip(&param).map(|(a, b)| a - b).collect();
        assert_close_with(&format!("adam update n={n} t={t}"), &upd_gpu, &upd_cpu, |i| {
            f32::EPSILON * param[i].abs() + 1e-4 * upd_cpu[i].abs()
        });
    }
}

#[test]
fn gather_batch_matches_set_input() {
    let Some(ctx) = gpu() else { return };
    let mut r = rng(12);
    // 784 pixels (LeNet), and 5 (images straddling u32 words).
    for (n_images, pixels, batch) in [(50, model::IMAGE_PIXELS, 13), (9, 5, 7), (3, 5, 1)] {
        let images = bytes(&mut r, n_images * pixels);
        let labels: Vec<u8> = (0..n_images).map(|_| below(&mut r, 10) as u8).collect();
        let indices: Vec<u32> = (0..batch).map(|_| below(&mut r, n_images as u32)).collect();
        let mut want = Vec::new();
        for &i in &indices {
            want.extend(images[i as usize * pixels..][..pixels].iter().map(|&p| p as f32 / 255.0));
        }
        let want_labels: Vec<u32> = indices.iter().map(|&i| labels[i as usize] as u32).collect();
        let (mut got, mut got_labels) = (nan(batch * pixels), vec![u32::MAX; batch]);
        gpu::gather_batch(&ctx, &mut got, &mut got_labels, &images, &labels, pixels, &indices).unwrap();
        assert_eq!(got, want, "gathered pixels");
        assert_eq!(got_labels, want_labels, "gathered labels");
    }
}

#[test]
fn a_shader_error_is_an_err_not_a_panic() {
    let Some(ctx) = gpu() else { return };
    let good = "@group(0) @binding(0) var<storage, read_write> x: array<f32>;\n\
                @compute @workgroup_size(1) fn main() { x[0] = 1.0; }";
    lenet::gpu::kernels::check_shader(&ctx.device, "good", good, "main").unwrap();
    let bad = "@compute @workgroup_size(1) fn main() { let x: f32 = undefined_thing; }";
    let err = lenet::gpu::kernels::check_shader(&ctx.device, "bad", bad, "main").unwrap_err();
    assert!(format!("{err:#}").contains("undefined_thing"), "{err:#}");
    ctx.check_errors().unwrap();
}
