//! The wgpu path as an [`Ops`] implementation. Each op binds its kernels (by name, see
//! [`super::kernels`]) to the buffers it is given and records the dispatches:
//!
//! - run one op at a time (tests, the bench's validation): the recorded dispatches run when a
//!   buffer is read or written, each reading the step uniform it was given;
//! - record a program ([`GpuOps::record_program`]): the GPU backend records one training step
//!   (or forward pass) once, its dispatches bound to the chunk's step uniforms, and replays it
//!   for every step at that step's uniform offset.

use std::marker::PhantomData;

use anyhow::{bail, ensure, Context as _, Result};
use wgpu::util::DeviceExt;

use super::context::GpuContext;
use super::kernels::{grid_1d, pack_u8, pixel_lut, Dispatch, StepUniform, View};
use super::v2::{self, Variant};
use crate::data::Dataset;
use crate::opcheck::OpCase;
use crate::ops::*;
use crate::optim::{AdamStep, SgdStep};

/// A device buffer (or a range of one) of `len` values of `T`.
pub struct GpuBuf<T> {
    pub view: View,
    pub len: usize,
    _t: PhantomData<T>,
}

impl<T> Clone for GpuBuf<T> {
    fn clone(&self) -> Self {
        GpuBuf { view: self.view.clone(), len: self.len, _t: PhantomData }
    }
}

impl<T> GpuBuf<T> {
    /// `len` values at element `offset` of `buffer`, named `label`.
    pub fn range(buffer: &wgpu::Buffer, offset: usize, len: usize, label: &str) -> Self {
        let bytes = (len.max(1) * 4) as u64;
        GpuBuf {
            view: View {
                buffer: buffer.clone(),
                offset: (offset * 4) as u64,
                size: bytes,
                label: label.into(),
            },
            len,
            _t: PhantomData,
        }
    }

    /// The whole buffer this one is a range of.
    fn whole(&self) -> View {
        View::whole(&self.view.buffer, &self.view.label)
    }

    /// The range's first element in the whole buffer.
    fn first(&self) -> usize {
        (self.view.offset / 4) as usize
    }
}

/// A data set resident on the device: u8 pixels packed four to a u32, labels one per u32.
pub struct DeviceData {
    pub images: GpuBuf<u32>,
    pub labels: GpuBuf<u32>,
    pub len: usize,
    pub rows: usize,
    pub cols: usize,
}

const STORAGE: wgpu::BufferUsages =
    wgpu::BufferUsages::STORAGE.union(wgpu::BufferUsages::COPY_DST).union(wgpu::BufferUsages::COPY_SRC);

/// The GPU's ops on one device.
pub struct GpuOps {
    pub ctx: GpuContext,
    pub(super) lut: GpuBuf<f32>,
    /// Which kernels run.
    pub variant: Variant,
    /// Recorded and not yet run (one at a time), or the program being recorded.
    recorded: Vec<Dispatch>,
    /// While a program is recorded: the step uniforms its dispatches read.
    program_step: Option<wgpu::BindGroup>,
    /// The op call being recorded (the outermost), which tags its dispatches.
    current: Option<OpCase>,
    /// Command-buffer submissions and host waits so far.
    pub submits: u64,
    pub host_waits: u64,
}

impl GpuOps {
    /// The ops with the kernels `LENET_KERNELS` names (the second ones by default).
    pub fn new(ctx: GpuContext) -> Result<Self> {
        Self::with_variant(ctx, Variant::from_env()?)
    }

    /// The ops with the given kernels; the second ones need more workgroup memory than WebGPU's
    /// default limits: on a device without it, the first ones run.
    pub fn with_variant(ctx: GpuContext, variant: Variant) -> Result<Self> {
        let lut = storage_init(&ctx, "pixel_lut", &pixel_lut())?;
        let variant = if variant == Variant::V2 && !v2::KERNELS.iter().all(|k| ctx.kernels.has(k)) {
            Variant::V1
        } else {
            variant
        };
        Ok(GpuOps {
            ctx,
            lut,
            variant,
            recorded: Vec::new(),
            program_step: None,
            current: None,
            submits: 0,
            host_waits: 0,
        })
    }

