//! The CPU's measured arithmetic peak: a tight loop of independent vector FMAs in the
//! instruction set the fast path runs with, on one thread and on every thread of the pool at
//! once. The bench divides each CPU row's GFLOP/s by it.

use std::time::Instant;

use crate::cpu::isa::Isa;

/// Independent accumulators (vector registers) of the loop: more than an FMA's latency times
/// the FMA ports (4 cycles x 2 ports on current x86 cores), so the loop is throughput-bound.
const CHAINS: usize = 12;

/// What the loop reached.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Peak {
    /// The instruction set of the loop (the one the fast path uses).
    pub isa: String,
    /// GFLOP/s on one thread (2 FLOPs per FMA).
    pub gflops_core: f64,
    /// GFLOP/s with every thread of the rayon pool running the loop at once.
    pub gflops_all: f64,
    pub threads: usize,
}

/// Trials of each measurement; the fastest counts (a neighbour's load only slows a trial).
const TRIALS: usize = 5;

/// Measures the peak of `isa`, spending about `seconds` on each of the two measurements (the
/// best of `TRIALS` trials each).
pub fn measure(isa: Isa, seconds: f64) -> Peak {
    let lanes = isa.lanes();
    // Calibrate: iterations that take about `seconds / TRIALS` on one thread.
    let mut iters = 1u64 << 14;
    let per_iter = loop {
        let t = Instant::now();
        std::hint::black_box(fma_loop(isa, iters));
        let e = t.elapsed().as_secs_f64();
        if e > 0.005 || iters > 1 << 34 {
            break e / iters as f64;
        }
        iters *= 4;
    };
    let iters = ((seconds / TRIALS as f64 / per_iter) as u64).max(1);
    let flops = |threads: usize| (threads as u64 * iters * (CHAINS * lanes * 2) as u64) as f64;
    let best = |run: &dyn Fn()| {
        (0..TRIALS)
            .map(|_| {
                let t = Instant::now();
                run();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let core = flops(1)
        / best(&|| {
            std::hint::black_box(fma_loop(isa, iters));
        })
        * 1e-9;
    let threads = rayon::current_num_threads();
    let all = flops(threads)
        / best(&|| {
            rayon::broadcast(|_| std::hint::black_box(fma_loop(isa, iters)));
        })
        * 1e-9;
    Peak { isa: isa.name().into(), gflops_core: core, gflops_all: all, threads }
}

/// `iters` rounds of CHAINS vector FMAs of `isa`'s width; returns a value that depends on all
/// of them (so none is optimised away).
fn fma_loop(isa: Isa, iters: u64) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `isa` was checked against the CPU when it was selected.
        match isa {
            Isa::Avx512 => unsafe { fma_loop_avx512(iters) },
            Isa::Avx2 => unsafe { fma_loop_avx2(iters) },
            Isa::Generic => fma_loop_lanes::<4>(iters),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        fma_loop_lanes::<4>(iters)
    }
}

// The x86 loops in intrinsics: written as array loops, the compiler turned the accumulators
// into memory traffic instead of registers. One macro writes both widths.
#[cfg(target_arch = "x86_64")]
macro_rules! fma_loop_x86 {
    ($name:ident, $features:literal, $set1:ident, $fmadd:ident, $sum:expr) => {
        #[target_feature(enable = $features)]
        unsafe fn $name(iters: u64) -> f32 {
            use std::arch::x86_64::*;
            let m = $set1(std::hint::black_box(0.999));
            let c = $set1(std::hint::black_box(1e-3));
            let mut acc = [$set1(0.5); CHAINS];
            for _ in 0..iters {
                for a in acc.iter_mut() {
                    *a = $fmadd(*a, m, c);
                }
            }
            acc.iter().map(|&a| $sum(a)).sum()
        }
    };
}

#[cfg(target_arch = "x86_64")]
fma_loop_x86!(
    fma_loop_avx512,
    "avx512f,avx2,fma",
    _mm512_set1_ps,
    _mm512_fmadd_ps,
    |a| _mm512_reduce_add_ps(a)
);
#[cfg(target_arch = "x86_64")]
fma_loop_x86!(fma_loop_avx2, "avx2,fma", _mm256_set1_ps, _mm256_fmadd_ps, |a: __m256| {
    let lanes: [f32; 8] = std::mem::transmute(a);
    lanes.iter().sum::<f32>()
});

/// The portable loop (4 lanes' worth of scalar FMAs; what the compiler makes of it).
fn fma_loop_lanes<const L: usize>(iters: u64) -> f32 {
    // acc = acc * m + c converges to c / (1 - m): no overflow, no denormals.
    let m = std::hint::black_box(0.999f32);
    let c = std::hint::black_box(1e-3f32);
    let mut acc = [[0.5f32; L]; CHAINS];
    for _ in 0..iters {
        for chain in acc.iter_mut() {
            for a in chain.iter_mut() {
                *a = a.mul_add(m, c);
            }
        }
    }
    acc.iter().flatten().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_is_positive_and_all_threads_are_not_below_one() {
        let p = measure(crate::cpu::isa::selected(), 0.02);
        assert!(p.gflops_core > 0.1 && p.gflops_core.is_finite(), "{p:?}");
        // Noisy (shared machine), but every thread together cannot be far below one thread.
        assert!(p.gflops_all > 0.5 * p.gflops_core, "{p:?}");
    }
}
