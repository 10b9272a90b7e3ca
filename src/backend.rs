//! Where a run's arithmetic happens: the [`Backend`] trait the training loop is written against
//! (chunks of steps, so that a GPU can take many steps per submission), [`OpsBackend`] (any
//! [`Ops`] implementation stepping through [`crate::network`] one step at a time: the CPU
//! backend), and the choice of backend from the command line's words.

use std::collections::VecDeque;
use std::sync::Arc;

use anyhow::{bail, ensure, Context as _, Result};

use crate::checkpoint::{check_state, state_rules};
use crate::data::Dataset;
use crate::model::{Params, TrainState, CLASSES, IMAGE_PIXELS};
pub use crate::network::StepStats;
use crate::network::{forward, train_step, Activations, StepOut, Weights};
use crate::ops::{Batch, Ops};
use crate::optim::OptStep;

/// A chunk of optimizer steps for [`Backend::submit`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Chunk {
    pub batch: usize,
    /// The samples of step s are `indices[s*batch..(s+1)*batch]`.
    pub indices: Vec<u32>,
    /// Each image's (dx, dy) translation, two per index (all zero without augmentation).
    pub shifts: Vec<i32>,
    /// Each step's optimizer scalars.
    pub steps: Vec<OptStep>,
}

impl Chunk {
    /// Checks that the parts agree with each other.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.batch > 0, "batch size must be at least 1");
        ensure!(
            self.indices.len() == self.steps.len() * self.batch
                && self.shifts.len() == 2 * self.indices.len(),
            "a chunk of {} steps at batch {} has {} indices and {} shifts",
            self.steps.len(),
            self.batch,
            self.indices.len(),
            self.shifts.len()
        );
        Ok(())
    }
}

/// How often the host handed work to the device and waited for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SyncCounts {
    pub submits: u64,
    pub host_waits: u64,
}

/// Where the arithmetic runs. The training loop is written once against this.
pub trait Backend {
    /// "cpu" or "gpu".
    fn kind(&self) -> &'static str;
    /// The adapter's name (GPU) or a description of the processor (CPU).
    fn adapter(&self) -> String;
    /// Why the kernels asked for cannot run on this device, and what runs instead (the GPU's
    /// naive kernels); None when they run, and always on the CPU. The caller says it: the library
    /// prints nothing.
    fn kernel_fallback(&self) -> Option<&str> {
        None
    }
    /// Takes the parameters and the optimizer's state from `state` (at start and on resume).
    /// Waits for chunks in flight.
    fn load_state(&mut self, state: &TrainState) -> Result<()>;
    /// Copies the parameters and the optimizer's state back into `state` (for checkpoints and
    /// evaluation). Waits for chunks in flight.
    fn store_state(&mut self, state: &mut TrainState) -> Result<()>;
    /// Starts the chunk's steps, in order, after those already submitted. A GPU returns as soon
    /// as the work is queued, so the caller can prepare the next chunk while it runs.
    fn submit(&mut self, chunk: &Chunk) -> Result<()>;
    /// The per-step results of the oldest chunk not yet finished (waiting for it), or None when
    /// every submitted chunk is finished.
    fn finish(&mut self) -> Result<Option<Vec<StepStats>>>;
    /// Logits [N, 10] of the current parameters on every image of `data`. Waits for chunks in
    /// flight.
    fn logits(&mut self, data: &Dataset) -> Result<Vec<f32>>;
    /// Command-buffer submissions and host waits so far (0 for the CPU).
    fn sync_counts(&self) -> SyncCounts {
        SyncCounts::default()
    }

    /// Submits `chunk` and waits for it (and anything before it): its steps' results.
    fn train_steps(&mut self, chunk: &Chunk) -> Result<Vec<StepStats>> {
        self.submit(chunk)?;
        let mut last = Vec::new();
        while let Some(stats) = self.finish()? {
            last = stats;
        }
        Ok(last)
    }
}

/// Images per forward pass when computing logits for a whole data set.
const EVAL_BATCH: usize = 1024;

/// A backend that runs each step through [`crate::network::train_step`] on `O`, reading its
/// results back after every step. On the CPU that is the training backend ([`CpuBackend`]);
/// on the GPU's ops it is a slow cross-check of the recorded program the GPU backend replays.
///
/// [`CpuBackend`]: crate::cpu::CpuBackend
pub struct OpsBackend<O: Ops> {
    ops: O,
    kind: &'static str,
    adapter: String,
    train: O::Data,
    train_len: usize,
    weights: Option<Weights<O>>,
    /// The batch size the gradient buffers were made for (their partial counts depend on it).
    grads_batch: usize,
    /// Activations and per-step buffers, kept while the batch size stays the same.
    step: Option<StepBuffers<O>>,
    finished: VecDeque<Vec<StepStats>>,
    /// How the loaded state's buffers are checked after each chunk (see [`state_rules`]).
    state_rules: Vec<(String, bool)>,
}

