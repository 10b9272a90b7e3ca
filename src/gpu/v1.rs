//! The first kernels (`LENET_KERNELS=v1`; shaders/conv.wgsl and linear.wgsl): one dispatch per
//! op and direction, tiled 5x5 convolutions with their pool fused in and one-invocation-per-element
//! fallbacks (with the pool and its backward as kernels of their own) for any other shape, and
//! the softmax cross-entropy on its own; 19 dispatches a training step of LeNet-5. The gather and
//! the optimizer kernels (gather.wgsl, optim.wgsl) serve both generations.
//!
//! These functions only bind and record: [`GpuOps`]'s `Ops` methods have checked the buffers
//! against the shapes and chosen the kernels.

use anyhow::{ensure, Result};

use super::kernels::{grid_1d, Binder, StepUniform, STATE_BINDINGS};
use super::ops::{storage_init, GpuBuf, GpuOps};
use crate::ops::*;

/// Workgroup memory of the tiled conv kernels, in f32s (`smem` in conv.wgsl).
const CONV_SMEM: usize = 4000;
/// The tiled conv kernels' kernel side (`KS` in conv.wgsl).
const CONV_KS: usize = 5;

/// Output channels per workgroup of the tiled forward kernel (about 512 outputs each, within
/// workgroup memory), or None for the fallback.
fn forward_tile(s: ConvShape) -> Option<u32> {
    if s.kernel != CONV_KS || !s.out_height().is_multiple_of(2) || !s.out_width().is_multiple_of(2) {
        return None;
    }
    let plane = (s.height + 2 * s.padding) * (s.width + 2 * s.padding);
    let hw = s.out_height() * s.out_width();
    let mut tile = 512usize.div_ceil(hw).clamp(1, s.out_channels.max(1));
    let fits = |t: usize| s.in_channels * plane + t * (s.in_channels * 25 + 1) <= CONV_SMEM;
    while tile > 1 && !fits(tile) {
        tile -= 1;
    }
    fits(tile).then_some(tile as u32)
}

/// Whether the tiled backward kernels take this shape: one image's dconv and all weights in
/// workgroup memory (input gradient), the padded input plane below `RED_AT` (weight gradient).
fn backward_tiled(s: ConvShape, need_input: bool) -> bool {
    let input_fits = s.out_channels * s.out_height() * s.out_width() + s.weight_len() <= CONV_SMEM;
    let plane_fits = (s.height + 2 * s.padding) * (s.width + 2 * s.padding) <= 1200;
    s.kernel == CONV_KS && s.padding < CONV_KS && plane_fits && (input_fits || !need_input)
}

/// Batch splits of the tiled weight gradient: enough workgroups (one per (co, ci) pair and
/// split) to fill a large GPU (~264, two per SM of an H100), at least 2.
fn weight_splits(s: ConvShape) -> u32 {
    let pairs = s.out_channels * s.in_channels;
    264usize.div_ceil(pairs.max(1)).min(s.batch / 2).max(2) as u32
}

/// The convolution's shape and conv.wgsl's `tile` (the tiled forward's output channels per
/// workgroup, or the split count of `conv_sum_splits`).
fn conv_params(b: Binder<'_>, s: ConvShape, tile: u32) -> Binder<'_> {
    b.conv_shape(s).param("tile", tile)
}

/// The pooled gradient and the forward tensors that route it (conv.wgsl's tiled backward).
fn pool_grads<'a>(b: Binder<'a>, a: &ConvBackward<GpuOps>) -> Binder<'a> {
    b.buf("dpooled", &a.dpooled.view).buf("saved_argmax", &a.argmax.view).buf("saved_conv", &a.conv.view)
}

impl GpuOps {
    pub(super) fn gather_v1(&mut self, g: Gather<Self>) -> Result<()> {
        let (batch, input, labels) = (g.batch, g.input, g.labels);
        let (data, b) = (batch.data, batch.batch);
        let d = self
            .kernel("gather")?
            .buf("images", &data.images.view)
            .buf("labels", &data.labels.view)
            .buf("indices", &batch.indices.view)
            .buf("shifts", &batch.shifts.view)
            .buf("lut", &self.lut.view)
            .buf("input", &input.view)
            .buf("batch_labels", &labels.view)
            .param("batch", b)
            .param("rows", data.rows)
            .param("cols", data.cols)
            .step(self.step(StepUniform::default()))
            .grid(grid_1d((b * data.rows * data.cols) as u64, 256, self.max_dim()))
            .build("gather")?;
        self.push(d);
        Ok(())
    }

