// 2-D convolution, NCHW, square kernel, stride 1, zero padding; weights [Cout, Cin, K, K]. The
// first kernels of lenet (`LENET_KERNELS=v1`): one-invocation-per-element fallbacks for any
// shape (with the 2x2 max-pool and its backward as kernels of their own, at the end), and tiled
// 5x5 kernels with the pool fused in (forward) or gathered through (backward). Every sum in a
// fixed order (no atomics): the same bits on every run.

struct Params {
    batch: u32,
    cin: u32,
    cout: u32,
    height: u32,
    width: u32,
    k: u32,
    pad: u32,
    // tiled forward: output channels per workgroup; conv_sum_splits: the number of splits
    tile: u32,
}

@group(0) @binding(0) var<storage, read> input: array<f32>;
@group(0) @binding(1) var<storage, read> weight: array<f32>;
@group(0) @binding(2) var<storage, read> bias: array<f32>;
// ReLU(conv + bias) [B, Cout, Ho, Wo]
@group(0) @binding(3) var<storage, read_write> conv: array<f32>;
@group(0) @binding(4) var<storage, read_write> pooled: array<f32>;
@group(0) @binding(5) var<storage, read_write> argmax: array<u32>;
// The backward pass's inputs: the pooled gradient, and the forward pass's argmax and conv.
@group(0) @binding(6) var<storage, read> dpooled: array<f32>;
@group(0) @binding(7) var<storage, read> saved_argmax: array<u32>;
@group(0) @binding(8) var<storage, read> saved_conv: array<f32>;
// The conv-output gradient, for the fallbacks (pool_backward writes it).
@group(0) @binding(9) var<storage, read_write> dconv: array<f32>;
@group(0) @binding(10) var<storage, read_write> dinput: array<f32>;
@group(0) @binding(11) var<storage, read_write> dweight: array<f32>;
@group(0) @binding(12) var<storage, read_write> dbias: array<f32>;
// Split weight gradients: [splits][Cout*Cin*K*K + Cout]
@group(0) @binding(13) var<storage, read_write> partials: array<f32>;
@group(0) @binding(14) var<storage, read> partials_in: array<f32>;
@group(0) @binding(15) var<uniform> params: Params;

fn out_h() -> u32 {
    return params.height + 2u * params.pad + 1u - params.k;
}

fn out_w() -> u32 {
    return params.width + 2u * params.pad + 1u - params.k;
}

