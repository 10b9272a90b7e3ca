//! A digit image prepared as MNIST's were: the digit's box scaled to fit 20x20 (aspect kept, area
//! averaged), placed in 28x28 with its centre of mass at the centre, light ink on black, full
//! contrast. Photographs and drawings differ from MNIST in ways that are removed first:
//!
//! 1. **Overview.** The image is area-averaged to at most [`OVERVIEW_SIDE`] on its long side.
//! 2. **Background.** A smooth surface (quadratic in x and y) is fitted, robustly, to the medians
//!    of an 8x8 grid of blocks: uneven light and gray paper become a residual of 0, whatever the
//!    ink's share of a few blocks. A surface that bent to follow the ink (a digit filling the
//!    image) is replaced by one level, that of the pixels the border mostly holds.
//! 3. **Polarity.** Ink is the side of the residual with the most mass in pixels that stand out
//!    from the noise and have neighbours that do too (isolated specks do not count). When the
//!    surface missed part of the lighting, the sides are weighed after a local correction.
//! 4. **Ink's box.** Pixels above a third of the ink's contrast form connected components. The
//!    scenery (a table around the sheet, a shadow from the edge, ruled lines, a form's box) and
//!    specks away from the digit are set aside. No component, or a contrast under
//!    [`MIN_CONTRAST`], is [`Prepared::NoInk`]. Where the image is several strokes wide, the
//!    background gets a local correction (blocks four strokes wide) and the box is found again.
//! 5. **Close-up.** The box's region of the full-resolution image is resampled to
//!    [`CLOSEUP_SIDE`] on its long side; the same steps on it give a precise box, the ink's
//!    contrast, and an ink map stretched to 0-1 (background, specks and scenery set to 0).
//! 6. **Stroke width.** MNIST's strokes are about 2 px wide at its scale; a stroke that would come
//!    out much thinner (a fine pen on a large canvas) or much thicker (a marker) is grown or shrunk
//!    by a disc-shaped max or min filter towards [`STROKE_TARGET`].
//! 7. **Placement.** The box is scaled so its long side is [`BOX_SIDE`] pixels and resampled
//!    straight into 28x28, shifted so that its centre of mass lands on pixel (14, 14) (where
//!    MNIST's digits have theirs, in pixel indices).
//!
//! Every image made here has a fixed bound on its size, whatever the input's size or shape: the
//! memory used is the decoded image plus a few megabytes.

use super::resample::{resample, AxisMap};
use super::GrayImage;
use crate::model::{IMAGE_PIXELS, IMAGE_SIDE};

/// Longest side of the overview in which the ink is first found.
pub const OVERVIEW_SIDE: usize = 1024;
/// Longest side of the close-up of the ink's region.
pub const CLOSEUP_SIDE: usize = 192;
/// The long side of the digit's box in the output, as in MNIST.
pub const BOX_SIDE: f64 = 20.0;
/// Where the centre of mass goes, in pixel indices of the 28x28 output (MNIST's mean).
pub const CENTRE: f64 = 14.0;
/// Ink differing from the background by less than this (of full scale) is no ink.
pub const MIN_CONTRAST: f32 = 0.06;
/// A stroke is normalised towards this width (output pixels, MNIST's median) when its estimated
/// width lies outside [`STROKE_RANGE`].
pub const STROKE_TARGET: f64 = 2.2;
/// Stroke widths (output pixels) left as they are: about MNIST's own 5th to 97th percentiles.
pub const STROKE_RANGE: (f64, f64) = (1.5, 3.4);

/// Which way round ink and background are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Polarity {
    /// Dark ink on a light background (paper): inverted for the network.
    DarkOnLight,
    /// Light ink on a dark background, as MNIST is.
    LightOnDark,
}

/// What the preparation found, for messages and tests.
#[derive(Clone, Debug, PartialEq)]
pub struct InkReport {
    pub polarity: Polarity,
    /// The ink's contrast against the background, as a fraction of full scale.
    pub contrast: f32,
    /// The ink's box in source pixels: `[x0, y0, x1, y1]`, ends exclusive.
    pub ink_box: [f64; 4],
    /// The stroke width (output pixels) the digit would have had, and the one it has.
    pub stroke_width: (f64, f64),
}

/// The result of preparing one image.
#[derive(Clone, Debug, PartialEq)]
pub enum Prepared {
    /// A 28x28 light-on-dark digit, and what was found on the way.
    Digit { pixels: Box<[u8; IMAGE_PIXELS]>, report: InkReport },
    /// Nothing stands out from the background: a blank or too faint image.
    NoInk,
}

impl Prepared {
    pub fn pixels(&self) -> Option<&[u8; IMAGE_PIXELS]> {
        match self {
            Prepared::Digit { pixels, .. } => Some(&**pixels),
            Prepared::NoInk => None,
        }
    }
}

/// The 28x28 input for `img`, or `None` when it holds no ink.
pub fn to_mnist(img: &GrayImage) -> Option<[u8; IMAGE_PIXELS]> {
    prepare(img).pixels().copied()
}

/// A float image, row-major, values 0-1 (or residuals).
#[derive(Clone, Debug, PartialEq)]
pub struct Plane {
    pub width: usize,
    pub height: usize,
    pub values: Vec<f32>,
}

