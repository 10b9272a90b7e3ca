//! The compute pipelines, built once per device from `shaders/*.wgsl`, and the dispatch builders
//! that bind a kernel to buffers for one shape. Both the per-op wrappers ([`super::ops`]) and
//! the trainer ([`super::trainer`]) record through these, so they run the same code.

use std::num::NonZeroU64;

use anyhow::bail;
use bytemuck::{Pod, Zeroable};
use wgpu::util::DeviceExt;

use crate::model::{AdamConfig, ConvShape};

const GATHER_WGSL: &str = include_str!("../../shaders/gather.wgsl");
const CONV_WGSL: &str = include_str!("../../shaders/conv.wgsl");
const POOL_WGSL: &str = include_str!("../../shaders/pool.wgsl");
const MATMUL_WGSL: &str = include_str!("../../shaders/matmul.wgsl");
const RELU_WGSL: &str = include_str!("../../shaders/relu.wgsl");
const XENT_WGSL: &str = include_str!("../../shaders/softmax_xent.wgsl");
const ADAM_WGSL: &str = include_str!("../../shaders/adam.wgsl");

/// Invocations per workgroup of the 1-D kernels, and the reductions' width.
pub const WG: u32 = 256;
/// Side of the matmul kernels' output tiles.
pub const TILE: u32 = 16;
/// Stride of the per-step uniforms (bound with a dynamic offset). 256 is the largest
/// `min_uniform_buffer_offset_alignment` wgpu allows, so it suits every device.
pub const STEP_STRIDE: u64 = 256;

/// The per-step values read by gather, softmax_xent and adam.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct StepUniform {
    /// Where this step's batch starts in the index buffer.
    pub index_offset: u32,
    /// Which slot of the stats buffer softmax_xent writes.
    pub stats_slot: u32,
    pub step_size: f32,
    pub bias_correction2_sqrt: f32,
}

/// One step's loss and correct count as the GPU writes them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct Stat {
    pub loss: f32,
    pub correct: u32,
}

#[derive(Clone, Copy, Debug)]
enum Slot {
    Read(u32),
    Write(u32),
    Uniform(u32),
}

/// A pipeline and the layout of its bind group 0. Kernels with `uses_step` also read the step
/// uniform at group 1, binding 0, with a dynamic offset.
pub struct Kernel {
    pub name: &'static str,
    pub pipeline: wgpu::ComputePipeline,
    pub group0: wgpu::BindGroupLayout,
    pub uses_step: bool,
}

/// Every pipeline, compiled once.
pub struct Kernels {
    pub gather: Kernel,
    pub conv_forward: Kernel,
    pub conv_backward_input: Kernel,
    pub conv_backward_weight: Kernel,
    pub conv_sum_splits: Kernel,
    pub conv_forward_pool: Kernel,
    pub conv_forward_naive: Kernel,
    pub conv_backward_input_naive: Kernel,
    pub conv_backward_weight_naive: Kernel,
    pub pool_forward: Kernel,
    pub pool_backward: Kernel,
    pub linear_forward: Kernel,
    pub linear_backward_input: Kernel,
    pub linear_backward_weight: Kernel,
    pub relu_forward: Kernel,
    pub relu_backward: Kernel,
    pub softmax_xent: Kernel,
    pub adam: Kernel,
    pub step_layout: wgpu::BindGroupLayout,
}

