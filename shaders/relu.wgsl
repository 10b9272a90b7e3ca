// Element-wise ReLU forward and backward (standalone; the trainer fuses ReLU into its neighbours).

struct Dims {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> x0: array<f32>;
@group(0) @binding(1) var<storage, read> x1: array<f32>;
@group(0) @binding(3) var<storage, read_write> y0: array<f32>;
@group(0) @binding(5) var<uniform> dims: Dims;

// y0 = max(x0, 0)
@compute @workgroup_size(256)
fn relu_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    if i >= dims.n {
        return;
    }
    y0[i] = max(x0[i], 0.0);
}

// y0 = x0 (dout) where x1 (the forward output) > 0, else 0
@compute @workgroup_size(256)
fn relu_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    if i >= dims.n {
        return;
    }
    y0[i] = select(0.0, x0[i], x1[i] > 0.0);
}
