//! LeNet-5 on MNIST, trained by WGSL compute shaders through wgpu, with a pure-Rust CPU path
//! that computes the same functions (the reference for tests, and the fallback without a GPU).
//!
//! The library prints nothing, reads no environment variable and installs no signal handler:
//! a run reports through the callback you give it and stops when the flag you own is set; every
//! failure is an [`Error`] that names the values involved. The `lenet` command line (the default
//! feature `cli`) is one user of it; a library user writes
//! `lenet-wgpu = { version = "0.1", default-features = false }` and compiles none of the
//! command line's dependencies.
//!
//! ```no_run
//! use std::sync::atomic::AtomicBool;
//! use lenet::{load_mnist, predict, Device, TrainConfig, TrainEvent, Trainer, TrainerConfig};
//!
//! # fn main() -> Result<(), lenet::Error> {
//! // The four MNIST files (raw or .gz), e.g. fetched by `lenet data fetch`.
//! let mnist = load_mnist("data/mnist".as_ref())?;
//! let mut trainer = Trainer::new(&Device::Auto, &TrainerConfig::default(), mnist)?;
//! let stop = AtomicBool::new(false); // set it from another thread to stop between steps
//! let run = TrainConfig { epochs: 1, ..TrainConfig::default() };
//! let report = trainer.train(&run, &stop, |event| {
//!     if let TrainEvent::EpochEnded { line } = event {
//!         println!("{line}");
//!     }
//! })?;
//! println!("test accuracy {:?} on {}", report.test_accuracy, trainer.device());
//! trainer.save("lenet.safetensors".as_ref())?;
//!
//! let params = trainer.params()?;
//! let blank = [0u8; lenet::IMAGE_PIXELS];
//! let guess = &predict(&params, &[&blank])?[0];
//! println!("a blank image looks most like a {}", guess.digit);
//! # Ok(())
//! # }
//! ```
//!
//! The repository's `examples/` hold three programs: `train.rs`, `predict.rs` and `gpu_op.rs`
//! (one GPU op on your own tensors, checked against the CPU reference). The modules below the
//! front door (ops, kernels, the op checks) are public for the benches and tests, and hidden
//! from these docs: they may change between versions.

#![warn(missing_docs)]

mod api;
mod error;

pub use api::{load_weights, predict, Device, Prediction, Trainer, TrainerConfig, IMAGE_PIXELS};
pub use checkpoint::CheckpointError;
pub use data::{load_mnist, DataError, Dataset, Mnist};
pub use error::{Error, Result};
pub use model::{Monitor, Params, TrainState};
pub use optim::Optimizer;
pub use schedule::LrSchedule;
pub use train::{Evaluation, MetricRow, StopReason, TrainConfig, TrainEvent, TrainReport};

#[doc(hidden)]
pub mod augment;
#[doc(hidden)]
pub mod backend;
#[doc(hidden)]
pub mod bench;
#[doc(hidden)]
pub mod checkpoint;
#[doc(hidden)]
pub mod choice;
#[doc(hidden)]
pub mod cpu;
#[doc(hidden)]
pub mod data;
#[doc(hidden)]
pub mod files;
#[doc(hidden)]
pub mod gpu;
#[doc(hidden)]
pub mod image_input;
#[doc(hidden)]
pub mod model;
#[doc(hidden)]
pub mod network;
#[doc(hidden)]
pub mod opcase;
#[doc(hidden)]
pub mod opcheck;
#[doc(hidden)]
pub mod ops;
#[doc(hidden)]
pub mod optim;
#[doc(hidden)]
pub mod paths;
#[cfg(feature = "cli")]
#[doc(hidden)]
pub mod plot;
#[doc(hidden)]
pub mod reference;
#[doc(hidden)]
pub mod schedule;
#[cfg(feature = "cli")]
#[doc(hidden)]
pub mod signals;
#[doc(hidden)]
pub mod train;
