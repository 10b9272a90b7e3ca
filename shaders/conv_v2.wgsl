// Convolution layers, the second kernels of lenet (src/gpu/alternatives.rs; in `mixed`, the
// default, and `v3`): one dispatch per layer and direction, register-blocked so that each read
// of workgroup memory feeds several multiply-adds (weights and output gradients are read four
// channels at a time as vec4), no integer division in an inner loop, and every sum in a fixed
// order (the same bits on every run). NCHW, square kernels of side K <= 5, stride 1, zero
// padding; each conv is followed by ReLU and a 2x2 max-pool (even Ho and Wo). They use up to
// 32 KiB of workgroup memory; shapes (or adapters) they do not fit use conv.wgsl's naive
// kernels.
//
// Forward: one workgroup per image. The image's zero-padded input planes and the weights are
// staged once; each invocation computes one pooled position for 8 output channels (the 2x2
// window: 8 vec4 accumulators), sliding along the kernel row so that K taps cost K + 1 pairs of
// input reads. The first layer gathers its input from the resident data set on the way in (no
// pass of its own) and writes it out for the backward pass.
//
// Backward: one dispatch, two kinds of workgroup. The first `dinput_images` compute one image's
// input gradient each; the rest compute the weight and bias gradients of a group of images each,
// written as one partial sum per group for the optimizer to add (no pass of their own). Both
// expand the conv-output gradient from the pooled one on the way into workgroup memory: the
// window's gradient at its argmax where ReLU let it through, zero elsewhere.

struct Params {
    batch: u32,
    cin: u32,
    cout: u32,
    height: u32,
    width: u32,
    k: u32,
    pad: u32,
    // forward: groups of 8 output channels; backward: the workgroups computing input gradients
    groups: u32,
    // backward: images per weight-gradient workgroup
    images_per_group: u32,
    // gather: the data set's image side
    data_rows: u32,
    data_cols: u32,
    _pad: u32,
}

// Invocations per workgroup: forward, backward.
const FWD: u32 = 64u;
const BWD: u32 = 256u;

// #include tensors.wgsl

// 32 KiB in all: per-invocation values (inputs, gradients) in `sm`, values every invocation reads
// four channels at a time in `sm4`.
const SM: u32 = 1650u;
const SM4: u32 = 1587u;
var<workgroup> sm: array<f32, 1650>;
var<workgroup> sm4: array<vec4<f32>, 1587>;

fn out_h() -> u32 {
    return params.height + 2u * params.pad + 1u - params.k;
}

fn out_w() -> u32 {
    return params.width + 2u * params.pad + 1u - params.k;
}

// ---- Forward ----

// Staging: each invocation loads up to four slots (every load unconditional: an index outside
// reads element 0 and the value is replaced by zero) before it stores any, so a round of staging
// waits on memory once, not once per slot.

// Slot j of the staged weights, sm4[tap * 2G + 2g + h] = weight[8g + 4h .. 8g + 4h + 4, tap]
// (tap = (ci, ky, kx); channels past Cout zero), then the biases at sm4[taps * 2G ..].
fn weight_slot(j: u32) -> vec4<f32> {
    let taps = params.cin * params.k * params.k;
    let g2 = 2u * params.groups;
    let tap = j / g2;
    let c0 = 4u * (j % g2);
    var v = vec4<f32>(0.0);
    for (var c = 0u; c < 4u; c++) {
        let co = c0 + c;
        let ok = co < params.cout && tap <= taps;
        let w = weight[select(0u, co * taps + tap, ok && tap < taps)];
        let b = bias[select(0u, co, ok)];
        v[c] = select(0.0, select(b, w, tap < taps), ok);
    }
    return v;
}

fn stage_weights(lid: u32) {
    let n = (params.cin * params.k * params.k + 1u) * 2u * params.groups;
    for (var j = lid; j < n; j += 4u * FWD) {
        let v0 = weight_slot(j);
        let v1 = weight_slot(j + FWD);
        let v2 = weight_slot(j + 2u * FWD);
        let v3 = weight_slot(j + 3u * FWD);
        sm4[j] = v0;
        if j + FWD < n {
            sm4[j + FWD] = v1;
        }
        if j + 2u * FWD < n {
            sm4[j + 2u * FWD] = v2;
        }
        if j + 3u * FWD < n {
            sm4[j + 3u * FWD] = v3;
        }
    }
}

