//! The study's SVG figures; each one's data is also a CSV in the run folder.
use super::tables::PilotResult;
use super::tables::DeltaRow;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

type Series = (String, Vec<(f64, f64)>);

fn e<E: std::fmt::Display>(err: E) -> anyhow::Error {
    anyhow!("{err}")
}

fn span(vals: impl Iterator<Item = f64>, pad: f64) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in vals.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let p = ((hi - lo) * pad).max(1e-3);
    (lo - p, hi + p)
}

/// One line (with markers) per series.
fn lines(path: &Path, title: &str, x_desc: &str, y_desc: &str, series: &[Series]) -> Result<()> {
    let (x0, x1) = span(series.iter().flat_map(|s| s.1.iter().map(|p| p.0)), 0.02);
    let (y0, y1) = span(series.iter().flat_map(|s| s.1.iter().map(|p| p.1)), 0.05);
    let root = SVGBackend::new(path, (720, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(e)?;
    chart.configure_mesh().x_desc(x_desc).y_desc(y_desc).draw().map_err(e)?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = pts.iter().copied().filter(|p| p.1.is_finite()).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
            .map_err(e)?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], c));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 2, c.filled()))).map_err(e)?;
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.85)).draw().map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

/// ΔM (x) against ΔD (y), one point per example, coloured by label (Figure 2 left/middle).
fn scatter(path: &Path, title: &str, rows: &[&DeltaRow]) -> Result<()> {
    let (x0, x1) = span(rows.iter().map(|r| r.delta_m).chain([0.0]), 0.05);
    let (y0, y1) = span(rows.iter().map(|r| r.delta_d).chain([1.0]), 0.05);
    let root = SVGBackend::new(path, (520, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 15))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(e)?;
    chart.configure_mesh().x_desc("ΔM (relative magnitude change)").y_desc("ΔD (cosine to pretrained)").draw().map_err(e)?;
    for label in [0usize, 1] {
        let c = if label == 0 { RGBColor(59, 76, 192) } else { RGBColor(180, 4, 38) };
        chart
            .draw_series(rows.iter().filter(|r| r.label == label).map(|r| Circle::new((r.delta_m, r.delta_d), 3, c.mix(0.6).filled())))
            .map_err(e)?
            .label(format!("label {label}"))
            .legend(move |(x, y)| Circle::new((x + 7, y), 3, c.filled()));
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.85)).draw().map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

/// Grouped bars: mean eval accuracy per head, one group per backbone (Figure 2 right).
fn bars(path: &Path, title: &str, groups: &[(String, Vec<(String, f64, f64)>)]) -> Result<()> {
    let heads: Vec<String> = groups.first().map(|g| g.1.iter().map(|h| h.0.clone()).collect()).unwrap_or_default();
    let n = groups.len() * (heads.len() + 1);
    let root = SVGBackend::new(path, (640, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..n as f64, 0f64..1f64)
        .map_err(e)?;
    let names: Vec<String> = groups.iter().map(|g| g.0.clone()).collect();
    let width = heads.len() + 1;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc("eval accuracy (mean over seeds)")
        .x_labels(groups.len() * 2)
        .x_label_formatter(&|x| {
            let g = (*x / width as f64).floor() as usize;
            let centre = g as f64 * width as f64 + heads.len() as f64 / 2.0;
            if (x - centre).abs() < 0.6 {
                names.get(g).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .draw()
        .map_err(e)?;
    for (hi, h) in heads.iter().enumerate() {
        let c = Palette99::pick(hi).to_rgba();
        let rects: Vec<Rectangle<(f64, f64)>> = groups
            .iter()
            .enumerate()
            .map(|(g, (_, v))| {
                let x = (g * width + hi) as f64 + 0.1;
                Rectangle::new([(x, 0.0), (x + 0.8, v[hi].1)], c.filled())
            })
            .collect();
        chart.draw_series(rects).map_err(e)?.label(h.clone()).legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], c.filled()));
        // ± one standard deviation over seeds.
        let whiskers: Vec<PathElement<(f64, f64)>> = groups
            .iter()
            .enumerate()
            .map(|(g, (_, v))| {
                let x = (g * width + hi) as f64 + 0.5;
                PathElement::new(vec![(x, v[hi].1 - v[hi].2), (x, v[hi].1 + v[hi].2)], BLACK)
            })
            .collect();
        chart.draw_series(whiskers).map_err(e)?;
    }
    chart.configure_series_labels().position(SeriesLabelPosition::LowerRight).border_style(BLACK).background_style(WHITE.mix(0.85)).draw().map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

/// Safe file-name part for a method label.
fn slug(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

pub fn write_all(dir: &Path, r: &PilotResult, deltas: &[DeltaRow]) -> Result<()> {
    let fig = dir.join("figures");
    std::fs::create_dir_all(&fig)?;
    for f in &r.finetunes {
        let sel: Vec<&DeltaRow> = deltas.iter().filter(|d| d.method == f.method && d.layer == r.scatter_layer).collect();
        scatter(&fig.join(format!("scatter-{}.svg", slug(&f.method))), &format!("{}: block {} output, last token", f.method, r.scatter_layer), &sel)?;
    }
    let per = |val: &dyn Fn(&super::tables::LayerRow) -> f64| -> Vec<Series> {
        r.finetunes
            .iter()
            .map(|f| (f.method.clone(), r.layers.iter().filter(|l| l.method == f.method).map(|l| (l.layer as f64, val(l))).collect()))
            .collect()
    };
    lines(&fig.join("delta-m-by-layer.svg"), "ΔM per block (mean over dev examples)", "block", "ΔM", &per(&|l| l.dm_mean))?;
    lines(&fig.join("delta-d-by-layer.svg"), "ΔD per block (mean over dev examples)", "block", "ΔD", &per(&|l| l.dd_mean))?;
    lines(&fig.join("angular-share-by-layer.svg"), "angular share of the change per block (median)", "block", "angular share", &per(&|l| l.angular_share_median))?;
    let layers: Vec<usize> = {
        let mut v: Vec<usize> = r.heads.iter().map(|h| h.layer).collect();
        v.sort();
        v.dedup();
        v
    };
    for layer in layers {
        let mut groups: Vec<(String, Vec<(String, f64, f64)>)> = Vec::new();
        for h in r.heads.iter().filter(|h| h.layer == layer) {
            match groups.iter_mut().find(|g| g.0 == h.backbone) {
                Some(g) => g.1.push((h.head.to_string(), h.eval_accuracy_mean, h.eval_accuracy_std)),
                None => groups.push((h.backbone.clone(), vec![(h.head.to_string(), h.eval_accuracy_mean, h.eval_accuracy_std)])),
            }
        }
        bars(&fig.join(format!("disentangle-block{layer}.svg")), &format!("frozen-backbone heads at block {layer}"), &groups)?;
    }
    let mut swap: Vec<Series> = Vec::new();
    for row in &r.swap {
        let name = format!("{} {}", row.model, row.kind);
        match swap.iter_mut().find(|s| s.0 == name) {
            Some(s) => s.1.push((row.layer as f64, row.iia)),
            None => swap.push((name, vec![(row.layer as f64, row.iia)])),
        }
    }
    lines(&fig.join("swap-probe.svg"), "swap probe: IIA (prediction follows the source)", "block", "IIA", &swap)?;
    Ok(())
}
