//! Training DoRA, OFT and BOFT on the tiny HF LLaMA: autograd's gradients of every new kind of
//! parameter against finite differences of the plain (inference) forward, then the engine.
mod common;
use candle_core::{Device, Tensor, Var};
use common::{max_abs_diff, tiny_a};
use road_dii::adapters::{AnyAdapter, BoftAdapter, DoraAdapter, OftAdapter};
use road_dii::model::{Fwd, LinearAdapter, Llama, LogitsAt, Proj};
use road_dii::train::data::ClsExample;
use road_dii::train::{self, MethodCfg, TaskCfg, TrainConfig, TrainData, Trained};
use road_dii::util::rng::Rng;

const IDS: [u32; 6] = [504, 3575, 282, 4649, 314, 1010];
const TARGET: u32 = 1234;

fn loss(m: &Llama, ad: &dyn LinearAdapter, differentiable: bool) -> Tensor {
    let out = m.forward(&[IDS.to_vec()], Fwd { adapter: Some(ad), logits: LogitsAt::Last, differentiable, ..Default::default() }).unwrap();
    let t = Tensor::new(&[TARGET], &Device::Cpu).unwrap();
    candle_nn::loss::cross_entropy(&out.logits.unwrap(), &t).unwrap()
}

fn jiggle(vars: &[Var], rng: &mut Rng, scale: f32) {
    for v in vars {
        v.set(&(v.as_tensor() + rng.normal_tensor(v.dims(), scale, &Device::Cpu).unwrap()).unwrap()).unwrap();
    }
}

/// Central differences of the non-differentiable forward at the entry of largest gradient and at
/// one other entry of `v`, against autograd's gradient `g`.
fn check_fd(m: &Llama, ad: &dyn LinearAdapter, v: &Var, g: &Tensor, what: &str) {
    common::assert_grad_matches_fd(v, g, what, || loss(m, ad, false).to_scalar::<f32>().unwrap());
}

#[test]
fn gradients_of_dora_oft_boft_match_finite_differences() {
    let m = &tiny_a().model;
    let cfg = &m.cfg;
    let mut rng = Rng::new(3);
    let targets = [Proj::Q, Proj::V, Proj::O, Proj::Down];
    let dora = DoraAdapter::new(m, 4, 8.0, 0.0, 0..2, &targets, &mut rng).unwrap();
    let oft = OftAdapter::new(cfg, 8, Some(5), 0..2, &targets, &Device::Cpu).unwrap();
    let oft_exact = OftAdapter::new(cfg, 4, None, [1], &targets, &Device::Cpu).unwrap();
    let boft = BoftAdapter::new(cfg, 4, 2, 0..2, &targets, &Device::Cpu).unwrap();
    jiggle(&dora.vars(), &mut rng, 0.1);
    jiggle(&oft.vars(), &mut rng, 0.1);
    jiggle(&oft_exact.vars(), &mut rng, 0.1);
    jiggle(&boft.vars(), &mut rng, 0.2);
    let named: Vec<(&str, &dyn LinearAdapter, Vec<(String, Var, bool)>)> = vec![
        (
            "dora",
            &dora,
            dora.magnitude
                .iter()
                .map(|(k, v)| (format!("magnitude {k:?}"), v.clone(), true))
                // lora_A/B: their exact gradient includes the norm, which DoRA detaches, so
                // finite differences do not apply; they must still receive a gradient.
                .chain(dora.lora.layers.iter().flat_map(|(k, l)| [(format!("lora_A {k:?}"), l.a.clone(), false), (format!("lora_B {k:?}"), l.b.clone(), false)]))
                .collect(),
        ),
        ("oft", &oft, oft.layers.iter().map(|(k, l)| (format!("oft_R {k:?}"), l.weight.clone(), true)).collect()),
        ("oft-exact", &oft_exact, oft_exact.layers.iter().map(|(k, l)| (format!("oft_R {k:?}"), l.weight.clone(), true)).collect()),
        ("boft", &boft, boft.layers.iter().flat_map(|(k, l)| [(format!("boft_R {k:?}"), l.r.clone(), true), (format!("boft_s {k:?}"), l.s.clone(), true)]).collect()),
    ];
    for (kind, ad, vars) in &named {
        let l = loss(m, *ad, true);
        // The differentiable forward computes the same loss as the inference path.
        assert!((l.to_scalar::<f32>().unwrap() - loss(m, *ad, false).to_scalar::<f32>().unwrap()).abs() < 1e-4, "{kind}: paths differ");
        let grads = l.backward().unwrap();
        for (what, v, fd) in vars {
            let g = grads.get(v).unwrap_or_else(|| panic!("{kind} {what}: no gradient"));
            if *fd {
                check_fd(m, *ad, v, g, &format!("{kind} {what}"));
            } else {
                assert!(g.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0, "{kind} {what}: zero gradient");
            }
        }
    }
}

