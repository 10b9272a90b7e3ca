//! Every fast CPU op (src/cpu/fast.rs) against its plain reference twin (src/cpu/ops.rs) on
//! random inputs of several shapes, and the fast ops' determinism.
//!
//! Tolerance: |fast - ref| <= 1e-5 + 1e-4*|ref| per element. Both compute the same sums in f32
//! but in different orders (GEMM blocking, per-block partial sums), so they differ by rounding:
//! for a sum of n terms of size ~1 the difference is a few ulps times sqrt(n), well under 1e-4
//! relative for n up to a few thousand; the absolute 1e-5 covers sums that cancel to near zero.
//! A wrong index or a missing term is off by the size of a term, orders of magnitude more.

use lenet::cpu::{fast, ops};
use lenet::model::{AdamConfig, ConvShape};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

fn uniform(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| lo + (hi - lo) * ((rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32)).collect()
}

#[track_caller]
fn assert_close(what: &str, fast: &[f32], reference: &[f32]) {
    assert_eq!(fast.len(), reference.len(), "{what}: length");
    for (i, (&f, &r)) in fast.iter().zip(reference).enumerate() {
        assert!((f - r).abs() <= 1e-5 + 1e-4 * r.abs(), "{what}[{i}]: fast {f} reference {r}");
    }
}

/// NaN everywhere: a fast op that leaves an element unwritten fails the comparison.
fn poison(n: usize) -> Vec<f32> {
    vec![f32::NAN; n]
}

fn conv_shapes() -> Vec<ConvShape> {
    let s = |batch, in_channels, out_channels, height, width, kernel, padding| ConvShape {
        batch,
        in_channels,
        out_channels,
        height,
        width,
        kernel,
        padding,
    };
    vec![
        s(1, 1, 6, 28, 28, 5, 2),   // conv1, one image
        s(3, 6, 16, 14, 14, 5, 0),  // conv2, odd batch
        s(17, 1, 6, 28, 28, 5, 2),  // conv1, more than 8 reduction blocks' worth of odd images
        s(20, 6, 16, 14, 14, 5, 0), // conv2
        s(2, 3, 4, 7, 9, 3, 1),     // odd, non-square
        s(5, 2, 3, 6, 5, 3, 2),     // padding larger than needed
        s(64, 6, 16, 14, 14, 5, 0), // LeNet conv2 at a larger batch
    ]
}

#[test]
fn conv2d_forward_matches_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    for s in conv_shapes() {
        let inp = uniform(&mut rng, s.input_len(), -1.0, 1.0);
        let w = uniform(&mut rng, s.weight_len(), -0.5, 0.5);
        let b = uniform(&mut rng, s.out_channels, -0.5, 0.5);
        let mut r = vec![0.0; s.output_len()];
        ops::conv2d_forward(&mut r, &inp, &w, &b, s);
        let mut f = poison(s.output_len());
        fast::conv2d_forward(&mut f, &inp, &w, &b, s);
        assert_close(&format!("conv2d_forward {s:?}"), &f, &r);
        let mut fr = poison(s.output_len());
        fast::conv2d_relu_forward(&mut fr, &inp, &w, &b, s);
        let relu: Vec<f32> = r.iter().map(|x| x.max(0.0)).collect();
        assert_close(&format!("conv2d_relu_forward {s:?}"), &fr, &relu);
        let (ho, wo) = (s.out_height(), s.out_width());
        if ho % 2 == 0 && wo % 2 == 0 {
            // Fused conv + ReLU + pool: the conv output as above, and exactly the reference
            // pool of that output (same values, same argmax).
            let n = s.output_len();
            let (mut fc, mut fp, mut fa) = (poison(n), poison(n / 4), vec![u32::MAX; n / 4]);
            fast::conv2d_relu_maxpool_forward(&mut fc, &mut fp, &mut fa, &inp, &w, &b, s);
            assert_eq!(fc, fr, "fused conv output {s:?}");
            let (mut rp, mut ra) = (vec![0.0; n / 4], vec![0; n / 4]);
            ops::maxpool2x2_forward(&mut rp, &mut ra, &fr, s.batch, s.out_channels, ho, wo);
            assert_eq!(fp, rp, "fused pool {s:?}");
            assert_eq!(fa, ra, "fused argmax {s:?}");
        }
    }
}

