// The fully connected head's whole training step in one dispatch (src/gpu/linear.rs): fc1 -> ReLU
// -> fc2 -> ReLU -> fc3 -> softmax cross-entropy, then back down to the gradient with respect to
// the head's input, with each layer's weight gradients as partial sums, one per workgroup.
//
// Workgroup w takes the images [w * group_images, (w + 1) * group_images) of the batch, four at
// a time (a round): the four images' activations stay in workgroup memory from one layer to the
// next, and each thread keeps one output of all four in a vec4, so a weight read from memory
// serves four images. What the backward pass and the tests need is also written out: each
// layer's output and output gradient, and the input gradient. At the end of each round the
// workgroup adds the round's outer products (dout x input over its four images, from workgroup
// memory) to its partials of the weight gradients.
//
// The tensors come packed, so that the kernel binds six storage buffers (WebGPU's default limit
// is eight): the parameters in `weights`, the activations in `acts`, the gradients in `grads`
// (shaders/include/tensors.wgsl), each tensor at an offset the host passes in `params`.
//
// Every loop runs over a bound fixed by `params` (a feature count, the group's images, a round's
// four images) or by a constant, with a counter that only grows: each terminates.

struct Params {
    batch: u32,
    group_images: u32,
    // the loss gradient's factor, 1/B from the host
    scale: f32,
    labels_at: u32,
    // the feature counts: the input's, then fc1's, fc2's and fc3's outputs
    features: vec4<u32>,
    // where each tensor starts in its packed buffer: the activations (the input, then fc1's,
    // fc2's and fc3's outputs), their gradients in the same order, then each layer's (fc1, fc2,
    // fc3) weight, bias, weight gradient, bias gradient
    acts_at: vec4<u32>,
    dacts_at: vec4<u32>,
    fc1_at: vec4<u32>,
    fc2_at: vec4<u32>,
    fc3_at: vec4<u32>,
}

// #include tensors.wgsl

const WG: u32 = 256u;

// The round's activations in workgroup memory: one vec4 per feature (the four images side by
// side), in regions at these offsets for the largest features they hold (src/gpu/linear.rs
// checks a shape against them): the inputs (400), fc1's outputs (128), fc2's (96), the logits
// then their gradient (16), fc2's output gradient, fc1's: 864 vec4s, 13,824 bytes.
const X: u32 = 0u;
const H1: u32 = 400u;
const H2: u32 = 528u;
const Z: u32 = 624u;
const D2: u32 = 640u;
const D1: u32 = 736u;
var<workgroup> wg: array<vec4<f32>, 864>;

// The vec4 of feature k of the round's images from [B, n] at `at`, images b0..b0+3 (zero past
// the group's end).
fn load4(at: u32, n: u32, k: u32, b0: u32, end: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if b0 < end { v.x = acts[at + b0 * n + k]; }
    if b0 + 1u < end { v.y = acts[at + (b0 + 1u) * n + k]; }
    if b0 + 2u < end { v.z = acts[at + (b0 + 2u) * n + k]; }
    if b0 + 3u < end { v.w = acts[at + (b0 + 3u) * n + k]; }
    return v;
}

// Writes feature k of the round's images to [B, n] at `at`.
fn store4(at: u32, n: u32, k: u32, b0: u32, end: u32, v: vec4<f32>) {
    if b0 < end { acts[at + b0 * n + k] = v.x; }
    if b0 + 1u < end { acts[at + (b0 + 1u) * n + k] = v.y; }
    if b0 + 2u < end { acts[at + (b0 + 2u) * n + k] = v.z; }
    if b0 + 3u < end { acts[at + (b0 + 3u) * n + k] = v.w; }
}

