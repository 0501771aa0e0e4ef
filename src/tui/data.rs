//! What the workbench shows, independent of drawing: past runs on disk, metric grids, sorting,
//! and CSV exports. Everything here is plain data and pure functions (tested without a terminal).
use crate::experiment::outputs::{self, ExampleRow, MetricRow};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// One run folder under `notebooks-out/<experiment>/`.
#[derive(Debug, Clone, PartialEq)]
pub struct RunInfo {
    pub experiment: String,
    pub dir: PathBuf,
    pub complete: bool,
}

impl RunInfo {
    pub fn name(&self) -> String {
        self.dir.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
    }
}

/// Every run under `root`, newest first (see [`crate::runs::list_runs`]).
pub fn scan_runs(root: &Path) -> Vec<RunInfo> {
    crate::runs::list_runs(root)
        .into_iter()
        .map(|(experiment, dir)| RunInfo { complete: crate::runs::state::status(&dir) == crate::runs::RunStatus::Complete, experiment, dir })
        .collect()
}

/// A run folder read into memory.
#[derive(Debug, Clone)]
pub struct RunData {
    pub info: RunInfo,
    pub config: String,
    /// `model.name` of config.toml (for tokenising position labels).
    pub model: Option<String>,
    pub intervention: String,
    pub metrics: Vec<MetricRow>,
    pub examples: Vec<ExampleRow>,
    /// Set when the run failed (error.txt).
    pub error: Option<String>,
    /// A pilot-study run's tables (None for intervention sweeps).
    pub pilot: Option<PilotData>,
}

/// What the results view shows of a pilot study: per-layer ΔM/ΔD curves per method, the
/// disentanglement table and the fine-tunes.
#[derive(Debug, Clone, Default)]
pub struct PilotData {
    /// (method, layer, ΔM mean, ΔD mean)
    pub layers: Vec<(String, usize, f64, f64)>,
    /// (backbone, layer, head, mean eval accuracy, std)
    pub heads: Vec<(String, usize, String, f64, f64)>,
    /// (method, trains, % trainable, test accuracy)
    pub finetunes: Vec<(String, String, f64, f64)>,
}

impl PilotData {
    pub fn load(dir: &Path) -> Result<Self> {
        let read = |name: &str| -> Result<Vec<csv::StringRecord>> {
            let mut r = csv::Reader::from_path(dir.join(name)).with_context(|| format!("cannot read {name}"))?;
            r.records().map(|x| x.map_err(anyhow::Error::from)).collect()
        };
        let num = |r: &csv::StringRecord, i: usize| -> f64 { r.get(i).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN) };
        let layers = read("delta_by_layer.csv")?.iter().map(|r| (r[0].to_string(), num(r, 1) as usize, num(r, 3), num(r, 10))).collect();
        let heads = read("disentangle_summary.csv")?.iter().map(|r| (r[0].to_string(), num(r, 1) as usize, r[2].to_string(), num(r, 4), num(r, 5))).collect();
        let finetunes = read("finetunes.csv")?
            .iter()
            .map(|r| (r[0].to_string(), if r[2].is_empty() { r[1].to_string() } else { r[2].to_string() }, num(r, 4), num(r, 10)))
            .collect();
        Ok(Self { layers, heads, finetunes })
    }

    pub fn methods(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for (m, ..) in &self.layers {
            if !v.contains(m) {
                v.push(m.clone());
            }
        }
        v
    }
}

impl RunData {
    pub fn load(dir: &Path) -> Result<Self> {
        let config = std::fs::read_to_string(dir.join("config.toml")).with_context(|| format!("{} has no config.toml", dir.display()))?;
        let doc: toml::Table = toml::from_str(&config).unwrap_or_default();
        let model = doc.get("model").and_then(|m| m.get("name")).and_then(|n| n.as_str()).map(String::from);
        let intervention =
            doc.get("intervention").and_then(|m| m.get("kind")).and_then(|n| n.as_str()).unwrap_or("?").to_string();
        let metrics_path = dir.join("metrics.csv");
        let metrics = if metrics_path.exists() { outputs::read_metrics(&metrics_path)? } else { vec![] };
        let examples = read_examples(&dir.join("examples.csv")).unwrap_or_default();
        let pilot = if dir.join("delta_by_layer.csv").exists() { Some(PilotData::load(dir)?) } else { None };
        let experiment = dir.parent().and_then(|p| p.file_name()).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(Self {
            info: RunInfo { experiment, dir: dir.to_path_buf(), complete: crate::runs::state::status(dir) == crate::runs::RunStatus::Complete },
            config,
            model,
            intervention,
            metrics,
            examples,
            error: std::fs::read_to_string(dir.join("error.txt")).ok().map(|s| s.trim().to_string()),
            pilot,
        })
    }