#[test]
fn conv2d_backward_matches_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for s in conv_shapes() {
        let inp = uniform(&mut rng, s.input_len(), -1.0, 1.0);
        let w = uniform(&mut rng, s.weight_len(), -0.5, 0.5);
        let dout = uniform(&mut rng, s.output_len(), -1.0, 1.0);

        let mut r = vec![0.0; s.input_len()];
        ops::conv2d_backward_input(&mut r, &dout, &w, s);
        let mut f = poison(s.input_len());
        fast::conv2d_backward_input(&mut f, &dout, &w, s);
        assert_close(&format!("conv2d_backward_input {s:?}"), &f, &r);

        let (mut rw, mut rb) = (vec![0.0; s.weight_len()], vec![0.0; s.out_channels]);
        ops::conv2d_backward_weight(&mut rw, &mut rb, &dout, &inp, s);
        let (mut fw, mut fb) = (poison(s.weight_len()), poison(s.out_channels));
        fast::conv2d_backward_weight(&mut fw, &mut fb, &dout, &inp, s);
        // Sums over the batch and the image grow with the batch; compare relative to the
        // scale of the sum (sqrt of the number of terms) rather than to a value that may cancel.
        let terms = (s.batch * s.out_height() * s.out_width()) as f32;
        let scale = terms.sqrt();
        let rescale = |v: &[f32]| v.iter().map(|x| x / scale).collect::<Vec<_>>();
        assert_close(&format!("conv2d_backward_weight {s:?}"), &rescale(&fw), &rescale(&rw));
        assert_close(&format!("conv2d_backward_bias {s:?}"), &rescale(&fb), &rescale(&rb));
    }
}

#[test]
fn maxpool_matches_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    for (batch, channels, h, w) in [(1, 6, 28, 28), (3, 16, 10, 10), (7, 2, 4, 6), (40, 6, 28, 28)] {
        let n = batch * channels * h * w;
        // Quantised values so that ties occur and the tie rule is compared too.
        let inp: Vec<f32> = (0..n).map(|_| (rng.next_u32() % 5) as f32 - 1.0).collect();
        let (mut ro, mut ra) = (vec![0.0; n / 4], vec![0; n / 4]);
        ops::maxpool2x2_forward(&mut ro, &mut ra, &inp, batch, channels, h, w);
        let (mut fo, mut fa) = (poison(n / 4), vec![u32::MAX; n / 4]);
        fast::maxpool2x2_forward(&mut fo, &mut fa, &inp, batch, channels, h, w);
        assert_eq!(fo, ro);
        assert_eq!(fa, ra);

        let dout = uniform(&mut rng, n / 4, -1.0, 1.0);
        let mut rd = vec![0.0; n];
        ops::maxpool2x2_backward(&mut rd, &dout, &ra);
        let mut fd = poison(n);
        fast::maxpool2x2_backward(&mut fd, &dout, &ra);
        assert_eq!(fd, rd);

        // The fused pool + ReLU backward against the two reference ops in sequence, with the
        // pool's input a ReLU output as in the network.
        let relu_out: Vec<f32> = inp.iter().map(|x| x.max(0.0)).collect();
        ops::maxpool2x2_forward(&mut ro, &mut ra, &relu_out, batch, channels, h, w);
        ops::maxpool2x2_backward(&mut rd, &dout, &ra);
        let mut expected = vec![0.0; n];
        ops::relu_backward(&mut expected, &rd, &relu_out);
        let mut fd = poison(n);
        fast::maxpool2x2_relu_backward(&mut fd, &dout, &ra, &ro, batch, channels, h, w);
        assert_eq!(fd, expected);
    }
}

#[test]
fn linear_matches_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    for (batch, i, o) in [(1, 400, 120), (3, 120, 84), (33, 84, 10), (256, 400, 120), (70, 5, 37)] {
        let x = uniform(&mut rng, batch * i, -1.0, 1.0);
        let w = uniform(&mut rng, o * i, -0.1, 0.1);
        let b = uniform(&mut rng, o, -0.1, 0.1);
        let mut r = vec![0.0; batch * o];
        ops::linear_forward(&mut r, &x, &w, &b, batch, i, o);
        let mut f = poison(batch * o);
        fast::linear_forward(&mut f, &x, &w, &b, batch, i, o);
        assert_close(&format!("linear_forward {batch}x{i}->{o}"), &f, &r);
        let mut f = poison(batch * o);
        fast::linear_relu_forward(&mut f, &x, &w, &b, batch, i, o);
        let relu: Vec<f32> = r.iter().map(|x| x.max(0.0)).collect();
        assert_close(&format!("linear_relu_forward {batch}x{i}->{o}"), &f, &relu);

        let dout = uniform(&mut rng, batch * o, -1.0, 1.0);
        let mut r = vec![0.0; batch * i];
        ops::linear_backward_input(&mut r, &dout, &w, batch, i, o);
        let mut f = poison(batch * i);
        fast::linear_backward_input(&mut f, &dout, &w, batch, i, o);
        assert_close(&format!("linear_backward_input {batch}x{i}->{o}"), &f, &r);

        let (mut rw, mut rb) = (vec![0.0; o * i], vec![0.0; o]);
        ops::linear_backward_weight(&mut rw, &mut rb, &dout, &x, batch, i, o);
        let (mut fw, mut fb) = (poison(o * i), poison(o));
        fast::linear_backward_weight(&mut fw, &mut fb, &dout, &x, batch, i, o);
        let scale = (batch as f32).sqrt();
        let rescale = |v: &[f32]| v.iter().map(|x| x / scale).collect::<Vec<_>>();
        assert_close(&format!("linear_backward_weight {batch}x{i}->{o}"), &rescale(&fw), &rescale(&rw));
        assert_close(&format!("linear_backward_bias {batch}x{i}->{o}"), &rescale(&fb), &rescale(&rb));
    }
}

