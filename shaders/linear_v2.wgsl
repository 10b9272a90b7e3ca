// Fully connected layers, the second kernels of lenet (`LENET_KERNELS=v2`): X [B, In],
// W [Out, In] (PyTorch's layout), bias [Out]. Register-blocked: each invocation keeps OB = 8
// outputs and reads each staged input once for all of them; the reduction axis is staged
// through workgroup memory in slices of KT. Every output is summed in the CPU reference's
// order (ascending over the reduction axis): deterministic, no atomics.
//
// - linear_forward_v2: Y = X W^T + bias (ReLU optional); workgroup (x: 8 outputs, y: 64 rows).
// - linear_backward_v2: one dispatch, two kinds of workgroup: dX = dY W (masked by the ReLU of
//   X's producer) tiles first, then dW = dY^T X tiles with the bias gradient as an extra input
//   column of ones.
// - linear_xent_v2: the output layer's whole step for a tile of 32 images: logits, softmax
//   cross-entropy (each image's loss and correct flag at the step's statistics slot, and the
//   gradient of the batch-mean loss), dX, and this tile's partial sums of dW and dbias (the
//   optimizer adds the tiles' partials in order).

struct Params {
    batch: u32,
    in_features: u32,
    out_features: u32,
    // forward: ReLU on the output; backward: zero dX where relu_mask <= 0
    relu: u32,
    // backward: how many of the workgroups compute dX tiles (the rest compute dW tiles)
    dinput_tiles: u32,
    // linear_xent_v2: 1 / B
    scale: f32,
    _pad0: u32,
    _pad1: u32,
}

const ROWS: u32 = 64u;
const OB: u32 = 8u;
const KT: u32 = 16u;
// Row stride of a staged [rows][KT] slice: KT + 1 keeps the invocations of a row-per-invocation
// read off each other's banks.
const KS: u32 = 17u;
// The output layer's tile of images, and its most classes.
const XT: u32 = 32u;
const CMAX: u32 = 16u;

@group(0) @binding(0) var<storage, read> input: array<f32>;
@group(0) @binding(1) var<storage, read> weight: array<f32>;
@group(0) @binding(2) var<storage, read> bias: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> dout: array<f32>;
@group(0) @binding(5) var<storage, read> relu_mask: array<f32>;
@group(0) @binding(6) var<storage, read_write> dinput: array<f32>;
@group(0) @binding(7) var<storage, read_write> dweight: array<f32>;
@group(0) @binding(8) var<storage, read_write> dbias: array<f32>;
@group(0) @binding(9) var<storage, read> labels: array<u32>;
@group(0) @binding(10) var<storage, read_write> dlogits: array<f32>;
@group(0) @binding(11) var<storage, read_write> losses: array<f32>;
@group(0) @binding(12) var<storage, read_write> correct: array<u32>;
@group(0) @binding(13) var<uniform> params: Params;
// The rows a register-blocked product stages: the input (forward) or dout (backward dX).
@group(0) @binding(14) var<storage, read> rows: array<f32>;

// The left operand's slice, [ROWS][KT] as [ROWS][KV] vec4s (KV = KT / 4 + 1: the extra vec4 keeps
// invocations reading their own rows off each other's banks), or [KT][ROWS] scalars; the right
// operand's slice as [KT][2] vec4s (8 outputs).
const KV: u32 = 5u;
var<workgroup> lhs4: array<vec4<f32>, 320>;
var<workgroup> lhs: array<f32, 1088>;
var<workgroup> rhs4: array<vec4<f32>, 32>;
var<workgroup> rhs: array<f32, 1024>;

// Stages rows b0.. of `rows` [batch][cols] (zero outside) as lhs4's [ROWS][KV] vec4s for columns
// k0 .. k0 + KT.
fn stage_rows(b0: u32, k0: u32, cols: u32, lid: u32) {
    for (var j = lid; j < ROWS * (KT / 4u); j += ROWS) {
        let r = j / (KT / 4u);
        let q = j % (KT / 4u);
        let b = b0 + r;
        var v = vec4<f32>(0.0);
        if b < params.batch {
            for (var c = 0u; c < 4u; c++) {
                let k = k0 + 4u * q + c;
                if k < cols {
                    v[c] = rows[b * cols + k];
                }
            }
        }
        lhs4[r * KV + q] = v;
    }
}

