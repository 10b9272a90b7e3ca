//! Images for `lenet predict`: PNG (any colour type, 1-16 bit) or PGM (P2 ascii, P5 binary, maxval
//! up to 65535) of any size, turned into what the network was trained on: 28x28 8-bit gray, a
//! light digit on a dark background, as MNIST is.

use std::fs::File;
use std::io::{self, Cursor, Read};
use std::path::{Path, PathBuf};

use crate::model::{IMAGE_PIXELS, IMAGE_SIDE};

/// Image files larger than this are refused before they are read.
pub const MAX_IMAGE_FILE_BYTES: u64 = 256 << 20;
/// Decoded images with more pixels than this are refused (a 16k x 16k scan is plenty).
pub const MAX_IMAGE_PIXELS: u64 = 1 << 28;

/// An 8-bit grayscale image, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrayImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// What can go wrong reading an image. Each message is one line that starts with the file's path.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{}: cannot read image: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: image file is empty", path.display())]
    Empty { path: PathBuf },
    #[error("{}: image too large: {reason}", path.display())]
    TooLarge { path: PathBuf, reason: String },
    #[error("{}: unsupported image: {reason}", path.display())]
    Unsupported { path: PathBuf, reason: String },
    #[error("{}: corrupt {format} image: {reason}", path.display())]
    Corrupt { path: PathBuf, format: &'static str, reason: String },
}

/// Reads a PNG or PGM file and returns the 28x28 MNIST-style input for it.
pub fn load_image(path: &Path) -> Result<[u8; IMAGE_PIXELS], ImageError> {
    Ok(to_mnist(&load_gray(path)?))
}

/// Reads a PNG or PGM file as 8-bit gray at its own size.
pub fn load_gray(path: &Path) -> Result<GrayImage, ImageError> {
    let io_err = |source| ImageError::Io { path: path.to_owned(), source };
    let file = File::open(path).map_err(io_err)?;
    let size = file.metadata().map_err(io_err)?.len();
    if size > MAX_IMAGE_FILE_BYTES {
        return Err(ImageError::TooLarge {
            path: path.to_owned(),
            reason: format!("{size} bytes (at most {MAX_IMAGE_FILE_BYTES})"),
        });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(MAX_IMAGE_FILE_BYTES).read_to_end(&mut bytes).map_err(io_err)?;
    decode_gray(path, &bytes)
}

/// Decodes PNG or PGM bytes (recognised by their magic, not the file name) as 8-bit gray; `path`
/// only names the source in errors.
pub fn decode_gray(path: &Path, bytes: &[u8]) -> Result<GrayImage, ImageError> {
    const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    if bytes.is_empty() {
        return Err(ImageError::Empty { path: path.to_owned() });
    }
    if bytes.starts_with(&PNG_SIGNATURE) {
        return decode_png(path, bytes);
    }
    match bytes.get(..2) {
        Some(b"P2") | Some(b"P5") => decode_pgm(path, bytes),
        Some([b'P', b'1'..=b'7']) => Err(ImageError::Unsupported {
            path: path.to_owned(),
            reason: format!(
                "Netpbm type {}; only grayscale PGM (P2, P5) is read",
                String::from_utf8_lossy(&bytes[..2])
            ),
        }),
        _ => Err(ImageError::Unsupported {
            path: path.to_owned(),
            reason: "not a PNG or PGM (P2/P5) file".into(),
        }),
    }
}

fn decode_png(path: &Path, bytes: &[u8]) -> Result<GrayImage, ImageError> {
    let corrupt = |e: png::DecodingError| match e {
        png::DecodingError::LimitsExceeded => ImageError::TooLarge {
            path: path.to_owned(),
            reason: "PNG exceeds the decoder's memory limit".into(),
        },
        e => ImageError::Corrupt { path: path.to_owned(), format: "PNG", reason: e.to_string() },
    };
    let mut decoder = png::Decoder::new(Cursor::new(bytes));
    // Palette -> RGB(A), gray < 8 bit -> 8 bit, tRNS -> alpha, 16 bit -> 8 bit.
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().map_err(corrupt)?;
    let (width, height) = {
        let info = reader.info();
        (info.width as usize, info.height as usize)
    };
    check_pixels(path, width, height)?;
    let size = reader.output_buffer_size().ok_or_else(|| ImageError::TooLarge {
        path: path.to_owned(),
        reason: format!("{width}x{height} PNG"),
    })?;
    // Deflate expands at most ~1032:1, so a frame buffer far larger than that would be backed by
    // no data: refuse it rather than allocate what a forged header claims.
    let most = bytes.len().saturating_mul(1032).saturating_add(1 << 20);
    if size > most {
        return Err(ImageError::Corrupt {
            path: path.to_owned(),
            format: "PNG",
            reason: format!("{width}x{height} pixels cannot come from {} bytes", bytes.len()),
        });
    }
    let mut buf = vec![0u8; size];
    let out = reader.next_frame(&mut buf).map_err(corrupt)?;
    let channels = match out.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => {
            return Err(ImageError::Unsupported {
                path: path.to_owned(),
                reason: "palette PNG was not expanded".into(),
            })
        }
    };
    if out.bit_depth != png::BitDepth::Eight {
        return Err(ImageError::Unsupported {
            path: path.to_owned(),
            reason: format!("PNG bit depth {:?} after normalisation", out.bit_depth),
        });
    }
    let (width, height) = (out.width as usize, out.height as usize);
    let mut pixels = Vec::with_capacity(width * height);
    for row in buf.chunks(out.line_size).take(height) {
        for px in row[..width * channels].chunks_exact(channels) {
            let (gray, alpha) = match channels {
                1 => (px[0] as u32, 255),
                2 => (px[0] as u32, px[1] as u32),
                3 => (luma(px[0], px[1], px[2]), 255),
                _ => (luma(px[0], px[1], px[2]), px[3] as u32),
            };
            // Transparent pixels are composited over white: a drawn digit with an alpha channel is
            // almost always dark ink on a transparent page, which then reads as dark on light.
            pixels.push(((gray * alpha + 255 * (255 - alpha) + 127) / 255) as u8);
        }
    }
    Ok(GrayImage { width, height, pixels })
}

