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

use crate::cpu::reference;
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
    ) -> Result<()> {
        let [input, weight, bias] = host(self, [input, weight, bias])?;
        let mut conv = vec![0.0; s.output_len()];
        let (mut pooled, mut argmax) = (vec![0.0; s.pooled_len()], vec![0; s.pooled_len()]);
        reference::conv_relu_pool_forward(&mut conv, &mut pooled, &mut argmax, &input, &weight, &bias, s);
        self.write(out.conv, &conv)?;
        self.write(out.pooled, &pooled)?;
        self.write(out.argmax, &argmax)
    }

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
        gather_then_conv_relu_pool(self, input, labels, batch, out, weight, bias, s)
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
    ) -> Result<()> {
        let [input, weight, bias] = host(self, [input, weight, bias])?;
        let mut y = vec![0.0; s.batch * s.out_features];
        reference::linear_layer_forward(&mut y, &input, &weight, &bias, s, relu);
        self.write(out, &y)
    }

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
    ) -> Result<()> {
        let ([logits], [labels]) = (host(self, [logits])?, host(self, [labels])?);
        anyhow::ensure!(labels.iter().all(|&l| (l as usize) < classes), "a label is not below {classes}");
        let (mut dlogits, mut losses, mut correct) =
            (vec![0.0; logits.len()], vec![0.0; batch], vec![0; batch]);
        reference::softmax_xent(&mut dlogits, &mut losses, &mut correct, &logits, &labels, batch, classes);
        self.write(out.dlogits, &dlogits)?;
        self.write(out.losses, &losses)?;
        self.write(out.correct, &correct)
    }

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
        linear_then_xent(self, logits, xent, grads, dinput, input, labels, weight, bias, s)
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
    ) -> Result<()> {
        let [dout, input, weight] = host(self, [dout, input, weight])?;
        let (mut dweight, mut dbias) = (vec![0.0; s.weight_len()], vec![0.0; s.out_features]);
        let mut dx = vec![0.0; s.batch * s.in_features];
        let (dinput, mask) = match dinput {
            Some(InputGrad { dinput, relu_mask }) => {
                (Some(dinput), relu_mask.map(|m| self.read(m)).transpose()?)
            }
            None => (None, None),
        };
        let dx_mask = dinput.is_some().then_some((dx.as_mut_slice(), mask.as_deref()));
        reference::linear_layer_backward(&mut dweight, &mut dbias, dx_mask, &dout, &input, &weight, s);
        if let Some(dinput) = dinput {
            self.write(dinput, &dx)?;
        }
        self.write(grads.dweight, &dweight)?;
        self.write(grads.dbias, &dbias)
    }

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
    ) -> Result<()> {
        let [dpooled, conv, input, weight] = host(self, [dpooled, saved.conv, input, weight])?;
        let [argmax] = host(self, [saved.argmax])?;
        let (mut dweight, mut dbias) = (vec![0.0; s.weight_len()], vec![0.0; s.out_channels]);
        let mut dx = vec![0.0; s.input_len()];
        let dx_ref = dinput.is_some().then_some(dx.as_mut_slice());
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
        if let Some(dinput) = dinput {
            self.write(dinput, &dx)?;
        }
        self.write(grads.dweight, &dweight)?;
        self.write(grads.dbias, &dbias)
    }

    /// One step of Adam over every tensor, exactly `torch.optim.Adam`'s (see
    /// [`crate::optim`]); each gradient is the in-order sum of its partials.
    fn adam_update(
        &mut self,
        params: &mut [Self::Buf<f32>],
        grads: &[Self::Buf<f32>],
        m: &mut [Self::Buf<f32>],
        v: &mut [Self::Buf<f32>],
        step: &AdamStep,
    ) -> Result<()> {
        let n = params.len();
        anyhow::ensure!(
            grads.len() == n && m.len() == n && v.len() == n,
            "one gradient and moment per tensor"
        );
        for (((p, g), m), v) in params.iter_mut().zip(grads).zip(m.iter_mut()).zip(v.iter_mut()) {
            let [mut hp, hg, mut hm, mut hv] = host(self, [&*p, g, &*m, &*v])?;
            anyhow::ensure!(
                hm.len() == hp.len() && hv.len() == hp.len(),
                "optimizer state has the wrong size"
            );
            reference::adam_update(&mut hp, &hg, &mut hm, &mut hv, step);
            self.write(p, &hp)?;
            self.write(m, &hm)?;
            self.write(v, &hv)?;
        }
        Ok(())
    }

    /// One step of SGD over every tensor, exactly `torch.optim.SGD`'s (see [`crate::optim`]).
    fn sgd_update(
        &mut self,
        params: &mut [Self::Buf<f32>],
        grads: &[Self::Buf<f32>],
        momentum: &mut [Self::Buf<f32>],
        step: &SgdStep,
    ) -> Result<()> {
        let n = params.len();
        anyhow::ensure!(grads.len() == n && momentum.len() == n, "one gradient and momentum per tensor");
        for ((p, g), b) in params.iter_mut().zip(grads).zip(momentum.iter_mut()) {
            let [mut hp, hg, mut hb] = host(self, [&*p, g, &*b])?;
            anyhow::ensure!(hb.len() == hp.len(), "optimizer state has the wrong size");
            reference::sgd_update(&mut hp, &hg, &mut hb, step);
            self.write(p, &hp)?;
            self.write(b, &hb)?;
        }
        Ok(())
    }
}

/// [`Ops::gather_conv_relu_pool_forward`] as its two parts, for implementations without a fused
/// kernel for a shape.
#[allow(clippy::too_many_arguments)]
pub fn gather_then_conv_relu_pool<O: Ops + ?Sized>(
    ops: &mut O,
    input: &mut O::Buf<f32>,
    labels: &mut O::Buf<u32>,
    batch: &BatchRef<O>,
    out: ConvPoolOut<O>,
    weight: &O::Buf<f32>,
    bias: &O::Buf<f32>,
    s: ConvShape,
) -> Result<()> {
    ops.gather(input, labels, batch)?;
    ops.conv_relu_pool_forward(out, input, weight, bias, s)
}

/// [`Ops::linear_xent_forward_backward`] as its three parts, for implementations without a
/// fused kernel for a shape.
#[allow(clippy::too_many_arguments)]
pub fn linear_then_xent<O: Ops + ?Sized>(
    ops: &mut O,
    logits: &mut O::Buf<f32>,
    xent: XentOut<O>,
    grads: ParamGrads<O>,
    dinput: Option<InputGrad<O>>,
    input: &O::Buf<f32>,
    labels: &O::Buf<u32>,
    weight: &O::Buf<f32>,
    bias: &O::Buf<f32>,
    s: LinearShape,
) -> Result<()> {
    ops.linear_forward(logits, input, weight, bias, s, false)?;
    let XentOut { dlogits, losses, correct } = xent;
    let xent = XentOut { dlogits: &mut *dlogits, losses, correct };
    ops.softmax_xent(xent, logits, labels, s.batch, s.out_features)?;
    ops.linear_backward(grads, dinput, dlogits, input, weight, s)
}

/// Host copies of `bufs` (the default methods' inputs).
fn host<O: Ops + ?Sized, T: Elem, const N: usize>(ops: &mut O, bufs: [&O::Buf<T>; N]) -> Result<[Vec<T>; N]> {
    let mut out = Vec::with_capacity(N);
    for buf in bufs {
        out.push(ops.read(buf)?);
    }
    Ok(out.try_into().unwrap_or_else(|_| unreachable!("N buffers read")))
}
