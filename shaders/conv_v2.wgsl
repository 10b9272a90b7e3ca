// Convolution layers, the second kernels of lenet (`LENET_KERNELS=v2`, the default): one
// dispatch per layer and direction, register-blocked so that each value read from workgroup
// memory feeds several multiply-adds, and every sum in a fixed order (the same bits on every
// run). NCHW, square kernels of side K <= 5, stride 1, zero padding; each conv is followed by
// ReLU and a 2x2 max-pool (even Ho and Wo). Shapes these do not take use conv.wgsl's kernels.
//
// Forward: one workgroup per image. The image's zero-padded input planes and the weights are
// staged once; each invocation computes one pooled position for CO output channels at once
// (its 2x2 window: 4 x CO accumulators), sliding along the kernel row so that a row of K taps
// costs K + 1 input reads for 4 x CO x K multiply-adds. The first layer gathers its input
// from the resident data set on the way in (no pass of its own) and writes it out for the
// backward pass.
//
// Backward: one dispatch, two kinds of workgroup. The first B (when the input gradient is
// wanted) compute one image's input gradient each; the rest compute the weight and bias
// gradients of a group of images each, written as one partial sum per group for the optimizer
// to add (no pass of their own). Both read the conv-output gradient straight from the pooled
// one: only each window's argmax, where ReLU let it through, is non-zero.

struct Params {
    batch: u32,
    cin: u32,
    cout: u32,
    height: u32,
    width: u32,
    k: u32,
    pad: u32,
    // forward: output channels per invocation group (CO), rounded up; backward: the number of
    // workgroups computing input gradients (0 or batch)
    co_groups: u32,
    // backward: images per weight-gradient workgroup
    images_per_group: u32,
    // gather: the data set's image side and whether to read from it
    data_rows: u32,
    data_cols: u32,
    _pad: u32,
}

// Output channels per invocation in the forward pass.
const CO: u32 = 8u;
// Invocations per workgroup: forward, backward.
const FWD: u32 = 64u;
const BWD: u32 = 256u;
// Output channels per round of the input gradient.
const CG: u32 = 4u;
// 16 KiB of workgroup memory: WebGPU's default limit.
const SMEM: u32 = 4000u;

@group(0) @binding(0) var<storage, read> input: array<f32>;
@group(0) @binding(1) var<storage, read> weight: array<f32>;
@group(0) @binding(2) var<storage, read> bias: array<f32>;
@group(0) @binding(3) var<storage, read_write> conv: array<f32>;
@group(0) @binding(4) var<storage, read_write> pooled: array<f32>;
@group(0) @binding(5) var<storage, read_write> argmax: array<u32>;
// The gathering forward pass: the data set and the step's batch.
@group(0) @binding(6) var<storage, read> images: array<u32>;
@group(0) @binding(7) var<storage, read> labels: array<u32>;
@group(0) @binding(8) var<storage, read> indices: array<u32>;
@group(0) @binding(9) var<storage, read> shifts: array<i32>;
@group(0) @binding(10) var<storage, read> lut: array<f32>;
@group(0) @binding(11) var<storage, read_write> gathered: array<f32>;
@group(0) @binding(12) var<storage, read_write> batch_labels: array<u32>;
// The backward pass.
@group(0) @binding(13) var<storage, read> dpooled: array<f32>;
@group(0) @binding(14) var<storage, read> saved_argmax: array<u32>;
@group(0) @binding(15) var<storage, read> saved_conv: array<f32>;
@group(0) @binding(16) var<storage, read_write> dinput: array<f32>;
@group(0) @binding(17) var<storage, read_write> dweight: array<f32>;
@group(0) @binding(18) var<storage, read_write> dbias: array<f32>;
@group(0) @binding(19) var<uniform> params: Params;

var<workgroup> smem: array<f32, 4000>;

fn out_h() -> u32 {
    return params.height + 2u * params.pad + 1u - params.k;
}

