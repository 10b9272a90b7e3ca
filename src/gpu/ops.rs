//! Per-op host wrappers with the names and argument order of [`crate::cpu::ops`] (plus the
//! context first): upload the slices, run the kernel, read the results back into the output
//! slices. For tests and benchmarks; the trainer keeps everything resident instead.
//!
//! Output buffers start from the output slices' current contents, so a caller that poisons
//! them (NaN) can check that the kernel wrote every element.

use anyhow::ensure;
use wgpu::util::DeviceExt;

use super::context::GpuContext;
use super::kernels::{pack_u8, pixel_lut, Builder, Dispatch, Stat, StepUniform, View};
use crate::cpu::ops::XentResult;
use crate::model::{AdamConfig, AdamStep, ConvShape};

fn builder(ctx: &GpuContext) -> Builder<'_> {
    Builder {
        device: &ctx.device,
        kernels: &ctx.kernels,
        max_dim: ctx.limits.max_compute_workgroups_per_dimension,
    }
}

/// A storage buffer holding `data` (at least 4 bytes, so that it can be bound).
fn storage<T: bytemuck::Pod>(ctx: &GpuContext, label: &str, data: &[T]) -> View {
    let bytes: &[u8] = bytemuck::cast_slice(data);
    let mut padded = bytes.to_vec();
    padded.resize(bytes.len().max(4).next_multiple_of(4), 0);
    let buffer = ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(label),
        contents: &padded,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
    });
    View::whole(&buffer)
}

/// Submits the dispatches (one compute pass), copies `outputs` back and returns their bytes.
fn run(
    ctx: &GpuContext,
    dispatches: &[Dispatch],
    step: Option<StepUniform>,
    outputs: &[&View],
) -> anyhow::Result<Vec<Vec<u8>>> {
    ctx.scoped(|| {
        let step_group = step.map(|s| {
            let buf = ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("step"),
                contents: bytemuck::bytes_of(&s),
                usage: wgpu::BufferUsages::UNIFORM,
            });
            ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("step"),
                layout: &ctx.kernels.step_layout,
                entries: &[wgpu::BindGroupEntry { binding: 0, resource: buf.as_entire_binding() }],
            })
        });
        let total: u64 = outputs.iter().map(|v| v.size).sum();
        let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: total.max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            for d in dispatches {
                d.record(&mut pass, step_group.as_ref().map(|g| (g, 0)));
            }
        }
        let mut at = 0;
        for v in outputs {
            enc.copy_buffer_to_buffer(&v.buffer, v.offset, &staging, at, v.size);
            at += v.size;
        }
        ctx.queue.submit([enc.finish()]);
        let bytes = read_mapped(ctx, &staging, total)?;
        let mut out = Vec::new();
        let mut at = 0usize;
        for v in outputs {
            out.push(bytes[at..at + v.size as usize].to_vec());
            at += v.size as usize;
        }
        Ok(out)
    })
}

/// Maps `staging` (already holding its data once the queue drains), waits, and copies out
/// `len` bytes.
pub(crate) fn read_mapped(ctx: &GpuContext, staging: &wgpu::Buffer, len: u64) -> anyhow::Result<Vec<u8>> {
    let slice = staging.slice(..len.max(4));
    let (tx, rx) = std::sync::mpsc::channel();
    slice.map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    ctx.device.poll(wgpu::PollType::wait_indefinitely())?;
    rx.recv()??;
    let bytes = {
        let view = slice.get_mapped_range()?;
        view[..len as usize].to_vec()
    };
    staging.unmap();
    Ok(bytes)
}

fn to_f32(dst: &mut [f32], bytes: &[u8]) {
    let n = dst.len();
    dst.copy_from_slice(&bytemuck::pod_collect_to_vec::<u8, f32>(&bytes[..n * 4]));
}

fn to_u32(dst: &mut [u32], bytes: &[u8]) {
    let n = dst.len();
    dst.copy_from_slice(&bytemuck::pod_collect_to_vec::<u8, u32>(&bytes[..n * 4]));
}

fn out_view(ctx: &GpuContext, label: &str, current: &[f32]) -> View {
    let mut v = storage(ctx, label, current);
    v.size = (current.len() * 4) as u64;
    v
}

/// Convolution + bias, no ReLU: the twin of [`crate::cpu::ops::conv2d_forward`].
pub fn conv2d_forward(
    ctx: &GpuContext,
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    s: ConvShape,
) -> anyhow::Result<()> {
    conv_forward(ctx, out, inp, weight, bias, s, false)
}

/// The fused kernel the trainer runs: relu(conv2d_forward(...)).
pub fn conv2d_bias_relu_forward(
    ctx: &GpuContext,
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    s: ConvShape,
) -> anyhow::Result<()> {
    conv_forward(ctx, out, inp, weight, bias, s, true)
}

