//! The convolution layers' kernels (shaders/conv.wgsl, and the batch gather of gather.wgsl): the
//! naive, shape-generic kernels, the GPU's reference and the fallback for every shape and
//! adapter: one invocation per output element for the forward pass, then the 2x2 max-pool as a
//! kernel of its own; the backward pass routes the pooled gradient through the pool and the ReLU
//! (`pool_backward`), then one workgroup per weight element and one invocation per input
//! element. Every sum in the CPU reference's order.
//!
//! These functions only bind and record: [`GpuOps`]'s `Ops` methods have checked the buffers
//! against the shapes and chosen the kernels.

use anyhow::Result;

use super::kernels::{grid_1d, Binder, StepUniform};
use super::ops::{GpuBuf, GpuOps};
use crate::ops::*;

impl GpuOps {
    /// input[b] = image `indices[b]` shifted, pixels / 255; one invocation per pixel.
    pub(super) fn gather_naive(&mut self, g: Gather<Self>) -> Result<()> {
        let (data, b) = (g.batch.data, g.batch.batch);
        let d = self
            .bind_gather("gather", &g)?
            .param("batch", b)
            .param("rows", data.rows)
            .param("cols", data.cols)
            .grid(grid_1d((b * data.rows * data.cols) as u64, 256, self.max_dim()))
            .build("gather")?;
        self.push(d);
        Ok(())
    }

    /// A gathering kernel (gather.wgsl's, or conv_v2.wgsl's gathering forward) bound to the
    /// gather's tensors: the data set, the step's samples and shifts, the pixel table, where the
    /// batch and its labels go, and the step uniform.
    pub(super) fn bind_gather(&self, kernel: &str, g: &Gather<Self>) -> Result<Binder<'_>> {
        let (data, batch) = (g.batch.data, g.batch);
        Ok(self
            .kernel(kernel)?
            .buf("images", &data.images.view)
            .buf("labels", &data.labels.view)
            .buf("indices", &batch.indices.view)
            .buf("shifts", &batch.shifts.view)
            .buf("lut", &self.lut.view)
            .buf("gathered", &g.input.view)
            .buf("batch_labels", &g.labels.view)
            .step(self.step(StepUniform::default())))
    }

    /// conv + bias + ReLU, one invocation per output element, then the pool, one per pooled one.
    pub(super) fn conv_pool_forward_naive(&mut self, input: &GpuBuf<f32>, l: ConvLayer<Self>) -> Result<()> {
        let (op, s) = ("conv_relu_pool_forward", l.s);
        self.record_conv(op, "conv_forward_naive", s, (s.output_len(), 256), |b| {
            b.buf("input", &input.view)
                .buf("weight", &l.weight.view)
                .buf("bias", &l.bias.view)
                .buf("conv", &l.conv.view)
        })?;
        self.record_conv(op, "pool_forward", s, (s.pooled_len(), 256), |b| {
            b.buf("conv", &l.conv.view).buf("pooled", &l.pooled.view).buf("argmax", &l.argmax.view)
        })
    }

    /// The conv-output gradient from the pooled one, then the weight and (when asked) input
    /// gradients from it.
    pub(super) fn conv_pool_backward_naive(&mut self, a: ConvBackward<Self>) -> Result<()> {
        let (op, s) = ("conv_backward_from_pool", a.s);
        let dconv = self.scratch("dconv", s.output_len())?;
        self.record_conv(op, "pool_backward", s, (s.output_len(), 256), |b| {
            b.buf("saved_conv", &a.conv.view)
                .buf("dpooled", &a.dpooled.view)
                .buf("saved_argmax", &a.argmax.view)
                .buf("dconv", &dconv.view)
        })?;
        // One workgroup per weight element, then one per bias element.
        let params = s.weight_len() + s.out_channels;
        self.record_conv(op, "conv_backward_weight_naive", s, (params, 1), |b| {
            b.buf("dconv", &dconv.view)
                .buf("input", &a.input.view)
                .buf("dweight", &a.dweight.view)
                .buf("dbias", &a.dbias.view)
        })?;
        if let Some(dinput) = &a.dinput {
            self.record_conv(op, "conv_backward_input_naive", s, (s.input_len(), 256), |b| {
                b.buf("dconv", &dconv.view).buf("weight", &a.weight.view).buf("dinput", &dinput.view)
            })?;
        }
        Ok(())
    }

    /// Records conv.wgsl's `kernel` for `op` at the layer's shape, bound by `bind`, over `items`
    /// (how many, and per workgroup: an invocation each, or a workgroup each).
    fn record_conv(
        &mut self,
        op: &'static str,
        kernel: &str,
        s: ConvShape,
        (items, per_group): (usize, u32),
        bind: impl FnOnce(Binder<'_>) -> Binder<'_>,
    ) -> Result<()> {
        let grid = grid_1d(items as u64, per_group, self.max_dim());
        let d = bind(self.kernel(kernel)?).conv_shape(s).grid(grid).build(op)?;
        self.push(d);
        Ok(())
    }
}
