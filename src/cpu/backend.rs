//! The CPU backend: [`crate::train::Backend`] on the fast CPU network.

use std::sync::Arc;

use anyhow::{bail, ensure};

use super::network::{adam_step, backward, forward, Activations, Gradients};
use crate::data::Dataset;
use crate::model::{AdamConfig, Params, TrainState, CLASSES, IMAGE_PIXELS};
use crate::train::{Backend, StepStats};

/// Images per forward pass when computing logits for a whole data set.
const EVAL_BATCH: usize = 1024;

/// Trains on the CPU: parameters and Adam moments in host memory, activations and gradients
/// reused across steps of the same batch size.
pub struct CpuBackend {
    train: Arc<Dataset>,
    /// Parameters and Adam moments (the rest of the fields are unused here).
    state: TrainState,
    /// Reused while the batch size stays the same.
    acts: Option<Activations>,
    grads: Option<Gradients>,
    pixels: Vec<u8>,
    labels: Vec<u32>,
}

impl CpuBackend {
    /// A backend that trains on `train`, with zero parameters until [`Backend::load_state`].
    pub fn new(train: impl Into<Arc<Dataset>>) -> Self {
        CpuBackend {
            train: train.into(),
            state: TrainState::new(Params::zeros(), 0, 0, false),
            acts: None,
            grads: None,
            pixels: Vec::new(),
            labels: Vec::new(),
        }
    }

    /// The current parameters.
    pub fn params(&self) -> &Params {
        &self.state.params
    }
}

/// "CPU (N threads, AVX-512)": the rayon pool's size and the widest vector unit the GEMM uses.
pub fn cpu_description() -> String {
    let threads = rayon::current_num_threads();
    #[cfg(target_arch = "x86_64")]
    let simd = if is_x86_feature_detected!("avx512f") {
        "AVX-512"
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        "AVX2+FMA"
    } else {
        "SSE2"
    };
    #[cfg(target_arch = "aarch64")]
    let simd = "NEON";
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let simd = "scalar";
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    format!("CPU ({threads} threads of {cores} available, {simd})")
}

fn check_images(data: &Dataset) -> anyhow::Result<()> {
    ensure!(
        data.rows * data.cols == IMAGE_PIXELS,
        "images are {}x{}, the CPU network needs 28x28",
        data.rows,
        data.cols
    );
    ensure!(data.images.len() == data.len() * IMAGE_PIXELS, "image data does not match the label count");
    Ok(())
}

impl Backend for CpuBackend {
    fn kind(&self) -> &'static str {
        "cpu"
    }

    fn adapter(&self) -> String {
        cpu_description()
    }

    fn load_state(&mut self, state: &TrainState) -> anyhow::Result<()> {
        self.state.params = state.params.clone();
        self.state.adam_m = state.adam_m.clone();
        self.state.adam_v = state.adam_v.clone();
        self.state.step = state.step;
        Ok(())
    }

    fn store_state(&mut self, state: &mut TrainState) -> anyhow::Result<()> {
        state.params = self.state.params.clone();
        state.adam_m = self.state.adam_m.clone();
        state.adam_v = self.state.adam_v.clone();
        Ok(())
    }

    fn train_steps(
        &mut self,
        indices: &[u32],
        batch: usize,
        first_step: u64,
        adam: &AdamConfig,
    ) -> anyhow::Result<Vec<StepStats>> {
        ensure!(batch > 0, "batch size must be at least 1");
        ensure!(first_step >= 1, "Adam's step count starts at 1");
        check_images(&self.train)?;
        let n = self.train.len();
        if let Some(&bad) = indices.iter().find(|&&i| i as usize >= n) {
            bail!("sample index {bad} is out of range: the training set has {n} images");
        }
        if self.acts.as_ref().is_none_or(|a| a.batch != batch) {
            self.acts = Some(Activations::new(batch));
            self.grads = Some(Gradients::new(batch));
        }
        let (acts, grads) = (self.acts.as_mut().unwrap(), self.grads.as_mut().unwrap());
        let mut stats = Vec::with_capacity(indices.len() / batch);
        for (s, chunk) in indices.chunks_exact(batch).enumerate() {
            self.pixels.clear();
            self.labels.clear();
            for &i in chunk {
                self.pixels.extend_from_slice(self.train.image(i as usize));
                self.labels.push(self.train.labels[i as usize] as u32);
            }
            if let Some(&l) = self.labels.iter().find(|&&l| l as usize >= CLASSES) {
                bail!("label {l} is out of range 0..{CLASSES}");
            }
            acts.set_input(&self.pixels);
            forward(&self.state.params, acts);
            let r = backward(&self.state.params, acts, &self.labels, grads);
            // adam_step increments the count first: after it, step == first_step + s.
            self.state.step = first_step + s as u64 - 1;
            adam_step(&mut self.state, &grads.params, adam);
            stats.push(StepStats { loss: r.loss, correct: r.correct });
        }
        Ok(stats)
    }

    fn logits(&mut self, data: &Dataset) -> anyhow::Result<Vec<f32>> {
        check_images(data)?;
        let mut logits = Vec::with_capacity(data.len() * CLASSES);
        let mut acts: Option<Activations> = None;
        for chunk in data.images.chunks(EVAL_BATCH * IMAGE_PIXELS) {
            let b = chunk.len() / IMAGE_PIXELS;
            if acts.as_ref().is_none_or(|a| a.batch != b) {
                acts = Some(Activations::new(b));
            }
            let acts = acts.as_mut().unwrap();
            acts.set_input(chunk);
            forward(&self.state.params, acts);
            logits.extend_from_slice(&acts.logits);
        }
        Ok(logits)
    }
}
