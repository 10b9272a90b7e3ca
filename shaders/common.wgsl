// Prepended to every shader file (src/gpu/kernels.rs): the per-step uniform. A training chunk
// holds one slot per step, bound at a dynamic offset; the kernels that read `step` take their
// batch, their statistics slot and the optimizer's scalars from it, so one recorded program
// serves every step. `StepUniform` in src/gpu/kernels.rs mirrors this struct (checked by name
// and offset when the kernels are built).

struct Step {
    // Where this step's sample indices start in the index buffer (its shifts: twice that).
    index_offset: u32,
    // Where this step's per-image losses and correct flags go.
    stats_offset: u32,
    // The optimizer's scalars of this step, in its own order (src/optim/: each optimizer's
    // `scalars`; its WGSL function in optim.wgsl names them).
    opt0: f32,
    opt1: f32,
    opt2: f32,
    opt3: f32,
    opt4: f32,
    opt5: f32,
    opt6: f32,
    opt7: f32,
}

@group(1) @binding(0) var<uniform> step: Step;

// The flat index of this invocation over a grid that may spread over x and y (more workgroups
// than one dimension allows): wid.x + wid.y * nwg.x workgroups of `size` invocations before it.
fn flat_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32, size: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * size + lid;
}

// Where an invocation of a one-dimensional workgroup stands in a grid that may spread over x and
// y: the entry points' one argument, `fn name(inv: Invocation)`.
struct Invocation {
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
}

// The workgroup's flat index over the grid (a workgroup per image, tile or group).
fn workgroup_index(inv: Invocation) -> u32 {
    return inv.wid.x + inv.wid.y * inv.nwg.x;
}

// The invocation's flat index over the grid, workgroups of `size` (an element per invocation).
fn invocation_index(inv: Invocation, size: u32) -> u32 {
    return flat_index(inv.wid, inv.nwg, inv.lid, size);
}