fn out_w() -> u32 {
    return params.width + 2u * params.pad + 1u - params.k;
}

// ---- Forward ----

// Stages the weights and biases, each output channel padded to a multiple of CO with zeros,
// after `at` floats of smem: [co_groups * CO][Cin][K][K] weights, then the biases.
fn stage_weights(at: u32, lid: u32, lanes: u32) {
    let taps = params.cin * params.k * params.k;
    let n_w = params.co_groups * CO * taps;
    let n_real = params.cout * taps;
    for (var j = lid; j < n_w; j += lanes) {
        smem[at + j] = select(0.0, weight[min(j, n_real - 1u)], j < n_real);
    }
    for (var j = lid; j < params.co_groups * CO; j += lanes) {
        smem[at + n_w + j] = select(0.0, bias[min(j, params.cout - 1u)], j < params.cout);
    }
}

// Stages image b's input planes, zero-padded: [Cin][H + 2p][W + 2p].
fn stage_input(b: u32, lid: u32, lanes: u32) {
    let ph = params.height + 2u * params.pad;
    let pw = params.width + 2u * params.pad;
    let n = params.cin * ph * pw;
    for (var j = lid; j < n; j += lanes) {
        let c = j / (ph * pw);
        let iy = i32((j / pw) % ph) - i32(params.pad);
        let ix = i32(j % pw) - i32(params.pad);
        var v = 0.0;
        if iy >= 0 && iy < i32(params.height) && ix >= 0 && ix < i32(params.width) {
            v = input[((b * params.cin + c) * params.height + u32(iy)) * params.width + u32(ix)];
        }
        smem[j] = v;
    }
}

// Stages batch image b from the data set (one channel), shifted and zero-padded, and writes the
// unpadded image to `gathered` and its label to `batch_labels` (gather.wgsl's formula).
fn stage_gathered(b: u32, lid: u32) {
    let ph = params.height + 2u * params.pad;
    let pw = params.width + 2u * params.pad;
    let slot = step.index_offset + b;
    let img = indices[slot];
    let dx = shifts[2u * slot];
    let dy = shifts[2u * slot + 1u];
    for (var j = lid; j < ph * pw; j += FWD) {
        let y = i32(j / pw) - i32(params.pad);
        let x = i32(j % pw) - i32(params.pad);
        var v = 0.0;
        if y >= 0 && y < i32(params.height) && x >= 0 && x < i32(params.width) {
            let sy = y - dy;
            let sx = x - dx;
            if sy >= 0 && sy < i32(params.data_rows) && sx >= 0 && sx < i32(params.data_cols) {
                let byte = img * params.data_rows * params.data_cols + u32(sy) * params.data_cols + u32(sx);
                v = lut[(images[byte / 4u] >> ((byte % 4u) * 8u)) & 255u];
            }
            gathered[(b * params.height + u32(y)) * params.width + u32(x)] = v;
        }
        smem[j] = v;
    }
    if lid == 0u {
        batch_labels[b] = labels[img];
    }
}

