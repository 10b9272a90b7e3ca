//! Resampling a rectangle of a source image onto an output grid, per axis: area averaging where the
//! output is coarser than the source (each output pixel is the mean of the source area it covers,
//! as MNIST's anti-aliased downscaling was) and bilinear interpolation where it is finer.
//!
//! Memory is the output plus one output row: the filter taps are computed as they are used, never
//! stored per source pixel, so a 1 x 60,000,000 source costs no more than a 28 x 28 one.

/// How one axis of the output maps onto the source: output pixel `i` covers the source interval
/// `[offset + i * step, offset + (i + 1) * step)`, in source pixels (pixel `j` spans `[j, j + 1)`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AxisMap {
    pub offset: f64,
    /// Source pixels per output pixel.
    pub step: f64,
}

impl AxisMap {
    /// The map that fits `source` pixels exactly onto `output` pixels.
    pub fn fit(source: usize, output: usize) -> AxisMap {
        AxisMap { offset: 0.0, step: source as f64 / output as f64 }
    }

    /// Calls `tap(j, weight)` for each source pixel `j` in `0..len` that output pixel `i` reads;
    /// weights sum to 1 when the whole footprint lies inside the source (source pixels outside
    /// `0..len` count as 0).
    #[inline]
    fn taps(&self, i: usize, len: usize, mut tap: impl FnMut(usize, f64)) {
        let lo = self.offset + i as f64 * self.step;
        if self.step > 1.0 {
            let hi = lo + self.step;
            let first = lo.floor().max(0.0);
            let end = hi.ceil().min(len as f64);
            let mut j = first;
            while j < end {
                let w = (hi.min(j + 1.0) - lo.max(j)) / self.step;
                if w > 0.0 {
                    tap(j as usize, w);
                }
                j += 1.0;
            }
        } else {
            // Bilinear at the output pixel's centre; pixel centres are at j + 0.5.
            let c = lo + 0.5 * self.step - 0.5;
            let j = c.floor();
            let f = c - j;
            if j >= 0.0 && j < len as f64 {
                tap(j as usize, 1.0 - f);
            }
            if f > 0.0 && j + 1.0 >= 0.0 && j + 1.0 < len as f64 {
                tap((j + 1.0) as usize, f);
            }
        }
    }
}

/// Resamples a `width` x `height` source, read through `value(x, y)`, onto `out_width` x
/// `out_height` pixels placed by `map_x` and `map_y`. Returns the output row-major.
pub fn resample(
    width: usize,
    height: usize,
    value: impl Fn(usize, usize) -> f32,
    map_x: AxisMap,
    map_y: AxisMap,
    out_width: usize,
    out_height: usize,
) -> Vec<f32> {
    // f64 sums: one output pixel may average millions of source pixels.
    let mut out = vec![0f32; out_width * out_height];
    let mut acc_row = vec![0f64; out_width];
    let mut row = vec![0f64; out_width];
    for (oy, out_row) in out.chunks_exact_mut(out_width.max(1)).enumerate().take(out_height) {
        acc_row.fill(0.0);
        map_y.taps(oy, height, |y, wy| {
            // The source row `y` reduced horizontally onto the output's columns.
            for (ox, r) in row.iter_mut().enumerate() {
                let mut acc = 0f64;
                map_x.taps(ox, width, |x, wx| acc += wx * value(x, y) as f64);
                *r = acc;
            }
            for (a, &r) in acc_row.iter_mut().zip(&row) {
                *a += wy * r;
            }
        });
        for (o, &a) in out_row.iter_mut().zip(&acc_row) {
            *o = a as f32;
        }
    }
    out
}
