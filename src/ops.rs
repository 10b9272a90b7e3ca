//! The op seam: one method per op the trainers run, fused ones included, implemented by the CPU
//! reference ([`crate::cpu::Reference`]), the fast CPU path ([`crate::cpu::Fast`]) and the wgpu
//! path ([`crate::gpu::GpuOps`]).
//!
//! Every op works on the implementation's own buffers (`Vec` on the CPU, device buffers on the
//! GPU), so one description of the network ([`crate::network`]) runs on each: the CPU
//! implementations compute as they are called, the GPU records dispatches (once, for a whole
//! training step that is then replayed). Tests and the bench move data in and out with
//! [`Ops::upload`] and [`Ops::read`] and run one test body per op on every implementation
//! (tests/ops.rs).
//!
//! Layouts are PyTorch's: activations NCHW (or [batch, features]), convolution weights
//! [out_channels, in_channels, k, k], linear weights [out_features, in_features].
//!
//! Weight gradients may come as *partials*: a gradient buffer of `p * n` values for a tensor of
//! `n` holds `p` partial sums (over parts of the batch) whose sum, taken in order, is the
//! gradient. An implementation says how many it writes ([`Ops::grad_partials`]); the optimizer
//! ops add them up. This lets a GPU spread a reduction over the batch across many workgroups
//! without a pass of its own, and keeps every sum in a fixed order.

use anyhow::Result;

use crate::data::Dataset;
use crate::optim::OptStep;
use crate::reference;
pub use crate::reference::{ConvShape, LinearShape};

/// What a buffer can hold.
pub trait Elem: bytemuck::Pod + Default + PartialEq + std::fmt::Debug + Send + Sync + 'static {}
impl Elem for f32 {}
impl Elem for u32 {}
impl Elem for i32 {}

/// Which op writes a weight gradient, for [`Ops::grad_partials`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradOp {
    /// A conv layer's backward pass, and whether it computes the input gradient too.
    ConvFromPool(ConvShape, bool),
    Linear(LinearShape),
    LinearXent(LinearShape),
    /// Layer `layer` (0, 1 or 2) of a fully connected head ([`Ops::head_forward_backward`]).
    Head {
        head: HeadShape,
        layer: usize,
    },
    /// Layer `layer` (0 or 1) of a convolutional trunk ([`Ops::trunk_backward`]).
    Trunk {
        trunk: TrunkShape,
        layer: usize,
    },
}

/// The shape of a convolutional trunk of two conv + ReLU + 2x2 max-pool layers, the first on
/// the gathered batch (LeNet-5's conv1 -> conv2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrunkShape {
    pub conv1: ConvShape,
    pub conv2: ConvShape,
}

impl TrunkShape {
    /// Layer `i`'s shape.
    pub fn layer(&self, i: usize) -> ConvShape {
        [self.conv1, self.conv2][i]
    }
}

/// A fused op whose implementation may bind a whole group of tensors as one buffer
/// ([`Ops::fuses`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fusion {
    Head(HeadShape),
    Trunk(TrunkShape),
}

/// The shape of a fully connected head of three layers (LeNet-5's fc1 -> fc2 -> fc3): ReLU after
/// the first two, softmax cross-entropy after the last. `features` are the first layer's inputs,
/// then each layer's outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadShape {
    pub batch: usize,
    pub features: [usize; 4],
}

impl HeadShape {
    /// Layer `i`'s shape.
    pub fn layer(&self, i: usize) -> LinearShape {
        LinearShape { batch: self.batch, in_features: self.features[i], out_features: self.features[i + 1] }
    }

    pub fn layers(&self) -> [LinearShape; 3] {
        [0, 1, 2].map(|i| self.layer(i))
    }
}

/// The buffers of an [`Ops`] implementation, by element type.
pub type F32<O> = <O as Ops>::Buf<f32>;
pub type U32<O> = <O as Ops>::Buf<u32>;
pub type I32<O> = <O as Ops>::Buf<i32>;

