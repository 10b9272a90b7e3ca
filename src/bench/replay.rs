//! Timing the training step as the trainer runs it: after a warm-up of continuous step replays
//! (a GPU whose clocks dropped while the CPU validated runs its first steps slowly), passes of
//! consecutive steps, the k-th step of a pass reading the k-th step-uniform slot, as a chunk of
//! training steps does. Each pass yields a time per step: the difference of timestamps written
//! between steps where the device can write them inside a pass, else the pass's time over its
//! steps. The statistics are over those samples.
//!
//! The logic here knows nothing of wgpu: it drives a [`StepReplayer`], which the bench
//! implements on the GPU trainer's recorded step (and tests implement with a fake clock).

use anyhow::{ensure, Result};

pub use crate::gpu::timing::PassTimes;

/// Runs passes of consecutive training steps.
pub trait StepReplayer {
    /// Runs one pass of `slots.len()` consecutive steps, the k-th reading the step uniform of
    /// slot `slots[k]`, and waits for it.
    fn pass(&mut self, slots: &[u32]) -> Result<PassTimes>;
    /// Seconds on a monotonic clock (the host's; a fake one in tests).
    fn now(&self) -> f64;
}

/// How many passes, how long.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepPlan {
    /// Seconds of continuous step replays before the first timed pass.
    pub warmup_s: f64,
    /// Consecutive steps per pass (a chunk's worth: at least [`MIN_STEPS_PER_PASS`]).
    pub steps_per_pass: usize,
    /// Timed passes: at least `min_passes`, then more until `budget_s` of wall time is spent or
    /// `max_passes` are done.
    pub min_passes: usize,
    pub max_passes: usize,
    pub budget_s: f64,
}

/// The fewest consecutive steps a timed pass holds: enough that the pass's own start and end
/// (and, timed by the host, the submit and wait) are a few percent of it.
pub const MIN_STEPS_PER_PASS: usize = 23;
/// The least warm-up, seconds.
pub const MIN_WARMUP_S: f64 = 0.5;

impl StepPlan {
    /// The plan `lenet bench` uses: 0.5 s of warm-up, passes of 23 steps, at least 3 passes and
    /// at most `max_passes`, stopping after `budget_s`.
    pub fn new(max_passes: usize, budget_s: f64) -> Self {
        StepPlan {
            warmup_s: MIN_WARMUP_S,
            steps_per_pass: MIN_STEPS_PER_PASS,
            min_passes: 3,
            max_passes: max_passes.max(3),
            budget_s,
        }
    }

    /// The step-uniform slots of one pass: 0, 1, ..., steps_per_pass - 1, as the trainer's
    /// chunk of that many steps reads them.
    pub fn slots(&self) -> Vec<u32> {
        (0..self.steps_per_pass as u32).collect()
    }
}

/// The fastest, median and slowest of a set of samples (seconds).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
    pub samples: usize,
}

impl Spread {
    /// None for no samples or a sample that is not a finite, non-negative time.
    pub fn of(samples: &[f64]) -> Option<Spread> {
        if samples.is_empty() || samples.iter().any(|s| !s.is_finite() || *s < 0.0) {
            return None;
        }
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if n % 2 == 1 { s[n / 2] } else { 0.5 * (s[n / 2 - 1] + s[n / 2]) };
        Some(Spread { min: s[0], median, max: s[n - 1], samples: n })
    }
}

/// What [`measure_steps`] found.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct StepTiming {
    /// Seconds per step.
    pub per_step: Spread,
    /// Timed passes and steps per pass.
    pub passes: usize,
    pub steps_per_pass: usize,
    /// Warm-up passes and their seconds (host clock).
    pub warmup_passes: usize,
    pub warmup_s: f64,
    /// Whether the samples are single steps (timestamps between steps) or pass / steps.
    pub per_step_timestamps: bool,
}

/// Warms up (whole passes until `plan.warmup_s` has passed on the replayer's clock, at least
/// one), then times passes as `plan` says; returns the spread of the time per step.
pub fn measure_steps(r: &mut dyn StepReplayer, plan: &StepPlan) -> Result<StepTiming> {
    ensure!(plan.steps_per_pass >= 1 && plan.min_passes >= 1, "a pass needs a step and a plan a pass");
    let slots = plan.slots();
    let start = r.now();
    let mut warmup_passes = 0;
    loop {
        r.pass(&slots)?;
        warmup_passes += 1;
        if r.now() - start >= plan.warmup_s {
            break;
        }
    }
    let warmup_s = r.now() - start;
    let mut samples = Vec::new();
    let mut per_step_timestamps = true;
    let mut passes = 0;
    let start = r.now();
    while passes < plan.max_passes.max(plan.min_passes) {
        match r.pass(&slots)? {
            PassTimes::PerStep(t) => {
                ensure!(
                    t.len() == slots.len(),
                    "a pass of {} steps gave {} step times",
                    slots.len(),
                    t.len()
                );
                samples.extend(t);
            }
            PassTimes::Whole(t) => {
                per_step_timestamps = false;
                samples.push(t / slots.len() as f64);
            }
        }
        passes += 1;
        if passes >= plan.min_passes && r.now() - start > plan.budget_s {
            break;
        }
    }
    let per_step = Spread::of(&samples)
        .ok_or_else(|| anyhow::anyhow!("the step passes gave no usable time (samples {samples:?})"))?;
    Ok(StepTiming {
        per_step,
        passes,
        steps_per_pass: slots.len(),
        warmup_passes,
        warmup_s,
        per_step_timestamps,
    })
}