// out[b, o] = bias[o] + sum_i input[b, i] * weight[o, i], then ReLU if asked.
@compute @workgroup_size(64)
fn linear_forward_v2(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n_in = params.in_features;
    let n_out = params.out_features;
    let o0 = wid.x * OB;
    let b0 = wid.y * ROWS;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < n_in; k0 += KT) {
        stage_rows(b0, k0, n_in, lid);
        // rhs4[kk * 2 + h] = weight[o0 + 4h .. o0 + 4h + 4, k0 + kk]
        for (var j = lid; j < KT * 2u; j += ROWS) {
            let k = k0 + j / 2u;
            let oc = o0 + 4u * (j % 2u);
            var v = vec4<f32>(0.0);
            for (var c = 0u; c < 4u; c++) {
                if oc + c < n_out && k < n_in {
                    v[c] = weight[(oc + c) * n_in + k];
                }
            }
            rhs4[j] = v;
        }
        workgroupBarrier();
        for (var q = 0u; q < KT / 4u; q++) {
            let x = lhs4[lid * KV + q];
            for (var c = 0u; c < 4u; c++) {
                acc0 += x[c] * rhs4[(4u * q + c) * 2u];
                acc1 += x[c] * rhs4[(4u * q + c) * 2u + 1u];
            }
        }
        workgroupBarrier();
    }
    let b = b0 + lid;
    if b < params.batch {
        for (var o = 0u; o < OB; o++) {
            if o0 + o < n_out {
                var v = bias[o0 + o] + select(acc1[o % 4u], acc0[o % 4u], o < 4u);
                if params.relu != 0u {
                    v = max(v, 0.0);
                }
                out[b * n_out + o0 + o] = v;
            }
        }
    }
}

// dX tile (x: 8 input features, y: 64 rows) of a linear_backward_v2 dispatch: dinput[b, i] =
// sum_o dout[b, o] * weight[o, i], zero where relu_mask[b, i] <= 0 when params.relu.
fn dinput_tile(tile: u32, lid: u32) {
    let n_in = params.in_features;
    let n_out = params.out_features;
    let groups = (n_in + OB - 1u) / OB;
    let i0 = (tile % groups) * OB;
    let b0 = (tile / groups) * ROWS;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < n_out; k0 += KT) {
        stage_rows(b0, k0, n_out, lid);
        // rhs4[oo * 2 + h] = weight[k0 + oo, i0 + 4h .. i0 + 4h + 4]
        for (var j = lid; j < KT * 2u; j += ROWS) {
            let o = k0 + j / 2u;
            let ic = i0 + 4u * (j % 2u);
            var v = vec4<f32>(0.0);
            for (var c = 0u; c < 4u; c++) {
                if o < n_out && ic + c < n_in {
                    v[c] = weight[o * n_in + ic + c];
                }
            }
            rhs4[j] = v;
        }
        workgroupBarrier();
        for (var q = 0u; q < KT / 4u; q++) {
            let d = lhs4[lid * KV + q];
            for (var c = 0u; c < 4u; c++) {
                acc0 += d[c] * rhs4[(4u * q + c) * 2u];
                acc1 += d[c] * rhs4[(4u * q + c) * 2u + 1u];
            }
        }
        workgroupBarrier();
    }
    let b = b0 + lid;
    if b < params.batch {
        for (var i = 0u; i < OB; i++) {
            let at = b * n_in + i0 + i;
            if i0 + i < n_in {
                var v = select(acc1[i % 4u], acc0[i % 4u], i < 4u);
                if params.relu != 0u && !(relu_mask[at] > 0.0) {
                    v = 0.0;
                }
                dinput[at] = v;
            }
        }
    }
}

// dW tile (64 input features, the bias column i == In among them, x 8 outputs) of a
// linear_backward_v2 dispatch: dweight[o, i] = sum_b dout[b, o] * input[b, i] and
// dbias[o] = sum_b dout[b, o].
fn dweight_tile(tile: u32, lid: u32) {
    let n_in = params.in_features;
    let n_out = params.out_features;
    let cols = (n_in + 1u + ROWS - 1u) / ROWS;
    let i = (tile % cols) * ROWS + lid;
    let o0 = (tile / cols) * OB;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < params.batch; k0 += KT) {
        // lhs: [KT][ROWS] inputs (column i of row k0 + kk, 1 in the bias column)
        for (var kk = 0u; kk < KT; kk++) {
            let b = k0 + kk;
            var v = 0.0;
            if b < params.batch {
                if i < n_in {
                    v = input[b * n_in + i];
                } else if i == n_in {
                    v = 1.0;
                }
            }
            lhs[kk * ROWS + lid] = v;
        }
        // rhs4[kk * 2 + h] = dout[k0 + kk, o0 + 4h .. o0 + 4h + 4]
        for (var j = lid; j < KT * 2u; j += ROWS) {
            let b = k0 + j / 2u;
            let oc = o0 + 4u * (j % 2u);
            var v = vec4<f32>(0.0);
            for (var c = 0u; c < 4u; c++) {
                if b < params.batch && oc + c < n_out {
                    v[c] = dout[b * n_out + oc + c];
                }
            }
            rhs4[j] = v;
        }
        workgroupBarrier();
        let kn = min(KT, params.batch - k0);
        for (var kk = 0u; kk < kn; kk++) {
            let x = lhs[kk * ROWS + lid];
            acc0 += rhs4[kk * 2u] * x;
            acc1 += rhs4[kk * 2u + 1u] * x;
        }
        workgroupBarrier();
    }
    for (var o = 0u; o < OB; o++) {
        if o0 + o < n_out {
            let v = select(acc1[o % 4u], acc0[o % 4u], o < 4u);
            if i < n_in {
                dweight[(o0 + o) * n_in + i] = v;
            } else if i == n_in {
                dbias[o0 + o] = v;
            }
        }
    }
}

