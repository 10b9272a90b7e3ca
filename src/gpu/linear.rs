//! The fully connected layers' kernels (shaders/linear.wgsl): the naive, shape-generic kernels,
//! the GPU's reference and the fallback for every shape and adapter: 16x16 output tiles staged
//! through workgroup memory, the weight and input gradients as kernels of their own, and the
//! softmax cross-entropy on its own. Every sum in a fixed order.
//!
//! These functions only bind and record: [`GpuOps`]'s `Ops` methods have checked the buffers
//! against the shapes and chosen the kernels.

use anyhow::Result;

use super::kernels::{grid_1d, Binder, StepUniform};
use super::ops::GpuOps;
use crate::ops::*;

impl GpuOps {
    pub(super) fn linear_forward_naive(&mut self, a: LinearForward<Self>) -> Result<()> {
        let s = a.s;
        let d = self
            .bind_linear_forward("linear_forward", &a)?
            .param("scale", 0.0f32)
            .grid(((s.out_features as u32).div_ceil(16), (s.batch as u32).div_ceil(16), 1))
            .build("linear_forward")?;
        self.push(d);
        Ok(())
    }

    /// A forward kernel (the naive one, or linear_v3.wgsl's) bound to the layer's tensors and
    /// shape.
    pub(super) fn bind_linear_forward(&self, kernel: &str, a: &LinearForward<Self>) -> Result<Binder<'_>> {
        Ok(self
            .kernel(kernel)?
            .buf("input", &a.input.view)
            .buf("weight", &a.weight.view)
            .buf("bias", &a.bias.view)
            .buf("out", &a.out.view)
            .linear_shape(a.s, a.relu))
    }

    pub(super) fn softmax_xent_naive(&mut self, a: SoftmaxXent<Self>) -> Result<()> {
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

    pub(super) fn linear_backward_naive(&mut self, a: LinearBackward<Self>) -> Result<()> {
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
}
