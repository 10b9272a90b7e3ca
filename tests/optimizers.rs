//! Every optimizer (Adam, SGD, AdamW, RMSprop) against PyTorch's formulas written out in f64, the fast CPU path against the reference bit for bit for every optimizer, and their state
//! in checkpoints under `<optimizer>.<state>.<parameter>`. Step-by-step parity with PyTorch
//! itself is in tests/torch_parity.rs (its fixtures have AdamW and RMSprop runs).

mod common;

use lenet::checkpoint::{load_checkpoint, save_checkpoint};
use lenet::cpu::{reference, Fast, Reference};
use lenet::model::{Params, TrainState};
use lenet::ops::{Ops, Update, UpdateArgs};
use lenet::optim::{Adam, AdamW, Optimizer, OptimizerKind, RmsProp, Sgd, RULES};
use rand_chacha::ChaCha8Rng;

/// Gradients of `steps` steps over `n` elements: every fifth exactly zero, some tiny, the rest
/// of order 1.
fn grads(rng: &mut ChaCha8Rng, n: usize, steps: usize) -> Vec<Vec<f32>> {
    (0..steps)
        .map(|_| {
            let u = common::uniform(rng, n, 0.0, 1.0);
            u.iter()
                .enumerate()
                .map(|(i, &x)| match i % 5 {
                    0 => 0.0,
                    1 => 1e-6 * (x - 0.5),
                    _ => 2.0 * x - 1.0,
                })
                .collect()
        })
        .collect()
}

/// Runs `opt` for every step of `grads` from `p0` through the reference and checks each step's
/// parameters against `expected` (f64), within `tol`; returns the last step's parameters.
fn run_against(opt: Optimizer, p0: &[f32], grads: &[Vec<f32>], expected: &[Vec<f64>], tol: f64) -> Vec<f32> {
    let n = p0.len();
    let mut p = p0.to_vec();
    let mut states: Vec<Vec<f32>> = vec![vec![0.0; n]; opt.descriptor().states.len()];
    for (t, g) in grads.iter().enumerate() {
        let step = opt.step(t as u64 + 1, opt.lr, None);
        let mut views: Vec<&mut [f32]> = states.iter_mut().map(|s| s.as_mut_slice()).collect();
        reference::optimizer_update(&mut p, g, &mut views, &step);
        for i in 0..n {
            let want = expected[t][i];
            assert!(
                (p[i] as f64 - want).abs() <= tol,
                "{opt}: step {}: p[{i}] {} expected {want}",
                t + 1,
                p[i]
            );
        }
    }
    p
}

/// [`run_against`], and every element moved (weight decay moves those without a gradient too,
/// RMSprop's tiny gradients are divided by their own tiny root mean square).
fn check_against(opt: Optimizer, p0: &[f32], grads: &[Vec<f32>], expected: &[Vec<f64>], tol: f64) {
    let p = run_against(opt, p0, grads, expected, tol);
    assert!(p.iter().zip(p0).skip(1).step_by(5).all(|(a, b)| a != b), "{opt}: some parameters did not move");
}

/// torch.optim.AdamW in f64, written out, each step's parameters: p *= 1 - lr*wd; m = b1 m +
/// (1-b1) g; v = b2 v + (1-b2) g^2; p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps).
/// With wd = 0 it is torch.optim.Adam.
fn adamw_by_hand(
    p0: &[f32],
    grads: &[Vec<f32>],
    (b1, b2, lr, eps): (f64, f64, f64, f64),
    wd: f64,
) -> Vec<Vec<f64>> {
    let n = p0.len();
    let mut p: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
    let (mut m, mut v) = (vec![0.0f64; n], vec![0.0f64; n]);
    let mut expected = Vec::new();
    for (t, g) in grads.iter().enumerate() {
        let t = t as i32 + 1;
        for i in 0..n {
            let g = g[i] as f64;
            p[i] *= 1.0 - lr * wd;
            m[i] = b1 * m[i] + (1.0 - b1) * g;
            v[i] = b2 * v[i] + (1.0 - b2) * g * g;
            p[i] -= lr * (m[i] / (1.0 - b1.powi(t))) / ((v[i] / (1.0 - b2.powi(t))).sqrt() + eps);
        }
        expected.push(p.clone());
    }
    expected
}