#[test]
fn elementwise_ops_match_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    for n in [1, 7, 10 * 256, 61_706] {
        let x = uniform(&mut rng, n, -1.0, 1.0);
        let g = uniform(&mut rng, n, -1.0, 1.0);
        let (mut r, mut f) = (vec![0.0; n], poison(n));
        ops::relu_forward(&mut r, &x);
        fast::relu_forward(&mut f, &x);
        assert_eq!(f, r);
        let mut fi = x.clone();
        fast::relu_in_place(&mut fi);
        assert_eq!(fi, r);
        let y = r.clone();
        let (mut r, mut f) = (vec![0.0; n], poison(n));
        ops::relu_backward(&mut r, &g, &y);
        fast::relu_backward(&mut f, &g, &y);
        assert_eq!(f, r);
        let mut fi = g.clone();
        fast::relu_backward_in_place(&mut fi, &y);
        assert_eq!(fi, r);

        // Adam, three steps from nonzero moments.
        let config = AdamConfig { lr: 3e-3, ..AdamConfig::default() };
        let mut rp = uniform(&mut rng, n, -1.0, 1.0);
        let mut rm = uniform(&mut rng, n, -0.1, 0.1);
        let mut rv = uniform(&mut rng, n, 0.0, 0.01);
        let (mut fp, mut fm, mut fv) = (rp.clone(), rm.clone(), rv.clone());
        for t in 1..=3 {
            let grad = uniform(&mut rng, n, -1.0, 1.0);
            ops::adam_update(&mut rp, &grad, &mut rm, &mut rv, &config, config.step(t));
            fast::adam_update(&mut fp, &grad, &mut fm, &mut fv, &config, config.step(t));
        }
        assert_close("adam param", &fp, &rp);
        assert_close("adam m", &fm, &rm);
        assert_close("adam v", &fv, &rv);
    }
    for batch in [1, 5, 256] {
        let logits = uniform(&mut rng, batch * 10, -5.0, 5.0);
        let labels: Vec<u32> = (0..batch).map(|_| rng.next_u32() % 10).collect();
        let (mut r, mut f) = (vec![0.0; batch * 10], poison(batch * 10));
        let rr = ops::softmax_xent_forward_backward(&mut r, &logits, &labels, batch, 10);
        let fr = fast::softmax_xent_forward_backward(&mut f, &logits, &labels, batch, 10);
        assert_close("dlogits", &f, &r);
        assert_eq!(fr.correct, rr.correct);
        assert!((fr.loss - rr.loss).abs() <= 1e-5 + 1e-4 * rr.loss.abs());
    }
}

/// The same inputs give the same bits, run after run, however rayon schedules the blocks; and
/// a pool of a different size gives the same bits too (the partitioning depends on shapes only).
#[test]
fn fast_ops_are_deterministic() {
    let mut rng = ChaCha8Rng::seed_from_u64(15);
    let s = ConvShape {
        batch: 37,
        in_channels: 6,
        out_channels: 16,
        height: 14,
        width: 14,
        kernel: 5,
        padding: 0,
    };
    let inp = uniform(&mut rng, s.input_len(), -1.0, 1.0);
    let dout = uniform(&mut rng, s.output_len(), -1.0, 1.0);
    let x = uniform(&mut rng, 37 * 400, -1.0, 1.0);
    let d = uniform(&mut rng, 37 * 120, -1.0, 1.0);
    let run = || {
        let (mut dw, mut db) = (vec![0.0; s.weight_len()], vec![0.0; 16]);
        fast::conv2d_backward_weight(&mut dw, &mut db, &dout, &inp, s);
        let (mut lw, mut lb) = (vec![0.0; 120 * 400], vec![0.0; 120]);
        fast::linear_backward_weight(&mut lw, &mut lb, &d, &x, 37, 400, 120);
        (dw, db, lw, lb)
    };
    let first = run();
    for _ in 0..5 {
        assert!(run() == first, "a fast op's result changed between identical runs");
    }
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        assert!(pool.install(run) == first, "result depends on the thread count ({threads})");
    }
}

