//! MNIST IDX loading (raw or gzip) and validation.
//!
//! Every failure is a [`DataError`] whose one-line message names the file and what is wrong with
//! it. Allocations are bounded by the real data: a raw file's length is checked against its header
//! before anything is allocated, and a gzip stream is read through `take` so a header that claims
//! gigabytes costs only what the stream really holds.

use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use byteorder::{BigEndian, ByteOrder};
use flate2::read::MultiGzDecoder;

use crate::files::open_input;

/// Side of an MNIST image (one channel): the only size the files may hold, and the network's input.
pub const IMAGE_SIDE: usize = 28;

/// IDX magic of an unsigned-byte, 3-dimensional array (images).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// IDX magic of an unsigned-byte, 1-dimensional array (labels).
pub const LABELS_MAGIC: u32 = 0x0000_0801;

const IMAGES_HEADER: usize = 16;
const LABELS_HEADER: usize = 8;
/// Largest first reservation for a gzip stream's payload; beyond it the vector grows only as real
/// decompressed bytes arrive.
const GZIP_RESERVE_LIMIT: u64 = 64 << 20;
/// How far past the declared payload a gzip stream is decompressed to count trailing bytes.
const GZIP_TRAILING_LIMIT: u64 = 1 << 32;

/// Images (u8 pixels, row-major) and their labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
    pub rows: usize,
    pub cols: usize,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    /// The pixels of image `i` (row-major), or `None` past the last image.
    pub fn image(&self, i: usize) -> Option<&[u8]> {
        let n = self.rows * self.cols;
        self.images.get(i.checked_mul(n)?..i.checked_add(1)?.checked_mul(n)?)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Mnist {
    pub train: Dataset,
    pub test: Dataset,
}

/// The images of one IDX image file.
#[derive(Clone, Debug, PartialEq)]
pub struct IdxImages {
    /// `count * rows * cols` pixels, image after image, row-major.
    pub pixels: Vec<u8>,
    pub count: usize,
    pub rows: usize,
    pub cols: usize,
}

/// What can go wrong reading MNIST. Each message is one line that starts with the file's path.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: data directory not found", dir.display())]
    DirNotFound { dir: PathBuf },
    #[error("{}: data directory not found (named by {from})", dir.display())]
    NamedDirNotFound { dir: PathBuf, from: &'static str },
    #[error(
        "no MNIST data directory: --data is not given, {DATA_ENV} is not set, and none of the \
         default places exists: {}; run `lenet data fetch` to download MNIST into the user cache, \
         or give --data DIR or set {DATA_ENV}=DIR, DIR holding the four MNIST IDX files (raw or \
         .gz; lenet-wgpu's source tree ships them in data/mnist)",
        looked.join(", ")
    )]
    NoDataDir { looked: Vec<String> },
    #[error(
        "{}: no {name} file (looked for {name}, {name}.gz and the hyphenated {alt}[.gz])",
        dir.display()
    )]
    FileNotFound { dir: PathBuf, name: &'static str, alt: &'static str },
    #[error("{}: cannot read: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: not MNIST's file: {detail}", path.display())]
    NotMnist { path: PathBuf, detail: String },
    #[error("{}: file is empty", path.display())]
    Empty { path: PathBuf },
    #[error("{}: corrupt or truncated gzip data: {detail}", path.display())]
    Gzip { path: PathBuf, detail: String },
    #[error(
        "{}: bad magic number 0x{found:08x}, expected 0x{expected:08x} (IDX {what}){hint}",
        path.display()
    )]
    BadMagic { path: PathBuf, found: u32, expected: u32, what: &'static str, hint: &'static str },
    #[error("{}: IDX header truncated: {found} bytes, expected {expected}", path.display())]
    TruncatedHeader { path: PathBuf, found: usize, expected: usize },
    #[error("{}: images are {rows}x{cols}, this network needs {side}x{side}", path.display())]
    BadDimensions { path: PathBuf, rows: u32, cols: u32, side: usize },
    #[error(
        "{}: truncated: the header declares {count} items ({expected} bytes of data) but only \
         {found} bytes follow it",
        path.display()
    )]
    Truncated { path: PathBuf, count: u32, expected: u128, found: u64 },
    #[error(
        "{}: {extra} trailing bytes after the {count} items the header declares",
        path.display()
    )]
    TrailingBytes { path: PathBuf, count: u32, extra: u64 },
    #[error("{}: label {label} at index {index} is out of range 0-9", path.display())]
    LabelOutOfRange { path: PathBuf, index: usize, label: u8 },
    #[error(
        "{}: {labels} label{} but {} has {images} image{}",
        labels_path.display(),
        if *labels == 1 { "" } else { "s" },
        images_path.display(),
        if *images == 1 { "" } else { "s" }
    )]
    CountMismatch { images_path: PathBuf, labels_path: PathBuf, images: usize, labels: usize },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Images,
    Labels,
}

