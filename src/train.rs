//! The training loop both backends share: batching, metrics, progress, checkpoints.

use crate::data::Dataset;
use crate::model::{AdamConfig, TrainState};

/// Loss and correct count of one optimiser step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    pub loss: f32,
    pub correct: u32,
}

/// Where the arithmetic runs. The training loop is written once against this.
pub trait Backend {
    /// "cpu" or "gpu".
    fn kind(&self) -> &'static str;
    /// The adapter's name (GPU) or a description of the processor (CPU).
    fn adapter(&self) -> String;
    /// Takes parameters and Adam moments from `state` (used at start and on resume).
    fn load_state(&mut self, state: &TrainState) -> anyhow::Result<()>;
    /// Copies parameters and Adam moments back into `state` (for checkpoints and evaluation).
    fn store_state(&mut self, state: &mut TrainState) -> anyhow::Result<()>;
    /// Takes `indices.len() / batch` optimiser steps; step i trains on the training samples
    /// `indices[i*batch..(i+1)*batch]`. `first_step` is Adam's t of the first of them (1-based).
    /// Returns each step's loss and correct count.
    fn train_steps(
        &mut self,
        indices: &[u32],
        batch: usize,
        first_step: u64,
        adam: &AdamConfig,
    ) -> anyhow::Result<Vec<StepStats>>;
    /// Logits [N, 10] of the current parameters on every image of `data`.
    fn logits(&mut self, data: &Dataset) -> anyhow::Result<Vec<f32>>;
}