// Each op takes its tensors as one struct of named fields. The structs are generic over the buffer
// types (`F` holds f32s, `U` u32s) rather than over the implementation, so that one whose buffers
// are another's (a wrapper such as `opcheck::Trace`) passes a call on as it is; the aliases
// without `Args` (`ConvLayer<O>`, `LinearBackward<O>`, ...) name them for an implementation `O`.

/// The batch a training step reads: which samples, and how each image is shifted.
pub struct Batch<'a, D, U, I> {
    pub data: &'a D,
    /// Sample indices into `data` \[B\].
    pub indices: &'a U,
    /// Per image (dx, dy) \[2B\]: the image is translated by whole pixels, zero-filled
    /// (`input[y][x] = image[y - dy][x - dx]`).
    pub shifts: &'a I,
    pub batch: usize,
}
pub type BatchRef<'a, O> = Batch<'a, <O as Ops>::Data, U32<O>, I32<O>>;

/// [`Ops::gather`]'s tensors: the batch, and where it goes.
pub struct GatherArgs<'a, F, U, D, I> {
    /// [B, rows * cols]
    pub input: &'a mut F,
    /// \[B\]
    pub labels: &'a mut U,
    pub batch: &'a Batch<'a, D, U, I>,
}
pub type Gather<'a, O> = GatherArgs<'a, F32<O>, U32<O>, <O as Ops>::Data, I32<O>>;

/// A conv + bias + ReLU + 2x2 max-pool layer's parameters, outputs and shape.
pub struct ConvLayerArgs<'a, F, U> {
    /// [Cout, Cin, K, K]
    pub weight: &'a F,
    /// \[Cout\]
    pub bias: &'a F,
    /// ReLU(conv + bias) [B, Cout, Ho, Wo]: the backward pass's ReLU mask.
    pub conv: &'a mut F,
    /// [B, Cout, Ho/2, Wo/2]
    pub pooled: &'a mut F,
    /// For each pooled element, the flat index into `conv` of its window's first maximum in
    /// row-major order (the element the gradient goes to).
    pub argmax: &'a mut U,
    pub s: ConvShape,
}
pub type ConvLayer<'a, O> = ConvLayerArgs<'a, F32<O>, U32<O>>;

/// [`Ops::softmax_xent`]'s tensors.
pub struct SoftmaxXentArgs<'a, F, U> {
    /// [B, C]
    pub logits: &'a F,
    /// \[B\], each below C
    pub labels: &'a U,
    /// (softmax - onehot) / B [B, C]
    pub dlogits: &'a mut F,
    /// -log softmax(logits)\[label\] \[B\]
    pub losses: &'a mut F,
    /// 1 where the first largest logit is the label \[B\]
    pub correct: &'a mut U,
    pub batch: usize,
    pub classes: usize,
}
pub type SoftmaxXent<'a, O> = SoftmaxXentArgs<'a, F32<O>, U32<O>>;

/// A gradient with respect to a layer's input, and the ReLU mask to apply to it: the forward
/// output of the layer that produced that input, when that layer ends in a ReLU.
pub struct InputGradArgs<'a, F> {
    pub dinput: &'a mut F,
    pub relu_mask: Option<&'a F>,
}
pub type InputGrad<'a, O> = InputGradArgs<'a, F32<O>>;

/// [`Ops::linear_forward`]'s tensors: input [B, In], weight [Out, In], bias \[Out\], out [B, Out].
pub struct LinearForwardArgs<'a, F> {
    pub input: &'a F,
    pub weight: &'a F,
    pub bias: &'a F,
    pub out: &'a mut F,
    pub s: LinearShape,
    /// ReLU after the layer.
    pub relu: bool,
}
pub type LinearForward<'a, O> = LinearForwardArgs<'a, F32<O>>;

/// [`Ops::linear_backward`]'s tensors: the weight gradients (each `partials` x its tensor's
/// size) and, when asked, the input gradient.
pub struct LinearBackwardArgs<'a, F> {
    /// [B, Out]
    pub dout: &'a F,
    /// [B, In]
    pub input: &'a F,
    /// [Out, In]
    pub weight: &'a F,
    pub dweight: &'a mut F,
    pub dbias: &'a mut F,
    pub dinput: Option<InputGradArgs<'a, F>>,
    pub s: LinearShape,
}
pub type LinearBackward<'a, O> = LinearBackwardArgs<'a, F32<O>>;

