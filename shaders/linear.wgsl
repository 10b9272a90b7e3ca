// Fully connected layers, the naive kernels of lenet (src/gpu/linear.rs): X [B, In],
// W [Out, In] (PyTorch's layout), bias [Out], Y [B, Out]. 16x16 output tiles per workgroup,
// operands staged through workgroup memory in 16-wide slices of the reduction axis. Each output
// is summed in a fixed order: deterministic, no atomics. Then the output layer's softmax
// cross-entropy, at the end.

struct Params {
    batch: u32,
    in_features: u32,
    out_features: u32,
    // forward: ReLU on the output; backward input: zero where relu_mask <= 0
    relu: u32,
    // softmax_xent: the loss gradient's factor, 1/B from the host
    scale: f32,
}

const T: u32 = 16u;

// #include tensors.wgsl

var<workgroup> ta: array<array<f32, 16>, 16>;
var<workgroup> tb: array<array<f32, 16>, 16>;

// out[b, o] = bias[o] + sum_i input[b, i] * weight[o, i] (then ReLU); workgroup (x: o tile,
// y: b tile)
@compute @workgroup_size(16, 16)
fn linear_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let n_in = params.in_features;
    let n_out = params.out_features;
    let o0 = wid.x * T;
    let b0 = wid.y * T;
    let b = b0 + lid.y;
    let o = o0 + lid.x;
    var acc = 0.0;
    for (var k0 = 0u; k0 < n_in; k0 += T) {
        let kk = k0 + lid.x;
        let rb = b0 + lid.y;
        ta[lid.y][lid.x] = select(0.0, input[rb * n_in + kk], rb < params.batch && kk < n_in);
        let ro = o0 + lid.y;
        tb[lid.y][lid.x] = select(0.0, weight[ro * n_in + kk], ro < n_out && kk < n_in);
        workgroupBarrier();
        for (var j = 0u; j < T; j++) {
            acc += ta[lid.y][j] * tb[lid.x][j];
        }
        workgroupBarrier();
    }
    if b < params.batch && o < n_out {
        var v = bias[o] + acc;
        if params.relu != 0u {
            v = max(v, 0.0);
        }
        out[b * n_out + o] = v;
    }
}

// dinput[b, i] = sum_o dout[b, o] * weight[o, i], zero where relu_mask[b, i] <= 0 when
// params.relu; workgroup (x: i tile, y: b tile)
@compute @workgroup_size(16, 16)
fn linear_backward_input(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let n_in = params.in_features;
    let n_out = params.out_features;
    let i0 = wid.x * T;
    let b0 = wid.y * T;
    let b = b0 + lid.y;
    let i = i0 + lid.x;
    var acc = 0.0;
    for (var k0 = 0u; k0 < n_out; k0 += T) {
        let kx = k0 + lid.x;
        ta[lid.y][lid.x] = select(0.0, dout[b * n_out + kx], b < params.batch && kx < n_out);
        let ky = k0 + lid.y;
        tb[lid.y][lid.x] = select(0.0, weight[ky * n_in + i], ky < n_out && i < n_in);
        workgroupBarrier();
        for (var j = 0u; j < T; j++) {
            acc += ta[lid.y][j] * tb[j][lid.x];
        }
        workgroupBarrier();
    }
    if b < params.batch && i < n_in {
        let idx = b * n_in + i;
        if params.relu != 0u && !(relu_mask[idx] > 0.0) {
            acc = 0.0;
        }
        dinput[idx] = acc;
    }
}

// dweight[o, i] = sum_b dout[b, o] * input[b, i]; the extra column i == In is the bias gradient
// dbias[o] = sum_b dout[b, o] (an input column of ones), so one dispatch gives both in a fixed
// order. Workgroup (x: i tile over In + 1 columns, y: o tile)
@compute @workgroup_size(16, 16)
fn linear_backward_weight(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let n_in = params.in_features;
    let n_out = params.out_features;
    let i0 = wid.x * T;
    let o0 = wid.y * T;
    let o = o0 + lid.y;
    let i = i0 + lid.x;
    var acc = 0.0;
    for (var k0 = 0u; k0 < params.batch; k0 += T) {
        let bx = k0 + lid.x;
        let ro = o0 + lid.y;
        ta[lid.y][lid.x] = select(0.0, dout[bx * n_out + ro], bx < params.batch && ro < n_out);
        let by = k0 + lid.y;
        var v = 0.0;
        if by < params.batch {
            if i < n_in {
                v = input[by * n_in + i];
            } else if i == n_in {
                v = 1.0;
            }
        }
        tb[lid.y][lid.x] = v;
        workgroupBarrier();
        for (var j = 0u; j < T; j++) {
            acc += ta[lid.y][j] * tb[j][lid.x];
        }
        workgroupBarrier();
    }
    if o < n_out {
        if i < n_in {
            dweight[o * n_in + i] = acc;
        } else if i == n_in {
            dbias[o] = acc;
        }
    }
}

// Softmax cross-entropy, one invocation per image: the image's loss and whether its first
// largest logit is the label (written at the step's statistics slot; the host adds them up in a
// fixed order), and the gradient of the batch-mean loss: dlogits = (softmax - onehot) * scale.
@compute @workgroup_size(64)
fn softmax_xent(inv: Invocation) {
    let b = invocation_index(inv, 64u);
    if b >= params.batch {
        return;
    }
    let classes = params.out_features;
    let row = b * classes;
    let label = labels[b];
    var mx = logits[row];
    var arg = 0u;
    for (var c = 1u; c < classes; c++) {
        let z = logits[row + c];
        if z > mx {
            mx = z;
            arg = c;
        }
    }
    var sum = 0.0;
    for (var c = 0u; c < classes; c++) {
        sum += exp(logits[row + c] - mx);
    }
    losses[step.stats_offset + b] = log(sum) - (logits[row + label] - mx);
    correct[step.stats_offset + b] = select(0u, 1u, arg == label);
    for (var c = 0u; c < classes; c++) {
        let p = exp(logits[row + c] - mx) / sum;
        dlogits[row + c] = (p - select(0.0, 1.0, c == label)) * params.scale;
    }
}
