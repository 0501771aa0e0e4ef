//! Invariants of our forward pass on the tiny transformers-made LLaMA (fast).
mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use road_dii::intervene::replace::Replace;
use road_dii::model::{Collector, Fwd, KvCache, LogitsAt, Proj, Site};
use road_dii::adapters::{RoadAdapter, Rotation, Variant};

fn prompt_ids() -> Vec<Vec<u32>> {
    let m = tiny_a();
    ["When Mary and John went to the store, John gave a drink to", "The capital of France is", "1 2 3"]
        .iter()
        .map(|t| m.tok.encode(t).unwrap())
        .collect()
}

fn logits_all(ids: &[u32]) -> Tensor {
    tiny_a().model.forward(&[ids.to_vec()], Fwd::default()).unwrap().logits.unwrap().get(0).unwrap()
}

#[test]
fn left_and_right_padding_match_unbatched_runs() {
    let m = tiny_a();
    let rows = prompt_ids();
    let t = rows.iter().map(|r| r.len()).max().unwrap();
    for left in [true, false] {
        let mut ids = Vec::new();
        let mut mask = Vec::new();
        for r in &rows {
            let pad = t - r.len();
            let (mut row, mut mrow) = (Vec::new(), Vec::new());
            if left {
                row.extend(vec![0u32; pad]);
                mrow.extend(vec![0u8; pad]);
            }
            row.extend(r);
            mrow.extend(vec![1u8; r.len()]);
            if !left {
                row.extend(vec![0u32; pad]);
                mrow.extend(vec![0u8; pad]);
            }
            ids.push(row);
            mask.push(mrow);
        }
        let out = m.model.forward(&ids, Fwd { attention_mask: Some(&mask), ..Default::default() }).unwrap();
        let last = m.model.forward(&ids, Fwd { attention_mask: Some(&mask), logits: LogitsAt::Last, ..Default::default() }).unwrap();
        let all = out.logits.unwrap();
        for (i, r) in rows.iter().enumerate() {
            let single = logits_all(r);
            let start = if left { t - r.len() } else { 0 };
            let batched = all.get(i).unwrap().narrow(0, start, r.len()).unwrap();
            let d = max_abs_diff(&batched, &single);
            assert!(d < 1e-4, "left={left} row {i}: {d}");
            let d_last = max_abs_diff(&last.logits.as_ref().unwrap().get(i).unwrap(), &single.get(r.len() - 1).unwrap());
            assert!(d_last < 1e-4, "left={left} row {i} last: {d_last}");
        }
    }
}

#[test]
fn kv_cache_decoding_matches_full_forward() {
    let m = tiny_a();
    let ids = &prompt_ids()[0];
    let full = logits_all(ids);
    let mut cache = KvCache::new(m.model.cfg.num_layers);
    let split = 5;
    let first = m.model.forward(&[ids[..split].to_vec()], Fwd { cache: Some(&mut cache), ..Default::default() }).unwrap();
    assert!(max_abs_diff(&first.logits.unwrap().get(0).unwrap(), &full.narrow(0, 0, split).unwrap()) < 1e-4);
    for (k, &tok) in ids[split..].iter().enumerate() {
        let out = m.model.forward(&[vec![tok]], Fwd { cache: Some(&mut cache), logits: LogitsAt::Last, ..Default::default() }).unwrap();
        let d = max_abs_diff(&out.logits.unwrap().get(0).unwrap(), &full.get(split + k).unwrap());
        assert!(d < 1e-4, "step {k}: {d}");
    }
    assert_eq!(cache.seq_len(), ids.len());
}

#[test]
fn gradients_reach_a_road_parameter_at_the_first_block() {
    let m = tiny_a();
    let ad = RoadAdapter::new_identity(&m.model.cfg, Variant::Road1, 2, [0], &[Proj::Q, Proj::V], &Device::Cpu).unwrap();
    let ids = prompt_ids()[0].clone();
    let out = m.model.forward(&[ids], Fwd { adapter: Some(&ad), differentiable: true, ..Default::default() }).unwrap();
    let t = out.hidden.dim(1).unwrap();
    let targets = Tensor::new(vec![5u32; t], &Device::Cpu).unwrap();
    let loss = candle_nn::loss::cross_entropy(&out.logits.unwrap().get(0).unwrap(), &targets).unwrap();
    let grads = loss.backward().unwrap();
    for v in ad.vars(true, true) {
        let g = grads.get(v.as_tensor()).expect("no gradient reached the RoAd parameter");
        let n = g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(n > 0.0 && n.is_finite(), "gradient norm {n}");
    }
}

