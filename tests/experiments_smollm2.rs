//! Experiments on SmolLM2: the engine's patching numbers against a plainly hooked forward, and a
//! whole `road run` producing every output, deterministically.
mod common;
use common::*;
use road_dii::experiment::cells::{self, Cell};
use road_dii::experiment::data::cache_split;
use road_dii::experiment::{outputs, run, RunOptions, Spec};
use road_dii::intervene::{self, ApplyCtx};
use road_dii::model::{Fwd, LogitsAt, Site};
use road_dii::tasks::ioi;

#[test]
fn ioi_patching_matches_an_independent_hooked_forward() {
    let m = smollm2();
    let cfg = ioi::IoiConfig { variable: ioi::Variable::Flip, templates: vec![0, 3], sizes: [6, 0, 0], seed: 5 };
    let pairs = ioi::dataset(&m.tok, &cfg).unwrap().train;
    let cells_at = [(3, Site::BlockOutput), (17, Site::BlockOutput), (20, Site::AttnOutput), (25, Site::HeadOutput)];
    let sc = cache_split(&m.model, &pairs, &cells_at).unwrap();
    for &(layer, site) in &cells_at {
        for pos in ["S2", "IO", "last"] {
            let cc = sc.cell(&pairs, layer, site, pos).unwrap();
            let iv = intervene::InterventionSpec::default().build(cc.source_vec[0].dim(0).unwrap(), 0, None, m.model.device()).unwrap();
            let cell = Cell { layer, site, position: pos.into(), cols: None, heads: String::new() };
            let idx: Vec<usize> = (0..pairs.len()).collect();
            let got = cells::intervened_logits(&m.model, &cell, &cc, &pairs, &idx, iv.as_ref(), ApplyCtx::EVAL, false).unwrap();
            for (k, p) in pairs.iter().enumerate() {
                let mut h = PlainSwap { layer, site, pos: vec![p.base.position(pos).unwrap()], with: vec![cc.source_vec[k].clone()] };
                let want = m
                    .model
                    .forward(&[p.base.ids.clone()], Fwd { hooks: Some(&mut h), logits: LogitsAt::Last, ..Default::default() })
                    .unwrap()
                    .logits
                    .unwrap()
                    .get(0)
                    .unwrap();
                let got_k = got.get(k).unwrap();
                let d = max_abs_diff(&got_k, &want);
                assert!(d < 1e-4, "L{layer} {site} @{pos} pair {k}: {d}");
                // The logit difference the metrics report, from the plain computation.
                let w = want.to_vec1::<f32>().unwrap();
                let g = got_k.to_vec1::<f32>().unwrap();
                let ld = |v: &[f32]| v[p.cf_label as usize] - v[p.base.label as usize];
                assert!((ld(&w) - ld(&g)).abs() < 1e-4);
            }
        }
    }
}

#[test]
fn a_patching_run_writes_every_output_and_is_deterministic() {
    let out = std::env::temp_dir().join(format!("road-run-test-{}", std::process::id()));
    std::env::set_var("ROAD_OUT", &out);
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/experiments/ioi-patching.toml");
    let overrides = ["sites.layers=[10,28]".to_string(), "sites.positions=[\"S2\",\"last\",\"0\"]".into(), "task.sizes=[0,0,12]".into()];
    let spec = Spec::load(std::path::Path::new(file), &overrides).unwrap();
    let a = run(&spec, &RunOptions::default(), &mut road_dii::runs::events::Silent).unwrap();
    let b = run(&spec, &RunOptions::default(), &mut road_dii::runs::events::Silent).unwrap();
    assert_ne!(a.run_dir, b.run_dir, "a second run must not overwrite the first");
    for f in ["config.toml", "metrics.csv", "examples.csv", "train_log.csv", "summary.json", "iia_heatmap_block_output.svg", "iia_by_layer_block_output.svg"] {
        assert!(a.run_dir.join(f).exists(), "missing {f}");
    }
    let config = std::fs::read_to_string(a.run_dir.join("config.toml")).unwrap();
    assert!(config.contains("seed = 0"));
    let ma = outputs::read_metrics(&a.run_dir.join("metrics.csv")).unwrap();
    let mb = outputs::read_metrics(&b.run_dir.join("metrics.csv")).unwrap();
    assert_eq!(ma.len(), 2 * 3); // 2 layers x 3 positions, test split only
    for (x, y) in ma.iter().zip(&mb) {
        assert_eq!((x.layer, &x.position), (y.layer, &y.position));
        assert!((x.logit_diff - y.logit_diff).abs() < 1e-6 && x.iia_vocab == y.iia_vocab);
    }
    // Patching the first token (identical in base and source) changes nothing.
    let first = ma.iter().find(|r| r.position == "0" && r.layer == 10).unwrap();
    assert!(first.iia_vocab == 0.0 && first.normalized_effect.abs() < 1e-4, "{first:?}");
    // Patching S2 at an early layer moves the answer to the source's (a known IOI result).
    let s2 = ma.iter().find(|r| r.position == "S2" && r.layer == 10).unwrap();
    assert!(s2.iia_vocab > 0.5, "{s2:?}");
    // The last layer's final token carries the whole answer.
    let last = ma.iter().find(|r| r.position == "last" && r.layer == 28).unwrap();
    assert!(last.normalized_effect > 0.8, "{last:?}");
}
