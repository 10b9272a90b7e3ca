//! The CPU reference: one plain function per op and direction, every shape an argument (the
//! shapes, [`ConvShape`] and [`LinearShape`], are defined here and named by the op seam too).
//!
//! Layouts are PyTorch's: activations NCHW (or [batch, features]), convolution weights
//! [out_channels, in_channels, k, k], linear weights [out_features, in_features]. Each function
//! overwrites its outputs completely. The ops of [`Ops`](crate::ops::Ops), fused ones included, are compositions
//! of these (the trait's default methods call the ones at the end of this file), and the fast
//! CPU path and the GPU kernels in `shaders/` are tested against them (tests/ops.rs).

use anyhow::{ensure, Result};

use crate::data::Dataset;
use crate::optim::{self, OptStep};

/// The shape of a 2-D convolution over a batch, NCHW, square kernel, stride 1, zero padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    pub batch: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    /// Input height and width.
    pub height: usize,
    pub width: usize,
    pub kernel: usize,
    pub padding: usize,
}

impl ConvShape {
    pub fn out_height(&self) -> usize {
        self.height + 2 * self.padding + 1 - self.kernel
    }
    pub fn out_width(&self) -> usize {
        self.width + 2 * self.padding + 1 - self.kernel
    }
    pub fn input_len(&self) -> usize {
        self.batch * self.in_channels * self.height * self.width
    }
    pub fn output_len(&self) -> usize {
        self.batch * self.out_channels * self.out_height() * self.out_width()
    }
    /// Elements of the 2x2 max-pool of the output.
    pub fn pooled_len(&self) -> usize {
        self.output_len() / 4
    }
    pub fn weight_len(&self) -> usize {
        self.out_channels * self.in_channels * self.kernel * self.kernel
    }
    /// Multiply-accumulates of the forward pass.
    pub fn macs(&self) -> usize {
        self.output_len() * self.in_channels * self.kernel * self.kernel
    }
    /// The same convolution at another batch size.
    pub fn with_batch(self, batch: usize) -> Self {
        ConvShape { batch, ..self }
    }
}

/// The shape of a fully connected layer over a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearShape {
    pub batch: usize,
    pub in_features: usize,
    pub out_features: usize,
}

impl LinearShape {
    pub fn weight_len(&self) -> usize {
        self.in_features * self.out_features
    }
    pub fn macs(&self) -> usize {
        self.batch * self.weight_len()
    }
}