/// Reads an IDX image file (raw or gzip), which must hold 28x28 images.
pub fn load_idx_images(path: &Path) -> Result<IdxImages, DataError> {
    let (count, rows, cols, pixels) = read_idx(path, Kind::Images)?;
    Ok(IdxImages { pixels, count, rows, cols })
}

/// Reads an IDX label file (raw or gzip); every label must be 0-9.
pub fn load_idx_labels(path: &Path) -> Result<Vec<u8>, DataError> {
    let (_, _, _, labels) = read_idx(path, Kind::Labels)?;
    if let Some(index) = labels.iter().position(|&l| l > 9) {
        return Err(DataError::LabelOutOfRange { path: path.to_owned(), index, label: labels[index] });
    }
    Ok(labels)
}

/// One data set from a pair of IDX files whose counts must agree.
pub fn load_dataset(images_path: &Path, labels_path: &Path) -> Result<Dataset, DataError> {
    let images = load_idx_images(images_path)?;
    let labels = load_idx_labels(labels_path)?;
    if images.count != labels.len() {
        return Err(DataError::CountMismatch {
            images_path: images_path.to_owned(),
            labels_path: labels_path.to_owned(),
            images: images.count,
            labels: labels.len(),
        });
    }
    Ok(Dataset { images: images.pixels, labels, rows: images.rows, cols: images.cols })
}

/// The paths of one split's two IDX files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitFiles {
    pub images: PathBuf,
    pub labels: PathBuf,
}

/// Which split of MNIST: `train-*` or `t10k-*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

/// The two files of one split in `dir`, each raw or `.gz`, under the usual names
/// (`train-images.idx3-ubyte`) or the hyphenated ones (`train-images-idx3-ubyte`).
pub fn find_split(dir: &Path, split: Split) -> Result<SplitFiles, DataError> {
    if !dir.is_dir() {
        return Err(DataError::DirNotFound { dir: dir.to_owned() });
    }
    let (images, labels) = match split {
        Split::Train => (
            find_file(dir, "train-images.idx3-ubyte", "train-images-idx3-ubyte")?,
            find_file(dir, "train-labels.idx1-ubyte", "train-labels-idx1-ubyte")?,
        ),
        Split::Test => (
            find_file(dir, "t10k-images.idx3-ubyte", "t10k-images-idx3-ubyte")?,
            find_file(dir, "t10k-labels.idx1-ubyte", "t10k-labels-idx1-ubyte")?,
        ),
    };
    Ok(SplitFiles { images, labels })
}

/// The four MNIST files in `dir` (see [`find_split`]).
pub fn load_mnist(dir: &Path) -> Result<Mnist, DataError> {
    let train = find_split(dir, Split::Train)?;
    let test = find_split(dir, Split::Test)?;
    Ok(Mnist { train: load_split(&train)?, test: load_split(&test)? })
}

/// One split's images and labels, from the files [`find_split`] found.
pub fn load_split(files: &SplitFiles) -> Result<Dataset, DataError> {
    load_dataset(&files.images, &files.labels)
}

/// The test split alone (`t10k-*`): all that `lenet eval` needs.
pub fn load_mnist_test(dir: &Path) -> Result<Dataset, DataError> {
    load_split(&find_split(dir, Split::Test)?)
}

/// The first of the candidate names that exists. Anything but a directory counts (a FIFO or a
/// link to `/dev/stdin` is read as a stream), so that a file that is there is never reported
/// missing.
fn find_file(dir: &Path, name: &'static str, alt: &'static str) -> Result<PathBuf, DataError> {
    for base in [name, alt] {
        for suffix in ["", ".gz"] {
            let path = dir.join(format!("{base}{suffix}"));
            if path.exists() && !path.is_dir() {
                return Ok(path);
            }
        }
    }
    Err(DataError::FileNotFound { dir: dir.to_owned(), name, alt })
}

/// The environment variable that names the data directory when `--data` does not.
pub const DATA_ENV: &str = "LENET_DATA";

/// Where a run's data directory came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DataSource {
    /// `--data DIR`.
    Option,
    /// The `LENET_DATA` environment variable.
    Environment,
    /// The documented default: a source tree's `data/mnist` (see [`default_candidates`]).
    Default,
}

/// The data directory a run reads, and why that one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataDir {
    pub path: PathBuf,
    pub source: DataSource,
    /// For the default: which candidate it was ("the current directory's data/mnist").
    pub found_as: Option<String>,
}

