//! The training loop both backends share: batching, the learning-rate schedule, the shift
//! augmentation, validation and early stopping, checkpoints, and the errors of a run. The loop
//! prints nothing: it reports what happens as [`TrainEvent`]s to the caller's callback (the
//! command line's live bar or epoch lines are one such callback, in `progress`). The
//! `--metrics` log is in [`metrics`], scoring logits in [`eval`].

pub mod eval;
pub mod metrics;
#[cfg(feature = "cli")]
pub mod progress;

pub use eval::{argmax, evaluate_logits, Evaluation};
pub use metrics::MetricRow;
use metrics::MetricsWriter;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::augment::shifts_for_positions;
use crate::backend::{Backend, Chunk, StepStats};
use crate::checkpoint::{save_checkpoint, StateFault};
use crate::data::{Dataset, Mnist};
use crate::model::{epoch_order, EpochSums, Monitor, RunClock, TrainState};
use crate::schedule::{LrSchedule, ScheduleState};

/// What to train and where to write it.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Epochs to train in this run (the current partial epoch, after a resume, counts as one).
    pub epochs: u64,
    /// Optimiser steps to take in this run; overrides `epochs`.
    pub steps: Option<u64>,
    /// Evaluate (on the validation set, or the test set without one) after every this many
    /// epochs (0: only at the end).
    pub eval_every: u64,
    /// Save a checkpoint to `save` every this many steps (0: only at the end).
    pub checkpoint_every: u64,
    pub save: Option<PathBuf>,
    /// Save the checkpoint of each evaluation whose validation figure (`monitor`) is the best so
    /// far here; at the end of a run, the test set is scored, and `save` written, with the best
    /// checkpoint's weights (Keras's `restore_best_weights`).
    pub save_best: Option<PathBuf>,
    pub metrics: Option<PathBuf>,
    /// Stop when the validation figure (`monitor`) has not improved for this many evaluations.
    pub patience: Option<u64>,
    /// What `patience` and `save_best` watch; `None`: the loss for `patience`, the accuracy for
    /// `save_best` (their meaning before `--monitor` existed).
    pub monitor: Option<Monitor>,
    /// The least change of the watched figure that counts as an improvement.
    pub min_delta: f64,
    /// Stop at the first evaluation whose accuracy (validation, or test without a validation
    /// set) reaches this fraction.
    pub until: Option<f64>,
    /// For a caller's progress display: lines rather than a live bar. The loop itself prints
    /// nothing whatever this says (the command line's display reads it).
    pub plain_progress: bool,
    /// Steps per chunk, fixed (tests of chunking's invariance). `None`, the default: sized by
    /// the measured step time (see [`ChunkSizer`]).
    pub chunk_steps: Option<u64>,
}

impl TrainConfig {
    /// The figure `--save-best` keeps the best of.
    pub fn best_monitor(&self) -> Monitor {
        self.monitor.unwrap_or(Monitor::ValAccuracy)
    }

    /// The figure `--patience` waits to improve.
    pub fn patience_monitor(&self) -> Monitor {
        self.monitor.unwrap_or(Monitor::ValLoss)
    }
}

impl Default for TrainConfig {
    /// The command line's defaults: 10 epochs, an evaluation after each, no files.
    fn default() -> Self {
        TrainConfig {
            epochs: 10,
            steps: None,
            eval_every: 1,
            checkpoint_every: 0,
            save: None,
            save_best: None,
            metrics: None,
            patience: None,
            monitor: None,
            min_delta: 0.0,
            until: None,
            plain_progress: false,
            chunk_steps: None,
        }
    }
}

/// Why a run ended before the steps it was asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StopReason {
    /// Ctrl-C, SIGTERM or SIGHUP.
    Signal,
    /// `--patience`: the validation loss stopped improving.
    Patience,
    /// `--until`: an evaluation reached the accuracy asked for.
    Until,
}

