//! Whether a prepared image looks like one digit. The network answers for any image (a letter
//! "A" is a confident 4); these checks tell the user when the answer means little:
//!
//! - **Several blobs.** The prepared ink falls into separate connected components of significant
//!   size (two digits side by side, "42").
//! - **Shape.** The ink's box is much wider than tall (MNIST's digits are about as wide as tall
//!   or narrower).
//! - **Out of distribution.** A low energy score, `logsumexp` of the logits (Liu et al. 2020,
//!   "Energy-based out-of-distribution detection"): a network's logits are large for the inputs
//!   it was trained on and smaller elsewhere, even where the softmax is confident.
//!
//! The thresholds were chosen on renders of letters (A-Z, pen strokes of random size, width and
//! slant), pairs of MNIST test digits side by side, and MNIST test digits (as they are, and
//! redrawn with a pen on white paper): see `examples/one_digit_features.rs`,
//! and the rates in BENCHMARKS.md. The energy threshold depends on the network: it was set for
//! the README's recipe models, and a less trained network (smaller logits) is flagged more often.

use super::prepare::InkReport;
use crate::model::{Params, CLASSES, IMAGE_PIXELS, IMAGE_SIDE};

/// A second blob with at least this share of the ink makes "several digits": 3 of 400 MNIST
/// digits, prepared, had one over 5% (a broken stroke), 111 of 120 pairs one over 30%.
pub const MIN_SECOND_BLOB_SHARE: f64 = 0.2;
/// An ink box wider than tall by more than this is not one digit: MNIST's digits, prepared, were
/// at most 1.37 (as they are) and above 1.5 in 1 of 200 redrawn; pairs start at about 1.3 and
/// 96% are above 1.5.
pub const MAX_ASPECT: f64 = 1.5;
/// An energy score (mean over the models) below this is out of distribution: about the 5th
/// percentile of MNIST's own test digits under the README's 10-epoch recipe (7% of them as they
/// are, 0.5% redrawn), where it catches 27% of letters and 77% of pairs.
pub const MIN_ENERGY: f64 = 6.5;

/// What the checks found for one image.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct OneDigitCheck {
    /// Separate blobs of ink with at least [`MIN_SECOND_BLOB_SHARE`] of it.
    pub blobs: usize,
    /// The ink box's width over its height.
    pub aspect: f64,
    /// The energy score, `ln sum exp(logits)` (the mean over an ensemble's models).
    pub energy: f64,
    /// Why it does not look like one digit; empty when it does.
    pub reasons: Vec<String>,
}

impl OneDigitCheck {
    /// Checks one prepared image: its pixels, what preparing it found, and the energy score.
    pub fn new(pixels: &[u8; IMAGE_PIXELS], report: &InkReport, energy: f64) -> OneDigitCheck {
        let sizes = ink_blobs(pixels);
        let ink: usize = sizes.iter().sum();
        let blobs = sizes.iter().filter(|&&s| s as f64 >= MIN_SECOND_BLOB_SHARE * ink as f64).count().max(1);
        let [x0, y0, x1, y1] = report.ink_box;
        let aspect = if y1 > y0 { (x1 - x0) / (y1 - y0) } else { f64::INFINITY };
        let mut reasons = Vec::new();
        if blobs > 1 {
            reasons.push(format!("{blobs} separate blobs of ink"));
        }
        if aspect > MAX_ASPECT {
            reasons.push(format!("the ink {aspect:.1} times wider than tall"));
        }
        if energy < MIN_ENERGY {
            reasons
                .push(format!("a low energy score ({energy:.1} < {MIN_ENERGY}: unlike the training digits)"));
        }
        OneDigitCheck { blobs, aspect, energy, reasons }
    }

    pub fn looks_like_one_digit(&self) -> bool {
        self.reasons.is_empty()
    }
}

/// A prepared pixel counts as ink from this level (of 255): a quarter of full ink.
pub const BLOB_INK: u8 = 64;

/// The sizes (pixels) of the 8-connected components of ink in a prepared 28x28 image, largest
/// first.
pub fn ink_blobs(pixels: &[u8; IMAGE_PIXELS]) -> Vec<usize> {
    let side = IMAGE_SIDE;
    let mut seen = [false; IMAGE_PIXELS];
    let mut sizes = Vec::new();
    let mut stack = Vec::new();
    for start in 0..IMAGE_PIXELS {
        if seen[start] || pixels[start] < BLOB_INK {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let mut size = 0;
        while let Some(i) = stack.pop() {
            size += 1;
            let (x, y) = (i % side, i / side);
            for ny in y.saturating_sub(1)..(y + 2).min(side) {
                for nx in x.saturating_sub(1)..(x + 2).min(side) {
                    let j = ny * side + nx;
                    if !seen[j] && pixels[j] >= BLOB_INK {
                        seen[j] = true;
                        stack.push(j);
                    }
                }
            }
        }
        sizes.push(size);
    }
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    sizes
}

/// The network's logits for one prepared image (the CPU path: one image needs no GPU).
pub fn logits(params: &Params, pixels: &[u8]) -> anyhow::Result<Vec<f32>> {
    use crate::backend::Backend;
    let data =
        crate::data::Dataset { images: pixels.to_vec(), labels: vec![0], rows: IMAGE_SIDE, cols: IMAGE_SIDE };
    let mut backend = crate::cpu::CpuBackend::new(&crate::backend::no_training_data())?;
    let state =
        crate::model::TrainState::new(params.clone(), crate::optim::Optimizer::default(), 0, 1, false);
    backend.load_state(&state)?;
    let logits = backend.logits(&data)?;
    debug_assert_eq!(logits.len(), CLASSES);
    Ok(logits)
}

/// The energy score of one image's logits: `ln sum exp(z)`, computed from the largest logit.
pub fn energy(logits: &[f32]) -> f64 {
    let max = logits.iter().fold(f64::NEG_INFINITY, |m, &z| m.max(z as f64));
    max + logits.iter().map(|&z| (z as f64 - max).exp()).sum::<f64>().ln()
}
