//! The front door: pick a device, build a [`Trainer`], train it with a progress callback and a
//! stop flag you own, evaluate, save and load checkpoints, classify 28x28 images. Everything
//! here returns [`Error`](crate::Error) and prints nothing.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use crate::backend::{no_training_data, Backend};
use crate::checkpoint::{load_checkpoint, save_checkpoint};
use crate::choice::{open_backend, BackendChoice};
use crate::data::{Dataset, Mnist};
use crate::error::{Error, Result};
use crate::model::{Params, TrainState};
use crate::network::{CLASSES, IMAGE_SIDE};
use crate::optim::Optimizer;
use crate::schedule::LrSchedule;
use crate::train::{evaluate_logits, split_validation, Evaluation, TrainConfig, TrainEvent, TrainReport};

/// The pixels of one image: 28x28, row-major, 0 (background) to 255 (ink), as MNIST's files
/// hold them (light digits on black).
pub const IMAGE_PIXELS: usize = IMAGE_SIDE * IMAGE_SIDE;

/// Where the arithmetic runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// The best GPU adapter; the CPU when there is none, when the best is a software rasterizer
    /// (slower than the CPU path), or when the GPU fails to start.
    #[default]
    Auto,
    /// The CPU path: pure Rust, threads and SIMD.
    Cpu,
    /// A GPU adapter, even a software one: the best, or the first whose name contains
    /// `adapter` (case-insensitive). An error when there is none.
    Gpu {
        /// Part of the adapter's name.
        adapter: Option<String>,
    },
}

/// How a [`Trainer`] starts: the model's initialisation, the batches and the optimizer.
#[derive(Clone, Debug)]
pub struct TrainerConfig {
    /// Seed of the initialisation, the shuffling and the shifts.
    pub seed: u64,
    /// Images per step.
    pub batch: usize,
    /// The optimizer and its learning rate (the peak of `schedule`).
    pub optimizer: Optimizer,
    /// How the learning rate moves over the run.
    pub schedule: LrSchedule,
    /// Visit the training images in a new order each epoch (else in file order).
    pub shuffle: bool,
    /// Move each training image by a random whole-pixel offset in [-P, P] on each axis.
    pub augment_shift: u32,
    /// Hold out the training set's last this many images to validate on (0: none).
    pub validation: usize,
}

impl Default for TrainerConfig {
    /// The command line's defaults: seed 0, batches of 256, Adam at 1e-3, constant, shuffled.
    fn default() -> Self {
        TrainerConfig {
            seed: 0,
            batch: 256,
            optimizer: Optimizer::default(),
            schedule: LrSchedule::Constant,
            shuffle: true,
            augment_shift: 0,
            validation: 0,
        }
    }
}

/// A LeNet-5, its training state and the device it trains on, with the data it trains on.
pub struct Trainer {
    backend: Box<dyn Backend>,
    state: TrainState,
    mnist: Mnist,
    validation: Option<Dataset>,
    choice: Option<String>,
}

impl Trainer {
    /// A new model (initialised from `config.seed`) on `device`, to train on `mnist.train`.
    pub fn new(device: &Device, config: &TrainerConfig, mnist: Mnist) -> Result<Trainer> {
        let params = Params::init(config.seed);
        let mut state = TrainState::new(params, config.optimizer, config.seed, config.batch, config.shuffle);
        state.schedule = config.schedule;
        state.augment_shift = config.augment_shift;
        state.validation = config.validation;
        Trainer::with_state(device, state, mnist)
    }

    /// The run saved in a checkpoint, to continue on `device` with `mnist` (the same training
    /// set, for the run to be the one it was).
    pub fn resume(device: &Device, checkpoint: &Path, mnist: Mnist) -> Result<Trainer> {
        let state = load_checkpoint(checkpoint)?
            .into_train_state()
            .ok_or_else(|| Error::WeightsOnly { path: checkpoint.to_path_buf() })?;
        Trainer::with_state(device, state, mnist)
    }

    fn with_state(device: &Device, state: TrainState, mut mnist: Mnist) -> Result<Trainer> {
        if state.batch == 0 {
            return Err(Error::BatchZero);
        }
        state.optimizer.validate()?;
        let max = crate::augment::MAX_AUGMENT_SHIFT;
        if state.augment_shift > max {
            return Err(Error::AugmentShift { shift: state.augment_shift, max });
        }
        let validation = match state.validation {
            0 => None,
            n if n >= mnist.train.len() => {
                return Err(Error::ValidationTooLarge { held: n, images: mnist.train.len() })
            }
            n => Some(split_validation(&mut mnist.train, n)?),
        };
        if mnist.train.is_empty() {
            return Err(Error::EmptySet { what: "training" });
        }
        if state.batch > mnist.train.len() {
            return Err(Error::BatchTooLarge { batch: state.batch, images: mnist.train.len() });
        }
        let (choice, adapter) = backend_choice(device);
        let bounds = crate::choice::LoopBounds::default();
        let (mut backend, line) = open_backend(choice, adapter, bounds, &mnist.train)?;
        // The weights are on the device from the start: evaluating before training scores them.
        backend.load_state(&state)?;
        Ok(Trainer { backend, state, mnist, validation, choice: line })
    }

