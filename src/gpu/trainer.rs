//! The GPU backend: the data set, parameters, gradients and Adam moments resident on the device;
//! a chunk of optimiser steps recorded into one compute pass, submitted once and read back once.

use anyhow::{bail, ensure, Context as _};
use wgpu::util::DeviceExt;

use super::context::GpuContext;
use super::kernels::{pack_u8, pixel_lut, Builder, Dispatch, PoolGrad, Stat, StepUniform, View, STEP_STRIDE};
use crate::data::Dataset;
use crate::model::*;
use crate::train::{Backend, StepStats, SyncCounts};

/// The largest batch the forward-only evaluation runs at once.
const EVAL_BATCH: usize = 2048;

const STORAGE: wgpu::BufferUsages =
    wgpu::BufferUsages::STORAGE.union(wgpu::BufferUsages::COPY_DST).union(wgpu::BufferUsages::COPY_SRC);

/// Where each parameter tensor lives in the flat parameter-sized buffers (params, grads, m, v):
/// offsets in f32 elements, each aligned to the device's storage-binding offset alignment.
#[derive(Clone, Debug)]
pub struct ParamLayout {
    pub offsets: [usize; 10],
    pub lens: [usize; 10],
    /// Elements in each flat buffer, padding included.
    pub total: usize,
}

impl ParamLayout {
    pub fn new(alignment_bytes: u32) -> Self {
        let align = (alignment_bytes as usize / 4).max(1);
        let mut offsets = [0; 10];
        let mut lens = [0; 10];
        let mut at = 0usize;
        for (i, spec) in PARAM_SPECS.iter().enumerate() {
            at = at.next_multiple_of(align);
            offsets[i] = at;
            lens[i] = spec.len();
            at += spec.len();
        }
        ParamLayout { offsets, lens, total: at.next_multiple_of(align) }
    }

    /// The tensors laid out flat, zero in the padding.
    pub fn flatten(&self, p: &Params) -> Vec<f32> {
        let mut flat = vec![0.0; self.total];
        for i in 0..10 {
            flat[self.offsets[i]..][..self.lens[i]].copy_from_slice(&p.tensors[i]);
        }
        flat
    }

    pub fn unflatten(&self, flat: &[f32], p: &mut Params) {
        for i in 0..10 {
            p.tensors[i].copy_from_slice(&flat[self.offsets[i]..][..self.lens[i]]);
        }
    }

    fn view(&self, buffer: &wgpu::Buffer, id: ParamId) -> View {
        let i = id as usize;
        View { buffer: buffer.clone(), offset: (self.offsets[i] * 4) as u64, size: (self.lens[i] * 4) as u64 }
    }
}

/// A data set resident on the device: u8 pixels packed four to a u32, labels one per u32.
struct DeviceData {
    images: wgpu::Buffer,
    labels: wgpu::Buffer,
    len: usize,
}

fn upload_dataset(ctx: &GpuContext, data: &Dataset, what: &str) -> anyhow::Result<DeviceData> {
    ensure!(
        data.rows * data.cols == IMAGE_PIXELS,
        "{what} images are {}x{}, LeNet-5 needs {IMAGE_SIDE}x{IMAGE_SIDE}",
        data.rows,
        data.cols
    );
    ensure!(data.images.len() == data.len() * IMAGE_PIXELS, "{what} set: image bytes do not match the count");
    if let Some(l) = data.labels.iter().find(|&&l| l as usize >= CLASSES) {
        bail!("{what} set has label {l}, above 9");
    }
    // An empty set (`lenet eval` trains nothing) still needs a bindable, non-empty buffer.
    let mut packed = pack_u8(&data.images);
    if packed.is_empty() {
        packed.push(0);
    }
    let bytes = (packed.len() * 4) as u64;
    if bytes > ctx.max_binding() {
        bail!(
            "the {what} set ({} images, {bytes} bytes packed) exceeds the device's largest storage binding \
             ({} bytes) on {}",
            data.len(),
            ctx.max_binding(),
            ctx.adapter_info.name
        );
    }
    let mut labels: Vec<u32> = data.labels.iter().map(|&l| l as u32).collect();
    if labels.is_empty() {
        labels.push(0);
    }
    let images = ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(&format!("{what}_images")),
        contents: bytemuck::cast_slice(&packed),
        usage: STORAGE,
    });
    let labels = ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(&format!("{what}_labels")),
        contents: bytemuck::cast_slice(&labels),
        usage: STORAGE,
    });
    Ok(DeviceData { images, labels, len: data.len() })
}

