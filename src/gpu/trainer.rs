//! The GPU backend: the training set, the parameters, their gradients and the optimizer's state
//! resident on the device. A training step is recorded once ([`network::train_step`] on
//! [`GpuOps`]) as a program of dispatches, and each chunk of steps replays it into one compute
//! pass: per-step values (the batch's place in the index buffer, where the losses go, the
//! optimizer's scalars) come from a uniform slot per step, the losses are read back once per
//! chunk, and the next chunk is recorded and submitted while the device runs the last.

use std::collections::VecDeque;
use std::sync::mpsc;

use anyhow::{bail, ensure, Context as _, Result};

use super::context::GpuContext;
use super::kernels::{Dispatch, StepUniform, STEP_STRIDE};
use super::ops::{DeviceData, GpuBuf, GpuOps};
use crate::backend::{check_images, Backend, Chunk, StepStats, SyncCounts};
use crate::checkpoint::{check_state_tensor, state_check_order, state_rules, StateFault};
use crate::data::Dataset;
use crate::model::{param_specs, Params, TrainState, CLASSES};
use crate::network::{self, grad_partials, Activations, StepOut, Weights};
use crate::ops::{Batch, Ops};
use crate::optim::OptStep;

/// The largest batch the forward-only evaluation runs at once.
const EVAL_BATCH: usize = 2048;

/// Chunks in flight at most: one running, one queued behind it.
const MAX_IN_FLIGHT: usize = 2;

/// Where each tensor lives in a flat buffer: offsets in f32 elements, each aligned to the
/// device's storage-binding offset alignment.
#[derive(Clone, Debug)]
struct FlatLayout {
    offsets: Vec<usize>,
    lens: Vec<usize>,
    total: usize,
}

impl FlatLayout {
    fn new(lens: &[usize], alignment_bytes: u32) -> Self {
        let align = (alignment_bytes as usize / 4).max(1);
        let mut offsets = Vec::with_capacity(lens.len());
        let mut at = 0usize;
        for &n in lens {
            at = at.next_multiple_of(align);
            offsets.push(at);
            at += n;
        }
        FlatLayout { offsets, lens: lens.to_vec(), total: at.next_multiple_of(align).max(1) }
    }

    /// The tensors laid out flat, zero in the padding.
    fn flatten(&self, tensors: &[Vec<f32>]) -> Vec<f32> {
        let mut flat = vec![0.0; self.total];
        for (i, t) in tensors.iter().enumerate() {
            flat[self.offsets[i]..][..self.lens[i]].copy_from_slice(t);
        }
        flat
    }

    fn unflatten(&self, flat: &[f32]) -> Vec<Vec<f32>> {
        (0..self.lens.len()).map(|i| flat[self.offsets[i]..][..self.lens[i]].to_vec()).collect()
    }

    /// A view per tensor of `buffer`, named `prefix` + the tensor's name.
    fn views(&self, buffer: &wgpu::Buffer, prefix: &str) -> Vec<GpuBuf<f32>> {
        param_specs()
            .iter()
            .enumerate()
            .map(|(i, s)| {
                GpuBuf::range(buffer, self.offsets[i], self.lens[i], &format!("{prefix}{}", s.name))
            })
            .collect()
    }
}

/// A chunk's per-step buffers and the recorded training step.
struct TrainProgram {
    batch: usize,
    /// Steps per chunk it has room for.
    capacity: usize,
    /// Which optimizer's kernel it records.
    optimizer: &'static str,
    indices: GpuBuf<u32>,
    shifts: GpuBuf<i32>,
    losses: GpuBuf<f32>,
    correct: GpuBuf<u32>,
    step_uniforms: wgpu::Buffer,
    step_group: wgpu::BindGroup,
    /// Read-back buffers, one per chunk in flight.
    staging: Vec<wgpu::Buffer>,
    dispatches: Vec<Dispatch>,
}

/// A submitted chunk.
struct InFlight {
    steps: usize,
    batch: usize,
    staging: usize,
    submission: wgpu::SubmissionIndex,
    mapped: mpsc::Receiver<Result<(), wgpu::BufferAsyncError>>,
}

