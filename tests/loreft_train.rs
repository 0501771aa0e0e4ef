//! LoReFT fine-tuning on the tiny HF LLaMA: autograd's gradients of R, W and b against finite
//! differences of the plain (inference) forward, left padding, the engine (loss falls, R stays
//! orthonormal, resume), and save → load giving the same logits.
mod common;
use candle_core::{Device, Tensor, Var};
use common::{max_abs_diff, tiny_a};
use road_dii::intervene::orth::orthonormality_error;
use road_dii::model::{Fwd, Hooks, Llama, LogitsAt};
use road_dii::train::data::ClsExample;
use road_dii::train::reft::{positions, LoreftSet};
use road_dii::train::{self, cls, MethodCfg, TaskCfg, TrainConfig, TrainData, Trained};
use road_dii::util::rng::Rng;

const IDS: [u32; 6] = [504, 3575, 282, 4649, 314, 1010];
const TARGET: u32 = 1234;
const TEMPLATE: &str = "Review: {text}. Verdict:";

fn logits(m: &Llama, set: &LoreftSet, rows: &[Vec<u32>], differentiable: bool) -> Tensor {
    let (ids, mask) = cls::left_pad(rows, 0);
    let padded = mask.iter().any(|r| r.contains(&0));
    let mut h = set.hook(rows.iter().map(|r| r.len()).collect());
    let f = Fwd {
        hooks: Some(&mut h as &mut dyn Hooks),
        attention_mask: if padded { Some(&mask) } else { None },
        logits: LogitsAt::Last,
        differentiable,
        ..Default::default()
    };
    m.forward(&ids, f).unwrap().logits.unwrap()
}

fn loss(m: &Llama, set: &LoreftSet, differentiable: bool) -> Tensor {
    let t = Tensor::new(&[TARGET], &Device::Cpu).unwrap();
    candle_nn::loss::cross_entropy(&logits(m, set, &[IDS.to_vec()], differentiable), &t).unwrap()
}

/// Central differences at the entry of largest gradient and one other entry of `v`.
fn check_fd(m: &Llama, set: &LoreftSet, v: &Var, g: &Tensor, what: &str) {
    common::assert_grad_matches_fd(v, g, what, || loss(m, set, false).to_scalar::<f32>().unwrap());
}

#[test]
fn gradients_of_r_w_b_match_finite_differences() {
    let m = &tiny_a().model;
    let mut rng = Rng::new(5);
    let set = LoreftSet::new(&m.cfg, 2, 1, 2, &(0..m.cfg.num_layers).collect::<Vec<_>>(), false, &mut rng, &Device::Cpu).unwrap();
    assert_eq!(set.units.len(), 2 * m.cfg.num_layers, "first and last positions get their own intervention per layer");
    // A non-zero b, so W h + b − R h is generic.
    for (_, v) in set.named_vars().iter().filter(|(n, _)| n.ends_with(".bias")) {
        v.set(&rng.normal_tensor(v.dims(), 0.3, &Device::Cpu).unwrap()).unwrap();
    }
    let grads = loss(m, &set, true).backward().unwrap();
    let last = m.cfg.num_layers - 1;
    for (name, v) in set.named_vars() {
        let g = grads.get(&v).unwrap_or_else(|| panic!("{name}: no gradient"));
        if name.starts_with(&format!("layer_{last}_")) && name.contains("#0") {
            // The first token's state after the last block never reaches the last token's logits.
            assert_eq!(g.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0, "{name}");
            continue;
        }
        check_fd(m, &set, &v, g, &name);
    }
    // The Riemannian step keeps a non-zero part of R's gradient.
    let mut gs: Vec<Tensor> = set.named_vars().iter().map(|(_, v)| grads.get(v).unwrap().clone()).collect();
    set.project_grads(&set.named_vars(), &mut gs).unwrap();
    assert!(gs[0].abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 1e-6);
}