    /// What it runs on: "cpu: 2 threads of 2 available, AVX2", "gpu: NAME (Vulkan)".
    pub fn device(&self) -> String {
        format!("{}: {}", self.backend.kind(), self.backend.adapter())
    }

    /// For [`Device::Auto`]: what it chose and why (`backend: cpu, because ...`).
    pub fn device_choice(&self) -> Option<&str> {
        self.choice.as_deref()
    }

    /// The training state: step, epoch, seed, optimizer (its weights as of the last save or
    /// [`Trainer::params`]).
    pub fn state(&self) -> &TrainState {
        &self.state
    }

    /// Trains as `config` says (epochs or steps, evaluations, files), reporting each
    /// [`TrainEvent`] to `on_event`, and stopping between chunks of steps once `stop` is set.
    /// Evaluates on the validation set when there is one (and on the test set at the end), else
    /// on the test set.
    pub fn train(
        &mut self,
        config: &TrainConfig,
        stop: &AtomicBool,
        mut on_event: impl FnMut(&TrainEvent),
    ) -> Result<TrainReport> {
        let report = crate::train::train_with_events(
            self.backend.as_mut(),
            &mut self.state,
            &self.mnist,
            self.validation.as_ref(),
            config,
            stop,
            &mut on_event,
        )
        // The loop's own refusals are typed: they come back as themselves, not as `Error::Run`.
        .map_err(|e| e.downcast::<Error>().unwrap_or_else(Error::Run))?;
        Ok(report)
    }

    /// Accuracy, loss and confusion matrix of the current weights on `data`.
    pub fn evaluate(&mut self, data: &Dataset) -> Result<Evaluation> {
        evaluate_on(self.backend.as_mut(), data)
    }

    /// [`Trainer::evaluate`] on the test set.
    pub fn evaluate_test(&mut self) -> Result<Evaluation> {
        evaluate_on(self.backend.as_mut(), &self.mnist.test)
    }

    /// The current weights.
    pub fn params(&mut self) -> Result<Params> {
        self.backend.store_state(&mut self.state)?;
        Ok(self.state.params.clone())
    }

    /// Saves the run (weights, optimizer state, position) to `path`, atomically: a checkpoint
    /// PyTorch's `safetensors.torch.load_file` reads, and [`Trainer::resume`] continues.
    pub fn save(&mut self, path: &Path) -> Result<()> {
        self.backend.store_state(&mut self.state)?;
        save_checkpoint(path, &self.state)?;
        Ok(())
    }
}

fn evaluate_on(backend: &mut dyn Backend, data: &Dataset) -> Result<Evaluation> {
    if data.is_empty() {
        return Err(Error::EmptySet { what: "evaluation" });
    }
    let logits = backend.logits(data)?;
    evaluate_logits(&logits, &data.labels)
}

fn backend_choice(device: &Device) -> (BackendChoice, Option<&str>) {
    match device {
        Device::Auto => (BackendChoice::Auto, None),
        Device::Cpu => (BackendChoice::Cpu, None),
        Device::Gpu { adapter } => (BackendChoice::Gpu, adapter.as_deref()),
    }
}

/// The weights of a checkpoint (of any optimizer, or a file with the ten model tensors).
pub fn load_weights(path: &Path) -> Result<Params> {
    Ok(load_checkpoint(path)?.params)
}

/// What the network makes of one image.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    /// The most probable digit (the first of equals).
    pub digit: usize,
    /// The softmax of the logits: each digit's probability.
    pub probabilities: [f32; CLASSES],
}

/// Classifies 28x28 images ([`IMAGE_PIXELS`] bytes each, as MNIST's) on the CPU. An image of
/// another size is an error naming it.
pub fn predict(params: &Params, images: &[&[u8]]) -> Result<Vec<Prediction>> {
    if let Some(bad) = images.iter().find(|i| i.len() != IMAGE_PIXELS) {
        return Err(Error::ImageSize { got: bad.len() });
    }
    if !params.has_lenet_shapes() {
        let got = params.tensors.iter().map(Vec::len).sum();
        return Err(Error::ParamCount { got, expected: crate::network::param_count() });
    }
    if images.is_empty() {
        return Ok(Vec::new());
    }
    let data = Dataset {
        images: images.concat(),
        labels: vec![0; images.len()],
        rows: IMAGE_SIDE,
        cols: IMAGE_SIDE,
    };
    let mut backend = crate::cpu::CpuBackend::new(&no_training_data())?;
    backend.load_state(&TrainState::new(params.clone(), Optimizer::default(), 0, 1, false))?;
    let logits = backend.logits(&data)?;
    let probabilities = crate::train::eval::softmax_rows(&logits);
    Ok(probabilities
        .chunks_exact(CLASSES)
        .map(|row| {
            let probabilities: [f32; CLASSES] = std::array::from_fn(|d| row[d] as f32);
            Prediction { digit: crate::train::argmax(&probabilities), probabilities }
        })
        .collect())
}
