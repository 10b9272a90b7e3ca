//! The training loop both backends share: batching, metrics, progress, checkpoints.

use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::backend::{Backend, Chunk, StepStats};
use crate::checkpoint::save_checkpoint;
use crate::data::Mnist;
use crate::model::{epoch_order, TrainState, CLASSES};

/// Accuracy, mean loss and confusion matrix of a set of logits against labels.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Evaluation {
    pub accuracy: f64,
    pub loss: f64,
    pub correct: usize,
    pub count: usize,
    /// confusion[label][predicted]
    pub confusion: Vec<Vec<u32>>,
}

/// Scores logits [N, 10] against labels: prediction is the first largest logit.
pub fn evaluate_logits(logits: &[f32], labels: &[u8]) -> Evaluation {
    assert_eq!(logits.len(), labels.len() * CLASSES);
    let mut confusion = vec![vec![0u32; CLASSES]; CLASSES];
    let mut loss = 0.0f64;
    for (row, &label) in logits.chunks_exact(CLASSES).zip(labels) {
        let predicted = argmax(row);
        confusion[label as usize][predicted] += 1;
        let max = row[predicted] as f64;
        let sum: f64 = row.iter().map(|&z| (z as f64 - max).exp()).sum();
        loss += sum.ln() - (row[label as usize] as f64 - max);
    }
    let correct = (0..CLASSES).map(|c| confusion[c][c] as usize).sum();
    let count = labels.len().max(1);
    Evaluation {
        accuracy: correct as f64 / count as f64,
        loss: loss / count as f64,
        correct,
        count: labels.len(),
        confusion,
    }
}

/// Index of the first largest value.
pub use crate::cpu::reference::first_argmax as argmax;

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

/// One logged point of a run, for `--metrics` and `--plot`.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct MetricRow {
    /// "train" (one optimiser step) or "test" (an evaluation).
    pub kind: &'static str,
    pub step: u64,
    pub epoch: u64,
    pub loss: f64,
    pub accuracy: f64,
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
    pub test_accuracy: f64,
    pub test_loss: f64,
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
}

/// Steps per backend call: enough for a live progress bar (about ten updates an epoch),
/// few enough host waits for a GPU.
fn chunk_steps(steps_per_epoch: u64) -> u64 {
    (steps_per_epoch / 10).clamp(1, 64)
}

