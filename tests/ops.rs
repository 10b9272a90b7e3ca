//! Every op of the seam (`lenet::ops::Ops`), fused ones included, checked against the CPU
//! reference on random inputs of several shapes, on every implementation: one test body
//! (`lenet::opcheck::check`) over every case of `lenet::opcheck::test_cases`, run on the fast CPU
//! path, the GPU's naive kernels (its reference) and its default kernels (the reference is what
//! they are compared with). The named alternatives (`lenet::gpu::alternatives`) get one
//! whole-step check each (tests/gpu_training.rs), not one per op.
//! A new op's cases go in that list and are checked here on every path. The GPU tests fail when
//! LENET_REQUIRE_GPU=1 and there is no adapter, and say "skipped" otherwise.
//!
//! Then the checks themselves are checked: faults planted in an implementation's outputs (a 1%
//! scale error, a flipped sign, an off-by-one, an unwritten element) must be caught.

mod common;

use lenet::cpu::{Fast, Reference};
use lenet::gpu::{GpuOps, Variant};
use lenet::opcheck::{self, Host, OpCase};
use lenet::ops::Ops;

/// Every case of every op on an implementation, three seeds each; the failures of all ops are
/// reported together, each with its op, case and seed.
fn check_all<O: Ops>(ops: &mut O) {
    let mut failures = Vec::new();
    for case in opcheck::test_cases() {
        for seed in 1..=3 {
            match opcheck::check(ops, &case, seed) {
                Ok(o) if o.worst_ratio <= 1.0 => {}
                Ok(o) => failures.push(format!("{}: {case:?}, seed {seed}: {o:?}", case.op())),
                Err(e) => failures.push(format!("{}: {case:?}, seed {seed}: {e:#}", case.op())),
            }
        }
    }
    assert!(failures.is_empty(), "on {}:\n{}", ops.name(), failures.join("\n"));
}

/// The cases of one op, for the fault-planting tests below.
fn cases(op: &str) -> Vec<OpCase> {
    let cases: Vec<OpCase> = opcheck::test_cases().into_iter().filter(|c| c.op() == op).collect();
    assert!(!cases.is_empty(), "no cases for {op}");
    cases
}

/// The ops with test cases, in order.
fn ops_with_cases() -> Vec<&'static str> {
    let mut ops: Vec<&str> = opcheck::test_cases().iter().map(OpCase::op).collect();
    ops.dedup();
    ops
}

#[test]
fn every_op_has_cases() {
    let ops = ops_with_cases();
    for op in [
        "gather",
        "conv_relu_pool_forward",
        "gather_conv_relu_pool_forward",
        "linear_forward",
        "softmax_xent",
        "linear_xent_forward_backward",
        "linear_backward",
        "conv_backward_from_pool",
        "head_forward_backward",
        "trunk_forward",
        "trunk_backward",
        "update",
    ] {
        assert!(ops.contains(&op), "{op} has no test case");
    }
    // Every optimizer's update is checked.
    for d in lenet::optim::RULES {
        let checked = opcheck::test_cases()
            .iter()
            .any(|c| matches!(c, OpCase::Update { step, .. } if step.optimizer == d.name));
        assert!(checked, "{} has no update case", d.name);
    }
}

/// The one test body, on each implementation.
#[test]
fn fast() {
    check_all(&mut Fast);
}

/// The naive kernels (`v1`), the GPU's reference.
#[test]
fn gpu_naive() {
    let Some(ctx) = common::gpu() else { return };
    check_all(&mut GpuOps::with_variant(ctx, Variant::V1).unwrap());
}

/// The default kernels on the adapter (the fused family).
#[test]
fn gpu_default() {
    let Some(ctx) = common::gpu() else { return };
    let variant = Variant::default_for(ctx.adapter_info.device_type);
    check_all(&mut GpuOps::with_variant(ctx, variant).unwrap());
}

// ---- The checks catch what they guard against. ----

/// The reference's outputs for `case`, and a copy with `plant` applied, compared.
fn planted(case: &OpCase, plant: impl Fn(&mut Host)) -> Result<opcheck::Outcome, String> {
    let host = opcheck::inputs(case, 1);
    let want = opcheck::run(&mut Reference, case, &host).unwrap();
    let mut got = want.clone();
    plant(&mut got);
    opcheck::compare(case, &host, &got, &want).map_err(|e| format!("{e:#}"))
}