#[test]
fn identity_road_leaves_logits_unchanged() {
    let m = tiny_a();
    let ids = prompt_ids()[0].clone();
    for (v, g) in [(Variant::Road1, 2), (Variant::Road2, 8), (Variant::Road4, 4)] {
        let ad = RoadAdapter::new_identity(&m.model.cfg, v, g, 0..m.model.cfg.num_layers, &Proj::ALL, &Device::Cpu).unwrap();
        let out = m.model.forward(&[ids.clone()], Fwd { adapter: Some(&ad), ..Default::default() }).unwrap();
        assert!(max_abs_diff(&out.logits.unwrap().get(0).unwrap(), &logits_all(&ids)) < 1e-6);
    }
}

fn random_vec(n: usize, seed: u64, mean: f32, std: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let u = ((s >> 33) as f32) / (1u64 << 31) as f32;
            mean + std * (2.0 * u - 1.0) * 1.7
        })
        .collect()
}

#[test]
fn road_inverse_and_dense_agree_with_elementwise_form() {
    for (v, g, d) in [(Variant::Road1, 2, 8), (Variant::Road2, 4, 8), (Variant::Road4, 8, 16)] {
        let rot = Rotation::new(v, g, d).unwrap();
        let n = v.param_len(d);
        let th = Tensor::from_vec(random_vec(n, 1, 0.0, 0.5), n, &Device::Cpu).unwrap();
        let al = Tensor::from_vec(random_vec(n, 2, 1.0, 0.3), n, &Device::Cpu).unwrap();
        let (f, s) = rot.columns(&th, &al).unwrap();
        let h = Tensor::from_vec(random_vec(3 * d, 3, 0.0, 1.0), (3, d), &Device::Cpu).unwrap();
        let z = rot.apply(&h, &f, &s).unwrap();
        let dense = rot.dense(&f, &s).unwrap();
        let z2 = h.matmul(&dense.t().unwrap()).unwrap();
        assert!(max_abs_diff(&z, &z2) < 1e-5, "{v:?} dense");
        let back = rot.apply_inverse(&z, &f, &s).unwrap();
        assert!(max_abs_diff(&back, &h) < 1e-4, "{v:?} inverse");
    }
}

#[test]
fn merged_road_equals_unmerged() {
    let mut loaded = road_dii::model::load::load_path(&reference_dir().join("hf-tiny-llama-a"), DType::F32, &Device::Cpu).unwrap();
    let ids = prompt_ids()[0].clone();
    let ad = RoadAdapter::new_identity(&loaded.model.cfg, Variant::Road4, 8, [0, 1], &[Proj::Q, Proj::Down, Proj::Up], &Device::Cpu).unwrap();
    for (i, l) in ad.layers.values().enumerate() {
        let n = l.theta.elem_count();
        l.theta.set(&Tensor::from_vec(random_vec(n, 10 + i as u64, 0.0, 0.5), n, &Device::Cpu).unwrap()).unwrap();
        l.alpha.set(&Tensor::from_vec(random_vec(n, 20 + i as u64, 1.0, 0.2), n, &Device::Cpu).unwrap()).unwrap();
    }
    let unmerged = loaded.model.forward(&[ids.clone()], Fwd { adapter: Some(&ad), ..Default::default() }).unwrap().logits.unwrap();
    for ((layer, p), l) in &ad.layers {
        let (f, s) = l.columns().unwrap();
        let r = l.rot.dense(&f, &s).unwrap();
        let w = r.matmul(loaded.model.proj_weight(*layer, *p)).unwrap();
        loaded.model.set_proj_weight(*layer, *p, w).unwrap();
    }
    let merged = loaded.model.forward(&[ids], Fwd::default()).unwrap().logits.unwrap();
    let d = max_abs_diff(&merged, &unmerged);
    assert!(d < 1e-4, "merged vs unmerged: {d}");
}

/// Two prompts of one length that differ in one token.
fn base_and_source() -> (Vec<u32>, Vec<u32>) {
    let m = tiny_a();
    let (base, source) = (m.tok.encode("The capital of France is").unwrap(), m.tok.encode("The capital of Spain is").unwrap());
    assert_eq!(base.len(), source.len());
    (base, source)
}