    pub(super) fn conv_pool_forward_v1(&mut self, input: &GpuBuf<f32>, l: ConvLayer<Self>) -> Result<()> {
        let (op, s) = ("conv_relu_pool_forward", l.s);
        let tile = forward_tile(s);
        let b = self
            .kernel(if tile.is_some() { "conv_forward_pool" } else { "conv_forward_naive" })?
            .buf("input", &input.view)
            .buf("weight", &l.weight.view)
            .buf("bias", &l.bias.view)
            .buf("conv", &l.conv.view);
        if let Some(tile) = tile {
            let b = b.buf("pooled", &l.pooled.view).buf("argmax", &l.argmax.view);
            let grid = (s.batch as u32, (s.out_channels as u32).div_ceil(tile), 1);
            let d = conv_params(b, s, tile).grid(grid).build(op)?;
            self.push(d);
            return Ok(());
        }
        let d = conv_params(b, s, 0).grid(grid_1d(s.output_len() as u64, 256, self.max_dim())).build(op)?;
        self.push(d);
        let d = self
            .kernel("pool_forward")?
            .buf("conv", &l.conv.view)
            .buf("pooled", &l.pooled.view)
            .buf("argmax", &l.argmax.view)
            .conv_shape(s)
            .param("tile", 0u32)
            .grid(grid_1d(s.pooled_len() as u64, 256, self.max_dim()))
            .build(op)?;
        self.push(d);
        Ok(())
    }

    pub(super) fn linear_forward_v1(&mut self, a: LinearForward<Self>) -> Result<()> {
        let s = a.s;
        let d = self
            .kernel("linear_forward")?
            .buf("input", &a.input.view)
            .buf("weight", &a.weight.view)
            .buf("bias", &a.bias.view)
            .buf("out", &a.out.view)
            .linear_shape(s, a.relu)
            .param("scale", 0.0f32)
            .grid(((s.out_features as u32).div_ceil(16), (s.batch as u32).div_ceil(16), 1))
            .build("linear_forward")?;
        self.push(d);
        Ok(())
    }

    pub(super) fn softmax_xent_v1(&mut self, a: SoftmaxXent<Self>) -> Result<()> {
        let s = LinearShape { batch: a.batch, in_features: 0, out_features: a.classes };
        let d = self
            .kernel("softmax_xent")?
            .buf("logits", &a.logits.view)
            .buf("labels", &a.labels.view)
            .buf("dlogits", &a.dlogits.view)
            .buf("losses", &a.losses.view)
            .buf("correct", &a.correct.view)
            .linear_shape(s, false)
            .param("scale", 1.0f32 / a.batch as f32)
            .step(self.step(StepUniform::default()))
            .grid(grid_1d(a.batch as u64, 64, self.max_dim()))
            .build("softmax_xent")?;
        self.push(d);
        Ok(())
    }

    pub(super) fn linear_backward_v1(&mut self, a: LinearBackward<Self>) -> Result<()> {
        let (s, dout) = (a.s, a.dout);
        let op = "linear_backward";
        let d = self
            .kernel("linear_backward_weight")?
            .buf("dout", &dout.view)
            .buf("input", &a.input.view)
            .buf("dweight", &a.dweight.view)
            .buf("dbias", &a.dbias.view)
            .linear_shape(s, false)
            .param("scale", 0.0f32)
            .grid(((s.in_features as u32 + 1).div_ceil(16), (s.out_features as u32).div_ceil(16), 1))
            .build(op)?;
        self.push(d);
        if let Some(InputGradArgs { dinput, relu_mask }) = a.dinput {
            // Without a mask the kernel never reads relu_mask; any read-only buffer fills it.
            let d = self
                .kernel("linear_backward_input")?
                .buf("dout", &dout.view)
                .buf("weight", &a.weight.view)
                .buf("relu_mask", &relu_mask.unwrap_or(dout).view)
                .buf("dinput", &dinput.view)
                .linear_shape(s, relu_mask.is_some())
                .param("scale", 0.0f32)
                .grid(((s.in_features as u32).div_ceil(16), (s.batch as u32).div_ceil(16), 1))
                .build(op)?;
            self.push(d);
        }
        Ok(())
    }