/// What a run reports as it goes, to the callback given to [`train_with_events`]. The loop
/// itself prints nothing; the command line turns these into its bar and epoch lines.
#[derive(Debug)]
#[non_exhaustive]
pub enum TrainEvent<'a> {
    /// The run starts from `state` and will end at step `target_step` (unless stopped early).
    Started { state: &'a TrainState, steps_per_epoch: u64, batch: usize, target_step: u64 },
    /// Epoch `epoch` (0-based) starts, `done` steps into it; `before` sums those steps, when known.
    EpochStarted { epoch: u64, done: u64, before: Option<EpochSums> },
    /// A chunk of steps finished: `step` is the run's step counter, `done` the steps of the
    /// epoch, `epoch_steps` this invocation's steps of the epoch so far, `rows` the chunk's own
    /// steps (as the metrics log has them).
    Steps { step: u64, done: u64, epoch_steps: &'a [StepStats], images_per_s: f64, rows: &'a [MetricRow] },
    /// The run does something other than steps (`Some("evaluating on the test set")`), or is
    /// back to steps (`None`).
    Phase(Option<&'a str>),
    /// An evaluation finished: `row.kind` is "val" or "test".
    Evaluated { row: &'a MetricRow, evaluation: &'a Evaluation },
    /// A checkpoint holding step `step` was written to `path` (`best`: the best one so far).
    CheckpointSaved { path: &'a Path, step: u64, best: bool },
    /// An epoch (or the run inside one) ended: `line` sums it up, as the command line prints it.
    EpochEnded { line: &'a str },
    /// The loop is over (the final save and the report follow).
    Finished,
}

/// A moment of a run: its step (counted from the run's first step, resumed parts included), the
/// epoch that step belongs to (1-based, as the terminal numbers epochs) and the wall-clock seconds
/// since the run started (the `seconds` column of `--metrics`).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct RunPoint {
    pub step: u64,
    pub epoch: u64,
    pub seconds: f64,
}

/// `--until`: the first evaluation that reached the accuracy asked for.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct TimeToAccuracy {
    /// The accuracy asked for (a fraction).
    pub target: f64,
    /// The accuracy the evaluation measured.
    pub accuracy: f64,
    pub step: u64,
    pub epoch: u64,
    /// Wall-clock seconds since the run started, evaluations included (since `counted_from_step`
    /// when that is not 0).
    pub seconds: f64,
    /// Seconds spent training steps, evaluations and saves excluded (the same span).
    pub train_seconds: f64,
    /// 0 when both times cover the whole run. Else the step this invocation resumed from: its
    /// checkpoint does not record how long the run took before it (written by a run that did not
    /// measure time, or by an earlier version), and the times count from there.
    pub counted_from_step: u64,
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
    /// The last validation evaluation (`None` without `--val`).
    pub val_accuracy: Option<f64>,
    pub val_loss: Option<f64>,
    /// The best validation accuracy of the run so far and the step that first reached it (what
    /// `--save-best` holds); `None` without `--val`.
    pub best_val_accuracy: Option<f64>,
    /// The best validation loss of the run so far (what `--save-best` holds with
    /// `--monitor val_loss`).
    pub best_val_loss: Option<f64>,
    /// The step of the best that `--save-best` holds (by `monitor`).
    pub best_val_step: Option<u64>,
    /// What `--save-best` and `--patience` watched ("val_loss" or "val_accuracy"), with `--val`.
    pub monitor: Option<&'static str>,
    /// Whose weights the final test evaluation scored and `--save` holds: "last" (the run's
    /// last step), or "best" (the best validation checkpoint's, with `--save-best`).
    pub scored_weights: &'static str,
    /// The step of the weights scored.
    pub scored_step: u64,
    /// Why the best checkpoint's weights were not scored when `--save-best` asked for them.
    pub scored_note: Option<String>,
    /// The file that holds the best validation checkpoint: this invocation's `--save-best` when
    /// an evaluation of it wrote one, else the file an earlier invocation of the run wrote it to;
    /// `None` when no file holds it.
    pub best_val_file: Option<String>,
    /// Whether this invocation wrote `best_val_file`.
    #[serde(skip)]
    pub best_val_written_now: bool,
    pub images_per_s: f64,
    pub train_seconds: f64,
    pub submits: u64,
    pub host_waits: u64,
    /// Whether the run ended before the steps it was asked for (see `stop_reason`).
    pub stopped_early: bool,
    pub stop_reason: Option<StopReason>,
    /// Where a run that stopped early stopped.
    pub stopped_at: Option<RunPoint>,
    /// `--until`'s evaluation, when one reached the target.
    pub time_to_accuracy: Option<TimeToAccuracy>,
    #[serde(skip)]
    pub history: Vec<MetricRow>,
}

impl TrainReport {
    /// The lines that say how the run ended beyond its summary: why and when it stopped early,
    /// the best validation accuracy, and `--until`'s outcome. Empty for a plain run.
    pub fn outcome_lines(&self, cfg: &TrainConfig) -> Vec<String> {
        let mut lines = Vec::new();
        if let (Some(reason), Some(at)) = (self.stop_reason, self.stopped_at) {
            let why = match reason {
                StopReason::Signal => "interrupted by a signal".to_string(),
                StopReason::Patience => format!(
                    "the validation {} had not improved for {} (--patience)",
                    match cfg.patience_monitor() {
                        Monitor::ValLoss => "loss",
                        Monitor::ValAccuracy => "accuracy",
                    },
                    match cfg.patience.unwrap_or_default() {
                        1 => "1 evaluation".to_string(),
                        n => format!("{n} evaluations"),
                    }
                ),
                StopReason::Until => "an evaluation reached the accuracy --until asked for".to_string(),
            };
            lines.push(format!(
                "stopped early at step {} (epoch {}, {:.1} s into the run): {why}",
                at.step, at.epoch, at.seconds
            ));
        }
        if let (Some(accuracy), Some(step)) =
            (self.best_val_accuracy.or(self.best_val_loss), self.best_val_step)
        {
            // "saved in FILE" only when FILE was written with it in this invocation; a best from
            // before a resume says where that invocation put it.
            let saved = match (&cfg.save_best, self.best_val_written_now, &self.best_val_file) {
                (Some(p), true, _) => format!(", saved in {}", p.display()),
                (given, false, earlier) => {
                    let not_written = given
                        .as_ref()
                        .map(|p| {
                            format!(
                                " ({} was not written: no evaluation of this invocation beat it)",
                                p.display()
                            )
                        })
                        .unwrap_or_default();
                    match earlier {
                        Some(f) => format!(", reached before this run was resumed and saved then in {f}{not_written}"),
                        None if given.is_some() => format!(
                            ", reached before this run was resumed, when no --save-best file was kept{not_written}"
                        ),
                        None => String::new(),
                    }
                }
                (None, true, _) => String::new(),
            };
            let figure = match (self.monitor, self.best_val_loss) {
                (Some("val_loss"), Some(loss)) => format!("loss {loss:.4}"),
                _ => format!("accuracy {:.2}%", 100.0 * accuracy),
            };
            lines.push(format!("best validation {figure} at step {step}{saved}"));
            if let Some(why) = &self.scored_note {
                lines.push(format!("the test set was scored on the last weights: {why}"));
            }
        }
        if let Some(target) = cfg.until {
            let on = if self.val_accuracy.is_some() { "validation" } else { "test" };
            lines.push(match self.time_to_accuracy {
                Some(t) if t.counted_from_step > 0 => format!(
                    "--until {:.2}%: {on} accuracy {:.2}% at step {} (epoch {}), {:.1} s after this \
                     invocation resumed the run at step {} ({:.1} s of training since); the checkpoint \
                     does not record the time before it",
                    100.0 * target,
                    100.0 * t.accuracy,
                    t.step,
                    t.epoch,
                    t.seconds,
                    t.counted_from_step,
                    t.train_seconds
                ),
                Some(t) => format!(
                    "--until {:.2}%: {on} accuracy {:.2}% at step {} (epoch {}), {:.1} s into the run \
                     ({:.1} s of training)",
                    100.0 * target,
                    100.0 * t.accuracy,
                    t.step,
                    t.epoch,
                    t.seconds,
                    t.train_seconds
                ),
                None => format!("--until {:.2}%: not reached", 100.0 * target),
            });
        }
        lines
    }
}

/// `--val N`: takes the training set's last `n` images out of `train` and returns them, to
/// validate on.
pub fn split_validation(train: &mut Dataset, n: usize) -> Result<Dataset> {
    if n >= train.len() {
        bail!("--val {n} leaves no images to train on: the training set has {}", train.len());
    }
    let keep = train.len() - n;
    let pixels = train.rows * train.cols;
    Ok(Dataset {
        images: train.images.split_off(keep * pixels),
        labels: train.labels.split_off(keep),
        rows: train.rows,
        cols: train.cols,
    })
}

/// Why training stopped before its end.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("the loss became {value} at step {step} (epoch {epoch}); training stopped, {kept}")]
    Diverged { step: u64, epoch: u64, value: f32, kept: String },
    #[error(
        "the training state diverged at {} (epoch {epoch}): {fault}; training stopped, {kept}",
        if first == last { format!("step {first}") } else { format!("steps {first}..{last}") }
    )]
    StateDiverged { first: u64, last: u64, epoch: u64, fault: StateFault, kept: String },
    #[error("{more}, from step {start}, is {step} steps in all: the step counter overflows")]
    Overflow { step: u128, start: u64, more: String },
    #[error("{cause}; the trained state (step {step}) was saved to {}", path.display())]
    SavedBeforeError { cause: String, step: u64, path: PathBuf },
    #[error("{cause}; saving the trained state (step {step}) failed too: {save_error}")]
    SaveAlsoFailed { cause: String, step: u64, save_error: String },
}

