//! `torch.optim.Adam(lr, betas, eps)` (no weight decay, no amsgrad):
//! m = lerp(m, g, 1-b1); v = b2*v + (1-b2)*g*g; p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps).
//! Its WGSL twin is `adam` in shaders/optim.wgsl.

use anyhow::Result;

use super::{
    check_range, float, settings_as_metadata, Flags, Meta, Naming, Rule, Scalars, Scale, State, MAX_STATES,
};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adam {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for Adam {
    fn default() -> Self {
        Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }
}

impl Rule for Adam {
    const NAME: &'static str = "adam";
    const TORCH: &'static str = "torch.optim.Adam(lr, betas=(0.9, 0.999), eps=1e-8)";
    // The names checkpoints have used from the start (PyTorch's exp_avg, exp_avg_sq).
    const STATES: &'static [State] = &[
        State { name: "m", non_negative: false, scale: Scale::Grad },
        State { name: "v", non_negative: true, scale: Scale::GradSquared },
    ];
    const FLAGS: &'static [&'static str] = &[];
    const CYCLED: Option<&'static str> = Some("beta1");

    fn from_flags(_: &Flags, base: Self) -> Self {
        base
    }

    fn validate(&self, n: Naming) -> Result<()> {
        check_range(n, "beta1", self.beta1, 0.0, Some(1.0))?;
        check_range(n, "beta2", self.beta2, 0.0, Some(1.0))?;
        positive(n, "eps", self.eps)
    }

    fn describe(&self) -> String {
        format!("betas {}/{}, eps {}", self.beta1, self.beta2, self.eps)
    }

    settings_as_metadata!(Adam { beta1: float, beta2: float, eps: float });

    /// [step_size = lr/(1-b1^t), sqrt(1-b2^t), 1-b1, b2, 1-b2, eps]
    fn scalars(&self, t: u64, lr: f64, cycled: Option<f64>) -> Scalars {
        let beta1 = cycled.unwrap_or(self.beta1);
        // torch: bias_correction = 1 - beta ** step, with step a Python float.
        let bc1 = 1.0 - beta1.powf(t as f64);
        let bc2 = 1.0 - self.beta2.powf(t as f64);
        [
            (lr / bc1) as f32,
            bc2.sqrt() as f32,
            (1.0 - beta1) as f32,
            self.beta2 as f32,
            (1.0 - self.beta2) as f32,
            self.eps as f32,
            0.0,
            0.0,
        ]
    }

    #[inline]
    fn element(k: &Scalars, p: &mut f32, g: f32, s: &mut [f32; MAX_STATES]) {
        let [step_size, bias_correction2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps, ..] = *k;
        let [m, v, _] = s;
        *m += one_minus_beta1 * (g - *m);
        *v = *v * beta2 + one_minus_beta2 * g * g;
        let denom = v.sqrt() / bias_correction2_sqrt + eps;
        *p -= step_size * (*m / denom);
    }
}

/// Refuses a setting that is not a finite number above 0.
pub(super) fn positive(n: Naming, key: &str, x: f64) -> Result<()> {
    if !(x.is_finite() && x > 0.0) {
        anyhow::bail!("{} = {x} must be a finite number > 0", n.name(key));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::optim::Optimizer;

    #[test]
    fn scalars_follow_torch_in_f64() {
        let opt = Optimizer::default();
        let s = opt.step(1, 1e-3, None).scalars;
        // torch: step_size = lr / (1 - 0.9**1) in Python floats = 0.009999999999999995
        assert_eq!(s[0], (1e-3f64 / (1.0 - 0.9f64)) as f32);
        assert_eq!(s[1], (1.0f64 - 0.999).sqrt() as f32);
        // 1 - beta1 taken in f64 then rounded (0.1f32), not 1 - 0.9f32 (0.100000024).
        assert_eq!(s[2], 0.1f32);
        let cycled = opt.step(3, 2e-3, Some(0.95)).scalars;
        assert_eq!(cycled[0], (2e-3 / (1.0 - 0.95f64.powf(3.0))) as f32);
        assert_eq!(cycled[2], (1.0 - 0.95f64) as f32);
    }
}