impl Kernels {
    /// Compiles every shader; a compile or validation failure is an `Err`, not a panic.
    pub fn new(device: &wgpu::Device) -> anyhow::Result<Self> {
        let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let step_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("step uniform"),
            entries: &[wgpu::BindGroupLayoutEntry {
                binding: 0,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: true,
                    min_binding_size: NonZeroU64::new(std::mem::size_of::<StepUniform>() as u64),
                },
                count: None,
            }],
        });
        let module = |label: &str, src: &str| {
            device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(label),
                source: wgpu::ShaderSource::Wgsl(src.into()),
            })
        };
        let gather_m = module("gather.wgsl", GATHER_WGSL);
        let conv_m = module("conv.wgsl", CONV_WGSL);
        let pool_m = module("pool.wgsl", POOL_WGSL);
        let matmul_m = module("matmul.wgsl", MATMUL_WGSL);
        let relu_m = module("relu.wgsl", RELU_WGSL);
        let xent_m = module("softmax_xent.wgsl", XENT_WGSL);
        let adam_m = module("adam.wgsl", ADAM_WGSL);
        use Slot::*;
        let k = |name: &'static str, m: &wgpu::ShaderModule, slots: &[Slot], uses_step: bool| {
            build_kernel(device, &step_layout, name, m, slots, uses_step)
        };
        // Bindings: 0..=2 read-only inputs, 3..=4 outputs, 5 the dims uniform (see the shaders).
        let (r0, r1, r2, w3, w4, u5) = (Read(0), Read(1), Read(2), Write(3), Write(4), Uniform(5));
        let kernels = Kernels {
            gather: k(
                "gather",
                &gather_m,
                &[Read(0), Read(1), Read(2), Read(3), Write(4), Write(5), Uniform(6)],
                true,
            ),
            conv_forward: k("conv_forward", &conv_m, &[r0, r1, r2, w3, u5], false),
            conv_backward_input: k("conv_backward_input", &conv_m, &[r0, r1, r2, w3, u5, Read(7)], false),
            conv_backward_weight: k(
                "conv_backward_weight",
                &conv_m,
                &[r0, r1, r2, w3, w4, u5, Read(7)],
                false,
            ),
            conv_forward_pool: k("conv_forward_pool", &conv_m, &[r0, r1, r2, w3, w4, u5, Write(6)], false),
            conv_sum_splits: k("conv_sum_splits", &conv_m, &[r0, w3, w4, u5], false),
            conv_forward_naive: k("conv_forward_naive", &conv_m, &[r0, r1, r2, w3, u5], false),
            conv_backward_input_naive: k("conv_backward_input_naive", &conv_m, &[r0, r1, w3, u5], false),
            conv_backward_weight_naive: k(
                "conv_backward_weight_naive",
                &conv_m,
                &[r0, r1, w3, w4, u5],
                false,
            ),
            pool_forward: k("pool_forward", &pool_m, &[r0, w3, w4, u5], false),
            pool_backward: k("pool_backward", &pool_m, &[r0, r1, r2, w3, u5], false),
            linear_forward: k("linear_forward", &matmul_m, &[r0, r1, r2, w3, u5], false),
            linear_backward_input: k("linear_backward_input", &matmul_m, &[r0, r1, r2, w3, u5], false),
            linear_backward_weight: k("linear_backward_weight", &matmul_m, &[r0, r1, w3, w4, u5], false),
            relu_forward: k("relu_forward", &relu_m, &[r0, w3, u5], false),
            relu_backward: k("relu_backward", &relu_m, &[r0, r1, w3, u5], false),
            softmax_xent: k("softmax_xent", &xent_m, &[r0, r1, w3, w4, u5], true),
            adam: k("adam", &adam_m, &[r0, w3, w4, Write(5), Uniform(6)], true),
            step_layout,
        };
        if let Some(e) = pollster::block_on(validation.pop()) {
            bail!("building the compute pipelines failed: {e}");
        }
        Ok(kernels)
    }
}

fn build_kernel(
    device: &wgpu::Device,
    step_layout: &wgpu::BindGroupLayout,
    name: &'static str,
    module: &wgpu::ShaderModule,
    slots: &[Slot],
    uses_step: bool,
) -> Kernel {
    let entries: Vec<wgpu::BindGroupLayoutEntry> = slots
        .iter()
        .map(|s| {
            let (binding, ty) = match *s {
                Slot::Read(b) => (b, wgpu::BufferBindingType::Storage { read_only: true }),
                Slot::Write(b) => (b, wgpu::BufferBindingType::Storage { read_only: false }),
                Slot::Uniform(b) => (b, wgpu::BufferBindingType::Uniform),
            };
            wgpu::BindGroupLayoutEntry {
                binding,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer { ty, has_dynamic_offset: false, min_binding_size: None },
                count: None,
            }
        })
        .collect();
    let group0 = device
        .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: Some(name), entries: &entries });
    let groups: Vec<Option<&wgpu::BindGroupLayout>> =
        if uses_step { vec![Some(&group0), Some(step_layout)] } else { vec![Some(&group0)] };
    let layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some(name),
        bind_group_layouts: &groups,
        immediate_size: 0,
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(name),
        layout: Some(&layout),
        module,
        entry_point: Some(name),
        // Every kernel writes its workgroup arrays before reading them: skip the zeroing prologue.
        compilation_options: wgpu::PipelineCompilationOptions {
            zero_initialize_workgroup_memory: false,
            ..Default::default()
        },
        cache: None,
    });
    Kernel { name, pipeline, group0, uses_step }
}

