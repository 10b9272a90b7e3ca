// Fully connected layers, the third kernels of lenet (src/gpu/alternatives.rs; `v3`): X [B, In],
// W [Out, In] (PyTorch's layout), bias [Out]. Written from what the H100 showed of the first two
// (BENCHMARKS.md): at LeNet's sizes a fully connected kernel waits on memory, so what counts is
// how many workgroups run at once and how few global round trips each one makes in a row, not
// how many multiply-adds each read of workgroup memory feeds.
//
// - Small tiles (8 images x 16 outputs, 128 invocations, one output each), so even fc3's
//   forward at batch 64 has work for dozens of multiprocessors and fc1's at batch 256 for 256
//   workgroups.
// - The reduction axis staged in slices of 128 (one slice for In <= 128: fc2 and fc3), each
//   invocation issuing all its loads of a slice (24) unconditionally (an index outside reads
//   element 0 and is replaced by zero) before it stores any: one round trip to memory per slice,
//   where the first kernels make one per 16 columns and a loop that stores each value as it
//   arrives makes one per value.
// - Weight gradients in partial sums over groups of at least 64 images (at most 16 of them), so a
//   layer's dW has parts x tiles workgroups and each sums a short run of the batch; the optimizer
//   adds the parts in order (optim.wgsl).
// - One dispatch per layer and direction, as in the second kernels: a layer's dX and dW tiles in
//   one, and the output layer's forward, loss and backward in one (8 images a workgroup, with
//   its dW partial per group of images).
//
// Every output is one invocation's sum in a fixed order (the reduction axis ascending; dW over its
// group's images ascending): the same bits on every run, no atomics.

struct Params {
    batch: u32,
    in_features: u32,
    out_features: u32,
    // forward: ReLU on the output; backward: zero dX where relu_mask <= 0
    relu: u32,
    // linear_backward_v3: how many of the workgroups compute dX tiles (the rest dW tiles)
    dinput_tiles: u32,
    // the images each weight-gradient partial sums
    images_per_group: u32,
    // linear_xent_v3: 1 / B
    scale: f32,
    _pad: u32,
}

const LANES: u32 = 128u;
// Images per tile, and outputs (forward) or input features (dX, dW) per tile.
const TB: u32 = 8u;
const TN: u32 = 16u;
// Outputs per dW tile.
const TO: u32 = 8u;
// The reduction slice staged at once, and its padded row stride in workgroup memory (129: the 16
// invocations of a warp reading their own rows fall in 16 different banks).
const KC: u32 = 128u;
const KP: u32 = 129u;
// Images per dW staging round.
const BS: u32 = 64u;
// The output layer's most classes.
const CMAX: u32 = 16u;

// #include tensors.wgsl

// 12.9 KiB in all (within WebGPU's default 16): a [TB][KP] slice of the rows, a [TN][KP] slice of
// the other operand (or a dW round's [BS][TN] inputs and [BS][TO] output gradients in xs and ws),
// and the output layer's [TB][CMAX] logits, then their gradients.
var<workgroup> xs: array<f32, 1032>;
var<workgroup> ws: array<f32, 2064>;
var<workgroup> gs: array<f32, 128>;

// The sum over a staged slice: row r of xs against row n of ws, kn columns, ascending.
fn slice_dot(acc: f32, r: u32, n: u32, kn: u32) -> f32 {
    var s = acc;
    for (var kk = 0u; kk < kn; kk++) {
        s += xs[r * KP + kk] * ws[n * KP + kk];
    }
    return s;
}

// Staging: each invocation loads all its slots of a tile (8 or 16: loops of a constant count,
// which compilers unroll, into registers) before it stores any. `*_slot(j)` is slot j's value,
// `*_at(j)` where it goes in workgroup memory.

// input[b0 + j / KC, k0 + j % KC] (zero outside the batch or the slice), to xs[r * KP + kk].
fn input_slot(j: u32, b0: u32, k0: u32, kn: u32) -> f32 {
    let b = b0 + j / KC;
    let kk = j % KC;
    let ok = b < params.batch && kk < kn;
    return select(0.0, input[select(0u, b * params.in_features + k0 + kk, ok)], ok);
}

fn slice_at(j: u32) -> u32 {
    return (j / KC) * KP + j % KC;
}