// Slot j of image b's zero-padded input planes [Cin][H + 2p][W + 2p].
fn input_slot(b: u32, j: u32) -> f32 {
    let ph = params.height + 2u * params.pad;
    let pw = params.width + 2u * params.pad;
    let c = j / (ph * pw);
    let iy = i32((j / pw) % ph) - i32(params.pad);
    let ix = i32(j % pw) - i32(params.pad);
    let ok = c < params.cin && iy >= 0 && iy < i32(params.height) && ix >= 0 && ix < i32(params.width);
    let at = ((b * params.cin + c) * params.height + u32(max(iy, 0))) * params.width + u32(max(ix, 0));
    return select(0.0, input[select(0u, at, ok)], ok);
}

// Stores the four slots j, j + lanes, j + 2 lanes, j + 3 lanes of sm that are below n.
fn store_sm4(j: u32, lanes: u32, n: u32, v: vec4<f32>) {
    for (var q = 0u; q < 4u; q++) {
        if j + q * lanes < n {
            sm[j + q * lanes] = v[q];
        }
    }
}

// Stages image b's input planes, zero-padded, in sm.
fn stage_input(b: u32, lid: u32, lanes: u32) {
    let n = params.cin * (params.height + 2u * params.pad) * (params.width + 2u * params.pad);
    for (var j = lid; j < n; j += 4u * lanes) {
        let v0 = input_slot(b, j);
        let v1 = input_slot(b, j + lanes);
        let v2 = input_slot(b, j + 2u * lanes);
        let v3 = input_slot(b, j + 3u * lanes);
        store_sm4(j, lanes, n, vec4<f32>(v0, v1, v2, v3));
    }
}

// Padded position j of batch image `img` from the data set, translated by (dx, dy): the
// pixel's word, then its value through the table (zero outside the image or the plane).
fn gathered_slot(j: u32, img: u32, dx: i32, dy: i32) -> f32 {
    let pw = params.width + 2u * params.pad;
    let y = i32(j / pw) - i32(params.pad);
    let x = i32(j % pw) - i32(params.pad);
    let sy = y - dy;
    let sx = x - dx;
    let ok = y >= 0 && y < i32(params.height) && x >= 0 && x < i32(params.width) && sy >= 0
        && sy < i32(params.data_rows) && sx >= 0 && sx < i32(params.data_cols);
    let byte = img * params.data_rows * params.data_cols + u32(max(sy, 0)) * params.data_cols + u32(max(sx, 0));
    let word = images[select(0u, byte / 4u, ok)];
    return select(0.0, lut[(word >> ((byte % 4u) * 8u)) & 255u], ok);
}

// Stores padded position j (below n) of image b: in sm, and unpadded in `gathered`.
fn put_gathered(b: u32, j: u32, n: u32, v: f32) {
    if j >= n {
        return;
    }
    let pw = params.width + 2u * params.pad;
    let y = i32(j / pw) - i32(params.pad);
    let x = i32(j % pw) - i32(params.pad);
    if y >= 0 && y < i32(params.height) && x >= 0 && x < i32(params.width) {
        gathered[(b * params.height + u32(y)) * params.width + u32(x)] = v;
    }
    sm[j] = v;
}

// Stages batch image b from the data set (one channel), shifted and zero-padded, and writes the
// unpadded image to `gathered` and its label to `batch_labels` (gather.wgsl's formula).
fn stage_gathered(b: u32, lid: u32) {
    let n = (params.height + 2u * params.pad) * (params.width + 2u * params.pad);
    let slot = step.index_offset + b;
    let img = indices[slot];
    let dx = shifts[2u * slot];
    let dy = shifts[2u * slot + 1u];
    for (var j = lid; j < n; j += 4u * FWD) {
        let v0 = gathered_slot(j, img, dx, dy);
        let v1 = gathered_slot(j + FWD, img, dx, dy);
        let v2 = gathered_slot(j + 2u * FWD, img, dx, dy);
        let v3 = gathered_slot(j + 3u * FWD, img, dx, dy);
        put_gathered(b, j, n, v0);
        put_gathered(b, j + FWD, n, v1);
        put_gathered(b, j + 2u * FWD, n, v2);
        put_gathered(b, j + 3u * FWD, n, v3);
    }
    if lid == 0u {
        batch_labels[b] = labels[img];
    }
}