/// The CPU backend trains exactly as the network functions do when called by hand on the
/// gathered batches, and its logits are those of a forward pass.
#[test]
fn cpu_backend_matches_the_network_functions() {
    use lenet::cpu::backend::CpuBackend;
    use lenet::cpu::network::{adam_step, backward, forward, Activations, Gradients};
    use lenet::data::Dataset;
    use lenet::model::{Params, TrainState, IMAGE_PIXELS};
    use lenet::train::Backend;

    let mut rng = ChaCha8Rng::seed_from_u64(16);
    let n = 40;
    let data = Dataset {
        images: (0..n * IMAGE_PIXELS).map(|_| rng.next_u32() as u8).collect(),
        labels: (0..n).map(|_| (rng.next_u32() % 10) as u8).collect(),
        rows: 28,
        cols: 28,
    };
    let (batch, steps) = (7, 3);
    let indices: Vec<u32> = (0..batch * steps).map(|_| rng.next_u32() % n as u32).collect();
    let config = AdamConfig::default();
    let start = TrainState::new(Params::init(3), 3, batch, true);

    let mut backend = CpuBackend::new(data.clone());
    assert_eq!(backend.kind(), "cpu");
    assert!(backend.adapter().starts_with("CPU"));
    backend.load_state(&start).unwrap();
    let stats = backend.train_steps(&indices, batch, 5, &config).unwrap();
    assert_eq!(stats.len(), steps);
    let mut got = start.clone();
    backend.store_state(&mut got).unwrap();

    let mut want = start.clone();
    want.step = 4;
    let (mut acts, mut grads) = (Activations::new(batch), Gradients::new(batch));
    for (s, idx) in indices.chunks(batch).enumerate() {
        let pixels: Vec<u8> = idx.iter().flat_map(|&i| data.image(i as usize).to_vec()).collect();
        let labels: Vec<u32> = idx.iter().map(|&i| data.labels[i as usize] as u32).collect();
        acts.set_input(&pixels);
        forward(&want.params, &mut acts);
        let r = backward(&want.params, &acts, &labels, &mut grads);
        adam_step(&mut want, &grads.params, &config);
        assert_eq!(stats[s].loss, r.loss);
        assert_eq!(stats[s].correct, r.correct);
    }
    assert_eq!(want.step, 7);
    assert!(got.params == want.params && got.adam_m == want.adam_m && got.adam_v == want.adam_v);
    assert!(got.params != start.params);

    let logits = backend.logits(&data).unwrap();
    let mut acts = Activations::new(n);
    acts.set_input(&data.images);
    forward(&want.params, &mut acts);
    assert_close("logits", &logits, &acts.logits);

    assert!(backend.train_steps(&[n as u32], 1, 1, &config).is_err(), "index out of range");
    assert!(backend.train_steps(&[0], 0, 1, &config).is_err(), "batch 0");
}

/// A whole forward + backward pass gives the same bits on 1, 2 and 3 threads.
#[test]
fn network_step_is_deterministic_across_thread_counts() {
    use lenet::cpu::network::{backward, forward, Activations, Gradients};
    use lenet::model::{Params, IMAGE_PIXELS};
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let batch = 37;
    let pixels: Vec<u8> = (0..batch * IMAGE_PIXELS).map(|_| rng.next_u32() as u8).collect();
    let labels: Vec<u32> = (0..batch).map(|_| rng.next_u32() % 10).collect();
    let params = Params::init(9);
    let run = || {
        let mut acts = Activations::new(batch);
        acts.set_input(&pixels);
        forward(&params, &mut acts);
        let mut grads = Gradients::new(batch);
        let r = backward(&params, &acts, &labels, &mut grads);
        (acts.logits, grads.params, r.loss.to_bits())
    };
    let results: Vec<_> = [1, 2, 3]
        .iter()
        .map(|&t| rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap().install(run))
        .collect();
    assert!(results[0].1.all_finite());
    assert!(results.iter().all(|r| *r == results[0]), "the step's bits depend on the thread count");
}