pub use crate::error::error_line;

/// The work one chunk of steps should take, at the pace measured so far. Two chunks are in
/// flight at most, so a stop signal waits for about twice this: about 1 s of steps, whatever the
/// adapter (a scheduler's grace period is 10 s for docker, 90 s for systemd).
pub const CHUNK_SECONDS: f64 = 0.5;
/// The most steps in one chunk: enough to keep a fast GPU's host waits rare, and a bound on the
/// per-chunk buffers.
pub const MAX_CHUNK_STEPS: u64 = 64;

/// Steps per backend call, sized by the time steps take: the first chunk is one step (nothing
/// is measured yet), then each chunk is [`CHUNK_SECONDS`] at the pace measured on the last, at
/// most twice the size before it (a pace measured on a small chunk can be optimistic) and at
/// most [`MAX_CHUNK_STEPS`]. Chunking never changes the arithmetic (each step is the same
/// dispatches in the same order), so the results are the same bits whatever the sizes.
pub struct ChunkSizer {
    next: u64,
    fixed: bool,
    /// The seconds a step took on the last chunk (0 before any).
    step_seconds: f64,
}

impl ChunkSizer {
    pub fn new(fixed: Option<u64>) -> Self {
        match fixed {
            Some(k) => ChunkSizer { next: k.max(1), fixed: true, step_seconds: 0.0 },
            None => ChunkSizer { next: 1, fixed: false, step_seconds: 0.0 },
        }
    }

    /// The size of the next chunk.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// How many chunks may be in flight: two, so that a GPU runs one while the host prepares the
    /// next; one when a single step takes longer than a chunk should (a slow adapter), where the
    /// host's part is negligible and a second chunk would only double the wait for a stop.
    pub fn depth(&self) -> usize {
        if !self.fixed && self.step_seconds > CHUNK_SECONDS {
            1
        } else {
            2
        }
    }