// Writes the 2x2 window at (y, x) of channel co: ReLU of each of v, the pooled maximum and its
// argmax (flat index into conv of the first maximum in row-major order).
fn write_window(b: u32, co: u32, y: u32, x: u32, v: vec4<f32>) {
    let ho = out_h();
    let wo = out_w();
    let r = max(v, vec4<f32>(0.0));
    let first = ((b * params.cout + co) * ho + y) * wo + x;
    conv[first] = r.x;
    conv[first + 1u] = r.y;
    conv[first + wo] = r.z;
    conv[first + wo + 1u] = r.w;
    var best = first;
    var best_v = r.x;
    if r.y > best_v {
        best = first + 1u;
        best_v = r.y;
    }
    if r.z > best_v {
        best = first + wo;
        best_v = r.z;
    }
    if r.w > best_v {
        best = first + wo + 1u;
        best_v = r.w;
    }
    let o = ((b * params.cout + co) * (ho / 2u) + y / 2u) * (wo / 2u) + x / 2u;
    pooled[o] = best_v;
    argmax[o] = best;
}

// The pooled outputs of image b, once its input and the weights are staged: task t is pooled
// position t % Q of output channels 8 (t / Q) .. 8 (t / Q) + 8. Each sum is the bias, then
// sum_{ci, ky, kx} weight * input in that order (the CPU reference's).
fn conv_pool_image(b: u32, lid: u32) {
    let k = params.k;
    let pw = params.width + 2u * params.pad;
    let plane = (params.height + 2u * params.pad) * pw;
    let taps = params.cin * k * k;
    let g2 = 2u * params.groups;
    let ho = out_h();
    let wo = out_w();
    let qw = wo / 2u;
    let qn = (ho / 2u) * qw;
    for (var t = lid; t < qn * params.groups; t += FWD) {
        let q = t % qn;
        let g = t / qn;
        let y = 2u * (q / qw);
        let x = 2u * (q % qw);
        // Window position w (row-major) of channels 8g..8g+4 in a<w>0, 8g+4..8g+8 in a<w>1.
        let b0 = sm4[taps * g2 + 2u * g];
        let b1 = sm4[taps * g2 + 2u * g + 1u];
        var a00 = b0;
        var a01 = b1;
        var a10 = b0;
        var a11 = b1;
        var a20 = b0;
        var a21 = b1;
        var a30 = b0;
        var a31 = b1;
        for (var ci = 0u; ci < params.cin; ci++) {
            for (var ky = 0u; ky < k; ky++) {
                let r0 = ci * plane + (y + ky) * pw + x;
                let r1 = r0 + pw;
                // The window's two rows, sliding: columns kx and kx + 1.
                var top = sm[r0];
                var bot = sm[r1];
                var wt = ((ci * k + ky) * k) * g2 + 2u * g;
                for (var kx = 0u; kx < k; kx++) {
                    let top1 = sm[r0 + kx + 1u];
                    let bot1 = sm[r1 + kx + 1u];
                    let w0 = sm4[wt];
                    let w1 = sm4[wt + 1u];
                    a00 += top * w0;
                    a01 += top * w1;
                    a10 += top1 * w0;
                    a11 += top1 * w1;
                    a20 += bot * w0;
                    a21 += bot * w1;
                    a30 += bot1 * w0;
                    a31 += bot1 * w1;
                    top = top1;
                    bot = bot1;
                    wt += g2;
                }
            }
        }
        for (var c = 0u; c < 4u; c++) {
            let co = 8u * g + c;
            if co < params.cout {
                write_window(b, co, y, x, vec4<f32>(a00[c], a10[c], a20[c], a30[c]));
            }
            if co + 4u < params.cout {
                write_window(b, co + 4u, y, x, vec4<f32>(a01[c], a11[c], a21[c], a31[c]));
            }
        }
    }
}

