//! Property tests: the IDX parser (raw and gzip), the checkpoint loader and the image decoders
//! never panic on random bytes or on mutations of valid files, and never make a single
//! allocation over [`MAX_ALLOCATION`] (a header's claims are bounded by the data really present).
//! Every parser and conversion call below runs inside [`bounded`], which checks that: the inputs
//! are built outside it, and nothing the tests claim is bounded runs outside it.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;
use std::path::Path;
use std::sync::OnceLock;

use flate2::write::GzEncoder;
use flate2::Compression;
use lenet::checkpoint::{load_checkpoint, parse_checkpoint, save_checkpoint};
use lenet::data::{load_idx_images, load_idx_labels};
use lenet::image_input::decode_gray;
use lenet::model::{Params, TrainState};
use lenet::optim::Optimizer;
use proptest::prelude::*;

const CASES: u32 = 256;
/// No single allocation while parsing these small inputs (a few KB, or a 740 KB checkpoint) may
/// exceed this: anything larger came from believing a header instead of the data.
const MAX_ALLOCATION: usize = 8 << 20;

/// Records the largest single allocation made by the current thread, so each property can check
/// what the parser it called asked for (tests run on parallel threads, hence thread-local).
struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|m| m.set(m.get().max(size)));
}

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// Runs `f` and panics if it made any single allocation above [`MAX_ALLOCATION`].
fn bounded<T>(what: &str, f: impl FnOnce() -> T) -> T {
    LARGEST.with(|m| m.set(0));
    let out = f();
    let largest = LARGEST.with(|m| m.get());
    assert!(largest <= MAX_ALLOCATION, "{what} allocated {largest} bytes at once");
    out
}

fn images_idx(count: u32) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend(0x0000_0803u32.to_be_bytes());
    v.extend(count.to_be_bytes());
    v.extend(28u32.to_be_bytes());
    v.extend(28u32.to_be_bytes());
    v.extend((0..count as usize * 784).map(|i| (i * 31 % 256) as u8));
    v
}

fn labels_idx(count: u32) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend(0x0000_0801u32.to_be_bytes());
    v.extend(count.to_be_bytes());
    v.extend((0..count).map(|i| (i % 10) as u8));
    v
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn checkpoint_bytes() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ck.safetensors");
        let mut s = TrainState::new(Params::init(1), Optimizer::default(), 1, 32, true);
        // A second moment is never negative (a file with a negative one is refused on load).
        let mut v = Params::init(3);
        v.tensors.iter_mut().flatten().for_each(|x| *x = x.abs());
        s.moments = vec![Params::init(2), v];
        save_checkpoint(&path, &s).unwrap();
        std::fs::read(&path).unwrap()
    })
}

#[derive(Clone, Debug)]
enum Mutation {
    FlipBit(usize, u8),
    SetByte(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    /// Overwrite a header u32 (IDX count/rows/cols, or the safetensors header length) with a value.
    HeaderWord(usize, u32),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::SetByte(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(i, v)| Mutation::Insert(i, v)),
        (
            0usize..4,
            prop_oneof![Just(0u32), Just(1), Just(28), Just(u32::MAX), Just(0x8000_0000), any::<u32>()]
        )
            .prop_map(|(w, v)| Mutation::HeaderWord(w, v)),
    ]
}

fn apply(bytes: &mut Vec<u8>, mutations: &[Mutation]) {
    for m in mutations {
        let n = bytes.len().max(1);
        match m {
            Mutation::FlipBit(i, b) if !bytes.is_empty() => bytes[i % n] ^= 1 << b,
            Mutation::SetByte(i, v) if !bytes.is_empty() => bytes[i % n] = *v,
            Mutation::Truncate(i) => bytes.truncate(i % (bytes.len() + 1)),
            Mutation::Insert(i, v) => {
                let at = i % (bytes.len() + 1);
                bytes.splice(at..at, v.iter().copied());
            }
            Mutation::HeaderWord(w, v) if bytes.len() >= 4 * (w + 1) => {
                bytes[4 * w..4 * w + 4].copy_from_slice(&v.to_be_bytes())
            }
            _ => {}
        }
    }
}