struct StepBuffers<O: Ops> {
    acts: Activations<O>,
    indices: O::Buf<u32>,
    shifts: O::Buf<i32>,
    losses: O::Buf<f32>,
    correct: O::Buf<u32>,
}

impl<O: Ops> StepBuffers<O> {
    /// For training steps, or for the forward pass only.
    fn new(ops: &mut O, batch: usize, training: bool) -> Result<Self> {
        Self::alloc(ops, batch, training).with_context(|| {
            format!(
                "a step at batch {batch} needs {:.2} GB for its activations and their gradients",
                step_buffer_bytes(batch) as f64 / 1e9
            )
        })
    }

    fn alloc(ops: &mut O, batch: usize, training: bool) -> Result<Self> {
        let acts =
            if training { Activations::for_training(ops, batch)? } else { Activations::new(ops, batch)? };
        Ok(StepBuffers {
            acts,
            indices: ops.alloc("indices", batch)?,
            shifts: ops.alloc("shifts", 2 * batch)?,
            losses: ops.alloc("losses", batch)?,
            correct: ops.alloc("correct", batch)?,
        })
    }
}

impl<O: Ops> OpsBackend<O> {
    /// A backend that trains on `train` with `ops`, with no parameters until
    /// [`Backend::load_state`]; `kind` and `adapter` are what it reports.
    pub fn with_ops(mut ops: O, kind: &'static str, adapter: String, train: &Dataset) -> Result<Self> {
        check_images(train)?;
        let data = ops.upload_data("train", train)?;
        Ok(OpsBackend {
            ops,
            kind,
            adapter,
            train: data,
            grads_batch: 0,
            train_len: train.len(),
            weights: None,
            step: None,
            finished: VecDeque::new(),
            state_rules: Vec::new(),
        })
    }

    pub fn ops(&mut self) -> &mut O {
        &mut self.ops
    }

    /// The current parameters.
    pub fn params(&mut self) -> Result<Params> {
        let w = self.weights.as_ref().context("no parameters loaded")?;
        let tensors = w.params.iter().map(|t| self.ops.read(t)).collect::<Result<Vec<_>>>()?;
        Ok(Params { tensors })
    }

    /// The parameters and the optimizer's state, read back.
    fn read_state(&mut self) -> Result<(Params, Vec<Params>)> {
        let params = self.params()?;
        let w = self.weights.as_ref().expect("params() checked");
        let moments = w
            .moments
            .iter()
            .map(|m| Ok(Params { tensors: m.iter().map(|t| self.ops.read(t)).collect::<Result<Vec<_>>>()? }))
            .collect::<Result<Vec<_>>>()?;
        Ok((params, moments))
    }

    /// The gradients of the last step, partials summed (for tests and diagnostics).
    pub fn gradients(&mut self) -> Result<Params> {
        let w = self.weights.as_ref().context("no parameters loaded")?;
        let mut p = Params::zeros();
        for (t, g) in p.tensors.iter_mut().zip(&w.grads) {
            let raw = self.ops.read(g)?;
            let n = t.len();
            for (k, part) in raw.chunks(n).enumerate() {
                for (x, &y) in t.iter_mut().zip(part) {
                    *x = if k == 0 { y } else { *x + y };
                }
            }
        }
        Ok(p)
    }
}

/// Bytes of a step's buffers at `batch` (`StepBuffers`: every layer's outputs, pooling
/// indices and output gradients, the input and the per-image values), for the message when they
/// do not fit.
pub fn step_buffer_bytes(batch: usize) -> u64 {
    use crate::network::{layer_shapes, LayerShape};
    let per_layer: u64 = layer_shapes(batch)
        .iter()
        .map(|shape| match shape {
            LayerShape::Conv(s) => (s.output_len() + 3 * s.pooled_len()) as u64,
            LayerShape::Linear(s) => 2 * (s.batch * s.out_features) as u64,
        })
        .sum();
    // The input, and the labels, indices, 2 shifts, losses and correct flags of each image.
    4 * (per_layer + (batch * (IMAGE_PIXELS + 6)) as u64)
}

