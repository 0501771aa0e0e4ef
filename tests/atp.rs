//! Attribution patching against computations written plainly (in `common/atp_ref.rs`): a
//! per-cell backward through a hand-made replacement `a ← a + α (s − a)` (dm/dα at α = 0 is the
//! cell's AtP estimate), central finite differences of the fused inference forward (what would
//! catch gradients lost in an op without a backward), IG with one point against the same backward
//! at the midpoint embeddings, every family's knobs, and verification against a patching sweep's
//! own numbers.
mod common;
#[path = "common/atp_ref.rs"]
mod atp_ref;
use atp_ref::*;
use candle_core::{DType, Device};
use road_dii::experiment::atp;
use road_dii::experiment::data::left_pad;
use road_dii::intervene::atp::{AtpMethod, AtpMetric, AtpOptions};
use road_dii::model::{Llama, Site};
use road_dii::tasks;
use std::collections::BTreeMap;

#[test]
fn plain_atp_equals_a_direct_backward_at_every_site_on_the_tiny_model() {
    let m = &tiny().model;
    let pairs = equality_pairs(20, 3);
    let units: Vec<(usize, Site)> = [0, 1, 2].iter().flat_map(|&l| ALL_SITES.iter().map(move |&s| (l, s))).collect();
    let nz = check_plain(m, &pairs, &units, &["a", "b", "last"], AtpMetric::LogitDiff);
    // 3 layers × 9 sites × 3 positions + heads: most cells carry a gradient.
    assert!(nz > 100, "only {nz} non-zero estimates");
    let nz = check_plain(m, &pairs[..6], &[(1, Site::HeadOutput), (2, Site::V), (1, Site::MlpOutput)], &["b", "d"], AtpMetric::Logprob);
    assert!(nz > 5, "{nz}");
}

#[test]
fn plain_atp_equals_a_direct_backward_on_padded_batches() {
    let m = &tiny().model;
    let pairs = padded_pairs(m.cfg.vocab_size as u32, 21, 9);
    let (_, mask, _) = left_pad(&pairs.iter().map(|p| p.base.ids.as_slice()).collect::<Vec<_>>());
    assert!(mask.iter().any(|r| r[0] == 0), "the batch must be padded");
    let units = [(0, Site::Q), (0, Site::K), (1, Site::V), (1, Site::HeadOutput), (2, Site::BlockInput), (2, Site::ResidMid)];
    let nz = check_plain(m, &pairs, &units, &["x", "last", "-2"], AtpMetric::LogitDiff);
    assert!(nz > 20, "{nz}");
}

/// The model's site pass under every other family's knobs — q/k/v bias (Qwen2), q/k norm and
/// head_dim ≠ hidden/heads (Qwen3), sliding windows shorter than the rows (Mistral 4, Gemma 2 3),
/// Gemma 2's sandwich norms, GeGLU and both soft-caps (also tightened, so a wrong tanh
/// derivative could not hide): plain AtP equals the direct autograd backward on padded batches.
/// The QK fix is exact where it applies (Qwen2) and a one-line error where it does not.
#[test]
fn plain_atp_equals_a_direct_backward_for_every_family() {
    let gemma = &common::tiny_family("hf-tiny-gemma2").model;
    let mut cfg = gemma.cfg.clone();
    // Caps this tight bend the random model's small scores and logits well away from linear.
    (cfg.arch.attn_softcap, cfg.arch.final_softcap) = (Some(0.5), Some(0.3));
    let vb = candle_nn::VarBuilder::from_tensors(gemma.named_weights().unwrap().into_iter().collect(), DType::F32, &Device::Cpu);
    let capped = Llama::load(vb, cfg).unwrap();
    let models: Vec<(&str, &Llama)> = ["hf-tiny-mistral", "hf-tiny-qwen2", "hf-tiny-qwen3", "hf-tiny-gemma2"]
        .into_iter()
        .map(|n| (n, &common::tiny_family(n).model))
        .chain([("gemma2, tight caps", &capped)])
        .collect();
    for (name, m) in models {
        let pairs = padded_pairs(m.cfg.vocab_size as u32, 7, 17);
        let units: Vec<(usize, Site)> = (0..m.cfg.num_layers).flat_map(|l| ALL_SITES.into_iter().map(move |s| (l, s))).collect();
        let nz = check_plain(m, &pairs, &units, &["x", "last"], AtpMetric::LogitDiff);
        assert!(nz > 20, "{name}: only {nz} non-zero estimates");
        let nz = check_plain(m, &pairs[..4], &[(0, Site::K), (1, Site::MlpOutput)], &["x"], AtpMetric::Logprob);
        assert!(nz > 1, "{name}: {nz}");
        let qk = AtpOptions { qk_fix: true, ..Default::default() };
        let pos = vec!["x".to_string()];
        match atp::estimate(m, &pairs, &[(1, Site::Q), (0, Site::K)], &pos, &[], &qk) {
            Ok(est) => {
                assert_eq!(name, "hf-tiny-qwen2", "the QK fix ran on {name}");
                for (c, v) in est.cells.iter().zip(&est.per_pair) {
                    let (got, want) = (v.iter().sum::<f64>(), qk_direct(m, &pairs, c));
                    assert!(close(got, want, 1e-4), "{name} {c:?}: QK-fixed {got} vs exact pattern {want}");
                }
            }
            Err(e) => {
                let e = e.to_string();
                assert!(name != "hf-tiny-qwen2" && e.contains("qk_fix") && !e.contains('\n'), "{name}: {e}");
            }
        }
    }
}

