//! The third fully connected kernels (`LENET_KERNELS=v3`; shaders/linear_v3.wgsl), run with the
//! second kernels' convolutions: 10 dispatches a training step, like `v2`, with FC kernels shaped
//! for a large GPU, where the H100 found the second ones latency-bound (BENCHMARKS.md): small
//! tiles and many workgroups, the reduction staged in slices of 128 (few round trips to memory
//! in a row), weight gradients as partial sums over groups of images that the optimizer adds.
//! Any shape runs on them but the output layer's, which takes at most 16 classes (wider ones
//! fall back to the first kernels).

use anyhow::Result;

use super::kernels::grid_1d;
use super::ops::GpuOps;
use crate::ops::*;

/// The entry points of the third kernels.
pub const KERNELS: [&str; 3] = ["linear_forward_v3", "linear_backward_v3", "linear_xent_v3"];

/// Tile sides in linear_v3.wgsl: images (`TB`), outputs or input features (`TN`), a dW tile's
/// outputs (`TO`); the output layer's most classes (`CMAX`).
const TB: usize = 8;
const TN: usize = 16;
const TO: usize = 8;
const CMAX: usize = 16;
/// A weight-gradient partial sums at least `MIN_GROUP` images; at most `MAX_PARTS` partials.
const MIN_GROUP: usize = 64;
const MAX_PARTS: usize = 16;
/// The output layer's partials: at least `TB` images each, at most `MAX_XENT_PARTS` of them.
const MAX_XENT_PARTS: usize = 64;

/// Images per weight-gradient partial of a hidden layer at this batch.
fn images_per_group(batch: usize) -> usize {
    batch.div_ceil(MAX_PARTS).max(MIN_GROUP)
}

/// Partial sums a hidden layer's backward writes.
pub fn linear_partials(batch: usize) -> usize {
    batch.div_ceil(images_per_group(batch)).max(1)
}

/// Images per workgroup (and partial) of the output layer at this batch: a multiple of `TB`.
fn xent_images_per_group(batch: usize) -> usize {
    batch.div_ceil(MAX_XENT_PARTS).next_multiple_of(TB).max(TB)
}

/// Partial sums the output layer writes.
pub fn xent_partials(batch: usize) -> usize {
    batch.div_ceil(xent_images_per_group(batch)).max(1)
}

/// Whether the output-layer kernel takes this shape.
pub fn xent_fits(s: &LinearShape) -> bool {
    s.out_features <= CMAX && s.out_features > 0
}

/// These functions only bind and record: [`GpuOps`]'s `Ops` methods have checked the buffers
/// against the shapes and chosen the kernels.
impl GpuOps {
    pub(super) fn linear_forward_v3(&mut self, a: LinearForward<Self>) -> Result<()> {
        let s = a.s;
        let d = self
            .kernel("linear_forward_v3")?
            .buf("input", &a.input.view)
            .buf("weight", &a.weight.view)
            .buf("bias", &a.bias.view)
            .buf("out", &a.out.view)
            .linear_shape(s, a.relu)
            .param("dinput_tiles", 0u32)
            .param("images_per_group", 0u32)
            .param("scale", 0.0f32)
            .grid((s.out_features.div_ceil(TN) as u32, s.batch.div_ceil(TB) as u32, 1))
            .build("linear_forward")?;
        self.push(d);
        Ok(())
    }

    /// The input gradient's tiles and every partial's weight-gradient tiles in one dispatch.
    pub(super) fn linear_backward_v3(&mut self, a: LinearBackward<Self>) -> Result<()> {
        let s = a.s;
        let (b, tiles) = self.bind_linear_backward("linear_backward_v3", &a, (TN, TB))?;
        let w_tiles =
            (s.in_features + 1).div_ceil(TN) * s.out_features.div_ceil(TO) * linear_partials(s.batch);
        let d = b
            .param("images_per_group", images_per_group(s.batch))
            .param("scale", 0.0f32)
            .grid(grid_1d((tiles + w_tiles) as u64, 1, self.max_dim()))
            .build("linear_backward")?;
        self.push(d);
        Ok(())
    }

    /// The output layer's forward pass, loss and backward pass, one workgroup per group of
    /// images (and weight-gradient partial).
    pub(super) fn linear_xent_v3(&mut self, a: LinearXent<Self>) -> Result<()> {
        let d = self
            .bind_linear_xent("linear_xent_v3", &a)?
            .param("dinput_tiles", 0u32)
            .param("images_per_group", xent_images_per_group(a.s.batch))
            .grid(grid_1d(xent_partials(a.s.batch) as u64, 1, self.max_dim()))
            .build("linear_xent_forward_backward")?;
        self.push(d);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partials_cover_the_batch_within_their_caps() {
        for batch in [1, 7, 8, 63, 64, 65, 256, 1000, 1024, 60_000] {
            let (per, parts) = (images_per_group(batch), linear_partials(batch));
            assert!(parts <= MAX_PARTS && per >= MIN_GROUP, "batch {batch}");
            assert!(parts * per >= batch && (parts - 1) * per < batch, "batch {batch}: {parts} x {per}");
            let (per, parts) = (xent_images_per_group(batch), xent_partials(batch));
            assert!(parts <= MAX_XENT_PARTS && per % TB == 0, "batch {batch}");
            assert!(parts * per >= batch && (parts - 1) * per < batch, "batch {batch}: {parts} x {per}");
        }
        // LeNet's batch 256: 4 partials for fc1 and fc2, 32 (8 images each) for fc3.
        assert_eq!((linear_partials(256), xent_partials(256)), (4, 32));
    }
}
