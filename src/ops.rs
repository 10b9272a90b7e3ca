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
use crate::optim::{AdamStep, SgdStep};

/// What a buffer can hold.
pub trait Elem: bytemuck::Pod + Default + PartialEq + std::fmt::Debug + Send + Sync + 'static {}
impl Elem for f32 {}
impl Elem for u32 {}
impl Elem for i32 {}

/// The shape of a 2-D convolution over a batch, NCHW, square kernel, stride 1, zero padding.
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
    /// Elements of the 2x2 max-pool of the output.
    pub fn pooled_len(&self) -> usize {
        self.output_len() / 4
    }
    pub fn weight_len(&self) -> usize {
        self.out_channels * self.in_channels * self.kernel * self.kernel
    }
    /// Multiply-accumulates of the forward pass.
    pub fn macs(&self) -> usize {
        self.output_len() * self.in_channels * self.kernel * self.kernel
    }
    /// The same convolution at another batch size.
    pub fn with_batch(self, batch: usize) -> Self {
        ConvShape { batch, ..self }
    }
}

/// The shape of a fully connected layer over a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearShape {
    pub batch: usize,
    pub in_features: usize,
    pub out_features: usize,
}

impl LinearShape {
    pub fn weight_len(&self) -> usize {
        self.in_features * self.out_features
    }
    pub fn macs(&self) -> usize {
        self.batch * self.weight_len()
    }
}

/// Which op writes a weight gradient, for [`Ops::grad_partials`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradOp {
    /// A conv layer's backward pass, and whether it computes the input gradient too.
    ConvFromPool(ConvShape, bool),
    Linear(LinearShape),
    LinearXent(LinearShape),
}

/// The batch a training step reads: which samples, and how each image is shifted.
pub struct BatchRef<'a, O: Ops + ?Sized> {
    pub data: &'a O::Data,
    /// Sample indices into `data` [B].
    pub indices: &'a O::Buf<u32>,
    /// Per image (dx, dy) [2B]: the image is translated by whole pixels, zero-filled
    /// (`input[y][x] = image[y - dy][x - dx]`).
    pub shifts: &'a O::Buf<i32>,
    pub batch: usize,
}

/// The outputs of a conv + bias + ReLU + 2x2 max-pool layer.
pub struct ConvPoolOut<'a, O: Ops + ?Sized> {
    /// ReLU(conv + bias) [B, Cout, Ho, Wo]: the backward pass's ReLU mask.
    pub conv: &'a mut O::Buf<f32>,
    /// [B, Cout, Ho/2, Wo/2]
    pub pooled: &'a mut O::Buf<f32>,
    /// For each pooled element, the flat index into `conv` of its window's first maximum in
    /// row-major order (the element the gradient goes to).
    pub argmax: &'a mut O::Buf<u32>,
}

/// The forward tensors of a conv + ReLU + max-pool layer that its backward pass reads.
pub struct ConvPoolSaved<'a, O: Ops + ?Sized> {
    pub conv: &'a O::Buf<f32>,
    pub argmax: &'a O::Buf<u32>,
}

/// Per-image results of softmax cross-entropy.
pub struct XentOut<'a, O: Ops + ?Sized> {
    /// (softmax - onehot) / B [B, C]
    pub dlogits: &'a mut O::Buf<f32>,
    /// -log softmax(logits)[label] [B]
    pub losses: &'a mut O::Buf<f32>,
    /// 1 where the first largest logit is the label [B]
    pub correct: &'a mut O::Buf<u32>,
}

/// A gradient with respect to a layer's input, and the ReLU mask to apply to it: the forward
/// output of the layer that produced that input, when that layer ends in a ReLU.
pub struct InputGrad<'a, O: Ops + ?Sized> {
    pub dinput: &'a mut O::Buf<f32>,
    pub relu_mask: Option<&'a O::Buf<f32>>,
}

/// A parameter tensor's weight and bias gradients (each `partials` x the tensor's size).
pub struct ParamGrads<'a, O: Ops + ?Sized> {
    pub dweight: &'a mut O::Buf<f32>,
    pub dbias: &'a mut O::Buf<f32>,
}

