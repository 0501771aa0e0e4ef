//! `verify_top = K`: real patching (the vanilla interchange, through the same evaluation a
//! patching sweep runs) of the K cells of largest |estimate| and of K cells drawn at random
//! (seeded) from the rest; verify.csv holds each estimate beside its true effect, and
//! verify_summary.json the correlations and a false-negative indicator: the largest true effect
//! among the random cells, all ranked below the top K, against the smallest one inside it.
use super::atp::Estimates;
use super::atp_run::AtpRun;
use super::cells::Cell;
use super::evaluate::evaluate;
use super::data;
use crate::intervene::atp::AtpMetric;
use crate::intervene::InterventionSpec;
use crate::model::Site;
use crate::runs::{RunEvent, Sink};
use crate::tasks::Split;
use crate::util::stats::{pearson, spearman};
use anyhow::Result;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VerifyRow {
    pub layer: usize,
    pub site: String,
    pub position: String,
    pub heads: String,
    /// `top` (among the K largest |estimate|) or `random`.
    pub chosen: String,
    /// 1 = the largest |estimate| of the whole grid.
    pub rank: usize,
    pub effect_estimate: f64,
    /// Mean over pairs of `m_patched − m_base` with the cell really patched.
    pub true_effect: f64,
    /// The patched run's mean logit difference, as a patching sweep's metrics.csv has it.
    pub logit_diff: f64,
}

pub const VERIFY_HEADER: [&str; 9] = ["layer", "site", "position", "heads", "chosen", "rank", "effect_estimate", "true_effect", "logit_diff"];

#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifySummary {
    pub method: String,
    pub k: usize,
    pub cells_in_grid: usize,
    pub verified: usize,
    /// Over every verified cell (top and random).
    pub pearson: f64,
    pub spearman: f64,
    /// Over the random cells only (an unbiased sample of the grid).
    pub pearson_random: f64,
    pub spearman_random: f64,
    /// max |true effect| among the random cells (ranked below the top K by their estimate).
    pub max_abs_true_below_top: f64,
    /// min |true effect| among the top K.
    pub min_abs_true_in_top: f64,
    /// Random cells whose |true effect| beats the smallest in the top K: missed by the ranking.
    pub false_negatives: usize,
}

