//! The GPU path: WGSL kernels driven through wgpu. [`GpuOps`] implements the op seam
//! ([`crate::ops::Ops`]); [`GpuBackend`] trains with it, replaying a recorded step.
//!
//! One file per layer kind owns its kernels' bindings and grids: [`conv`], [`linear`] (the
//! fully connected layers and the loss) and [`optim`]; [`variant`] is the one table of kernel
//! choices, and [`alternatives`] binds the named alternatives' kernels (`mixed`, `v3`).

pub mod alternatives;
pub mod context;
pub mod conv;
pub mod kernels;
pub mod linear;
pub mod ops;
pub mod optim;
pub mod shader;
pub mod timing;
pub mod trainer;
pub mod variant;

pub use context::{list_adapters, AdapterSummary, GpuContext, GpuOptions};
pub use ops::GpuOps;
pub use trainer::GpuBackend;
pub use variant::Variant;
