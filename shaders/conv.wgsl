// 2-D convolution, NCHW, square kernel, stride 1, zero padding; weights [Cout, Cin, K, K].
// The same entry points serve conv1 and conv2 at any batch size: every shape is in `dims`.

struct Dims {
    batch: u32,
    cin: u32,
    cout: u32,
    height: u32,
    width: u32,
    k: u32,
    pad: u32,
    // forward: 1 = apply ReLU after the bias
    relu: u32,
}

@group(0) @binding(0) var<storage, read> x0: array<f32>;
@group(0) @binding(1) var<storage, read> x1: array<f32>;
@group(0) @binding(2) var<storage, read> x2: array<f32>;
@group(0) @binding(3) var<storage, read_write> y0: array<f32>;
@group(0) @binding(4) var<storage, read_write> y1: array<f32>;
@group(0) @binding(5) var<uniform> dims: Dims;

fn out_h() -> u32 {
    return dims.height + 2u * dims.pad + 1u - dims.k;
}

fn out_w() -> u32 {
    return dims.width + 2u * dims.pad + 1u - dims.k;
}

// One invocation per output element.
// x0: input [B, Cin, H, W]; x1: weight; x2: bias [Cout]; y0: out [B, Cout, Ho, Wo]
// out = bias + sum_{ci,ky,kx} w * in, summed in the CPU reference's order, then ReLU if asked.
@compute @workgroup_size(256)
fn conv_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    let ho = out_h();
    let wo = out_w();
    if i >= dims.batch * dims.cout * ho * wo {
        return;
    }
    let x = i32(i % wo);
    var t = i / wo;
    let y = i32(t % ho);
    t = t / ho;
    let co = t % dims.cout;
    let b = t / dims.cout;
    let k = dims.k;
    let pad = i32(dims.pad);
    let h = i32(dims.height);
    let w = i32(dims.width);
    var acc = x2[co];
    for (var ci = 0u; ci < dims.cin; ci++) {
        let in_plane = (b * dims.cin + ci) * dims.height * dims.width;
        let w_base = (co * dims.cin + ci) * k * k;
        for (var ky = 0u; ky < k; ky++) {
            let iy = y + i32(ky) - pad;
            if iy < 0 || iy >= h {
                continue;
            }
            for (var kx = 0u; kx < k; kx++) {
                let ix = x + i32(kx) - pad;
                if ix < 0 || ix >= w {
                    continue;
                }
                acc += x1[w_base + ky * k + kx] * x0[in_plane + u32(iy) * dims.width + u32(ix)];
            }
        }
    }
    if dims.relu != 0u {
        acc = max(acc, 0.0);
    }
    y0[i] = acc;
}

// One invocation per input element: dinp = sum over the outputs reading it of dout * weight.
// x0: dout [B, Cout, Ho, Wo]; x1: weight; y0: dinp [B, Cin, H, W]
@compute @workgroup_size(256)
fn conv_backward_input(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    if i >= dims.batch * dims.cin * dims.height * dims.width {
        return;
    }
    let ho = out_h();
    let wo = out_w();
    let ix = i32(i % dims.width);
    var t = i / dims.width;
    let iy = i32(t % dims.height);
    t = t / dims.height;
    let ci = t % dims.cin;
    let b = t / dims.cin;
    let k = dims.k;
    let pad = i32(dims.pad);
    var acc = 0.0;
    for (var co = 0u; co < dims.cout; co++) {
        let out_plane = (b * dims.cout + co) * ho * wo;
        let w_base = (co * dims.cin + ci) * k * k;
        for (var ky = 0u; ky < k; ky++) {
            let y = iy + pad - i32(ky);
            if y < 0 || y >= i32(ho) {
                continue;
            }
            for (var kx = 0u; kx < k; kx++) {
                let x = ix + pad - i32(kx);
                if x < 0 || x >= i32(wo) {
                    continue;
                }
                acc += x0[out_plane + u32(y) * wo + u32(x)] * x1[w_base + ky * k + kx];
            }
        }
    }
    y0[i] = acc;
}

const RED: u32 = 256u;
var<workgroup> partial: array<f32, 256>;

// One workgroup per weight element (and one per bias element after them), 256 invocations each
// striding over (b, y, x), then a fixed-order tree reduction: deterministic, no atomics.
// x0: dout [B, Cout, Ho, Wo]; x1: input [B, Cin, H, W]; y0: dweight; y1: dbias [Cout]
@compute @workgroup_size(256)
fn conv_backward_weight(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = wid.x + wid.y * nwg.x;
    let k = dims.k;
    let n_weights = dims.cout * dims.cin * k * k;
    if g >= n_weights + dims.cout {
        return;
    }
    let ho = out_h();
    let wo = out_w();
    let hw = ho * wo;
    let n = dims.batch * hw;
    var acc = 0.0;
    if g < n_weights {
        let kx = g % k;
        var t = g / k;
        let ky = t % k;
        t = t / k;
        let ci = t % dims.cin;
        let co = t / dims.cin;
        let pad = i32(dims.pad);
        for (var j = lid; j < n; j += RED) {
            let b = j / hw;
            let r = j % hw;
            let y = r / wo;
            let x = r % wo;
            let iy = i32(y + ky) - pad;
            let ix = i32(x + kx) - pad;
            if iy >= 0 && iy < i32(dims.height) && ix >= 0 && ix < i32(dims.width) {
                let inp = x1[((b * dims.cin + ci) * dims.height + u32(iy)) * dims.width + u32(ix)];
                acc += x0[(b * dims.cout + co) * hw + r] * inp;
            }
        }
    } else {
        let co = g - n_weights;
        for (var j = lid; j < n; j += RED) {
            let b = j / hw;
            let r = j % hw;
            acc += x0[(b * dims.cout + co) * hw + r];
        }
    }
    partial[lid] = acc;
    workgroupBarrier();
    for (var s = RED / 2u; s > 0u; s >>= 1u) {
        if lid < s {
            partial[lid] += partial[lid + s];
        }
        workgroupBarrier();
    }
    if lid == 0u {
        if g < n_weights {
            y0[g] = partial[0];
        } else {
            y1[g - n_weights] = partial[0];
        }
    }
}
