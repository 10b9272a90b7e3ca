//! The parameters as values ([`Params`], in the layer table's `state_dict` order), their seeded
//! initialisation, the epoch order, and the state a run carries from step to step.
//!
//! The network itself (the layer table [`LENET5`] and what derives from it) is described once,
//! in [`crate::network`]; its names are re-exported here.

use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

pub use crate::network::{
    layer_params, layer_shapes, param_count, param_specs, Layer, LayerKind, LayerShape, ParamSpec, CLASSES,
    IMAGE_PIXELS, IMAGE_SIDE, LENET5,
};
pub use crate::ops::{ConvShape, LinearShape};
use crate::optim::Optimizer;
use crate::schedule::LrSchedule;

/// One value per parameter of the network: the weights themselves, their gradients, or an
/// optimizer's moment. Tensors are in [`param_specs`] order, laid out as PyTorch lays them out.
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    pub tensors: Vec<Vec<f32>>,
}

impl Params {
    pub fn zeros() -> Self {
        Params { tensors: param_specs().iter().map(|s| vec![0.0; s.len()]).collect() }
    }

    /// PyTorch's default initialisation from a seeded ChaCha8 stream (stream 0 of `seed`).
    pub fn init(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut params = Params::zeros();
        for (tensor, spec) in params.tensors.iter_mut().zip(param_specs()) {
            let bound = 1.0 / (spec.fan_in as f32).sqrt();
            for x in tensor.iter_mut() {
                *x = -bound + 2.0 * bound * unit_f32(&mut rng);
            }
        }
        params
    }

    /// The tensor named `name` (a `state_dict` name).
    pub fn get(&self, name: &str) -> Option<&[f32]> {
        param_specs().iter().position(|s| s.name == name).map(|i| self.tensors[i].as_slice())
    }

    /// The tensors concatenated in `state_dict` order.
    pub fn flatten(&self) -> Vec<f32> {
        self.tensors.concat()
    }

    /// The inverse of [`Params::flatten`].
    pub fn from_flat(flat: &[f32]) -> Result<Self, crate::Error> {
        if flat.len() != param_count() {
            return Err(crate::Error::ParamCount { got: flat.len(), expected: param_count() });
        }
        let mut params = Params::zeros();
        let mut offset = 0;
        for t in params.tensors.iter_mut() {
            let n = t.len();
            t.copy_from_slice(&flat[offset..offset + n]);
            offset += n;
        }
        Ok(params)
    }

    pub fn all_finite(&self) -> bool {
        self.tensors.iter().flatten().all(|x| x.is_finite())
    }

    /// Whether every tensor has its spec's size.
    pub fn has_lenet_shapes(&self) -> bool {
        self.tensors.len() == param_specs().len()
            && self.tensors.iter().zip(param_specs()).all(|(t, s)| t.len() == s.len())
    }
}

/// A uniform draw in [0, 1) with 24 random bits, exactly representable in f32.
fn unit_f32(rng: &mut ChaCha8Rng) -> f32 {
    (rng.next_u32() >> 8) as f32 * (1.0 / (1u32 << 24) as f32)
}

/// A uniform integer in 0..n without modulo bias (rejection sampling).
fn below(rng: &mut ChaCha8Rng, n: u32) -> u32 {
    let zone = u32::MAX - (u32::MAX - n + 1) % n;
    loop {
        let x = rng.next_u32();
        if x <= zone {
            return x % n;
        }
    }
}

/// The order in which epoch `epoch` visits the `n` training samples. With shuffling, a
/// Fisher-Yates permutation from the ChaCha8 stream `epoch + 1` of `seed` (stream 0 is the
/// initialisation), so it depends only on (seed, epoch): a resumed run sees the same batches.
pub fn epoch_order(n: usize, seed: u64, epoch: u64, shuffle: bool) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    if shuffle {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(epoch + 1);
        for i in (1..n).rev() {
            let j = below(&mut rng, i as u32 + 1) as usize;
            order.swap(i, j);
        }
    }
    order
}

