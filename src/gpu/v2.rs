//! The second kernels (`LENET_KERNELS=v2`; shaders/conv_v2.wgsl and shaders/linear_v2.wgsl): one
//! dispatch per layer and direction, register-blocked, the batch gather folded into the first
//! convolution, each layer's weight and input gradients in one dispatch, the output layer's
//! forward, loss and backward in one, and the batch sums of the weight gradients left as partials
//! for the optimizer to add. A training step of LeNet-5 is 10 dispatches (the first kernels,
//! `v1`, take 19). Shapes these kernels do not take fall back to the first ones (see
//! [`GpuOps`]'s `Ops` methods). Their staging loops load several values before storing any, so
//! that a round of staging waits on memory once.
//!
//! On a GPU the default, `mixed`, runs these convolutions with the first kernels' fully
//! connected layers (15 dispatches a step): on the H100 the convolutions here were 1.1-3.7x
//! faster than the first ones, while the fully connected kernels here, register-blocked for few
//! fat workgroups (what lavapipe wants, where `v2` is the default), leave a large GPU nearly
//! empty and wait on memory: 3-6x slower there. `v3` pairs these convolutions with fully
//! connected kernels written for a large GPU ([`super::v3`]), in 10 dispatches; it waits for an
//! H100 to time it against `mixed`.

use anyhow::Result;

use super::kernels::{grid_1d, Binder, StepUniform};
use super::ops::{GpuBuf, GpuOps};
use crate::ops::*;

/// Which kernels the GPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// The first kernels: 19 dispatches a step.
    V1,
    /// The second: 10 dispatches a step.
    V2,
    /// The second kernels' convolutions with the first ones' fully connected layers: 15
    /// dispatches a step. On the H100 the second FC kernels, register-blocked for few fat
    /// workgroups, are latency-bound (BENCHMARKS.md), while its convolutions are the faster.
    Mixed,
    /// The second kernels' convolutions with the third fully connected kernels, shaped for a
    /// large GPU (see [`super::v3`]): 10 dispatches a step.
    V3,
}

/// A generation of kernels for one kind of layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Generation {
    First,
    Second,
    Third,
}

/// The entry points of the second kernels.
pub const KERNELS: [&str; 6] = [
    "conv_pool_forward",
    "gather_conv_pool_forward",
    "conv_pool_backward",
    "linear_forward_v2",
    "linear_backward_v2",
    "linear_xent_v2",
];

/// The environment variable that picks the kernels: `auto` (the default), `v1`, `v2`, `mixed` or
/// `v3`.
pub const KERNELS_ENV: &str = "LENET_KERNELS";

impl Variant {
    /// Every choice of kernels.
    pub const ALL: [Variant; 4] = [Variant::V1, Variant::V2, Variant::Mixed, Variant::V3];

    /// Whether the convolutions run the second kernels (where the shape fits them).
    pub fn conv_v2(self) -> bool {
        !matches!(self, Variant::V1)
    }

    /// Which generation of kernels the fully connected layers run (where the shape fits them).
    pub fn linear(self) -> Generation {
        match self {
            Variant::V1 | Variant::Mixed => Generation::First,
            Variant::V2 => Generation::Second,
            Variant::V3 => Generation::Third,
        }
    }

    /// The entry points this choice needs beyond the first kernels.
    pub fn kernels(self) -> impl Iterator<Item = &'static str> {
        let conv: &[&str] = if self.conv_v2() { &KERNELS } else { &[] };
        let linear: &[&str] = if self.linear() == Generation::Third { &super::v3::KERNELS } else { &[] };
        conv.iter().chain(linear).copied()
    }

    /// From `LENET_KERNELS` on an adapter of this kind: unset, empty or `auto`,
    /// [`Variant::default_for`] it.
    pub fn from_env_for(device_type: wgpu::DeviceType) -> Result<Self> {
        match std::env::var(KERNELS_ENV) {
            Ok(v) if !matches!(v.trim(), "" | "auto") => v.parse(),
            _ => Ok(Self::default_for(device_type)),
        }
    }

    /// The fastest measured on the adapter's kind (BENCHMARKS.md): `mixed` on a GPU (the H100),
    /// `v2` on a software adapter such as lavapipe, whose two cores want few fat workgroups.
    pub fn default_for(device_type: wgpu::DeviceType) -> Self {
        if device_type == wgpu::DeviceType::Cpu {
            Variant::V2
        } else {
            Variant::Mixed
        }
    }
}

impl std::str::FromStr for Variant {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "v1" => Ok(Variant::V1),
            "v2" => Ok(Variant::V2),
            "mixed" => Ok(Variant::Mixed),
            "v3" => Ok(Variant::V3),
            other => anyhow::bail!("{KERNELS_ENV}={other:?}: the kernels are auto, v1, v2, mixed or v3"),
        }
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Variant::V1 => "v1",
            Variant::V2 => "v2",
            Variant::Mixed => "mixed",
            Variant::V3 => "v3",
        })
    }
}

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
/// Images per output-layer workgroup (`XT` in linear_v2.wgsl) and its most classes (`CMAX`).
const XT: usize = 32;
const CMAX: usize = 16;
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
pub fn images_per_group(batch: usize) -> usize {
    batch.div_ceil(CONV_GROUPS).max(1)
}

