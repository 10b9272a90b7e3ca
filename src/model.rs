//! LeNet-5 described once: the layer table, and everything derived from it (each layer's shapes
//! at a batch size, the parameter tensors with PyTorch's `state_dict` names and layouts), the
//! seeded initialisation, and the state a run carries from step to step.
//!
//! To change the network, change [`LENET5`]: the parameter list, the checkpoint's tensor names,
//! the activation and gradient buffers of both paths ([`crate::network`]) and the bench rows
//! follow from it.

use std::sync::LazyLock;

use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

pub use crate::ops::{ConvShape, LinearShape};
use crate::optim::Optimizer;
use crate::schedule::LrSchedule;

/// Side of an MNIST image (one channel).
pub const IMAGE_SIDE: usize = 28;
pub const IMAGE_PIXELS: usize = IMAGE_SIDE * IMAGE_SIDE;
pub const CLASSES: usize = 10;

/// What a layer computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    /// Convolution (square kernel, stride 1, zero padding) + bias + ReLU, then 2x2 max-pooling
    /// that remembers its argmax. Its input is the previous layer's pooled output (or the image).
    ConvReluPool { in_channels: usize, out_channels: usize, kernel: usize, padding: usize },
    /// Fully connected, + bias, then ReLU if `relu`. Its input is the previous layer's output,
    /// flattened in PyTorch's order (c*H*W + h*W + w).
    Linear { in_features: usize, out_features: usize, relu: bool },
}

/// One layer: its `state_dict` prefix and what it computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layer {
    pub name: &'static str,
    pub kind: LayerKind,
}

/// LeNet-5 as the design fixes it (the last layer's outputs are the logits of the softmax
/// cross-entropy loss).
pub const LENET5: [Layer; 5] = [
    Layer {
        name: "conv1",
        kind: LayerKind::ConvReluPool { in_channels: 1, out_channels: 6, kernel: 5, padding: 2 },
    },
    Layer {
        name: "conv2",
        kind: LayerKind::ConvReluPool { in_channels: 6, out_channels: 16, kernel: 5, padding: 0 },
    },
    Layer { name: "fc1", kind: LayerKind::Linear { in_features: 400, out_features: 120, relu: true } },
    Layer { name: "fc2", kind: LayerKind::Linear { in_features: 120, out_features: 84, relu: true } },
    Layer { name: "fc3", kind: LayerKind::Linear { in_features: 84, out_features: 10, relu: false } },
];

/// A layer's shape at one batch size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerShape {
    Conv(ConvShape),
    Linear(LinearShape),
}

impl LayerShape {
    /// Elements of the layer's output (the pooled output for a conv layer) over the batch.
    pub fn output_len(&self) -> usize {
        match self {
            LayerShape::Conv(s) => s.pooled_len(),
            LayerShape::Linear(s) => s.batch * s.out_features,
        }
    }

    /// Multiply-accumulates of the forward pass.
    pub fn macs(&self) -> usize {
        match self {
            LayerShape::Conv(s) => s.macs(),
            LayerShape::Linear(s) => s.macs(),
        }
    }
}

/// The shapes of every layer of [`LENET5`] at `batch`, checking that each layer's input is
/// what the layer before it produces.
pub fn layer_shapes(batch: usize) -> Vec<LayerShape> {
    let (mut channels, mut side) = (1usize, IMAGE_SIDE);
    let mut shapes = Vec::with_capacity(LENET5.len());
    for layer in &LENET5 {
        let shape = match layer.kind {
            LayerKind::ConvReluPool { in_channels, out_channels, kernel, padding } => {
                assert_eq!(in_channels, channels, "{}: input channels", layer.name);
                let s = ConvShape {
                    batch,
                    in_channels,
                    out_channels,
                    height: side,
                    width: side,
                    kernel,
                    padding,
                };
                assert!(s.out_height().is_multiple_of(2), "{}: pooled side must be even", layer.name);
                (channels, side) = (out_channels, s.out_height() / 2);
                LayerShape::Conv(s)
            }
            LayerKind::Linear { in_features, out_features, .. } => {
                assert_eq!(in_features, channels * side * side, "{}: input features", layer.name);
                (channels, side) = (out_features, 1);
                LayerShape::Linear(LinearShape { batch, in_features, out_features })
            }
        };
        shapes.push(shape);
    }
    assert_eq!(channels * side * side, CLASSES, "the last layer must give one logit per class");
    shapes
}

