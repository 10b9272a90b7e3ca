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
    // tiled kernels: output channels per workgroup (forward) or per staging round (backward input)
    tile: u32,
    // backward kernels: 1 = x0 is the gradient of the 2x2 max-pool after the conv (ReLU'd):
    // the conv-output gradient is gathered on the fly as pool_backward with the mask would
    pooled: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> x0: array<f32>;
@group(0) @binding(1) var<storage, read> x1: array<f32>;
@group(0) @binding(2) var<storage, read> x2: array<f32>;
@group(0) @binding(3) var<storage, read_write> y0: array<f32>;
@group(0) @binding(4) var<storage, read_write> y1: array<f32>;
@group(0) @binding(5) var<uniform> dims: Dims;
@group(0) @binding(6) var<storage, read_write> yarg: array<u32>;
@group(0) @binding(7) var<storage, read> xarg: array<u32>;

fn out_h() -> u32 {
    return dims.height + 2u * dims.pad + 1u - dims.k;
}

fn out_w() -> u32 {
    return dims.width + 2u * dims.pad + 1u - dims.k;
}

// The general fallback (any kernel size): one invocation per output element.
// x0: input [B, Cin, H, W]; x1: weight; x2: bias [Cout]; y0: out [B, Cout, Ho, Wo]
// out = bias + sum_{ci,ky,kx} w * in, summed in the CPU reference's order, then ReLU if asked.
@compute @workgroup_size(256)
fn conv_forward_naive(
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
fn conv_backward_input_naive(
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
fn conv_backward_weight_naive(
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

// ---------------------------------------------------------------------------------------------
// Tiled kernels for 5x5 kernels (LeNet-5's): operands staged in workgroup memory, zero-padded
// so the inner loops carry no bounds checks, every sum in a fixed order (no atomics).
// Workgroup storage stays within WebGPU's default 16 KiB.

const KS: u32 = 5u;
const TAPS: u32 = 25u;
var<workgroup> smem: array<f32, 4000>;

// Forward, one workgroup per (image, group of dims.tile output channels): the image's zero-padded
// input planes (all Cin) and the group's weights and biases in workgroup memory, then one
// invocation per output element in strides of 256.
// x0: input [B, Cin, H, W]; x1: weight; x2: bias [Cout]; y0: out [B, Cout, Ho, Wo]
// smem: [Cin][H + 2p][W + 2p] input, then [tile][Cin][25] weights, then [tile] biases.
const FWG: u32 = 64u;

// A position (a, y, x) in an [A][h][w] walk by a fixed stride, advanced with carries instead of
// a division and a modulo per step (vector integer division is costly, on CPUs above all).
struct Cursor {
    a: u32,
    y: u32,
    x: u32,
}

// The cursor at flat index j, and the stride decomposed the same way.
fn cursor(j: u32, h: u32, w: u32) -> Cursor {
    return Cursor(j / (h * w), (j / w) % h, j % w);
}

fn advance(c: Cursor, step: Cursor, h: u32, w: u32) -> Cursor {
    var n = Cursor(c.a + step.a, c.y + step.y, c.x + step.x);
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
// co0 .. co0 + nco into smem; returns (weights at, biases at).
fn stage_forward(b: u32, co0: u32, nco: u32, lid: u32) -> vec2<u32> {
    let cin = dims.cin;
    let pad = dims.pad;
    let ph = dims.height + 2u * pad;
    let pw = dims.width + 2u * pad;
    let plane = ph * pw;
    let n_in = cin * plane;
    let step = cursor(FWG, ph, pw);
    var at = cursor(lid, ph, pw);
    for (var j = lid; j < n_in; j += FWG) {
        let ci = at.a;
        let iy = i32(at.y) - i32(pad);
        let ix = i32(at.x) - i32(pad);
        at = advance(at, step, ph, pw);
        var v = 0.0;
        if iy >= 0 && iy < i32(dims.height) && ix >= 0 && ix < i32(dims.width) {
            v = x0[((b * cin + ci) * dims.height + u32(iy)) * dims.width + u32(ix)];
        }
        smem[j] = v;
    }
    let n_w = nco * cin * TAPS;
    let w_at = n_in;
    for (var j = lid; j < n_w; j += FWG) {
        smem[w_at + j] = x1[co0 * cin * TAPS + j];
    }
    let b_at = w_at + n_w;
    for (var j = lid; j < nco; j += FWG) {
        smem[b_at + j] = x2[co0 + j];
    }
    workgroupBarrier();
    return vec2<u32>(w_at, b_at);
}

// One output of the staged tile: bias + sum_{ci,ky,kx} w * in (the CPU reference's order),
// then ReLU if asked. c: channel within the tile.
fn conv_at(c: u32, y: u32, x: u32, w_at: u32, b_at: u32) -> f32 {
    let cin = dims.cin;
    let pw = dims.width + 2u * dims.pad;
    let plane = (dims.height + 2u * dims.pad) * pw;
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
    if dims.relu != 0u {
        acc = max(acc, 0.0);
    }
    return acc;
}

@compute @workgroup_size(64)
fn conv_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let b = wid.x;
    let co0 = wid.y * dims.tile;
    let nco = min(dims.tile, dims.cout - co0);
    let at = stage_forward(b, co0, nco, lid);
    let ho = out_h();
    let wo = out_w();
    let hw = ho * wo;
    let n_out = nco * hw;
    let step = cursor(FWG, ho, wo);
    var cur = cursor(lid, ho, wo);
    for (var o = lid; o < n_out; o += FWG) {
        let c = cur.a;
        y0[((b * dims.cout + co0 + c) * ho + cur.y) * wo + cur.x] = conv_at(c, cur.y, cur.x, at.x, at.y);
        cur = advance(cur, step, ho, wo);
    }
}

// conv_forward fused with the 2x2 max-pool after it (even Ho and Wo): one invocation per pooled
// output computes its 2x2 window of conv outputs, writes them to y0 (the pool backward's ReLU
// mask reads them) and the window's maximum to y1 with its argmax (flat index into y0, first
// maximum in row-major order, as pool_forward) to yarg.
@compute @workgroup_size(64)
fn conv_forward_pool(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let b = wid.x;
    let co0 = wid.y * dims.tile;
    let nco = min(dims.tile, dims.cout - co0);
    let at = stage_forward(b, co0, nco, lid);
    let ho = out_h();
    let wo = out_w();
    let hw = ho * wo;
    let qh = ho / 2u;
    let qw = wo / 2u;
    let qhw = qh * qw;
    let n_out = nco * qhw;
    let step = cursor(FWG, qh, qw);
    var cur = cursor(lid, qh, qw);
    for (var o = lid; o < n_out; o += FWG) {
        let c = cur.a;
        let r = cur.y * qw + cur.x;
        let y = 2u * cur.y;
        let x = 2u * cur.x;
        cur = advance(cur, step, qh, qw);
        let plane = (b * dims.cout + co0 + c) * hw;
        let first = plane + y * wo + x;
        let v0 = conv_at(c, y, x, at.x, at.y);
        let v1 = conv_at(c, y, x + 1u, at.x, at.y);
        let v2 = conv_at(c, y + 1u, x, at.x, at.y);
        let v3 = conv_at(c, y + 1u, x + 1u, at.x, at.y);
        y0[first] = v0;
        y0[first + 1u] = v1;
        y0[first + wo] = v2;
        y0[first + wo + 1u] = v3;
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
        let q = (b * dims.cout + co0 + c) * qhw + r;
        y1[q] = best_v;
        yarg[q] = best;
    }
}

// The conv-output gradient at flat index i = ((b * Cout + co) * Ho + y) * Wo + x: x0[i], or with
// dims.pooled, pool_backward's gather with the ReLU mask: x0 is then the pooled gradient, xarg
// its argmax and x2 the conv's forward output. Bit-identical to running pool_backward first.
fn dout_at(plane: u32, y: u32, x: u32, ho: u32, wo: u32) -> f32 {
    let i = (plane * ho + y) * wo + x;
    if dims.pooled == 0u {
        return x0[i];
    }
    let o = (plane * (ho / 2u) + y / 2u) * (wo / 2u) + x / 2u;
    var g = 0.0;
    if xarg[o] == i && x2[i] > 0.0 {
        g = x0[o];
    }
    return g;
}

// Input gradient, one workgroup per image: the image's whole dout (all Cout planes) and all
// the weights staged in workgroup memory once, then one invocation per input element (ci, iy,
// ix) in strides of 256, summing over co and the taps that land inside dout (no padding, no
// bounds checks in the inner loop): dinp[iy, ix] = sum_{co, ky, kx} dout[iy + pad - ky,
// ix + pad - kx] * w[co, ci, ky, kx], taken as r = 4 - ky, s = 4 - kx ascending.
// x0: dout [B, Cout, Ho, Wo] (or the pooled gradient, see dout_at); x1: weight;
// y0: dinp [B, Cin, H, W]
@compute @workgroup_size(256)
fn conv_backward_input(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let b = wid.x;
    let ho = out_h();
    let wo = out_w();
    let hw_out = ho * wo;
    let cout = dims.cout;
    let cin = dims.cin;
    let p = KS - 1u - dims.pad;
    let n_dout = cout * hw_out;
    let ostep = cursor(256u, ho, wo);
    var oc = cursor(lid, ho, wo);
    for (var j = lid; j < n_dout; j += 256u) {
        smem[j] = dout_at(b * cout + oc.a, oc.y, oc.x, ho, wo);
        oc = advance(oc, ostep, ho, wo);
    }
    let w_at = n_dout;
    let n_w = cout * cin * TAPS;
    for (var j = lid; j < n_w; j += 256u) {
        smem[w_at + j] = x1[j];
    }
    workgroupBarrier();
    let h = dims.height;
    let w = dims.width;
    let n_in = cin * h * w;
    let istep = cursor(256u, h, w);
    var ic = cursor(lid, h, w);
    for (var i = lid; i < n_in; i += 256u) {
        let ci = ic.a;
        let iy = ic.y;
        let ix = ic.x;
        ic = advance(ic, istep, h, w);
        // dout row iy + r - p for r in [r_lo, r_hi) (columns likewise) is inside [0, Ho).
        let r_lo = select(0u, p - iy, iy < p);
        let r_hi = min(KS, p + ho - iy);
        let s_lo = select(0u, p - ix, ix < p);
        let s_hi = min(KS, p + wo - ix);
        // smem index of dout[co, iy + r - p, ix + s - p] is base + co * hw_out + r * wo + s.
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
        y0[((b * cin + ci) * h + iy) * w + ix] = a;
    }
}

const WGW: u32 = 64u;
// Where the weight-gradient kernel's per-invocation partial sums go: 26 rows of 64.
const RED_AT: u32 = 1200u;

// Weight and bias gradient: one workgroup per (co, ci) pair and per split of the batch
// (wid.y of nwg.y). For each image of its split the workgroup stages the zero-padded input
// plane (b, ci); each invocation walks output positions p = lid, lid + 64, ... and keeps the 25
// tap sums (and, for ci == 0, the bias sum) in registers; at the end the 64 partials of each
// tap are summed in index order by one invocation. Fixed order throughout: deterministic.
// With one split the sums go to y0 (dweight) and y1 (dbias); with several, split s writes its
// Cout*Cin*25 weight partials then Cout bias partials at y0[s * (n_weights + Cout)], and
// conv_sum_splits adds them up.
// x0: dout [B, Cout, Ho, Wo]; x1: input [B, Cin, H, W]
@compute @workgroup_size(64)
fn conv_backward_weight(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let ci = wid.x % dims.cin;
    let co = wid.x / dims.cin;
    let splits = nwg.y;
    let per = (dims.batch + splits - 1u) / splits;
    let b0 = wid.y * per;
    let b1 = min(dims.batch, b0 + per);
    let pad = dims.pad;
    let ph = dims.height + 2u * pad;
    let pw = dims.width + 2u * pad;
    let plane = ph * pw;
    let ho = out_h();
    let wo = out_w();
    let hw = ho * wo;
    var acc: array<f32, 25>;
    for (var t = 0u; t < TAPS; t++) {
        acc[t] = 0.0;
    }
    var bacc = 0.0;
    let in_step = cursor(WGW, ph, pw);
    let out_step = cursor(WGW, ho, wo);
    for (var b = b0; b < b1; b++) {
        let in_plane = (b * dims.cin + ci) * dims.height * dims.width;
        var at = cursor(lid, ph, pw);
        for (var j = lid; j < plane; j += WGW) {
            let iy = i32(at.y) - i32(pad);
            let ix = i32(at.x) - i32(pad);
            at = advance(at, in_step, ph, pw);
            var v = 0.0;
            if iy >= 0 && iy < i32(dims.height) && ix >= 0 && ix < i32(dims.width) {
                v = x1[in_plane + u32(iy) * dims.width + u32(ix)];
            }
            smem[j] = v;
        }
        workgroupBarrier();
        var cur = cursor(lid, ho, wo);
        for (var q = lid; q < hw; q += WGW) {
            let g = dout_at(b * dims.cout + co, cur.y, cur.x, ho, wo);
            bacc += g;
            var ib = cur.y * pw + cur.x;
            cur = advance(cur, out_step, ho, wo);
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
    let n_weights = dims.cout * dims.cin * TAPS;
    if lid <= TAPS && (lid < TAPS || ci == 0u) {
        var s = 0.0;
        for (var j = 0u; j < WGW; j++) {
            s += smem[RED_AT + lid * WGW + j];
        }
        if splits == 1u {
            if lid < TAPS {
                y0[wid.x * TAPS + lid] = s;
            } else {
                y1[co] = s;
            }
        } else {
            let base = wid.y * (n_weights + dims.cout);
            if lid < TAPS {
                y0[base + wid.x * TAPS + lid] = s;
            } else {
                y0[base + n_weights + co] = s;
            }
        }
    }
}

// The second pass of a split weight gradient: sums the splits' partials in split order.
// x0: partials [tile splits][n_weights + Cout]; y0: dweight; y1: dbias
@compute @workgroup_size(256)
fn conv_sum_splits(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    let n_weights = dims.cout * dims.cin * dims.k * dims.k;
    let n = n_weights + dims.cout;
    if i >= n {
        return;
    }
    var s = 0.0;
    for (var j = 0u; j < dims.tile; j++) {
        s += x0[j * n + i];
    }
    if i < n_weights {
        y0[i] = s;
    } else {
        y1[i - n_weights] = s;
    }
}