// conv + bias + ReLU + 2x2 max-pool over `input`, one workgroup per image.
@compute @workgroup_size(64)
fn conv_pool_forward(inv: Invocation) {
    let b = workgroup_index(inv);
    if b >= params.batch {
        return;
    }
    stage_input(b, inv.lid, FWD);
    stage_weights(inv.lid);
    workgroupBarrier();
    conv_pool_image(b, inv.lid);
}

// The same over the step's batch gathered from the data set (one input channel).
@compute @workgroup_size(64)
fn gather_conv_pool_forward(inv: Invocation) {
    let b = workgroup_index(inv);
    if b >= params.batch {
        return;
    }
    stage_gathered(b, inv.lid);
    stage_weights(inv.lid);
    workgroupBarrier();
    conv_pool_image(b, inv.lid);
}

// ---- Backward ----

// The conv-output gradient at (y, x) of image plane `plane` (b * Cout + co): the pooled
// gradient of its window when the window's argmax is this element and the conv output there is
// positive (ReLU), else zero.
fn dconv_at(plane: u32, y: u32, x: u32, ho: u32, wo: u32) -> f32 {
    let i = (plane * ho + y) * wo + x;
    let o = (plane * (ho / 2u) + y / 2u) * (wo / 2u) + x / 2u;
    // Three independent loads, not a chain of them.
    let arg = saved_argmax[o];
    let relu = saved_conv[i];
    let g = dpooled[o];
    return select(0.0, g, arg == i && relu > 0.0);
}

// Slot j of image b's staged dconv [Cout][Ho][Wo] (zero past it).
fn dconv_slot(b: u32, j: u32) -> f32 {
    let ho = out_h();
    let wo = out_w();
    let hw = ho * wo;
    let ok = j < params.cout * hw;
    let jj = select(0u, j, ok);
    return select(0.0, dconv_at(b * params.cout + jj / hw, (jj / wo) % ho, jj % wo, ho, wo), ok);
}

// Slot j of the input gradient's staged weights: sm4[(co * K * K + tap) * 2 + h] =
// weight[co, 4h .. 4h + 4, tap] (input channels past Cin zero).
fn weight_by_input_slot(j: u32) -> vec4<f32> {
    let kk = params.k * params.k;
    let co = j / (kk * 2u);
    let tap = (j / 2u) % kk;
    let c0 = 4u * (j % 2u);
    var v = vec4<f32>(0.0);
    for (var c = 0u; c < 4u; c++) {
        let ok = c0 + c < params.cin && co < params.cout;
        v[c] = select(0.0, weight[select(0u, (co * params.cin + c0 + c) * kk + tap, ok)], ok);
    }
    return v;
}