#[test]
fn positions_follow_pyreft_and_survive_left_padding() {
    assert_eq!(positions(10, 3, 3), (vec![0, 1, 2], vec![7, 8, 9]));
    // pyreft caps each side at len/2 (the rest are pad slots, which change nothing).
    assert_eq!(positions(3, 3, 3), (vec![0], vec![2]));
    let m = &tiny_a().model;
    let set = LoreftSet::new(&m.cfg, 3, 1, 1, &[0, 1], false, &mut Rng::new(1), &Device::Cpu).unwrap();
    let alone = logits(m, &set, &[IDS[..4].to_vec()], false);
    let batch = logits(m, &set, &[IDS.to_vec(), IDS[..4].to_vec()], false);
    assert!(max_abs_diff(&alone, &batch.get(1).unwrap().unsqueeze(0).unwrap()) < 1e-4, "padding moved the intervened positions");
    let none = m.forward(&[IDS[..4].to_vec()], Fwd { logits: LogitsAt::Last, ..Default::default() }).unwrap().logits.unwrap();
    assert!(max_abs_diff(&alone, &none) > 1e-3, "the interventions changed nothing");
}

fn toy() -> Vec<ClsExample> {
    common::toy_cls()
}

fn cfg(steps: usize, lr: f64) -> TrainConfig {
    let task = TaskCfg::Classify { template: TEMPLATE.into(), label_words: vec![" yes".into(), " no".into()], head: false };
    let method = MethodCfg::Loreft { rank: 2, first_n: 1, last_n: 1, share_weights: false, layers: None };
    let mut c = TrainConfig::new(method, task);
    c.steps = steps;
    c.batch_size = 8;
    c.lr = lr;
    c.eval_every = 0;
    c.progress = false;
    c.decay = road_dii::train::schedule::Decay::Constant;
    c.warmup_ratio = 0.0;
    c
}

fn dev_loss(l: &road_dii::model::Loaded, set: &LoreftSet) -> f64 {
    let mut hf = set.eval_hooks(&l.tok, TEMPLATE, 64);
    let labels = cls::label_token_ids(&l.tok, &[" yes".into(), " no".into()]).unwrap();
    cls::evaluate(&l.model, None, &l.tok, &toy(), TEMPLATE, &cls::Scorer::LabelWords(labels), 64, 16, Some(&mut hf), None).unwrap().loss
}