/// The ops. Each overwrites its outputs completely. The CPU ones compute at once; the GPU
/// records, and runs what it recorded when a buffer is read.
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

    /// How many partial sums the op writes for a weight gradient (and its bias's).
    fn grad_partials(&self, op: GradOp) -> usize {
        let _ = op;
        1
    }

    /// input[b] = the image `indices[b]` of the data set as pixels / 255, translated by
    /// `shifts[b]` (zero where it reads outside the image); labels[b] = its label.
    ///
    /// input: [B, rows * cols], labels: [B]
    fn gather(
        &mut self,
        input: &mut Self::Buf<f32>,
        labels: &mut Self::Buf<u32>,
        batch: &BatchRef<Self>,
    ) -> Result<()>;

    /// conv (stride 1, zero padding) + bias, ReLU, then 2x2 max-pool with its argmax:
    /// conv[b,co,y,x] = max(0, bias[co] + sum_{ci,ky,kx} weight[co,ci,ky,kx] * input[b,ci,y+ky-p,x+kx-p]).
    ///
    /// input: [B, Cin, H, W], weight: [Cout, Cin, K, K], bias: [Cout]; Ho and Wo even
    fn conv_relu_pool_forward(
        &mut self,
        out: ConvPoolOut<Self>,
        input: &Self::Buf<f32>,
        weight: &Self::Buf<f32>,
        bias: &Self::Buf<f32>,
        s: ConvShape,
    ) -> Result<()>;

    /// [`Ops::gather`] then [`Ops::conv_relu_pool_forward`] on the gathered batch (which
    /// `input` keeps for the backward pass).
    #[allow(clippy::too_many_arguments)]
    fn gather_conv_relu_pool_forward(
        &mut self,
        input: &mut Self::Buf<f32>,
        labels: &mut Self::Buf<u32>,
        batch: &BatchRef<Self>,
        out: ConvPoolOut<Self>,
        weight: &Self::Buf<f32>,
        bias: &Self::Buf<f32>,
        s: ConvShape,
    ) -> Result<()> {
        self.gather(input, labels, batch)?;
        self.conv_relu_pool_forward(out, input, weight, bias, s)
    }

    /// out[b,o] = bias[o] + sum_i input[b,i] * weight[o,i], then ReLU if `relu`.
    ///
    /// input: [B, In], weight: [Out, In], bias: [Out], out: [B, Out]
    fn linear_forward(
        &mut self,
        out: &mut Self::Buf<f32>,
        input: &Self::Buf<f32>,
        weight: &Self::Buf<f32>,
        bias: &Self::Buf<f32>,
        s: LinearShape,
        relu: bool,
    ) -> Result<()>;

    /// Softmax cross-entropy of each image and its gradient with respect to the logits, for a
    /// loss that is the mean over the batch: dlogits[b,c] = (softmax(logits[b])[c] - [c == label]) / B.
    ///
    /// logits: [B, C], labels: [B] (each below C)
    fn softmax_xent(
        &mut self,
        out: XentOut<Self>,
        logits: &Self::Buf<f32>,
        labels: &Self::Buf<u32>,
        batch: usize,
        classes: usize,
    ) -> Result<()>;

    /// The output layer's whole step: the logits ([`Ops::linear_forward`], no ReLU), the loss
    /// and its gradient ([`Ops::softmax_xent`]), and the layer's backward pass
    /// ([`Ops::linear_backward`]).
    #[allow(clippy::too_many_arguments)]
    fn linear_xent_forward_backward(
        &mut self,
        logits: &mut Self::Buf<f32>,
        xent: XentOut<Self>,
        grads: ParamGrads<Self>,
        dinput: Option<InputGrad<Self>>,
        input: &Self::Buf<f32>,
        labels: &Self::Buf<u32>,
        weight: &Self::Buf<f32>,
        bias: &Self::Buf<f32>,
        s: LinearShape,
    ) -> Result<()> {
        self.linear_forward(logits, input, weight, bias, s, false)?;
        let XentOut { dlogits, losses, correct } = xent;
        self.softmax_xent(
            XentOut { dlogits: &mut *dlogits, losses, correct },
            logits,
            labels,
            s.batch,
            s.out_features,
        )?;
        self.linear_backward(grads, dinput, dlogits, input, weight, s)
    }

    /// A fully connected layer's backward pass: dweight[o,i] = sum_b dout[b,o] * input[b,i],
    /// dbias[o] = sum_b dout[b,o], and, when asked, dinput = dout · weight (zero where the
    /// ReLU mask is not positive).
    ///
    /// dout: [B, Out], input: [B, In], weight: [Out, In]; dinput: [B, In]
    fn linear_backward(
        &mut self,
        grads: ParamGrads<Self>,
        dinput: Option<InputGrad<Self>>,
        dout: &Self::Buf<f32>,
        input: &Self::Buf<f32>,
        weight: &Self::Buf<f32>,
        s: LinearShape,
    ) -> Result<()>;

    /// The backward pass of conv + bias + ReLU + 2x2 max-pool, fed by the pooled gradient:
    /// each pooled gradient goes to its window's argmax where the conv output there is
    /// positive (ReLU), giving dconv; then dweight[co,ci,ky,kx] = sum_{b,y,x} dconv[b,co,y,x] *
    /// input[b,ci,y+ky-p,x+kx-p], dbias[co] = sum dconv[b,co,..], and, when asked,
    /// dinput[b,ci,iy,ix] = sum over the outputs reading input[b,ci,iy,ix] of dconv * weight.
    ///
    /// dpooled: [B, Cout, Ho/2, Wo/2], input: [B, Cin, H, W]; dinput: [B, Cin, H, W]
    #[allow(clippy::too_many_arguments)]
    fn conv_backward_from_pool(
        &mut self,
        grads: ParamGrads<Self>,
        dinput: Option<&mut Self::Buf<f32>>,
        dpooled: &Self::Buf<f32>,
        saved: ConvPoolSaved<Self>,
        input: &Self::Buf<f32>,
        weight: &Self::Buf<f32>,
        s: ConvShape,
    ) -> Result<()>;

    /// One step of Adam over every tensor, exactly `torch.optim.Adam`'s (see
    /// [`crate::optim`]); each gradient is the in-order sum of its partials.
    fn adam_update(
        &mut self,
        params: &mut [Self::Buf<f32>],
        grads: &[Self::Buf<f32>],
        m: &mut [Self::Buf<f32>],
        v: &mut [Self::Buf<f32>],
        step: &AdamStep,
    ) -> Result<()>;

    /// One step of SGD over every tensor, exactly `torch.optim.SGD`'s (see [`crate::optim`]).
    fn sgd_update(
        &mut self,
        params: &mut [Self::Buf<f32>],
        grads: &[Self::Buf<f32>],
        momentum: &mut [Self::Buf<f32>],
        step: &SgdStep,
    ) -> Result<()>;
}