fn buffer(
    ctx: &GpuContext,
    label: &str,
    bytes: u64,
    usage: wgpu::BufferUsages,
) -> anyhow::Result<wgpu::Buffer> {
    if usage.contains(wgpu::BufferUsages::STORAGE) && bytes > ctx.max_binding() {
        bail!(
            "buffer {label} needs {bytes} bytes, more than the device's largest storage binding ({} bytes) \
             on {}: use a smaller batch",
            ctx.max_binding(),
            ctx.adapter_info.name
        );
    }
    Ok(ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: bytes.max(4).next_multiple_of(4),
        usage,
        mapped_at_creation: false,
    }))
}

fn f32s(ctx: &GpuContext, label: &str, n: usize) -> anyhow::Result<View> {
    let b = buffer(ctx, label, (n * 4) as u64, STORAGE)?;
    Ok(View { buffer: b, offset: 0, size: (n * 4) as u64 })
}

/// The activations of a forward pass at one batch size, named for the layer producing them.
struct Activations {
    input: View,
    labels: View,
    conv1: View,
    pool1: View,
    pool1_argmax: View,
    conv2: View,
    pool2: View,
    pool2_argmax: View,
    fc1: View,
    fc2: View,
    logits: View,
}

impl Activations {
    fn new(ctx: &GpuContext, b: usize) -> anyhow::Result<Self> {
        let conv1 = b * CONV1_CHANNELS * CONV1_SIDE * CONV1_SIDE;
        let pool1 = b * CONV1_CHANNELS * POOL1_SIDE * POOL1_SIDE;
        let conv2 = b * CONV2_CHANNELS * CONV2_SIDE * CONV2_SIDE;
        Ok(Activations {
            input: f32s(ctx, "input", b * IMAGE_PIXELS)?,
            labels: f32s(ctx, "labels", b)?,
            conv1: f32s(ctx, "conv1", conv1)?,
            pool1: f32s(ctx, "pool1", pool1)?,
            pool1_argmax: f32s(ctx, "pool1_argmax", pool1)?,
            conv2: f32s(ctx, "conv2", conv2)?,
            pool2: f32s(ctx, "pool2", b * FC1_IN)?,
            pool2_argmax: f32s(ctx, "pool2_argmax", b * FC1_IN)?,
            fc1: f32s(ctx, "fc1", b * FC1_OUT)?,
            fc2: f32s(ctx, "fc2", b * FC2_OUT)?,
            logits: f32s(ctx, "logits", b * FC3_OUT)?,
        })
    }
}

/// Gradients with respect to the activations at one batch size.
struct ActivationGrads {
    dlogits: View,
    dfc2: View,
    dfc1: View,
    dpool2: View,
    dconv2: View,
    dpool1: View,
    dconv1: View,
}

impl ActivationGrads {
    fn new(ctx: &GpuContext, b: usize) -> anyhow::Result<Self> {
        Ok(ActivationGrads {
            dlogits: f32s(ctx, "dlogits", b * FC3_OUT)?,
            dfc2: f32s(ctx, "dfc2", b * FC2_OUT)?,
            dfc1: f32s(ctx, "dfc1", b * FC1_OUT)?,
            dpool2: f32s(ctx, "dpool2", b * FC1_IN)?,
            dconv2: f32s(ctx, "dconv2", b * CONV2_CHANNELS * CONV2_SIDE * CONV2_SIDE)?,
            dpool1: f32s(ctx, "dpool1", b * CONV1_CHANNELS * POOL1_SIDE * POOL1_SIDE)?,
            dconv1: f32s(ctx, "dconv1", b * CONV1_CHANNELS * CONV1_SIDE * CONV1_SIDE)?,
        })
    }
}