    /// Records the dispatches `f` makes as a program whose kernels read the step uniform through
    /// `step` (a bind group of [`super::kernels::Kernels::step_layout`]), without running them.
    pub fn record_program<R>(
        &mut self,
        step: &wgpu::BindGroup,
        f: impl FnOnce(&mut Self) -> Result<R>,
    ) -> Result<(R, Vec<Dispatch>)> {
        ensure!(self.program_step.is_none(), "already recording a program");
        self.flush()?;
        self.program_step = Some(step.clone());
        let r = f(self);
        self.program_step = None;
        let program = std::mem::take(&mut self.recorded);
        Ok((r?, program))
    }

    /// Runs what was recorded one op at a time.
    fn flush(&mut self) -> Result<()> {
        if self.recorded.is_empty() || self.program_step.is_some() {
            return Ok(());
        }
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        self.encode_recorded(&mut enc);
        self.ctx.queue.submit([enc.finish()]);
        self.submits += 1;
        Ok(())
    }

    fn encode_recorded(&mut self, enc: &mut wgpu::CommandEncoder) {
        let mut pass = enc.begin_compute_pass(&Default::default());
        for d in self.recorded.drain(..) {
            d.record(&mut pass, 0);
        }
    }

    /// The step uniform's bind group for a kernel that reads it: the program's, or (one op at a
    /// time) a uniform holding `values`.
    pub(super) fn step(&self, values: StepUniform) -> Option<wgpu::BindGroup> {
        if let Some(g) = &self.program_step {
            return Some(g.clone());
        }
        let buffer = self.ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("step"),
            contents: bytemuck::bytes_of(&values),
            usage: wgpu::BufferUsages::UNIFORM,
        });
        Some(self.ctx.step_group(&buffer))
    }

    pub(super) fn push(&mut self, mut d: Dispatch) {
        d.case = self.current.clone();
        self.recorded.push(d);
    }

    /// The v2 conv backward takes this shape (its gradients come as partials).
    fn conv_backward_v2(&self, s: &ConvShape, dinput: bool) -> bool {
        self.variant == Variant::V2 && v2::backward_fits(s, dinput)
    }

    /// Runs `f` with its dispatches tagged as the op call `case` (unless an outer call tags).
    fn tagged(&mut self, case: OpCase, f: impl FnOnce(&mut Self) -> Result<()>) -> Result<()> {
        let outer = self.current.is_none();
        if outer {
            self.current = Some(case);
        }
        let r = f(self);
        if outer {
            self.current = None;
        }
        r
    }

    pub(super) fn max_dim(&self) -> u32 {
        self.ctx.limits.max_compute_workgroups_per_dimension
    }

    pub(super) fn kernel(&self, name: &str) -> Result<&super::kernels::Kernel> {
        self.ctx.kernels.get(name)
    }

    /// A scratch buffer owned by the dispatches that bind it.
    pub(super) fn scratch(&self, label: &str, len: usize) -> Result<GpuBuf<f32>> {
        storage(&self.ctx, label, len)
    }
}

/// The optimizer case of a tensor list: sizes and gradient partial counts.
fn optimizer_shapes(params: &[GpuBuf<f32>], grads: &[GpuBuf<f32>]) -> (Vec<usize>, Vec<usize>) {
    let lens: Vec<usize> = params.iter().map(|p| p.len).collect();
    let partials = grads.iter().zip(&lens).map(|(g, &n)| g.len / n.max(1)).collect();
    (lens, partials)
}

fn check_len<T>(what: &str, buf: &GpuBuf<T>, len: usize) -> Result<()> {
    ensure!(buf.len == len, "{what} ({}) holds {} values, the shape needs {len}", buf.view.label, buf.len);
    Ok(())
}

fn storage<T>(ctx: &GpuContext, label: &str, len: usize) -> Result<GpuBuf<T>> {
    let bytes = (len.max(1) * 4) as u64;
    ctx.check_binding(label, bytes)?;
    let buffer = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: bytes,
        usage: STORAGE,
        mapped_at_creation: false,
    });
    Ok(GpuBuf::range(&buffer, 0, len, label))
}

fn storage_init<T: Elem>(ctx: &GpuContext, label: &str, data: &[T]) -> Result<GpuBuf<T>> {
    let mut bytes: Vec<u8> = bytemuck::cast_slice(data).to_vec();
    bytes.resize(bytes.len().max(4), 0);
    ctx.check_binding(label, bytes.len() as u64)?;
    let buffer = ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(label),
        contents: &bytes,
        usage: STORAGE,
    });
    Ok(GpuBuf::range(&buffer, 0, data.len(), label))
}

