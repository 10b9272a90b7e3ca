//! The instruction set the fast CPU path runs with, and the GEMM call that honours it.
//!
//! By default the widest one the CPU has (AVX-512F, else AVX2 with FMA, else what the `gemm`
//! crate's own detection picks). `LENET_CPU_ISA=avx2` forces the AVX2+FMA kernels on an AVX-512
//! machine, so both can be measured and checked on one machine; `avx512` asks for AVX-512 and
//! is refused where the CPU lacks it; `auto` (or unset) detects.
//!
//! What is forced: every GEMM of the fast path (the `gemm` crate's AVX2 microkernels, 8 lanes,
//! instead of its AVX-512 ones, 16 lanes: the `gemm` crate detects once and cannot be told, so
//! [`gemm`] calls its generic driver with the chosen microkernels itself), and the fast path's
//! own vector loops (compiled once per instruction set). Elementwise code the compiler
//! vectorises for the baseline x86-64 (SSE2) is the same on both.
//!
//! Bits: a result is a function of the instruction set (the GEMM's register blocking, and so its
//! order of partial sums, differs between the AVX2 and the AVX-512 kernels), never of the thread
//! count. One more input in principle: a reduction longer than 512 (conv2's weight gradient over
//! a block of 8 images, 800 pixels; a linear layer's weight gradient at a batch above 512) is
//! summed in passes whose length the `gemm` crate derives from the L1 data cache's geometry
//! ([`gemm_pass`]). It is 512 for every L1 of 4 KiB a way and up to 32 ways, which covers the
//! x86 cores we know of; so the same instruction set gives the same bits on such machines.

use std::sync::OnceLock;

use anyhow::{bail, Result};

/// The environment variable that forces the instruction set.
pub const ISA_ENV: &str = "LENET_CPU_ISA";

/// An instruction set the fast path has kernels for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// x86-64 AVX-512F (16 f32 lanes, fused multiply-add).
    Avx512,
    /// x86-64 AVX2 with FMA (8 f32 lanes, fused multiply-add).
    Avx2,
    /// Neither (another architecture, or an x86-64 without AVX2): the `gemm` crate's own choice
    /// (NEON on aarch64, scalar otherwise) and plain Rust loops.
    Generic,
}

impl Isa {
    /// The name `LENET_CPU_ISA` takes, and the one the headers print.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "AVX-512",
            Isa::Avx2 => "AVX2+FMA",
            Isa::Generic => generic_name(),
        }
    }

    /// f32 lanes of one vector register.
    pub fn lanes(self) -> usize {
        match self {
            Isa::Avx512 => 16,
            Isa::Avx2 => 8,
            Isa::Generic => 4,
        }
    }

    /// Whether this CPU can run it.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Isa::Avx512 => is_x86_feature_detected!("avx512f") && Isa::Avx2.supported(),
                Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
                Isa::Generic => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Generic
        }
    }
}

fn generic_name() -> &'static str {
    if cfg!(target_arch = "aarch64") {
        "NEON"
    } else if cfg!(target_arch = "x86_64") {
        "SSE2"
    } else {
        "scalar"
    }
}

/// The widest instruction set this CPU has.
pub fn detected() -> Isa {
    [Isa::Avx512, Isa::Avx2].into_iter().find(|i| i.supported()).unwrap_or(Isa::Generic)
}

/// The instruction set `value` (of `LENET_CPU_ISA`) asks for: `None` or `auto` detects.
pub fn parse(value: Option<&str>) -> Result<Isa> {
    let Some(v) = value else { return Ok(detected()) };
    let isa = match v.trim().to_ascii_lowercase().as_str() {
        "" | "auto" => return Ok(detected()),
        "avx512" | "avx-512" | "avx512f" => Isa::Avx512,
        "avx2" => Isa::Avx2,
        _ => bail!("{ISA_ENV}={v:?}: expected avx2, avx512 or auto"),
    };
    if !isa.supported() {
        bail!("{ISA_ENV}={v:?}: this CPU has no {} (it has {})", isa.name(), detected().name());
    }
    Ok(isa)
}

static SELECTED: OnceLock<Result<Isa, String>> = OnceLock::new();

/// Chooses the instruction set for this process from `value` (`LENET_CPU_ISA`'s, which the
/// command line reads and passes here; the library reads no environment): `avx2`, `avx512` or
/// `auto`/`None` (the widest the CPU has). A bad value is kept, and [`check`] reports it when
/// the CPU path starts. Only the first choice counts (the ops must not change kernels mid-run):
/// `false` when one was made before.
pub fn select(value: Option<&str>) -> bool {
    SELECTED.set(parse(value).map_err(|e| format!("{e:#}"))).is_ok()
}

