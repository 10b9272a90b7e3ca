//! What `lenet bench` reports: one row per op call of a training step, and the table and JSON
//! it prints.

/// The unit of a row's rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Unit {
    #[serde(rename = "GFLOP/s")]
    GflopPerS,
    #[serde(rename = "GB/s")]
    GbPerS,
}

impl Unit {
    pub fn as_str(&self) -> &'static str {
        match self {
            Unit::GflopPerS => "GFLOP/s",
            Unit::GbPerS => "GB/s",
        }
    }
}

/// One op call of the training step (or the whole step).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    /// The layer it belongs to (`input`, `conv1`, ..., `all` for the optimizer, `step`).
    pub layer: String,
    /// What it computes (`forward`, `fwd+xent+bwd`, `backward`, ...).
    pub direction: String,
    /// The op of `lenet::ops::Ops` it is.
    pub op: String,
    /// The WGSL entry points of its dispatches, in order (empty without a GPU).
    pub gpu_kernels: Vec<String>,
    pub unit: Unit,
    /// FLOPs or bytes of one call.
    pub work: f64,
    pub gpu_us: Option<f64>,
    pub gpu_rate: Option<f64>,
    pub gpu_calls: usize,
    pub cpu_us: Option<f64>,
    pub cpu_rate: Option<f64>,
    pub cpu_calls: usize,
    /// "ok", or "FAILED: why": the GPU's op (the CPU's, without a GPU) checked against the
    /// reference on random inputs of this row's shape before it was timed.
    pub validated: String,
    /// The largest |diff| / tolerance of the check (below 1 passes).
    pub worst_ratio: Option<f64>,
}

impl Row {
    pub fn failed(&self) -> bool {
        self.validated.starts_with("FAILED")
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    /// The GPU adapter's name, or None for a CPU-only run.
    pub adapter: Option<String>,
    /// Its API, type and driver.
    pub adapter_details: Option<String>,
    pub cpu: String,
    /// "timestamps", "wall_clock", or "cpu_only".
    pub timing: String,
    /// The GPU kernels' variant (`LENET_KERNELS`), or None for a CPU-only run.
    pub kernels: Option<String>,
    pub batch: usize,
    pub iters: usize,
    /// Seconds of wall time after which a row stopped taking samples.
    pub budget_s: f64,
    pub date: String,
    /// Dispatches of one GPU training step.
    pub step_dispatches: Option<usize>,
    pub rows: Vec<Row>,
}

impl Report {
    pub fn any_failed(&self) -> bool {
        self.rows.iter().any(Row::failed)
    }

    pub fn header(&self) -> String {
        let mut lines = vec![format!(
            "lenet bench {}, batch {}: the median of up to {} samples per row (a row stops after ~{} s)",
            self.date, self.batch, self.iters, self.budget_s
        )];
        match (&self.adapter, &self.kernels) {
            (Some(a), Some(k)) => {
                let timing = if self.timing == "timestamps" { "timestamp queries" } else { "wall clock" };
                lines.push(format!("GPU: {a}"));
                lines.push(format!(
                    "     kernels {k}, {} dispatches a step, timed by {timing}",
                    self.step_dispatches.unwrap_or(0)
                ));
            }
            _ => lines.push("GPU: none (CPU only)".into()),
        }
        lines.push(format!("CPU: {} (wall clock)", self.cpu));
        lines.push("rates: 2 FLOPs per multiply-add, or bytes read + written".into());
        lines.join("\n")
    }

    /// An aligned text table (at most 100 columns), header first; failures listed after it.
    pub fn table(&self) -> String {
        let f = |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |x| format!("{x:.prec$}"));
        let gpu = self.adapter.is_some();
        let mut lines: Vec<Vec<String>> = vec![];
        let mut head = vec!["layer", "direction"];
        if gpu {
            head.extend(["GPU us", "GPU rate"]);
        }
        head.extend(["CPU us", "CPU rate", "unit", "check"]);
        if gpu {
            head.push("dispatches");
        }
        lines.push(head.into_iter().map(String::from).collect());
        for r in &self.rows {
            let mut l = vec![r.layer.clone(), r.direction.clone()];
            if gpu {
                l.extend([f(r.gpu_us, 1), f(r.gpu_rate, 2)]);
            }
            let check = if r.failed() { "FAILED".to_string() } else { r.validated.clone() };
            l.extend([f(r.cpu_us, 1), f(r.cpu_rate, 2), r.unit.as_str().into(), check]);
            if gpu {
                l.push(r.gpu_kernels.len().to_string());
            }
            lines.push(l);
        }
        let numeric = |c: usize| (2..if gpu { 6 } else { 4 }).contains(&c) || (gpu && c == 8);
        let cols = lines[0].len();
        let width: Vec<usize> =
            (0..cols).map(|c| lines.iter().map(|l| l[c].chars().count()).max().unwrap_or(0)).collect();
        let mut out = self.header();
        out.push('\n');
        for (i, l) in lines.iter().enumerate() {
            let mut s = String::new();
            for (c, cell) in l.iter().enumerate() {
                let w = width[c];
                if numeric(c) {
                    s.push_str(&format!("{cell:>w$}  "));
                } else {
                    s.push_str(&format!("{cell:<w$}  "));
                }
            }
            out.push_str(s.trim_end());
            out.push('\n');
            if i == 0 {
                out.push_str(&"-".repeat(width.iter().sum::<usize>() + 2 * (cols - 1)));
                out.push('\n');
            }
        }
        for r in self.rows.iter().filter(|r| r.failed()) {
            out.push_str(&format!("{} {}: {}\n", r.layer, r.direction, r.validated));
        }
        out
    }
}

/// Today's date (UTC) as YYYY-MM-DD, from the system clock.
pub fn today_utc() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    // Howard Hinnant's civil_from_days.
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}