/// ITU-R BT.601 luma, rounded.
fn luma(r: u8, g: u8, b: u8) -> u32 {
    (299 * r as u32 + 587 * g as u32 + 114 * b as u32 + 500) / 1000
}

fn check_pixels(path: &Path, width: usize, height: usize) -> Result<(), ImageError> {
    if width == 0 || height == 0 {
        return Err(ImageError::Corrupt {
            path: path.to_owned(),
            format: "image",
            reason: format!("{width}x{height} has no pixels"),
        });
    }
    if width as u64 * height as u64 > MAX_IMAGE_PIXELS {
        return Err(ImageError::TooLarge {
            path: path.to_owned(),
            reason: format!("{width}x{height} pixels (at most {MAX_IMAGE_PIXELS})"),
        });
    }
    Ok(())
}

/// A cursor over a PGM header: whitespace-separated ascii integers with `#` comments.
struct Tokens<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Tokens<'_> {
    fn skip_space(&mut self) {
        while let Some(&b) = self.bytes.get(self.pos) {
            if b == b'#' {
                while self.bytes.get(self.pos).is_some_and(|&c| c != b'\n' && c != b'\r') {
                    self.pos += 1;
                }
            } else if b.is_ascii_whitespace() {
                self.pos += 1;
            } else {
                break;
            }
        }
    }

    /// The next unsigned integer, or a description of what was found instead.
    fn number(&mut self, what: &str) -> Result<u64, String> {
        self.skip_space();
        let start = self.pos;
        while self.bytes.get(self.pos).is_some_and(u8::is_ascii_digit) {
            self.pos += 1;
        }
        if start == self.pos {
            return Err(match self.bytes.get(self.pos) {
                None => format!("file ends before the {what}"),
                Some(&b) => format!("expected the {what}, found byte 0x{b:02x}"),
            });
        }
        std::str::from_utf8(&self.bytes[start..self.pos])
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| format!("{what} is too large"))
    }
}

fn decode_pgm(path: &Path, bytes: &[u8]) -> Result<GrayImage, ImageError> {
    let corrupt = |reason: String| ImageError::Corrupt { path: path.to_owned(), format: "PGM", reason };
    let binary = &bytes[..2] == b"P5";
    let mut t = Tokens { bytes, pos: 2 };
    let width = t.number("width").map_err(corrupt)?;
    let height = t.number("height").map_err(corrupt)?;
    let maxval = t.number("maxval").map_err(corrupt)?;
    if !(1..=65535).contains(&maxval) {
        return Err(corrupt(format!("maxval {maxval} is outside 1-65535")));
    }
    let (width, height) = (
        usize::try_from(width).map_err(|_| corrupt("width is too large".into()))?,
        usize::try_from(height).map_err(|_| corrupt("height is too large".into()))?,
    );
    check_pixels(path, width, height)?;
    let n = width * height;
    let to8 = |v: u64| ((v * 255 + maxval / 2) / maxval) as u8;
    let mut pixels = Vec::with_capacity(n.min(bytes.len()));
    if binary {
        // Exactly one whitespace byte separates maxval from the samples.
        if !bytes.get(t.pos).is_some_and(u8::is_ascii_whitespace) {
            return Err(corrupt("no whitespace after maxval".into()));
        }
        let data = &bytes[t.pos + 1..];
        let sample_bytes = if maxval < 256 { 1 } else { 2 };
        let need = n as u64 * sample_bytes;
        if (data.len() as u64) < need {
            return Err(corrupt(format!(
                "truncated: {width}x{height} needs {need} bytes of samples, found {}",
                data.len()
            )));
        }
        for (i, s) in data.chunks_exact(sample_bytes as usize).take(n).enumerate() {
            let v = if sample_bytes == 1 { s[0] as u64 } else { u16::from_be_bytes([s[0], s[1]]) as u64 };
            if v > maxval {
                return Err(corrupt(format!("sample {v} at index {i} exceeds maxval {maxval}")));
            }
            pixels.push(to8(v));
        }
    } else {
        for i in 0..n {
            let v = t.number(&format!("sample {i}")).map_err(corrupt)?;
            if v > maxval {
                return Err(corrupt(format!("sample {v} at index {i} exceeds maxval {maxval}")));
            }
            pixels.push(to8(v));
        }
    }
    Ok(GrayImage { width, height, pixels })
}

