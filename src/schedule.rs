//! Learning-rate schedules, computed in f64 exactly as PyTorch computes them, so that a run here
//! and its PyTorch twin (scripts/torch_reference.py) give the optimizer the same numbers.
//!
//! - `constant`: the lr at every step.
//! - `cosine`: `torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)` (eta_min 0).
//!   PyTorch does not evaluate the closed form `lr/2 * (1 + cos(pi*k/T))`: each step multiplies
//!   the previous lr by `(1 + cos(pi*k/T)) / (1 + cos(pi*(k-1)/T))`, and that recursion rounds
//!   differently (over 2,340 steps, 2,271 values differ in their last bits). It is replayed here
//!   operation for operation, from step 0, so step k is O(k) to reach and O(1) to advance.
//! - `onecycle`: `torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps)`
//!   with its defaults: two phases with cosine annealing, the first 30% of the steps rising from
//!   lr/25 to lr, the rest falling to lr/25/1e4; and it cycles the momentum (Adam's beta1 or SGD's
//!   momentum) the other way, 0.95 down to 0.85 and back. Its value at step 0 already overrides
//!   the optimizer's (PyTorch sets it when the scheduler is built), so every step, the first
//!   included, takes the schedule's momentum.
//!
//! Every schedule is stepped after every optimizer step, so "step k" below is the 0-based index
//! of the optimizer step about to be taken: the scheduler's `last_epoch` when the optimizer reads
//! its hyper-parameters.

use std::f64::consts::PI;
use std::fmt;
use std::str::FromStr;

/// The `--lr-schedule` choices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum LrSchedule {
    /// The same learning rate at every step.
    #[default]
    Constant,
    /// CosineAnnealingLR(T_max = the run's steps): from --lr down to 0.
    Cosine,
    /// OneCycleLR(max_lr = --lr, total_steps = the run's steps): up from lr/25 for 30% of the
    /// steps, then down to lr/25/1e4; the momentum the other way, 0.95 to 0.85 and back.
    #[cfg_attr(feature = "cli", value(name = "onecycle"))]
    OneCycle,
}

impl LrSchedule {
    pub const ALL: [LrSchedule; 3] = [LrSchedule::Constant, LrSchedule::Cosine, LrSchedule::OneCycle];

    /// The name on the command line, in checkpoints' metadata and in the metrics.
    pub fn name(self) -> &'static str {
        match self {
            LrSchedule::Constant => "constant",
            LrSchedule::Cosine => "cosine",
            LrSchedule::OneCycle => "onecycle",
        }
    }

    /// Whether the schedule overrides the optimizer's momentum (Adam's beta1, SGD's momentum).
    pub fn cycles_momentum(self) -> bool {
        self == LrSchedule::OneCycle
    }
}

impl fmt::Display for LrSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown learning-rate schedule {0:?} (expected constant, cosine or onecycle)")]
pub struct UnknownSchedule(pub String);

impl FromStr for LrSchedule {
    type Err = UnknownSchedule;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LrSchedule::ALL
            .into_iter()
            .find(|schedule| schedule.name() == s)
            .ok_or_else(|| UnknownSchedule(s.into()))
    }
}

/// The hyper-parameters of one optimizer step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepHyper {
    pub lr: f64,
    /// The schedule's value for Adam's beta1 or SGD's momentum, which replaces the configured one
    /// for this step; `None` where the schedule leaves it alone.
    pub momentum: Option<f64>,
}

// OneCycleLR's defaults, as Python floats.
const ONECYCLE_PCT_START: f64 = 0.3;
const ONECYCLE_DIV_FACTOR: f64 = 25.0;
const ONECYCLE_FINAL_DIV_FACTOR: f64 = 1e4;
const ONECYCLE_BASE_MOMENTUM: f64 = 0.85;
const ONECYCLE_MAX_MOMENTUM: f64 = 0.95;
// CosineAnnealingLR's eta_min. Kept in the formulas (x - 0.0 + 0.0) so they read as PyTorch's.
const COSINE_ETA_MIN: f64 = 0.0;

/// A position in a schedule: the hyper-parameters of step `step()`, and how to reach the next.
///
/// As an iterator it yields the remaining steps' hyper-parameters, from `step()` up to
/// `total_steps - 1`, each in O(1). For a resumed run, [`ScheduleState::at_step`] fast-forwards.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleState {
    schedule: LrSchedule,
    peak_lr: f64,
    total_steps: u64,
    step: u64,
    /// The cosine recursion's lr at `step` (the optimizer's `group["lr"]`); `peak_lr` otherwise.
    lr: f64,
}