#[test]
fn engine_trains_saves_and_reloads_loreft() {
    let l = tiny_a();
    let data = TrainData::Cls { train: toy(), dev: toy() };
    let untrained = train::train(&l.model, &l.tok, &cfg(1, 1e-12), &data).unwrap();
    let before = dev_loss(l, untrained.trained.reft().unwrap());
    let out = train::train(&l.model, &l.tok, &cfg(25, 2e-2), &data).unwrap();
    let Trained::Loreft(set) = &out.trained else { panic!("not a LoReFT result") };
    let after = dev_loss(l, set);
    assert!(after < before * 0.8, "dev loss {before} -> {after}");
    assert_eq!(out.trainable_params, l.model.cfg.num_layers * 2 * (2 * 2 * l.model.cfg.hidden_size + 2));
    for u in &set.units {
        let e = orthonormality_error(u.int.r.as_tensor()).unwrap();
        assert!(e < 1e-4, "layer {} R drifted off the manifold: {e}", u.layer);
    }
    let dir = std::env::temp_dir().join(format!("road-loreft-train-{}", std::process::id()));
    out.save(&dir, &l.tok, "tiny").unwrap();
    assert!(LoreftSet::is_reft_dir(&dir));
    let back = LoreftSet::load(&dir, &l.model.cfg, &Device::Cpu).unwrap();
    assert_eq!((back.first_n, back.last_n, back.rank, back.num_params()), (1, 1, 2, out.trainable_params));
    let rows = vec![IDS.to_vec(), IDS[..3].to_vec()];
    assert_eq!(max_abs_diff(&logits(&l.model, set, &rows, false), &logits(&l.model, &back, &rows, false)), 0.0, "reload changed the logits");
    let bad = LoreftSet::load(&dir, &road_dii::model::LlamaConfig { hidden_size: 8, ..l.model.cfg.clone() }, &Device::Cpu).err().unwrap().to_string();
    assert!(bad.contains("hidden size"), "{bad}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn resumed_loreft_training_equals_uninterrupted() {
    let l = tiny_a();
    let data = TrainData::Cls { train: toy(), dev: toy() };
    let run = |dir: &std::path::Path, steps: usize, resume: bool| {
        let mut c = cfg(steps, 2e-2);
        c.eval_every = 2;
        c.out_dir = Some(dir.to_path_buf());
        c.resume = resume;
        train::train(&l.model, &l.tok, &c, &data).unwrap()
    };
    common::assert_resume_matches("loreft", run);
}

#[test]
fn loreft_specs_resolve_and_refuse_what_they_cannot_do() {
    let spec = |extra: &str| road_dii::train::spec::parse(&format!("name = \"x\"\n[method]\nkind = \"loreft\"\nr = 4\n{extra}"), &[]);
    let s = spec("").unwrap();
    assert_eq!((s.method.positions.as_deref(), s.method.share_weights, s.train.weight_decay), (Some("f1+l1"), Some(false), Some(0.0)));
    assert_eq!(s.method_cfg().unwrap().label(), "loreft-r4-f1l1");
    assert_eq!(road_dii::train::spec::parse_positions("f3+l5").unwrap(), (3, 5));
    assert_eq!(road_dii::train::spec::parse_positions("l2").unwrap(), (0, 2));
    let e = spec("positions = \"x3\"").err().unwrap().to_string();
    assert!(e.contains("f<N>+l<M>"), "{e}");
    let e = spec("positions = \"f0+l0\"").err().unwrap().to_string();
    assert!(e.contains("no positions"), "{e}");
    let l = tiny_a();
    let mut c = cfg(1, 1e-3);
    c.task = TaskCfg::CausalLm;
    let lm = TrainData::Lm { train: vec![road_dii::train::data::LmExample { prompt: "a".into(), completion: " b".into() }], dev: vec![] };
    let e = train::train(&l.model, &l.tok, &c, &lm).err().unwrap().to_string();
    assert!(e.contains("classification tasks only"), "{e}");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments");
    let s = road_dii::train::spec::load(&root.join("sentiment-loreft.toml"), &[]).unwrap();
    assert!(matches!(s.method_cfg().unwrap(), MethodCfg::Loreft { .. }));
}

/// The pilot's probes with LoReFT's hooks: the swap probe's split forward (prefix with a KV cache,
/// then the last token) scores the base as one whole-prompt pass does, a whole-vector swap at the
/// last block gives the source's scores, and the collected states honour left padding.
#[test]
fn pilot_probes_run_loreft_hooks_like_the_plain_forward() {
    use road_dii::probe;
    let m = &tiny_a().model;
    let set = LoreftSet::new(&m.cfg, 3, 1, 1, &(0..m.cfg.num_layers).collect::<Vec<_>>(), false, &mut Rng::new(8), &Device::Cpu).unwrap();
    let hooks = |lens: &[usize]| Box::new(set.hook(lens.to_vec())) as Box<dyn Hooks>;
    let scorer = cls::Scorer::LabelWords(vec![TARGET, 77]);
    let (base, source) = (IDS.to_vec(), vec![9u32, 88, 707, 31, 5]);
    let ps = probe::pair_scores_with(m, None, Some(&hooks), &scorer, &base, &source).unwrap();
    let whole = |ids: &[u32]| {
        let mut h = set.hook(vec![ids.len()]);
        cls::class_logits(m, None, Some(&mut h), &[ids.to_vec()], &scorer, false).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap()
    };
    let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-4);
    assert!(close(&ps.base, &whole(&base)), "split forward {:?} vs whole {:?}", ps.base, whole(&base));
    assert!(close(&ps.source, &whole(&source)));
    assert!(close(&ps.swapped[m.cfg.num_layers - 1][0], &ps.source), "a whole swap at the last block is the source");
    let plain = probe::pair_scores(m, None, &scorer, &base, &source).unwrap();
    assert!(!close(&plain.base, &ps.base), "the hooks changed nothing");
    let prompts = vec![base.clone(), source.clone()];
    let both = probe::last_token_states_with(m, None, Some(&hooks), &prompts, 2, None).unwrap();
    let alone = probe::last_token_states_with(m, None, Some(&hooks), &prompts[1..], 1, None).unwrap();
    for (b, a) in both.iter().zip(&alone) {
        assert!(max_abs_diff(&b.get(1).unwrap(), &a.get(0).unwrap()) < 1e-4, "padding moved the states");
    }
}

