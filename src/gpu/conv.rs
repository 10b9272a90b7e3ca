//! The convolution layers' kernels (shaders/conv.wgsl, and the batch gather of gather.wgsl): the
//! naive, shape-generic kernels, the GPU's reference and the fallback for every shape and
//! adapter: one invocation per output element for the forward pass, then the 2x2 max-pool as a
//! kernel of its own; the backward pass routes the pooled gradient through the pool and the ReLU
//! (`pool_backward`), then one workgroup per weight element and one invocation per input
//! element. Every sum in the CPU reference's order. And the fused family's trunk
//! (shaders/trunk.wgsl): the gather and both layers forward in one dispatch, both backward in
//! another.
//!
//! These functions only bind and record: [`GpuOps`]'s `Ops` methods have checked the buffers
//! against the shapes and chosen the kernels.

use anyhow::Result;

use super::kernels::{grid_1d, Binder, StepUniform};
use super::ops::{ensure_packed, GpuBuf, GpuOps};
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

/// What shaders/trunk.wgsl takes: LeNet-5's trunk (1 -> 6 channels, 5x5, padding 2, on 28x28
/// images; 6 -> 16, 5x5, no padding), at any batch.
pub(super) fn trunk_fits(t: &TrunkShape) -> bool {
    let conv = |cin, cout, side, padding| ConvShape {
        batch: t.conv1.batch,
        in_channels: cin,
        out_channels: cout,
        height: side,
        width: side,
        kernel: 5,
        padding,
    };
    t.conv1.batch > 0
        && t.conv2.batch == t.conv1.batch
        && t.conv1 == conv(1, 6, 28, 2)
        && t.conv2 == conv(6, 16, 14, 0)
}

/// Workgroups per image of trunk_forward: the fewest (1, 2, 4 or 8, each taking that share of
/// conv2's 16 channels and recomputing conv1, which costs half of conv2) that give a batch at
/// least 264 workgroups, two per multiprocessor of a 132-SM card; one on a CPU adapter, where a
/// recomputed conv1 is only more work.
pub(super) fn trunk_splits(batch: usize, cpu: bool) -> usize {
    if cpu {
        return 1;
    }
    [1, 2, 4, 8].into_iter().find(|&s| batch * s >= 264).unwrap_or(8)
}

impl GpuOps {
    /// The trunk's forward pass in one dispatch (trunk.wgsl's trunk_forward).
    pub(super) fn trunk_forward_fused(&mut self, a: TrunkForward<Self>) -> Result<()> {
        let TrunkForwardArgs { gather, conv1, conv2, s } = a;
        let batch = gather.batch;
        let f32s = [&*gather.input, &*conv1.conv, &*conv1.pooled, &*conv2.conv, &*conv2.pooled];
        ensure_packed("activations", &f32s)?;
        ensure_packed("indices", &[&*gather.labels, &*conv1.argmax, &*conv2.argmax])?;
        ensure_packed("parameters", &[conv1.weight, conv1.bias, conv2.weight, conv2.bias])?;
        let splits = self.trunk_splits.unwrap_or_else(|| trunk_splits(s.conv1.batch, self.on_cpu()));
        let d = self
            .kernel("trunk_forward")?
            .buf("images", &batch.data.images.view)
            .buf("labels", &batch.data.labels.view)
            .buf("indices", &batch.indices.view)
            .buf("shifts", &batch.shifts.view)
            .buf("lut", &self.lut.view)
            .buf("weights", &conv1.weight.whole())
            .buf("acts", &gather.input.whole())
            .buf("acts_u32", &gather.labels.whole())
            .trunk_offsets(TrunkOffsets {
                rows: batch.data.rows,
                cols: batch.data.cols,
                splits,
                input: gather.input.first(),
                labels: gather.labels.first(),
                conv1: [conv1.conv.first(), conv1.pooled.first(), conv1.argmax.first(), 0],
                conv2: [conv2.conv.first(), conv2.pooled.first(), conv2.argmax.first(), 0],
                params1: [conv1.weight.first(), conv1.bias.first(), 0, 0],
                params2: [conv2.weight.first(), conv2.bias.first(), 0, 0],
                ..TrunkOffsets::new(s.conv1.batch)
            })
            .step(self.step(StepUniform::default()))
            .grid(grid_1d((s.conv1.batch * splits) as u64, 1, self.max_dim()))
            .build("trunk_forward")?;
        self.push(d);
        Ok(())
    }