/// Trains `state` on `mnist.train` with `backend`, evaluating on `mnist.test`. Stops at the
/// end of the configured epochs/steps or, between chunks, when `interrupt` is set.
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
    let steps_per_epoch = (n / batch) as u64;
    let start_step = state.step;
    // A resumed run's unfinished epoch counts as the first of its `epochs`.
    let target_step = start_step
        + match cfg.steps {
            Some(s) => s,
            None => (cfg.epochs * steps_per_epoch).saturating_sub(state.step_in_epoch),
        };
    if state.step_in_epoch >= steps_per_epoch {
        bail!(
            "the checkpoint is at step {} of an epoch, but --batch {batch} gives {steps_per_epoch} steps an epoch",
            state.step_in_epoch
        );
    }
    backend.load_state(state)?;
    // A resumed run continues the log it started, so the file covers the whole run.
    let mut metrics = MetricsWriter::create(cfg.metrics.as_ref(), start_step > 0)?;
    let mut progress = Progress::new(cfg.plain_progress, steps_per_epoch, batch);
    let mut history = Vec::new();
    let mut train_time = Duration::ZERO;
    let mut recent: Vec<StepStats> = Vec::new();
    let mut last_eval: Option<Evaluation> = None;
    let mut last_saved: Option<u64> = None;
    let mut stopped_early = false;
    let chunk = chunk_steps(steps_per_epoch);

    while state.step < target_step {
        if state.step_in_epoch == 0 {
            recent.clear();
        }
        let order = epoch_order(n, state.seed, state.epoch, state.shuffle);
        progress.start_epoch(state.epoch, state.step_in_epoch);
        let mut epoch_time = Duration::ZERO;
        let mut epoch_images = 0usize;
        // Up to two chunks in flight: the backend runs one while the next is prepared. A chunk
        // never crosses the end of the epoch, the run or a checkpoint.
        let mut in_flight: VecDeque<u64> = VecDeque::new();
        let mut submitted = state.step_in_epoch;
        let mut t0 = Instant::now();
        while state.step_in_epoch < steps_per_epoch && state.step < target_step {
            if interrupt.load(Ordering::SeqCst) {
                stopped_early = true;
            }
            while in_flight.len() < 2 && !stopped_early {
                let at = state.step + in_flight.iter().sum::<u64>();
                let mut k = chunk.min(steps_per_epoch - submitted).min(target_step - at);
                if cfg.checkpoint_every > 0 {
                    k = k.min(cfg.checkpoint_every - at % cfg.checkpoint_every);
                }
                if k == 0 {
                    break;
                }
                let first = submitted as usize * batch;
                let indices = order[first..first + k as usize * batch].to_vec();
                let shifts = vec![0; 2 * indices.len()];
                let steps =
                    (at + 1..=at + k).map(|t| state.optimizer.step(t, state.optimizer.lr, None)).collect();
                backend.submit(&Chunk { batch, indices, shifts, steps })?;
                in_flight.push_back(k);
                submitted += k;
                if cfg.checkpoint_every > 0 && (at + k).is_multiple_of(cfg.checkpoint_every) {
                    break;
                }
            }
            let Some(k) = in_flight.pop_front() else { break };
            let stats: Vec<StepStats> = backend.finish()?.expect("a chunk was submitted");
            epoch_images += k as usize * batch;
            if let Some((i, bad)) = stats.iter().enumerate().find(|(_, s)| !s.loss.is_finite()) {
                let kept = match (&cfg.save, last_saved) {
                    (Some(p), Some(s)) => {
                        format!("the last good checkpoint ({}, step {s}) is kept", p.display())
                    }
                    (Some(p), None) => format!("nothing was saved and {} is untouched", p.display()),
                    (None, _) => "nothing was saved".to_string(),
                };
                progress.finish();
                return Err(TrainError::Diverged {
                    step: state.step + 1 + i as u64,
                    epoch: state.epoch + 1,
                    value: bad.loss,
                    kept,
                }
                .into());
            }
            for s in &stats {
                state.step += 1;
                let row = MetricRow {
                    kind: "train",
                    step: state.step,
                    epoch: state.epoch,
                    loss: s.loss as f64,
                    accuracy: s.correct as f64 / batch as f64,
                };
                metrics.write(&row)?;
                history.push(row);
            }
            state.step_in_epoch += k;
            recent.extend_from_slice(&stats);
            let now = Instant::now();
            epoch_time += now - t0;
            t0 = now;
            progress.update(state.step_in_epoch, &recent, epoch_images as f64 / epoch_time.as_secs_f64());
            if cfg.checkpoint_every > 0 && state.step.is_multiple_of(cfg.checkpoint_every) {
                if let Some(path) = &cfg.save {
                    backend.store_state(state)?;
                    save_checkpoint(path, state)?;
                    last_saved = Some(state.step);
                }
                // Saving is not training time.
                t0 = Instant::now();
            }
        }
        train_time += epoch_time;
        if stopped_early {
            break;
        }
        let epoch_done = state.step_in_epoch == steps_per_epoch;
        if epoch_done {
            state.epoch += 1;
            state.step_in_epoch = 0;
        }
        let last = state.step >= target_step;
        let due = epoch_done && cfg.eval_every > 0 && state.epoch.is_multiple_of(cfg.eval_every);
        let mut line = epoch_summary(state, steps_per_epoch, &recent, epoch_images, epoch_time);
        if due || last {
            let eval = evaluate_logits(&backend.logits(&mnist.test)?, &mnist.test.labels);
            line.push_str(&format!("  test loss {:.4}  test acc {:.2}%", eval.loss, 100.0 * eval.accuracy));
            let row = MetricRow {
                kind: "test",
                step: state.step,
                epoch: state.epoch,
                loss: eval.loss,
                accuracy: eval.accuracy,
            };
            metrics.write(&row)?;
            history.push(row);
            last_eval = Some(eval);
        }
        progress.end_epoch(&line);
        metrics.flush()?;
    }
    progress.finish();

    if stopped_early && last_eval.is_none() {
        last_eval = Some(evaluate_logits(&backend.logits(&mnist.test)?, &mnist.test.labels));
    }
    backend.store_state(state)?;
    if let Some(path) = &cfg.save {
        save_checkpoint(path, state)?;
    }
    let steps = state.step - start_step;
    // The loss of the last epoch, or of the last 50 steps when the run was shorter.
    let window: Vec<f32> = if recent.len() >= 50 {
        recent.iter().map(|s| s.loss).collect()
    } else {
        history.iter().filter(|r| r.kind == "train").rev().take(50).map(|r| r.loss as f32).collect()
    };
    let eval = last_eval.unwrap_or_else(|| evaluate_logits(&[], &[]));
    let seconds = train_time.as_secs_f64();
    let sync = backend.sync_counts();
    Ok(TrainReport {
        backend: backend.kind().to_string(),
        adapter: backend.adapter(),
        steps,
        epochs: steps as f64 / steps_per_epoch as f64,
        batch,
        train_loss: mean(&window),
        test_accuracy: eval.accuracy,
        test_loss: eval.loss,
        images_per_s: if seconds > 0.0 { (steps as usize * batch) as f64 / seconds } else { 0.0 },
        train_seconds: seconds,
        submits: sync.submits,
        host_waits: sync.host_waits,
        stopped_early,
        history,
    })
}

