// Gather a batch from the resident data set: u8 pixels packed 4 per u32 (little-endian byte
// order, image i starting at byte i*pixels), chosen through an index buffer.
// input[b, p] = lut[pixel] where lut[v] = v / 255 computed on the host (bit-exact with the CPU),
// labels_out[b] = labels[indices[offset + b]].

struct Dims {
    batch: u32,
    pixels: u32,
    _pad0: u32,
    _pad1: u32,
}

struct Step {
    index_offset: u32,
    stats_slot: u32,
    step_size: f32,
    bias_correction2_sqrt: f32,
}

@group(0) @binding(0) var<storage, read> images: array<u32>;
@group(0) @binding(1) var<storage, read> labels: array<u32>;
@group(0) @binding(2) var<storage, read> indices: array<u32>;
@group(0) @binding(3) var<storage, read> lut: array<f32>;
@group(0) @binding(4) var<storage, read_write> out_input: array<f32>;
@group(0) @binding(5) var<storage, read_write> out_labels: array<u32>;
@group(0) @binding(6) var<uniform> dims: Dims;
@group(1) @binding(0) var<uniform> step: Step;

@compute @workgroup_size(256)
fn gather(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    if i >= dims.batch * dims.pixels {
        return;
    }
    let b = i / dims.pixels;
    let p = i % dims.pixels;
    let img = indices[step.index_offset + b];
    let byte_index = img * dims.pixels + p;
    let word = images[byte_index / 4u];
    let v = (word >> ((byte_index % 4u) * 8u)) & 255u;
    out_input[i] = lut[v];
    if p == 0u {
        out_labels[b] = labels[img];
    }
}