/// Prepares `img` as MNIST's digits were prepared (see the module's documentation).
pub fn prepare(img: &GrayImage) -> Prepared {
    if img.width == 0 || img.height == 0 || img.pixels.len() != img.width * img.height {
        return Prepared::NoInk;
    }
    // 1. Overview.
    let overview = overview(img);
    let (w, h) = (overview.width, overview.height);
    // 2. Background.
    let mut background = Background::fit(&overview);
    let residual = background.residual(&overview);
    let sigma = noise_scale(&residual.values);
    // 3. Polarity. Where the smooth surface left far more spread than the pixels' own noise, it
    // missed part of the lighting (a spot, a shadow), which could outweigh the ink: then polarity
    // is judged after a local correction.
    let misfit = sigma > 1.4 * difference_noise(&overview) && sigma > 4.0 / 255.0;
    let polarity = if misfit {
        detect_polarity_local(&overview, &background)
    } else {
        detect_polarity(&residual, sigma)
    };
    let Some(polarity) = polarity else { return Prepared::NoInk };
    let sign = if polarity == Polarity::LightOnDark { 1.0 } else { -1.0 };
    // 4. The ink's box.
    let ink = Plane { width: w, height: h, values: residual.values.iter().map(|&r| sign * r).collect() };
    let Some(mut found) = locate(&ink, sigma) else { return Prepared::NoInk };
    // Where blocks several strokes wide fit in the image: a local correction of the background
    // and the box again, with the scenery found before kept out (the correction would turn its
    // edges into thin bands).
    let block = ((4.0 * stroke_width(&found.mask, w, h)).ceil() as usize).max(w.max(h).div_ceil(16));
    if 4 * block <= w.max(h) {
        background.refine(&overview, sign, block);
        let away = dilate_mask(&found.scenery, w, h, 2);
        let residual = background.residual(&overview);
        let values =
            residual.values.iter().zip(&away).map(|(&r, &a)| if a { 0.0 } else { sign * r }).collect();
        let ink = Plane { width: w, height: h, values };
        match locate(&ink, noise_scale(&ink.values)) {
            Some(refound) => found = refound,
            None => return Prepared::NoInk,
        }
    }
    // 5. Close-up of the region around it, at full resolution.
    let (sx, sy) = (img.width as f64 / w as f64, img.height as f64 / h as f64);
    let [x0, y0, x1, y1] = found.bbox;
    let margin = 0.15 * ((x1 - x0).max(y1 - y0) as f64) + 2.0;
    let region = [
        (x0 as f64 - margin) * sx,
        (y0 as f64 - margin) * sy,
        (x1 as f64 + margin) * sx,
        (y1 as f64 + margin) * sy,
    ];
    let Some(closeup) = closeup(img, &background, sign, region) else { return Prepared::NoInk };
    finish(&closeup, polarity)
}

/// The digit among the overview's ink (`ink`: ink-positive residuals, noise `sigma`): pixels over
/// a third of the ink's contrast (and over the noise), grouped into components; `None` when
/// nothing stands out.
fn locate(ink: &Plane, sigma: f32) -> Option<Digit> {
    let contrast = ink_contrast(ink, sigma)?;
    if contrast < MIN_CONTRAST {
        return None;
    }
    let level = (4.0 * sigma).max(0.35 * contrast);
    find_digit(ink, |v| v > level)
}

/// The ink's close-up: ink-positive residuals of a region of the source, and where it lies.
struct Closeup {
    ink: Plane,
    /// Source coordinates of the close-up's (0, 0) corner, and source pixels per close-up pixel.
    origin: (f64, f64),
    step: f64,
}