fn toy() -> Vec<ClsExample> {
    common::toy_cls()
}

fn cfg(method: MethodCfg, steps: usize, lr: f64) -> TrainConfig {
    let task = TaskCfg::Classify { template: "Review: {text}. Verdict:".into(), label_words: vec![" yes".into(), " no".into()], head: false };
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

#[test]
fn engine_trains_saves_and_reloads_dora_oft_boft() {
    let l = tiny_a();
    let data = TrainData::Cls { train: toy(), dev: toy() };
    let t = vec![Proj::Q, Proj::V, Proj::Down];
    let methods = [
        (MethodCfg::Dora { r: 4, alpha: 8.0, dropout: 0.1, targets: t.clone(), layers: None }, 2e-2, "dora"),
        (MethodCfg::Oft { block_size: 8, neumann_terms: Some(5), targets: t.clone(), layers: None }, 5e-2, "oft"),
        (MethodCfg::Boft { block_size: 4, factors: 2, targets: t.clone(), layers: None }, 5e-2, "boft"),
    ];
    for (method, lr, kind) in methods {
        let dev_loss = |out: &train::TrainOutput| {
            train::cls::evaluate(out.model(&l.model), out.adapter(), &l.tok, &toy(), "Review: {text}. Verdict:", &out.scorer(), 64, 16, None, None).unwrap().loss
        };
        let before = dev_loss(&train::train(&l.model, &l.tok, &cfg(method.clone(), 1, 1e-12), &data).unwrap());
        let out = train::train(&l.model, &l.tok, &cfg(method.clone(), 25, lr), &data).unwrap();
        let after = dev_loss(&out);
        assert!(after < before * 0.8, "{kind}: dev loss {before} -> {after}");
        assert!(matches!((&out.trained, kind), (Trained::Dora(_), "dora") | (Trained::Oft(_), "oft") | (Trained::Boft(_), "boft")));
        let dir = std::env::temp_dir().join(format!("road-family-train-{}-{kind}", std::process::id()));
        out.save(&dir, &l.tok, "tiny").unwrap();
        let back = AnyAdapter::load(&dir, &l.model.cfg, &Device::Cpu).unwrap();
        assert_eq!(back.kind(), kind);
        assert_eq!(back.num_params(), out.trainable_params);
        let logits = |ad: &dyn LinearAdapter| {
            l.model.forward(&[IDS.to_vec()], Fwd { adapter: Some(ad), logits: LogitsAt::Last, ..Default::default() }).unwrap().logits.unwrap()
        };
        assert_eq!(max_abs_diff(&logits(out.adapter().unwrap()), &logits(&back)), 0.0, "{kind}: reload changed the logits");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn resumed_dora_training_equals_uninterrupted() {
    let l = tiny_a();
    let method = MethodCfg::Dora { r: 2, alpha: 4.0, dropout: 0.1, targets: vec![Proj::Q, Proj::Down], layers: None };
    let data = TrainData::Cls { train: toy(), dev: toy() };
    let run = |dir: &std::path::Path, steps: usize, resume: bool| {
        let mut c = cfg(method.clone(), steps, 2e-2);
        c.eval_every = 2;
        c.out_dir = Some(dir.to_path_buf());
        c.resume = resume;
        train::train(&l.model, &l.tok, &c, &data).unwrap()
    };
    common::assert_resume_matches("family-dora", run);
}

#[test]
fn specs_resolve_the_new_kinds_and_leave_other_specs_unchanged() {
    let spec = |kind: &str, extra: &str| road_dii::train::spec::parse(&format!("name = \"x\"\n[method]\nkind = \"{kind}\"\n{extra}"), &[]);
    let oft = spec("oft", "").unwrap();
    assert_eq!((oft.method.block_size, oft.method.neumann_terms, oft.train.weight_decay), (Some(32), Some(5), Some(0.0)));
    assert_eq!(oft.method_cfg().unwrap().label(), "oft-b32");
    let exact = spec("oft", "neumann_terms = 0\nblock_size = 16\n").unwrap().method_cfg().unwrap();
    assert!(matches!(exact, MethodCfg::Oft { block_size: 16, neumann_terms: None, .. }));
    let boft = spec("boft", "butterfly_factor = 2\n").unwrap();
    assert_eq!((boft.method.block_size, boft.method.butterfly_factor), (Some(4), Some(2)));
    assert!(matches!(spec("dora", "").unwrap().method_cfg().unwrap(), MethodCfg::Dora { r: 8, .. }));
    assert!(spec("dora", "r = 0\n").unwrap_err().to_string().contains("method.r"));
    // LoRA's resolved TOML gains no new keys (pilot caches are keyed on it).
    let lora = spec("lora", "").unwrap().to_toml().unwrap();
    assert!(!lora.contains("block_size") && !lora.contains("butterfly") && !lora.contains("neumann") && !lora.contains("positions") && !lora.contains("share_weights"), "{lora}");
    let e = spec("vera", "").unwrap_err().to_string();
    assert!(e.contains("dora, oft, boft, loreft"), "{e}");
    // A block size that does not tile the model is a one-line error naming it, before training.
    let l = tiny_a();
    let bad = MethodCfg::Oft { block_size: 5, neumann_terms: Some(5), targets: vec![Proj::Q], layers: None };
    let e = train::train(&l.model, &l.tok, &cfg(bad, 1, 1e-3), &TrainData::Cls { train: toy(), dev: vec![] }).err().unwrap().to_string();
    assert!(e.contains("oft_block_size 5") && e.contains("q_proj") && !e.contains('\n'), "{e}");
}

/// Mixed batches: RoAd, LoRA, DoRA, OFT and BOFT rows (one and two butterfly factors; a plain
/// row too) in one batch of a family with q/k/v biases equal each row run alone.
#[test]
fn mixed_batches_take_dora_oft_and_boft_rows() {
    use road_dii::adapters::{LoraAdapter, MixedAdapters, RoadAdapter, Variant};
    use road_dii::generate::{greedy_batch, greedy_with};
    let l = common::tiny_family("hf-tiny-qwen2");
    let m = &l.model;
    let mut rng = Rng::new(21);
    let t = [Proj::Q, Proj::K, Proj::V, Proj::Down];
    let road = RoadAdapter::new_identity(&m.cfg, Variant::Road1, 8, 0..2, &t, m.device()).unwrap();
    for x in road.layers.values() {
        jiggle(&[x.theta.clone()], &mut rng, 0.5);
    }
    let lora = LoraAdapter::new(&m.cfg, 4, 8.0, 0.0, 0..2, &t, &mut rng, m.device()).unwrap();
    jiggle(&lora.vars(), &mut rng, 0.1);
    let dora = DoraAdapter::new(m, 2, 4.0, 0.0, 0..2, &[Proj::Q, Proj::V, Proj::Up], &mut rng).unwrap();
    jiggle(&dora.vars(), &mut rng, 0.2);
    let oft = OftAdapter::new(&m.cfg, 8, Some(5), 0..2, &[Proj::K, Proj::V, Proj::Down], &Device::Cpu).unwrap();
    jiggle(&oft.vars(), &mut rng, 0.2);
    // BOFT: one factor on OFT's projections (both input rotations on one projection), two
    // factors (permuted blocks) elsewhere.
    let boft1 = BoftAdapter::new(&m.cfg, 4, 1, 0..2, &[Proj::K, Proj::V, Proj::Gate], &Device::Cpu).unwrap();
    let boft2 = BoftAdapter::new(&m.cfg, 4, 2, 0..2, &[Proj::Q, Proj::Up, Proj::Down], &Device::Cpu).unwrap();
    for b in [&boft1, &boft2] {
        jiggle(&b.vars(), &mut rng, 0.3);
    }
    let named = vec![
        ("road".to_string(), AnyAdapter::Road(road)),
        ("lora".to_string(), AnyAdapter::Lora(lora)),
        ("dora".to_string(), AnyAdapter::Dora(dora)),
        ("oft".to_string(), AnyAdapter::Oft(oft)),
        ("boft1".to_string(), AnyAdapter::Boft(boft1)),
        ("boft2".to_string(), AnyAdapter::Boft(boft2)),
    ];
    let rows: Vec<Option<usize>> = vec![Some(2), Some(3), None, Some(5), Some(0), Some(1), Some(4), Some(3), Some(2), Some(5)];
    let prompts: Vec<Vec<u32>> = vec![
        IDS[..3].to_vec(),
        IDS.to_vec(),
        IDS[1..5].to_vec(),
        vec![99, 100, 101],
        IDS[2..].to_vec(),
        vec![7, 8, 9, 10, 11],
        vec![5, 6, 7, 8],
        vec![42, 43],
        IDS.to_vec(),
        IDS[..4].to_vec(),
    ];
    let maxes = vec![4, 3, 5, 3, 4, 2, 4, 5, 3, 2];
    let mut mixed = MixedAdapters::new(&named, m).unwrap();
    mixed.set_rows(&rows, m.dtype()).unwrap();
    let g = greedy_batch(m, Some(&mixed), &prompts, &maxes, &[]).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let ad: Option<&dyn LinearAdapter> = rows[i].map(|k| &named[k].1 as &dyn LinearAdapter);
        assert_eq!(g.tokens[i], greedy_with(m, ad, p, maxes[i], &[]).unwrap().tokens, "row {i}");
    }
    let (ids, mask) = road_dii::train::cls::left_pad(&prompts, 0);
    let lg = m.forward(&ids, Fwd { attention_mask: Some(&mask), adapter: Some(&mixed), logits: LogitsAt::Last, ..Default::default() }).unwrap().logits.unwrap();
    let plain = |p: &Vec<u32>| m.forward(&[p.clone()], Fwd { logits: LogitsAt::Last, ..Default::default() }).unwrap().logits.unwrap().get(0).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let ad: Option<&dyn LinearAdapter> = rows[i].map(|k| &named[k].1 as &dyn LinearAdapter);
        let single = m.forward(&[p.clone()], Fwd { adapter: ad, logits: LogitsAt::Last, ..Default::default() }).unwrap().logits.unwrap().get(0).unwrap();
        let d = max_abs_diff(&lg.get(i).unwrap(), &single);
        assert!(d < 1e-4, "row {i}: {d}");
        if ad.is_some() {
            assert!(max_abs_diff(&single, &plain(p)) > 1e-3, "row {i}: its adapter must act");
        }
    }
}

#[test]
fn shipped_experiment_files_for_the_family_resolve() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments");
    for (kind, label) in [("dora", "dora-r8"), ("oft", "oft-b32"), ("boft", "boft-b4-m1")] {
        let s = road_dii::train::spec::load(&root.join(format!("sentiment-{kind}.toml")), &[]).unwrap();
        assert_eq!(s.method_cfg().unwrap().label(), label);
    }
    let p = road_dii::pilot::spec::PilotSpec::load(&root.join("pilot-family.toml"), &[]).unwrap();
    let kinds: Vec<&str> = p.methods.iter().map(|m| m.method.kind.as_str()).collect();
    for k in ["full", "lora", "road", "dora", "oft", "boft"] {
        assert!(kinds.contains(&k), "pilot-family lacks {k}: {kinds:?}");
    }
}

