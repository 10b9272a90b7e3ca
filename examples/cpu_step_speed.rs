//! Speed of one CPU training step (forward + backward + Adam) at batch 256 on random data.
//!
//!     cargo run --release --example cpu_step_speed [-- BATCH]

use std::time::{Duration, Instant};

use lenet::cpu::backend::cpu_description;
use lenet::cpu::network::{adam_step, backward, forward, Activations, Gradients};
use lenet::model::{AdamConfig, Params, TrainState, CLASSES, IMAGE_PIXELS};
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
    let step = median(total);
    println!("{}", cpu_description());
    println!(
        "batch {batch}: {:.2} ms/step, {:.0} images/s (median of 20; forward {:.2} ms, backward {:.2} ms, adam {:.3} ms)",
        ms(step),
        batch as f64 / step.as_secs_f64(),
        ms(median(fwd)),
        ms(median(bwd)),
        ms(median(adam)),
    );
}
