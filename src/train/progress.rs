//! Progress on stderr: a live bar when stderr is a terminal, one plain line an epoch otherwise.
//!
//! The bar, as Keras and Lightning users know it, within [`LINE_WIDTH`] columns:
//!
//! ```text
//! epoch 3/10 [=====>     ] 120/234 loss 0.1235 acc 97.1%  25k img/s 0:07 eta 0:17
//! ```
//!
//! `epoch E/L` counts epochs from 1, as the epoch lines and the `--metrics` file do, up to the
//! last epoch this run reaches. `loss` and `acc` are the means over the epoch's steps so far, so
//! the bar's last figures are the epoch line's `loss` and `train acc` ([`epoch_means`] computes
//! both). The two times are the run's: wall time since it started, and the time left to its
//! last step at the pace so far (evaluations included).

use std::io::Write;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::backend::StepStats;
use crate::model::TrainState;

/// The widest the bar's line gets: 80 columns with the cursor's column to spare (a line that
/// fills the last column wraps on some terminals, and the redrawn bar would then scroll).
pub const LINE_WIDTH: usize = 79;

/// Whether to draw the live bar: when stderr, where it is drawn, is a terminal, whatever stdout
/// is (`lenet train --json | jq` keeps the bar), unless plain lines were asked for.
pub fn live_bar(plain: bool, stderr_is_terminal: bool) -> bool {
    !plain && stderr_is_terminal
}

/// Whether stderr is a terminal the bar can be drawn on: the bar library's own test (a
/// terminal, and on unix a `TERM` other than `dumb`), so that a bar chosen is a bar drawn. A
/// hidden bar would also swallow the epoch lines printed through it.
fn stderr_is_terminal() -> bool {
    !ProgressDrawTarget::stderr().is_hidden()
}

/// Mean loss and accuracy over `steps` of `batch` images each: the bar's running figures and
/// the epoch line's, so that the two agree. NaN for no steps.
pub fn epoch_means(steps: &[StepStats], batch: usize) -> (f64, f64) {
    if steps.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let loss = steps.iter().map(|s| s.loss as f64).sum::<f64>() / steps.len() as f64;
    let correct: u64 = steps.iter().map(|s| s.correct as u64).sum();
    (loss, correct as f64 / (steps.len() * batch) as f64)
}

/// What the bar shows at one moment.
#[derive(Clone, Debug, PartialEq)]
pub struct BarFigures {
    /// The current epoch, from 1.
    pub epoch: u64,
    /// The last epoch this run reaches.
    pub last_epoch: u64,
    /// Steps done of this epoch, of `steps_per_epoch`.
    pub done: u64,
    pub steps_per_epoch: u64,
    /// The epoch's mean loss and accuracy so far (`None` before its first step).
    pub loss: Option<f64>,
    pub accuracy: Option<f64>,
    pub images_per_s: Option<f64>,
    /// Wall time since the run started.
    pub elapsed: Duration,
    /// Time left to the run's last step (`None` before the first step).
    pub eta: Option<Duration>,
}

/// The bar's line: never wider than [`LINE_WIDTH`]. Fields have fixed widths for a given run,
/// so the line does not jitter as the numbers change; the bar takes what is left (up to 30).
pub fn bar_line(f: &BarFigures) -> String {
    let steps_width = f.steps_per_epoch.to_string().len();
    let prefix = format!("epoch {}/{}", f.epoch, f.last_epoch);
    let rest = format!(
        "{:>steps_width$}/{} loss {:>6} acc {:>5} {:>4} img/s {} eta {}",
        f.done,
        f.steps_per_epoch,
        f.loss.map_or("-".into(), format_loss),
        f.accuracy.map_or("-".into(), |a| format!("{:.1}%", 100.0 * a)),
        f.images_per_s.map_or("-".into(), format_rate),
        format_duration(f.elapsed),
        // As wide as the first real figure, "0:17", so that the bar keeps its width.
        f.eta.map_or("-:--".into(), format_duration),
    );
    // "PREFIX [BAR] REST": the brackets and spaces take 4 columns.
    let room = LINE_WIDTH.saturating_sub(prefix.len() + rest.len() + 4);
    let mut line = if room >= 5 {
        let width = room.min(30);
        let filled = if f.steps_per_epoch == 0 {
            0
        } else {
            (width as u128 * f.done.min(f.steps_per_epoch) as u128 / f.steps_per_epoch as u128) as usize
        };
        let head = if filled < width { ">" } else { "" };
        let bar = format!("{}{head}", "=".repeat(filled));
        format!("{prefix} [{bar:<width$}] {rest}")
    } else {
        // Only with absurd numbers (epochs or steps of many digits): no bar, and cut to fit.
        format!("{prefix} {rest}")
    };
    line.truncate(LINE_WIDTH);
    line
}

