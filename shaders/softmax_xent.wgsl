// Softmax cross-entropy over a batch of logits: dlogits = (softmax - onehot) * scale (scale = 1/B
// from the host), mean loss and correct count reduced in a fixed order by one workgroup and
// written to the step's slot of the stats buffer.

struct Dims {
    batch: u32,
    classes: u32,
    // 1 / batch, as f32 bits
    scale_bits: u32,
    _pad: u32,
}

struct Step {
    index_offset: u32,
    stats_slot: u32,
    step_size: f32,
    bias_correction2_sqrt: f32,
}

struct Stat {
    loss: f32,
    correct: u32,
}

@group(0) @binding(0) var<storage, read> logits: array<f32>;
@group(0) @binding(1) var<storage, read> labels: array<u32>;
@group(0) @binding(3) var<storage, read_write> dlogits: array<f32>;
@group(0) @binding(4) var<storage, read_write> stats: array<Stat>;
@group(0) @binding(5) var<uniform> dims: Dims;
@group(1) @binding(0) var<uniform> step: Step;

const WG: u32 = 256u;
var<workgroup> sloss: array<f32, 256>;
var<workgroup> scorrect: array<u32, 256>;

@compute @workgroup_size(256)
fn softmax_xent(@builtin(local_invocation_index) lid: u32) {
    let classes = dims.classes;
    let scale = bitcast<f32>(dims.scale_bits);
    var loss = 0.0;
    var correct = 0u;
    for (var b = lid; b < dims.batch; b += WG) {
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
        correct += select(0u, 1u, arg == label);
        var sum = 0.0;
        for (var c = 0u; c < classes; c++) {
            sum += exp(logits[row + c] - mx);
        }
        loss += log(sum) - (logits[row + label] - mx);
        for (var c = 0u; c < classes; c++) {
            let p = exp(logits[row + c] - mx) / sum;
            let target_p = select(0.0, 1.0, c == label);
            dlogits[row + c] = (p - target_p) * scale;
        }
    }
    sloss[lid] = loss;
    scorrect[lid] = correct;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if lid < s {
            sloss[lid] += sloss[lid + s];
            scorrect[lid] += scorrect[lid + s];
        }
        workgroupBarrier();
    }
    if lid == 0u {
        stats[step.stats_slot] = Stat(sloss[0] / f32(dims.batch), scorrect[0]);
    }
}
