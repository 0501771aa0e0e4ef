//! The intervention engine: invariants of every kind, the cached/resumed forward against a plain
//! hooked forward, orthonormality through training, and experiment-file validation.
mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use road_dii::experiment::cells::{self, Cell};
use road_dii::experiment::data::cache_split;
use road_dii::experiment::spec::TrainSpec;
use road_dii::experiment::Spec;
use road_dii::intervene::{self, orth, ApplyCtx, InterventionSpec};
use road_dii::model::{Fwd, LogitsAt, Site};
use std::sync::atomic::AtomicBool;

fn spec(kind: &str) -> InterventionSpec {
    InterventionSpec::from_kind(kind).unwrap().with_rank(2)
}

fn randn(shape: (usize, usize), seed: u64) -> Tensor {
    let mut r = road_dii::util::rng::Rng::new(seed);
    let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| r.normal() as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

#[test]
fn swapping_with_source_equal_to_base_is_a_no_op_for_every_source_kind() {
    let d = 16;
    let b = randn((5, d), 1);
    for kind in ["vanilla", "das", "rotation", "boundless", "sigmoid_mask", "road_dii", "magnitude", "angle"] {
        let iv = spec(kind).build(d, 7, None, &Device::Cpu).unwrap();
        let out = iv.apply(&b, &b, ApplyCtx::EVAL).unwrap();
        assert!(max_abs_diff(&out, &b) < 1e-4, "{kind}: {}", max_abs_diff(&out, &b));
    }
}

#[test]
fn road_dii_with_zero_angles_and_all_coordinates_equals_vanilla_full_swap() {
    let d = 16;
    let (b, s) = (randn((4, d), 2), randn((4, d), 3));
    for (variant, g) in [(road_dii::adapters::Variant::Road1, 2), (road_dii::adapters::Variant::Road4, 8)] {
        let rot = road_dii::adapters::Rotation::new(variant, g, d).unwrap();
        let n = variant.param_len(d);
        let iv = intervene::road_dii::RoadDii::with_params(
            rot,
            Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap(),
            Tensor::ones(n, DType::F32, &Device::Cpu).unwrap(),
            Tensor::ones(d, DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap();
        let out = intervene::Intervention::apply(&iv, &b, &s, ApplyCtx::EVAL).unwrap();
        let vanilla = spec("vanilla").build(d, 0, None, &Device::Cpu).unwrap().apply(&b, &s, ApplyCtx::EVAL).unwrap();
        assert!(max_abs_diff(&out, &vanilla) < 1e-5);
        assert!(max_abs_diff(&out, &s) < 1e-5);
    }
}

#[test]
fn das_swaps_exactly_the_subspace() {
    let d = 12;
    let (b, s) = (randn((3, d), 4), randn((3, d), 5));
    let iv = intervene::das::LowRankDas::new(d, 3, 9, &Device::Cpu).unwrap();
    let out = intervene::Intervention::apply(&iv, &b, &s, ApplyCtx::EVAL).unwrap();
    let r = iv.r.as_tensor();
    // Inside the subspace the output equals the source; orthogonal to it, the base.
    assert!(max_abs_diff(&out.matmul(&r.t().unwrap()).unwrap(), &s.matmul(&r.t().unwrap()).unwrap()) < 1e-4);
    let proj = |x: &Tensor| (x - x.matmul(&r.t().unwrap()).unwrap().matmul(r).unwrap()).unwrap();
    assert!(max_abs_diff(&proj(&out), &proj(&b)) < 1e-4);
}

#[test]
fn magnitude_and_angle_interchange_take_the_right_part() {
    let (b, s) = (randn((6, 10), 6), randn((6, 10), 7));
    let norm = |x: &Tensor| x.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap();
    let unit = |x: &Tensor| x.broadcast_div(&norm(x)).unwrap();
    let m = spec("magnitude").build(10, 0, None, &Device::Cpu).unwrap().apply(&b, &s, ApplyCtx::EVAL).unwrap();
    assert!(max_abs_diff(&norm(&m), &norm(&s)) < 1e-4);
    assert!(max_abs_diff(&unit(&m), &unit(&b)) < 1e-5);
    let a = spec("angle").build(10, 0, None, &Device::Cpu).unwrap().apply(&b, &s, ApplyCtx::EVAL).unwrap();
    assert!(max_abs_diff(&norm(&a), &norm(&b)) < 1e-4);
    assert!(max_abs_diff(&unit(&a), &unit(&s)) < 1e-5);
}

#[test]
fn cached_resumed_interventions_match_a_plain_hooked_forward() {
    let m = &tiny_a().model;
    let pairs = tiny_pairs();
    let sites = [Site::BlockOutput, Site::HeadOutput, Site::V, Site::MlpOutput];
    let needed: Vec<(usize, Site)> = (0..m.cfg.num_layers).flat_map(|l| sites.map(|s| (l, s))).collect();
    let sc = cache_split(m, &pairs, &needed).unwrap();
    let iv = spec("vanilla").build(0, 0, None, &Device::Cpu);
    assert!(iv.is_ok());
    for &(layer, site) in &needed {
        for pos in ["last", "mid", "0"] {
            let cc = sc.cell(&pairs, layer, site, pos).unwrap();
            let w = cc.source_vec[0].dim(0).unwrap();
            let vanilla = spec("vanilla").build(w, 0, None, &Device::Cpu).unwrap();
            let cell = Cell { layer, site, position: pos.into(), cols: None, heads: String::new() };
            let idx: Vec<usize> = (0..pairs.len()).collect();
            // Same-length rows exercise the prefix-reuse path, mixed lengths the padded path.
            for group in [vec![0usize, 2], idx.clone()] {
                let got = cells::intervened_logits(m, &cell, &cc, &pairs, &group, vanilla.as_ref(), ApplyCtx::EVAL, false).unwrap();
                for (k, &i) in group.iter().enumerate() {
                    let mut h = PlainSwap { layer, site, pos: vec![cc.base_pos[i]], with: vec![cc.source_vec[i].clone()] };
                    let want = m
                        .forward(&[pairs[i].base.ids.clone()], Fwd { hooks: Some(&mut h), logits: LogitsAt::Last, ..Default::default() })
                        .unwrap()
                        .logits
                        .unwrap()
                        .get(0)
                        .unwrap();
                    let d = max_abs_diff(&got.get(k).unwrap(), &want);
                    assert!(d < 1e-4, "layer {layer} {site} @{pos} pair {i}: {d}");
                }
            }
        }
    }
}

#[test]
fn das_rotation_stays_orthonormal_through_training_and_gradients_reach_only_it() {
    let m = &tiny_a().model;
    let pairs = tiny_pairs();
    // Layer 0, a middle position: its effect reaches the output through layer 1's attention.
    let sc = cache_split(m, &pairs, &[(0, Site::BlockOutput)]).unwrap();
    let cc = sc.cell(&pairs, 0, Site::BlockOutput, "mid").unwrap();
    let cell = Cell { layer: 0, site: Site::BlockOutput, position: "mid".into(), cols: None, heads: String::new() };
    for kind in ["das", "boundless", "loreft"] {
        let mut iv = InterventionSpec::from_kind(kind).unwrap().with_rank(4).build(m.cfg.hidden_size, 3, None, &Device::Cpu).unwrap();
        let before: Vec<Tensor> = iv.params().iter().map(|p| p.var.as_tensor().copy().unwrap()).collect();
        let ts = TrainSpec { steps: 15, batch: 2, lr: 5e-2, ..Default::default() };
        let mut losses = Vec::new();
        let log = cells::train(m, &cell, &cc, &pairs, iv.as_mut(), &ts, 1, &AtomicBool::new(false), None, &mut |r| losses.push(r.loss)).unwrap().log;
        assert_eq!(log.len(), 15);
        let rot = iv.params().into_iter().find(|p| p.name == "rotation").unwrap();
        let err = orth::orthonormality_error(rot.var.as_tensor()).unwrap();
        assert!(err < 1e-5, "{kind}: |RRᵀ − I| = {err}");
        for (p, b) in iv.params().iter().zip(&before) {
            assert!(max_abs_diff(p.var.as_tensor(), b) > 1e-6, "{kind}: {} did not move", p.name);
        }
        assert!(losses.iter().all(|l| l.is_finite()));
    }
}

#[test]
fn road_dii_training_updates_angles_and_mask() {
    let m = &tiny_a().model;
    let pairs = tiny_pairs();
    let sc = cache_split(m, &pairs, &[(0, Site::BlockOutput)]).unwrap();
    let cc = sc.cell(&pairs, 0, Site::BlockOutput, "last").unwrap();
    let cell = Cell { layer: 0, site: Site::BlockOutput, position: "last".into(), cols: None, heads: String::new() };
    let mut iv = spec("road_dii").build(m.cfg.hidden_size, 3, None, &Device::Cpu).unwrap();
    let names: Vec<String> = iv.params().iter().map(|p| p.name.clone()).collect();
    assert_eq!(names, ["road_theta", "mask_logits"]);
    let before: Vec<Tensor> = iv.params().iter().map(|p| p.var.as_tensor().copy().unwrap()).collect();
    let ts = TrainSpec { steps: 5, batch: 4, lr: 5e-2, ..Default::default() };
    cells::train(m, &cell, &cc, &pairs, iv.as_mut(), &ts, 1, &AtomicBool::new(false), None, &mut |_| {}).unwrap();
    for (p, b) in iv.params().iter().zip(&before) {
        assert!(max_abs_diff(p.var.as_tensor(), b) > 1e-7, "{} did not move", p.name);
    }
}

#[test]
fn experiment_files_report_unknown_keys_with_line_and_accept_overrides() {
    let good = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/experiments/ioi-das.toml")).unwrap();
    let s = Spec::from_toml(&good, "ioi-das.toml").unwrap();
    assert_eq!(s.intervention.kind_name(), "das");
    let bad = good.replace("rank = 1", "rank = 1\nrnak = 2");
    let e = Spec::from_toml(&bad, "x.toml").unwrap_err().to_string();
    assert!(e.contains("rnak") && e.contains("line"), "{e}");
    let wrong_type = good.replace("steps = 50", "steps = \"many\"");
    let e = Spec::from_toml(&wrong_type, "x.toml").unwrap_err().to_string();
    assert!(e.contains("steps") || e.contains("line"), "{e}");
    let dir = std::env::temp_dir().join(format!("road-spec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("e.toml");
    std::fs::write(&f, &good).unwrap();
    let s = Spec::load(&f, &["train.lr=3e-3".into(), "sites.layers=8..16".into()]).unwrap();
    assert_eq!(s.train.lr, 3e-3);
    assert_eq!(s.layer_list(30).unwrap(), (8..16).collect::<Vec<_>>());
    assert!(s.layer_list(10).unwrap_err().to_string().contains("out of range"));
    assert!(Spec::load(&f, &["intervention.kind=\"nope\"".into()]).unwrap_err().to_string().contains("nope"));
    // Switching kinds drops the file's rank (1) but keeps what the override sets, one key at a
    // time or as a whole table (a whole table once lost its rank to the file's: silently rank 1).
    let road = |sets: &[&str]| {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Spec::load(&f, &sets).unwrap().intervention.rank()
    };
    let table = "intervention={kind=\"road_dii\", road_selection=\"fixed\", rank=4}";
    assert_eq!(road(&[table]), Some(4));
    assert_eq!(road(&["intervention.kind=\"road_dii\"", "intervention.road_selection=\"fixed\"", "intervention.rank=3"]), Some(3));
    assert_eq!(road(&["intervention={kind=\"das\", rank=8}"]), Some(8));
    assert_eq!(road(&["intervention.rank=2"]), Some(2));
    let v = Spec::load(&f, &["intervention.kind=\"vanilla\"".into()]).unwrap();
    assert_eq!(v.intervention.kind_name(), "vanilla");
}
