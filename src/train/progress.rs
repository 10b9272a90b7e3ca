//! Progress on stderr: a live bar when stderr is a terminal, plain lines otherwise.
//!
//! The bar, as Keras and Lightning users know it, within [`LINE_WIDTH`] columns:
//!
//! ```text
//! epoch 3/10 [=====>     ] 120/234 loss 0.1235 acc 97.1%  25k img/s 0:07 eta 0:17
//! ```
//!
//! `epoch E/L` counts epochs from 1, as the epoch lines and the `--metrics` file do, up to the
//! last epoch this run reaches. `loss` and `acc` are the means over the epoch's steps so far, so
//! the bar's last figures are the epoch line's `loss` and `train acc` ([`epoch_means`](super::epoch_means) computes
//! both). `120/234` counts what this run does in the epoch: a run that stops inside an epoch
//! (`--steps 12`) shows `7/12`, not `7/234`. The two times are the run's: wall time since it
//! started, and the time left to its last step at the pace so far (evaluations included).
//!
//! The bar never freezes: a ticker thread redraws it every [`TICK`] (the clock runs, the ETA
//! counts down) whatever the step time, and while the run does something other than steps it
//! names it in place of the figures (`evaluating on the test set`, `saving FILE`). Where stderr
//! is not a terminal, each epoch gets its line, and a status line is written whenever nothing
//! was for [`PLAIN_EVERY`], so a log file shows a slow run is alive.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::{epoch_means_after, last_epoch, TrainEvent};
use crate::backend::StepStats;
use crate::model::{EpochSums, TrainState};

/// The widest the bar's line gets: 80 columns with the cursor's column to spare (a line that
/// fills the last column wraps on some terminals, and the redrawn bar would then scroll).
pub const LINE_WIDTH: usize = 79;

/// How often the bar is redrawn when nothing else redraws it.
pub const TICK: Duration = Duration::from_secs(1);

/// Where stderr is not a terminal: the longest a run stays silent before a status line.
pub const PLAIN_EVERY: Duration = Duration::from_secs(30);

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

/// What the bar shows at one moment.
#[derive(Clone, Debug, PartialEq)]
pub struct BarFigures {
    /// The current epoch, from 1.
    pub epoch: u64,
    /// The last epoch this run reaches.
    pub last_epoch: u64,
    /// Steps done of this epoch, of `epoch_end`.
    pub done: u64,
    /// The step of this epoch at which this run leaves it: the epoch's length, or less when the
    /// run ends inside the epoch.
    pub epoch_end: u64,
    /// The epoch's mean loss and accuracy so far (`None` before its first step).
    pub loss: Option<f64>,
    pub accuracy: Option<f64>,
    pub images_per_s: Option<f64>,
    /// Wall time since the run started.
    pub elapsed: Duration,
    /// Time left to the run's last step (`None` before the first step).
    pub eta: Option<Duration>,
    /// What the run is doing other than steps (`evaluating on the test set`), shown in place of
    /// the step figures.
    pub phase: Option<String>,
}

/// The bar's line: never wider than [`LINE_WIDTH`]. Fields have fixed widths for a given run,
/// so the line does not jitter as the numbers change; the bar takes what is left (up to 30).
pub fn bar_line(f: &BarFigures) -> String {
    let steps_width = f.epoch_end.to_string().len();
    let prefix = format!("epoch {}/{}", f.epoch, f.last_epoch);
    let figures = format!(
        "loss {:>6} acc {:>5} {:>4} img/s",
        f.loss.map_or("-".into(), format_loss),
        f.accuracy.map_or("-".into(), |a| format!("{:.1}%", 100.0 * a)),
        f.images_per_s.map_or("-".into(), format_rate),
    );
    // A phase takes the figures' place, padded or cut to their width so the line keeps its own.
    let middle = match &f.phase {
        Some(phase) => {
            let width = figures.chars().count();
            let cut: String = phase.chars().take(width).collect();
            format!("{cut:<width$}")
        }
        None => figures,
    };
    let rest = format!(
        "{:>steps_width$}/{} {middle} {} eta {}",
        f.done,
        f.epoch_end,
        format_duration(f.elapsed),
        // As wide as the first real figure, "0:17", so that the bar keeps its width.
        f.eta.map_or("-:--".into(), format_duration),
    );
    // "PREFIX [BAR] REST": the brackets and spaces take 4 columns.
    let room = LINE_WIDTH.saturating_sub(prefix.len() + rest.len() + 4);
    let mut line = if room >= 5 {
        let width = room.min(30);
        let filled = if f.epoch_end == 0 {
            0
        } else {
            (width as u128 * f.done.min(f.epoch_end) as u128 / f.epoch_end as u128) as usize
        };
        let head = if filled < width { ">" } else { "" };
        let bar = format!("{}{head}", "=".repeat(filled));
        format!("{prefix} [{bar:<width$}] {rest}")
    } else {
        // Only with absurd numbers (epochs or steps of many digits): no bar, and cut to fit.
        format!("{prefix} {rest}")
    };
    truncate_chars(&mut line, LINE_WIDTH);
    line
}