// The fallback forward (any kernel size): one invocation per output element,
// conv = ReLU(bias + sum_{ci,ky,kx} w * in), summed in the CPU reference's order.
@compute @workgroup_size(256)
fn conv_forward_naive(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = flat_index(wid, nwg, lid, 256u);
    let ho = out_h();
    let wo = out_w();
    if i >= params.batch * params.cout * ho * wo {
        return;
    }
    let x = i32(i % wo);
    var t = i / wo;
    let y = i32(t % ho);
    t = t / ho;
    let co = t % params.cout;
    let b = t / params.cout;
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
fn conv_backward_input_naive(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = flat_index(wid, nwg, lid, 256u);
    if i >= params.batch * params.cin * params.height * params.width {
        return;
    }
    let ho = out_h();
    let wo = out_w();
    let ix = i32(i % params.width);
    var t = i / params.width;
    let iy = i32(t % params.height);
    t = t / params.height;
    let ci = t % params.cin;
    let b = t / params.cin;
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
fn conv_backward_weight_naive(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = wid.x + wid.y * nwg.x;
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

// ---------------------------------------------------------------------------------------------
// Tiled kernels for 5x5 kernels: operands staged in workgroup memory, zero-padded so the inner
// loops carry no bounds checks. Workgroup storage stays within WebGPU's default 16 KiB.

const KS: u32 = 5u;
const TAPS: u32 = 25u;
var<workgroup> smem: array<f32, 4000>;
const FWG: u32 = 64u;

// A position (a, y, x) in an [A][h][w] walk by a fixed stride, advanced with carries instead of
// a division and a modulo per step (vector integer division is costly, on CPUs above all).
struct Cursor {
    a: u32,
    y: u32,
    x: u32,
}

fn cursor(j: u32, h: u32, w: u32) -> Cursor {
    return Cursor(j / (h * w), (j / w) % h, j % w);
}

fn advance(c: Cursor, by: Cursor, h: u32, w: u32) -> Cursor {
    var n = Cursor(c.a + by.a, c.y + by.y, c.x + by.x);
    if n.x >= w {
        n.x -= w;
        n.y += 1u;
    }
    if n.y >= h {
        n.y -= h;
        n.a += 1u;
    }
    return n;
}

// Stages the zero-padded input planes of image b and the weights and biases of output channels
// co0 .. co0 + nco into smem: [Cin][H + 2p][W + 2p], then [nco][Cin][25], then [nco]; returns
// where the weights and the biases start.
fn stage_forward(b: u32, co0: u32, nco: u32, lid: u32) -> vec2<u32> {
    let cin = params.cin;
    let pad = params.pad;
    let ph = params.height + 2u * pad;
    let pw = params.width + 2u * pad;
    let n_in = cin * ph * pw;
    let by = cursor(FWG, ph, pw);
    var at = cursor(lid, ph, pw);
    for (var j = lid; j < n_in; j += FWG) {
        let iy = i32(at.y) - i32(pad);
        let ix = i32(at.x) - i32(pad);
        var v = 0.0;
        if iy >= 0 && iy < i32(params.height) && ix >= 0 && ix < i32(params.width) {
            v = input[((b * cin + at.a) * params.height + u32(iy)) * params.width + u32(ix)];
        }
        smem[j] = v;
        at = advance(at, by, ph, pw);
    }
    let n_w = nco * cin * TAPS;
    for (var j = lid; j < n_w; j += FWG) {
        smem[n_in + j] = weight[co0 * cin * TAPS + j];
    }
    for (var j = lid; j < nco; j += FWG) {
        smem[n_in + n_w + j] = bias[co0 + j];
    }
    workgroupBarrier();
    return vec2<u32>(n_in, n_in + n_w);
}

// ReLU(bias + sum_{ci,ky,kx} w * in) at (y, x) of the staged tile's channel c, summed in the
// CPU reference's order.
fn conv_at(c: u32, y: u32, x: u32, w_at: u32, b_at: u32) -> f32 {
    let cin = params.cin;
    let pw = params.width + 2u * params.pad;
    let plane = (params.height + 2u * params.pad) * pw;
    var acc = smem[b_at + c];
    for (var ci = 0u; ci < cin; ci++) {
        let wb = w_at + (c * cin + ci) * TAPS;
        var ib = ci * plane + y * pw + x;
        for (var ky = 0u; ky < KS; ky++) {
            let wr = wb + ky * KS;
            acc += smem[wr] * smem[ib];
            acc += smem[wr + 1u] * smem[ib + 1u];
            acc += smem[wr + 2u] * smem[ib + 2u];
            acc += smem[wr + 3u] * smem[ib + 3u];
            acc += smem[wr + 4u] * smem[ib + 4u];
            ib += pw;
        }
    }
    return max(acc, 0.0);
}

// Forward with the 2x2 max-pool fused (even Ho and Wo), one workgroup per (image, group of
// params.tile output channels): one invocation per pooled output computes its window's four
// conv outputs, writes them (the backward pass's ReLU mask), their maximum, and its argmax
// (flat index into conv of the window's first maximum in row-major order).
@compute @workgroup_size(64)
fn conv_forward_pool(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let b = wid.x;
    let co0 = wid.y * params.tile;
    let nco = min(params.tile, params.cout - co0);
    let at = stage_forward(b, co0, nco, lid);
    let ho = out_h();
    let wo = out_w();
    let qh = ho / 2u;
    let qw = wo / 2u;
    let by = cursor(FWG, qh, qw);
    var cur = cursor(lid, qh, qw);
    for (var o = lid; o < nco * qh * qw; o += FWG) {
        let c = cur.a;
        let y = 2u * cur.y;
        let x = 2u * cur.x;
        let q = (b * params.cout + co0 + c) * qh * qw + cur.y * qw + cur.x;
        cur = advance(cur, by, qh, qw);
        let first = (b * params.cout + co0 + c) * ho * wo + y * wo + x;
        let v0 = conv_at(c, y, x, at.x, at.y);
        let v1 = conv_at(c, y, x + 1u, at.x, at.y);
        let v2 = conv_at(c, y + 1u, x, at.x, at.y);
        let v3 = conv_at(c, y + 1u, x + 1u, at.x, at.y);
        conv[first] = v0;
        conv[first + 1u] = v1;
        conv[first + wo] = v2;
        conv[first + wo + 1u] = v3;
        var best = first;
        var best_v = v0;
        if v1 > best_v {
            best = first + 1u;
            best_v = v1;
        }
        if v2 > best_v {
            best = first + wo;
            best_v = v2;
        }
        if v3 > best_v {
            best = first + wo + 1u;
            best_v = v3;
        }
        pooled[q] = best_v;
        argmax[q] = best;
    }
}

// The conv-output gradient at (plane, y, x) gathered from the pooled one: the pooled gradient
// of the window when its argmax is this element and the conv output there is positive (ReLU).
fn dconv_from_pool(plane: u32, y: u32, x: u32, ho: u32, wo: u32) -> f32 {
    let i = (plane * ho + y) * wo + x;
    let o = (plane * (ho / 2u) + y / 2u) * (wo / 2u) + x / 2u;
    var g = 0.0;
    if saved_argmax[o] == i && saved_conv[i] > 0.0 {
        g = dpooled[o];
    }
    return g;
}

// Input gradient fed by the pooled gradient, one workgroup per image: the image's dconv (all
// Cout planes) and all the weights staged once, then one invocation per input element summing
// over co and the taps that land inside dconv: dinput[iy, ix] = sum_{co, ky, kx}
// dconv[iy + pad - ky, ix + pad - kx] * w[co, ci, ky, kx], taken as r = 4 - ky, s = 4 - kx
// ascending.
@compute @workgroup_size(256)
fn conv_backward_input(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let b = wid.x;
    let ho = out_h();
    let wo = out_w();
    let hw_out = ho * wo;
    let cout = params.cout;
    let cin = params.cin;
    let p = KS - 1u - params.pad;
    let n_dout = cout * hw_out;
    let oby = cursor(256u, ho, wo);
    var oc = cursor(lid, ho, wo);
    for (var j = lid; j < n_dout; j += 256u) {
        smem[j] = dconv_from_pool(b * cout + oc.a, oc.y, oc.x, ho, wo);
        oc = advance(oc, oby, ho, wo);
    }
    let w_at = n_dout;
    for (var j = lid; j < cout * cin * TAPS; j += 256u) {
        smem[w_at + j] = weight[j];
    }
    workgroupBarrier();
    let h = params.height;
    let w = params.width;
    let iby = cursor(256u, h, w);
    var ic = cursor(lid, h, w);
    for (var i = lid; i < cin * h * w; i += 256u) {
        let ci = ic.a;
        let iy = ic.y;
        let ix = ic.x;
        ic = advance(ic, iby, h, w);
        // dconv row iy + r - p for r in [r_lo, r_hi) (columns likewise) is inside [0, Ho).
        let r_lo = select(0u, p - iy, iy < p);
        let r_hi = min(KS, p + ho - iy);
        let s_lo = select(0u, p - ix, ix < p);
        let s_hi = min(KS, p + wo - ix);
        // smem index of dconv[co, iy + r - p, ix + s - p] is base + co * hw_out + r * wo + s.
        let base = (iy + r_lo) * wo + ix + s_lo - p * (wo + 1u);
        var a = 0.0;
        for (var co = 0u; co < cout; co++) {
            // w[co, ci, 4 - r, 4 - s]
            let wb = w_at + (co * cin + ci) * TAPS + TAPS - 1u - r_lo * KS - s_lo;
            var db = co * hw_out + base;
            var wr = wb;
            for (var r = r_lo; r < r_hi; r++) {
                for (var t = 0u; t < s_hi - s_lo; t++) {
                    a += smem[db + t] * smem[wr - t];
                }
                db += wo;
                wr -= KS;
            }
        }
        dinput[((b * cin + ci) * h + iy) * w + ix] = a;
    }
}

const WGW: u32 = 64u;
// Where the weight-gradient kernel's per-invocation partial sums go: 26 rows of 64.
const RED_AT: u32 = 1200u;

// Weight and bias gradient fed by the pooled gradient: one workgroup per (co, ci) pair and per
// split of the batch (wid.y of nwg.y). For each image of its split the workgroup stages the
// zero-padded input plane (b, ci); each invocation walks output positions lid, lid + 64, ...
// keeping the 25 tap sums (and, for ci == 0, the bias sum) in registers; then one invocation
// per tap sums the 64 partials in index order. Split s writes its Cout*Cin*25 weight partials,
// then its Cout bias partials, at partials[s * (n_weights + Cout)]; conv_sum_splits adds them.
@compute @workgroup_size(64)
fn conv_backward_weight(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let ci = wid.x % params.cin;
    let co = wid.x / params.cin;
    let splits = nwg.y;
    let per = (params.batch + splits - 1u) / splits;
    let b0 = wid.y * per;
    let b1 = min(params.batch, b0 + per);
    let pad = params.pad;
    let ph = params.height + 2u * pad;
    let pw = params.width + 2u * pad;
    let ho = out_h();
    let wo = out_w();
    var acc: array<f32, 25>;
    for (var t = 0u; t < TAPS; t++) {
        acc[t] = 0.0;
    }
    var bacc = 0.0;
    let in_by = cursor(WGW, ph, pw);
    let out_by = cursor(WGW, ho, wo);
    for (var b = b0; b < b1; b++) {
        let in_plane = (b * params.cin + ci) * params.height * params.width;
        var at = cursor(lid, ph, pw);
        for (var j = lid; j < ph * pw; j += WGW) {
            let iy = i32(at.y) - i32(pad);
            let ix = i32(at.x) - i32(pad);
            at = advance(at, in_by, ph, pw);
            var v = 0.0;
            if iy >= 0 && iy < i32(params.height) && ix >= 0 && ix < i32(params.width) {
                v = input[in_plane + u32(iy) * params.width + u32(ix)];
            }
            smem[j] = v;
        }
        workgroupBarrier();
        var cur = cursor(lid, ho, wo);
        for (var q = lid; q < ho * wo; q += WGW) {
            let g = dconv_from_pool(b * params.cout + co, cur.y, cur.x, ho, wo);
            bacc += g;
            var ib = cur.y * pw + cur.x;
            cur = advance(cur, out_by, ho, wo);
            for (var ky = 0u; ky < KS; ky++) {
                let t = ky * KS;
                acc[t] += g * smem[ib];
                acc[t + 1u] += g * smem[ib + 1u];
                acc[t + 2u] += g * smem[ib + 2u];
                acc[t + 3u] += g * smem[ib + 3u];
                acc[t + 4u] += g * smem[ib + 4u];
                ib += pw;
            }
        }
        workgroupBarrier();
    }
    for (var t = 0u; t < TAPS; t++) {
        smem[RED_AT + t * WGW + lid] = acc[t];
    }
    smem[RED_AT + TAPS * WGW + lid] = bacc;
    workgroupBarrier();
    let n_weights = params.cout * params.cin * TAPS;
    if lid <= TAPS && (lid < TAPS || ci == 0u) {
        var s = 0.0;
        for (var j = 0u; j < WGW; j++) {
            s += smem[RED_AT + lid * WGW + j];
        }
        let base = wid.y * (n_weights + params.cout);
        if lid < TAPS {
            partials[base + wid.x * TAPS + lid] = s;
        } else {
            partials[base + n_weights + co] = s;
        }
    }
}

// The second pass of a split weight gradient: sums the params.tile splits in split order.
@compute @workgroup_size(256)
fn conv_sum_splits(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = flat_index(wid, nwg, lid, 256u);
    let n_weights = params.cout * params.cin * params.k * params.k;
    let n = n_weights + params.cout;
    if i >= n {
        return;
    }
    var s = 0.0;
    for (var j = 0u; j < params.tile; j++) {
        s += partials_in[j * n + i];
    }
    if i < n_weights {
        dweight[i] = s;
    } else {
        dbias[i - n_weights] = s;
    }
}

// 2x2 max-pooling, stride 2, of the conv output, for the shapes the tiled forward does not take
// (after conv_forward_naive): one invocation per pooled output. The argmax is the flat index into
// the conv output of the window's first maximum in row-major order (strict '>' keeps the first
// on ties).
@compute @workgroup_size(256)
fn pool_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let o = flat_index(wid, nwg, lid, 256u);
    let h = out_h();
    let w = out_w();
    let ho = h / 2u;
    let wo = w / 2u;
    if o >= params.batch * params.cout * ho * wo {
        return;
    }
    let x = o % wo;
    let t = o / wo;
    let y = t % ho;
    let plane = t / ho;
    let first = (plane * h + 2u * y) * w + 2u * x;
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
fn pool_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = flat_index(wid, nwg, lid, 256u);
    let h = out_h();
    let w = out_w();
    if i >= params.batch * params.cout * h * w {
        return;
    }
    let ix = i % w;
    let t = i / w;
    let iy = t % h;
    let plane = t / h;
    let o = (plane * (h / 2u) + iy / 2u) * (w / 2u) + ix / 2u;
    var g = 0.0;
    if saved_argmax[o] == i && saved_conv[i] > 0.0 {
        g = dpooled[o];
    }
    dconv[i] = g;
}