/// Compiles `src` and builds a compute pipeline for `entry` (layout derived from the shader)
/// inside an error scope: a WGSL error comes back as `Err` with the compiler's message.
pub fn check_shader(device: &wgpu::Device, label: &str, src: &str, entry: &str) -> anyhow::Result<()> {
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(label),
        source: wgpu::ShaderSource::Wgsl(src.into()),
    });
    let _pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(label),
        layout: None,
        module: &module,
        entry_point: Some(entry),
        compilation_options: Default::default(),
        cache: None,
    });
    if let Some(e) = pollster::block_on(scope.pop()) {
        bail!("shader {label} ({entry}) does not compile: {e}");
    }
    Ok(())
}

/// A byte range of a buffer, as one binding sees it.
#[derive(Clone, Debug)]
pub struct View {
    pub buffer: wgpu::Buffer,
    pub offset: u64,
    pub size: u64,
}

impl View {
    pub fn whole(buffer: &wgpu::Buffer) -> Self {
        View { buffer: buffer.clone(), offset: 0, size: buffer.size() }
    }
}

/// One recorded kernel launch: pipeline, bindings, and grid.
pub struct Dispatch {
    pub name: &'static str,
    pub pipeline: wgpu::ComputePipeline,
    pub group0: wgpu::BindGroup,
    pub uses_step: bool,
    pub groups: (u32, u32, u32),
}

impl Dispatch {
    /// Records this launch; `step` is the step-uniform bind group and this step's offset in it.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>, step: Option<(&wgpu::BindGroup, u32)>) {
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.group0, &[]);
        if self.uses_step {
            let (bg, offset) = step.expect("kernel needs the step uniform");
            pass.set_bind_group(1, bg, &[offset]);
        }
        pass.dispatch_workgroups(self.groups.0, self.groups.1, self.groups.2);
    }
}

/// A small uniform buffer holding `words` (padded to 16 bytes).
pub fn dims_uniform(device: &wgpu::Device, label: &str, words: &[u32]) -> View {
    let mut w = words.to_vec();
    while !w.len().is_multiple_of(4) {
        w.push(0);
    }
    let buffer = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(label),
        contents: bytemuck::cast_slice(&w),
        usage: wgpu::BufferUsages::UNIFORM,
    });
    View::whole(&buffer)
}

/// Workgroups for `n` items of `per_group` each, spread over x and y when there are more than
/// one dimension allows; the kernels rebuild the linear index as `wid.x + wid.y * nwg.x`.
pub fn grid_1d(n: u64, per_group: u32, max_dim: u32) -> (u32, u32, u32) {
    let groups = n.div_ceil(per_group as u64).max(1);
    let max_dim = max_dim.max(1) as u64;
    if groups <= max_dim {
        (groups as u32, 1, 1)
    } else {
        let y = groups.div_ceil(max_dim);
        let x = groups.div_ceil(y);
        (x as u32, y as u32, 1)
    }
}

/// The forward tensors of a ReLU'd conv followed by a 2x2 max-pool, for backward kernels that
/// gather the conv-output gradient from the pooled one.
#[derive(Clone, Copy)]
pub struct PoolGrad<'a> {
    pub argmax: &'a View,
    pub conv_out: &'a View,
}

/// Builds the dispatches of every op for given buffers and shapes.
pub struct Builder<'a> {
    pub device: &'a wgpu::Device,
    pub kernels: &'a Kernels,
    pub max_dim: u32,
}

