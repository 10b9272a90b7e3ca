//! `lenet predict` inputs: PNG and PGM files of several sizes and formats become 28x28 MNIST-style
//! images; dark-on-light is inverted; bad files are clear errors.

use std::path::{Path, PathBuf};

use lenet::image_input::{decode_gray, load_gray, load_image, resize, to_mnist, GrayImage, ImageError};

fn png_bytes(
    w: u32,
    h: u32,
    color: png::ColorType,
    depth: png::BitDepth,
    data: &[u8],
    palette: Option<&[u8]>,
) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut e = png::Encoder::new(&mut out, w, h);
        e.set_color(color);
        e.set_depth(depth);
        if let Some(p) = palette {
            e.set_palette(p.to_vec());
        }
        let mut wr = e.write_header().unwrap();
        wr.write_image_data(data).unwrap();
    }
    out
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// A w x h gray image: `bg` everywhere, `fg` on a centred vertical bar a third of the width.
fn bar(w: usize, h: usize, bg: u8, fg: u8) -> Vec<u8> {
    (0..w * h)
        .map(|i| {
            if (w / 3..2 * w / 3).contains(&(i % w)) && (h / 5..4 * h / 5).contains(&(i / w)) {
                fg
            } else {
                bg
            }
        })
        .collect()
}

/// Checks the 28x28 result looks like a light vertical bar on black.
fn assert_light_bar(out: &[u8; 784]) {
    assert!(out[0] <= 5, "corner is background: {}", out[0]);
    assert!(out[27 * 28 + 27] <= 5, "corner is background: {}", out[27 * 28 + 27]);
    assert!(out[14 * 28 + 14] > 200, "centre is the stroke: {}", out[14 * 28 + 14]);
    assert!(out[14 * 28 + 2] < 30, "left of the bar is background: {}", out[14 * 28 + 2]);
}

#[test]
fn png_gray8_light_on_dark_kept_dark_on_light_inverted() {
    let dir = tempfile::tempdir().unwrap();
    let light =
        png_bytes(90, 60, png::ColorType::Grayscale, png::BitDepth::Eight, &bar(90, 60, 0, 255), None);
    assert_light_bar(&load_image(&write(dir.path(), "a.png", &light)).unwrap());
    let dark = png_bytes(90, 60, png::ColorType::Grayscale, png::BitDepth::Eight, &bar(90, 60, 255, 0), None);
    assert_light_bar(&load_image(&write(dir.path(), "b.png", &dark)).unwrap());
}

#[test]
fn png_rgb_rgba_16bit_palette_and_1bit_load() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = (40usize, 50usize);
    let g = bar(w, h, 250, 5); // dark ink on white paper
    let rgb: Vec<u8> = g.iter().flat_map(|&v| [v, v, v]).collect();
    let rgba: Vec<u8> = g.iter().flat_map(|&v| [v, v, v, 255]).collect();
    let g16: Vec<u8> = g.iter().flat_map(|&v| (v as u16 * 257).to_be_bytes()).collect();
    let rgb16: Vec<u8> = g.iter().flat_map(|&v| [v, 0, v, 0, v, 0]).collect();
    let idx: Vec<u8> = g.iter().map(|&v| (v > 128) as u8).collect();
    let palette = [0u8, 0, 0, 255, 255, 255];
    // 1-bit gray, 8 pixels per byte, rows padded to a whole byte.
    let stride = w.div_ceil(8);
    let mut bits = vec![0u8; stride * h];
    for y in 0..h {
        for x in 0..w {
            if g[y * w + x] > 128 {
                bits[y * stride + x / 8] |= 0x80 >> (x % 8);
            }
        }
    }
    // Dark ink on a transparent page (composited over white).
    let alpha: Vec<u8> = g.iter().flat_map(|&v| if v > 128 { [0, 0] } else { [0, 255] }).collect();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("rgb", png_bytes(w as u32, h as u32, png::ColorType::Rgb, png::BitDepth::Eight, &rgb, None)),
        ("rgba", png_bytes(w as u32, h as u32, png::ColorType::Rgba, png::BitDepth::Eight, &rgba, None)),
        ("g16", png_bytes(w as u32, h as u32, png::ColorType::Grayscale, png::BitDepth::Sixteen, &g16, None)),
        ("rgb16", png_bytes(w as u32, h as u32, png::ColorType::Rgb, png::BitDepth::Sixteen, &rgb16, None)),
        (
            "pal",
            png_bytes(
                w as u32,
                h as u32,
                png::ColorType::Indexed,
                png::BitDepth::Eight,
                &idx,
                Some(&palette),
            ),
        ),
        ("g1", png_bytes(w as u32, h as u32, png::ColorType::Grayscale, png::BitDepth::One, &bits, None)),
        (
            "ga",
            png_bytes(w as u32, h as u32, png::ColorType::GrayscaleAlpha, png::BitDepth::Eight, &alpha, None),
        ),
    ];
    for (name, bytes) in cases {
        let p = write(dir.path(), &format!("{name}.png"), &bytes);
        let img = load_gray(&p).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((img.width, img.height), (w, h), "{name}");
        assert!(img.pixels[0] > 200, "{name}: background is light: {}", img.pixels[0]);
        assert_light_bar(&load_image(&p).unwrap());
    }
}

