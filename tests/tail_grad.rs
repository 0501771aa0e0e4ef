//! The frozen tail's hand-written backward (`Llama::tail_loss_grad`, used by every intervention
//! training step) against candle's autograd through the differentiable forward.
mod common;
use candle_core::{DType, Device, Tensor, Var};
use common::*;
use road_dii::experiment::cells::{self, Backward, Cell};
use road_dii::experiment::data::cache_split;
use road_dii::intervene::{ApplyCtx, InterventionSpec};
use road_dii::model::{Fwd, KvCache, Llama, LogitsAt, Site};
use road_dii::tasks::{Pair, Prompt};

/// Autograd's loss and dL/dx for `x` entering block `from`, optionally after a cached prefix.
fn autograd(m: &Llama, ids: &[Vec<u32>], x: &Tensor, from: usize, kv: Option<KvCache>, targets: &[u32]) -> (f32, Tensor) {
    let v = Var::from_tensor(x).unwrap();
    let mut kv = kv;
    let out = m
        .forward(ids, Fwd { cache: kv.as_mut(), logits: LogitsAt::Last, differentiable: true, start: Some((from, v.as_tensor().clone())), ..Default::default() })
        .unwrap();
    let t = Tensor::new(targets, &Device::Cpu).unwrap();
    let loss = candle_nn::loss::cross_entropy(&out.logits.unwrap().to_dtype(DType::F32).unwrap(), &t).unwrap();
    let g = loss.backward().unwrap();
    (loss.to_scalar::<f32>().unwrap(), g.get(v.as_tensor()).unwrap().clone())
}

fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-5);
    max_abs_diff(a, b) / scale
}

#[test]
fn tail_gradient_equals_autograd_from_every_layer_with_and_without_a_cached_prefix() {
    check_tail(&tiny_a().model);
}

/// The same per family: q/k/v bias (Qwen2), q/k norm + head_dim 12 (Qwen3), a sliding window
/// shorter than the rows (Mistral 4, Gemma 2 3), Gemma 2's sandwich norms, GeGLU and soft-caps.
#[test]
fn tail_gradient_equals_autograd_for_every_family() {
    for name in ["hf-tiny-mistral", "hf-tiny-qwen2", "hf-tiny-qwen3", "hf-tiny-gemma2"] {
        eprintln!("{name}");
        check_tail(&tiny_family(name).model);
    }
    // Gemma 2's caps (50, 30) hardly bend this random model's small scores and logits; with
    // tight caps a wrong tanh derivative could not hide.
    let g = &tiny_family("hf-tiny-gemma2").model;
    let mut cfg = g.cfg.clone();
    (cfg.arch.attn_softcap, cfg.arch.final_softcap) = (Some(0.5), Some(1.5));
    let vb = candle_nn::VarBuilder::from_tensors(g.named_weights().unwrap().into_iter().collect(), DType::F32, &Device::Cpu);
    check_tail(&Llama::load(vb, cfg).unwrap());
}

/// Intervention training through each family's differentiable forward (autograd reaching the
/// intervention's parameters through bias, q/k norm, GeGLU, soft-caps, post-norms) equals the
/// frozen tail's.
#[test]
fn intervention_training_gradients_equal_autograd_for_every_family() {
    let pairs = tiny_pairs();
    for name in ["hf-tiny-mistral", "hf-tiny-qwen2", "hf-tiny-qwen3", "hf-tiny-gemma2"] {
        let m = &tiny_family(name).model;
        let cells_ = [
            (0, Site::BlockOutput, "last", None),
            (0, Site::ResidMid, "mid", None),
            (1, Site::Q, "0", None),
            (1, Site::K, "last", None),
            (0, Site::HeadOutput, "mid", Some(1)),
            (0, Site::AttnOutput, "last", None),
            (1, Site::MlpOutput, "mid", None),
        ];
        check_training_gradients(m, &pairs, &cells_, &[vec![0, 2], vec![0, 1, 2, 3]]);
    }
}