    /// Sites present in the test split, in first-seen order; a head sweep's cells show as one
    /// "site" per head group (`head_output h3`).
    pub fn sites(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for r in self.metrics.iter().filter(|r| r.split == "test" && r.is_main()) {
            let k = site_key(&r.site, &r.heads);
            if !v.contains(&k) {
                v.push(k);
            }
        }
        v
    }

    /// The first test base prompt (examples.csv only holds the test split).
    pub fn first_base_prompt(&self) -> Option<&str> {
        self.examples.first().map(|e| e.base.as_str())
    }

    pub fn examples_for(&self, layer: usize, site: &str, position: &str) -> Vec<&ExampleRow> {
        self.examples.iter().filter(|e| e.layer == layer && site_key(&e.site, &e.heads) == site && e.position == position).collect()
    }
}

/// How the results view names a (site, heads) group.
pub fn site_key(site: &str, heads: &str) -> String {
    if heads.is_empty() {
        site.to_string()
    } else {
        format!("{site} h{heads}")
    }
}

pub fn read_examples(path: &Path) -> Result<Vec<ExampleRow>> {
    let mut r = csv::Reader::from_path(path).with_context(|| format!("cannot read {}", path.display()))?;
    r.deserialize().map(|x| x.map_err(anyhow::Error::from)).collect()
}

/// The metrics a heatmap can show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    IiaVocab,
    IiaAnswers,
    NormalizedEffect,
    LogitDiff,
    /// An AtP run's estimated `LD_patched − LD_base` (NaN in other runs).
    EffectEstimate,
}

impl Metric {
    pub const ALL: [Metric; 5] = [Metric::IiaVocab, Metric::IiaAnswers, Metric::NormalizedEffect, Metric::LogitDiff, Metric::EffectEstimate];
    pub fn name(self) -> &'static str {
        match self {
            Metric::IiaVocab => "iia_vocab",
            Metric::IiaAnswers => "iia_answers",
            Metric::NormalizedEffect => "normalized_effect",
            Metric::LogitDiff => "logit_diff",
            Metric::EffectEstimate => "effect_estimate",
        }
    }
    pub fn get(self, r: &MetricRow) -> f64 {
        match self {
            Metric::IiaVocab => r.iia_vocab,
            Metric::IiaAnswers => r.iia_answers,
            Metric::NormalizedEffect => r.normalized_effect,
            Metric::LogitDiff => r.logit_diff,
            Metric::EffectEstimate => r.effect_estimate,
        }
    }
    pub fn next(self) -> Metric {
        let i = Metric::ALL.iter().position(|m| *m == self).unwrap_or(0);
        Metric::ALL[(i + 1) % Metric::ALL.len()]
    }
    /// IIA is a probability: a fixed 0..1 colour scale. Others scale to the data.
    pub fn fixed_range(self) -> Option<(f64, f64)> {
        match self {
            Metric::IiaVocab | Metric::IiaAnswers => Some((0.0, 1.0)),
            _ => None,
        }
    }
}

/// Layers (rows) × positions (columns) of one metric at one site, test split.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Grid {
    pub layers: Vec<usize>,
    pub positions: Vec<String>,
    pub values: Vec<Vec<Option<f64>>>,
}

impl Grid {
    pub fn build(metrics: &[MetricRow], site: &str, metric: Metric) -> Grid {
        let rows: Vec<&MetricRow> =
            metrics.iter().filter(|r| r.split == "test" && r.is_main() && site_key(&r.site, &r.heads) == site).collect();
        let mut layers: Vec<usize> = rows.iter().map(|r| r.layer).collect();
        layers.sort();
        layers.dedup();
        let mut positions: Vec<String> = Vec::new();
        for r in &rows {
            if !positions.contains(&r.position) {
                positions.push(r.position.clone());
            }
        }
        if positions.iter().all(|p| p.parse::<i64>().is_ok()) {
            positions.sort_by_key(|p| p.parse::<i64>().unwrap_or(0));
        }
        let mut values = vec![vec![None; positions.len()]; layers.len()];
        for r in rows {
            let li = layers.iter().position(|l| *l == r.layer).expect("layer listed");
            let pi = positions.iter().position(|p| *p == r.position).expect("position listed");
            values[li][pi] = Some(metric.get(r));
        }
        Grid { layers, positions, values }
    }

    pub fn get(&self, row: usize, col: usize) -> Option<f64> {
        self.values.get(row).and_then(|r| r.get(col)).copied().flatten()
    }

    /// True when every position is an index (token labels make sense).
    pub fn numeric_positions(&self) -> bool {
        !self.positions.is_empty() && self.positions.iter().all(|p| p.parse::<usize>().is_ok())
    }