/// Steps 5-7 on the close-up.
fn finish(closeup: &Closeup, polarity: Polarity) -> Prepared {
    let v = &closeup.ink;
    let sigma = difference_noise(v);
    let Some(contrast) = ink_contrast(v, sigma) else { return Prepared::NoInk };
    if contrast < MIN_CONTRAST {
        return Prepared::NoInk;
    }
    // The ink map: 0 at the noise (or a fraction of the contrast, for textured paper), 1 at the
    // contrast of the strokes' cores.
    let floor = (3.0 * sigma).max(0.15 * contrast).min(0.5 * contrast);
    let mut ink: Vec<f32> =
        v.values.iter().map(|&x| ((x - floor) / (contrast - floor)).clamp(0.0, 1.0)).collect();
    let ink_plane = Plane { width: v.width, height: v.height, values: ink.clone() };
    let Some(found) = find_digit(&ink_plane, |x| x >= BOX_INK) else { return Prepared::NoInk };
    // Only ink near the digit's components is kept: the rest is specks or texture.
    let near = dilate_mask(&found.mask, v.width, v.height, 3);
    for (x, &n) in ink.iter_mut().zip(&near) {
        if !n {
            *x = 0.0;
        }
    }
    let mut ink = Plane { width: v.width, height: v.height, values: ink };
    // 6. Stroke width, in output pixels, as it would come out.
    let long = |b: [usize; 4]| (b[2] - b[0]).max(b[3] - b[1]) as f64;
    let width_before = stroke_width(&found.mask, v.width, v.height) * BOX_SIDE / long(found.bbox);
    let mut bbox = found.bbox;
    let mut width_after = width_before;
    if !(STROKE_RANGE.0..=STROKE_RANGE.1).contains(&width_before) {
        // Growing by r on each side widens the stroke by 2r and the box by 2r; solve
        // (w + 2r) / (L + 2r) = target / BOX_SIDE for r, in close-up pixels.
        let (w, l) = (width_before * long(found.bbox) / BOX_SIDE, long(found.bbox));
        let r = (STROKE_TARGET * l - BOX_SIDE * w) / (2.0 * BOX_SIDE - 2.0 * STROKE_TARGET);
        // Thinning never takes away more than a third of the stroke.
        let r = r.clamp(-w / 3.0, 0.25 * l);
        ink = disc_filter(&ink, r.abs(), r > 0.0);
        let mask: Vec<bool> = ink.values.iter().map(|&x| x >= BOX_INK).collect();
        if let Some(b) = mask_bbox(&mask, v.width, v.height) {
            bbox = b;
            width_after = stroke_width(&mask, v.width, v.height) * BOX_SIDE / long(b);
        }
    }
    // 7. Scale the box to BOX_SIDE and put the centre of mass on CENTRE.
    let Some((cx, cy)) = centre_of_mass(&ink) else { return Prepared::NoInk };
    let step = long(bbox) / BOX_SIDE;
    // Output pixel i covers [offset + i*step, ...); its centre i + 0.5 maps to cx when i = CENTRE.
    let map = |c: f64| AxisMap { offset: c - (CENTRE + 0.5) * step, step };
    let out = resample(
        ink.width,
        ink.height,
        |x, y| ink.values[y * ink.width + x],
        map(cx),
        map(cy),
        IMAGE_SIDE,
        IMAGE_SIDE,
    );
    let mut pixels = Box::new([0u8; IMAGE_PIXELS]);
    for (p, &x) in pixels.iter_mut().zip(&out) {
        *p = (x * 255.0).round().clamp(0.0, 255.0) as u8;
    }
    let (ox, oy) = closeup.origin;
    let s = closeup.step;
    let ink_box =
        [ox + bbox[0] as f64 * s, oy + bbox[1] as f64 * s, ox + bbox[2] as f64 * s, oy + bbox[3] as f64 * s];
    Prepared::Digit {
        pixels,
        report: InkReport { polarity, contrast, ink_box, stroke_width: (width_before, width_after) },
    }
}

/// The ink map's level that counts as ink for the box and the stroke width: about half-way up the
/// stroke's edge, where a binary original's edge was.
const BOX_INK: f32 = 0.3;

/// Step 1: the image area-averaged to at most [`OVERVIEW_SIDE`] on its long side (never enlarged),
/// values 0-1.
pub fn overview(img: &GrayImage) -> Plane {
    let long = img.width.max(img.height);
    let (w, h) = if long <= OVERVIEW_SIDE {
        (img.width, img.height)
    } else {
        let scale = OVERVIEW_SIDE as f64 / long as f64;
        (
            ((img.width as f64 * scale).round() as usize).clamp(1, OVERVIEW_SIDE),
            ((img.height as f64 * scale).round() as usize).clamp(1, OVERVIEW_SIDE),
        )
    };
    let values = resample(
        img.width,
        img.height,
        |x, y| img.pixels[y * img.width + x] as f32 / 255.0,
        AxisMap::fit(img.width, w),
        AxisMap::fit(img.height, h),
        w,
        h,
    );
    Plane { width: w, height: h, values }
}

/// Step 2: the background as a quadratic surface over the image, in coordinates `u, v` that run
/// from 0 to 1 across it (so that it applies at any resolution).
#[derive(Clone, Debug, PartialEq)]
pub struct Background {
    /// 1, x, y, x^2, xy, y^2 with x = 2u - 1, y = 2v - 1.
    pub coefficients: [f64; 6],
    /// A local correction on top: a grid of values over the image, interpolated bilinearly
    /// between the cells' centres.
    pub local: Option<Plane>,
}

/// Grid of blocks whose medians the background is fitted to (along the long side).
const BACKGROUND_BLOCKS: usize = 8;

impl Background {
    pub fn at(&self, u: f64, v: f64) -> f32 {
        let t = terms(u, v);
        let smooth = t.iter().zip(&self.coefficients).map(|(t, c)| t * c).sum::<f64>() as f32;
        match &self.local {
            None => smooth,
            Some(grid) => smooth + grid_at(grid, u, v),
        }
    }

    /// Adds a local correction for what a smooth surface cannot follow (a shadow's edge, a
    /// lamp's spot): on a grid of blocks `block` pixels wide (several strokes wide), the 40th
    /// percentile of each block's ink-side residual (the background's level even where ink covers
    /// half the block), median-filtered over 3x3 blocks so that a block the ink fills is replaced
    /// by its neighbours.
    pub fn refine(&mut self, plane: &Plane, sign: f32, block: usize) {
        let (w, h) = (plane.width, plane.height);
        let residual = self.residual(plane);
        let (gw, gh) = (w.div_ceil(block), h.div_ceil(block));
        let edge = |i: usize, n: usize, cells: usize| (i * n + cells / 2) / cells;
        let mut grid = vec![0f32; gw * gh];
        let mut cell = Vec::new();
        for gy in 0..gh {
            for gx in 0..gw {
                cell.clear();
                for y in edge(gy, h, gh)..edge(gy + 1, h, gh) {
                    for x in edge(gx, w, gw)..edge(gx + 1, w, gw) {
                        cell.push(sign * residual.values[y * w + x]);
                    }
                }
                grid[gy * gw + gx] = percentile(&mut cell, 0.4);
            }
        }
        let mut filtered = vec![0f32; gw * gh];
        let mut around = Vec::with_capacity(9);
        for gy in 0..gh {
            for gx in 0..gw {
                around.clear();
                for ny in gy.saturating_sub(1)..(gy + 2).min(gh) {
                    for nx in gx.saturating_sub(1)..(gx + 2).min(gw) {
                        around.push(grid[ny * gw + nx]);
                    }
                }
                filtered[gy * gw + gx] = sign * percentile(&mut around, 0.5);
            }
        }
        self.local = Some(Plane { width: gw, height: gh, values: filtered });
    }

