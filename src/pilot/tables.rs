//! The study's tidy tables: one row type per CSV, and the aggregations between them.
use crate::probe::Stats;
use serde::Serialize;

/// `delta_per_example.csv`: one row per (method, layer, example).
#[derive(Debug, Clone, Serialize)]
pub struct DeltaRow {
    pub method: String,
    pub layer: usize,
    pub example: usize,
    pub label: usize,
    pub delta_m: f64,
    pub delta_d: f64,
    /// Share of the squared relative change `‖x−x⁰‖²/‖x⁰‖² = ΔM² + 2(1+ΔM)(1−ΔD)` that is angular.
    pub angular_share: f64,
    pub seed: u64,
}

pub const DELTA_HEADER: [&str; 8] = ["method", "layer", "example", "label", "delta_m", "delta_d", "angular_share", "seed"];

/// The exact split of the squared relative change into its radial (ΔM²) and angular parts.
pub fn angular_share(dm: f64, dd: f64) -> f64 {
    let radial = dm * dm;
    let angular = 2.0 * (1.0 + dm) * (1.0 - dd);
    if radial + angular > 0.0 {
        angular / (radial + angular)
    } else {
        f64::NAN
    }
}

/// `delta_by_layer.csv`: ΔM and ΔD statistics per (method, layer) — Figure B.1.
#[derive(Debug, Clone, Serialize)]
pub struct LayerRow {
    pub method: String,
    pub layer: usize,
    pub n: usize,
    pub dm_mean: f64,
    pub dm_std: f64,
    pub dm_q05: f64,
    pub dm_q25: f64,
    pub dm_median: f64,
    pub dm_q75: f64,
    pub dm_q95: f64,
    pub dd_mean: f64,
    pub dd_std: f64,
    pub dd_q05: f64,
    pub dd_q25: f64,
    pub dd_median: f64,
    pub dd_q75: f64,
    pub dd_q95: f64,
    pub angular_share_median: f64,
    pub seed: u64,
}

pub const LAYER_HEADER: [&str; 19] = [
    "method", "layer", "n", "dm_mean", "dm_std", "dm_q05", "dm_q25", "dm_median", "dm_q75", "dm_q95", "dd_mean", "dd_std", "dd_q05", "dd_q25",
    "dd_median", "dd_q75", "dd_q95", "angular_share_median", "seed",
];

/// Aggregate per-example rows of one method into per-layer rows.
pub fn by_layer(rows: &[DeltaRow], method: &str, n_layers: usize, seed: u64) -> Vec<LayerRow> {
    (0..n_layers)
        .map(|layer| {
            let sel: Vec<&DeltaRow> = rows.iter().filter(|r| r.method == method && r.layer == layer).collect();
            let m = Stats::of(&sel.iter().map(|r| r.delta_m).collect::<Vec<_>>());
            let d = Stats::of(&sel.iter().map(|r| r.delta_d).collect::<Vec<_>>());
            let a = Stats::of(&sel.iter().map(|r| r.angular_share).collect::<Vec<_>>());
            LayerRow {
                method: method.into(),
                layer,
                n: m.n,
                dm_mean: m.mean,
                dm_std: m.std,
                dm_q05: m.q05,
                dm_q25: m.q25,
                dm_median: m.median,
                dm_q75: m.q75,
                dm_q95: m.q95,
                dd_mean: d.mean,
                dd_std: d.std,
                dd_q05: d.q05,
                dd_q25: d.q25,
                dd_median: d.median,
                dd_q75: d.q75,
                dd_q95: d.q95,
                angular_share_median: a.median,
                seed,
            }
        })
        .collect()
}

/// `disentangle.csv`: one frozen-backbone head per row.
#[derive(Debug, Clone, Serialize)]
pub struct DisentangleRow {
    /// "pretrained" or "random".
    pub backbone: String,
    pub layer: usize,
    pub head: &'static str,
    pub seed: u64,
    pub train_accuracy: f64,
    pub eval_accuracy: f64,
    pub n_train: usize,
    pub n_eval: usize,
    pub final_loss: f64,
}