@compute @workgroup_size(64)
fn linear_backward_v2(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let id = wid.x + wid.y * nwg.x;
    if id < params.dinput_tiles {
        dinput_tile(id, lid);
    } else {
        dweight_tile(id - params.dinput_tiles, lid);
    }
}

// The output layer's step for images b0 .. b0 + 32 (see the file's comment). Workgroup memory:
// lhs holds a [32][KS] slice of X while the logits are summed, then the tile's dlogits [32][16].
@compute @workgroup_size(64)
fn linear_xent_v2(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n_in = params.in_features;
    let n_out = params.out_features;
    let b0 = wid.x * XT;
    let rows = min(XT, params.batch - b0);
    // Logits: invocation r < 32 sums image b0 + r's outputs.
    var acc: array<f32, 16>;
    for (var o = 0u; o < CMAX; o++) {
        acc[o] = 0.0;
    }
    for (var k0 = 0u; k0 < n_in; k0 += KT) {
        for (var j = lid; j < XT * KT; j += ROWS) {
            let r = j / KT;
            let k = k0 + j % KT;
            lhs[r * KS + j % KT] = select(0.0, input[min((b0 + r) * n_in + k, params.batch * n_in - 1u)], r < rows && k < n_in);
        }
        for (var j = lid; j < CMAX * KT; j += ROWS) {
            let o = j / KT;
            let k = k0 + j % KT;
            rhs[j] = select(0.0, weight[min(o * n_in + k, n_out * n_in - 1u)], o < n_out && k < n_in);
        }
        workgroupBarrier();
        if lid < XT {
            let kn = min(KT, n_in - k0);
            for (var kk = 0u; kk < kn; kk++) {
                let x = lhs[lid * KS + kk];
                for (var o = 0u; o < CMAX; o++) {
                    acc[o] += x * rhs[o * KT + kk];
                }
            }
        }
        workgroupBarrier();
    }
    // Softmax cross-entropy of image b0 + lid (first largest logit on ties). The loops over
    // classes have a constant trip count (guarded), so the values stay in registers.
    if lid < rows {
        let b = b0 + lid;
        var z: array<f32, 16>;
        for (var o = 0u; o < CMAX; o++) {
            z[o] = bias[min(o, n_out - 1u)] + acc[o];
            if o < n_out {
                out[b * n_out + o] = z[o];
            }
        }
        let label = labels[b];
        var mx = z[0];
        var arg = 0u;
        var zl = z[0];
        for (var o = 1u; o < CMAX; o++) {
            if o < n_out && z[o] > mx {
                mx = z[o];
                arg = o;
            }
            if o == label {
                zl = z[o];
            }
        }
        var sum = 0.0;
        for (var o = 0u; o < CMAX; o++) {
            if o < n_out {
                sum += exp(z[o] - mx);
            }
        }
        losses[step.stats_offset + b] = log(sum) - (zl - mx);
        correct[step.stats_offset + b] = select(0u, 1u, arg == label);
        for (var o = 0u; o < CMAX; o++) {
            if o < n_out {
                let g = (exp(z[o] - mx) / sum - select(0.0, 1.0, o == label)) * params.scale;
                dlogits[b * n_out + o] = g;
                rhs[lid * CMAX + o] = g;
            }
        }
    }
    workgroupBarrier();
    // dX (ReLU-masked): one (image, feature) per invocation at a time, summed over o ascending.
    for (var j = lid; j < rows * n_in; j += ROWS) {
        let r = j % rows;
        let i = j / rows;
        var s = 0.0;
        for (var o = 0u; o < n_out; o++) {
            s += rhs[r * CMAX + o] * weight[o * n_in + i];
        }
        let at = (b0 + r) * n_in + i;
        if params.relu != 0u && !(relu_mask[at] > 0.0) {
            s = 0.0;
        }
        dinput[at] = s;
    }
    // This tile's partial dW (and dbias as the column i == In), summed over its images in order.
    let n_w = n_out * n_in;
    for (var j = lid; j < n_out * (n_in + 1u); j += ROWS) {
        let o = j / (n_in + 1u);
        let i = j % (n_in + 1u);
        var s = 0.0;
        for (var r = 0u; r < rows; r++) {
            var x = 1.0;
            if i < n_in {
                x = input[(b0 + r) * n_in + i];
            }
            s += rhs[r * CMAX + o] * x;
        }
        if i < n_in {
            dweight[wid.x * n_w + o * n_in + i] = s;
        } else {
            dbias[wid.x * n_out + o] = s;
        }
    }
}