    /// Fits the background of `plane`: the medians of a grid of blocks (most of each block is
    /// background, whatever the polarity), then a quadratic surface through them by iteratively
    /// reweighted least squares with Tukey's biweight, so that blocks the ink dominates get no
    /// weight.
    pub fn fit(plane: &Plane) -> Background {
        let (w, h) = (plane.width, plane.height);
        let side = w.max(h).div_ceil(BACKGROUND_BLOCKS).max(1);
        let mut samples = Vec::new(); // (u, v, median)
        let mut block = Vec::with_capacity(side * side);
        for by in (0..h).step_by(side) {
            for bx in (0..w).step_by(side) {
                block.clear();
                let (ex, ey) = ((bx + side).min(w), (by + side).min(h));
                for y in by..ey {
                    block.extend_from_slice(&plane.values[y * w + bx..y * w + ex]);
                }
                let m = percentile(&mut block, 0.5);
                samples.push((
                    (bx + ex) as f64 / 2.0 / w as f64,
                    (by + ey) as f64 / 2.0 / h as f64,
                    m as f64,
                ));
            }
        }
        let mut medians: Vec<f32> = samples.iter().map(|s| s.2 as f32).collect();
        let mut fit = Background {
            coefficients: [percentile(&mut medians, 0.5) as f64, 0.0, 0.0, 0.0, 0.0, 0.0],
            local: None,
        };
        for _ in 0..10 {
            let mut errors: Vec<f32> =
                samples.iter().map(|&(u, v, m)| (m - fit.at(u, v) as f64).abs() as f32).collect();
            // The blocks' spread, floored at about one gray level of 8-bit noise after averaging.
            let scale = (1.4826 * percentile(&mut errors, 0.5) as f64).max(0.01);
            let c = 4.685 * scale;
            let mut ata = [[0f64; 6]; 6];
            let mut atb = [0f64; 6];
            let mut total = 0.0;
            for &(u, v, m) in &samples {
                let e = (m - fit.at(u, v) as f64) / c;
                if e.abs() >= 1.0 {
                    continue;
                }
                let wgt = (1.0 - e * e).powi(2);
                total += wgt;
                let t = terms(u, v);
                for i in 0..6 {
                    atb[i] += wgt * t[i] * m;
                    for j in 0..6 {
                        ata[i][j] += wgt * t[i] * t[j];
                    }
                }
            }
            if total <= 0.0 {
                break;
            }
            // A little ridge on the shape terms: with few blocks (a thin image) they are not
            // determined, and then they stay 0.
            for (i, row) in ata.iter_mut().enumerate().skip(1) {
                row[i] += 1e-3 * total;
            }
            match solve6(ata, atb) {
                Some(c) => fit.coefficients = c,
                None => break,
            }
        }
        // A surface that bends to follow the ink (a digit filling the image leaves few blocks of
        // background) leaves residuals spread far wider than any paper's noise: then the
        // background is one level, that of the class of pixels the border mostly holds.
        if noise_scale(&fit.residual(plane).values) > MAX_BACKGROUND_SPREAD {
            fit = Background::two_level(plane);
        }
        fit
    }

    /// A constant background from a two-class (Otsu) split of the pixels: the median of the class
    /// that holds most of the border's pixels (ties: the larger class).
    fn two_level(plane: &Plane) -> Background {
        let (w, h) = (plane.width, plane.height);
        let t = otsu_threshold(&plane.values);
        let (mut high_border, mut border) = (0usize, 0usize);
        for y in 0..h {
            for x in 0..w {
                if x == 0 || y == 0 || x + 1 == w || y + 1 == h {
                    border += 1;
                    high_border += (plane.values[y * w + x] > t) as usize;
                }
            }
        }
        let (mut low, mut high): (Vec<f32>, Vec<f32>) = plane.values.iter().partition(|&&v| v <= t);
        let high_is_background = match (2 * high_border).cmp(&border) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal => high.len() >= low.len(),
        };
        let level = if high_is_background { percentile(&mut high, 0.5) } else { percentile(&mut low, 0.5) };
        Background { coefficients: [level as f64, 0.0, 0.0, 0.0, 0.0, 0.0], local: None }
    }

    /// `plane` minus the background.
    pub fn residual(&self, plane: &Plane) -> Plane {
        let (w, h) = (plane.width, plane.height);
        let mut values = plane.values.clone();
        for y in 0..h {
            let v = (y as f64 + 0.5) / h as f64;
            for x in 0..w {
                values[y * w + x] -= self.at((x as f64 + 0.5) / w as f64, v);
            }
        }
        Plane { width: w, height: h, values }
    }
}

