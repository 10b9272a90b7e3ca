//! Speed of one CPU training step (forward + backward + Adam) at batch 256 on random data.
//!
//!     cargo run --release --example cpu_step_speed [-- BATCH]

use std::time::{Duration, Instant};

use lenet::cpu::backend::cpu_description;
use lenet::cpu::fast;
use lenet::cpu::network::{adam_step, backward, forward, Activations, Gradients};
use lenet::model::*;
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let batch: usize = std::env::args().nth(1).map_or(256, |s| s.parse().expect("batch size"));
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let pixels: Vec<u8> = (0..batch * IMAGE_PIXELS).map(|_| rng.next_u32() as u8).collect();
    let labels: Vec<u32> = (0..batch).map(|_| rng.next_u32() % CLASSES as u32).collect();
    let mut state = TrainState::new(Params::init(1), 1, batch, true);
    let mut acts = Activations::new(batch);
    let mut grads = Gradients::new(batch);
    let config = AdamConfig::default();
    acts.set_input(&pixels);

    let (mut fwd, mut bwd, mut adam, mut total) = (vec![], vec![], vec![], vec![]);
    for i in 0..25 {
        let t0 = Instant::now();
        forward(&state.params, &mut acts);
        let t1 = Instant::now();
        backward(&state.params, &acts, &labels, &mut grads);
        let t2 = Instant::now();
        adam_step(&mut state, &grads.params, &config);
        let t3 = Instant::now();
        if i >= 5 {
            fwd.push(t1 - t0);
            bwd.push(t2 - t1);
            adam.push(t3 - t2);
            total.push(t3 - t0);
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let best = *total.iter().min().unwrap();
    let step = median(total.clone());
    println!("{}", cpu_description());
    println!(
        "batch {batch}: {:.2} ms/step, {:.0} images/s (median of 20; forward {:.2} ms, backward {:.2} ms, adam {:.3} ms)",
        ms(step),
        batch as f64 / step.as_secs_f64(),
        ms(median(fwd)),
        ms(median(bwd)),
        ms(median(adam)),
    );
    println!("best step: {:.2} ms, {:.0} images/s", ms(best), batch as f64 / best.as_secs_f64());

    println!("per op, ms:                  median    best");
    per_op(&state.params, &acts, &mut grads_scratch(batch));
}

fn grads_scratch(batch: usize) -> Vec<f32> {
    vec![0.0; batch * CONV1_CHANNELS * CONV1_SIDE * CONV1_SIDE]
}

fn time(name: &str, mut f: impl FnMut()) {
    let mut v = Vec::new();
    for i in 0..23 {
        let t = Instant::now();
        f();
        if i >= 3 {
            v.push(t.elapsed());
        }
    }
    let best = v.iter().min().unwrap().as_secs_f64() * 1e3;
    println!("  {name:<28} {:7.3} {best:7.3}", median(v).as_secs_f64() * 1e3);
}

/// Each fast op of the step on the activations of a real forward pass.
fn per_op(p: &Params, a: &Activations, scratch: &mut [f32]) {
    use ParamId::*;
    let b = a.batch;
    let (c1, c2) = (conv1_shape(b), conv2_shape(b));
    let mut w = vec![0.0; 48_000];
    let mut bias = vec![0.0; 120];
    let mut out = vec![0.0; scratch.len()];
    let mut am = vec![0u32; scratch.len()];
    let d = scratch;
    let n1 = c1.output_len();
    let n2 = c2.output_len();
    time("conv1 forward+relu", || {
        fast::conv2d_relu_forward(&mut out[..n1], &a.input, p.get(Conv1Weight), p.get(Conv1Bias), c1)
    });
    time("pool1 forward", || {
        fast::maxpool2x2_forward(&mut out[..n1 / 4], &mut am[..n1 / 4], &a.conv1, b, 6, 28, 28)
    });
    time("conv2 forward+relu", || {
        fast::conv2d_relu_forward(&mut out[..n2], &a.pool1, p.get(Conv2Weight), p.get(Conv2Bias), c2)
    });
    time("pool2 forward", || {
        fast::maxpool2x2_forward(&mut out[..n2 / 4], &mut am[..n2 / 4], &a.conv2, b, 16, 10, 10)
    });
    let mut pooled = vec![0.0; n1 / 4];
    time("conv1+relu+pool1 (fused)", || {
        fast::conv2d_relu_maxpool_forward(
            &mut out[..n1],
            &mut pooled,
            &mut am[..n1 / 4],
            &a.input,
            p.get(Conv1Weight),
            p.get(Conv1Bias),
            c1,
        )
    });
    time("conv2+relu+pool2 (fused)", || {
        fast::conv2d_relu_maxpool_forward(
            &mut out[..n2],
            &mut pooled[..n2 / 4],
            &mut am[..n2 / 4],
            &a.pool1,
            p.get(Conv2Weight),
            p.get(Conv2Bias),
            c2,
        )
    });
    time("fc1 forward+relu", || {
        fast::linear_relu_forward(
            &mut out[..b * 120],
            &a.pool2,
            p.get(Fc1Weight),
            p.get(Fc1Bias),
            b,
            400,
            120,
        )
    });
    time("fc2+fc3 forward", || {
        fast::linear_relu_forward(&mut out[..b * 84], &a.fc1, p.get(Fc2Weight), p.get(Fc2Bias), b, 120, 84);
        fast::linear_forward(&mut out[..b * 10], &a.fc2, p.get(Fc3Weight), p.get(Fc3Bias), b, 84, 10)
    });
    time("fc1 backward weight", || {
        fast::linear_backward_weight(&mut w[..48_000], &mut bias[..120], &a.fc1, &a.pool2, b, 400, 120)
    });
    time("fc1 backward input", || {
        fast::linear_backward_input(&mut out[..b * 400], &a.fc1, p.get(Fc1Weight), b, 400, 120)
    });
    time("pool2+relu backward", || {
        fast::maxpool2x2_relu_backward(&mut out[..n2], &a.pool2, &a.pool2_argmax, &a.pool2, b, 16, 10, 10)
    });
    d[..n2].copy_from_slice(&a.conv2);
    time("conv2 backward weight", || {
        fast::conv2d_backward_weight(&mut w[..2400], &mut bias[..16], &d[..n2], &a.pool1, c2)
    });
    time("conv2 backward input", || {
        fast::conv2d_backward_input(&mut out[..n1 / 4], &d[..n2], p.get(Conv2Weight), c2)
    });
    time("pool1+relu backward", || {
        fast::maxpool2x2_relu_backward(&mut out[..n1], &a.pool1, &a.pool1_argmax, &a.pool1, b, 6, 28, 28)
    });
    d[..n1].copy_from_slice(&a.conv1);
    time("conv1 backward weight", || {
        fast::conv2d_backward_weight(&mut w[..150], &mut bias[..6], &d[..n1], &a.input, c1)
    });
}