/// A loss in at most 7 columns: 4 decimals while below 100, else 3 significant digits.
fn format_loss(loss: f64) -> String {
    if loss.is_finite() && loss.abs() < 100.0 {
        format!("{loss:.4}")
    } else {
        format!("{loss:.2e}")
    }
}

/// Images per second in at most 4 columns: 850, 9.9k, 25k, 1.2M.
fn format_rate(r: f64) -> String {
    match r {
        r if !r.is_finite() || r < 0.0 => "-".into(),
        r if r < 999.5 => format!("{r:.0}"),
        r if r < 9_950.0 => format!("{:.1}k", r / 1e3),
        r if r < 999_500.0 => format!("{:.0}k", r / 1e3),
        r if r < 9_950_000.0 => format!("{:.1}M", r / 1e6),
        r if r < 999_500_000.0 => format!("{:.0}M", r / 1e6),
        _ => ">1G".into(),
    }
}

/// M:SS below an hour, H:MM:SS below 100 hours, then ">99h": at most 8 columns.
fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s < 3600 => format!("{}:{:02}", s / 60, s % 60),
        s if s < 100 * 3600 => format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60),
        _ => ">99h".into(),
    }
}

/// A live bar on a terminal; plain lines, one per epoch, anywhere else.
pub(crate) struct Progress {
    bar: Option<ProgressBar>,
    steps_per_epoch: u64,
    batch: usize,
    /// The run's first, last and current step, and when it started: the ETA's inputs.
    start_step: u64,
    step: u64,
    target_step: u64,
    started: Instant,
    last_epoch: u64,
    /// The current epoch, from 1.
    epoch: u64,
}

impl Progress {
    /// Progress of a run from `state` to `target_step`.
    pub(crate) fn new(
        plain: bool,
        steps_per_epoch: u64,
        batch: usize,
        state: &TrainState,
        target_step: u64,
    ) -> Self {
        let bar = live_bar(plain, stderr_is_terminal()).then(|| {
            let bar = ProgressBar::new(steps_per_epoch).with_finish(indicatif::ProgressFinish::AndClear);
            bar.set_style(ProgressStyle::with_template("{msg}").expect("progress template is valid"));
            bar
        });
        Progress {
            bar,
            steps_per_epoch,
            batch,
            start_step: state.step,
            step: state.step,
            target_step,
            started: Instant::now(),
            last_epoch: last_epoch(state, steps_per_epoch, target_step),
            epoch: state.epoch + 1,
        }
    }

    /// The last epoch the run reaches, counted from 1 (the `L` of "epoch E/L").
    pub(crate) fn last_epoch(&self) -> u64 {
        self.last_epoch
    }

    pub(crate) fn start_epoch(&mut self, epoch: u64, done: u64) {
        self.epoch = epoch + 1;
        if let Some(bar) = &self.bar {
            // The whole line is the message ([`bar_line`]): one redraw per update.
            bar.set_message(bar_line(&self.figures(done, &[], None, self.eta())));
        }
    }

    /// After a chunk: `step` is the run's step counter, `done` the steps of this epoch,
    /// `epoch_steps` this epoch's steps so far.
    pub(crate) fn update(&mut self, step: u64, done: u64, epoch_steps: &[StepStats], images_per_s: f64) {
        self.step = step;
        if let Some(bar) = &self.bar {
            let eta = self.eta();
            bar.set_message(bar_line(&self.figures(done, epoch_steps, Some(images_per_s), eta)));
        }
    }

    /// The time left to the run's last step at the pace so far; `None` before the first step.
    fn eta(&self) -> Option<Duration> {
        let done = self.step.checked_sub(self.start_step).filter(|&d| d > 0)?;
        let per_step = self.started.elapsed().as_secs_f64() / done as f64;
        // A run of 2^64-1 steps has an ETA past what a Duration holds: shown as ">99h", never a
        // panic.
        let left = per_step * self.target_step.saturating_sub(self.step) as f64;
        Some(Duration::try_from_secs_f64(left).unwrap_or(Duration::MAX))
    }

