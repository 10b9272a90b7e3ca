//! Shared by the test binaries: the GPU adapter gate, seeded random inputs, comparisons, and
//! hand-made PNG files.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use lenet::gpu::GpuContext;
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

/// One context per test binary; `None` (with a "skipped" line) when there is no adapter, unless
/// LENET_REQUIRE_GPU=1, in which case the test fails.
pub fn gpu() -> Option<GpuContext> {
    static CTX: OnceLock<Result<GpuContext, String>> = OnceLock::new();
    let r = CTX.get_or_init(|| GpuContext::new(None).map_err(|e| format!("{e:#}")));
    match r {
        Ok(c) => Some(c.clone()),
        Err(e) => {
            if std::env::var("LENET_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("LENET_REQUIRE_GPU=1 but no usable GPU adapter: {e}");
            }
            eprintln!("skipped: no GPU adapter ({e})");
            None
        }
    }
}

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Uniform in [lo, hi).
pub fn uniform(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| lo + (hi - lo) * ((rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32)).collect()
}

pub fn below(rng: &mut ChaCha8Rng, n: u32) -> u32 {
    (rng.next_u64() % n as u64) as u32
}

pub fn bytes(rng: &mut ChaCha8Rng, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.next_u32() as u8).collect()
}

pub fn nan(n: usize) -> Vec<f32> {
    vec![f32::NAN; n]
}

/// Per-element fp32 tolerance against the CPU reference. The two sides run the same formula but
/// may round differently (the GPU may contract a*b+c into an FMA, sums may be reassociated, and
/// exp/log/sqrt/division are not correctly rounded on every GPU), so allow a few ULP-scale errors
/// relative to the result plus a small absolute floor for results near zero.
pub fn tol(cpu: f32) -> f32 {
    1e-5 + 1e-4 * cpu.abs()
}

/// For a sum of `n` products (a long reduction, e.g. a weight gradient over the whole batch):
/// the rounding error of a sum grows like unit-roundoff * sqrt(n * sum of squared terms) (the
/// size of the partial sums), whatever the order; allow twice that on top of [`tol`].
pub fn reduction_tol(cpu: f32, n: usize, sum_sq: f32) -> f32 {
    tol(cpu) + 2.0 * f32::EPSILON / 2.0 * (n as f32 * sum_sq).sqrt()
}

/// Every GPU element written (no poison left) and within `tol_of(i)` of the CPU value.
pub fn assert_close_with(what: &str, gpu: &[f32], cpu: &[f32], tol_of: impl Fn(usize) -> f32) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: length");
    let mut worst = (0usize, 0f32);
    for (i, (&g, &c)) in gpu.iter().zip(cpu).enumerate() {
        assert!(!g.is_nan() || c.is_nan(), "{what}: element {i} not written (NaN), cpu {c}");
        let err = (g - c).abs();
        let t = tol_of(i);
        assert!(err <= t, "{what}: element {i}: gpu {g} cpu {c} |diff| {err} > tol {t}");
        if err / t > worst.1 {
            worst = (i, err / t);
        }
    }
}

pub fn assert_close(what: &str, gpu: &[f32], cpu: &[f32]) {
    assert_close_with(what, gpu, cpu, |i| tol(cpu[i]));
}

/// A PNG file of `chunks` (kind, body), each with its length and CRC, after the signature.
pub fn png(chunks: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    for (kind, body) in chunks {
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(body);
        out.extend((body.len() as u32).to_be_bytes());
        out.extend(*kind);
        out.extend(*body);
        out.extend(crc.sum().to_be_bytes());
    }
    out
}

/// The lenet binary: `LENET_EXE` when the tests run away from the tree they were built in (the
/// device script carries them to another machine and sets it), else the one cargo built.
pub fn lenet_exe() -> PathBuf {
    std::env::var_os("LENET_EXE").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_lenet")), PathBuf::from)
}

