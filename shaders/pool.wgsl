// 2x2 max-pooling, stride 2, NCHW. The argmax is the flat index into the input tensor of the
// first maximum of the window in row-major order (strict '>' keeps the first on ties).

struct Dims {
    // batch * channels
    planes: u32,
    height: u32,
    width: u32,
    // backward: 1 = also apply the ReLU mask (x2 > 0) of the pooled tensor's producer
    relu_mask: u32,
}

@group(0) @binding(0) var<storage, read> x0: array<f32>;
@group(0) @binding(1) var<storage, read> xarg: array<u32>;
@group(0) @binding(2) var<storage, read> xmask: array<f32>;
@group(0) @binding(3) var<storage, read_write> y0: array<f32>;
@group(0) @binding(4) var<storage, read_write> yarg: array<u32>;
@group(0) @binding(5) var<uniform> dims: Dims;

// x0: input [planes, H, W]; y0: out, yarg: argmax [planes, H/2, W/2]
@compute @workgroup_size(256)
fn pool_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let o = (wid.x + wid.y * nwg.x) * 256u + lid;
    let ho = dims.height / 2u;
    let wo = dims.width / 2u;
    if o >= dims.planes * ho * wo {
        return;
    }
    let x = o % wo;
    let t = o / wo;
    let y = t % ho;
    let plane = t / ho;
    let first = (plane * dims.height + 2u * y) * dims.width + 2u * x;
    var best = first;
    var best_v = x0[first];
    let c1 = first + 1u;
    let c2 = first + dims.width;
    let c3 = first + dims.width + 1u;
    let v1 = x0[c1];
    if v1 > best_v {
        best = c1;
        best_v = v1;
    }
    let v2 = x0[c2];
    if v2 > best_v {
        best = c2;
        best_v = v2;
    }
    let v3 = x0[c3];
    if v3 > best_v {
        best = c3;
        best_v = v3;
    }
    y0[o] = best_v;
    yarg[o] = best;
}

// A gather per input element (no atomics, no scatter): dinp[i] = dout[o] if argmax[o] == i for
// the window o containing i, else 0; with relu_mask, also 0 where xmask[i] <= 0.
// x0: dout [planes, H/2, W/2]; xarg: argmax; xmask: forward output of the pooled tensor's
// producer [planes, H, W]; y0: dinp [planes, H, W]
@compute @workgroup_size(256)
fn pool_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    if i >= dims.planes * dims.height * dims.width {
        return;
    }
    let ix = i % dims.width;
    let t = i / dims.width;
    let iy = t % dims.height;
    let plane = t / dims.height;
    let ho = dims.height / 2u;
    let wo = dims.width / 2u;
    let o = (plane * ho + iy / 2u) * wo + ix / 2u;
    var g = 0.0;
    if xarg[o] == i {
        g = x0[o];
    }
    if dims.relu_mask != 0u && !(xmask[i] > 0.0) {
        g = 0.0;
    }
    y0[i] = g;
}