#[test]
fn atp_gradients_match_finite_differences_of_the_fused_forward() {
    // Guards against an op without a backward (fused rms_norm, softmax, rope): the gradient
    // would silently vanish, and the direct backward would agree with it; finite differences
    // of the inference kernels would not.
    let m = &tiny().model;
    let pairs = equality_pairs(12, 4);
    let units = [(0, Site::BlockInput), (0, Site::Q), (0, Site::K), (1, Site::HeadOutput), (1, Site::ResidMid), (2, Site::MlpOutput)];
    let positions: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
    let est = atp::estimate(m, &pairs, &units, &positions, &[], &AtpOptions::default()).unwrap();
    let mut checked = 0;
    for (c, v) in est.cells.iter().zip(&est.per_pair).filter(|(c, _)| c.head.is_none() || c.head == Some(1)) {
        let got: f64 = v.iter().sum();
        // Richardson's extrapolation of two central differences: O(h⁴), so the small steps
        // an f32 forward can resolve suffice where the trained model's metric bends sharply.
        let (f1, f2) = (finite_difference(m, &pairs, c, 2e-3), finite_difference(m, &pairs, c, 1e-3));
        let fd = (4.0 * f2 - f1) / 3.0;
        // f32 rounding of a metric summed over 12 pairs, divided by a 1e-3 step: ~1e-2 absolute,
        // plus the finite difference's own uncertainty at this cell, measured as the spread of
        // its two step sizes (large only where rounding dominates: cells with ~zero gradient).
        let spread = (f1 - f2).abs();
        assert!((got - fd).abs() <= 2e-2 * fd.abs() + 1e-2 + spread, "{c:?}: AtP {got} vs finite difference {fd} (steps: {f1}, {f2})");
        checked += (fd.abs() > 0.5) as usize;
    }
    assert!(checked >= 10, "only {checked} cells with a clear gradient");
}

