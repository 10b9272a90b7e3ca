//! The optimizers, each exactly as PyTorch's: settings, the names of their state buffers, and
//! the per-step scalars their update kernels read.
//!
//! Hyper-parameters are f64, as Python floats are; the scalars of each step are derived from
//! them in f64 and rounded once to f32, as PyTorch does when it hands a Python scalar to a float
//! kernel. The element-wise updates themselves are [`crate::cpu::reference::adam_update`] and
//! [`crate::cpu::reference::sgd_update`] (the specification) and their twins in the fast CPU
//! path and `shaders/optim.wgsl`.

use std::fmt;

use anyhow::{bail, Result};

/// `torch.optim.Adam` (no weight decay, no amsgrad):
/// m = lerp(m, g, 1-b1); v = b2*v + (1-b2)*g*g; p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps).
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

/// `torch.optim.SGD` (dampening 0, no maximize):
/// g += weight_decay*p; buf = momentum*buf + g; g = nesterov ? g + momentum*buf : buf; p -= lr*g.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Sgd {
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
}

/// Which optimizer, with its own hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimizerKind {
    Adam(Adam),
    Sgd(Sgd),
}

/// An optimizer and its (peak) learning rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Optimizer {
    pub kind: OptimizerKind,
    pub lr: f64,
}

impl Default for Optimizer {
    /// The contract's recipe: Adam, lr 1e-3, betas 0.9/0.999, eps 1e-8.
    fn default() -> Self {
        Optimizer { kind: OptimizerKind::Adam(Adam::default()), lr: 1e-3 }
    }
}

impl fmt::Display for Optimizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            OptimizerKind::Adam(a) => {
                write!(f, "Adam (lr {}, betas {}/{}, eps {})", self.lr, a.beta1, a.beta2, a.eps)
            }
            OptimizerKind::Sgd(s) => write!(
                f,
                "SGD (lr {}, momentum {}{}, weight decay {})",
                self.lr,
                s.momentum,
                if s.nesterov { ", Nesterov" } else { "" },
                s.weight_decay
            ),
        }
    }
}

/// The scalars of one Adam step, as its kernel reads them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AdamStep {
    /// lr / (1 - beta1^t)
    pub step_size: f32,
    /// sqrt(1 - beta2^t)
    pub bias_correction2_sqrt: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub eps: f32,
}

/// The scalars of one SGD step, as its kernel reads them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SgdStep {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
    /// 1 for Nesterov momentum.
    pub nesterov: u32,
}

/// One step's scalars for whichever optimizer runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptStep {
    Adam(AdamStep),
    Sgd(SgdStep),
}

impl OptStep {
    /// How many state tensors per parameter its update reads and writes.
    pub fn moments(&self) -> usize {
        match self {
            OptStep::Adam(_) => 2,
            OptStep::Sgd(_) => 1,
        }
    }
}