/// Everything a run needs to continue exactly where it stopped.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainState {
    pub params: Params,
    /// The optimizer's settings.
    pub optimizer: Optimizer,
    /// The optimizer's state, one buffer per name of [`Optimizer::state_names`].
    pub moments: Vec<Params>,
    /// Optimiser steps taken so far (Adam's t).
    pub step: u64,
    /// Epochs completed.
    pub epoch: u64,
    /// Steps already taken inside the current epoch.
    pub step_in_epoch: u64,
    pub seed: u64,
    pub batch: usize,
    pub shuffle: bool,
    /// The learning-rate schedule (its peak is `optimizer.lr`).
    pub schedule: LrSchedule,
    /// The steps the schedule spans: the whole run as its first invocation planned it. Set by
    /// the training loop when a run starts; meaningless (and not stored) for `constant`.
    pub schedule_steps: u64,
    /// `--augment-shift`: each training image moved by up to this many pixels (0: none).
    pub augment_shift: u32,
    /// `--val`: images held out at the end of the training file for validation (0: none).
    pub validation: usize,
    /// The validation evaluations so far, as early stopping and `--save-best` read them.
    pub record: ValidationRecord,
    /// The run's time so far, when it is measured (see [`RunClock`]).
    pub clock: Option<RunClock>,
    /// The file `--save-best` last wrote the best validation checkpoint to (absolute), whichever
    /// invocation of the run wrote it.
    pub best_file: Option<String>,
    /// The current epoch's training figures over its first `step_in_epoch` steps, so that a
    /// resumed run's epoch line covers the whole epoch. `None` at an epoch's start, and where a
    /// checkpoint from before they were kept does not have them.
    pub epoch_sums: Option<EpochSums>,
}

/// Sums over an epoch's steps so far: what its mean loss and accuracy are computed from, in the
/// same order whether or not the run stopped and resumed in between.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EpochSums {
    /// The steps' losses (f32 each) added as f64, in step order.
    pub loss_sum: f64,
    /// Images classified correctly.
    pub correct: u64,
}

/// How long a run has taken up to a checkpoint: what `--until` adds a resumed run's own time to,
/// so that its time to accuracy is the whole run's. Kept only by runs that measure it (`--until`,
/// or resumed from a checkpoint that has it), so that every other run's checkpoints stay the same
/// bits from one identical run to the next.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RunClock {
    /// Seconds spent taking training steps, evaluations and saves excluded.
    pub train_seconds: f64,
    /// Wall-clock seconds since the run started, evaluations included.
    pub run_seconds: f64,
}

/// What the validation evaluations of a run have seen so far. Kept in checkpoints, so that a
/// resumed run stops early, and keeps its best checkpoint, exactly as the whole run would have.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ValidationRecord {
    /// The lowest validation loss so far.
    pub best_loss: Option<f64>,
    /// Evaluations since the one that reached `best_loss` (what `--patience` counts).
    pub evals_since_best_loss: u64,
    /// The highest validation accuracy so far and the step that reached it first (what
    /// `--save-best` holds by default).
    pub best_accuracy: Option<(f64, u64)>,
    /// The step that reached `best_loss` (`None` in checkpoints from before it was kept).
    pub best_loss_step: Option<u64>,
    /// Evaluations since the one that reached `best_accuracy`.
    pub evals_since_best_accuracy: u64,
}

/// The validation figure that `--patience` and `--save-best` watch (`--monitor`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Monitor {
    /// Lower is better.
    ValLoss,
    /// Higher is better.
    ValAccuracy,
}

impl Monitor {
    /// As the command line and Keras name it.
    pub fn name(self) -> &'static str {
        match self {
            Monitor::ValLoss => "val_loss",
            Monitor::ValAccuracy => "val_accuracy",
        }
    }
}

/// Which of an evaluation's figures beat the record (by more than the minimum change asked for).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Improved {
    pub loss: bool,
    pub accuracy: bool,
}

impl Improved {
    pub fn on(self, monitor: Monitor) -> bool {
        match monitor {
            Monitor::ValLoss => self.loss,
            Monitor::ValAccuracy => self.accuracy,
        }
    }
}