    fn figures(
        &self,
        done: u64,
        epoch_steps: &[StepStats],
        images_per_s: Option<f64>,
        eta: Option<Duration>,
    ) -> BarFigures {
        let (loss, accuracy) = epoch_means(epoch_steps, self.batch);
        BarFigures {
            epoch: self.epoch,
            last_epoch: self.last_epoch.max(self.epoch),
            done,
            steps_per_epoch: self.steps_per_epoch,
            loss: (!epoch_steps.is_empty()).then_some(loss),
            accuracy: (!epoch_steps.is_empty()).then_some(accuracy),
            images_per_s: images_per_s.filter(|r| r.is_finite()),
            elapsed: self.started.elapsed(),
            eta,
        }
    }

    pub(crate) fn end_epoch(&mut self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            // A terminal that is gone (SIGHUP) must not end the run before it saves.
            None => {
                let _ = writeln!(std::io::stderr(), "{line}");
            }
        }
    }

    pub(crate) fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// The epoch, counted from 1, in which a run from `state` to `target_step` takes its last step.
fn last_epoch(state: &TrainState, steps_per_epoch: u64, target_step: u64) -> u64 {
    let remaining = target_step.saturating_sub(state.step);
    let left_in_epoch = steps_per_epoch.saturating_sub(state.step_in_epoch);
    if remaining <= left_in_epoch || steps_per_epoch == 0 {
        state.epoch + 1
    } else {
        (state.epoch + 1).saturating_add((remaining - left_in_epoch).div_ceil(steps_per_epoch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_is_decided_by_stderr_alone() {
        // stdout plays no part: `lenet train --json | jq` on a terminal keeps its bar.
        assert!(live_bar(false, true));
        assert!(!live_bar(false, false));
        assert!(!live_bar(true, true));
        assert!(!live_bar(true, false));
    }

    fn figures(epoch: u64, last: u64, done: u64, steps: u64) -> BarFigures {
        BarFigures {
            epoch,
            last_epoch: last,
            done,
            steps_per_epoch: steps,
            loss: Some(0.123456),
            accuracy: Some(0.97123),
            images_per_s: Some(25_312.0),
            elapsed: Duration::from_secs(7),
            eta: Some(Duration::from_secs(17)),
        }
    }

    #[test]
    fn a_typical_line_reads_like_keras_and_fits_80_columns() {
        let line = bar_line(&figures(3, 10, 120, 234));
        assert_eq!(line, "epoch 3/10 [=====>     ] 120/234 loss 0.1235 acc 97.1%  25k img/s 0:07 eta 0:17");
        assert!(line.starts_with("epoch 3/10 [====="), "{line}");
        assert!(line.ends_with("120/234 loss 0.1235 acc 97.1%  25k img/s 0:07 eta 0:17"), "{line}");
        assert!(line.len() <= LINE_WIDTH, "{} columns: {line}", line.len());
        // Room for a bar of a useful length on the default run.
        let bar = &line[line.find('[').unwrap()..=line.find(']').unwrap()];
        assert!(bar.len() >= 12, "{bar}");
    }

    #[test]
    fn no_line_is_wider_than_80_columns_whatever_the_numbers() {
        let extremes = [
            (1, 1, 0, 1),
            (1, 1, 1, 1),
            (10, 10, 234, 234),
            (100, 100, 60_000, 60_000),
            (99_999, 100_000, 59_999, 60_000),
            (u64::MAX - 1, u64::MAX, u64::MAX / 3, u64::MAX),
        ];
        let slow = [
            (Some(f64::NAN), Some(0.0), Some(0.0), Duration::ZERO, None),
            (Some(1e300), Some(1.0), Some(1e12), Duration::from_secs(500 * 3600), Some(Duration::MAX)),
            (
                Some(-3.5),
                Some(0.5),
                Some(f64::INFINITY),
                Duration::from_secs(99 * 3600),
                Some(Duration::ZERO),
            ),
            (None, None, None, Duration::from_secs(3599), None),
        ];
        for &(epoch, last, done, steps) in &extremes {
            for (loss, accuracy, images_per_s, elapsed, eta) in slow {
                let f = BarFigures {
                    epoch,
                    last_epoch: last,
                    done,
                    steps_per_epoch: steps,
                    loss,
                    accuracy,
                    images_per_s,
                    elapsed,
                    eta,
                };
                let line = bar_line(&f);
                assert!(line.chars().count() <= LINE_WIDTH, "{} columns: {line}", line.chars().count());
                assert!(line.starts_with(&format!("epoch {epoch}/")), "{line}");
            }
        }
        // With ordinary numbers the line has the same width from the first step to the last,
        // so the bar does not jitter.
        let widths: Vec<usize> = (0..=234).map(|d| bar_line(&figures(1, 10, d, 234)).len()).collect();
        assert!(widths.iter().all(|&w| w == widths[0]), "{widths:?}");
    }

    #[test]
    fn the_bar_fills_with_the_epoch() {
        let empty = bar_line(&figures(1, 1, 0, 200));
        let full = bar_line(&figures(1, 1, 200, 200));
        assert!(empty.contains("[>  "), "{empty}");
        assert!(full.contains("==]"), "{full}");
    }

    #[test]
    fn the_bars_figures_at_an_epochs_end_are_the_epoch_lines() {
        let steps = [
            StepStats { loss: 2.0, correct: 10 },
            StepStats { loss: 1.0, correct: 20 },
            StepStats { loss: 0.5, correct: 31 },
        ];
        let (loss, acc) = epoch_means(&steps, 32);
        assert_eq!(loss, 3.5 / 3.0);
        assert_eq!(acc, 61.0 / 96.0);
        assert!(epoch_means(&[], 32).0.is_nan());
    }

    #[test]
    fn times_and_rates_stay_short() {
        assert_eq!(format_duration(Duration::from_secs(0)), "0:00");
        assert_eq!(format_duration(Duration::from_secs(75)), "1:15");
        assert_eq!(format_duration(Duration::from_secs(3600 + 62)), "1:01:02");
        assert_eq!(format_duration(Duration::from_secs(400 * 3600)), ">99h");
        assert_eq!(format_rate(850.2), "850");
        assert_eq!(format_rate(9_949.0), "9.9k");
        assert_eq!(format_rate(25_312.0), "25k");
        assert_eq!(format_rate(1_234_567.0), "1.2M");
        assert_eq!(format_loss(0.123456), "0.1235");
        assert_eq!(format_loss(1234.5), "1.23e3");
    }

    #[test]
    fn a_run_of_2_64_steps_has_an_eta_not_a_panic() {
        // --steps 18446744073709551615 on a terminal: after one step of a second, the time left
        // is past what a Duration holds.
        let mut state = TrainState::new(crate::model::Params::init(0), Default::default(), 0, 32, true);
        let mut progress = Progress::new(true, 100, 32, &state, u64::MAX);
        progress.started = Instant::now() - Duration::from_secs(1);
        progress.step = 1;
        assert_eq!(progress.eta(), Some(Duration::MAX));
        assert!(bar_line(&progress.figures(1, &[], None, progress.eta())).len() <= LINE_WIDTH);
        assert_eq!(format_duration(Duration::MAX), ">99h");
        // Resumed deep into a run, the last epoch saturates instead of overflowing.
        state.epoch = 5;
        assert_eq!(last_epoch(&state, 1, u64::MAX), u64::MAX);
    }

    #[test]
    fn the_last_epoch_counts_a_resumed_partial_epoch_as_the_first() {
        let mut state = TrainState::new(crate::model::Params::init(0), Default::default(), 0, 32, true);
        // 10 epochs of 100 steps from scratch end in epoch 10.
        assert_eq!(last_epoch(&state, 100, 1000), 10);
        // 30 steps end in epoch 1; 101 steps in epoch 2.
        assert_eq!(last_epoch(&state, 100, 30), 1);
        assert_eq!(last_epoch(&state, 100, 101), 2);
        // Resumed 40 steps into epoch 3 (step 240): --epochs 2 ends at the end of epoch 4.
        state.step = 240;
        state.epoch = 2;
        state.step_in_epoch = 40;
        assert_eq!(last_epoch(&state, 100, 240 + 60 + 100), 4);
        assert_eq!(last_epoch(&state, 100, 250), 3);
    }
}
