// The optimizers' updates, one invocation per parameter element over a list of tensors (all
// of the network's in one dispatch when they share flat buffers). Each optimizer is one function
// here, named as it is on the command line, the twin of its `element` in src/optim/: it takes
// the parameter, the summed gradient, its states (in its order, `state0..`) and the step's
// scalars (in its order: the step uniform's opt0..opt7, computed in f64 on the host, as PyTorch
// does, and rounded once). The entry points `update_<optimizer>` that call them are written from
// the optimizers' list when the kernels are built (src/gpu/kernels.rs), one per optimizer, each
// binding only the states its optimizer keeps. A tensor's gradient may come as partial sums over
// parts of the batch (`partials` of them, each `len` long, from `grad_offset`): `element` adds
// them in order, so the kernels that write them need no pass of their own.

struct Params {
    // elements over all the tensors
    elements: u32,
    tensors: u32,
    _pad0: u32,
    _pad1: u32,
}

// #include tensors.wgsl

// The step's optimizer scalars, in the optimizer's order.
fn step_scalars() -> array<f32, 8> {
    return array<f32, 8>(step.opt0, step.opt1, step.opt2, step.opt3, step.opt4, step.opt5, step.opt6, step.opt7);
}

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

// torch.optim.Adam: m = lerp(m, g, 1-b1); v = b2*v + (1-b2)*g*g;
// p -= step_size * m / (sqrt(v)/bc2_sqrt + eps)
fn adam(p: ptr<function, f32>, g: f32, s: ptr<function, array<f32, 3>>, k: array<f32, 8>) {
    let step_size = k[0];
    let bias_correction2_sqrt = k[1];
    let one_minus_beta1 = k[2];
    let beta2 = k[3];
    let one_minus_beta2 = k[4];
    let eps = k[5];
    let m = (*s)[0] + one_minus_beta1 * (g - (*s)[0]);
    let v = (*s)[1] * beta2 + one_minus_beta2 * g * g;
    (*s)[0] = m;
    (*s)[1] = v;
    let denom = sqrt(v) / bias_correction2_sqrt + eps;
    *p = *p - step_size * (m / denom);
}

// torch.optim.SGD: g += wd*p (if wd != 0); buf = momentum*buf + g;
// g = nesterov ? g + momentum*buf : buf; p -= lr*g
fn sgd(p: ptr<function, f32>, grad: f32, s: ptr<function, array<f32, 3>>, k: array<f32, 8>) {
    let lr = k[0];
    let momentum = k[1];
    let weight_decay = k[2];
    let nesterov = k[3];
    var g = grad;
    if weight_decay != 0.0 {
        g += weight_decay * *p;
    }
    let buf = (*s)[0] * momentum + g;
    (*s)[0] = buf;
    var d = buf;
    if nesterov != 0.0 {
        d = g + momentum * buf;
    }
    *p = *p - lr * d;
}

// torch.optim.AdamW: p *= 1 - lr*wd (k[6]), then Adam.
fn adamw(p: ptr<function, f32>, g: f32, s: ptr<function, array<f32, 3>>, k: array<f32, 8>) {
    *p = *p * k[6];
    adam(p, g, s, k);
}

// torch.optim.RMSprop: g += wd*p; sq = alpha*sq + (1-alpha)*g*g; centered: ga = lerp(ga, g,
// 1-alpha), avg = sqrt(sq - ga*ga) + eps, else avg = sqrt(sq) + eps; momentum > 0:
// buf = momentum*buf + g/avg, p -= lr*buf; else p += (-lr*g)/avg.
// States: square_avg, momentum_buffer, grad_avg.
fn rmsprop(p: ptr<function, f32>, grad: f32, s: ptr<function, array<f32, 3>>, k: array<f32, 8>) {
    let lr = k[0];
    let alpha = k[1];
    let one_minus_alpha = k[2];
    let eps = k[3];
    let weight_decay = k[4];
    let momentum = k[5];
    let centered = k[6];
    var g = grad;
    if weight_decay != 0.0 {
        g += weight_decay * *p;
    }
    let square_avg = (*s)[0] * alpha + one_minus_alpha * g * g;
    (*s)[0] = square_avg;
    var avg: f32;
    if centered != 0.0 {
        // torch's lerp: self + w*(end - self) below w = 0.5, else end - (end - self)*(1 - w).
        var grad_avg: f32;
        if one_minus_alpha < 0.5 {
            grad_avg = (*s)[2] + one_minus_alpha * (g - (*s)[2]);
        } else {
            grad_avg = g - (g - (*s)[2]) * (1.0 - one_minus_alpha);
        }
        (*s)[2] = grad_avg;
        avg = sqrt(square_avg - grad_avg * grad_avg) + eps;
    } else {
        avg = sqrt(square_avg) + eps;
    }
    if momentum > 0.0 {
        let buf = (*s)[1] * momentum + g / avg;
        (*s)[1] = buf;
        *p = *p - lr * buf;
    } else {
        *p = *p + (-lr * g) / avg;
    }
}