fn check_idx(dir: &Path, bytes: &[u8]) {
    let path = dir.join("f");
    std::fs::write(&path, bytes).unwrap();
    let images = bounded("load_idx_images", || load_idx_images(&path));
    let labels = bounded("load_idx_labels", || load_idx_labels(&path));
    if let Ok(img) = &images {
        assert_eq!(img.pixels.len(), img.count * img.rows * img.cols);
        assert!(img.pixels.len() <= 64 << 20);
    }
    if let Ok(lab) = &labels {
        assert!(lab.iter().all(|&l| l <= 9));
    }
    for err in [images.err(), labels.err()].into_iter().flatten() {
        let msg = err.to_string();
        assert!(msg.starts_with(&path.display().to_string()) && !msg.contains('\n'), "{msg}");
    }
}

fn check_checkpoint(bytes: &[u8]) {
    let path = Path::new("fuzz.safetensors");
    match bounded("parse_checkpoint", || parse_checkpoint(path, bytes)) {
        Ok(ck) => assert!(ck.params.all_finite()),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.starts_with("fuzz.safetensors: ") && !msg.contains('\n'), "{msg}");
        }
    }
}

fn check_image(bytes: &[u8]) {
    if let Ok(img) = bounded("decode_gray", || decode_gray(Path::new("fuzz.img"), bytes)) {
        assert_eq!(img.pixels.len(), img.width * img.height);
        bounded("prepare", || lenet::image_input::prepare(&img));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn idx_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..64), gz in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let bytes = if gz { gzip(&bytes) } else { bytes };
        check_idx(dir.path(), &bytes);
    }

    /// A valid file mutated, read as it is or gzipped after the mutation.
    #[test]
    fn idx_mutated(labels in any::<bool>(), count in 0u32..4, ms in prop::collection::vec(mutation(), 1..4), gz in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = if labels { labels_idx(count * 10) } else { images_idx(count) };
        apply(&mut bytes, &ms);
        check_idx(dir.path(), &if gz { gzip(&bytes) } else { bytes });
    }

    #[test]
    fn idx_mutated_gzip_stream(labels in any::<bool>(), count in 0u32..4, ms in prop::collection::vec(mutation(), 1..4)) {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = gzip(&if labels { labels_idx(count * 10) } else { images_idx(count) });
        apply(&mut bytes, &ms);
        check_idx(dir.path(), &bytes);
    }

    #[test]
    fn checkpoint_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        check_checkpoint(&bytes);
    }

    #[test]
    fn checkpoint_mutated(ms in prop::collection::vec(mutation(), 1..4)) {
        let mut bytes = checkpoint_bytes().to_vec();
        apply(&mut bytes, &ms);
        check_checkpoint(&bytes);
    }

    #[test]
    fn checkpoint_header_json_mutated(at in any::<usize>(), text in "[-0-9\\[\\]{}\",:A-Za-z_. ]{1,24}") {
        // Edits inside the JSON header, keeping the header length consistent.
        let bytes = checkpoint_bytes();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let mut header = bytes[8..8 + n].to_vec();
        let at = at % header.len();
        let end = (at + text.len()).min(header.len());
        header.splice(at..end, text.bytes());
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend(header);
        out.extend(&bytes[8 + n..]);
        check_checkpoint(&out);
    }

    #[test]
    fn pgm_and_png_random_and_mutated(
        kind in 0u8..3,
        body in prop::collection::vec(any::<u8>(), 0..64),
        ms in prop::collection::vec(mutation(), 0..3),
    ) {
        let mut bytes = match kind {
            0 => [b"P5 3 2 255\n".as_slice(), &[0, 50, 100, 150, 200, 250]].concat(),
            1 => b"P2\n# c\n2 2\n65535\n0 1 65535 300\n".to_vec(),
            _ => tiny_png(),
        };
        bytes.extend(body);
        apply(&mut bytes, &ms);
        check_image(&bytes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() })]

    /// JPEG (baseline and progressive, gray and colour): random tails and mutations of a small
    /// valid file, including its frame header's size fields.
    #[test]
    fn jpeg_random_and_mutated(
        kind in 0u8..3,
        body in prop::collection::vec(any::<u8>(), 0..64),
        ms in prop::collection::vec(mutation(), 0..4),
    ) {
        let mut bytes = tiny_jpeg(kind).to_vec();
        bytes.extend(body);
        apply(&mut bytes, &ms);
        check_image(&bytes);
    }
}

