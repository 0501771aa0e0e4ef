//! A run's tables, figures and summary, written from its finished cells in cell order: the one
//! writer for a run in progress, a finished one, and a merge of shards (so a merged sweep has
//! the same bytes as the unsharded run).
use super::cell_job::CellResult;
use super::figures;
use super::outputs::{self, ExampleRow, MetricRow, TrainRow};
use super::runner::{CellSummary, RunSummary};
use super::spec::Spec;
use anyhow::Result;
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

/// The finished cells' rows, in cell order.
pub fn gather(results: &[Option<CellResult>]) -> (Vec<MetricRow>, Vec<ExampleRow>, Vec<TrainRow>) {
    let done = || results.iter().flatten();
    (
        done().flat_map(|r| r.metrics.iter().cloned()).collect(),
        done().flat_map(|r| r.examples.iter().cloned()).collect(),
        done().flat_map(|r| r.train_log.iter().cloned()).collect(),
    )
}

pub fn write_tables(dir: &std::path::Path, m: &[MetricRow], e: &[ExampleRow], t: &[TrainRow]) -> Result<()> {
    crate::runs::write_csv(&dir.join("metrics.csv"), m, &outputs::METRIC_HEADER)?;
    crate::runs::write_csv(&dir.join("examples.csv"), e, &["layer", "site", "position", "example", "base", "source", "base_label", "cf_label", "predicted", "correct", "logit_diff", "heads"])?;
    crate::runs::write_csv(&dir.join("train_log.csv"), t, &outputs::TRAIN_HEADER)?;
    let timing: Vec<outputs::TimingRow> = t.iter().map(outputs::TimingRow::from).collect();
    crate::runs::write_csv(&dir.join("timing.csv"), &timing, &outputs::TIMING_HEADER)?;
    Ok(())
}

/// One heatmap and one per-layer line chart per site (test split).
pub fn write_figures(dir: &std::path::Path, spec: &Spec, metrics: &[MetricRow]) -> Result<()> {
    // One figure pair per (site, head group): a head sweep gets a heatmap per head.
    let mut groups: Vec<(&str, &str)> = metrics.iter().map(|r| (r.site.as_str(), r.heads.as_str())).collect();
    groups.sort();
    groups.dedup();
    for (site, heads) in groups {
        let rows: Vec<&MetricRow> = metrics.iter().filter(|r| r.site == site && r.heads == heads && r.split == "test").collect();
        if rows.is_empty() {
            continue;
        }
        let (suffix, label) = if heads.is_empty() { (String::new(), String::new()) } else { (format!("_h{heads}"), format!(", heads {heads}")) };
        let title = format!("{}: test IIA ({}, {site}{label})", spec.name, spec.intervention.kind_name());
        let main: Vec<&MetricRow> = rows.iter().copied().filter(|r| r.is_main()).collect();
        figures::heatmap(&dir.join(format!("iia_heatmap_{site}{suffix}.svg")), &title, &main, |r| r.iia_vocab)?;
        figures::by_layer(&dir.join(format!("iia_by_layer_{site}{suffix}.svg")), &title, "IIA (vocab argmax)", &rows, |r| r.iia_vocab)?;
    }
    Ok(())
}

/// What a run's summary says besides its cells.
pub struct RunMeta {
    pub complete: bool,
    pub seconds: f64,
    pub task_accuracy: f64,
    pub kept_fraction: Vec<(String, f64)>,
}

/// Everything a run folder holds once its cells are done (or as far as they got): tables,
/// parameters, figures, summary.json.
pub fn write_outputs(run_dir: &Path, spec: &Spec, results: &[Option<CellResult>], meta: RunMeta) -> Result<RunSummary> {
    let (metrics, examples, train_log) = gather(results);
    let params: HashMap<String, Tensor> = results.iter().flatten().flat_map(|r| r.params.iter().cloned()).collect();
    let summaries: Vec<CellSummary> = results.iter().flatten().map(|r| r.summary.clone()).collect();
    write_tables(run_dir, &metrics, &examples, &train_log)?;
    if !params.is_empty() {
        crate::runs::atomic::write_with(&run_dir.join("params.safetensors"), |tmp| Ok(candle_core::safetensors::save(&params, tmp)?))?;
    }
    write_figures(run_dir, spec, &metrics)?;
    let summary = RunSummary {
        experiment: spec.name.clone(),
        run_dir: run_dir.to_path_buf(),
        seed: spec.seed,
        complete: meta.complete,
        seconds: meta.seconds,
        task_accuracy: meta.task_accuracy,
        kept_fraction: meta.kept_fraction,
        cells: summaries,
    };
    crate::runs::atomic::write(&run_dir.join("summary.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
    Ok(summary)
}
