//! Op calls as values: which op of [`crate::ops::Ops`], with which shapes. The GPU tags its
//! dispatches with the call that recorded them, the bench makes its rows of them, and the op
//! checks ([`crate::opcheck`], test support) draw inputs for them.

use crate::ops::*;
use crate::optim::OptStep;

/// One call of an op with its shapes: what a test or the bench checks and times.
#[derive(Clone, Debug, PartialEq)]
pub enum OpCase {
    Gather {
        batch: usize,
        images: usize,
        side: usize,
        max_shift: i32,
    },
    ConvReluPool(ConvShape),
    GatherConvReluPool {
        s: ConvShape,
        images: usize,
        max_shift: i32,
    },
    Linear {
        s: LinearShape,
        relu: bool,
    },
    SoftmaxXent {
        batch: usize,
        classes: usize,
    },
    /// `mask`: None without an input gradient, else whether it is ReLU-masked.
    LinearXent {
        s: LinearShape,
        mask: Option<bool>,
    },
    LinearBackward {
        s: LinearShape,
        mask: Option<bool>,
    },
    ConvBackwardFromPool {
        s: ConvShape,
        dinput: bool,
    },
    /// One step of an optimizer: the tensors' sizes, their gradients' partial counts, and the
    /// step (which optimizer, its scalars).
    /// The fully connected head's whole step ([`crate::ops::Ops::head_forward_backward`]).
    Head(HeadShape),
    /// The convolutional trunk forward, gathering from a data set of `images` shifted by up to
    /// `max_shift` pixels ([`crate::ops::Ops::trunk_forward`]).
    TrunkForward {
        s: TrunkShape,
        images: usize,
        max_shift: i32,
    },
    /// The convolutional trunk backward ([`crate::ops::Ops::trunk_backward`]).
    TrunkBackward(TrunkShape),
    Update {
        lens: Vec<usize>,
        partials: Vec<usize>,
        step: OptStep,
    },
}

impl OpCase {
    /// The op's name in [`Ops`].
    pub fn op(&self) -> &'static str {
        self.names().0
    }

    /// What the op computes, in a few words (the bench's "direction" column).
    pub fn direction(&self) -> String {
        match self {
            OpCase::Update { step, .. } => format!("{} update", step.optimizer),
            _ => self.names().1.to_string(),
        }
    }

    fn names(&self) -> (&'static str, &'static str) {
        match self {
            OpCase::Gather { .. } => ("gather", "gather"),
            OpCase::ConvReluPool(_) => ("conv_relu_pool_forward", "forward+relu+pool"),
            OpCase::GatherConvReluPool { .. } => ("gather_conv_relu_pool_forward", "gather+fwd+relu+pool"),
            OpCase::Linear { relu: true, .. } => ("linear_forward", "forward+relu"),
            OpCase::Linear { relu: false, .. } => ("linear_forward", "forward"),
            OpCase::SoftmaxXent { .. } => ("softmax_xent", "softmax xent"),
            OpCase::LinearXent { .. } => ("linear_xent_forward_backward", "fwd+xent+bwd"),
            OpCase::LinearBackward { .. } => ("linear_backward", "backward"),
            OpCase::ConvBackwardFromPool { .. } => ("conv_backward_from_pool", "backward from pool"),
            OpCase::Head(_) => ("head_forward_backward", "fwd+xent+bwd, x3"),
            OpCase::TrunkForward { .. } => ("trunk_forward", "gather+fwd+pool, x2"),
            OpCase::TrunkBackward(_) => ("trunk_backward", "bwd from pool, x2"),
            OpCase::Update { .. } => ("update", "update"),
        }
    }

    /// Floating-point operations of one call (2 per multiply-accumulate), or None for the
    /// memory-bound ops (rated by [`OpCase::bytes`]).
    pub fn flops(&self) -> Option<f64> {
        let conv_fwd = |s: &ConvShape| 2.0 * s.macs() as f64;
        Some(match self {
            OpCase::ConvReluPool(s) | OpCase::GatherConvReluPool { s, .. } => conv_fwd(s),
            OpCase::Linear { s, .. } => 2.0 * s.macs() as f64,
            OpCase::LinearXent { s, mask } => 2.0 * s.macs() as f64 * if mask.is_some() { 3.0 } else { 2.0 },
            OpCase::LinearBackward { s, mask } => {
                2.0 * s.macs() as f64 * if mask.is_some() { 2.0 } else { 1.0 }
            }
            OpCase::ConvBackwardFromPool { s, dinput } => conv_fwd(s) * if *dinput { 2.0 } else { 1.0 },
            // Each layer forward, its weight gradient and its input gradient.
            OpCase::Head(h) => h.layers().iter().map(|s| 6.0 * s.macs() as f64).sum(),
            OpCase::TrunkForward { s, .. } => conv_fwd(&s.conv1) + conv_fwd(&s.conv2),
            // conv1's weight gradient, conv2's and its input gradient.
            OpCase::TrunkBackward(s) => conv_fwd(&s.conv1) + 2.0 * conv_fwd(&s.conv2),
            _ => return None,
        })
    }

    /// Bytes read and written once by one call (for the memory-bound ops' GB/s).
    pub fn bytes(&self) -> f64 {
        4.0 * match self {
            OpCase::Gather { batch, side, .. } => batch * side * side * 5 / 4 + 4 * batch,
            OpCase::SoftmaxXent { batch, classes } => 2 * batch * classes + 3 * batch,
            // The partials and the parameter read, the parameter and each state read and written.
            OpCase::Update { lens, partials, step } => {
                lens.iter().zip(partials).map(|(n, p)| n * (p + 2 + 2 * step.moments())).sum()
            }
            OpCase::ConvReluPool(s) | OpCase::GatherConvReluPool { s, .. } => {
                s.input_len() + s.weight_len() + s.output_len() + 2 * s.pooled_len()
            }
            OpCase::Linear { s, .. } | OpCase::LinearXent { s, .. } | OpCase::LinearBackward { s, .. } => {
                s.batch * (s.in_features + s.out_features) + s.weight_len()
            }
            OpCase::ConvBackwardFromPool { s, .. } => 2 * s.input_len() + s.output_len() + 2 * s.pooled_len(),
            OpCase::TrunkForward { s, .. } => [s.conv1, s.conv2]
                .iter()
                .map(|c| c.input_len() + c.weight_len() + c.output_len() + 2 * c.pooled_len())
                .sum(),
            OpCase::TrunkBackward(s) => [s.conv1, s.conv2]
                .iter()
                .map(|c| 2 * c.input_len() + c.output_len() + 2 * c.pooled_len())
                .sum(),
            OpCase::Head(h) => h
                .layers()
                .iter()
                .map(|s| 3 * s.batch * (s.in_features + s.out_features) + 2 * s.weight_len())
                .sum(),
        } as f64
    }
}

/// Whether an input gradient is asked for (Some) and masked by a ReLU (true): [`OpCase`]'s
/// `mask`.
pub fn relu_mask_of<F>(dinput: &Option<InputGradArgs<F>>) -> Option<bool> {
    dinput.as_ref().map(|d| d.relu_mask.is_some())
}

/// An optimizer call's tensor sizes and gradient partial counts, from `len` of each buffer.
pub fn update_shapes<F>(params: &[F], grads: &[F], len: impl Fn(&F) -> usize) -> (Vec<usize>, Vec<usize>) {
    let lens: Vec<usize> = params.iter().map(&len).collect();
    let partials = grads.iter().zip(&lens).map(|(g, &n)| len(g) / n.max(1)).collect();
    (lens, partials)
}
