//! `torch.optim.RMSprop(lr, alpha, eps, weight_decay, momentum, centered)`:
//! g += weight_decay*p; sq = alpha*sq + (1-alpha)*g*g; centered: ga = lerp(ga, g, 1-alpha) and
//! avg = sqrt(sq - ga*ga) + eps, else avg = sqrt(sq) + eps; momentum > 0: buf = momentum*buf +
//! g/avg and p -= lr*buf, else p -= lr*g/avg. Its WGSL twin is `rmsprop` in shaders/optim.wgsl.
//!
//! Its three states are kept whatever the settings (zero where unused), as SGD keeps its buffer
//! at momentum 0: OneCycleLR turns the momentum on (PyTorch cycles it even from 0).

use anyhow::Result;

use super::adam::positive;
use super::{
    boolean, check_range, float, settings_as_metadata, Flags, Meta, Naming, Rule, Scalars, Scale, State,
    MAX_STATES,
};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RmsProp {
    pub alpha: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    pub centered: bool,
}

impl Default for RmsProp {
    fn default() -> Self {
        RmsProp { alpha: 0.99, eps: 1e-8, weight_decay: 0.0, momentum: 0.0, centered: false }
    }
}

impl Rule for RmsProp {
    const NAME: &'static str = "rmsprop";
    const TORCH: &'static str =
        "torch.optim.RMSprop(lr, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False)";
    const STATES: &'static [State] = &[
        State { name: "square_avg", non_negative: true, scale: Scale::GradSquared },
        State { name: "momentum_buffer", non_negative: false, scale: Scale::Step },
        State { name: "grad_avg", non_negative: false, scale: Scale::Grad },
    ];
    const FLAGS: &'static [&'static str] = &["--alpha", "--momentum", "--weight-decay", "--centered"];
    const CYCLED: Option<&'static str> = Some("momentum");

    fn from_flags(f: &Flags, base: Self) -> Self {
        RmsProp {
            alpha: f.alpha.unwrap_or(base.alpha),
            eps: base.eps,
            weight_decay: f.weight_decay.unwrap_or(base.weight_decay),
            momentum: f.momentum.unwrap_or(base.momentum),
            centered: f.centered || base.centered,
        }
    }

    fn validate(&self, n: Naming) -> Result<()> {
        // PyTorch takes any alpha >= 0; from 1 up the mean of squares stops following the
        // gradients (or goes negative), so those are refused too.
        check_range(n, "alpha", self.alpha, 0.0, Some(1.0))?;
        positive(n, "eps", self.eps)?;
        check_range(n, "weight_decay", self.weight_decay, 0.0, None)?;
        check_range(n, "momentum", self.momentum, 0.0, None)
    }

    fn describe(&self) -> String {
        format!(
            "alpha {}, eps {}, weight decay {}, momentum {}{}",
            self.alpha,
            self.eps,
            self.weight_decay,
            self.momentum,
            if self.centered { ", centered" } else { "" }
        )
    }

    settings_as_metadata!(RmsProp {
        alpha: float,
        eps: float,
        weight_decay: float,
        momentum: float,
        centered: boolean
    });

    /// [lr, alpha, 1-alpha, eps, weight_decay, momentum, centered (1 or 0)]
    fn scalars(&self, _t: u64, lr: f64, cycled: Option<f64>) -> Scalars {
        let momentum = cycled.unwrap_or(self.momentum);
        let centered = if self.centered { 1.0 } else { 0.0 };
        [
            lr as f32,
            self.alpha as f32,
            (1.0 - self.alpha) as f32,
            self.eps as f32,
            self.weight_decay as f32,
            momentum as f32,
            centered,
            0.0,
        ]
    }

    #[inline]
    fn element(k: &Scalars, p: &mut f32, g: f32, s: &mut [f32; MAX_STATES]) {
        let [lr, alpha, one_minus_alpha, eps, weight_decay, momentum, centered, _] = *k;
        let [square_avg, buf, grad_avg] = s;
        let mut g = g;
        if weight_decay != 0.0 {
            g += weight_decay * *p;
        }
        *square_avg = *square_avg * alpha + one_minus_alpha * g * g;
        let avg = if centered != 0.0 {
            // torch's lerp: self + w*(end - self) below w = 0.5, else end - (end - self)*(1 - w).
            *grad_avg = if one_minus_alpha < 0.5 {
                *grad_avg + one_minus_alpha * (g - *grad_avg)
            } else {
                g - (g - *grad_avg) * (1.0 - one_minus_alpha)
            };
            (*square_avg - *grad_avg * *grad_avg).sqrt() + eps
        } else {
            square_avg.sqrt() + eps
        };
        if momentum > 0.0 {
            *buf = *buf * momentum + g / avg;
            *p -= lr * *buf;
        } else {
            *p += (-lr * g) / avg;
        }
    }
}
