//! The fast CPU path: twins of the reference functions in [`super::reference`] with the same
//! signatures and the same results up to f32 rounding, and [`Fast`], the [`Ops`]
//! implementation the CPU backend trains with (tests/ops.rs checks it against the reference).
//!
//! How: a training step in four parallel passes over fixed blocks of images or rows: the trunk
//! forward (each block of 8 images gathered, through conv1 and conv2 with their ReLU and
//! max-pool), the head (each block of 32 rows forward through fc1, fc2, fc3, the loss and back,
//! then the three weight gradients), the trunk backward (each block through conv2's backward and
//! then conv1's), the optimizer's one vectorised pass. The convolutions' forward passes and
//! weight gradients are direct FMA kernels in the order of the GEMM they replace (the same
//! bits); conv2's input gradient is a GEMM and col2im. The GEMMs are the `gemm` crate's AVX-512
//! or AVX2 microkernels, as [`super::isa`] selects (`LENET_CPU_ISA`); the direct kernels are
//! written over the `lanes` module's vector types, since array loops compiled to spills and scalar FMAs.
//! Max-pool with selects instead of branches; ReLU fused into the layer before it (and into the
//! pool's backward). Each fused pass computes exactly what the per-layer ops it replaces compute
//! (tests/ops.rs runs both), in the same blocks.
//!
//! Determinism: every output element is computed by one task with a reduction order that
//! depends only on the shapes, never on the thread count or on scheduling. Work is split into
//! fixed blocks (a function of the shape alone); GEMMs run single-threaded inside a block;
//! weight gradients that sum over the batch are reduced per fixed block of images into partial
//! buffers, which are then added in block order.
//!
//! Scratch space (im2col buffers, partial sums) lives in thread-local vectors that grow once, so
//! these ops do not allocate per step (the `gemm` crate keeps a small per-call bookkeeping
//! vector of its own).

use std::cell::RefCell;

use rayon::prelude::*;

use anyhow::{ensure, Result};

use super::reference::{partials, XentRows};
use crate::data::Dataset;
use crate::ops::*;
use crate::optim;

thread_local! {
    /// im2col / col2im buffer of the current thread.
    static COL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// A zero-bordered copy of one image, for im2col with padding.
    static PAD: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// A block of images' outputs or output gradients as one [C, images*HW] matrix.
    static GATHER: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// One block of images' output gradient pixel-major (see [`pixel_major_from_pool`]).
    static PIXELS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// One block of images' output gradient, scattered from the pool's argmaxes.
    static DCONV: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Per-block partial weight gradients, used by the thread that calls a backward-weight op.
    static PARTIALS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

fn with_buffer<R>(
    key: &'static std::thread::LocalKey<RefCell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    key.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        f(&mut buf[..len])
    })
}

/// A strided view of a matrix inside a slice: element (r, c) is `data[r*rs + c*cs]`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

/// dst[m x n] (row stride `dst_rs`, unit column stride) = (accumulate ? dst : 0) + lhs[m x k] *
/// rhs[k x n], single-threaded. Bounds are checked here so that the unsafe call stays in range.
#[allow(clippy::too_many_arguments)]
fn matmul(
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: View,
    rhs: View,
    m: usize,
    n: usize,
    k: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(last(m, n, dst_rs, 1) < dst.len());
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..][..n].fill(0.0);
            }
        }
        return;
    }
    assert!(last(m, k, lhs.rs, lhs.cs) < lhs.data.len());
    assert!(last(k, n, rhs.rs, rhs.cs) < rhs.data.len());
    // SAFETY: every index the GEMM touches is inside the slices (checked above); dst does not
    // alias lhs or rhs (it is a unique borrow).
    unsafe {
        super::isa::gemm(
            current_isa(),
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
        );
    }
}

#[cfg(test)]
thread_local! {
    /// Unit tests' choice of instruction set for this thread's GEMMs.
    static TEST_ISA: std::cell::Cell<Option<super::isa::Isa>> = const { std::cell::Cell::new(None) };
}

/// The instruction set of the GEMMs: the process's (`LENET_CPU_ISA`), or in unit tests the one
/// a test chose for its thread.
fn current_isa() -> super::isa::Isa {
    #[cfg(test)]
    if let Some(isa) = TEST_ISA.with(|t| t.get()) {
        return isa;
    }
    super::isa::selected()
}

/// Number of images per block for batch reductions: at most 8 blocks, a function of the batch
/// size only, so the reduction order never depends on the machine.
fn reduction_block(batch: usize) -> usize {
    batch.div_ceil(8).max(1)
}

/// Images per GEMM in the convolutions: the im2col matrix of a block of images is one wide
/// matrix (~0.5 MB for LeNet's layers), so each GEMM has a long dimension to stream over.
const CONV_BLOCK: usize = 8;

/// dst = src for the short rows of im2col. `copy_from_slice` calls memmove, which costs more
/// than the copy for rows of 5 to 28 floats; fixed-size chunks compile to plain vector moves.
#[inline(always)]
fn copy_short(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len());
    let mut d = dst.chunks_exact_mut(8);
    let mut s = src.chunks_exact(8);
    for (d, s) in (&mut d).zip(&mut s) {
        let d: &mut [f32; 8] = d.try_into().unwrap();
        *d = s.try_into().unwrap();
    }
    let (mut d, mut s) = (d.into_remainder(), s.remainder());
    if d.len() >= 4 {
        let (d4, dr) = d.split_at_mut(4);
        let d4: &mut [f32; 4] = d4.try_into().unwrap();
        *d4 = s[..4].try_into().unwrap();
        (d, s) = (dr, &s[4..]);
    }
    for (d, &s) in d.iter_mut().zip(s) {
        *d = s;
    }
}

/// [`sum_fixed`] of the concatenation of `parts`, each a whole number of 16 values (so that the
/// accumulators see the same values in the same order), without copying them together.
fn sum_fixed_images<'a>(parts: impl Iterator<Item = &'a [f32]>) -> f32 {
    let mut acc = [0f32; 16];
    for part in parts {
        assert!(part.len().is_multiple_of(16), "sum_fixed_images: a part of {} values", part.len());
        for c in part.chunks_exact(16) {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += v;
            }
        }
    }
    let mut total = std::iter::empty::<f32>().sum::<f32>();
    for a in acc {
        total += a;
    }
    total
}

/// Sum with 16 independent accumulators, combined in a fixed order: vectorisable (a plain f32
/// sum is a serial chain) and still the same bits on every run.
fn sum_fixed(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    let mut total = rest.iter().sum::<f32>();
    for a in acc {
        total += a;
    }
    total
}

/// col[(ci*K + ky)*K + kx, y*Wo + x] = inp[ci, y+ky-pad, x+kx-pad] (zero outside), for one
/// image; row r of col starts at `r * ld`. With padding, each row of col is written as its
/// zeros and one copy of the source row's part in range: no padded copy of the image.
fn im2col(col: &mut [f32], ld: usize, inp: &[f32], s: &ConvShape) {
    let p = s.padding;
    if p == 0 {
        return im2col_unpadded(col, ld, inp, s.in_channels, s.height, s.width, s);
    }
    let (h, w, k) = (s.height, s.width, s.kernel);
    let (ho, wo) = (s.out_height(), s.out_width());
    if (w, wo, k, p) == (28, 28, 5, 2) {
        return im2col_same28(col, ld, inp, s.in_channels, h, ho);
    }
    for ci in 0..s.in_channels {
        let plane = &inp[ci * h * w..][..h * w];
        for ky in 0..k {
            for kx in 0..k {
                let row = &mut col[((ci * k + ky) * k + kx) * ld..][..ho * wo];
                // Output columns x whose source column x + kx - p is inside the image.
                let x0 = p.saturating_sub(kx).min(wo);
                let x1 = (w + p).saturating_sub(kx).clamp(x0, wo);
                for (y, dst) in row.chunks_exact_mut(wo).enumerate() {
                    let sy = (y + ky).wrapping_sub(p);
                    if sy >= h {
                        dst.fill(0.0);
                        continue;
                    }
                    dst[..x0].fill(0.0);
                    if x1 > x0 {
                        copy_short(&mut dst[x0..x1], &plane[sy * w + x0 + kx - p..][..x1 - x0]);
                    }
                    dst[x1..].fill(0.0);
                }
            }
        }
    }
}

/// [`im2col`] for LeNet's conv1 shape (28 wide, K = 5, padding 2, 28 wide out), with
/// fixed-size row copies: each source row is read once into a zero-bordered row of 32 on the
/// stack, and every row of col that reads it is one 28-float copy from it.
fn im2col_same28(col: &mut [f32], ld: usize, inp: &[f32], cin: usize, h: usize, ho: usize) {
    const W: usize = 28;
    let mut ext = [0f32; W + 4];
    for ci in 0..cin {
        let plane = &inp[ci * h * W..][..h * W];
        for ky in 0..5 {
            for kx in 0..5 {
                let row = &mut col[((ci * 5 + ky) * 5 + kx) * ld..][..ho * W];
                // Output rows whose source row y + ky - 2 is outside the image: zeros.
                for (y, dst) in row.chunks_exact_mut(W).enumerate() {
                    if (y + ky).wrapping_sub(2) >= h {
                        dst.fill(0.0);
                    }
                }
            }
        }
        for (sy, src) in plane.chunks_exact(W).enumerate() {
            let mid: &mut [f32; W] = (&mut ext[2..][..W]).try_into().unwrap();
            *mid = src.try_into().unwrap();
            for ky in 0..5 {
                // Output row y reads source row sy = y + ky - 2.
                let Some(y) = (sy + 2).checked_sub(ky).filter(|&y| y < ho) else { continue };
                for kx in 0..5 {
                    let dst: &mut [f32; W] =
                        (&mut col[((ci * 5 + ky) * 5 + kx) * ld + y * W..][..W]).try_into().unwrap();
                    *dst = ext[kx..][..W].try_into().unwrap();
                }
            }
        }
    }
}

