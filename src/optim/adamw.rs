//! `torch.optim.AdamW(lr, betas, eps, weight_decay)` (no amsgrad): Adam after a decoupled decay,
//! p *= 1 - lr*weight_decay; then m, v and p as [`super::Adam`]. Its WGSL twin is `adamw` in
//! shaders/optim.wgsl.

use anyhow::Result;

use super::adam::positive;
use super::{
    check_range, float, settings_as_metadata, Adam, Flags, Meta, Naming, Rule, Scalars, State, MAX_STATES,
};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 }
    }
}

impl AdamW {
    fn adam(&self) -> Adam {
        Adam { beta1: self.beta1, beta2: self.beta2, eps: self.eps }
    }
}

impl Rule for AdamW {
    const NAME: &'static str = "adamw";
    const TORCH: &'static str = "torch.optim.AdamW(lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)";
    const STATES: &'static [State] = Adam::STATES;
    const FLAGS: &'static [&'static str] = &["--weight-decay"];
    const CYCLED: Option<&'static str> = Some("beta1");

    fn from_flags(f: &Flags, base: Self) -> Self {
        AdamW { weight_decay: f.weight_decay.unwrap_or(base.weight_decay), ..base }
    }

    fn validate(&self, n: Naming) -> Result<()> {
        check_range(n, "beta1", self.beta1, 0.0, Some(1.0))?;
        check_range(n, "beta2", self.beta2, 0.0, Some(1.0))?;
        positive(n, "eps", self.eps)?;
        check_range(n, "weight_decay", self.weight_decay, 0.0, None)
    }

    fn describe(&self) -> String {
        format!("{}, weight decay {}", self.adam().describe(), self.weight_decay)
    }

    settings_as_metadata!(AdamW { beta1: float, beta2: float, eps: float, weight_decay: float });

    /// Adam's six, then decay = 1 - lr*weight_decay (a Python float, rounded once).
    fn scalars(&self, t: u64, lr: f64, cycled: Option<f64>) -> Scalars {
        let mut k = self.adam().scalars(t, lr, cycled);
        k[6] = (1.0 - lr * self.weight_decay) as f32;
        k
    }

    #[inline]
    fn element(k: &Scalars, p: &mut f32, g: f32, s: &mut [f32; MAX_STATES]) {
        *p *= k[6];
        Adam::element(k, p, g, s);
    }
}
