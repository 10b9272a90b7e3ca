//! `--plot`: training curves as an SVG, loss on the left and accuracy on the right.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use crate::train::MetricRow;

/// Steps averaged into one point of the per-step curves, so a batch's noise does not hide the trend.
const SMOOTHING: usize = 20;

/// Draws per-step training loss and accuracy (smoothed over [`SMOOTHING`] steps) and the
/// test figures of each evaluation. Writes atomically, like checkpoints.
pub fn write_training_svg(path: &Path, history: &[MetricRow]) -> Result<()> {
    let mut svg = String::new();
    draw(&mut svg, history).map_err(|e| anyhow!("{}: cannot draw the plot: {e}", path.display()))?;
    crate::checkpoint::write_atomic(path, svg.as_bytes())
        .map_err(|e| anyhow!("{}: cannot write the plot: {e}", path.display()))
}

fn smoothed(rows: &[&MetricRow], value: fn(&MetricRow) -> f64) -> Vec<(f64, f64)> {
    rows.chunks(SMOOTHING)
        .map(|c| {
            let step = c.last().map_or(0, |r| r.step) as f64;
            (step, c.iter().map(|r| value(r)).sum::<f64>() / c.len() as f64)
        })
        .collect()
}

fn draw(svg: &mut String, history: &[MetricRow]) -> Result<(), Box<dyn std::error::Error>> {
    let train: Vec<&MetricRow> = history.iter().filter(|r| r.kind == "train").collect();
    let test: Vec<&MetricRow> = history.iter().filter(|r| r.kind == "test").collect();
    let first = history.iter().map(|r| r.step).min().unwrap_or(0) as f64;
    let last = (history.iter().map(|r| r.step).max().unwrap_or(1) as f64).max(first + 1.0);

    let root = SVGBackend::with_string(svg, (1100, 450)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(550);

    type Value = fn(&MetricRow) -> f64;
    let panels: [(&str, Value); 2] = [("loss", |r| r.loss), ("accuracy (%)", |r| 100.0 * r.accuracy)];
    for (area, (name, value)) in [&left, &right].into_iter().zip(panels) {
        let train_curve = smoothed(&train, value);
        let test_points: Vec<(f64, f64)> = test.iter().map(|r| (r.step as f64, value(r))).collect();
        let ys = train_curve.iter().chain(&test_points).map(|p| p.1);
        let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), y| (l.min(y), h.max(y)));
        let (lo, hi) = if lo.is_finite() { (lo, hi.max(lo + 1e-3)) } else { (0.0, 1.0) };
        let pad = 0.05 * (hi - lo);
        let mut chart = ChartBuilder::on(area)
            .caption(name, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(first..last, (lo - pad)..(hi + pad))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc(name)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()?;
        chart
            .draw_series(LineSeries::new(train_curve, BLUE.stroke_width(2)))?
            .label(format!("train (mean of {SMOOTHING} steps)"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        chart
            .draw_series(test_points.iter().map(|&p| Circle::new(p, 4, RED.filled())))?
            .label("test set")
            .legend(|(x, y)| Circle::new((x + 10, y), 4, RED.filled()));
        chart.draw_series(LineSeries::new(test_points, RED))?;
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    }
    root.present()?;
    Ok(())
}