#[test]
fn pgm_p5_p2_8_and_16_bit() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = (33usize, 47usize);
    let g = bar(w, h, 0, 255);
    let mut p5 = format!("P5\n# a comment\n{w} {h}\n255\n").into_bytes();
    p5.extend(&g);
    let mut p5_16 = format!("P5 {w} {h} 65535\n").into_bytes();
    p5_16.extend(g.iter().flat_map(|&v| (v as u16 * 257).to_be_bytes()));
    let mut p2 = format!("P2\n{w} {h}\n# comment\n15\n").into_bytes();
    for row in g.chunks(w) {
        let line: Vec<String> = row.iter().map(|&v| (v as u32 * 15 / 255).to_string()).collect();
        p2.extend(line.join(" ").bytes());
        p2.push(b'\n');
    }
    for (name, bytes) in [("p5", p5), ("p5_16", p5_16), ("p2", p2)] {
        let p = write(dir.path(), &format!("{name}.pgm"), &bytes);
        let img = load_gray(&p).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(img.pixels, g, "{name}");
        assert_light_bar(&load_image(&p).unwrap());
    }
    // maxval scaling: 300 of 600 is mid-gray.
    let img = decode_gray(Path::new("x"), b"P2 1 1 600 300").unwrap();
    assert_eq!(img.pixels, vec![128]);
}

#[test]
fn sizes_are_scaled_to_28x28() {
    for (w, h) in [(1, 1), (7, 5), (28, 28), (29, 100), (300, 200), (1000, 3)] {
        let img = GrayImage { width: w, height: h, pixels: vec![77; w * h] };
        let out = resize(&img, 28, 28);
        assert_eq!((out.width, out.height, out.pixels.len()), (28, 28, 784));
        assert!(out.pixels.iter().all(|&v| v == 77), "{w}x{h}: constant stays constant");
    }
    // 28x28 is copied exactly.
    let img = GrayImage { width: 28, height: 28, pixels: (0..784).map(|i| (i % 256) as u8).collect() };
    assert_eq!(resize(&img, 28, 28).pixels, img.pixels);
    // Shrinking by two averages 2x2 blocks.
    let img = GrayImage {
        width: 56,
        height: 56,
        pixels: (0..56 * 56).map(|i| if (i % 56) % 2 == 0 { 0 } else { 200 }).collect(),
    };
    assert!(resize(&img, 28, 28).pixels.iter().all(|&v| v == 100));
    // Enlarging a 2x1 image interpolates between the two pixels.
    let out = resize(&GrayImage { width: 2, height: 1, pixels: vec![0, 255] }, 28, 28);
    assert_eq!(out.pixels[0], 0);
    assert_eq!(out.pixels[27], 255);
    assert!(out.pixels[0..28].windows(2).all(|p| p[0] <= p[1]));
}

#[test]
fn inversion_decided_by_the_border() {
    let light_bg = GrayImage { width: 28, height: 28, pixels: bar(28, 28, 230, 20) };
    let out = to_mnist(&light_bg);
    assert_eq!(out[0], 25);
    assert_eq!(out[14 * 28 + 14], 235);
    let dark_bg = GrayImage { width: 28, height: 28, pixels: bar(28, 28, 20, 230) };
    let out = to_mnist(&dark_bg);
    assert_eq!(out[0], 20);
    assert_eq!(out[14 * 28 + 14], 230);
}

fn assert_error(err: &ImageError, path: &Path, needle: &str) {
    let msg = err.to_string();
    assert!(msg.starts_with(&path.display().to_string()), "message does not name the file: {msg}");
    assert!(msg.contains(needle), "message {msg:?} does not mention {needle:?}");
    assert!(!msg.contains('\n'), "{msg:?}");
}

#[test]
fn bad_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = png_bytes(20, 20, png::ColorType::Grayscale, png::BitDepth::Eight, &[9; 400], None);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty.png", vec![], "empty"),
        ("text.png", b"hello world".to_vec(), "not a PNG or PGM"),
        ("cut.png", good[..good.len() / 2].to_vec(), "corrupt PNG"),
        ("sig.png", good[..8].to_vec(), "corrupt PNG"),
        ("p6.ppm", b"P6 1 1 255\n\0\0\0".to_vec(), "only grayscale PGM"),
        ("cut.pgm", b"P5 4 4 255\n\0\0\0".to_vec(), "truncated"),
        ("nohdr.pgm", b"P5 4".to_vec(), "file ends before the height"),
        ("maxval.pgm", b"P2 1 1 70000 0".to_vec(), "maxval 70000"),
        ("sample.pgm", b"P2 2 1 10 3 11".to_vec(), "sample 11 at index 1 exceeds maxval 10"),
        ("junk.pgm", b"P2 2 1 10 3 x".to_vec(), "expected the sample 1"),
        ("zero.pgm", b"P5 0 3 255\n".to_vec(), "no pixels"),
    ];
    for (name, bytes, needle) in cases {
        let p = write(dir.path(), name, &bytes);
        let err = load_image(&p).unwrap_err();
        assert_error(&err, &p, needle);
    }
    // A flipped bit in the image data fails the CRC.
    let mut crc = good.clone();
    let n = crc.len();
    crc[n - 20] ^= 0x10;
    let p = write(dir.path(), "crc.png", &crc);
    assert_error(&load_image(&p).unwrap_err(), &p, "corrupt PNG");
    let missing = dir.path().join("missing.png");
    assert_error(&load_image(&missing).unwrap_err(), &missing, "cannot read image");
}
