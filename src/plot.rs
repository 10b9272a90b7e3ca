//! `--plot`: a run's curves as an SVG, three panels side by side: the loss, the accuracy and the
//! learning rate, against the step. Training figures are means over at least `SMOOTHING` steps
//! (every point, the last included); each evaluation (validation and test) is a point. The loss
//! is drawn on a logarithmic axis: a trained LeNet-5's loss falls by two orders of magnitude, and
//! on a linear axis everything after the first epoch is a flat line at the bottom.
//!
//! The axes are chosen for reading, not only for fitting: step ticks are whole numbers, every
//! range has a margin so that the first and last points (the final test score) are drawn whole,
//! and the accuracy axis starts just below where the curves settle (the first steps' accuracy, far
//! below, would squeeze the 97-100% where a trained LeNet-5 lives into a sliver).

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use crate::train::MetricRow;

/// Steps averaged into one point of the per-step curves, so a batch's noise does not hide the trend.
const SMOOTHING: usize = 20;
/// The share of each axis's span left blank on either side.
const MARGIN: f64 = 0.03;
/// The accuracy axis ignores the training curve's first this share of the steps when it picks
/// its lower end (the first steps of a run score far below where it ends up).
const ACCURACY_WARMUP: f64 = 0.1;
/// The accuracy axis always reaches down to at least this (in %).
const ACCURACY_FLOOR_AT_MOST: f64 = 97.0;
const PANEL: (u32, u32) = (500, 450);

/// Draws the curves of `history` and writes them atomically, like checkpoints.
pub fn write_training_svg(path: &Path, history: &[MetricRow]) -> Result<()> {
    let svg = training_svg(history).map_err(|e| anyhow!("{}: cannot draw the plot: {e}", path.display()))?;
    crate::files::write_atomic(path, svg.as_bytes())
        .map_err(|e| anyhow!("{}: cannot write the plot: {e}", path.display()))
}

/// The SVG document of `history`'s curves.
pub fn training_svg(history: &[MetricRow]) -> Result<String, Box<dyn std::error::Error>> {
    let mut svg = String::new();
    draw(&mut svg, history)?;
    Ok(svg)
}

/// Up to about `count` evenly spaced round values (1, 2 or 5 times a power of ten, and never
/// less than `min_step` apart) from `lo` to `hi`, and the step between them.
pub fn ticks(lo: f64, hi: f64, count: usize, min_step: f64) -> (Vec<f64>, f64) {
    let span = (hi - lo).max(f64::MIN_POSITIVE);
    let raw = span / count.max(1) as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * magnitude)
        .max(min_step);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    // Multiples of the step, computed from integers so that no rounding creeps in.
    let values = (first..=last).map(|i| i as f64 * step).collect();
    (values, step)
}

/// A tick label: as many decimals as the step between ticks needs (none for whole numbers).
fn tick_label(value: f64, step: f64) -> String {
    let decimals = if step >= 1.0 { 0 } else { (-step.log10().floor()) as usize };
    format!("{value:.decimals$}")
}

/// `lo..hi` widened by [`MARGIN`] of its span on either side (and made non-empty).
fn with_margin(lo: f64, hi: f64) -> (f64, f64) {
    let span = if hi > lo { hi - lo } else { lo.abs().max(1.0) * 1e-3 };
    (lo - MARGIN * span, hi + MARGIN * span)
}

/// Means of consecutive steps, each over at least [`SMOOTHING`] of them (all of them when there
/// are fewer), placed at the bucket's last step. The buckets are counted back from the last step,
/// so the final point is a full mean of the run's last steps; the remainder of the division joins
/// the first bucket rather than making a point of a few noisy steps.
fn smoothed(rows: &[&MetricRow], value: impl Fn(&MetricRow) -> f64) -> Vec<(f64, f64)> {
    let mut buckets: Vec<&[&MetricRow]> = rows.rchunks(SMOOTHING).collect();
    buckets.reverse();
    if buckets.len() > 1 && buckets[0].len() < SMOOTHING {
        let first = buckets[0].len() + buckets[1].len();
        buckets.splice(0..2, [&rows[..first]]);
    }
    buckets
        .into_iter()
        .map(|c| {
            let step = c.last().map_or(0, |r| r.step) as f64;
            (step, c.iter().map(|r| value(r)).sum::<f64>() / c.len() as f64)
        })
        .collect()
}

