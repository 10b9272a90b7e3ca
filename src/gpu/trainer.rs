//! The GPU backend (placeholder while the kernels land).
pub struct GpuBackend;