    pub(super) fn conv_pool_backward_v1(&mut self, a: ConvBackward<Self>) -> Result<()> {
        let (op, s) = ("conv_backward_from_pool", a.s);
        let (input, weight) = (&a.input.view, &a.weight.view);
        let (params, dweight, dbias) = (s.weight_len() + s.out_channels, &a.dweight.view, &a.dbias.view);
        if backward_tiled(s, a.dinput.is_some()) {
            let splits = weight_splits(s);
            let partials = self.scratch("conv_weight_partials", splits as usize * params)?;
            let b = pool_grads(self.kernel("conv_backward_weight")?, &a).buf("input", input);
            let grid = ((s.out_channels * s.in_channels) as u32, splits, 1);
            let d = conv_params(b.buf("partials", &partials.view), s, 0).grid(grid).build(op)?;
            self.push(d);
            let b = self.kernel("conv_sum_splits")?.buf("partials_in", &partials.view);
            let b = b.buf("dweight", dweight).buf("dbias", dbias);
            let d = conv_params(b, s, splits).grid(grid_1d(params as u64, 256, self.max_dim())).build(op)?;
            self.push(d);
            if let Some(dinput) = &a.dinput {
                let b = pool_grads(self.kernel("conv_backward_input")?, &a);
                let d = conv_params(b.buf("weight", weight).buf("dinput", &dinput.view), s, 0)
                    .grid((s.batch as u32, 1, 1))
                    .build(op)?;
                self.push(d);
            }
            return Ok(());
        }
        // The fallback: the conv-output gradient first, then one invocation per element.
        let dconv = self.scratch("dconv", s.output_len())?;
        let d = self
            .kernel("pool_backward")?
            .buf("saved_conv", &a.conv.view)
            .buf("dpooled", &a.dpooled.view)
            .buf("saved_argmax", &a.argmax.view)
            .buf("dconv", &dconv.view)
            .conv_shape(s)
            .param("tile", 0u32)
            .grid(grid_1d(s.output_len() as u64, 256, self.max_dim()))
            .build(op)?;
        self.push(d);
        let b = self.kernel("conv_backward_weight_naive")?.buf("dconv", &dconv.view).buf("input", input);
        let b = b.buf("dweight", dweight).buf("dbias", dbias);
        let d = conv_params(b, s, 0).grid(grid_1d(params as u64, 1, self.max_dim())).build(op)?;
        self.push(d);
        if let Some(dinput) = &a.dinput {
            let b = self.kernel("conv_backward_input_naive")?.buf("dconv", &dconv.view).buf("weight", weight);
            let grid = grid_1d(s.input_len() as u64, 256, self.max_dim());
            let d = conv_params(b.buf("dinput", &dinput.view), s, 0).grid(grid).build(op)?;
            self.push(d);
        }
        Ok(())
    }

    /// One optimizer kernel over every tensor: one dispatch when the parameters, gradients and
    /// moments each lie in one buffer with the moments laid out as the parameters (the GPU
    /// backend's flat buffers), else one per tensor.
    pub(super) fn optimizer(&mut self, op: &'static str, a: Update<Self>) -> Result<()> {
        let kernel = format!("update_{}", a.step.optimizer);
        let values = StepUniform { optimizer: a.step.scalars, ..Default::default() };
        let (params, grads, moments) = (&*a.params, a.grads, &*a.moments);
        ensure!(
            grads.len() == params.len() && moments.iter().all(|m| m.len() == params.len()),
            "one gradient and state per tensor"
        );
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            ensure!(
                p.len > 0 && g.len % p.len == 0 && g.len > 0 && moments.iter().all(|m| m[i].len == p.len),
                "optimizer: {} has {} values, its gradient {} and its state {:?}",
                p.view.label,
                p.len,
                g.len,
                moments.iter().map(|m| m[i].len).collect::<Vec<_>>()
            );
        }
        let shared = |list: &[GpuBuf<f32>]| list.windows(2).all(|w| w[0].view.buffer == w[1].view.buffer);
        let flat = !params.is_empty()
            && shared(params)
            && shared(grads)
            && moments.iter().all(|m| shared(m) && m.iter().zip(params).all(|(a, p)| a.first() == p.first()));
        let groups: Vec<Vec<usize>> = if flat {
            vec![(0..params.len()).collect()]
        } else {
            (0..params.len()).map(|i| vec![i]).collect()
        };
        for tensors in groups {
            let mut table = Vec::new();
            let mut start = 0u32;
            for &i in &tensors {
                let (p, g) = (&params[i], &grads[i]);
                let (param_offset, grad_offset) = if flat { (p.first(), g.first()) } else { (0, 0) };
                table.extend([
                    start,
                    p.len as u32,
                    param_offset as u32,
                    grad_offset as u32,
                    (g.len / p.len) as u32,
                    0,
                    0,
                    0,
                ]);
                start += p.len as u32;
            }
            let table = storage_init(&self.ctx, "optimizer_tensors", &table)?;
            let view = |b: &GpuBuf<f32>| if flat { b.whole() } else { b.view.clone() };
            let first = tensors[0];
            let mut bind = self
                .kernel(&kernel)?
                .buf("tensors", &table.view)
                .buf("grad", &view(&grads[first]))
                .buf("param", &view(&params[first]));
            for (name, state) in STATE_BINDINGS.iter().zip(moments) {
                bind = bind.buf(name, &view(&state[first]));
            }
            let d = bind
                .param("elements", start)
                .param("tensors", tensors.len())
                .step(self.step(values))
                .grid(grid_1d(start as u64, 256, self.max_dim()))
                .build(op)?;
            self.push(d);
        }
        Ok(())
    }
}
