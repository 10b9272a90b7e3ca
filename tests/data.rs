//! IDX loading: the shipped MNIST, and every kind of bad file, raw and gzipped.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};

use common::assert_file_error;
use flate2::write::GzEncoder;
use flate2::Compression;
use lenet::data::{default_data_dir, load_dataset, load_idx_images, load_idx_labels, load_mnist, DataError};

fn images_idx(count: u32, rows: u32, cols: u32, fill: impl Fn(usize) -> u8) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend(0x0000_0803u32.to_be_bytes());
    v.extend(count.to_be_bytes());
    v.extend(rows.to_be_bytes());
    v.extend(cols.to_be_bytes());
    v.extend((0..(count * rows * cols) as usize).map(fill));
    v
}

fn labels_idx(labels: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend(0x0000_0801u32.to_be_bytes());
    v.extend((labels.len() as u32).to_be_bytes());
    v.extend(labels);
    v
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Writes the file raw and gzipped (under names that do not say which: gzip is found by its
/// magic) and returns both paths.
fn both(dir: &Path, name: &str, bytes: &[u8]) -> [PathBuf; 2] {
    [write(dir, &format!("{name}.raw"), bytes), write(dir, &format!("{name}.gzdata"), &gzip(bytes))]
}

#[test]
fn shipped_mnist_loads() {
    let dir = default_data_dir();
    let m = load_mnist(&dir).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m.train.len(), 60_000);
    assert_eq!(m.test.len(), 10_000);
    for d in [&m.train, &m.test] {
        assert_eq!((d.rows, d.cols), (28, 28));
        assert_eq!(d.images.len(), d.len() * 784);
        assert!(d.labels.iter().all(|&l| l <= 9));
        // Every class occurs often.
        let mut counts = [0usize; 10];
        d.labels.iter().for_each(|&l| counts[l as usize] += 1);
        assert!(counts.iter().all(|&c| c > d.len() / 20), "{counts:?}");
        // MNIST: mostly black background, full-range strokes; mean pixel ~33.
        let mean = d.images.iter().map(|&p| p as f64).sum::<f64>() / d.images.len() as f64;
        assert!((25.0..45.0).contains(&mean), "mean pixel {mean}");
        assert_eq!(*d.images.iter().max().unwrap(), 255);
        assert_eq!(*d.images.iter().min().unwrap(), 0);
        // The corner pixel of every image is background.
        assert!((0..d.len()).all(|i| d.image(i).unwrap()[0] == 0));
    }
    // The first training label of MNIST is a 5, the first test label a 7.
    assert_eq!(m.train.labels[0], 5);
    assert_eq!(m.test.labels[0], 7);
}

#[test]
fn default_data_dir_exists() {
    assert!(default_data_dir().join("train-images.idx3-ubyte.gz").is_file());
}

#[test]
fn small_valid_files_load_raw_and_gzipped() {
    let dir = tempfile::tempdir().unwrap();
    let img = images_idx(3, 28, 28, |i| (i % 251) as u8);
    let lab = labels_idx(&[0, 9, 4]);
    for (ip, lp) in both(dir.path(), "img", &img).iter().zip(&both(dir.path(), "lab", &lab)) {
        let d = load_dataset(ip, lp).unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!(d.labels, vec![0, 9, 4]);
        assert_eq!(d.images, img[16..]);
        assert_eq!(d.image(2).unwrap()[5], ((2 * 784 + 5) % 251) as u8);
    }
}

#[test]
fn load_mnist_finds_raw_gz_and_hyphenated_names() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "train-images-idx3-ubyte", &images_idx(2, 28, 28, |i| i as u8));
    write(d, "train-labels.idx1-ubyte.gz", &gzip(&labels_idx(&[1, 2])));
    write(d, "t10k-images.idx3-ubyte", &images_idx(1, 28, 28, |_| 7));
    write(d, "t10k-labels-idx1-ubyte.gz", &gzip(&labels_idx(&[3])));
    let m = load_mnist(d).unwrap();
    assert_eq!(m.train.labels, vec![1, 2]);
    assert_eq!(m.test.labels, vec![3]);
    assert_eq!(m.test.images, vec![7; 784]);
}

#[test]
fn missing_file_and_directory_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = load_mnist(dir.path()).unwrap_err();
    assert_file_error(&err, dir.path(), "train-images.idx3-ubyte");
    let nowhere = dir.path().join("nowhere");
    let err = load_mnist(&nowhere).unwrap_err();
    assert_file_error(&err, &nowhere, "not found");
    let err = load_idx_labels(&nowhere).unwrap_err();
    assert_file_error(&err, &nowhere, "cannot read");
}