#[test]
fn adam_matches_the_torch_formula() {
    let mut rng = common::rng(7);
    let n = 50;
    let opt = Optimizer { kind: OptimizerKind::Adam(Adam { beta1: 0.8, beta2: 0.99, eps: 1e-6 }), lr: 2e-3 };
    let p0 = common::uniform(&mut rng, n, -1.0, 1.0);
    let grads = grads(&mut rng, n, 4);

    let expected = adamw_by_hand(&p0, &grads, (0.8, 0.99, 2e-3, 1e-6), 0.0);
    // Each step moves a parameter by up to ~lr; f32 keeps it to ~1e-7 absolute.
    let p = run_against(opt, &p0, &grads, &expected, 1e-6);
    // The step actually moved the parameters that had a gradient, and only those.
    assert!(p.iter().zip(&p0).enumerate().all(|(i, (a, b))| (i % 5 == 0) == (a == b)));
}

#[test]
fn sgd_matches_the_torch_formula() {
    let mut rng = common::rng(8);
    let n = 50;
    for (momentum, nesterov, wd) in [(0.9, false, 0.0), (0.9, true, 5e-4), (0.0, false, 1e-2)] {
        let opt =
            Optimizer { kind: OptimizerKind::Sgd(Sgd { momentum, nesterov, weight_decay: wd }), lr: 0.05 };
        let p0 = common::uniform(&mut rng, n, -1.0, 1.0);
        let grads = grads(&mut rng, n, 4);
        // torch.optim.SGD, written out (dampening 0): g += wd p; buf = g on the first step,
        // then momentum buf + g; g = nesterov ? g + momentum buf : buf; p -= lr g.
        let mut p: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
        let mut buf: Vec<Option<f64>> = vec![None; n];
        let mut want = Vec::new();
        for g in &grads {
            for i in 0..n {
                let mut g = g[i] as f64 + wd * p[i];
                if momentum != 0.0 {
                    let b = buf[i].map_or(g, |b| momentum * b + g);
                    buf[i] = Some(b);
                    g = if nesterov { g + momentum * b } else { b };
                }
                p[i] -= 0.05 * g;
            }
            want.push(p.clone());
        }
        run_against(opt, &p0, &grads, &want, 1e-6);
    }
}

#[test]
fn adamw_matches_the_torch_formula() {
    let mut rng = common::rng(11);
    let n = 50;
    for weight_decay in [1e-2, 0.3] {
        let opt =
            Optimizer { kind: AdamW { beta1: 0.8, beta2: 0.99, eps: 1e-6, weight_decay }.into(), lr: 2e-3 };
        let p0 = common::uniform(&mut rng, n, -1.0, 1.0);
        let grads = grads(&mut rng, n, 4);
        let expected = adamw_by_hand(&p0, &grads, (0.8, 0.99, 2e-3, 1e-6), weight_decay);
        // Each step moves a parameter by up to ~lr; f32 keeps it to ~1e-7 absolute.
        check_against(opt, &p0, &grads, &expected, 1e-6);
    }
}