    /// Finite min and max (None when the grid has no finite value).
    pub fn range(&self) -> Option<(f64, f64)> {
        let vals: Vec<f64> = self.values.iter().flatten().flatten().copied().filter(|v| v.is_finite()).collect();
        if vals.is_empty() {
            return None;
        }
        Some((vals.iter().cloned().fold(f64::INFINITY, f64::min), vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max)))
    }

    /// `b − a` on the cells both grids have (same labels).
    pub fn diff(a: &Grid, b: &Grid) -> Grid {
        let layers: Vec<usize> = a.layers.iter().filter(|l| b.layers.contains(l)).copied().collect();
        let positions: Vec<String> = a.positions.iter().filter(|p| b.positions.contains(p)).cloned().collect();
        let at = |g: &Grid, l: usize, p: &String| -> Option<f64> {
            let li = g.layers.iter().position(|x| *x == l)?;
            let pi = g.positions.iter().position(|x| x == p)?;
            g.get(li, pi)
        };
        let values = layers
            .iter()
            .map(|&l| positions.iter().map(|p| Some(at(b, l, p)? - at(a, l, p)?)).collect())
            .collect();
        Grid { layers, positions, values }
    }

    pub fn to_csv(&self, value_name: &str) -> String {
        let mut rows = vec![vec!["layer".to_string(), "position".to_string(), value_name.to_string()]];
        for (li, l) in self.layers.iter().enumerate() {
            for (pi, p) in self.positions.iter().enumerate() {
                rows.push(vec![l.to_string(), p.clone(), fmt_opt(self.get(li, pi))]);
            }
        }
        csv_string(&rows)
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map(|x| x.to_string()).unwrap_or_default()
}

/// Columns of the cell table (test split); `s` cycles the sort column.
pub const TABLE_COLUMNS: [&str; 8] = ["layer", "site", "position", "iia_vocab", "iia_answers", "norm_eff", "logit_diff", "n"];

/// Test rows sorted by column `col` (descending when `desc`); NaN sorts last.
pub fn sorted_cells(metrics: &[MetricRow], col: usize, desc: bool) -> Vec<&MetricRow> {
    let mut v: Vec<&MetricRow> = metrics.iter().filter(|r| r.split == "test" && r.is_main()).collect();
    let num = |r: &MetricRow| -> f64 {
        match col {
            3 => r.iia_vocab,
            4 => r.iia_answers,
            5 => r.normalized_effect,
            6 => r.logit_diff,
            7 => r.n as f64,
            _ => 0.0,
        }
    };
    v.sort_by(|a, b| {
        let o = match col {
            0 => a.layer.cmp(&b.layer),
            1 => a.site.cmp(&b.site),
            2 => pos_key(&a.position).cmp(&pos_key(&b.position)),
            _ => {
                let (x, y) = (num(a), num(b));
                match (x.is_nan(), y.is_nan()) {
                    (true, true) => std::cmp::Ordering::Equal,
                    (true, false) => return std::cmp::Ordering::Greater,
                    (false, true) => return std::cmp::Ordering::Less,
                    _ => x.total_cmp(&y),
                }
            }
        };
        let o = if desc { o.reverse() } else { o };
        o.then(a.layer.cmp(&b.layer)).then(pos_key(&a.position).cmp(&pos_key(&b.position)))
    });
    v
}

fn pos_key(p: &str) -> (i64, String) {
    match p.parse::<i64>() {
        Ok(i) => (i, String::new()),
        Err(_) => (i64::MAX, p.to_string()),
    }
}

pub fn table_row(r: &MetricRow) -> [String; 8] {
    [
        r.layer.to_string(),
        site_key(&r.site, &r.heads),
        r.position.clone(),
        format!("{:.3}", r.iia_vocab),
        format!("{:.3}", r.iia_answers),
        format!("{:.3}", r.normalized_effect),
        format!("{:+.3}", r.logit_diff),
        r.n.to_string(),
    ]
}

/// Summary line for compare: mean and max of a metric over a site's test cells.
pub fn mean_max(g: &Grid) -> (f64, f64) {
    let vals: Vec<f64> = g.values.iter().flatten().flatten().copied().filter(|v| v.is_finite()).collect();
    if vals.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    (vals.iter().sum::<f64>() / vals.len() as f64, vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max))
}

/// RFC 4180 CSV of string rows.
pub fn csv_string(rows: &[Vec<String>]) -> String {
    let mut w = csv::Writer::from_writer(Vec::new());
    for r in rows {
        w.write_record(r).expect("writing to memory");
    }
    String::from_utf8(w.into_inner().expect("flush to memory")).expect("utf-8 input")
}

/// Make a token printable in one cell row: spaces as `␣`, control characters escaped.
pub fn show_token(t: &str) -> String {
    t.chars()
        .map(|c| match c {
            ' ' => '␣',
            '\n' => '↵',
            c if c.is_control() => '·',
            c => c,
        })
        .collect()
}