/// [`Ops::linear_xent_forward_backward`]'s tensors: the output layer's forward pass (with
/// `linear.out` the logits), the loss, and the layer's backward pass (`grads.dout` unused: the
/// loss's gradient goes to `xent.dlogits`).
pub struct LinearXentArgs<'a, F, U> {
    pub input: &'a F,
    pub weight: &'a F,
    pub bias: &'a F,
    pub labels: &'a U,
    pub logits: &'a mut F,
    pub dlogits: &'a mut F,
    pub losses: &'a mut F,
    pub correct: &'a mut U,
    pub dweight: &'a mut F,
    pub dbias: &'a mut F,
    pub dinput: Option<InputGradArgs<'a, F>>,
    pub s: LinearShape,
}
pub type LinearXent<'a, O> = LinearXentArgs<'a, F32<O>, U32<O>>;

/// [`Ops::conv_backward_from_pool`]'s tensors: the pooled gradient, the forward tensors that
/// route it, and the gradients (the weight's `partials` x its size; the input's when asked).
pub struct ConvBackwardArgs<'a, F, U> {
    /// [B, Cout, Ho/2, Wo/2]
    pub dpooled: &'a F,
    /// The forward pass's `conv` and `argmax`.
    pub conv: &'a F,
    pub argmax: &'a U,
    /// [B, Cin, H, W]
    pub input: &'a F,
    pub weight: &'a F,
    pub dweight: &'a mut F,
    pub dbias: &'a mut F,
    /// [B, Cin, H, W]
    pub dinput: Option<&'a mut F>,
    pub s: ConvShape,
}
pub type ConvBackward<'a, O> = ConvBackwardArgs<'a, F32<O>, U32<O>>;

/// One layer of [`HeadArgs`]: its parameters, its output, the loss's gradient with respect to
/// that output, and its weight gradients (each `partials` x its size, see [`GradOp::Head`]).
pub struct HeadLayerArgs<'a, F> {
    pub weight: &'a F,
    pub bias: &'a F,
    /// [B, Out]: after its ReLU (the last layer's: the logits).
    pub out: &'a mut F,
    /// [B, Out]: zero where its ReLU's output is (the last layer's: the logits' gradient).
    pub dout: &'a mut F,
    pub dweight: &'a mut F,
    pub dbias: &'a mut F,
}

/// [`Ops::head_forward_backward`]'s tensors.
pub struct HeadArgs<'a, F, U> {
    /// [B, In]: the head's input (a conv layer's pooled output).
    pub input: &'a F,
    pub layers: [HeadLayerArgs<'a, F>; 3],
    /// \[B\]
    pub labels: &'a U,
    pub losses: &'a mut F,
    pub correct: &'a mut U,
    /// [B, In]: the loss's gradient with respect to `input`, unmasked (the conv layer that
    /// produced it applies its own ReLU).
    pub dinput: &'a mut F,
    pub s: HeadShape,
}
pub type Head<'a, O> = HeadArgs<'a, F32<O>, U32<O>>;

/// [`Ops::trunk_forward`]'s tensors: the batch, gathered on the way in (`gather.input` keeps
/// it for the backward pass), through both layers (conv2's input is conv1's pooled output).
pub struct TrunkForwardArgs<'a, F, U, D, I> {
    pub gather: GatherArgs<'a, F, U, D, I>,
    pub conv1: ConvLayerArgs<'a, F, U>,
    pub conv2: ConvLayerArgs<'a, F, U>,
    pub s: TrunkShape,
}
pub type TrunkForward<'a, O> = TrunkForwardArgs<'a, F32<O>, U32<O>, <O as Ops>::Data, I32<O>>;

