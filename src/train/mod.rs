//! The training loop both backends share: batching, checkpoints, and the errors of a run.
//! Progress (the live bar or one line an epoch) is in [`progress`], the `--metrics` log in
//! [`metrics`], scoring logits in [`eval`].

pub mod eval;
pub mod metrics;
pub mod progress;

pub use eval::{argmax, evaluate_logits, Evaluation};
pub use metrics::MetricRow;
use metrics::MetricsWriter;
use progress::Progress;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::backend::{Backend, Chunk, StepStats};
use crate::checkpoint::save_checkpoint;
use crate::data::Mnist;
use crate::model::{epoch_order, TrainState};

/// What to train and where to write it.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Epochs to train in this run (the current partial epoch, after a resume, counts as one).
    pub epochs: u64,
    /// Optimiser steps to take in this run; overrides `epochs`.
    pub steps: Option<u64>,
    /// Evaluate on the test set after every this many epochs (0: only at the end).
    pub eval_every: u64,
    /// Save a checkpoint to `save` every this many steps (0: only at the end).
    pub checkpoint_every: u64,
    pub save: Option<PathBuf>,
    pub metrics: Option<PathBuf>,
    /// Force the plain, line-per-epoch progress even on a terminal.
    pub plain_progress: bool,
}

/// What a finished run reports (the `--json` line).
#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainReport {
    pub backend: String,
    pub adapter: String,
    pub steps: u64,
    pub epochs: f64,
    pub batch: usize,
    pub train_loss: f64,
    /// `None` (JSON null) when no evaluation ran: the test set is empty.
    pub test_accuracy: Option<f64>,
    pub test_loss: Option<f64>,
    pub images_per_s: f64,
    pub train_seconds: f64,
    pub submits: u64,
    pub host_waits: u64,
    pub stopped_early: bool,
    #[serde(skip)]
    pub history: Vec<MetricRow>,
}

/// Why training stopped before its end.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("the loss became {value} at step {step} (epoch {epoch}); training stopped, {kept}")]
    Diverged { step: u64, epoch: u64, value: f32, kept: String },
    #[error("{more}, from step {start}, is {step} steps in all: the step counter overflows")]
    Overflow { step: u128, start: u64, more: String },
    #[error("{cause}; the trained state (step {step}) was saved to {}", path.display())]
    SavedBeforeError { cause: String, step: u64, path: PathBuf },
    #[error("{cause}; saving the trained state (step {step}) failed too: {save_error}")]
    SaveAlsoFailed { cause: String, step: u64, save_error: String },
}

/// An error and its causes on one line, each cause once: typed errors already end with their
/// source's message, so a cause the line already ends with is not repeated, and multi-line
/// reports (wgpu's) are folded.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let msg = cause.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
        if msg.is_empty() || line.ends_with(&msg) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&msg);
    }
    line
}

/// Steps per backend call: enough for a live progress bar (about ten updates an epoch),
/// few enough host waits for a GPU.
fn chunk_steps(steps_per_epoch: u64) -> u64 {
    (steps_per_epoch / 10).clamp(1, 64)
}

/// How a run's loop failed, and whether the backend's state may still be saved.
enum Failure {
    /// The state is consistent with the step counters (an evaluation, the metrics file, a
    /// checkpoint write failed): save it before reporting.
    Saveable(anyhow::Error),
    /// The state must not be saved: it diverged, or the backend failed in the middle of steps
    /// and what it holds is unknown. The checkpoint on disk is kept as it is.
    Untrusted(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Saveable(e.into())
    }
}

/// The target step of this run: checked, so that `--epochs` or `--steps` too large to count is
/// an error instead of wrapping into a short run.
fn target_step(state: &TrainState, cfg: &TrainConfig, steps_per_epoch: u64) -> Result<u64, TrainError> {
    let start = state.step;
    let (more, what) = match cfg.steps {
        Some(s) => (Some(s as u128), format!("--steps {s}")),
        None => {
            // A resumed run's unfinished epoch counts as the first of its `epochs`.
            let all = cfg.epochs as u128 * steps_per_epoch as u128;
            (
                Some(all.saturating_sub(state.step_in_epoch as u128)),
                format!("--epochs {} of {steps_per_epoch} steps each", cfg.epochs),
            )
        }
    };
    let total = start as u128 + more.unwrap_or(0);
    u64::try_from(total).map_err(|_| TrainError::Overflow { step: total, start, more: what })
}