/// The forward pass over an evaluation set, recorded once per set.
struct EvalProgram {
    images: Vec<u8>,
    labels: Vec<u8>,
    batch: usize,
    batches: usize,
    logits: GpuBuf<f32>,
    staging: wgpu::Buffer,
    dispatches: Vec<Dispatch>,
}

/// Trains on the GPU. See the module docs.
pub struct GpuBackend {
    ops: GpuOps,
    train: DeviceData,
    param_layout: FlatLayout,
    params: wgpu::Buffer,
    /// The optimizer's state, laid out as the parameters.
    moments: Vec<wgpu::Buffer>,
    /// The gradients (laid out for the partial counts of the program's batch size).
    grads: Option<(FlatLayout, wgpu::Buffer, usize)>,
    program: Option<TrainProgram>,
    eval: Option<EvalProgram>,
    in_flight: VecDeque<InFlight>,
    /// Results of chunks finished while making room for another.
    finished: VecDeque<Vec<StepStats>>,
    /// How the loaded state's buffers are checked after each chunk (see [`state_rules`]).
    state_rules: Vec<(String, bool)>,
}

fn flat_buffer(ctx: &GpuContext, label: &str, elements: usize) -> Result<wgpu::Buffer> {
    let bytes = (elements * 4) as u64;
    ctx.check_binding(label, bytes)?;
    Ok(ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: bytes,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    }))
}

fn staging(ctx: &GpuContext, label: &str, bytes: u64) -> wgpu::Buffer {
    ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: bytes.max(4),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}

/// Writes one step-uniform slot per entry of `values`, `STEP_STRIDE` bytes apart.
fn write_step_uniforms(ctx: &GpuContext, buffer: &wgpu::Buffer, values: &[StepUniform]) {
    let stride = STEP_STRIDE as usize;
    let mut bytes = vec![0u8; values.len() * stride];
    for (i, v) in values.iter().enumerate() {
        bytes[i * stride..][..std::mem::size_of::<StepUniform>()].copy_from_slice(bytemuck::bytes_of(v));
    }
    ctx.queue.write_buffer(buffer, 0, &bytes);
}

impl GpuBackend {
    /// A backend on `ctx` that trains on `train` (uploaded once) with the context's kernels
    /// ([`GpuContext::variant`]).
    pub fn new(ctx: GpuContext, train: &Dataset) -> Result<Self> {
        let variant = ctx.variant();
        Self::with_variant(ctx, train, variant)
    }

    /// The same with the given kernels.
    pub fn with_variant(ctx: GpuContext, train: &Dataset, variant: super::Variant) -> Result<Self> {
        check_images(train)?;
        ctx.clone().scoped(|| {
            // Never silent: [`Backend::kernel_fallback`] says which kernels could not run and why
            // (`train`, `eval` and `bench` print it before their first step).
            let mut ops = GpuOps::with_variant(ctx.clone(), variant)?;
            let train = ops.upload_data("train", train)?;
            let lens: Vec<usize> = param_specs().iter().map(|s| s.len()).collect();
            let param_layout = FlatLayout::new(&lens, ctx.limits.min_storage_buffer_offset_alignment);
            let params = flat_buffer(&ctx, "params", param_layout.total)?;
            Ok(GpuBackend {
                ops,
                train,
                param_layout,
                params,
                moments: Vec::new(),
                grads: None,
                program: None,
                eval: None,
                in_flight: VecDeque::new(),
                finished: VecDeque::new(),
                state_rules: Vec::new(),
            })
        })
    }

    /// Opens the adapter `wanted` names (or `LENET_ADAPTER`, or the best) and builds the backend.
    pub fn open(wanted: Option<&str>, train: &Dataset) -> Result<Self> {
        Self::new(GpuContext::new(wanted)?, train)
    }

    pub fn context(&self) -> &GpuContext {
        &self.ops.ctx
    }

    /// The kernels it runs.
    pub fn variant(&self) -> super::Variant {
        self.ops.variant
    }

    /// The recorded training step's dispatches and the step uniforms' bind group (slot 0 holds
    /// the last chunk's first step): what `lenet bench` times.
    pub fn step_program(&self) -> Option<(&[Dispatch], &wgpu::BindGroup)> {
        self.program.as_ref().map(|p| (p.dispatches.as_slice(), &p.step_group))
    }