#[test]
fn ig_with_one_point_equals_the_gradient_at_the_midpoint_embeddings() {
    let m = &tiny().model;
    for pairs in [equality_pairs(10, 5), padded_pairs(m.cfg.vocab_size as u32, 9, 11)] {
        let pos: Vec<String> = if pairs[0].base.positions.contains_key("a") { vec!["a".into(), "last".into()] } else { vec!["x".into(), "last".into()] };
        let units = [(0, Site::K), (1, Site::HeadOutput), (2, Site::BlockOutput)];
        let opts = AtpOptions { method: AtpMethod::Ig, steps: 1, ..Default::default() };
        let est = atp::estimate(m, &pairs, &units, &pos, &[], &opts).unwrap();
        let (ib, _, _) = left_pad(&pairs.iter().map(|p| p.base.ids.as_slice()).collect::<Vec<_>>());
        let (is, _, _) = left_pad(&pairs.iter().map(|p| p.source.ids.as_slice()).collect::<Vec<_>>());
        let mid = ((m.embed(&ib).unwrap() + m.embed(&is).unwrap()).unwrap() * 0.5).unwrap();
        let mut differs = 0;
        for (c, v) in est.cells.iter().zip(&est.per_pair) {
            let got: f64 = v.iter().sum();
            let want = direct(m, &pairs, c, AtpMetric::LogitDiff, Some(mid.clone()));
            assert!(close(got, want, 1e-4), "{c:?}: IG(1) {got} vs midpoint backward {want}");
            differs += !close(want, direct(m, &pairs, c, AtpMetric::LogitDiff, None), 1e-3) as usize;
        }
        // The midpoint is not the base: IG(1) is not plain AtP in disguise.
        assert!(differs > 3, "{differs}");
    }
    let mut bad = equality_pairs(2, 5);
    let extra = bad[0].source.ids[0];
    bad[0].source.ids.push(extra);
    let opts = AtpOptions { method: AtpMethod::Ig, ..Default::default() };
    let e = atp::estimate(m, &bad, &[(0, Site::BlockOutput)], &["a".into()], &[], &opts).err().unwrap().to_string();
    assert!(e.contains("ig") && e.contains("pair 0") && !e.contains('\n'), "{e}");
}

#[test]
fn plain_atp_equals_a_direct_backward_on_smollm2_padded_ioi() {
    let l = common::smollm2();
    let cfg = tasks::ioi::IoiConfig { variable: tasks::ioi::Variable::Flip, templates: vec![0, 4], sizes: [0, 0, 6], seed: 2 };
    let pairs = tasks::ioi::dataset(&l.tok, &cfg).unwrap().test;
    assert!(pairs.iter().any(|p| p.base.ids.len() != pairs[0].base.ids.len()), "two templates: a padded batch");
    let units = [(3, Site::BlockOutput), (9, Site::Q), (9, Site::K), (14, Site::V), (20, Site::HeadOutput), (24, Site::MlpOutput)];
    let positions: Vec<String> = ["S2", "last"].iter().map(|s| s.to_string()).collect();
    let est = atp::estimate(&l.model, &pairs, &units, &positions, &[0, 2], &AtpOptions::default()).unwrap();
    let mut nonzero = 0;
    for (c, v) in est.cells.iter().zip(&est.per_pair) {
        let got: f64 = v.iter().sum();
        let want = direct(&l.model, &pairs, c, AtpMetric::LogitDiff, None);
        assert!(close(got, want, 1e-4), "{c:?}: AtP {got} vs direct backward {want}");
        nonzero += (want.abs() > 1e-3) as usize;
    }
    assert!(nonzero > 10, "{nonzero}");
}

const TINY_ATP: &str = r#"
name = "tiny-atp"
seed = 0
[model]
name = "tiny-equality"
[task]
name = "equality"
variable = "left"
sizes = [0, 0, 40]
[sites]
layers = "all"
site = ["block_output", "mlp_output", "head_output"]
positions = ["a", "b", "last"]
[intervention]
kind = "atp"
[intervention.atp]
verify_top = 1000
"#;

/// Tests that run whole experiments set ROAD_OUT: one at a time.
static RUNS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn read_csv(path: &std::path::Path) -> Vec<BTreeMap<String, String>> {
    let mut r = csv::Reader::from_path(path).unwrap();
    let h = r.headers().unwrap().clone();
    r.records().map(|x| h.iter().zip(x.unwrap().iter()).map(|(a, b)| (a.to_string(), b.to_string())).collect()).collect()
}