/// Trains `state` on `mnist.train` with `backend`, evaluating on `mnist.test`. Stops at the
/// end of the configured epochs/steps or, between chunks, when `interrupt` is set.
///
/// Nothing trained is lost: an error after the first step (an evaluation, the metrics file, a
/// periodic checkpoint) first saves the trained state to `cfg.save`, then is returned. Only a
/// diverged state, or one the backend failed in the middle of computing, is never saved.
pub fn train(
    backend: &mut dyn Backend,
    state: &mut TrainState,
    mnist: &Mnist,
    cfg: &TrainConfig,
    interrupt: &AtomicBool,
) -> Result<TrainReport> {
    let n = mnist.train.len();
    let batch = state.batch;
    if batch == 0 {
        bail!("--batch must be at least 1");
    }
    if batch > n {
        bail!("--batch {batch} is larger than the training set ({n} images)");
    }
    state.optimizer.validate()?;
    let steps_per_epoch = (n / batch) as u64;
    let start_step = state.step;
    // Checkpoints written at an epoch's last step by earlier versions count it as unfinished.
    if state.step_in_epoch == steps_per_epoch {
        state.epoch += 1;
        state.step_in_epoch = 0;
    }
    let target_step = target_step(state, cfg, steps_per_epoch)?;
    if state.step_in_epoch >= steps_per_epoch {
        bail!(
            "the checkpoint is at step {} of an epoch, but --batch {batch} gives {steps_per_epoch} steps an epoch",
            state.step_in_epoch
        );
    }
    backend.load_state(state)?;
    // A resumed run continues the log it started, from the checkpoint's step, so the file covers
    // the whole run as if it had never stopped.
    let resume_at = (start_step > 0).then_some(start_step);
    let mut metrics = MetricsWriter::open(cfg.metrics.as_ref(), resume_at)?;
    let mut run = Run {
        progress: Progress::new(cfg.plain_progress, steps_per_epoch, batch, state, target_step),
        history: Vec::new(),
        train_time: Duration::ZERO,
        recent: Vec::new(),
        last_eval: None,
        last_saved: None,
        stopped_early: false,
    };

    let outcome = run_steps(backend, state, mnist, cfg, interrupt, &mut run, &mut metrics, target_step)
        .and_then(|()| {
            // The log reaches the final step on disk before the checkpoint that says the run got
            // there (a crash in between leaves rows past the checkpoint, which a resume drops).
            metrics.sync()?;
            Ok(())
        });
    run.progress.finish();
    match outcome {
        Err(Failure::Untrusted(e)) => return Err(e),
        Err(Failure::Saveable(e)) => {
            let (Some(path), true) = (&cfg.save, state.step > start_step) else { return Err(e) };
            let cause = error_line(&e);
            let step = state.step;
            return Err(match save_trained(backend, state, path) {
                Ok(()) => TrainError::SavedBeforeError { cause, step, path: path.clone() },
                Err(save) => TrainError::SaveAlsoFailed { cause, step, save_error: error_line(&save) },
            }
            .into());
        }
        Ok(()) => {}
    }
    // Saved before the interrupted run's evaluation: a second signal during it loses nothing.
    match &cfg.save {
        Some(path) => save_trained(backend, state, path)?,
        None => backend.store_state(state)?,
    }
    if run.stopped_early && run.last_eval.is_none() && !mnist.test.is_empty() {
        run.last_eval = Some(evaluate_logits(&backend.logits(&mnist.test)?, &mnist.test.labels));
    }
    let steps = state.step - start_step;
    // The loss of the last epoch, or of the last 50 steps when the run was shorter.
    let window: Vec<f32> = if run.recent.len() >= 50 {
        run.recent.iter().map(|s| s.loss).collect()
    } else {
        run.history.iter().filter(|r| r.kind == "train").rev().take(50).map(|r| r.loss as f32).collect()
    };
    let seconds = run.train_time.as_secs_f64();
    let sync = backend.sync_counts();
    Ok(TrainReport {
        backend: backend.kind().to_string(),
        adapter: backend.adapter(),
        steps,
        epochs: steps as f64 / steps_per_epoch as f64,
        batch,
        train_loss: mean(&window),
        test_accuracy: run.last_eval.as_ref().map(|e| e.accuracy),
        test_loss: run.last_eval.as_ref().map(|e| e.loss),
        images_per_s: if seconds > 0.0 { steps as f64 * batch as f64 / seconds } else { 0.0 },
        train_seconds: seconds,
        submits: sync.submits,
        host_waits: sync.host_waits,
        stopped_early: run.stopped_early,
        history: run.history,
    })
}

