//! `--metrics`: the CSV log of a run, consistent with its checkpoints across a crash.
//!
//! Columns (the header is [`METRICS_HEADER`]):
//!
//! - `kind`: `train` (one optimizer step), `val` (an evaluation on the `--val` images) or `test`
//!   (an evaluation on the test set).
//! - `step`: the optimizer steps taken, counted from the run's first (resumed parts included).
//! - `epoch`: the 1-based epoch that step belongs to, as the terminal numbers epochs (a row at an
//!   epoch's last step, and the evaluation after it, carry that epoch's number).
//! - `seconds`: wall-clock seconds since the run started, evaluations and saves included; a
//!   resumed run continues from its log's last row. The steps of one chunk (computed together)
//!   share its time evenly.
//! - `lr`: the learning rate of that step (empty on evaluation rows), as Rust prints an f64: the
//!   shortest decimal that reads back to the same value.
//! - `loss`: the step's mean cross-entropy over its batch, or the evaluation's mean over its set,
//!   as the shortest decimal of its f32 value (the step's loss is an f32: this is it exactly).
//! - `accuracy`: the fraction (0 to 1) classified correctly, of the batch or of the set.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

pub use crate::paths::{LEGACY_METRICS_HEADER, METRICS_HEADER};

/// One logged point of a run, for `--metrics` and `--plot`.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct MetricRow {
    /// "train" (one optimiser step), "val" or "test" (an evaluation).
    pub kind: &'static str,
    pub step: u64,
    /// 1-based, as the terminal numbers epochs.
    pub epoch: u64,
    /// Wall-clock seconds since the run started.
    pub seconds: f64,
    /// The step's learning rate (train rows only).
    pub lr: Option<f64>,
    pub loss: f64,
    pub accuracy: f64,
}

impl MetricRow {
    /// The row as the CSV holds it, without its newline.
    pub fn csv(&self) -> String {
        let lr = self.lr.map(|lr| lr.to_string()).unwrap_or_default();
        format!(
            "{},{},{},{:.3},{lr},{},{:.6}",
            self.kind, self.step, self.epoch, self.seconds, self.loss as f32, self.accuracy
        )
    }
}

/// `--metrics FILE`: CSV, one row per step and per evaluation. Flushed every epoch, and flushed
/// and synced before every checkpoint, so the file on disk always reaches the checkpoint's step.
/// A resumed run first cuts the file back to the checkpoint's step (rows a killed run logged
/// after its last checkpoint, and a torn last row), then appends: the file reads as if the run
/// had never stopped.
pub(crate) struct MetricsWriter {
    out: Option<(PathBuf, std::io::BufWriter<std::fs::File>)>,
}

impl MetricsWriter {
    /// Opens the log, and says how many seconds the run had run before (the `seconds` of the
    /// last row a resumed run keeps; 0 for a new log).
    pub(crate) fn open(path: Option<&PathBuf>, resume_at: Option<u64>) -> Result<(Self, f64)> {
        let Some(p) = path else { return Ok((MetricsWriter { out: None }, 0.0)) };
        let cannot = |what: &str| format!("{}: cannot {what}", p.display());
        let keep = match resume_at {
            Some(step) if p.is_file() => Some(metrics_rows_through(p, step)?),
            _ => None,
        };
        let file = match keep {
            Some(Kept { len, .. }) => {
                let file = std::fs::OpenOptions::new().write(true).open(p).with_context(|| cannot("open"))?;
                file.set_len(len).with_context(|| cannot("cut back to the checkpoint's step"))?;
                let mut file = file;
                std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0)).with_context(|| cannot("write"))?;
                file
            }
            None => std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(p)
                .with_context(|| cannot("create"))?,
        };
        let mut w = std::io::BufWriter::new(file);
        if keep.as_ref().is_none_or(|k| k.len == 0) {
            writeln!(w, "{METRICS_HEADER}").with_context(|| cannot("write"))?;
        }
        let seconds = keep.map_or(0.0, |k| k.seconds);
        Ok((MetricsWriter { out: Some((p.clone(), w)) }, seconds))
    }

    pub(crate) fn write(&mut self, r: &MetricRow) -> Result<()> {
        if let Some((p, w)) = &mut self.out {
            writeln!(w, "{}", r.csv()).with_context(|| format!("{}: cannot write", p.display()))?;
        }
        Ok(())
    }

    pub(crate) fn flush(&mut self) -> Result<()> {
        if let Some((p, w)) = &mut self.out {
            w.flush().with_context(|| format!("{}: cannot write", p.display()))?;
        }
        Ok(())
    }

    /// Flushes and waits for the disk, before a checkpoint claims the rows are there.
    pub(crate) fn sync(&mut self) -> Result<()> {
        self.flush()?;
        if let Some((p, w)) = &mut self.out {
            w.get_ref().sync_data().with_context(|| format!("{}: cannot write", p.display()))?;
        }
        Ok(())
    }
}