#[test]
fn truncated_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = images_idx(4, 28, 28, |i| i as u8);
    for p in both(dir.path(), "img", &img[..img.len() - 100]) {
        assert_file_error(&load_idx_images(&p).unwrap_err(), &p, "truncated");
    }
    // A header cut short.
    for p in both(dir.path(), "hdr", &img[..10]) {
        assert_file_error(&load_idx_images(&p).unwrap_err(), &p, "header truncated");
    }
    let lab = labels_idx(&[1, 2, 3, 4]);
    for p in both(dir.path(), "lab", &lab[..lab.len() - 1]) {
        let err = load_idx_labels(&p).unwrap_err();
        assert!(matches!(err, DataError::Truncated { found: 3, .. }), "{err}");
        assert_file_error(&err, &p, "4 items");
    }
}

#[test]
fn trailing_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let mut lab = labels_idx(&[1, 2, 3]);
    lab.extend([0, 0]);
    for p in both(dir.path(), "lab", &lab) {
        let err = load_idx_labels(&p).unwrap_err();
        assert!(matches!(err, DataError::TrailingBytes { extra: 2, .. }), "{err}");
        assert_file_error(&err, &p, "2 trailing bytes");
    }
    // Garbage after a complete gzip stream is an error too.
    let mut gz = gzip(&labels_idx(&[1, 2, 3]));
    gz.extend(b"garbage");
    let p = write(dir.path(), "after.gz", &gz);
    assert_file_error(&load_idx_labels(&p).unwrap_err(), &p, "gzip");
}

#[test]
fn wrong_magic() {
    let dir = tempfile::tempdir().unwrap();
    let mut img = images_idx(1, 28, 28, |_| 0);
    img[3] = 0x02;
    for p in both(dir.path(), "img", &img) {
        assert_file_error(&load_idx_images(&p).unwrap_err(), &p, "bad magic number 0x00000802");
    }
    // A label file given as images says so.
    for p in both(dir.path(), "lab", &labels_idx(&[1])) {
        assert_file_error(&load_idx_images(&p).unwrap_err(), &p, "looks like a label file");
    }
}

#[test]
fn count_mismatch_between_images_and_labels() {
    let dir = tempfile::tempdir().unwrap();
    let ip = write(dir.path(), "img", &images_idx(3, 28, 28, |_| 1));
    let lp = write(dir.path(), "lab", &gzip(&labels_idx(&[1, 2])));
    let err = load_dataset(&ip, &lp).unwrap_err();
    assert!(matches!(err, DataError::CountMismatch { images: 3, labels: 2, .. }));
    assert_file_error(&err, &lp, "2 labels");
    assert!(err.to_string().contains(&ip.display().to_string()));
}

#[test]
fn label_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    for p in both(dir.path(), "lab", &labels_idx(&[0, 1, 2, 3, 4, 10, 5])) {
        let err = load_idx_labels(&p).unwrap_err();
        assert_eq!(err.to_string(), format!("{}: label 10 at index 5 is out of range 0-9", p.display()));
    }
}

#[test]
fn corrupt_gzip() {
    let dir = tempfile::tempdir().unwrap();
    let gz = gzip(&images_idx(5, 28, 28, |i| (i * 7) as u8));
    // Damage the deflate stream in the middle.
    let mut bad = gz.clone();
    let mid = bad.len() / 2;
    for b in &mut bad[mid..mid + 8] {
        *b ^= 0xa5;
    }
    let p = write(dir.path(), "bad.gz", &bad);
    assert_file_error(&load_idx_images(&p).unwrap_err(), &p, "gzip");
    // A wrong CRC with intact data.
    let mut crc = gz.clone();
    let n = crc.len();
    crc[n - 8] ^= 1;
    let p = write(dir.path(), "crc.gz", &crc);
    assert_file_error(&load_idx_images(&p).unwrap_err(), &p, "gzip");
    // A stream cut short.
    let p = write(dir.path(), "cut.gz", &gz[..gz.len() / 3]);
    let err = load_idx_images(&p).unwrap_err();
    assert!(matches!(err, DataError::Gzip { .. } | DataError::Truncated { .. }), "{err}");
    assert_file_error(&err, &p, "");
    // Just the gzip magic.
    let p = write(dir.path(), "magic.gz", &[0x1f, 0x8b]);
    assert_file_error(&load_idx_images(&p).unwrap_err(), &p, "gzip");
}