/// Per-step uniforms (256-byte stride, bound with a dynamic offset) and their bind group.
struct StepUniforms {
    buffer: wgpu::Buffer,
    group: wgpu::BindGroup,
}

impl StepUniforms {
    fn new(ctx: &GpuContext, label: &str, capacity: usize) -> anyhow::Result<Self> {
        let buffer = buffer(
            ctx,
            label,
            capacity as u64 * STEP_STRIDE,
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        )?;
        let group = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(label),
            layout: &ctx.kernels.step_layout,
            entries: &[wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &buffer,
                    offset: 0,
                    size: std::num::NonZeroU64::new(std::mem::size_of::<StepUniform>() as u64),
                }),
            }],
        });
        Ok(StepUniforms { buffer, group })
    }

    fn write(&self, ctx: &GpuContext, steps: &[StepUniform]) {
        let stride = STEP_STRIDE as usize;
        let mut bytes = vec![0u8; steps.len() * stride];
        for (i, s) in steps.iter().enumerate() {
            bytes[i * stride..][..std::mem::size_of::<StepUniform>()].copy_from_slice(bytemuck::bytes_of(s));
        }
        ctx.queue.write_buffer(&self.buffer, 0, &bytes);
    }
}

struct Flat {
    params: wgpu::Buffer,
    grads: wgpu::Buffer,
    adam_m: wgpu::Buffer,
    adam_v: wgpu::Buffer,
}

/// The forward pass: gather the batch, then every layer up to the logits.
#[allow(clippy::too_many_arguments)]
fn forward_dispatches(
    b: &Builder,
    layout: &ParamLayout,
    params: &wgpu::Buffer,
    data: &DeviceData,
    indices: &View,
    lut: &View,
    a: &Activations,
    batch: usize,
) -> Vec<Dispatch> {
    use ParamId::*;
    let p = |id| layout.view(params, id);
    let (c1, c2) = (conv1_shape(batch), conv2_shape(batch));
    let images = View::whole(&data.images);
    let labels = View::whole(&data.labels);
    let mut v = vec![b.gather(&images, &labels, indices, lut, &a.input, &a.labels, batch, IMAGE_PIXELS)];
    // conv + bias + ReLU + max-pool in one kernel where the shape allows, else two.
    let pooled = [
        (&a.conv1, &a.pool1, &a.pool1_argmax, &a.input, Conv1Weight, Conv1Bias, c1),
        (&a.conv2, &a.pool2, &a.pool2_argmax, &a.pool1, Conv2Weight, Conv2Bias, c2),
    ];
    for (out, pool, arg, inp, w, bias, s) in pooled {
        match b.conv_forward_pool(out, pool, arg, inp, &p(w), &p(bias), s) {
            Some(d) => v.push(d),
            None => {
                v.push(b.conv_forward(out, inp, &p(w), &p(bias), s, true));
                let side = s.out_height();
                v.push(b.pool_forward(pool, arg, out, batch * s.out_channels, side, side));
            }
        }
    }
    v.extend([
        b.linear_forward(&a.fc1, &a.pool2, &p(Fc1Weight), &p(Fc1Bias), batch, FC1_IN, FC1_OUT, true),
        b.linear_forward(&a.fc2, &a.fc1, &p(Fc2Weight), &p(Fc2Bias), batch, FC1_OUT, FC2_OUT, true),
        b.linear_forward(&a.logits, &a.fc2, &p(Fc3Weight), &p(Fc3Bias), batch, FC2_OUT, FC3_OUT, false),
    ]);
    v
}