/// The status line written where stderr is not a terminal, at least every [`PLAIN_EVERY`]:
/// `epoch 3/10: 120/234 steps, loss 0.1235, acc 97.1%, 25k img/s, 0:07 elapsed, eta 0:17`, or
/// with a phase, `epoch 3/10: evaluating on the test set, 0:07 elapsed`.
pub fn plain_line(f: &BarFigures) -> String {
    let head = format!("epoch {}/{}", f.epoch, f.last_epoch);
    let elapsed = format_duration(f.elapsed);
    if let Some(phase) = &f.phase {
        return format!("{head}: {phase}, {elapsed} elapsed");
    }
    let mut line = format!("{head}: {}/{} steps", f.done, f.epoch_end);
    if let (Some(loss), Some(accuracy)) = (f.loss, f.accuracy) {
        line += &format!(", loss {}, acc {:.1}%", format_loss(loss), 100.0 * accuracy);
    }
    if let Some(rate) = f.images_per_s {
        line += &format!(", {} img/s", format_rate(rate));
    }
    line += &format!(", {elapsed} elapsed");
    if let Some(eta) = f.eta {
        line += &format!(", eta {}", format_duration(eta));
    }
    line
}

/// Cuts `line` to at most `width` characters (never inside a character).
fn truncate_chars(line: &mut String, width: usize) {
    if let Some((at, _)) = line.char_indices().nth(width) {
        line.truncate(at);
    }
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

/// Where the progress goes: a live bar, or plain lines written to a sink (stderr, or a buffer in
/// tests).
enum Output {
    Bar(ProgressBar),
    Plain(Box<dyn Write + Send>),
}

/// What the ticker redraws from: the figures the training loop last reported, and the phase.
struct Live {
    output: Output,
    /// The current epoch, from 1, and the last one the run reaches.
    epoch: u64,
    last_epoch: u64,
    done: u64,
    epoch_end: u64,
    loss: Option<f64>,
    accuracy: Option<f64>,
    images_per_s: Option<f64>,
    /// The ETA when the loop last reported, and when that was: the ETA shown counts down from it.
    eta: Option<(Duration, Instant)>,
    phase: Option<String>,
    /// When a plain line was last written.
    last_plain: Instant,
    /// Set by `finish`: the ticker leaves.
    finished: bool,
}

struct Shared {
    live: Mutex<Live>,
    wake: Condvar,
    started: Instant,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Live> {
        // A panic while drawing must not take the training run down with it.
        self.live.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn figures(&self, live: &Live) -> BarFigures {
        BarFigures {
            epoch: live.epoch,
            last_epoch: live.last_epoch.max(live.epoch),
            done: live.done,
            epoch_end: live.epoch_end,
            loss: live.loss,
            accuracy: live.accuracy,
            images_per_s: live.images_per_s,
            elapsed: self.started.elapsed(),
            eta: live.eta.map(|(eta, at)| eta.saturating_sub(at.elapsed())),
            phase: live.phase.clone(),
        }
    }

    /// Redraws the bar, or writes a status line when the plain output has been silent for
    /// `plain_every`.
    fn tick(&self, plain_every: Duration) {
        let mut live = self.lock();
        let figures = self.figures(&live);
        let quiet_for = live.last_plain.elapsed();
        match &mut live.output {
            Output::Bar(bar) => bar.set_message(bar_line(&figures)),
            Output::Plain(sink) if quiet_for >= plain_every => {
                // A log that is gone (a closed pipe) must not end the run before it saves.
                let _ = writeln!(sink, "{}", plain_line(&figures));
                let _ = sink.flush();
                live.last_plain = Instant::now();
            }
            Output::Plain(_) => {}
        }
    }
}

/// A live bar on a terminal, plain lines anywhere else; a ticker thread keeps either alive.
/// The command line's [`TrainEvent`] callback: the live bar on a terminal, else a line an epoch.
pub struct ProgressDisplay {
    plain: bool,
    progress: Option<Progress>,
}

impl ProgressDisplay {
    /// `plain`: lines even on a terminal.
    pub fn new(plain: bool) -> Self {
        ProgressDisplay { plain, progress: None }
    }

    /// Shows `event`: a run's start opens the bar (or the plain lines), its end closes it.
    pub fn on_event(&mut self, event: &TrainEvent) {
        if let TrainEvent::Started { state, steps_per_epoch, batch, target_step } = event {
            self.progress = Some(Progress::new(self.plain, *steps_per_epoch, *batch, state, *target_step));
            return;
        }
        let Some(progress) = self.progress.as_mut() else { return };
        match event {
            TrainEvent::EpochStarted { epoch, done, before } => progress.start_epoch(*epoch, *done, *before),
            TrainEvent::Steps { step, done, epoch_steps, images_per_s, .. } => {
                progress.update(*step, *done, epoch_steps, *images_per_s)
            }
            TrainEvent::Phase(phase) => progress.phase(*phase),
            TrainEvent::EpochEnded { line } => progress.end_epoch(line),
            TrainEvent::Finished => progress.finish(),
            _ => {}
        }
    }
}

pub(crate) struct Progress {
    shared: Arc<Shared>,
    ticker: Option<JoinHandle<()>>,
    steps_per_epoch: u64,
    batch: usize,
    /// The run's first, last and current step: the ETA's inputs.
    start_step: u64,
    step: u64,
    target_step: u64,
    /// The epoch's steps before this invocation's first, and their sums (a resumed epoch's).
    before: (u64, EpochSums),
}

impl Progress {
    /// Progress of a run from `state` to `target_step`, on stderr.
    pub(crate) fn new(
        plain: bool,
        steps_per_epoch: u64,
        batch: usize,
        state: &TrainState,
        target_step: u64,
    ) -> Self {
        let output = if live_bar(plain, stderr_is_terminal()) {
            Output::Bar(new_bar(ProgressDrawTarget::stderr()))
        } else {
            Output::Plain(Box::new(std::io::stderr()))
        };
        Self::with_output(output, TICK, PLAIN_EVERY, steps_per_epoch, batch, state, target_step)
    }

    fn with_output(
        output: Output,
        tick: Duration,
        plain_every: Duration,
        steps_per_epoch: u64,
        batch: usize,
        state: &TrainState,
        target_step: u64,
    ) -> Self {
        let live = Live {
            output,
            epoch: state.epoch + 1,
            last_epoch: last_epoch(state, steps_per_epoch, target_step),
            done: state.step_in_epoch,
            epoch_end: epoch_end(
                state.step_in_epoch,
                steps_per_epoch,
                target_step.saturating_sub(state.step),
            ),
            loss: None,
            accuracy: None,
            images_per_s: None,
            eta: None,
            phase: None,
            last_plain: Instant::now(),
            finished: false,
        };
        let shared =
            Arc::new(Shared { live: Mutex::new(live), wake: Condvar::new(), started: Instant::now() });
        let ticker = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("lenet-progress".into())
                .spawn(move || loop {
                    {
                        let live = shared.lock();
                        if live.finished {
                            return;
                        }
                        let (live, _) = shared
                            .wake
                            .wait_timeout(live, tick)
                            .unwrap_or_else(|poisoned| poisoned.into_inner());
                        if live.finished {
                            return;
                        }
                    }
                    shared.tick(plain_every);
                })
                // Without a thread the bar is only redrawn by the loop, as before: not a reason
                // to refuse to train.
                .ok()
        };
        Progress {
            shared,
            ticker,
            steps_per_epoch,
            batch,
            start_step: state.step,
            step: state.step,
            target_step,
            before: (0, EpochSums::default()),
        }
    }

    /// An epoch starts, `done` steps into it; `before` sums those steps, when they are known.
    pub(crate) fn start_epoch(&mut self, epoch: u64, done: u64, before: Option<EpochSums>) {
        self.before = (if before.is_some() { done } else { 0 }, before.unwrap_or_default());
        let eta = self.eta();
        let mut live = self.shared.lock();
        live.epoch = epoch + 1;
        live.done = done;
        live.epoch_end = epoch_end(done, self.steps_per_epoch, self.target_step.saturating_sub(self.step));
        (live.loss, live.accuracy) = (None, None);
        live.eta = eta.map(|eta| (eta, Instant::now()));
        self.redraw(live);
    }

    /// After a chunk: `step` is the run's step counter, `done` the steps of this epoch,
    /// `epoch_steps` this epoch's steps so far.
    pub(crate) fn update(&mut self, step: u64, done: u64, epoch_steps: &[StepStats], images_per_s: f64) {
        self.step = step;
        let eta = self.eta();
        let (loss, accuracy) = epoch_means_after(self.before.0, self.before.1, epoch_steps, self.batch);
        let mut live = self.shared.lock();
        live.done = done;
        let any = self.before.0 + epoch_steps.len() as u64 > 0;
        (live.loss, live.accuracy) = if any { (Some(loss), Some(accuracy)) } else { (None, None) };
        live.images_per_s = Some(images_per_s).filter(|r| r.is_finite());
        live.eta = eta.map(|eta| (eta, Instant::now()));
        self.redraw(live);
    }

    /// Names what the run is doing other than steps (`None`: back to the steps' figures).
    pub(crate) fn phase(&self, phase: Option<&str>) {
        let mut live = self.shared.lock();
        live.phase = phase.map(str::to_string);
        self.redraw(live);
    }

    fn redraw(&self, live: MutexGuard<'_, Live>) {
        if let Output::Bar(bar) = &live.output {
            bar.set_message(bar_line(&self.shared.figures(&live)));
        }
    }

    /// The time left to the run's last step at the pace so far; `None` before the first step.
    fn eta(&self) -> Option<Duration> {
        self.eta_after(self.shared.started.elapsed())
    }

    /// The time left when the run's steps so far took `elapsed`.
    fn eta_after(&self, elapsed: Duration) -> Option<Duration> {
        let done = self.step.checked_sub(self.start_step).filter(|&d| d > 0)?;
        let per_step = elapsed.as_secs_f64() / done as f64;
        // A run of 2^64-1 steps has an ETA past what a Duration holds: shown as ">99h", never a
        // panic.
        let left = per_step * self.target_step.saturating_sub(self.step) as f64;
        Some(Duration::try_from_secs_f64(left).unwrap_or(Duration::MAX))
    }

    pub(crate) fn end_epoch(&mut self, line: &str) {
        let mut live = self.shared.lock();
        live.last_plain = Instant::now();
        match &mut live.output {
            Output::Bar(bar) => bar.println(line),
            // A terminal that is gone (SIGHUP) must not end the run before it saves.
            Output::Plain(sink) => {
                let _ = writeln!(sink, "{line}");
                let _ = sink.flush();
            }
        }
    }

    pub(crate) fn finish(&mut self) {
        self.shared.lock().finished = true;
        self.shared.wake.notify_all();
        if let Some(ticker) = self.ticker.take() {
            let _ = ticker.join();
        }
        if let Output::Bar(bar) = &self.shared.lock().output {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if self.ticker.is_some() {
            self.finish();
        }
    }
}

fn new_bar(target: ProgressDrawTarget) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(None, target).with_finish(indicatif::ProgressFinish::AndClear);
    bar.set_style(ProgressStyle::with_template("{msg}").expect("progress template is valid"));
    bar
}

/// Runs `work` while naming it on stderr: a spinner with a running clock on a terminal (unless
/// `plain`), else a line if it takes longer than [`PLAIN_EVERY`]. For what comes before a
/// run's first step: starting the GPU and compiling its kernels takes seconds to minutes.
pub fn during<T>(plain: bool, what: &str, work: impl FnOnce() -> T) -> T {
    let live = live_bar(plain, stderr_is_terminal());
    let done = Arc::new((Mutex::new(false), Condvar::new()));
    let ticker = {
        let (done, what) = (Arc::clone(&done), what.to_string());
        std::thread::Builder::new()
            .name("lenet-progress".into())
            .spawn(move || {
                let started = Instant::now();
                // Drawn from the first tick on, so that quick work (the CPU path) flashes nothing.
                let mut spinner: Option<ProgressBar> = None;
                let (lock, wake) = &*done;
                let mut finished = lock.lock().unwrap_or_else(|p| p.into_inner());
                let mut next_line = PLAIN_EVERY;
                while !*finished {
                    (finished, _) = wake.wait_timeout(finished, TICK / 4).unwrap_or_else(|p| p.into_inner());
                    if *finished {
                        break;
                    }
                    if live && spinner.is_none() {
                        let bar = ProgressBar::new_spinner().with_finish(indicatif::ProgressFinish::AndClear);
                        let style = ProgressStyle::with_template("{spinner} {msg} {elapsed}");
                        bar.set_style(style.expect("spinner template is valid"));
                        bar.set_message(what.clone());
                        spinner = Some(bar);
                    }
                    match &spinner {
                        Some(bar) => bar.tick(),
                        None if !live && started.elapsed() >= next_line => {
                            let _ = writeln!(
                                std::io::stderr(),
                                "{what}: {} elapsed",
                                format_duration(started.elapsed())
                            );
                            next_line += PLAIN_EVERY;
                        }
                        None => {}
                    }
                }
                if let Some(bar) = spinner {
                    bar.finish_and_clear();
                }
            })
            .ok()
    };
    let result = work();
    *done.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
    done.1.notify_all();
    if let Some(ticker) = ticker {
        let _ = ticker.join();
    }
    result
}

/// The step of an epoch at which a run leaves it: the epoch's end, or sooner when the run's
/// `remaining` steps end inside it (`done` steps of the epoch are behind).
fn epoch_end(done: u64, steps_per_epoch: u64, remaining: u64) -> u64 {
    steps_per_epoch.min(done.saturating_add(remaining))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::epoch_means;

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
            epoch_end: steps,
            loss: Some(0.123456),
            accuracy: Some(0.97123),
            images_per_s: Some(25_312.0),
            elapsed: Duration::from_secs(7),
            eta: Some(Duration::from_secs(17)),
            phase: None,
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
                    epoch_end: steps,
                    loss,
                    accuracy,
                    images_per_s,
                    elapsed,
                    eta,
                    phase: None,
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
        progress.step = 1;
        let eta = progress.eta_after(Duration::from_secs(1));
        assert_eq!(eta, Some(Duration::MAX));
        progress.shared.lock().eta = eta.map(|eta| (eta, Instant::now()));
        let figures = progress.shared.figures(&progress.shared.lock());
        assert!(bar_line(&figures).len() <= LINE_WIDTH);
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

    /// A terminal that keeps every line drawn on it.
    #[derive(Debug, Clone, Default)]
    struct RecordingTerm(Arc<Mutex<Vec<String>>>);

    impl indicatif::TermLike for RecordingTerm {
        fn width(&self) -> u16 {
            80
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.write_str(s)
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            if !s.is_empty() {
                self.0.lock().unwrap().push(s.to_string());
            }
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A plain sink that keeps what was written.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn fresh_state() -> TrainState {
        TrainState::new(crate::model::Params::init(0), Default::default(), 0, 32, true)
    }

    /// Waits up to `limit` for `done` to hold.
    fn eventually(limit: Duration, done: impl Fn() -> bool) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if done() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        done()
    }

    #[test]
    fn the_bar_ticks_while_nothing_reports_and_names_the_phase() {
        let term = RecordingTerm::default();
        let target = ProgressDrawTarget::term_like(Box::new(term.clone()));
        let output = Output::Bar(new_bar(target));
        let tick = Duration::from_millis(50);
        let mut progress = Progress::with_output(output, tick, PLAIN_EVERY, 234, 32, &fresh_state(), 2340);
        progress.start_epoch(0, 0, None);
        progress.phase(Some("evaluating on the test set"));
        // No step is reported: the clock still runs, one second to the next, on the bar.
        let drawn = |needle: &str| term.0.lock().unwrap().iter().any(|l| l.contains(needle));
        let in_phase = |clock: &str| {
            let suffix = format!(" {clock} eta -:--");
            term.0
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("0/234 evaluating on the test set ") && l.ends_with(&suffix))
        };
        let last_lines = || term.0.lock().unwrap().iter().rev().take(4).cloned().collect::<Vec<_>>();
        assert!(
            eventually(Duration::from_secs(10), || in_phase("0:02")),
            "the bar did not tick through two seconds: {:?}",
            last_lines()
        );
        assert!(in_phase("0:01"), "{:?}", last_lines());
        progress.phase(None);
        progress.update(1, 1, &[StepStats { loss: 2.0, correct: 8 }], 100.0);
        assert!(drawn("  1/234 loss 2.0000 acc 25.0%  100 img/s"), "{:?}", last_lines());
        progress.finish();
    }

    #[test]
    fn plain_output_says_the_run_is_alive_when_it_has_been_quiet() {
        let sink = Sink::default();
        let output = Output::Plain(Box::new(sink.clone()));
        let (tick, quiet) = (Duration::from_millis(20), Duration::from_millis(200));
        let mut progress = Progress::with_output(output, tick, quiet, 234, 32, &fresh_state(), 2340);
        progress.start_epoch(0, 0, None);
        let text = || String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert!(
            eventually(Duration::from_secs(10), || text().lines().count() >= 2),
            "no status line while quiet: {:?}",
            text()
        );
        assert!(text().lines().all(|l| l.starts_with("epoch 1/10: 0/234 steps, ")), "{}", text());
        progress.phase(Some("evaluating on the test set"));
        assert!(eventually(Duration::from_secs(10), || text()
            .contains("epoch 1/10: evaluating on the test set, ")));
        progress.finish();
        // Finished: nothing more is written.
        let before = text();
        std::thread::sleep(4 * quiet);
        assert_eq!(text(), before);
    }

    #[test]
    fn an_epoch_line_resets_the_quiet_clock() {
        let sink = Sink::default();
        let output = Output::Plain(Box::new(sink.clone()));
        let quiet = Duration::from_secs(3600);
        let mut progress =
            Progress::with_output(output, Duration::from_millis(10), quiet, 234, 32, &fresh_state(), 234);
        progress.end_epoch("epoch 1/1 (234/234 steps)  loss 0.5");
        std::thread::sleep(Duration::from_millis(100));
        progress.finish();
        assert_eq!(
            String::from_utf8(sink.0.lock().unwrap().clone()).unwrap(),
            "epoch 1/1 (234/234 steps)  loss 0.5\n"
        );
    }

    #[test]
    fn the_bar_counts_the_steps_this_run_takes_in_the_epoch() {
        // --steps 12 of a 234-step epoch: "x/12", not "x/234".
        assert_eq!(epoch_end(0, 234, 12), 12);
        assert_eq!(epoch_end(0, 234, 2340), 234);
        // Resumed 200 steps into the epoch, 50 steps left to run: the epoch is done with them.
        assert_eq!(epoch_end(200, 234, 50), 234);
        // Resumed 100 steps in, 20 steps left: the run leaves the epoch at step 120.
        assert_eq!(epoch_end(100, 234, 20), 120);
        assert_eq!(epoch_end(5, 234, u64::MAX), 234);
        let term = RecordingTerm::default();
        let output = Output::Bar(new_bar(ProgressDrawTarget::term_like(Box::new(term.clone()))));
        let mut progress = Progress::with_output(output, TICK, PLAIN_EVERY, 234, 32, &fresh_state(), 12);
        progress.start_epoch(0, 0, None);
        progress.update(4, 4, &[StepStats { loss: 1.0, correct: 1 }; 4], 10.0);
        let lines = term.0.lock().unwrap().clone();
        assert!(
            lines.iter().any(|l| l.starts_with("epoch 1/1 [") && l.contains("]  4/12 loss")),
            "{lines:?}"
        );
        progress.finish();
    }

    #[test]
    fn a_phase_keeps_the_lines_width() {
        let mut f = figures(3, 10, 120, 234);
        let plain = bar_line(&f);
        f.phase = Some("evaluating on the test set".into());
        let phased = bar_line(&f);
        assert_eq!(phased.len(), plain.len(), "{plain}\n{phased}");
        assert!(phased.contains("120/234 evaluating on the test set"), "{phased}");
        f.phase = Some("x".repeat(500));
        assert_eq!(bar_line(&f).len(), plain.len());
        assert_eq!(
            plain_line(&figures(3, 10, 120, 234)),
            "epoch 3/10: 120/234 steps, loss 0.1235, acc 97.1%, 25k img/s, 0:07 elapsed, eta 0:17"
        );
    }
}