#[test]
fn verified_effects_equal_a_patching_sweeps_numbers_exactly() {
    use road_dii::experiment::{run, RunOptions, Spec};
    let _one = RUNS.lock().unwrap_or_else(|e| e.into_inner());
    let out = std::env::temp_dir().join(format!("road-atp-test-{}", std::process::id()));
    std::env::set_var("ROAD_OUT", &out);
    let silent = &mut road_dii::runs::events::Silent;
    let spec = Spec::from_toml(TINY_ATP, "tiny-atp").unwrap();
    let a = run(&spec, &RunOptions::default(), silent).unwrap();
    assert!(a.complete);
    for f in ["metrics.csv", "verify.csv", "verify_summary.json", "summary.json", "atp_heatmap_block_output.svg", "atp_heatmap_head_output_h3.svg"] {
        assert!(a.run_dir.join(f).exists(), "missing {f}");
    }
    let metrics = read_csv(&a.run_dir.join("metrics.csv"));
    // 3 layers × 3 positions × (block_output, mlp_output, head_output + its 4 heads).
    assert_eq!(metrics.len(), 3 * 3 * 7);
    assert!(metrics.iter().all(|r| r["intervention"] == "atp" && r["method"] == "plain" && r["effect_estimate"].parse::<f64>().unwrap().is_finite()));
    let verify = read_csv(&a.run_dir.join("verify.csv"));
    assert_eq!(verify.len(), metrics.len(), "verify_top beyond the grid verifies every cell");
    // The same cells by a patching sweep: whole vectors, then heads one by one.
    let whole = Spec::from_toml_with(TINY_ATP, "vanilla", &["intervention.kind=\"vanilla\"".into()]).unwrap();
    let heads = Spec::from_toml_with(
        TINY_ATP,
        "heads",
        &["intervention.kind=\"vanilla\"".into(), "sites.site=\"head_output\"".into(), "sites.sweep_heads=true".into()],
    )
    .unwrap();
    let mut patched = Vec::new();
    for s in [whole, heads] {
        let r = run(&s, &RunOptions::default(), silent).unwrap();
        patched.extend(read_csv(&r.run_dir.join("metrics.csv")).into_iter().filter(|r| r["split"] == "test"));
    }
    let key = |r: &BTreeMap<String, String>| (r["layer"].clone(), r["site"].clone(), r["position"].clone(), r["heads"].clone());
    let mut offsets = Vec::new();
    for v in &verify {
        let p = patched.iter().find(|p| key(p) == key(v)).unwrap_or_else(|| panic!("no patching row for {:?}", key(v)));
        assert_eq!(v["logit_diff"], p["logit_diff"], "{:?}", key(v));
        offsets.push(v["logit_diff"].parse::<f64>().unwrap() - v["true_effect"].parse::<f64>().unwrap());
    }
    // true_effect = patched LD − the clean base LD (one number for every cell).
    assert!(offsets.iter().all(|o| (o - offsets[0]).abs() < 1e-9), "{offsets:?}");
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(a.run_dir.join("verify_summary.json")).unwrap()).unwrap();
    let r = summary["pearson"].as_f64().unwrap();
    assert!(r.is_finite() && r > 0.0, "{summary}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn grad_drop_equals_direct_backwards_with_each_layer_detached() {
    let m = &tiny().model;
    let pairs = equality_pairs(6, 6);
    let units = [(0, Site::Q), (0, Site::HeadOutput), (1, Site::BlockInput), (1, Site::AttnOutput), (2, Site::MlpOutput)];
    let positions: Vec<String> = ["a", "b"].iter().map(|s| s.to_string()).collect();
    let opts = AtpOptions { grad_drop: true, ..Default::default() };
    let est = atp::estimate(m, &pairs, &units, &positions, &[1], &opts).unwrap();
    let dropped = est.dropped.as_ref().unwrap();
    assert_eq!(dropped.len(), 3);
    let n = pairs.len() as f64;
    let mut changed = 0;
    for (ci, c) in est.cells.iter().enumerate() {
        let plain = direct(m, &pairs, c, AtpMetric::LogitDiff, None);
        let mut want = 0.0;
        for l in 0..3 {
            let d = direct_dropping(m, &pairs, c, AtpMetric::LogitDiff, None, Some(l));
            let got: f64 = dropped[l][ci].iter().sum();
            assert!(close(got, d, 1e-4), "{c:?} dropping layer {l}: {got} vs {d}");
            changed += !close(d, plain, 1e-3) as usize;
            // AtP*: the absolute value per pair, then the mean over pairs.
            for i in 0..pairs.len() {
                let one = direct_dropping(m, &pairs[i..i + 1], c, AtpMetric::LogitDiff, None, Some(l));
                assert!(close(dropped[l][ci][i], one, 1e-4), "{c:?} pair {i} dropping layer {l}");
                want += one.abs() / 2.0 / n;
            }
        }
        assert!(close(est.means()[ci], want, 1e-4), "{c:?}: {} vs {want}", est.means()[ci]);
    }
    // Dropping a layer at or after a unit changes its gradient; before it, nothing.
    assert!(changed >= 6, "{changed}");
}