// weight[o0 + j / KC, k0 + j % KC] (zero outside), to ws[o * KP + kk].
fn weight_row_slot(j: u32, o0: u32, k0: u32, kn: u32) -> f32 {
    let o = o0 + j / KC;
    let kk = j % KC;
    let ok = o < params.out_features && kk < kn;
    return select(0.0, weight[select(0u, o * params.in_features + k0 + kk, ok)], ok);
}

// Stages input rows b0 .. b0 + TB and weight rows o0 .. o0 + TN, columns k0 .. k0 + kn.
fn stage_rows(b0: u32, o0: u32, k0: u32, kn: u32, lid: u32) {
    var x: array<f32, 8>;
    var w: array<f32, 16>;
    for (var u = 0u; u < TB * KC / LANES; u++) {
        x[u] = input_slot(lid + u * LANES, b0, k0, kn);
    }
    for (var u = 0u; u < TN * KC / LANES; u++) {
        w[u] = weight_row_slot(lid + u * LANES, o0, k0, kn);
    }
    for (var u = 0u; u < TB * KC / LANES; u++) {
        xs[slice_at(lid + u * LANES)] = x[u];
    }
    for (var u = 0u; u < TN * KC / LANES; u++) {
        ws[slice_at(lid + u * LANES)] = w[u];
    }
}

// The product without the bias: sum_k input[b0 + r, k] * weight[o0 + n, k] over all of In, for
// invocation (r, n) = (lid / TN, lid % TN). Every invocation of the workgroup must call it.
fn tile_product(b0: u32, o0: u32, lid: u32) -> f32 {
    let n_in = params.in_features;
    var acc = 0.0;
    for (var k0 = 0u; k0 < n_in; k0 += KC) {
        let kn = min(KC, n_in - k0);
        stage_rows(b0, o0, k0, kn, lid);
        workgroupBarrier();
        acc = slice_dot(acc, lid / TN, lid % TN, kn);
        workgroupBarrier();
    }
    return acc;
}

// out[b, o] = bias[o] + sum_i input[b, i] * weight[o, i], then ReLU if asked. Workgroup (x: 16
// outputs, y: 8 images).
@compute @workgroup_size(128)
fn linear_forward_v3(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let o0 = wid.x * TN;
    let b0 = wid.y * TB;
    let acc = tile_product(b0, o0, lid);
    let b = b0 + lid / TN;
    let o = o0 + lid % TN;
    if b < params.batch && o < params.out_features {
        var v = bias[o] + acc;
        if params.relu != 0u {
            v = max(v, 0.0);
        }
        out[b * params.out_features + o] = v;
    }
}

// dout[b0 + j / KC, k0 + j % KC] (zero outside), to xs[r * KP + kk].
fn dout_slot(j: u32, b0: u32, k0: u32, kn: u32) -> f32 {
    let b = b0 + j / KC;
    let kk = j % KC;
    let ok = b < params.batch && kk < kn;
    return select(0.0, dout[select(0u, b * params.out_features + k0 + kk, ok)], ok);
}

// weight[k0 + j / TN, i0 + j % TN] (zero outside: read along the weight's rows), to
// ws[n * KP + kk] by column_at.
fn weight_col_slot(j: u32, i0: u32, k0: u32, kn: u32) -> f32 {
    let kk = j / TN;
    let i = i0 + j % TN;
    let ok = kk < kn && i < params.in_features;
    return select(0.0, weight[select(0u, (k0 + kk) * params.in_features + i, ok)], ok);
}

fn column_at(j: u32) -> u32 {
    return (j % TN) * KP + j / TN;
}

