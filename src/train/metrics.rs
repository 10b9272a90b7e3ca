//! `--metrics`: the CSV log of a run, consistent with its checkpoints across a crash.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::paths::METRICS_HEADER;

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

/// `--metrics FILE`: CSV, one row per step and per evaluation. Flushed every epoch, and flushed
/// and synced before every checkpoint, so the file on disk always reaches the checkpoint's step.
/// A resumed run first cuts the file back to the checkpoint's step (rows a killed run logged
/// after its last checkpoint, and a torn last row), then appends: the file reads as if the run
/// had never stopped.
pub(crate) struct MetricsWriter {
    out: Option<(PathBuf, std::io::BufWriter<std::fs::File>)>,
}

impl MetricsWriter {
    pub(crate) fn open(path: Option<&PathBuf>, resume_at: Option<u64>) -> Result<Self> {
        let Some(p) = path else { return Ok(MetricsWriter { out: None }) };
        let cannot = |what: &str| format!("{}: cannot {what}", p.display());
        let keep = match resume_at {
            Some(step) if p.is_file() => Some(metrics_rows_through(p, step)?),
            _ => None,
        };
        let file = match keep {
            Some(len) => {
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
        if keep.is_none_or(|len| len == 0) {
            writeln!(w, "{METRICS_HEADER}").with_context(|| cannot("write"))?;
        }
        Ok(MetricsWriter { out: Some((p.clone(), w)) })
    }

    pub(crate) fn write(&mut self, r: &MetricRow) -> Result<()> {
        if let Some((p, w)) = &mut self.out {
            writeln!(w, "{},{},{},{:.6},{:.6}", r.kind, r.step, r.epoch, r.loss, r.accuracy)
                .with_context(|| format!("{}: cannot write", p.display()))?;
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

/// The length of the leading part of a metrics file that a run resumed at `step` keeps: the
/// header and the complete rows up to that step. Reading stops at the first row past it, torn
/// (no newline) or unreadable: rows are written in step order.
fn metrics_rows_through(path: &Path, step: u64) -> Result<u64> {
    let text = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    if text.is_empty() {
        return Ok(0);
    }
    let header = format!("{METRICS_HEADER}\n");
    if !text.starts_with(header.as_bytes()) {
        bail!("{}: not a lenet metrics file (it does not start with {METRICS_HEADER:?})", path.display());
    }
    let mut keep = header.len();
    for line in text[header.len()..].split_inclusive(|&b| b == b'\n') {
        let Some(row) = line.strip_suffix(b"\n") else { break };
        let row_step = std::str::from_utf8(row).ok().and_then(|r| r.split(',').nth(1)?.parse::<u64>().ok());
        match row_step {
            Some(s) if s <= step => keep += line.len(),
            _ => break,
        }
    }
    Ok(keep as u64)
}