fn conv_forward(
    ctx: &GpuContext,
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    s: ConvShape,
    relu: bool,
) -> anyhow::Result<()> {
    ensure!(inp.len() == s.input_len() && weight.len() == s.weight_len() && bias.len() == s.out_channels);
    ensure!(out.len() == s.output_len());
    let (i, w, b, o) = (
        storage(ctx, "inp", inp),
        storage(ctx, "weight", weight),
        storage(ctx, "bias", bias),
        out_view(ctx, "out", out),
    );
    let d = builder(ctx).conv_forward(&o, &i, &w, &b, s, relu);
    let r = run(ctx, &[d], None, &[&o])?;
    to_f32(out, &r[0]);
    Ok(())
}

pub fn conv2d_backward_input(
    ctx: &GpuContext,
    dinp: &mut [f32],
    dout: &[f32],
    weight: &[f32],
    s: ConvShape,
) -> anyhow::Result<()> {
    ensure!(dinp.len() == s.input_len() && dout.len() == s.output_len() && weight.len() == s.weight_len());
    let (g, w, di) =
        (storage(ctx, "dout", dout), storage(ctx, "weight", weight), out_view(ctx, "dinp", dinp));
    let d = builder(ctx).conv_backward_input(&di, &g, &w, s);
    let r = run(ctx, &[d], None, &[&di])?;
    to_f32(dinp, &r[0]);
    Ok(())
}