// A dX tile (8 images x 16 input features) of a linear_backward_v3 dispatch: dinput[b, i] =
// sum_o dout[b, o] * weight[o, i] (o ascending), zero where relu_mask[b, i] <= 0 when
// params.relu.
fn dinput_tile(tile: u32, lid: u32) {
    let n_in = params.in_features;
    let n_out = params.out_features;
    let groups = (n_in + TN - 1u) / TN;
    let i0 = (tile % groups) * TN;
    let b0 = (tile / groups) * TB;
    let b = b0 + lid / TN;
    let i = i0 + lid % TN;
    let at = b * n_in + i;
    // The mask's load goes out with the first slice's, not after the sum.
    let mask = relu_mask[select(0u, at, params.relu != 0u && b < params.batch && i < n_in)];
    var acc = 0.0;
    for (var k0 = 0u; k0 < n_out; k0 += KC) {
        let kn = min(KC, n_out - k0);
        var x: array<f32, 8>;
        var w: array<f32, 16>;
        for (var u = 0u; u < TB * KC / LANES; u++) {
            x[u] = dout_slot(lid + u * LANES, b0, k0, kn);
        }
        for (var u = 0u; u < TN * KC / LANES; u++) {
            w[u] = weight_col_slot(lid + u * LANES, i0, k0, kn);
        }
        for (var u = 0u; u < TB * KC / LANES; u++) {
            xs[slice_at(lid + u * LANES)] = x[u];
        }
        for (var u = 0u; u < TN * KC / LANES; u++) {
            ws[column_at(lid + u * LANES)] = w[u];
        }
        workgroupBarrier();
        acc = slice_dot(acc, lid / TN, lid % TN, kn);
        workgroupBarrier();
    }
    if b < params.batch && i < n_in {
        if params.relu != 0u && !(mask > 0.0) {
            acc = 0.0;
        }
        dinput[at] = acc;
    }
}

// input[s0 + j / TN, i0 + j % TN], 1 in the bias column i == In (zero outside the round's sn
// images), to ws[j].
fn column_slot(j: u32, s0: u32, sn: u32, i0: u32) -> f32 {
    let bb = j / TN;
    let i = i0 + j % TN;
    let ok = bb < sn && i < params.in_features;
    let v = select(0.0, input[select(0u, (s0 + bb) * params.in_features + i, ok)], ok);
    return select(v, 1.0, bb < sn && i == params.in_features);
}

// dout[s0 + j / TO, o0 + j % TO] (zero outside), to xs[j].
fn dout_cols_slot(j: u32, s0: u32, sn: u32, o0: u32) -> f32 {
    let bb = j / TO;
    let o = o0 + j % TO;
    let ok = bb < sn && o < params.out_features;
    return select(0.0, dout[select(0u, (s0 + bb) * params.out_features + o, ok)], ok);
}

// A dW tile (8 outputs x 16 input features, the bias column i == In among them) of one group of
// images: dweight[o, i] = sum_b dout[b, o] * input[b, i] and dbias[o] = sum_b dout[b, o], over
// the group's images ascending, written as the group's partial. Tiles run part-major.
fn dweight_tile(tile: u32, lid: u32) {
    let n_in = params.in_features;
    let n_out = params.out_features;
    let cols = (n_in + TN) / TN;
    let per_part = cols * ((n_out + TO - 1u) / TO);
    let part = tile / per_part;
    let t = tile % per_part;
    let i0 = (t % cols) * TN;
    let o0 = (t / cols) * TO;
    let g0 = part * params.images_per_group;
    if g0 >= params.batch {
        return;
    }
    let g1 = min(params.batch, g0 + params.images_per_group);
    let o = lid / TN;
    let n = lid % TN;
    var acc = 0.0;
    for (var s0 = g0; s0 < g1; s0 += BS) {
        let sn = min(BS, g1 - s0);
        var x: array<f32, 8>;
        var d: array<f32, 4>;
        for (var u = 0u; u < BS * TN / LANES; u++) {
            x[u] = column_slot(lid + u * LANES, s0, sn, i0);
        }
        for (var u = 0u; u < BS * TO / LANES; u++) {
            d[u] = dout_cols_slot(lid + u * LANES, s0, sn, o0);
        }
        for (var u = 0u; u < BS * TN / LANES; u++) {
            ws[lid + u * LANES] = x[u];
        }
        for (var u = 0u; u < BS * TO / LANES; u++) {
            xs[lid + u * LANES] = d[u];
        }
        workgroupBarrier();
        for (var bb = 0u; bb < sn; bb++) {
            acc += xs[bb * TO + o] * ws[bb * TN + n];
        }
        workgroupBarrier();
    }
    let oc = o0 + o;
    let col = i0 + n;
    if oc < n_out {
        if col < n_in {
            dweight[part * n_out * n_in + oc * n_in + col] = acc;
        } else if col == n_in {
            dbias[part * n_out + oc] = acc;
        }
    }
}