/// A background fit whose residuals spread wider than this (as a Gaussian's sigma, of full scale:
/// 20 gray levels) has followed the ink rather than the paper.
const MAX_BACKGROUND_SPREAD: f32 = 0.08;

/// Otsu's threshold: the value that best splits `values` (0-1) into two classes, on 256 bins.
fn otsu_threshold(values: &[f32]) -> f32 {
    let mut hist = [0u64; 256];
    for &v in values {
        hist[(v.clamp(0.0, 1.0) * 255.0).round() as usize] += 1;
    }
    let total = values.len() as f64;
    let sum_all: f64 = hist.iter().enumerate().map(|(i, &n)| i as f64 * n as f64).sum();
    let (mut best, mut best_t) = (-1.0, 127usize);
    let (mut n0, mut sum0) = (0f64, 0f64);
    for (t, &n) in hist.iter().enumerate() {
        n0 += n as f64;
        sum0 += t as f64 * n as f64;
        let n1 = total - n0;
        if n0 == 0.0 || n1 == 0.0 {
            continue;
        }
        let (m0, m1) = (sum0 / n0, (sum_all - sum0) / n1);
        let between = n0 * n1 * (m0 - m1) * (m0 - m1);
        if between > best {
            best = between;
            best_t = t;
        }
    }
    (best_t as f32 + 0.5) / 255.0
}

/// `grid`'s value at `u, v` (0-1 across the image): bilinear between cell centres, constant
/// beyond the outermost ones.
fn grid_at(grid: &Plane, u: f64, v: f64) -> f32 {
    let coord = |t: f64, n: usize| {
        let c = (t * n as f64 - 0.5).clamp(0.0, (n - 1) as f64);
        let i = (c.floor() as usize).min(n.saturating_sub(2));
        (i, (c - i as f64) as f32)
    };
    let (gw, gh) = (grid.width, grid.height);
    let ((ix, fx), (iy, fy)) = (coord(u, gw), coord(v, gh));
    let g = |x: usize, y: usize| grid.values[y.min(gh - 1) * gw + x.min(gw - 1)];
    let top = g(ix, iy) * (1.0 - fx) + g(ix + 1, iy) * fx;
    let bottom = g(ix, iy + 1) * (1.0 - fx) + g(ix + 1, iy + 1) * fx;
    top * (1.0 - fy) + bottom * fy
}

fn terms(u: f64, v: f64) -> [f64; 6] {
    let (x, y) = (2.0 * u - 1.0, 2.0 * v - 1.0);
    [1.0, x, y, x * x, x * y, y * y]
}