#[test]
fn hooks_see_every_site_with_documented_shapes_and_swaps_behave() {
    let m = tiny_a();
    let c = &m.model.cfg;
    let (base, source) = base_and_source();
    let all: Vec<(usize, Site)> = (0..c.num_layers).flat_map(|l| Site::ALL.map(|s| (l, s))).collect();
    let mut col = Collector::new(all.clone());
    m.model.forward(&[source.clone()], Fwd { hooks: Some(&mut col), ..Default::default() }).unwrap();
    let t = source.len();
    for (l, s) in &all {
        let a = col.get(*l, *s).unwrap();
        let w = match s {
            Site::Q | Site::HeadOutput => c.num_heads * c.head_dim,
            Site::K | Site::V => c.num_kv_heads * c.head_dim,
            _ => c.hidden_size,
        };
        assert_eq!(a.dims(), &[1, t, w], "{l} {s}");
    }
    // Swapping the source's own activation into its own run is a no-op.
    let src_logits = logits_all(&source);
    for (l, s) in &all {
        let mut h = Replace::whole(*l, *s, col.get(*l, *s).unwrap().clone());
        let out = m.model.forward(&[source.clone()], Fwd { hooks: Some(&mut h), ..Default::default() }).unwrap();
        assert!(max_abs_diff(&out.logits.unwrap().get(0).unwrap(), &src_logits) < 1e-5, "{l} {s}");
    }
    // Full swap of the last block's output reproduces the source run's logits in the base run.
    let last = c.num_layers - 1;
    let mut h = Replace::whole(last, Site::BlockOutput, col.get(last, Site::BlockOutput).unwrap().clone());
    let out = m.model.forward(&[base.clone()], Fwd { hooks: Some(&mut h), ..Default::default() }).unwrap();
    assert!(max_abs_diff(&out.logits.unwrap().get(0).unwrap(), &src_logits) < 1e-5);
    // ... and the base run itself differs from the source (the swap did something).
    assert!(max_abs_diff(&logits_all(&base), &src_logits) > 1e-3);
}

/// The one replacement hook: every position replaced = the whole activation replaced; a subspace
/// spanning everything = the plain swap, its complement = no change; a wrong shape is an error.
#[test]
fn replace_at_positions_and_in_a_subspace_agree_with_the_whole_swap() {
    let m = tiny_a();
    let c = &m.model.cfg;
    let (base, source) = base_and_source();
    let (layer, site) = (c.num_layers / 2, Site::BlockOutput);
    let mut col = Collector::new([(layer, site)]);
    m.model.forward(&[source.clone()], Fwd { hooks: Some(&mut col), ..Default::default() }).unwrap();
    let src = col.get(layer, site).unwrap().clone();
    let t = base.len();
    let run = |h: &mut Replace| m.model.forward(&[base.clone()], Fwd { hooks: Some(h), ..Default::default() }).unwrap().logits.unwrap().get(0).unwrap();
    let whole = run(&mut Replace::whole(layer, site, src.clone()));
    // Positions in any order, each taking its own row of `with`.
    let order: Vec<usize> = (0..t).rev().collect();
    let rows: Vec<Tensor> = order.iter().map(|&p| src.narrow(1, p, 1).unwrap()).collect();
    let at = run(&mut Replace::at(layer, site, order, Tensor::cat(&rows, 1).unwrap()));
    assert!(max_abs_diff(&at, &whole) < 1e-6);
    let eye = Tensor::eye(c.hidden_size, DType::F32, &Device::Cpu).unwrap();
    let span = run(&mut Replace::whole(layer, site, src.clone()).within(Some(eye.clone()), false));
    assert!(max_abs_diff(&span, &whole) < 1e-4);
    let untouched = run(&mut Replace::whole(layer, site, src.clone()).within(Some(eye), true));
    assert!(max_abs_diff(&untouched, &logits_all(&base)) < 1e-4);
    // One position from the source: the base run changes there only, not at earlier positions.
    let last = run(&mut Replace::from_source(layer, site, t - 1, &src).unwrap());
    let clean = logits_all(&base);
    assert!(max_abs_diff(&last.narrow(0, 0, t - 1).unwrap(), &clean.narrow(0, 0, t - 1).unwrap()) < 1e-5);
    assert!(max_abs_diff(&last, &clean) > 1e-3);
    let mut short = Replace::whole(layer, site, src.narrow(1, 0, t - 1).unwrap());
    let Err(err) = m.model.forward(&[base.clone()], Fwd { hooks: Some(&mut short), ..Default::default() }) else { panic!("a short replacement was accepted") };
    assert!(err.to_string().contains("does not fit"), "{err}");
}
