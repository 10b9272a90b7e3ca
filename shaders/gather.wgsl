// The batch, gathered from the data set resident on the device: u8 pixels packed four to a u32
// (little-endian; image i starts at byte i * pixels), picked through the step's index buffer and
// translated by whole pixels (zero-filled): gathered[b][y][x] = lut[image[y - dy][x - dx]], where
// lut[v] = v / 255 as the CPU computes it (bit-exact) and (dx, dy) = shifts[2b], shifts[2b + 1].

struct Params {
    batch: u32,
    rows: u32,
    cols: u32,
    _pad: u32,
}

// #include tensors.wgsl

// The pixel (y, x) of batch image b after its shift, as pixels / 255.
fn gathered_pixel(b: u32, y: u32, x: u32) -> f32 {
    let img = indices[step.index_offset + b];
    let sy = i32(y) - shifts[2u * (step.index_offset + b) + 1u];
    let sx = i32(x) - shifts[2u * (step.index_offset + b)];
    if sy < 0 || sy >= i32(params.rows) || sx < 0 || sx >= i32(params.cols) {
        return 0.0;
    }
    let byte_index = img * params.rows * params.cols + u32(sy) * params.cols + u32(sx);
    let word = images[byte_index / 4u];
    return lut[(word >> ((byte_index % 4u) * 8u)) & 255u];
}

// One invocation per pixel of the batch.
@compute @workgroup_size(256)
fn gather(inv: Invocation) {
    let i = invocation_index(inv, 256u);
    let pixels = params.rows * params.cols;
    if i >= params.batch * pixels {
        return;
    }
    let b = i / pixels;
    let p = i % pixels;
    gathered[i] = gathered_pixel(b, p / params.cols, p % params.cols);
    if p == 0u {
        batch_labels[b] = labels[indices[step.index_offset + b]];
    }
}
