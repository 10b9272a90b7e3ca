// The optimizers' updates, one invocation per parameter element over a list of tensors (all
// of the network's in one dispatch when they share flat buffers), exactly as
// src/cpu/reference.rs computes them. A tensor's gradient may come as partial sums over parts
// of the batch (`partials` of them, each `len` long, from `grad_offset`): they are added here in
// order, so the kernels that write them need no pass of their own. The step's scalars come from
// the step uniform (computed in f64 on the host, as PyTorch does, and rounded once).

struct Params {
    // elements over all the tensors
    elements: u32,
    tensors: u32,
    _pad0: u32,
    _pad1: u32,
}

// Where one tensor lives: the dispatch's elements start..start+len are its elements.
struct Tensor {
    start: u32,
    len: u32,
    // offset of its parameters (and moments) in `param` (and the moment buffers)
    param_offset: u32,
    grad_offset: u32,
    partials: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> tensors: array<Tensor>;
@group(0) @binding(1) var<storage, read> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> param: array<f32>;
// Adam's m, or SGD's momentum buffer
@group(0) @binding(3) var<storage, read_write> moment1: array<f32>;
// Adam's v
@group(0) @binding(4) var<storage, read_write> moment2: array<f32>;
@group(0) @binding(5) var<uniform> params: Params;

// A dispatch element's parameter index and summed gradient.
struct Element {
    index: u32,
    grad: f32,
}

fn element(e: u32) -> Element {
    var t = 0u;
    while t + 1u < params.tensors && e >= tensors[t].start + tensors[t].len {
        t++;
    }
    let info = tensors[t];
    let j = e - info.start;
    // The partials are added in order, one at a time; their loads go out eight at a time, so
    // the sum waits on memory partials / 8 times rather than once per partial (with 128 of them
    // that wait was most of the update on the H100).
    let at = info.grad_offset + j;
    let stride = info.len;
    var g = grad[at];
    var k = 1u;
    for (; k + 8u <= info.partials; k += 8u) {
        let p = at + k * stride;
        let p0 = grad[p];
        let p1 = grad[p + stride];
        let p2 = grad[p + 2u * stride];
        let p3 = grad[p + 3u * stride];
        let p4 = grad[p + 4u * stride];
        let p5 = grad[p + 5u * stride];
        let p6 = grad[p + 6u * stride];
        let p7 = grad[p + 7u * stride];
        g = ((((((((g + p0) + p1) + p2) + p3) + p4) + p5) + p6) + p7);
    }
    for (; k < info.partials; k++) {
        g += grad[at + k * stride];
    }
    return Element(info.param_offset + j, g);
}

// m = lerp(m, g, 1-b1); v = b2*v + (1-b2)*g*g; p -= step_size * m / (sqrt(v)/bc2_sqrt + eps)
@compute @workgroup_size(256)
fn adam(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = flat_index(wid, nwg, lid, 256u);
    if e >= params.elements {
        return;
    }
    let el = element(e);
    let i = el.index;
    let g = el.grad;
    let m = moment1[i] + step.one_minus_beta1 * (g - moment1[i]);
    let v = moment2[i] * step.beta2 + step.one_minus_beta2 * g * g;
    moment1[i] = m;
    moment2[i] = v;
    let denom = sqrt(v) / step.bias_correction2_sqrt + step.eps;
    param[i] = param[i] - step.step_size * (m / denom);
}

// g += wd*p (if wd != 0); buf = momentum*buf + g; g = nesterov ? g + momentum*buf : buf; p -= lr*g
@compute @workgroup_size(256)
fn sgd(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = flat_index(wid, nwg, lid, 256u);
    if e >= params.elements {
        return;
    }
    let el = element(e);
    let i = el.index;
    var g = el.grad;
    if step.weight_decay != 0.0 {
        g += step.weight_decay * param[i];
    }
    let buf = moment1[i] * step.momentum + g;
    moment1[i] = buf;
    var d = buf;
    if step.nesterov != 0u {
        d = g + step.momentum * buf;
    }
    param[i] = param[i] - step.lr * d;
}
