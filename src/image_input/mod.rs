//! Images for `lenet predict`: PNG (any colour type, 1-16 bit), JPEG (baseline or progressive) or Netpbm (PGM, PPM, PBM; ascii or
//! binary, maxval up to 65535) of any size, turned into what the network was trained on: a 28x28
//! 8-bit light digit on black, prepared as MNIST's digits were.
//!
//! - [`read`]: the file's bytes, with a size bound; FIFOs and other streams are read with the same
//!   bound and a time-out, never hanging and never read as "empty".
//! - [`decode`]: PNG, JPEG and Netpbm bytes to 8-bit luminance, with limits checked before allocating.
//! - [`resample`]: area-averaging (downscale) and bilinear (upscale) resampling of any rectangle,
//!   in memory bounded by the output.
//! - `prepare`: background removal, polarity, contrast, the ink's box, stroke width, and the
//!   20x20 box centred by mass in 28x28.
//! - [`save`]: `--save-prepared`: the 28x28 images written as PGM, never over an input.
//!
//! Memory: a decoded image is one byte per pixel, at most [`MAX_IMAGE_PIXELS`] pixels; the PNG
//! decoder holds one row at a time, the JPEG decoder the luminance plane (a JPEG's size is also
//! bounded by its file's length); everything after decoding works on images of fixed bounded size.

pub mod decode;
pub mod one_digit;
pub mod prepare;
pub mod read;
pub mod resample;
pub mod save;

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use decode::decode_gray;
pub use prepare::{prepare, to_mnist, InkReport, Polarity, Prepared};

/// Image files (and streams) larger than this are refused.
pub const MAX_IMAGE_FILE_BYTES: u64 = 256 << 20;
/// Decoded images with more pixels than this are refused (8192 x 8192; a 67-megapixel photo).
pub const MAX_IMAGE_PIXELS: u64 = 1 << 26;
/// Rows longer than this many pixels are refused: the PNG decoder holds a row or two at a time, of
/// up to 8 bytes a pixel (so at most 16 MiB). A 1 x 60,000,000 image is read; 60,000,000 x 1 is not.
pub const MAX_ROW_PIXELS: u64 = 1 << 20;
/// How long a FIFO or other stream may stay silent before it is given up on.
pub const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// An 8-bit grayscale image (luminance), row-major.
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
    #[error("{}: {reason}", path.display())]
    Stream { path: PathBuf, reason: String },
    #[error("{}: image too large: {reason}", path.display())]
    TooLarge { path: PathBuf, reason: String },
    #[error("{}: unsupported image: {reason}", path.display())]
    Unsupported { path: PathBuf, reason: String },
    #[error("{}: corrupt {format} image: {reason}", path.display())]
    Corrupt { path: PathBuf, format: &'static str, reason: String },
}

/// Reads an image file (or stream) and prepares it as MNIST's digits were.
pub fn load_image(path: &Path) -> Result<Prepared, ImageError> {
    Ok(prepare(&load_gray(path)?))
}

/// Reads an image file (or stream) as 8-bit luminance at its own size.
pub fn load_gray(path: &Path) -> Result<GrayImage, ImageError> {
    let bytes = read::read_image_bytes(path, MAX_IMAGE_FILE_BYTES, STREAM_IDLE_TIMEOUT)?;
    decode_gray(path, &bytes)
}
