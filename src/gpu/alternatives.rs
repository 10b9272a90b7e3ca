//! The named alternatives' kernel bindings (see [`super::variant`] for the table):
//! shaders/conv_v2.wgsl's convolutions and shaders/linear_v3.wgsl's fully connected layers, and
//! which shapes they take. [`GpuOps`]'s `Ops` methods ask the `*_v2`/`*_v3` predicates here
//! whether the chosen alternative runs an op at its shape, else they run the naive kernels.

use anyhow::Result;

use super::kernels::{grid_1d, Binder, StepUniform};
use super::ops::{GpuBuf, GpuOps};
use crate::ops::*;

// ---- conv_v2.wgsl ----

/// The v2 conv kernels' workgroup arrays (`SM` f32s and `SM4` vec4s in conv_v2.wgsl): 32 KiB,
/// which the device must grant (WebGPU's default is 16 KiB; lavapipe offers 32, an H100 48).
const SM: usize = 1650;
const SM4: usize = 1587;
/// The workgroup storage the v2 kernels need, in bytes.
pub const WORKGROUP_BYTES: u32 = (SM * 4 + SM4 * 16) as u32;
/// Invocations of the v2 conv backward (`BWD`), and the input gradient's most input channels.
const BWD: usize = 256;
const MAX_CIN: usize = 8;
/// The weight gradient's most output channels (two groups of 8, in registers).
const MAX_COUT_BWD: usize = 16;
/// How many weight-gradient partials the conv backward aims for: enough workgroups to fill a
/// large GPU (an H100 has 132 SMs), few enough that the optimizer's sum stays short.
const CONV_GROUPS: usize = 128;

fn padded_plane(s: &ConvShape) -> usize {
    (s.height + 2 * s.padding) * (s.width + 2 * s.padding)
}

fn groups_of_8(s: &ConvShape) -> usize {
    s.out_channels.div_ceil(8)
}

fn pools(s: &ConvShape) -> bool {
    s.kernel > 0
        && s.kernel <= 5
        && s.out_channels > 0
        && s.out_height().is_multiple_of(2)
        && s.out_width().is_multiple_of(2)
}

/// Whether the v2 forward takes this shape: the input planes in `sm`, the weights and biases in
/// `sm4` (8 channels per 2 vec4s).
pub fn forward_fits(s: &ConvShape, gather: bool) -> bool {
    let taps = s.in_channels * s.kernel * s.kernel;
    pools(s)
        && (!gather || s.in_channels == 1)
        && s.in_channels * padded_plane(s) <= SM
        && (taps + 1) * 2 * groups_of_8(s) <= SM4
}

/// Whether the v2 backward takes this shape: for the input gradient, at most 8 input channels,
/// the image's dconv in `sm` and the weights in `sm4`; for the weight gradient, at most 16 output
/// channels, the input planes in `sm`, every channel's dconv in `sm4` (8 channels per 2 vec4s),
/// and an invocation per tap.
pub fn backward_fits(s: &ConvShape, dinput: bool) -> bool {
    let kk = s.kernel * s.kernel;
    let hw = s.out_height() * s.out_width();
    let input_role = s.in_channels <= MAX_CIN && s.out_channels * hw <= SM && s.out_channels * kk * 2 <= SM4;
    pools(s)
        && s.out_channels <= MAX_COUT_BWD
        && s.in_channels * kk < BWD
        && s.in_channels * padded_plane(s) <= SM
        && 2 * groups_of_8(s) * hw <= SM4
        && 4 * BWD <= SM4
        && (!dinput || input_role)
}

/// Images per weight-gradient workgroup of the conv backward at this batch.
pub fn conv_images_per_group(batch: usize) -> usize {
    batch.div_ceil(CONV_GROUPS).max(1)
}

/// Partial sums the v2 conv backward writes.
pub fn conv_partials(batch: usize) -> usize {
    batch.div_ceil(conv_images_per_group(batch)).max(1)
}

/// The convolution's shape, the workgroups that compute input gradients (or forward images),
/// the images per weight-gradient workgroup, and the data set's image sides when gathering.
fn conv_params(
    b: Binder<'_>,
    s: ConvShape,
    groups: usize,
    images_per_group: usize,
    data: (usize, usize),
) -> Binder<'_> {
    b.conv_shape(s)
        .param("groups", groups)
        .param("images_per_group", images_per_group)
        .param("data_rows", data.0)
        .param("data_cols", data.1)
}

