//! The library prints nothing: a whole library-only run (device auto, training with a validation
//! set, evaluations, a periodic and a best checkpoint, the metrics file, evaluation, save, load,
//! predict) with file descriptors 1 and 2 pointed at files, which must stay empty.
//!
//! Its own test binary without the test harness (`harness = false` in Cargo.toml): the harness
//! captures `eprintln!` itself, which would hide a print, and runs other tests beside it, whose
//! lines would land in the files.

mod common;

use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicBool;

use lenet::{Device, TrainConfig, TrainEvent, Trainer, TrainerConfig};

fn main() {
    // Mesa's Vulkan loader prints about a missing XDG_RUNTIME_DIR (the command line sets it too):
    // its line, not the library's. Set before any thread starts.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
    let dir = tempfile::tempdir().unwrap();
    let mnist = common::small_mnist(640, 200);
    let (out_file, err_file) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let saved = redirect(&[(1, &out_file), (2, &err_file)]);
    let events = run_library(dir.path(), mnist);
    restore(saved);
    let (out, err) = (std::fs::read(&out_file).unwrap(), std::fs::read(&err_file).unwrap());
    assert!(events.iter().any(|e| e == "checkpoint"), "the run wrote no checkpoint: {events:?}");
    assert!(events.iter().any(|e| e == "evaluated"), "the run did not evaluate: {events:?}");
    assert_eq!(String::from_utf8_lossy(&out), "", "the library wrote on stdout");
    assert_eq!(String::from_utf8_lossy(&err), "", "the library wrote on stderr");
    println!(
        "library_silence: a library-only run wrote nothing on stdout or stderr ({} events)",
        events.len()
    );
}

/// The run; returns the kinds of the events it reported.
fn run_library(dir: &std::path::Path, mnist: lenet::Mnist) -> Vec<String> {
    let config = TrainerConfig { batch: 32, validation: 96, ..TrainerConfig::default() };
    let mut trainer = Trainer::new(&Device::Auto, &config, mnist).unwrap();
    let run = TrainConfig {
        epochs: 2,
        checkpoint_every: 5,
        save: Some(dir.join("last.safetensors")),
        save_best: Some(dir.join("best.safetensors")),
        metrics: Some(dir.join("metrics.csv")),
        ..TrainConfig::default()
    };
    let mut events = Vec::new();
    trainer
        .train(&run, &AtomicBool::new(false), |e| {
            events.push(
                match e {
                    TrainEvent::CheckpointSaved { .. } => "checkpoint",
                    TrainEvent::Evaluated { .. } => "evaluated",
                    _ => "other",
                }
                .to_string(),
            )
        })
        .unwrap();
    trainer.evaluate_test().unwrap();
    trainer.save(&dir.join("again.safetensors")).unwrap();
    let params = lenet::load_weights(&dir.join("again.safetensors")).unwrap();
    lenet::predict(&params, &[&[0u8; lenet::IMAGE_PIXELS]]).unwrap();
    events
}

/// Points each descriptor at its file; returns the duplicates that restore them.
fn redirect(targets: &[(i32, &std::path::Path)]) -> Vec<(i32, i32)> {
    targets
        .iter()
        .map(|&(fd, path)| {
            let file = std::fs::File::create(path).unwrap();
            // SAFETY: dup and dup2 on descriptors this process owns.
            unsafe {
                let kept = libc::dup(fd);
                assert!(kept >= 0 && libc::dup2(file.as_raw_fd(), fd) >= 0);
                (fd, kept)
            }
        })
        .collect()
}

fn restore(saved: Vec<(i32, i32)>) {
    for (fd, kept) in saved {
        // SAFETY: as above.
        unsafe {
            libc::dup2(kept, fd);
            libc::close(kept);
        }
    }
}
