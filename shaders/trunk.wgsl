// LeNet-5's convolutional trunk, forward and backward, one dispatch each (src/gpu/conv.rs):
//
// - trunk_forward: gather the image (shifted, as pixels / 255), conv1 + ReLU + 2x2 max-pool, then
//   conv2 + ReLU + 2x2 max-pool. One workgroup per image and per `splits`-th of conv2's output
//   channels (each recomputes conv1, which costs half of conv2, so that a batch of 64 fills a
//   large GPU); pooled1 stays in workgroup memory between the layers. What the backward pass
//   and the tests read is written out: the gathered input, each layer's ReLU output, pooled
//   output and argmax.
// - trunk_backward: from the pooled gradient of conv2 (the head's input gradient), conv2's
//   weight gradient, the gradient of pooled1, and conv1's weight gradient, one workgroup per
//   image, each weight gradient as that image's partial sum. conv1's output gradient is not
//   formed: it is nonzero only at each window's argmax, so conv1's weight gradient sums over
//   the pooled positions.
//
// The shapes are LeNet-5's, fixed below (src/gpu/conv.rs checks a call's against them): every
// loop runs to a constant or a `params` bound with a counter that only grows, so each
// terminates. The activations come packed in `acts` (f32) and `acts_u32` (the labels and the
// argmaxes), the parameters in `weights`, the gradients in `grads` (shaders/include/
// tensors.wgsl), each tensor at an offset the host passes in `params`: the forward pass binds
// eight storage buffers, the backward four.

struct Params {
    batch: u32,
    // The data set's image sides.
    rows: u32,
    cols: u32,
    // Workgroups per image in the forward pass (a divisor of C2).
    splits: u32,
    // Where each tensor starts in its packed buffer: the gathered images and their labels, then
    // per layer (conv1, conv2) its ReLU output, pooled output, pooled output's argmax and
    // gradient, and its weight, bias, weight gradient, bias gradient.
    input_at: u32,
    labels_at: u32,
    conv1_at: vec4<u32>,
    conv2_at: vec4<u32>,
    params1_at: vec4<u32>,
    params2_at: vec4<u32>,
}

// #include tensors.wgsl

// conv1: 1 -> C1 channels, 5x5, padding 2, on S0 x S0; pooled to S1 x S1. conv2: C1 -> C2, 5x5,
// no padding, on S1 x S1 (output O2 x O2); pooled to S2 x S2.
const S0: u32 = 28u;
const PAD: u32 = 32u;
const C1: u32 = 6u;
const S1: u32 = 14u;
const C2: u32 = 16u;
const O2: u32 = 10u;
const S2: u32 = 5u;
const K: u32 = 5u;
const WG: u32 = 256u;
// Per image: conv1's output, pooled1, conv2's output, pooled2.
const CONV1: u32 = 4704u;
const POOLED1: u32 = 1176u;
const CONV2: u32 = 1600u;
const POOLED2: u32 = 400u;

// The forward pass's: the image zero-padded to 32 x 32 for conv1, then conv2's weights and
// biases for conv2 (`stage`); conv1's weights and biases; pooled1 (14,992 bytes).
var<workgroup> stage: array<f32, 2416>;
var<workgroup> w1s: array<f32, 156>;
var<workgroup> p1: array<f32, POOLED1>;
// The backward pass's: conv2's output gradient, then the padded image again; and pooled1's
// gradient masked by conv1's ReLU (with p1: 15,808 bytes).
var<workgroup> scratch: array<f32, CONV2>;
var<workgroup> dp1: array<f32, POOLED1>;

// The image's pixel (y, x) after its shift (dx, dy), as pixels / 255 through `lut` (the CPU's
// division, bit for bit); zero outside the image.
fn pixel(image: u32, y: i32, x: i32, dx: i32, dy: i32) -> f32 {
    let sy = y - dy;
    let sx = x - dx;
    if sy < 0 || sy >= i32(params.rows) || sx < 0 || sx >= i32(params.cols) {
        return 0.0;
    }
    let byte_index = image * params.rows * params.cols + u32(sy) * params.cols + u32(sx);
    return lut[(images[byte_index / 4u] >> ((byte_index % 4u) * 8u)) & 255u];
}

// The window's ReLU'd conv outputs (row-major: top-left, top-right, bottom-left, bottom-right):
// which of the four is its first maximum.
fn first_max(v: vec4<f32>) -> u32 {
    var best = v.x;
    var at = 0u;
    if v.y > best {
        best = v.y;
        at = 1u;
    }
    if v.z > best {
        best = v.z;
        at = 2u;
    }
    if v.w > best {
        at = 3u;
    }
    return at;
}