pub const DISENTANGLE_HEADER: [&str; 9] = ["backbone", "layer", "head", "seed", "train_accuracy", "eval_accuracy", "n_train", "n_eval", "final_loss"];

/// `disentangle_summary.csv` (the bar chart's data): mean ± std over seeds.
#[derive(Debug, Clone, Serialize)]
pub struct DisentangleSummary {
    pub backbone: String,
    pub layer: usize,
    pub head: &'static str,
    pub seeds: usize,
    pub eval_accuracy_mean: f64,
    pub eval_accuracy_std: f64,
}

pub const DISENTANGLE_SUMMARY_HEADER: [&str; 6] = ["backbone", "layer", "head", "seeds", "eval_accuracy_mean", "eval_accuracy_std"];

pub fn summarize_heads(rows: &[DisentangleRow]) -> Vec<DisentangleSummary> {
    let mut keys: Vec<(String, usize, &'static str)> = Vec::new();
    for r in rows {
        let k = (r.backbone.clone(), r.layer, r.head);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys.into_iter()
        .map(|(backbone, layer, head)| {
            let v: Vec<f64> = rows.iter().filter(|r| r.backbone == backbone && r.layer == layer && r.head == head).map(|r| r.eval_accuracy).collect();
            let s = Stats::of(&v);
            DisentangleSummary { backbone, layer, head, seeds: s.n, eval_accuracy_mean: s.mean, eval_accuracy_std: s.std }
        })
        .collect()
}

/// `swap_probe.csv`: one row per (model, layer, kind).
#[derive(Debug, Clone, Serialize)]
pub struct SwapRow {
    pub model: String,
    pub layer: usize,
    /// "full" (the whole vector), "magnitude" (b·‖s‖/‖b‖) or "angle" (‖b‖·s/‖s‖).
    pub kind: &'static str,
    /// Pairs whose clean predictions differ; IIA = follows_source / n.
    pub n: usize,
    pub follows_source: usize,
    pub iia: f64,
    /// Fraction of all pairs whose prediction changed from the clean base's.
    pub change_rate: f64,
    pub n_all: usize,
    pub seed: u64,
}

pub const SWAP_HEADER: [&str; 9] = ["model", "layer", "kind", "n", "follows_source", "iia", "change_rate", "n_all", "seed"];

pub const FINETUNE_HEADER: [&str; 16] = [
    "method", "kind", "trains", "trainable_params", "trainable_pct", "steps", "lr", "best_step", "train_secs", "dev_accuracy", "test_accuracy",
    "test_majority", "test_n", "seed", "hash", "cached",
];

/// Everything the summary and the TUI need once the study is done.
pub struct PilotResult {
    pub run_dir: std::path::PathBuf,
    pub finetunes: Vec<super::finetunes::FtRecord>,
    pub layers: Vec<LayerRow>,
    pub heads: Vec<DisentangleSummary>,
    pub swap: Vec<SwapRow>,
    /// DoRA fine-tunes in weight space (empty without DoRA methods).
    pub dora: Vec<super::dora_weights::DoraWeightRow>,
    pub scatter_layer: usize,
    pub n_layers: usize,
    pub seconds: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn angular_share_splits_the_change_exactly() {
        // x0 = (1, 0), x = (2cos t, 2sin t): ‖x−x0‖² = 5 − 4cos t.
        let t = 0.7f64;
        let (dm, dd) = (1.0, t.cos());
        let total = dm * dm + 2.0 * (1.0 + dm) * (1.0 - dd);
        assert!((total - (5.0 - 4.0 * t.cos())).abs() < 1e-12);
        assert!((angular_share(0.0, 0.5) - 1.0).abs() < 1e-12);
        assert!(angular_share(0.5, 1.0).abs() < 1e-12);
        assert!(angular_share(0.0, 1.0).is_nan());
    }
}
