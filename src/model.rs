//! LeNet-5's shapes, its parameters in PyTorch's `state_dict` names and layouts, and the seeded
//! initialisation and batch order shared by both backends.

use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

/// Pixels of one MNIST image.
pub const IMAGE_SIDE: usize = 28;
pub const IMAGE_PIXELS: usize = IMAGE_SIDE * IMAGE_SIDE;
pub const CLASSES: usize = 10;

// Per-image activation sizes, in the order of the forward pass.
pub const CONV1_CHANNELS: usize = 6;
pub const CONV1_SIDE: usize = 28; // 5x5, padding 2
pub const POOL1_SIDE: usize = 14;
pub const CONV2_CHANNELS: usize = 16;
pub const CONV2_SIDE: usize = 10; // 5x5, no padding
pub const POOL2_SIDE: usize = 5;
pub const KERNEL: usize = 5;
pub const FC1_IN: usize = CONV2_CHANNELS * POOL2_SIDE * POOL2_SIDE; // 400
pub const FC1_OUT: usize = 120;
pub const FC2_OUT: usize = 84;
pub const FC3_OUT: usize = CLASSES;

/// The shape of a 2-D convolution over a batch, NCHW, square kernel, stride 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    pub batch: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    /// Input height and width.
    pub height: usize,
    pub width: usize,
    pub kernel: usize,
    pub padding: usize,
}

impl ConvShape {
    pub fn out_height(&self) -> usize {
        self.height + 2 * self.padding + 1 - self.kernel
    }
    pub fn out_width(&self) -> usize {
        self.width + 2 * self.padding + 1 - self.kernel
    }
    pub fn input_len(&self) -> usize {
        self.batch * self.in_channels * self.height * self.width
    }
    pub fn output_len(&self) -> usize {
        self.batch * self.out_channels * self.out_height() * self.out_width()
    }
    pub fn weight_len(&self) -> usize {
        self.out_channels * self.in_channels * self.kernel * self.kernel
    }
    /// Multiply-accumulates of the forward pass.
    pub fn macs(&self) -> usize {
        self.output_len() * self.in_channels * self.kernel * self.kernel
    }
}

pub fn conv1_shape(batch: usize) -> ConvShape {
    ConvShape {
        batch,
        in_channels: 1,
        out_channels: CONV1_CHANNELS,
        height: IMAGE_SIDE,
        width: IMAGE_SIDE,
        kernel: KERNEL,
        padding: 2,
    }
}

pub fn conv2_shape(batch: usize) -> ConvShape {
    ConvShape {
        batch,
        in_channels: CONV1_CHANNELS,
        out_channels: CONV2_CHANNELS,
        height: POOL1_SIDE,
        width: POOL1_SIDE,
        kernel: KERNEL,
        padding: 0,
    }
}

/// Index of each parameter tensor; the order is the `state_dict` order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamId {
    Conv1Weight,
    Conv1Bias,
    Conv2Weight,
    Conv2Bias,
    Fc1Weight,
    Fc1Bias,
    Fc2Weight,
    Fc2Bias,
    Fc3Weight,
    Fc3Bias,
}

pub struct ParamSpec {
    pub name: &'static str,
    pub shape: &'static [usize],
    /// Inputs feeding one output unit: PyTorch's default init draws from U(±1/sqrt(fan_in)).
    pub fan_in: usize,
}

