//! `summary.md`: the study's numbers next to the paper's qualitative findings (METHODS.md §3),
//! each with the rule used to decide whether it holds on this model.
use super::tables::PilotResult;
use super::spec::PilotSpec;
use super::tables::LayerRow;
use std::fmt::Write;

fn verdict(holds: bool) -> &'static str {
    if holds {
        "**holds**"
    } else {
        "**does not hold**"
    }
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = v.filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

pub fn render(spec: &PilotSpec, r: &PilotResult) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# {} — magnitude vs angle\n", spec.name);
    let _ = writeln!(
        s,
        "Model `{}`, data `{}`, seed {}; {} blocks; representation = block output at the last prompt token. Whole study: {:.0} s.\n",
        spec.model, spec.data.source, spec.seed, r.n_layers, r.seconds
    );
    let _ = writeln!(s, "## Fine-tunes\n\n| method | trains | % trainable | steps | lr | dev acc | test acc (majority) | cached |\n|---|---|---|---|---|---|---|---|");
    for f in &r.finetunes {
        let _ = writeln!(
            s,
            "| {} | {} | {:.3}% | {} | {:.0e} | {:.3} | {:.3} ({:.3}) | {} |",
            f.method,
            if f.trains.is_empty() { &f.kind } else { &f.trains },
            f.trainable_pct,
            f.steps,
            f.lr,
            f.dev_accuracy,
            f.test_accuracy,
            f.test_majority,
            f.cached
        );
    }

    let l = r.scatter_layer;
    let _ = writeln!(s, "\n## Finding 1 — fine-tuning changes the angle far more than the magnitude\n");
    let _ = writeln!(s, "Paper (RoBERTa, SST-2): full FT ΔD ≈ 0.0–0.75 with ΔM ≈ 0.03–0.15; LoRA ΔD ≈ 0.6–0.9, ΔM ≈ 0.02–0.10.");
    let _ = writeln!(
        s,
        "Rule: the change `‖x−x⁰‖²/‖x⁰‖² = ΔM² + 2(1+ΔM)(1−ΔD)` splits exactly into a radial and an angular part; the finding holds for a method when the median angular share at block {l} exceeds 0.5.\n"
    );
    let _ = writeln!(s, "| method | ΔM median [q05, q95] | ΔD median [q05, q95] | angular share (median) | verdict |\n|---|---|---|---|---|");
    let at = |m: &str, layer: usize| -> Option<&LayerRow> { r.layers.iter().find(|x| x.method == m && x.layer == layer) };
    for f in &r.finetunes {
        if let Some(x) = at(&f.method, l) {
            let _ = writeln!(
                s,
                "| {} | {:+.4} [{:+.4}, {:+.4}] | {:.4} [{:.4}, {:.4}] | {:.3} | {} |",
                f.method,
                x.dm_median,
                x.dm_q05,
                x.dm_q95,
                x.dd_median,
                x.dd_q05,
                x.dd_q95,
                x.angular_share_median,
                verdict(x.angular_share_median > 0.5)
            );
        }
    }

    let _ = writeln!(s, "\n## Finding 2 — shallow blocks barely move; the last block moves in both\n");
    let third = (r.n_layers / 3).max(1);
    let _ = writeln!(
        s,
        "Rule: mean (1−ΔD) over the first third of blocks (0..{third}) is under a quarter of that over the last third; and the last block's mean |ΔM| and mean (1−ΔD) are both above their medians over blocks.\n"
    );
    let _ = writeln!(s, "| method | 1−ΔD first third | 1−ΔD last third | last block ΔM / 1−ΔD | shallow still | last moves in both |\n|---|---|---|---|---|---|");
    for f in &r.finetunes {
        let rows: Vec<&LayerRow> = r.layers.iter().filter(|x| x.method == f.method).collect();
        if rows.is_empty() {
            continue;
        }
        let first = mean(rows.iter().filter(|x| x.layer < third).map(|x| 1.0 - x.dd_mean));
        let last_third = mean(rows.iter().filter(|x| x.layer >= r.n_layers - third).map(|x| 1.0 - x.dd_mean));
        let last = rows[rows.len() - 1];
        let med = |v: Vec<f64>| crate::probe::Stats::of(&v).median;
        let dm_med = med(rows.iter().map(|x| x.dm_mean.abs()).collect());
        let dd_med = med(rows.iter().map(|x| 1.0 - x.dd_mean).collect());
        let both = last.dm_mean.abs() > dm_med && 1.0 - last.dd_mean > dd_med;
        let _ = writeln!(
            s,
            "| {} | {:.4} | {:.4} | {:+.4} / {:.4} | {} | {} |",
            f.method,
            first,
            last_third,
            last.dm_mean,
            1.0 - last.dd_mean,
            verdict(first < 0.25 * last_third),
            verdict(both)
        );
    }

    let _ = writeln!(s, "\n## Finding 3 — angle-only heads ≈ standard heads; magnitude-only heads are worse than a random backbone\n");
    let _ = writeln!(s, "Rule: on the pretrained backbone, |angle-only − standard| ≤ 0.05, and magnitude-only < standard on the random backbone (mean eval accuracy over seeds).\n");
    let mut layers: Vec<usize> = r.heads.iter().map(|h| h.layer).collect();
    layers.sort();
    layers.dedup();
    let acc = |b: &str, layer: usize, h: &str| r.heads.iter().find(|x| x.backbone == b && x.layer == layer && x.head == h).map(|x| (x.eval_accuracy_mean, x.eval_accuracy_std));
    let fmt = |v: Option<(f64, f64)>| v.map(|(m, sd)| format!("{m:.3} ± {sd:.3}")).unwrap_or_else(|| "–".into());
    for &layer in &layers {
        let _ = writeln!(s, "| block | backbone | standard | magnitude-only | angle-only |\n|---|---|---|---|---|");
        for b in ["pretrained", "random"] {
            let _ = writeln!(s, "| {layer} | {b} | {} | {} | {} |", fmt(acc(b, layer, "standard")), fmt(acc(b, layer, "magnitude_only")), fmt(acc(b, layer, "angle_only")));
        }
        let g = |b, h| acc(b, layer, h).map(|x| x.0).unwrap_or(f64::NAN);
        let close = (g("pretrained", "angle_only") - g("pretrained", "standard")).abs() <= 0.05;
        let worse = g("pretrained", "magnitude_only") < g("random", "standard");
        let _ = writeln!(s, "\nBlock {layer}: angle-only ≈ standard {}; magnitude-only below the random backbone {}.\n", verdict(close), verdict(worse));
    }

    let road: Vec<_> = r.finetunes.iter().filter(|f| f.kind == "road").collect();
    if !road.is_empty() {
        let _ = writeln!(s, "## RoAd ablation — θ only (α = 1), α only (θ = 0), both\n");
        let _ = writeln!(s, "| method | trains | % trainable | test acc | ΔD median at block {l} | ΔM median at block {l} |\n|---|---|---|---|---|---|");
        for f in &road {
            let x = at(&f.method, l);
            let _ = writeln!(
                s,
                "| {} | {} | {:.3}% | {:.3} | {} | {} |",
                f.method,
                f.trains,
                f.trainable_pct,
                f.test_accuracy,
                x.map(|x| format!("{:.4}", x.dd_median)).unwrap_or_default(),
                x.map(|x| format!("{:+.4}", x.dm_median)).unwrap_or_default()
            );
        }
        let get = |t: &str| road.iter().find(|f| f.trains == t).map(|f| f.test_accuracy);
        if let (Some(a), Some(m)) = (get("angle"), get("magnitude")) {
            let _ = writeln!(s, "\nAdapting only the angle (θ) {} adapting only the magnitude (α): {a:.3} vs {m:.3} test accuracy.", if a >= m { "matches or beats" } else { "falls behind" });
        }
    }

    let dora_methods: Vec<&str> = r.finetunes.iter().filter(|f| f.kind == "dora").map(|f| f.method.as_str()).collect();
    if !dora_methods.is_empty() && !r.dora.is_empty() {
        let _ = writeln!(s, "## DoRA in weight space — magnitude vector vs direction
");
        let _ = writeln!(s, "Per output row, `ΔM = m/‖W‖ − 1` and `ΔD = cos(W + sBA, W)` split `‖W'−W‖²/‖W‖²` as above; medians over rows, then over the adapted projections (`dora_weights.csv`). Rule: the angle dominates when the median angular share exceeds 0.5.
");
        let _ = writeln!(s, "| method | projections | ΔM median | mean abs ΔM | 1−ΔD median | angular share | angle changes dominate |
|---|---|---|---|---|---|---|");
        for m in dora_methods {
            let rows: Vec<_> = r.dora.iter().filter(|x| x.method == m).collect();
            let med = |f: &dyn Fn(&&super::dora_weights::DoraWeightRow) -> f64| {
                let mut v: Vec<f64> = rows.iter().map(f).filter(|x| x.is_finite()).collect();
                v.sort_by(f64::total_cmp);
                v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
            };
            let share = med(&|x| x.angular_share_median);
            let _ = writeln!(
                s,
                "| {m} | {} | {:+.5} | {:.5} | {:.2e} | {:.3} | {} |",
                rows.len(),
                med(&|x| x.dm_median),
                med(&|x| x.dm_abs_mean),
                1.0 - med(&|x| x.dd_median),
                share,
                verdict(share > 0.5)
            );
        }
        let _ = writeln!(s);
    }

    if !r.swap.is_empty() {
        let _ = writeln!(s, "\n## Swap probe — does the class live in the direction or the magnitude?\n");
        let _ = writeln!(s, "IIA = share of opposite-prediction pairs whose prediction follows the source after the interchange at the last token. Best block per kind:\n");
        let _ = writeln!(s, "| model | kind | best block | IIA there | mean IIA over blocks |\n|---|---|---|---|---|");
        let mut keys: Vec<(String, &str)> = Vec::new();
        for x in &r.swap {
            if !keys.iter().any(|k| k.0 == x.model && k.1 == x.kind) {
                keys.push((x.model.clone(), x.kind));
            }
        }
        for (m, k) in &keys {
            let rows: Vec<_> = r.swap.iter().filter(|x| &x.model == m && x.kind == *k && x.iia.is_finite()).collect();
            if let Some(best) = rows.iter().max_by(|a, b| a.iia.total_cmp(&b.iia)) {
                let _ = writeln!(s, "| {m} | {k} | {} | {:.3} (n={}) | {:.3} |", best.layer, best.iia, best.n, mean(rows.iter().map(|x| x.iia)));
            }
        }
    }
    let _ = writeln!(s, "\nFiles: delta_per_example.csv, delta_by_layer.csv, disentangle.csv, disentangle_summary.csv, finetunes.csv, road_ablation.csv, swap_probe.csv, figures/*.svg (schemas in experiments/README.md).");
    s
}