/// Loss, the backward pass (ReLU backward fused into the linear backward-input and the
/// max-pool backward kernels), and Adam over every parameter.
#[allow(clippy::too_many_arguments)]
fn backward_dispatches(
    b: &Builder,
    layout: &ParamLayout,
    flat: &Flat,
    a: &Activations,
    g: &ActivationGrads,
    stats: &View,
    batch: usize,
    adam: &AdamConfig,
) -> Vec<Dispatch> {
    use ParamId::*;
    let p = |id| layout.view(&flat.params, id);
    let d = |id| layout.view(&flat.grads, id);
    let (c1, c2) = (conv1_shape(batch), conv2_shape(batch));
    let mut v = vec![
        b.softmax_xent(&g.dlogits, stats, &a.logits, &a.labels, batch, CLASSES),
        b.linear_backward_weight(&d(Fc3Weight), &d(Fc3Bias), &g.dlogits, &a.fc2, batch, FC2_OUT, FC3_OUT),
        b.linear_backward_input(&g.dfc2, &g.dlogits, &p(Fc3Weight), Some(&a.fc2), batch, FC2_OUT, FC3_OUT),
        b.linear_backward_weight(&d(Fc2Weight), &d(Fc2Bias), &g.dfc2, &a.fc1, batch, FC1_OUT, FC2_OUT),
        b.linear_backward_input(&g.dfc1, &g.dfc2, &p(Fc2Weight), Some(&a.fc1), batch, FC1_OUT, FC2_OUT),
        b.linear_backward_weight(&d(Fc1Weight), &d(Fc1Bias), &g.dfc1, &a.pool2, batch, FC1_IN, FC1_OUT),
        b.linear_backward_input(&g.dpool2, &g.dfc1, &p(Fc1Weight), None, batch, FC1_IN, FC1_OUT),
    ];
    // The conv backward kernels gather their output gradient through the max-pool's argmax and
    // ReLU mask (no pool backward dispatches); weight gradients split over the batch.
    let pool2 = PoolGrad { argmax: &a.pool2_argmax, conv_out: &a.conv2 };
    let pool1 = PoolGrad { argmax: &a.pool1_argmax, conv_out: &a.conv1 };
    let fused = (|| {
        let mut v = b.conv_backward_weight_split(
            &d(Conv2Weight),
            &d(Conv2Bias),
            &g.dpool2,
            Some(pool2),
            &a.pool1,
            c2,
            weight_splits(c2),
        )?;
        v.push(b.conv_backward_input_from_pool(&g.dpool1, &g.dpool2, pool2, &p(Conv2Weight), c2)?);
        // conv1's input is the image: no gradient to it is needed.
        v.extend(b.conv_backward_weight_split(
            &d(Conv1Weight),
            &d(Conv1Bias),
            &g.dpool1,
            Some(pool1),
            &a.input,
            c1,
            weight_splits(c1),
        )?);
        Some(v)
    })();
    v.extend(fused.unwrap_or_else(|| {
        vec![
            b.pool_backward(
                &g.dconv2,
                &g.dpool2,
                &a.pool2_argmax,
                Some(&a.conv2),
                batch * CONV2_CHANNELS,
                CONV2_SIDE,
                CONV2_SIDE,
            ),
            b.conv_backward_weight(&d(Conv2Weight), &d(Conv2Bias), &g.dconv2, &a.pool1, c2),
            b.conv_backward_input(&g.dpool1, &g.dconv2, &p(Conv2Weight), c2),
            b.pool_backward(
                &g.dconv1,
                &g.dpool1,
                &a.pool1_argmax,
                Some(&a.conv1),
                batch * CONV1_CHANNELS,
                CONV1_SIDE,
                CONV1_SIDE,
            ),
            b.conv_backward_weight(&d(Conv1Weight), &d(Conv1Bias), &g.dconv1, &a.input, c1),
        ]
    }));
    v.push(b.adam(
        &View::whole(&flat.params),
        &View::whole(&flat.grads),
        &View::whole(&flat.adam_m),
        &View::whole(&flat.adam_v),
        layout.total,
        adam,
    ));
    v
}

/// Batch splits of a conv weight gradient: enough workgroups (one per (co, ci) pair and split)
/// to fill a large GPU (~264, two per SM of an H100), at least 2 so every batch size records
/// the same dispatches (an empty split adds zeros).
fn weight_splits(s: ConvShape) -> u32 {
    let pairs = s.out_channels * s.in_channels;
    264usize.div_ceil(pairs).min(s.batch / 2).max(2) as u32
}