impl ParamSpec {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The ten tensors of LeNet-5, in `state_dict` order, with PyTorch's names and layouts.
pub const PARAM_SPECS: [ParamSpec; 10] = [
    ParamSpec { name: "conv1.weight", shape: &[6, 1, 5, 5], fan_in: 25 },
    ParamSpec { name: "conv1.bias", shape: &[6], fan_in: 25 },
    ParamSpec { name: "conv2.weight", shape: &[16, 6, 5, 5], fan_in: 150 },
    ParamSpec { name: "conv2.bias", shape: &[16], fan_in: 150 },
    ParamSpec { name: "fc1.weight", shape: &[120, 400], fan_in: 400 },
    ParamSpec { name: "fc1.bias", shape: &[120], fan_in: 400 },
    ParamSpec { name: "fc2.weight", shape: &[84, 120], fan_in: 120 },
    ParamSpec { name: "fc2.bias", shape: &[84], fan_in: 120 },
    ParamSpec { name: "fc3.weight", shape: &[10, 84], fan_in: 84 },
    ParamSpec { name: "fc3.bias", shape: &[10], fan_in: 84 },
];

/// Total number of trainable scalars (61,706).
pub fn param_count() -> usize {
    PARAM_SPECS.iter().map(ParamSpec::len).sum()
}

/// One value per parameter of the network: the weights themselves, their gradients, or an Adam
/// moment. Tensors are indexed by [`ParamId`] and laid out as PyTorch lays them out.
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    pub tensors: [Vec<f32>; 10],
}

impl Params {
    pub fn zeros() -> Self {
        Params { tensors: std::array::from_fn(|i| vec![0.0; PARAM_SPECS[i].len()]) }
    }

    /// PyTorch's default initialisation from a seeded ChaCha8 stream (stream 0 of `seed`).
    pub fn init(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut params = Params::zeros();
        for (tensor, spec) in params.tensors.iter_mut().zip(&PARAM_SPECS) {
            let bound = 1.0 / (spec.fan_in as f32).sqrt();
            for x in tensor.iter_mut() {
                *x = -bound + 2.0 * bound * unit_f32(&mut rng);
            }
        }
        params
    }

    pub fn get(&self, id: ParamId) -> &[f32] {
        &self.tensors[id as usize]
    }

    pub fn get_mut(&mut self, id: ParamId) -> &mut [f32] {
        &mut self.tensors[id as usize]
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

/// Adam's hyper-parameters, as `torch.optim.Adam` names them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }
}

/// The per-step scalars of Adam's bias correction, computed in f64 like PyTorch's Python floats
/// and rounded once to f32.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    /// lr / (1 - beta1^t)
    pub step_size: f32,
    /// sqrt(1 - beta2^t)
    pub bias_correction2_sqrt: f32,
}

impl AdamConfig {
    /// Scalars for step `t` (1-based, as torch counts).
    pub fn step(&self, t: u64) -> AdamStep {
        let t = t as i32;
        let bc1 = 1.0 - (self.beta1 as f64).powi(t);
        let bc2 = 1.0 - (self.beta2 as f64).powi(t);
        AdamStep { step_size: (self.lr as f64 / bc1) as f32, bias_correction2_sqrt: bc2.sqrt() as f32 }
    }
}

/// Everything a run needs to continue exactly where it stopped.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainState {
    pub params: Params,
    pub adam_m: Params,
    pub adam_v: Params,
    /// Optimiser steps taken so far (Adam's t).
    pub step: u64,
    /// Epochs completed.
    pub epoch: u64,
    /// Steps already taken inside the current epoch.
    pub step_in_epoch: u64,
    pub seed: u64,
    pub batch: usize,
    pub shuffle: bool,
}

impl TrainState {
    pub fn new(params: Params, seed: u64, batch: usize, shuffle: bool) -> Self {
        TrainState {
            params,
            adam_m: Params::zeros(),
            adam_v: Params::zeros(),
            step: 0,
            epoch: 0,
            step_in_epoch: 0,
            seed,
            batch,
            shuffle,
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
        for (t, spec) in a.tensors.iter().zip(&PARAM_SPECS) {
            let bound = 1.0 / (spec.fan_in as f32).sqrt();
            assert!(t.iter().all(|x| x.abs() <= bound));
            // Not degenerate: values spread over most of the range.
            let max = t.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(max > 0.5 * bound, "{}", spec.name);
        }
        assert_eq!(param_count(), 61_706);
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