// The pooled outputs of image b, once its input and the weights are staged: invocation task t
// is pooled position t % (Qh * Qw) of output channels CO * (t / (Qh * Qw)) onwards.
fn conv_pool_image(b: u32, lid: u32) {
    let k = params.k;
    let ph = params.height + 2u * params.pad;
    let pw = params.width + 2u * params.pad;
    let plane = ph * pw;
    let w_at = params.cin * plane;
    let taps = params.cin * k * k;
    let b_at = w_at + params.co_groups * CO * taps;
    let ho = out_h();
    let wo = out_w();
    let qw = wo / 2u;
    let qn = (ho / 2u) * qw;
    for (var t = lid; t < qn * params.co_groups; t += FWD) {
        let q = t % qn;
        let g = t / qn;
        let y = 2u * (q / qw);
        let x = 2u * (q % qw);
        // acc[4 * c + w]: channel c of the group, window position w (row-major).
        var acc: array<f32, 32>;
        for (var c = 0u; c < CO; c++) {
            let bv = smem[b_at + g * CO + c];
            acc[4u * c] = bv;
            acc[4u * c + 1u] = bv;
            acc[4u * c + 2u] = bv;
            acc[4u * c + 3u] = bv;
        }
        for (var ci = 0u; ci < params.cin; ci++) {
            for (var ky = 0u; ky < k; ky++) {
                let r0 = ci * plane + (y + ky) * pw + x;
                let r1 = r0 + pw;
                // The window's two rows, sliding: columns kx and kx + 1.
                var a0 = smem[r0];
                var a1 = smem[r1];
                let wrow = w_at + ((g * CO) * params.cin + ci) * k * k + ky * k;
                for (var kx = 0u; kx < k; kx++) {
                    let b0 = smem[r0 + kx + 1u];
                    let b1 = smem[r1 + kx + 1u];
                    for (var c = 0u; c < CO; c++) {
                        let wv = smem[wrow + c * taps + kx];
                        acc[4u * c] += wv * a0;
                        acc[4u * c + 1u] += wv * b0;
                        acc[4u * c + 2u] += wv * a1;
                        acc[4u * c + 3u] += wv * b1;
                    }
                    a0 = b0;
                    a1 = b1;
                }
            }
        }
        for (var c = 0u; c < CO; c++) {
            let co = g * CO + c;
            if co >= params.cout {
                break;
            }
            let first = ((b * params.cout + co) * ho + y) * wo + x;
            let v0 = max(acc[4u * c], 0.0);
            let v1 = max(acc[4u * c + 1u], 0.0);
            let v2 = max(acc[4u * c + 2u], 0.0);
            let v3 = max(acc[4u * c + 3u], 0.0);
            conv[first] = v0;
            conv[first + 1u] = v1;
            conv[first + wo] = v2;
            conv[first + wo + 1u] = v3;
            // The first maximum in row-major order.
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
            let o = (b * params.cout + co) * qn + q;
            pooled[o] = best_v;
            argmax[o] = best;
        }
    }
}

// conv + bias + ReLU + 2x2 max-pool over `input`, one workgroup per image.
@compute @workgroup_size(64)
fn conv_pool_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let b = wid.x + wid.y * nwg.x;
    if b >= params.batch {
        return;
    }
    stage_input(b, lid, FWD);
    stage_weights(params.cin * (params.height + 2u * params.pad) * (params.width + 2u * params.pad), lid, FWD);
    workgroupBarrier();
    conv_pool_image(b, lid);
}

// The same over the step's batch gathered from the data set (one input channel).
@compute @workgroup_size(64)
fn gather_conv_pool_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let b = wid.x + wid.y * nwg.x;
    if b >= params.batch {
        return;
    }
    stage_gathered(b, lid);
    stage_weights((params.height + 2u * params.pad) * (params.width + 2u * params.pad), lid, FWD);
    workgroupBarrier();
    conv_pool_image(b, lid);
}

// ---- Backward ----

// The conv-output gradient at flat index i of image plane `plane` (b * Cout + co): the pooled
// gradient of its window when the window's argmax is i and the conv output there is positive.
fn dconv_at(plane: u32, y: u32, x: u32, ho: u32, wo: u32) -> f32 {
    let i = (plane * ho + y) * wo + x;
    let o = (plane * (ho / 2u) + y / 2u) * (wo / 2u) + x / 2u;
    var g = 0.0;
    if saved_argmax[o] == i && saved_conv[i] > 0.0 {
        g = dpooled[o];
    }
    return g;
}