impl ScheduleState {
    /// At step 0 of a run of `total_steps` steps; `peak_lr` is `--lr` (OneCycleLR's max_lr).
    pub fn new(schedule: LrSchedule, peak_lr: f64, total_steps: u64) -> Self {
        ScheduleState { schedule, peak_lr, total_steps, step: 0, lr: peak_lr }
    }

    /// At step `step`, as a run resumed there continues (O(step) for cosine, O(1) otherwise).
    /// Steps past `total_steps` extrapolate the formulas; PyTorch's OneCycleLR refuses them.
    pub fn at_step(schedule: LrSchedule, peak_lr: f64, total_steps: u64, step: u64) -> Self {
        let mut state = ScheduleState::new(schedule, peak_lr, total_steps);
        if schedule == LrSchedule::Cosine {
            while state.step < step {
                state.advance();
            }
        }
        state.step = step;
        state
    }

    pub fn schedule(&self) -> LrSchedule {
        self.schedule
    }
    pub fn peak_lr(&self) -> f64 {
        self.peak_lr
    }
    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }
    /// The 0-based index of the step whose hyper-parameters [`current`](Self::current) gives.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The hyper-parameters of step `step()`.
    pub fn current(&self) -> StepHyper {
        match self.schedule {
            LrSchedule::Constant => StepHyper { lr: self.peak_lr, momentum: None },
            LrSchedule::Cosine => StepHyper { lr: self.lr, momentum: None },
            LrSchedule::OneCycle => {
                let (lr, momentum) = onecycle(self.peak_lr, self.total_steps, self.step);
                StepHyper { lr, momentum: Some(momentum) }
            }
        }
    }

    /// Moves to the next step (the scheduler's `step()` after the optimizer's).
    pub fn advance(&mut self) {
        self.step += 1;
        if self.schedule == LrSchedule::Cosine {
            self.lr = cosine_next(self.lr, self.peak_lr, self.total_steps, self.step);
        }
    }
}

impl Iterator for ScheduleState {
    type Item = StepHyper;
    fn next(&mut self) -> Option<StepHyper> {
        if self.step >= self.total_steps {
            return None;
        }
        let hyper = self.current();
        self.advance();
        Some(hyper)
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = usize::try_from(self.total_steps.saturating_sub(self.step)).unwrap_or(usize::MAX);
        (left, Some(left))
    }
}

/// The hyper-parameters of step `step` of a run of `total_steps` steps (O(step) for cosine).
pub fn hyper_at(schedule: LrSchedule, peak_lr: f64, total_steps: u64, step: u64) -> StepHyper {
    ScheduleState::at_step(schedule, peak_lr, total_steps, step).current()
}

/// CosineAnnealingLR.get_lr() with `last_epoch = step` (>= 1), from the lr of step - 1: its
/// chainable form, including the branch for the step after a half period, where the recursion's
/// denominator 1 + cos(pi) is zero. Python's `%` is a floored modulo, hence rem_euclid.
fn cosine_next(lr: f64, base_lr: f64, total_steps: u64, step: u64) -> f64 {
    if total_steps == 0 {
        return lr; // PyTorch would divide by T_max = 0; such a run takes no step.
    }
    let t_max = total_steps as f64;
    let period = 2 * i128::from(total_steps);
    if (i128::from(step) - 1 - i128::from(total_steps)).rem_euclid(period) == 0 {
        return lr + (base_lr - COSINE_ETA_MIN) * (1.0 - (PI / t_max).cos()) / 2.0;
    }
    (1.0 + (PI * step as f64 / t_max).cos()) / (1.0 + (PI * (step - 1) as f64 / t_max).cos())
        * (lr - COSINE_ETA_MIN)
        + COSINE_ETA_MIN
}