    /// The parameter gradients of the last training step, partials summed in order (for tests).
    pub fn gradients(&mut self) -> Result<Params> {
        self.drain()?;
        let (layout, buffer, _) = self.grads.as_ref().context("no training step has run")?;
        let (layout, buffer) = (layout.clone(), buffer.clone());
        let raw = self.read_flat(&buffer, layout.total)?;
        let mut p = Params::zeros();
        for (i, t) in p.tensors.iter_mut().enumerate() {
            let parts = &raw[layout.offsets[i]..][..layout.lens[i]];
            for (k, part) in parts.chunks(t.len()).enumerate() {
                for (x, &y) in t.iter_mut().zip(part) {
                    *x = if k == 0 { y } else { *x + y };
                }
            }
        }
        Ok(p)
    }

    fn read_flat(&mut self, buffer: &wgpu::Buffer, elements: usize) -> Result<Vec<f32>> {
        Ok(self.read_flats(&[buffer], elements)?.remove(0))
    }

    /// The first `elements` values of each buffer, in one submit and one wait.
    fn read_flats(&mut self, buffers: &[&wgpu::Buffer], elements: usize) -> Result<Vec<Vec<f32>>> {
        let ctx = self.ops.ctx.clone();
        let bytes = (elements * 4) as u64;
        let staging = staging(&ctx, "readback", bytes * buffers.len() as u64);
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        for (k, b) in buffers.iter().enumerate() {
            enc.copy_buffer_to_buffer(b, 0, &staging, k as u64 * bytes, bytes);
        }
        ctx.queue.submit([enc.finish()]);
        self.ops.submits += 1;
        self.ops.host_waits += 1;
        let raw: Vec<f32> = bytemuck::pod_collect_to_vec(&super::ops::read_mapped(
            &ctx,
            &staging,
            bytes * buffers.len() as u64,
        )?);
        Ok(raw.chunks(elements).map(<[f32]>::to_vec).collect())
    }

    /// Waits for every chunk in flight, keeping their results for [`Backend::finish`].
    fn drain(&mut self) -> Result<()> {
        while !self.in_flight.is_empty() {
            let stats = self.wait_oldest()?;
            self.finished.push_back(stats);
        }
        Ok(())
    }

    fn wait_oldest(&mut self) -> Result<Vec<StepStats>> {
        let f = self.in_flight.pop_front().expect("a chunk in flight");
        let ctx = self.ops.ctx.clone();
        ctx.device
            .poll(wgpu::PollType::Wait { submission_index: Some(f.submission), timeout: None })
            .context("waiting for the GPU")?;
        self.ops.host_waits += 1;
        f.mapped
            .recv()
            .context("the read-back callback did not run")?
            .context("reading the step statistics")?;
        ctx.check_errors()?;
        let p = self.program.as_ref().expect("in-flight chunks have a program");
        let staging = &p.staging[f.staging];
        let n = f.steps * f.batch;
        let (stats, fault) = {
            let view = staging.slice(..(n * 8 + self.state_bytes()) as u64).get_mapped_range()?;
            let losses: Vec<f32> = bytemuck::pod_collect_to_vec(&view[..n * 4]);
            let correct: Vec<u32> = bytemuck::pod_collect_to_vec(&view[n * 4..n * 8]);
            let stats: Vec<StepStats> = losses
                .chunks(f.batch)
                .zip(correct.chunks(f.batch))
                .map(|(l, c)| StepStats::from_images(l, c))
                .collect();
            let state: Vec<f32> = bytemuck::pod_collect_to_vec(&view[n * 8..]);
            (stats, self.check_state_after_chunk(&state).err())
        };
        staging.unmap();
        match fault {
            Some(fault) => Err(fault.into()),
            None => Ok(stats),
        }
    }

    /// Bytes of the parameters and the optimizer's state, flat: what each chunk's read-back
    /// carries after its statistics.
    fn state_bytes(&self) -> usize {
        self.param_layout.total * 4 * (1 + self.moments.len())
    }

