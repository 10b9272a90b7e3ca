//! PNG, JPEG and Netpbm bytes to 8-bit luminance. Sizes are checked (with checked arithmetic) against
//! [`MAX_IMAGE_PIXELS`] and [`MAX_ROW_PIXELS`], and against the data really present, before
//! anything is allocated for them; the PNG decoder hands over one row at a time.

use std::io::Cursor;
use std::path::Path;

use super::{GrayImage, ImageError, MAX_IMAGE_PIXELS, MAX_ROW_PIXELS};

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
/// A JPEG file's start-of-image marker and the first byte of the next marker.
const JPEG_SIGNATURE: [u8; 3] = [0xff, 0xd8, 0xff];

/// Decodes PNG, JPEG or Netpbm bytes (recognised by their magic, not the file name) as 8-bit luminance;
/// `path` only names the source in errors.
pub fn decode_gray(path: &Path, bytes: &[u8]) -> Result<GrayImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty { path: path.to_owned() });
    }
    if bytes.starts_with(&PNG_SIGNATURE) {
        return decode_png(path, bytes);
    }
    if bytes.starts_with(&JPEG_SIGNATURE) {
        return decode_jpeg(path, bytes);
    }
    match bytes.get(..2) {
        Some([b'P', b'1'..=b'6']) => decode_netpbm(path, bytes),
        Some(b"P7") => Err(ImageError::Unsupported {
            path: path.to_owned(),
            reason: "PAM (P7) is not read; PNG, JPEG, PGM, PPM and PBM are".into(),
        }),
        _ => Err(not_an_image(path, bytes)),
    }
}

/// Whether `bytes` start like a file [`decode_gray`] reads.
pub fn has_image_magic(bytes: &[u8]) -> bool {
    bytes.starts_with(&PNG_SIGNATURE[..bytes.len().min(8)])
        || bytes.starts_with(&JPEG_SIGNATURE[..bytes.len().min(3)])
        || matches!(bytes, [b'P', b'1'..=b'6', ..])
}

/// The error for bytes that are no image we read, naming the format when it is a common one.
pub fn not_an_image(path: &Path, bytes: &[u8]) -> ImageError {
    let known = [
        (&b"GIF8"[..], "GIF"),
        (b"BM", "BMP"),
        (b"II*\0", "TIFF"),
        (b"MM\0*", "TIFF"),
        (b"RIFF", "RIFF (WebP?)"),
    ];
    let hint = match known.iter().find(|(magic, _)| bytes.starts_with(magic)) {
        Some((_, name)) => format!("a {name} file; convert it to PNG"),
        None => "not a PNG, JPEG or Netpbm (PGM, PPM, PBM) file".into(),
    };
    ImageError::Unsupported { path: path.to_owned(), reason: hint }
}

/// Refuses sizes with no pixels or more than the limits; `width * height` cannot overflow here.
fn check_size(path: &Path, width: u64, height: u64) -> Result<usize, ImageError> {
    if width == 0 || height == 0 {
        return Err(ImageError::Corrupt {
            path: path.to_owned(),
            format: "image",
            reason: format!("{width}x{height} has no pixels"),
        });
    }
    let too_large = |reason: String| ImageError::TooLarge { path: path.to_owned(), reason };
    let pixels = width
        .checked_mul(height)
        .filter(|&n| n <= MAX_IMAGE_PIXELS)
        .ok_or_else(|| too_large(format!("{width}x{height} pixels (at most {MAX_IMAGE_PIXELS} pixels)")))?;
    if width > MAX_ROW_PIXELS {
        return Err(too_large(format!("rows of {width} pixels (at most {MAX_ROW_PIXELS})")));
    }
    usize::try_from(pixels).map_err(|_| too_large(format!("{width}x{height} pixels")))
}

/// ITU-R BT.601 luma of 8-bit R'G'B', rounded.
pub fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((299 * r as u32 + 587 * g as u32 + 114 * b as u32 + 500) / 1000) as u8
}

