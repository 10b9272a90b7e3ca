//! The GPU path: WGSL kernels driven through wgpu.

pub mod context;
pub mod kernels;
pub mod ops;
pub mod timing;
pub mod trainer;

pub use context::{list_adapters, AdapterSummary, GpuContext};
pub use trainer::GpuBackend;