/// The cells to verify: (cell index, rank by |estimate|, chosen-as).
fn choose(means: &[f64], k: usize, seed: u64) -> Vec<(usize, usize, &'static str)> {
    let mut order: Vec<usize> = (0..means.len()).collect();
    // Largest |estimate| first; ties by grid order so the choice is deterministic.
    order.sort_by(|&a, &b| means[b].abs().total_cmp(&means[a].abs()).then(a.cmp(&b)));
    let k = k.min(order.len());
    let mut out: Vec<(usize, usize, &'static str)> = order[..k].iter().enumerate().map(|(r, &i)| (i, r + 1, "top")).collect();
    let mut rest: Vec<(usize, usize)> = order[k..].iter().enumerate().map(|(r, &i)| (i, k + r + 1)).collect();
    crate::util::rng::Rng::new(seed ^ 0xa7b0_5eed).shuffle(&mut rest);
    out.extend(rest.into_iter().take(k).map(|(i, r)| (i, r, "random")));
    out
}

/// Verify; None when cancelled part way (the rows so far are written).
pub fn verify(r: &AtpRun<'_>, est: &Estimates, means: &[f64], cancel: &AtomicBool, sink: &mut dyn Sink) -> Result<Option<VerifySummary>> {
    let k = r.opts.verify_top;
    let chosen = choose(means, k, r.spec.seed);
    let pairs = &r.prepared.data.test;
    let clean: Vec<&data::Clean> = (0..pairs.len()).map(|i| &r.prepared.clean[&(Split::Test, i)]).collect();
    let n = pairs.len().max(1) as f64;
    let ld_base = clean.iter().map(|c| c.ld_base).sum::<f64>() / n;
    let m_base = est.base_metric.iter().sum::<f64>() / n;
    let mut units: Vec<(usize, Site)> = chosen.iter().map(|&(i, ..)| (est.cells[i].layer, est.cells[i].site)).collect();
    units.sort();
    units.dedup();
    let top = chosen.iter().filter(|c| c.2 == "top").count();
    sink.send(RunEvent::Log(format!("verifying {} cells by real patching (top {top} by |estimate| + {} random)", chosen.len(), chosen.len() - top)));
    let cache = data::cache_split(r.model, pairs, &units)?;
    let t0 = std::time::Instant::now();
    let mut rows = Vec::with_capacity(chosen.len());
    for &(i, rank, how) in &chosen {
        if cancel.load(Ordering::Relaxed) {
            break;
        }
        let c = &est.cells[i];
        let heads: Vec<usize> = c.head.into_iter().collect();
        let cell = Cell { layer: c.layer, site: c.site, position: c.position.clone(), cols: super::runner::head_cols(&heads, r.model, c.site)?, heads: c.heads() };
        let cc = cache.cell(pairs, c.layer, c.site, &c.position)?;
        let width = cell.cols.as_ref().map(|x| x.dim(0)).transpose()?.unwrap_or(cc.source_vec[0].dim(0)?);
        let iv = InterventionSpec::Vanilla { dims: None }.build(width, 0, None, r.model.device())?;
        let e = evaluate(r.model, &cell, &cc, pairs, &clean, iv.as_ref())?;
        // The patching sweep's own numbers: its logit_diff (or −CE for log p(cf)) minus the clean base's.
        let true_effect = match r.opts.metric {
            AtpMetric::LogitDiff => e.logit_diff - ld_base,
            AtpMetric::Logprob => -e.loss - m_base,
        };
        rows.push(VerifyRow {
            layer: c.layer,
            site: c.site.name().into(),
            position: c.position.clone(),
            heads: c.heads(),
            chosen: how.into(),
            rank,
            effect_estimate: means[i],
            true_effect,
            logit_diff: e.logit_diff,
        });
    }
    crate::runs::write_csv(&r.run_dir.join("verify.csv"), &rows, &VERIFY_HEADER)?;
    if rows.len() < chosen.len() {
        return Ok(None);
    }
    let s = summarise(r.opts.method_name(), k, est.cells.len(), &rows, r.opts.grad_drop);
    sink.send(RunEvent::Log(format!(
        "verified {} cells in {:.1}s: Pearson {:.3}, Spearman {:.3} (random cells: {:.3}, {:.3}); false negatives {} (max |true| below the top {k}: {:.3}, min in it: {:.3})",
        rows.len(),
        t0.elapsed().as_secs_f64(),
        s.pearson,
        s.spearman,
        s.pearson_random,
        s.spearman_random,
        s.false_negatives,
        s.max_abs_true_below_top,
        s.min_abs_true_in_top
    )));
    crate::runs::atomic::write(&r.run_dir.join("verify_summary.json"), serde_json::to_string_pretty(&s)?.as_bytes())?;
    Ok(Some(s))
}

/// Correlations and the false-negative indicator of verified rows. `magnitude`: the estimates
/// are magnitudes (GradDrop), so they are correlated with |true effect|.
pub fn summarise(method: &str, k: usize, cells_in_grid: usize, rows: &[VerifyRow], magnitude: bool) -> VerifySummary {
    let truth = |r: &VerifyRow| if magnitude { r.true_effect.abs() } else { r.true_effect };
    let col = |f: &dyn Fn(&VerifyRow) -> bool, g: &dyn Fn(&VerifyRow) -> f64| -> Vec<f64> { rows.iter().filter(|r| f(r)).map(g).collect() };
    let all = |_: &VerifyRow| true;
    let random = |r: &VerifyRow| r.chosen == "random";
    let top = |r: &VerifyRow| r.chosen == "top";
    let (e, t) = (col(&all, &|r| r.effect_estimate), col(&all, &truth));
    let (er, tr) = (col(&random, &|r| r.effect_estimate), col(&random, &truth));
    let max_below = tr.iter().map(|x| x.abs()).fold(f64::NAN, f64::max);
    let min_top = col(&top, &|r| r.true_effect.abs()).into_iter().fold(f64::NAN, f64::min);
    VerifySummary {
        method: method.into(),
        k,
        cells_in_grid,
        verified: rows.len(),
        pearson: pearson(&e, &t),
        spearman: spearman(&e, &t),
        pearson_random: pearson(&er, &tr),
        spearman_random: spearman(&er, &tr),
        max_abs_true_below_top: max_below,
        min_abs_true_in_top: min_top,
        false_negatives: tr.iter().filter(|x| x.abs() > min_top).count(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choice_is_top_k_by_magnitude_then_seeded_random_from_the_rest() {
        let means = [0.1, -5.0, 0.3, 2.0, 0.0, -0.2, 0.05];
        let c = choose(&means, 2, 7);
        assert_eq!(&c[..2], &[(1, 1, "top"), (3, 2, "top")]);
        assert_eq!(c.len(), 4);
        assert!(c[2..].iter().all(|&(i, r, how)| how == "random" && ![1, 3].contains(&i) && r > 2));
        assert_eq!(c, choose(&means, 2, 7), "seeded");
        // K beyond the grid: every cell once, as top.
        assert_eq!(choose(&means, 10, 0).len(), 7);
    }

    #[test]
    fn a_random_cell_beating_the_top_is_a_false_negative() {
        let row = |chosen: &str, e: f64, t: f64| VerifyRow {
            layer: 0,
            site: "block_output".into(),
            position: "0".into(),
            heads: String::new(),
            chosen: chosen.into(),
            rank: 1,
            effect_estimate: e,
            true_effect: t,
            logit_diff: f64::NAN,
        };
        let rows = [row("top", 3.0, 2.0), row("top", 2.0, 1.0), row("random", 0.1, 1.5), row("random", 0.0, 0.2)];
        let s = summarise("plain", 2, 10, &rows, false);
        assert_eq!((s.false_negatives, s.max_abs_true_below_top, s.min_abs_true_in_top), (1, 1.5, 1.0));
        assert!((s.pearson - pearson(&[3.0, 2.0, 0.1, 0.0], &[2.0, 1.0, 1.5, 0.2])).abs() < 1e-12);
        assert!((s.pearson_random - 1.0).abs() < 1e-12);
    }
}