fn f32_out<'a>(h: &'a mut Host, name: &str) -> &'a mut Vec<f32> {
    &mut h.f32s.iter_mut().find(|(n, _)| *n == name).unwrap().1
}

/// A fault planted in one output.
type Plant = Box<dyn Fn(&mut Vec<f32>)>;

/// Every f32 output of every op kind: unchanged passes; 1% too large, a flipped sign, the
/// values shifted by one element, or one element left unwritten fails.
#[test]
fn planted_faults_are_caught_in_every_output() {
    for kind in ops_with_cases() {
        let case = cases(kind).into_iter().nth(1).unwrap_or_else(|| cases(kind).remove(0));
        planted(&case, |_| {}).unwrap_or_else(|e| panic!("{kind}: the reference against itself: {e}"));
        let host = opcheck::inputs(&case, 1);
        let outputs: Vec<&str> =
            opcheck::run(&mut Reference, &case, &host).unwrap().f32s.iter().map(|(n, _)| *n).collect();
        for name in outputs {
            // Outputs that are legitimately all zero or constant cannot show a scale error.
            let values = opcheck::run(&mut Reference, &case, &host)
                .unwrap()
                .f32s
                .into_iter()
                .find(|(n, _)| *n == name)
                .unwrap()
                .1;
            let nonzero = values.iter().any(|&x| x != 0.0);
            let faults: [(&str, Plant); 4] = [
                ("1% scale", Box::new(|v| v.iter_mut().for_each(|x| *x *= 1.01))),
                ("flipped sign", Box::new(|v| v.iter_mut().for_each(|x| *x = -*x))),
                ("off by one", Box::new(|v| v.rotate_right(1))),
                (
                    "unwritten",
                    Box::new(|v| {
                        let mid = v.len() / 2;
                        v[mid] = f32::NAN;
                    }),
                ),
            ];
            for (fault, f) in &faults {
                if !nonzero && *fault != "unwritten" {
                    continue;
                }
                let r = planted(&case, |h| f(f32_out(h, name)));
                assert!(r.is_err(), "{kind}: {fault} in {name} was not caught ({r:?})");
            }
        }
    }
}

/// u32 outputs: a wrong argmax, label or correct flag fails (unless it is a tie within
/// rounding, which random inputs do not produce).
#[test]
fn planted_index_faults_are_caught() {
    for kind in ["gather", "conv_relu_pool_forward", "softmax_xent", "linear_xent_forward_backward"] {
        let case = cases(kind).remove(1.min(cases(kind).len() - 1));
        let r = planted(&case, |h| {
            let (_, v) = h.u32s.first_mut().unwrap();
            v[0] ^= 1;
        });
        assert!(r.is_err(), "{kind}: a changed index was not caught");
    }
}

/// The reference runs every case too (its outputs fully written, its own comparison exact).
#[test]
fn the_reference_passes_its_own_checks() {
    for case in opcheck::test_cases() {
        let o = opcheck::check(&mut Reference, &case, 1).unwrap();
        assert_eq!(o.worst_ratio, 0.0, "{case:?}");
    }
}

/// A shader that does not compile is an error value, not a panic.
#[test]
fn a_shader_error_is_an_err_not_a_panic() {
    let Some(ctx) = common::gpu() else { return };
    let src = "@group(0) @binding(0) var<storage, read_write> x: array<f32>;
               @compute @workgroup_size(1) fn main() { x[0] = undefined_name; }";
    let scope = ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
    let _ = ctx.device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("broken"),
        source: wgpu::ShaderSource::Wgsl(src.into()),
    });
    assert!(pollster::block_on(scope.pop()).is_some());
    assert!(lenet::gpu::shader::reflect("broken.wgsl", src).is_err());
}

/// The conv backward case at `batch` without an input gradient (its outputs: the weight and
/// bias gradients only).
fn weight_gradient_case(batch: usize) -> OpCase {
    cases("conv_backward_from_pool")
        .into_iter()
        .find(|c| matches!(c, OpCase::ConvBackwardFromPool { s, dinput: false } if s.batch == batch))
        .unwrap_or_else(|| panic!("no weight-gradient case at batch {batch}"))
}