// Writes a window's four ReLU outputs at conv[k0], conv[k0 + 1], conv[k0 + side],
// conv[k0 + side + 1], its max at pooled[p] and the max's flat index at argmax[a].
fn store_window(v: vec4<f32>, conv_at: u32, k0: u32, side: u32, pooled_at: u32, argmax_at: u32) {
    acts[conv_at + k0] = v.x;
    acts[conv_at + k0 + 1u] = v.y;
    acts[conv_at + k0 + side] = v.z;
    acts[conv_at + k0 + side + 1u] = v.w;
    let at = first_max(v);
    acts[pooled_at] = v[at];
    acts_u32[argmax_at] = k0 + select(0u, 1u, at == 1u || at == 3u) + select(0u, side, at >= 2u);
}

@compute @workgroup_size(256)
fn trunk_forward(inv: Invocation) {
    let lid = inv.lid;
    let group = workgroup_index(inv);
    let image = group / params.splits;
    let split = group % params.splits;
    if image >= params.batch {
        return;
    }
    let lead = split == 0u;
    let slot = step.index_offset + image;
    let sample = indices[slot];
    let dx = shifts[2u * slot];
    let dy = shifts[2u * slot + 1u];
    // The gathered image, zero-padded by 2; the first split writes it out.
    for (var i = lid; i < PAD * PAD; i += WG) {
        let y = i32(i / PAD) - 2;
        let x = i32(i % PAD) - 2;
        var v = 0.0;
        if y >= 0 && y < i32(S0) && x >= 0 && x < i32(S0) {
            v = pixel(sample, y, x, dx, dy);
            if lead {
                acts[params.input_at + image * S0 * S0 + u32(y) * S0 + u32(x)] = v;
            }
        }
        stage[i] = v;
    }
    if lead && lid == 0u {
        acts_u32[params.labels_at + image] = labels[sample];
    }
    if lid < 150u {
        w1s[lid] = weights[params.params1_at.x + lid];
    } else if lid < 156u {
        w1s[lid] = weights[params.params1_at.y + lid - 150u];
    }
    workgroupBarrier();
    // conv1 + bias + ReLU + pool: one pooled output (a window of four conv outputs, side by side
    // in a vec4) per thread and turn.
    for (var j = lid; j < POOLED1; j += WG) {
        let c = j / (S1 * S1);
        let y0 = 2u * ((j % (S1 * S1)) / S1);
        let x0 = 2u * (j % S1);
        var a = vec4<f32>(0.0);
        for (var ky = 0u; ky < K; ky++) {
            for (var kx = 0u; kx < K; kx++) {
                let at = (y0 + ky) * PAD + x0 + kx;
                a += w1s[(c * K + ky) * K + kx] * vec4<f32>(stage[at], stage[at + 1u], stage[at + PAD], stage[at + PAD + 1u]);
            }
        }
        let v = max(a + w1s[150u + c], vec4<f32>(0.0));
        p1[j] = v[first_max(v)];
        if lead {
            let k0 = ((image * C1 + c) * S0 + y0) * S0 + x0;
            let p = image * POOLED1 + j;
            store_window(v, params.conv1_at.x, k0, S0, params.conv1_at.y + p, params.conv1_at.z + p);
        }
    }
    workgroupBarrier();
    // conv2's weights and biases where the image was: four loads go out before their stores.
    for (var i = lid; i < 2416u; i += 4u * WG) {
        var v = vec4<f32>(0.0);
        for (var q = 0u; q < 4u; q++) {
            let e = i + q * WG;
            if e < 2400u {
                v[q] = weights[params.params2_at.x + e];
            } else if e < 2416u {
                v[q] = weights[params.params2_at.y + e - 2400u];
            }
        }
        for (var q = 0u; q < 4u; q++) {
            if i + q * WG < 2416u {
                stage[i + q * WG] = v[q];
            }
        }
    }
    workgroupBarrier();
    // conv2 + bias + ReLU + pool for this split's output channels.
    let per = C2 / params.splits;
    for (var j = lid; j < per * S2 * S2; j += WG) {
        let c = split * per + j / (S2 * S2);
        let y0 = 2u * ((j % (S2 * S2)) / S2);
        let x0 = 2u * (j % S2);
        var a = vec4<f32>(0.0);
        for (var ci = 0u; ci < C1; ci++) {
            for (var ky = 0u; ky < K; ky++) {
                let row = ((c * C1 + ci) * K + ky) * K;
                let at = ci * S1 * S1 + (y0 + ky) * S1 + x0;
                for (var kx = 0u; kx < K; kx++) {
                    let i = at + kx;
                    a += stage[row + kx] * vec4<f32>(p1[i], p1[i + 1u], p1[i + S1], p1[i + S1 + 1u]);
                }
            }
        }
        let v = max(a + stage[2400u + c], vec4<f32>(0.0));
        let k0 = ((image * C2 + c) * O2 + y0) * O2 + x0;
        let p = image * POOLED2 + c * S2 * S2 + j % (S2 * S2);
        store_window(v, params.conv2_at.x, k0, O2, params.conv2_at.y + p, params.conv2_at.z + p);
    }
}