@compute @workgroup_size(128)
fn linear_backward_v3(inv: Invocation) {
    let id = workgroup_index(inv);
    if id < params.dinput_tiles {
        dinput_tile(id, inv.lid);
    } else {
        dweight_tile(id - params.dinput_tiles, inv.lid);
    }
}

// The output layer's step for one group of images, 8 at a time: the logits (invocation (r, o)
// sums image r's class o), then one invocation per image for its softmax cross-entropy (its loss
// and correct flag at the step's statistics slot, and the gradient of the batch-mean loss:
// (softmax - onehot) / B, as softmax_xent in linear.wgsl computes them), then dX of the 8 images
// (ReLU-masked, summed over the classes ascending) and their share of the group's dW partial
// (the first 8 images write it, the next add to it: the same invocation owns an element each
// time, so the group's sum runs over its images in order).
@compute @workgroup_size(128)
fn linear_xent_v3(inv: Invocation) {
    let n_in = params.in_features;
    let n_out = params.out_features;
    let group = workgroup_index(inv);
    let lid = inv.lid;
    let g0 = group * params.images_per_group;
    if g0 >= params.batch {
        return;
    }
    let g1 = min(params.batch, g0 + params.images_per_group);
    let n_w = n_out * n_in;
    for (var b0 = g0; b0 < g1; b0 += TB) {
        let rows = min(TB, g1 - b0);
        let acc = tile_product(b0, 0u, lid);
        let r = lid / TN;
        let o = lid % TN;
        // gs is [TB][CMAX] in full, zero past the rows and classes, so the loops below run a
        // fixed count (unrolled, their loads issued together) and the extra terms add zeros.
        var z = 0.0;
        if r < rows && o < n_out {
            z = bias[o] + acc;
            out[(b0 + r) * n_out + o] = z;
        }
        gs[lid] = z;
        workgroupBarrier();
        if lid < rows {
            let b = b0 + lid;
            let row = lid * CMAX;
            let label = labels[b];
            var mx = gs[row];
            var arg = 0u;
            for (var c = 1u; c < n_out; c++) {
                if gs[row + c] > mx {
                    mx = gs[row + c];
                    arg = c;
                }
            }
            var sum = 0.0;
            for (var c = 0u; c < n_out; c++) {
                sum += exp(gs[row + c] - mx);
            }
            losses[step.stats_offset + b] = log(sum) - (gs[row + min(label, n_out - 1u)] - mx);
            correct[step.stats_offset + b] = select(0u, 1u, arg == label);
            for (var c = 0u; c < n_out; c++) {
                let p = exp(gs[row + c] - mx) / sum;
                let g = (p - select(0.0, 1.0, c == label)) * params.scale;
                dlogits[b * n_out + c] = g;
                gs[row + c] = g;
            }
        }
        workgroupBarrier();
        for (var j = lid; j < rows * n_in; j += LANES) {
            let rr = j / n_in;
            let i = j % n_in;
            let at = (b0 + rr) * n_in + i;
            // Loaded with the weights, not after them.
            let mask = relu_mask[at];
            var s = 0.0;
            for (var c = 0u; c < CMAX; c++) {
                s += gs[rr * CMAX + c] * weight[min(c, n_out - 1u) * n_in + i];
            }
            if params.relu != 0u && !(mask > 0.0) {
                s = 0.0;
            }
            dinput[at] = s;
        }
        for (var j = lid; j < n_out * (n_in + 1u); j += LANES) {
            let c = j / (n_in + 1u);
            let i = j % (n_in + 1u);
            var s = 0.0;
            for (var rr = 0u; rr < TB; rr++) {
                let x = input[min((b0 + rr) * n_in + i, params.batch * n_in - 1u)];
                s += gs[rr * CMAX + c] * select(1.0, x, i < n_in);
            }
            // The group's first tile writes its partial; a later tile adds to it (no read of the
            // old value when there is nothing to add to).
            let first = b0 == g0;
            if i < n_in {
                let at = group * n_w + c * n_in + i;
                if first {
                    dweight[at] = s;
                } else {
                    dweight[at] += s;
                }
            } else {
                let at = group * n_out + c;
                if first {
                    dbias[at] = s;
                } else {
                    dbias[at] += s;
                }
            }
        }
        // gs and the staged slices are read above: the next 8 images wait for every invocation.
        workgroupBarrier();
    }
}