/// One parameter tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    /// The `state_dict` name: `<layer>.weight` or `<layer>.bias`.
    pub name: String,
    pub shape: Vec<usize>,
    /// Inputs feeding one output unit: PyTorch's default init draws from U(±1/sqrt(fan_in)).
    pub fan_in: usize,
    /// Which layer of [`LENET5`] it belongs to.
    pub layer: usize,
}

impl ParamSpec {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The parameter tensors of [`LENET5`] in `state_dict` order: each layer's weight, then its bias.
pub fn param_specs() -> &'static [ParamSpec] {
    static SPECS: LazyLock<Vec<ParamSpec>> = LazyLock::new(|| {
        let mut specs = Vec::new();
        for (i, layer) in LENET5.iter().enumerate() {
            let (weight, out, fan_in) = match layer.kind {
                LayerKind::ConvReluPool { in_channels, out_channels, kernel, .. } => (
                    vec![out_channels, in_channels, kernel, kernel],
                    out_channels,
                    in_channels * kernel * kernel,
                ),
                LayerKind::Linear { in_features, out_features, .. } => {
                    (vec![out_features, in_features], out_features, in_features)
                }
            };
            specs.push(ParamSpec { name: format!("{}.weight", layer.name), shape: weight, fan_in, layer: i });
            specs.push(ParamSpec {
                name: format!("{}.bias", layer.name),
                shape: vec![out],
                fan_in,
                layer: i,
            });
        }
        specs
    });
    &SPECS
}

/// The weight's and the bias's indices in [`param_specs`] for layer `layer`.
pub fn layer_params(layer: usize) -> (usize, usize) {
    (2 * layer, 2 * layer + 1)
}

/// Total number of trainable scalars (61,706).
pub fn param_count() -> usize {
    param_specs().iter().map(ParamSpec::len).sum()
}

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
    pub fn from_flat(flat: &[f32]) -> Self {
        assert_eq!(flat.len(), param_count(), "flat parameter vector has the wrong length");
        let mut params = Params::zeros();
        let mut offset = 0;
        for t in params.tensors.iter_mut() {
            let n = t.len();
            t.copy_from_slice(&flat[offset..offset + n]);
            offset += n;
        }
        params
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
    /// `--save-best` holds).
    pub best_accuracy: Option<(f64, u64)>,
}

impl ValidationRecord {
    /// Takes in an evaluation at `step`; says whether its accuracy is a new best.
    pub fn update(&mut self, step: u64, loss: f64, accuracy: f64) -> bool {
        if self.best_loss.is_none_or(|best| loss < best) {
            self.best_loss = Some(loss);
            self.evals_since_best_loss = 0;
        } else {
            self.evals_since_best_loss += 1;
        }
        let better = self.best_accuracy.is_none_or(|(best, _)| accuracy > best);
        if better {
            self.best_accuracy = Some((accuracy, step));
        }
        better
    }
}

impl TrainState {
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_gives_lenet5s_pytorch_parameters() {
        let got: Vec<(&str, &[usize])> =
            param_specs().iter().map(|s| (s.name.as_str(), s.shape.as_slice())).collect();
        let want: [(&str, &[usize]); 10] = [
            ("conv1.weight", &[6, 1, 5, 5]),
            ("conv1.bias", &[6]),
            ("conv2.weight", &[16, 6, 5, 5]),
            ("conv2.bias", &[16]),
            ("fc1.weight", &[120, 400]),
            ("fc1.bias", &[120]),
            ("fc2.weight", &[84, 120]),
            ("fc2.bias", &[84]),
            ("fc3.weight", &[10, 84]),
            ("fc3.bias", &[10]),
        ];
        assert_eq!(got, want);
        assert_eq!(param_count(), 61_706);
        let fan_ins: Vec<usize> = param_specs().iter().map(|s| s.fan_in).collect();
        assert_eq!(fan_ins, [25, 25, 150, 150, 400, 400, 120, 120, 84, 84]);
    }

    #[test]
    fn layer_shapes_chain() {
        let s = layer_shapes(3);
        let LayerShape::Conv(c1) = s[0] else { panic!() };
        let LayerShape::Conv(c2) = s[1] else { panic!() };
        assert_eq!((c1.out_height(), c1.pooled_len()), (28, 3 * 6 * 14 * 14));
        assert_eq!((c2.height, c2.out_height(), c2.pooled_len()), (14, 10, 3 * 400));
        assert_eq!(s[4], LayerShape::Linear(LinearShape { batch: 3, in_features: 84, out_features: 10 }));
    }

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