    /// The state a chunk left (parameters, then each optimizer buffer, flat), checked: a value
    /// no run reaches (NaN, inf, a negative second moment) is named here, at the chunk where it
    /// arose. The copy rides on the chunk's one read-back (about 740 KB for Adam): no extra
    /// submit or wait, and a scan of 180k floats on the host.
    fn check_state_after_chunk(&self, flat: &[f32]) -> Result<(), StateFault> {
        let total = self.param_layout.total;
        for k in state_check_order(self.state_rules.len()) {
            let (prefix, non_negative) = &self.state_rules[k];
            let buffer = &flat[k * total..][..total];
            for (i, spec) in param_specs().iter().enumerate() {
                let values = &buffer[self.param_layout.offsets[i]..][..self.param_layout.lens[i]];
                check_state_tensor(&format!("{prefix}{}", spec.name), values, *non_negative)?;
            }
        }
        Ok(())
    }

    /// The gradient buffers for `batch` (their partial counts depend on it).
    fn ensure_grads(&mut self, batch: usize) -> Result<()> {
        if self.grads.as_ref().is_some_and(|g| g.2 == batch) {
            return Ok(());
        }
        let partials = grad_partials(&self.ops, batch);
        let lens: Vec<usize> = param_specs().iter().zip(&partials).map(|(s, p)| s.len() * p).collect();
        let layout = FlatLayout::new(&lens, self.ops.ctx.limits.min_storage_buffer_offset_alignment);
        let buffer = flat_buffer(&self.ops.ctx, "grads", layout.total)?;
        self.grads = Some((layout, buffer, batch));
        Ok(())
    }

    fn weights(&self) -> Weights<GpuOps> {
        let (layout, grads, _) = self.grads.as_ref().expect("gradients allocated");
        Weights {
            params: self.param_layout.views(&self.params, ""),
            grads: layout.views(grads, "d"),
            moments: self
                .moments
                .iter()
                .enumerate()
                .map(|(k, m)| self.param_layout.views(m, &format!("moment{k}.")))
                .collect(),
        }
    }

    /// The program for chunks of `steps` steps of `batch` with `opt`'s optimizer (recorded with
    /// `opt`'s scalars, which every step's uniform then replaces).
    fn ensure_program(&mut self, batch: usize, steps: usize, opt: &OptStep) -> Result<()> {
        let optimizer = opt.optimizer;
        if let Some(p) = &self.program {
            if p.batch == batch && p.capacity >= steps && p.optimizer == optimizer {
                return Ok(());
            }
        }
        self.drain()?;
        // Chunks grow as the loop measures the step time: powers of two keep the re-recordings
        // to a handful.
        let capacity = steps.next_power_of_two().max(self.program.as_ref().map_or(0, |p| p.capacity));
        self.program = None;
        self.ensure_grads(batch)?;
        let ctx = self.ops.ctx.clone();
        let ops = &mut self.ops;
        let indices = ops.alloc::<u32>("train_indices", capacity * batch)?;
        let shifts = ops.alloc::<i32>("train_shifts", 2 * capacity * batch)?;
        let mut losses = ops.alloc::<f32>("losses", capacity * batch)?;
        let mut correct = ops.alloc::<u32>("correct", capacity * batch)?;
        let step_uniforms = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("train_steps"),
            size: capacity as u64 * STEP_STRIDE,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let step_group = ctx.step_group(&step_uniforms);
        let stat_bytes = (capacity * batch * 8 + self.state_bytes()) as u64;
        let staging =
            (0..MAX_IN_FLIGHT).map(|i| staging(&ctx, &format!("stats_readback{i}"), stat_bytes)).collect();
        let mut weights = self.weights();
        let train = &self.train;
        let ((), dispatches) = self.ops.record_program(&step_group, |ops| {
            let mut acts = Activations::for_training(ops, batch)?;
            let batch_ref = Batch { data: train, indices: &indices, shifts: &shifts, batch };
            let out = StepOut { losses: &mut losses, correct: &mut correct };
            network::train_step(ops, &mut weights, &mut acts, &batch_ref, out, opt)
        })?;
        self.program = Some(TrainProgram {
            batch,
            capacity,
            optimizer,
            indices,
            shifts,
            losses,
            correct,
            step_uniforms,
            step_group,
            staging,
            dispatches,
        });
        Ok(())
    }