/// A 19x13 JPEG: gray baseline, colour baseline (4:2:0), or colour progressive.
fn tiny_jpeg(kind: u8) -> &'static [u8] {
    static FILES: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    &FILES.get_or_init(|| {
        (0..3)
            .map(|kind| {
                let (w, h) = (19u16, 13u16);
                let rgb: Vec<u8> = (0..w as usize * h as usize * 3).map(|i| (i * 29 % 256) as u8).collect();
                let gray: Vec<u8> = rgb.iter().step_by(3).copied().collect();
                let mut out = Vec::new();
                let mut e = jpeg_encoder::Encoder::new(&mut out, 90);
                e.set_progressive(kind == 2);
                match kind {
                    0 => e.encode(&gray, w, h, jpeg_encoder::ColorType::Luma).unwrap(),
                    _ => e.encode(&rgb, w, h, jpeg_encoder::ColorType::Rgb).unwrap(),
                }
                out
            })
            .collect()
    })[kind as usize]
}

fn tiny_png() -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut e = png::Encoder::new(&mut out, 3, 2);
        e.set_color(png::ColorType::Grayscale);
        e.set_depth(png::BitDepth::Eight);
        let mut w = e.write_header().unwrap();
        w.write_image_data(&[0, 1, 2, 3, 4, 5]).unwrap();
    }
    out
}

// Named edge cases, kept as plain tests: hostile headers that could overflow or over-allocate.
// (No property above has found a panic; a failing case would be added here by name.)