/// Where the first conv layer's input comes from.
enum ConvInput<'a> {
    /// A batch in a buffer.
    Input(&'a GpuBuf<f32>),
    /// Gathered from the data set (into `input`, kept for the backward pass, and `labels`).
    Gather(Gather<'a, GpuOps>),
}

/// Whether the chosen alternative runs an op at its shape ([`GpuOps`]'s `Ops` methods ask; where
/// it does not, the naive kernels run).
impl GpuOps {
    pub(super) fn runs_conv_v2_forward(&self, s: &ConvShape, gather: bool) -> bool {
        self.variant.alternative().conv_v2 && forward_fits(s, gather)
    }

    pub(super) fn runs_conv_v2_backward(&self, s: &ConvShape, dinput: bool) -> bool {
        self.variant.alternative().conv_v2 && backward_fits(s, dinput)
    }

    /// Whether a step's packed activations at `batch` fit one binding, as the fused kernels bind
    /// them (64 KiB an image is more than LeNet-5's 43 KB).
    fn packed_activations_fit(&self, batch: usize) -> bool {
        (batch as u64) * 65536 <= self.ctx.max_binding()
    }

    /// The fused head where the variant has it and the head fits head.wgsl, with room for the
    /// packed activations in one binding.
    pub(super) fn runs_fused_head(&self, s: &HeadShape) -> bool {
        self.variant.alternative().fused_head
            && super::linear::head_fits(s)
            && self.packed_activations_fit(s.batch)
    }

    /// The fused trunk where the variant has it and the trunk is LeNet-5's, with room for the
    /// packed activations in one binding.
    pub(super) fn runs_fused_trunk(&self, t: &TrunkShape) -> bool {
        self.variant.alternative().fused_trunk
            && super::conv::trunk_fits(t)
            && self.packed_activations_fit(t.conv1.batch)
    }

    pub(super) fn runs_linear_v3(&self) -> bool {
        self.variant.alternative().linear_v3
    }

    pub(super) fn runs_xent_v3(&self, s: &LinearShape) -> bool {
        self.runs_linear_v3() && xent_fits(s)
    }

    /// The partial sums the chosen alternative writes for `op`'s weight gradient, or None where
    /// the naive kernels (one) run.
    pub(super) fn alternative_partials(&self, op: GradOp) -> Option<usize> {
        match op {
            GradOp::ConvFromPool(s, dinput) if self.runs_conv_v2_backward(&s, dinput) => {
                Some(conv_partials(s.batch))
            }
            GradOp::LinearXent(s) if self.runs_xent_v3(&s) => Some(xent_partials(s.batch)),
            GradOp::Linear(s) if self.runs_linear_v3() => Some(linear_partials(s.batch)),
            _ => None,
        }
    }
}

/// These functions only bind and record: [`GpuOps`]'s `Ops` methods have checked the buffers
/// against the shapes and chosen the kernels.
impl GpuOps {
    /// The first conv layer with the batch gathered on the way in.
    pub(super) fn gather_conv_pool_forward_v2(&mut self, g: Gather<Self>, l: ConvLayer<Self>) -> Result<()> {
        self.conv_pool_forward_v2_from(ConvInput::Gather(g), l)
    }

    pub(super) fn conv_pool_forward_v2(&mut self, input: &GpuBuf<f32>, l: ConvLayer<Self>) -> Result<()> {
        self.conv_pool_forward_v2_from(ConvInput::Input(input), l)
    }

    /// conv + bias + ReLU + max-pool of a batch, one workgroup per image.
    fn conv_pool_forward_v2_from(&mut self, input: ConvInput, l: ConvLayer<Self>) -> Result<()> {
        let s = l.s;
        let (kernel, b, data) = match input {
            ConvInput::Gather(g) => {
                let d = g.batch.data;
                (
                    "gather_conv_pool_forward",
                    self.bind_gather("gather_conv_pool_forward", &g)?,
                    (d.rows, d.cols),
                )
            }
            ConvInput::Input(input) => {
                ("conv_pool_forward", self.kernel("conv_pool_forward")?.buf("input", &input.view), (0, 0))
            }
        };
        let b = b
            .buf("weight", &l.weight.view)
            .buf("bias", &l.bias.view)
            .buf("conv", &l.conv.view)
            .buf("pooled", &l.pooled.view)
            .buf("argmax", &l.argmax.view);
        let d = conv_params(b, s, groups_of_8(&s), 1, data)
            .grid(grid_1d(s.batch as u64, 1, self.max_dim()))
            .build(kernel)?;
        self.push(d);
        Ok(())
    }

    /// The conv layer's backward pass in one dispatch (input gradients and weight partials).
    pub(super) fn conv_pool_backward_v2(&mut self, a: ConvBackward<Self>) -> Result<()> {
        let s = a.s;
        // Without an input gradient no workgroup writes one; a scratch buffer fills the binding.
        let scratch;
        let (dinput, tiles) = match a.dinput {
            Some(d) => (&*d, s.batch),
            None => {
                scratch = self.scratch("no_dinput", 1)?;
                (&scratch, 0)
            }
        };
        let b = self
            .kernel("conv_pool_backward")?
            .buf("dpooled", &a.dpooled.view)
            .buf("saved_argmax", &a.argmax.view)
            .buf("saved_conv", &a.conv.view)
            .buf("input", &a.input.view)
            .buf("weight", &a.weight.view)
            .buf("dinput", &dinput.view)
            .buf("dweight", &a.dweight.view)
            .buf("dbias", &a.dbias.view);
        let workgroups = (tiles + conv_partials(s.batch)) as u64;
        let d = conv_params(b, s, tiles, conv_images_per_group(s.batch), (0, 0))
            .grid(grid_1d(workgroups, 1, self.max_dim()))
            .build("conv_backward_from_pool")?;
        self.push(d);
        Ok(())
    }
}

// ---- linear_v3.wgsl ----

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
fn linear_images_per_group(batch: usize) -> usize {
    batch.div_ceil(MAX_PARTS).max(MIN_GROUP)
}

/// Partial sums a hidden layer's backward writes.
pub fn linear_partials(batch: usize) -> usize {
    batch.div_ceil(linear_images_per_group(batch)).max(1)
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
    /// A one-dispatch linear backward kernel (v2's or v3's) bound to the op's buffers, with the
    /// shape and `dinput_tiles`: the input gradient's tiles of (features, images) `tile`, which
    /// come first, when it is asked for. Returns the binder and that tile count.
    pub(super) fn bind_linear_backward(
        &self,
        kernel: &str,
        a: &LinearBackward<Self>,
        tile: (usize, usize),
    ) -> Result<(Binder<'_>, usize)> {
        let (s, dout) = (a.s, a.dout);
        let scratch;
        let (dinput, mask, tiles) = match &a.dinput {
            Some(InputGradArgs { dinput, relu_mask }) => {
                (&**dinput, *relu_mask, s.in_features.div_ceil(tile.0) * s.batch.div_ceil(tile.1))
            }
            None => {
                scratch = self.scratch("no_dinput", 1)?;
                (&scratch, None, 0)
            }
        };
        let b = self
            .kernel(kernel)?
            .buf("dout", &dout.view)
            .buf("input", &a.input.view)
            .buf("weight", &a.weight.view)
            // Without a mask the kernel never reads relu_mask; any read-only buffer fills it.
            .buf("relu_mask", &mask.unwrap_or(dout).view)
            .buf("dinput", &dinput.view)
            .buf("dweight", &a.dweight.view)
            .buf("dbias", &a.dbias.view)
            .linear_shape(s, mask.is_some())
            .param("dinput_tiles", tiles);
        Ok((b, tiles))
    }

    /// A one-dispatch output-layer kernel (v2's or v3's) bound to the op's buffers, with the
    /// shape, the loss gradient's scale and the step uniform.
    pub(super) fn bind_linear_xent(&self, kernel: &str, a: &LinearXent<Self>) -> Result<Binder<'_>> {
        let s = a.s;
        let scratch;
        let (dinput, mask) = match &a.dinput {
            Some(InputGradArgs { dinput, relu_mask }) => (&**dinput, *relu_mask),
            None => {
                scratch = self.scratch("no_dinput", s.batch * s.in_features)?;
                (&scratch, None)
            }
        };
        Ok(self
            .kernel(kernel)?
            .buf("input", &a.input.view)
            .buf("weight", &a.weight.view)
            .buf("bias", &a.bias.view)
            .buf("labels", &a.labels.view)
            .buf("out", &a.logits.view)
            .buf("dlogits", &a.dlogits.view)
            .buf("losses", &a.losses.view)
            .buf("correct", &a.correct.view)
            .buf("relu_mask", &mask.unwrap_or(a.input).view)
            .buf("dinput", &dinput.view)
            .buf("dweight", &a.dweight.view)
            .buf("dbias", &a.dbias.view)
            .linear_shape(s, mask.is_some())
            .param("scale", 1.0f32 / s.batch as f32)
            .step(self.step(StepUniform::default())))
    }

    pub(super) fn linear_forward_v3(&mut self, a: LinearForward<Self>) -> Result<()> {
        let s = a.s;
        let d = self
            .bind_linear_forward("linear_forward_v3", &a)?
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
            .param("images_per_group", linear_images_per_group(s.batch))
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
            let (per, parts) = (linear_images_per_group(batch), linear_partials(batch));
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