/// One layer of [`TrunkBackwardArgs`]: its forward tensors and its weight gradients (each
/// `partials` x its size, see [`GradOp::Trunk`]).
pub struct TrunkLayerArgs<'a, F, U> {
    /// The forward pass's `conv` and `argmax`, and the layer's input.
    pub conv: &'a F,
    pub argmax: &'a U,
    pub input: &'a F,
    pub weight: &'a F,
    pub dweight: &'a mut F,
    pub dbias: &'a mut F,
}

/// [`Ops::trunk_backward`]'s tensors.
pub struct TrunkBackwardArgs<'a, F, U> {
    /// The gradient of conv2's pooled output (the head's input gradient).
    pub dpooled: &'a F,
    pub conv2: TrunkLayerArgs<'a, F, U>,
    /// The gradient of conv1's pooled output (conv2's input gradient).
    pub dpooled1: &'a mut F,
    pub conv1: TrunkLayerArgs<'a, F, U>,
    pub s: TrunkShape,
}
pub type TrunkBackward<'a, O> = TrunkBackwardArgs<'a, F32<O>, U32<O>>;

/// An optimizer step's tensors, one buffer per parameter tensor each.
pub struct UpdateArgs<'a, F, S> {
    pub params: &'a mut [F],
    /// Each `partials` x its tensor's size.
    pub grads: &'a [F],
    /// The optimizer's state, one list per name of
    /// [`crate::optim::Optimizer::state_names`] (Adam: m, v; SGD: the momentum buffer; ...).
    pub moments: &'a mut [Vec<F>],
    pub step: &'a S,
}
pub type Update<'a, O> = UpdateArgs<'a, F32<O>, OptStep>;

/// The ops. Each overwrites its outputs completely. The CPU ones compute at once; the GPU
/// records, and runs what it recorded when a buffer is read.
///
/// The default methods are the ops' definitions: the CPU reference ([`crate::cpu::reference`])
/// run on host copies of the buffers. [`crate::cpu::Reference`] uses them as they are; the fast
/// CPU path and the GPU override them to compute in place (the GPU must override every op it
/// records, as it cannot read a buffer in the middle of a program). So a new op works on every
/// implementation as soon as it is declared here, and is made fast where it is overridden.
pub trait Ops {
    /// A buffer of `T`s: `Vec<T>` on the CPU, a device buffer (or a range of one) on the GPU.
    type Buf<T: Elem>;
    /// A data set (images and labels) where the ops can gather batches from it.
    type Data;

    /// "reference", "fast" or the GPU adapter's name.
    fn name(&self) -> String;

    /// A zero-filled buffer of `len` elements.
    fn alloc<T: Elem>(&mut self, label: &str, len: usize) -> Result<Self::Buf<T>>;
    fn upload<T: Elem>(&mut self, label: &str, data: &[T]) -> Result<Self::Buf<T>>;
    /// Overwrites `buf` (same length) with `data`, after everything recorded so far.
    fn write<T: Elem>(&mut self, buf: &mut Self::Buf<T>, data: &[T]) -> Result<()>;
    /// The buffer's contents, after everything recorded so far has run.
    fn read<T: Elem>(&mut self, buf: &Self::Buf<T>) -> Result<Vec<T>>;
    /// Elements in the buffer.
    fn len<T: Elem>(&self, buf: &Self::Buf<T>) -> usize;
    fn upload_data(&mut self, label: &str, data: &Dataset) -> Result<Self::Data>;

    /// Zero-filled buffers of the given lengths, which an implementation may place in one
    /// allocation (the GPU does, so that one binding of a fused kernel reaches them all).
    fn alloc_packed<T: Elem>(&mut self, label: &str, lens: &[(String, usize)]) -> Result<Vec<Self::Buf<T>>> {
        let _ = label;
        lens.iter().map(|(name, len)| self.alloc(name, *len)).collect()
    }

    /// Whether the implementation runs a fused op as one kernel that binds its group of tensors
    /// as one buffer at this shape: the head's activations (its input, each layer's output and
    /// output gradient, its input gradient), or every activation of a training step for a
    /// trunk (which runs fused only with a fused head). Those tensors must then come from one
    /// [`Ops::alloc_packed`], and otherwise must not: a kernel may not read and write ranges of
    /// one buffer in one dispatch, as the per-layer kernels would.
    fn fuses(&self, op: Fusion) -> bool {
        let _ = op;
        false
    }