    /// The trunk's backward pass in one dispatch (trunk.wgsl's trunk_backward), one weight
    /// gradient partial per image.
    pub(super) fn trunk_backward_fused(&mut self, a: TrunkBackward<Self>) -> Result<()> {
        let TrunkBackwardArgs { dpooled, conv2, dpooled1, conv1, s } = a;
        let f32s = [dpooled, &*dpooled1, conv1.conv, conv1.input, conv2.conv, conv2.input];
        ensure_packed("activations", &f32s)?;
        ensure_packed("indices", &[conv1.argmax, conv2.argmax])?;
        ensure_packed("parameters", &[conv1.weight, conv2.weight])?;
        ensure_packed("gradients", &[&*conv1.dweight, &*conv1.dbias, &*conv2.dweight, &*conv2.dbias])?;
        let d = self
            .kernel("trunk_backward")?
            .buf("weights", &conv1.weight.whole())
            .buf("acts", &dpooled.whole())
            .buf("acts_u32", &conv1.argmax.whole())
            .buf("grads", &conv1.dweight.whole())
            .trunk_offsets(TrunkOffsets {
                input: conv1.input.first(),
                conv1: [conv1.conv.first(), conv2.input.first(), conv1.argmax.first(), dpooled1.first()],
                conv2: [conv2.conv.first(), 0, conv2.argmax.first(), dpooled.first()],
                params1: [conv1.weight.first(), 0, conv1.dweight.first(), conv1.dbias.first()],
                params2: [conv2.weight.first(), 0, conv2.dweight.first(), conv2.dbias.first()],
                ..TrunkOffsets::new(s.conv1.batch)
            })
            .grid(grid_1d(s.conv1.batch as u64, 1, self.max_dim()))
            .build("trunk_backward")?;
        self.push(d);
        Ok(())
    }
}

/// trunk.wgsl's `Params`: the batch, the images' sides, the forward pass's splits, and where
/// each tensor starts in its packed buffer (what a pass does not read stays 0): per layer its
/// ReLU output, pooled output, argmax, pooled gradient, and its weight, bias and their gradients.
#[derive(Default)]
struct TrunkOffsets {
    batch: usize,
    rows: usize,
    cols: usize,
    splits: usize,
    input: usize,
    labels: usize,
    conv1: [usize; 4],
    conv2: [usize; 4],
    params1: [usize; 4],
    params2: [usize; 4],
}

impl TrunkOffsets {
    fn new(batch: usize) -> Self {
        TrunkOffsets { batch, splits: 1, ..Default::default() }
    }
}

impl Binder<'_> {
    fn trunk_offsets(self, o: TrunkOffsets) -> Self {
        self.param("batch", o.batch)
            .param("rows", o.rows)
            .param("cols", o.cols)
            .param("splits", o.splits)
            .param("input_at", o.input)
            .param("labels_at", o.labels)
            .param("conv1_at", o.conv1)
            .param("conv2_at", o.conv2)
            .param("params1_at", o.params1)
            .param("params2_at", o.params2)
    }
}

#[cfg(test)]
mod tests {
    use super::trunk_splits;

    #[test]
    fn the_forward_pass_splits_images_until_a_large_gpu_has_two_workgroups_per_multiprocessor() {
        let splits: Vec<usize> =
            [1, 33, 64, 66, 132, 264, 1100].iter().map(|&b| trunk_splits(b, false)).collect();
        assert_eq!(splits, [8, 8, 8, 4, 2, 1, 1]);
        assert_eq!(trunk_splits(1, true), 1);
    }
}