impl Optimizer {
    /// The names of the state buffers, one tensor per parameter each, as the checkpoint stores
    /// them (`<name>.<parameter>`). SGD keeps its momentum buffer even at momentum 0: the
    /// update is then buf = g, the same bits as PyTorch's buffer-less path.
    pub fn state_names(&self) -> &'static [&'static str] {
        match self.kind {
            OptimizerKind::Adam(_) => &["adam.m", "adam.v"],
            OptimizerKind::Sgd(_) => &["sgd.momentum"],
        }
    }

    /// Refuses settings PyTorch refuses (or that would climb the loss).
    pub fn validate(&self) -> Result<()> {
        let unit = |x: f64| (0.0..1.0).contains(&x);
        // The messages name the settings as the checkpoint's metadata does.
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("lr = {} must be a finite number > 0", self.lr);
        }
        match self.kind {
            OptimizerKind::Adam(a) => {
                for (name, beta) in [("beta1", a.beta1), ("beta2", a.beta2)] {
                    if !unit(beta) {
                        bail!("{name} = {beta} must be in [0, 1)");
                    }
                }
                if !(a.eps.is_finite() && a.eps > 0.0) {
                    bail!("eps = {} must be a finite number > 0", a.eps);
                }
            }
            OptimizerKind::Sgd(s) => {
                if !(s.momentum.is_finite() && s.momentum >= 0.0) {
                    bail!("momentum = {} must be a finite number >= 0", s.momentum);
                }
                if !(s.weight_decay.is_finite() && s.weight_decay >= 0.0) {
                    bail!("weight_decay = {} must be a finite number >= 0", s.weight_decay);
                }
                if s.nesterov && s.momentum <= 0.0 {
                    bail!("Nesterov momentum needs a momentum above 0");
                }
            }
        }
        Ok(())
    }

    /// The scalars of step `t` (1-based, as torch counts) taken at learning rate `lr`, with
    /// `momentum` replacing Adam's beta1 or SGD's momentum when a schedule cycles it.
    pub fn step(&self, t: u64, lr: f64, momentum: Option<f64>) -> OptStep {
        match self.kind {
            OptimizerKind::Adam(a) => {
                let beta1 = momentum.unwrap_or(a.beta1);
                // torch: bias_correction = 1 - beta ** step, with step a Python float.
                let bc1 = 1.0 - beta1.powf(t as f64);
                let bc2 = 1.0 - a.beta2.powf(t as f64);
                OptStep::Adam(AdamStep {
                    step_size: (lr / bc1) as f32,
                    bias_correction2_sqrt: bc2.sqrt() as f32,
                    one_minus_beta1: (1.0 - beta1) as f32,
                    beta2: a.beta2 as f32,
                    one_minus_beta2: (1.0 - a.beta2) as f32,
                    eps: a.eps as f32,
                })
            }
            OptimizerKind::Sgd(s) => OptStep::Sgd(SgdStep {
                lr: lr as f32,
                momentum: momentum.unwrap_or(s.momentum) as f32,
                weight_decay: s.weight_decay as f32,
                nesterov: s.nesterov as u32,
            }),
        }
    }

    /// The metadata a checkpoint stores for these settings (beside `lr`).
    pub fn metadata(&self) -> Vec<(&'static str, String)> {
        // Rust prints the shortest decimal that parses back to the same f64: exact round trip.
        let mut m = vec![("lr", self.lr.to_string())];
        match self.kind {
            OptimizerKind::Adam(a) => m.extend([
                ("optimizer", "adam".to_string()),
                ("beta1", a.beta1.to_string()),
                ("beta2", a.beta2.to_string()),
                ("eps", a.eps.to_string()),
            ]),
            OptimizerKind::Sgd(s) => m.extend([
                ("optimizer", "sgd".to_string()),
                ("momentum", s.momentum.to_string()),
                ("nesterov", s.nesterov.to_string()),
                ("weight_decay", s.weight_decay.to_string()),
            ]),
        }
        m
    }

    /// The inverse of [`Optimizer::metadata`]; files from before SGD existed have no
    /// `optimizer` key and are Adam. Validates the values as the command line does.
    pub fn from_metadata(get: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let float = |key: &str| -> Result<f64> {
            let Some(v) = get(key) else { bail!("{key} is missing") };
            match v.parse::<f64>() {
                Ok(x) if x.is_finite() => Ok(x),
                _ => bail!("{key} = {v:?} is not a finite number"),
            }
        };
        let kind = match get("optimizer").as_deref() {
            None | Some("adam") => OptimizerKind::Adam(Adam {
                beta1: float("beta1")?,
                beta2: float("beta2")?,
                eps: float("eps")?,
            }),
            Some("sgd") => OptimizerKind::Sgd(Sgd {
                momentum: float("momentum")?,
                nesterov: match get("nesterov").as_deref() {
                    Some("true") => true,
                    Some("false") => false,
                    v => bail!("nesterov = {v:?} is not true or false"),
                },
                weight_decay: float("weight_decay")?,
            }),
            Some(other) => bail!("optimizer = {other:?} is not adam or sgd"),
        };
        let opt = Optimizer { kind, lr: float("lr")? };
        opt.validate()?;
        Ok(opt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adam_scalars_follow_torch_in_f64() {
        let opt = Optimizer::default();
        let OptStep::Adam(s) = opt.step(1, 1e-3, None) else { panic!() };
        // torch: step_size = lr / (1 - 0.9**1) in Python floats = 0.009999999999999995
        assert_eq!(s.step_size, (1e-3f64 / (1.0 - 0.9f64)) as f32);
        assert_eq!(s.bias_correction2_sqrt, (1.0f64 - 0.999).sqrt() as f32);
        // 1 - beta1 taken in f64 then rounded (0.1f32), not 1 - 0.9f32 (0.100000024).
        assert_eq!(s.one_minus_beta1, 0.1f32);
        let OptStep::Adam(cycled) = opt.step(3, 2e-3, Some(0.95)) else { panic!() };
        assert_eq!(cycled.step_size, (2e-3 / (1.0 - 0.95f64.powf(3.0))) as f32);
        assert_eq!(cycled.one_minus_beta1, (1.0 - 0.95f64) as f32);
    }

    #[test]
    fn metadata_round_trips_and_is_validated() {
        let sgd = Optimizer {
            kind: OptimizerKind::Sgd(Sgd { momentum: 0.9, nesterov: true, weight_decay: 5e-4 }),
            lr: 0.05,
        };
        for opt in [Optimizer::default(), sgd] {
            let meta = opt.metadata();
            let get = |k: &str| meta.iter().find(|(key, _)| *key == k).map(|(_, v)| v.clone());
            assert_eq!(Optimizer::from_metadata(&get).unwrap(), opt);
        }
        let bad = |k: &str| match k {
            "lr" => Some("-1e-3".to_string()),
            "beta1" => Some("0.9".into()),
            "beta2" => Some("0.999".into()),
            "eps" => Some("1e-8".into()),
            _ => None,
        };
        let err = Optimizer::from_metadata(&bad).unwrap_err().to_string();
        assert!(err.contains("lr = -0.001 must be"), "{err}");
        let beta = |k: &str| if k == "beta1" { Some("1".to_string()) } else { bad(k).map(|_| "0.5".into()) };
        let err = Optimizer::from_metadata(&beta).unwrap_err().to_string();
        assert!(err.contains("beta1 = 1 must be in [0, 1)"), "{err}");
    }
}
