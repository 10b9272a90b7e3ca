//! LeNet-5 described once, on any [`Ops`] implementation: the layer table [`LENET5`] and what
//! derives from it (each layer's shapes at a batch size, the parameter tensors with PyTorch's
//! `state_dict` names and layouts, the activation and gradient buffers), the forward pass, and
//! the training step (forward, loss, backward in reverse, then the optimizer's update).
//!
//! To change the network, change this file: the checkpoint's tensors, both paths' buffers, the
//! dispatch list the GPU records and the bench rows follow from it (docs/architecture.md).
//!
//! On the CPU these functions compute as they run; on the GPU they record a program of
//! dispatches once, which the GPU backend replays for every step (see [`crate::gpu::trainer`]).

use std::sync::LazyLock;

use anyhow::{bail, Result};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

pub use crate::data::IMAGE_SIDE;
use crate::ops::*;
use crate::optim::OptStep;

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

/// A flat parameter vector of the wrong length ([`Params::from_flat`]); the front API's
/// `Error::ParamCount`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{got} parameters given, a LeNet-5 has {expected}")]
pub struct WrongParamCount {
    pub got: usize,
    pub expected: usize,
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
    pub fn from_flat(flat: &[f32]) -> Result<Self, WrongParamCount> {
        if flat.len() != param_count() {
            return Err(WrongParamCount { got: flat.len(), expected: param_count() });
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

/// A layer's forward outputs.
pub enum LayerActs<O: Ops> {
    /// ReLU(conv + bias), its 2x2 max-pool, and the pool's argmax.
    Conv { conv: O::Buf<f32>, pooled: O::Buf<f32>, argmax: O::Buf<u32> },
    /// The layer's output (after its ReLU, if it has one).
    Linear { out: O::Buf<f32> },
}

impl<O: Ops> LayerActs<O> {
    /// What the next layer reads.
    pub fn output(&self) -> &O::Buf<f32> {
        match self {
            LayerActs::Conv { pooled, .. } => pooled,
            LayerActs::Linear { out } => out,
        }
    }
}

/// The activations and activation gradients of one batch size.
pub struct Activations<O: Ops> {
    pub batch: usize,
    pub shapes: Vec<LayerShape>,
    /// The gathered batch, pixels / 255: [B, 1, 28, 28].
    pub input: O::Buf<f32>,
    pub labels: O::Buf<u32>,
    /// One per layer of [`LENET5`]; the last layer's output is the logits.
    pub layers: Vec<LayerActs<O>>,
    /// The gradient with respect to each layer's output (the last one: the logits').
    pub grads: Vec<O::Buf<f32>>,
}

impl<O: Ops> Activations<O> {
    /// Buffers for `batch` images, named `<layer>.<tensor>` (and `d<layer>.<tensor>`), for the
    /// forward pass ([`forward`]): the trunk's outputs packed in one allocation where the
    /// implementation's fused trunk binds them so ([`Ops::fuses`]), the rest each its own.
    pub fn new(ops: &mut O, batch: usize) -> Result<Self> {
        Self::alloc(ops, batch, false)
    }

    /// The same for training steps ([`train_step`]), packed as the implementation's fused ops
    /// bind them ([`Ops::fuses`]): all of them for a fused trunk and head, the head's for a
    /// fused head alone.
    pub fn for_training(ops: &mut O, batch: usize) -> Result<Self> {
        Self::alloc(ops, batch, true)
    }

    fn alloc(ops: &mut O, batch: usize, training: bool) -> Result<Self> {
        let shapes = layer_shapes(batch);
        // Which tensors are packed together: every one for a fully fused step; the head's (its
        // input, the pooled output of the layer before it, and from that layer on each output
        // and output gradient) for a fused head alone; none otherwise.
        let all = training && fused_step(ops, &shapes).is_some();
        let head_from = head_shape(&shapes)
            .filter(|s| training && !all && ops.fuses(Fusion::Head(*s)))
            .map(|_| LENET5.len() - 4);
        // The forward pass with a fused trunk: the trunk's outputs and every u32 (the layers
        // after it, run one by one, only read the trunk's last output).
        let trunk = !training && trunk_shape(&shapes).is_some_and(|t| ops.fuses(Fusion::Trunk(t)));
        let packed = |layer: Option<usize>| all || layer.zip(head_from).is_some_and(|(l, first)| l >= first);
        let in_trunk = |layer: usize| trunk && layer < 2;
        let mut f32s = vec![("input".to_string(), batch * IMAGE_PIXELS, packed(None) || trunk)];
        let mut u32s = vec![("labels".to_string(), batch)];
        for (i, (layer, shape)) in LENET5.iter().zip(&shapes).enumerate() {
            let name = layer.name;
            match shape {
                LayerShape::Conv(s) => {
                    f32s.push((format!("{name}.conv"), s.output_len(), all || in_trunk(i)));
                    f32s.push((format!("{name}.pooled"), s.pooled_len(), packed(Some(i)) || in_trunk(i)));
                    u32s.push((format!("{name}.argmax"), s.pooled_len()));
                }
                LayerShape::Linear(s) => {
                    f32s.push((format!("{name}.out"), s.batch * s.out_features, packed(Some(i))))
                }
            }
        }
        for (i, (layer, shape)) in LENET5.iter().zip(&shapes).enumerate() {
            f32s.push((format!("d{}.out", layer.name), shape.output_len(), packed(Some(i))));
        }
        let group: Vec<(String, usize)> =
            f32s.iter().filter(|t| t.2).map(|(n, l, _)| (n.clone(), *l)).collect();
        let mut group = ops.alloc_packed::<f32>("activations", &group)?.into_iter();
        let mut bufs = Vec::with_capacity(f32s.len());
        for (name, len, packed) in &f32s {
            bufs.push(if *packed {
                group.next().expect("one buffer per tensor")
            } else {
                ops.alloc(name, *len)?
            });
        }
        let ints: Vec<O::Buf<u32>> = if all || trunk {
            ops.alloc_packed("activations_u32", &u32s)?
        } else {
            u32s.iter().map(|(name, len)| ops.alloc(name, *len)).collect::<Result<_>>()?
        };
        let (mut f, mut ints) = (bufs.into_iter(), ints.into_iter());
        let mut next = || f.next().expect("one buffer per tensor");
        let input = next();
        let labels = ints.next().expect("the labels");
        let layers = shapes
            .iter()
            .map(|shape| match shape {
                LayerShape::Conv(_) => {
                    let (conv, pooled) = (next(), next());
                    LayerActs::Conv { conv, pooled, argmax: ints.next().expect("one per conv layer") }
                }
                LayerShape::Linear(_) => LayerActs::Linear { out: next() },
            })
            .collect();
        let grads = shapes.iter().map(|_| next()).collect();
        Ok(Activations { batch, shapes, input, labels, layers, grads })
    }

    /// The logits of the last forward pass: [B, 10].
    pub fn logits(&self) -> &O::Buf<f32> {
        self.layers.last().expect("a network has layers").output()
    }
}

/// The parameters, their gradients and the optimizer's state, one buffer per tensor of
/// [`param_specs`] each.
pub struct Weights<O: Ops> {
    pub params: Vec<O::Buf<f32>>,
    /// Each `partials` x its tensor's size (see [`crate::ops`]).
    pub grads: Vec<O::Buf<f32>>,
    /// One list per name of the optimizer's [`crate::optim::Optimizer::state_names`].
    pub moments: Vec<Vec<O::Buf<f32>>>,
}

impl<O: Ops> Weights<O> {
    /// Uploads `params` and `moments`, with zeroed gradients of the partial counts `ops`
    /// writes at `batch`.
    pub fn upload(ops: &mut O, params: &Params, moments: &[Params], batch: usize) -> Result<Self> {
        // Each set of tensors packed together ([`Ops::upload_packed`]), as the GPU backend's
        // flat buffers hold them.
        let upload = |ops: &mut O, prefix: &str, p: &Params| {
            let named: Vec<(String, &[f32])> = param_specs()
                .iter()
                .zip(&p.tensors)
                .map(|(s, t)| (format!("{prefix}{}", s.name), &t[..]))
                .collect();
            ops.upload_packed(prefix, &named)
        };
        let grads = Self::alloc_grads(ops, batch)?;
        let params = upload(ops, "", params)?;
        let moments = moments
            .iter()
            .enumerate()
            .map(|(k, m)| upload(ops, &format!("moment{k}."), m))
            .collect::<Result<_>>()?;
        Ok(Weights { params, grads, moments })
    }
}

impl<O: Ops> Weights<O> {
    /// Zeroed gradient buffers with the partial counts `ops` writes at `batch`.
    pub fn alloc_grads(ops: &mut O, batch: usize) -> Result<Vec<O::Buf<f32>>> {
        let partials = grad_partials(ops, batch);
        let lens: Vec<(String, usize)> = param_specs()
            .iter()
            .zip(partials)
            .map(|(spec, p)| (format!("d{}", spec.name), p * spec.len()))
            .collect();
        ops.alloc_packed("grads", &lens)
    }
}

/// How many partial sums `ops` writes for each parameter tensor's gradient at `batch`.
pub fn grad_partials<O: Ops>(ops: &O, batch: usize) -> Vec<usize> {
    let shapes = layer_shapes(batch);
    let last = shapes.len() - 1;
    let head = head_shape(&shapes);
    let trunk = fused_step(ops, &shapes).map(|(t, _)| t);
    let mut out = Vec::new();
    for (i, shape) in shapes.iter().enumerate() {
        let op = match *shape {
            LayerShape::Conv(_) if trunk.is_some() => {
                GradOp::Trunk { trunk: trunk.expect("checked"), layer: i }
            }
            // The first layer's input is the image: no gradient for it.
            LayerShape::Conv(s) => GradOp::ConvFromPool(s, i > 0),
            LayerShape::Linear(_) if head.is_some() && i + 3 > last => {
                GradOp::Head { head: head.expect("checked"), layer: i + 3 - shapes.len() }
            }
            LayerShape::Linear(s) if i == last => GradOp::LinearXent(s),
            LayerShape::Linear(s) => GradOp::Linear(s),
        };
        let p = ops.grad_partials(op);
        out.extend([p, p]);
    }
    out
}

/// Where a training step writes each image's loss and whether it was classified right.
pub struct StepOut<'a, O: Ops> {
    pub losses: &'a mut O::Buf<f32>,
    pub correct: &'a mut O::Buf<u32>,
}

/// The forward pass over a gathered batch, up to the logits ([`Activations::logits`]).
pub fn forward<O: Ops>(
    ops: &mut O,
    params: &[O::Buf<f32>],
    acts: &mut Activations<O>,
    batch: &BatchRef<O>,
) -> Result<()> {
    // A fused trunk runs as one op; the layers after it one by one.
    let trunk = trunk_shape(&acts.shapes).filter(|t| ops.fuses(Fusion::Trunk(*t)));
    if let Some(t) = trunk {
        trunk_forward_step(ops, params, acts, batch, t)?;
    }
    forward_layers(ops, params, acts, batch, if trunk.is_some() { 2 } else { 0 }, LENET5.len())
}

/// One optimizer step on a batch: the forward pass, the loss, the backward pass and the update.
/// A network that ends in a three-layer head after a conv layer (LeNet-5) runs the head's whole
/// step as one fused op ([`Ops::head_forward_backward`], the same ops in the same order where an
/// implementation does not fuse them); any other runs layer by layer.
pub fn train_step<O: Ops>(
    ops: &mut O,
    w: &mut Weights<O>,
    acts: &mut Activations<O>,
    batch: &BatchRef<O>,
    out: StepOut<O>,
    opt: &OptStep,
) -> Result<()> {
    // The head's first layer, and the output layer (a network without a three-layer head).
    let (first, last) = (LENET5.len() - 3, LENET5.len() - 1);
    match (fused_step(ops, &acts.shapes), head_shape(&acts.shapes)) {
        (Some((t, h)), _) => {
            trunk_forward_step(ops, &w.params, acts, batch, t)?;
            head_step(ops, w, acts, out, first, h)?;
            trunk_backward_step(ops, w, acts, t)?;
        }
        (None, Some(h)) => {
            // The trunk as one op where the implementation takes its tensors one by one.
            match trunk_shape(&acts.shapes).filter(|t| !ops.fuses(Fusion::Trunk(*t))) {
                Some(t) => {
                    trunk_forward_step(ops, &w.params, acts, batch, t)?;
                    forward_layers(ops, &w.params, acts, batch, 2, first)?;
                    head_step(ops, w, acts, out, first, h)?;
                    backward_layers(ops, w, acts, 2, first)?;
                    trunk_backward_step(ops, w, acts, t)?;
                }
                None => {
                    forward_layers(ops, &w.params, acts, batch, 0, first)?;
                    head_step(ops, w, acts, out, first, h)?;
                    backward_layers(ops, w, acts, 0, first)?;
                }
            }
        }
        (None, None) => {
            forward_layers(ops, &w.params, acts, batch, 0, last)?;
            output_layer_step(ops, w, acts, out, last)?;
            backward_layers(ops, w, acts, 0, last)?;
        }
    }
    let (params, grads, moments) = (&mut w.params[..], &w.grads[..], &mut w.moments[..]);
    ops.update(UpdateArgs { params, grads, moments, step: opt })
}

/// The trunk's and the head's shapes when the network is a trunk of two conv layers and a
/// three-layer head (LeNet-5) and `ops` runs both fused ([`Ops::fuses`]).
pub fn fused_step<O: Ops>(ops: &O, shapes: &[LayerShape]) -> Option<(TrunkShape, HeadShape)> {
    let (trunk, head) = (trunk_shape(shapes)?, head_shape(shapes)?);
    (shapes.len() == 5 && ops.fuses(Fusion::Trunk(trunk)) && ops.fuses(Fusion::Head(head)))
        .then_some((trunk, head))
}

/// The trunk's shape when the network starts with exactly two conv layers (LeNet-5).
pub fn trunk_shape(shapes: &[LayerShape]) -> Option<TrunkShape> {
    match shapes {
        [LayerShape::Conv(conv1), LayerShape::Conv(conv2), rest @ ..]
            if !matches!(rest.first(), Some(LayerShape::Conv(_))) =>
        {
            Some(TrunkShape { conv1: *conv1, conv2: *conv2 })
        }
        _ => None,
    }
}

/// The trunk (layers 0 and 1) forward, gathering the batch, in one op.
fn trunk_forward_step<O: Ops>(
    ops: &mut O,
    params: &[O::Buf<f32>],
    acts: &mut Activations<O>,
    batch: &BatchRef<O>,
    s: TrunkShape,
) -> Result<()> {
    let [LayerActs::Conv { conv: c1, pooled: p1, argmax: a1 }, LayerActs::Conv { conv: c2, pooled: p2, argmax: a2 }, ..] =
        &mut acts.layers[..]
    else {
        unreachable!("a trunk of two conv layers")
    };
    let gather = GatherArgs { input: &mut acts.input, labels: &mut acts.labels, batch };
    let conv1 =
        ConvLayerArgs { weight: &params[0], bias: &params[1], conv: c1, pooled: p1, argmax: a1, s: s.conv1 };
    let conv2 =
        ConvLayerArgs { weight: &params[2], bias: &params[3], conv: c2, pooled: p2, argmax: a2, s: s.conv2 };
    ops.trunk_forward(TrunkForwardArgs { gather, conv1, conv2, s })
}

/// The trunk backward, from the head's input gradient, in one op.
fn trunk_backward_step<O: Ops>(
    ops: &mut O,
    w: &mut Weights<O>,
    acts: &mut Activations<O>,
    s: TrunkShape,
) -> Result<()> {
    let [LayerActs::Conv { conv: c1, pooled: p1, argmax: a1 }, LayerActs::Conv { conv: c2, argmax: a2, .. }, ..] =
        &acts.layers[..]
    else {
        unreachable!("a trunk of two conv layers")
    };
    let [dpooled1, dpooled, ..] = &mut acts.grads[..] else { unreachable!("a gradient per layer") };
    let [dw1, db1, dw2, db2, ..] = &mut w.grads[..] else { unreachable!("a gradient per tensor") };
    let conv2 =
        TrunkLayerArgs { conv: c2, argmax: a2, input: p1, weight: &w.params[2], dweight: dw2, dbias: db2 };
    let conv1 = TrunkLayerArgs {
        conv: c1,
        argmax: a1,
        input: &acts.input,
        weight: &w.params[0],
        dweight: dw1,
        dbias: db1,
    };
    ops.trunk_backward(TrunkBackwardArgs { dpooled, conv2, dpooled1, conv1, s })
}

/// The head's shape when the network ends in three fully connected layers (ReLU, ReLU, none)
/// after a conv layer, as LeNet-5 does.
pub fn head_shape(shapes: &[LayerShape]) -> Option<HeadShape> {
    let n = shapes.len();
    if n < 4 || !matches!(shapes[n - 4], LayerShape::Conv(_)) {
        return None;
    }
    let relus = LENET5[n - 3..].iter().map(|l| matches!(l.kind, LayerKind::Linear { relu: true, .. }));
    if !relus.eq([true, true, false]) {
        return None;
    }
    let mut features = [0; 4];
    for (k, shape) in shapes[n - 3..].iter().enumerate() {
        let LayerShape::Linear(s) = shape else { return None };
        features[k] = s.in_features;
        features[k + 1] = s.out_features;
    }
    let LayerShape::Linear(s) = shapes[n - 1] else { return None };
    Some(HeadShape { batch: s.batch, features })
}

/// The head (layers `first..first + 3`): forward, loss and backward in one op.
fn head_step<O: Ops>(
    ops: &mut O,
    w: &mut Weights<O>,
    acts: &mut Activations<O>,
    out: StepOut<O>,
    first: usize,
    s: HeadShape,
) -> Result<()> {
    let (before, rest) = acts.layers.split_at_mut(first);
    let (dbefore, drest) = acts.grads.split_at_mut(first);
    let input = before.last().expect("a conv layer before the head").output();
    let dinput = dbefore.last_mut().expect("a conv layer before the head");
    let (params, grads) = (&w.params[2 * first..], &mut w.grads[2 * first..]);
    let mut layers =
        rest.iter_mut().zip(drest).zip(params.chunks_exact(2)).zip(grads.chunks_exact_mut(2)).map(
            |(((a, dout), p), g)| {
                let LayerActs::Linear { out } = a else { unreachable!("the head is fully connected") };
                let (dweight, dbias) = g.split_at_mut(1);
                HeadLayerArgs {
                    weight: &p[0],
                    bias: &p[1],
                    out,
                    dout,
                    dweight: &mut dweight[0],
                    dbias: &mut dbias[0],
                }
            },
        );
    let mut next = || layers.next().expect("three head layers");
    let layers = [next(), next(), next()];
    let (labels, losses, correct) = (&acts.labels, out.losses, out.correct);
    ops.head_forward_backward(HeadArgs { input, layers, labels, losses, correct, dinput, s })
}

/// The output layer (`last`): logits, loss and its own backward pass in one op.
fn output_layer_step<O: Ops>(
    ops: &mut O,
    w: &mut Weights<O>,
    acts: &mut Activations<O>,
    out: StepOut<O>,
    last: usize,
) -> Result<()> {
    let LayerShape::Linear(s) = acts.shapes[last] else { bail!("the last layer must be fully connected") };
    let (wi, bi) = layer_params(last);
    let (before, rest) = acts.layers.split_at_mut(last);
    let LayerActs::Linear { out: logits } = &mut rest[0] else { unreachable!("shapes match kinds") };
    let (dbefore, dlast) = acts.grads.split_at_mut(last);
    let (dweight, dbias) = pair_mut(&mut w.grads, wi);
    ops.linear_xent_forward_backward(LinearXentArgs {
        input: layer_input(&acts.input, before),
        weight: &w.params[wi],
        bias: &w.params[bi],
        labels: &acts.labels,
        logits,
        dlogits: &mut dlast[0],
        losses: out.losses,
        correct: out.correct,
        dweight,
        dbias,
        dinput: input_grad(dbefore, before, last),
        s,
    })
}

/// The backward pass of layers `from..upto`, in reverse.
fn backward_layers<O: Ops>(
    ops: &mut O,
    w: &mut Weights<O>,
    acts: &mut Activations<O>,
    from: usize,
    upto: usize,
) -> Result<()> {
    for i in (from..upto).rev() {
        let (wi, _) = layer_params(i);
        let (dbefore, dthis) = acts.grads.split_at_mut(i);
        let before = &acts.layers[..i];
        let input = layer_input(&acts.input, before);
        let (dweight, dbias) = pair_mut(&mut w.grads, wi);
        let (dout, weight) = (&dthis[0], &w.params[wi]);
        match (&acts.layers[i], acts.shapes[i]) {
            (LayerActs::Conv { conv, argmax, .. }, LayerShape::Conv(s)) => {
                // A conv layer's input is the image or a pooled output: no ReLU mask to apply.
                let dinput = dbefore.last_mut();
                let a = ConvBackwardArgs {
                    dpooled: dout,
                    conv,
                    argmax,
                    input,
                    weight,
                    dweight,
                    dbias,
                    dinput,
                    s,
                };
                ops.conv_backward_from_pool(a)?;
            }
            (LayerActs::Linear { .. }, LayerShape::Linear(s)) => {
                let dinput = input_grad(dbefore, before, i);
                ops.linear_backward(LinearBackwardArgs { dout, input, weight, dweight, dbias, dinput, s })?;
            }
            _ => unreachable!("shapes match kinds"),
        }
    }

    Ok(())
}

/// Runs layers from..n forward; the first gathers the batch into `acts.input` (fused with a
/// first conv layer).
fn forward_layers<O: Ops>(
    ops: &mut O,
    params: &[O::Buf<f32>],
    acts: &mut Activations<O>,
    batch: &BatchRef<O>,
    from: usize,
    n: usize,
) -> Result<()> {
    for (i, layer) in LENET5.iter().enumerate().take(n).skip(from) {
        let (wi, bi) = layer_params(i);
        let (weight, bias) = (&params[wi], &params[bi]);
        let (before, rest) = acts.layers.split_at_mut(i);
        match (&mut rest[0], acts.shapes[i]) {
            (LayerActs::Conv { conv, pooled, argmax }, LayerShape::Conv(s)) => {
                let l = ConvLayerArgs { weight, bias, conv, pooled, argmax, s };
                if i == 0 {
                    let g = GatherArgs { input: &mut acts.input, labels: &mut acts.labels, batch };
                    ops.gather_conv_relu_pool_forward(g, l)?;
                } else {
                    ops.conv_relu_pool_forward(layer_input(&acts.input, before), l)?;
                }
            }
            (LayerActs::Linear { out }, LayerShape::Linear(s)) => {
                if i == 0 {
                    ops.gather(GatherArgs { input: &mut acts.input, labels: &mut acts.labels, batch })?;
                }
                let relu = matches!(layer.kind, LayerKind::Linear { relu: true, .. });
                let input = layer_input(&acts.input, before);
                ops.linear_forward(LinearForwardArgs { input, weight, bias, out, s, relu })?;
            }
            _ => unreachable!("shapes match kinds"),
        }
    }
    Ok(())
}

/// The input of the layer after `before`: the previous layer's output, or the batch.
fn layer_input<'a, O: Ops>(input: &'a O::Buf<f32>, before: &'a [LayerActs<O>]) -> &'a O::Buf<f32> {
    before.last().map_or(input, LayerActs::output)
}

/// The gradient layer `i`'s backward pass writes for its input (none for the first layer), with
/// the ReLU mask of the layer that produced that input when it is a fully connected one (a conv
/// layer applies its own mask in its backward pass).
fn input_grad<'a, O: Ops>(
    dbefore: &'a mut [O::Buf<f32>],
    before: &'a [LayerActs<O>],
    i: usize,
) -> Option<InputGrad<'a, O>> {
    let dinput = dbefore.last_mut()?;
    let relu_mask = match (&LENET5[i - 1].kind, &before[i - 1]) {
        (LayerKind::Linear { relu: true, .. }, acts) => Some(acts.output()),
        _ => None,
    };
    Some(InputGradArgs { dinput, relu_mask })
}

/// Mutable references to `v[i]` and `v[i + 1]`.
fn pair_mut<T>(v: &mut [T], i: usize) -> (&mut T, &mut T) {
    let (a, b) = v[i..].split_at_mut(1);
    (&mut a[0], &mut b[0])
}

/// Loss and correct count of one optimizer step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// Mean over the batch of the images' losses (summed in f64, in image order).
    pub loss: f32,
    pub correct: u32,
}

impl StepStats {
    /// From each image's loss and correct flag.
    pub fn from_images(losses: &[f32], correct: &[u32]) -> Self {
        let sum: f64 = losses.iter().map(|&l| l as f64).sum();
        StepStats { loss: (sum / losses.len().max(1) as f64) as f32, correct: correct.iter().sum() }
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
}