/// Maps `staging` once the queue has drained into it, waits, and copies out `len` bytes.
pub(crate) fn read_mapped(ctx: &GpuContext, staging: &wgpu::Buffer, len: u64) -> Result<Vec<u8>> {
    let slice = staging.slice(..len.max(4));
    let (tx, rx) = std::sync::mpsc::channel();
    slice.map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    ctx.device.poll(wgpu::PollType::wait_indefinitely())?;
    rx.recv().context("the map callback did not run")??;
    let bytes = slice.get_mapped_range()?[..len as usize].to_vec();
    staging.unmap();
    Ok(bytes)
}

/// Workgroup memory of the tiled conv kernels, in f32s (`smem` in conv.wgsl).
const CONV_SMEM: usize = 4000;
/// The tiled conv kernels' kernel side (`KS` in conv.wgsl).
const CONV_KS: usize = 5;

/// Output channels per workgroup of the tiled forward kernel (about 512 outputs each, within
/// workgroup memory), or None for the fallback.
fn forward_tile(s: ConvShape) -> Option<u32> {
    if s.kernel != CONV_KS || !s.out_height().is_multiple_of(2) || !s.out_width().is_multiple_of(2) {
        return None;
    }
    let plane = (s.height + 2 * s.padding) * (s.width + 2 * s.padding);
    let hw = s.out_height() * s.out_width();
    let mut tile = 512usize.div_ceil(hw).clamp(1, s.out_channels.max(1));
    let fits = |t: usize| s.in_channels * plane + t * (s.in_channels * 25 + 1) <= CONV_SMEM;
    while tile > 1 && !fits(tile) {
        tile -= 1;
    }
    fits(tile).then_some(tile as u32)
}

/// Whether the tiled backward kernels take this shape: one image's dconv and all weights in
/// workgroup memory (input gradient), the padded input plane below `RED_AT` (weight gradient).
fn backward_tiled(s: ConvShape, need_input: bool) -> bool {
    let input_fits = s.out_channels * s.out_height() * s.out_width() + s.weight_len() <= CONV_SMEM;
    let plane_fits = (s.height + 2 * s.padding) * (s.width + 2 * s.padding) <= 1200;
    s.kernel == CONV_KS && s.padding < CONV_KS && plane_fits && (input_fits || !need_input)
}

/// Batch splits of the tiled weight gradient: enough workgroups (one per (co, ci) pair and
/// split) to fill a large GPU (~264, two per SM of an H100), at least 2.
fn weight_splits(s: ConvShape) -> u32 {
    let pairs = s.out_channels * s.in_channels;
    264usize.div_ceil(pairs.max(1)).min(s.batch / 2).max(2) as u32
}

