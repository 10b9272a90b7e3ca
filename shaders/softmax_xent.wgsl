// Softmax cross-entropy, one invocation per image: the image's loss and whether its first
// largest logit is the label (written at the step's statistics slot; the host adds them up in a
// fixed order), and the gradient of the batch-mean loss: dlogits = (softmax - onehot) * scale,
// scale = 1/B from the host.

struct Params {
    batch: u32,
    classes: u32,
    scale: f32,
    _pad: u32,
}

@group(0) @binding(0) var<storage, read> logits: array<f32>;
@group(0) @binding(1) var<storage, read> labels: array<u32>;
@group(0) @binding(2) var<storage, read_write> dlogits: array<f32>;
@group(0) @binding(3) var<storage, read_write> losses: array<f32>;
@group(0) @binding(4) var<storage, read_write> correct: array<u32>;
@group(0) @binding(5) var<uniform> params: Params;

@compute @workgroup_size(64)
fn softmax_xent(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let b = flat_index(wid, nwg, lid, 64u);
    if b >= params.batch {
        return;
    }
    let classes = params.classes;
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