/// What each dispatch of a training step computes, in recording order (forward, then backward
/// and Adam): the names `lenet bench` reports.
pub const STEP_DISPATCHES: [&str; 19] = [
    "gather",
    "conv1_forward_bias_relu_pool1",
    "conv2_forward_bias_relu_pool2",
    "fc1_forward_relu",
    "fc2_forward_relu",
    "fc3_forward",
    "softmax_xent",
    "fc3_backward_weight",
    "fc3_backward_input_relu",
    "fc2_backward_weight",
    "fc2_backward_input_relu",
    "fc1_backward_weight",
    "fc1_backward_input",
    "conv2_backward_weight_from_pool2",
    "conv2_backward_weight_sum_splits",
    "conv2_backward_input_from_pool2",
    "conv1_backward_weight_from_pool1",
    "conv1_backward_weight_sum_splits",
    "adam",
];

/// The time of one kernel of the training step.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTiming {
    pub name: &'static str,
    pub batch: usize,
    /// Wall time per launch, from `iters` back-to-back launches in one pass and one wait.
    pub seconds: f64,
}

/// Everything a chunk of training steps at one batch size records.
struct TrainProgram {
    batch: usize,
    capacity: usize,
    adam: AdamConfig,
    indices: wgpu::Buffer,
    steps: StepUniforms,
    stats: wgpu::Buffer,
    staging: wgpu::Buffer,
    dispatches: Vec<Dispatch>,
}

/// A cached evaluation set and its forward-only program.
struct EvalProgram {
    images: Vec<u8>,
    labels: Vec<u8>,
    batch: usize,
    batches: usize,
    steps: StepUniforms,
    staging: wgpu::Buffer,
    logits: View,
    dispatches: Vec<Dispatch>,
}

/// Trains LeNet-5 with every op a WGSL kernel. See the module docs for the data flow.
pub struct GpuBackend {
    ctx: GpuContext,
    layout: ParamLayout,
    flat: Flat,
    train: DeviceData,
    lut: View,
    program: Option<TrainProgram>,
    eval: Option<EvalProgram>,
    submits: u64,
    host_waits: u64,
}