impl GpuOps {
    fn conv_params<'a>(
        &self,
        b: super::kernels::Binder<'a>,
        s: ConvShape,
        tile: u32,
    ) -> super::kernels::Binder<'a> {
        b.param("batch", s.batch)
            .param("cin", s.in_channels)
            .param("cout", s.out_channels)
            .param("height", s.height)
            .param("width", s.width)
            .param("k", s.kernel)
            .param("pad", s.padding)
            .param("tile", tile)
    }

    fn pool_forward(
        &mut self,
        pooled: &GpuBuf<f32>,
        argmax: &GpuBuf<u32>,
        conv: &GpuBuf<f32>,
        s: ConvShape,
    ) -> Result<()> {
        let planes = s.batch * s.out_channels;
        let d = self
            .kernel("pool_forward")?
            .bind(&self.ctx.device)
            .buf("conv", &conv.view)
            .buf("pooled", &pooled.view)
            .buf("argmax", &argmax.view)
            .param("planes", planes)
            .param("height", s.out_height())
            .param("width", s.out_width())
            .grid(grid_1d(s.pooled_len() as u64, 256, self.max_dim()))
            .build("conv_relu_pool_forward")?;
        self.push(d);
        Ok(())
    }

    /// One optimizer kernel over every tensor: one dispatch when the parameters, gradients and
    /// moments each lie in one buffer with the moments laid out as the parameters (the GPU
    /// backend's flat buffers), else one per tensor.
    fn optimizer(
        &mut self,
        kernel: &'static str,
        op: &'static str,
        params: &[GpuBuf<f32>],
        grads: &[GpuBuf<f32>],
        moments: &[&[GpuBuf<f32>]],
        values: StepUniform,
    ) -> Result<()> {
        ensure!(grads.len() == params.len() && moments.iter().all(|m| m.len() == params.len()));
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            ensure!(
                p.len > 0 && g.len % p.len == 0 && g.len > 0 && moments.iter().all(|m| m[i].len == p.len),
                "optimizer: {} has {} values, its gradient {} and its state {:?}",
                p.view.label,
                p.len,
                g.len,
                moments.iter().map(|m| m[i].len).collect::<Vec<_>>()
            );
        }
        let shared = |list: &[GpuBuf<f32>]| list.windows(2).all(|w| w[0].view.buffer == w[1].view.buffer);
        let flat = !params.is_empty()
            && shared(params)
            && shared(grads)
            && moments.iter().all(|m| shared(m) && m.iter().zip(params).all(|(a, p)| a.first() == p.first()));
        let groups: Vec<Vec<usize>> = if flat {
            vec![(0..params.len()).collect()]
        } else {
            (0..params.len()).map(|i| vec![i]).collect()
        };
        for tensors in groups {
            let mut table = Vec::new();
            let mut start = 0u32;
            for &i in &tensors {
                let (p, g) = (&params[i], &grads[i]);
                let (param_offset, grad_offset) = if flat { (p.first(), g.first()) } else { (0, 0) };
                table.extend([
                    start,
                    p.len as u32,
                    param_offset as u32,
                    grad_offset as u32,
                    (g.len / p.len) as u32,
                    0,
                    0,
                    0,
                ]);
                start += p.len as u32;
            }
            let table = storage_init(&self.ctx, "optimizer_tensors", &table)?;
            let view = |b: &GpuBuf<f32>| if flat { b.whole() } else { b.view.clone() };
            let first = tensors[0];
            let mut bind = self
                .kernel(kernel)?
                .bind(&self.ctx.device)
                .buf("tensors", &table.view)
                .buf("grad", &view(&grads[first]))
                .buf("param", &view(&params[first]))
                .buf("moment1", &view(&moments[0][first]));
            if moments.len() > 1 {
                bind = bind.buf("moment2", &view(&moments[1][first]));
            }
            let d = bind
                .param("elements", start)
                .param("tensors", tensors.len())
                .step(self.step(values))
                .grid(grid_1d(start as u64, 256, self.max_dim()))
                .build(op)?;
            self.push(d);
        }
        Ok(())
    }
}

impl Ops for GpuOps {
    type Buf<T: Elem> = GpuBuf<T>;
    type Data = DeviceData;

    fn name(&self) -> String {
        self.ctx.adapter_info.name.clone()
    }

    fn alloc<T: Elem>(&mut self, label: &str, len: usize) -> Result<GpuBuf<T>> {
        // wgpu zero-fills new buffers.
        storage(&self.ctx, label, len)
    }

    fn upload<T: Elem>(&mut self, label: &str, data: &[T]) -> Result<GpuBuf<T>> {
        storage_init(&self.ctx, label, data)
    }

    fn write<T: Elem>(&mut self, buf: &mut GpuBuf<T>, data: &[T]) -> Result<()> {
        ensure!(buf.len == data.len(), "writing {} values into {} ({})", data.len(), buf.view.label, buf.len);
        self.flush()?;
        if !data.is_empty() {
            self.ctx.queue.write_buffer(&buf.view.buffer, buf.view.offset, bytemuck::cast_slice(data));
        }
        Ok(())
    }

    fn read<T: Elem>(&mut self, buf: &GpuBuf<T>) -> Result<Vec<T>> {
        ensure!(self.program_step.is_none(), "cannot read a buffer while recording a program");
        let ctx = self.ctx.clone();
        ctx.scoped(|| {
            let bytes = (buf.len * 4) as u64;
            let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("readback"),
                size: bytes.max(4),
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            if !self.recorded.is_empty() {
                self.encode_recorded(&mut enc);
            }
            if bytes > 0 {
                enc.copy_buffer_to_buffer(&buf.view.buffer, buf.view.offset, &staging, 0, bytes);
            }
            ctx.queue.submit([enc.finish()]);
            self.submits += 1;
            self.host_waits += 1;
            let raw = read_mapped(&ctx, &staging, bytes)?;
            Ok(bytemuck::pod_collect_to_vec(&raw))
        })
    }

    fn len<T: Elem>(&self, buf: &GpuBuf<T>) -> usize {
        buf.len
    }

