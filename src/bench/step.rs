//! Validating a whole training step: one step from the same state on the same batch, compared by
//! its gradients (the step's real output; Adam's first step moves every parameter by about lr
//! whatever the gradient's size, so comparing parameters alone cannot see a gradient's error)
//! and by the parameters it leaves, within what the gradients' difference explains.

use anyhow::{ensure, Result};

use crate::model::{param_specs, Params};
use crate::opcheck::U;

/// What one step produced.
#[derive(Clone, Debug, PartialEq)]
pub struct StepResult {
    pub loss: f32,
    /// The parameters' gradients (partials summed).
    pub grads: Params,
    /// The parameters after the update.
    pub params: Params,
}

/// The largest relative L2 difference a gradient tensor may show: the two sides compute the
/// same sums in other orders, through exp and log on one side's GPU; measured on lavapipe, the
/// tensors agree to about 1e-6 of their norm. 1e-4 leaves a wide margin for hardware with fused
/// multiply-adds and approximate transcendentals, and catches any error of 0.01% or more of a
/// tensor (a 1% scale error, a flipped sign, a zeroed or halved gradient: tests/bench.rs).
pub const GRAD_REL_TOL: f64 = 1e-4;

/// Checks `got` against `want` after the first Adam step (zero moments) from the same
/// parameters, at learning rate `lr` and Adam's `eps`. Returns the largest ratio of a
/// difference to its tolerance.
pub fn check_step(got: &StepResult, want: &StepResult, lr: f64, eps: f64) -> Result<f64> {
    let mut worst = 0.0f64;
    let loss_tol = 1e-5 * (1.0 + want.loss.abs() as f64);
    let d = (got.loss as f64 - want.loss as f64).abs();
    ensure!(d <= loss_tol, "loss {} vs {}: |diff| {d:.3e} > {loss_tol:.3e}", got.loss, want.loss);
    worst = worst.max(d / loss_tol);
    for ((spec, g), w) in param_specs().iter().zip(&got.grads.tensors).zip(&want.grads.tensors) {
        ensure!(g.iter().all(|x| x.is_finite()), "gradient of {} is not finite", spec.name);
        let diff: f64 = g.iter().zip(w).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum::<f64>().sqrt();
        let norm: f64 = w.iter().map(|&b| (b as f64).powi(2)).sum::<f64>().sqrt();
        let tol = GRAD_REL_TOL * norm + 1e-30;
        ensure!(
            diff <= tol,
            "gradient of {}: |diff| {diff:.3e} is {:.2e} of its norm {norm:.3e} (at most {GRAD_REL_TOL:e})",
            spec.name,
            diff / norm.max(1e-30)
        );
        worst = worst.max(diff / tol);
    }
    // Adam's first step moves p by lr * g / (|g| + eps): a gradient difference dg moves it by at
    // most lr * |dg| / (min |g| + eps); then p's own rounding (a few ulp).
    for (i, spec) in param_specs().iter().enumerate() {
        let (gp, wp) = (&got.params.tensors[i], &want.params.tensors[i]);
        let (gg, wg) = (&got.grads.tensors[i], &want.grads.tensors[i]);
        for j in 0..gp.len() {
            let dg = (gg[j] as f64 - wg[j] as f64).abs();
            let g = (gg[j].abs().min(wg[j].abs())) as f64;
            let tol = lr * dg / (g + eps) + 8.0 * U * (wp[j].abs() as f64 + lr) + 1e-30;
            let d = (gp[j] as f64 - wp[j] as f64).abs();
            ensure!(
                d <= tol,
                "{}[{j}] after the step: {} vs {}: |diff| {d:.3e} > {tol:.3e}",
                spec.name,
                gp[j],
                wp[j]
            );
            worst = worst.max(d / tol);
        }
    }
    Ok(worst)
}
