//! The experiment runner's tidy output rows (metrics, examples, train log) and their headers.
//! Run folders and CSV writing are shared services in `crate::runs`.
use anyhow::{Context, Result};
use std::path::Path;

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
    #[serde(deserialize_with = "crate::util::nan_null::f64")]
    pub iia_vocab: f64,
    /// IIA with the argmax over the task's answer tokens.
    #[serde(deserialize_with = "crate::util::nan_null::f64")]
    pub iia_answers: f64,
    /// mean(logit[cf_label] − logit[base_label]) after the intervention.
    #[serde(deserialize_with = "crate::util::nan_null::f64")]
    pub logit_diff: f64,
    /// (LD_patched − LD_base) / (LD_source − LD_base), from means; NaN when ill-conditioned.
    #[serde(deserialize_with = "crate::util::nan_null::f64")]
    pub normalized_effect: f64,
    #[serde(deserialize_with = "crate::util::nan_null::f64")]
    pub base_acc: f64,
    #[serde(deserialize_with = "crate::util::nan_null::f64")]
    pub source_acc: f64,
    pub n: usize,
    /// `none` for the trained (or applied) intervention; else the control it is a row of:
    /// `random_subspace`, `permuted_labels`, `random_model` (METHODS.md §7). Absent in older runs.
    #[serde(default = "no_control")]
    pub control: String,
    /// The cell's training was cut off (cancelled or interrupted) before its last step: its
    /// numbers are of a partly trained intervention; `road run --resume` redoes the cell.
    #[serde(default)]
    pub cut: bool,
    /// AtP rows (`intervention = atp`): the mean over pairs of the estimated `m_patched − m_base`
    /// (`m` = the logit difference unless `[intervention.atp] metric` says otherwise); NaN in
    /// rows of real interventions. Absent in older runs.
    #[serde(default = "nan")]
    pub effect_estimate: f64,
    /// AtP rows: `plain` or `ig`; empty otherwise.
    #[serde(default)]
    pub method: String,
}

fn no_control() -> String {
    "none".into()
}

impl MetricRow {
    /// A row of the intervention itself, not of one of its controls.
    pub fn is_main(&self) -> bool {
        self.control == "none"
    }
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
    #[serde(deserialize_with = "crate::util::nan_null::f64")]
    pub logit_diff: f64,
    /// The cell's heads (`0+3`, or empty for the whole vector); absent in older runs.
    #[serde(default)]
    pub heads: String,
}

pub const TRAIN_HEADER: [&str; 14] = [
    "layer", "site", "position", "heads", "control", "step", "loss", "lr", "beta", "temperature", "subspace_dims", "dev_loss",
    "dev_iia", "train_iia",
];
pub const METRIC_HEADER: [&str; 19] = [
    "experiment", "seed", "layer", "site", "position", "heads", "intervention", "split", "iia_vocab", "iia_answers",
    "logit_diff", "normalized_effect", "base_acc", "source_acc", "n", "control", "cut", "effect_estimate", "method",
];

/// One row of `train_log.csv`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainRow {
    pub layer: usize,
    pub site: String,
    pub position: String,
    #[serde(default)]
    pub heads: String,
    /// `none`, or the control whose training this is (`permuted_labels`, `random_model`).
    #[serde(default = "no_control")]
    pub control: String,
    pub step: usize,
    #[serde(deserialize_with = "crate::util::nan_null::f64")]
    pub loss: f64,
    #[serde(deserialize_with = "crate::util::nan_null::f64")]
    pub lr: f64,
    #[serde(deserialize_with = "crate::util::nan_null::f64")]
    pub beta: f64,
    #[serde(deserialize_with = "crate::util::nan_null::f64")]
    pub temperature: f64,
    #[serde(deserialize_with = "crate::util::nan_null::f64")]
    pub subspace_dims: f64,
    /// At evaluation steps (`train.eval_every`), else NaN: cross-entropy and IIA on the dev
    /// split, IIA on up to 64 train pairs.
    #[serde(default = "nan", deserialize_with = "crate::util::nan_null::f64")]
    pub dev_loss: f64,
    #[serde(default = "nan", deserialize_with = "crate::util::nan_null::f64")]
    pub dev_iia: f64,
    #[serde(default = "nan", deserialize_with = "crate::util::nan_null::f64")]
    pub train_iia: f64,
    /// Wall-clock seconds since the cell's training started (time-to-quality). Not in
    /// train_log.csv, whose bytes depend only on the spec: it goes to `timing.csv`.
    #[serde(skip, default = "nan")]
    pub seconds: f64,
}

/// One row of `timing.csv`: when a training step finished (the run's one clock-dependent table).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TimingRow {
    pub layer: usize,
    pub site: String,
    pub position: String,
    pub heads: String,
    pub control: String,
    pub step: usize,
    pub seconds: f64,
}

impl From<&TrainRow> for TimingRow {
    fn from(r: &TrainRow) -> Self {
        TimingRow {
            layer: r.layer,
            site: r.site.clone(),
            position: r.position.clone(),
            heads: r.heads.clone(),
            control: r.control.clone(),
            step: r.step,
            seconds: r.seconds,
        }
    }
}

pub const TIMING_HEADER: [&str; 7] = ["layer", "site", "position", "heads", "control", "step", "seconds"];

fn nan() -> f64 {
    f64::NAN
}

pub fn read_metrics(path: &Path) -> Result<Vec<MetricRow>> {
    let mut r = csv::Reader::from_path(path).with_context(|| format!("cannot read {}", path.display()))?;
    r.deserialize().map(|x| x.map_err(anyhow::Error::from)).collect()
}

/// One line of `pairs.jsonl`: a pair exactly as the run used it (after filtering), so another
/// tool (bench/reference/bench_pyvene.py) can train on the same inputs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PairLine<'a> {
    pub split: &'static str,
    pub index: usize,
    pub base: &'a crate::tasks::Prompt,
    pub source: &'a crate::tasks::Prompt,
    pub cf_label: u32,
    pub cf_label_text: String,
    pub answers: &'a [u32],
}

/// `pairs.jsonl`: every kept pair of every split, in the order the run indexes them.
pub fn write_pairs(path: &Path, data: &crate::tasks::Dataset, tok: &crate::tokenizer::Tok) -> Result<()> {
    use std::io::Write;
    let mut w = std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?);
    for split in [crate::tasks::Split::Train, crate::tasks::Split::Dev, crate::tasks::Split::Test] {
        for (index, p) in data.split(split).iter().enumerate() {
            let line = PairLine {
                split: split.name(),
                index,
                base: &p.base,
                source: &p.source,
                cf_label: p.cf_label,
                cf_label_text: tok.decode(&[p.cf_label]).unwrap_or_default(),
                answers: &p.answers,
            };
            writeln!(w, "{}", serde_json::to_string(&line)?)?;
        }
    }
    w.flush()?;
    Ok(())
}