    fn grad_partials(&self, op: GradOp) -> usize {
        match op {
            GradOp::ConvFromPool(s, dinput) if self.conv_backward_v2(&s, dinput) => {
                v2::conv_partials(s.batch)
            }
            GradOp::LinearXent(s) if self.variant == Variant::V2 && v2::xent_fits(&s) => {
                v2::xent_partials(s.batch)
            }
            _ => 1,
        }
    }

    fn upload_data(&mut self, label: &str, data: &Dataset) -> Result<DeviceData> {
        let max = self.ctx.max_binding();
        let packed_bytes = data.images.len().div_ceil(4) as u64 * 4;
        if packed_bytes > max {
            bail!(
                "the {label} set ({} images, {packed_bytes} bytes packed) exceeds the device's largest storage \
                 binding ({max} bytes) on {}",
                data.len(),
                self.ctx.adapter_info.name
            );
        }
        let labels: Vec<u32> = data.labels.iter().map(|&l| l as u32).collect();
        Ok(DeviceData {
            images: storage_init(&self.ctx, &format!("{label}_images"), &pack_u8(&data.images))?,
            labels: storage_init(&self.ctx, &format!("{label}_labels"), &labels)?,
            len: data.len(),
            rows: data.rows,
            cols: data.cols,
        })
    }

    fn gather(
        &mut self,
        input: &mut GpuBuf<f32>,
        labels: &mut GpuBuf<u32>,
        batch: &BatchRef<Self>,
    ) -> Result<()> {
        let case = OpCase::Gather {
            batch: batch.batch,
            images: batch.data.len,
            side: batch.data.rows,
            max_shift: 2,
        };
        self.tagged(case, |me| {
            let data = batch.data;
            let b = batch.batch;
            check_len("input", input, b * data.rows * data.cols)?;
            check_len("labels", labels, b)?;
            ensure!(
                batch.indices.len >= b && batch.shifts.len >= 2 * b,
                "the batch's indices or shifts are too short"
            );
            let d = me
                .kernel("gather")?
                .bind(&me.ctx.device)
                .buf("images", &data.images.view)
                .buf("labels", &data.labels.view)
                .buf("indices", &batch.indices.view)
                .buf("shifts", &batch.shifts.view)
                .buf("lut", &me.lut.view)
                .buf("input", &input.view)
                .buf("batch_labels", &labels.view)
                .param("batch", b)
                .param("rows", data.rows)
                .param("cols", data.cols)
                .step(me.step(StepUniform::default()))
                .grid(grid_1d((b * data.rows * data.cols) as u64, 256, me.max_dim()))
                .build("gather")?;
            me.push(d);
            Ok(())
        })
    }

    fn gather_conv_relu_pool_forward(
        &mut self,
        input: &mut GpuBuf<f32>,
        labels: &mut GpuBuf<u32>,
        batch: &BatchRef<Self>,
        out: ConvPoolOut<Self>,
        weight: &GpuBuf<f32>,
        bias: &GpuBuf<f32>,
        s: ConvShape,
    ) -> Result<()> {
        let case = OpCase::GatherConvReluPool { s, images: batch.data.len, max_shift: 2 };
        self.tagged(case, |me| {
            if me.variant == Variant::V2 && v2::forward_fits(&s, true) {
                return me.conv_pool_forward_v2(Some((input, labels, batch)), out, None, weight, bias, s);
            }
            me.gather(input, labels, batch)?;
            me.conv_relu_pool_forward(out, input, weight, bias, s)
        })
    }

    fn linear_xent_forward_backward(
        &mut self,
        logits: &mut GpuBuf<f32>,
        xent: XentOut<Self>,
        grads: ParamGrads<Self>,
        dinput: Option<InputGrad<Self>>,
        input: &GpuBuf<f32>,
        labels: &GpuBuf<u32>,
        weight: &GpuBuf<f32>,
        bias: &GpuBuf<f32>,
        s: LinearShape,
    ) -> Result<()> {
        let case = OpCase::LinearXent { s, mask: dinput.as_ref().map(|d| d.relu_mask.is_some()) };
        self.tagged(case, |me| {
            if me.variant == Variant::V2 && v2::xent_fits(&s) {
                return me.linear_xent_v2(logits, xent, grads, dinput, input, labels, weight, bias, s);
            }
            me.linear_forward(logits, input, weight, bias, s, false)?;
            let XentOut { dlogits, losses, correct } = xent;
            me.softmax_xent(
                XentOut { dlogits: &mut *dlogits, losses, correct },
                logits,
                labels,
                s.batch,
                s.out_features,
            )?;
            me.linear_backward(grads, dinput, dlogits, input, weight, s)
        })
    }