// Output `o` of a layer for the round's images: bias[o] + sum_k weight[o, k] * in[k] (then
// ReLU), its inputs at `in_at` in workgroup memory; two running sums (even and odd k) halve the
// chain of dependent adds.
fn dense(o: u32, in_at: u32, n_in: u32, w_at: u32, b_at: u32, relu: bool) -> vec4<f32> {
    let row = w_at + o * n_in;
    var a0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    var k = 0u;
    for (; k + 1u < n_in; k += 2u) {
        a0 += weights[row + k] * wg[in_at + k];
        a1 += weights[row + k + 1u] * wg[in_at + k + 1u];
    }
    if k < n_in {
        a0 += weights[row + k] * wg[in_at + k];
    }
    let a = a0 + a1 + weights[b_at + o];
    return select(a, max(a, vec4<f32>(0.0)), relu);
}

// Input `i`'s gradient for the round's images: sum_o weight[o, i] * dout[o], the output
// gradients at `d_at` in workgroup memory (the layer's weights transposed).
fn dense_t(i: u32, d_at: u32, n_out: u32, n_in: u32, w_at: u32) -> vec4<f32> {
    var g0 = vec4<f32>(0.0);
    var g1 = vec4<f32>(0.0);
    var o = 0u;
    for (; o + 1u < n_out; o += 2u) {
        g0 += weights[w_at + o * n_in + i] * wg[d_at + o];
        g1 += weights[w_at + (o + 1u) * n_in + i] * wg[d_at + o + 1u];
    }
    if o < n_out {
        g0 += weights[w_at + o * n_in + i] * wg[d_at + o];
    }
    return g0 + g1;
}

// Feature `o` of the round's images, kept for the next layer (at `wg_at` in workgroup memory)
// and written out (to [B, n] at `at`).
fn keep(o: u32, wg_at: u32, at: u32, n: u32, b0: u32, end: u32, v: vec4<f32>) {
    wg[wg_at + o] = v;
    store4(at, n, o, b0, end, v);
}

// Zero where the ReLU's output h is not positive.
fn mask4(g: vec4<f32>, h: vec4<f32>) -> vec4<f32> {
    return select(vec4<f32>(0.0), g, h > vec4<f32>(0.0));
}

// Softmax cross-entropy of image b (round slot r, its logits at Z): the loss, whether the
// first largest logit is the label, and the logits' gradient (p - onehot) / B, in their place.
fn xent(b: u32, r: u32) {
    let classes = params.features.w;
    let label = labels[params.labels_at + b];
    var mx = wg[Z][r];
    var arg = 0u;
    for (var c = 1u; c < classes; c++) {
        if wg[Z + c][r] > mx {
            mx = wg[Z + c][r];
            arg = c;
        }
    }
    var sum = 0.0;
    for (var c = 0u; c < classes; c++) {
        sum += exp(wg[Z + c][r] - mx);
    }
    losses[step.stats_offset + b] = log(sum) - (wg[Z + label][r] - mx);
    correct[step.stats_offset + b] = select(0u, 1u, arg == label);
    for (var c = 0u; c < classes; c++) {
        let p = exp(wg[Z + c][r] - mx) / sum;
        let g = (p - select(0.0, 1.0, c == label)) * params.scale;
        wg[Z + c][r] = g;
        acts[params.dacts_at.w + b * classes + c] = g;
    }
}

// One layer's weight-gradient partial, this round's share, from workgroup memory: for each
// element of dweight [n_out, n_in] then dbias [n_out] that this thread owns, the round's images'
// dout[o] . input[k] (their dout[o] summed, for the bias), the lanes of images past the group's
// end masked out. The group's first round stores it, each later one adds to it (in round
// order), and a workgroup without images stores zeros (`round`: 0, 1, or 2 for none).
fn round_partials(lid: u32, part: u32, round: u32, valid: vec4<f32>, n_in: u32, n_out: u32, d_at: u32, in_at: u32, dw_at: u32, db_at: u32) {
    let weights = n_out * n_in;
    for (var e = lid; e < weights + n_out; e += WG) {
        var at = db_at + part * n_out + e - weights;
        var v = 0.0;
        if e < weights {
            at = dw_at + part * weights + e;
            if round < 2u {
                v = dot(wg[d_at + e / n_in] * valid, wg[in_at + e % n_in]);
            }
        } else if round < 2u {
            v = dot(wg[d_at + e - weights], valid);
        }
        if round == 1u {
            v += grads[at];
        }
        grads[at] = v;
    }
}