/// [`im2col`] of an input that already carries its padding: inp is [cin, h, w] and the output
/// size comes from `s`.
fn im2col_unpadded(col: &mut [f32], ld: usize, inp: &[f32], cin: usize, h: usize, w: usize, s: &ConvShape) {
    let (ho, wo, k) = (s.out_height(), s.out_width(), s.kernel);
    // Rows of LeNet's widths as fixed-size copies (plain vector moves); others generic.
    match wo {
        28 => im2col_rows::<28>(col, ld, inp, cin, h, w, k, ho),
        10 => im2col_rows::<10>(col, ld, inp, cin, h, w, k, ho),
        _ => {
            let hw = ho * wo;
            for ci in 0..cin {
                let plane = &inp[ci * h * w..][..h * w];
                for ky in 0..k {
                    for kx in 0..k {
                        let row = &mut col[((ci * k + ky) * k + kx) * ld..][..hw];
                        for y in 0..ho {
                            copy_short(&mut row[y * wo..][..wo], &plane[(y + ky) * w + kx..][..wo]);
                        }
                    }
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn im2col_rows<const WO: usize>(
    col: &mut [f32],
    ld: usize,
    inp: &[f32],
    cin: usize,
    h: usize,
    w: usize,
    k: usize,
    ho: usize,
) {
    let hw = ho * WO;
    for ci in 0..cin {
        let plane = &inp[ci * h * w..][..h * w];
        for ky in 0..k {
            for kx in 0..k {
                let row = &mut col[((ci * k + ky) * k + kx) * ld..][..hw];
                for (y, dst) in row.chunks_exact_mut(WO).enumerate() {
                    let dst: &mut [f32; WO] = dst.try_into().unwrap();
                    *dst = plane[(y + ky) * w + kx..][..WO].try_into().unwrap();
                }
            }
        }
    }
}

/// The transpose of [`im2col`] for one image: colt[y*Wo + x, (ci*K + ky)*K + kx] (row stride
/// ckk), written to the first Ho*Wo rows of `colt`. Each output pixel's patch is contiguous,
/// which is the layout the weight-gradient GEMM reads best.
fn im2col_t(colt: &mut [f32], inp: &[f32], s: &ConvShape) {
    let p = s.padding;
    if p == 0 {
        return im2col_t_unpadded(colt, inp, s.height, s.width, s);
    }
    let (h, w) = (s.height, s.width);
    let (hp, wp) = (h + 2 * p, w + 2 * p);
    with_buffer(&PAD, s.in_channels * hp * wp, |padded| {
        pad_planes(padded, inp, s.in_channels, h, w, p);
        im2col_t_unpadded(colt, padded, hp, wp, s);
    });
}

fn im2col_t_unpadded(colt: &mut [f32], inp: &[f32], h: usize, w: usize, s: &ConvShape) {
    match s.kernel {
        5 => im2col_t_k::<5>(colt, inp, h, w, s),
        _ => im2col_t_k_generic(colt, inp, h, w, s),
    }
}

#[inline(always)]
fn im2col_t_k<const K: usize>(colt: &mut [f32], inp: &[f32], h: usize, w: usize, s: &ConvShape) {
    let (ho, wo, cin) = (s.out_height(), s.out_width(), s.in_channels);
    let ckk = cin * K * K;
    for y in 0..ho {
        for x in 0..wo {
            let patch = &mut colt[(y * wo + x) * ckk..][..ckk];
            for (ci, patch) in patch.chunks_exact_mut(K * K).enumerate() {
                for (ky, dst) in patch.chunks_exact_mut(K).enumerate() {
                    let dst: &mut [f32; K] = dst.try_into().unwrap();
                    *dst = inp[(ci * h + y + ky) * w + x..][..K].try_into().unwrap();
                }
            }
        }
    }
}

fn im2col_t_k_generic(colt: &mut [f32], inp: &[f32], h: usize, w: usize, s: &ConvShape) {
    let (ho, wo, cin, k) = (s.out_height(), s.out_width(), s.in_channels, s.kernel);
    let ckk = cin * k * k;
    for y in 0..ho {
        for x in 0..wo {
            let patch = &mut colt[(y * wo + x) * ckk..][..ckk];
            for ci in 0..cin {
                for ky in 0..k {
                    let dst = &mut patch[(ci * k + ky) * k..][..k];
                    copy_short(dst, &inp[(ci * h + y + ky) * w + x..][..k]);
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: dinp = sum of col's entries onto the pixels they were read from,
/// for one image. Overwrites dinp.
fn col2im(dinp: &mut [f32], col: &[f32], ld: usize, s: &ConvShape) {
    let (ho, wo, k, p) = (s.out_height(), s.out_width(), s.kernel, s.padding);
    let (h, w) = (s.height, s.width);
    let hw = ho * wo;
    if p == 0 && wo == 10 {
        return col2im_rows_isa(dinp, col, ld, s, super::isa::selected());
    }
    dinp.fill(0.0);
    for ci in 0..s.in_channels {
        let plane = &mut dinp[ci * h * w..][..h * w];
        for ky in 0..k {
            for kx in 0..k {
                let row = &col[((ci * k + ky) * k + kx) * ld..][..hw];
                let x0 = p.saturating_sub(kx).min(wo);
                let x1 = (w + p).saturating_sub(kx).min(wo).max(x0);
                for y in 0..ho {
                    let iy = y + ky;
                    if iy < p || iy - p >= h {
                        continue;
                    }
                    let dst = &mut plane[(iy - p) * w..][..w][x0 + kx - p..x1 + kx - p];
                    for (d, &c) in dst.iter_mut().zip(&row[y * wo..][x0..x1]) {
                        *d += c;
                    }
                }
            }
        }
    }
}

/// [`col2im`] for LeNet's conv2 (10-wide output, 5x5, no padding: 14-wide input rows) on the
/// instruction set: each input row summed in one vector register, its contributions (ky, kx)
/// in col2im's order, each a 10-float row of col loaded at lane offset kx (zeros elsewhere:
/// adding them changes no sum, which starts at +0 and so is never -0). The same bits as
/// [`col2im_rows`]; the per-row adds to memory that this replaces stalled on their stores.
fn col2im_rows_isa(dinp: &mut [f32], col: &[f32], ld: usize, s: &ConvShape, isa: super::isa::Isa) {
    #[cfg(target_arch = "x86_64")]
    if s.kernel == 5 {
        use super::isa::Isa;
        #[target_feature(enable = "avx512f,avx2")]
        fn avx512(dinp: &mut [f32], col: &[f32], ld: usize, s: &ConvShape) {
            // SAFETY: compiled with AVX-512F, called only where the CPU has it.
            unsafe { col2im_rows10::<lanes::Avx512>(dinp, col, ld, s) }
        }
        #[target_feature(enable = "avx2")]
        fn avx2(dinp: &mut [f32], col: &[f32], ld: usize, s: &ConvShape) {
            // SAFETY: compiled with AVX2, called only where the CPU has it.
            unsafe { col2im_rows10::<lanes::Avx2>(dinp, col, ld, s) }
        }
        // SAFETY: the instruction set was checked against the CPU when it was selected.
        match isa {
            Isa::Avx512 => return unsafe { avx512(dinp, col, ld, s) },
            Isa::Avx2 => return unsafe { avx2(dinp, col, ld, s) },
            Isa::Generic => {}
        }
    }
    let _ = isa;
    dinp.fill(0.0);
    col2im_rows::<10>(dinp, col, ld, s);
}

/// The body of [`col2im_rows_isa`]: writes every element of `dinp`.
///
/// # Safety
/// As for `V`'s methods: the CPU has V's instruction set.
#[inline(always)]
unsafe fn col2im_rows10<V: lanes::Lanes16>(dinp: &mut [f32], col: &[f32], ld: usize, s: &ConvShape) {
    // 10 wide out, 5 wide kernel, no padding: 14 wide in.
    const W: usize = 14;
    let (ho, h) = (s.out_height(), s.height);
    for (ci, plane) in dinp.chunks_exact_mut(h * W).enumerate() {
        for (iy, out) in plane.as_chunks_mut::<W>().0.iter_mut().enumerate() {
            let mut acc = V::zero();
            for ky in iy.saturating_sub(ho - 1)..=iy.min(4) {
                let y = iy - ky;
                for kx in 0..5 {
                    let src: &[f32; 10] =
                        col[((ci * 5 + ky) * 5 + kx) * ld + y * 10..][..10].try_into().unwrap();
                    acc = acc.add(V::load_window(src, kx));
                }
            }
            *out = acc.to_array()[..W].try_into().unwrap();
        }
    }
}

/// [`col2im`] without padding for rows of a fixed width: fixed-size adds vectorise.
fn col2im_rows<const WO: usize>(dinp: &mut [f32], col: &[f32], ld: usize, s: &ConvShape) {
    let (ho, k, h, w) = (s.out_height(), s.kernel, s.height, s.width);
    for ci in 0..s.in_channels {
        let plane = &mut dinp[ci * h * w..][..h * w];
        for ky in 0..k {
            for kx in 0..k {
                let row = &col[((ci * k + ky) * k + kx) * ld..][..ho * WO];
                for (y, src) in row.chunks_exact(WO).enumerate() {
                    let dst: &mut [f32; WO] = (&mut plane[(y + ky) * w + kx..][..WO]).try_into().unwrap();
                    let src: &[f32; WO] = src.try_into().unwrap();
                    for i in 0..WO {
                        dst[i] += src[i];
                    }
                }
            }
        }
    }
}

/// Sizes of a convolution that the blocked kernels use.
struct ConvDims {
    /// Output pixels per channel.
    hw: usize,
    /// Rows of the im2col matrix: in_channels * K * K.
    ckk: usize,
    in_len: usize,
    out_len: usize,
}

fn conv_dims(s: &ConvShape) -> ConvDims {
    let hw = s.out_height() * s.out_width();
    ConvDims {
        hw,
        ckk: s.in_channels * s.kernel * s.kernel,
        in_len: s.in_channels * s.height * s.width,
        out_len: s.out_channels * hw,
    }
}

/// See [`super::reference::conv_relu_pool_forward`]: the convolution, its ReLU and the 2x2
/// max-pool fused, each block of images pooled while its convolution output is still in cache.
///
/// out: [B, Cout, Ho, Wo]; pooled and argmax: [B, Cout, Ho/2, Wo/2]
fn conv_relu_pool_forward(inp: &[f32], l: ConvLayer<Fast>) -> Result<()> {
    check_conv_layer(inp.len(), &l)?;
    let ConvLayerArgs { weight, bias, conv: out, pooled, argmax, s } = l;
    let ConvDims { hw, in_len, out_len, .. } = conv_dims(&s);
    if s.batch == 0 || hw == 0 {
        return Ok(());
    }
    let isa = super::isa::selected();
    let w = LayerWeights::new(weight, bias, &s);
    out.par_chunks_mut(CONV_BLOCK * out_len)
        .zip(inp.par_chunks(CONV_BLOCK * in_len.max(1)))
        .zip(pooled.par_chunks_mut(CONV_BLOCK * out_len / 4))
        .zip(argmax.par_chunks_mut(CONV_BLOCK * out_len / 4))
        .enumerate()
        .for_each(|(blk, (((out, inp), pooled), argmax))| {
            conv_pool_block(ConvBlock { out, pooled, argmax, first: blk * CONV_BLOCK }, inp, &w, &s, isa);
        });
    Ok(())
}

/// [`conv_relu_pool_forward`]'s checks: the tensors' sizes, and even sides for the pool.
fn check_conv_layer(input_len: usize, l: &ConvLayer<Fast>) -> Result<()> {
    let s = l.s;
    let lens =
        input_len == s.input_len() && l.weight.len() == s.weight_len() && l.bias.len() == s.out_channels;
    ensure!(lens, "conv_relu_pool_forward: the inputs do not match {s:?}");
    let (ho, wo) = (s.out_height(), s.out_width());
    ensure!(ho.is_multiple_of(2) && wo.is_multiple_of(2), "max-pool input must have even sides");
    let lens = l.conv.len() == s.output_len()
        && l.pooled.len() == l.conv.len() / 4
        && l.argmax.len() == l.pooled.len();
    ensure!(lens, "conv_relu_pool_forward: the outputs do not match {s:?}");
    Ok(())
}

/// One block of images' conv outputs: `first` is the block's first image in the batch.
struct ConvBlock<'a> {
    out: &'a mut [f32],
    pooled: &'a mut [f32],
    argmax: &'a mut [u32],
    first: usize,
}

/// A conv layer's parameters for [`conv_pool_block`], with what its blocks share prepared once
/// a call: the weights tap-major where [`direct_conv2`] takes the shape.
struct LayerWeights<'a> {
    weight: &'a [f32],
    bias: &'a [f32],
    tap_major: Option<Vec<[f32; DIRECT2_COUT]>>,
}

impl<'a> LayerWeights<'a> {
    fn new(weight: &'a [f32], bias: &'a [f32], s: &ConvShape) -> Self {
        LayerWeights { weight, bias, tap_major: direct2_fits(s).then(|| tap_major(weight, s)) }
    }
}

/// The conv, ReLU and max-pool of one block of whole images (at most CONV_BLOCK): a direct
/// kernel where one takes the shape, else im2col + GEMM; then each image pooled while its output
/// is in cache.
fn conv_pool_block(b: ConvBlock, inp: &[f32], w: &LayerWeights, s: &ConvShape, isa: super::isa::Isa) {
    let ConvBlock { out, pooled, argmax, first } = b;
    let out_len = s.output_len() / s.batch;
    let direct = direct_conv1(out, inp, w.weight, w.bias, s, isa)
        || w.tap_major.as_deref().is_some_and(|wt| direct_conv2(out, inp, wt, w.bias, s, isa));
    if !direct {
        conv_forward_block(out, inp, w.weight, w.bias, s, true);
    }
    let images = out.chunks(out_len).zip(pooled.chunks_mut(out_len / 4)).zip(argmax.chunks_mut(out_len / 4));
    for (j, ((out, pooled), argmax)) in images.enumerate() {
        maxpool_image_isa(pooled, argmax, out, (first + j) * out_len, s.out_width(), isa);
    }
}

/// [`Ops::trunk_forward`] in one parallel pass instead of three: each block of CONV_BLOCK
/// images gathered, through conv1 and its pool, then through conv2 and its pool, while the
/// block is in cache (conv1's output for the whole batch is 4.8 MB at batch 256). Every value
/// is computed as the layer ops compute it (the same blocks, the same kernels), so the same bits.
fn trunk_forward(a: TrunkForward<Fast>) -> Result<()> {
    let TrunkForwardArgs { gather, conv1, conv2, s } = a;
    let GatherArgs { input, labels, batch } = gather;
    super::super::reference::check_batch(batch.data, batch.indices, batch.shifts)?;
    let pixels = batch.data.rows * batch.data.cols;
    let n = batch.indices.len();
    ensure!(input.len() == n * pixels && labels.len() == n, "gather: the buffers do not match the batch");
    check_conv_layer(input.len(), &conv1)?;
    check_conv_layer(conv1.pooled.len(), &conv2)?;
    let (s1, s2) = (s.conv1, s.conv2);
    let (in1, out1) = (s1.input_len() / n.max(1), s1.output_len() / n.max(1));
    let out2 = s2.output_len() / n.max(1);
    if n == 0 || in1 == 0 || out1 == 0 || out2 == 0 {
        let gather = GatherArgs { input, labels, batch };
        return trunk_forward_by_layers(&mut Fast, TrunkForwardArgs { gather, conv1, conv2, s });
    }
    let isa = super::isa::selected();
    let b = CONV_BLOCK;
    let gathered = input.par_chunks_mut(b * in1).zip(labels.par_chunks_mut(b));
    let picks = batch.indices.par_chunks(b).zip(batch.shifts.par_chunks(2 * b));
    let (w1, w2) =
        (LayerWeights::new(conv1.weight, conv1.bias, &s1), LayerWeights::new(conv2.weight, conv2.bias, &s2));
    let layer1 = conv1.conv.par_chunks_mut(b * out1).zip(conv1.pooled.par_chunks_mut(b * out1 / 4));
    let layer1 = layer1.zip(conv1.argmax.par_chunks_mut(b * out1 / 4));
    let layer2 = conv2.conv.par_chunks_mut(b * out2).zip(conv2.pooled.par_chunks_mut(b * out2 / 4));
    let layer2 = layer2.zip(conv2.argmax.par_chunks_mut(b * out2 / 4));
    gathered.zip(picks).zip(layer1).zip(layer2).enumerate().for_each(
        |(blk, ((((input, labels), (indices, shifts)), ((c1, p1), a1)), ((c2, p2), a2)))| {
            super::super::reference::gather_batch(input, labels, batch.data, indices, shifts);
            let first = blk * b;
            conv_pool_block(ConvBlock { out: c1, pooled: &mut *p1, argmax: a1, first }, input, &w1, &s1, isa);
            conv_pool_block(ConvBlock { out: c2, pooled: p2, argmax: a2, first }, p1, &w2, &s2, isa);
        },
    );
    Ok(())
}

/// Side of the images the direct single-channel kernel takes (LeNet's conv1: 28x28, K = 5,
/// padding 2, "same" output).
const DIRECT_SIDE: usize = 28;
/// Lanes of one output row in the direct kernel: 28 pixels computed as 32 (whole vectors of 8
/// or 16); the last 4 are dropped.
const DIRECT_LANES: usize = 32;
/// The zero-bordered tile the direct kernel reads: 2 rows and columns of zeros on each side,
/// and enough columns to the right for the dropped lanes' reads.
const TILE_H: usize = DIRECT_SIDE + 4;
const TILE_W: usize = DIRECT_LANES + 4;

/// Whether the direct conv1 kernels take the shape: LeNet-5's conv1 (one input channel, 5x5,
/// padding 2, on 28x28 images).
fn direct_fits(s: &ConvShape) -> bool {
    s.in_channels == 1 && s.kernel == 5 && s.padding == 2 && s.height == DIRECT_SIDE && s.width == DIRECT_SIDE
}

/// conv1's convolution and ReLU without im2col, for a block of whole images, when the shape is
/// the one the kernel is written for and the instruction set has FMA; false (nothing done)
/// otherwise.
///
/// Why: with one input channel the im2col matrix is 25 copies of the image (78 KB an image)
/// streamed through a GEMM whose M is only 6: conv1's forward cost as much as conv2's, which
/// does twice its arithmetic. Here each output row is 25 vector FMAs per channel over a 4 KB
/// zero-bordered tile on the stack, in the GEMM's order (taps (ky, kx) in row-major order, each
/// `acc = fma(w, x, acc)` from acc = 0, the padding's taps included): the same bits as the
/// GEMM path on both instruction sets (tests check it bit for bit).
fn direct_conv1(
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    s: &ConvShape,
    isa: super::isa::Isa,
) -> bool {
    if !direct_fits(s) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        use super::isa::Isa;
        // SAFETY: the instruction set was checked against the CPU when it was selected.
        match isa {
            Isa::Avx512 => unsafe { direct_conv1_avx512(out, inp, weight, bias, s.out_channels) },
            Isa::Avx2 => unsafe { direct_conv1_avx2(out, inp, weight, bias, s.out_channels) },
            Isa::Generic => return false,
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (out, inp, weight, bias, isa);
        false
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn direct_conv1_avx512(out: &mut [f32], inp: &[f32], weight: &[f32], bias: &[f32], cout: usize) {
    // 6 channels x 2 vectors of 16: 12 accumulators of the 32 registers.
    direct_conv1_block::<6>(out, inp, weight, bias, cout);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn direct_conv1_avx2(out: &mut [f32], inp: &[f32], weight: &[f32], bias: &[f32], cout: usize) {
    // 3 channels x 4 vectors of 8: 12 accumulators of the 16 registers.
    direct_conv1_block::<3>(out, inp, weight, bias, cout);
}

/// The body of [`direct_conv1`], compiled once per instruction set (`mul_add` is one vector
/// FMA there): output channels in groups of G, so that each tap's row is loaded once for G
/// channels and G x (lanes / vector width) independent FMA chains hide the FMA's latency.
#[inline(always)]
fn direct_conv1_block<const G: usize>(
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    cout: usize,
) {
    const S: usize = DIRECT_SIDE;
    let mut tile = [0f32; TILE_H * TILE_W];
    for (out, img) in out.chunks_exact_mut(cout * S * S).zip(inp.chunks_exact(S * S)) {
        for (y, src) in img.chunks_exact(S).enumerate() {
            let dst: &mut [f32; S] = (&mut tile[(y + 2) * TILE_W + 2..][..S]).try_into().unwrap();
            *dst = src.try_into().unwrap();
        }
        let mut co = 0;
        while co < cout {
            if cout - co >= G {
                direct_conv1_channels::<G>(out, &tile, weight, bias, co);
                co += G;
            } else {
                direct_conv1_channels::<1>(out, &tile, weight, bias, co);
                co += 1;
            }
        }
    }
}

/// Output channels `co..co + G` of one image from its zero-bordered tile.
#[inline(always)]
fn direct_conv1_channels<const G: usize>(
    out: &mut [f32],
    tile: &[f32; TILE_H * TILE_W],
    weight: &[f32],
    bias: &[f32],
    co: usize,
) {
    const S: usize = DIRECT_SIDE;
    let w: &[[f32; 25]; G] = weight[co * 25..][..G * 25].as_chunks::<25>().0.try_into().unwrap();
    for y in 0..S {
        let mut acc = [[0f32; DIRECT_LANES]; G];
        for ky in 0..5 {
            let row = &tile[(y + ky) * TILE_W..][..TILE_W];
            for kx in 0..5 {
                let src: &[f32; DIRECT_LANES] = row[kx..][..DIRECT_LANES].try_into().unwrap();
                for (acc, w) in acc.iter_mut().zip(w) {
                    let wv = w[ky * 5 + kx];
                    for (a, &x) in acc.iter_mut().zip(src) {
                        *a = wv.mul_add(x, *a);
                    }
                }
            }
        }
        for (g, acc) in acc.iter().enumerate() {
            let b = bias[co + g];
            let o = &mut out[(co + g) * S * S + y * S..][..S];
            for (o, &a) in o.iter_mut().zip(acc) {
                *o = (a + b).max(0.0);
            }
        }
    }
}

/// Output channels of the direct valid convolution: one 16-lane vector per output pixel.
const DIRECT2_COUT: usize = 16;

/// Whether [`direct_conv2`] takes the shape: 5x5 without padding, 16 output channels (LeNet-5's
/// conv2, and any input size and channel count).
fn direct2_fits(s: &ConvShape) -> bool {
    s.kernel == 5 && s.padding == 0 && s.out_channels == DIRECT2_COUT && s.height >= 5 && s.width >= 5
}

/// conv2's convolution and ReLU without im2col, for a block of whole images, when the shape is
/// the one the kernel is written for and the instruction set has FMA; false (nothing done)
/// otherwise.
///
/// Why: im2col wrote 150 copies' worth of every 14x14 image (60 KB) for a GEMM whose other side
/// is only 16 wide. Here an output pixel's 16 channels are one vector (two on AVX2): each tap is
/// one load of its 16 weights and one broadcast FMA per pixel of a run of P pixels, the image
/// read in place. Each output is `acc = fma(x, w, acc)` over the taps (ci, ky, kx) in row-major
/// order from acc = 0, the GEMM's order: the same bits as the GEMM path on both instruction
/// sets (tests check it bit for bit).
fn direct_conv2(
    out: &mut [f32],
    inp: &[f32],
    wt: &[[f32; DIRECT2_COUT]],
    bias: &[f32],
    s: &ConvShape,
    isa: super::isa::Isa,
) -> bool {
    if !direct2_fits(s) {
        return false;
    }
    assert_eq!(wt.len(), s.in_channels * 25, "direct_conv2: the weights tap-major (see tap_major)");
    #[cfg(target_arch = "x86_64")]
    {
        use super::isa::Isa;
        // SAFETY: the instruction set was checked against the CPU when it was selected.
        match isa {
            // 10 pixels x 1 vector: 10 accumulators of the 32 registers.
            Isa::Avx512 => unsafe { direct_conv2_avx512(out, inp, wt, bias, s) },
            // 5 pixels x 2 vectors: 10 accumulators of the 16 registers.
            Isa::Avx2 => unsafe { direct_conv2_avx2(out, inp, wt, bias, s) },
            Isa::Generic => return false,
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (out, inp, bias, isa);
        false
    }
}

/// conv weights [Cout = 16, Cin, 5, 5] tap-major for [`direct_conv2`]: `wt[tap]` holds the
/// tap's weight for each output channel.
fn tap_major(weight: &[f32], s: &ConvShape) -> Vec<[f32; DIRECT2_COUT]> {
    let ckk = s.in_channels * 25;
    let mut wt = vec![[0f32; DIRECT2_COUT]; ckk];
    for (co, w) in weight.chunks_exact(ckk).enumerate() {
        for (t, &w) in wt.iter_mut().zip(w) {
            t[co] = w;
        }
    }
    wt
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn direct_conv2_avx512(
    out: &mut [f32],
    inp: &[f32],
    wt: &[[f32; DIRECT2_COUT]],
    bias: &[f32],
    s: &ConvShape,
) {
    direct_conv2_block::<10>(out, inp, wt, bias, s);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn direct_conv2_avx2(
    out: &mut [f32],
    inp: &[f32],
    wt: &[[f32; DIRECT2_COUT]],
    bias: &[f32],
    s: &ConvShape,
) {
    direct_conv2_block::<5>(out, inp, wt, bias, s);
}

/// The body of [`direct_conv2`], compiled once per instruction set: each output row in runs of
/// P pixels (the rest one at a time), then the bias and ReLU on the way to the NCHW output.
#[inline(always)]
fn direct_conv2_block<const P: usize>(
    out: &mut [f32],
    inp: &[f32],
    wt: &[[f32; DIRECT2_COUT]],
    bias: &[f32],
    s: &ConvShape,
) {
    let (ho, wo) = (s.out_height(), s.out_width());
    let hw = ho * wo;
    let mut pixels = vec![[0f32; DIRECT2_COUT]; hw];
    for (out, img) in
        out.chunks_exact_mut(DIRECT2_COUT * hw).zip(inp.chunks_exact(s.in_channels * s.height * s.width))
    {
        for y in 0..ho {
            let mut x = 0;
            while x < wo {
                let dst = &mut pixels[y * wo + x..];
                if wo - x >= P {
                    direct_conv2_run::<P>(dst, img, wt, s, y, x);
                    x += P;
                } else {
                    direct_conv2_run::<1>(dst, img, wt, s, y, x);
                    x += 1;
                }
            }
        }
        for (co, (out, &b)) in out.chunks_exact_mut(hw).zip(bias).enumerate() {
            for (o, px) in out.iter_mut().zip(&pixels) {
                *o = (px[co] + b).max(0.0);
            }
        }
    }
}

/// Output pixels (y, x..x + P) of one image, every output channel, into `dst[..P]`.
#[inline(always)]
fn direct_conv2_run<const P: usize>(
    dst: &mut [[f32; DIRECT2_COUT]],
    img: &[f32],
    wt: &[[f32; DIRECT2_COUT]],
    s: &ConvShape,
    y: usize,
    x: usize,
) {
    let (h, w) = (s.height, s.width);
    let mut acc = [[0f32; DIRECT2_COUT]; P];
    for (plane, wt) in img.chunks_exact(h * w).zip(wt.chunks_exact(25)) {
        for (ky, wt) in wt.chunks_exact(5).enumerate() {
            let row = &plane[(y + ky) * w + x..][..P + 4];
            for (kx, wv) in wt.iter().enumerate() {
                for (acc, &v) in acc.iter_mut().zip(&row[kx..]) {
                    for (a, &wv) in acc.iter_mut().zip(wv) {
                        *a = v.mul_add(wv, *a);
                    }
                }
            }
        }
    }
    dst[..P].copy_from_slice(&acc);
}

/// The convolution of one block of images (whole images), optionally with ReLU.
fn conv_forward_block(out: &mut [f32], inp: &[f32], weight: &[f32], bias: &[f32], s: &ConvShape, relu: bool) {
    let ConvDims { hw, ckk, in_len, out_len } = conv_dims(s);
    let cout = s.out_channels;
    let nb = out.len() / out_len;
    let ld = nb * hw;
    with_buffer(&COL, ckk * ld, |col| {
        for j in 0..nb {
            im2col(&mut col[j * hw..], ld, &inp[j * in_len..], s);
        }
        with_buffer(&GATHER, cout * ld, |res| {
            // res[cout, nb*hw] = weight[cout, ckk] · col[ckk, nb*hw]
            let w = View { data: weight, rs: ckk, cs: 1 };
            let c = View { data: col, rs: ld, cs: 1 };
            matmul(res, ld, false, w, c, cout, ld, ckk);
            for (j, out) in out.chunks_mut(out_len).enumerate() {
                for (co, out) in out.chunks_mut(hw).enumerate() {
                    let (b, src) = (bias[co], &res[co * ld + j * hw..][..hw]);
                    if relu {
                        for (o, &r) in out.iter_mut().zip(src) {
                            *o = (r + b).max(0.0);
                        }
                    } else {
                        for (o, &r) in out.iter_mut().zip(src) {
                            *o = r + b;
                        }
                    }
                }
            }
        });
    });
}

/// dst[co, j*hw + i] = src[j][co, i] for the images j of a block: NCHW to [C, images*HW].
fn gather_channels(dst: &mut [f32], src: &[f32], channels: usize, hw: usize) {
    let nb = src.len() / (channels * hw);
    let ld = nb * hw;
    for (j, img) in src.chunks(channels * hw).enumerate() {
        for (c, plane) in img.chunks(hw).enumerate() {
            dst[c * ld + j * hw..][..hw].copy_from_slice(plane);
        }
    }
}

/// [`Ops::conv_backward_from_pool`]: the pool's and ReLU's backward, the weight and bias
/// gradients and the input gradient, one block of images at a time while its output gradient
/// is in cache. Each of the (at most 8) reduction blocks of [`reduction_block`] images is one
/// task, which works through it CONV_BLOCK images at a time: their output gradient scattered
/// from the pool's argmaxes, their weight-gradient GEMM (or direct kernel) added to the block's
/// partial, and their input gradient. The partials are then summed in block order.
///
/// The same operations in the same orders as the layer-by-layer functions this replaced (pool
/// backward, then weight, then input, each a pass over the batch): an input gradient's element
/// is a 16-term sum whatever the block, so the same bits.
fn conv_backward_from_pool(a: ConvBackward<Fast>) -> Result<()> {
    let ConvBackwardArgs { dpooled, conv, argmax, input, weight, dweight, dbias, mut dinput, s } = a;
    let l = LayerBackward { dpooled, first: 0, conv, argmax, input, weight, s };
    l.check(dweight, dbias, dinput.as_deref().map(|d| d.len()))?;
    let ConvDims { hw, in_len, .. } = conv_dims(&s);
    let (wlen, cout) = (s.weight_len(), s.out_channels);
    if s.batch == 0 || hw == 0 || in_len == 0 || cout == 0 {
        dweight.fill(0.0);
        dbias.fill(0.0);
        if let Some(dinp) = dinput {
            dinp.fill(0.0);
        }
        return Ok(());
    }
    let isa = super::isa::selected();
    let block = reduction_block(s.batch);
    let blocks = s.batch.div_ceil(block);
    // Each block's share of the input gradient, or nothing.
    let mut dinp_blocks: Vec<Option<&mut [f32]>> = match dinput.as_mut() {
        Some(dinp) => dinp.chunks_mut(block * in_len).map(Some).collect(),
        None => (0..blocks).map(|_| None).collect(),
    };
    with_buffer(&PARTIALS, blocks * (wlen + cout), |partials| {
        partials.par_chunks_mut(wlen + cout).zip(dinp_blocks.par_iter_mut()).enumerate().for_each(
            |(blk, (part, dinp))| {
                part[wlen..].fill(0.0);
                for (i, (img0, nb)) in sub_blocks(blk, block, s.batch).enumerate() {
                    let j0 = img0 - blk * block;
                    let dinp = dinp.as_deref_mut().map(|d| &mut d[j0 * in_len..][..nb * in_len]);
                    l.images(part, i, img0, nb, dinp, isa);
                }
            },
        );
        sum_partials(dweight, dbias, partials, wlen);
    });
    Ok(())
}

/// The sub-blocks (first image, images) of reduction block `blk` of `block` images: CONV_BLOCK
/// images at a time, the last one shorter.
fn sub_blocks(blk: usize, block: usize, batch: usize) -> impl Iterator<Item = (usize, usize)> {
    let first = blk * block;
    let images = block.min(batch - first);
    let sub = CONV_BLOCK.min(block);
    (0..images).step_by(sub).map(move |j0| (first + j0, sub.min(images - j0)))
}

/// A conv layer's backward tensors, as [`ConvBackwardArgs`] less its outputs; `dpooled` starts
/// at image `first` of the batch (the others index the whole batch).
struct LayerBackward<'a> {
    dpooled: &'a [f32],
    first: usize,
    conv: &'a [f32],
    argmax: &'a [u32],
    input: &'a [f32],
    weight: &'a [f32],
    s: ConvShape,
}

impl LayerBackward<'_> {
    /// The checks of [`Ops::conv_backward_from_pool`].
    fn check(&self, dweight: &[f32], dbias: &[f32], dinput: Option<usize>) -> Result<()> {
        let s = self.s;
        let (wlen, cout) = (s.weight_len(), s.out_channels);
        let lens = dweight.len() == wlen
            && dbias.len() == cout
            && self.weight.len() == wlen
            && self.input.len() == s.input_len();
        ensure!(lens, "conv_backward_from_pool: the tensors do not match {s:?}");
        let (ho, wo) = (s.out_height(), s.out_width());
        ensure!(ho.is_multiple_of(2) && wo.is_multiple_of(2), "max-pool input must have even sides");
        let lens = self.conv.len() == s.output_len()
            && self.dpooled.len() == self.conv.len() / 4
            && self.argmax.len() == self.dpooled.len();
        ensure!(lens, "conv_backward_from_pool: the pool's tensors do not match {s:?}");
        if let Some(len) = dinput {
            ensure!(len == s.input_len(), "conv_backward_from_pool: dinput does not match {s:?}");
        }
        Ok(())
    }

    /// Images img0..img0 + nb, sub-block `i` of their reduction block: their output gradient
    /// scattered from the pool, their weight gradient added to the block's partial `part`
    /// (weights then biases; stored for i = 0) and their input gradient into `dinp`.
    fn images(
        &self,
        part: &mut [f32],
        i: usize,
        img0: usize,
        nb: usize,
        dinp: Option<&mut [f32]>,
        isa: super::isa::Isa,
    ) {
        let s = &self.s;
        let ConvDims { hw, ckk, in_len, out_len } = conv_dims(s);
        let cout = s.out_channels;
        let (pw, pb) = part.split_at_mut(s.weight_len());
        let pooled_len = out_len / 4;
        let inp = &self.input[img0 * in_len..][..nb * in_len];
        with_buffer(&DCONV, nb * out_len, |dout| {
            for (j, dout) in dout.chunks_exact_mut(out_len).enumerate() {
                let img = img0 + j;
                let at = (img - self.first) * pooled_len..(img - self.first + 1) * pooled_len;
                let conv = &self.conv[img * out_len..][..out_len];
                let argmax = &self.argmax[img * pooled_len..][..pooled_len];
                pool_relu_backward_image(dout, &self.dpooled[at], argmax, conv, img * out_len);
            }
            let conv1 = direct_conv1_weight(pw, i > 0, dout, inp, s, isa);
            if conv1 {
                // The bias: each channel's sum over the block's images as sum_fixed folds the
                // gathered row (images of 784 = 49 x 16 values leave no remainder, so image by
                // image is the same order).
                for (co, b) in pb.iter_mut().enumerate() {
                    *b += sum_fixed_images(dout.chunks(out_len).map(|img| &img[co * hw..][..hw]));
                }
            }
            if conv1 && dinp.is_none() {
                return;
            }
            // The gradient gathered by channel, once for the weight GEMM, the bias and the
            // input gradient.
            let ld = nb * hw;
            with_buffer(&GATHER, cout * ld, |d| {
                gather_channels(d, dout, cout, hw);
                if !conv1 {
                    let direct = direct2_fits(s)
                        && with_buffer(&PIXELS, ld * DIRECT2_COUT, |dt| {
                            let dt = dt.as_chunks_mut::<DIRECT2_COUT>().0;
                            let pooled = &self.dpooled[(img0 - self.first) * pooled_len..][..nb * pooled_len];
                            let argmax = &self.argmax[img0 * pooled_len..][..nb * pooled_len];
                            let conv = &self.conv[img0 * out_len..][..nb * out_len];
                            pixel_major_from_pool(dt, (pooled, argmax, conv), img0, s);
                            direct_conv2_weight(pw, i > 0, dt, inp, s, isa)
                        });
                    if !direct {
                        weight_block_gemm(pw, i > 0, d, inp, s);
                    }
                    for (b, row) in pb.iter_mut().zip(d.chunks(ld)) {
                        *b += sum_fixed(row);
                    }
                }
                if let Some(dinp) = dinp {
                    input_grad_block(dinp, d, self.weight, s, ckk);
                }
            });
        });
    }
}

/// [`Ops::trunk_backward`] in one parallel pass instead of two: each block of images through
/// conv2's backward (its input gradient is those images' `dpooled1`) and then, while that is in
/// cache, conv1's. The same sub-blocks, partials and orders as the two layer ops, so the same
/// bits.
fn trunk_backward(a: TrunkBackward<Fast>) -> Result<()> {
    let TrunkBackwardArgs { dpooled, conv2: t2, dpooled1, conv1: t1, s } = a;
    let l2 = LayerBackward {
        dpooled,
        first: 0,
        conv: t2.conv,
        argmax: t2.argmax,
        input: t2.input,
        weight: t2.weight,
        s: s.conv2,
    };
    l2.check(t2.dweight, t2.dbias, Some(dpooled1.len()))?;
    let l1 = LayerBackward {
        dpooled: &*dpooled1,
        first: 0,
        conv: t1.conv,
        argmax: t1.argmax,
        input: t1.input,
        weight: t1.weight,
        s: s.conv1,
    };
    l1.check(t1.dweight, t1.dbias, None)?;
    let (s1, s2) = (s.conv1, s.conv2);
    let degenerate = |s: &ConvShape| s.batch == 0 || s.output_len() == 0 || s.input_len() == 0;
    if degenerate(&s1) || degenerate(&s2) || s1.batch != s2.batch {
        let conv2 = TrunkLayerArgs { ..t2 };
        let conv1 = TrunkLayerArgs { ..t1 };
        return trunk_backward_by_layers(&mut Fast, TrunkBackwardArgs { dpooled, conv2, dpooled1, conv1, s });
    }
    let isa = super::isa::selected();
    let batch = s2.batch;
    let block = reduction_block(batch);
    let blocks = batch.div_ceil(block);
    let (part2, part1) = (s2.weight_len() + s2.out_channels, s1.weight_len() + s1.out_channels);
    let in2 = s2.input_len() / batch;
    let (conv1, argmax1, input1, weight1) =
        (t1.conv.as_slice(), t1.argmax.as_slice(), t1.input.as_slice(), t1.weight.as_slice());
    with_buffer(&PARTIALS, blocks * (part2 + part1), |partials| {
        let (parts2, parts1) = partials.split_at_mut(blocks * part2);
        let tasks = parts2.par_chunks_mut(part2).zip(parts1.par_chunks_mut(part1));
        tasks.zip(dpooled1.par_chunks_mut(block * in2)).enumerate().for_each(|(blk, ((p2, p1), dp1))| {
            p2[s2.weight_len()..].fill(0.0);
            p1[s1.weight_len()..].fill(0.0);
            for (i, (img0, nb)) in sub_blocks(blk, block, batch).enumerate() {
                let dp1 = &mut dp1[(img0 - blk * block) * in2..][..nb * in2];
                l2.images(p2, i, img0, nb, Some(&mut *dp1), isa);
                let l1 = LayerBackward {
                    dpooled: dp1,
                    first: img0,
                    conv: conv1,
                    argmax: argmax1,
                    input: input1,
                    weight: weight1,
                    s: s1,
                };
                l1.images(p1, i, img0, nb, None, isa);
            }
        });
        sum_partials(t2.dweight, t2.dbias, parts2, s2.weight_len());
        sum_partials(t1.dweight, t1.dbias, parts1, s1.weight_len());
    });
    Ok(())
}

/// The input gradient of one block of images (see [`super::reference::conv2d_backward_input`])
/// from their output gradient gathered by channel (`d`, as [`gather_channels`] lays it out):
/// one GEMM with the transposed weights into col, then [`col2im`] image by image.
fn input_grad_block(dinp: &mut [f32], d: &[f32], weight: &[f32], s: &ConvShape, ckk: usize) {
    let ConvDims { hw, in_len, .. } = conv_dims(s);
    let cout = s.out_channels;
    let ld = dinp.len() / in_len * hw;
    with_buffer(&COL, ckk * ld, |dcol| {
        // dcol[ckk, nb*hw] = weightᵀ[ckk, cout] · dout[cout, nb*hw]
        let wt = View { data: weight, rs: 1, cs: ckk };
        let dv = View { data: d, rs: ld, cs: 1 };
        matmul(dcol, ld, false, wt, dv, ckk, ld, cout);
        for (j, dinp) in dinp.chunks_mut(in_len).enumerate() {
            col2im(dinp, &dcol[j * hw..], ld, s);
        }
    });
}

/// Positions of the reduction per pass of the `gemm` crate's "horizontal" kernels, which it uses
/// for small products whose operands are contiguous along the reduction (conv1's weight
/// gradient: 6 x 25 outputs, a reduction over the block's pixels): each pass is summed from zero
/// and then added to the destination.
const HORIZONTAL_KC: usize = 1024;

/// conv1's weight gradient for one block of images without im2col: `dweight[co, tap]` (+)= the
/// sum over the block's pixels of dout[co, pixel] times the input under that tap, in the order
/// the im2col + GEMM path sums it, so the same bits (a unit test compares them on each
/// instruction set). False (nothing done) for another shape or the generic instruction set.
///
/// The GEMM's order (the `gemm` crate's horizontal kernels, see [`HORIZONTAL_KC`]): the
/// reduction runs over the block's pixels (image by image) in passes of 1024; in a pass, lane l
/// of a vector of W (16 on AVX-512, 8 on AVX2) accumulates the pixels at l modulo W with FMAs,
/// from zero, in order; the lanes are then summed in a fixed tree ([`reduce_lanes`]) and the
/// pass's sum added to the destination (or stored, for the first pass when not accumulating).
/// That order is the `gemm` crate's (0.19) choice for this shape: if an upgrade changes it,
/// `direct_conv1_weight_is_the_gemm_path_bit_for_bit` fails and says so.
///
/// Why: im2col wrote 25 copies of every image (78 KB) for this product. Here the input under a
/// tap (ky, kx) at a run of pixels is one contiguous load from a copy of the image shifted by kx
/// and bordered by 2 zero rows (5 copies, not 25).
fn direct_conv1_weight(
    dweight: &mut [f32],
    accumulate: bool,
    dout: &[f32],
    inp: &[f32],
    s: &ConvShape,
    isa: super::isa::Isa,
) -> bool {
    if !direct_fits(s) {
        return false;
    }
    let cout = s.out_channels;
    const HW: usize = DIRECT_SIDE * DIRECT_SIDE;
    let nb = inp.len() / HW;
    assert!(inp.len() == nb * HW && dout.len() == nb * cout * HW && dweight.len() == cout * 25);
    #[cfg(target_arch = "x86_64")]
    {
        use super::isa::Isa;
        with_buffer(&PAD, nb * SHIFTED_LEN, |shifted| {
            for (img, dst) in inp.chunks_exact(HW).zip(shifted.chunks_exact_mut(SHIFTED_LEN)) {
                shifted_copies(dst, img);
            }
            // SAFETY: the instruction set was checked against the CPU when it was selected.
            match isa {
                Isa::Avx512 => unsafe { conv1_weight_avx512(dweight, accumulate, dout, shifted, cout) },
                Isa::Avx2 => unsafe { conv1_weight_avx2(dweight, accumulate, dout, shifted, cout) },
                Isa::Generic => return false,
            }
            true
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dweight, accumulate, dout, isa);
        false
    }
}

/// Rows of one shifted copy: the image's 28 and 2 zero rows above and below.
const SHIFTED_ROWS: usize = DIRECT_SIDE + 4;
/// One image's 5 shifted copies.
const SHIFTED_LEN: usize = 5 * SHIFTED_ROWS * DIRECT_SIDE;

/// copy kx (0..5) of `img`: copy[(y + 2) * 28 + x] = img[y][x + kx - 2], zero outside the image;
/// so the input under tap (ky, kx) at output pixel p = y * 28 + x is copy kx at p + ky * 28.
fn shifted_copies(dst: &mut [f32], img: &[f32]) {
    const S: usize = DIRECT_SIDE;
    dst.fill(0.0);
    for (kx, copy) in dst.chunks_exact_mut(SHIFTED_ROWS * S).enumerate() {
        for (y, src) in img.chunks_exact(S).enumerate() {
            let row = &mut copy[(y + 2) * S..][..S];
            // x + kx - 2 inside 0..28 for x in lo..hi.
            let (lo, hi) = (2usize.saturating_sub(kx), (S + 2 - kx).min(S));
            row[lo..hi].copy_from_slice(&src[lo + kx - 2..hi + kx - 2]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn conv1_weight_avx512(
    dweight: &mut [f32],
    accumulate: bool,
    dout: &[f32],
    shifted: &[f32],
    cout: usize,
) {
    // 3 channels x 5 taps: 15 accumulators of 16 lanes, with 3 + 5 loads, in 32 registers.
    conv1_weight::<lanes::Avx512, 16, 3>(dweight, accumulate, dout, shifted, cout);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn conv1_weight_avx2(
    dweight: &mut [f32],
    accumulate: bool,
    dout: &[f32],
    shifted: &[f32],
    cout: usize,
) {
    // 2 channels x 5 taps: 10 accumulators of 8 lanes, in 16 registers.
    conv1_weight::<lanes::Avx2x8, 8, 2>(dweight, accumulate, dout, shifted, cout);
}

/// The body of [`direct_conv1_weight`] for W lanes (V's width), channels in groups of G (a tap
/// row's 5 taps at once, so each load of dout serves 5 FMAs and each shifted load G).
///
/// # Safety
/// As for `V`'s methods: the CPU has V's instruction set.
#[inline(always)]
unsafe fn conv1_weight<V: lanes::Native, const W: usize, const G: usize>(
    dweight: &mut [f32],
    accumulate: bool,
    dout: &[f32],
    shifted: &[f32],
    cout: usize,
) {
    const HW: usize = DIRECT_SIDE * DIRECT_SIDE;
    const { assert!(HW.is_multiple_of(W) && HORIZONTAL_KC.is_multiple_of(W) && V::W == W) };
    let total = shifted.len() / SHIFTED_LEN * HW;
    assert!(dout.len() == total / HW * cout * HW, "conv1_weight: the gradient does not match the images");
    let mut first = !accumulate;
    for start in (0..total).step_by(HORIZONTAL_KC) {
        let end = (start + HORIZONTAL_KC).min(total);
        let mut co = 0;
        while co < cout {
            let g = if cout - co >= G { G } else { 1 };
            for ky in 0..5 {
                let mut sums = [[0f32; 5]; G];
                if g == G {
                    conv1_weight_pass::<V, W, G>(&mut sums, dout, shifted, cout, co, ky, start, end);
                } else {
                    let one: &mut [[f32; 5]; 1] = (&mut sums[..1]).try_into().unwrap();
                    conv1_weight_pass::<V, W, 1>(one, dout, shifted, cout, co, ky, start, end);
                }
                for (c, sums) in sums.iter().enumerate().take(g) {
                    let dst = &mut dweight[(co + c) * 25 + ky * 5..][..5];
                    for (d, &v) in dst.iter_mut().zip(sums) {
                        *d = if first { v } else { v + *d };
                    }
                }
            }
            co += g;
        }
        first = false;
    }
}

/// One pass (pixels start..end of the block) for channels co..co + G and tap row ky: the lane
/// sums, reduced. Lane l of each accumulator takes the pixels at l modulo W, in order.
///
/// # Safety
/// As for `V`'s methods: the CPU has V's instruction set.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn conv1_weight_pass<V: lanes::Native, const W: usize, const G: usize>(
    sums: &mut [[f32; 5]; G],
    dout: &[f32],
    shifted: &[f32],
    cout: usize,
    co: usize,
    ky: usize,
    start: usize,
    end: usize,
) {
    const HW: usize = DIRECT_SIDE * DIRECT_SIDE;
    let copy_len = SHIFTED_ROWS * DIRECT_SIDE;
    let mut acc = [[V::zero(); 5]; G];
    let mut k = start;
    while k < end {
        // The run of pixels of one image inside this pass.
        let (j, p0) = (k / HW, k % HW);
        let p1 = (p0 + end - k).min(HW);
        // The image's G gradient planes and its shifted copies (bounds checked here; every load
        // below is W values at p < p1 <= HW, p a multiple of W, inside them).
        let d = &dout[(j * cout + co) * HW..][..G * HW];
        let img = &shifted[j * SHIFTED_LEN..][..SHIFTED_LEN];
        const { assert!(4 * DIRECT_SIDE + HW <= SHIFTED_ROWS * DIRECT_SIDE) };
        for p in (p0..p1).step_by(W) {
            let dv: [V; G] = std::array::from_fn(|c| V::loadu(d.as_ptr().add(c * HW + p)));
            for kx in 0..5 {
                let x = V::loadu(img.as_ptr().add(kx * copy_len + ky * DIRECT_SIDE + p));
                for (acc, &dv) in acc.iter_mut().zip(&dv) {
                    acc[kx] = acc[kx].fma(x, dv);
                }
            }
        }
        k += p1 - p0;
    }
    for (sums, acc) in sums.iter_mut().zip(&acc) {
        for (s, acc) in sums.iter_mut().zip(acc) {
            let mut lanes = [0f32; W];
            acc.storeu(lanes.as_mut_ptr());
            *s = reduce_lanes(&lanes);
        }
    }
}

/// The `gemm` crate's horizontal sum of one vector's lanes (its `reduce_sum`): the upper half
/// added to the lower while more than 4 lanes remain, then (a0 + a2) + (a1 + a3).
#[inline(always)]
fn reduce_lanes<const W: usize>(lanes: &[f32; W]) -> f32 {
    let mut v = *lanes;
    let mut n = W;
    while n > 4 {
        n /= 2;
        for i in 0..n {
            v[i] += v[i + n];
        }
    }
    (v[0] + v[2]) + (v[1] + v[3])
}

/// A block's weight gradient by im2col + GEMM: dweight[cout, ckk] (+)= d[cout, nb*hw] ·
/// colᵀ[nb*hw, ckk], where `d` is the block's output gradient gathered by channel and `inp` its
/// nb input images.
fn weight_block_gemm(dweight: &mut [f32], accumulate: bool, d: &[f32], inp: &[f32], s: &ConvShape) {
    let ConvDims { hw, ckk, in_len, .. } = conv_dims(s);
    let nb = inp.len() / in_len;
    let ld = nb * hw;
    with_buffer(&COL, ckk * ld, |col| {
        // The GEMM reads colᵀ best with each patch contiguous, but for one input channel the
        // patches are so short (K floats) that building them costs more than it saves: then
        // build col as the forward pass does.
        let ct = if s.in_channels > 1 {
            for j in 0..nb {
                im2col_t(&mut col[j * hw * ckk..], &inp[j * in_len..], s);
            }
            View { data: col, rs: ckk, cs: 1 }
        } else {
            for j in 0..nb {
                im2col(&mut col[j * hw..], ld, &inp[j * in_len..], s);
            }
            View { data: col, rs: 1, cs: ld }
        };
        let dv = View { data: d, rs: ld, cs: 1 };
        matmul(dweight, ckk, accumulate, dv, ct, s.out_channels, ckk, ld);
    });
}

/// conv2's weight gradient for one block of images without im2col: `dweight[co, tap]` (+)= the
/// sum over the block's pixels of `dt[pixel][co]` (the output gradient, pixel-major: see
/// [`pixel_major_from_pool`]) times the input under that tap, in the order the GEMM path
/// sums it: passes of [`super::isa::gemm_pass`] pixels, each from zero in order with FMAs and
/// then added to the destination (or stored, for the first pass when not accumulating). The
/// same bits as [`weight_block_gemm`] (a unit test compares them on each instruction set). False
/// (nothing done) for another shape or the generic instruction set.
///
/// Why: im2col wrote every image 25 times over (60 KB) for this product. Here a tap's 16
/// channels are one vector (two on AVX2), as is a pixel's output gradient, and each pixel's
/// input under a run of taps is read in place.
fn direct_conv2_weight(
    dweight: &mut [f32],
    accumulate: bool,
    dt: &[[f32; DIRECT2_COUT]],
    inp: &[f32],
    s: &ConvShape,
    isa: super::isa::Isa,
) -> bool {
    if !direct2_fits(s) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        use super::isa::Isa;
        let ConvDims { hw, ckk, in_len, .. } = conv_dims(s);
        let (ho, wo, w) = (s.out_height(), s.out_width(), s.width);
        let nb = inp.len() / in_len;
        let ld = nb * hw;
        assert_eq!(dt.len(), ld, "direct_conv2_weight: one gradient vector a pixel");
        // at[pixel]: where the pixel's window starts in the block's input.
        let mut at = Vec::with_capacity(ld);
        for j in 0..nb {
            for y in 0..ho {
                at.extend((0..wo).map(|x| j * in_len + y * w + x));
            }
        }
        let job = Conv2Weight {
            dweight,
            accumulate,
            dt,
            at: &at,
            inp,
            s,
            pass: super::isa::gemm_pass(isa, ckk, DIRECT2_COUT, ld),
        };
        // SAFETY: the instruction set was checked against the CPU when it was selected.
        match isa {
            // 2 tap rows (10 taps) x 1 vector: 10 accumulators of the 32 registers.
            Isa::Avx512 => unsafe { conv2_weight_avx512(job) },
            // 1 tap row (5 taps) x 2 vectors: 10 accumulators of the 16 registers.
            Isa::Avx2 => unsafe { conv2_weight_avx2(job) },
            Isa::Generic => return false,
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dweight, accumulate, dt, inp, isa);
        false
    }
}

/// [`direct_conv2_weight`]'s operands, prepared.
struct Conv2Weight<'a> {
    dweight: &'a mut [f32],
    accumulate: bool,
    dt: &'a [[f32; DIRECT2_COUT]],
    at: &'a [usize],
    inp: &'a [f32],
    s: &'a ConvShape,
    /// Pixels per pass of the reduction.
    pass: usize,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn conv2_weight_avx512(job: Conv2Weight) {
    conv2_weight_rows::<lanes::Avx512, 2, 10>(job);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn conv2_weight_avx2(job: Conv2Weight) {
    conv2_weight_rows::<lanes::Avx2, 1, 5>(job);
}

/// The body of [`direct_conv2_weight`]: for each pass, the taps in groups of R rows of 5 (one
/// row at a time for the rest).
///
/// # Safety
/// As for `V`'s methods: the CPU has V's instruction set.
#[inline(always)]
unsafe fn conv2_weight_rows<V: lanes::Lanes16, const R: usize, const T: usize>(job: Conv2Weight) {
    let Conv2Weight { dweight, accumulate, dt, at, inp, s, pass } = job;
    let rows = s.in_channels * 5;
    for (i, first) in (0..dt.len()).step_by(pass).enumerate() {
        let px = first..(first + pass).min(dt.len());
        let store = i == 0 && !accumulate;
        let mut row = 0;
        while row < rows {
            if rows - row >= R {
                conv2_weight_taps::<V, R, T>(dweight, store, &dt[px.clone()], &at[px.clone()], inp, s, row);
                row += R;
            } else {
                conv2_weight_taps::<V, 1, 5>(dweight, store, &dt[px.clone()], &at[px.clone()], inp, s, row);
                row += 1;
            }
        }
    }
}

/// Tap rows `row..row + R` (row = ci * 5 + ky, T = 5R taps) over one pass's pixels: their
/// sums stored into, or added to, `dweight[co, row * 5 + kx]`.
///
/// # Safety
/// As for `V`'s methods: the CPU has V's instruction set.
#[inline(always)]
unsafe fn conv2_weight_taps<V: lanes::Lanes16, const R: usize, const T: usize>(
    dweight: &mut [f32],
    store: bool,
    dt: &[[f32; DIRECT2_COUT]],
    at: &[usize],
    inp: &[f32],
    s: &ConvShape,
    row: usize,
) {
    const { assert!(T == 5 * R) };
    let (h, w) = (s.height, s.width);
    let ckk = s.in_channels * 25;
    // Where each tap reads relative to a pixel's window, in the taps' order.
    let taps: [usize; T] =
        std::array::from_fn(|t| ((row + t / 5) / 5) * h * w + ((row + t / 5) % 5) * w + t % 5);
    // Every read below is at a pixel's window start plus a tap: inside `inp` if the last is.
    let last = at.iter().max().map_or(0, |&a| a + taps[T - 1]);
    assert!(dt.len() == at.len() && last < inp.len(), "conv2_weight_taps: a window outside the input");
    let mut acc = [V::zero(); T];
    for (dv, &at) in dt.iter().zip(at) {
        let g = V::load(dv);
        let window = inp.as_ptr().add(at);
        for (a, &t) in acc.iter_mut().zip(&taps) {
            // SAFETY: at + t <= last < inp.len() (checked above).
            *a = a.fma(*window.add(t), g);
        }
    }
    for (t, acc) in acc.iter().enumerate() {
        for (co, a) in acc.to_array().into_iter().enumerate() {
            let dw = &mut dweight[co * ckk + row * 5 + t];
            *dw = if store { a } else { *dw + a };
        }
    }
}

/// Vector types for kernels written once for both instruction sets: [`lanes::Lanes16`] (16
/// lanes: one AVX-512 register, or two AVX2 ones) and [`lanes::Native`] (the instruction set's
/// own width). Intrinsics rather than arrays of f32, which the compiler left as scalar FMAs on
/// memory in [`conv2_weight_taps`], and kept as memory operands or spilled in
/// [`conv1_weight_pass`].
mod lanes {
    #[cfg(target_arch = "x86_64")]
    use std::arch::x86_64::*;

    /// # Safety
    /// Every method needs the CPU to have the type's instruction set, and is meant to be inlined
    /// into a function compiled for it.
    pub unsafe trait Lanes16: Copy {
        unsafe fn zero() -> Self;
        unsafe fn load(v: &[f32; 16]) -> Self;
        /// self + x * g, one rounding per lane.
        unsafe fn fma(self, x: f32, g: Self) -> Self;
        unsafe fn to_array(self) -> [f32; 16];
        /// Lanes shift..shift + N hold `src`, the others 0. shift + N <= 16.
        unsafe fn load_window<const N: usize>(src: &[f32; N], shift: usize) -> Self;
        unsafe fn add(self, other: Self) -> Self;
    }

    /// Portable lanes (the kernels' order checked outside the instruction sets).
    unsafe impl Lanes16 for [f32; 16] {
        unsafe fn zero() -> Self {
            [0.0; 16]
        }
        unsafe fn load(v: &[f32; 16]) -> Self {
            *v
        }
        unsafe fn fma(self, x: f32, g: Self) -> Self {
            std::array::from_fn(|l| x.mul_add(g[l], self[l]))
        }
        unsafe fn to_array(self) -> [f32; 16] {
            self
        }
        unsafe fn load_window<const N: usize>(src: &[f32; N], shift: usize) -> Self {
            let mut v = [0.0; 16];
            v[shift..shift + N].copy_from_slice(src);
            v
        }
        unsafe fn add(self, other: Self) -> Self {
            std::array::from_fn(|l| self[l] + other[l])
        }
    }

    /// One AVX-512 register.
    #[cfg(target_arch = "x86_64")]
    #[derive(Clone, Copy)]
    pub struct Avx512(__m512);

    #[cfg(target_arch = "x86_64")]
    unsafe impl Lanes16 for Avx512 {
        #[inline(always)]
        unsafe fn zero() -> Self {
            Avx512(_mm512_setzero_ps())
        }
        #[inline(always)]
        unsafe fn load(v: &[f32; 16]) -> Self {
            Avx512(_mm512_loadu_ps(v.as_ptr()))
        }
        #[inline(always)]
        unsafe fn fma(self, x: f32, g: Self) -> Self {
            Avx512(_mm512_fmadd_ps(_mm512_set1_ps(x), g.0, self.0))
        }
        #[inline(always)]
        unsafe fn to_array(self) -> [f32; 16] {
            let mut out = [0.0; 16];
            _mm512_storeu_ps(out.as_mut_ptr(), self.0);
            out
        }
        #[inline(always)]
        unsafe fn load_window<const N: usize>(src: &[f32; N], shift: usize) -> Self {
            debug_assert!(shift + N <= 16);
            // The masked-out lanes are not read, so the address before `src` is never touched.
            let mask = (((1u32 << N) - 1) << shift) as u16;
            Avx512(_mm512_maskz_loadu_ps(mask, src.as_ptr().wrapping_sub(shift)))
        }
        #[inline(always)]
        unsafe fn add(self, other: Self) -> Self {
            Avx512(_mm512_add_ps(self.0, other.0))
        }
    }

    /// Two AVX2 registers.
    #[cfg(target_arch = "x86_64")]
    #[derive(Clone, Copy)]
    pub struct Avx2([__m256; 2]);

    #[cfg(target_arch = "x86_64")]
    unsafe impl Lanes16 for Avx2 {
        #[inline(always)]
        unsafe fn zero() -> Self {
            Avx2([_mm256_setzero_ps(); 2])
        }
        #[inline(always)]
        unsafe fn load(v: &[f32; 16]) -> Self {
            Avx2([_mm256_loadu_ps(v.as_ptr()), _mm256_loadu_ps(v.as_ptr().add(8))])
        }
        #[inline(always)]
        unsafe fn fma(self, x: f32, g: Self) -> Self {
            let x = _mm256_set1_ps(x);
            Avx2([_mm256_fmadd_ps(x, g.0[0], self.0[0]), _mm256_fmadd_ps(x, g.0[1], self.0[1])])
        }
        #[inline(always)]
        unsafe fn to_array(self) -> [f32; 16] {
            let mut out = [0.0; 16];
            _mm256_storeu_ps(out.as_mut_ptr(), self.0[0]);
            _mm256_storeu_ps(out.as_mut_ptr().add(8), self.0[1]);
            out
        }
        #[inline(always)]
        unsafe fn load_window<const N: usize>(src: &[f32; N], shift: usize) -> Self {
            debug_assert!(shift + N <= 16);
            // Lane l reads src[l - shift] where shift <= l < shift + N; the masked-out lanes
            // are not read, so the addresses outside `src` are never touched.
            let base = src.as_ptr().wrapping_sub(shift);
            let (lo, hi) = (shift as i32, (shift + N) as i32);
            let half = |first: i32| {
                let lane =
                    _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(first));
                let from = _mm256_cmpgt_epi32(lane, _mm256_set1_epi32(lo - 1));
                let to = _mm256_cmpgt_epi32(_mm256_set1_epi32(hi), lane);
                _mm256_and_si256(from, to)
            };
            Avx2([_mm256_maskload_ps(base, half(0)), _mm256_maskload_ps(base.wrapping_add(8), half(8))])
        }
        #[inline(always)]
        unsafe fn add(self, other: Self) -> Self {
            Avx2([_mm256_add_ps(self.0[0], other.0[0]), _mm256_add_ps(self.0[1], other.0[1])])
        }
    }

    /// One vector of the instruction set's native width (W lanes), for kernels whose order
    /// follows that width (the `gemm` crate's lanes).
    ///
    /// # Safety
    /// As for [`Lanes16`].
    pub unsafe trait Native: Copy {
        const W: usize;
        unsafe fn zero() -> Self;
        /// W values from `p`.
        unsafe fn loadu(p: *const f32) -> Self;
        /// self + a * b, one rounding per lane.
        unsafe fn fma(self, a: Self, b: Self) -> Self;
        /// The W lanes to `p`.
        unsafe fn storeu(self, p: *mut f32);
    }

    /// One AVX2 register (8 lanes).
    #[cfg(target_arch = "x86_64")]
    #[derive(Clone, Copy)]
    pub struct Avx2x8(__m256);

    /// [`Native`] for a one-register type from its intrinsics.
    macro_rules! native {
        ($t:ident, $w:literal, $zero:ident, $load:ident, $fma:ident, $store:ident) => {
            #[cfg(target_arch = "x86_64")]
            unsafe impl Native for $t {
                const W: usize = $w;
                #[inline(always)]
                unsafe fn zero() -> Self {
                    $t($zero())
                }
                #[inline(always)]
                unsafe fn loadu(p: *const f32) -> Self {
                    $t($load(p))
                }
                #[inline(always)]
                unsafe fn fma(self, a: Self, b: Self) -> Self {
                    $t($fma(a.0, b.0, self.0))
                }
                #[inline(always)]
                unsafe fn storeu(self, p: *mut f32) {
                    $store(p, self.0)
                }
            }
        };
    }
    native!(Avx512, 16, _mm512_setzero_ps, _mm512_loadu_ps, _mm512_fmadd_ps, _mm512_storeu_ps);
    native!(Avx2x8, 8, _mm256_setzero_ps, _mm256_loadu_ps, _mm256_fmadd_ps, _mm256_storeu_ps);
}

/// dweight = sum of the weight parts of `partials` in block order; dbias likewise.
fn sum_partials(dweight: &mut [f32], dbias: &mut [f32], partials: &[f32], wlen: usize) {
    let stride = wlen + dbias.len();
    let mut parts = partials.chunks(stride);
    let first = parts.next().expect("at least one block");
    dweight.copy_from_slice(&first[..wlen]);
    dbias.copy_from_slice(&first[wlen..]);
    for part in parts {
        for (d, &p) in dweight.iter_mut().zip(&part[..wlen]) {
            *d += p;
        }
        for (d, &p) in dbias.iter_mut().zip(&part[wlen..]) {
            *d += p;
        }
    }
}

/// Copies `channels` planes of h x w into `padded` (channels planes of (h+2p) x (w+2p)) with a
/// zero border of width p.
fn pad_planes(padded: &mut [f32], inp: &[f32], channels: usize, h: usize, w: usize, p: usize) {
    let (hp, wp) = (h + 2 * p, w + 2 * p);
    padded.fill(0.0);
    for ci in 0..channels {
        for y in 0..h {
            let src = &inp[(ci * h + y) * w..][..w];
            padded[(ci * hp + y + p) * wp + p..][..w].copy_from_slice(src);
        }
    }
}

/// [`maxpool_image`] compiled for the instruction set, so that its compares and selects
/// vectorise (16 or 8 outputs at once instead of SSE2's 4); LeNet's widths (28, 10) as constants.
/// The same selects, so the same values and indices.
fn maxpool_image_isa(
    out: &mut [f32],
    argmax: &mut [u32],
    inp: &[f32],
    base: usize,
    width: usize,
    isa: super::isa::Isa,
) {
    #[cfg(target_arch = "x86_64")]
    {
        use super::isa::Isa;
        #[target_feature(enable = "avx512f,avx2")]
        fn avx512(out: &mut [f32], argmax: &mut [u32], inp: &[f32], base: usize, width: usize) {
            maxpool_widths(out, argmax, inp, base, width);
        }
        #[target_feature(enable = "avx2")]
        fn avx2(out: &mut [f32], argmax: &mut [u32], inp: &[f32], base: usize, width: usize) {
            maxpool_widths(out, argmax, inp, base, width);
        }
        // SAFETY: the instruction set was checked against the CPU when it was selected.
        match isa {
            Isa::Avx512 => return unsafe { avx512(out, argmax, inp, base, width) },
            Isa::Avx2 => return unsafe { avx2(out, argmax, inp, base, width) },
            Isa::Generic => {}
        }
    }
    let _ = isa;
    maxpool_widths(out, argmax, inp, base, width);
}

#[inline(always)]
fn maxpool_widths(out: &mut [f32], argmax: &mut [u32], inp: &[f32], base: usize, width: usize) {
    match width {
        28 => maxpool_image(out, argmax, inp, base, 28),
        10 => maxpool_image(out, argmax, inp, base, 10),
        _ => maxpool_image(out, argmax, inp, base, width),
    }
}

/// Max-pools one image (all its channels) of width `width`; `base` is the image's offset in the
/// batch, added to the argmax indices.
#[inline(always)]
fn maxpool_image(out: &mut [f32], argmax: &mut [u32], inp: &[f32], base: usize, width: usize) {
    let wo = width / 2;
    for (row, (out, argmax)) in out.chunks_exact_mut(wo).zip(argmax.chunks_exact_mut(wo)).enumerate() {
        // Output row `row` of plane p = row / ho reads input rows 2*row and 2*row + 1 of
        // the image seen as one tall plane (H is even, so planes do not mix).
        let top_at = 2 * row * width;
        let top = &inp[top_at..][..2 * wo];
        let bottom = &inp[top_at + width..][..2 * wo];
        let first = (base + top_at) as u32;
        for x in 0..wo {
            // The first maximum in row-major order, with selects instead of branches
            // (random data makes the branches unpredictable).
            let (t0, t1, u0, u1) = (top[2 * x], top[2 * x + 1], bottom[2 * x], bottom[2 * x + 1]);
            let (mut m, mut off) = (t0, 0u32);
            if t1 > m {
                (m, off) = (t1, 1);
            }
            if u0 > m {
                (m, off) = (u0, width as u32);
            }
            if u1 > m {
                (m, off) = (u1, width as u32 + 1);
            }
            out[x] = m;
            argmax[x] = first.wrapping_add(2 * x as u32 + off);
        }
    }
}

/// [`super::reference::maxpool2x2_backward`] then ReLU's backward through the pool's input
/// `conv` (a ReLU output, positive exactly where ReLU let the gradient through), fused and split
/// by image.
///
/// dout, argmax: [B, C, H/2, W/2]; conv and dinp: [B, C, H, W]
#[allow(clippy::too_many_arguments)]
pub fn maxpool2x2_relu_backward(
    dinp: &mut [f32],
    dout: &[f32],
    argmax: &[u32],
    conv: &[f32],
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
) {
    let img_in = channels * height * width;
    let img_out = img_in / 4;
    assert_eq!(dinp.len(), batch * img_in);
    assert_eq!(conv.len(), dinp.len());
    assert_eq!(dout.len(), batch * img_out);
    assert_eq!(argmax.len(), dout.len());
    if img_out == 0 {
        dinp.fill(0.0);
        return;
    }
    dinp.par_chunks_mut(img_in).zip(conv.par_chunks(img_in)).enumerate().for_each(|(b, (dinp, conv))| {
        let r = b * img_out..(b + 1) * img_out;
        pool_relu_backward_image(dinp, &dout[r.clone()], &argmax[r], conv, b * img_in);
    });
}

/// The output gradient of the images `img0..img0 + dt.len() / HW` (HW = the conv's output
/// pixels; `pool` holds those images' pooled gradient, argmaxes and conv output, the argmaxes
/// indexing the whole batch) pixel-major, for [`direct_conv2_weight`]: `dt[j * HW + pixel][co]` is the gradient
/// [`pool_relu_backward_image`] gives image `img0 + j` at (co, pixel), the same values, scattered
/// straight from the pool's argmaxes instead of transposed from the channel-major gradient.
fn pixel_major_from_pool(
    dt: &mut [[f32; DIRECT2_COUT]],
    pool: (&[f32], &[u32], &[f32]),
    img0: usize,
    s: &ConvShape,
) {
    let (dpooled, argmax, conv) = pool;
    let hw = s.out_height() * s.out_width();
    let (out_len, pooled_len) = (s.out_channels * hw, s.out_channels * hw / 4);
    dt.fill([0.0; DIRECT2_COUT]);
    for (j, dt) in dt.chunks_exact_mut(hw).enumerate() {
        let img = img0 + j;
        let at = j * pooled_len..(j + 1) * pooled_len;
        let conv = &conv[j * out_len..][..out_len];
        let pooled = dpooled[at.clone()].chunks_exact(hw / 4).zip(argmax[at].chunks_exact(hw / 4));
        for (co, (dpooled, argmax)) in pooled.enumerate() {
            // Channel co's plane of the image's conv output.
            let base = img * out_len + co * hw;
            for (&g, &i) in dpooled.iter().zip(argmax) {
                let i = (i as usize).checked_sub(base).filter(|&i| i < hw).expect("argmax outside its plane");
                // A select, not a branch: the sign of conv is a coin toss to the predictor.
                dt[i][co] = if conv[co * hw + i] > 0.0 { g } else { 0.0 };
            }
        }
    }
}

/// [`maxpool2x2_relu_backward`] for one image: `base` is the image's offset in the batch's conv
/// (the argmaxes index the whole batch).
fn pool_relu_backward_image(dinp: &mut [f32], dout: &[f32], argmax: &[u32], conv: &[f32], base: usize) {
    dinp.fill(0.0);
    for (&g, &i) in dout.iter().zip(argmax) {
        let i = (i as usize).checked_sub(base).expect("argmax outside its image");
        dinp[i] = if conv[i] > 0.0 { g } else { 0.0 };
    }
}

/// Rows per block of the linear layers' batch-parallel GEMMs.
const LINEAR_ROWS: usize = 32;

/// See [`super::reference::linear_layer_forward`]: blocks of rows in parallel, each a GEMM.
fn linear_forward(out: &mut [f32], inp: &[f32], weight: &[f32], bias: &[f32], s: LinearShape, relu: bool) {
    let LinearShape { batch, in_features, out_features } = s;
    assert_eq!(inp.len(), batch * in_features);
    assert_eq!(weight.len(), out_features * in_features);
    assert_eq!(bias.len(), out_features);
    assert_eq!(out.len(), batch * out_features);
    if out.is_empty() {
        return;
    }
    let in_rows = LINEAR_ROWS * in_features.max(1);
    out.par_chunks_mut(LINEAR_ROWS * out_features).enumerate().for_each(|(blk, out)| {
        linear_rows(out, &inp[(blk * in_rows).min(inp.len())..], weight, bias, in_features, relu);
    });
}

/// One block of rows of [`linear_forward`]: out = bias + inp · weightᵀ as one GEMM, then ReLU.
fn linear_rows(out: &mut [f32], inp: &[f32], weight: &[f32], bias: &[f32], in_features: usize, relu: bool) {
    let out_features = bias.len();
    let rows = out.len() / out_features;
    for row in out.chunks_mut(out_features) {
        row.copy_from_slice(bias);
    }
    let x = View { data: inp, rs: in_features, cs: 1 };
    let wt = View { data: weight, rs: 1, cs: in_features };
    matmul(out, out_features, true, x, wt, rows, out_features, in_features);
    if relu {
        relu_in_place(out);
    }
}

/// See [`super::reference::linear_backward_input`]: dX = dY · W as one GEMM per fixed block of
/// rows, then ReLU's backward through `relu_mask` (the layer's input, a ReLU output) on the
/// block while it is in cache.
fn linear_backward_input(
    dinp: &mut [f32],
    dout: &[f32],
    weight: &[f32],
    s: LinearShape,
    relu_mask: Option<&[f32]>,
) {
    let LinearShape { batch, in_features, out_features } = s;
    assert_eq!(dinp.len(), batch * in_features);
    assert_eq!(dout.len(), batch * out_features);
    assert_eq!(weight.len(), out_features * in_features);
    if dinp.is_empty() {
        return;
    }
    dinp.par_chunks_mut(LINEAR_ROWS * in_features).enumerate().for_each(|(blk, dinp)| {
        let rows = blk * LINEAR_ROWS..blk * LINEAR_ROWS + dinp.len() / in_features;
        let mask = relu_mask.map(|m| &m[rows.start * in_features..rows.end * in_features]);
        input_grad_rows(dinp, &dout[rows.start * out_features..], weight, out_features, mask);
    });
}

/// One block of rows of [`linear_backward_input`].
fn input_grad_rows(
    dinp: &mut [f32],
    dout: &[f32],
    weight: &[f32],
    out_features: usize,
    mask: Option<&[f32]>,
) {
    let in_features = weight.len() / out_features;
    let rows = dinp.len() / in_features;
    let d = View { data: dout, rs: out_features, cs: 1 };
    let w = View { data: weight, rs: in_features, cs: 1 };
    matmul(dinp, in_features, false, d, w, rows, in_features, out_features);
    if let Some(mask) = mask {
        relu_backward_in_place(dinp, mask);
    }
}

/// [`Ops::head_forward_backward`] in two parallel passes instead of the five of its layer
/// ops: each block of rows of the batch goes forward through the three layers, the loss, and
/// back to the head's input (each of those its own op's rows, [`linear_rows`],
/// [`input_grad_rows`], the reference's loss); then the three layers' weight gradients, side by
/// side. Every value is computed as the layer ops compute it (the same blocks of rows, the same
/// GEMMs), so the same bits; at LeNet's sizes the layer ops' fork-joins and the loss's copies
/// cost more than their arithmetic.
fn head_forward_backward(a: Head<Fast>) -> Result<()> {
    let HeadArgs { input, layers: [l1, l2, l3], labels, losses, correct, dinput, s } = a;
    let [f0, f1, f2, f3] = s.features;
    let b = s.batch;
    let layer_lens = |l: &HeadLayerArgs<Vec<f32>>, fin: usize, fout: usize| {
        l.weight.len() == fout * fin
            && l.bias.len() == fout
            && l.out.len() == b * fout
            && l.dout.len() == b * fout
            && l.dweight.len() == fout * fin
            && l.dbias.len() == fout
    };
    let lens = input.len() == b * f0
        && dinput.len() == b * f0
        && labels.len() == b
        && losses.len() == b
        && correct.len() == b
        && layer_lens(&l1, f0, f1)
        && layer_lens(&l2, f1, f2)
        && layer_lens(&l3, f2, f3);
    ensure!(lens, "head_forward_backward: the tensors do not match {s:?}");
    ensure!(labels.iter().all(|&l| (l as usize) < f3), "a label is not below {f3}");
    let [s1, s2, s3] = s.layers();
    if s.features.contains(&0) || b == 0 {
        let layers = [l1, l2, l3];
        return head_by_layers(&mut Fast, HeadArgs { input, layers, labels, losses, correct, dinput, s });
    }
    let scale = 1.0 / b as f32;
    let r = LINEAR_ROWS;
    let (w1, w2, w3) = (l1.weight.as_slice(), l2.weight.as_slice(), l3.weight.as_slice());
    let (b1, b2, b3) = (l1.bias.as_slice(), l2.bias.as_slice(), l3.bias.as_slice());
    let forward =
        input.par_chunks(r * f0).zip(l1.out.par_chunks_mut(r * f1)).zip(l2.out.par_chunks_mut(r * f2));
    let loss = l3.out.par_chunks_mut(r * f3).zip(l3.dout.par_chunks_mut(r * f3)).zip(labels.par_chunks(r));
    let loss = loss.zip(losses.par_chunks_mut(r)).zip(correct.par_chunks_mut(r));
    let backward =
        l2.dout.par_chunks_mut(r * f2).zip(l1.dout.par_chunks_mut(r * f1)).zip(dinput.par_chunks_mut(r * f0));
    let blocks = forward.zip(loss).zip(backward);
    blocks.for_each(|((((x, h1), h2), ((((z, dz), lab), loss), corr)), ((dh2, dh1), dx))| {
        linear_rows(h1, x, w1, b1, f0, true);
        linear_rows(h2, h1, w2, b2, f1, true);
        linear_rows(z, h2, w3, b3, f2, false);
        let rows = XentRows { dlogits: dz, losses: loss, correct: corr, logits: z, labels: lab };
        super::reference::softmax_xent_rows(rows, f3, scale);
        input_grad_rows(dh2, dz, w3, f3, Some(h2));
        input_grad_rows(dh1, dh2, w2, f2, Some(h1));
        input_grad_rows(dx, dh1, w1, f1, None);
    });
    let (h1, h2) = (&*l1.out, &*l2.out);
    rayon::join(
        || linear_backward_weight(l1.dweight, l1.dbias, l1.dout, input, s1),
        || {
            rayon::join(
                || linear_backward_weight(l2.dweight, l2.dbias, l2.dout, h1, s2),
                || linear_backward_weight(l3.dweight, l3.dbias, l3.dout, h2, s3),
            )
        },
    );
    Ok(())
}

/// See [`super::reference::linear_backward_weight`]: dW = dYᵀ · X, split into fixed blocks of
/// output features; each weight gradient element is one GEMM reduction over the whole batch, in
/// batch order (no partial sums: the order is the GEMM's whatever the thread count).
fn linear_backward_weight(dweight: &mut [f32], dbias: &mut [f32], dout: &[f32], inp: &[f32], s: LinearShape) {
    let LinearShape { batch, in_features, out_features } = s;
    assert_eq!(dweight.len(), out_features * in_features);
    assert_eq!(dbias.len(), out_features);
    assert_eq!(dout.len(), batch * out_features);
    assert_eq!(inp.len(), batch * in_features);
    // dbias[o] = the batch-order sum of dout[., o], as `Iterator::sum` folds it (from its own
    // start value), accumulated a row of dout at a time: contiguous reads, vectorised over o.
    let start: f32 = std::iter::empty::<f32>().sum();
    dbias.fill(start);
    for row in dout.chunks_exact(out_features.max(1)) {
        for (db, &g) in dbias.iter_mut().zip(row) {
            *db += g;
        }
    }
    if batch == 0 {
        dweight.fill(0.0);
    }
    if dweight.is_empty() || batch == 0 {
        return;
    }
    const ROWS: usize = 16;
    dweight.par_chunks_mut(ROWS * in_features).enumerate().for_each(|(blk, dw)| {
        let rows = dw.len() / in_features;
        // dweight[o, i] = doutᵀ[o, b] · inp[b, i]
        let dt = View { data: &dout[blk * ROWS..], rs: 1, cs: out_features };
        let x = View { data: inp, rs: in_features, cs: 1 };
        matmul(dw, in_features, false, dt, x, rows, in_features, batch);
    });
}

/// x = max(x, 0) in place.
pub fn relu_in_place(x: &mut [f32]) {
    for v in x {
        *v = v.max(0.0);
    }
}

/// dx = 0 where y <= 0: ReLU's backward through its output `y`, in place.
pub fn relu_backward_in_place(dx: &mut [f32], y: &[f32]) {
    assert_eq!(dx.len(), y.len());
    for (d, &y) in dx.iter_mut().zip(y) {
        if y <= 0.0 {
            *d = 0.0;
        }
    }
}

/// One task of an optimizer update: a block of one tensor's elements and its gradient.
struct UpdateBlock<'a> {
    param: &'a mut [f32],
    /// The same block of each of the optimizer's state tensors.
    moments: Vec<&'a mut [f32]>,
    grad: &'a [f32],
    /// The tensor's size and this block's first element in it.
    n: usize,
    first: usize,
}

/// Every tensor split into fixed blocks of elements, as one list of tasks: one parallel pass
/// over all of them (element-wise, so any split gives the reference's bits).
fn update_blocks<'a>(
    params: &'a mut [Vec<f32>],
    grads: &'a [Vec<f32>],
    moments: &'a mut [Vec<Vec<f32>>],
) -> Result<Vec<UpdateBlock<'a>>> {
    let n = params.len();
    ensure!(grads.len() == n && moments.iter().all(|m| m.len() == n), "one gradient and state per tensor");
    let mut states: Vec<_> = moments.iter_mut().map(|m| m.iter_mut()).collect();
    let mut blocks = Vec::new();
    for (p, g) in params.iter_mut().zip(grads) {
        let n = p.len();
        let state: Vec<&mut Vec<f32>> =
            states.iter_mut().map(|m| m.next().expect("one per tensor")).collect();
        ensure!(state.iter().all(|m| m.len() == n), "optimizer state has the wrong size");
        if n == 0 {
            continue;
        }
        partials(g, n);
        let mut chunks: Vec<_> = state.into_iter().map(|m| m.chunks_mut(UPDATE_BLOCK)).collect();
        for (k, p) in p.chunks_mut(UPDATE_BLOCK).enumerate() {
            let moments = chunks.iter_mut().map(|c| c.next().expect("as long as the tensor")).collect();
            blocks.push(UpdateBlock { param: p, moments, grad: g, n, first: k * UPDATE_BLOCK });
        }
    }
    Ok(blocks)
}

/// Elements per task of the optimizer updates.
const UPDATE_BLOCK: usize = 8192;

/// One block of an optimizer step whose gradient is one tensor (no partials to sum, as the fast
/// path's backward ops leave it), as one vectorised pass compiled for the instruction set:
/// `step`'s [`optim::Rule::element`] on every element, the reference's operations in its order
/// (elementwise, no fused multiply-adds: the same bits as [`optim::update_span`]). False (nothing
/// done) for an optimizer not listed here or on the generic instruction set: the caller then
/// takes [`optim::update_span`] (the same bits, scalar), so a new optimizer works before it is
/// listed.
///
/// Why: [`optim::update_span`] sums each element's partials in a loop of unknown length and
/// reaches the element function through a pointer, so the compiler keeps it scalar and SSE2:
/// Adam's update of LeNet's 61,706 parameters cost 150-600 us, several times a streamed pass.
fn streamed_update(
    step: &optim::OptStep,
    isa: super::isa::Isa,
    param: &mut [f32],
    grad: &[f32],
    states: &mut [&mut [f32]],
) -> bool {
    use optim::{Adam, AdamW, RmsProp, Rule, Sgd};
    let k = &step.scalars;
    let lens = grad.len() == param.len() && states.iter().all(|s| s.len() == param.len());
    assert!(lens, "streamed_update: the slices do not match");
    if states.len() != step.moments() {
        return false;
    }
    match step.optimizer {
        Adam::NAME => span_for_isa::<Adam>(isa, k, param, grad, states),
        AdamW::NAME => span_for_isa::<AdamW>(isa, k, param, grad, states),
        Sgd::NAME => span_for_isa::<Sgd>(isa, k, param, grad, states),
        RmsProp::NAME => span_for_isa::<RmsProp>(isa, k, param, grad, states),
        _ => false,
    }
}

fn span_for_isa<R: optim::Rule>(
    isa: super::isa::Isa,
    k: &optim::Scalars,
    param: &mut [f32],
    grad: &[f32],
    states: &mut [&mut [f32]],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use super::isa::Isa;
        // SAFETY: the instruction set was checked against the CPU when it was selected.
        match isa {
            Isa::Avx512 => unsafe { span_avx512::<R>(k, param, grad, states) },
            Isa::Avx2 => unsafe { span_avx2::<R>(k, param, grad, states) },
            Isa::Generic => return false,
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, k, param, grad, states);
        false
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn span_avx512<R: optim::Rule>(
    k: &optim::Scalars,
    param: &mut [f32],
    grad: &[f32],
    states: &mut [&mut [f32]],
) {
    span_body::<R>(k, param, grad, states);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn span_avx2<R: optim::Rule>(
    k: &optim::Scalars,
    param: &mut [f32],
    grad: &[f32],
    states: &mut [&mut [f32]],
) {
    span_body::<R>(k, param, grad, states);
}

/// The element loop, one per state count, every slice zipped (no bounds checks, so it
/// vectorises once the element function is inlined).
#[inline(always)]
fn span_body<R: optim::Rule>(k: &optim::Scalars, param: &mut [f32], grad: &[f32], states: &mut [&mut [f32]]) {
    match states {
        [] => {
            for (p, &g) in param.iter_mut().zip(grad) {
                R::element(k, p, g, &mut [0.0; optim::MAX_STATES]);
            }
        }
        [a] => {
            for ((p, &g), a) in param.iter_mut().zip(grad).zip(a.iter_mut()) {
                let mut s = [*a, 0.0, 0.0];
                R::element(k, p, g, &mut s);
                *a = s[0];
            }
        }
        [a, b] => {
            for (((p, &g), a), b) in param.iter_mut().zip(grad).zip(a.iter_mut()).zip(b.iter_mut()) {
                let mut s = [*a, *b, 0.0];
                R::element(k, p, g, &mut s);
                (*a, *b) = (s[0], s[1]);
            }
        }
        [a, b, c] => {
            let states = a.iter_mut().zip(b.iter_mut()).zip(c.iter_mut());
            for ((p, &g), ((a, b), c)) in param.iter_mut().zip(grad).zip(states) {
                let mut s = [*a, *b, *c];
                R::element(k, p, g, &mut s);
                (*a, *b, *c) = (s[0], s[1], s[2]);
            }
        }
        _ => unreachable!("at most {} states", optim::MAX_STATES),
    }
}

/// The fast CPU path as an [`Ops`] implementation: im2col + GEMM convolutions, the layers'
/// ReLU and max-pool fused in, threads over the batch (see the module docs).
#[derive(Debug, Default)]
pub struct Fast;

impl Ops for Fast {
    super::host_buffers!();

    fn name(&self) -> String {
        "fast".into()
    }

    fn conv_relu_pool_forward(&mut self, input: &Vec<f32>, l: ConvLayer<Self>) -> Result<()> {
        conv_relu_pool_forward(input, l)
    }

    fn linear_forward(&mut self, a: LinearForward<Self>) -> Result<()> {
        linear_forward(a.out, a.input, a.weight, a.bias, a.s, a.relu);
        Ok(())
    }

    fn linear_backward(&mut self, a: LinearBackward<Self>) -> Result<()> {
        // dW and dX read the same dY and write disjoint buffers: one fork instead of two
        // parallel passes one after the other.
        let LinearBackwardArgs { dweight, dbias, dout, input, weight, s, dinput } = a;
        match dinput {
            Some(InputGradArgs { dinput, relu_mask }) => {
                if let Some(mask) = relu_mask {
                    ensure!(
                        mask.len() == dinput.len(),
                        "linear_backward: the ReLU mask does not match dinput"
                    );
                }
                rayon::join(
                    || linear_backward_weight(dweight, dbias, dout, input, s),
                    || linear_backward_input(dinput, dout, weight, s, relu_mask.map(|m| m.as_slice())),
                );
            }
            None => linear_backward_weight(dweight, dbias, dout, input, s),
        }
        Ok(())
    }

    fn conv_backward_from_pool(&mut self, a: ConvBackward<Self>) -> Result<()> {
        conv_backward_from_pool(a)
    }

    fn head_forward_backward(&mut self, a: Head<Self>) -> Result<()> {
        head_forward_backward(a)
    }

    fn trunk_forward(&mut self, a: TrunkForward<Self>) -> Result<()> {
        trunk_forward(a)
    }

    fn trunk_backward(&mut self, a: TrunkBackward<Self>) -> Result<()> {
        trunk_backward(a)
    }

    fn update(&mut self, a: Update<Self>) -> Result<()> {
        let step = a.step;
        let isa = super::isa::selected();
        update_blocks(a.params, a.grads, a.moments)?.into_par_iter().for_each(|mut b| {
            if b.grad.len() == b.n {
                let grad = &b.grad[b.first..][..b.param.len()];
                if streamed_update(step, isa, b.param, grad, &mut b.moments) {
                    return;
                }
            }
            optim::update_span(step, b.param, b.grad, b.n, b.first, &mut b.moments);
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::isa::Isa;

    fn conv1(batch: usize) -> ConvShape {
        ConvShape { batch, in_channels: 1, out_channels: 6, height: 28, width: 28, kernel: 5, padding: 2 }
    }

    /// Values of both signs spread over several binades, none zero (weights and biases).
    fn params(n: usize, seed: u32) -> Vec<f32> {
        values(n, seed)
            .iter()
            .enumerate()
            .map(|(i, &v)| if v == 0.0 { 0.25 + i as f32 * 1e-3 } else { v })
            .collect()
    }

    /// Values of both signs spread over several binades, zeros included (the first row and
    /// column of every image, as MNIST's borders).
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                if i % 28 == 0 || (i / 28) % 28 == 0 {
                    0.0
                } else {
                    (x % 20_001) as f32 / 10_000.0 - 1.0
                }
            })
            .collect()
    }

    fn isas() -> Vec<Isa> {
        [Isa::Avx512, Isa::Avx2].into_iter().filter(|i| i.supported()).collect()
    }

    /// The direct conv1 kernel gives the im2col + GEMM path's bits (conv output after ReLU), on
    /// each instruction set, for a whole block, a partial block and one image.
    #[test]
    fn direct_conv1_is_the_gemm_path_bit_for_bit() {
        let shapes: Vec<ConvShape> = [CONV_BLOCK, 5, 1].map(conv1).to_vec();
        assert_forward_is_the_gemm_path(direct_conv1, &shapes, 1);
    }

    /// A direct forward kernel: (out, input, weight, bias, shape, instruction set) -> whether it
    /// took the shape.
    type DirectForward = fn(&mut [f32], &[f32], &[f32], &[f32], &ConvShape, Isa) -> bool;

    /// `direct` gives conv_forward_block's bits on each instruction set for each shape, on
    /// inputs drawn from `seed`.
    fn assert_forward_is_the_gemm_path(direct: DirectForward, shapes: &[ConvShape], seed: u32) {
        for isa in isas() {
            for s in shapes {
                let inp = values(s.input_len(), seed);
                let (weight, bias) = (params(s.weight_len(), seed + 1), params(s.out_channels, seed + 2));
                let mut direct_out = vec![f32::NAN; s.output_len()];
                assert!(direct(&mut direct_out, &inp, &weight, &bias, s, isa));
                // The GEMM path with the same instruction set's GEMM.
                let mut gemm = vec![f32::NAN; s.output_len()];
                with_isa(isa, || conv_forward_block(&mut gemm, &inp, &weight, &bias, s, true));
                let same = direct_out.iter().zip(&gemm).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{isa:?} {s:?}");
            }
        }
    }

    /// Planted faults the bit comparison above must see: a tap read one column off, a weight's
    /// sign flipped (the comparison is not vacuous).
    #[test]
    fn direct_conv1_comparison_catches_planted_faults() {
        let Some(&isa) = isas().first() else { return };
        let s = conv1(2);
        let (inp, weight, bias) = (values(s.input_len(), 4), params(s.weight_len(), 5), params(6, 6));
        let mut want = vec![0.0; s.output_len()];
        assert!(direct_conv1(&mut want, &inp, &weight, &bias, &s, isa));
        let shifted: Vec<f32> = (0..inp.len()).map(|i| if i % 28 == 27 { 0.0 } else { inp[i + 1] }).collect();
        let mut flipped = weight.clone();
        flipped[7] = -flipped[7];
        for (inp, weight) in [(&shifted, &weight), (&inp, &flipped)] {
            let mut got = vec![0.0; s.output_len()];
            with_isa(isa, || conv_forward_block(&mut got, inp, weight, &bias, &s, true));
            assert_ne!(got, want);
        }
    }

    /// LeNet-5's conv2 and a shape with 3 input channels, uneven runs (a 19-wide output: runs of
    /// 5 or 10 and single pixels) and, for 8 images, 2,432 pixels: 5 passes of the weight
    /// gradient's reduction, the last one shorter.
    fn conv2_shapes(batch: usize) -> [ConvShape; 2] {
        [
            ConvShape {
                batch,
                in_channels: 6,
                out_channels: 16,
                height: 14,
                width: 14,
                kernel: 5,
                padding: 0,
            },
            ConvShape {
                batch,
                in_channels: 3,
                out_channels: 16,
                height: 20,
                width: 23,
                kernel: 5,
                padding: 0,
            },
        ]
    }

    /// The direct conv2 kernel gives the im2col + GEMM path's bits (conv output after ReLU), on
    /// each instruction set, for a whole block, a partial block and one image.
    #[test]
    fn direct_conv2_is_the_gemm_path_bit_for_bit() {
        let shapes: Vec<ConvShape> = [CONV_BLOCK, 5, 1].into_iter().flat_map(conv2_shapes).collect();
        let direct: DirectForward =
            |out, inp, weight, bias, s, isa| direct_conv2(out, inp, &tap_major(weight, s), bias, s, isa);
        assert_forward_is_the_gemm_path(direct, &shapes, 7);
    }

    /// Planted faults the bit comparison above must see: a tap read one column off, a weight's
    /// sign flipped, the taps summed in another order (the last input channel first).
    #[test]
    fn direct_conv2_comparison_catches_planted_faults() {
        let Some(&isa) = isas().first() else { return };
        let [s, _] = conv2_shapes(2);
        let (inp, weight, bias) = (values(s.input_len(), 10), params(s.weight_len(), 11), params(16, 12));
        let mut want = vec![0.0; s.output_len()];
        with_isa(isa, || conv_forward_block(&mut want, &inp, &weight, &bias, &s, true));
        let shifted: Vec<f32> = (0..inp.len()).map(|i| if i % 14 == 13 { 0.0 } else { inp[i + 1] }).collect();
        let mut flipped = weight.clone();
        flipped[7] = -flipped[7];
        // The order planted: input channels rotated in both operands, so each product is the
        // same and only the summation order differs.
        let plane = s.height * s.width;
        let rotate = |x: &[f32], len: usize| -> Vec<f32> {
            x.chunks(len * s.in_channels)
                .flat_map(|c| c[len * 5..].iter().chain(&c[..len * 5]))
                .copied()
                .collect()
        };
        let (rot_inp, rot_weight) = (rotate(&inp, plane), rotate(&weight, 25));
        for (inp, weight) in [(&shifted, &weight), (&inp, &flipped), (&rot_inp, &rot_weight)] {
            let mut got = vec![0.0; s.output_len()];
            assert!(direct_conv2(&mut got, inp, &tap_major(weight, &s), &bias, &s, isa));
            let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(!same);
        }
    }

    /// Each instruction set's Lanes16 does what the portable lanes do, lane for lane: windows at
    /// every shift (the masked lanes zero, nothing outside the source read into them), FMAs,
    /// adds.
    #[test]
    fn lanes16_match_the_portable_lanes() {
        use lanes::Lanes16;
        fn run<V: Lanes16>() -> Vec<[f32; 16]> {
            let src: [f32; 10] = std::array::from_fn(|i| i as f32 * 1.5 - 4.0);
            let g: [f32; 16] = std::array::from_fn(|i| 0.1 + i as f32 * 1e-3);
            // SAFETY: called only for instruction sets the CPU has (see below).
            unsafe {
                (0..=6)
                    .flat_map(|shift| {
                        let w = V::load_window(&src, shift);
                        [w.to_array(), w.fma(0.3, V::load(&g)).add(w).to_array()]
                    })
                    .collect()
            }
        }
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx2")]
            fn avx512() -> Vec<[f32; 16]> {
                run::<lanes::Avx512>()
            }
            #[target_feature(enable = "avx2,fma")]
            fn avx2() -> Vec<[f32; 16]> {
                run::<lanes::Avx2>()
            }
            let want = run::<[f32; 16]>();
            // The window at shift 1: lane 0 masked, lanes 1..11 the source, the rest masked.
            assert_eq!(want[2][..2], [0.0, -4.0]);
            assert_eq!(want[2][11..], [0.0; 5]);
            for isa in isas() {
                // SAFETY: `isas` lists what the CPU has.
                let got = unsafe {
                    if isa == Isa::Avx512 {
                        avx512()
                    } else {
                        avx2()
                    }
                };
                assert_eq!(got, want, "{isa:?}");
            }
        }
    }

    /// conv2's col2im on each instruction set (one vector register a row) gives the portable
    /// row-by-row adds' bits, for a whole block, a partial one and one image; a col with one
    /// entry 1% off does not.
    #[test]
    fn col2im_rows_isa_is_the_row_adds_bit_for_bit() {
        for isa in isas() {
            for s in [CONV_BLOCK, 5, 1].map(|b| conv2_shapes(b)[0]) {
                let ld = s.batch * 100;
                let col = values(150 * ld, 41);
                let mut want = vec![0.0; s.input_len()];
                let mut got = vec![f32::NAN; s.input_len()];
                for (j, (want, got)) in want
                    .chunks_mut(s.input_len() / s.batch)
                    .zip(got.chunks_mut(s.input_len() / s.batch))
                    .enumerate()
                {
                    col2im_rows::<10>(want, &col[j * 100..], ld, &s);
                    col2im_rows_isa(got, &col[j * 100..], ld, &s, isa);
                }
                let same = |got: &[f32]| got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same(&got), "{isa:?} {s:?}");
                let mut off = col.clone();
                off[ld * 77 + 3] *= 1.01;
                col2im_rows_isa(&mut got[..s.input_len() / s.batch], &off, ld, &s, isa);
                assert!(!same(&got), "{isa:?} {s:?}: the planted 1%");
            }
        }
    }

    /// A channel-major output gradient d[co, pixel] (`ld` pixels) pixel-major.
    fn pixel_major(d: &[f32], ld: usize) -> Vec<[f32; DIRECT2_COUT]> {
        let mut dt = vec![[0f32; DIRECT2_COUT]; ld];
        for (co, row) in d.chunks_exact(ld).enumerate() {
            for (t, &v) in dt.iter_mut().zip(row) {
                t[co] = v;
            }
        }
        dt
    }

    /// The direct conv2 weight gradient gives the im2col + GEMM path's bits, on each
    /// instruction set, stored or accumulated, for a whole block (LeNet's: 2 passes of 400
    /// pixels), a partial block and one image.
    #[test]
    fn direct_conv2_weight_is_the_gemm_path_bit_for_bit() {
        let shapes: Vec<ConvShape> = [CONV_BLOCK, 5, 1].into_iter().flat_map(conv2_shapes).collect();
        assert_weight_is_the_gemm_path(&shapes, 31, |direct, accumulate, d, inp, s, isa| {
            direct_conv2_weight(direct, accumulate, &pixel_major(d, s.output_len() / 16), inp, s, isa)
        });
    }

    /// A direct weight-gradient kernel gives the GEMM path's bits ([`weight_block_gemm`], or for
    /// conv1 its im2col form) on each instruction set for each shape, stored and accumulated,
    /// on inputs drawn from `seed`.
    fn assert_weight_is_the_gemm_path(
        shapes: &[ConvShape],
        seed: u32,
        direct: impl Fn(&mut [f32], bool, &[f32], &[f32], &ConvShape, Isa) -> bool,
    ) {
        for isa in isas() {
            for s in shapes {
                let (inp, d) = (values(s.input_len(), seed), params(s.output_len(), seed + 1));
                for accumulate in [false, true] {
                    let before = params(s.weight_len(), seed + 2);
                    let mut direct_out = before.clone();
                    assert!(direct(&mut direct_out, accumulate, &d, &inp, s, isa));
                    let mut gemm = before.clone();
                    with_isa(isa, || {
                        if s.in_channels == 1 {
                            conv1_weight_by_gemm(&mut gemm, accumulate, &d, &inp, s)
                        } else {
                            weight_block_gemm(&mut gemm, accumulate, &d, &inp, s)
                        }
                    });
                    let same = direct_out.iter().zip(&gemm).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{isa:?} {s:?} accumulate {accumulate}");
                }
            }
        }
    }

    /// Planted faults the comparison above must see: the input read one column off, one output
    /// gradient 1% off, and LeNet's block summed in one pass instead of two of 400.
    #[test]
    fn direct_conv2_weight_comparison_catches_planted_faults() {
        let Some(&isa) = isas().first() else { return };
        let [s, _] = conv2_shapes(CONV_BLOCK);
        assert_eq!(
            super::super::isa::gemm_pass(isa, 150, 16, 800),
            400,
            "the pass this test plants a fault in"
        );
        let (inp, d) = (values(s.input_len(), 34), params(s.output_len(), 35));
        let mut want = vec![0.0; s.weight_len()];
        with_isa(isa, || weight_block_gemm(&mut want, false, &d, &inp, &s));
        let shifted: Vec<f32> = (0..inp.len()).map(|i| if i % 14 == 13 { 0.0 } else { inp[i + 1] }).collect();
        let mut scaled = d.clone();
        scaled[123] *= 1.01;
        let same = |got: &[f32]| got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
        for (inp, d) in [(&shifted, &d), (&inp, &scaled)] {
            let mut got = vec![0.0; s.weight_len()];
            assert!(direct_conv2_weight(&mut got, false, &pixel_major(d, 800), inp, &s, isa));
            assert!(!same(&got));
        }
        // One pass: the same kernel body with the pass as long as the block.
        let (ckk, ld) = (150, 800);
        let dt = pixel_major(&d, ld);
        let at: Vec<usize> =
            (0..ld).map(|p| (p / 100) * s.input_len() / s.batch + (p % 100 / 10) * 14 + p % 10).collect();
        let mut got = vec![0.0; s.weight_len()];
        let job = Conv2Weight {
            dweight: &mut got,
            accumulate: false,
            dt: &dt,
            at: &at,
            inp: &inp,
            s: &s,
            pass: ld,
        };
        // SAFETY: portable lanes.
        unsafe { conv2_weight_rows::<[f32; 16], 1, 5>(job) };
        assert!(!same(&got), "one pass of {ld} over {ckk} taps");
    }

    /// conv1's weight gradient for a block of images (the GEMM path: gathered by channel, im2col,
    /// GEMM), on this thread's instruction set.
    fn conv1_weight_by_gemm(dweight: &mut [f32], accumulate: bool, dout: &[f32], inp: &[f32], s: &ConvShape) {
        let hw = 28 * 28;
        let mut d = vec![0.0; dout.len()];
        gather_channels(&mut d, dout, s.out_channels, hw);
        weight_block_gemm(dweight, accumulate, &d, inp, s);
    }

    /// The direct conv1 weight gradient gives the im2col + GEMM path's bits on each instruction
    /// set: a whole block (several passes of 1024 pixels, one ending inside an image), a partial
    /// block and one image, storing and accumulating.
    #[test]
    fn direct_conv1_weight_is_the_gemm_path_bit_for_bit() {
        let shapes: Vec<ConvShape> = [CONV_BLOCK, 5, 1].map(conv1).to_vec();
        assert_weight_is_the_gemm_path(&shapes, 21, direct_conv1_weight);
    }

    /// Planted faults the bit comparison above must see: the input read one column off, one
    /// output gradient 1% off, and the reduction summed in one pass instead of passes of 1024
    /// (the order alone: the GEMM over each image separately, then added).
    #[test]
    fn direct_conv1_weight_comparison_catches_planted_faults() {
        let Some(&isa) = isas().first() else { return };
        let s = conv1(CONV_BLOCK);
        let (inp, dout) = (values(s.input_len(), 24), params(s.output_len(), 25));
        let mut want = vec![0.0; s.weight_len()];
        assert!(direct_conv1_weight(&mut want, false, &dout, &inp, &s, isa));
        let shifted: Vec<f32> = (0..inp.len()).map(|i| if i % 28 == 27 { 0.0 } else { inp[i + 1] }).collect();
        let mut scaled = dout.clone();
        scaled[1000] *= 1.01;
        for (inp, dout) in [(&shifted, &dout), (&inp, &scaled)] {
            let mut got = vec![0.0; s.weight_len()];
            with_isa(isa, || conv1_weight_by_gemm(&mut got, false, dout, inp, &s));
            assert_ne!(got, want);
        }
        let mut per_image = vec![0.0; s.weight_len()];
        let one = conv1(1);
        for (j, (inp, dout)) in inp.chunks(one.input_len()).zip(dout.chunks(one.output_len())).enumerate() {
            with_isa(isa, || conv1_weight_by_gemm(&mut per_image, j > 0, dout, inp, &one));
        }
        assert_ne!(per_image, want);
    }

    /// The max-pool compiled per instruction set gives the scalar loop's maxima and indices (the
    /// first maximum in row-major order on ties: ReLU outputs have many zeros), for LeNet's two
    /// widths and another; a planted fault (one index off by one) is seen.
    #[test]
    fn maxpool_per_isa_is_the_scalar_loop() {
        for isa in isas() {
            for (width, channels) in [(28, 6), (10, 16), (6, 2)] {
                let len = channels * width * width;
                // Rounded to a coarse grid and clamped at zero: many ties.
                let inp: Vec<f32> = values(len, 41).iter().map(|v| (v * 4.0).round().max(0.0)).collect();
                let base = 3 * len;
                let (mut want, mut want_at) = (vec![0.0; len / 4], vec![0u32; len / 4]);
                maxpool_image(&mut want, &mut want_at, &inp, base, width);
                let (mut got, mut got_at) = (vec![f32::NAN; len / 4], vec![0u32; len / 4]);
                maxpool_image_isa(&mut got, &mut got_at, &inp, base, width, isa);
                assert!(got == want && got_at == want_at, "{isa:?} width {width}");
                got_at[5] += 1;
                assert_ne!(got_at, want_at);
            }
        }
    }

    /// Every optimizer's settings the update branches on: each one's defaults, SGD with
    /// momentum, Nesterov and weight decay, RMSprop centered with momentum and weight decay.
    fn optimizer_kinds() -> Vec<optim::OptimizerKind> {
        let mut kinds: Vec<optim::OptimizerKind> = optim::RULES.iter().map(|d| d.default_kind()).collect();
        kinds.push(optim::Sgd { momentum: 0.9, nesterov: true, weight_decay: 5e-4 }.into());
        kinds.push(
            optim::RmsProp { alpha: 0.9, eps: 1e-7, weight_decay: 1e-3, momentum: 0.5, centered: true }
                .into(),
        );
        kinds
    }

    /// Runs [`streamed_update`] (`true`) or [`optim::update_span`] on copies of the same
    /// parameters, gradient and states; the parameters and states after (None when
    /// [`streamed_update`] does not list the optimizer).
    fn one_update(step: &optim::OptStep, isa: Isa, streamed: bool, grad: &[f32]) -> Option<Vec<Vec<f32>>> {
        // 1,000 elements: not a whole number of 16- or 8-lane vectors, so the tails run too.
        let n = grad.len();
        let mut param = params(n, 11);
        // States as a run leaves them: non-negative where the optimizer keeps squares.
        let mut states: Vec<Vec<f32>> = (0..step.moments())
            .map(|i| values(n, 12 + i as u32).iter().map(|v| v.abs() * 1e-2).collect())
            .collect();
        let mut refs: Vec<&mut [f32]> = states.iter_mut().map(|s| s.as_mut_slice()).collect();
        if streamed {
            if !streamed_update(step, isa, &mut param, grad, &mut refs) {
                return None;
            }
        } else {
            optim::update_span(step, &mut param, grad, n, 0, &mut refs);
        }
        Some(std::iter::once(param).chain(states).collect())
    }

    /// The vectorised optimizer pass gives [`optim::update_span`]'s bits for every optimizer it
    /// lists (today's four, each with the settings its element function branches on), on each
    /// instruction set.
    #[test]
    fn streamed_update_is_update_span_bit_for_bit() {
        let grad = params(1000, 10);
        for isa in isas() {
            let mut streamed = Vec::new();
            for kind in optimizer_kinds() {
                let step = optim::Optimizer { kind, lr: 1e-2 }.step(7, 1e-2, None);
                let want = one_update(&step, isa, false, &grad).unwrap();
                let Some(got) = one_update(&step, isa, true, &grad) else { continue };
                let bits =
                    |t: &Vec<Vec<f32>>| -> Vec<u32> { t.iter().flatten().map(|v| v.to_bits()).collect() };
                assert!(bits(&got) == bits(&want), "{isa:?} {kind:?}");
                streamed.push(step.optimizer);
            }
            for name in ["adam", "sgd", "adamw", "rmsprop"] {
                assert!(streamed.contains(&name), "{isa:?}: {name} not streamed");
            }
        }
    }

    /// Planted faults the comparison above must see: one element's gradient 1% off, and the
    /// gradient read one element late.
    #[test]
    fn streamed_update_comparison_catches_planted_faults() {
        let Some(&isa) = isas().first() else { return };
        let grad = params(1000, 10);
        let mut scaled = grad.clone();
        scaled[999] *= 1.01;
        let mut late = grad.clone();
        late.rotate_left(1);
        let step = optim::Optimizer::default().step(7, 1e-3, None);
        let want = one_update(&step, isa, false, &grad);
        for grad in [scaled, late] {
            assert_ne!(one_update(&step, isa, true, &grad), want);
        }
    }

    /// Runs `f` (on this thread) with `isa`'s GEMM instead of the process's.
    fn with_isa(isa: Isa, f: impl FnOnce()) {
        TEST_ISA.with(|t| t.set(Some(isa)));
        f();
        TEST_ISA.with(|t| t.set(None));
    }

    /// im2col with padding written directly equals im2col of a zero-bordered copy.
    #[test]
    fn padded_im2col_equals_the_padded_copys() {
        let shapes = [
            (28, 28, 5, 2, 1),
            (28, 28, 5, 2, 2),
            (30, 28, 5, 2, 1),
            (7, 9, 3, 1, 2),
            (5, 5, 5, 4, 1),
            (6, 4, 3, 2, 3),
        ];
        for (h, w, k, p, cin) in shapes {
            let s = ConvShape {
                batch: 1,
                in_channels: cin,
                out_channels: 1,
                height: h,
                width: w,
                kernel: k,
                padding: p,
            };
            let inp = values(s.input_len(), 7);
            let (ho, wo) = (s.out_height(), s.out_width());
            let ld = ho * wo + 3;
            let ckk = cin * k * k;
            let mut got = vec![f32::NAN; ckk * ld];
            im2col(&mut got, ld, &inp, &s);
            let (hp, wp) = (h + 2 * p, w + 2 * p);
            let mut padded = vec![0.0; cin * hp * wp];
            pad_planes(&mut padded, &inp, cin, h, w, p);
            let mut want = vec![f32::NAN; ckk * ld];
            im2col_unpadded(&mut want, ld, &padded, cin, hp, wp, &s);
            for r in 0..ckk {
                assert_eq!(got[r * ld..][..ho * wo], want[r * ld..][..ho * wo], "{s:?} row {r}");
            }
        }
    }
}