    /// Buffers holding `tensors`, packed as [`Ops::alloc_packed`] packs them.
    fn upload_packed<T: Elem>(
        &mut self,
        label: &str,
        tensors: &[(String, &[T])],
    ) -> Result<Vec<Self::Buf<T>>> {
        let lens: Vec<(String, usize)> = tensors.iter().map(|(n, t)| (n.clone(), t.len())).collect();
        let mut bufs = self.alloc_packed(label, &lens)?;
        for (buf, (_, t)) in bufs.iter_mut().zip(tensors) {
            self.write(buf, t)?;
        }
        Ok(bufs)
    }

    /// How many partial sums the op writes for a weight gradient (and its bias's).
    fn grad_partials(&self, op: GradOp) -> usize {
        let _ = op;
        1
    }

    /// input\[b\] = the image `indices[b]` of the data set as pixels / 255, translated by
    /// `shifts[b]` (zero where it reads outside the image); labels\[b\] = its label.
    fn gather(&mut self, g: Gather<Self>) -> Result<()>;

    /// conv (stride 1, zero padding) + bias, ReLU, then 2x2 max-pool with its argmax:
    /// conv\[b,co,y,x\] = max(0, bias\[co\] + sum_{ci,ky,kx} weight\[co,ci,ky,kx\] * input[b,ci,y+ky-p,x+kx-p]).
    ///
    /// input: [B, Cin, H, W]; Ho and Wo even
    fn conv_relu_pool_forward(&mut self, input: &F32<Self>, l: ConvLayer<Self>) -> Result<()> {
        let s = l.s;
        let [input, weight, bias] = host(self, [input, l.weight, l.bias])?;
        let mut conv = vec![0.0; s.output_len()];
        let (mut pooled, mut argmax) = (vec![0.0; s.pooled_len()], vec![0; s.pooled_len()]);
        reference::conv_relu_pool_forward(&mut conv, &mut pooled, &mut argmax, &input, &weight, &bias, s);
        self.write(l.conv, &conv)?;
        self.write(l.pooled, &pooled)?;
        self.write(l.argmax, &argmax)
    }

    /// [`Ops::gather`] then [`Ops::conv_relu_pool_forward`] on the gathered batch (which
    /// `g.input` keeps for the backward pass).
    fn gather_conv_relu_pool_forward(&mut self, g: Gather<Self>, l: ConvLayer<Self>) -> Result<()> {
        gather_then_conv(self, g, l)
    }

    /// out\[b,o\] = bias\[o\] + sum_i input\[b,i\] * weight\[o,i\], then ReLU if `relu`.
    fn linear_forward(&mut self, a: LinearForward<Self>) -> Result<()> {
        let s = a.s;
        let [input, weight, bias] = host(self, [a.input, a.weight, a.bias])?;
        let mut y = vec![0.0; s.batch * s.out_features];
        reference::linear_layer_forward(&mut y, &input, &weight, &bias, s, a.relu);
        self.write(a.out, &y)
    }

    /// Softmax cross-entropy of each image and its gradient with respect to the logits, for a
    /// loss that is the mean over the batch: dlogits\[b,c\] = (softmax(logits\[b\])\[c\] - [c == label]) / B.
    fn softmax_xent(&mut self, a: SoftmaxXent<Self>) -> Result<()> {
        let ([logits], [labels]) = (host(self, [a.logits])?, host(self, [a.labels])?);
        let (batch, classes) = (a.batch, a.classes);
        anyhow::ensure!(labels.iter().all(|&l| (l as usize) < classes), "a label is not below {classes}");
        let (mut dlogits, mut losses, mut correct) =
            (vec![0.0; logits.len()], vec![0.0; batch], vec![0; batch]);
        reference::softmax_xent(&mut dlogits, &mut losses, &mut correct, &logits, &labels, batch, classes);
        self.write(a.dlogits, &dlogits)?;
        self.write(a.losses, &losses)?;
        self.write(a.correct, &correct)
    }