@compute @workgroup_size(256)
fn head_step(inv: Invocation) {
    let lid = inv.lid;
    let f0 = params.features.x;
    let f1 = params.features.y;
    let f2 = params.features.z;
    let f3 = params.features.w;
    let part = workgroup_index(inv);
    let first = min(part * params.group_images, params.batch);
    let end = min(first + params.group_images, params.batch);
    for (var b0 = first; b0 < end; b0 += 4u) {
        // The round's inputs: four loads go out before the stores that wait on them.
        for (var k = lid; k < f0; k += WG) {
            wg[X + k] = load4(params.acts_at.x, f0, k, b0, end);
        }
        workgroupBarrier();
        // Each layer forward, one output of the four images per thread.
        if lid < f1 {
            keep(lid, H1, params.acts_at.y, f1, b0, end, dense(lid, X, f0, params.fc1_at.x, params.fc1_at.y, true));
        }
        workgroupBarrier();
        if lid < f2 {
            keep(lid, H2, params.acts_at.z, f2, b0, end, dense(lid, H1, f1, params.fc2_at.x, params.fc2_at.y, true));
        }
        workgroupBarrier();
        if lid < f3 {
            keep(lid, Z, params.acts_at.w, f3, b0, end, dense(lid, H2, f2, params.fc3_at.x, params.fc3_at.y, false));
        }
        workgroupBarrier();
        // The loss, and the logits' gradient in place of the logits.
        if lid < 4u && b0 + lid < end {
            xent(b0 + lid, lid);
        }
        workgroupBarrier();
        // Each layer's output gradient: the next layer's weights transposed, masked by the
        // layer's ReLU.
        if lid < f2 {
            keep(lid, D2, params.dacts_at.z, f2, b0, end, mask4(dense_t(lid, Z, f3, f2, params.fc3_at.x), wg[H2 + lid]));
        }
        workgroupBarrier();
        if lid < f1 {
            keep(lid, D1, params.dacts_at.y, f1, b0, end, mask4(dense_t(lid, D2, f2, f1, params.fc2_at.x), wg[H1 + lid]));
        }
        workgroupBarrier();
        // The head's input gradient (unmasked: the conv layer below applies its own ReLU).
        for (var k = lid; k < f0; k += WG) {
            store4(params.dacts_at.x, f0, k, b0, end, dense_t(k, D1, f1, f0, params.fc1_at.x));
        }
        workgroupBarrier();
        // This round's share of the weight gradients (what it leaves in workgroup memory).
        let valid = select(vec4<f32>(0.0), vec4<f32>(1.0), b0 + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(end));
        let round = select(1u, 0u, b0 == first);
        round_partials(lid, part, round, valid, f0, f1, D1, X, params.fc1_at.z, params.fc1_at.w);
        round_partials(lid, part, round, valid, f1, f2, D2, H1, params.fc2_at.z, params.fc2_at.w);
        round_partials(lid, part, round, valid, f2, f3, Z, H2, params.fc3_at.z, params.fc3_at.w);
        // The next round overwrites the workgroup's activations.
        workgroupBarrier();
    }
    if first == end {
        let none = vec4<f32>(0.0);
        round_partials(lid, part, 2u, none, f0, f1, D1, X, params.fc1_at.z, params.fc1_at.w);
        round_partials(lid, part, 2u, none, f1, f2, D2, H1, params.fc2_at.z, params.fc2_at.w);
        round_partials(lid, part, 2u, none, f2, f3, Z, H2, params.fc3_at.z, params.fc3_at.w);
    }
}