/// Tick values for a logarithmic axis from `lo` to `hi` (both > 0): 1, 2 and 5 times each power
/// of ten inside the range, thinned to the powers of ten alone when that would be more than
/// `count` of them (and the ends themselves when the range holds no such value).
pub fn log_ticks(lo: f64, hi: f64, count: usize) -> Vec<f64> {
    let (first, last) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    let in_range = |v: &f64| *v >= lo * (1.0 - 1e-12) && *v <= hi * (1.0 + 1e-12);
    let with = |mantissas: &[f64]| -> Vec<f64> {
        (first..=last)
            .flat_map(|e| mantissas.iter().map(move |m| m * 10f64.powi(e)))
            .filter(in_range)
            .collect()
    };
    let fine = with(&[1.0, 2.0, 5.0]);
    let ticks = if fine.len() <= count.max(1) { fine } else { with(&[1.0]) };
    if ticks.len() >= 2 {
        ticks
    } else {
        vec![lo, hi]
    }
}

/// A tick label on a logarithmic axis: the value with as many decimals as its own magnitude
/// needs (0.01, 0.2, 5), in scientific notation below 0.001.
fn log_tick_label(value: f64) -> String {
    if value >= 1.0 {
        format!("{value:.0}")
    } else if value >= 1e-3 {
        let decimals = (-value.log10().floor()) as usize;
        format!("{value:.decimals$}")
    } else {
        format!("{value:.0e}")
    }
}

/// The accuracy axis (in %): from just below the lowest evaluation and the lowest training
/// point after the first `ACCURACY_WARMUP` of the steps (at most `ACCURACY_FLOOR_AT_MOST`),
/// rounded down to a whole percent, up to 100.
pub fn accuracy_axis(train: &[(f64, f64)], evals: &[(f64, f64)]) -> (f64, f64) {
    let (first, last) = train
        .iter()
        .chain(evals)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let settled = first + ACCURACY_WARMUP * (last - first);
    let lowest = train
        .iter()
        .filter(|p| p.0 >= settled)
        .chain(evals)
        .map(|p| p.1)
        .fold(ACCURACY_FLOOR_AT_MOST, f64::min);
    (lowest.floor().max(0.0), 100.0)
}

/// An f64 axis from `lo` to `hi` whose tick marks are exactly `ticks` (plotters' own f64 axis
/// picks its ticks itself, and may put them between whole numbers); linear, or logarithmic when
/// `log` is set (then `lo` > 0).
struct TickedAxis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
    log: bool,
}

impl Ranged for TickedAxis {
    type FormatOption = plotters::coord::ranged1d::DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let share = if self.log {
            (value.max(f64::MIN_POSITIVE).log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (value - self.lo) / (self.hi - self.lo)
        };
        limit.0 + (share * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<Hint: plotters::coord::ranged1d::KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        // The light mesh (between the ticks) is left out.
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}

struct Curve {
    label: String,
    color: RGBColor,
    points: Vec<(f64, f64)>,
    /// Evaluations are drawn as dots joined by a thin line; training curves as a thick line.
    dots: bool,
}

struct Panel {
    title: &'static str,
    curves: Vec<Curve>,
    y_range: (f64, f64),
    /// The smallest tick step of the y axis (1 for percentages: whole-number labels).
    y_min_step: f64,
    scientific: bool,
    /// A logarithmic y axis (the loss).
    log: bool,
}

fn draw(svg: &mut String, history: &[MetricRow]) -> Result<(), Box<dyn std::error::Error>> {
    let of_kind = |kind: &str| -> Vec<&MetricRow> { history.iter().filter(|r| r.kind == kind).collect() };
    let (train, val, test) = (of_kind("train"), of_kind("val"), of_kind("test"));
    let first = history.iter().map(|r| r.step).min().unwrap_or(0) as f64;
    let last = (history.iter().map(|r| r.step).max().unwrap_or(1) as f64).max(first + 1.0);
    let (x_lo, x_hi) = with_margin(first, last);
    let (x_ticks, x_step) = ticks(first, last, 6, 1.0);

    let points = |rows: &[&MetricRow], value: fn(&MetricRow) -> f64| -> Vec<(f64, f64)> {
        rows.iter().map(|r| (r.step as f64, value(r))).collect()
    };
    let loss = |r: &MetricRow| r.loss;
    let percent = |r: &MetricRow| 100.0 * r.accuracy;
    let curves_of = |value: fn(&MetricRow) -> f64| {
        vec![
            Curve {
                label: format!("train (means of {SMOOTHING}+ steps)"),
                color: BLUE,
                points: smoothed(&train, value),
                dots: false,
            },
            Curve {
                label: "validation".into(),
                color: RGBColor(0, 140, 60),
                points: points(&val, value),
                dots: true,
            },
            Curve { label: "test".into(), color: RED, points: points(&test, value), dots: true },
        ]
    };
    let loss_curves = curves_of(loss);
    let (loss_range, loss_log) = {
        let ys = loss_curves.iter().flat_map(|c| c.points.iter().map(|p| p.1));
        let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), y| (l.min(y), h.max(y)));
        if lo.is_finite() && lo > 0.0 && hi > lo {
            ((lo, hi), true)
        } else if lo.is_finite() {
            // A loss of exactly 0 (or a single value) has no logarithmic range: linear from 0.
            ((0f64.min(lo), hi), false)
        } else {
            ((0.0, 1.0), false)
        }
    };
    let mut accuracy_curves = curves_of(percent);
    let evals: Vec<(f64, f64)> = accuracy_curves[1..].iter().flat_map(|c| c.points.clone()).collect();
    let accuracy_range = accuracy_axis(&accuracy_curves[0].points, &evals);
    for curve in &mut accuracy_curves {
        // Below the axis: the first steps, which the axis leaves out on purpose.
        curve.points.retain(|p| p.1 >= accuracy_range.0);
    }
    let lr_points: Vec<(f64, f64)> = train.iter().filter_map(|r| Some((r.step as f64, r.lr?))).collect();
    let lr_hi = lr_points.iter().map(|p| p.1).fold(0.0, f64::max);
    let panels = [
        Panel {
            title: "loss",
            curves: loss_curves,
            y_range: loss_range,
            y_min_step: 0.0,
            scientific: false,
            log: loss_log,
        },
        Panel {
            title: "accuracy (%)",
            curves: accuracy_curves,
            y_range: accuracy_range,
            y_min_step: 1.0,
            scientific: false,
            log: false,
        },
        Panel {
            title: "learning rate",
            curves: vec![Curve { label: "each step's".into(), color: BLUE, points: lr_points, dots: false }],
            y_range: (0.0, if lr_hi > 0.0 { lr_hi } else { 1e-3 }),
            y_min_step: 0.0,
            scientific: true,
            log: false,
        },
    ];

