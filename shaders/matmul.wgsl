// Fully connected layers: X [B, In], W [Out, In] (PyTorch layout), bias [Out], Y [B, Out].
// 16x16 output tiles per workgroup, operands staged through workgroup memory in 16-wide slices
// of the reduction axis. Each output is summed in a fixed order: deterministic, no atomics.

struct Dims {
    batch: u32,
    in_features: u32,
    out_features: u32,
    // forward: ReLU on the output; backward_input: multiply by (x2 > 0), ReLU-backward mask
    relu: u32,
}

const T: u32 = 16u;

@group(0) @binding(0) var<storage, read> x0: array<f32>;
@group(0) @binding(1) var<storage, read> x1: array<f32>;
@group(0) @binding(2) var<storage, read> x2: array<f32>;
@group(0) @binding(3) var<storage, read_write> y0: array<f32>;
@group(0) @binding(4) var<storage, read_write> y1: array<f32>;
@group(0) @binding(5) var<uniform> dims: Dims;

var<workgroup> ta: array<array<f32, 16>, 16>;
var<workgroup> tb: array<array<f32, 16>, 16>;

// y0[b, o] = x2[o] + sum_i x0[b, i] * x1[o, i]   (x0: inp, x1: weight, x2: bias)
// workgroup (x: o tile, y: b tile)
@compute @workgroup_size(16, 16)
fn linear_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let n_in = dims.in_features;
    let n_out = dims.out_features;
    let o0 = wid.x * T;
    let b0 = wid.y * T;
    let b = b0 + lid.y;
    let o = o0 + lid.x;
    var acc = 0.0;
    for (var k0 = 0u; k0 < n_in; k0 += T) {
        let kk = k0 + lid.x;
        // ta[row b][k], tb[row o][k]
        let rb = b0 + lid.y;
        ta[lid.y][lid.x] = select(0.0, x0[rb * n_in + kk], rb < dims.batch && kk < n_in);
        let ro = o0 + lid.y;
        tb[lid.y][lid.x] = select(0.0, x1[ro * n_in + kk], ro < n_out && kk < n_in);
        workgroupBarrier();
        for (var j = 0u; j < T; j++) {
            acc += ta[lid.y][j] * tb[lid.x][j];
        }
        workgroupBarrier();
    }
    if b < dims.batch && o < n_out {
        var v = x2[o] + acc;
        if dims.relu != 0u {
            v = max(v, 0.0);
        }
        y0[b * n_out + o] = v;
    }
}

// y0[b, i] = sum_o x0[b, o] * x1[o, i], times (x2[b, i] > 0) when dims.relu != 0
// (x0: dout, x1: weight, x2: the forward output of the layer feeding this one)
// workgroup (x: i tile, y: b tile)
@compute @workgroup_size(16, 16)
fn linear_backward_input(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let n_in = dims.in_features;
    let n_out = dims.out_features;
    let i0 = wid.x * T;
    let b0 = wid.y * T;
    let b = b0 + lid.y;
    let i = i0 + lid.x;
    var acc = 0.0;
    for (var k0 = 0u; k0 < n_out; k0 += T) {
        // ta[row b][o], tb[row o][i]
        let kx = k0 + lid.x;
        ta[lid.y][lid.x] = select(0.0, x0[b * n_out + kx], b < dims.batch && kx < n_out);
        let ky = k0 + lid.y;
        tb[lid.y][lid.x] = select(0.0, x1[ky * n_in + i], ky < n_out && i < n_in);
        workgroupBarrier();
        for (var j = 0u; j < T; j++) {
            acc += ta[lid.y][j] * tb[j][lid.x];
        }
        workgroupBarrier();
    }
    if b < dims.batch && i < n_in {
        let idx = b * n_in + i;
        if dims.relu != 0u && !(x2[idx] > 0.0) {
            acc = 0.0;
        }
        y0[idx] = acc;
    }
}

// y0[o, i] = sum_b x0[b, o] * x1[b, i]; the extra column i == In is the bias gradient
// y1[o] = sum_b x0[b, o] (an input column of ones), so one dispatch gives both in a fixed order.
// (x0: dout, x1: inp) workgroup (x: i tile over In + 1 columns, y: o tile)
@compute @workgroup_size(16, 16)
fn linear_backward_weight(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let n_in = dims.in_features;
    let n_out = dims.out_features;
    let i0 = wid.x * T;
    let o0 = wid.y * T;
    let o = o0 + lid.y;
    let i = i0 + lid.x;
    var acc = 0.0;
    for (var k0 = 0u; k0 < dims.batch; k0 += T) {
        // ta[row o][b] = dout[b, o]; tb[row b][i] = inp[b, i] (1 in the bias column)
        let bx = k0 + lid.x;
        let ro = o0 + lid.y;
        ta[lid.y][lid.x] = select(0.0, x0[bx * n_out + ro], bx < dims.batch && ro < n_out);
        let by = k0 + lid.y;
        var v = 0.0;
        if by < dims.batch {
            if i < n_in {
                v = x1[by * n_in + i];
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
            y0[o * n_in + i] = acc;
        } else if i == n_in {
            y1[o] = acc;
        }
    }
}