#[test]
fn edge_checkpoint_offsets_near_usize_max() {
    // data_offsets near usize::MAX, next to safetensors' `buffer_end + N_LEN + n` arithmetic.
    let header =
        format!(r#"{{"x":{{"dtype":"U8","shape":[{m}],"data_offsets":[0,{m}]}}}}"#, m = usize::MAX - 8);
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    check_checkpoint(&bytes);
    assert!(bounded("parse_checkpoint", || parse_checkpoint(Path::new("r"), &bytes)).is_err());
}

#[test]
fn edge_checkpoint_header_length_huge() {
    let mut bytes = u64::MAX.to_le_bytes().to_vec();
    bytes.extend(b"{}");
    assert!(bounded("parse_checkpoint", || parse_checkpoint(Path::new("r"), &bytes)).is_err());
}

/// Regression: a tiny gzip file claiming u32::MAX images once got a 64 MiB buffer reserved up front
/// (caught by the allocation bound in `check_idx`).
#[test]
fn regression_idx_huge_count_gzip() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = images_idx(1);
    bytes[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
    check_idx(dir.path(), &gzip(&bytes));
    let p = dir.path().join("g");
    std::fs::write(&p, gzip(&bytes)).unwrap();
    assert!(bounded("load_idx_images", || load_idx_images(&p)).is_err());
}

/// The same claim arriving through a pipe (a stream of unknown length), raw and gzip: the
/// payload grows only with the bytes that really arrive.
#[cfg(target_os = "linux")]
#[test]
fn regression_idx_huge_count_stream() {
    use std::os::fd::AsRawFd;
    let mut bytes = images_idx(1);
    bytes[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
    for input in [bytes.clone(), gzip(&bytes)] {
        let (reader, mut writer) = std::io::pipe().unwrap();
        let path = std::path::PathBuf::from(format!("/proc/self/fd/{}", reader.as_raw_fd()));
        let feeder = std::thread::spawn(move || writer.write_all(&input).unwrap());
        let result = bounded("load_idx_images (pipe)", || load_idx_images(&path));
        feeder.join().unwrap();
        assert!(result.is_err());
    }
}

#[test]
fn edge_pgm_huge_dimensions() {
    let decode = |bytes: &[u8]| bounded("decode_gray", || decode_gray(Path::new("r"), bytes));
    assert!(decode(b"P5 4294967295 4294967295 255\n\0").is_err());
    assert!(decode(b"P2 99999999999999999999999 1 255\n").is_err());
    assert!(decode(b"P5 2 2 65535\n\0\0\0").is_err());
    // Regression: 2^32 x 2^32 wrapped width * height to 0 and panicked.
    for header in [&b"P5 4294967296 4294967296 255\n\0"[..], b"P6 4294967296 4294967296 255\n\0"] {
        let err = bounded("decode_gray", || decode_gray(Path::new("r"), header)).unwrap_err().to_string();
        assert!(err.starts_with("r: image too large") && !err.contains('\n'), "{err}");
    }
}

/// An 8-bit gray PNG of `width` x `height` whose pixel (x, y) is `value(x, y)`, written row by row
/// (filter byte 0) into one zlib stream: quick to make even for 60,000,000 rows.
fn gray_png(width: u32, height: u32, value: impl Fn(u32, u32) -> u8) -> Vec<u8> {
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), Compression::fast());
    // Rows gathered into about a megabyte before each write: 60,000,000 two-byte writes are slow.
    let mut rows = Vec::with_capacity((1 << 20) + width as usize + 1);
    for y in 0..height {
        rows.push(0);
        rows.extend((0..width).map(|x| value(x, y)));
        if rows.len() >= 1 << 20 {
            z.write_all(&rows).unwrap();
            rows.clear();
        }
    }
    z.write_all(&rows).unwrap();
    let idat = z.finish().unwrap();
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 0, 0, 0, 0]);
    common::png(&[(b"IHDR", &ihdr), (b"IDAT", &idat), (b"IEND", &[])])
}

/// Regression: a 1 x 60,000,000 PNG (a few hundred KB) made `predict` ask for 6.7 GB, its resize
/// allocating in proportion to the input's side. Decoding may hold the image (one byte a pixel,
/// bounded by MAX_IMAGE_PIXELS) and a fixed budget; the preparation only a fixed budget, whatever
/// the input's size or shape.
#[test]
fn image_memory_is_bounded_by_the_image_and_a_fixed_budget() {
    let tall = gray_png(1, 60_000_000, |_, y| if (20_000_000..40_000_000).contains(&y) { 0 } else { 255 });
    assert!(tall.len() < 1 << 20, "the test file is small: {} bytes", tall.len());
    LARGEST.with(|m| m.set(0));
    let img = decode_gray(Path::new("tall.png"), &tall).unwrap();
    let largest = LARGEST.with(|m| m.get());
    assert_eq!((img.width, img.height), (1, 60_000_000));
    assert!(largest <= 60_000_000 + (1 << 20), "decoding allocated {largest} bytes at once");
    bounded("prepare 1 x 60,000,000", || lenet::image_input::prepare(&img));
    drop(img);
    // As wide as a row may be, and the most pixels an image may have.
    for (w, h) in [(1 << 20, 40), (8192, 8192)] {
        let img = lenet::image_input::GrayImage {
            width: w,
            height: h,
            pixels: (0..w * h).map(|i| if (i % w) * 3 / w == 1 { 30 } else { 220 }).collect(),
        };
        bounded(&format!("prepare {w} x {h}"), || lenet::image_input::prepare(&img));
    }
}

#[test]
fn checkpoint_file_loader_agrees_with_parser() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c");
    std::fs::write(&p, checkpoint_bytes()).unwrap();
    assert!(bounded("load_checkpoint", || load_checkpoint(&p)).unwrap().state.is_some());
}
