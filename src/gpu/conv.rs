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

use super::kernels::{grid_1d, StepUniform};
use super::ops::{GpuBuf, GpuOps};
use crate::ops::*;

impl GpuOps {
    /// input[b] = image `indices[b]` shifted, pixels / 255; one invocation per pixel.
    pub(super) fn gather_naive(&mut self, g: Gather<Self>) -> Result<()> {
        let (batch, input, labels) = (g.batch, g.input, g.labels);
        let (data, b) = (batch.data, batch.batch);
        let d = self
            .kernel("gather")?
            .buf("images", &data.images.view)
            .buf("labels", &data.labels.view)
            .buf("indices", &batch.indices.view)
            .buf("shifts", &batch.shifts.view)
            .buf("lut", &self.lut.view)
            .buf("gathered", &input.view)
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

    /// conv + bias + ReLU, one invocation per output element, then the pool, one per pooled one.
    pub(super) fn conv_pool_forward_naive(&mut self, input: &GpuBuf<f32>, l: ConvLayer<Self>) -> Result<()> {
        let (op, s) = ("conv_relu_pool_forward", l.s);
        let d = self
            .kernel("conv_forward_naive")?
            .buf("input", &input.view)
            .buf("weight", &l.weight.view)
            .buf("bias", &l.bias.view)
            .buf("conv", &l.conv.view)
            .conv_shape(s)
            .grid(grid_1d(s.output_len() as u64, 256, self.max_dim()))
            .build(op)?;
        self.push(d);
        let d = self
            .kernel("pool_forward")?
            .buf("conv", &l.conv.view)
            .buf("pooled", &l.pooled.view)
            .buf("argmax", &l.argmax.view)
            .conv_shape(s)
            .grid(grid_1d(s.pooled_len() as u64, 256, self.max_dim()))
            .build(op)?;
        self.push(d);
        Ok(())
    }

    /// The conv-output gradient from the pooled one, then the weight and (when asked) input
    /// gradients from it.
    pub(super) fn conv_pool_backward_naive(&mut self, a: ConvBackward<Self>) -> Result<()> {
        let (op, s) = ("conv_backward_from_pool", a.s);
        let dconv = self.scratch("dconv", s.output_len())?;
        let d = self
            .kernel("pool_backward")?
            .buf("saved_conv", &a.conv.view)
            .buf("dpooled", &a.dpooled.view)
            .buf("saved_argmax", &a.argmax.view)
            .buf("dconv", &dconv.view)
            .conv_shape(s)
            .grid(grid_1d(s.output_len() as u64, 256, self.max_dim()))
            .build(op)?;
        self.push(d);
        // One workgroup per weight element, then one per bias element.
        let params = s.weight_len() + s.out_channels;
        let d = self
            .kernel("conv_backward_weight_naive")?
            .buf("dconv", &dconv.view)
            .buf("input", &a.input.view)
            .buf("dweight", &a.dweight.view)
            .buf("dbias", &a.dbias.view)
            .conv_shape(s)
            .grid(grid_1d(params as u64, 1, self.max_dim()))
            .build(op)?;
        self.push(d);
        if let Some(dinput) = &a.dinput {
            let d = self
                .kernel("conv_backward_input_naive")?
                .buf("dconv", &dconv.view)
                .buf("weight", &a.weight.view)
                .buf("dinput", &dinput.view)
                .conv_shape(s)
                .grid(grid_1d(s.input_len() as u64, 256, self.max_dim()))
                .build(op)?;
            self.push(d);
        }
        Ok(())
    }
}