/// Partial sums the v2 conv backward writes.
pub fn conv_partials(batch: usize) -> usize {
    batch.div_ceil(images_per_group(batch)).max(1)
}

/// Whether the v2 output-layer kernel takes this shape.
pub fn xent_fits(s: &LinearShape) -> bool {
    s.out_features <= CMAX && s.out_features > 0
}

/// Partial sums the v2 output layer writes.
pub fn xent_partials(batch: usize) -> usize {
    batch.div_ceil(XT).max(1)
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
pub(super) enum ConvInput<'a> {
    /// A batch in a buffer.
    Input(&'a GpuBuf<f32>),
    /// Gathered from the data set (into `input`, kept for the backward pass, and `labels`).
    Gather(Gather<'a, GpuOps>),
}

/// These functions only bind and record: [`GpuOps`]'s `Ops` methods have checked the buffers
/// against the shapes and chosen the kernels.
impl GpuOps {
    /// conv + bias + ReLU + max-pool of a batch, one workgroup per image.
    pub(super) fn conv_pool_forward_v2(&mut self, input: ConvInput, l: ConvLayer<Self>) -> Result<()> {
        let s = l.s;
        let (kernel, b, data) = match input {
            ConvInput::Gather(GatherArgs { input: gathered, labels, batch }) => {
                let d = batch.data;
                let b = self
                    .kernel("gather_conv_pool_forward")?
                    .buf("images", &d.images.view)
                    .buf("labels", &d.labels.view)
                    .buf("indices", &batch.indices.view)
                    .buf("shifts", &batch.shifts.view)
                    .buf("lut", &self.lut.view)
                    .buf("gathered", &gathered.view)
                    .buf("batch_labels", &labels.view)
                    .step(self.step(StepUniform::default()));
                ("gather_conv_pool_forward", b, (d.rows, d.cols))
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
        let d = conv_params(b, s, tiles, images_per_group(s.batch), (0, 0))
            .grid(grid_1d(workgroups, 1, self.max_dim()))
            .build("conv_backward_from_pool")?;
        self.push(d);
        Ok(())
    }

    pub(super) fn linear_forward_v2(&mut self, a: LinearForward<Self>) -> Result<()> {
        let s = a.s;
        let d = self
            .kernel("linear_forward_v2")?
            .buf("rows", &a.input.view)
            .buf("weight", &a.weight.view)
            .buf("bias", &a.bias.view)
            .buf("out", &a.out.view)
            .linear_shape(s, a.relu)
            .param("dinput_tiles", 0u32)
            .param("scale", 0.0f32)
            .grid((s.out_features.div_ceil(8) as u32, s.batch.div_ceil(64) as u32, 1))
            .build("linear_forward")?;
        self.push(d);
        Ok(())
    }

    pub(super) fn linear_backward_v2(&mut self, a: LinearBackward<Self>) -> Result<()> {
        let s = a.s;
        let (b, tiles) = self.bind_linear_backward("linear_backward_v2", &a, (8, 64))?;
        let w_tiles = (s.in_features + 1).div_ceil(64) * s.out_features.div_ceil(8);
        let d = b
            .buf("rows", &a.dout.view)
            .param("scale", 0.0f32)
            .grid(grid_1d((tiles + w_tiles) as u64, 1, self.max_dim()))
            .build("linear_backward")?;
        self.push(d);
        Ok(())
    }

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

    /// The output layer's forward pass, loss and backward pass, one workgroup per `XT` images.
    pub(super) fn linear_xent_v2(&mut self, a: LinearXent<Self>) -> Result<()> {
        let d = self
            .bind_linear_xent("linear_xent_v2", &a)?
            .param("dinput_tiles", 0u32)
            .grid((xent_partials(a.s.batch) as u32, 1, 1))
            .build("linear_xent_forward_backward")?;
        self.push(d);
        Ok(())
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_variant_parses_from_its_name_and_picks_its_kernels() {
        for v in Variant::ALL {
            assert_eq!(v.to_string().parse::<Variant>().unwrap(), v);
        }
        let err = "v4".parse::<Variant>().unwrap_err().to_string();
        assert!(err.contains("auto, v1, v2, mixed or v3"), "{err}");
        // Unset, the kernels follow the adapter's kind.
        assert_eq!(Variant::default_for(wgpu::DeviceType::Cpu), Variant::V2);
        assert_eq!(Variant::default_for(wgpu::DeviceType::DiscreteGpu), Variant::Mixed);
        assert_eq!(Variant::default_for(wgpu::DeviceType::IntegratedGpu), Variant::Mixed);
        let kernels = |v: Variant| (v.conv_v2(), v.linear());
        assert_eq!(kernels(Variant::V1), (false, Generation::First));
        assert_eq!(kernels(Variant::V2), (true, Generation::Second));
        assert_eq!(kernels(Variant::Mixed), (true, Generation::First));
        assert_eq!(kernels(Variant::V3), (true, Generation::Third));
        let v3: Vec<&str> = Variant::V3.kernels().collect();
        assert!(v3.contains(&"linear_xent_v3") && v3.contains(&"conv_pool_backward"), "{v3:?}");
        assert_eq!(Variant::V1.kernels().count(), 0);
    }
}
