//! The GPU path: WGSL kernels driven through wgpu. [`GpuOps`] implements the op seam
//! ([`crate::ops::Ops`]); [`GpuBackend`] trains with it, replaying a recorded step.

pub mod context;
pub mod kernels;
pub mod ops;
pub mod shader;
pub mod timing;
pub mod trainer;
pub mod v1;
pub mod v2;
pub mod v3;

pub use context::{list_adapters, AdapterSummary, GpuContext};
pub use ops::GpuOps;
pub use trainer::GpuBackend;
pub use v2::{Generation, Variant};