    fn conv_relu_pool_forward(
        &mut self,
        out: ConvPoolOut<Self>,
        input: &GpuBuf<f32>,
        weight: &GpuBuf<f32>,
        bias: &GpuBuf<f32>,
        s: ConvShape,
    ) -> Result<()> {
        let case = OpCase::ConvReluPool(s);
        self.tagged(case, |me| {
            if me.variant == Variant::V2 && v2::forward_fits(&s, false) {
                return me.conv_pool_forward_v2(None, out, Some(input), weight, bias, s);
            }
            check_len("input", input, s.input_len())?;
            check_len("weight", weight, s.weight_len())?;
            check_len("bias", bias, s.out_channels)?;
            check_len("conv", out.conv, s.output_len())?;
            check_len("pooled", out.pooled, s.pooled_len())?;
            check_len("argmax", out.argmax, s.pooled_len())?;
            ensure!(
                s.out_height().is_multiple_of(2) && s.out_width().is_multiple_of(2),
                "max-pool input must have even sides"
            );
            let op = "conv_relu_pool_forward";
            if let Some(tile) = forward_tile(s) {
                let b = me
                    .kernel("conv_forward_pool")?
                    .bind(&me.ctx.device)
                    .buf("input", &input.view)
                    .buf("weight", &weight.view)
                    .buf("bias", &bias.view)
                    .buf("conv", &out.conv.view)
                    .buf("pooled", &out.pooled.view)
                    .buf("argmax", &out.argmax.view);
                let d = me
                    .conv_params(b, s, tile)
                    .grid((s.batch as u32, (s.out_channels as u32).div_ceil(tile), 1))
                    .build(op)?;
                me.push(d);
                return Ok(());
            }
            let b = me
                .kernel("conv_forward_naive")?
                .bind(&me.ctx.device)
                .buf("input", &input.view)
                .buf("weight", &weight.view)
                .buf("bias", &bias.view)
                .buf("conv", &out.conv.view);
            let d =
                me.conv_params(b, s, 0).grid(grid_1d(s.output_len() as u64, 256, me.max_dim())).build(op)?;
            me.push(d);
            me.pool_forward(out.pooled, out.argmax, out.conv, s)
        })
    }

    fn linear_forward(
        &mut self,
        out: &mut GpuBuf<f32>,
        input: &GpuBuf<f32>,
        weight: &GpuBuf<f32>,
        bias: &GpuBuf<f32>,
        s: LinearShape,
        relu: bool,
    ) -> Result<()> {
        let case = OpCase::Linear { s, relu };
        self.tagged(case, |me| {
            if me.variant == Variant::V2 {
                return me.linear_forward_v2(out, input, weight, bias, s, relu);
            }
            check_len("input", input, s.batch * s.in_features)?;
            check_len("weight", weight, s.weight_len())?;
            check_len("bias", bias, s.out_features)?;
            check_len("out", out, s.batch * s.out_features)?;
            let d = me
                .kernel("linear_forward")?
                .bind(&me.ctx.device)
                .buf("input", &input.view)
                .buf("weight", &weight.view)
                .buf("bias", &bias.view)
                .buf("out", &out.view)
                .param("batch", s.batch)
                .param("in_features", s.in_features)
                .param("out_features", s.out_features)
                .param("relu", relu)
                .grid(((s.out_features as u32).div_ceil(16), (s.batch as u32).div_ceil(16), 1))
                .build("linear_forward")?;
            me.push(d);
            Ok(())
        })
    }

    fn softmax_xent(
        &mut self,
        out: XentOut<Self>,
        logits: &GpuBuf<f32>,
        labels: &GpuBuf<u32>,
        batch: usize,
        classes: usize,
    ) -> Result<()> {
        let case = OpCase::SoftmaxXent { batch, classes };
        self.tagged(case, |me| {
            check_len("logits", logits, batch * classes)?;
            check_len("dlogits", out.dlogits, batch * classes)?;
            check_len("labels", labels, batch)?;
            ensure!(out.losses.len >= batch && out.correct.len >= batch, "the loss buffers are too short");
            let d = me
                .kernel("softmax_xent")?
                .bind(&me.ctx.device)
                .buf("logits", &logits.view)
                .buf("labels", &labels.view)
                .buf("dlogits", &out.dlogits.view)
                .buf("losses", &out.losses.view)
                .buf("correct", &out.correct.view)
                .param("batch", batch)
                .param("classes", classes)
                .param("scale", 1.0f32 / batch as f32)
                .step(me.step(StepUniform::default()))
                .grid(grid_1d(batch as u64, 64, me.max_dim()))
                .build("softmax_xent")?;
            me.push(d);
            Ok(())
        })
    }

