// 2-D convolution, NCHW, square kernel, stride 1, zero padding; weights [Cout, Cin, K, K]. The
// naive kernels (src/gpu/conv.rs), the GPU's reference and fallback: one invocation per element
// for any shape, with the 2x2 max-pool and its backward as kernels of their own (at the end).
// Every sum in a fixed order (no atomics): the same bits on every run.

struct Params {
    batch: u32,
    cin: u32,
    cout: u32,
    height: u32,
    width: u32,
    k: u32,
    pad: u32,
}

// #include tensors.wgsl

fn out_h() -> u32 {
    return params.height + 2u * params.pad + 1u - params.k;
}

fn out_w() -> u32 {
    return params.width + 2u * params.pad + 1u - params.k;
}

// Where flat element i of a [planes, rows, cols] tensor (NCHW: plane = b * C + c) stands:
// (x, y, plane).
fn position(i: u32, rows: u32, cols: u32) -> vec3<u32> {
    let t = i / cols;
    return vec3<u32>(i % cols, t % rows, t / rows);
}

// The fallback forward (any kernel size): one invocation per output element,
// conv = ReLU(bias + sum_{ci,ky,kx} w * in), summed in the CPU reference's order.
@compute @workgroup_size(256)
fn conv_forward_naive(inv: Invocation) {
    let i = invocation_index(inv, 256u);
    let ho = out_h();
    let wo = out_w();
    if i >= params.batch * params.cout * ho * wo {
        return;
    }
    let at = position(i, ho, wo);
    let x = i32(at.x);
    let y = i32(at.y);
    let co = at.z % params.cout;
    let b = at.z / params.cout;
    let k = params.k;
    let pad = i32(params.pad);
    let h = i32(params.height);
    let w = i32(params.width);
    var acc = bias[co];
    for (var ci = 0u; ci < params.cin; ci++) {
        let in_plane = (b * params.cin + ci) * params.height * params.width;
        let w_base = (co * params.cin + ci) * k * k;
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
                acc += weight[w_base + ky * k + kx] * input[in_plane + u32(iy) * params.width + u32(ix)];
            }
        }
    }
    conv[i] = max(acc, 0.0);
}

// The fallback input gradient: one invocation per input element, the sum over the outputs
// reading it of dconv * weight.
@compute @workgroup_size(256)
fn conv_backward_input_naive(inv: Invocation) {
    let i = invocation_index(inv, 256u);
    if i >= params.batch * params.cin * params.height * params.width {
        return;
    }
    let ho = out_h();
    let wo = out_w();
    let at = position(i, params.height, params.width);
    let ix = i32(at.x);
    let iy = i32(at.y);
    let ci = at.z % params.cin;
    let b = at.z / params.cin;
    let k = params.k;
    let pad = i32(params.pad);
    var acc = 0.0;
    for (var co = 0u; co < params.cout; co++) {
        let out_plane = (b * params.cout + co) * ho * wo;
        let w_base = (co * params.cin + ci) * k * k;
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
                acc += dconv[out_plane + u32(y) * wo + u32(x)] * weight[w_base + ky * k + kx];
            }
        }
    }
    dinput[i] = acc;
}

const RED: u32 = 256u;
var<workgroup> partial_sums: array<f32, 256>;

// The fallback weight gradient: one workgroup per weight element (and one per bias element after
// them), 256 invocations each striding over (b, y, x), then a fixed-order tree reduction.
@compute @workgroup_size(256)
fn conv_backward_weight_naive(inv: Invocation) {
    let g = workgroup_index(inv);
    let lid = inv.lid;
    let k = params.k;
    let n_weights = params.cout * params.cin * k * k;
    if g >= n_weights + params.cout {
        return;
    }
    let ho = out_h();
    let wo = out_w();
    let hw = ho * wo;
    let n = params.batch * hw;
    var acc = 0.0;
    if g < n_weights {
        let kx = g % k;
        var t = g / k;
        let ky = t % k;
        t = t / k;
        let ci = t % params.cin;
        let co = t / params.cin;
        let pad = i32(params.pad);
        for (var j = lid; j < n; j += RED) {
            let b = j / hw;
            let r = j % hw;
            let iy = i32(r / wo + ky) - pad;
            let ix = i32(r % wo + kx) - pad;
            if iy >= 0 && iy < i32(params.height) && ix >= 0 && ix < i32(params.width) {
                let x = input[((b * params.cin + ci) * params.height + u32(iy)) * params.width + u32(ix)];
                acc += dconv[(b * params.cout + co) * hw + r] * x;
            }
        }
    } else {
        let co = g - n_weights;
        for (var j = lid; j < n; j += RED) {
            acc += dconv[(j / hw * params.cout + co) * hw + j % hw];
        }
    }
    partial_sums[lid] = acc;
    workgroupBarrier();
    for (var s = RED / 2u; s > 0u; s >>= 1u) {
        if lid < s {
            partial_sums[lid] += partial_sums[lid + s];
        }
        workgroupBarrier();
    }
    if lid == 0u {
        if g < n_weights {
            dweight[g] = partial_sums[0];
        } else {
            dbias[g - n_weights] = partial_sums[0];
        }
    }
}

// 2x2 max-pooling, stride 2, of the conv output (after conv_forward_naive): one invocation per pooled output. The argmax is the flat index into
// the conv output of the window's first maximum in row-major order (strict '>' keeps the first
// on ties).
@compute @workgroup_size(256)
fn pool_forward(inv: Invocation) {
    let o = invocation_index(inv, 256u);
    let h = out_h();
    let w = out_w();
    let ho = h / 2u;
    let wo = w / 2u;
    if o >= params.batch * params.cout * ho * wo {
        return;
    }
    let at = position(o, ho, wo);
    let first = (at.z * h + 2u * at.y) * w + 2u * at.x;
    var best = first;
    var best_v = conv[first];
    for (var k = 1u; k < 4u; k++) {
        let i = first + (k / 2u) * w + k % 2u;
        let v = conv[i];
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    pooled[o] = best_v;
    argmax[o] = best;
}

// The pool's and the ReLU's backward, for the naive backward kernels: a gather per conv element
// (no scatter), dconv[i] = dpooled[o] if saved_argmax[o] == i for the window o containing i and
// saved_conv[i] > 0 (the ReLU before the pool), else 0.
@compute @workgroup_size(256)
fn pool_backward(inv: Invocation) {
    let i = invocation_index(inv, 256u);
    let h = out_h();
    let w = out_w();
    if i >= params.batch * params.cout * h * w {
        return;
    }
    let at = position(i, h, w);
    let o = (at.z * (h / 2u) + at.y / 2u) * (w / 2u) + at.x / 2u;
    var g = 0.0;
    if saved_argmax[o] == i && saved_conv[i] > 0.0 {
        g = dpooled[o];
    }
    dconv[i] = g;
}
