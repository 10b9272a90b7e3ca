// The fully connected head's whole training step in one dispatch (src/gpu/linear.rs): fc1 -> ReLU
// -> fc2 -> ReLU -> fc3 -> softmax cross-entropy, then back down to the gradient with respect to
// the head's input, with each layer's weight gradients as partial sums, one per workgroup.
//
// Workgroup w takes the images [w * group_images, (w + 1) * group_images) of the batch, four at
// a time (a round): the four images' activations stay in workgroup memory from one layer to the
// next, and each thread keeps one output of all four in a vec4, so a weight read from memory
// serves four images. What the backward pass and the tests need is also written out: each
// layer's output and output gradient, and the input gradient. After its last round the
// workgroup sums its own images' outer products (dout x input, in image order) into its
// partials of the weight gradients, reading back what it wrote (storageBarrier orders that).
//
// The tensors come packed, so that the kernel binds six storage buffers (WebGPU's default limit
// is eight): the parameters in `param`, the activations in `acts`, the gradients in `grad`,
// each tensor at an offset the host passes in `params`.
//
// Every loop runs over a bound fixed by `params` (a feature count, the group's images, a round's
// four images) or by a constant, with a counter that only grows: each terminates.

struct Params {
    batch: u32,
    f0: u32,
    f1: u32,
    f2: u32,
    f3: u32,
    group_images: u32,
    // the loss gradient's factor, 1/B from the host
    scale: f32,
    labels_at: u32,
    input_at: u32,
    dinput_at: u32,
    out1_at: u32,
    out2_at: u32,
    out3_at: u32,
    dout1_at: u32,
    dout2_at: u32,
    dout3_at: u32,
    w1_at: u32,
    b1_at: u32,
    w2_at: u32,
    b2_at: u32,
    w3_at: u32,
    b3_at: u32,
    dw1_at: u32,
    db1_at: u32,
    dw2_at: u32,
    db2_at: u32,
    dw3_at: u32,
    db3_at: u32,
}

@group(0) @binding(0) var<storage, read> param: array<f32>;
@group(0) @binding(1) var<storage, read_write> acts: array<f32>;
@group(0) @binding(2) var<storage, read_write> grad: array<f32>;
@group(0) @binding(3) var<storage, read> labels: array<u32>;
@group(0) @binding(4) var<storage, read_write> losses: array<f32>;
@group(0) @binding(5) var<storage, read_write> correct: array<u32>;
@group(0) @binding(6) var<uniform> params: Params;

// The largest features the workgroup memory below holds (src/gpu/linear.rs checks a
// shape against them): 4 x (400 + 2 x 128 + 2 x 96 + 16) floats = 13,696 bytes.
const F0: u32 = 400u;
const F1: u32 = 128u;
const F2: u32 = 96u;
const F3: u32 = 16u;
const WG: u32 = 256u;

// [feature][image of the round]: one vec4 per feature, the four images side by side.
var<workgroup> x: array<vec4<f32>, F0>;
var<workgroup> h1: array<vec4<f32>, F1>;
var<workgroup> h2: array<vec4<f32>, F2>;
var<workgroup> z: array<vec4<f32>, F3>;
var<workgroup> d2: array<vec4<f32>, F2>;
var<workgroup> d1: array<vec4<f32>, F1>;

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

fn relu4(v: vec4<f32>) -> vec4<f32> {
    return max(v, vec4<f32>(0.0));
}

// Zero where the ReLU's output h is not positive.
fn mask4(g: vec4<f32>, h: vec4<f32>) -> vec4<f32> {
    return select(vec4<f32>(0.0), g, h > vec4<f32>(0.0));
}

// Softmax cross-entropy of image b (round slot r, its logits in z[..][r]): the loss, whether the
// first largest logit is the label, and the logits' gradient (p - onehot) / B, into z.
fn xent(b: u32, r: u32) {
    let classes = params.f3;
    let label = labels[params.labels_at + b];
    var mx = z[0][r];
    var arg = 0u;
    for (var c = 1u; c < classes; c++) {
        if z[c][r] > mx {
            mx = z[c][r];
            arg = c;
        }
    }
    var sum = 0.0;
    for (var c = 0u; c < classes; c++) {
        sum += exp(z[c][r] - mx);
    }
    losses[step.stats_offset + b] = log(sum) - (z[label][r] - mx);
    correct[step.stats_offset + b] = select(0u, 1u, arg == label);
    for (var c = 0u; c < classes; c++) {
        let p = exp(z[c][r] - mx) / sum;
        let g = (p - select(0.0, 1.0, c == label)) * params.scale;
        z[c][r] = g;
        acts[params.dout3_at + b * classes + c] = g;
    }
}