    fn linear_backward(
        &mut self,
        grads: ParamGrads<Self>,
        dinput: Option<InputGrad<Self>>,
        dout: &GpuBuf<f32>,
        input: &GpuBuf<f32>,
        weight: &GpuBuf<f32>,
        s: LinearShape,
    ) -> Result<()> {
        let case = OpCase::LinearBackward { s, mask: dinput.as_ref().map(|d| d.relu_mask.is_some()) };
        self.tagged(case, |me| {
            if me.variant == Variant::V2 {
                return me.linear_backward_v2(grads, dinput, dout, input, weight, s);
            }
            let LinearShape { batch, in_features, out_features } = s;
            check_len("dout", dout, batch * out_features)?;
            check_len("input", input, batch * in_features)?;
            check_len("weight", weight, s.weight_len())?;
            check_len("dweight", grads.dweight, s.weight_len())?;
            check_len("dbias", grads.dbias, out_features)?;
            let op = "linear_backward";
            let d = me
                .kernel("linear_backward_weight")?
                .bind(&me.ctx.device)
                .buf("dout", &dout.view)
                .buf("input", &input.view)
                .buf("dweight", &grads.dweight.view)
                .buf("dbias", &grads.dbias.view)
                .param("batch", batch)
                .param("in_features", in_features)
                .param("out_features", out_features)
                .param("relu", false)
                .grid(((in_features as u32 + 1).div_ceil(16), (out_features as u32).div_ceil(16), 1))
                .build(op)?;
            me.push(d);
            if let Some(InputGrad { dinput, relu_mask }) = dinput {
                check_len("dinput", dinput, batch * in_features)?;
                // Without a mask the kernel never reads relu_mask; any read-only buffer fills it.
                let mask = relu_mask.unwrap_or(dout);
                let d = me
                    .kernel("linear_backward_input")?
                    .bind(&me.ctx.device)
                    .buf("dout", &dout.view)
                    .buf("weight", &weight.view)
                    .buf("relu_mask", &mask.view)
                    .buf("dinput", &dinput.view)
                    .param("batch", batch)
                    .param("in_features", in_features)
                    .param("out_features", out_features)
                    .param("relu", relu_mask.is_some())
                    .grid(((in_features as u32).div_ceil(16), (batch as u32).div_ceil(16), 1))
                    .build(op)?;
                me.push(d);
            }
            Ok(())
        })
    }

