//! SVG figures from metric rows (every figure is also in metrics.csv).
use super::outputs::MetricRow;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

/// Blue (0) → white (0.5) → red (1) for values in [0, 1]; grey for NaN.
pub fn colour(v: f64) -> RGBColor {
    if !v.is_finite() {
        return RGBColor(200, 200, 200);
    }
    let v = v.clamp(0.0, 1.0);
    let lerp = |a: u8, b: u8, t: f64| (a as f64 + (b as f64 - a as f64) * t).round() as u8;
    if v < 0.5 {
        let t = v / 0.5;
        RGBColor(lerp(59, 255, t), lerp(76, 255, t), lerp(192, 255, t))
    } else {
        let t = (v - 0.5) / 0.5;
        RGBColor(lerp(255, 180, t), lerp(255, 4, t), lerp(255, 38, t))
    }
}

/// Distinct positions in first-seen order (the order the sweep ran them).
fn positions_in_order(rows: &[&MetricRow]) -> Vec<String> {
    let mut positions: Vec<String> = Vec::new();
    for r in rows.iter().filter(|r| r.is_main()) {
        if !positions.contains(&r.position) {
            positions.push(r.position.clone());
        }
    }
    positions
}

/// Heatmap of `value(row)` over layer (y) x position (x) for the rows of one site and split.
pub fn heatmap(path: &Path, title: &str, rows: &[&MetricRow], value: impl Fn(&MetricRow) -> f64) -> Result<()> {
    let mut layers: Vec<usize> = rows.iter().map(|r| r.layer).collect();
    layers.sort();
    layers.dedup();
    let positions = positions_in_order(rows);
    let (w, h) = (140 + 60 * positions.len() as u32, 120 + 22 * layers.len() as u32);
    let root = SVGBackend::new(path, (w.max(360), h.max(240))).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0..positions.len(), 0..layers.len())
        .map_err(|e| anyhow!("{e}"))?;
    let pos_labels = positions.clone();
    let layer_labels = layers.clone();
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(positions.len())
        .y_labels(layers.len())
        .x_label_formatter(&|x| pos_labels.get(*x).cloned().unwrap_or_default())
        .y_label_formatter(&|y| layer_labels.get(*y).map(|l| l.to_string()).unwrap_or_default())
        .x_desc("position")
        .y_desc("layer")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .draw_series(rows.iter().map(|r| {
            let x = positions.iter().position(|p| p == &r.position).unwrap_or(0);
            let y = layers.iter().position(|l| *l == r.layer).unwrap_or(0);
            Rectangle::new([(x, y), (x + 1, y + 1)], colour(value(r)).filled())
        }))
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// Line chart of `value(row)` against layer, one series per position; control rows (random
/// subspace, permuted labels) are drawn as thin lines in their position's colour, so the trained
/// IIA is read against them.
pub fn by_layer(path: &Path, title: &str, y_desc: &str, rows: &[&MetricRow], value: impl Fn(&MetricRow) -> f64) -> Result<()> {
    let positions = positions_in_order(rows);
    let mut controls: Vec<&str> = rows.iter().filter(|r| !r.is_main()).map(|r| r.control.as_str()).collect();
    controls.sort();
    controls.dedup();
    let max_layer = rows.iter().map(|r| r.layer).max().unwrap_or(0) as f64;
    let vals: Vec<f64> = rows.iter().map(|r| value(r)).filter(|v| v.is_finite()).collect();
    let (lo, hi) = (vals.iter().cloned().fold(0.0, f64::min), vals.iter().cloned().fold(1.0, f64::max));
    let root = SVGBackend::new(path, (640, 400)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(45)
        .build_cartesian_2d(0f64..max_layer.max(1.0), lo..hi)
        .map_err(|e| anyhow!("{e}"))?;
    chart.configure_mesh().x_desc("layer").y_desc(y_desc).draw().map_err(|e| anyhow!("{e}"))?;
    for (i, p) in positions.iter().enumerate() {
        let series = |control: &str| -> Vec<(f64, f64)> {
            let mut pts: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| &r.position == p && r.control == control)
                .map(|r| (r.layer as f64, value(r)))
                .filter(|x| x.1.is_finite())
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            pts
        };
        let c = Palette99::pick(i).to_rgba();
        let pts = series("none");
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?
            .label(p.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], c));
        chart.draw_series(pts.into_iter().map(|pt| Circle::new(pt, 3, c.filled()))).map_err(|e| anyhow!("{e}"))?;
        for (j, ctl) in controls.iter().enumerate() {
            let faint = c.mix(0.55 - 0.15 * j as f64);
            chart
                .draw_series(LineSeries::new(series(ctl), faint.stroke_width(1)))
                .map_err(|e| anyhow!("{e}"))?
                .label(format!("{p} ({ctl})"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], faint));
        }
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw().map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