impl Builder<'_> {
    fn make(
        &self,
        kernel: &Kernel,
        label: &str,
        entries: &[(u32, &View)],
        dims: &[u32],
        dims_binding: u32,
        groups: (u32, u32, u32),
    ) -> Dispatch {
        let dims = dims_uniform(self.device, label, dims);
        let mut all: Vec<(u32, &View)> = entries.to_vec();
        all.push((dims_binding, &dims));
        let bg_entries: Vec<wgpu::BindGroupEntry> = all
            .iter()
            .map(|(binding, v)| wgpu::BindGroupEntry {
                binding: *binding,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &v.buffer,
                    offset: v.offset,
                    size: NonZeroU64::new(v.size),
                }),
            })
            .collect();
        let group0 = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(label),
            layout: &kernel.group0,
            entries: &bg_entries,
        });
        Dispatch {
            name: kernel.name,
            pipeline: kernel.pipeline.clone(),
            group0,
            uses_step: kernel.uses_step,
            groups,
        }
    }

    fn grid(&self, n: u64, per_group: u32) -> (u32, u32, u32) {
        grid_1d(n, per_group, self.max_dim)
    }

    /// input[b, p] = lut[pixel of image indices[offset + b]]; labels_out[b] = labels[...].
    #[allow(clippy::too_many_arguments)]
    pub fn gather(
        &self,
        images: &View,
        labels: &View,
        indices: &View,
        lut: &View,
        input: &View,
        labels_out: &View,
        batch: usize,
        pixels: usize,
    ) -> Dispatch {
        let n = (batch * pixels) as u64;
        self.make(
            &self.kernels.gather,
            "gather",
            &[(0, images), (1, labels), (2, indices), (3, lut), (4, input), (5, labels_out)],
            &[batch as u32, pixels as u32],
            6,
            self.grid(n, WG),
        )
    }

    /// Convolution + bias (+ ReLU when `relu`): the tiled kernel for 5x5 kernels whose operands
    /// fit workgroup memory, else the one-invocation-per-output fallback.
    pub fn conv_forward(
        &self,
        out: &View,
        inp: &View,
        weight: &View,
        bias: &View,
        s: ConvShape,
        relu: bool,
    ) -> Dispatch {
        let entries = [(0, inp), (1, weight), (2, bias), (3, out)];
        match forward_tile(s) {
            Some(tile) => self.make(
                &self.kernels.conv_forward,
                "conv_forward",
                &entries,
                &conv_dims(s, relu, tile),
                5,
                (s.batch as u32, (s.out_channels as u32).div_ceil(tile), 1),
            ),
            None => self.make(
                &self.kernels.conv_forward_naive,
                "conv_forward_naive",
                &entries,
                &conv_dims(s, relu, 0),
                5,
                self.grid(s.output_len() as u64, WG),
            ),
        }
    }

    /// Convolution + bias + ReLU fused with the 2x2 max-pool after it: writes the conv output
    /// (the pool backward's mask), the pooled output and its argmax, as `conv_forward` then
    /// `pool_forward` would. None when the shape has no tiled kernel or an odd output side.
    #[allow(clippy::too_many_arguments)]
    pub fn conv_forward_pool(
        &self,
        out: &View,
        pooled: &View,
        argmax: &View,
        inp: &View,
        weight: &View,
        bias: &View,
        s: ConvShape,
    ) -> Option<Dispatch> {
        let tile = forward_tile(s)?;
        if !s.out_height().is_multiple_of(2) || !s.out_width().is_multiple_of(2) {
            return None;
        }
        Some(self.make(
            &self.kernels.conv_forward_pool,
            "conv_forward_pool",
            &[(0, inp), (1, weight), (2, bias), (3, out), (4, pooled), (6, argmax)],
            &conv_dims(s, true, tile),
            5,
            (s.batch as u32, (s.out_channels as u32).div_ceil(tile), 1),
        ))
    }

    pub fn conv_backward_input(&self, dinp: &View, dout: &View, weight: &View, s: ConvShape) -> Dispatch {
        match backward_input_tile(s) {
            Some(tile) => self.backward_input_tiled(dinp, dout, weight, None, s, tile),
            None => self.make(
                &self.kernels.conv_backward_input_naive,
                "conv_backward_input_naive",
                &[(0, dout), (1, weight), (3, dinp)],
                &conv_dims(s, false, 0),
                5,
                self.grid(s.input_len() as u64, WG),
            ),
        }
    }

    /// `conv_backward_input` fed by the gradient of the 2x2 max-pool after the conv: the
    /// pool backward with ReLU mask (`pool_backward(.., Some(conv_out), ..)`) is gathered on
    /// the fly instead of run as its own dispatch. None for shapes without the tiled kernel.
    pub fn conv_backward_input_from_pool(
        &self,
        dinp: &View,
        dpool: &View,
        pool: PoolGrad,
        weight: &View,
        s: ConvShape,
    ) -> Option<Dispatch> {
        let tile = backward_input_tile(s)?;
        Some(self.backward_input_tiled(dinp, dpool, weight, Some(pool), s, tile))
    }

    fn backward_input_tiled(
        &self,
        dinp: &View,
        dout: &View,
        weight: &View,
        pool: Option<PoolGrad>,
        s: ConvShape,
        tile: u32,
    ) -> Dispatch {
        // Without a pool the shader never reads bindings 2 and 7; any read-only buffer fills them.
        let (arg, mask) = pool.map_or((dout, dout), |p| (p.argmax, p.conv_out));
        let mut dims = conv_dims(s, false, tile);
        dims[9] = pool.is_some() as u32;
        self.make(
            &self.kernels.conv_backward_input,
            "conv_backward_input",
            &[(0, dout), (1, weight), (2, mask), (3, dinp), (7, arg)],
            &dims,
            5,
            (s.batch as u32, 1, 1),
        )
    }

    /// Weight and bias gradients in one dispatch (one split of the batch).
    pub fn conv_backward_weight(
        &self,
        dweight: &View,
        dbias: &View,
        dout: &View,
        inp: &View,
        s: ConvShape,
    ) -> Dispatch {
        if weight_tiled(s) {
            self.weight_tiled(dweight, dbias, dout, None, inp, s, 1).remove(0)
        } else {
            // One workgroup per weight element and per bias element.
            self.make(
                &self.kernels.conv_backward_weight_naive,
                "conv_backward_weight_naive",
                &[(0, dout), (1, inp), (3, dweight), (4, dbias)],
                &conv_dims(s, false, 0),
                5,
                self.grid((s.weight_len() + s.out_channels) as u64, 1),
            )
        }
    }

    /// Weight and bias gradients with the batch split `splits` ways for parallelism (pass 1
    /// writes per-split partial sums to a scratch buffer, pass 2 adds them in split order; one
    /// dispatch when `splits` is 1), fed by the gradient of the 2x2 max-pool after the conv
    /// when `pool` is given (see [`Self::conv_backward_input_from_pool`]). None for shapes
    /// without the tiled kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn conv_backward_weight_split(
        &self,
        dweight: &View,
        dbias: &View,
        dout: &View,
        pool: Option<PoolGrad>,
        inp: &View,
        s: ConvShape,
        splits: u32,
    ) -> Option<Vec<Dispatch>> {
        weight_tiled(s).then(|| self.weight_tiled(dweight, dbias, dout, pool, inp, s, splits))
    }

    #[allow(clippy::too_many_arguments)]
    fn weight_tiled(
        &self,
        dweight: &View,
        dbias: &View,
        dout: &View,
        pool: Option<PoolGrad>,
        inp: &View,
        s: ConvShape,
        splits: u32,
    ) -> Vec<Dispatch> {
        let (arg, mask) = pool.map_or((dout, dout), |p| (p.argmax, p.conv_out));
        let mut dims = conv_dims(s, false, 1);
        dims[9] = pool.is_some() as u32;
        let pairs = (s.out_channels * s.in_channels) as u32;
        if splits <= 1 {
            return vec![self.make(
                &self.kernels.conv_backward_weight,
                "conv_backward_weight",
                &[(0, dout), (1, inp), (2, mask), (3, dweight), (4, dbias), (7, arg)],
                &dims,
                5,
                (pairs, 1, 1),
            )];
        }
        let n = (s.weight_len() + s.out_channels) as u64;
        let scratch = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("conv_weight_partials"),
            size: n * splits as u64 * 4,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let scratch = View::whole(&scratch);
        vec![
            self.make(
                &self.kernels.conv_backward_weight,
                "conv_backward_weight",
                &[(0, dout), (1, inp), (2, mask), (3, &scratch), (4, dbias), (7, arg)],
                &dims,
                5,
                (pairs, splits, 1),
            ),
            self.make(
                &self.kernels.conv_sum_splits,
                "conv_sum_splits",
                &[(0, &scratch), (3, dweight), (4, dbias)],
                &conv_dims(s, false, splits),
                5,
                self.grid(n, WG),
            ),
        ]
    }

    /// 2x2 max-pool with argmax over `planes` = batch * channels planes of height x width.
    pub fn pool_forward(
        &self,
        out: &View,
        argmax: &View,
        inp: &View,
        planes: usize,
        height: usize,
        width: usize,
    ) -> Dispatch {
        self.make(
            &self.kernels.pool_forward,
            "pool_forward",
            &[(0, inp), (3, out), (4, argmax)],
            &[planes as u32, height as u32, width as u32, 0],
            5,
            self.grid((planes * height * width / 4) as u64, WG),
        )
    }

    /// Max-pool backward as a gather per input element; with `mask`, also ReLU's backward
    /// through the pooled tensor (the producer's forward output).
    #[allow(clippy::too_many_arguments)]
    pub fn pool_backward(
        &self,
        dinp: &View,
        dout: &View,
        argmax: &View,
        mask: Option<&View>,
        planes: usize,
        height: usize,
        width: usize,
    ) -> Dispatch {
        // Without a mask the shader never reads binding 2; any read-only buffer fills it.
        let m = mask.unwrap_or(dout);
        self.make(
            &self.kernels.pool_backward,
            "pool_backward",
            &[(0, dout), (1, argmax), (2, m), (3, dinp)],
            &[planes as u32, height as u32, width as u32, mask.is_some() as u32],
            5,
            self.grid((planes * height * width) as u64, WG),
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub fn linear_forward(
        &self,
        out: &View,
        inp: &View,
        weight: &View,
        bias: &View,
        batch: usize,
        in_features: usize,
        out_features: usize,
        relu: bool,
    ) -> Dispatch {
        let gx = (out_features as u32).div_ceil(TILE);
        let gy = (batch as u32).div_ceil(TILE);
        self.make(
            &self.kernels.linear_forward,
            "linear_forward",
            &[(0, inp), (1, weight), (2, bias), (3, out)],
            &[batch as u32, in_features as u32, out_features as u32, relu as u32],
            5,
            (gx, gy, 1),
        )
    }

    /// dinp = dout · weight, times (mask > 0) when a mask (the forward output at dinp's
    /// position) is given.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_backward_input(
        &self,
        dinp: &View,
        dout: &View,
        weight: &View,
        mask: Option<&View>,
        batch: usize,
        in_features: usize,
        out_features: usize,
    ) -> Dispatch {
        let gx = (in_features as u32).div_ceil(TILE);
        let gy = (batch as u32).div_ceil(TILE);
        let m = mask.unwrap_or(dout);
        self.make(
            &self.kernels.linear_backward_input,
            "linear_backward_input",
            &[(0, dout), (1, weight), (2, m), (3, dinp)],
            &[batch as u32, in_features as u32, out_features as u32, mask.is_some() as u32],
            5,
            (gx, gy, 1),
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub fn linear_backward_weight(
        &self,
        dweight: &View,
        dbias: &View,
        dout: &View,
        inp: &View,
        batch: usize,
        in_features: usize,
        out_features: usize,
    ) -> Dispatch {
        let gx = (in_features as u32 + 1).div_ceil(TILE);
        let gy = (out_features as u32).div_ceil(TILE);
        self.make(
            &self.kernels.linear_backward_weight,
            "linear_backward_weight",
            &[(0, dout), (1, inp), (3, dweight), (4, dbias)],
            &[batch as u32, in_features as u32, out_features as u32, 0],
            5,
            (gx, gy, 1),
        )
    }

    pub fn relu_forward(&self, out: &View, inp: &View, n: usize) -> Dispatch {
        self.make(
            &self.kernels.relu_forward,
            "relu_forward",
            &[(0, inp), (3, out)],
            &[n as u32],
            5,
            self.grid(n as u64, WG),
        )
    }

    pub fn relu_backward(&self, dinp: &View, dout: &View, out: &View, n: usize) -> Dispatch {
        self.make(
            &self.kernels.relu_backward,
            "relu_backward",
            &[(0, dout), (1, out), (3, dinp)],
            &[n as u32],
            5,
            self.grid(n as u64, WG),
        )
    }

    /// One workgroup: dlogits, and (mean loss, correct) into `stats[step.stats_slot]`.
    pub fn softmax_xent(
        &self,
        dlogits: &View,
        stats: &View,
        logits: &View,
        labels: &View,
        batch: usize,
        classes: usize,
    ) -> Dispatch {
        let scale = 1.0f32 / batch as f32;
        self.make(
            &self.kernels.softmax_xent,
            "softmax_xent",
            &[(0, logits), (1, labels), (3, dlogits), (4, stats)],
            &[batch as u32, classes as u32, scale.to_bits(), 0],
            5,
            (1, 1, 1),
        )
    }

    /// Adam over `n` elements of the flat parameter, gradient and moment buffers.
    pub fn adam(&self, param: &View, grad: &View, m: &View, v: &View, n: usize, c: &AdamConfig) -> Dispatch {
        // The same f32 constants as the CPU reference computes.
        let dims = [
            n as u32,
            c.beta2.to_bits(),
            (1.0 - c.beta1).to_bits(),
            (1.0 - c.beta2).to_bits(),
            c.eps.to_bits(),
        ];
        self.make(
            &self.kernels.adam,
            "adam",
            &[(0, grad), (3, param), (4, m), (5, v)],
            &dims,
            6,
            self.grid(n as u64, WG),
        )
    }
}

/// Workgroup memory of the tiled conv kernels, in f32s (`smem` in conv.wgsl).
const CONV_SMEM: usize = 4000;
/// The tiled conv kernels' kernel side (`KS` in conv.wgsl).
const CONV_KS: usize = 5;

/// Output channels per workgroup of the tiled forward kernel (about 512 outputs each, within
/// workgroup memory), or None for the fallback.
fn forward_tile(s: ConvShape) -> Option<u32> {
    if s.kernel != CONV_KS {
        return None;
    }
    let plane = (s.height + 2 * s.padding) * (s.width + 2 * s.padding);
    let hw = s.out_height() * s.out_width();
    let mut tile = 512usize.div_ceil(hw).clamp(1, s.out_channels);
    let fits = |t: usize| s.in_channels * plane + t * (s.in_channels * 25 + 1) <= CONV_SMEM;
    while tile > 1 && !fits(tile) {
        tile -= 1;
    }
    fits(tile).then_some(tile as u32)
}

/// Whether the tiled backward-input kernel takes this shape (one image's dout and all weights
/// in workgroup memory); Some(0) (the dims' unused tile) if so.
fn backward_input_tile(s: ConvShape) -> Option<u32> {
    let fits = s.out_channels * s.out_height() * s.out_width() + s.weight_len() <= CONV_SMEM;
    (s.kernel == CONV_KS && s.padding < CONV_KS && fits).then_some(0)
}

/// Whether the tiled weight-gradient kernel takes this shape (its padded input plane must fit
/// below `RED_AT` in conv.wgsl).
fn weight_tiled(s: ConvShape) -> bool {
    s.kernel == CONV_KS && (s.height + 2 * s.padding) * (s.width + 2 * s.padding) <= 1200
}

fn conv_dims(s: ConvShape, relu: bool, tile: u32) -> [u32; 12] {
    [
        s.batch as u32,
        s.in_channels as u32,
        s.out_channels as u32,
        s.height as u32,
        s.width as u32,
        s.kernel as u32,
        s.padding as u32,
        relu as u32,
        tile,
        0,
        0,
        0,
    ]
}

/// lut[v] = v / 255 in f32, exactly as the CPU path converts pixels.
pub fn pixel_lut() -> Vec<f32> {
    (0..256).map(|v| v as f32 / 255.0).collect()
}

/// u8 bytes packed little-endian four to a u32 (zero-padded at the end).
pub fn pack_u8(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks(4)
        .map(|c| {
            let mut w = [0u8; 4];
            w[..c.len()].copy_from_slice(c);
            u32::from_le_bytes(w)
        })
        .collect()
}
