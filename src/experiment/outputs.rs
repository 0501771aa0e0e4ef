//! Run directories and tidy CSV outputs. A run never overwrites another: its folder is
//! `notebooks-out/<experiment>/<UTC timestamp>-<config hash>[-N]/`.
use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// `notebooks-out/` (override with ROAD_OUT).
pub fn out_root() -> PathBuf {
    std::env::var_os("ROAD_OUT").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("notebooks-out"))
}

/// UTC `YYYYmmdd-HHMMSS` from the system clock.
pub fn timestamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86400, secs % 86400);
    let (y, m, d) = civil_from_days(days as i64);
    format!("{y:04}{m:02}{d:02}-{:02}{:02}{:02}", rem / 3600, (rem % 3600) / 60, rem % 60)
}

/// Days since 1970-01-01 to (year, month, day) — Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

pub fn short_hash(text: &str) -> String {
    let h = Sha256::digest(text.as_bytes());
    h.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

/// Create a fresh run directory for `experiment` whose resolved config hashes to `hash`.
pub fn new_run_dir(experiment: &str, hash: &str) -> Result<PathBuf> {
    let parent = out_root().join(experiment);
    std::fs::create_dir_all(&parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let stem = format!("{}-{hash}", timestamp());
    for n in 1.. {
        let name = if n == 1 { stem.clone() } else { format!("{stem}-{n}") };
        let dir = parent.join(name);
        // create_dir (not _all) fails if it exists: two runs can never share a folder.
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
        }
    }
    unreachable!()
}

/// Every past run under `notebooks-out/`, newest first: (experiment, run dir).
pub fn list_runs(root: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let Ok(exps) = std::fs::read_dir(root) else { return out };
    for e in exps.flatten() {
        let Ok(runs) = std::fs::read_dir(e.path()) else { continue };
        for r in runs.flatten() {
            if r.path().join("config.toml").exists() {
                out.push((e.file_name().to_string_lossy().into_owned(), r.path()));
            }
        }
    }
    out.sort_by(|a, b| b.1.file_name().cmp(&a.1.file_name()));
    out
}

/// One row of `metrics.csv` (long/tidy).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct MetricRow {
    pub experiment: String,
    pub seed: u64,
    pub layer: usize,
    pub site: String,
    pub position: String,
    pub heads: String,
    pub intervention: String,
    pub split: String,
    /// IIA with the argmax over the whole vocabulary.
    pub iia_vocab: f64,
    /// IIA with the argmax over the task's answer tokens.
    pub iia_answers: f64,
    /// mean(logit[cf_label] − logit[base_label]) after the intervention.
    pub logit_diff: f64,
    /// (LD_patched − LD_base) / (LD_source − LD_base), from means; NaN when ill-conditioned.
    pub normalized_effect: f64,
    pub base_acc: f64,
    pub source_acc: f64,
    pub n: usize,
}

/// One row of `examples.csv` (test split, per example).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ExampleRow {
    pub layer: usize,
    pub site: String,
    pub position: String,
    pub example: usize,
    pub base: String,
    pub source: String,
    pub base_label: String,
    pub cf_label: String,
    pub predicted: String,
    pub correct: bool,
    pub logit_diff: f64,
    /// The cell's heads (`0+3`, or empty for the whole vector); absent in older runs.
    #[serde(default)]
    pub heads: String,
}

pub const TRAIN_HEADER: [&str; 9] = ["layer", "site", "position", "step", "loss", "lr", "beta", "temperature", "subspace_dims"];
pub const METRIC_HEADER: [&str; 15] = [
    "experiment", "seed", "layer", "site", "position", "heads", "intervention", "split", "iia_vocab", "iia_answers",
    "logit_diff", "normalized_effect", "base_acc", "source_acc", "n",
];

/// One row of `train_log.csv`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainRow {
    pub layer: usize,
    pub site: String,
    pub position: String,
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub beta: f64,
    pub temperature: f64,
    pub subspace_dims: f64,
}

/// Write rows with a header; an empty table still gets its header line (`header`).
pub fn write_csv<T: serde::Serialize>(path: &Path, rows: &[T], header: &[&str]) -> Result<()> {
    let mut w = csv::Writer::from_path(path).with_context(|| format!("cannot write {}", path.display()))?;
    if rows.is_empty() {
        w.write_record(header)?;
    }
    for r in rows {
        w.serialize(r)?;
    }
    w.flush()?;
    Ok(())
}

pub fn read_metrics(path: &Path) -> Result<Vec<MetricRow>> {
    let mut r = csv::Reader::from_path(path).with_context(|| format!("cannot read {}", path.display()))?;
    r.deserialize().map(|x| x.map_err(anyhow::Error::from)).collect()
}