impl DataDir {
    /// The run's header line: `data: DIR (--data)`.
    pub fn header(&self) -> String {
        let why = match (&self.source, &self.found_as) {
            (DataSource::Option, _) => "--data".to_string(),
            (DataSource::Environment, _) => DATA_ENV.to_string(),
            (DataSource::Default, Some(what)) => format!("default: {what}"),
            (DataSource::Default, None) => "default".to_string(),
        };
        format!("data: {} ({why})", self.path.display())
    }
}

/// One place the default data directory may be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub path: PathBuf,
    /// What it is, for the header and for the error that lists where it looked.
    pub what: String,
}

/// The data directory of a run, by the one rule every subcommand follows: `--data DIR` (`option`),
/// else `LENET_DATA` (`env`, its value: the command line reads it, the library reads no
/// environment), else the first of `candidates` that exists (the user cache's MNIST, see
/// [`cache_candidate`], then [`default_candidates`]). A directory named by the user that does not
/// exist is an error naming where the name came from; when nothing names one and no default
/// exists, the error says where it looked and how to get the data.
pub fn resolve_data_dir_from(
    option: Option<&Path>,
    env: Option<std::ffi::OsString>,
    candidates: &[Candidate],
) -> Result<DataDir, DataError> {
    let named = match (option, env.filter(|v| !v.is_empty())) {
        (Some(dir), _) => Some((dir.to_path_buf(), DataSource::Option, "--data")),
        (None, Some(dir)) => Some((PathBuf::from(dir), DataSource::Environment, DATA_ENV)),
        (None, None) => None,
    };
    if let Some((path, source, from)) = named {
        if !path.is_dir() {
            return Err(DataError::NamedDirNotFound { dir: path, from });
        }
        return Ok(DataDir { path, source, found_as: None });
    }
    match candidates.iter().find(|c| c.path.is_dir()) {
        Some(c) => {
            Ok(DataDir { path: c.path.clone(), source: DataSource::Default, found_as: Some(c.what.clone()) })
        }
        None => Err(DataError::NoDataDir {
            looked: candidates.iter().map(|c| format!("{} ({})", c.path.display(), c.what)).collect(),
        }),
    }
}

/// Where the default data directory is looked for, in order:
///
/// 1. `data/mnist` in the current directory (a run from the source tree, `cargo run`);
/// 2. `data/mnist` of a source tree (a directory with a `Cargo.toml`) that holds the executable
///    (`target/release/lenet`, even after the checkout has moved);
/// 3. `data/mnist` of the source tree `lenet` was built from, when it still exists on this
///    machine (an installed binary; the header then names it, so it is never read silently).
///
/// (The command line looks in the user cache, where `lenet data fetch` puts MNIST, before these:
/// see [`cache_candidate`].)
pub fn default_candidates() -> Vec<Candidate> {
    let mut candidates = vec![Candidate {
        path: PathBuf::from("data/mnist"),
        what: "the current directory's data/mnist".into(),
    }];
    if let Ok(exe) = std::env::current_exe() {
        if let Some(tree) =
            exe.ancestors().skip(1).find(|d| d.join("Cargo.toml").is_file() && d.join("data/mnist").is_dir())
        {
            candidates.push(Candidate {
                path: tree.join("data").join("mnist"),
                what: "the source tree holding the executable".into(),
            });
        }
    }
    candidates.push(Candidate {
        path: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/data/mnist")),
        what: "the source tree lenet was built from".into(),
    });
    candidates
}

/// Where `lenet data fetch` puts MNIST in the user cache directory `cache` (`~/.cache` on Linux).
pub fn cache_data_dir(cache: &Path) -> PathBuf {
    cache.join("lenet-wgpu").join("mnist")
}

/// The user cache's MNIST ([`cache_data_dir`] of `cache`) as a default data directory: only when
/// it holds both splits' files (a fetch that was cut short leaves no directory that looks ready).
pub fn cache_candidate(cache: &Path) -> Option<Candidate> {
    let path = cache_data_dir(cache);
    let complete = find_split(&path, Split::Train).is_ok() && find_split(&path, Split::Test).is_ok();
    complete.then(|| Candidate { path, what: "the user cache (lenet data fetch)".into() })
}

/// The default data directory (see [`default_candidates`]): the first candidate that exists, else
/// the source tree's path (which then does not exist either).
pub fn default_data_dir() -> PathBuf {
    let candidates = default_candidates();
    match candidates.iter().find(|c| c.path.is_dir()) {
        Some(c) => c.path.clone(),
        None => candidates.last().map(|c| c.path.clone()).unwrap_or_default(),
    }
}