/// Checks that a data set holds 28x28 images, one per label.
pub fn check_images(data: &Dataset) -> Result<()> {
    ensure!(
        data.rows * data.cols == IMAGE_PIXELS,
        "images are {}x{}, LeNet-5 needs 28x28",
        data.rows,
        data.cols
    );
    ensure!(data.images.len() == data.len() * IMAGE_PIXELS, "image data does not match the label count");
    if let Some(l) = data.labels.iter().find(|&&l| l as usize >= CLASSES) {
        bail!("the data has label {l}, above 9");
    }
    Ok(())
}

impl<O: Ops> Backend for OpsBackend<O> {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn adapter(&self) -> String {
        self.adapter.clone()
    }

    fn load_state(&mut self, state: &TrainState) -> Result<()> {
        state.check_shapes()?;
        self.grads_batch = state.batch.max(1);
        self.weights = Some(Weights::upload(&mut self.ops, &state.params, &state.moments, self.grads_batch)?);
        self.state_rules = state_rules(&state.optimizer);
        Ok(())
    }

    fn store_state(&mut self, state: &mut TrainState) -> Result<()> {
        (state.params, state.moments) = self.read_state()?;
        Ok(())
    }

    fn submit(&mut self, chunk: &Chunk) -> Result<()> {
        chunk.validate()?;
        let b = chunk.batch;
        if let Some(&bad) = chunk.indices.iter().find(|&&i| i as usize >= self.train_len) {
            bail!("sample index {bad} is out of range: the training set has {} images", self.train_len);
        }
        if self.step.as_ref().is_none_or(|s| s.acts.batch != b) {
            self.step = Some(StepBuffers::new(&mut self.ops, b, true)?);
        }
        let w = self.weights.as_mut().context("no parameters loaded")?;
        if self.grads_batch != b {
            w.grads = Weights::alloc_grads(&mut self.ops, b)?;
            self.grads_batch = b;
        }
        let sb = self.step.as_mut().expect("made above");
        let mut stats = Vec::with_capacity(chunk.steps.len());
        for (s, opt) in chunk.steps.iter().enumerate() {
            self.ops.write(&mut sb.indices, &chunk.indices[s * b..][..b])?;
            self.ops.write(&mut sb.shifts, &chunk.shifts[2 * s * b..][..2 * b])?;
            let batch = Batch { data: &self.train, indices: &sb.indices, shifts: &sb.shifts, batch: b };
            let out = StepOut { losses: &mut sb.losses, correct: &mut sb.correct };
            train_step(&mut self.ops, w, &mut sb.acts, &batch, out, opt)?;
            let (losses, correct) = (self.ops.read(&sb.losses)?, self.ops.read(&sb.correct)?);
            stats.push(StepStats::from_images(&losses, &correct));
        }
        // The state after the chunk: a value no run reaches (NaN, inf, a negative second moment)
        // stops the run here, naming its tensor, instead of steps later as a NaN loss, a save
        // that fails, or an optimizer that silently stops moving.
        let (params, moments) = self.read_state()?;
        let buffers: Vec<&Params> = std::iter::once(&params).chain(&moments).collect();
        check_state(&self.state_rules, &buffers)?;
        self.finished.push_back(stats);
        Ok(())
    }

    fn finish(&mut self) -> Result<Option<Vec<StepStats>>> {
        Ok(self.finished.pop_front())
    }

    fn logits(&mut self, data: &Dataset) -> Result<Vec<f32>> {
        check_images(data)?;
        let w = self.weights.as_ref().context("no parameters loaded")?;
        let eval = self.ops.upload_data("eval", data)?;
        let mut logits = Vec::with_capacity(data.len() * CLASSES);
        let mut bufs: Option<StepBuffers<O>> = None;
        for start in (0..data.len()).step_by(EVAL_BATCH) {
            let b = EVAL_BATCH.min(data.len() - start);
            if bufs.as_ref().is_none_or(|s| s.acts.batch != b) {
                bufs = Some(StepBuffers::new(&mut self.ops, b, false)?);
            }
            let sb = bufs.as_mut().expect("made above");
            let indices: Vec<u32> = (start as u32..(start + b) as u32).collect();
            self.ops.write(&mut sb.indices, &indices)?;
            let batch = Batch { data: &eval, indices: &sb.indices, shifts: &sb.shifts, batch: b };
            forward(&mut self.ops, &w.params, &mut sb.acts, &batch)?;
            logits.extend(self.ops.read(sb.acts.logits())?);
        }
        Ok(logits)
    }
}

/// An empty data set of 28x28 images, for backends that only evaluate.
pub fn no_training_data() -> Arc<Dataset> {
    Arc::new(Dataset { images: vec![], labels: vec![], rows: 28, cols: 28 })
}