    /// The output layer's whole step: the logits ([`Ops::linear_forward`], no ReLU), the loss
    /// and its gradient ([`Ops::softmax_xent`]), and the layer's backward pass
    /// ([`Ops::linear_backward`]).
    fn linear_xent_forward_backward(&mut self, a: LinearXent<Self>) -> Result<()> {
        linear_then_xent(self, a)
    }

    /// A fully connected layer's backward pass: dweight\[o,i\] = sum_b dout\[b,o\] * input\[b,i\],
    /// dbias\[o\] = sum_b dout\[b,o\], and, when asked, dinput = dout · weight (zero where the
    /// ReLU mask is not positive).
    fn linear_backward(&mut self, a: LinearBackward<Self>) -> Result<()> {
        let s = a.s;
        let [dout, input, weight] = host(self, [a.dout, a.input, a.weight])?;
        let (mut dweight, mut dbias) = (vec![0.0; s.weight_len()], vec![0.0; s.out_features]);
        let mut dx = vec![0.0; s.batch * s.in_features];
        let (dinput, mask) = match a.dinput {
            Some(InputGradArgs { dinput, relu_mask }) => {
                (Some(dinput), relu_mask.map(|m| self.read(m)).transpose()?)
            }
            None => (None, None),
        };
        let dx_mask = dinput.is_some().then_some((dx.as_mut_slice(), mask.as_deref()));
        reference::linear_layer_backward(&mut dweight, &mut dbias, dx_mask, &dout, &input, &weight, s);
        if let Some(dinput) = dinput {
            self.write(dinput, &dx)?;
        }
        self.write(a.dweight, &dweight)?;
        self.write(a.dbias, &dbias)
    }

    /// The backward pass of conv + bias + ReLU + 2x2 max-pool, fed by the pooled gradient:
    /// each pooled gradient goes to its window's argmax where the conv output there is
    /// positive (ReLU), giving dconv; then dweight\[co,ci,ky,kx\] = sum_{b,y,x} dconv\[b,co,y,x\] *
    /// input[b,ci,y+ky-p,x+kx-p], dbias\[co\] = sum dconv[b,co,..], and, when asked,
    /// dinput\[b,ci,iy,ix\] = sum over the outputs reading input\[b,ci,iy,ix\] of dconv * weight.
    fn conv_backward_from_pool(&mut self, a: ConvBackward<Self>) -> Result<()> {
        let s = a.s;
        let [dpooled, conv, input, weight] = host(self, [a.dpooled, a.conv, a.input, a.weight])?;
        let [argmax] = host(self, [a.argmax])?;
        let (mut dweight, mut dbias) = (vec![0.0; s.weight_len()], vec![0.0; s.out_channels]);
        let mut dx = vec![0.0; s.input_len()];
        let dx_ref = a.dinput.is_some().then_some(dx.as_mut_slice());
        reference::conv_relu_pool_backward(
            &mut dweight,
            &mut dbias,
            dx_ref,
            &dpooled,
            &conv,
            &argmax,
            &input,
            &weight,
            s,
        );
        if let Some(dinput) = a.dinput {
            self.write(dinput, &dx)?;
        }
        self.write(a.dweight, &dweight)?;
        self.write(a.dbias, &dbias)
    }

    /// The convolutional trunk forward, fused: the gather and both conv layers. Defined as
    /// [`Ops::gather_conv_relu_pool_forward`] then [`Ops::conv_relu_pool_forward`]
    /// ([`trunk_forward_by_layers`]).
    fn trunk_forward(&mut self, a: TrunkForward<Self>) -> Result<()> {
        trunk_forward_by_layers(self, a)
    }

    /// The convolutional trunk backward, fused: [`Ops::conv_backward_from_pool`] of conv2 (with
    /// its input gradient, `dpooled1`) then of conv1 ([`trunk_backward_by_layers`]).
    fn trunk_backward(&mut self, a: TrunkBackward<Self>) -> Result<()> {
        trunk_backward_by_layers(self, a)
    }