fn decode_png(path: &Path, bytes: &[u8]) -> Result<GrayImage, ImageError> {
    let corrupt = |e: png::DecodingError| match e {
        png::DecodingError::LimitsExceeded => ImageError::TooLarge {
            path: path.to_owned(),
            reason: "PNG exceeds the decoder's memory limit".into(),
        },
        e => ImageError::Corrupt { path: path.to_owned(), format: "PNG", reason: e.to_string() },
    };
    // The limit covers the decoder's own buffers (text, ICC profiles, ...), not our image.
    let mut decoder = png::Decoder::new_with_limits(Cursor::new(bytes), png::Limits { bytes: 16 << 20 });
    // Palette -> RGB(A), gray < 8 bit -> 8 bit, tRNS -> alpha, 16 bit -> 8 bit.
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().map_err(corrupt)?;
    let (width, height, interlaced, raw_bits) = {
        let info = reader.info();
        (info.width as u64, info.height as u64, info.interlaced, info.bits_per_pixel() as u64)
    };
    let pixels = check_size(path, width, height)?;
    // Deflate expands at most ~1032:1, so an image whose raw rows need far more than that would be
    // backed by no data: refuse it rather than allocate what a forged header claims.
    let raw_bytes = height * (1 + (width * raw_bits).div_ceil(8));
    let most = (bytes.len() as u64).saturating_mul(1032).saturating_add(1 << 20);
    if raw_bytes > most {
        return Err(ImageError::Corrupt {
            path: path.to_owned(),
            format: "PNG",
            reason: format!("{width}x{height} pixels cannot come from {} bytes", bytes.len()),
        });
    }
    let (color, depth) = reader.output_color_type();
    if depth != png::BitDepth::Eight || color == png::ColorType::Indexed {
        return Err(ImageError::Unsupported {
            path: path.to_owned(),
            reason: format!("PNG {color:?} {depth:?} after normalisation"),
        });
    }
    let channels = color.samples();
    let has_alpha = matches!(color, png::ColorType::GrayscaleAlpha | png::ColorType::Rgba);
    let width = width as usize;
    let mut gray = vec![0u8; pixels];
    let mut alpha = if has_alpha { vec![0u8; pixels] } else { Vec::new() };
    // One row converted to luminance (and alpha), before an interlaced row is spread out.
    let mut row_gray = vec![0u8; width];
    let mut row_alpha = vec![0u8; if has_alpha { width } else { 0 }];
    let mut next_line = 0usize;
    while let Some(row) = reader.next_interlaced_row().map_err(corrupt)? {
        let data = row.data();
        let n = data.len() / channels;
        for (i, px) in data.chunks_exact(channels).enumerate() {
            row_gray[i] = match channels {
                1 | 2 => px[0],
                _ => luma(px[0], px[1], px[2]),
            };
            if has_alpha {
                row_alpha[i] = px[channels - 1];
            }
        }
        match row.interlace() {
            png::InterlaceInfo::Adam7(info) => {
                png::expand_interlaced_row(&mut gray, width, &row_gray[..n], info, 8);
                if has_alpha {
                    png::expand_interlaced_row(&mut alpha, width, &row_alpha[..n], info, 8);
                }
            }
            png::InterlaceInfo::Null(_) => {
                let at = next_line * width;
                gray[at..at + n].copy_from_slice(&row_gray[..n]);
                if has_alpha {
                    alpha[at..at + n].copy_from_slice(&row_alpha[..n]);
                }
                next_line += 1;
            }
        }
    }
    if !interlaced && next_line != height as usize {
        return Err(ImageError::Corrupt {
            path: path.to_owned(),
            format: "PNG",
            reason: format!("{next_line} of {height} rows"),
        });
    }
    // Reads to the end, so that damage after the last row (a bad CRC) is not ignored.
    reader.finish().map_err(corrupt)?;
    if has_alpha {
        composite(&mut gray, &alpha);
    }
    Ok(GrayImage { width, height: height as usize, pixels: gray })
}