/// Every tap of the convolution that reads inside the input, as the flat indices (output,
/// input, weight) of out[b,co,y,x], inp[b,ci,y+ky-pad,x+kx-pad] and weight[co,ci,ky,kx], in the
/// order b, co, y, x, ci, ky, kx: the one statement of the convolution's indexing, which the
/// three functions below sum over (zero padding: taps outside the input are left out).
fn for_each_tap(s: ConvShape, mut f: impl FnMut(usize, usize, usize)) {
    let (ho, wo, k, p) = (s.out_height(), s.out_width(), s.kernel, s.padding as isize);
    let (rows, cols) = (0..s.height as isize, 0..s.width as isize);
    for b in 0..s.batch {
        for co in 0..s.out_channels {
            for y in 0..ho {
                for x in 0..wo {
                    let o = ((b * s.out_channels + co) * ho + y) * wo + x;
                    for ci in 0..s.in_channels {
                        for ky in 0..k {
                            for kx in 0..k {
                                let (iy, ix) = ((y + ky) as isize - p, (x + kx) as isize - p);
                                if rows.contains(&iy) && cols.contains(&ix) {
                                    let plane = (b * s.in_channels + ci) * s.height;
                                    let i = (plane + iy as usize) * s.width + ix as usize;
                                    f(o, i, ((co * s.in_channels + ci) * k + ky) * k + kx);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The output channel of each element of a conv output.
fn out_channel(s: ConvShape, o: usize) -> usize {
    (o / (s.out_height() * s.out_width())) % s.out_channels
}

/// out\[b,co,y,x\] = bias\[co\] + sum_{ci,ky,kx} weight\[co,ci,ky,kx\] * inp[b,ci,y+ky-pad,x+kx-pad]
/// (zero outside the input), summed in that order.
///
/// inp: [B, Cin, H, W], weight: [Cout, Cin, K, K], bias: \[Cout\], out: [B, Cout, Ho, Wo]
pub fn conv2d_forward(out: &mut [f32], inp: &[f32], weight: &[f32], bias: &[f32], s: ConvShape) {
    assert_eq!(inp.len(), s.input_len());
    assert_eq!(weight.len(), s.weight_len());
    assert_eq!(bias.len(), s.out_channels);
    assert_eq!(out.len(), s.output_len());
    for (o, v) in out.iter_mut().enumerate() {
        *v = bias[out_channel(s, o)];
    }
    for_each_tap(s, |o, i, w| out[o] += weight[w] * inp[i]);
}

/// dinp\[b,ci,iy,ix\] = sum over the outputs that read inp\[b,ci,iy,ix\] of dout * weight.
///
/// dout: [B, Cout, Ho, Wo], weight: [Cout, Cin, K, K], dinp: [B, Cin, H, W]
pub fn conv2d_backward_input(dinp: &mut [f32], dout: &[f32], weight: &[f32], s: ConvShape) {
    assert_eq!(dinp.len(), s.input_len());
    assert_eq!(dout.len(), s.output_len());
    assert_eq!(weight.len(), s.weight_len());
    dinp.fill(0.0);
    for_each_tap(s, |o, i, w| dinp[i] += dout[o] * weight[w]);
}

/// dweight\[co,ci,ky,kx\] = sum_{b,y,x} dout\[b,co,y,x\] * inp[b,ci,y+ky-pad,x+kx-pad];
/// dbias\[co\] = sum_{b,y,x} dout\[b,co,y,x\].
///
/// dout: [B, Cout, Ho, Wo], inp: [B, Cin, H, W], dweight: [Cout, Cin, K, K], dbias: \[Cout\]
pub fn conv2d_backward_weight(
    dweight: &mut [f32],
    dbias: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    s: ConvShape,
) {
    assert_eq!(dweight.len(), s.weight_len());
    assert_eq!(dbias.len(), s.out_channels);
    assert_eq!(dout.len(), s.output_len());
    assert_eq!(inp.len(), s.input_len());
    dbias.fill(0.0);
    for (o, &g) in dout.iter().enumerate() {
        dbias[out_channel(s, o)] += g;
    }
    dweight.fill(0.0);
    for_each_tap(s, |o, i, w| dweight[w] += dout[o] * inp[i]);
}

/// 2x2 max-pooling, stride 2. `argmax` receives, for each output, the flat index into `inp` of
/// the first maximum of its window in row-major order (ties go to the first).
///
/// inp: [B, C, H, W] (H, W even), out and argmax: [B, C, H/2, W/2]
pub fn maxpool2x2_forward(
    out: &mut [f32],
    argmax: &mut [u32],
    inp: &[f32],
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
) {
    assert!(height.is_multiple_of(2) && width.is_multiple_of(2), "max-pool input must have even sides");
    let (ho, wo) = (height / 2, width / 2);
    assert_eq!(inp.len(), batch * channels * height * width);
    assert_eq!(out.len(), batch * channels * ho * wo);
    assert_eq!(argmax.len(), out.len());
    for plane in 0..batch * channels {
        for y in 0..ho {
            for x in 0..wo {
                let first = (plane * height + 2 * y) * width + 2 * x;
                let mut best = first;
                for i in [first + 1, first + width, first + width + 1] {
                    if inp[i] > inp[best] {
                        best = i;
                    }
                }
                let o = (plane * ho + y) * wo + x;
                out[o] = inp[best];
                argmax[o] = best as u32;
            }
        }
    }
}

/// Routes each output gradient to the one input its window's maximum came from; every other
/// input gets zero.
///
/// dout and argmax: [B, C, H/2, W/2], dinp: [B, C, H, W]
pub fn maxpool2x2_backward(dinp: &mut [f32], dout: &[f32], argmax: &[u32]) {
    assert_eq!(dout.len(), argmax.len());
    assert_eq!(dinp.len(), 4 * dout.len());
    dinp.fill(0.0);
    for (g, &i) in dout.iter().zip(argmax) {
        dinp[i as usize] = *g;
    }
}

/// out\[b,o\] = bias\[o\] + sum_i inp\[b,i\] * weight\[o,i\]
///
/// inp: [B, In], weight: [Out, In], bias: \[Out\], out: [B, Out]
pub fn linear_forward(
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    batch: usize,
    in_features: usize,
    out_features: usize,
) {
    assert_eq!(inp.len(), batch * in_features);
    assert_eq!(weight.len(), out_features * in_features);
    assert_eq!(bias.len(), out_features);
    assert_eq!(out.len(), batch * out_features);
    for b in 0..batch {
        let x = &inp[b * in_features..][..in_features];
        for o in 0..out_features {
            let w = &weight[o * in_features..][..in_features];
            out[b * out_features + o] = bias[o] + dot(x, w);
        }
    }
}

/// dinp = dout · weight: dinp\[b,i\] = sum_o dout\[b,o\] * weight\[o,i\]
///
/// dout: [B, Out], weight: [Out, In], dinp: [B, In]
pub fn linear_backward_input(
    dinp: &mut [f32],
    dout: &[f32],
    weight: &[f32],
    batch: usize,
    in_features: usize,
    out_features: usize,
) {
    assert_eq!(dinp.len(), batch * in_features);
    assert_eq!(dout.len(), batch * out_features);
    assert_eq!(weight.len(), out_features * in_features);
    for b in 0..batch {
        for i in 0..in_features {
            let mut acc = 0.0;
            for o in 0..out_features {
                acc += dout[b * out_features + o] * weight[o * in_features + i];
            }
            dinp[b * in_features + i] = acc;
        }
    }
}

/// dweight = doutᵀ · inp: dweight\[o,i\] = sum_b dout\[b,o\] * inp\[b,i\]; dbias\[o\] = sum_b dout\[b,o\]
///
/// dout: [B, Out], inp: [B, In], dweight: [Out, In], dbias: \[Out\]
pub fn linear_backward_weight(
    dweight: &mut [f32],
    dbias: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    batch: usize,
    in_features: usize,
    out_features: usize,
) {
    assert_eq!(dweight.len(), out_features * in_features);
    assert_eq!(dbias.len(), out_features);
    assert_eq!(dout.len(), batch * out_features);
    assert_eq!(inp.len(), batch * in_features);
    for o in 0..out_features {
        let mut bias_acc = 0.0;
        for b in 0..batch {
            bias_acc += dout[b * out_features + o];
        }
        dbias[o] = bias_acc;
        for i in 0..in_features {
            let mut acc = 0.0;
            for b in 0..batch {
                acc += dout[b * out_features + o] * inp[b * in_features + i];
            }
            dweight[o * in_features + i] = acc;
        }
    }
}

/// out = max(inp, 0), element-wise.
pub fn relu_forward(out: &mut [f32], inp: &[f32]) {
    assert_eq!(out.len(), inp.len());
    for (o, &x) in out.iter_mut().zip(inp) {
        *o = x.max(0.0);
    }
}

/// dinp = dout where the forward output was positive, else 0. Takes the forward *output*, which
/// is positive exactly where the input was.
pub fn relu_backward(dinp: &mut [f32], dout: &[f32], out: &[f32]) {
    assert_eq!(dinp.len(), dout.len());
    assert_eq!(out.len(), dout.len());
    for ((d, &g), &y) in dinp.iter_mut().zip(dout).zip(out) {
        *d = if y > 0.0 { g } else { 0.0 };
    }
}

/// Softmax cross-entropy of each image and the gradient of the batch-mean loss with respect to
/// the logits: losses\[b\] = -log softmax(logits\[b\])[label\[b\]], correct\[b\] = 1 when the first
/// largest logit is the label, dlogits\[b,c\] = (softmax(logits\[b\])\[c\] - [c == label]) / B.
///
/// logits and dlogits: [B, C], labels, losses and correct: \[B\], labels below C
pub fn softmax_xent(
    dlogits: &mut [f32],
    losses: &mut [f32],
    correct: &mut [u32],
    logits: &[f32],
    labels: &[u32],
    batch: usize,
    classes: usize,
) {
    assert!(labels.len() == batch);
    softmax_xent_rows(XentRows { dlogits, losses, correct, logits, labels }, classes, 1.0 / batch as f32);
}

/// Some rows of [`softmax_xent`]'s tensors (the batch's rows `labels.len()`).
pub struct XentRows<'a> {
    pub dlogits: &'a mut [f32],
    pub losses: &'a mut [f32],
    pub correct: &'a mut [u32],
    pub logits: &'a [f32],
    pub labels: &'a [u32],
}

/// [`softmax_xent`] of some rows of a batch: `scale` is 1 / the whole batch's size.
pub fn softmax_xent_rows(rows: XentRows, classes: usize, scale: f32) {
    let XentRows { dlogits, losses, correct, logits, labels } = rows;
    let batch = labels.len();
    assert_eq!(logits.len(), batch * classes);
    assert_eq!(dlogits.len(), batch * classes);
    assert!(losses.len() == batch && correct.len() == batch);
    for b in 0..batch {
        let row = &logits[b * classes..][..classes];
        let label = labels[b] as usize;
        assert!(label < classes, "label {label} out of range");
        let arg = first_argmax(row);
        let max = row[arg];
        correct[b] = (arg == label) as u32;
        let sum: f32 = row.iter().map(|&z| (z - max).exp()).sum();
        losses[b] = sum.ln() - (row[label] - max);
        for c in 0..classes {
            let p = (row[c] - max).exp() / sum;
            let target = if c == label { 1.0 } else { 0.0 };
            dlogits[b * classes + c] = (p - target) * scale;
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Index of the first largest value.
pub fn first_argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

pub use crate::optim::summed_grad;

/// The number of partials in a gradient buffer for a tensor of `n`.
pub fn partials(grad: &[f32], n: usize) -> usize {
    assert!(
        n > 0 && grad.len().is_multiple_of(n) && !grad.is_empty(),
        "gradient length {} for {n} values",
        grad.len()
    );
    grad.len() / n
}

/// One optimizer step on a tensor whose gradient comes as partials: `step`'s optimizer's element
/// update ([`crate::optim::Rule::element`]) on every element, each gradient the in-order sum of
/// its partials. `states`: the optimizer's state tensors, in its order.
pub fn optimizer_update(param: &mut [f32], grad: &[f32], states: &mut [&mut [f32]], step: &OptStep) {
    let n = param.len();
    if n == 0 {
        return;
    }
    partials(grad, n);
    optim::update_span(step, param, grad, n, 0, states);
}

/// The batch the indices pick from `data`: input\[b\] = image indices\[b\] as pixels / 255,
/// translated by (dx, dy) = (shifts\[2b\], shifts[2b+1]) (input\[y\]\[x\] = image[y - dy][x - dx],
/// zero outside); labels\[b\] = its label.
///
/// input: [B, rows*cols], labels: \[B\], indices: \[B\], shifts: \[2B\]
pub fn gather_batch(input: &mut [f32], labels: &mut [u32], data: &Dataset, indices: &[u32], shifts: &[i32]) {
    let (rows, cols) = (data.rows as i64, data.cols as i64);
    let pixels = data.rows * data.cols;
    let batch = indices.len();
    assert!(input.len() == batch * pixels && labels.len() == batch && shifts.len() == 2 * batch);
    for (b, &i) in indices.iter().enumerate() {
        let image = &data.images[i as usize * pixels..][..pixels];
        let (dx, dy) = (shifts[2 * b] as i64, shifts[2 * b + 1] as i64);
        let out = &mut input[b * pixels..][..pixels];
        out.fill(0.0);
        // The output columns whose source column x - dx is inside the image, row by row.
        let (x0, x1) = (dx.clamp(0, cols), (cols + dx).clamp(0, cols));
        let width = (x1 - x0) as usize;
        for y in dy.clamp(0, rows)..(rows + dy).clamp(0, rows) {
            let src = &image[((y - dy) * cols + x0 - dx) as usize..][..width];
            for (o, &p) in out[(y * cols + x0) as usize..][..width].iter_mut().zip(src) {
                *o = p as f32 / 255.0;
            }
        }
        labels[b] = data.labels[i as usize] as u32;
    }
}

/// The gradient of a ReLU'd conv's output from the gradient of the 2x2 max-pool after it: each
/// pooled gradient goes to its argmax where the conv output is positive.
pub fn conv_grad_from_pool(dconv: &mut [f32], dpooled: &[f32], argmax: &[u32], conv: &[f32]) {
    maxpool2x2_backward(dconv, dpooled, argmax);
    let masked = dconv.to_vec();
    relu_backward(dconv, &masked, conv);
}

/// [`Ops::conv_relu_pool_forward`](crate::ops::Ops::conv_relu_pool_forward): conv + bias, ReLU, 2x2 max-pool with its argmax.
#[allow(clippy::too_many_arguments)]
pub fn conv_relu_pool_forward(
    conv: &mut [f32],
    pooled: &mut [f32],
    argmax: &mut [u32],
    input: &[f32],
    weight: &[f32],
    bias: &[f32],
    s: ConvShape,
) {
    let mut pre = vec![0.0; s.output_len()];
    conv2d_forward(&mut pre, input, weight, bias, s);
    relu_forward(conv, &pre);
    maxpool2x2_forward(pooled, argmax, conv, s.batch, s.out_channels, s.out_height(), s.out_width());
}

/// [`Ops::linear_forward`](crate::ops::Ops::linear_forward): a fully connected layer, then ReLU if `relu`.
pub fn linear_layer_forward(
    out: &mut [f32],
    input: &[f32],
    weight: &[f32],
    bias: &[f32],
    s: LinearShape,
    relu: bool,
) {
    linear_forward(out, input, weight, bias, s.batch, s.in_features, s.out_features);
    if relu {
        let pre = out.to_vec();
        relu_forward(out, &pre);
    }
}

/// [`Ops::linear_backward`](crate::ops::Ops::linear_backward): the weight and bias gradients and, when `dinput` is given, the
/// input gradient with the ReLU mask (the forward output that fed this layer) applied.
#[allow(clippy::too_many_arguments)]
pub fn linear_layer_backward(
    dweight: &mut [f32],
    dbias: &mut [f32],
    dinput: Option<(&mut [f32], Option<&[f32]>)>,
    dout: &[f32],
    input: &[f32],
    weight: &[f32],
    s: LinearShape,
) {
    let LinearShape { batch, in_features, out_features } = s;
    linear_backward_weight(dweight, dbias, dout, input, batch, in_features, out_features);
    if let Some((dinput, relu_mask)) = dinput {
        linear_backward_input(dinput, dout, weight, batch, in_features, out_features);
        if let Some(mask) = relu_mask {
            let unmasked = dinput.to_vec();
            relu_backward(dinput, &unmasked, mask);
        }
    }
}

/// [`Ops::conv_backward_from_pool`](crate::ops::Ops::conv_backward_from_pool): the pooled gradient through the pool and the ReLU, then
/// the convolution's weight, bias and (when asked) input gradients.
#[allow(clippy::too_many_arguments)]
pub fn conv_relu_pool_backward(
    dweight: &mut [f32],
    dbias: &mut [f32],
    dinput: Option<&mut [f32]>,
    dpooled: &[f32],
    conv: &[f32],
    argmax: &[u32],
    input: &[f32],
    weight: &[f32],
    s: ConvShape,
) {
    let mut dconv = vec![0.0; s.output_len()];
    conv_grad_from_pool(&mut dconv, dpooled, argmax, conv);
    conv2d_backward_weight(dweight, dbias, &dconv, input, s);
    if let Some(dinput) = dinput {
        conv2d_backward_input(dinput, &dconv, weight, s);
    }
}

/// Checks the batch's indices against the data set (a bad index is an error, not a panic).
pub fn check_batch(data: &Dataset, indices: &[u32], shifts: &[i32]) -> Result<()> {
    let n = data.len();
    ensure!(shifts.len() == 2 * indices.len(), "{} shifts for {} images", shifts.len(), indices.len());
    if let Some(&bad) = indices.iter().find(|&&i| i as usize >= n) {
        anyhow::bail!("sample index {bad} is out of range: the data set has {n} images");
    }
    Ok(())
}