// One layer's weight-gradient partial over the group's images [first, end): for each element
// of dweight [n_out, n_in] then dbias [n_out] owned by this thread, the sum over the images in
// order of dout[b, o] * input[b, k] (of dout[b, o] for the bias).
fn weight_partials(
    lid: u32,
    part: u32,
    first: u32,
    end: u32,
    n_in: u32,
    n_out: u32,
    dout_at: u32,
    input_at: u32,
    dw_at: u32,
    db_at: u32,
) {
    let weights = n_out * n_in;
    for (var e = lid; e < weights + n_out; e += WG) {
        var acc = 0.0;
        if e < weights {
            let o = e / n_in;
            let k = e % n_in;
            for (var b = first; b < end; b++) {
                acc += acts[dout_at + b * n_out + o] * acts[input_at + b * n_in + k];
            }
            grad[dw_at + part * weights + e] = acc;
        } else {
            let o = e - weights;
            for (var b = first; b < end; b++) {
                acc += acts[dout_at + b * n_out + o];
            }
            grad[db_at + part * n_out + o] = acc;
        }
    }
}

@compute @workgroup_size(256)
fn head_step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let f0 = params.f0;
    let f1 = params.f1;
    let f2 = params.f2;
    let f3 = params.f3;
    let part = wid.x;
    let first = min(part * params.group_images, params.batch);
    let end = min(first + params.group_images, params.batch);
    for (var b0 = first; b0 < end; b0 += 4u) {
        // The round's inputs: four loads go out before the stores that wait on them.
        for (var k = lid; k < f0; k += WG) {
            x[k] = load4(params.input_at, f0, k, b0, end);
        }
        workgroupBarrier();
        // fc1 + ReLU: one output of the four images per thread, two running sums (even and
        // odd inputs) to halve the chain of dependent adds.
        if lid < f1 {
            let row = params.w1_at + lid * f0;
            var a0 = vec4<f32>(0.0);
            var a1 = vec4<f32>(0.0);
            var k = 0u;
            for (; k + 1u < f0; k += 2u) {
                a0 += param[row + k] * x[k];
                a1 += param[row + k + 1u] * x[k + 1u];
            }
            if k < f0 {
                a0 += param[row + k] * x[k];
            }
            let h = relu4(a0 + a1 + param[params.b1_at + lid]);
            h1[lid] = h;
            store4(params.out1_at, f1, lid, b0, end, h);
        }
        workgroupBarrier();
        // fc2 + ReLU.
        if lid < f2 {
            let row = params.w2_at + lid * f1;
            var a0 = vec4<f32>(0.0);
            var a1 = vec4<f32>(0.0);
            var k = 0u;
            for (; k + 1u < f1; k += 2u) {
                a0 += param[row + k] * h1[k];
                a1 += param[row + k + 1u] * h1[k + 1u];
            }
            if k < f1 {
                a0 += param[row + k] * h1[k];
            }
            let h = relu4(a0 + a1 + param[params.b2_at + lid]);
            h2[lid] = h;
            store4(params.out2_at, f2, lid, b0, end, h);
        }
        workgroupBarrier();
        // fc3: the logits.
        if lid < f3 {
            let row = params.w3_at + lid * f2;
            var a = vec4<f32>(0.0);
            for (var k = 0u; k < f2; k++) {
                a += param[row + k] * h2[k];
            }
            let logits = a + param[params.b3_at + lid];
            z[lid] = logits;
            store4(params.out3_at, f3, lid, b0, end, logits);
        }
        workgroupBarrier();
        // The loss, and the logits' gradient in place of the logits.
        if lid < 4u && b0 + lid < end {
            xent(b0 + lid, lid);
        }
        workgroupBarrier();
        // fc2's output gradient: fc3's weights transposed, masked by fc2's ReLU.
        if lid < f2 {
            var g = vec4<f32>(0.0);
            for (var c = 0u; c < f3; c++) {
                g += param[params.w3_at + c * f2 + lid] * z[c];
            }
            let d = mask4(g, h2[lid]);
            d2[lid] = d;
            store4(params.dout2_at, f2, lid, b0, end, d);
        }
        workgroupBarrier();
        // fc1's output gradient.
        if lid < f1 {
            var g = vec4<f32>(0.0);
            for (var j = 0u; j < f2; j++) {
                g += param[params.w2_at + j * f1 + lid] * d2[j];
            }
            let d = mask4(g, h1[lid]);
            d1[lid] = d;
            store4(params.dout1_at, f1, lid, b0, end, d);
        }
        workgroupBarrier();
        // The head's input gradient (unmasked: the conv layer below applies its own ReLU).
        for (var k = lid; k < f0; k += WG) {
            var g0 = vec4<f32>(0.0);
            var g1 = vec4<f32>(0.0);
            var o = 0u;
            for (; o + 1u < f1; o += 2u) {
                g0 += param[params.w1_at + o * f0 + k] * d1[o];
                g1 += param[params.w1_at + (o + 1u) * f0 + k] * d1[o + 1u];
            }
            if o < f1 {
                g0 += param[params.w1_at + o * f0 + k] * d1[o];
            }
            store4(params.dinput_at, f0, k, b0, end, g0 + g1);
        }
        // The next round overwrites x, h1, ..., d1.
        workgroupBarrier();
    }
    // This workgroup's partials, from what it wrote above.
    storageBarrier();
    weight_partials(lid, part, first, end, f0, f1, params.dout1_at, params.input_at, params.dw1_at, params.db1_at);
    weight_partials(lid, part, first, end, f1, f2, params.dout2_at, params.out1_at, params.dw2_at, params.db2_at);
    weight_partials(lid, part, first, end, f2, f3, params.dout3_at, params.out2_at, params.dw3_at, params.db3_at);
}
