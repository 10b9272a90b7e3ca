//! The CPU reference: one plain function per op and direction, every shape an argument.
//!
//! Layouts are PyTorch's: activations NCHW (or [batch, features]), convolution weights
//! [out_channels, in_channels, k, k], linear weights [out_features, in_features]. Each function
//! overwrites its outputs completely. The GPU kernels in `shaders/` compute the same functions
//! and are tested against these.

use crate::model::{AdamConfig, AdamStep, ConvShape};

/// out[b,co,y,x] = bias[co] + sum_{ci,ky,kx} weight[co,ci,ky,kx] * inp[b,ci,y+ky-pad,x+kx-pad]
/// (zero outside the input).
///
/// inp: [B, Cin, H, W], weight: [Cout, Cin, K, K], bias: [Cout], out: [B, Cout, Ho, Wo]
pub fn conv2d_forward(out: &mut [f32], inp: &[f32], weight: &[f32], bias: &[f32], s: ConvShape) {
    let (ho, wo, k, p) = (s.out_height(), s.out_width(), s.kernel, s.padding as isize);
    assert_eq!(inp.len(), s.input_len());
    assert_eq!(weight.len(), s.weight_len());
    assert_eq!(bias.len(), s.out_channels);
    assert_eq!(out.len(), s.output_len());
    for b in 0..s.batch {
        for co in 0..s.out_channels {
            for y in 0..ho {
                for x in 0..wo {
                    let mut acc = bias[co];
                    for ci in 0..s.in_channels {
                        for ky in 0..k {
                            let iy = y as isize + ky as isize - p;
                            if iy < 0 || iy >= s.height as isize {
                                continue;
                            }
                            for kx in 0..k {
                                let ix = x as isize + kx as isize - p;
                                if ix < 0 || ix >= s.width as isize {
                                    continue;
                                }
                                let i = ((b * s.in_channels + ci) * s.height + iy as usize) * s.width
                                    + ix as usize;
                                acc += weight[((co * s.in_channels + ci) * k + ky) * k + kx] * inp[i];
                            }
                        }
                    }
                    out[((b * s.out_channels + co) * ho + y) * wo + x] = acc;
                }
            }
        }
    }
}

/// dinp[b,ci,iy,ix] = sum over the outputs that read inp[b,ci,iy,ix] of dout * weight.
///
/// dout: [B, Cout, Ho, Wo], weight: [Cout, Cin, K, K], dinp: [B, Cin, H, W]
pub fn conv2d_backward_input(dinp: &mut [f32], dout: &[f32], weight: &[f32], s: ConvShape) {
    let (ho, wo, k, p) = (s.out_height(), s.out_width(), s.kernel, s.padding as isize);
    assert_eq!(dinp.len(), s.input_len());
    assert_eq!(dout.len(), s.output_len());
    assert_eq!(weight.len(), s.weight_len());
    for b in 0..s.batch {
        for ci in 0..s.in_channels {
            for iy in 0..s.height {
                for ix in 0..s.width {
                    let mut acc = 0.0;
                    for co in 0..s.out_channels {
                        for ky in 0..k {
                            let y = iy as isize + p - ky as isize;
                            if y < 0 || y >= ho as isize {
                                continue;
                            }
                            for kx in 0..k {
                                let x = ix as isize + p - kx as isize;
                                if x < 0 || x >= wo as isize {
                                    continue;
                                }
                                let o = ((b * s.out_channels + co) * ho + y as usize) * wo + x as usize;
                                acc += dout[o] * weight[((co * s.in_channels + ci) * k + ky) * k + kx];
                            }
                        }
                    }
                    dinp[((b * s.in_channels + ci) * s.height + iy) * s.width + ix] = acc;
                }
            }
        }
    }
}