/// One of the four MNIST files as LeCun's site published them: its name (the name every mirror
/// serves it under, with `.gz`), and the length and SHA-256 of its decompressed contents. The
/// digest is of the contents, not of the gzip stream, so a copy that was recompressed (as this
/// repository's data/mnist was) verifies too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MnistFile {
    /// `train-images-idx3-ubyte`: the mirrors' name, without `.gz`.
    pub name: &'static str,
    /// The decompressed length in bytes.
    pub bytes: u64,
    /// The SHA-256 of the decompressed contents, in lowercase hex.
    pub sha256: &'static str,
}

/// The four MNIST files, training images first. The digests were computed from the contents of
/// this repository's data/mnist (`zcat FILE | sha256sum`), which are MNIST's published contents.
pub const MNIST_FILES: [MnistFile; 4] = [
    MnistFile {
        name: "train-images-idx3-ubyte",
        bytes: 47_040_016,
        sha256: "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    },
    MnistFile {
        name: "train-labels-idx1-ubyte",
        bytes: 60_008,
        sha256: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    },
    MnistFile {
        name: "t10k-images-idx3-ubyte",
        bytes: 7_840_016,
        sha256: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    },
    MnistFile {
        name: "t10k-labels-idx1-ubyte",
        bytes: 10_008,
        sha256: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
];

/// Why a file is not the MNIST file it should be.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The contents cannot be read: a gzip stream that is corrupt or cut short.
    #[error("corrupt or truncated data: {0}")]
    Gzip(io::Error),
    /// The contents are not the published ones.
    #[error(
        "{got} decompressed bytes with SHA-256 {digest}, expected {expected} bytes with SHA-256 {sha256}"
    )]
    Digest {
        /// The decompressed length.
        got: u64,
        /// Its SHA-256.
        digest: String,
        /// The published length.
        expected: u64,
        /// The published SHA-256.
        sha256: &'static str,
    },
}

impl MnistFile {
    /// Checks that `gzipped`, a gzip stream, decompresses to this file's published contents.
    pub fn verify_gzip(&self, gzipped: impl Read) -> Result<(), VerifyError> {
        self.verify(MultiGzDecoder::new(BufReader::new(gzipped)))
    }

    /// Checks the file at `path`: gzip when its name ends in `.gz`, else raw.
    pub fn verify_path(&self, path: &Path) -> Result<(), DataError> {
        let io = |source| DataError::Io { path: path.to_owned(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        let result = match path.extension().is_some_and(|e| e == "gz") {
            true => self.verify_gzip(file),
            false => self.verify(BufReader::new(file)),
        };
        result.map_err(|e| DataError::NotMnist { path: path.to_owned(), detail: e.to_string() })
    }

    /// Checks that `contents` are this file's published contents.
    pub fn verify(&self, mut contents: impl Read) -> Result<(), VerifyError> {
        use sha2::{Digest, Sha256};
        let decoder = &mut contents;
        let mut hasher = Sha256::new();
        let mut got = 0u64;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = match decoder.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(VerifyError::Gzip(e)),
            };
            hasher.update(&buf[..n]);
            got += n as u64;
        }
        let digest: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
        if got != self.bytes || digest != self.sha256 {
            return Err(VerifyError::Digest { got, digest, expected: self.bytes, sha256: self.sha256 });
        }
        Ok(())
    }
}

/// Reads and checks one IDX file: (count, rows, cols, payload). Labels have rows = cols = 1.
///
/// A FIFO or pipe is read as a stream (opening never blocks); its payload is then bounded like a
/// gzip stream's, by the bytes that really arrive.
fn read_idx(path: &Path, kind: Kind) -> Result<(usize, usize, usize, Vec<u8>), DataError> {
    let io_err = |source| DataError::Io { path: path.to_owned(), source };
    let input = open_input(path).map_err(io_err)?;
    let mut file = input.file;
    if input.len == Some(0) {
        return Err(DataError::Empty { path: path.to_owned() });
    }
    // Gzip is recognised by its magic bytes, not by the file's name. They are put back in front
    // of the rest rather than seeking, which a stream cannot.
    let mut magic = [0u8; 2];
    let sniffed = read_full(&mut file, &mut magic).map_err(io_err)?;
    if sniffed == 0 {
        return Err(DataError::Empty { path: path.to_owned() });
    }
    let stream = io::Cursor::new(magic[..sniffed].to_vec()).chain(file);
    if sniffed == 2 && magic == [0x1f, 0x8b] {
        let mut decoder = MultiGzDecoder::new(BufReader::new(stream));
        parse_idx(path, kind, &mut decoder, input.len, true)
    } else {
        parse_idx(path, kind, &mut BufReader::new(stream), input.len, false)
    }
}