    /// A chunk of `steps` steps kept the backend busy for `busy`.
    pub fn measured(&mut self, steps: u64, busy: Duration) {
        if self.fixed || steps == 0 {
            return;
        }
        let per_step = busy.as_secs_f64() / steps as f64;
        self.step_seconds = per_step;
        let fit = if per_step > 0.0 { (CHUNK_SECONDS / per_step).floor() } else { f64::INFINITY };
        let grown = 2 * self.next.max(steps);
        self.next = (fit.min(u64::MAX as f64) as u64).clamp(1, grown.min(MAX_CHUNK_STEPS));
    }
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

/// Trains `state` on `mnist.train` with `backend`. Evaluates on `validation` when there is one
/// (and on `mnist.test` once at the end), else on `mnist.test`. Stops at the end of the
/// configured epochs/steps, at `--patience` or `--until`, or, between chunks, when `interrupt`
/// is set.
///
/// Nothing trained is lost: an error after the first step (an evaluation, the metrics file, a
/// periodic checkpoint) first saves the trained state to `cfg.save`, then is returned. Only a
/// diverged state, or one the backend failed in the middle of computing, is never saved.
/// Reports nothing as it goes: [`train_with_events`] does.
pub fn train(
    backend: &mut dyn Backend,
    state: &mut TrainState,
    mnist: &Mnist,
    validation: Option<&Dataset>,
    cfg: &TrainConfig,
    interrupt: &AtomicBool,
) -> Result<TrainReport> {
    train_with_events(backend, state, mnist, validation, cfg, interrupt, &mut |_| {})
}

/// [`train`], reporting each [`TrainEvent`] to `on_event` as it happens.
pub fn train_with_events(
    backend: &mut dyn Backend,
    state: &mut TrainState,
    mnist: &Mnist,
    validation: Option<&Dataset>,
    cfg: &TrainConfig,
    interrupt: &AtomicBool,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<TrainReport> {
    let n = mnist.train.len();
    let batch = state.batch;
    if batch == 0 {
        return Err(crate::error::Error::BatchZero.into());
    }
    if batch > n {
        return Err(crate::error::Error::BatchTooLarge { batch, images: n }.into());
    }
    let held_out = validation.map_or(0, Dataset::len);
    if held_out != state.validation {
        return Err(
            crate::error::Error::ValidationMismatch { held: state.validation, given: held_out }.into()
        );
    }
    if (cfg.patience.is_some() || cfg.save_best.is_some()) && validation.is_none() {
        return Err(crate::error::Error::NeedsValidation.into());
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
    if state.schedule != LrSchedule::Constant {
        if start_step == 0 {
            // A schedule spans the run as its first invocation plans it.
            state.schedule_steps = target_step;
        } else if start_step >= state.schedule_steps {
            bail!(
                "the checkpoint's {} schedule ended at step {}: nothing is left to train",
                state.schedule,
                state.schedule_steps
            );
        } else if target_step > state.schedule_steps {
            bail!(
                "this run would end at step {target_step}, past the end of the checkpoint's {} schedule \
                 (step {}); a resumed run finishes its schedule: ask for at most {} more steps, or give \
                 neither --epochs nor --steps",
                state.schedule,
                state.schedule_steps,
                state.schedule_steps - start_step
            );
        }
    }
    backend.load_state(state)?;
    // A resumed run continues the log it started, from the checkpoint's step, so the file covers
    // the whole run as if it had never stopped; its clock continues from the log's last row.
    let resume_at = (start_step > 0).then_some(start_step);
    let (mut metrics, seconds_before) = MetricsWriter::open(cfg.metrics.as_ref(), resume_at)?;
    on_event(&TrainEvent::Started { state, steps_per_epoch, batch, target_step });
    let mut run = Run {
        on_event,
        last_epoch: last_epoch(state, steps_per_epoch, target_step),
        history: Vec::new(),
        train_time: Duration::ZERO,
        started: Instant::now(),
        seconds_before,
        recent: Vec::new(),
        // A resumed epoch's steps before this invocation, as the checkpoint summed them.
        epoch_before: if state.step_in_epoch > 0 { state.epoch_sums } else { Some(EpochSums::default()) },
        last_eval: None,
        last_val: None,
        last_saved: None,
        stop: None,
        stopped_at: None,
        reached: None,
        best_written: None,
        restored: None,
        restored_step: None,
        restore_failed: None,
        // The run's clock goes on where the checkpoint's stopped; a run measuring time to
        // accuracy starts one; a resumed run whose checkpoint has none cannot know its past.
        clock_base: match (state.clock, cfg.until.is_some(), start_step) {
            (Some(clock), _, _) => Some(clock),
            (None, true, 0) => Some(RunClock::default()),
            (None, _, _) => None,
        },
        start_step,
    };

    let outcome =
        run_steps(backend, state, mnist, validation, cfg, interrupt, &mut run, &mut metrics, target_step)
            .and_then(|()| {
                // The log reaches the final step on disk before the checkpoint that says the run
                // got there (a crash in between leaves rows past the checkpoint, which a resume
                // drops).
                metrics.sync()?;
                Ok(())
            });
    (run.on_event)(&TrainEvent::Finished);
    match outcome {
        Err(Failure::Untrusted(e)) => return Err(e),
        Err(Failure::Saveable(e)) => {
            let (Some(path), true) = (&cfg.save, state.step > start_step) else { return Err(e) };
            let cause = error_line(&e);
            let step = state.step;
            return Err(match save_trained(backend, state, &run, path) {
                Ok(()) => TrainError::SavedBeforeError { cause, step, path: path.clone() },
                Err(save) => TrainError::SaveAlsoFailed { cause, step, save_error: error_line(&save) },
            }
            .into());
        }
        Ok(()) => {}
    }
    let interrupted = run.stop == Some(StopReason::Signal);
    if interrupted {
        run.stopped_at = Some(run.point(state));
    }
    // The run as it ended, for the report: a restored best replaces `state` below.
    let (last_step, last_record, last_best_file) = (state.step, state.record, state.best_file.clone());
    // Saved before the interrupted run's evaluation: a second signal during it loses nothing.
    match (&cfg.save, run.restored.take()) {
        // The best checkpoint's weights were scored: --save holds them, and so does `state`
        // (the backend holds them already).
        (save, Some((best, _))) => {
            *state = best;
            if let Some(path) = save {
                save_checkpoint(path, state)?;
            }
            run.restored_step = Some(state.step);
        }
        (Some(path), None) => save_trained(backend, state, &run, path)?,
        (None, None) => {
            backend.store_state(state)?;
            state.clock = run.clock_now();
        }
    }
    // An interrupted run is scored on the test set as it stands (not logged: a resumed run
    // continues the log, and the whole run has no evaluation here).
    if interrupted && (validation.is_some() || run.last_eval.is_none()) && !mnist.test.is_empty() {
        run.last_eval = Some(evaluate_logits(&backend.logits(&mnist.test)?, &mnist.test.labels)?);
    }
    let steps = last_step - start_step;
    // The loss of the last epoch, or of the last 50 steps when the run was shorter.
    let window: Vec<f32> = if run.recent.len() >= 50 {
        run.recent.iter().map(|s| s.loss).collect()
    } else {
        run.history.iter().filter(|r| r.kind == "train").rev().take(50).map(|r| r.loss as f32).collect()
    };
    let seconds = run.train_time.as_secs_f64();
    let sync = backend.sync_counts();
    let monitor = cfg.best_monitor();
    let best = last_record.best(monitor).filter(|_| validation.is_some());
    let best_step = best.and_then(|(_, step)| step);
    Ok(TrainReport {
        backend: backend.kind().to_string(),
        adapter: backend.adapter(),
        steps,
        epochs: steps as f64 / steps_per_epoch as f64,
        batch,
        train_loss: mean(&window),
        test_accuracy: run.last_eval.as_ref().map(|e| e.accuracy),
        test_loss: run.last_eval.as_ref().map(|e| e.loss),
        val_accuracy: run.last_val.as_ref().map(|e| e.accuracy),
        val_loss: run.last_val.as_ref().map(|e| e.loss),
        best_val_accuracy: last_record
            .best_accuracy
            .filter(|_| validation.is_some())
            .map(|(accuracy, _)| accuracy),
        best_val_loss: last_record.best_loss.filter(|_| validation.is_some()),
        best_val_step: best_step,
        monitor: validation.map(|_| monitor.name()),
        scored_weights: if run.restored_step.is_some() { "best" } else { "last" },
        scored_step: run.restored_step.unwrap_or(last_step),
        scored_note: run.restore_failed.clone(),
        best_val_file: best.and(last_best_file),
        best_val_written_now: best_step.is_some_and(|step| run.best_written == Some(step)),
        images_per_s: if seconds > 0.0 { steps as f64 * batch as f64 / seconds } else { 0.0 },
        train_seconds: seconds,
        submits: sync.submits,
        host_waits: sync.host_waits,
        stopped_early: run.stop.is_some(),
        stop_reason: run.stop,
        stopped_at: run.stopped_at,
        time_to_accuracy: run.reached,
        history: run.history,
    })
}

/// Copies the backend's state into `state`, with the run's clock, and saves it.
fn save_trained(backend: &mut dyn Backend, state: &mut TrainState, run: &Run, path: &Path) -> Result<()> {
    backend.store_state(state)?;
    state.clock = run.clock_now();
    state.epoch_sums = match state.step_in_epoch {
        0 => None,
        _ => run.epoch_before.map(|before| epoch_sums(before, &run.recent)),
    };
    save_checkpoint(path, state)?;
    Ok(())
}

/// What the loop accumulates for the report.
struct Run<'e> {
    /// The caller's callback.
    on_event: &'e mut dyn FnMut(&TrainEvent),
    /// The last epoch the run reaches, counted from 1 (the `L` of "epoch E/L").
    last_epoch: u64,
    history: Vec<MetricRow>,
    train_time: Duration,
    /// When this invocation started, and the run's seconds before it (a resumed log's clock).
    started: Instant,
    seconds_before: f64,
    /// The current epoch's steps (this invocation's).
    recent: Vec<StepStats>,
    /// The sums of the current epoch's steps before `recent` (a resumed run's first epoch), when
    /// known: `None` for a checkpoint from before they were kept.
    epoch_before: Option<EpochSums>,
    /// The last evaluation on the test set, and on the validation set.
    last_eval: Option<Evaluation>,
    last_val: Option<Evaluation>,
    last_saved: Option<u64>,
    stop: Option<StopReason>,
    stopped_at: Option<RunPoint>,
    reached: Option<TimeToAccuracy>,
    /// The step whose checkpoint this invocation last wrote to `--save-best`.
    best_written: Option<u64>,
    /// The best checkpoint (and its file) whose weights the backend holds for the final test
    /// evaluation, when the run ended on worse ones.
    restored: Option<(TrainState, PathBuf)>,
    /// The step of the restored best, once it has replaced the run's state.
    restored_step: Option<u64>,
    /// Why the best checkpoint's weights could not be scored, when they could not.
    restore_failed: Option<String>,
    /// The run's time before this invocation, when it is known (see [`RunClock`]).
    clock_base: Option<RunClock>,
    /// The step this invocation started from.
    start_step: u64,
}

impl Run<'_> {
    /// Wall-clock seconds since the run started.
    fn seconds(&self) -> f64 {
        self.seconds_before + self.started.elapsed().as_secs_f64()
    }

    /// The run's time so far, when it is measured.
    fn clock_now(&self) -> Option<RunClock> {
        self.clock_base.map(|base| RunClock {
            train_seconds: base.train_seconds + self.train_time.as_secs_f64(),
            run_seconds: base.run_seconds + self.started.elapsed().as_secs_f64(),
        })
    }

    /// The run's current point: `state`'s last step.
    fn point(&self, state: &TrainState) -> RunPoint {
        RunPoint { step: state.step, epoch: current_epoch(state), seconds: self.seconds() }
    }
}

/// The 1-based number of the epoch `state`'s last step belongs to, as the terminal and the
/// metrics number epochs (0 before any step).
fn current_epoch(state: &TrainState) -> u64 {
    if state.step_in_epoch == 0 {
        state.epoch
    } else {
        state.epoch + 1
    }
}

/// A chunk submitted and not yet finished: its steps' learning rates, in order, and the time
/// its submission took (all of a CPU chunk's work; a GPU's recording).
struct InFlight {
    lrs: Vec<f64>,
    submit_time: Duration,
}

/// The steps of a run, chunk by chunk (sized by [`ChunkSizer`]), with up to two chunks in flight
/// (one when a step is slow, see [`ChunkSizer::depth`]): the backend runs one
/// while the next is prepared and submitted (a GPU is never left waiting for the host). A chunk
/// never crosses the end of an epoch, of the run or a checkpoint, so nothing is in flight when
/// an evaluation or a save reads the state. After each chunk the step counters are updated at
/// once, so the backend's state and `state`'s counters agree whenever anything else can fail.
#[allow(clippy::too_many_arguments)]
fn run_steps(
    backend: &mut dyn Backend,
    state: &mut TrainState,
    mnist: &Mnist,
    validation: Option<&Dataset>,
    cfg: &TrainConfig,
    interrupt: &AtomicBool,
    run: &mut Run<'_>,
    metrics: &mut MetricsWriter,
    target_step: u64,
) -> Result<(), Failure> {
    let n = mnist.train.len();
    let batch = state.batch;
    let steps_per_epoch = (n / batch) as u64;
    let mut sizer = ChunkSizer::new(cfg.chunk_steps);
    // The schedule at the next step to submit (a resumed run continues it where it stopped).
    let mut schedule =
        ScheduleState::at_step(state.schedule, state.optimizer.lr, state.schedule_steps, state.step);
    // The current epoch's order, and its images and time so far (for the epoch's line).
    let mut epoch: Option<(Vec<u32>, usize, Duration)> = None;
    // The chunks submitted and not yet finished, and the steps submitted.
    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    let mut submitted = state.step;
    let mut clock = Instant::now();
    // When the last finished chunk's last step finished, on the run's clock.
    let mut last_row_seconds = run.seconds();
    loop {
        while in_flight.len() < sizer.depth() && run.stop.is_none() {
            if interrupt.load(Ordering::SeqCst) {
                run.stop = Some(StopReason::Signal);
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
            let mut k = sizer.next().min(steps_per_epoch - pos).min(target_step - submitted);
            if cfg.checkpoint_every > 0 {
                k = k.min(cfg.checkpoint_every - submitted % cfg.checkpoint_every);
            }
            let (order, _, _) = epoch.get_or_insert_with(|| {
                if state.step_in_epoch == 0 {
                    run.recent.clear();
                    run.epoch_before = Some(EpochSums::default());
                }
                (run.on_event)(&TrainEvent::EpochStarted {
                    epoch: state.epoch,
                    done: state.step_in_epoch,
                    before: run.epoch_before,
                });
                (epoch_order(n, state.seed, state.epoch, state.shuffle), 0, Duration::ZERO)
            });
            let first = pos as usize * batch;
            let count = k as usize * batch;
            let opt = state.optimizer;
            let mut lrs = Vec::with_capacity(k as usize);
            let mut steps = Vec::with_capacity(k as usize);
            for t in submitted + 1..=submitted + k {
                // The schedule's values for step t (0-based t - 1), then the scheduler's step().
                let hyper = schedule.current();
                schedule.advance();
                lrs.push(hyper.lr);
                steps.push(opt.step(t, hyper.lr, hyper.momentum));
            }
            let chunk_of = Chunk {
                batch,
                indices: order[first..first + count].to_vec(),
                shifts: shifts_for_positions(state.seed, state.epoch, first, count, state.augment_shift),
                steps,
            };
            let submit_started = Instant::now();
            backend
                .submit(&chunk_of)
                // A backend may report a fault of the chunks already in flight here: name them
                // all (from the last checked step).
                .map_err(|e| chunk_failed(e, state.step + 1, submitted + k, state.epoch + 1, cfg, run))?;
            in_flight.push_back(InFlight { lrs, submit_time: submit_started.elapsed() });
            submitted += k;
        }
        let Some(InFlight { lrs, submit_time }) = in_flight.pop_front() else { break };
        let k = lrs.len() as u64;
        let wait_started = Instant::now();
        let stats =
            backend
                .finish()
                .and_then(|s| s.ok_or_else(|| anyhow::anyhow!("a chunk went missing")))
                .map_err(|e| chunk_failed(e, state.step + 1, state.step + k, state.epoch + 1, cfg, run))?;
        // The backend's time on this chunk: its submission (a CPU computes there) and the wait
        // for its end (a GPU computes while the host prepares the next chunk).
        sizer.measured(k, submit_time + wait_started.elapsed());
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
        let rows_epoch = state.epoch + 1;
        let first_row_step = state.step + 1;
        state.step += k;
        state.step_in_epoch += k;
        let epoch_done = state.step_in_epoch == steps_per_epoch;
        if epoch_done {
            state.epoch += 1;
            state.step_in_epoch = 0;
        }
        // The chunk's steps ran one after another between the last chunk's end and now: each
        // row gets its share of that time.
        let chunk_end = run.seconds();
        let first_row = run.history.len();
        for (i, (s, lr)) in stats.iter().zip(&lrs).enumerate() {
            let share = (i + 1) as f64 / k as f64;
            let row = MetricRow {
                kind: "train",
                step: first_row_step + i as u64,
                epoch: rows_epoch,
                seconds: last_row_seconds + (chunk_end - last_row_seconds) * share,
                lr: Some(*lr),
                loss: s.loss as f64,
                accuracy: s.correct as f64 / batch as f64,
            };
            metrics.write(&row)?;
            run.history.push(row);
        }
        last_row_seconds = chunk_end;
        run.recent.extend_from_slice(&stats);
        let done = if epoch_done { steps_per_epoch } else { state.step_in_epoch };
        (run.on_event)(&TrainEvent::Steps {
            step: state.step,
            done,
            epoch_steps: &run.recent,
            images_per_s: *epoch_images as f64 / epoch_time.as_secs_f64(),
            rows: &run.history[first_row..],
        });
        let last = state.step >= target_step;
        let mut ending = last;
        if epoch_done || (last && in_flight.is_empty()) {
            let (_, images, time) = epoch.take().expect("the epoch was started above");
            let due = epoch_done && cfg.eval_every > 0 && state.epoch.is_multiple_of(cfg.eval_every);
            let mut line = epoch_summary(state, steps_per_epoch, run.last_epoch, run, images, time);
            if due || last {
                evaluate_due(backend, state, mnist, validation, cfg, run, metrics, &mut line, last)?;
            }
            ending = last || run.stop.is_some();
            // With a validation set, the test set is evaluated once, at the end.
            if let (true, Some(_), false) = (ending, validation, mnist.test.is_empty()) {
                // A run that finished or stopped early is scored on its best checkpoint's weights
                // (with --save-best); one stopped by a signal keeps its last, to resume from.
                if run.stop != Some(StopReason::Signal) {
                    restore_best(backend, state, cfg, run)?;
                }
                (run.on_event)(&TrainEvent::Phase(Some("evaluating on the test set")));
                let eval = evaluate_logits(&backend.logits(&mnist.test)?, &mnist.test.labels)?;
                (run.on_event)(&TrainEvent::Phase(None));
                // The row is the weights' own: at the restored best's step when it was restored.
                let scored = run.restored.as_ref().map_or(&*state, |(best, _)| best);
                let at = (scored.step, current_epoch(scored));
                log_evaluation(run, metrics, &mut line, "test", at, &eval)?;
                run.last_eval = Some(eval);
            }
            (run.on_event)(&TrainEvent::EpochEnded { line: &line });
            metrics.flush()?;
            last_row_seconds = run.seconds();
            // Evaluating is not training time.
            clock = Instant::now();
        }
        // Every row up to this step is logged (evaluation included) before the checkpoint that
        // says the run got here; the final step's checkpoint is the end-of-run save.
        let checkpoint_due = cfg.checkpoint_every > 0 && state.step.is_multiple_of(cfg.checkpoint_every);
        if let (true, false, Some(path)) = (checkpoint_due, ending, &cfg.save) {
            metrics.sync()?;
            (run.on_event)(&TrainEvent::Phase(Some("saving a checkpoint")));
            save_trained(backend, state, run, path)?;
            (run.on_event)(&TrainEvent::Phase(None));
            (run.on_event)(&TrainEvent::CheckpointSaved { path, step: state.step, best: false });
            run.last_saved = Some(state.step);
            clock = Instant::now();
            last_row_seconds = run.seconds();
        }
    }
    Ok(())
}

/// The evaluation due at an epoch's end or the run's: on the validation set when there is one
/// (which also keeps the best checkpoint and decides `--patience`), else on the test set; and
/// `--until` on either.
#[allow(clippy::too_many_arguments)]
fn evaluate_due(
    backend: &mut dyn Backend,
    state: &mut TrainState,
    mnist: &Mnist,
    validation: Option<&Dataset>,
    cfg: &TrainConfig,
    run: &mut Run<'_>,
    metrics: &mut MetricsWriter,
    line: &mut String,
    last: bool,
) -> Result<(), Failure> {
    let (kind, data) = match validation {
        Some(val) => ("val", val),
        // An empty test set is no evaluation at all (not an accuracy of 0).
        None if mnist.test.is_empty() => return Ok(()),
        None => ("test", &mnist.test),
    };
    (run.on_event)(&TrainEvent::Phase(Some(if kind == "val" {
        "evaluating on the validation set"
    } else {
        "evaluating on the test set"
    })));
    let eval = evaluate_logits(&backend.logits(data)?, &data.labels)?;
    (run.on_event)(&TrainEvent::Phase(None));
    log_evaluation(run, metrics, line, kind, (state.step, current_epoch(state)), &eval)?;
    if let Some(target) = cfg.until.filter(|&t| eval.accuracy >= t && run.reached.is_none()) {
        let point = run.point(state);
        let (seconds, train_seconds, counted_from_step) = match run.clock_now() {
            Some(clock) => (clock.run_seconds, clock.train_seconds, 0),
            None if run.start_step == 0 => (point.seconds, run.train_time.as_secs_f64(), 0),
            None => (run.started.elapsed().as_secs_f64(), run.train_time.as_secs_f64(), run.start_step),
        };
        run.reached = Some(TimeToAccuracy {
            target,
            accuracy: eval.accuracy,
            step: point.step,
            epoch: point.epoch,
            seconds,
            train_seconds,
            counted_from_step,
        });
        if !last {
            run.stop = Some(StopReason::Until);
            run.stopped_at = Some(point);
        }
    }
    if validation.is_none() {
        run.last_eval = Some(eval);
        return Ok(());
    }
    let improved = state.record.update(state.step, eval.loss, eval.accuracy, cfg.min_delta);
    let best = improved.on(cfg.best_monitor());
    run.last_val = Some(eval);
    if let (true, Some(path)) = (best, &cfg.save_best) {
        // The log holds this evaluation before the checkpoint that comes from it.
        metrics.sync()?;
        // The checkpoint names itself as the best's file, and so does every later one of the
        // run: a resumed run can say where its best is.
        let file = crate::files::canonical_target(path).ok().and_then(|p| p.to_str().map(str::to_string));
        let before = std::mem::replace(&mut state.best_file, file);
        (run.on_event)(&TrainEvent::Phase(Some("saving the best checkpoint")));
        let saved = save_trained(backend, state, run, path);
        (run.on_event)(&TrainEvent::Phase(None));
        if let Err(e) = saved {
            state.best_file = before;
            return Err(e.into());
        }
        (run.on_event)(&TrainEvent::CheckpointSaved { path, step: state.step, best: true });
        run.best_written = Some(state.step);
    } else if best {
        // A new best that no file holds: the file an earlier invocation wrote holds an older one.
        state.best_file = None;
    }
    let patience_out =
        cfg.patience.is_some_and(|p| state.record.evals_since_best(cfg.patience_monitor()) >= p);
    if patience_out && !last && run.stop.is_none() {
        run.stop = Some(StopReason::Patience);
        run.stopped_at = Some(run.point(state));
    }
    Ok(())
}

/// With `--save-best`, when the run's last weights are not its best: loads the best checkpoint
/// (written by this invocation, or by an earlier one of the run) into the backend and keeps it
/// in `run.restored`. A best that cannot be read back leaves the last weights in place and says
/// why in `run.restore_failed`.
fn restore_best(
    backend: &mut dyn Backend,
    state: &TrainState,
    cfg: &TrainConfig,
    run: &mut Run<'_>,
) -> Result<()> {
    let Some(given) = &cfg.save_best else { return Ok(()) };
    let Some((_, best_step)) = state.record.best(cfg.best_monitor()) else { return Ok(()) };
    if best_step == Some(state.step) {
        return Ok(());
    }
    let file = match (best_step, &state.best_file) {
        (Some(step), _) if run.best_written == Some(step) => given.clone(),
        (Some(_), Some(earlier)) => PathBuf::from(earlier),
        _ => {
            run.restore_failed = Some("no file holds the best checkpoint".into());
            return Ok(());
        }
    };
    let loaded = crate::checkpoint::load_checkpoint(&file)
        .map_err(anyhow::Error::from)
        .and_then(|c| c.into_train_state().ok_or_else(|| anyhow::anyhow!("it holds weights only")));
    match loaded {
        Ok(best) if Some(best.step) == best_step => {
            backend.load_state(&best)?;
            run.restored = Some((best, file));
        }
        Ok(other) => {
            run.restore_failed = Some(format!(
                "{} holds step {}, not the best's (step {})",
                file.display(),
                other.step,
                best_step.unwrap_or_default()
            ))
        }
        Err(e) => run.restore_failed = Some(format!("{}: {}", file.display(), error_line(&e))),
    }
    Ok(())
}

/// An evaluation's row in the log and the history, and its part of the epoch's line.
fn log_evaluation(
    run: &mut Run<'_>,
    metrics: &mut MetricsWriter,
    line: &mut String,
    kind: &'static str,
    (step, epoch): (u64, u64),
    eval: &Evaluation,
) -> Result<()> {
    // The evaluations go on a line of their own under the epoch's, so each fits 80 columns
    // (validation and test together take 75).
    let separator = if line.contains('\n') { "  " } else { "\n    " };
    line.push_str(&format!(
        "{separator}{kind} loss {:.4}  {kind} acc {:.2}%",
        eval.loss,
        100.0 * eval.accuracy
    ));
    let row = MetricRow {
        kind,
        step,
        epoch,
        seconds: run.seconds(),
        lr: None,
        loss: eval.loss,
        accuracy: eval.accuracy,
    };
    metrics.write(&row)?;
    (run.on_event)(&TrainEvent::Evaluated { row: &row, evaluation: eval });
    run.history.push(row);
    Ok(())
}

/// A chunk whose steps failed: its state is not trusted, so nothing is saved. A state no run can
/// reach (a non-finite value, a negative second moment) is a divergence, named by its tensor.
fn chunk_failed(
    e: anyhow::Error,
    first: u64,
    last: u64,
    epoch: u64,
    cfg: &TrainConfig,
    run: &Run,
) -> Failure {
    let kept = kept_checkpoint(cfg, run.last_saved);
    if let Some(fault) = e.downcast_ref::<StateFault>() {
        return Failure::Untrusted(
            TrainError::StateDiverged { first, last, epoch, fault: fault.clone(), kept }.into(),
        );
    }
    Failure::Untrusted(e.context(format!("training steps {first}..{last} failed; {kept}")))
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
    run: &Run,
    images: usize,
    time: Duration,
) -> String {
    let epoch = if state.step_in_epoch == 0 { state.epoch } else { state.epoch + 1 };
    let done = if state.step_in_epoch == 0 { steps_per_epoch } else { state.step_in_epoch };
    let ours = run.recent.len() as u64;
    // The means cover the whole epoch so far; where a resumed run's checkpoint did not carry the
    // sums of the steps before it, they cover this invocation's steps only, and say which.
    let (steps, loss, accuracy) = match run.epoch_before {
        Some(before) => {
            let (loss, accuracy) = epoch_means_after(done - ours, before, &run.recent, state.batch);
            (format!("{done}/{steps_per_epoch} steps"), loss, accuracy)
        }
        None => {
            let (loss, accuracy) = epoch_means(&run.recent, state.batch);
            (format!("steps {}-{done} of {steps_per_epoch}", done - ours + 1), loss, accuracy)
        }
    };
    format!(
        "epoch {epoch}/{} ({steps})  loss {loss:.4}  train acc {:.2}%  {:.0} img/s",
        last_epoch.max(epoch),
        100.0 * accuracy,
        images as f64 / time.as_secs_f64().max(1e-9),
    )
}

/// Mean loss and accuracy over `steps` of `batch` images each: the bar's running figures and
/// the epoch line's, so that the two agree. NaN for no steps.
pub fn epoch_means(steps: &[StepStats], batch: usize) -> (f64, f64) {
    epoch_means_after(0, EpochSums::default(), steps, batch)
}

/// [`epoch_means`] of an epoch whose first `before_steps` steps summed to `before` (a resumed
/// run's): the same additions in the same order as over all the epoch's steps at once, so the
/// figures are the same bits as an uninterrupted run's.
pub fn epoch_means_after(
    before_steps: u64,
    before: EpochSums,
    steps: &[StepStats],
    batch: usize,
) -> (f64, f64) {
    let sums = epoch_sums(before, steps);
    let count = before_steps + steps.len() as u64;
    if count == 0 {
        return (f64::NAN, f64::NAN);
    }
    (sums.loss_sum / count as f64, sums.correct as f64 / (count * batch as u64) as f64)
}

/// `before` with `steps` added, in order.
pub fn epoch_sums(before: EpochSums, steps: &[StepStats]) -> EpochSums {
    EpochSums {
        loss_sum: steps.iter().fold(before.loss_sum, |sum, s| sum + s.loss as f64),
        correct: before.correct + steps.iter().map(|s| s.correct as u64).sum::<u64>(),
    }
}

/// The epoch, counted from 1, in which a run from `state` to `target_step` takes its last step.
pub fn last_epoch(state: &TrainState, steps_per_epoch: u64, target_step: u64) -> u64 {
    let remaining = target_step.saturating_sub(state.step);
    let left_in_epoch = steps_per_epoch.saturating_sub(state.step_in_epoch);
    if remaining <= left_in_epoch || steps_per_epoch == 0 {
        state.epoch + 1
    } else {
        (state.epoch + 1).saturating_add((remaining - left_in_epoch).div_ceil(steps_per_epoch))
    }
}