/// Scales to 28x28 and makes the digit light on dark, as in MNIST.
pub fn to_mnist(img: &GrayImage) -> [u8; IMAGE_PIXELS] {
    // MNIST digits are light strokes on a black background. A photo or scan of ink on paper is the
    // opposite. The border of a digit image is nearly all background, so its mean tells which
    // case this is: a light border (mean above mid-gray) means dark-on-light, which is inverted.
    let invert = border_mean(img) > 127.5;
    let scaled = resize(img, IMAGE_SIDE, IMAGE_SIDE);
    let mut out = [0u8; IMAGE_PIXELS];
    for (o, &v) in out.iter_mut().zip(&scaled.pixels) {
        *o = if invert { 255 - v } else { v };
    }
    out
}

/// Mean of the outermost ring of pixels.
pub fn border_mean(img: &GrayImage) -> f64 {
    let (w, h) = (img.width, img.height);
    let mut sum = 0u64;
    let mut count = 0u64;
    for y in 0..h {
        for x in 0..w {
            if y == 0 || y + 1 == h || x == 0 || x + 1 == w {
                sum += img.pixels[y * w + x] as u64;
                count += 1;
            }
        }
    }
    if count == 0 {
        0.0
    } else {
        sum as f64 / count as f64
    }
}

/// Resizes to `width` x `height`: each axis by area averaging where it shrinks and by bilinear
/// interpolation (pixel centres aligned) where it grows. The aspect ratio is not kept.
pub fn resize(img: &GrayImage, width: usize, height: usize) -> GrayImage {
    let wx = axis_weights(img.width, width);
    let wy = axis_weights(img.height, height);
    // Horizontal pass: img.height rows of `width` values.
    let mut tmp = vec![0f32; img.height * width];
    for y in 0..img.height {
        let row = &img.pixels[y * img.width..(y + 1) * img.width];
        for (x, taps) in wx.iter().enumerate() {
            tmp[y * width + x] = taps.iter().map(|&(i, w)| row[i] as f32 * w).sum();
        }
    }
    let mut pixels = vec![0u8; width * height];
    for (y, taps) in wy.iter().enumerate() {
        for x in 0..width {
            let v: f32 = taps.iter().map(|&(i, w)| tmp[i * width + x] * w).sum();
            pixels[y * width + x] = v.round().clamp(0.0, 255.0) as u8;
        }
    }
    GrayImage { width, height, pixels }
}

/// For each destination index, the (source index, weight) taps; weights sum to 1.
fn axis_weights(src: usize, dst: usize) -> Vec<Vec<(usize, f32)>> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|i| {
            if src > dst {
                // Area: destination pixel i covers source interval [i*scale, (i+1)*scale).
                let (lo, hi) = (i as f64 * scale, (i + 1) as f64 * scale);
                let mut taps = Vec::new();
                let mut j = lo.floor() as usize;
                while (j as f64) < hi && j < src {
                    let overlap = hi.min(j as f64 + 1.0) - lo.max(j as f64);
                    if overlap > 0.0 {
                        taps.push((j, (overlap / scale) as f32));
                    }
                    j += 1;
                }
                taps
            } else {
                let x = ((i as f64 + 0.5) * scale - 0.5).clamp(0.0, (src - 1) as f64);
                let j = x.floor() as usize;
                let f = x - j as f64;
                if j + 1 < src && f > 0.0 {
                    vec![(j, (1.0 - f) as f32), (j + 1, f as f32)]
                } else {
                    vec![(j, 1.0)]
                }
            }
        })
        .collect()
}
