//! The GPU path: WGSL kernels driven through wgpu.