// Image b's input gradient. Staged: dconv [Cout][Ho][Wo] in sm, and the weights as
// sm4[((co * K + ky) * K + kx) * 2 + h] = weight[co, 4h .. 4h + 4, ky, kx] (input channels padded
// to 8 with zeros). Then one invocation per input position sums, for all its input channels at
// once, dconv[co, iy + p - ky, ix + p - kx] * weight[co, ci, ky, kx] over co, ky, kx (the CPU
// reference's order), the taps inside dconv only. (Measured on lavapipe: one staging round beats
// rounds of zero-padded planes, whose extra barriers cost more than they save; looping over the
// inside taps alone beats reading a zero for the others.)
fn input_gradient(b: u32, lid: u32) {
    let ho = out_h();
    let wo = out_w();
    let hw = ho * wo;
    let cout = params.cout;
    let cin = params.cin;
    let k = params.k;
    let kk = k * k;
    let n = cout * hw;
    for (var j = lid; j < n; j += 4u * BWD) {
        let g0 = dconv_slot(b, j);
        let g1 = dconv_slot(b, j + BWD);
        let g2 = dconv_slot(b, j + 2u * BWD);
        let g3 = dconv_slot(b, j + 3u * BWD);
        store_sm4(j, BWD, n, vec4<f32>(g0, g1, g2, g3));
    }
    let nw = cout * kk * 2u;
    for (var j = lid; j < nw; j += 2u * BWD) {
        let v0 = weight_by_input_slot(j);
        let v1 = weight_by_input_slot(j + BWD);
        sm4[j] = v0;
        if j + BWD < nw {
            sm4[j + BWD] = v1;
        }
    }
    workgroupBarrier();
    let h = params.height;
    let w = params.width;
    let p = params.pad;
    for (var pos = lid; pos < h * w; pos += BWD) {
        let iy = pos / w;
        let ix = pos % w;
        // The taps that land inside dconv: ky in [ky0, ky1) puts row iy + p - ky in [0, Ho), and
        // likewise kx. The taps outside would add zeros (which leave every sum as it is), so
        // they are skipped rather than read from a zero.
        let ky0 = max(iy + p + 1u, ho) - ho;
        let ky1 = min(iy + p + 1u, k);
        let kx0 = max(ix + p + 1u, wo) - wo;
        let kx1 = min(ix + p + 1u, k);
        var acc0 = vec4<f32>(0.0);
        var acc1 = vec4<f32>(0.0);
        for (var co = 0u; co < cout; co++) {
            for (var ky = ky0; ky < ky1; ky++) {
                // dconv[co, iy + p - ky, ix + p - kx] for kx = kx0, kx0 + 1, ...
                var at = co * hw + (iy + p - ky) * wo + ix + p - kx0;
                var wt = ((co * k + ky) * k + kx0) * 2u;
                for (var kx = kx0; kx < kx1; kx++) {
                    let g = sm[at];
                    acc0 += g * sm4[wt];
                    acc1 += g * sm4[wt + 1u];
                    at -= 1u;
                    wt += 2u;
                }
            }
        }
        for (var ci = 0u; ci < cin; ci++) {
            let v = select(acc1[ci % 4u], acc0[ci % 4u], ci < 4u);
            dinput[((b * cin + ci) * h + u32(iy)) * w + u32(ix)] = v;
        }
    }
}

// Slot j of the weight gradient's staged dconv of channels co0 .. co0 + 8: sm4[(y * Wo + x) * 2
// + h] = dconv[b, co0 + 4h .. co0 + 4h + 4, y, x] (zero past Cout or the plane).
fn dconv8_slot(b: u32, co0: u32, j: u32) -> vec4<f32> {
    let ho = out_h();
    let wo = out_w();
    let in_plane = j < 2u * ho * wo;
    let y = select(0u, (j / 2u) / wo, in_plane);
    let x = (j / 2u) % wo;
    let c0 = co0 + 4u * (j % 2u);
    var g = vec4<f32>(0.0);
    for (var c = 0u; c < 4u; c++) {
        let ok = in_plane && c0 + c < params.cout;
        g[c] = select(0.0, dconv_at(b * params.cout + select(0u, c0 + c, ok), y, x, ho, wo), ok);
    }
    return g;
}