pub fn conv2d_backward_weight(
    ctx: &GpuContext,
    dweight: &mut [f32],
    dbias: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    s: ConvShape,
) -> anyhow::Result<()> {
    ensure!(dweight.len() == s.weight_len() && dbias.len() == s.out_channels);
    ensure!(dout.len() == s.output_len() && inp.len() == s.input_len());
    let (g, i) = (storage(ctx, "dout", dout), storage(ctx, "inp", inp));
    let (dw, db) = (out_view(ctx, "dweight", dweight), out_view(ctx, "dbias", dbias));
    let d = builder(ctx).conv_backward_weight(&dw, &db, &g, &i, s);
    let r = run(ctx, &[d], None, &[&dw, &db])?;
    to_f32(dweight, &r[0]);
    to_f32(dbias, &r[1]);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn maxpool2x2_forward(
    ctx: &GpuContext,
    out: &mut [f32],
    argmax: &mut [u32],
    inp: &[f32],
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
) -> anyhow::Result<()> {
    ensure!(height.is_multiple_of(2) && width.is_multiple_of(2), "max-pool input must have even sides");
    ensure!(inp.len() == batch * channels * height * width && out.len() * 4 == inp.len());
    ensure!(argmax.len() == out.len());
    let i = storage(ctx, "inp", inp);
    let o = out_view(ctx, "out", out);
    let mut a = storage(ctx, "argmax", argmax);
    a.size = (argmax.len() * 4) as u64;
    let d = builder(ctx).pool_forward(&o, &a, &i, batch * channels, height, width);
    let r = run(ctx, &[d], None, &[&o, &a])?;
    to_f32(out, &r[0]);
    to_u32(argmax, &r[1]);
    Ok(())
}

/// The twin of [`crate::cpu::ops::maxpool2x2_backward`]; the GPU gathers per input element, so
/// it also needs the input's shape.
#[allow(clippy::too_many_arguments)]
pub fn maxpool2x2_backward(
    ctx: &GpuContext,
    dinp: &mut [f32],
    dout: &[f32],
    argmax: &[u32],
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
) -> anyhow::Result<()> {
    pool_backward(ctx, dinp, dout, argmax, None, batch, channels, height, width)
}

/// The fused kernel the trainer runs: maxpool2x2_backward, then relu_backward through `conv_out`
/// (the ReLU output that was pooled).
#[allow(clippy::too_many_arguments)]
pub fn maxpool2x2_relu_backward(
    ctx: &GpuContext,
    dinp: &mut [f32],
    dout: &[f32],
    argmax: &[u32],
    conv_out: &[f32],
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
) -> anyhow::Result<()> {
    pool_backward(ctx, dinp, dout, argmax, Some(conv_out), batch, channels, height, width)
}

#[allow(clippy::too_many_arguments)]
fn pool_backward(
    ctx: &GpuContext,
    dinp: &mut [f32],
    dout: &[f32],
    argmax: &[u32],
    mask: Option<&[f32]>,
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
) -> anyhow::Result<()> {
    ensure!(dinp.len() == batch * channels * height * width && dout.len() * 4 == dinp.len());
    ensure!(argmax.len() == dout.len());
    let (g, a) = (storage(ctx, "dout", dout), storage(ctx, "argmax", argmax));
    let m = mask.map(|m| storage(ctx, "mask", m));
    if let Some(m) = mask {
        ensure!(m.len() == dinp.len());
    }
    let di = out_view(ctx, "dinp", dinp);
    let d = builder(ctx).pool_backward(&di, &g, &a, m.as_ref(), batch * channels, height, width);
    let r = run(ctx, &[d], None, &[&di])?;
    to_f32(dinp, &r[0]);
    Ok(())
}

/// out = inp · weightᵀ + bias, no ReLU: the twin of [`crate::cpu::ops::linear_forward`].
#[allow(clippy::too_many_arguments)]
pub fn linear_forward(
    ctx: &GpuContext,
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    batch: usize,
    in_features: usize,
    out_features: usize,
) -> anyhow::Result<()> {
    linear_fwd(ctx, out, inp, weight, bias, batch, in_features, out_features, false)
}

/// The fused kernel the trainer runs for fc1 and fc2: relu(linear_forward(...)).
#[allow(clippy::too_many_arguments)]
pub fn linear_relu_forward(
    ctx: &GpuContext,
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    batch: usize,
    in_features: usize,
    out_features: usize,
) -> anyhow::Result<()> {
    linear_fwd(ctx, out, inp, weight, bias, batch, in_features, out_features, true)
}

#[allow(clippy::too_many_arguments)]
fn linear_fwd(
    ctx: &GpuContext,
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    batch: usize,
    in_features: usize,
    out_features: usize,
    relu: bool,
) -> anyhow::Result<()> {
    ensure!(inp.len() == batch * in_features && weight.len() == out_features * in_features);
    ensure!(bias.len() == out_features && out.len() == batch * out_features);
    let (i, w, b, o) = (
        storage(ctx, "inp", inp),
        storage(ctx, "weight", weight),
        storage(ctx, "bias", bias),
        out_view(ctx, "out", out),
    );
    let d = builder(ctx).linear_forward(&o, &i, &w, &b, batch, in_features, out_features, relu);
    let r = run(ctx, &[d], None, &[&o])?;
    to_f32(out, &r[0]);
    Ok(())
}

/// dinp = dout · weight: the twin of [`crate::cpu::ops::linear_backward_input`].
pub fn linear_backward_input(
    ctx: &GpuContext,
    dinp: &mut [f32],
    dout: &[f32],
    weight: &[f32],
    batch: usize,
    in_features: usize,
    out_features: usize,
) -> anyhow::Result<()> {
    linear_bwd_input(ctx, dinp, dout, weight, None, batch, in_features, out_features)
}

/// The fused kernel the trainer runs: relu_backward(linear_backward_input(...), act), where
/// `act` is the ReLU output of the layer that fed this one.
#[allow(clippy::too_many_arguments)]
pub fn linear_relu_backward_input(
    ctx: &GpuContext,
    dinp: &mut [f32],
    dout: &[f32],
    weight: &[f32],
    act: &[f32],
    batch: usize,
    in_features: usize,
    out_features: usize,
) -> anyhow::Result<()> {
    linear_bwd_input(ctx, dinp, dout, weight, Some(act), batch, in_features, out_features)
}

#[allow(clippy::too_many_arguments)]
fn linear_bwd_input(
    ctx: &GpuContext,
    dinp: &mut [f32],
    dout: &[f32],
    weight: &[f32],
    act: Option<&[f32]>,
    batch: usize,
    in_features: usize,
    out_features: usize,
) -> anyhow::Result<()> {
    ensure!(dinp.len() == batch * in_features && dout.len() == batch * out_features);
    ensure!(weight.len() == out_features * in_features);
    if let Some(a) = act {
        ensure!(a.len() == dinp.len());
    }
    let (g, w) = (storage(ctx, "dout", dout), storage(ctx, "weight", weight));
    let m = act.map(|a| storage(ctx, "act", a));
    let di = out_view(ctx, "dinp", dinp);
    let d = builder(ctx).linear_backward_input(&di, &g, &w, m.as_ref(), batch, in_features, out_features);
    let r = run(ctx, &[d], None, &[&di])?;
    to_f32(dinp, &r[0]);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn linear_backward_weight(
    ctx: &GpuContext,
    dweight: &mut [f32],
    dbias: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    batch: usize,
    in_features: usize,
    out_features: usize,
) -> anyhow::Result<()> {
    ensure!(dweight.len() == out_features * in_features && dbias.len() == out_features);
    ensure!(dout.len() == batch * out_features && inp.len() == batch * in_features);
    let (g, i) = (storage(ctx, "dout", dout), storage(ctx, "inp", inp));
    let (dw, db) = (out_view(ctx, "dweight", dweight), out_view(ctx, "dbias", dbias));
    let d = builder(ctx).linear_backward_weight(&dw, &db, &g, &i, batch, in_features, out_features);
    let r = run(ctx, &[d], None, &[&dw, &db])?;
    to_f32(dweight, &r[0]);
    to_f32(dbias, &r[1]);
    Ok(())
}

pub fn relu_forward(ctx: &GpuContext, out: &mut [f32], inp: &[f32]) -> anyhow::Result<()> {
    ensure!(out.len() == inp.len());
    let (i, o) = (storage(ctx, "inp", inp), out_view(ctx, "out", out));
    let d = builder(ctx).relu_forward(&o, &i, inp.len());
    let r = run(ctx, &[d], None, &[&o])?;
    to_f32(out, &r[0]);
    Ok(())
}

pub fn relu_backward(ctx: &GpuContext, dinp: &mut [f32], dout: &[f32], out: &[f32]) -> anyhow::Result<()> {
    ensure!(dinp.len() == dout.len() && out.len() == dout.len());
    let (g, y, di) = (storage(ctx, "dout", dout), storage(ctx, "out", out), out_view(ctx, "dinp", dinp));
    let d = builder(ctx).relu_backward(&di, &g, &y, dout.len());
    let r = run(ctx, &[d], None, &[&di])?;
    to_f32(dinp, &r[0]);
    Ok(())
}

pub fn softmax_xent_forward_backward(
    ctx: &GpuContext,
    dlogits: &mut [f32],
    logits: &[f32],
    labels: &[u32],
    batch: usize,
    classes: usize,
) -> anyhow::Result<XentResult> {
    ensure!(logits.len() == batch * classes && dlogits.len() == logits.len() && labels.len() == batch);
    ensure!(labels.iter().all(|&l| (l as usize) < classes), "label out of range");
    let (z, l) = (storage(ctx, "logits", logits), storage(ctx, "labels", labels));
    let dz = out_view(ctx, "dlogits", dlogits);
    let poison = Stat { loss: f32::NAN, correct: u32::MAX };
    let stats = storage(ctx, "stats", &[poison]);
    let d = builder(ctx).softmax_xent(&dz, &stats, &z, &l, batch, classes);
    let step = StepUniform { stats_slot: 0, ..Default::default() };
    let r = run(ctx, &[d], Some(step), &[&dz, &stats])?;
    to_f32(dlogits, &r[0]);
    let s: Stat = bytemuck::pod_read_unaligned(&r[1][..8]);
    Ok(XentResult { loss: s.loss, correct: s.correct })
}

pub fn adam_update(
    ctx: &GpuContext,
    param: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    config: &AdamConfig,
    step: AdamStep,
) -> anyhow::Result<()> {
    ensure!(param.len() == grad.len() && m.len() == grad.len() && v.len() == grad.len());
    let g = storage(ctx, "grad", grad);
    let (p, mb, vb) = (out_view(ctx, "param", param), out_view(ctx, "m", m), out_view(ctx, "v", v));
    let d = builder(ctx).adam(&p, &g, &mb, &vb, grad.len(), config);
    let s = StepUniform {
        step_size: step.step_size,
        bias_correction2_sqrt: step.bias_correction2_sqrt,
        ..Default::default()
    };
    let r = run(ctx, &[d], Some(s), &[&p, &mb, &vb])?;
    to_f32(param, &r[0]);
    to_f32(m, &r[1]);
    to_f32(v, &r[2]);
    Ok(())
}

/// The GPU's batch gather: `input` = pixels / 255 and `labels_out` = labels of the images
/// `indices` of a u8 data set (the twin of [`crate::cpu::network::Activations::set_input`] on
/// the selected images).
pub fn gather_batch(
    ctx: &GpuContext,
    input: &mut [f32],
    labels_out: &mut [u32],
    images: &[u8],
    labels: &[u8],
    pixels: usize,
    indices: &[u32],
) -> anyhow::Result<()> {
    let batch = indices.len();
    ensure!(input.len() == batch * pixels && labels_out.len() == batch);
    ensure!(images.len() == labels.len() * pixels);
    ensure!(indices.iter().all(|&i| (i as usize) < labels.len()), "index out of range");
    let img = storage(ctx, "images", &pack_u8(images));
    let lab = storage(ctx, "labels", &labels.iter().map(|&l| l as u32).collect::<Vec<u32>>());
    let idx = storage(ctx, "indices", indices);
    let lut = storage(ctx, "lut", &pixel_lut());
    let inp = out_view(ctx, "input", input);
    let mut lo = storage(ctx, "labels_out", labels_out);
    lo.size = (batch * 4) as u64;
    let d = builder(ctx).gather(&img, &lab, &idx, &lut, &inp, &lo, batch, pixels);
    let r = run(ctx, &[d], Some(StepUniform::default()), &[&inp, &lo])?;
    to_f32(input, &r[0]);
    to_u32(labels_out, &r[1]);
    Ok(())
}