#[test]
fn rmsprop_matches_the_torch_formula() {
    let mut rng = common::rng(12);
    let n = 50;
    for (alpha, weight_decay, momentum, centered) in
        [(0.99, 0.0, 0.0, false), (0.9, 1e-2, 0.9, true), (0.3, 5e-4, 0.0, true), (0.95, 0.0, 0.5, false)]
    {
        let settings = RmsProp { alpha, eps: 1e-6, weight_decay, momentum, centered };
        let opt = Optimizer { kind: settings.into(), lr: 1e-3 };
        let p0 = common::uniform(&mut rng, n, -1.0, 1.0);
        let grads = grads(&mut rng, n, 4);
        // torch.optim.RMSprop, written out: g += wd p; sq = alpha sq + (1-alpha) g^2;
        // ga = alpha ga + (1-alpha) g; avg = sqrt(sq - ga^2 if centered else sq) + eps;
        // buf = momentum buf + g/avg and p -= lr buf if momentum > 0, else p -= lr g/avg.
        let (lr, eps) = (1e-3f64, 1e-6f64);
        let mut p: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
        let (mut sq, mut ga, mut buf) = (vec![0.0f64; n], vec![0.0f64; n], vec![0.0f64; n]);
        let mut expected = Vec::new();
        for g in &grads {
            for i in 0..n {
                let g = g[i] as f64 + weight_decay * p[i];
                sq[i] = alpha * sq[i] + (1.0 - alpha) * g * g;
                ga[i] = alpha * ga[i] + (1.0 - alpha) * g;
                let avg = if centered { (sq[i] - ga[i] * ga[i]).sqrt() } else { sq[i].sqrt() } + eps;
                if momentum > 0.0 {
                    buf[i] = momentum * buf[i] + g / avg;
                    p[i] -= lr * buf[i];
                } else {
                    p[i] -= lr * g / avg;
                }
            }
            expected.push(p.clone());
        }
        // A step moves a parameter by up to lr / sqrt(1 - alpha) (~1e-2), the tiny gradients'
        // steps included: f32 keeps each to a few 1e-9, and sq - ga^2 loses some digits where
        // the variance is small (the tiny gradients): 1e-6 holds them.
        check_against(opt, &p0, &grads, &expected, 1e-6);
    }
}

/// A planted fault in the formula is caught: the check above fails for RMSprop with the
/// centered variance taken as sq + ga^2.
#[test]
#[should_panic(expected = "expected")]
fn a_wrong_rmsprop_formula_is_caught() {
    let mut rng = common::rng(13);
    let n = 50;
    let opt =
        Optimizer { kind: RmsProp { alpha: 0.9, centered: true, ..Default::default() }.into(), lr: 1e-3 };
    let p0 = common::uniform(&mut rng, n, -1.0, 1.0);
    let grads = grads(&mut rng, n, 4);
    let mut p: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
    let (mut sq, mut ga) = (vec![0.0f64; n], vec![0.0f64; n]);
    let mut expected = Vec::new();
    for g in &grads {
        for i in 0..n {
            let g = g[i] as f64;
            sq[i] = 0.9 * sq[i] + 0.1 * g * g;
            ga[i] = 0.9 * ga[i] + 0.1 * g;
            p[i] -= 1e-3 * g / ((sq[i] + ga[i] * ga[i]).sqrt() + 1e-8);
        }
        expected.push(p.clone());
    }
    check_against(opt, &p0, &grads, &expected, 1e-6);
}

/// The fast path's streamed update and the reference's give the same bits, for every optimizer
/// with its defaults and a mid-run step, on tensors whose gradients come as partials.
#[test]
fn the_fast_update_is_the_references_bits_for_every_optimizer() {
    let lens = [150usize, 6, 20000, 16];
    let partials = [1usize, 3, 2, 17];
    for d in RULES {
        let opt = Optimizer { kind: d.default_kind(), lr: 1e-3 };
        let step = opt.step(5, 1e-3, if d.cycled.is_some() { Some(0.9) } else { None });
        let mut rng = common::rng(14);
        let mut draw = |n: usize, lo: f32, hi: f32| common::uniform(&mut rng, n, lo, hi);
        let params: Vec<Vec<f32>> = lens.iter().map(|&n| draw(n, -0.3, 0.3)).collect();
        let grads: Vec<Vec<f32>> =
            lens.iter().zip(&partials).map(|(&n, &p)| draw(n * p, -0.02, 0.02)).collect();
        let moments: Vec<Vec<Vec<f32>>> = d
            .states
            .iter()
            .map(|s| {
                let (lo, hi) = if s.non_negative { (2e-4, 6e-4) } else { (-0.01, 0.01) };
                lens.iter().map(|&n| draw(n, lo, hi)).collect()
            })
            .collect();
        let run = |ops: &mut dyn FnMut(Update<Fast>)| {
            let (mut p, mut m) = (params.clone(), moments.clone());
            ops(UpdateArgs { params: &mut p, grads: &grads, moments: &mut m, step: &step });
            (p, m)
        };
        let fast = run(&mut |a| Fast.update(a).unwrap());
        let reference = run(&mut |a| Reference.update(a).unwrap());
        let bits = |(p, m): &(Vec<Vec<f32>>, Vec<Vec<Vec<f32>>>)| -> Vec<u32> {
            p.iter().chain(m.iter().flatten()).flatten().map(|x| x.to_bits()).collect()
        };
        assert!(bits(&fast) == bits(&reference), "{}: the fast update differs from the reference", d.name);
        assert!(fast.0 != params, "{}: nothing moved", d.name);
    }
}