/// Copies the backend's state into `state` and saves it.
fn save_trained(backend: &mut dyn Backend, state: &mut TrainState, path: &Path) -> Result<()> {
    backend.store_state(state)?;
    save_checkpoint(path, state)?;
    Ok(())
}

/// What the loop accumulates for the report.
struct Run {
    progress: Progress,
    history: Vec<MetricRow>,
    train_time: Duration,
    /// The current epoch's steps.
    recent: Vec<StepStats>,
    last_eval: Option<Evaluation>,
    last_saved: Option<u64>,
    stopped_early: bool,
}

/// The steps of a run, chunk by chunk, with up to two chunks in flight: the backend runs one
/// while the next is prepared and submitted (a GPU is never left waiting for the host). A chunk
/// never crosses the end of an epoch, of the run or a checkpoint, so nothing is in flight when
/// an evaluation or a save reads the state. After each chunk the step counters are updated at
/// once, so the backend's state and `state`'s counters agree whenever anything else can fail.
#[allow(clippy::too_many_arguments)]
fn run_steps(
    backend: &mut dyn Backend,
    state: &mut TrainState,
    mnist: &Mnist,
    cfg: &TrainConfig,
    interrupt: &AtomicBool,
    run: &mut Run,
    metrics: &mut MetricsWriter,
    target_step: u64,
) -> Result<(), Failure> {
    let n = mnist.train.len();
    let batch = state.batch;
    let steps_per_epoch = (n / batch) as u64;
    let chunk = chunk_steps(steps_per_epoch);
    // The current epoch's order, and its images and time so far (for the epoch's line).
    let mut epoch: Option<(Vec<u32>, usize, Duration)> = None;
    // The step counts of the chunks submitted and not yet finished, and the steps submitted.
    let mut in_flight: VecDeque<u64> = VecDeque::new();
    let mut submitted = state.step;
    let mut clock = Instant::now();
    loop {
        while in_flight.len() < 2 && !run.stopped_early {
            if interrupt.load(Ordering::SeqCst) {
                run.stopped_early = true;
                break;
            }
            let pos = state.step_in_epoch + (submitted - state.step);
            // Not past the epoch's end or the run's, nor past a checkpoint not yet written.
            let checkpoint_pending = cfg.checkpoint_every > 0
                && submitted > state.step
                && submitted.is_multiple_of(cfg.checkpoint_every);
            if pos >= steps_per_epoch || submitted >= target_step || checkpoint_pending {
                break;
            }
            let mut k = chunk.min(steps_per_epoch - pos).min(target_step - submitted);
            if cfg.checkpoint_every > 0 {
                k = k.min(cfg.checkpoint_every - submitted % cfg.checkpoint_every);
            }
            let (order, _, _) = epoch.get_or_insert_with(|| {
                if state.step_in_epoch == 0 {
                    run.recent.clear();
                }
                run.progress.start_epoch(state.epoch, state.step_in_epoch);
                (epoch_order(n, state.seed, state.epoch, state.shuffle), 0, Duration::ZERO)
            });
            let first = pos as usize * batch;
            let indices = order[first..first + k as usize * batch].to_vec();
            let opt = state.optimizer;
            let chunk_of = Chunk {
                batch,
                shifts: vec![0; 2 * indices.len()],
                indices,
                steps: (submitted + 1..=submitted + k).map(|t| opt.step(t, opt.lr, None)).collect(),
            };
            backend.submit(&chunk_of).map_err(|e| {
                Failure::Untrusted(e.context(format!(
                    "training steps {}..{} failed; {}",
                    submitted + 1,
                    submitted + k,
                    kept_checkpoint(cfg, run.last_saved)
                )))
            })?;
            in_flight.push_back(k);
            submitted += k;
        }
        let Some(k) = in_flight.pop_front() else { break };
        let stats = backend
            .finish()
            .and_then(|s| s.ok_or_else(|| anyhow::anyhow!("a chunk went missing")))
            .map_err(|e| {
            Failure::Untrusted(e.context(format!(
                "training steps {}..{} failed; {}",
                state.step + 1,
                state.step + k,
                kept_checkpoint(cfg, run.last_saved)
            )))
        })?;
        let now = Instant::now();
        let dt = now - clock;
        clock = now;
        run.train_time += dt;
        let (_, epoch_images, epoch_time) = epoch.as_mut().expect("a chunk of this epoch was submitted");
        *epoch_time += dt;
        *epoch_images += k as usize * batch;
        if let Some((i, bad)) = stats.iter().enumerate().find(|(_, s)| !s.loss.is_finite()) {
            return Err(Failure::Untrusted(
                TrainError::Diverged {
                    step: state.step + 1 + i as u64,
                    epoch: state.epoch + 1,
                    value: bad.loss,
                    kept: kept_checkpoint(cfg, run.last_saved),
                }
                .into(),
            ));
        }
        // The backend now holds the state after these k steps: count them before anything else.
        let rows_epoch = state.epoch;
        let first_row_step = state.step + 1;
        state.step += k;
        state.step_in_epoch += k;
        let epoch_done = state.step_in_epoch == steps_per_epoch;
        if epoch_done {
            state.epoch += 1;
            state.step_in_epoch = 0;
        }
        for (i, s) in stats.iter().enumerate() {
            let row = MetricRow {
                kind: "train",
                step: first_row_step + i as u64,
                epoch: rows_epoch,
                loss: s.loss as f64,
                accuracy: s.correct as f64 / batch as f64,
            };
            metrics.write(&row)?;
            run.history.push(row);
        }
        run.recent.extend_from_slice(&stats);
        let done = if epoch_done { steps_per_epoch } else { state.step_in_epoch };
        run.progress.update(state.step, done, &run.recent, *epoch_images as f64 / epoch_time.as_secs_f64());
        let last = state.step >= target_step;
        if epoch_done || (last && in_flight.is_empty()) {
            let (_, images, time) = epoch.take().expect("the epoch was started above");
            let due = epoch_done && cfg.eval_every > 0 && state.epoch.is_multiple_of(cfg.eval_every);
            let mut line =
                epoch_summary(state, steps_per_epoch, run.progress.last_epoch(), &run.recent, images, time);
            // An empty test set is no evaluation at all (not an accuracy of 0).
            if (due || last) && !mnist.test.is_empty() {
                let eval = evaluate_logits(&backend.logits(&mnist.test)?, &mnist.test.labels);
                line.push_str(&format!(
                    "  test loss {:.4}  test acc {:.2}%",
                    eval.loss,
                    100.0 * eval.accuracy
                ));
                let row = MetricRow {
                    kind: "test",
                    step: state.step,
                    epoch: state.epoch,
                    loss: eval.loss,
                    accuracy: eval.accuracy,
                };
                metrics.write(&row)?;
                run.history.push(row);
                run.last_eval = Some(eval);
            }
            run.progress.end_epoch(&line);
            metrics.flush()?;
            // Evaluating is not training time.
            clock = Instant::now();
        }
        // Every row up to this step is logged (evaluation included) before the checkpoint that
        // says the run got here; the final step's checkpoint is the end-of-run save.
        let checkpoint_due = cfg.checkpoint_every > 0 && state.step.is_multiple_of(cfg.checkpoint_every);
        if let (true, false, Some(path)) = (checkpoint_due, last, &cfg.save) {
            metrics.sync()?;
            save_trained(backend, state, path)?;
            run.last_saved = Some(state.step);
            clock = Instant::now();
        }
    }
    Ok(())
}