    let root = SVGBackend::with_string(svg, (PANEL.0 * panels.len() as u32, PANEL.1)).into_drawing_area();
    root.fill(&WHITE)?;
    for (area, panel) in root.split_evenly((1, panels.len())).iter().zip(&panels) {
        let (y_lo, y_hi) = if panel.log {
            let (lo, hi) = with_margin(panel.y_range.0.log10(), panel.y_range.1.log10());
            (10f64.powf(lo), 10f64.powf(hi))
        } else {
            with_margin(panel.y_range.0, panel.y_range.1)
        };
        let (y_ticks, y_step) = if panel.log {
            (log_ticks(panel.y_range.0, panel.y_range.1, 8), 0.0)
        } else {
            ticks(panel.y_range.0, panel.y_range.1, 6, panel.y_min_step)
        };
        let mut chart = ChartBuilder::on(area)
            .caption(panel.title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(35)
            .y_label_area_size(if panel.scientific { 65 } else { 50 })
            .build_cartesian_2d(
                TickedAxis { lo: x_lo, hi: x_hi, ticks: x_ticks.clone(), log: false },
                TickedAxis { lo: y_lo, hi: y_hi, ticks: y_ticks, log: panel.log },
            )?;
        let (scientific, log) = (panel.scientific, panel.log);
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc(if log { "log scale" } else { "" })
            .x_label_formatter(&|x| tick_label(*x, x_step))
            .y_label_formatter(&|y| {
                if log {
                    log_tick_label(*y)
                } else if scientific {
                    format!("{y:.1e}")
                } else {
                    tick_label(*y, y_step)
                }
            })
            .draw()?;
        for curve in panel.curves.iter().filter(|c| !c.points.is_empty()) {
            let color = curve.color;
            if curve.dots {
                chart.draw_series(LineSeries::new(curve.points.clone(), color))?;
                chart
                    .draw_series(curve.points.iter().map(|&p| Circle::new(p, 4, color.filled())))?
                    .label(curve.label.clone())
                    .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
            } else {
                chart
                    .draw_series(LineSeries::new(curve.points.clone(), color.stroke_width(2)))?
                    .label(curve.label.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            }
        }
        // One curve needs no legend: the title names it.
        if panel.curves.len() > 1 {
            let corner = match panel.title {
                "loss" => SeriesLabelPosition::UpperRight,
                _ => SeriesLabelPosition::LowerRight,
            };
            chart
                .configure_series_labels()
                .position(corner)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
        }
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_inside_the_range() {
        let (t, step) = ticks(1.0, 7.0, 6, 1.0);
        assert_eq!((t, step), (vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], 1.0));
        // A short run: never a fractional step.
        let (t, step) = ticks(1.0, 3.0, 6, 1.0);
        assert_eq!((t, step), (vec![1.0, 2.0, 3.0], 1.0));
        let (t, step) = ticks(1.0, 2340.0, 6, 1.0);
        assert_eq!((t.clone(), step), ((1..=4).map(|i| i as f64 * 500.0).collect::<Vec<_>>(), 500.0));
        assert!(t.iter().all(|x| x.fract() == 0.0));
        let (t, step) = ticks(0.0, 0.33, 6, 0.0);
        assert_eq!(step, 0.1);
        assert_eq!(t.iter().map(|&x| tick_label(x, step)).collect::<Vec<_>>(), ["0.0", "0.1", "0.2", "0.3"]);
    }

    #[test]
    fn the_accuracy_axis_shows_where_the_curves_settle() {
        // A run from 10% to 99%: its first steps do not pull the axis down.
        let train: Vec<(f64, f64)> = (1..=100)
            .map(|s| (s as f64 * 20.0, if s < 5 { 10.0 * s as f64 } else { 98.5 + s as f64 / 100.0 }))
            .collect();
        let evals = [(1000.0, 98.9), (2000.0, 99.1)];
        assert_eq!(accuracy_axis(&train, &evals), (97.0, 100.0));
        // A run that never gets there keeps all of its settled curve in view.
        let poor = [(100.0, 60.0), (200.0, 80.5), (300.0, 85.0)];
        assert_eq!(accuracy_axis(&poor, &[(300.0, 84.2)]), (80.0, 100.0));
    }

    fn train_rows(steps: std::ops::RangeInclusive<u64>) -> Vec<MetricRow> {
        steps
            .map(|step| MetricRow {
                kind: "train",
                step,
                epoch: 1,
                seconds: 0.0,
                lr: Some(1e-3),
                loss: step as f64,
                accuracy: 0.5,
            })
            .collect()
    }

    #[test]
    fn every_smoothed_point_is_a_mean_of_at_least_the_smoothing_window() {
        // 45 steps: buckets 1-25 and 26-45, never a last point of only 5 steps (the old
        // `chunks(20)` gave 1-20, 21-40, 41-45: its last point the mean of 5 steps).
        let rows = train_rows(1..=45);
        let refs: Vec<&MetricRow> = rows.iter().collect();
        let points = smoothed(&refs, |r| r.loss);
        assert_eq!(points, vec![(25.0, 13.0), (45.0, 35.5)]);
        // A whole number of windows is unchanged: 40 steps, two means of 20.
        let points = smoothed(&refs[..40], |r| r.loss);
        assert_eq!(points, vec![(20.0, 10.5), (40.0, 30.5)]);
        // Fewer steps than the window: one point over all of them.
        assert_eq!(smoothed(&refs[..3], |r| r.loss), vec![(3.0, 2.0)]);
        assert!(smoothed(&[], |r| r.loss).is_empty());
    }

    #[test]
    fn log_ticks_are_round_values_inside_the_range() {
        assert_eq!(log_ticks(0.03, 2.3, 8), vec![0.05, 0.1, 0.2, 0.5, 1.0, 2.0]);
        // Too many 1-2-5 ticks: powers of ten only.
        assert_eq!(log_ticks(1e-4, 2.0, 8), vec![1e-4, 1e-3, 1e-2, 1e-1, 1.0]);
        // No round value inside: the ends.
        assert_eq!(log_ticks(0.31, 0.42, 8), vec![0.31, 0.42]);
        let labels: Vec<String> = [0.0001, 0.01, 0.2, 5.0].iter().map(|&v| log_tick_label(v)).collect();
        assert_eq!(labels, ["1e-4", "0.01", "0.2", "5"]);
    }

    #[test]
    fn the_loss_axis_is_logarithmic() {
        let axis = TickedAxis { lo: 0.01, hi: 1.0, ticks: vec![], log: true };
        // 0.1 is halfway between 0.01 and 1 on a log axis (a linear one puts it at 9%).
        assert_eq!(axis.map(&0.1, (0, 100)), 50);
        assert_eq!(axis.map(&0.01, (0, 100)), 0);
        assert_eq!(axis.map(&1.0, (0, 100)), 100);
        let svg = training_svg(&train_rows(1..=200)).unwrap();
        assert!(svg.contains("\nlog scale\n"), "the loss panel does not say its axis is logarithmic");
    }
}
