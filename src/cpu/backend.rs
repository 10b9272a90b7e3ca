//! The CPU backend: the generic [`OpsBackend`] on the fast CPU ops.

use anyhow::Result;

use super::Fast;
use crate::backend::OpsBackend;
use crate::data::Dataset;

/// Trains on the CPU with the fast ops: parameters and optimizer state in host memory,
/// activations and gradients reused across steps of the same batch size.
pub type CpuBackend = OpsBackend<Fast>;

impl OpsBackend<Fast> {
    /// A CPU backend that trains on `train`.
    pub fn new(train: &Dataset) -> Result<Self> {
        OpsBackend::with_ops(Fast::default(), "cpu", cpu_description(), train)
    }
}

/// "N threads of M available, AVX-512": the rayon pool's size and the widest vector unit
/// the GEMM uses.
pub fn cpu_description() -> String {
    let threads = rayon::current_num_threads();
    #[cfg(target_arch = "x86_64")]
    let simd = if is_x86_feature_detected!("avx512f") {
        "AVX-512"
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        "AVX2+FMA"
    } else {
        "SSE2"
    };
    #[cfg(target_arch = "aarch64")]
    let simd = "NEON";
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let simd = "scalar";
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    format!("{threads} threads of {cores} available, {simd}")
}