/// OneCycleLR.get_lr() at `last_epoch = step`: (lr, momentum), with PyTorch's float operations
/// in PyTorch's order (its phase boundary is `float(0.3 * total_steps) - 1`, not an integer).
fn onecycle(max_lr: f64, total_steps: u64, step: u64) -> (f64, f64) {
    let initial_lr = max_lr / ONECYCLE_DIV_FACTOR;
    let min_lr = initial_lr / ONECYCLE_FINAL_DIV_FACTOR;
    let warmup_end = ONECYCLE_PCT_START * total_steps as f64 - 1.0;
    let last_step = total_steps as f64 - 1.0;
    let step = step as f64;
    if step <= warmup_end {
        let pct = (step - 0.0) / (warmup_end - 0.0);
        (anneal_cos(initial_lr, max_lr, pct), anneal_cos(ONECYCLE_MAX_MOMENTUM, ONECYCLE_BASE_MOMENTUM, pct))
    } else {
        let pct = (step - warmup_end) / (last_step - warmup_end);
        (anneal_cos(max_lr, min_lr, pct), anneal_cos(ONECYCLE_BASE_MOMENTUM, ONECYCLE_MAX_MOMENTUM, pct))
    }
}

/// OneCycleLR._annealing_cos: from `start` to `end` as pct goes from 0 to 1. Not exactly `start`
/// at pct 0 (`end + (start - end) / 2 * 2` rounds), which is why it is copied and not simplified.
fn anneal_cos(start: f64, end: f64, pct: f64) -> f64 {
    let cos_out = (PI * pct).cos() + 1.0;
    end + (start - end) / 2.0 * cos_out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for schedule in LrSchedule::ALL {
            assert_eq!(schedule.to_string().parse::<LrSchedule>(), Ok(schedule));
        }
        assert_eq!(
            "Cosine".parse::<LrSchedule>().unwrap_err().to_string(),
            "unknown learning-rate schedule \"Cosine\" (expected constant, cosine or onecycle)"
        );
        assert_eq!(LrSchedule::default(), LrSchedule::Constant);
    }

    #[test]
    fn the_iterator_yields_total_steps_values_and_resumes_where_it_stopped() {
        for schedule in LrSchedule::ALL {
            let all: Vec<StepHyper> = ScheduleState::new(schedule, 3e-3, 50).collect();
            assert_eq!(all.len(), 50);
            for k in [0, 1, 17, 49, 50] {
                let resumed: Vec<StepHyper> = ScheduleState::at_step(schedule, 3e-3, 50, k).collect();
                assert_eq!(resumed, all[k as usize..], "{schedule} resumed at {k}");
            }
            assert_eq!(hyper_at(schedule, 3e-3, 50, 17), all[17]);
        }
        assert_eq!(ScheduleState::new(LrSchedule::Cosine, 1e-3, 0).count(), 0);
    }

    #[test]
    fn shapes_are_pytorchs() {
        let constant: Vec<StepHyper> = ScheduleState::new(LrSchedule::Constant, 1e-3, 5).collect();
        assert!(constant.iter().all(|h| *h == StepHyper { lr: 1e-3, momentum: None }));

        // Cosine starts at the peak exactly, halves at T/2, and never cycles the momentum.
        let cosine: Vec<StepHyper> = ScheduleState::new(LrSchedule::Cosine, 2e-3, 100).collect();
        assert_eq!(cosine[0].lr, 2e-3);
        assert!((cosine[50].lr - 1e-3).abs() < 1e-15);
        assert!(cosine.windows(2).all(|w| w[1].lr < w[0].lr && w[1].momentum.is_none()));

        // OneCycle: lr/25 up to lr at step float(0.3*T) - 1 = 29, then down to lr/25/1e4; the
        // momentum mirrors it from 0.95 down to 0.85 and back.
        let onecycle: Vec<StepHyper> = ScheduleState::new(LrSchedule::OneCycle, 4e-3, 100).collect();
        let lrs: Vec<f64> = onecycle.iter().map(|h| h.lr).collect();
        let peak = lrs.iter().cloned().fold(0.0, f64::max);
        assert_eq!(lrs.iter().position(|&lr| lr == peak), Some(29));
        assert_eq!(peak, 4e-3);
        assert!((lrs[0] - 4e-3 / 25.0).abs() < 1e-18);
        assert!((lrs[99] - 4e-3 / 25.0 / 1e4).abs() < 1e-22);
        assert_eq!(onecycle[29].momentum, Some(0.85));
        assert!((onecycle[0].momentum.unwrap() - 0.95).abs() < 1e-15);
        assert_eq!(onecycle[99].momentum, Some(0.95));
    }
}