// Image b's input gradient, 4 output channels at a time: their dconv planes, zero-padded by
// K - 1 - p so that every tap of every input position lands inside, and their weights as
// [4][K][K][8] (input channels padded to 8 with zeros) are staged; then one invocation per
// input position adds, for all 8 input channels at once, dconv[co, iy + p - ky, ix + p - kx] *
// w[co, ci, ky, kx] over co, ky, kx (the CPU reference's order, the padding adding zeros).
// Every loop bound is the same for all invocations and the channel loop's is a constant:
// compilers unroll it, the accumulators stay in registers and no load is predicated.
fn input_gradient(b: u32, lid: u32) {
    let ho = out_h();
    let wo = out_w();
    let cout = params.cout;
    let cin = params.cin;
    let k = params.k;
    let pd = k - 1u - params.pad;
    let dh = ho + 2u * pd;
    let dw = wo + 2u * pd;
    let dplane = dh * dw;
    let w_at = CG * dplane;
    let h = params.height;
    let w = params.width;
    // This invocation's input positions: lid, lid + BWD, ... (at most 2 per invocation).
    var acc: array<f32, 16>;
    for (var j = 0u; j < 16u; j++) {
        acc[j] = 0.0;
    }
    for (var co0 = 0u; co0 < cout; co0 += CG) {
        for (var j = lid; j < CG * dplane; j += BWD) {
            let c = co0 + j / dplane;
            let y = i32((j / dw) % dh) - i32(pd);
            let x = i32(j % dw) - i32(pd);
            var g = 0.0;
            if c < cout && y >= 0 && y < i32(ho) && x >= 0 && x < i32(wo) {
                g = dconv_at(b * cout + c, u32(y), u32(x), ho, wo);
            }
            smem[j] = g;
        }
        for (var j = lid; j < CG * k * k * 8u; j += BWD) {
            let c = co0 + j / (k * k * 8u);
            let tap = (j / 8u) % (k * k);
            let ci = j % 8u;
            var v = 0.0;
            if c < cout && ci < cin {
                v = weight[(c * cin + ci) * k * k + tap];
            }
            smem[w_at + j] = v;
        }
        workgroupBarrier();
        for (var r = 0u; r < 2u; r++) {
            let pos = lid + r * BWD;
            let iy = min(pos / w, h - 1u);
            let ix = pos % w;
            for (var c = 0u; c < CG; c++) {
                for (var ky = 0u; ky < k; ky++) {
                    // dconv row iy + p - ky of the padded plane: iy + pd + p - ky + ... = iy + k - 1 - ky.
                    let row = c * dplane + (iy + k - 1u - ky) * dw + ix + k - 1u;
                    let wrow = w_at + ((c * k + ky) * k) * 8u;
                    for (var kx = 0u; kx < k; kx++) {
                        let g = smem[row - kx];
                        let wb = wrow + kx * 8u;
                        for (var ci = 0u; ci < 8u; ci++) {
                            acc[r * 8u + ci] += g * smem[wb + ci];
                        }
                    }
                }
            }
        }
        workgroupBarrier();
    }
    for (var r = 0u; r < 2u; r++) {
        let pos = lid + r * BWD;
        if pos < h * w {
            for (var ci = 0u; ci < 8u; ci++) {
                if ci < cin {
                    dinput[((b * cin + ci) * h + pos / w) * w + pos % w] = acc[r * 8u + ci];
                }
            }
        }
    }
}