    fn ensure_eval(&mut self, data: &Dataset) -> Result<()> {
        if let Some(e) = &self.eval {
            if e.images == data.images && e.labels == data.labels {
                return Ok(());
            }
        }
        self.eval = None;
        let ctx = self.ops.ctx.clone();
        let dev = self.ops.upload_data("eval", data)?;
        // The largest activation (conv1's output) must fit one binding.
        let per_image = (6 * 28 * 28 * 4) as u64;
        let cap = (ctx.max_binding() / per_image).max(1) as usize;
        let batch = data.len().min(EVAL_BATCH).min(cap);
        let batches = data.len().div_ceil(batch);
        let mut idx: Vec<u32> = (0..data.len() as u32).collect();
        idx.resize(batches * batch, 0);
        let indices = self.ops.upload("eval_indices", &idx)?;
        let shifts = self.ops.alloc::<i32>("eval_shifts", 2 * idx.len())?;
        let step_uniforms = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("eval_steps"),
            size: batches as u64 * STEP_STRIDE,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let uniforms: Vec<StepUniform> = (0..batches)
            .map(|k| StepUniform { index_offset: (k * batch) as u32, ..Default::default() })
            .collect();
        write_step_uniforms(&ctx, &step_uniforms, &uniforms);
        let step_group = ctx.step_group(&step_uniforms);
        let params = self.param_layout.views(&self.params, "");
        let (logits, dispatches) = self.ops.record_program(&step_group, |ops| {
            let mut acts = Activations::new(ops, batch)?;
            let batch_ref = Batch { data: &dev, indices: &indices, shifts: &shifts, batch };
            network::forward(ops, &params, &mut acts, &batch_ref)?;
            Ok(acts.logits().clone())
        })?;
        let staging = staging(&ctx, "logits_readback", (data.len() * CLASSES * 4) as u64);
        self.eval = Some(EvalProgram {
            images: data.images.clone(),
            labels: data.labels.clone(),
            batch,
            batches,
            logits,
            staging,
            dispatches,
        });
        Ok(())
    }
}

