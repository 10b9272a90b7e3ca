//! An error in the middle of a run loses nothing: the trained state is saved to `--save` before
//! the error is reported, except when that state cannot be trusted (a diverged loss, a backend
//! that failed in the middle of its steps), when the last good checkpoint is kept.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::{bail, Result};
use lenet::backend::{Backend, Chunk, StepStats};
use lenet::checkpoint::load_checkpoint;
use lenet::cpu::CpuBackend;
use lenet::data::{Dataset, Mnist};
use lenet::model::{Params, TrainState};
use lenet::optim::Optimizer;
use lenet::train::{error_line, train, TrainConfig, TrainReport};

/// 128 training images at batch 32: 4 steps an epoch.
fn config(steps: u64, save: &Path) -> TrainConfig {
    TrainConfig {
        epochs: 1,
        steps: Some(steps),
        save: Some(save.to_path_buf()),
        plain_progress: true,
        ..TrainConfig::default()
    }
}

/// The CPU backend with faults planted: the evaluation fails from a given call on, or a chunk of
/// training steps does.
struct Faulty {
    inner: CpuBackend,
    fail_logits: bool,
    fail_steps_after: Option<u64>,
    /// Steps taken so far (the next chunk's first step is one more).
    steps: u64,
}

impl Backend for Faulty {
    fn kind(&self) -> &'static str {
        "cpu"
    }
    fn adapter(&self) -> String {
        "faulty".into()
    }
    fn load_state(&mut self, state: &TrainState) -> Result<()> {
        self.steps = state.step;
        self.inner.load_state(state)
    }
    fn store_state(&mut self, state: &mut TrainState) -> Result<()> {
        self.inner.store_state(state)
    }
    fn submit(&mut self, chunk: &Chunk) -> Result<()> {
        let first_step = self.steps + 1;
        if self.fail_steps_after.is_some_and(|after| first_step > after) {
            // Half the chunk ran before the failure: the state is neither before nor after it.
            let b = chunk.batch;
            let half = Chunk {
                batch: b,
                indices: chunk.indices[..b].to_vec(),
                shifts: chunk.shifts[..2 * b].to_vec(),
                steps: chunk.steps[..1].to_vec(),
            };
            self.inner.train_steps(&half)?;
            bail!("device lost (planted)");
        }
        self.steps += chunk.steps.len() as u64;
        self.inner.submit(chunk)
    }
    fn finish(&mut self) -> Result<Option<Vec<StepStats>>> {
        self.inner.finish()
    }
    fn logits(&mut self, data: &Dataset) -> Result<Vec<f32>> {
        if self.fail_logits {
            bail!("evaluation failed (planted)");
        }
        self.inner.logits(data)
    }
}

fn faulty(mnist: &Mnist, fail_logits: bool, fail_steps_after: Option<u64>) -> Faulty {
    Faulty { inner: CpuBackend::new(&mnist.train).unwrap(), fail_logits, fail_steps_after, steps: 0 }
}

/// A test's directory, its data (128 training images, 50 test images) and its `--save` file.
fn setup() -> (tempfile::TempDir, Mnist, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let save = dir.path().join("run.safetensors");
    (dir, common::small_mnist(128, 50), save)
}

/// Asserts that `save` holds the state an uninterrupted run reaches after `steps` steps (run
/// here, its checkpoint in `dir`).
#[track_caller]
fn assert_saved_after(steps: u64, save: &Path, mnist: &Mnist, dir: &Path) {
    let saved = load_checkpoint(save).expect("the state was saved").into_train_state().unwrap();
    let path = dir.join(format!("clean-{steps}.safetensors"));
    run(&mut CpuBackend::new(&mnist.train).unwrap(), mnist, &config(steps, &path)).unwrap();
    let clean = load_checkpoint(&path).unwrap().into_train_state().unwrap();
    assert_eq!(saved, clean, "the saved state is the one after step {steps}");
}

/// A run of `backend` from the same fresh state each time (seed 3, batch 32) with `cfg`.
fn run(backend: &mut dyn Backend, mnist: &Mnist, cfg: &TrainConfig) -> Result<TrainReport> {
    let mut state = TrainState::new(Params::init(3), Optimizer::default(), 3, 32, true);
    train(backend, &mut state, mnist, None, cfg, &AtomicBool::new(false))
}

#[test]
fn a_failed_evaluation_saves_the_trained_state_first() {
    let (dir, mnist, save) = setup();
    let mut backend = faulty(&mnist, true, None);
    // The evaluation after the first epoch (step 4) fails; 8 steps were asked for.
    let line = error_line(&run(&mut backend, &mnist, &config(8, &save)).unwrap_err());
    assert!(line.contains("evaluation failed") && line.contains("saved to"), "{line}");
    assert!(!line.contains('\n'));
    assert_saved_after(4, &save, &mnist, dir.path());
}

#[cfg(target_os = "linux")]
#[test]
fn a_metrics_file_that_cannot_be_written_saves_the_trained_state_first() {
    // /dev/full: every write fails with "no space left on device", as on a full disk. The rows
    // are buffered; the first flush (the end of the first epoch, step 4) fails.
    let (dir, mnist, save) = setup();
    let mut cfg = config(8, &save);
    cfg.metrics = Some("/dev/full".into());
    let mut backend = CpuBackend::new(&mnist.train).unwrap();
    let line = error_line(&run(&mut backend, &mnist, &cfg).unwrap_err());
    assert!(line.contains("/dev/full") && line.contains("saved to"), "{line}");
    assert_saved_after(4, &save, &mnist, dir.path());
}

#[test]
fn a_backend_failing_mid_chunk_keeps_the_last_checkpoint() {
    let (dir, mnist, save) = setup();
    let mut cfg = config(12, &save);
    cfg.checkpoint_every = 4;
    let mut backend = faulty(&mnist, false, Some(4));
    let line = error_line(&run(&mut backend, &mnist, &cfg).unwrap_err());
    assert!(line.contains("device lost") && line.contains("step 4) is kept"), "{line}");
    // What the backend held after half a chunk is not saved: the checkpoint is still step 4's.
    assert_saved_after(4, &save, &mnist, dir.path());
}

#[test]
fn an_error_before_the_first_step_writes_nothing() {
    let (dir, mnist, save) = setup();
    let mut cfg = config(8, &save);
    cfg.metrics = Some(dir.path().join("no-such-dir").join("m.csv"));
    let mut backend = CpuBackend::new(&mnist.train).unwrap();
    assert!(run(&mut backend, &mnist, &cfg).is_err());
    assert!(!save.exists(), "nothing was trained, so nothing is saved");
}