/// Flattens luminance with alpha onto a backdrop that contrasts with the opaque part: a digit drawn
/// on a transparent canvas is ink where alpha is high, whatever colour its transparent pixels have.
/// Dark opaque content goes on white, light content on black.
fn composite(gray: &mut [u8], alpha: &[u8]) {
    let (mut weight, mut sum) = (0u64, 0u64);
    for (&g, &a) in gray.iter().zip(alpha) {
        weight += a as u64;
        sum += g as u64 * a as u64;
    }
    let backdrop: u32 = if weight > 0 && sum / weight > 127 { 0 } else { 255 };
    for (g, &a) in gray.iter_mut().zip(alpha) {
        let a = a as u32;
        *g = ((*g as u32 * a + backdrop * (255 - a) + 127) / 255) as u8;
    }
}

/// A cursor over a Netpbm header: whitespace-separated ascii integers with `#` comments.
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

    /// The next unsigned integer (at most `digits` digits long when given), or a description of
    /// what was found instead.
    fn number(&mut self, what: &dyn Fn() -> String, digits: Option<usize>) -> Result<u64, String> {
        self.skip_space();
        let start = self.pos;
        while self.bytes.get(self.pos).is_some_and(u8::is_ascii_digit)
            && digits.is_none_or(|d| self.pos - start < d)
        {
            self.pos += 1;
        }
        if start == self.pos {
            return Err(match self.bytes.get(self.pos) {
                None => format!("file ends before the {}", what()),
                Some(&b) => format!("expected the {}, found byte 0x{b:02x}", what()),
            });
        }
        std::str::from_utf8(&self.bytes[start..self.pos])
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| format!("{} is too large", what()))
    }
}

/// P1/P4 (bitmap, 1 = black), P2/P5 (gray), P3/P6 (RGB); ascii or binary, maxval 1-65535.
fn decode_netpbm(path: &Path, bytes: &[u8]) -> Result<GrayImage, ImageError> {
    let kind = bytes[1];
    let format = match kind {
        b'1' | b'4' => "PBM",
        b'2' | b'5' => "PGM",
        _ => "PPM",
    };
    let corrupt = |reason: String| ImageError::Corrupt { path: path.to_owned(), format, reason };
    let binary = kind >= b'4';
    let bitmap = kind == b'1' || kind == b'4';
    let channels: u64 = if kind == b'3' || kind == b'6' { 3 } else { 1 };
    let mut t = Tokens { bytes, pos: 2 };
    let width = t.number(&|| "width".into(), None).map_err(corrupt)?;
    let height = t.number(&|| "height".into(), None).map_err(corrupt)?;
    let maxval = if bitmap { 1 } else { t.number(&|| "maxval".into(), None).map_err(corrupt)? };
    if !(1..=65535).contains(&maxval) {
        return Err(corrupt(format!("maxval {maxval} is outside 1-65535")));
    }
    let n = check_size(path, width, height)?;
    let width = width as usize;
    // Every pixel needs at least one byte of ascii (PBM) or of samples (the binary formats but
    // PBM's 8 pixels a byte), so a header claiming more pixels than that is refused before the
    // image is allocated.
    let data_start = if binary {
        // Exactly one whitespace byte separates the header from the samples.
        if !bytes.get(t.pos).is_some_and(u8::is_ascii_whitespace) {
            return Err(corrupt("no whitespace before the samples".into()));
        }
        t.pos + 1
    } else {
        t.pos
    };
    let data = &bytes[data_start..];
    let sample_bytes: u64 = if maxval < 256 { 1 } else { 2 };
    let need = if kind == b'4' {
        (width as u64).div_ceil(8) * height
    } else if binary {
        n as u64 * channels * sample_bytes
    } else {
        n as u64
    };
    if (data.len() as u64) < need {
        let what = if binary { "bytes of samples" } else { "bytes of ascii samples at least" };
        return Err(corrupt(format!(
            "truncated: {width}x{height} needs {need} {what}, found {}",
            data.len()
        )));
    }
    let to8 = |v: u64| ((v * 255 + maxval / 2) / maxval) as u8;
    let mut pixels = Vec::with_capacity(n);
    let check = |v: u64, i: usize| {
        if v > maxval {
            Err(corrupt(format!("sample {v} at index {i} exceeds maxval {maxval}")))
        } else {
            Ok(v)
        }
    };
    match kind {
        b'4' => {
            let stride = width.div_ceil(8);
            for row in data.chunks_exact(stride).take(height as usize) {
                for x in 0..width {
                    let black = row[x / 8] & (0x80 >> (x % 8)) != 0;
                    pixels.push(if black { 0 } else { 255 });
                }
            }
        }
        b'5' | b'6' => {
            let step = (channels * sample_bytes) as usize;
            for (i, px) in data.chunks_exact(step).take(n).enumerate() {
                let sample = |c: usize| {
                    let s = &px[c * sample_bytes as usize..];
                    let v =
                        if sample_bytes == 1 { s[0] as u64 } else { u16::from_be_bytes([s[0], s[1]]) as u64 };
                    check(v, i * channels as usize + c).map(to8)
                };
                pixels.push(if channels == 1 {
                    sample(0)?
                } else {
                    luma(sample(0)?, sample(1)?, sample(2)?)
                });
            }
        }
        _ => {
            // PBM's ascii bits need no whitespace between them ("0110" is four pixels).
            let digits = bitmap.then_some(1);
            for i in 0..n {
                let mut sample = |c: u64| {
                    let index = i as u64 * channels + c;
                    let v = t.number(&|| format!("sample {index}"), digits).map_err(corrupt)?;
                    check(v, index as usize).map(to8)
                };
                pixels.push(match (bitmap, channels) {
                    (true, _) => 255 - sample(0)?,
                    (false, 1) => sample(0)?,
                    _ => luma(sample(0)?, sample(1)?, sample(2)?),
                });
            }
        }
    }
    Ok(GrayImage { width, height: height as usize, pixels })
}

