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
    /// The fastest and slowest GPU sample, microseconds per call (the median is `gpu_us`).
    pub gpu_min_us: Option<f64>,
    pub gpu_max_us: Option<f64>,
    pub cpu_us: Option<f64>,
    pub cpu_rate: Option<f64>,
    pub cpu_calls: usize,
    /// The fastest and slowest CPU sample, microseconds (the median is `cpu_us`).
    pub cpu_min_us: Option<f64>,
    pub cpu_max_us: Option<f64>,
    /// This row's median over the step row's median: its share of the step (the op rows add up
    /// to about 1; the step row's is 1).
    pub cpu_share: Option<f64>,
    pub gpu_share: Option<f64>,
    /// `cpu_rate` over the all-threads FMA peak (`Report::cpu_peak`), for GFLOP/s rows.
    pub cpu_peak_fraction: Option<f64>,
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
    /// How the step row's GPU time was taken (None without a timed GPU step), and what it found:
    /// the spread of a step's time over the samples, passes, steps per pass, the warm-up.
    pub step_timing_method: Option<crate::gpu::timing::StepTimingMethod>,
    pub step_timing: Option<super::replay::StepTiming>,
    /// Whether the GPU's kernels were compiled with naga's loop bounding ("bounded") or without
    /// ("unbounded"); None for a CPU-only run.
    pub shader_loop_bounds: Option<crate::gpu::shader::LoopBounds>,
    /// The GPU kernels' variant, or None for a CPU-only run.
    pub kernels: Option<String>,
    pub batch: usize,
    pub iters: usize,
    /// Seconds of wall time after which a row stopped taking samples.
    pub budget_s: f64,
    pub date: String,
    /// Dispatches of one GPU training step.
    pub step_dispatches: Option<usize>,
    pub rows: Vec<Row>,
    /// The CPU path's threads and instruction set (also in `cpu`, in words).
    pub cpu_threads: usize,
    pub cpu_isa: String,
    /// The measured FMA peak of the CPU; None when the CPU ops were not timed.
    pub cpu_peak: Option<super::peak::Peak>,
    /// Training images per second of the step rows: batch / the step's median.
    pub cpu_images_per_s: Option<f64>,
    pub gpu_images_per_s: Option<f64>,
    /// One line: which rows dominate the step.
    pub dominant: String,
}

impl Report {
    pub fn any_failed(&self) -> bool {
        self.rows.iter().any(Row::failed)
    }

    pub fn header(&self) -> String {
        let mut lines = vec![format!(
            "lenet bench {}, batch {}: up to {} samples per row (a row stops after ~{} s)",
            self.date, self.batch, self.iters, self.budget_s
        )];
        match (&self.adapter, &self.kernels) {
            (Some(a), Some(k)) => {
                let timing = if self.timing == "timestamps" { "timestamp queries" } else { "wall clock" };
                lines.push(format!("GPU: {a}"));
                let bounds = match self.shader_loop_bounds {
                    Some(crate::gpu::shader::LoopBounds::Unbounded) => ", shader loops not bounded by naga",
                    _ => "",
                };
                lines.push(format!(
                    "     kernels {k}{bounds}, {} dispatches a step, timed by {timing}",
                    self.step_dispatches.unwrap_or(0)
                ));
                if let (Some(m), Some(t)) = (&self.step_timing_method, &self.step_timing) {
                    lines.push(format!(
                        "     step: {} passes of {} steps after a {:.1} s warm-up, timed by {m}",
                        t.passes, t.steps_per_pass, t.warmup_s
                    ));
                }
            }
            _ => lines.push("GPU: none (CPU only)".into()),
        }
        lines.push(format!("CPU: {} (wall clock)", self.cpu));
        if let Some(p) = &self.cpu_peak {
            lines.push(format!(
                "     measured FMA peak ({}): {:.1} GFLOP/s per core, {:.1} GFLOP/s on {} threads",
                p.isa, p.gflops_core, p.gflops_all, p.threads
            ));
        }
        lines.push("rates: 2 FLOPs per multiply-add, or bytes read + written".into());
        lines.join("\n")
    }

    /// The header, then an aligned table per timed side (GPU, CPU; at most 100 columns each),
    /// the step's images/s and what dominates; failures listed last.
    pub fn table(&self) -> String {
        let mut out = self.header();
        out.push('\n');
        if self.adapter.is_some() {
            out.push_str(&self.side_table(true));
        }
        if self.rows.iter().any(|r| r.cpu_us.is_some()) || self.adapter.is_none() {
            out.push_str(&self.side_table(false));
        }
        let ips = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.0}"));
        let mut step = vec![];
        if self.adapter.is_some() {
            step.push(format!("GPU {} images/s", ips(self.gpu_images_per_s)));
        }
        if self.cpu_images_per_s.is_some() {
            step.push(format!("CPU {} images/s", ips(self.cpu_images_per_s)));
        }
        if !step.is_empty() {
            out.push_str(&format!("step: {}\n", step.join(", ")));
        }
        if !self.dominant.is_empty() {
            out.push_str(&self.dominant);
            out.push('\n');
        }
        for r in self.rows.iter().filter(|r| r.failed()) {
            out.push_str(&format!("{} {}: {}\n", r.layer, r.direction, r.validated));
        }
        out
    }

    /// One side's table: time (median, min-max), share of the step, the rate in a column of its
    /// unit, the fraction of the FMA peak (CPU), the check, the dispatches (GPU).
    fn side_table(&self, gpu: bool) -> String {
        let f = |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |x| format!("{x:.prec$}"));
        let pct = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{:.1}%", 100.0 * x));
        let side = if gpu { "GPU" } else { "CPU" };
        let mut head: Vec<String> =
            ["layer", "direction", &format!("{side} us"), "min-max", "share", "GFLOP/s", "GB/s"]
                .into_iter()
                .map(String::from)
                .collect();
        if !gpu {
            head.push("peak".into());
        }
        head.push("check".into());
        if gpu {
            head.push("dispatches".into());
        }
        let mut lines: Vec<Vec<String>> = vec![head];
        for r in &self.rows {
            let (us, rate, share) =
                if gpu { (r.gpu_us, r.gpu_rate, r.gpu_share) } else { (r.cpu_us, r.cpu_rate, r.cpu_share) };
            let spread = if gpu { (r.gpu_min_us, r.gpu_max_us) } else { (r.cpu_min_us, r.cpu_max_us) };
            let range = match spread {
                (Some(lo), Some(hi)) => format!("{lo:.0}-{hi:.0}"),
                _ => "-".into(),
            };
            let (flops, bytes) = match r.unit {
                Unit::GflopPerS => (f(rate, 1), "-".to_string()),
                Unit::GbPerS => ("-".to_string(), f(rate, 1)),
            };
            let mut l = vec![r.layer.clone(), r.direction.clone(), f(us, 1), range, pct(share), flops, bytes];
            if !gpu {
                l.push(pct(r.cpu_peak_fraction));
            }
            l.push(if r.failed() { "FAILED".to_string() } else { r.validated.clone() });
            if gpu {
                l.push(r.gpu_kernels.len().to_string());
            }
            lines.push(l);
        }
        let check = lines[0].iter().position(|h| h == "check").unwrap_or(usize::MAX);
        let numeric = |c: usize| c >= 2 && c != check;
        let cols = lines[0].len();
        let width: Vec<usize> =
            (0..cols).map(|c| lines.iter().map(|l| l[c].chars().count()).max().unwrap_or(0)).collect();
        let mut out = String::new();
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