// The weight and bias gradients of a group of images (one partial sum per group), for up to 16
// output channels at once. Per image: its zero-padded input planes (sm) and every channel's
// dconv as sm4[(g * Ho * Wo + y * Wo + x) * 2 + h] (channels 8g + 4h .. 8g + 4h + 4) are staged;
// then invocation `task` (a tap (ci, ky, kx), or the bias after the taps) sums dconv[co, y, x] *
// input[ci, y + ky - p, x + kx - p] (or dconv alone) over the images, then (y, x) row by row: one
// input read and two vec4 reads per eight multiply-adds. When there are few taps (the first
// layer) the rows are split in `parts` over more invocations, whose sums are added in part
// order at the end.
fn weight_gradient(group: u32, lid: u32) {
    let ho = out_h();
    let wo = out_w();
    let hw = ho * wo;
    let cout = params.cout;
    let k = params.k;
    let taps = params.cin * k * k;
    let pw = params.width + 2u * params.pad;
    let plane = (params.height + 2u * params.pad) * pw;
    let tasks = taps + 1u;
    let parts = max(1u, BWD / tasks);
    let task = lid % tasks;
    let part = lid / tasks;
    let busy = part < parts;
    let y0 = part * ho / parts;
    let y1 = (part + 1u) * ho / parts;
    let is_bias = task == taps;
    let ci = task / (k * k);
    let ky = (task / k) % k;
    let kx = task % k;
    // The input index of output (0, 0) for this tap (the bias task reads 1 instead).
    let base = select(ci * plane + ky * pw + kx, 0u, is_bias);
    let b0 = group * params.images_per_group;
    let b1 = min(params.batch, b0 + params.images_per_group);
    let n_w = cout * taps;
    // Channels 0..8 in acc0, acc1; 8..16 (when there are more than 8) in acc2, acc3.
    let two = cout > 8u;
    let n = select(2u, 4u, two) * hw;
    let second = 2u * hw;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var b = b0; b < b1; b++) {
        stage_input(b, lid, BWD);
        for (var j = lid; j < n; j += 2u * BWD) {
            let g0 = dconv8_slot(b, 8u * (j / second), j % second);
            let j1 = j + BWD;
            let g1 = dconv8_slot(b, 8u * (j1 / second), j1 % second);
            sm4[j] = g0;
            if j1 < n {
                sm4[j1] = g1;
            }
        }
        workgroupBarrier();
        // The same loop with and without the second group, so that neither tests per tap.
        if busy && two {
            for (var y = y0; y < y1; y++) {
                let in_row = base + y * pw;
                var g_at = 2u * y * wo;
                for (var x = 0u; x < wo; x++) {
                    let v = select(sm[in_row + x], 1.0, is_bias);
                    acc0 += v * sm4[g_at];
                    acc1 += v * sm4[g_at + 1u];
                    acc2 += v * sm4[second + g_at];
                    acc3 += v * sm4[second + g_at + 1u];
                    g_at += 2u;
                }
            }
        } else if busy {
            for (var y = y0; y < y1; y++) {
                let in_row = base + y * pw;
                var g_at = 2u * y * wo;
                for (var x = 0u; x < wo; x++) {
                    let v = select(sm[in_row + x], 1.0, is_bias);
                    acc0 += v * sm4[g_at];
                    acc1 += v * sm4[g_at + 1u];
                    g_at += 2u;
                }
            }
        }
        workgroupBarrier();
    }
    // Parts added in order through workgroup memory, then the group's partial written.
    if parts > 1u {
        if busy && part > 0u {
            sm4[4u * lid] = acc0;
            sm4[4u * lid + 1u] = acc1;
            sm4[4u * lid + 2u] = acc2;
            sm4[4u * lid + 3u] = acc3;
        }
        workgroupBarrier();
        if part == 0u {
            for (var pt = 1u; pt < parts; pt++) {
                let at = 4u * (pt * tasks + task);
                acc0 += sm4[at];
                acc1 += sm4[at + 1u];
                acc2 += sm4[at + 2u];
                acc3 += sm4[at + 3u];
            }
        }
    }
    if part == 0u {
        for (var c = 0u; c < 16u; c++) {
            let co = c;
            if co < cout {
                var v = select(acc1[c % 4u], acc0[c % 4u], c < 4u);
                if c >= 8u {
                    v = select(acc3[c % 4u], acc2[c % 4u], c < 12u);
                }
                if is_bias {
                    dbias[group * cout + co] = v;
                } else {
                    dweight[group * n_w + co * taps + task] = v;
                }
            }
        }
    }
}

// The backward pass of conv + bias + ReLU + max-pool: workgroups 0..groups compute images'
// input gradients, the rest groups' weight and bias partials.
@compute @workgroup_size(256)
fn conv_pool_backward(inv: Invocation) {
    let id = workgroup_index(inv);
    if id < params.groups {
        input_gradient(id, inv.lid);
    } else {
        let group = id - params.groups;
        if group * params.images_per_group < params.batch {
            weight_gradient(group, inv.lid);
        }
    }
}