/// Baseline and progressive JPEG (gray, YCbCr, CMYK), through `zune-jpeg` in strict mode (a
/// truncated or damaged file is an error, not an image half filled with gray). The size in the
/// frame header is checked against the limits before the pixels are allocated. For YCbCr the
/// luminance is the file's own Y channel, BT.601 luma as [`luma`] computes it.
fn decode_jpeg(path: &Path, bytes: &[u8]) -> Result<GrayImage, ImageError> {
    use zune_jpeg::zune_core::bytestream::ZCursor;
    use zune_jpeg::zune_core::colorspace::ColorSpace;
    use zune_jpeg::zune_core::options::DecoderOptions;
    let corrupt = |e: zune_jpeg::errors::DecodeErrors| ImageError::Corrupt {
        path: path.to_owned(),
        format: "JPEG",
        reason: e.to_string().split_whitespace().collect::<Vec<_>>().join(" "),
    };
    // JPEG's own size fields are 16-bit: the decoder's default cap (16384) would refuse what
    // MAX_IMAGE_PIXELS allows; our limits are checked below instead.
    let options = DecoderOptions::default()
        .set_strict_mode(true)
        .set_max_width(u16::MAX as usize)
        .set_max_height(u16::MAX as usize)
        .jpeg_set_out_colorspace(ColorSpace::Luma);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    decoder.decode_headers().map_err(corrupt)?;
    let (width, height) = decoder.dimensions().ok_or_else(|| ImageError::Corrupt {
        path: path.to_owned(),
        format: "JPEG",
        reason: "no frame header".into(),
    })?;
    let pixels = check_size(path, width as u64, height as u64)?;
    // Every 8x8 block of a component costs at least one bit of entropy-coded data (its DC code,
    // baseline or progressive), so a file holds at most 512 pixels a byte: an image whose header
    // claims far more would be backed by no data. Refuse it rather than allocate for it.
    let most = (bytes.len() as u64).saturating_mul(1024).saturating_add(1 << 20);
    if pixels as u64 > most {
        return Err(ImageError::Corrupt {
            path: path.to_owned(),
            format: "JPEG",
            reason: format!("{width}x{height} pixels cannot come from {} bytes", bytes.len()),
        });
    }
    // CMYK and YCCK have no luminance channel to take: decode to RGB and weigh it.
    let cmyk = matches!(decoder.input_colorspace(), Some(ColorSpace::CMYK | ColorSpace::YCCK));
    if cmyk {
        decoder.set_options(options.jpeg_set_out_colorspace(ColorSpace::RGB));
    }
    let mut out = vec![0u8; decoder.output_buffer_size().unwrap_or(0).max(pixels)];
    decoder.decode_into(&mut out).map_err(corrupt)?;
    let gray = if cmyk {
        out.chunks_exact(3).take(pixels).map(|p| luma(p[0], p[1], p[2])).collect()
    } else {
        out.truncate(pixels);
        out
    };
    let orientation = decoder.exif().and_then(|tiff| exif_orientation(tiff)).unwrap_or(1);
    Ok(orient(GrayImage { width, height, pixels: gray }, orientation))
}