fn check_tail(m: &Llama) {
    let n = m.cfg.num_layers;
    let ids: Vec<Vec<u32>> = vec![vec![5, 9, 23, 41, 7, 12, 19], vec![8, 3, 3, 17, 29, 30, 2]];
    let targets = [11u32, 40];
    let d = m.cfg.hidden_size;
    let x = Tensor::randn(0f32, 1.0, (2, 7, d), &Device::Cpu).unwrap();
    for from in 0..=n {
        let (want_l, want_g) = autograd(m, &ids, &x, from, None, &targets);
        let (l, g) = m.tail_loss_grad(&ids, Fwd { start: Some((from, x.clone())), ..Default::default() }, &targets).unwrap();
        let l = l.to_scalar::<f32>().unwrap();
        assert!((l - want_l).abs() < 1e-5, "from {from}: loss {l} vs {want_l}");
        let e = rel_err(&g, &want_g);
        assert!(e < 1e-4, "from {from}: relative gradient error {e}");
        assert!(want_g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
    }
    // Resumed after a clean prefix of 4 tokens: the last 3 run, attending to cached keys/values.
    let mut kv = KvCache::new(n);
    let pre: Vec<Vec<u32>> = ids.iter().map(|r| r[..4].to_vec()).collect();
    let rest: Vec<Vec<u32>> = ids.iter().map(|r| r[4..].to_vec()).collect();
    m.forward(&pre, Fwd { cache: Some(&mut kv), logits: LogitsAt::None, ..Default::default() }).unwrap();
    let x2 = x.narrow(1, 4, 3).unwrap();
    for from in 0..=n {
        let (want_l, want_g) = autograd(m, &rest, &x2, from, Some(kv.clone()), &targets);
        let mut kv2 = kv.clone();
        let (l, g) = m.tail_loss_grad(&rest, Fwd { cache: Some(&mut kv2), start: Some((from, x2.clone())), ..Default::default() }, &targets).unwrap();
        assert!((l.to_scalar::<f32>().unwrap() - want_l).abs() < 1e-5, "prefix, from {from}");
        let e = rel_err(&g, &want_g);
        assert!(e < 1e-4, "prefix, from {from}: relative gradient error {e}");
    }
}

/// One training step's gradients through the frozen tail equal autograd through the
/// whole differentiable resumed forward, for every kind with parameters, site and path.
fn check_training_gradients(m: &Llama, pairs: &[Pair], cells_: &[(usize, Site, &str, Option<usize>)], groups: &[Vec<usize>]) {
    let needed: Vec<(usize, Site)> = cells_.iter().map(|c| (c.0, c.1)).collect();
    let sc = cache_split(m, pairs, &needed).unwrap();
    for &(layer, site, pos, head) in cells_ {
        let cc = sc.cell(pairs, layer, site, pos).unwrap();
        let hd = m.cfg.head_dim;
        let cols = head.map(|h| Tensor::arange((h * hd) as u32, ((h + 1) * hd) as u32, &Device::Cpu).unwrap());
        let w = if cols.is_some() { hd } else { cc.source_vec[0].dim(0).unwrap() };
        let cell = Cell { layer, site, position: pos.into(), cols, heads: String::new() };
        for kind in ["das", "boundless", "road_dii", "loreft"] {
            let spec = InterventionSpec::from_kind(kind).unwrap().with_rank(2);
            let iv = spec.build(w, 3, None, &Device::Cpu).unwrap();
            let ctx = ApplyCtx { progress: 0.3, train: true };
            for idx in groups {
                let targets: Vec<u32> = idx.iter().map(|&i| pairs[i].cf_label).collect();
                let (want_l, want) = cells::loss_grads(m, &cell, &cc, pairs, idx, iv.as_ref(), ctx, &targets, Backward::Autograd).unwrap();
                let (l, got) = cells::loss_grads(m, &cell, &cc, pairs, idx, iv.as_ref(), ctx, &targets, Backward::FrozenTail).unwrap();
                let label = format!("{kind} L{layer} {site} @{pos} head {head:?} rows {idx:?}");
                assert!((l - want_l).abs() < 1e-4, "{label}: loss {l} vs {want_l}");
                for p in iv.params() {
                    let (g, wg) = (got.get(p.var.as_tensor()), want.get(p.var.as_tensor()));
                    let (Some(g), Some(wg)) = (g, wg) else { panic!("{label}: {} has no gradient", p.name) };
                    let e = rel_err(g, wg);
                    assert!(e < 1e-3, "{label}: {} relative gradient error {e}", p.name);
                }
            }
        }
    }
}

#[test]
fn intervention_training_gradients_equal_autograd_on_the_tiny_model() {
    let m = &tiny_a().model;
    let pairs = tiny_pairs();
    let last = m.cfg.num_layers - 1;
    let cells_ = [
        (0, Site::BlockOutput, "last", None),
        (0, Site::BlockOutput, "mid", None),
        (last, Site::BlockOutput, "last", None),
        (0, Site::ResidMid, "mid", None),
        (last, Site::Q, "0", None),
        (0, Site::HeadOutput, "mid", Some(1)),
        (0, Site::V, "last", None),
        (last, Site::MlpOutput, "mid", None),
        (0, Site::BlockInput, "last", None),
    ];
    // Rows 0 and 2 share a length (the clean-prefix path); all four are left padded.
    check_training_gradients(m, &pairs, &cells_, &[vec![0, 2], vec![0, 1, 2, 3]]);
}

#[test]
fn intervention_training_gradients_equal_autograd_on_smollm2() {
    let l = smollm2();
    let mk = |t: &str| Prompt::new(&l.tok, t.into(), 1, &[]).unwrap();
    let pairs: Vec<Pair> = [
        ("When Mary and John went to the store, John gave a drink to", "When Mary and John went to the store, Mary gave a drink to"),
        ("When Tom and Anna went to the park, Anna gave a ball to", "When Tom and Anna went to the park, Tom gave a ball to"),
    ]
    .iter()
    .map(|(b, s)| Pair { base: mk(b), source: mk(s), cf_label: 1000, answers: vec![1000, 2000] })
    .collect();
    let cells_ = [(20, Site::BlockOutput, "last", None), (12, Site::HeadOutput, "last", Some(4))];
    check_training_gradients(&l.model, &pairs, &cells_, &[vec![0, 1]]);
}