/// The pilot's weight-space view of DoRA: a pure magnitude change is all radial, a pure
/// direction change (magnitudes kept at ‖W‖) all angular.
#[test]
fn dora_weight_view_separates_magnitude_from_direction() {
    let m = &tiny_a().model;
    let mut rng = Rng::new(4);
    let a = DoraAdapter::new(m, 2, 4.0, 0.0, [0], &[Proj::Q], &mut rng).unwrap();
    let mag = &a.magnitude[&(0, Proj::Q)];
    let m0 = mag.as_tensor().copy().unwrap();
    mag.set(&(&m0 * 1.1).unwrap()).unwrap();
    let r = &road_dii::pilot::dora_weights::rows("d", &a, m).unwrap()[0];
    assert!((r.dm_median - 0.1).abs() < 1e-5 && (r.dd_median - 1.0).abs() < 1e-6 && r.angular_share_median < 1e-6, "{r:?}");
    mag.set(&m0).unwrap();
    jiggle(&[a.lora.layers[&(0, Proj::Q)].b.clone()], &mut rng, 0.3);
    let r = &road_dii::pilot::dora_weights::rows("d", &a, m).unwrap()[0];
    assert!(r.dm_median.abs() < 1e-6 && r.dd_median < 0.999 && r.angular_share_median > 0.999, "{r:?}");
}
