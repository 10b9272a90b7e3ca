//! Progress on stderr: a live bar when stderr is a terminal, one plain line an epoch otherwise.

use std::io::{IsTerminal, Write};

use indicatif::{ProgressBar, ProgressStyle};

use super::mean;
use crate::backend::StepStats;

/// A live bar on a terminal; plain lines, one per epoch, anywhere else.
pub(crate) struct Progress {
    bar: Option<ProgressBar>,
    steps_per_epoch: u64,
    batch: usize,
}

impl Progress {
    pub(crate) fn new(plain: bool, steps_per_epoch: u64, batch: usize) -> Self {
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

    pub(crate) fn start_epoch(&mut self, epoch: u64, done: u64) {
        if let Some(bar) = &self.bar {
            bar.reset();
            bar.set_length(self.steps_per_epoch);
            bar.set_position(done);
            bar.set_prefix(format!("epoch {}", epoch + 1));
        }
    }

    pub(crate) fn update(&mut self, done: u64, recent: &[StepStats], images_per_s: f64) {
        if let Some(bar) = &self.bar {
            let tail = &recent[recent.len().saturating_sub(20)..];
            let loss = mean(&tail.iter().map(|s| s.loss).collect::<Vec<_>>());
            let acc = tail.iter().map(|s| s.correct as f64).sum::<f64>() / (tail.len() * self.batch) as f64;
            bar.set_position(done);
            bar.set_message(format!("loss {loss:.4} acc {:.1}% {images_per_s:.0} img/s", 100.0 * acc));
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
