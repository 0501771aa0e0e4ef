//! Finished cells on disk, one pair of files per cell under `<run>/cells/`: `<i>.safetensors`
//! (trained parameters) then `<i>.toml` (rows and summary), each written whole or not at all
//! (`runs::atomic`). The TOML's presence is what marks cell `i` (its global index in the sweep)
//! as done, so a killed run resumes without redoing it, and `merge-runs` rebuilds a sharded
//! sweep's tables in the unsharded cell order from these files alone.
//!
//! TOML, not JSON: the rows hold NaN (a normalized effect that is ill-conditioned, a log column
//! a kind does not fill) and JSON has no NaN — serde_json writes `null`, which does not read back
//! as a number, so a killed run with such a cell could not resume. TOML writes `nan`/`inf`, and
//! Rust's shortest round-trip float formatting keeps every other number bit-exact. Cells stored
//! as `<i>.json` by earlier versions (finite numbers only) still load.
use super::cell_job::CellResult;
use super::outputs::{ExampleRow, MetricRow, TrainRow};
use super::runner::CellSummary;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    metrics: Vec<MetricRow>,
    examples: Vec<ExampleRow>,
    train_log: Vec<TrainRow>,
    /// The train log's clock (not a TrainRow field on disk).
    seconds: Vec<f64>,
    summary: CellSummary,
    param_names: Vec<String>,
}

fn cells_dir(run: &Path) -> PathBuf {
    run.join("cells")
}

/// Store a finished cell (the parameters first: the JSON names them and marks the cell done).
pub fn save(run: &Path, global_idx: usize, r: &CellResult) -> Result<()> {
    let dir = cells_dir(run);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let names: Vec<String> = r.params.iter().map(|(n, _)| n.clone()).collect();
    if !r.params.is_empty() {
        let map: std::collections::HashMap<String, candle_core::Tensor> = r.params.iter().cloned().collect();
        crate::runs::atomic::write_with(&dir.join(format!("{global_idx}.safetensors")), |tmp| Ok(candle_core::safetensors::save(&map, tmp)?))?;
    }
    let s = Stored {
        metrics: r.metrics.clone(),
        examples: r.examples.clone(),
        train_log: r.train_log.clone(),
        seconds: r.train_log.iter().map(|t| t.seconds).collect(),
        summary: r.summary.clone(),
        param_names: names,
    };
    let text = toml::to_string(&s).context("storing a finished cell")?;
    crate::runs::atomic::write(&dir.join(format!("{global_idx}.toml")), text.as_bytes())
}

/// The finished cell `global_idx` of this run, if it was stored.
pub fn load(run: &Path, global_idx: usize) -> Result<Option<CellResult>> {
    let dir = cells_dir(run);
    let (toml_path, json_path) = (dir.join(format!("{global_idx}.toml")), dir.join(format!("{global_idx}.json")));
    let s: Stored = if let Ok(text) = std::fs::read_to_string(&toml_path) {
        toml::from_str(&text).with_context(|| format!("{}: not a stored cell", toml_path.display()))?
    } else if let Ok(text) = std::fs::read_to_string(&json_path) {
        serde_json::from_str(&text).with_context(|| format!("{}: not a stored cell", json_path.display()))?
    } else {
        return Ok(None);
    };
    let mut params = Vec::new();
    if !s.param_names.is_empty() {
        let f = dir.join(format!("{global_idx}.safetensors"));
        let map = candle_core::safetensors::load(&f, &candle_core::Device::Cpu).with_context(|| format!("reading {}", f.display()))?;
        for n in &s.param_names {
            let t = map.get(n).with_context(|| format!("{}: no tensor {n}", f.display()))?;
            params.push((n.clone(), t.clone()));
        }
    }
    let mut train_log = s.train_log;
    for (r, t) in train_log.iter_mut().zip(&s.seconds) {
        r.seconds = *t;
    }
    Ok(Some(CellResult { metrics: s.metrics, examples: s.examples, train_log, params, summary: s.summary, complete: true }))
}

/// Every stored cell of a run folder, by global index.
pub fn load_all(run: &Path) -> Result<BTreeMap<usize, CellResult>> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(cells_dir(run)) else { return Ok(out) };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let stem = name.strip_suffix(".toml").or_else(|| name.strip_suffix(".json"));
        let Some(i) = stem.and_then(|s| s.parse::<usize>().ok()) else { continue };
        if out.contains_key(&i) {
            continue;
        }
        if let Some(c) = load(run, i)? {
            out.insert(i, c);
        }
    }
    Ok(out)
}