#[test]
fn the_pilot_family_study_includes_loreft() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments");
    let p = road_dii::pilot::spec::PilotSpec::load(&root.join("pilot-family.toml"), &[]).unwrap();
    let m = p.methods.iter().find(|m| m.method.kind == "loreft").expect("a loreft method");
    assert!(matches!(p.finetune_spec(m).unwrap().method_cfg().unwrap(), MethodCfg::Loreft { rank: 4, first_n: 1, last_n: 1, .. }));
    assert!(p.swap.models.contains(&m.label));
}

/// Generation with LoReFT: greedy decoding intervenes on the prompt's positions only, and in a
/// mixed batch (`road serve-batch`: two LoReFT sets, a RoAd adapter and plain rows, left-padded)
/// every row generates what it generates alone.
#[test]
fn loreft_rows_generate_in_mixed_batches_as_alone() {
    use road_dii::adapters::{AnyAdapter, MixedAdapters, RoadAdapter, Variant};
    use road_dii::generate::{greedy_batch_hooked, greedy_hooked};
    use road_dii::model::{LinearAdapter, Proj};
    use road_dii::train::reft::ReftHook;
    let m = &tiny_a().model;
    let all: Vec<usize> = (0..m.cfg.num_layers).collect();
    let mut rng = Rng::new(17);
    let sets: Vec<LoreftSet> = (0..2).map(|i| LoreftSet::new(&m.cfg, 3, 1 + i, 1, &all, false, &mut rng, &Device::Cpu).unwrap()).collect();
    for s in &sets {
        for (_, v) in s.named_vars().iter().filter(|(n, _)| n.ends_with(".bias")) {
            v.set(&rng.normal_tensor(v.dims(), 2.0, &Device::Cpu).unwrap()).unwrap();
        }
    }
    let road = RoadAdapter::new_identity(&m.cfg, Variant::Road1, 8, 0..2, &[Proj::Q, Proj::Up], m.device()).unwrap();
    for x in road.layers.values() {
        x.theta.set(&rng.normal_tensor(x.theta.dims(), 0.5, &Device::Cpu).unwrap()).unwrap();
    }
    let named = vec![("road".to_string(), AnyAdapter::Road(road))];
    // Per row: (LoReFT set, peft adapter).
    let who: Vec<(Option<usize>, Option<usize>)> = vec![(Some(0), None), (None, Some(0)), (Some(1), None), (None, None), (Some(0), None)];
    let prompts: Vec<Vec<u32>> = vec![IDS.to_vec(), IDS[..3].to_vec(), IDS[1..].to_vec(), IDS[..4].to_vec(), vec![7, 8, 9]];
    let maxes = vec![5, 4, 5, 3, 6];
    let mut mixed = MixedAdapters::new(&named, m).unwrap();
    mixed.set_rows(&who.iter().map(|w| w.1).collect::<Vec<_>>(), m.dtype()).unwrap();
    let mut hook = ReftHook::mixed(sets.clone(), who.iter().map(|w| w.0).collect(), prompts.iter().map(Vec::len).collect());
    let g = greedy_batch_hooked(m, Some(&mixed), Some(&mut hook), &prompts, &maxes, &[]).unwrap();
    let mut changed = 0;
    for (i, p) in prompts.iter().enumerate() {
        let ad = who[i].1.map(|k| &named[k].1 as &dyn LinearAdapter);
        let mut h = who[i].0.map(|s| sets[s].hook(vec![p.len()]));
        let alone = greedy_hooked(m, ad, h.as_mut().map(|h| h as &mut dyn Hooks), p, maxes[i], &[]).unwrap().tokens;
        assert_eq!(g.tokens[i], alone, "row {i}");
        let plain = greedy_hooked(m, None, None, p, maxes[i], &[]).unwrap().tokens;
        if who[i].0.is_some() && plain != alone {
            changed += 1;
        }
    }
    assert!(changed >= 2, "the LoReFT sets must change what their rows generate ({changed} of 3 did)");
}