/// A dropped partial: the weight gradient of a batch without one group's images (the last
/// `group` of them, as a kernel that drops its last partial sums) fails the check, at the
/// training batches where conv_v2.wgsl sums 2 and 9 images a partial.
#[test]
fn a_dropped_partial_of_the_weight_gradient_is_caught() {
    for (batch, group) in [(256, 2), (1100, 9)] {
        let case = weight_gradient_case(batch);
        let host = opcheck::inputs(&case, 1);
        let want = opcheck::run(&mut Reference, &case, &host).unwrap();
        let mut dropped = host.clone();
        let dpooled = f32_out(&mut dropped, "dpooled");
        let per_image = dpooled.len() / batch;
        let n = dpooled.len();
        dpooled[n - group * per_image..].iter_mut().for_each(|x| *x = 0.0);
        let got = opcheck::run(&mut Reference, &case, &dropped).unwrap();
        let r = opcheck::compare(&case, &host, &got, &want);
        assert!(r.is_err(), "batch {batch}: a dropped partial of {group} images was not caught ({r:?})");
    }
}

/// The reference run on `case`'s inputs with `plant` applied, compared with its run on the
/// inputs as drawn (which passes against itself).
fn planted_inputs(case: &OpCase, plant: &dyn Fn(&mut Host)) -> anyhow::Result<opcheck::Outcome> {
    let host = opcheck::inputs(case, 1);
    let want = opcheck::run(&mut Reference, case, &host).unwrap();
    let mut planted = host.clone();
    plant(&mut planted);
    let got = opcheck::run(&mut Reference, case, &planted).unwrap();
    opcheck::compare(case, &host, &want, &want).expect("the reference against itself");
    opcheck::compare(case, &host, &got, &want)
}

/// The case of `op` at batch `batch`.
fn case_at(op: &str, batch: usize) -> OpCase {
    let batch_of = |c: &OpCase| match c {
        OpCase::ConvReluPool(s) => s.batch,
        OpCase::Head(h) => h.batch,
        OpCase::TrunkForward { s, .. } | OpCase::TrunkBackward(s) => s.conv1.batch,
        _ => 0,
    };
    cases(op)
        .into_iter()
        .find(|c| batch_of(c) == batch)
        .unwrap_or_else(|| panic!("no {op} case at batch {batch}"))
}

/// A wrong tap and a dropped staging round: a forward convolution whose weights are read one
/// tap to the side, or whose first input channel was never staged for one image, fails the
/// check.
#[test]
fn a_wrong_tap_or_a_dropped_staging_round_is_caught() {
    let case = case_at("conv_relu_pool_forward", 37);
    let OpCase::ConvReluPool(s) = case else { unreachable!() };
    let plane = s.height * s.width;
    let wrong_tap = planted_inputs(&case, &|h| f32_out(h, "weight").rotate_left(1));
    let unstaged = planted_inputs(&case, &|h| f32_out(h, "input")[..plane].iter_mut().for_each(|x| *x = 0.0));
    for (fault, r) in [("a wrong tap", wrong_tap), ("a dropped staging round", unstaged)] {
        assert!(r.is_err(), "{fault} was not caught ({r:?})");
    }
}

/// The fused head's own faults, each caught at its stage: a dropped partial (the last
/// workgroup's images missing from fc1's weight gradient), a dropped staging round (a round of
/// four images left with the previous round's fc1 outputs) and a wrong tap (the input gradient
/// read one weight to the side).
#[test]
fn the_heads_dropped_partial_stale_round_and_wrong_tap_are_caught() {
    let case = case_at("head_forward_backward", 67);
    let OpCase::Head(hs) = case else { unreachable!() };
    let [f0, f1] = [hs.features[0], hs.features[1]];
    let host = opcheck::inputs(&case, 1);
    let want = opcheck::run(&mut Reference, &case, &host).unwrap();
    let input = f32_out(&mut host.clone(), "input").clone();
    let dout1 = f32_out(&mut want.clone(), "dout1").clone();

    let mut dropped = want.clone();
    let dw1 = f32_out(&mut dropped, "dw1");
    for b in hs.batch - 3..hs.batch {
        for o in 0..f1 {
            for k in 0..f0 {
                dw1[o * f0 + k] -= dout1[b * f1 + o] * input[b * f0 + k];
            }
        }
    }
    let mut stale = want.clone();
    f32_out(&mut stale, "out1").copy_within(0..4 * f1, 4 * f1);
    let mut wrong_tap = want.clone();
    f32_out(&mut wrong_tap, "dinput").chunks_mut(f0).for_each(|row| row.rotate_left(1));
    for (fault, got) in [("a dropped partial", dropped), ("a stale round", stale), ("a wrong tap", wrong_tap)]
    {
        let r = opcheck::compare(&case, &host, &got, &want);
        assert!(r.is_err(), "{fault} was not caught ({r:?})");
    }
    opcheck::compare(&case, &host, &want, &want).expect("the reference against itself");
}