/// The EXIF Orientation tag (0x0112) of IFD0, from EXIF data starting at its TIFF header: how a
/// camera says the stored pixels must be turned to stand upright (phones store a portrait photo
/// sideways and set 6 or 8). `None` when absent or malformed.
pub fn exif_orientation(tiff: &[u8]) -> Option<u16> {
    let big = match tiff.get(..4)? {
        [b'M', b'M', 0, 42] => true,
        [b'I', b'I', 42, 0] => false,
        _ => return None,
    };
    let u16_at = |at: usize| -> Option<u16> {
        let b: [u8; 2] = tiff.get(at..at.checked_add(2)?)?.try_into().ok()?;
        Some(if big { u16::from_be_bytes(b) } else { u16::from_le_bytes(b) })
    };
    let u32_at = |at: usize| -> Option<u32> {
        let b: [u8; 4] = tiff.get(at..at.checked_add(4)?)?.try_into().ok()?;
        Some(if big { u32::from_be_bytes(b) } else { u32::from_le_bytes(b) })
    };
    let ifd = u32_at(4)? as usize;
    let entries = u16_at(ifd)? as usize;
    // Each entry: tag, type, count (u32), value (4 bytes; a SHORT sits in the first two).
    (0..entries).map(|i| ifd + 2 + 12 * i).find(|&at| u16_at(at) == Some(0x0112)).and_then(|at| {
        let value = u16_at(at + 8)?;
        (u16_at(at + 2)? == 3 && (1..=8).contains(&value)).then_some(value)
    })
}

/// The image turned as EXIF orientation `o` says (1: as stored; 2-8: mirrored and/or rotated).
pub fn orient(img: GrayImage, o: u16) -> GrayImage {
    if !(2..=8).contains(&o) {
        return img;
    }
    let (w, h) = (img.width, img.height);
    // Orientations 5-8 swap the axes.
    let (ow, oh) = if o >= 5 { (h, w) } else { (w, h) };
    let mut pixels = vec![0u8; w * h];
    for y in 0..oh {
        for x in 0..ow {
            // The stored pixel that lands at (x, y) of the upright image.
            let (sx, sy) = match o {
                2 => (w - 1 - x, y),
                3 => (w - 1 - x, h - 1 - y),
                4 => (x, h - 1 - y),
                5 => (y, x),
                6 => (y, h - 1 - x),
                7 => (w - 1 - y, h - 1 - x),
                _ => (w - 1 - y, x),
            };
            pixels[y * ow + x] = img.pixels[sy * w + sx];
        }
    }
    GrayImage { width: ow, height: oh, pixels }
}
