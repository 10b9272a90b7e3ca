//! Every op of the seam (`lenet::ops::Ops`), fused ones included, checked against the CPU
//! reference on random inputs of several shapes, on every implementation: one test body per op
//! (`lenet::opcheck::check`), instantiated for the fast CPU path and for both generations of GPU
//! kernels (the reference is what they are compared with). The GPU instances fail when LENET_REQUIRE_GPU=1 and there
//! is no adapter, and say "skipped" otherwise.
//!
//! Then the checks themselves are checked: faults planted in an implementation's outputs (a 1%
//! scale error, a flipped sign, an off-by-one, an unwritten element) must be caught.

mod common;

use lenet::cpu::{Fast, Reference};
use lenet::gpu::{GpuOps, Variant};
use lenet::opcheck::{self, Host, OpCase};
use lenet::ops::{ConvShape, LinearShape, Ops};

fn conv(batch: usize, cin: usize, cout: usize, side: usize, kernel: usize, padding: usize) -> ConvShape {
    ConvShape { batch, in_channels: cin, out_channels: cout, height: side, width: side, kernel, padding }
}

fn lin(batch: usize, i: usize, o: usize) -> LinearShape {
    LinearShape { batch, in_features: i, out_features: o }
}

/// LeNet-5's shapes and others: a single image, odd batches and channel counts, 3x3 kernels
/// (the GPU's general kernels), and sides no workgroup size divides.
fn conv_shapes() -> Vec<ConvShape> {
    vec![
        conv(1, 1, 6, 28, 5, 2),
        conv(13, 1, 6, 28, 5, 2),
        conv(3, 6, 16, 14, 5, 0),
        conv(37, 6, 16, 14, 5, 0),
        conv(2, 3, 5, 10, 3, 1),
        conv(5, 2, 7, 12, 5, 0),
    ]
}

fn linear_shapes() -> Vec<LinearShape> {
    vec![lin(1, 400, 120), lin(37, 400, 120), lin(13, 120, 84), lin(5, 84, 10), lin(17, 33, 19)]
}

/// The cases of one op kind.
fn cases(op: &str) -> Vec<OpCase> {
    match op {
        "gather" => vec![
            OpCase::Gather { batch: 1, images: 3, side: 28, max_shift: 0 },
            OpCase::Gather { batch: 37, images: 50, side: 28, max_shift: 3 },
        ],
        "conv_relu_pool" => conv_shapes().into_iter().map(OpCase::ConvReluPool).collect(),
        "gather_conv_relu_pool" => [1, 13, 40]
            .into_iter()
            .map(|b| OpCase::GatherConvReluPool { s: conv(b, 1, 6, 28, 5, 2), images: 64, max_shift: 2 })
            .collect(),
        "linear" => linear_shapes()
            .into_iter()
            .flat_map(|s| [OpCase::Linear { s, relu: true }, OpCase::Linear { s, relu: false }])
            .collect(),
        "softmax_xent" => vec![
            OpCase::SoftmaxXent { batch: 1, classes: 10 },
            OpCase::SoftmaxXent { batch: 300, classes: 10 },
            OpCase::SoftmaxXent { batch: 7, classes: 3 },
        ],
        "linear_xent" => vec![
            OpCase::LinearXent { s: lin(1, 84, 10), mask: Some(true) },
            OpCase::LinearXent { s: lin(67, 84, 10), mask: Some(true) },
            OpCase::LinearXent { s: lin(9, 20, 10), mask: Some(false) },
            OpCase::LinearXent { s: lin(5, 84, 10), mask: None },
        ],
        "linear_backward" => linear_shapes()
            .into_iter()
            .flat_map(|s| [Some(true), Some(false), None].map(|mask| OpCase::LinearBackward { s, mask }))
            .collect(),
        "conv_backward" => conv_shapes()
            .into_iter()
            .flat_map(|s| [true, false].map(|dinput| OpCase::ConvBackwardFromPool { s, dinput }))
            .collect(),
        "adam" => vec![
            OpCase::Adam { lens: vec![150, 6, 2400, 16], partials: vec![1, 1, 1, 1] },
            OpCase::Adam { lens: vec![150, 6, 1000], partials: vec![3, 3, 1] },
        ],
        "sgd" => vec![
            OpCase::Sgd {
                lens: vec![150, 6, 2400],
                partials: vec![1, 1, 1],
                momentum: 0.9,
                nesterov: false,
                weight_decay: 0.0,
            },
            OpCase::Sgd {
                lens: vec![150, 6],
                partials: vec![4, 1],
                momentum: 0.9,
                nesterov: true,
                weight_decay: 5e-4,
            },
            OpCase::Sgd {
                lens: vec![77],
                partials: vec![1],
                momentum: 0.0,
                nesterov: false,
                weight_decay: 1e-2,
            },
        ],
        other => panic!("no cases for {other}"),
    }
}

/// The one test body of op kind `op` on an implementation: every case, three seeds each.
fn check_all<O: Ops>(ops: &mut O, op: &str) {
    for case in cases(op) {
        for seed in 1..=3 {
            match opcheck::check(ops, &case, seed) {
                Ok(o) => assert!(o.worst_ratio <= 1.0, "{case:?}: {o:?}"),
                Err(e) => panic!("{} on {}, {case:?}, seed {seed}: {e:#}", case.op(), ops.name()),
            }
        }
    }
}

/// One test per (op kind, implementation): `op_tests!(name => "op kind", ...)`.
macro_rules! op_tests {
    ($($name:ident => $op:literal),* $(,)?) => {
        mod fast {
            $(#[test] fn $name() { super::check_all(&mut super::Fast::default(), $op); })*
        }
        /// The first kernels (`LENET_KERNELS=v1`).
        mod gpu_v1 {
            $(#[test] fn $name() {
                let Some(ctx) = super::common::gpu() else { return };
                super::check_all(&mut super::GpuOps::with_variant(ctx, super::Variant::V1).unwrap(), $op);
            })*
        }
        /// The second kernels (the default).
        mod gpu_v2 {
            $(#[test] fn $name() {
                let Some(ctx) = super::common::gpu() else { return };
                super::check_all(&mut super::GpuOps::with_variant(ctx, super::Variant::V2).unwrap(), $op);
            })*
        }
    };
}

op_tests! {
    gather => "gather",
    conv_relu_pool_forward => "conv_relu_pool",
    gather_conv_relu_pool_forward => "gather_conv_relu_pool",
    linear_forward => "linear",
    softmax_xent => "softmax_xent",
    linear_xent_forward_backward => "linear_xent",
    linear_backward => "linear_backward",
    conv_backward_from_pool => "conv_backward",
    adam_update => "adam",
    sgd_update => "sgd",
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
    let kinds = [
        "gather",
        "conv_relu_pool",
        "gather_conv_relu_pool",
        "linear",
        "softmax_xent",
        "linear_xent",
        "linear_backward",
        "conv_backward",
        "adam",
        "sgd",
    ];
    for kind in kinds {
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
    for kind in ["gather", "conv_relu_pool", "softmax_xent", "linear_xent"] {
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
    for kind in ["gather", "conv_relu_pool", "linear_xent", "conv_backward", "adam", "sgd"] {
        for case in cases(kind) {
            let o = opcheck::check(&mut Reference, &case, 1).unwrap();
            assert_eq!(o.worst_ratio, 0.0, "{case:?}");
        }
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
