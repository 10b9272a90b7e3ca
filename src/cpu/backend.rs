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
        super::isa::check()?;
        OpsBackend::with_ops(Fast, "cpu", cpu_description(), train)
    }
}

/// "N threads of M available, AVX-512": the rayon pool's size (`RAYON_NUM_THREADS`, else the
/// cores this process may use: `available_parallelism`, which honours the affinity mask and a
/// cgroup's CPU quota) and the instruction set the ops run with, "(forced)" when
/// `LENET_CPU_ISA` chose a narrower one than the CPU has.
pub fn cpu_description() -> String {
    let threads = rayon::current_num_threads();
    let isa = super::isa::selected();
    let forced = if super::isa::forced() { " (forced by LENET_CPU_ISA)" } else { "" };
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let plural = if threads == 1 { "" } else { "s" };
    format!("{threads} thread{plural} of {cores} available, {}{forced}", isa.name())
}