// The weight and bias gradients of a group of images (one partial sum each), 8 output channels
// at a time. Per image: its zero-padded input planes and the 8 channels' pooled gradients where
// ReLU let them through (the only non-zero conv-output gradients: one per window, at the
// window's argmax) are staged; then invocation `tap` (ci, ky, kx) sums, for each channel,
// gradient * input over the image's windows: dweight[co, ci, ky, kx] += dconv[co, y, x] *
// input[ci, y + ky - p, x + kx - p] at each window's argmax (y, x). The biases' sums go to the
// invocations after the taps. When there are few taps (the first layer) the windows are split
// in `parts` over more invocations, whose sums are added in part order.
fn weight_gradient(group: u32, lid: u32) {
    let ho = out_h();
    let wo = out_w();
    let qw = wo / 2u;
    let qn = (ho / 2u) * qw;
    let cout = params.cout;
    let k = params.k;
    let taps = params.cin * k * k;
    let ph = params.height + 2u * params.pad;
    let pw = params.width + 2u * params.pad;
    let g_at = params.cin * ph * pw;
    // Tasks: taps, then one per channel of the group for its bias, `parts` times over.
    let tasks = taps + CO;
    let parts = max(1u, BWD / tasks);
    let task = lid % tasks;
    let part = lid / tasks;
    let busy = part < parts;
    let q0 = part * qn / parts;
    let q1 = (part + 1u) * qn / parts;
    let ci = task / (k * k);
    let ky = (task / k) % k;
    let kx = task % k;
    let b0 = group * params.images_per_group;
    let b1 = min(params.batch, b0 + params.images_per_group);
    let n_w = cout * taps;
    for (var co0 = 0u; co0 < cout; co0 += CO) {
        var acc: array<f32, 8>;
        for (var c = 0u; c < CO; c++) {
            acc[c] = 0.0;
        }
        for (var b = b0; b < b1; b++) {
            stage_input(b, lid, BWD);
            for (var j = lid; j < CO * qn; j += BWD) {
                let co = co0 + j / qn;
                var g = 0.0;
                if co < cout {
                    let o = (b * cout + co) * qn + j % qn;
                    if saved_conv[saved_argmax[o]] > 0.0 {
                        g = dpooled[o];
                    }
                }
                smem[g_at + j] = g;
            }
            workgroupBarrier();
            if busy {
                if task < taps {
                    // Window q's top-left conv output, walked without divisions: (qy, qx).
                    var qy = q0 / qw;
                    var qx = q0 % qw;
                    for (var q = q0; q < q1; q++) {
                        let first = 2u * qy * wo + 2u * qx;
                        for (var c = 0u; c < CO; c++) {
                            let co = min(co0 + c, cout - 1u);
                            let plane = (b * cout + co) * ho * wo;
                            // The argmax's offset in the window: 0, 1, wo or wo + 1.
                            let off = saved_argmax[(b * cout + co) * qn + q] - plane - first;
                            let dy = select(0u, 1u, off >= wo);
                            let dx = off - dy * wo;
                            let at = (ci * ph + 2u * qy + dy + ky) * pw + 2u * qx + dx + kx;
                            acc[c] += smem[g_at + c * qn + q] * smem[at];
                        }
                        qx += 1u;
                        if qx == qw {
                            qx = 0u;
                            qy += 1u;
                        }
                    }
                } else if task - taps < CO {
                    let c = task - taps;
                    var s = 0.0;
                    for (var q = q0; q < q1; q++) {
                        s += smem[g_at + c * qn + q];
                    }
                    acc[0] += s;
                }
            }
            workgroupBarrier();
        }
        // Parts added in order through workgroup memory, then the group's partial written.
        for (var pt = 1u; pt < parts; pt++) {
            if busy && part == pt {
                for (var c = 0u; c < CO; c++) {
                    smem[c * tasks + task] = acc[c];
                }
            }
            workgroupBarrier();
            if part == 0u {
                for (var c = 0u; c < CO; c++) {
                    acc[c] += smem[c * tasks + task];
                }
            }
            workgroupBarrier();
        }
        if part == 0u {
            if task < taps {
                for (var c = 0u; c < CO; c++) {
                    if co0 + c < cout {
                        dweight[group * n_w + (co0 + c) * taps + task] = acc[c];
                    }
                }
            } else if co0 + task - taps < cout {
                dbias[group * cout + co0 + task - taps] = acc[0];
            }
        }
    }
}

// The backward pass of conv + bias + ReLU + max-pool: workgroups 0..co_groups compute images'
// input gradients, the rest groups' weight and bias partials.
@compute @workgroup_size(256)
fn conv_pool_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let id = wid.x + wid.y * nwg.x;
    if id < params.co_groups {
        input_gradient(id, lid);
    } else {
        let group = id - params.co_groups;
        if group * params.images_per_group < params.batch {
            weight_gradient(group, lid);
        }
    }
}