#[test]
fn guided_search_trains_das_where_the_verified_effect_is_largest() {
    use road_dii::experiment::search::{search, SearchOptions};
    use road_dii::experiment::Spec;
    let _one = RUNS.lock().unwrap_or_else(|e| e.into_inner());
    let out = std::env::temp_dir().join(format!("road-search-test-{}", std::process::id()));
    std::env::set_var("ROAD_OUT", &out);
    let text = TINY_ATP.replace("verify_top = 1000", "verify_top = 4").replace("[intervention]", "[train]\nsteps = 30\n\n[intervention]");
    let spec = Spec::from_toml(&text, "tiny-search").unwrap();
    let o = SearchOptions { das_cells: 2, sizes: [128, 32, 64], ..Default::default() };
    let (dir, rows) = search(&spec, &o, &mut road_dii::runs::events::Silent).unwrap();
    assert_eq!(rows.len(), 2);
    let verify = read_csv(&dir.join("verify.csv"));
    let top = verify.iter().map(|r| r["true_effect"].parse::<f64>().unwrap().abs()).fold(0.0, f64::max);
    assert!(rows.iter().any(|r| (r.true_effect.abs() - top).abs() < 1e-12), "the largest verified effect is trained");
    assert!(rows.iter().all(|r| (0.0..=1.0).contains(&r.das_test_iia) && r.control_iia.is_finite() && std::path::Path::new(&r.das_run).exists()));
    assert!(rows[0].das_test_iia >= rows[1].das_test_iia);
    assert_eq!(read_csv(&dir.join("search.csv")).len(), 2);
    let bad = Spec::from_toml_with(TINY_ATP, "vanilla", &["intervention.kind=\"vanilla\"".into()]).unwrap();
    let e = search(&bad, &o, &mut road_dii::runs::events::Silent).unwrap_err().to_string();
    assert!(e.contains("atp") && !e.contains('\n'), "{e}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn qk_fix_equals_the_exact_pattern_change_times_the_gradient() {
    let m = &tiny().model;
    for pairs in [equality_pairs(12, 8), padded_pairs(m.cfg.vocab_size as u32, 10, 13)] {
        let pos: Vec<String> = if pairs[0].base.positions.contains_key("a") { vec!["a".into(), "c".into()] } else { vec!["x".into(), "-2".into()] };
        let units = [(0, Site::Q), (1, Site::K), (2, Site::Q), (2, Site::K), (1, Site::MlpOutput)];
        let qk = atp::estimate(m, &pairs, &units, &pos, &[], &AtpOptions { qk_fix: true, ..Default::default() }).unwrap();
        let plain = atp::estimate(m, &pairs, &units, &pos, &[], &AtpOptions::default()).unwrap();
        let mut differs = 0;
        for ((c, v), w) in qk.cells.iter().zip(&qk.per_pair).zip(&plain.per_pair) {
            let (got, lin): (f64, f64) = (v.iter().sum(), w.iter().sum());
            if c.site == Site::MlpOutput {
                assert_eq!(got, lin, "the fix leaves other sites alone");
                continue;
            }
            let want = qk_direct(m, &pairs, c);
            assert!(close(got, want, 1e-4), "{c:?}: QK-fixed {got} vs exact pattern {want} (plain {lin})");
            differs += !close(got, lin, 1e-2) as usize;
        }
        assert!(differs > 3, "the fix changes q/k estimates: {differs}");
    }
    let e = AtpOptions { qk_fix: true, grad_drop: true, ..Default::default() }.validate().unwrap_err().to_string();
    assert!(e.contains("qk_fix"), "{e}");
}