/// Solves the 6x6 system by Gaussian elimination with partial pivoting.
fn solve6(mut a: [[f64; 6]; 6], mut b: [f64; 6]) -> Option<[f64; 6]> {
    for col in 0..6 {
        let pivot = (col..6).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        let pivot_row = a[col];
        for row in col + 1..6 {
            let f = a[row][col] / pivot_row[col];
            for (x, p) in a[row].iter_mut().zip(&pivot_row).skip(col) {
                *x -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = [0f64; 6];
    for row in (0..6).rev() {
        let s: f64 = (row + 1..6).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    x.iter().all(|v| v.is_finite()).then_some(x)
}

/// The `q` quantile (0-1) of `values` (reordered); 0 for none.
fn percentile(values: &mut [f32], q: f64) -> f32 {
    if values.is_empty() {
        return 0.0;
    }
    let k = ((values.len() - 1) as f64 * q).round() as usize;
    *values.select_nth_unstable_by(k, f32::total_cmp).1
}

/// Half a gray level: the noise scale of a clean image is never taken as smaller.
const MIN_NOISE: f32 = 0.5 / 255.0;

/// The residual's noise, as a Gaussian's sigma: the median distance from 0 of the residuals on
/// one side of 0, on the side where it is smaller. The background's residuals straddle 0 and the
/// ink's lie on one side, so this holds even where the ink is most of the image.
pub fn noise_scale(residual: &[f32]) -> f32 {
    // Exact zeros (a drawn image's paper) belong to both sides.
    let mut low: Vec<f32> = residual.iter().filter(|&&r| r <= 0.0).map(|r| -r).collect();
    let mut high: Vec<f32> = residual.iter().filter(|&&r| r >= 0.0).copied().collect();
    let side = |v: &mut Vec<f32>| if v.is_empty() { f32::INFINITY } else { percentile(v, 0.5) };
    let m = side(&mut low).min(side(&mut high));
    if m.is_finite() {
        (1.4826 * m).max(MIN_NOISE)
    } else {
        MIN_NOISE
    }
}

/// The noise of `plane` from the differences of horizontally neighbouring pixels (their median
/// absolute value, as a Gaussian's sigma; a difference of two has sqrt(2) times the spread):
/// blind to anything smooth, such as what a background's fit missed, and to the ink, whose edges
/// are few of the pairs.
fn difference_noise(plane: &Plane) -> f32 {
    let mut d: Vec<f32> = plane
        .values
        .chunks_exact(plane.width.max(1))
        .flat_map(|row| row.windows(2).map(|p| (p[1] - p[0]).abs()))
        .collect();
    (1.4826 / std::f32::consts::SQRT_2 * percentile(&mut d, 0.5)).max(MIN_NOISE)
}

/// Pixels whose value is over `level` with at least two of their 8 neighbours also over it:
/// a stroke's pixels have them, isolated specks of noise do not.
fn supported<'a>(plane: &'a Plane, over: impl Fn(f32) -> bool + 'a) -> impl Iterator<Item = usize> + 'a {
    let (w, h) = (plane.width, plane.height);
    let v = &plane.values;
    (0..w * h).filter(move |&i| {
        if !over(v[i]) {
            return false;
        }
        let (x, y) = (i % w, i / w);
        let mut n = 0;
        for ny in y.saturating_sub(1)..(y + 2).min(h) {
            for nx in x.saturating_sub(1)..(x + 2).min(w) {
                if (nx, ny) != (x, y) && over(v[ny * w + nx]) {
                    n += 1;
                }
            }
        }
        n >= 2
    })
}

/// Step 3: which side of the background the ink is on, or `None` when nothing stands out. The
/// side whose supported outliers (beyond 5 sigma) carry more mass wins.
pub fn detect_polarity(residual: &Plane, sigma: f32) -> Option<Polarity> {
    polarity_of(outlier_mass(residual, 1.0, sigma), outlier_mass(residual, -1.0, sigma))
}

/// Polarity after a local correction of the background under each hypothesis: a wide bright or
/// dark patch (a spot of light, a shadow) is absorbed by the correction either way, the strokes
/// are not.
pub fn detect_polarity_local(plane: &Plane, background: &Background) -> Option<Polarity> {
    let block = plane.width.max(plane.height).div_ceil(8).max(2);
    let mass = |sign: f32| -> f64 {
        let mut b = background.clone();
        if 4 * block <= plane.width.max(plane.height) {
            b.refine(plane, sign, block);
        }
        let r = b.residual(plane);
        outlier_mass(&r, sign, noise_scale(&r.values))
    };
    polarity_of(mass(1.0), mass(-1.0))
}

/// The mass of `residual`'s supported outliers on the `sign` side, beyond 5 sigma (and at least
/// half the minimum contrast).
fn outlier_mass(residual: &Plane, sign: f32, sigma: f32) -> f64 {
    let t = (5.0 * sigma).max(MIN_CONTRAST / 2.0);
    supported(residual, |r| sign * r > t).map(|i| (sign * residual.values[i] - t) as f64).sum()
}

/// The side with more outlier mass (light wins ties); none when neither has any.
fn polarity_of(light: f64, dark: f64) -> Option<Polarity> {
    if light == 0.0 && dark == 0.0 {
        None
    } else if light >= dark {
        Some(Polarity::LightOnDark)
    } else {
        Some(Polarity::DarkOnLight)
    }
}

/// The ink's contrast: the 90th percentile of the supported pixels beyond 4 sigma (a stroke's
/// core, not a hot pixel), or `None` when there are none.
fn ink_contrast(ink: &Plane, sigma: f32) -> Option<f32> {
    let t = (4.0 * sigma).max(MIN_CONTRAST / 2.0);
    let mut values: Vec<f32> = supported(ink, |v| v > t).map(|i| ink.values[i]).collect();
    (!values.is_empty()).then(|| percentile(&mut values, 0.9))
}

/// The digit among the connected components of the pixels `is_ink` accepts.
struct Digit {
    /// `[x0, y0, x1, y1]`, ends exclusive.
    bbox: [usize; 4],
    /// The pixels of the components kept.
    mask: Vec<bool>,
    /// The pixels of components set aside as scenery.
    scenery: Vec<bool>,
}

/// Step 4: the connected components (8-neighbour) of the ink, and which of them are the digit.
///
/// Some components are not strokes but the scene: one that runs along much of the image's border
/// (the table around a photographed sheet, dark corners), a blob far thicker than the strokes that
/// comes in from the edge (a shadow), a thin line across the whole image (ruled paper) or a thin
/// frame around other ink (a form's box). They are set aside unless nothing else is left. Of the rest, the largest is the digit,
/// with every component of at least 15% of its pixels, and smaller ones near the digit's box as it
/// stands (a detached stroke) unless tiny. The rest are specks, dust or texture.
fn find_digit(plane: &Plane, is_ink: impl Fn(f32) -> bool) -> Option<Digit> {
    let (w, h) = (plane.width, plane.height);
    let mut label = vec![u32::MAX; w * h];
    let mut components: Vec<Component> = Vec::new();
    let mut stack = Vec::new();
    for start in 0..w * h {
        if label[start] != u32::MAX || !is_ink(plane.values[start]) {
            continue;
        }
        let id = components.len() as u32;
        let mut c = Component { pixels: 0, border: 0, edges: 0, bbox: [usize::MAX, usize::MAX, 0, 0] };
        label[start] = id;
        stack.push(start);
        while let Some(i) = stack.pop() {
            let (x, y) = (i % w, i / w);
            c.pixels += 1;
            c.border += (x == 0 || y == 0 || x + 1 == w || y + 1 == h) as usize;
            // The image's own edge is no side: the region may go on beyond it.
            let outside = |nx: Option<usize>, ny: Option<usize>| match (nx, ny) {
                (Some(nx), Some(ny)) if nx < w && ny < h => !is_ink(plane.values[ny * w + nx]),
                _ => false,
            };
            c.edges += [
                outside(x.checked_sub(1), Some(y)),
                outside(Some(x + 1), Some(y)),
                outside(Some(x), y.checked_sub(1)),
                outside(Some(x), Some(y + 1)),
            ]
            .iter()
            .filter(|&&e| e)
            .count();
            c.bbox = [c.bbox[0].min(x), c.bbox[1].min(y), c.bbox[2].max(x + 1), c.bbox[3].max(y + 1)];
            for ny in y.saturating_sub(1)..(y + 2).min(h) {
                for nx in x.saturating_sub(1)..(x + 2).min(w) {
                    let j = ny * w + nx;
                    if label[j] == u32::MAX && is_ink(plane.values[j]) {
                        label[j] = id;
                        stack.push(j);
                    }
                }
            }
        }
        components.push(c);
    }
    let border_pixels = if w < 3 || h < 3 { w * h } else { 2 * (w + h) - 4 };
    // The strokes' width, from the largest component clear of the border.
    let inner = components.iter().filter(|c| c.border == 0).max_by_key(|c| c.pixels);
    let scenery: Vec<(bool, bool)> = components
        .iter()
        .map(|c| {
            let along_border = c.border * 10 >= 3 * border_pixels;
            // A blob far thicker than the strokes, coming in from the edge: a shadow, a table.
            let thick_from_edge = c.border > 0
                && inner.is_some_and(|s| s.pixels * 10 >= c.pixels && c.width() > 2.5 * s.width());
            let frame = c.fill() < 0.15
                && components
                    .iter()
                    .filter(|o| o.pixels * 100 >= 2 * c.pixels && c.encloses(o))
                    .map(|o| o.pixels)
                    .sum::<usize>()
                    * 100
                    >= 15 * c.pixels;
            // A thin line from one side of the image to the other: ruled paper, a table's edge.
            let [x0, y0, x1, y1] = c.bbox;
            let (bw, bh) = (x1 - x0, y1 - y0);
            let line = (bw * 10 >= 9 * w && bw >= 12 * bh) || (bh * 10 >= 9 * h && bh >= 12 * bw);
            (along_border || thick_from_edge || frame || line, line)
        })
        .collect();
    // With nothing else, scenery is all there is to read (a digit cropped tight touches every
    // side; a lone stroke across the image may be a "1"), but not several lines (ruled paper).
    let lines = scenery.iter().filter(|s| s.1).count();
    let scenery: Vec<bool> = scenery.iter().map(|s| s.0).collect();
    let mut order: Vec<usize> = (0..components.len()).filter(|&i| !scenery[i]).collect();
    if order.is_empty() && lines < 2 {
        order = (0..components.len()).collect();
    }
    order.sort_by_key(|&i| std::cmp::Reverse(components[i].pixels));
    let &first = order.first()?;
    let largest = components[first].pixels;
    // Two pixels touching are the least that is not a speck.
    if largest < 3 {
        return None;
    }
    let mut keep = vec![false; components.len()];
    let mut bbox = components[first].bbox;
    keep[first] = true;
    for &i in &order[1..] {
        let c = &components[i];
        let b = c.bbox;
        let long = (bbox[2] - bbox[0]).max(bbox[3] - bbox[1]);
        let gap_x = b[0].saturating_sub(bbox[2]).max(bbox[0].saturating_sub(b[2]));
        let gap_y = b[1].saturating_sub(bbox[3]).max(bbox[1].saturating_sub(b[3]));
        let near = gap_x.max(gap_y) as f64 <= 0.25 * long as f64;
        if c.pixels * 100 >= 15 * largest || (near && c.pixels >= 3 && c.pixels * 100 >= 2 * largest) {
            keep[i] = true;
            bbox = [bbox[0].min(b[0]), bbox[1].min(b[1]), bbox[2].max(b[2]), bbox[3].max(b[3])];
        }
    }
    let mask = label.iter().map(|&l| l != u32::MAX && keep[l as usize]).collect();
    let scenery = label.iter().map(|&l| l != u32::MAX && scenery[l as usize] && !keep[l as usize]).collect();
    Some(Digit { bbox, mask, scenery })
}

/// One connected component of ink.
struct Component {
    pixels: usize,
    /// Its pixels on the image's outermost ring.
    border: usize,
    /// Its perimeter: pixel sides that face a pixel of the image that is not ink.
    edges: usize,
    /// `[x0, y0, x1, y1]`, ends exclusive.
    bbox: [usize; 4],
}

impl Component {
    /// The share of its box it covers: a stroke's is small, a frame's very small.
    fn fill(&self) -> f64 {
        let [x0, y0, x1, y1] = self.bbox;
        self.pixels as f64 / ((x1 - x0) * (y1 - y0)) as f64
    }

    /// Its width as a stroke's: area over half the perimeter.
    fn width(&self) -> f64 {
        2.0 * self.pixels as f64 / self.edges.max(1) as f64
    }

    /// Whether `other`'s box lies strictly inside this one's.
    fn encloses(&self, other: &Component) -> bool {
        let (a, b) = (self.bbox, other.bbox);
        a[0] < b[0] && a[1] < b[1] && b[2] < a[2] && b[3] < a[3]
    }
}

/// Step 5: the region `[x0, y0, x1, y1]` (source pixels, may reach outside the image) resampled to
/// at most [`CLOSEUP_SIDE`] on its long side, as ink-positive residuals (0 outside the image).
fn closeup(img: &GrayImage, background: &Background, sign: f32, region: [f64; 4]) -> Option<Closeup> {
    let [x0, y0, x1, y1] = region;
    let long = (x1 - x0).max(y1 - y0);
    if !(long > 0.0 && long.is_finite()) {
        return None;
    }
    let step = long / CLOSEUP_SIDE as f64;
    let cw = (((x1 - x0) / step).ceil() as usize).clamp(1, CLOSEUP_SIDE);
    let ch = (((y1 - y0) / step).ceil() as usize).clamp(1, CLOSEUP_SIDE);
    let (w, h) = (img.width as f64, img.height as f64);
    let values = resample(
        img.width,
        img.height,
        |x, y| {
            let bg = background.at((x as f64 + 0.5) / w, (y as f64 + 0.5) / h);
            sign * (img.pixels[y * img.width + x] as f32 / 255.0 - bg)
        },
        AxisMap { offset: x0, step },
        AxisMap { offset: y0, step },
        cw,
        ch,
    );
    Some(Closeup { ink: Plane { width: cw, height: ch, values }, origin: (x0, y0), step })
}

/// The bounding box of the set pixels, `[x0, y0, x1, y1]` with exclusive ends.
fn mask_bbox(mask: &[bool], w: usize, h: usize) -> Option<[usize; 4]> {
    let mut b = [usize::MAX, usize::MAX, 0, 0];
    for y in 0..h {
        for x in 0..w {
            if mask[y * w + x] {
                b = [b[0].min(x), b[1].min(y), b[2].max(x + 1), b[3].max(y + 1)];
            }
        }
    }
    (b[0] != usize::MAX).then_some(b)
}

/// `mask` grown by `r` pixels (a square).
fn dilate_mask(mask: &[bool], w: usize, h: usize, r: usize) -> Vec<bool> {
    let mut rows = vec![false; w * h];
    for y in 0..h {
        for x in 0..w {
            rows[y * w + x] = (x.saturating_sub(r)..(x + r + 1).min(w)).any(|nx| mask[y * w + nx]);
        }
    }
    let mut out = vec![false; w * h];
    for y in 0..h {
        for x in 0..w {
            out[y * w + x] = (y.saturating_sub(r)..(y + r + 1).min(h)).any(|ny| rows[ny * w + x]);
        }
    }
    out
}

/// A stroke's width from its pixels: area over half the perimeter (a long stroke of width `w`
/// and length `l` has area `w l` and perimeter about `2 l`).
pub fn stroke_width(mask: &[bool], w: usize, h: usize) -> f64 {
    let mut area = 0usize;
    let mut edges = 0usize;
    for y in 0..h {
        for x in 0..w {
            if !mask[y * w + x] {
                continue;
            }
            area += 1;
            edges += [
                x == 0 || !mask[y * w + x - 1],
                x + 1 == w || !mask[y * w + x + 1],
                y == 0 || !mask[(y - 1) * w + x],
                y + 1 == h || !mask[(y + 1) * w + x],
            ]
            .iter()
            .filter(|&&e| e)
            .count();
        }
    }
    if edges == 0 {
        0.0
    } else {
        2.0 * area as f64 / edges as f64
    }
}

/// The max (`grow`) or min filter of `plane` over a disc of radius `r` pixels: strokes get `2r`
/// wider or narrower. Row by row: for each row offset `dy` within the disc, a running maximum
/// (minimum) over the half-width `sqrt(r^2 - dy^2)`.
pub fn disc_filter(plane: &Plane, r: f64, grow: bool) -> Plane {
    let (w, h) = (plane.width, plane.height);
    let ri = r.floor() as usize;
    let pick = |a: f32, b: f32| if grow { a.max(b) } else { a.min(b) };
    let mut out = plane.values.clone();
    let mut window = std::collections::VecDeque::new();
    for y in 0..h {
        for dy in -(ri as isize)..=ri as isize {
            let ny = y as isize + dy;
            if ny < 0 || ny >= h as isize {
                continue;
            }
            let half = (r * r - (dy * dy) as f64).max(0.0).sqrt().floor() as usize;
            let row = &plane.values[ny as usize * w..(ny as usize + 1) * w];
            // Monotonic queue of indices: the front is the extreme of row[x - half ..= x + half].
            window.clear();
            let mut next = 0;
            for x in 0..w {
                while next < w && next <= x + half {
                    while window.back().is_some_and(|&b: &usize| pick(row[b], row[next]) == row[next]) {
                        window.pop_back();
                    }
                    window.push_back(next);
                    next += 1;
                }
                while window.front().is_some_and(|&f| f + half < x) {
                    window.pop_front();
                }
                let e = row[*window.front().expect("the window holds x")];
                out[y * w + x] = pick(out[y * w + x], e);
            }
        }
    }
    Plane { width: w, height: h, values: out }
}

/// The ink-weighted centre of `plane`, in continuous coordinates (pixel `i` spans `[i, i + 1)`).
fn centre_of_mass(plane: &Plane) -> Option<(f64, f64)> {
    let (mut m, mut mx, mut my) = (0f64, 0f64, 0f64);
    for y in 0..plane.height {
        for x in 0..plane.width {
            let v = plane.values[y * plane.width + x] as f64;
            m += v;
            mx += v * (x as f64 + 0.5);
            my += v * (y as f64 + 0.5);
        }
    }
    (m > 0.0).then(|| (mx / m, my / m))
}
