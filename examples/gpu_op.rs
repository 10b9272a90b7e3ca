//! One GPU op on tensors of your own, checked against the CPU reference: LeNet-5's second fully
//! connected layer (120 -> 84, with ReLU) on a batch of 4, through the op seam
//! (`lenet::ops::Ops`) that the trainer, the tests and the bench use. Skips with a line when
//! there is no GPU adapter (on Linux without a GPU, Mesa's lavapipe provides one).
//!
//!     cargo run --release --example gpu_op

use std::process::ExitCode;

use lenet::cpu::reference;
use lenet::gpu::{GpuContext, GpuOps};
use lenet::ops::{LinearForwardArgs, LinearShape, Ops};

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `n` values in [-1, 1), the same on every run.
fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919 + seed * 104_729) % 2001) as f32 / 1000.0 - 1.0).collect()
}

fn run() -> anyhow::Result<ExitCode> {
    let ctx = match GpuContext::new(None) {
        Ok(ctx) => ctx,
        Err(e) => {
            println!("gpu_op: skipped, no GPU adapter ({e:#})");
            return Ok(ExitCode::SUCCESS);
        }
    };
    let adapter = ctx.adapter_info.name.clone();
    let mut gpu = GpuOps::new(ctx)?;
    let s = LinearShape { batch: 4, in_features: 120, out_features: 84 };
    let input = values(s.batch * s.in_features, 1);
    let weight: Vec<f32> = values(s.out_features * s.in_features, 2).iter().map(|w| w * 0.1).collect();
    let bias = values(s.out_features, 3);

    let (input_buf, weight_buf, bias_buf) =
        (gpu.upload("input", &input)?, gpu.upload("fc2_weight", &weight)?, gpu.upload("fc2_bias", &bias)?);
    let mut out_buf = gpu.alloc::<f32>("fc2_out", s.batch * s.out_features)?;
    gpu.linear_forward(LinearForwardArgs {
        input: &input_buf,
        weight: &weight_buf,
        bias: &bias_buf,
        out: &mut out_buf,
        s,
        relu: true,
    })?;
    let got = gpu.read(&out_buf)?;

    let mut want = vec![0.0f32; s.batch * s.out_features];
    reference::linear_layer_forward(&mut want, &input, &weight, &bias, s, true);

    // Each output is a sum of 121 products added in another order on the GPU: it may differ by
    // the rounding of a sum of n terms, n * eps * (the sum of the terms' magnitudes).
    let mut worst = 0.0f32;
    for b in 0..s.batch {
        for o in 0..s.out_features {
            let row = &weight[o * s.in_features..][..s.in_features];
            let x = &input[b * s.in_features..][..s.in_features];
            let magnitude = bias[o].abs() + row.iter().zip(x).map(|(w, x)| (w * x).abs()).sum::<f32>();
            let bound = (s.in_features + 1) as f32 * f32::EPSILON * magnitude;
            let i = b * s.out_features + o;
            let diff = (got[i] - want[i]).abs();
            if diff > bound {
                eprintln!("error: output [{b}, {o}]: GPU {} vs CPU {} (bound {bound:e})", got[i], want[i]);
                return Ok(ExitCode::FAILURE);
            }
            worst = worst.max(diff);
        }
    }
    println!(
        "gpu_op: fc2 forward ({}x{} -> {}) on {adapter} matches the CPU reference (largest difference {worst:e})",
        s.batch, s.in_features, s.out_features
    );
    Ok(ExitCode::SUCCESS)
}
