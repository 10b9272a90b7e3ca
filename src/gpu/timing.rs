//! Timing GPU work for `lenet bench`: a compute pass holding N back-to-back dispatches on
//! resident buffers, timed by timestamp queries written at the pass's start and end where the
//! adapter offers TIMESTAMP_QUERY, else by the host's wall clock around submit + wait.

use std::time::Instant;

use anyhow::{ensure, Context as _};

use super::context::GpuContext;
use super::ops::read_mapped;

/// How a GPU time was measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TimingMethod {
    /// Timestamps written at the start and end of the compute pass (device clock).
    Timestamps,
    /// Host wall clock around one submit and wait (includes the submit/wait round trip).
    WallClock,
}

impl std::fmt::Display for TimingMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TimingMethod::Timestamps => "timestamp queries around a pass of back-to-back dispatches",
            TimingMethod::WallClock => "wall clock around submit+wait of a pass of back-to-back dispatches",
        })
    }
}

/// Times compute passes on one context; owns the query set and its resolve/readback buffers.
pub struct PassTimer {
    ctx: GpuContext,
    queries: Option<(wgpu::QuerySet, wgpu::Buffer, wgpu::Buffer)>,
}

impl PassTimer {
    /// Uses timestamp queries when the device was created with TIMESTAMP_QUERY (and
    /// `allow_timestamps`), else the wall clock.
    pub fn new(ctx: &GpuContext, allow_timestamps: bool) -> Self {
        let have = ctx.device.features().contains(wgpu::Features::TIMESTAMP_QUERY);
        let queries = (have && allow_timestamps).then(|| {
            let set = ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("bench_timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            });
            let resolve = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("bench_timestamps_resolve"),
                size: 16,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let readback = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("bench_timestamps_readback"),
                size: 16,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            (set, resolve, readback)
        });
        PassTimer { ctx: ctx.clone(), queries }
    }

    pub fn method(&self) -> TimingMethod {
        if self.queries.is_some() {
            TimingMethod::Timestamps
        } else {
            TimingMethod::WallClock
        }
    }

    /// Seconds for one compute pass into which `record` puts its dispatches.
    pub fn time_pass(&self, record: &dyn Fn(&mut wgpu::ComputePass<'_>)) -> anyhow::Result<f64> {
        let ctx = &self.ctx;
        let mut enc =
            ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("bench") });
        {
            let timestamp_writes =
                self.queries.as_ref().map(|(set, _, _)| wgpu::ComputePassTimestampWrites {
                    query_set: set,
                    beginning_of_pass_write_index: Some(0),
                    end_of_pass_write_index: Some(1),
                });
            let mut pass = enc
                .begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("bench"), timestamp_writes });
            record(&mut pass);
        }
        match &self.queries {
            Some((set, resolve, readback)) => {
                enc.resolve_query_set(set, 0..2, resolve, 0);
                enc.copy_buffer_to_buffer(resolve, 0, readback, 0, 16);
                ctx.queue.submit([enc.finish()]);
                let bytes = read_mapped(ctx, readback, 16).context("reading the timestamps")?;
                let t: [u64; 2] = bytemuck::pod_read_unaligned(&bytes[..16]);
                ensure!(t[1] >= t[0], "timestamps went backwards ({} then {})", t[0], t[1]);
                let ns = (t[1] - t[0]) as f64 * ctx.queue.get_timestamp_period() as f64;
                Ok(ns * 1e-9)
            }
            None => {
                let start = Instant::now();
                ctx.queue.submit([enc.finish()]);
                ctx.device.poll(wgpu::PollType::wait_indefinitely())?;
                Ok(start.elapsed().as_secs_f64())
            }
        }
    }
}

/// The median of `samples` (sorted in place); NaN for none.
pub fn median(samples: &mut [f64]) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    if n % 2 == 1 {
        samples[n / 2]
    } else {
        0.5 * (samples[n / 2 - 1] + samples[n / 2])
    }
}

/// A per-call time: the median over samples of one timed pass / calls in it, and the fastest and
/// slowest sample.
#[derive(Clone, Copy, Debug)]
pub struct Measured {
    pub seconds: f64,
    pub min: f64,
    pub max: f64,
    /// Calls timed in all (samples x calls per pass).
    pub calls: usize,
}

/// Warms up with one pass of one call, then times up to `samples` passes of `calls_per_pass`
/// calls each (at least 3 passes, stopping early once `budget_s` seconds of wall time are spent),
/// and returns the median time per call.
pub fn time_calls(
    timer: &PassTimer,
    record_one: &dyn Fn(&mut wgpu::ComputePass<'_>),
    calls_per_pass: usize,
    samples: usize,
    budget_s: f64,
) -> anyhow::Result<Measured> {
    let start = Instant::now();
    timer.time_pass(record_one)?;
    // Fewer calls per pass on a slow adapter, so that the budget still buys several samples.
    let warm = start.elapsed().as_secs_f64();
    let calls = if warm * calls_per_pass as f64 * 3.0 > budget_s {
        ((budget_s / 3.0 / warm.max(1e-9)) as usize).clamp(1, calls_per_pass)
    } else {
        calls_per_pass
    };
    let record = |pass: &mut wgpu::ComputePass<'_>| {
        for _ in 0..calls {
            record_one(pass);
        }
    };
    let mut per_call = Vec::new();
    let start = Instant::now();
    while per_call.len() < samples.max(1) {
        per_call.push(timer.time_pass(&record)? / calls as f64);
        if per_call.len() >= 3.min(samples.max(1)) && start.elapsed().as_secs_f64() > budget_s {
            break;
        }
    }
    timer.ctx.check_errors()?;
    let n = per_call.len();
    let min = per_call.iter().copied().fold(f64::INFINITY, f64::min);
    let max = per_call.iter().copied().fold(0.0, f64::max);
    Ok(Measured { seconds: median(&mut per_call), min, max, calls: n * calls })
}