/// Parses an IDX stream. `file_len` is the length of the file on disk (`None`: a stream of
/// unknown length); for a gzip stream (`gzip`), read errors are reported as corrupt gzip data.
fn parse_idx(
    path: &Path,
    kind: Kind,
    reader: &mut impl Read,
    file_len: Option<u64>,
    gzip: bool,
) -> Result<(usize, usize, usize, Vec<u8>), DataError> {
    let read_err = |source: io::Error| {
        if gzip {
            DataError::Gzip { path: path.to_owned(), detail: source.to_string() }
        } else {
            DataError::Io { path: path.to_owned(), source }
        }
    };
    let (header_len, expected_magic, what) = match kind {
        Kind::Images => (IMAGES_HEADER, IMAGES_MAGIC, "images"),
        Kind::Labels => (LABELS_HEADER, LABELS_MAGIC, "labels"),
    };
    let mut header = [0u8; IMAGES_HEADER];
    let got = read_full(reader, &mut header[..header_len]).map_err(read_err)?;
    if got == 0 {
        // Only a gzip stream can get here: an empty raw file was caught before.
        return Err(DataError::Gzip { path: path.to_owned(), detail: "decompresses to nothing".into() });
    }
    if got >= 4 {
        let found = BigEndian::read_u32(&header[0..4]);
        if found != expected_magic {
            let hint = match (kind, found) {
                (Kind::Images, LABELS_MAGIC) => "; this looks like a label file",
                (Kind::Labels, IMAGES_MAGIC) => "; this looks like an image file",
                _ => "",
            };
            return Err(DataError::BadMagic {
                path: path.to_owned(),
                found,
                expected: expected_magic,
                what,
                hint,
            });
        }
    }
    if got < header_len {
        return Err(DataError::TruncatedHeader { path: path.to_owned(), found: got, expected: header_len });
    }
    let count = BigEndian::read_u32(&header[4..8]);
    let (rows, cols) = match kind {
        Kind::Images => (BigEndian::read_u32(&header[8..12]), BigEndian::read_u32(&header[12..16])),
        Kind::Labels => (1, 1),
    };
    if kind == Kind::Images && (rows as usize != IMAGE_SIDE || cols as usize != IMAGE_SIDE) {
        return Err(DataError::BadDimensions { path: path.to_owned(), rows, cols, side: IMAGE_SIDE });
    }
    // u128: count * rows * cols of a hostile header cannot overflow it.
    let expected = count as u128 * rows as u128 * cols as u128;

    let data = if let (false, Some(file_len)) = (gzip, file_len) {
        let found = file_len.saturating_sub(header_len as u64);
        if (found as u128) < expected {
            return Err(DataError::Truncated { path: path.to_owned(), count, expected, found });
        }
        if found as u128 > expected {
            let extra = (found as u128 - expected) as u64;
            return Err(DataError::TrailingBytes { path: path.to_owned(), count, extra });
        }
        // The file really holds `expected` bytes, so this allocation is backed by data.
        let mut data = vec![0u8; expected as usize];
        reader.read_exact(&mut data).map_err(read_err)?;
        data
    } else {
        // A gzip stream, or a raw stream of unknown length.
        let limit = u64::try_from(expected).unwrap_or(u64::MAX);
        // Reserve no more than the header claims, than deflate's ~1032:1 ratio lets this file
        // hold (a stream: nothing is known), or than a fixed cap; past that the vector grows only
        // with real data.
        let ratio = if gzip { 1032 } else { 1 };
        let plausible = file_len.unwrap_or(0).saturating_mul(ratio).saturating_add(1 << 16);
        let mut data = Vec::with_capacity(limit.min(plausible).min(GZIP_RESERVE_LIMIT) as usize);
        Read::take(&mut *reader, limit).read_to_end(&mut data).map_err(read_err)?;
        if (data.len() as u128) < expected {
            return Err(DataError::Truncated {
                path: path.to_owned(),
                count,
                expected,
                found: data.len() as u64,
            });
        }
        // Reading on to the end also makes the decoder check the gzip CRC and length.
        let extra = io::copy(&mut Read::take(&mut *reader, GZIP_TRAILING_LIMIT), &mut io::sink())
            .map_err(read_err)?;
        if extra > 0 {
            return Err(DataError::TrailingBytes { path: path.to_owned(), count, extra });
        }
        data
    };
    Ok((count as usize, rows as usize, cols as usize, data))
}

/// Fills `buf` as far as the stream allows; returns how many bytes were read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}
