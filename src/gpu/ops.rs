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
use super::kernels::{pack_u8, pixel_lut, Binder, Dispatch, StepUniform, View};
use super::variant::{fallback_note, Variant};
use crate::data::Dataset;
use crate::opcase::{relu_mask_of, update_shapes, OpCase};
use crate::ops::*;

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
    pub(super) fn whole(&self) -> View {
        View::whole(&self.view.buffer, &self.view.label)
    }

    /// The range's first element in the whole buffer.
    pub(super) fn first(&self) -> usize {
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
    /// Workgroups per image of the fused trunk's forward pass (None: by the batch and the
    /// adapter, see `conv::trunk_splits`); tests set it to check each.
    pub trunk_splits: Option<usize>,
    /// Why the kernels asked for could not run on this device (the naive ones run instead).
    pub fallback: Option<String>,
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
    /// The ops with the context's kernels ([`GpuContext::variant`]).
    pub fn new(ctx: GpuContext) -> Result<Self> {
        let variant = ctx.variant();
        Self::with_variant(ctx, variant)
    }

    /// The ops with the given kernels; on a device that cannot build one of them (conv_v2.wgsl
    /// needs more workgroup memory than WebGPU's default limits), the naive ones run.
    pub fn with_variant(ctx: GpuContext, variant: Variant) -> Result<Self> {
        let lut = storage_init(&ctx, "pixel_lut", &pixel_lut())?;
        let fallback = fallback_note(variant, &ctx.kernels.left_out);
        let variant = if fallback.is_none() { variant } else { Variant::V1 };
        Ok(GpuOps {
            ctx,
            lut,
            variant,
            trunk_splits: None,
            fallback,
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

    /// Whether the adapter is a CPU (lavapipe, WARP).
    pub(super) fn on_cpu(&self) -> bool {
        self.ctx.adapter_info.device_type == wgpu::DeviceType::Cpu
    }

    pub(super) fn max_dim(&self) -> u32 {
        self.ctx.limits.max_compute_workgroups_per_dimension
    }

    /// The kernel `name`, to bind.
    pub(super) fn kernel(&self, name: &str) -> Result<Binder<'_>> {
        Ok(self.ctx.kernels.get(name)?.bind(&self.ctx.device))
    }

    /// A scratch buffer owned by the dispatches that bind it.
    pub(super) fn scratch(&self, label: &str, len: usize) -> Result<GpuBuf<f32>> {
        storage(&self.ctx, label, len)
    }
}

/// A fused kernel binds each group of its tensors as one buffer: they must be ranges of one
/// (as [`Ops::alloc_packed`] makes them; the network and the op checks pack what
/// [`Ops::fuses`] says).
pub(super) fn ensure_packed<T>(what: &str, group: &[&GpuBuf<T>]) -> Result<()> {
    if let Some(apart) = group.iter().find(|b| b.view.buffer != group[0].view.buffer) {
        bail!("the fused kernel needs its {what} packed in one buffer ({} is apart)", apart.view.label);
    }
    Ok(())
}

fn check_len<T>(what: &str, buf: &GpuBuf<T>, len: usize) -> Result<()> {
    ensure!(buf.len == len, "{what} ({}) holds {} values, the shape needs {len}", buf.view.label, buf.len);
    Ok(())
}

/// `check_lens!(buf => len, ...)`: each buffer holds exactly `len` values (one line naming it
/// otherwise).
macro_rules! check_lens {
    ($($buf:expr => $len:expr),+ $(,)?) => {
        $(check_len(stringify!($buf), $buf, $len)?;)+
    };
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

pub(super) fn storage_init<T: Elem>(ctx: &GpuContext, label: &str, data: &[T]) -> Result<GpuBuf<T>> {
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
        ensure!(self.program_step.is_none(), "cannot read a buffer while recording a program (an op the GPU does not override reads its inputs on the host: give it a kernel in gpu/ops.rs)");
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
            GradOp::Head { head, .. } if self.runs_fused_head(&head) => {
                super::linear::head_groups(head.batch).0
            }
            // Unfused, the head runs layer by layer.
            GradOp::Head { head, layer: 2 } => self.grad_partials(GradOp::LinearXent(head.layer(2))),
            GradOp::Head { head, layer } => self.grad_partials(GradOp::Linear(head.layer(layer))),
            // One partial per image; unfused, the trunk runs layer by layer.
            GradOp::Trunk { trunk, .. } if self.runs_fused_trunk(&trunk) => trunk.conv1.batch,
            GradOp::Trunk { trunk, layer } => {
                self.grad_partials(GradOp::ConvFromPool(trunk.layer(layer), layer > 0))
            }
            op => self.alternative_partials(op).unwrap_or(1),
        }
    }

    /// One buffer holding them all, each tensor at an offset the device can bind (beyond the
    /// device's largest binding: one buffer each, which the fused kernels refuse).
    fn alloc_packed<T: Elem>(&mut self, label: &str, lens: &[(String, usize)]) -> Result<Vec<GpuBuf<T>>> {
        let align = (self.ctx.limits.min_storage_buffer_offset_alignment as usize / 4).max(1);
        let mut offsets = Vec::with_capacity(lens.len());
        let mut at = 0usize;
        for (_, n) in lens {
            at = at.next_multiple_of(align);
            offsets.push(at);
            at += n.max(&1);
        }
        if (at * 4) as u64 > self.ctx.max_binding() {
            return lens.iter().map(|(name, n)| self.alloc(name, *n)).collect();
        }
        let buffer = storage::<T>(&self.ctx, label, at)?.view.buffer;
        Ok(lens.iter().zip(offsets).map(|((name, n), o)| GpuBuf::range(&buffer, o, *n, name)).collect())
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

    fn gather(&mut self, g: Gather<Self>) -> Result<()> {
        let (data, b) = (g.batch.data, g.batch.batch);
        let case = OpCase::Gather { batch: b, images: data.len, side: data.rows, max_shift: 2 };
        self.tagged(case, |me| {
            check_lens!(g.input => b * data.rows * data.cols, g.labels => b);
            check_batch(g.batch)?;
            me.gather_naive(g)
        })
    }

    fn gather_conv_relu_pool_forward(&mut self, g: Gather<Self>, l: ConvLayer<Self>) -> Result<()> {
        let s = l.s;
        let case = OpCase::GatherConvReluPool { s, images: g.batch.data.len, max_shift: 2 };
        self.tagged(case, |me| {
            if !me.runs_conv_v2_forward(&s, true) {
                return gather_then_conv(me, g, l);
            }
            check_conv_forward(g.input, &l)?;
            check_lens!(g.labels => s.batch);
            ensure!(
                g.batch.batch == s.batch,
                "the batch holds {} images, the shape {}",
                g.batch.batch,
                s.batch
            );
            check_batch(g.batch)?;
            me.gather_conv_pool_forward_v2(g, l)
        })
    }

    fn conv_relu_pool_forward(&mut self, input: &GpuBuf<f32>, l: ConvLayer<Self>) -> Result<()> {
        self.tagged(OpCase::ConvReluPool(l.s), |me| {
            check_conv_forward(input, &l)?;
            if me.runs_conv_v2_forward(&l.s, false) {
                me.conv_pool_forward_v2(input, l)
            } else {
                me.conv_pool_forward_naive(input, l)
            }
        })
    }

    fn linear_forward(&mut self, a: LinearForward<Self>) -> Result<()> {
        let s = a.s;
        self.tagged(OpCase::Linear { s, relu: a.relu }, |me| {
            check_lens!(a.input => s.batch * s.in_features, a.weight => s.weight_len(), a.bias => s.out_features);
            check_lens!(a.out => s.batch * s.out_features);
            if me.runs_linear_v3() {
                me.linear_forward_v3(a)
            } else {
                me.linear_forward_naive(a)
            }
        })
    }

    fn softmax_xent(&mut self, a: SoftmaxXent<Self>) -> Result<()> {
        let (batch, classes) = (a.batch, a.classes);
        self.tagged(OpCase::SoftmaxXent { batch, classes }, |me| {
            check_lens!(a.logits => batch * classes, a.dlogits => batch * classes, a.labels => batch);
            ensure!(a.losses.len >= batch && a.correct.len >= batch, "the loss buffers are too short");
            me.softmax_xent_naive(a)
        })
    }

    fn linear_xent_forward_backward(&mut self, a: LinearXent<Self>) -> Result<()> {
        let s = a.s;
        let case = OpCase::LinearXent { s, mask: relu_mask_of(&a.dinput) };
        self.tagged(case, |me| {
            if !me.runs_xent_v3(&s) {
                return linear_then_xent(me, a);
            }
            let parts = me.grad_partials(GradOp::LinearXent(s));
            check_linear_backward(a.input, a.weight, a.dweight, a.dbias, a.dinput.as_ref(), s, parts)?;
            let logits = s.batch * s.out_features;
            check_lens!(a.bias => s.out_features, a.labels => s.batch, a.logits => logits, a.dlogits => logits);
            ensure!(a.losses.len >= s.batch && a.correct.len >= s.batch, "the loss buffers are too short");
            me.linear_xent_v3(a)
        })
    }

    fn linear_backward(&mut self, a: LinearBackward<Self>) -> Result<()> {
        let s = a.s;
        let case = OpCase::LinearBackward { s, mask: relu_mask_of(&a.dinput) };
        self.tagged(case, |me| {
            let parts = me.grad_partials(GradOp::Linear(s));
            check_linear_backward(a.input, a.weight, a.dweight, a.dbias, a.dinput.as_ref(), s, parts)?;
            check_lens!(a.dout => s.batch * s.out_features);
            if me.runs_linear_v3() {
                me.linear_backward_v3(a)
            } else {
                me.linear_backward_naive(a)
            }
        })
    }

    fn conv_backward_from_pool(&mut self, a: ConvBackward<Self>) -> Result<()> {
        let (s, dinput) = (a.s, a.dinput.is_some());
        self.tagged(OpCase::ConvBackwardFromPool { s, dinput }, |me| {
            let parts = me.grad_partials(GradOp::ConvFromPool(s, dinput));
            check_lens!(a.dpooled => s.pooled_len(), a.conv => s.output_len(), a.argmax => s.pooled_len());
            check_lens!(a.input => s.input_len(), a.weight => s.weight_len());
            check_lens!(a.dweight => parts * s.weight_len(), a.dbias => parts * s.out_channels);
            if let Some(dinput) = &a.dinput {
                check_lens!(dinput => s.input_len());
            }
            if me.runs_conv_v2_backward(&s, dinput) {
                me.conv_pool_backward_v2(a)
            } else {
                me.conv_pool_backward_naive(a)
            }
        })
    }

    fn fuses(&self, op: Fusion) -> bool {
        match op {
            Fusion::Head(s) => self.runs_fused_head(&s),
            Fusion::Trunk(t) => self.runs_fused_trunk(&t),
        }
    }

    fn trunk_forward(&mut self, a: TrunkForward<Self>) -> Result<()> {
        let (s, images) = (a.s, a.gather.batch.data.len);
        self.tagged(OpCase::TrunkForward { s, images, max_shift: 2 }, |me| {
            if !me.runs_fused_trunk(&s) {
                return trunk_forward_by_layers(me, a);
            }
            let g = &a.gather;
            check_batch(g.batch)?;
            let d = g.batch.data;
            ensure!(
                d.rows == 28 && d.cols == 28 && g.batch.batch == s.conv1.batch,
                "the batch does not fit the trunk"
            );
            check_lens!(g.input => s.conv1.input_len(), g.labels => s.conv1.batch);
            check_conv_forward(g.input, &a.conv1)?;
            check_conv_forward(&*a.conv1.pooled, &a.conv2)?;
            me.trunk_forward_fused(a)
        })
    }

    fn trunk_backward(&mut self, a: TrunkBackward<Self>) -> Result<()> {
        let s = a.s;
        self.tagged(OpCase::TrunkBackward(s), |me| {
            if !me.runs_fused_trunk(&s) {
                return trunk_backward_by_layers(me, a);
            }
            let parts = me.grad_partials(GradOp::Trunk { trunk: s, layer: 0 });
            for (l, c) in [(&a.conv1, s.conv1), (&a.conv2, s.conv2)] {
                check_lens!(l.conv => c.output_len(), l.argmax => c.pooled_len(), l.input => c.input_len());
                check_lens!(l.weight => c.weight_len(), l.dweight => parts * c.weight_len(), l.dbias => parts * c.out_channels);
            }
            check_lens!(a.dpooled => s.conv2.pooled_len(), a.dpooled1 => s.conv1.pooled_len());
            me.trunk_backward_fused(a)
        })
    }

    fn head_forward_backward(&mut self, a: Head<Self>) -> Result<()> {
        let s = a.s;
        self.tagged(OpCase::Head(s), |me| {
            if !me.runs_fused_head(&s) {
                return head_by_layers(me, a);
            }
            let parts = me.grad_partials(GradOp::Head { head: s, layer: 0 });
            let [l1, l2, l3] = &a.layers;
            for (l, ls) in [l1, l2, l3].into_iter().zip(s.layers()) {
                check_lens!(l.weight => ls.weight_len(), l.bias => ls.out_features);
                check_lens!(l.out => ls.batch * ls.out_features, l.dout => ls.batch * ls.out_features);
                check_lens!(l.dweight => parts * ls.weight_len(), l.dbias => parts * ls.out_features);
            }
            let input = s.batch * s.features[0];
            check_lens!(a.input => input, a.dinput => input, a.labels => s.batch);
            ensure!(a.losses.len >= s.batch && a.correct.len >= s.batch, "the loss buffers are too short");
            me.head_fused(a)
        })
    }

    fn update(&mut self, a: Update<Self>) -> Result<()> {
        let (lens, partials) = update_shapes(a.params, a.grads, |b| b.len);
        self.tagged(OpCase::Update { lens, partials, step: *a.step }, |me| me.optimizer("update", a))
    }
}

/// The indices and shifts cover the batch.
fn check_batch(batch: &BatchRef<GpuOps>) -> Result<()> {
    ensure!(
        batch.indices.len >= batch.batch && batch.shifts.len >= 2 * batch.batch,
        "the batch's indices or shifts are too short"
    );
    Ok(())
}

fn check_conv_forward(input: &GpuBuf<f32>, l: &ConvLayer<GpuOps>) -> Result<()> {
    let s = l.s;
    check_lens!(input => s.input_len(), l.weight => s.weight_len(), l.bias => s.out_channels);
    check_lens!(l.conv => s.output_len(), l.pooled => s.pooled_len(), l.argmax => s.pooled_len());
    ensure!(
        s.out_height().is_multiple_of(2) && s.out_width().is_multiple_of(2),
        "max-pool input must have even sides"
    );
    Ok(())
}

/// A linear layer's backward buffers, with `parts` partial sums per weight gradient.
fn check_linear_backward(
    input: &GpuBuf<f32>,
    weight: &GpuBuf<f32>,
    dweight: &GpuBuf<f32>,
    dbias: &GpuBuf<f32>,
    dinput: Option<&InputGrad<GpuOps>>,
    s: LinearShape,
    parts: usize,
) -> Result<()> {
    check_lens!(input => s.batch * s.in_features, weight => s.weight_len());
    check_lens!(dweight => parts * s.weight_len(), dbias => parts * s.out_features);
    if let Some(InputGradArgs { dinput, relu_mask }) = dinput {
        check_lens!(dinput => s.batch * s.in_features);
        if let Some(mask) = relu_mask {
            check_lens!(mask => s.batch * s.in_features);
        }
    }
    Ok(())
}