/// The rows of a metrics file this version wrote (for `--plot` of a resumed run, whose own
/// history starts at its checkpoint). Rows that do not parse (a torn last row) end the reading.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricRow>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut lines = text.lines();
    if lines.next() != Some(METRICS_HEADER) {
        bail!("{}: not a lenet metrics file (it does not start with {METRICS_HEADER:?})", path.display());
    }
    let parse = |line: &str| -> Option<MetricRow> {
        let cols: Vec<&str> = line.split(',').collect();
        let [kind, step, epoch, seconds, lr, loss, accuracy] = cols[..] else { return None };
        Some(MetricRow {
            kind: ["train", "val", "test"].into_iter().find(|k| *k == kind)?,
            step: step.parse().ok()?,
            epoch: epoch.parse().ok()?,
            seconds: seconds.parse().ok()?,
            lr: if lr.is_empty() { None } else { Some(lr.parse().ok()?) },
            loss: loss.parse().ok()?,
            accuracy: accuracy.parse().ok()?,
        })
    };
    Ok(lines.map_while(parse).collect())
}

/// The leading part of a metrics file that a run resumed at some step keeps.
struct Kept {
    /// Bytes: the header and the complete rows up to that step.
    len: u64,
    /// The `seconds` of the last of those rows (0 when there is none).
    seconds: f64,
}

/// The part of a metrics file that a run resumed at `step` keeps: the header and the complete
/// rows up to that step. Reading stops at the first row past it, torn (no newline) or
/// unreadable: rows are written in step order.
fn metrics_rows_through(path: &Path, step: u64) -> Result<Kept> {
    let text = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    if text.is_empty() {
        return Ok(Kept { len: 0, seconds: 0.0 });
    }
    let header = format!("{METRICS_HEADER}\n");
    if text.starts_with(format!("{LEGACY_METRICS_HEADER}\n").as_bytes()) {
        bail!(
            "{}: written by an earlier lenet, without the seconds and lr columns; a resumed run cannot \
             continue it: give --metrics a new file",
            path.display()
        );
    }
    if !text.starts_with(header.as_bytes()) {
        bail!("{}: not a lenet metrics file (it does not start with {METRICS_HEADER:?})", path.display());
    }
    let mut kept = Kept { len: header.len() as u64, seconds: 0.0 };
    for line in text[header.len()..].split_inclusive(|&b| b == b'\n') {
        let Some(row) = line.strip_suffix(b"\n") else { break };
        let fields: Option<(u64, f64)> = std::str::from_utf8(row).ok().and_then(|r| {
            let mut cols = r.split(',');
            let row_step = cols.nth(1)?.parse().ok()?;
            let seconds = cols.nth(1)?.parse().ok()?;
            Some((row_step, seconds))
        });
        match fields {
            Some((s, seconds)) if s <= step => {
                kept.len += line.len() as u64;
                kept.seconds = seconds;
            }
            _ => break,
        }
    }
    Ok(kept)
}
