// 2x2 max-pooling, stride 2, NCHW, for the shapes the fused conv kernels do not take (the
// fallback after conv_forward_naive, and before the naive backward kernels). The argmax is the
// flat index into the conv output of the window's first maximum in row-major order (strict '>'
// keeps the first on ties).

struct Params {
    // batch * channels
    planes: u32,
    height: u32,
    width: u32,
    _pad: u32,
}

@group(0) @binding(0) var<storage, read> conv: array<f32>;
@group(0) @binding(1) var<storage, read_write> pooled: array<f32>;
@group(0) @binding(2) var<storage, read_write> argmax: array<u32>;
@group(0) @binding(3) var<storage, read> dpooled: array<f32>;
@group(0) @binding(4) var<storage, read> saved_argmax: array<u32>;
@group(0) @binding(5) var<storage, read_write> dconv: array<f32>;
@group(0) @binding(6) var<uniform> params: Params;

// One invocation per pooled output.
@compute @workgroup_size(256)
fn pool_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let o = flat_index(wid, nwg, lid, 256u);
    let ho = params.height / 2u;
    let wo = params.width / 2u;
    if o >= params.planes * ho * wo {
        return;
    }
    let x = o % wo;
    let t = o / wo;
    let y = t % ho;
    let plane = t / ho;
    let first = (plane * params.height + 2u * y) * params.width + 2u * x;
    var best = first;
    var best_v = conv[first];
    for (var k = 1u; k < 4u; k++) {
        let i = first + (k / 2u) * params.width + k % 2u;
        let v = conv[i];
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    pooled[o] = best_v;
    argmax[o] = best;
}

// A gather per conv element (no scatter): dconv[i] = dpooled[o] if argmax[o] == i for the window
// o containing i and conv[i] > 0 (the ReLU before the pool), else 0.
@compute @workgroup_size(256)
fn pool_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = flat_index(wid, nwg, lid, 256u);
    if i >= params.planes * params.height * params.width {
        return;
    }
    let ix = i % params.width;
    let t = i / params.width;
    let iy = t % params.height;
    let plane = t / params.height;
    let o = (plane * (params.height / 2u) + iy / 2u) * (params.width / 2u) + ix / 2u;
    var g = 0.0;
    if saved_argmax[o] == i && conv[i] > 0.0 {
        g = dpooled[o];
    }
    dconv[i] = g;
}