impl ValidationRecord {
    /// Takes in an evaluation at `step`. A figure improves when it beats the best so far by more
    /// than `min_delta` (Keras's rule: a loss below best - min_delta, an accuracy above best +
    /// min_delta); only then does it become the best, and its count of evaluations since
    /// restarts.
    pub fn update(&mut self, step: u64, loss: f64, accuracy: f64, min_delta: f64) -> Improved {
        let improved = Improved {
            loss: self.best_loss.is_none_or(|best| loss < best - min_delta),
            accuracy: self.best_accuracy.is_none_or(|(best, _)| accuracy > best + min_delta),
        };
        if improved.loss {
            (self.best_loss, self.best_loss_step, self.evals_since_best_loss) = (Some(loss), Some(step), 0);
        } else {
            self.evals_since_best_loss += 1;
        }
        if improved.accuracy {
            (self.best_accuracy, self.evals_since_best_accuracy) = (Some((accuracy, step)), 0);
        } else {
            self.evals_since_best_accuracy += 1;
        }
        improved
    }

    /// The best value of `monitor`'s figure so far, and the step that reached it (when known).
    pub fn best(&self, monitor: Monitor) -> Option<(f64, Option<u64>)> {
        match monitor {
            Monitor::ValLoss => self.best_loss.map(|loss| (loss, self.best_loss_step)),
            Monitor::ValAccuracy => self.best_accuracy.map(|(accuracy, step)| (accuracy, Some(step))),
        }
    }

    /// Evaluations since `monitor`'s figure last improved (what `--patience` counts).
    pub fn evals_since_best(&self, monitor: Monitor) -> u64 {
        match monitor {
            Monitor::ValLoss => self.evals_since_best_loss,
            Monitor::ValAccuracy => self.evals_since_best_accuracy,
        }
    }
}

impl TrainState {
    /// The parameters and the optimizer's state have LeNet-5's tensors, one state per name of
    /// the optimizer's [`Optimizer::state_names`].
    pub fn check_shapes(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.params.has_lenet_shapes(), "state tensors have the wrong sizes");
        anyhow::ensure!(
            self.moments.len() == self.optimizer.state_names().len()
                && self.moments.iter().all(Params::has_lenet_shapes),
            "the optimizer state does not match the optimizer"
        );
        Ok(())
    }

    /// A fresh run from `params`: zero optimizer state, step 0, the contract's recipe otherwise
    /// (constant learning rate, no augmentation, no validation split).
    pub fn new(params: Params, optimizer: Optimizer, seed: u64, batch: usize, shuffle: bool) -> Self {
        let moments = optimizer.state_names().iter().map(|_| Params::zeros()).collect();
        TrainState {
            params,
            optimizer,
            moments,
            step: 0,
            epoch: 0,
            step_in_epoch: 0,
            seed,
            batch,
            shuffle,
            schedule: LrSchedule::Constant,
            schedule_steps: 0,
            augment_shift: 0,
            validation: 0,
            record: ValidationRecord::default(),
            clock: None,
            best_file: None,
            epoch_sums: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_is_reproducible_and_within_bounds() {
        let a = Params::init(7);
        assert_eq!(a, Params::init(7));
        assert_ne!(a, Params::init(8));
        for (t, spec) in a.tensors.iter().zip(param_specs()) {
            let bound = 1.0 / (spec.fan_in as f32).sqrt();
            assert!(t.iter().all(|x| x.abs() <= bound));
            // Not degenerate: values spread over most of the range.
            let max = t.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(max > 0.5 * bound, "{}", spec.name);
        }
    }

    #[test]
    fn epoch_order_is_a_permutation_that_depends_on_seed_and_epoch() {
        let a = epoch_order(1000, 1, 0, true);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<u32>>());
        assert_eq!(a, epoch_order(1000, 1, 0, true));
        assert_ne!(a, epoch_order(1000, 1, 1, true));
        assert_ne!(a, epoch_order(1000, 2, 0, true));
        assert_eq!(epoch_order(5, 1, 3, false), vec![0, 1, 2, 3, 4]);
    }
}