    /// The fully connected head's whole step, fused: each layer forward (ReLU after the first
    /// two), the softmax cross-entropy of the logits, and each layer backward, down to the
    /// gradient with respect to the head's input. Defined as those ops in that order
    /// ([`head_by_layers`]).
    fn head_forward_backward(&mut self, a: Head<Self>) -> Result<()> {
        head_by_layers(self, a)
    }

    /// One optimizer step over every tensor, by whichever optimizer `a.step` belongs to, exactly
    /// as PyTorch's (see [`crate::optim`]); each gradient is the in-order sum of its partials.
    fn update(&mut self, a: Update<Self>) -> Result<()> {
        let step = a.step;
        host_update(self, a.params, a.grads, a.moments, step.moments(), |p, g, states| {
            reference::optimizer_update(p, g, states, step)
        })
    }
}

/// [`Ops::gather_conv_relu_pool_forward`] as its two parts, for implementations without a fused
/// kernel for a shape.
pub fn gather_then_conv<O: Ops + ?Sized>(ops: &mut O, g: Gather<O>, l: ConvLayer<O>) -> Result<()> {
    ops.gather(GatherArgs { input: &mut *g.input, labels: g.labels, batch: g.batch })?;
    ops.conv_relu_pool_forward(g.input, l)
}

/// [`Ops::linear_xent_forward_backward`] as its three parts, for implementations without a
/// fused kernel for a shape.
pub fn linear_then_xent<O: Ops + ?Sized>(ops: &mut O, a: LinearXent<O>) -> Result<()> {
    let (s, input, weight) = (a.s, a.input, a.weight);
    ops.linear_forward(LinearForwardArgs {
        input,
        weight,
        bias: a.bias,
        out: &mut *a.logits,
        s,
        relu: false,
    })?;
    let (logits, dlogits) = (&*a.logits, &mut *a.dlogits);
    let xent = SoftmaxXentArgs {
        logits,
        labels: a.labels,
        dlogits: &mut *dlogits,
        losses: a.losses,
        correct: a.correct,
        batch: s.batch,
        classes: s.out_features,
    };
    ops.softmax_xent(xent)?;
    let (dweight, dbias, dinput) = (a.dweight, a.dbias, a.dinput);
    ops.linear_backward(LinearBackwardArgs { dout: dlogits, input, weight, dweight, dbias, dinput, s })
}

/// [`Ops::trunk_forward`] as the per-layer ops, in the network's order.
pub fn trunk_forward_by_layers<O: Ops + ?Sized>(ops: &mut O, a: TrunkForward<O>) -> Result<()> {
    let TrunkForwardArgs { gather, conv1, conv2, .. } = a;
    let ConvLayerArgs { weight, bias, conv, pooled, argmax, s } = conv1;
    ops.gather_conv_relu_pool_forward(
        gather,
        ConvLayerArgs { weight, bias, conv, pooled: &mut *pooled, argmax, s },
    )?;
    ops.conv_relu_pool_forward(pooled, conv2)
}

/// [`Ops::trunk_backward`] as the per-layer ops, in the network's order.
pub fn trunk_backward_by_layers<O: Ops + ?Sized>(ops: &mut O, a: TrunkBackward<O>) -> Result<()> {
    let TrunkBackwardArgs { dpooled, conv2: l2, dpooled1, conv1: l1, s } = a;
    ops.conv_backward_from_pool(ConvBackwardArgs {
        dpooled,
        conv: l2.conv,
        argmax: l2.argmax,
        input: l2.input,
        weight: l2.weight,
        dweight: l2.dweight,
        dbias: l2.dbias,
        dinput: Some(&mut *dpooled1),
        s: s.conv2,
    })?;
    ops.conv_backward_from_pool(ConvBackwardArgs {
        dpooled: dpooled1,
        conv: l1.conv,
        argmax: l1.argmax,
        input: l1.input,
        weight: l1.weight,
        dweight: l1.dweight,
        dbias: l1.dbias,
        dinput: None,
        s: s.conv1,
    })
}

