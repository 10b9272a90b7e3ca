//! The library's errors: each names the values that were wrong, not the command-line option
//! that gave them (the command line words its own messages, see `src/main.rs`).

use std::path::PathBuf;

/// What the library refuses, and why.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A batch size of 0.
    #[error("the batch size must be at least 1")]
    BatchZero,
    /// A batch larger than the training set.
    #[error("a batch of {batch} images is larger than the training set ({images} images)")]
    BatchTooLarge {
        /// The batch size asked for.
        batch: usize,
        /// The training set's images.
        images: usize,
    },
    /// Logits that are not ten per label.
    #[error("{logits} logits for {labels} labels: a LeNet-5 gives 10 logits per image")]
    LogitsShape {
        /// How many logits were given.
        logits: usize,
        /// How many labels were given.
        labels: usize,
    },
    /// A label outside 0-9.
    #[error("label {label} at index {index} is out of range 0-9")]
    LabelOutOfRange {
        /// Where in the labels it is.
        index: usize,
        /// The label.
        label: u8,
    },
    /// A flat parameter vector of the wrong length.
    #[error("{got} parameters given, a LeNet-5 has {expected}")]
    ParamCount {
        /// How many were given.
        got: usize,
        /// How many LeNet-5 has.
        expected: usize,
    },
    /// An image that is not 28x28 pixels.
    #[error("an image of {got} pixels: the network takes 28x28 = 784")]
    ImageSize {
        /// How many pixels it has.
        got: usize,
    },
    /// No images to train or evaluate on.
    #[error("the {what} set is empty")]
    EmptySet {
        /// "training" or "test".
        what: &'static str,
    },
    /// A validation set of every training image (or more).
    #[error(
        "holding out {held} images for validation leaves none to train on: the training set has {images}"
    )]
    ValidationTooLarge {
        /// The images asked to hold out.
        held: usize,
        /// The training set's images.
        images: usize,
    },
    /// A validation set of another size than the run holds out.
    #[error("the run holds out {held} validation images, but {given} were given to validate on")]
    ValidationMismatch {
        /// The images the run holds out.
        held: usize,
        /// The images given.
        given: usize,
    },
    /// Early stopping (`patience`) or keeping the best checkpoint without a validation set.
    #[error("early stopping and keeping the best checkpoint watch a validation set, and the run has none")]
    NeedsValidation,
    /// A shift larger than a 28x28 image can move.
    #[error("a shift of {shift} pixels is more than a 28x28 image can move (at most {max})")]
    AugmentShift {
        /// The shift asked for.
        shift: u32,
        /// The largest.
        max: u32,
    },
    /// The checkpoint holds weights only, where a training state was needed.
    #[error("{}: holds weights only, no optimiser state to resume", path.display())]
    WeightsOnly {
        /// The checkpoint.
        path: PathBuf,
    },
    /// MNIST files that cannot be read or are not MNIST.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// A checkpoint that cannot be read or written.
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    /// Anything else: a device that failed, a training run that diverged, an output that could
    /// not be written. The message is the whole chain of causes on one line.
    #[error("{}", error_line(.0))]
    Run(#[from] anyhow::Error),
}

/// The library's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<crate::network::WrongParamCount> for Error {
    fn from(e: crate::network::WrongParamCount) -> Self {
        Error::ParamCount { got: e.got, expected: e.expected }
    }
}

/// An error and its causes on one line, each cause once: typed errors already end with their
/// source's message, so a cause the line already ends with is not repeated, and multi-line
/// reports (wgpu's) are folded.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let msg = cause.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
        if msg.is_empty() || line.ends_with(&msg) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&msg);
    }
    line
}
