//! `torch.optim.SGD(lr, momentum, nesterov, weight_decay)` (dampening 0, no maximize):
//! g += weight_decay*p; buf = momentum*buf + g; g = nesterov ? g + momentum*buf : buf; p -= lr*g.
//! Its WGSL twin is `sgd` in shaders/optim.wgsl.

use anyhow::{bail, Result};

use super::{
    boolean, check_range, float, settings_as_metadata, Flags, Meta, Naming, Rule, Scalars, Scale, State,
    MAX_STATES,
};

#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Sgd {
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
}

impl Rule for Sgd {
    const NAME: &'static str = "sgd";
    const TORCH: &'static str = "torch.optim.SGD(lr, momentum=0, nesterov=False, weight_decay=0)";
    // The buffer is kept even at momentum 0: the update is then buf = g, the same bits as
    // PyTorch's buffer-less path.
    const STATES: &'static [State] = &[State { name: "momentum", non_negative: false, scale: Scale::Grad }];
    const FLAGS: &'static [&'static str] = &["--momentum", "--nesterov", "--weight-decay"];
    const CYCLED: Option<&'static str> = Some("momentum");

    fn from_flags(f: &Flags, base: Self) -> Self {
        Sgd {
            momentum: f.momentum.unwrap_or(base.momentum),
            nesterov: f.nesterov || base.nesterov,
            weight_decay: f.weight_decay.unwrap_or(base.weight_decay),
        }
    }

    fn validate(&self, n: Naming) -> Result<()> {
        check_range(n, "momentum", self.momentum, 0.0, None)?;
        check_range(n, "weight_decay", self.weight_decay, 0.0, None)?;
        if self.nesterov && self.momentum <= 0.0 {
            bail!("{} needs {} above 0 (as torch.optim.SGD)", n.name("nesterov"), n.name("momentum"));
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "momentum {}{}, weight decay {}",
            self.momentum,
            if self.nesterov { ", Nesterov" } else { "" },
            self.weight_decay
        )
    }

    settings_as_metadata!(Sgd { momentum: float, nesterov: boolean, weight_decay: float });

    /// [lr, momentum, weight_decay, nesterov (1 or 0)]
    fn scalars(&self, _t: u64, lr: f64, cycled: Option<f64>) -> Scalars {
        let momentum = cycled.unwrap_or(self.momentum);
        let nesterov = if self.nesterov { 1.0 } else { 0.0 };
        [lr as f32, momentum as f32, self.weight_decay as f32, nesterov, 0.0, 0.0, 0.0, 0.0]
    }

    #[inline]
    fn element(k: &Scalars, p: &mut f32, g: f32, s: &mut [f32; MAX_STATES]) {
        let [lr, momentum, weight_decay, nesterov, ..] = *k;
        let buf = &mut s[0];
        let mut g = g;
        if weight_decay != 0.0 {
            g += weight_decay * *p;
        }
        *buf = *buf * momentum + g;
        let step = if nesterov != 0.0 { g + momentum * *buf } else { *buf };
        *p -= lr * step;
    }
}