/// The choice [`select`] made, else the detected instruction set.
fn from_env() -> &'static Result<Isa, String> {
    SELECTED.get_or_init(|| Ok(detected()))
}

/// The instruction set of this process (`LENET_CPU_ISA`, read once), or the error that names a
/// bad value. The CPU backend and the bench call it first, so a bad value stops them with one
/// line before any op runs.
pub fn check() -> Result<Isa> {
    from_env().clone().map_err(anyhow::Error::msg)
}

/// The instruction set the ops run with: [`check`]'s, or the detected one where
/// `LENET_CPU_ISA` is bad (only code that skipped [`check`] gets there).
pub fn selected() -> Isa {
    from_env().clone().unwrap_or_else(|_| detected())
}

/// Whether `LENET_CPU_ISA` chose something other than the detected instruction set.
pub fn forced() -> bool {
    selected() != detected()
}

/// `gemm::gemm` for f32 with the microkernels of `isa` (see the module docs): dst[m x n] =
/// (read_dst ? dst : 0) + lhs[m x k] * rhs[k x n], alpha = beta = 1, single-threaded. Strides
/// are in elements, non-negative.
///
/// # Safety
/// Every index `(r, c)` of each operand, at its strides, must lie inside its allocation, and
/// dst must not alias lhs or rhs (as for `gemm::gemm`).
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_cs: isize,
    dst_rs: isize,
    read_dst: bool,
    lhs: *const f32,
    lhs_cs: isize,
    lhs_rs: isize,
    rhs: *const f32,
    rhs_cs: isize,
    rhs_rs: isize,
) {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Generic {
        // gemm::gemm's own first step: a column-oriented destination is computed as the
        // transposed product, which the microkernels prefer (the same call, so the same bits).
        let (m, n, dst_cs, dst_rs, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs) = if dst_cs < dst_rs {
            (n, m, dst_rs, dst_cs, rhs, rhs_rs, rhs_cs, lhs, lhs_rs, lhs_cs)
        } else {
            (m, n, dst_cs, dst_rs, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs)
        };
        macro_rules! call {
            ($simd:expr, $kernels:path, $lanes:expr) => {{
                use $kernels as kr;
                gemm_common::gemm::gemm_basic_generic::<
                    _,
                    f32,
                    $lanes,
                    { kr::MR_DIV_N * $lanes },
                    { kr::NR },
                    { kr::MR_DIV_N },
                    { kr::H_M },
                    { kr::H_N },
                >(
                    $simd,
                    m,
                    n,
                    k,
                    dst,
                    dst_cs,
                    dst_rs,
                    read_dst,
                    lhs,
                    lhs_cs,
                    lhs_rs,
                    rhs,
                    rhs_cs,
                    rhs_rs,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    |a, b, c| a * b + c,
                    &kr::UKR,
                    &kr::H_UKR,
                    false,
                    gemm_common::Parallelism::None,
                )
            }};
        }
        use gemm_common::simd::MixedSimd;
        match isa {
            Isa::Avx512 => {
                let simd = <gemm_common::simd::V4 as MixedSimd<f32, f32, f32, f32>>::try_new()
                    .expect("AVX-512 checked when it was selected");
                call!(simd, gemm_f32::microkernel::avx512f::f32, 16)
            }
            _ => {
                let simd = <gemm_common::simd::V3 as MixedSimd<f32, f32, f32, f32>>::try_new()
                    .expect("AVX2 and FMA checked when they were selected");
                call!(simd, gemm_f32::microkernel::fma::f32, 8)
            }
        }
        return;
    }
    let _ = isa;
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs,
        dst_rs,
        read_dst,
        lhs,
        lhs_cs,
        lhs_rs,
        rhs,
        rhs_cs,
        rhs_rs,
        1.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// The reduction pass length [`gemm`] uses for an m x n x k product (after its transposition
/// of a column-oriented destination): each output sums its k products in passes of this many,
/// each pass from zero in order and then added to the destination. The `gemm` crate's (0.19)
/// choice: k itself up to 512; beyond, a function of the L1 data cache's geometry (512 on x86
/// caches of 4 KiB a way, so passes of 400 for k = 800). Direct kernels that replace a GEMM call
/// this to keep its bits.
pub fn gemm_pass(isa: Isa, m: usize, n: usize, k: usize) -> usize {
    let (mr, nr) = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            use gemm_f32::microkernel::avx512f::f32 as kr;
            (kr::MR_DIV_N * 16, kr::NR)
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            use gemm_f32::microkernel::fma::f32 as kr;
            (kr::MR_DIV_N * 8, kr::NR)
        }
        _ => return k.min(512),
    };
    if m <= 64 && n <= 64 {
        k.min(512)
    } else {
        gemm_common::cache::kernel_params(m, n, k, mr, nr, std::mem::size_of::<f32>()).kc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_names_and_refusals() {
        assert_eq!(parse(None).unwrap(), detected());
        assert_eq!(parse(Some("auto")).unwrap(), detected());
        let e = parse(Some("sse9")).unwrap_err().to_string();
        assert!(e.contains("LENET_CPU_ISA=\"sse9\"") && e.contains("avx2, avx512 or auto"), "{e}");
        for (name, isa) in [("avx2", Isa::Avx2), ("AVX512", Isa::Avx512)] {
            match parse(Some(name)) {
                Ok(got) => assert_eq!(got, isa),
                Err(e) => {
                    assert!(!isa.supported());
                    assert!(e.to_string().contains("this CPU has no"), "{e}");
                }
            }
        }
    }

    /// The forced call of the detected instruction set is gemm::gemm's own call: the same bits,
    /// on operands in the layouts the fast path uses (row-major, transposed, accumulate).
    #[test]
    fn forced_gemm_is_gemm_crates_call_bit_for_bit() {
        let isa = detected();
        let (m, n, k) = (13, 37, 150);
        let lhs: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1013) as f32 / 1013.0 - 0.5).collect();
        let rhs: Vec<f32> = (0..k * n).map(|i| ((i * 104_729) % 997) as f32 / 997.0 - 0.5).collect();
        for (accumulate, lhs_t, dst_t) in [(false, false, false), (true, true, false), (false, false, true)] {
            let (lcs, lrs) = if lhs_t { (m as isize, 1) } else { (1, k as isize) };
            let (dcs, drs) = if dst_t { (m as isize, 1) } else { (1, n as isize) };
            let start: Vec<f32> = (0..m * n).map(|i| i as f32 * 0.01).collect();
            let (mut a, mut b) = (start.clone(), start);
            unsafe {
                gemm(
                    isa,
                    m,
                    n,
                    k,
                    a.as_mut_ptr(),
                    dcs,
                    drs,
                    accumulate,
                    lhs.as_ptr(),
                    lcs,
                    lrs,
                    rhs.as_ptr(),
                    1,
                    n as isize,
                );
                gemm::gemm(
                    m,
                    n,
                    k,
                    b.as_mut_ptr(),
                    dcs,
                    drs,
                    accumulate,
                    lhs.as_ptr(),
                    lcs,
                    lrs,
                    rhs.as_ptr(),
                    1,
                    n as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{accumulate} {lhs_t} {dst_t}"
            );
        }
    }

    /// Both x86 kernels compute the product (to f32 rounding), so forcing one cannot change
    /// what is computed; a planted error (one operand scaled by 1.01) is seen.
    #[test]
    fn each_supported_isa_computes_the_product() {
        let (m, n, k) = (9, 21, 40);
        let lhs: Vec<f32> = (0..m * k).map(|i| (i % 17) as f32 - 8.0).collect();
        let rhs: Vec<f32> = (0..k * n).map(|i| (i % 13) as f32 - 6.0).collect();
        let mut want = vec![0f32; m * n];
        for r in 0..m {
            for c in 0..n {
                want[r * n + c] = (0..k).map(|i| lhs[r * k + i] * rhs[i * n + c]).sum();
            }
        }
        for isa in [Isa::Avx512, Isa::Avx2, Isa::Generic].into_iter().filter(|i| i.supported()) {
            for scale in [1.0f32, 1.01] {
                let l: Vec<f32> = lhs.iter().map(|x| x * scale).collect();
                let mut got = vec![0f32; m * n];
                unsafe {
                    gemm(
                        isa,
                        m,
                        n,
                        k,
                        got.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        l.as_ptr(),
                        1,
                        k as isize,
                        rhs.as_ptr(),
                        1,
                        n as isize,
                    );
                }
                // Small integers: every product and partial sum is exact in f32.
                let exact = got == want;
                assert_eq!(exact, scale == 1.0, "{isa:?} at scale {scale}");
            }
        }
    }
}