impl GpuBackend {
    /// Uploads the training set once and allocates the flat parameter, gradient and moment
    /// buffers (zero until [`Backend::load_state`]).
    pub fn new(ctx: GpuContext, train: &Dataset) -> anyhow::Result<Self> {
        let c = ctx.clone();
        c.scoped(|| {
            let layout = ParamLayout::new(ctx.limits.min_storage_buffer_offset_alignment);
            let bytes = (layout.total * 4) as u64;
            let flat = Flat {
                params: buffer(&ctx, "params", bytes, STORAGE)?,
                grads: buffer(&ctx, "grads", bytes, STORAGE)?,
                adam_m: buffer(&ctx, "adam_m", bytes, STORAGE)?,
                adam_v: buffer(&ctx, "adam_v", bytes, STORAGE)?,
            };
            let train = upload_dataset(&ctx, train, "train")?;
            let lut = ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("pixel_lut"),
                contents: bytemuck::cast_slice(&pixel_lut()),
                usage: STORAGE,
            });
            Ok(GpuBackend {
                ctx,
                layout,
                flat,
                train,
                lut: View::whole(&lut),
                program: None,
                eval: None,
                submits: 0,
                host_waits: 0,
            })
        })
    }

    /// Opens the adapter `wanted` names (or `LENET_ADAPTER`, or the best) and builds the backend.
    pub fn open(wanted: Option<&str>, train: &Dataset) -> anyhow::Result<Self> {
        Self::new(GpuContext::new(wanted)?, train)
    }

    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    /// Command buffers submitted so far.
    pub fn submits(&self) -> u64 {
        self.submits
    }

    /// Times the host waited for the device so far.
    pub fn host_waits(&self) -> u64 {
        self.host_waits
    }

    /// The last training program's dispatches (in [`STEP_DISPATCHES`] order) and its step
    /// uniforms' bind group: what `lenet bench` times.
    pub(crate) fn step_dispatches(&self) -> Option<(&[Dispatch], &wgpu::BindGroup)> {
        self.program.as_ref().map(|p| (p.dispatches.as_slice(), &p.steps.group))
    }

    /// Times every kernel of a training step at `batch`: each dispatch is recorded `iters`
    /// times into one compute pass, submitted and waited for once; the wall time over `iters`.
    /// Buffers hold real data (one training step runs first). Changes the parameters: call
    /// [`Backend::load_state`] afterwards to train from a known state.
    pub fn time_kernels(&mut self, batch: usize, iters: usize) -> anyhow::Result<Vec<KernelTiming>> {
        ensure!(batch > 0 && iters > 0, "batch and iterations must be positive");
        let idx: Vec<u32> = (0..batch).map(|i| (i % self.train.len) as u32).collect();
        let adam = AdamConfig::default();
        self.train_steps(&idx, batch, 1, &adam)?;
        let ctx = self.ctx.clone();
        let p = self.program.as_ref().expect("built by train_steps");
        debug_assert_eq!(p.dispatches.len(), STEP_DISPATCHES.len());
        let mut out = Vec::new();
        for (d, &name) in p.dispatches.iter().zip(&STEP_DISPATCHES) {
            let run = |n: usize| -> anyhow::Result<f64> {
                let mut enc = ctx.device.create_command_encoder(&Default::default());
                {
                    let mut pass = enc.begin_compute_pass(&Default::default());
                    for _ in 0..n {
                        d.record(&mut pass, Some((&p.steps.group, 0)));
                    }
                }
                let t = std::time::Instant::now();
                ctx.queue.submit([enc.finish()]);
                ctx.device.poll(wgpu::PollType::wait_indefinitely())?;
                Ok(t.elapsed().as_secs_f64())
            };
            run(1)?; // warm-up
            let seconds = run(iters)? / iters as f64;
            self.submits += 2;
            self.host_waits += 2;
            out.push(KernelTiming { name, batch, seconds });
        }
        ctx.check_errors()?;
        Ok(out)
    }

    /// The parameter gradients of the last training step (for tests and diagnostics).
    pub fn gradients(&mut self) -> anyhow::Result<Params> {
        let bytes = (self.layout.total * 4) as u64;
        let staging = buffer(
            &self.ctx,
            "grads_readback",
            bytes,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        )?;
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(&self.flat.grads, 0, &staging, 0, bytes);
        let raw = self.submit_and_read(enc, &staging, bytes)?;
        let mut p = Params::zeros();
        self.layout.unflatten(&bytemuck::pod_collect_to_vec(&raw), &mut p);
        Ok(p)
    }

    fn builder(&self) -> Builder<'_> {
        Builder {
            device: &self.ctx.device,
            kernels: &self.ctx.kernels,
            max_dim: self.ctx.limits.max_compute_workgroups_per_dimension,
        }
    }

    fn ensure_program(&mut self, batch: usize, steps: usize, adam: &AdamConfig) -> anyhow::Result<()> {
        if let Some(p) = &self.program {
            if p.batch == batch && p.capacity >= steps && p.adam == *adam {
                return Ok(());
            }
        }
        let capacity = steps.max(self.program.as_ref().map_or(0, |p| p.capacity));
        self.program = None;
        let ctx = &self.ctx;
        let acts = Activations::new(ctx, batch)?;
        let grads = ActivationGrads::new(ctx, batch)?;
        let indices = buffer(ctx, "train_indices", (capacity * batch * 4) as u64, STORAGE)?;
        let steps_u = StepUniforms::new(ctx, "train_steps", capacity)?;
        let stat_bytes = (capacity * std::mem::size_of::<Stat>()) as u64;
        let stats = buffer(ctx, "stats", stat_bytes, STORAGE)?;
        let staging = buffer(
            ctx,
            "stats_readback",
            stat_bytes,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        )?;
        let b = self.builder();
        let mut dispatches = forward_dispatches(
            &b,
            &self.layout,
            &self.flat.params,
            &self.train,
            &View::whole(&indices),
            &self.lut,
            &acts,
            batch,
        );
        dispatches.extend(backward_dispatches(
            &b,
            &self.layout,
            &self.flat,
            &acts,
            &grads,
            &View::whole(&stats),
            batch,
            adam,
        ));
        self.program = Some(TrainProgram {
            batch,
            capacity,
            adam: *adam,
            indices,
            steps: steps_u,
            stats,
            staging,
            dispatches,
        });
        Ok(())
    }

    fn ensure_eval(&mut self, data: &Dataset) -> anyhow::Result<()> {
        if let Some(e) = &self.eval {
            if e.images == data.images && e.labels == data.labels {
                return Ok(());
            }
        }
        self.eval = None;
        let ctx = &self.ctx;
        let dev = upload_dataset(ctx, data, "eval")?;
        let per_image = (CONV1_CHANNELS * CONV1_SIDE * CONV1_SIDE * 4) as u64;
        let cap = (ctx.max_binding() / per_image).max(1) as usize;
        let batch = data.len().min(EVAL_BATCH).min(cap);
        let batches = data.len().div_ceil(batch);
        let mut idx: Vec<u32> = (0..data.len() as u32).collect();
        idx.resize(batches * batch, 0);
        let indices = ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("eval_indices"),
            contents: bytemuck::cast_slice(&idx),
            usage: STORAGE,
        });
        let steps = StepUniforms::new(ctx, "eval_steps", batches)?;
        let uniforms: Vec<StepUniform> = (0..batches)
            .map(|k| StepUniform { index_offset: (k * batch) as u32, ..Default::default() })
            .collect();
        steps.write(ctx, &uniforms);
        let acts = Activations::new(ctx, batch)?;
        let staging = buffer(
            ctx,
            "logits_readback",
            (data.len() * CLASSES * 4) as u64,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        )?;
        let b = self.builder();
        let dispatches = forward_dispatches(
            &b,
            &self.layout,
            &self.flat.params,
            &dev,
            &View::whole(&indices),
            &self.lut,
            &acts,
            batch,
        );
        self.eval = Some(EvalProgram {
            images: data.images.clone(),
            labels: data.labels.clone(),
            batch,
            batches,
            steps,
            staging,
            logits: acts.logits.clone(),
            dispatches,
        });
        Ok(())
    }

    /// Submits `enc`, maps `staging`, waits once, returns `len` bytes.
    fn submit_and_read(
        &mut self,
        enc: wgpu::CommandEncoder,
        staging: &wgpu::Buffer,
        len: u64,
    ) -> anyhow::Result<Vec<u8>> {
        self.ctx.queue.submit([enc.finish()]);
        self.submits += 1;
        self.host_waits += 1;
        super::ops::read_mapped(&self.ctx, staging, len)
    }
}