fn mean(xs: &[f32]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.iter().map(|&x| x as f64).sum::<f64>() / xs.len() as f64
}

fn epoch_summary(
    state: &TrainState,
    steps_per_epoch: u64,
    recent: &[StepStats],
    images: usize,
    time: Duration,
) -> String {
    let epoch = if state.step_in_epoch == 0 { state.epoch } else { state.epoch + 1 };
    let loss = mean(&recent.iter().map(|s| s.loss).collect::<Vec<_>>());
    let correct: u64 = recent.iter().map(|s| s.correct as u64).sum();
    let seen = (recent.len() * state.batch).max(1);
    let done = if state.step_in_epoch == 0 { steps_per_epoch } else { state.step_in_epoch };
    format!(
        "epoch {epoch} ({done}/{steps_per_epoch} steps)  loss {loss:.4}  train acc {:.2}%  {:.0} img/s",
        100.0 * correct as f64 / seen as f64,
        images as f64 / time.as_secs_f64().max(1e-9),
    )
}

/// A live bar on a terminal; plain lines, one per epoch, anywhere else.
struct Progress {
    bar: Option<ProgressBar>,
    steps_per_epoch: u64,
    batch: usize,
}

impl Progress {
    fn new(plain: bool, steps_per_epoch: u64, batch: usize) -> Self {
        // The bar only when a person watches both streams; with either redirected (CI, a pipe,
        // a log file) one plain line per epoch.
        let live = !plain && std::io::stderr().is_terminal() && std::io::stdout().is_terminal();
        let bar = live.then(|| {
            let bar = ProgressBar::new(steps_per_epoch);
            bar.set_style(
                ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}")
                    .expect("progress template is valid")
                    .progress_chars("=> "),
            );
            bar
        });
        Progress { bar, steps_per_epoch, batch }
    }

    fn start_epoch(&mut self, epoch: u64, done: u64) {
        if let Some(bar) = &self.bar {
            bar.reset();
            bar.set_length(self.steps_per_epoch);
            bar.set_position(done);
            bar.set_prefix(format!("epoch {}", epoch + 1));
        }
    }

    fn update(&mut self, done: u64, recent: &[StepStats], images_per_s: f64) {
        if let Some(bar) = &self.bar {
            let tail = &recent[recent.len().saturating_sub(20)..];
            let loss = mean(&tail.iter().map(|s| s.loss).collect::<Vec<_>>());
            let acc = tail.iter().map(|s| s.correct as f64).sum::<f64>() / (tail.len() * self.batch) as f64;
            bar.set_position(done);
            bar.set_message(format!("loss {loss:.4} acc {:.1}% {images_per_s:.0} img/s", 100.0 * acc));
        }
    }

    fn end_epoch(&mut self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// `--metrics FILE`: CSV, one row per step and per evaluation, flushed every epoch so that a
/// crash keeps what was logged. Appends when continuing a run into an existing file.
struct MetricsWriter {
    out: Option<(PathBuf, std::io::BufWriter<std::fs::File>)>,
}

impl MetricsWriter {
    fn create(path: Option<&PathBuf>, append: bool) -> Result<Self> {
        let out = match path {
            None => None,
            Some(p) => {
                let append = append && p.is_file();
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .append(append)
                    .truncate(!append)
                    .open(p)
                    .with_context(|| format!("{}: cannot create", p.display()))?;
                let mut w = std::io::BufWriter::new(file);
                if !append {
                    writeln!(w, "kind,step,epoch,loss,accuracy")?;
                }
                Some((p.clone(), w))
            }
        };
        Ok(MetricsWriter { out })
    }

    fn write(&mut self, r: &MetricRow) -> Result<()> {
        if let Some((p, w)) = &mut self.out {
            writeln!(w, "{},{},{},{:.6},{:.6}", r.kind, r.step, r.epoch, r.loss, r.accuracy)
                .with_context(|| format!("{}: cannot write", p.display()))?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if let Some((p, w)) = &mut self.out {
            w.flush().with_context(|| format!("{}: cannot write", p.display()))?;
        }
        Ok(())
    }
}
