//! Digits that are not MNIST, made from MNIST's test digits: drawn again at a larger size with a
//! pen of another width, then put on paper that is gray, textured, unevenly lit, noisy, coloured,
//! or much larger than the digit, dark on light or light on dark. Shared by the tests of `predict`'s
//! preparation; deterministic (a seeded splitmix64).

#![allow(dead_code)]

/// A seeded generator (splitmix64): the same renders on every run.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.uniform()
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-7);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }
}

/// A digit's ink at some resolution: 0 (paper) to 1 (ink), row-major.
#[derive(Clone)]
pub struct Shape {
    pub width: usize,
    pub height: usize,
    pub ink: Vec<f32>,
}

impl Shape {
    pub fn at(&self, x: usize, y: usize) -> f32 {
        self.ink[y * self.width + x]
    }
}

/// An MNIST digit drawn again `scale` times larger as a pen stroke: bilinear upscaling, then a
/// soft threshold at half ink, so the edge is sharp (a pixel or two of anti-aliasing) as a drawing's
/// is, not MNIST's blur.
pub fn redraw(mnist: &[u8], scale: usize) -> Shape {
    let side = 28 * scale;
    let mut ink = vec![0f32; side * side];
    for y in 0..side {
        for x in 0..side {
            let v = bilinear(
                mnist,
                28,
                28,
                (x as f32 + 0.5) / scale as f32 - 0.5,
                (y as f32 + 0.5) / scale as f32 - 0.5,
            );
            ink[y * side + x] = smoothstep(0.35, 0.6, v / 255.0);
        }
    }
    Shape { width: side, height: side, ink }
}

fn bilinear(p: &[u8], w: usize, h: usize, x: f32, y: f32) -> f32 {
    let x = x.clamp(0.0, (w - 1) as f32);
    let y = y.clamp(0.0, (h - 1) as f32);
    let (x0, y0) = (x.floor() as usize, y.floor() as usize);
    let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
    let (fx, fy) = (x - x0 as f32, y - y0 as f32);
    let g = |x: usize, y: usize| p[y * w + x] as f32;
    (g(x0, y0) * (1.0 - fx) + g(x1, y0) * fx) * (1.0 - fy) + (g(x0, y1) * (1.0 - fx) + g(x1, y1) * fx) * fy
}