/// [`Ops::head_forward_backward`] as the per-layer ops, in the order the network calls them one
/// by one (the CPU's bits are those of that order).
pub fn head_by_layers<O: Ops + ?Sized>(ops: &mut O, a: Head<O>) -> Result<()> {
    let HeadArgs { input, layers: [l1, l2, l3], labels, losses, correct, dinput, s } = a;
    let [s1, s2, s3] = s.layers();
    let (w1, b1, w2, b2) = (l1.weight, l1.bias, l2.weight, l2.bias);
    ops.linear_forward(LinearForwardArgs {
        input,
        weight: w1,
        bias: b1,
        out: &mut *l1.out,
        s: s1,
        relu: true,
    })?;
    ops.linear_forward(LinearForwardArgs {
        input: &*l1.out,
        weight: w2,
        bias: b2,
        out: &mut *l2.out,
        s: s2,
        relu: true,
    })?;
    ops.linear_xent_forward_backward(LinearXentArgs {
        input: &*l2.out,
        weight: l3.weight,
        bias: l3.bias,
        labels,
        logits: l3.out,
        dlogits: l3.dout,
        losses,
        correct,
        dweight: l3.dweight,
        dbias: l3.dbias,
        dinput: Some(InputGradArgs { dinput: &mut *l2.dout, relu_mask: Some(&*l2.out) }),
        s: s3,
    })?;
    ops.linear_backward(LinearBackwardArgs {
        dout: &*l2.dout,
        input: &*l1.out,
        weight: w2,
        dweight: l2.dweight,
        dbias: l2.dbias,
        dinput: Some(InputGradArgs { dinput: &mut *l1.dout, relu_mask: Some(&*l1.out) }),
        s: s2,
    })?;
    ops.linear_backward(LinearBackwardArgs {
        dout: &*l1.dout,
        input,
        weight: w1,
        dweight: l1.dweight,
        dbias: l1.dbias,
        dinput: Some(InputGradArgs { dinput, relu_mask: None }),
        s: s1,
    })
}

/// An optimizer step on host copies: `update(param, summed-gradient partials, moments)` per
/// tensor, with `moments` of the tensor's size each.
fn host_update<O: Ops + ?Sized>(
    ops: &mut O,
    params: &mut [F32<O>],
    grads: &[F32<O>],
    moments: &mut [Vec<F32<O>>],
    n_moments: usize,
    update: impl Fn(&mut [f32], &[f32], &mut [&mut [f32]]),
) -> Result<()> {
    let n = params.len();
    anyhow::ensure!(grads.len() == n, "one gradient per tensor");
    anyhow::ensure!(
        moments.len() == n_moments && moments.iter().all(|m| m.len() == n),
        "the optimizer's state does not match its tensors"
    );
    for i in 0..n {
        let [mut p, g] = host(ops, [&params[i], &grads[i]])?;
        let mut m: Vec<Vec<f32>> = moments.iter().map(|m| ops.read(&m[i])).collect::<Result<_>>()?;
        anyhow::ensure!(m.iter().all(|m| m.len() == p.len()), "optimizer state has the wrong size");
        let mut views: Vec<&mut [f32]> = m.iter_mut().map(|m| m.as_mut_slice()).collect();
        update(&mut p, &g, &mut views);
        ops.write(&mut params[i], &p)?;
        for (list, values) in moments.iter_mut().zip(&m) {
            ops.write(&mut list[i], values)?;
        }
    }
    Ok(())
}

/// Host copies of `bufs` (the default methods' inputs).
fn host<O: Ops + ?Sized, T: Elem, const N: usize>(ops: &mut O, bufs: [&O::Buf<T>; N]) -> Result<[Vec<T>; N]> {
    let mut out = Vec::with_capacity(N);
    for buf in bufs {
        out.push(ops.read(buf)?);
    }
    Ok(out.try_into().unwrap_or_else(|_| unreachable!("N buffers read")))
}
