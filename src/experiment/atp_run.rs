//! `intervention.kind = "atp"` as a run: the whole grid estimated on the test split
//! ([`super::atp::estimate`]), written to the run folder like a patching sweep (metrics.csv rows
//! per cell with `effect_estimate` and `method`, heatmaps per site and per head, summary.json),
//! then optionally verified by real patching ([`super::atp_verify`]).
use super::atp::{self, AtpCell, Estimates};
use super::data::Prepared;
use super::outputs::MetricRow;
use super::runner::{CellSummary, RunSummary};
use super::spec::Spec;
use super::{atp_verify, figures, tables};
use crate::intervene::atp::{AtpMetric, AtpOptions};
use crate::model::{Llama, Site};
use crate::runs::{RunEvent, Sink};
use crate::tasks::Split;
use anyhow::Result;
use std::path::Path;

/// What [`run`] needs from the runner, which has loaded the model and prepared the pairs.
pub struct AtpRun<'a> {
    pub spec: &'a Spec,
    pub opts: &'a AtpOptions,
    pub model: &'a Llama,
    pub prepared: &'a Prepared,
    pub layers: &'a [usize],
    pub sites: &'a [Site],
    pub positions: &'a [String],
    pub run_dir: &'a Path,
}

/// Mean over the test pairs of a clean-run fact.
fn clean_mean(prepared: &Prepared, f: impl Fn(&super::data::Clean) -> f64) -> f64 {
    let n = prepared.data.test.len();
    (0..n).map(|i| f(&prepared.clean[&(Split::Test, i)])).sum::<f64>() / n.max(1) as f64
}

/// metrics.csv rows of the estimates (test split). With the logit-difference metric,
/// `logit_diff` is the estimated patched LD and `normalized_effect` the estimate over
/// `LD_source − LD_base`, so the TUI reads them as it reads a patching run's.
fn rows(r: &AtpRun<'_>, est: &Estimates, means: &[f64]) -> Vec<MetricRow> {
    let (ld_base, ld_source) = (clean_mean(r.prepared, |c| c.ld_base), clean_mean(r.prepared, |c| c.ld_source));
    let ld = r.opts.metric == AtpMetric::LogitDiff;
    let den = ld_source - ld_base;
    est.cells
        .iter()
        .zip(means)
        .map(|(c, &m)| MetricRow {
            experiment: r.spec.name.clone(),
            seed: r.spec.seed,
            layer: c.layer,
            site: c.site.name().into(),
            position: c.position.clone(),
            heads: c.heads(),
            intervention: "atp".into(),
            split: "test".into(),
            iia_vocab: f64::NAN,
            iia_answers: f64::NAN,
            logit_diff: if ld { ld_base + m } else { f64::NAN },
            normalized_effect: if ld && den.abs() > 1e-6 { m / den } else { f64::NAN },
            base_acc: 1.0,
            source_acc: 1.0,
            n: est.base_metric.len(),
            control: "none".into(),
            cut: false,
            effect_estimate: m,
            method: r.opts.method_name().into(),
        })
        .collect()
}

/// One heatmap per site (whole vectors) and one per head of headed sites, on a diverging scale
/// symmetric around 0 (red = towards the cf label) shared by a site's maps.
fn write_figures(r: &AtpRun<'_>, metrics: &[MetricRow]) -> Result<()> {
    for &site in r.sites {
        let of_site: Vec<&MetricRow> = metrics.iter().filter(|m| m.site == site.name()).collect();
        let scale = of_site.iter().map(|m| m.effect_estimate.abs()).filter(|v| v.is_finite()).fold(0.0, f64::max).max(1e-12);
        let mut heads: Vec<&str> = of_site.iter().map(|m| m.heads.as_str()).collect();
        heads.sort();
        heads.dedup();
        for h in heads {
            let rows: Vec<&MetricRow> = of_site.iter().copied().filter(|m| m.heads == h).collect();
            let (suffix, label) = if h.is_empty() { (String::new(), String::new()) } else { (format!("_h{h}"), format!(", head {h}")) };
            let title = format!("{}: AtP ({}) estimate, {site}{label}, |max| {scale:.3}", r.spec.name, r.opts.method_name());
            figures::heatmap(&r.run_dir.join(format!("atp_heatmap_{site}{suffix}.svg")), &title, &rows, |m| 0.5 + 0.5 * m.effect_estimate / scale)?;
        }
    }
    Ok(())
}

/// Estimate, write, verify. Returns the run's summary (one cell summary per estimated cell,
/// `test_logit_diff` = the estimated patched LD).
pub fn run(r: &AtpRun<'_>, sink: &mut dyn Sink, cancel: &std::sync::atomic::AtomicBool, t0: std::time::Instant) -> Result<(RunSummary, bool)> {
    let units: Vec<(usize, Site)> = r.layers.iter().flat_map(|&l| r.sites.iter().map(move |&s| (l, s))).collect();
    let pairs = &r.prepared.data.test;
    let points = r.opts.alphas().len();
    sink.send(RunEvent::Started { run_dir: r.run_dir.to_path_buf(), cells: 1, steps_per_cell: 0 });
    sink.send(RunEvent::Log(format!(
        "AtP ({}, {} gradient point{}): {} layers x {} sites x {} positions (+ heads) on {} test pairs",
        r.opts.method_name(),
        points,
        if points == 1 { "" } else { "s" },
        r.layers.len(),
        r.sites.len(),
        r.positions.len(),
        pairs.len()
    )));
    let (t_est, cpu0) = (std::time::Instant::now(), crate::util::cpu_secs());
    let est = atp::estimate(r.model, pairs, &units, r.positions, &r.spec.sites.heads, r.opts)?;
    let est_seconds = t_est.elapsed().as_secs_f64();
    // CPU time (all threads) moves far less than wall time with others' load on a shared machine.
    sink.send(RunEvent::Log(format!("{} cells estimated in {est_seconds:.1}s ({:.1} CPU-s)", est.cells.len(), crate::util::cpu_secs() - cpu0)));
    let means = est.means();
    let metrics = rows(r, &est, &means);
    tables::write_tables(r.run_dir, &metrics, &[], &[])?;
    write_figures(r, &metrics)?;
    let mut complete = true;
    if r.opts.verify_top > 0 {
        let v = atp_verify::verify(r, &est, &means, cancel, sink)?;
        complete = v.is_some();
    }
    let cells: Vec<CellSummary> = est.cells.iter().zip(&metrics).map(|(c, m): (&AtpCell, &MetricRow)| summary_of(c, m)).collect();
    let summary = RunSummary {
        experiment: r.spec.name.clone(),
        run_dir: r.run_dir.to_path_buf(),
        seed: r.spec.seed,
        complete,
        seconds: t0.elapsed().as_secs_f64(),
        task_accuracy: r.prepared.task_accuracy,
        kept_fraction: r.prepared.report.iter().map(|(s, _, k, _)| (s.name().to_string(), *k)).collect(),
        cells,
    };
    crate::runs::atomic::write(&r.run_dir.join("summary.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
    Ok((summary, complete))
}

fn summary_of(c: &AtpCell, m: &MetricRow) -> CellSummary {
    let h = if m.heads.is_empty() { String::new() } else { format!(" heads {}", m.heads) };
    CellSummary {
        label: format!("L{} {} @{}{h}", c.layer, c.site, c.position),
        layer: c.layer,
        site: c.site.name().into(),
        position: c.position.clone(),
        test_iia_vocab: f64::NAN,
        test_iia_answers: f64::NAN,
        test_logit_diff: m.logit_diff,
        controls: vec![],
        margin: f64::NAN,
        low_margin: false,
    }
}