/// What the checkpoint on disk holds after a run stopped without saving.
fn kept_checkpoint(cfg: &TrainConfig, last_saved: Option<u64>) -> String {
    match (&cfg.save, last_saved) {
        (Some(p), Some(s)) => format!("the last good checkpoint ({}, step {s}) is kept", p.display()),
        (Some(p), None) => format!("nothing was saved and {} is untouched", p.display()),
        (None, _) => "nothing was saved".to_string(),
    }
}

pub(crate) fn mean(xs: &[f32]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.iter().map(|&x| x as f64).sum::<f64>() / xs.len() as f64
}

/// The epoch's line: "epoch 3/10 (234/234 steps)  loss ...", the same figures the bar ended on.
fn epoch_summary(
    state: &TrainState,
    steps_per_epoch: u64,
    last_epoch: u64,
    recent: &[StepStats],
    images: usize,
    time: Duration,
) -> String {
    let epoch = if state.step_in_epoch == 0 { state.epoch } else { state.epoch + 1 };
    let (loss, accuracy) = progress::epoch_means(recent, state.batch);
    let done = if state.step_in_epoch == 0 { steps_per_epoch } else { state.step_in_epoch };
    format!(
        "epoch {epoch}/{} ({done}/{steps_per_epoch} steps)  loss {loss:.4}  train acc {:.2}%  {:.0} img/s",
        last_epoch.max(epoch),
        100.0 * accuracy,
        images as f64 / time.as_secs_f64().max(1e-9),
    )
}