/// A file or folder of the source tree, `rel` from its root: found from the working directory
/// when it is there (cargo, and the device script, run the tests from the root), else through
/// the build machine's path.
pub fn repo_path(rel: &str) -> PathBuf {
    let here = PathBuf::from(rel);
    if here.exists() {
        here
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
    }
}

/// The first `n_train` training and `n_test` test images of the shipped MNIST (the whole set
/// read once per test binary).
pub fn small_mnist(n_train: usize, n_test: usize) -> lenet::data::Mnist {
    use lenet::data::{Dataset, Mnist};
    static FULL: OnceLock<Mnist> = OnceLock::new();
    let full = FULL.get_or_init(|| {
        lenet::data::load_mnist(&lenet::data::default_data_dir()).expect("shipped MNIST loads")
    });
    let cut = |d: &Dataset, n: usize| Dataset {
        images: d.images[..n * 784].to_vec(),
        labels: d.labels[..n].to_vec(),
        rows: 28,
        cols: 28,
    };
    Mnist { train: cut(&full.train, n_train), test: cut(&full.test, n_test) }
}

/// A data directory holding the first `n_train` training and `n_test` test images of the
/// shipped MNIST as raw IDX files (a `--data` for quick command-line runs).
pub fn write_small_mnist(dir: &std::path::Path, n_train: usize, n_test: usize) -> PathBuf {
    let mnist = small_mnist(n_train, n_test);
    let data = dir.join("mnist-small");
    std::fs::create_dir_all(&data).unwrap();
    for (prefix, set) in [("train", &mnist.train), ("t10k", &mnist.test)] {
        let n = set.len();
        let mut images = vec![0, 0, 8, 3];
        for d in [n as u32, 28, 28] {
            images.extend_from_slice(&d.to_be_bytes());
        }
        images.extend_from_slice(&set.images);
        let mut labels = vec![0, 0, 8, 1];
        labels.extend_from_slice(&(n as u32).to_be_bytes());
        labels.extend_from_slice(&set.labels);
        std::fs::write(data.join(format!("{prefix}-images.idx3-ubyte")), images).unwrap();
        std::fs::write(data.join(format!("{prefix}-labels.idx1-ubyte")), labels).unwrap();
    }
    data
}

/// `lenet ARGS` run to its end: status, stdout and stderr.
pub fn lenet(args: &[&str]) -> std::process::Output {
    std::process::Command::new(lenet_exe()).args(args).output().expect("lenet runs")
}

/// Bytes a command wrote, as text (invalid UTF-8 replaced).
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn stdout(out: &std::process::Output) -> String {
    text(&out.stdout)
}

pub fn stderr(out: &std::process::Output) -> String {
    text(&out.stderr)
}

/// `out`, after asserting that its run succeeded (its output shown when it did not).
pub fn succeeded(out: &std::process::Output) -> &std::process::Output {
    assert!(
        out.status.success(),
        "lenet failed: {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        stdout(out),
        stderr(out)
    );
    out
}

/// The JSON document on the last line of stdout.
pub fn last_json(out: &std::process::Output) -> serde_json::Value {
    let text = stdout(out);
    let line = text.lines().last().expect("stdout has a last line");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {line}"))
}

/// Asserts that a file's error `err` reads as one line that starts with the file's `path` and
/// mentions `needle` (each error about a file names it, on one line).
#[track_caller]
pub fn assert_file_error(err: &impl std::fmt::Display, path: &std::path::Path, needle: &str) {
    let msg = err.to_string();
    assert!(msg.starts_with(&path.display().to_string()), "message does not name the file: {msg}");
    assert!(msg.contains(needle), "message {msg:?} does not mention {needle:?}");
    assert!(!msg.contains('\n'), "message is not one line: {msg:?}");
}

/// A path as the `&str` a command line takes.
pub fn p(path: &std::path::Path) -> &str {
    path.to_str().unwrap()
}

/// The arguments of `lenet train` on the CPU path reading `data`, then `more`.
pub fn cpu_train<'a>(data: &'a std::path::Path, more: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["train", "--backend", "cpu", "--data", p(data)];
    args.extend_from_slice(more);
    args
}
