//! The learning-rate schedules against PyTorch's own: tests/fixtures/schedules.json holds, for
//! each case, the lr and the cycled momentum (Adam's beta1, SGD's momentum) that torch 2.15's
//! optimizer read at every step, as f64 bit patterns, recorded inside `optimizer.step()` by
//! `scripts/torch_reference.py fixtures tests/fixtures`.
//!
//! Tolerance: none on Linux with glibc (where the fixtures were made): both Python's `math.cos`
//! and Rust's `f64::cos` call glibc's `cos` there, and every other operation is an IEEE-754 f64
//! operation in the same order, so the bits must be equal. That exactness is what catches a
//! closed-form cosine, which differs from PyTorch's recursion in the last bits only (about 5e-15
//! relative). Where Rust's `cos` is another libm, one ulp of cos (1.1e-16) may differ; the cosine
//! recursion divides by 1 + cos(pi*(k-1)/T), which near the end of a run of T steps is about
//! pi^2/(2T^2), so an ulp there becomes up to 2T^2/pi^2 ulps of the lr (1.1e6 for T = 2340,
//! 1.2e-10 relative): such platforms get a relative tolerance of 1e-9.

use lenet::schedule::{LrSchedule, ScheduleState, StepHyper};
use serde::Deserialize;

const EXACT: bool = cfg!(all(target_os = "linux", target_env = "gnu"));
const RELATIVE_TOLERANCE_ELSEWHERE: f64 = 1e-9;

#[derive(Deserialize)]
struct Fixtures {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    schedule: String,
    lr_bits_of_peak: String,
    total_steps: u64,
    optimizer: String,
    lr_bits: Vec<String>,
    momentum_bits: Option<Vec<String>>,
}

fn bits_to_f64(hex: &str) -> f64 {
    f64::from_bits(u64::from_str_radix(hex, 16).expect("a hex f64 bit pattern"))
}

fn fixtures() -> Vec<Case> {
    let text = include_str!("fixtures/schedules.json");
    serde_json::from_str::<Fixtures>(text).expect("schedules.json parses").cases
}

fn agrees(ours: f64, torch: f64) -> bool {
    if EXACT {
        ours.to_bits() == torch.to_bits()
    } else {
        (ours - torch).abs() <= RELATIVE_TOLERANCE_ELSEWHERE * torch.abs()
    }
}

/// Every step of `ours` against the case's trace; the first disagreement, described.
fn first_disagreement(case: &Case, ours: &[StepHyper], first_step: usize) -> Option<String> {
    let name =
        format!("{} {} lr {} T={}", case.optimizer, case.schedule, case.lr_bits_of_peak, case.total_steps);
    if ours.len() + first_step != case.lr_bits.len() {
        return Some(format!("{name}: {} steps, torch took {}", ours.len() + first_step, case.lr_bits.len()));
    }
    for (i, hyper) in ours.iter().enumerate() {
        let step = first_step + i;
        let torch_lr = bits_to_f64(&case.lr_bits[step]);
        if !agrees(hyper.lr, torch_lr) {
            return Some(format!("{name}: step {step}: lr {:e}, torch {torch_lr:e}", hyper.lr));
        }
        let torch_momentum = case.momentum_bits.as_ref().map(|bits| bits_to_f64(&bits[step]));
        let same_momentum = match (hyper.momentum, torch_momentum) {
            (Some(ours), Some(torch)) => agrees(ours, torch),
            (None, None) => true,
            _ => false,
        };
        if !same_momentum {
            return Some(format!(
                "{name}: step {step}: momentum {:?}, torch {torch_momentum:?}",
                hyper.momentum
            ));
        }
    }
    None
}

fn schedule_of(case: &Case) -> ScheduleState {
    let schedule: LrSchedule = case.schedule.parse().unwrap();
    ScheduleState::new(schedule, bits_to_f64(&case.lr_bits_of_peak), case.total_steps)
}

#[test]
fn every_step_of_every_case_is_pytorchs() {
    let cases = fixtures();
    assert!(cases.len() >= 13);
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|case| first_disagreement(case, &schedule_of(case).collect::<Vec<_>>(), 0))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn a_schedule_resumed_at_any_step_continues_as_pytorchs() {
    for case in fixtures() {
        let schedule: LrSchedule = case.schedule.parse().unwrap();
        let peak = bits_to_f64(&case.lr_bits_of_peak);
        let total = case.total_steps;
        for step in [0, 1, total / 3, total / 2, total.saturating_sub(1), total] {
            let resumed: Vec<StepHyper> = ScheduleState::at_step(schedule, peak, total, step).collect();
            if let Some(failure) = first_disagreement(&case, &resumed, step as usize) {
                panic!("resumed at step {step}: {failure}");
            }
        }
    }
}

#[test]
fn the_fixtures_cover_what_the_issue_asks() {
    let cases = fixtures();
    for schedule in ["constant", "cosine", "onecycle"] {
        assert!(cases.iter().any(|c| c.schedule == schedule), "no {schedule} case");
    }
    for schedule in ["cosine", "onecycle"] {
        for total_steps in [1, 2, 7, 469, 2340] {
            assert!(
                cases.iter().any(|c| c.schedule == schedule && c.total_steps == total_steps),
                "no {schedule} case of {total_steps} steps"
            );
        }
        assert!(cases.iter().any(|c| c.schedule == schedule && c.optimizer == "sgd"), "no SGD {schedule}");
    }
    // Only OneCycleLR cycles the momentum, and from the first step on.
    for case in &cases {
        assert_eq!(case.momentum_bits.is_some(), case.schedule == "onecycle");
    }
}