#[test]
fn empty_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "empty", &[]);
    assert_file_error(&load_idx_images(&p).unwrap_err(), &p, "empty");
    assert_file_error(&load_idx_labels(&p).unwrap_err(), &p, "empty");
    // A gzip stream of nothing.
    let p = write(dir.path(), "empty.gz", &gzip(&[]));
    assert_file_error(&load_idx_labels(&p).unwrap_err(), &p, "decompresses to nothing");
}

#[test]
fn wrong_dimensions() {
    let dir = tempfile::tempdir().unwrap();
    for p in both(dir.path(), "img", &images_idx(2, 32, 32, |_| 0)) {
        assert_file_error(
            &load_idx_images(&p).unwrap_err(),
            &p,
            "images are 32x32, this network needs 28x28",
        );
    }
}

#[test]
fn huge_header_claims_allocate_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // 4 billion images claimed by a 16-byte header (and by a tiny gzip stream).
    let mut img = images_idx(0, 28, 28, |_| 0);
    img[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
    img.extend([0u8; 100]);
    for p in both(dir.path(), "img", &img) {
        let err = load_idx_images(&p).unwrap_err();
        assert!(matches!(err, DataError::Truncated { found: 100, .. }), "{err}");
    }
    let mut lab = labels_idx(&[]);
    lab[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
    for p in both(dir.path(), "lab", &lab) {
        assert_file_error(&load_idx_labels(&p).unwrap_err(), &p, "truncated");
    }
}

/// Runs `f` on another thread and fails if it has not returned within `secs` seconds (a hang).
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs)).unwrap_or_else(|_| panic!("{what} hangs"))
}

#[cfg(unix)]
#[test]
fn a_fifo_without_a_writer_is_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("train-images.idx3-ubyte");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let path = fifo.clone();
    let err = within(30, "opening a FIFO", move || load_idx_images(&path)).unwrap_err();
    assert_file_error(&err, &fifo, "empty");
    // In a data directory it is found (not reported missing) and refused the same way.
    write(dir.path(), "train-labels.idx1-ubyte", &labels_idx(&[1]));
    write(dir.path(), "t10k-images.idx3-ubyte", &images_idx(1, 28, 28, |i| i as u8));
    write(dir.path(), "t10k-labels.idx1-ubyte", &labels_idx(&[2]));
    let dir_path = dir.path().to_path_buf();
    let err = within(30, "load_mnist with a FIFO", move || load_mnist(&dir_path)).unwrap_err();
    assert_file_error(&err, &fifo, "empty");
}

/// A pipe that is written while it is read (a process substitution, `--data` files from a
/// decompressor): read as a stream, raw or gzip, with the same checks as a file.
#[cfg(target_os = "linux")]
#[test]
fn a_pipe_is_read_as_a_stream() {
    let images = images_idx(3, 28, 28, |i| (i % 251) as u8);
    let mut truncated = images.clone();
    truncated.truncate(images.len() - 1);
    let mut trailing = images.clone();
    trailing.push(0);
    for (bytes, expect) in [
        (images.clone(), Ok(())),
        (gzip(&images), Ok(())),
        (truncated, Err("truncated")),
        (trailing, Err("trailing")),
        (Vec::new(), Err("empty")),
    ] {
        let (reader, mut writer) = std::io::pipe().unwrap();
        use std::os::fd::AsRawFd;
        let path = PathBuf::from(format!("/proc/self/fd/{}", reader.as_raw_fd()));
        let feeder = std::thread::spawn(move || {
            for piece in bytes.chunks(1000) {
                writer.write_all(piece).unwrap();
            }
        });
        let result = load_idx_images(&path);
        feeder.join().unwrap();
        drop(reader);
        match (result, expect) {
            (Ok(img), Ok(())) => assert_eq!(img.pixels, images[16..]),
            (Err(e), Err(needle)) => assert_file_error(&e, &path, needle),
            (r, e) => panic!("{r:?}, expected {e:?}"),
        }
    }
}

#[test]
fn the_test_split_loads_without_the_training_files() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "t10k-images.idx3-ubyte", &images_idx(2, 28, 28, |i| i as u8));
    write(dir.path(), "t10k-labels.idx1-ubyte", &labels_idx(&[3, 4]));
    let test = lenet::data::load_mnist_test(dir.path()).unwrap();
    assert_eq!(test.labels, vec![3, 4]);
    assert_file_error(&load_mnist(dir.path()).unwrap_err(), dir.path(), "train-images");
}