impl Backend for GpuBackend {
    fn kind(&self) -> &'static str {
        "gpu"
    }

    fn adapter(&self) -> String {
        self.ops.ctx.adapter_info.name.clone()
    }

    fn kernel_fallback(&self) -> Option<&str> {
        self.ops.fallback.as_deref()
    }

    fn sync_counts(&self) -> SyncCounts {
        SyncCounts { submits: self.ops.submits, host_waits: self.ops.host_waits }
    }

    fn load_state(&mut self, state: &TrainState) -> Result<()> {
        state.check_shapes()?;
        self.drain()?;
        let ctx = self.ops.ctx.clone();
        ctx.scoped(|| {
            if self.moments.len() != state.moments.len() {
                self.program = None;
                self.moments = (0..state.moments.len())
                    .map(|k| flat_buffer(&ctx, &format!("moment{k}"), self.param_layout.total))
                    .collect::<Result<_>>()?;
            }
            let write = |buffer: &wgpu::Buffer, p: &Params| {
                ctx.queue.write_buffer(
                    buffer,
                    0,
                    bytemuck::cast_slice(&self.param_layout.flatten(&p.tensors)),
                );
            };
            write(&self.params, &state.params);
            for (buffer, m) in self.moments.iter().zip(&state.moments) {
                write(buffer, m);
            }
            self.state_rules = state_rules(&state.optimizer);
            Ok(())
        })
    }

    fn store_state(&mut self, state: &mut TrainState) -> Result<()> {
        self.drain()?;
        let ctx = self.ops.ctx.clone();
        ctx.scoped(|| {
            let buffers: Vec<wgpu::Buffer> =
                std::iter::once(&self.params).chain(&self.moments).cloned().collect();
            let refs: Vec<&wgpu::Buffer> = buffers.iter().collect();
            let mut raw = self.read_flats(&refs, self.param_layout.total)?.into_iter();
            state.params = Params { tensors: self.param_layout.unflatten(&raw.next().expect("params")) };
            state.moments = raw.map(|m| Params { tensors: self.param_layout.unflatten(&m) }).collect();
            Ok(())
        })
    }

    fn submit(&mut self, chunk: &Chunk) -> Result<()> {
        chunk.validate()?;
        let (b, steps) = (chunk.batch, chunk.steps.len());
        if steps == 0 {
            self.finished.push_back(Vec::new());
            return Ok(());
        }
        if let Some(&i) = chunk.indices.iter().find(|&&i| i as usize >= self.train.len) {
            bail!("sample index {i} is outside the training set ({} images)", self.train.len);
        }
        ensure!(!self.moments.is_empty(), "no optimizer state loaded");
        let first = chunk.steps[0];
        ensure!(
            chunk.steps.iter().all(|s| s.optimizer == first.optimizer)
                && self.moments.len() == first.moments(),
            "the chunk's optimizer does not match the loaded state"
        );
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            let stats = self.wait_oldest()?;
            self.finished.push_back(stats);
        }
        let ctx = self.ops.ctx.clone();
        let state_bytes = self.state_bytes() as u64;
        ctx.scoped(|| {
            self.ensure_program(b, steps, &first)?;
            let p = self.program.as_ref().expect("built above");
            let slot = (0..MAX_IN_FLIGHT)
                .find(|s| self.in_flight.iter().all(|f| f.staging != *s))
                .expect("a free slot");
            let q = &ctx.queue;
            q.write_buffer(&p.indices.view.buffer, 0, bytemuck::cast_slice(&chunk.indices));
            q.write_buffer(&p.shifts.view.buffer, 0, bytemuck::cast_slice(&chunk.shifts));
            let uniforms: Vec<StepUniform> =
                chunk.steps.iter().enumerate().map(|(s, opt)| StepUniform::new(s * b, opt)).collect();
            write_step_uniforms(&ctx, &p.step_uniforms, &uniforms);
            let mut enc = ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("train_steps") });
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("train_steps"),
                    timestamp_writes: None,
                });
                for s in 0..steps {
                    for d in &p.dispatches {
                        d.record(&mut pass, (s as u64 * STEP_STRIDE) as u32);
                    }
                }
            }
            let n = (steps * b * 4) as u64;
            let staging = &p.staging[slot];
            enc.copy_buffer_to_buffer(&p.losses.view.buffer, 0, staging, 0, n);
            enc.copy_buffer_to_buffer(&p.correct.view.buffer, 0, staging, n, n);
            // The state after the chunk, for the check in `wait_oldest`.
            let flat = (self.param_layout.total * 4) as u64;
            for (k, buffer) in std::iter::once(&self.params).chain(&self.moments).enumerate() {
                enc.copy_buffer_to_buffer(buffer, 0, staging, 2 * n + k as u64 * flat, flat);
            }
            let submission = ctx.queue.submit([enc.finish()]);
            self.ops.submits += 1;
            let (tx, rx) = mpsc::channel();
            let mapped = 2 * n + state_bytes;
            staging.slice(..mapped).map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r);
            });
            self.in_flight.push_back(InFlight { steps, batch: b, staging: slot, submission, mapped: rx });
            Ok(())
        })
    }

    fn finish(&mut self) -> Result<Option<Vec<StepStats>>> {
        if let Some(stats) = self.finished.pop_front() {
            return Ok(Some(stats));
        }
        if self.in_flight.is_empty() {
            return Ok(None);
        }
        self.wait_oldest().map(Some)
    }

    fn logits(&mut self, data: &Dataset) -> Result<Vec<f32>> {
        if data.is_empty() {
            return Ok(Vec::new());
        }
        check_images(data)?;
        self.drain()?;
        let ctx = self.ops.ctx.clone();
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
                    for d in &e.dispatches {
                        d.record(&mut pass, (k as u64 * STEP_STRIDE) as u32);
                    }
                }
                let rows = e.batch.min(data.len() - k * e.batch) as u64;
                enc.copy_buffer_to_buffer(
                    &e.logits.view.buffer,
                    e.logits.view.offset,
                    &e.staging,
                    (k * e.batch) as u64 * row,
                    rows * row,
                );
            }
            ctx.queue.submit([enc.finish()]);
            self.ops.submits += 1;
            self.ops.host_waits += 1;
            let raw = super::ops::read_mapped(&ctx, &e.staging, data.len() as u64 * row)?;
            Ok(bytemuck::pod_collect_to_vec(&raw))
        })
    }
}