fn smoothstep(lo: f32, hi: f32, v: f32) -> f32 {
    let t = ((v - lo) / (hi - lo)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

/// The stroke made `r` pixels wider on each side (a broader pen).
pub fn thicken(s: &Shape, r: usize) -> Shape {
    let (w, h) = (s.width, s.height);
    let mut ink = vec![0f32; w * h];
    let r2 = (r * r) as isize;
    for y in 0..h {
        for x in 0..w {
            let mut m = 0f32;
            for dy in -(r as isize)..=r as isize {
                for dx in -(r as isize)..=r as isize {
                    let (nx, ny) = (x as isize + dx, y as isize + dy);
                    if dx * dx + dy * dy <= r2 && nx >= 0 && ny >= 0 && (nx as usize) < w && (ny as usize) < h
                    {
                        m = m.max(s.at(nx as usize, ny as usize));
                    }
                }
            }
            ink[y * w + x] = m;
        }
    }
    Shape { width: w, height: h, ink }
}

/// The stroke drawn with a fine pen: its skeleton (Zhang-Suen thinning), `r` pixels wide on
/// each side of it.
pub fn fine_pen(s: &Shape, r: usize) -> Shape {
    let (w, h) = (s.width, s.height);
    let mut m: Vec<bool> = s.ink.iter().map(|&v| v >= 0.5).collect();
    loop {
        let mut changed = false;
        for pass in 0..2 {
            let mut remove = Vec::new();
            for y in 1..h - 1 {
                for x in 1..w - 1 {
                    if !m[y * w + x] {
                        continue;
                    }
                    // P2..P9 clockwise from north.
                    let p = [
                        m[(y - 1) * w + x],
                        m[(y - 1) * w + x + 1],
                        m[y * w + x + 1],
                        m[(y + 1) * w + x + 1],
                        m[(y + 1) * w + x],
                        m[(y + 1) * w + x - 1],
                        m[y * w + x - 1],
                        m[(y - 1) * w + x - 1],
                    ];
                    let b = p.iter().filter(|&&v| v).count();
                    let a = (0..8).filter(|&i| !p[i] && p[(i + 1) % 8]).count();
                    let (c1, c2) = if pass == 0 {
                        (p[0] && p[2] && p[4], p[2] && p[4] && p[6])
                    } else {
                        (p[0] && p[2] && p[6], p[0] && p[4] && p[6])
                    };
                    if (2..=6).contains(&b) && a == 1 && !c1 && !c2 {
                        remove.push(y * w + x);
                    }
                }
            }
            changed |= !remove.is_empty();
            for i in remove {
                m[i] = false;
            }
        }
        if !changed {
            break;
        }
    }
    let skeleton = Shape { width: w, height: h, ink: m.iter().map(|&b| b as u8 as f32).collect() };
    thicken(&skeleton, r)
}

/// A canvas of 8-bit RGB, row-major.
pub struct Canvas {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<[f32; 3]>,
}

impl Canvas {
    /// Paper of one colour.
    pub fn new(width: usize, height: usize, paper: [f32; 3]) -> Canvas {
        Canvas { width, height, rgb: vec![paper; width * height] }
    }

    /// Multiplies the light by `gain(x, y)` (uneven lighting: gradients, vignetting, shadows).
    pub fn light(&mut self, gain: impl Fn(f32, f32) -> f32) {
        for y in 0..self.height {
            for x in 0..self.width {
                let g = gain(x as f32 / self.width as f32, y as f32 / self.height as f32);
                for c in &mut self.rgb[y * self.width + x] {
                    *c *= g;
                }
            }
        }
    }

    /// Draws `shape` with its top-left corner at (x0, y0), in `colour`, blended by its ink.
    pub fn draw(&mut self, shape: &Shape, x0: usize, y0: usize, colour: [f32; 3]) {
        for y in 0..shape.height {
            for x in 0..shape.width {
                let (cx, cy) = (x0 + x, y0 + y);
                if cx >= self.width || cy >= self.height {
                    continue;
                }
                let a = shape.at(x, y);
                let p = &mut self.rgb[cy * self.width + cx];
                for c in 0..3 {
                    p[c] = p[c] * (1.0 - a) + colour[c] * a;
                }
            }
        }
    }

    /// Adds a texture: smooth random blobs of amplitude `amp` at a scale of `cell` pixels.
    pub fn texture(&mut self, rng: &mut Rng, amp: f32, cell: usize) {
        let gw = self.width / cell + 2;
        let gh = self.height / cell + 2;
        let grid: Vec<f32> = (0..gw * gh).map(|_| rng.range(-amp, amp)).collect();
        for y in 0..self.height {
            for x in 0..self.width {
                let (fx, fy) = (x as f32 / cell as f32, y as f32 / cell as f32);
                let (ix, iy) = (fx as usize, fy as usize);
                let (tx, ty) = (fx - ix as f32, fy - iy as f32);
                let g = |i: usize, j: usize| grid[j * gw + i];
                let v = (g(ix, iy) * (1.0 - tx) + g(ix + 1, iy) * tx) * (1.0 - ty)
                    + (g(ix, iy + 1) * (1.0 - tx) + g(ix + 1, iy + 1) * tx) * ty;
                for c in &mut self.rgb[y * self.width + x] {
                    *c += v;
                }
            }
        }
    }

    /// Ruled lines every `every` pixels, `darker` below the paper (a school exercise book).
    pub fn rule(&mut self, every: usize, darker: f32) {
        for y in (every / 2..self.height).step_by(every) {
            for x in 0..self.width {
                for c in &mut self.rgb[y * self.width + x] {
                    *c -= darker;
                }
            }
        }
    }

    /// A 3x3 box blur `times` times (a camera's softness).
    pub fn blur(&mut self, times: usize) {
        let (w, h) = (self.width, self.height);
        for _ in 0..times {
            let src = self.rgb.clone();
            for y in 0..h {
                for x in 0..w {
                    let mut acc = [0f32; 3];
                    let mut n = 0.0;
                    for ny in y.saturating_sub(1)..(y + 2).min(h) {
                        for nx in x.saturating_sub(1)..(x + 2).min(w) {
                            for c in 0..3 {
                                acc[c] += src[ny * w + nx][c];
                            }
                            n += 1.0;
                        }
                    }
                    self.rgb[y * w + x] = acc.map(|a| a / n);
                }
            }
        }
    }

    /// Gaussian noise of `sigma` gray levels on every channel.
    pub fn noise(&mut self, rng: &mut Rng, sigma: f32) {
        for p in &mut self.rgb {
            for c in p.iter_mut() {
                *c += sigma * rng.normal();
            }
        }
    }

    /// Salt-and-pepper specks on a fraction `p` of the pixels.
    pub fn specks(&mut self, rng: &mut Rng, p: f32) {
        for px in &mut self.rgb {
            if rng.uniform() < p {
                let v = if rng.uniform() < 0.5 { 0.0 } else { 255.0 };
                *px = [v; 3];
            }
        }
    }

    pub fn rgb8(&self) -> Vec<u8> {
        self.rgb.iter().flat_map(|p| p.map(|c| c.round().clamp(0.0, 255.0) as u8)).collect()
    }

    /// Luminance as the decoder computes it (BT.601).
    pub fn gray8(&self) -> Vec<u8> {
        self.rgb8().chunks_exact(3).map(|p| lenet::image_input::decode::luma(p[0], p[1], p[2])).collect()
    }

    pub fn png(&self) -> Vec<u8> {
        encode_png(self.width as u32, self.height as u32, png::ColorType::Rgb, &self.rgb8())
    }

    pub fn gray_png(&self) -> Vec<u8> {
        encode_png(self.width as u32, self.height as u32, png::ColorType::Grayscale, &self.gray8())
    }
}

pub fn encode_png(w: u32, h: u32, color: png::ColorType, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut e = png::Encoder::new(&mut out, w, h);
        e.set_color(color);
        e.set_depth(png::BitDepth::Eight);
        let mut wr = e.write_header().unwrap();
        wr.write_image_data(data).unwrap();
    }
    out
}

/// The kinds of digit images the preparation is tested on; each renders an MNIST digit as a PNG.
pub const STYLES: [&str; 11] = [
    "pen_on_white",
    "light_gray_paper",
    "marker",
    "fine_pen",
    "small_on_large_canvas",
    "photographed",
    "colour",
    "textured_ruled_paper",
    "chalk_on_blackboard",
    "specks",
    "mnist_itself",
];

/// Renders `mnist` (a 28x28 MNIST digit) in `style`, as PNG bytes.
pub fn render(style: &str, mnist: &[u8], rng: &mut Rng) -> Vec<u8> {
    let ink = [20.0; 3];
    let white = [245.0; 3];
    match style {
        "pen_on_white" => {
            let s = redraw(mnist, 6);
            let mut c = Canvas::new(220, 260, white);
            c.draw(&s, 20 + rng.range(0.0, 30.0) as usize, 20 + rng.range(0.0, 60.0) as usize, ink);
            c.gray_png()
        }
        "light_gray_paper" => {
            // The example: the same stroke, paper 200, ink 90.
            let s = redraw(mnist, 4);
            let mut c = Canvas::new(150, 150, [200.0; 3]);
            c.draw(&s, 19, 19, [90.0; 3]);
            c.gray_png()
        }
        "marker" => {
            let s = thicken(&redraw(mnist, 4), 5);
            let mut c = Canvas::new(160, 160, white);
            c.draw(&s, 24, 24, ink);
            c.gray_png()
        }
        "fine_pen" => {
            let s = fine_pen(&redraw(mnist, 8), 1);
            let mut c = Canvas::new(300, 300, white);
            c.draw(&s, 38, 38, ink);
            c.gray_png()
        }
        "small_on_large_canvas" => {
            let s = redraw(mnist, 2);
            let mut c = Canvas::new(640, 480, white);
            let (x, y) = (rng.range(0.0, 580.0) as usize, rng.range(0.0, 420.0) as usize);
            c.draw(&s, x, y, ink);
            c.gray_png()
        }
        "photographed" => {
            let s = redraw(mnist, 5);
            let mut c = Canvas::new(260, 240, [235.0; 3]);
            c.draw(&s, 60, 50, [60.0; 3]);
            // Light falling off across the sheet and towards the corners.
            let (gx, gy) = (rng.range(-0.35, 0.35), rng.range(-0.35, 0.35));
            c.light(|u, v| {
                let r2 = (u - 0.5).powi(2) + (v - 0.5).powi(2);
                (0.85 + gx * (u - 0.5) + gy * (v - 0.5) - 0.5 * r2).max(0.2)
            });
            c.blur(1);
            c.noise(rng, 8.0);
            c.png()
        }
        "colour" => {
            let s = redraw(mnist, 5);
            let mut c = Canvas::new(200, 200, [246.0, 236.0, 200.0]);
            let inks = [[30.0, 50.0, 170.0], [190.0, 20.0, 30.0], [20.0, 110.0, 40.0]];
            c.draw(&s, 30, 30, inks[(rng.next_u64() % 3) as usize]);
            c.png()
        }
        "textured_ruled_paper" => {
            let s = redraw(mnist, 5);
            let mut c = Canvas::new(200, 200, [235.0; 3]);
            c.texture(rng, 14.0, 9);
            c.rule(22, 45.0);
            c.draw(&s, 30, 30, [35.0; 3]);
            c.noise(rng, 4.0);
            c.gray_png()
        }
        "chalk_on_blackboard" => {
            let s = redraw(mnist, 4);
            let mut c = Canvas::new(170, 150, [45.0, 60.0, 50.0]);
            c.draw(&s, 30, 12, [225.0; 3]);
            c.texture(rng, 8.0, 6);
            c.noise(rng, 6.0);
            c.png()
        }
        "specks" => {
            let s = redraw(mnist, 4);
            let mut c = Canvas::new(200, 180, white);
            c.draw(&s, 44, 34, ink);
            c.specks(rng, 0.003);
            c.gray_png()
        }
        "mnist_itself" => encode_png(28, 28, png::ColorType::Grayscale, mnist),
        _ => render_stress(style, mnist, rng),
    }
}

/// Harder scenes. `a_trained_network_reads_harder_scenes` reads most of them; two are left out:
/// `big_photo` (slow to render in a test) and `soft_shadow_band`, a shadow wider than the strokes
/// lying across the digit, which merges with it and is read correctly only about 40% of the time.
pub const STRESS: [&str; 13] = [
    "spotlight",
    "soft_shadow_band",
    "shadow",
    "paper_edge",
    "pencil",
    "tight_crop",
    "alpha_black_on_clear",
    "alpha_white_on_clear",
    "noisy_small",
    "sticky_note",
    "boxed",
    "big_photo",
    "vignette_strong",
];

fn render_stress(style: &str, mnist: &[u8], rng: &mut Rng) -> Vec<u8> {
    let white = [245.0; 3];
    match style {
        "shadow" => {
            let s = redraw(mnist, 5);
            let mut c = Canvas::new(240, 240, [230.0; 3]);
            c.draw(&s, 50, 50, [40.0; 3]);
            let cut = rng.range(0.2, 0.5);
            c.light(|u, v| if u + 0.3 * v < cut { 0.55 } else { 1.0 });
            c.blur(1);
            c.noise(rng, 5.0);
            c.png()
        }
        "paper_edge" => {
            let s = redraw(mnist, 5);
            let mut c = Canvas::new(260, 260, [70.0, 50.0, 40.0]);
            let paper = Shape { width: 200, height: 210, ink: vec![1.0; 200 * 210] };
            c.draw(&paper, 40, 35, [235.0; 3]);
            c.draw(&s, 70, 70, [30.0; 3]);
            c.noise(rng, 4.0);
            c.png()
        }
        "pencil" => {
            let s = redraw(mnist, 5);
            let mut c = Canvas::new(200, 200, [215.0; 3]);
            c.draw(&s, 30, 30, [150.0; 3]);
            c.blur(1);
            c.noise(rng, 5.0);
            c.gray_png()
        }
        "tight_crop" => {
            let s = redraw(mnist, 5);
            let mut c = Canvas::new(140, 140, white);
            c.draw(&s, 0, 0, [20.0; 3]);
            // Crop to the ink's box.
            let g = c.gray8();
            let (mut x0, mut y0, mut x1, mut y1) = (140, 140, 0, 0);
            for y in 0..140 {
                for x in 0..140 {
                    if g[y * 140 + x] < 128 {
                        x0 = x0.min(x);
                        y0 = y0.min(y);
                        x1 = x1.max(x + 1);
                        y1 = y1.max(y + 1);
                    }
                }
            }
            let mut out = Vec::new();
            for y in y0..y1 {
                out.extend_from_slice(&g[y * 140 + x0..y * 140 + x1]);
            }
            encode_png((x1 - x0) as u32, (y1 - y0) as u32, png::ColorType::Grayscale, &out)
        }
        "alpha_black_on_clear" | "alpha_white_on_clear" => {
            let s = redraw(mnist, 4);
            let v = if style == "alpha_black_on_clear" { 0 } else { 255 };
            let data: Vec<u8> = s.ink.iter().flat_map(|&a| [v, v, v, (a * 255.0).round() as u8]).collect();
            encode_png(s.width as u32, s.height as u32, png::ColorType::Rgba, &data)
        }
        "noisy_small" => {
            let s = redraw(mnist, 2);
            let mut c = Canvas::new(400, 400, [200.0; 3]);
            c.draw(&s, rng.range(0.0, 340.0) as usize, rng.range(0.0, 340.0) as usize, [60.0; 3]);
            c.noise(rng, 22.0);
            c.gray_png()
        }
        "sticky_note" => {
            let s = redraw(mnist, 5);
            let mut c = Canvas::new(200, 200, [250.0, 230.0, 90.0]);
            c.draw(&s, 30, 30, [20.0, 30.0, 120.0]);
            c.light(|u, _| 0.75 + 0.3 * u);
            c.noise(rng, 4.0);
            c.png()
        }
        "boxed" => {
            let s = redraw(mnist, 4);
            let mut c = Canvas::new(180, 180, white);
            let mut frame = Shape { width: 150, height: 150, ink: vec![0.0; 150 * 150] };
            for y in 0..150 {
                for x in 0..150 {
                    if x < 3 || y < 3 || x >= 147 || y >= 147 {
                        frame.ink[y * 150 + x] = 1.0;
                    }
                }
            }
            c.draw(&frame, 15, 15, [80.0; 3]);
            c.draw(&s, 34, 34, [20.0; 3]);
            c.gray_png()
        }
        "big_photo" => {
            let s = redraw(mnist, 40);
            let mut c = Canvas::new(1600, 1400, [225.0; 3]);
            c.draw(&s, 250, 200, [45.0; 3]);
            c.light(|u, v| 0.8 + 0.25 * u - 0.15 * v);
            c.noise(rng, 10.0);
            c.gray_png()
        }
        "spotlight" => {
            let s = redraw(mnist, 5);
            let mut c = Canvas::new(240, 240, [230.0; 3]);
            c.draw(&s, 50, 50, [40.0; 3]);
            let (px, py) = (rng.range(0.2, 0.8), rng.range(0.2, 0.8));
            c.light(|u, v| {
                0.45 + 0.6 * (-((u - px).powi(2) + (v - py).powi(2)) / (2.0 * 0.18f32.powi(2))).exp()
            });
            c.noise(rng, 5.0);
            c.gray_png()
        }
        "soft_shadow_band" => {
            let s = redraw(mnist, 5);
            let mut c = Canvas::new(240, 240, [230.0; 3]);
            c.draw(&s, 50, 50, [40.0; 3]);
            let at = rng.range(0.3, 0.7);
            c.light(|u, v| {
                let d = (u * 0.8 + v * 0.6 - at).abs();
                1.0 - 0.45 * (1.0 - ((d - 0.08) / 0.06).clamp(0.0, 1.0))
            });
            c.noise(rng, 5.0);
            c.gray_png()
        }
        "vignette_strong" => {
            let s = redraw(mnist, 5);
            let mut c = Canvas::new(240, 240, [240.0; 3]);
            c.draw(&s, 50, 50, [50.0; 3]);
            c.light(|u, v| (1.0 - 1.6 * ((u - 0.5).powi(2) + (v - 0.5).powi(2))).max(0.1));
            c.noise(rng, 6.0);
            c.gray_png()
        }
        _ => panic!("unknown style {style}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Things that are not one digit: letters, and two digits side by side.

/// Capital letters as pen strokes on a 4 x 6 grid (x right, y down): each a list of polylines.
/// Drawn here, plainly, as a pen would; not any font's outlines.
pub fn letter_strokes(ch: char) -> Vec<Vec<(f32, f32)>> {
    let o = vec![
        (1.0, 0.0),
        (3.0, 0.0),
        (4.0, 1.5),
        (4.0, 4.5),
        (3.0, 6.0),
        (1.0, 6.0),
        (0.0, 4.5),
        (0.0, 1.5),
        (1.0, 0.0),
    ];
    let p = vec![(0.0, 6.0), (0.0, 0.0), (3.0, 0.0), (4.0, 1.0), (4.0, 2.4), (3.0, 3.3), (0.0, 3.3)];
    // C's arc; G is C with its bar.
    let c =
        vec![(4.0, 1.0), (3.0, 0.0), (1.0, 0.0), (0.0, 1.5), (0.0, 4.5), (1.0, 6.0), (3.0, 6.0), (4.0, 5.0)];
    match ch {
        'A' => vec![vec![(0.0, 6.0), (2.0, 0.0), (4.0, 6.0)], vec![(0.8, 3.8), (3.2, 3.8)]],
        'B' => vec![
            vec![(0.0, 0.0), (0.0, 6.0), (3.0, 6.0), (4.0, 5.0), (4.0, 4.0), (3.0, 3.0), (0.0, 3.0)],
            vec![(0.0, 0.0), (2.8, 0.0), (3.7, 0.8), (3.7, 2.2), (2.8, 3.0)],
        ],
        'C' => vec![c],
        'D' => vec![vec![(0.0, 0.0), (0.0, 6.0), (2.5, 6.0), (4.0, 4.5), (4.0, 1.5), (2.5, 0.0), (0.0, 0.0)]],
        'E' => vec![vec![(4.0, 0.0), (0.0, 0.0), (0.0, 6.0), (4.0, 6.0)], vec![(0.0, 3.0), (3.0, 3.0)]],
        'F' => vec![vec![(4.0, 0.0), (0.0, 0.0), (0.0, 6.0)], vec![(0.0, 3.0), (3.0, 3.0)]],
        'G' => vec![[c, vec![(4.0, 3.5), (2.5, 3.5)]].concat()],
        'H' => vec![vec![(0.0, 0.0), (0.0, 6.0)], vec![(4.0, 0.0), (4.0, 6.0)], vec![(0.0, 3.0), (4.0, 3.0)]],
        'I' => vec![vec![(2.0, 0.0), (2.0, 6.0)], vec![(1.0, 0.0), (3.0, 0.0)], vec![(1.0, 6.0), (3.0, 6.0)]],
        'J' => vec![
            vec![(1.0, 0.0), (4.0, 0.0)],
            vec![(3.0, 0.0), (3.0, 5.0), (2.0, 6.0), (1.0, 6.0), (0.0, 5.0)],
        ],
        'K' => vec![vec![(0.0, 0.0), (0.0, 6.0)], vec![(4.0, 0.0), (0.0, 3.5)], vec![(1.3, 2.7), (4.0, 6.0)]],
        'L' => vec![vec![(0.0, 0.0), (0.0, 6.0), (4.0, 6.0)]],
        'M' => vec![vec![(0.0, 6.0), (0.0, 0.0), (2.0, 3.5), (4.0, 0.0), (4.0, 6.0)]],
        'N' => vec![vec![(0.0, 6.0), (0.0, 0.0), (4.0, 6.0), (4.0, 0.0)]],
        'O' => vec![o],
        'P' => vec![p],
        'Q' => vec![o, vec![(2.5, 4.5), (4.2, 6.4)]],
        'R' => vec![p, vec![(2.0, 3.3), (4.0, 6.0)]],
        'S' => vec![vec![
            (4.0, 1.0),
            (3.0, 0.0),
            (1.0, 0.0),
            (0.0, 1.0),
            (0.0, 2.0),
            (1.0, 3.0),
            (3.0, 3.0),
            (4.0, 4.0),
            (4.0, 5.0),
            (3.0, 6.0),
            (1.0, 6.0),
            (0.0, 5.0),
        ]],
        'T' => vec![vec![(0.0, 0.0), (4.0, 0.0)], vec![(2.0, 0.0), (2.0, 6.0)]],
        'U' => vec![vec![(0.0, 0.0), (0.0, 4.8), (1.0, 6.0), (3.0, 6.0), (4.0, 4.8), (4.0, 0.0)]],
        'V' => vec![vec![(0.0, 0.0), (2.0, 6.0), (4.0, 0.0)]],
        'W' => vec![vec![(0.0, 0.0), (1.0, 6.0), (2.0, 2.0), (3.0, 6.0), (4.0, 0.0)]],
        'X' => vec![vec![(0.0, 0.0), (4.0, 6.0)], vec![(4.0, 0.0), (0.0, 6.0)]],
        'Y' => vec![vec![(0.0, 0.0), (2.0, 3.0)], vec![(4.0, 0.0), (2.0, 3.0), (2.0, 6.0)]],
        'Z' => vec![vec![(0.0, 0.0), (4.0, 0.0), (0.0, 6.0), (4.0, 6.0)]],
        _ => panic!("no strokes for {ch:?}"),
    }
}

/// A capital letter as a pen would write it: `unit` pixels per grid step, a pen `pen` pixels wide,
/// slanted and wobbled a little at random (each vertex moved by up to 0.15 grid steps).
pub fn letter(ch: char, unit: f32, pen: f32, rng: &mut Rng) -> Shape {
    let slant = rng.range(-0.25, 0.25);
    let strokes: Vec<Vec<(f32, f32)>> = letter_strokes(ch)
        .into_iter()
        .map(|line| {
            line.into_iter()
                .map(|(x, y)| {
                    let (x, y) = (x + rng.range(-0.15, 0.15), y + rng.range(-0.15, 0.15));
                    ((x + slant * (6.0 - y)) * unit, y * unit)
                })
                .collect()
        })
        .collect();
    let margin = pen + 2.0;
    let (x0, y0) =
        strokes.iter().flatten().fold((f32::MAX, f32::MAX), |(a, b), &(x, y)| (a.min(x), b.min(y)));
    let (x1, y1) =
        strokes.iter().flatten().fold((f32::MIN, f32::MIN), |(a, b), &(x, y)| (a.max(x), b.max(y)));
    let (w, h) = (((x1 - x0) + 2.0 * margin).ceil() as usize, ((y1 - y0) + 2.0 * margin).ceil() as usize);
    let mut ink = vec![0f32; w * h];
    for py in 0..h {
        for px in 0..w {
            let (x, y) = (px as f32 + 0.5 + x0 - margin, py as f32 + 0.5 + y0 - margin);
            let mut d = f32::MAX;
            for line in &strokes {
                for seg in line.windows(2) {
                    d = d.min(segment_distance((x, y), seg[0], seg[1]));
                }
            }
            // Anti-aliased over one pixel at the pen's edge.
            ink[py * w + px] = (pen / 2.0 + 0.5 - d).clamp(0.0, 1.0);
        }
    }
    Shape { width: w, height: h, ink }
}

fn segment_distance(p: (f32, f32), a: (f32, f32), b: (f32, f32)) -> f32 {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let len2 = dx * dx + dy * dy;
    let t = if len2 > 0.0 { (((p.0 - a.0) * dx + (p.1 - a.1) * dy) / len2).clamp(0.0, 1.0) } else { 0.0 };
    let (cx, cy) = (a.0 + t * dx, a.1 + t * dy);
    ((p.0 - cx).powi(2) + (p.1 - cy).powi(2)).sqrt()
}

/// A letter written in dark ink on white paper, as a PNG: its size, pen and slant drawn from `rng`.
pub fn render_letter(ch: char, rng: &mut Rng) -> Vec<u8> {
    let unit = rng.range(18.0, 36.0);
    let pen = rng.range(0.08, 0.2) * 6.0 * unit / 4.0;
    let s = letter(ch, unit, pen, rng);
    let mut c = Canvas::new(s.width + 60, s.height + 60, [245.0; 3]);
    c.draw(&s, 30, 30, [20.0; 3]);
    c.gray_png()
}

/// Two MNIST digits written side by side ("42"), as a PNG: redrawn 6 times larger, the second
/// `gap` pixels right of where the first's 28x28 frame ends (negative: the frames overlap; the
/// digits' ink sits about 24 pixels inside their frames).
pub fn render_pair(first: &[u8], second: &[u8], gap: i32) -> Vec<u8> {
    let (a, b) = (redraw(first, 6), redraw(second, 6));
    let x2 = (20 + a.width as i32 + gap).max(20) as usize;
    let mut c = Canvas::new(x2 + b.width + 20, a.height.max(b.height) + 40, [245.0; 3]);
    c.draw(&a, 20, 20, [20.0; 3]);
    c.draw(&b, x2, 20, [20.0; 3]);
    c.gray_png()
}

/// MNIST's test images and labels, from the shipped data (read once).
pub fn mnist_test() -> &'static (Vec<u8>, Vec<u8>) {
    static TEST: std::sync::OnceLock<(Vec<u8>, Vec<u8>)> = std::sync::OnceLock::new();
    TEST.get_or_init(|| {
        let dir = lenet::data::default_data_dir();
        let images = lenet::data::load_idx_images(&dir.join("t10k-images.idx3-ubyte.gz")).unwrap();
        let labels = lenet::data::load_idx_labels(&dir.join("t10k-labels.idx1-ubyte.gz")).unwrap();
        (images.pixels, labels)
    })
}

/// Test image `i`, 28x28 bytes.
pub fn mnist_digit(i: usize) -> &'static [u8] {
    &mnist_test().0[i * 784..(i + 1) * 784]
}