impl Backend for GpuBackend {
    fn kind(&self) -> &'static str {
        "gpu"
    }

    fn adapter(&self) -> String {
        self.ctx.adapter_info.name.clone()
    }

    fn sync_counts(&self) -> SyncCounts {
        SyncCounts { submits: self.submits, host_waits: self.host_waits }
    }

    fn load_state(&mut self, state: &TrainState) -> anyhow::Result<()> {
        let ctx = self.ctx.clone();
        ctx.scoped(|| {
            for (buf, p) in [
                (&self.flat.params, &state.params),
                (&self.flat.adam_m, &state.adam_m),
                (&self.flat.adam_v, &state.adam_v),
            ] {
                ensure!(
                    p.tensors.iter().zip(&PARAM_SPECS).all(|(t, s)| t.len() == s.len()),
                    "state tensors have the wrong sizes"
                );
                ctx.queue.write_buffer(buf, 0, bytemuck::cast_slice(&self.layout.flatten(p)));
            }
            Ok(())
        })
    }

    fn store_state(&mut self, state: &mut TrainState) -> anyhow::Result<()> {
        let ctx = self.ctx.clone();
        ctx.scoped(|| {
            let bytes = (self.layout.total * 4) as u64;
            let staging = buffer(
                &ctx,
                "state_readback",
                3 * bytes,
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            )?;
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(&self.flat.params, 0, &staging, 0, bytes);
            enc.copy_buffer_to_buffer(&self.flat.adam_m, 0, &staging, bytes, bytes);
            enc.copy_buffer_to_buffer(&self.flat.adam_v, 0, &staging, 2 * bytes, bytes);
            let raw = self.submit_and_read(enc, &staging, 3 * bytes)?;
            let all: Vec<f32> = bytemuck::pod_collect_to_vec(&raw);
            let n = self.layout.total;
            self.layout.unflatten(&all[..n], &mut state.params);
            self.layout.unflatten(&all[n..2 * n], &mut state.adam_m);
            self.layout.unflatten(&all[2 * n..], &mut state.adam_v);
            Ok(())
        })
    }

    fn train_steps(
        &mut self,
        indices: &[u32],
        batch: usize,
        first_step: u64,
        adam: &AdamConfig,
    ) -> anyhow::Result<Vec<StepStats>> {
        ensure!(batch > 0, "batch must be at least 1");
        ensure!(first_step >= 1, "Adam's step count starts at 1");
        let steps = indices.len() / batch;
        if steps == 0 {
            return Ok(Vec::new());
        }
        let indices = &indices[..steps * batch];
        if let Some(&i) = indices.iter().find(|&&i| i as usize >= self.train.len) {
            bail!("sample index {i} is outside the training set ({} images)", self.train.len);
        }
        let ctx = self.ctx.clone();
        ctx.scoped(|| {
            self.ensure_program(batch, steps, adam)?;
            let p = self.program.as_ref().expect("built above");
            ctx.queue.write_buffer(&p.indices, 0, bytemuck::cast_slice(indices));
            let uniforms: Vec<StepUniform> = (0..steps)
                .map(|s| {
                    let a = adam.step(first_step + s as u64);
                    StepUniform {
                        index_offset: (s * batch) as u32,
                        stats_slot: s as u32,
                        step_size: a.step_size,
                        bias_correction2_sqrt: a.bias_correction2_sqrt,
                    }
                })
                .collect();
            p.steps.write(&ctx, &uniforms);
            let mut enc = ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("train_steps") });
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("train_steps"),
                    timestamp_writes: None,
                });
                for s in 0..steps {
                    let offset = (s as u64 * STEP_STRIDE) as u32;
                    for d in &p.dispatches {
                        d.record(&mut pass, Some((&p.steps.group, offset)));
                    }
                }
            }
            let stat_bytes = (steps * std::mem::size_of::<Stat>()) as u64;
            enc.copy_buffer_to_buffer(&p.stats, 0, &p.staging, 0, stat_bytes);
            let staging = p.staging.clone();
            let raw = self.submit_and_read(enc, &staging, stat_bytes)?;
            let stats: Vec<Stat> = bytemuck::pod_collect_to_vec(&raw);
            Ok(stats.iter().map(|s| StepStats { loss: s.loss, correct: s.correct }).collect())
        })
    }

    fn logits(&mut self, data: &Dataset) -> anyhow::Result<Vec<f32>> {
        if data.is_empty() {
            return Ok(Vec::new());
        }
        let ctx = self.ctx.clone();
        ctx.scoped(|| {
            self.ensure_eval(data).context("preparing the evaluation set")?;
            let e = self.eval.as_ref().expect("built above");
            let mut enc =
                ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("logits") });
            let row = (CLASSES * 4) as u64;
            for k in 0..e.batches {
                {
                    let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: Some("forward"),
                        timestamp_writes: None,
                    });
                    let offset = (k as u64 * STEP_STRIDE) as u32;
                    for d in &e.dispatches {
                        d.record(&mut pass, Some((&e.steps.group, offset)));
                    }
                }
                let rows = e.batch.min(data.len() - k * e.batch) as u64;
                enc.copy_buffer_to_buffer(
                    &e.logits.buffer,
                    0,
                    &e.staging,
                    (k * e.batch) as u64 * row,
                    rows * row,
                );
            }
            let staging = e.staging.clone();
            let raw = self.submit_and_read(enc, &staging, data.len() as u64 * row)?;
            Ok(bytemuck::pod_collect_to_vec(&raw))
        })
    }
}