    fn conv_backward_from_pool(
        &mut self,
        grads: ParamGrads<Self>,
        dinput: Option<&mut GpuBuf<f32>>,
        dpooled: &GpuBuf<f32>,
        saved: ConvPoolSaved<Self>,
        input: &GpuBuf<f32>,
        weight: &GpuBuf<f32>,
        s: ConvShape,
    ) -> Result<()> {
        let case = OpCase::ConvBackwardFromPool { s, dinput: dinput.is_some() };
        self.tagged(case, |me| {
            if me.conv_backward_v2(&s, dinput.is_some()) {
                return me.conv_pool_backward_v2(grads, dinput, dpooled, saved, input, weight, s);
            }
            check_len("dpooled", dpooled, s.pooled_len())?;
            check_len("conv", saved.conv, s.output_len())?;
            check_len("argmax", saved.argmax, s.pooled_len())?;
            check_len("input", input, s.input_len())?;
            check_len("weight", weight, s.weight_len())?;
            check_len("dweight", grads.dweight, s.weight_len())?;
            check_len("dbias", grads.dbias, s.out_channels)?;
            if let Some(d) = &dinput {
                check_len("dinput", d, s.input_len())?;
            }
            let op = "conv_backward_from_pool";
            let dev = &me.ctx.device.clone();
            if backward_tiled(s, dinput.is_some()) {
                let splits = weight_splits(s);
                let partials =
                    me.scratch("conv_weight_partials", splits as usize * (s.weight_len() + s.out_channels))?;
                let b = me
                    .kernel("conv_backward_weight")?
                    .bind(dev)
                    .buf("dpooled", &dpooled.view)
                    .buf("saved_argmax", &saved.argmax.view)
                    .buf("saved_conv", &saved.conv.view)
                    .buf("input", &input.view)
                    .buf("partials", &partials.view);
                let d = me
                    .conv_params(b, s, 0)
                    .grid(((s.out_channels * s.in_channels) as u32, splits, 1))
                    .build(op)?;
                me.push(d);
                let b = me
                    .kernel("conv_sum_splits")?
                    .bind(dev)
                    .buf("partials_in", &partials.view)
                    .buf("dweight", &grads.dweight.view)
                    .buf("dbias", &grads.dbias.view);
                let n = (s.weight_len() + s.out_channels) as u64;
                let d = me.conv_params(b, s, splits).grid(grid_1d(n, 256, me.max_dim())).build(op)?;
                me.push(d);
                if let Some(dinput) = dinput {
                    let b = me
                        .kernel("conv_backward_input")?
                        .bind(dev)
                        .buf("dpooled", &dpooled.view)
                        .buf("saved_argmax", &saved.argmax.view)
                        .buf("saved_conv", &saved.conv.view)
                        .buf("weight", &weight.view)
                        .buf("dinput", &dinput.view);
                    let d = me.conv_params(b, s, 0).grid((s.batch as u32, 1, 1)).build(op)?;
                    me.push(d);
                }
                return Ok(());
            }
            // The fallback: the conv-output gradient first, then one invocation per element.
            let dconv = me.scratch("dconv", s.output_len())?;
            let d = me
                .kernel("pool_backward")?
                .bind(dev)
                .buf("conv", &saved.conv.view)
                .buf("dpooled", &dpooled.view)
                .buf("saved_argmax", &saved.argmax.view)
                .buf("dconv", &dconv.view)
                .param("planes", s.batch * s.out_channels)
                .param("height", s.out_height())
                .param("width", s.out_width())
                .grid(grid_1d(s.output_len() as u64, 256, me.max_dim()))
                .build(op)?;
            me.push(d);
            let b = me
                .kernel("conv_backward_weight_naive")?
                .bind(dev)
                .buf("dconv", &dconv.view)
                .buf("input", &input.view)
                .buf("dweight", &grads.dweight.view)
                .buf("dbias", &grads.dbias.view);
            let d = me
                .conv_params(b, s, 0)
                .grid(grid_1d((s.weight_len() + s.out_channels) as u64, 1, me.max_dim()))
                .build(op)?;
            me.push(d);
            if let Some(dinput) = dinput {
                let b = me
                    .kernel("conv_backward_input_naive")?
                    .bind(dev)
                    .buf("dconv", &dconv.view)
                    .buf("weight", &weight.view)
                    .buf("dinput", &dinput.view);
                let d = me
                    .conv_params(b, s, 0)
                    .grid(grid_1d(s.input_len() as u64, 256, me.max_dim()))
                    .build(op)?;
                me.push(d);
            }
            Ok(())
        })
    }

    fn adam_update(
        &mut self,
        params: &mut [GpuBuf<f32>],
        grads: &[GpuBuf<f32>],
        m: &mut [GpuBuf<f32>],
        v: &mut [GpuBuf<f32>],
        step: &AdamStep,
    ) -> Result<()> {
        let values = StepUniform { adam: *step, ..Default::default() };
        let (lens, partials) = optimizer_shapes(params, grads);
        self.tagged(OpCase::Adam { lens, partials }, |me| {
            me.optimizer("adam", "adam_update", params, grads, &[m, v], values)
        })
    }

    fn sgd_update(
        &mut self,
        params: &mut [GpuBuf<f32>],
        grads: &[GpuBuf<f32>],
        momentum: &mut [GpuBuf<f32>],
        step: &SgdStep,
    ) -> Result<()> {
        let values = StepUniform { sgd: *step, ..Default::default() };
        let (lens, partials) = optimizer_shapes(params, grads);
        let case = OpCase::Sgd {
            lens,
            partials,
            momentum: step.momentum as f64,
            nesterov: step.nesterov != 0,
            weight_decay: step.weight_decay as f64,
        };
        self.tagged(case, |me| me.optimizer("sgd", "sgd_update", params, grads, &[momentum], values))
    }
}