/// The fused trunk's forward pass with each split of conv2's channels over workgroups (on a CPU
/// adapter it runs one workgroup an image unless told otherwise).
#[test]
fn gpu_fused_trunk_forward_with_each_split() {
    let Some(ctx) = common::gpu() else { return };
    let mut ops = GpuOps::with_variant(ctx, Variant::Fused).unwrap();
    let mut failures = Vec::new();
    for splits in [2, 4, 8] {
        ops.trunk_splits = Some(splits);
        for case in cases("trunk_forward") {
            if let Err(e) = opcheck::check(&mut ops, &case, 1) {
                failures.push(format!("{splits} splits, {case:?}: {e:#}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The fused trunk's own faults, each caught at its stage: a dropped partial (the last image's
/// share of the weight gradients), a stale staging round (an image's gather left with the image
/// before it) and a wrong tap (conv2's weights read one tap to the side).
#[test]
fn the_trunks_dropped_partial_stale_round_and_wrong_tap_are_caught() {
    let backward = case_at("trunk_backward", 13);
    let r = planted_inputs(&backward, &|h| {
        let d = f32_out(h, "dpooled");
        let n = d.len();
        d[n - n / 13..].iter_mut().for_each(|x| *x = 0.0);
    });
    assert!(r.is_err(), "a dropped partial was not caught ({r:?})");
    let forward = case_at("trunk_forward", 13);
    let r = planted_inputs(&forward, &|h| {
        let indices = &mut h.u32s.iter_mut().find(|(n, _)| *n == "indices").unwrap().1;
        indices[1] = indices[0];
    });
    assert!(r.is_err(), "a stale staging round was not caught ({r:?})");
    let r = planted_inputs(&forward, &|h| f32_out(h, "w2").rotate_left(1));
    assert!(r.is_err(), "a wrong tap was not caught ({r:?})");
}

/// A fused kernel binds each group of its tensors as one buffer: handed a group whose tensors
/// are separate buffers (one upload each), the fused head refuses with a line naming the group,
/// rather than reading one buffer at the others' offsets.
#[test]
fn the_fused_head_refuses_tensors_that_are_not_packed() {
    use lenet::ops::{HeadArgs, HeadLayerArgs};
    let Some(ctx) = common::gpu() else { return };
    let mut ops = GpuOps::with_variant(ctx, Variant::Fused).unwrap();
    let OpCase::Head(s) = case_at("head_forward_backward", 13) else { unreachable!() };
    assert!(ops.fuses(lenet::ops::Fusion::Head(s)));
    let parts = ops.grad_partials(lenet::ops::GradOp::Head { head: s, layer: 0 });
    let mut alloc = |n: usize| ops.alloc::<f32>("separate", n).unwrap();
    let input = alloc(s.batch * s.features[0]);
    let mut dinput = alloc(s.batch * s.features[0]);
    let mut bufs: Vec<[_; 6]> = s
        .layers()
        .iter()
        .map(|l| {
            let out = l.batch * l.out_features;
            [
                alloc(l.weight_len()),
                alloc(l.out_features),
                alloc(out),
                alloc(out),
                alloc(parts * l.weight_len()),
                alloc(parts * l.out_features),
            ]
        })
        .collect();
    let mut losses = alloc(s.batch);
    let labels = ops.alloc::<u32>("labels", s.batch).unwrap();
    let mut correct = ops.alloc::<u32>("correct", s.batch).unwrap();
    let mut layers = bufs.iter_mut().map(|[weight, bias, out, dout, dweight, dbias]| HeadLayerArgs {
        weight: &*weight,
        bias: &*bias,
        out,
        dout,
        dweight,
        dbias,
    });
    let layers = [layers.next().unwrap(), layers.next().unwrap(), layers.next().unwrap()];
    let a = HeadArgs {
        input: &input,
        layers,
        labels: &labels,
        losses: &mut losses,
        correct: &mut correct,
        dinput: &mut dinput,
        s,
    };
    let err = format!("{:#}", ops.head_forward_backward(a).unwrap_err());
    assert!(err.contains("packed in one buffer"), "{err}");
}
