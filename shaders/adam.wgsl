// Adam over every parameter in one dispatch (params, grads, m, v are each one flat buffer),
// exactly torch.optim.Adam's formula as src/cpu/ops.rs adam_update computes it:
// m += (1-b1)*(g-m); v = v*b2 + (1-b2)*g*g; p -= step_size * (m / (sqrt(v)/bc2_sqrt + eps)).
// step_size and bc2_sqrt come from the step's uniform (computed in f64 on the host).

struct Dims {
    n: u32,
    beta2: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    eps: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

struct Step {
    index_offset: u32,
    stats_slot: u32,
    step_size: f32,
    bias_correction2_sqrt: f32,
}

@group(0) @binding(0) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> param: array<f32>;
@group(0) @binding(4) var<storage, read_write> m: array<f32>;
@group(0) @binding(5) var<storage, read_write> v: array<f32>;
@group(0) @binding(6) var<uniform> dims: Dims;
@group(1) @binding(0) var<uniform> step: Step;

@compute @workgroup_size(256)
fn adam(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    if i >= dims.n {
        return;
    }
    let g = grad[i];
    let mi = m[i] + dims.one_minus_beta1 * (g - m[i]);
    let vi = v[i] * dims.beta2 + dims.one_minus_beta2 * g * g;
    m[i] = mi;
    v[i] = vi;
    let denom = sqrt(vi) / step.bias_correction2_sqrt + dims.eps;
    param[i] = param[i] - step.step_size * (mi / denom);
}
