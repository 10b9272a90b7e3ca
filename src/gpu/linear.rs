//! The fully connected layers' kernels (shaders/linear.wgsl): the naive, shape-generic kernels,
//! the GPU's reference and the fallback for every shape and adapter: 16x16 output tiles staged
//! through workgroup memory, the weight and input gradients as kernels of their own, and the
//! softmax cross-entropy on its own. Every sum in a fixed order. And the fused family's head
//! (shaders/head.wgsl): the three layers' whole step in one dispatch.
//!
//! These functions only bind and record: [`GpuOps`]'s `Ops` methods have checked the buffers
//! against the shapes and chosen the kernels.

use anyhow::Result;

use super::kernels::{grid_1d, Binder, StepUniform};
use super::ops::{ensure_packed, GpuBuf, GpuOps};
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

/// The largest features head.wgsl's workgroup memory holds: the head's input, fc1's and fc2's
/// outputs, and the classes.
const HEAD_MAX: [usize; 4] = [400, 128, 96, 16];

/// Images per round of head.wgsl (its vec4s).
const HEAD_ROUND: usize = 4;

/// At most this many workgroups, hence weight-gradient partials: past it, each takes more rounds
/// (64 partials of fc1's 48,000 weights are 12 MB for the update to read).
const HEAD_MAX_GROUPS: usize = 64;

/// Whether head.wgsl takes the head `s`.
pub(super) fn head_fits(s: &HeadShape) -> bool {
    s.batch > 0 && s.features.iter().zip(HEAD_MAX).all(|(&f, max)| (1..=max).contains(&f))
}

/// head.wgsl's workgroups at `batch`, one weight-gradient partial each, and the images each takes.
pub(super) fn head_groups(batch: usize) -> (usize, usize) {
    let groups = batch.div_ceil(HEAD_ROUND).clamp(1, HEAD_MAX_GROUPS);
    (groups, batch.div_ceil(groups))
}

impl GpuOps {
    /// The head's whole step in one dispatch (head.wgsl). Its tensors must come packed: the
    /// parameters in one buffer, the activations (input, outputs, output gradients, input
    /// gradient) in another, the gradients in a third, as the trainer and the op checks lay
    /// them out ([`Ops::alloc_packed`]).
    pub(super) fn head_fused(&mut self, a: Head<Self>) -> Result<()> {
        let s = a.s;
        let [l1, l2, l3] = &a.layers;
        let params = [l1.weight, l1.bias, l2.weight, l2.bias, l3.weight, l3.bias];
        let acts = [a.input, &*a.dinput, &*l1.out, &*l2.out, &*l3.out, &*l1.dout, &*l2.dout, &*l3.dout];
        let grads = [&*l1.dweight, &*l1.dbias, &*l2.dweight, &*l2.dbias, &*l3.dweight, &*l3.dbias];
        ensure_packed("parameters", &params)?;
        ensure_packed("activations", &acts)?;
        ensure_packed("gradients", &grads)?;
        let acts_whole = a.input.whole();
        self.ctx.check_binding("the fused head's activations", acts_whole.size)?;
        let (groups, group_images) = head_groups(s.batch);
        let at = |b: &GpuBuf<f32>| b.first();
        let d = self
            .kernel("head_step")?
            .buf("weights", &l1.weight.whole())
            .buf("acts", &acts_whole)
            .buf("grads", &l1.dweight.whole())
            .buf("labels", &a.labels.whole())
            .buf("losses", &a.losses.whole())
            .buf("correct", &a.correct.whole())
            .param("batch", s.batch)
            .param("group_images", group_images)
            .param("scale", 1.0f32 / s.batch as f32)
            .param("labels_at", a.labels.first())
            .param("features", s.features)
            .param("acts_at", [a.input, &*l1.out, &*l2.out, &*l3.out].map(at))
            .param("dacts_at", [&*a.dinput, &*l1.dout, &*l2.dout, &*l3.dout].map(at))
            .param("fc1_at", [l1.weight, l1.bias, &*l1.dweight, &*l1.dbias].map(at))
            .param("fc2_at", [l2.weight, l2.bias, &*l2.dweight, &*l2.dbias].map(at))
            .param("fc3_at", [l3.weight, l3.bias, &*l3.dweight, &*l3.dbias].map(at))
            .step(self.step(StepUniform::default()))
            .grid((groups as u32, 1, 1))
            .build("head_forward_backward")?;
        self.push(d);
        Ok(())
    }
}