/// What one pass of consecutive training steps measured.
#[derive(Clone, Debug, PartialEq)]
pub enum PassTimes {
    /// Seconds of each step of the pass (timestamps written between steps).
    PerStep(Vec<f64>),
    /// Seconds of the whole pass (timestamps at its ends, or the host's clock).
    Whole(f64),
}

/// How a [`StepPassTimer`] times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepTimingMethod {
    /// A timestamp before the first step and after each (TIMESTAMP_QUERY_INSIDE_PASSES).
    BetweenSteps,
    /// Timestamps at the pass's start and end, over its steps.
    PassTimestamps,
    /// The host's clock around submit and wait, over the pass's steps.
    HostClock,
}

impl std::fmt::Display for StepTimingMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StepTimingMethod::BetweenSteps => "timestamps between steps",
            StepTimingMethod::PassTimestamps => "timestamps around each pass",
            StepTimingMethod::HostClock => "the host clock around each pass",
        })
    }
}

/// Times compute passes of `steps` consecutive training steps, one compute pass each as the
/// trainer records a chunk: with a timestamp between steps where the device can write them
/// inside a pass, else at the pass's ends, else by the host's clock.
pub struct StepPassTimer {
    ctx: GpuContext,
    steps: usize,
    method: StepTimingMethod,
    /// The query set (steps + 1 entries, or 2) and its resolve and read-back buffers.
    queries: Option<(wgpu::QuerySet, wgpu::Buffer, wgpu::Buffer)>,
}

impl StepPassTimer {
    pub fn new(ctx: &GpuContext, steps: usize) -> Self {
        let features = ctx.device.features();
        let method = if features.contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES) {
            StepTimingMethod::BetweenSteps
        } else if features.contains(wgpu::Features::TIMESTAMP_QUERY) {
            StepTimingMethod::PassTimestamps
        } else {
            StepTimingMethod::HostClock
        };
        let count = set_len(method, steps);
        let queries = (method != StepTimingMethod::HostClock).then(|| {
            let bytes = 8 * count as u64;
            let set = ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("bench_step_timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count,
            });
            let resolve = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("bench_step_timestamps_resolve"),
                size: bytes,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let readback = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("bench_step_timestamps_readback"),
                size: bytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            (set, resolve, readback)
        });
        StepPassTimer { ctx: ctx.clone(), steps, method, queries }
    }

    pub fn method(&self) -> StepTimingMethod {
        self.method
    }

    /// Records one pass of the timer's steps, `record_step(pass, k)` recording step k, submits
    /// it and waits.
    pub fn time(&self, record_step: &dyn Fn(&mut wgpu::ComputePass<'_>, usize)) -> anyhow::Result<PassTimes> {
        let ctx = &self.ctx;
        let mut enc =
            ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("bench_steps") });
        {
            let ends = match (&self.queries, self.method) {
                (Some((set, _, _)), StepTimingMethod::PassTimestamps) => {
                    Some(wgpu::ComputePassTimestampWrites {
                        query_set: set,
                        beginning_of_pass_write_index: Some(0),
                        end_of_pass_write_index: Some(1),
                    })
                }
                _ => None,
            };
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("bench_steps"),
                timestamp_writes: ends,
            });
            let between = match (&self.queries, self.method) {
                (Some((set, _, _)), StepTimingMethod::BetweenSteps) => Some(set),
                _ => None,
            };
            for k in 0..self.steps {
                if let Some(set) = between {
                    pass.write_timestamp(set, k as u32);
                }
                record_step(&mut pass, k);
            }
            if let Some(set) = between {
                pass.write_timestamp(set, self.steps as u32);
            }
        }
        let Some((set, resolve, readback)) = &self.queries else {
            let start = Instant::now();
            ctx.queue.submit([enc.finish()]);
            ctx.device.poll(wgpu::PollType::wait_indefinitely())?;
            return Ok(PassTimes::Whole(start.elapsed().as_secs_f64()));
        };
        let count = set_len(self.method, self.steps);
        let bytes = 8 * count as u64;
        enc.resolve_query_set(set, 0..count, resolve, 0);
        enc.copy_buffer_to_buffer(resolve, 0, readback, 0, bytes);
        ctx.queue.submit([enc.finish()]);
        let raw = read_mapped(ctx, readback, bytes).context("reading the step timestamps")?;
        let ticks: Vec<u64> = raw.chunks_exact(8).map(bytemuck::pod_read_unaligned).collect();
        let period = ctx.queue.get_timestamp_period() as f64 * 1e-9;
        let seconds = deltas(&ticks, period)?;
        Ok(match self.method {
            StepTimingMethod::BetweenSteps => PassTimes::PerStep(seconds),
            _ => PassTimes::Whole(seconds[0]),
        })
    }
}

fn set_len(method: StepTimingMethod, steps: usize) -> u32 {
    if method == StepTimingMethod::BetweenSteps {
        steps as u32 + 1
    } else {
        2
    }
}

/// Seconds between successive timestamps (`period` seconds a tick); an error if they go back.
pub fn deltas(ticks: &[u64], period: f64) -> anyhow::Result<Vec<f64>> {
    ticks
        .windows(2)
        .map(|w| {
            ensure!(w[1] >= w[0], "timestamps went backwards ({} then {})", w[0], w[1]);
            Ok((w[1] - w[0]) as f64 * period)
        })
        .collect()
}