/// Each optimizer's state is saved as `<optimizer>.<state>.<parameter>` and read back.
#[test]
fn every_optimizers_state_round_trips_through_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = common::rng(15);
    let kinds: Vec<OptimizerKind> = RULES
        .iter()
        .map(|d| d.default_kind())
        .chain([RmsProp { alpha: 0.9, eps: 1e-7, weight_decay: 1e-3, momentum: 0.5, centered: true }.into()])
        .collect();
    for kind in kinds {
        let opt = Optimizer { kind, lr: 2e-3 };
        let mut state = TrainState::new(Params::init(3), opt, 3, 32, true);
        for m in &mut state.moments {
            for t in m.tensors.iter_mut() {
                *t = common::uniform(&mut rng, t.len(), 0.0, 1e-3);
            }
        }
        state.step = 7;
        state.step_in_epoch = 7;
        let path = dir.path().join(format!("{}.safetensors", opt.descriptor().name));
        save_checkpoint(&path, &state).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for name in opt.state_names() {
            assert!(st.tensor(&format!("{name}.fc1.weight")).is_ok(), "{name}.fc1.weight missing");
        }
        let loaded = load_checkpoint(&path).unwrap().into_train_state().unwrap();
        assert_eq!(loaded, state, "{opt}");
    }
    let names: Vec<String> = Optimizer { kind: RmsProp::default().into(), lr: 1e-3 }.state_names();
    assert_eq!(names, ["rmsprop.square_avg", "rmsprop.momentum_buffer", "rmsprop.grad_avg"]);
    let names: Vec<String> = Optimizer { kind: AdamW::default().into(), lr: 1e-3 }.state_names();
    assert_eq!(names, ["adamw.m", "adamw.v"]);
}

/// The flags of one optimizer are refused with another, and bad values with their flag named.
#[test]
fn the_new_flags_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::write_small_mnist(dir.path(), 64, 16);
    let data = data.to_str().unwrap();
    for (args, message) in [
        (&["--alpha", "0.9"][..], "--alpha is not a setting of --optimizer adam"),
        (&["--optimizer", "adamw", "--momentum", "0.9"], "--momentum is not a setting of --optimizer adamw"),
        (&["--optimizer", "sgd", "--centered"], "--centered is not a setting of --optimizer sgd"),
        (&["--optimizer", "rmsprop", "--alpha", "1.5"], "--alpha = 1.5 must be in [0, 1)"),
        (&["--optimizer", "rmsprop", "--momentum", "-1"], "--momentum = -1 must be"),
        (&["--optimizer", "adamw", "--weight-decay", "-0.1"], "--weight-decay = -0.1 must be"),
        (&["--optimizer", "lion"], "lion"),
    ] {
        let mut all = vec!["train", "--data", data, "--steps", "1", "--batch", "8", "--backend", "cpu"];
        all.extend(args);
        let out = common::lenet(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(err.contains(message), "{args:?}: {err}");
    }
}
