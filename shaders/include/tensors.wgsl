// The tensors the kernels bind, declared once: src/gpu/kernels.rs compiles these before each
// shader file that has the line `// #include tensors.wgsl`. A kernel's bind group holds only the
// bindings it uses (read from the WGSL, src/gpu/shader.rs) and Rust code binds them by name, so a
// file uses any of them, and each name, type and number is written here once. Every file that
// includes this defines its own `Params`.
//
// Numbers: a dispatch is labelled after the first buffer it writes (by number), so the buffers
// a kernel writes keep the order that names its work: `conv` before `gathered`, `dinput` before
// `dweight`, `dlogits` before `losses`, `param` before the states.

// The data set resident on the device and the step's batch: u8 pixels packed four to a u32
// (little-endian; image i starts at byte i * pixels), the class labels (the data set's when
// gathering, the batch's for the loss), the samples of every step of a chunk (this step's at
// step.index_offset), their shifts (dx, dy) in whole pixels, and lut[v] = v / 255 as the CPU
// computes it.
@group(0) @binding(0) var<storage, read> images: array<u32>;
@group(0) @binding(1) var<storage, read> labels: array<u32>;
@group(0) @binding(2) var<storage, read> indices: array<u32>;
@group(0) @binding(3) var<storage, read> shifts: array<i32>;
@group(0) @binding(4) var<storage, read> lut: array<f32>;

// A layer's input and parameters.
@group(0) @binding(5) var<storage, read> input: array<f32>;
@group(0) @binding(6) var<storage, read> weight: array<f32>;
@group(0) @binding(7) var<storage, read> bias: array<f32>;

// The backward pass's inputs: a conv layer's pooled gradient with its forward argmax and conv
// output; a fully connected layer's output gradient and the forward output of the layer that
// produced its `input` (for that ReLU's backward); the output layer's logits.
@group(0) @binding(8) var<storage, read> dpooled: array<f32>;
@group(0) @binding(9) var<storage, read> saved_argmax: array<u32>;
@group(0) @binding(10) var<storage, read> saved_conv: array<f32>;
@group(0) @binding(11) var<storage, read> dout: array<f32>;
@group(0) @binding(12) var<storage, read> relu_mask: array<f32>;
@group(0) @binding(13) var<storage, read> logits: array<f32>;

// Forward outputs: a conv layer's ReLU(conv + bias) [B, Cout, Ho, Wo], its 2x2 max-pool and the
// pool's argmax; a fully connected layer's output [B, Out]; the gathered batch [B, rows, cols]
// and its labels.
@group(0) @binding(14) var<storage, read_write> conv: array<f32>;
@group(0) @binding(15) var<storage, read_write> pooled: array<f32>;
@group(0) @binding(16) var<storage, read_write> argmax: array<u32>;
@group(0) @binding(17) var<storage, read_write> out: array<f32>;
@group(0) @binding(18) var<storage, read_write> gathered: array<f32>;
@group(0) @binding(19) var<storage, read_write> batch_labels: array<u32>;

// The fused family's packed tensors (src/gpu/conv.rs, linear.rs): the parameters, a step's
// activations (the f32 ones, then the labels and argmaxes), the gradients' partial sums, each
// tensor at the offset its kernel's `Params` gives. Before the other gradients: the family's
// dispatches are labelled after their activations.
@group(0) @binding(20) var<storage, read> weights: array<f32>;
@group(0) @binding(21) var<storage, read_write> acts: array<f32>;
@group(0) @binding(22) var<storage, read_write> acts_u32: array<u32>;
@group(0) @binding(23) var<storage, read_write> grads: array<f32>;

// Gradients: a conv output's (the naive kernels route the pooled one through it), then the
// layer's input, weight and bias gradients (or partial sums of them), then the output layer's
// logit gradients, per-image losses and correct flags (at step.stats_offset).
@group(0) @binding(24) var<storage, read_write> dconv: array<f32>;
@group(0) @binding(25) var<storage, read_write> dinput: array<f32>;
@group(0) @binding(26) var<storage, read_write> dweight: array<f32>;
@group(0) @binding(27) var<storage, read_write> dbias: array<f32>;
@group(0) @binding(28) var<storage, read_write> dlogits: array<f32>;
@group(0) @binding(29) var<storage, read_write> losses: array<f32>;
@group(0) @binding(30) var<storage, read_write> correct: array<u32>;

// The including file's shape and settings.
@group(0) @binding(31) var<uniform> params: Params;

// The optimizers' tensor list (where each tensor lives: the dispatch's elements start..start+len
// are its elements, its parameters at param_offset in `param` and the state buffers, its
// gradient's partials at grad_offset, each len long), the summed gradients, the parameters and
// the optimizer's states in its order (Adam: m, v; SGD: the momentum buffer; ...).
struct Tensor {
    start: u32,
    len: u32,
    param_offset: u32,
    grad_offset: u32,
    partials: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(32) var<storage, read> tensors: array<Tensor>;
@group(0) @binding(33) var<storage, read> grad: array<f32>;
@group(0) @binding(34) var<storage, read_write> param: array<f32>;
@group(0) @binding(35) var<storage, read_write> state0: array<f32>;
@group(0) @binding(36) var<storage, read_write> state1: array<f32>;
@group(0) @binding(37) var<storage, read_write> state2: array<f32>;