/// dweight[co,ci,ky,kx] = sum_{b,y,x} dout[b,co,y,x] * inp[b,ci,y+ky-pad,x+kx-pad];
/// dbias[co] = sum_{b,y,x} dout[b,co,y,x].
///
/// dout: [B, Cout, Ho, Wo], inp: [B, Cin, H, W], dweight: [Cout, Cin, K, K], dbias: [Cout]
pub fn conv2d_backward_weight(
    dweight: &mut [f32],
    dbias: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    s: ConvShape,
) {
    let (ho, wo, k, p) = (s.out_height(), s.out_width(), s.kernel, s.padding as isize);
    assert_eq!(dweight.len(), s.weight_len());
    assert_eq!(dbias.len(), s.out_channels);
    assert_eq!(dout.len(), s.output_len());
    assert_eq!(inp.len(), s.input_len());
    for co in 0..s.out_channels {
        let mut bias_acc = 0.0;
        for b in 0..s.batch {
            let plane = &dout[(b * s.out_channels + co) * ho * wo..][..ho * wo];
            bias_acc += plane.iter().sum::<f32>();
        }
        dbias[co] = bias_acc;
        for ci in 0..s.in_channels {
            for ky in 0..k {
                for kx in 0..k {
                    let mut acc = 0.0;
                    for b in 0..s.batch {
                        for y in 0..ho {
                            let iy = y as isize + ky as isize - p;
                            if iy < 0 || iy >= s.height as isize {
                                continue;
                            }
                            for x in 0..wo {
                                let ix = x as isize + kx as isize - p;
                                if ix < 0 || ix >= s.width as isize {
                                    continue;
                                }
                                let i = ((b * s.in_channels + ci) * s.height + iy as usize) * s.width
                                    + ix as usize;
                                acc += dout[((b * s.out_channels + co) * ho + y) * wo + x] * inp[i];
                            }
                        }
                    }
                    dweight[((co * s.in_channels + ci) * k + ky) * k + kx] = acc;
                }
            }
        }
    }
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

/// out[b,o] = bias[o] + sum_i inp[b,i] * weight[o,i]
///
/// inp: [B, In], weight: [Out, In], bias: [Out], out: [B, Out]
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

/// dinp = dout · weight: dinp[b,i] = sum_o dout[b,o] * weight[o,i]
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

/// dweight = doutᵀ · inp: dweight[o,i] = sum_b dout[b,o] * inp[b,i]; dbias[o] = sum_b dout[b,o]
///
/// dout: [B, Out], inp: [B, In], dweight: [Out, In], dbias: [Out]
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

/// The result of [`softmax_xent_forward_backward`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct XentResult {
    /// Mean over the batch of -log softmax(logits)[label].
    pub loss: f32,
    /// Samples whose largest logit (the first, on ties) is the label.
    pub correct: u32,
}

/// Softmax cross-entropy averaged over the batch, and its gradient with respect to the logits:
/// dlogits[b,c] = (softmax(logits[b])[c] - [c == label[b]]) / B.
///
/// logits and dlogits: [B, C], labels: [B] with values below C
pub fn softmax_xent_forward_backward(
    dlogits: &mut [f32],
    logits: &[f32],
    labels: &[u32],
    batch: usize,
    classes: usize,
) -> XentResult {
    assert_eq!(logits.len(), batch * classes);
    assert_eq!(dlogits.len(), batch * classes);
    assert_eq!(labels.len(), batch);
    let mut loss_sum = 0.0f64;
    let mut correct = 0;
    let scale = 1.0 / batch as f32;
    for b in 0..batch {
        let row = &logits[b * classes..][..classes];
        let label = labels[b] as usize;
        assert!(label < classes, "label {label} out of range");
        let (mut max, mut arg) = (row[0], 0);
        for (c, &z) in row.iter().enumerate().skip(1) {
            if z > max {
                (max, arg) = (z, c);
            }
        }
        correct += (arg == label) as u32;
        let sum: f32 = row.iter().map(|&z| (z - max).exp()).sum();
        loss_sum += (sum.ln() - (row[label] - max)) as f64;
        for c in 0..classes {
            let p = (row[c] - max).exp() / sum;
            let target = if c == label { 1.0 } else { 0.0 };
            dlogits[b * classes + c] = (p - target) * scale;
        }
    }
    XentResult { loss: (loss_sum / batch as f64) as f32, correct }
}

/// One step of Adam as `torch.optim.Adam` takes it (no weight decay, no amsgrad):
/// m = lerp(m, g, 1-b1); v = b2*v + (1-b2)*g*g; p -= step_size * m / (sqrt(v)/sqrt(bc2) + eps).
pub fn adam_update(
    param: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    config: &AdamConfig,
    step: AdamStep,
) {
    assert_eq!(param.len(), grad.len());
    assert_eq!(m.len(), grad.len());
    assert_eq!(v.len(), grad.len());
    let (b1, b2) = (config.beta1, config.beta2);
    for i in 0..param.len() {
        let g = grad[i];
        m[i] += (1.0 - b1) * (g - m[i]);
        v[i] = v[i] * b2 + (1.0 - b2) * g * g;
        let denom = v[i].sqrt() / step.bias_correction2_sqrt + config.eps;
        param[i] -= step.step_size * (m[i] / denom);
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