@compute @workgroup_size(256)
fn trunk_backward(inv: Invocation) {
    let lid = inv.lid;
    let image = workgroup_index(inv);
    if image >= params.batch {
        return;
    }
    for (var i = lid; i < CONV2; i += WG) {
        scratch[i] = 0.0;
    }
    for (var i = lid; i < POOLED1; i += WG) {
        p1[i] = acts[params.conv1_at.y + image * POOLED1 + i];
    }
    workgroupBarrier();
    // conv2's output gradient: each pooled gradient to its window's argmax, where the ReLU
    // output there is positive.
    for (var i = lid; i < POOLED2; i += WG) {
        let arg = acts_u32[params.conv2_at.z + image * POOLED2 + i];
        let g = acts[params.conv2_at.w + image * POOLED2 + i];
        if acts[params.conv2_at.x + arg] > 0.0 {
            scratch[arg - image * CONV2] = g;
        }
    }
    workgroupBarrier();
    // conv2's weight and bias gradients of this image.
    for (var e = lid; e < C2 * C1 * K * K + C2; e += WG) {
        var acc = 0.0;
        if e < C2 * C1 * K * K {
            let c = e / (C1 * K * K);
            let ci = (e / (K * K)) % C1;
            let ky = (e / K) % K;
            let kx = e % K;
            for (var y = 0u; y < O2; y++) {
                let d = c * O2 * O2 + y * O2;
                let at = ci * S1 * S1 + (y + ky) * S1 + kx;
                for (var x = 0u; x < O2; x++) {
                    acc += scratch[d + x] * p1[at + x];
                }
            }
            grads[params.params2_at.z + image * C2 * C1 * K * K + e] = acc;
        } else {
            let c = e - C2 * C1 * K * K;
            for (var i = 0u; i < O2 * O2; i++) {
                acc += scratch[c * O2 * O2 + i];
            }
            grads[params.params2_at.w + image * C2 + c] = acc;
        }
    }
    workgroupBarrier();
    // pooled1's gradient (conv2's input gradient), written out; masked by conv1's ReLU at each
    // window's argmax for conv1's weight gradient; and the argmax's place in its plane, into p1
    // (free now; below 784, exact in f32), for that sum.
    for (var j = lid; j < POOLED1; j += WG) {
        let ci = j / (S1 * S1);
        let iy = (j % (S1 * S1)) / S1;
        let ix = j % S1;
        // The taps that reach an output: ky in [max(0, iy - 9), min(4, iy)], likewise kx.
        let ky0 = select(0u, iy - (O2 - 1u), iy >= O2);
        let ky1 = min(K - 1u, iy);
        let kx0 = select(0u, ix - (O2 - 1u), ix >= O2);
        let kx1 = min(K - 1u, ix);
        var g = 0.0;
        for (var c = 0u; c < C2; c++) {
            for (var ky = ky0; ky <= ky1; ky++) {
                let row = params.params2_at.x + ((c * C1 + ci) * K + ky) * K;
                let d = c * O2 * O2 + (iy - ky) * O2 + ix;
                for (var kx = kx0; kx <= kx1; kx++) {
                    g += scratch[d - kx] * weights[row + kx];
                }
            }
        }
        acts[params.conv1_at.w + image * POOLED1 + j] = g;
        let arg = acts_u32[params.conv1_at.z + image * POOLED1 + j];
        dp1[j] = select(0.0, g, acts[params.conv1_at.x + arg] > 0.0);
        p1[j] = f32(arg - (image * C1 + ci) * S0 * S0);
    }
    workgroupBarrier();
    // The gathered image, zero-padded by 2, where conv2's output gradient was.
    for (var i = lid; i < PAD * PAD; i += WG) {
        let y = i32(i / PAD) - 2;
        let x = i32(i % PAD) - 2;
        var v = 0.0;
        if y >= 0 && y < i32(S0) && x >= 0 && x < i32(S0) {
            v = acts[params.input_at + image * S0 * S0 + u32(y) * S0 + u32(x)];
        }
        scratch[i] = v;
    }
    workgroupBarrier();
    // conv1's weight and bias gradients of this image: over each pooled position of the
    // channel, its gradient times the input under the tap at its argmax.
    if lid < C1 * K * K + C1 {
        var acc = 0.0;
        if lid < C1 * K * K {
            let c = lid / (K * K);
            let ky = (lid / K) % K;
            let kx = lid % K;
            for (var r = 0u; r < S1 * S1; r++) {
                let at = u32(p1[c * S1 * S1 + r]);
                acc += dp1[c * S1 * S1 + r] * scratch[(at / S0 + ky) * PAD + at % S0 + kx];
            }
            grads[params.params1_at.z + image * C1 * K * K + lid] = acc;
        } else {
            let c = lid - C1 * K * K;
            for (var r = 0u; r < S1 * S1; r++) {
                acc += dp1[c * S1 * S1 + r];
            }
            grads[params.params1_at.w + image * C1 + c] = acc;
        }
    }
}
