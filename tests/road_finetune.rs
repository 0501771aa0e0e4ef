//! Adapters, merging, mixed batching and fine-tuning on the tiny HF LLaMA (fast).
mod common;
use candle_core::{DType, Device, Tensor};
use common::{max_abs_diff, reference_dir, tiny_a};
use road_dii::generate::{greedy_batch, greedy_with};
use road_dii::model::{load, Fwd, LinearAdapter, Llama, LogitsAt, Proj};
use road_dii::adapters::{merge, AnyAdapter, Freeze, LoraAdapter, MixedAdapters, RoadAdapter, Variant};
use road_dii::train::data::{ClsExample, LmExample};
use road_dii::train::{self, MethodCfg, TaskCfg, TrainConfig, TrainData};
use road_dii::util::rng::Rng;

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("road-ft-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fresh_tiny() -> road_dii::model::Loaded {
    load::load_path(&reference_dir().join("hf-tiny-llama-a"), DType::F32, &Device::Cpu).unwrap()
}

fn last_logits(m: &Llama, ids: &[u32], ad: Option<&dyn LinearAdapter>) -> Tensor {
    m.forward(&[ids.to_vec()], Fwd { adapter: ad, logits: LogitsAt::Last, ..Default::default() }).unwrap().logits.unwrap()
}

const IDS: [u32; 6] = [504, 3575, 282, 4649, 314, 1010];

fn random_road(m: &Llama, variant: Variant, g: usize, seed: u64) -> RoadAdapter {
    random_road_on(m, variant, g, &Proj::ALL, seed)
}

fn random_road_on(m: &Llama, variant: Variant, g: usize, targets: &[Proj], seed: u64) -> RoadAdapter {
    let a = RoadAdapter::new_identity(&m.cfg, variant, g, 0..m.cfg.num_layers, targets, m.device()).unwrap();
    let mut rng = Rng::new(seed);
    for l in a.layers.values() {
        let n = l.theta.elem_count();
        l.theta.set(&rng.normal_tensor(&[n], 0.5, m.device()).unwrap()).unwrap();
        l.alpha.set(&(rng.normal_tensor(&[n], 0.2, m.device()).unwrap() + 1.0).unwrap()).unwrap();
    }
    a
}

fn random_lora(m: &Llama, r: usize, targets: &[Proj], seed: u64) -> LoraAdapter {
    let mut rng = Rng::new(seed);
    let a = LoraAdapter::new(&m.cfg, r, 16.0, 0.0, 0..m.cfg.num_layers, targets, &mut rng, m.device()).unwrap();
    for l in a.layers.values() {
        l.b.set(&rng.normal_tensor(l.b.dims(), 0.1, m.device()).unwrap()).unwrap();
    }
    a
}

#[test]
fn lora_with_zero_b_is_the_identity_and_nonzero_b_is_not() {
    let m = &tiny_a().model;
    let base = last_logits(m, &IDS, None);
    let zero = LoraAdapter::new(&m.cfg, 4, 8.0, 0.0, 0..2, &Proj::ALL, &mut Rng::new(1), m.device()).unwrap();
    assert!(max_abs_diff(&base, &last_logits(m, &IDS, Some(&zero))) < 1e-6);
    let nz = random_lora(m, 4, &Proj::ALL, 2);
    assert!(max_abs_diff(&base, &last_logits(m, &IDS, Some(&nz))) > 1e-3);
}

#[test]
fn lora_peft_save_load_round_trip() {
    let m = &tiny_a().model;
    let a = random_lora(m, 4, &[Proj::Q, Proj::V, Proj::Down], 3);
    let d = tmp("lora-rt");
    a.save_peft(&d, "tiny").unwrap();
    let conf: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(conf["peft_type"], "LORA");
    assert_eq!(conf["r"], 4);
    assert_eq!(conf["lora_alpha"], 16.0);
    assert_eq!(conf["target_modules"], serde_json::json!(["down_proj", "q_proj", "v_proj"]));
    let t = candle_core::safetensors::load(d.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(t["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].dims(), &[4, 32]);
    assert_eq!(t["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].dims(), &[32, 4]);
    let b = AnyAdapter::load(&d, &m.cfg, m.device()).unwrap();
    assert_eq!(b.kind(), "lora");
    assert_eq!(max_abs_diff(&last_logits(m, &IDS, Some(&a)), &last_logits(m, &IDS, Some(&b))), 0.0);
}

#[test]
fn merge_equals_unmerged_and_unmerge_restores_weights() {
    let adapters = {
        let m = &tiny_a().model;
        vec![AnyAdapter::Road(random_road(m, Variant::Road4, 8, 4)), AnyAdapter::Road(random_road(m, Variant::Road1, 2, 5)), AnyAdapter::Lora(random_lora(m, 4, &Proj::ALL, 6))]
    };
    for ad in &adapters {
        let mut l = fresh_tiny();
        let w0: Vec<Tensor> = (0..2).flat_map(|i| Proj::ALL.map(|p| l.model.proj_weight(i, p).clone())).collect();
        let unmerged = last_logits(&l.model, &IDS, Some(ad));
        merge::merge(&mut l.model, ad).unwrap();
        let merged = last_logits(&l.model, &IDS, None);
        let d = max_abs_diff(&unmerged, &merged);
        assert!(d < 1e-4, "{}: merged differs by {d}", ad.kind());
        // Written as a HF checkpoint and reloaded, the merged model still agrees.
        let dir = tmp(&format!("merged-{}", ad.kind()));
        let out = dir.join("ckpt");
        merge::save_hf(&l.model, &l.tok, &out).unwrap();
        let re = load::load_path(&out, DType::F32, &Device::Cpu).unwrap();
        assert!(max_abs_diff(&merged, &last_logits(&re.model, &IDS, None)) < 1e-5);
        assert_eq!(re.tok.encode("The capital of France is").unwrap(), vec![504, 3575, 282, 4649, 314]);
        merge::unmerge(&mut l.model, ad).unwrap();
        let w1: Vec<Tensor> = (0..2).flat_map(|i| Proj::ALL.map(|p| l.model.proj_weight(i, p).clone())).collect();
        for (a, b) in w0.iter().zip(&w1) {
            assert!(max_abs_diff(a, b) < 1e-5, "{}: unmerge did not restore", ad.kind());
        }
    }
}

#[test]
fn mixed_batch_rows_equal_single_runs() {
    let l = tiny_a();
    let m = &l.model;
    let named = vec![
        ("r".to_string(), AnyAdapter::Road(random_road(m, Variant::Road1, 8, 7))),
        ("l".to_string(), AnyAdapter::Lora(random_lora(m, 4, &[Proj::Q, Proj::O, Proj::Up], 8))),
        // RoAd4 on some projections only: the others have RoAd1 rows alone, whose batches
        // gather only each pair's shared half of the columns.
        ("r4".to_string(), AnyAdapter::Road(random_road_on(m, Variant::Road4, 8, &[Proj::Q, Proj::V, Proj::Down], 9))),
        ("r1b".to_string(), AnyAdapter::Road(random_road(m, Variant::Road1, 8, 13))),
    ];
    let rows: Vec<Option<usize>> = vec![Some(0), None, Some(1), Some(2), Some(3), Some(1), Some(3)];
    let prompts: Vec<Vec<u32>> = vec![IDS[..3].to_vec(), IDS.to_vec(), IDS[1..5].to_vec(), IDS[2..].to_vec(), vec![7, 8, 9, 10, 11], vec![42], IDS[..6].to_vec()];
    let maxes = vec![5, 3, 6, 4, 1, 5, 4];
    let mut mixed = MixedAdapters::new(&named, m).unwrap();
    mixed.set_rows(&rows, m.dtype()).unwrap();
    let g = greedy_batch(m, Some(&mixed), &prompts, &maxes, &[]).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let ad: Option<&dyn LinearAdapter> = rows[i].map(|k| &named[k].1 as &dyn LinearAdapter);
        let single = greedy_with(m, ad, p, maxes[i], &[]).unwrap();
        assert_eq!(g.tokens[i], single.tokens, "row {i}");
    }
    // And the prefill logits of each row match a single run within 1e-4.
    let (ids, mask) = road_dii::train::cls::left_pad(&prompts, 0);
    let out = m.forward(&ids, Fwd { attention_mask: Some(&mask), adapter: Some(&mixed), logits: LogitsAt::Last, ..Default::default() }).unwrap();
    let lg = out.logits.unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let ad: Option<&dyn LinearAdapter> = rows[i].map(|k| &named[k].1 as &dyn LinearAdapter);
        let d = max_abs_diff(&lg.get(i).unwrap(), &last_logits(m, p, ad).get(0).unwrap());
        assert!(d < 1e-4, "row {i}: {d}");
    }
}

fn toy_cls() -> (Vec<ClsExample>, Vec<ClsExample>) {
    // Two classes told apart by one word; the tiny random model starts near chance.
    let words = ["apple", "river", "stone", "cloud", "green", "music", "paper", "light"];
    let mut all = vec![];
    for w in words {
        all.push(ClsExample { text: format!("{w} is good"), label: 0 });
        all.push(ClsExample { text: format!("{w} is bad"), label: 1 });
    }
    (all.clone(), all)
}

fn toy_cfg(method: MethodCfg, steps: usize) -> TrainConfig {
    let task = TaskCfg::Classify { template: "Review: {text}. Verdict:".into(), label_words: vec![" yes".into(), " no".into()], head: false };
    let mut c = TrainConfig::new(method, task);
    c.steps = steps;
    c.batch_size = 8;
    c.lr = 2e-2;
    c.eval_every = 0;
    c.progress = false;
    c.decay = road_dii::train::schedule::Decay::Constant;
    c.warmup_ratio = 0.0;
    c
}

fn dev_loss(out: &train::TrainOutput, base: &Llama, dev: &[ClsExample], cfg: &TrainConfig) -> f64 {
    let TaskCfg::Classify { template, .. } = &cfg.task else { unreachable!() };
    road_dii::train::cls::evaluate(out.model(base), out.adapter(), &tiny_a().tok, dev, template, &out.scorer(), 64, 16, None, None).unwrap().loss
}

#[test]
fn finetuning_reduces_loss_for_road_lora_and_full() {
    let l = tiny_a();
    let (train_ex, dev) = toy_cls();
    let road = MethodCfg::Road { variant: Variant::Road1, group_size: 8, freeze: Freeze::default(), targets: Proj::ALL.to_vec(), layers: None };
    let lora = MethodCfg::Lora { r: 4, alpha: 8.0, dropout: 0.1, targets: vec![Proj::Q, Proj::V], layers: None };
    for (method, lr) in [(road, 5e-2), (lora, 2e-2), (MethodCfg::Full, 1e-3)] {
        let mut c0 = toy_cfg(method.clone(), 1);
        c0.lr = 1e-12; // effectively untrained: the starting loss
        let data = TrainData::Cls { train: train_ex.clone(), dev: dev.clone() };
        let before = dev_loss(&train::train(&l.model, &l.tok, &c0, &data).unwrap(), &l.model, &dev, &c0);
        let mut c = toy_cfg(method.clone(), 25);
        c.lr = lr;
        let out = train::train(&l.model, &l.tok, &c, &data).unwrap();
        let after = dev_loss(&out, &l.model, &dev, &c);
        assert!(after < before * 0.8, "{}: loss {before} -> {after}", method.label());
        // The base model is never modified by training.
        assert!(max_abs_diff(&last_logits(&l.model, &IDS, None), &last_logits(&fresh_tiny().model, &IDS, None)) == 0.0);
    }
}

#[test]
fn gradients_reach_exactly_the_trainable_road_parameters() {
    let l = tiny_a();
    let m = &l.model;
    for (freeze, name) in [(Freeze { theta: false, alpha: true }, "angle"), (Freeze { theta: true, alpha: false }, "magnitude")] {
        let mut a = RoadAdapter::new_identity(&m.cfg, Variant::Road1, 8, 0..2, &Proj::ALL, m.device()).unwrap();
        a.freeze = freeze;
        let out = m.forward(&[IDS.to_vec()], Fwd { adapter: Some(&a), logits: LogitsAt::Last, differentiable: true, ..Default::default() }).unwrap();
        let loss = out.logits.unwrap().get(0).unwrap().get(100).unwrap();
        let g = loss.backward().unwrap();
        for layer in a.layers.values() {
            let (train, frozen) = if freeze.alpha { (&layer.theta, &layer.alpha) } else { (&layer.alpha, &layer.theta) };
            let gt = g.get(train).unwrap_or_else(|| panic!("{name}: trainable got no gradient"));
            assert!(gt.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0, "{name}: zero gradient");
            assert!(g.get(frozen).is_none(), "{name}: frozen parameter got a gradient");
        }
        assert_eq!(a.named_trainables().len(), a.layers.len());
    }
}

#[test]
fn angle_only_keeps_alpha_at_one_and_magnitude_only_keeps_theta_at_zero() {
    let l = tiny_a();
    let (train_ex, dev) = toy_cls();
    for (freeze, check_alpha) in [(Freeze { theta: false, alpha: true }, true), (Freeze { theta: true, alpha: false }, false)] {
        let method = MethodCfg::Road { variant: Variant::Road2, group_size: 2, freeze, targets: Proj::ALL.to_vec(), layers: None };
        let out = train::train(&l.model, &l.tok, &toy_cfg(method, 5), &TrainData::Cls { train: train_ex.clone(), dev: dev.clone() }).unwrap();
        let train::Trained::Road(a) = &out.trained else { panic!("not RoAd") };
        let (mut fixed_ok, mut moved) = (true, false);
        for layer in a.layers.values() {
            let th = layer.theta.as_tensor().to_vec1::<f32>().unwrap();
            let al = layer.alpha.as_tensor().to_vec1::<f32>().unwrap();
            let (fixed, free, at): (&[f32], &[f32], f32) = if check_alpha { (&al, &th, 1.0) } else { (&th, &al, 0.0) };
            fixed_ok &= fixed.iter().all(|&x| x == at);
            moved |= free.iter().any(|&x| x != 1.0 - at);
        }
        assert!(fixed_ok, "frozen parameters moved");
        assert!(moved, "trainable parameters did not move");
    }
}

#[test]
fn frozen_linear_backward_matches_a_plain_matmul() {
    // Gradients of a RoAd θ through the base (frozen-weight op) and through a Var-weight copy
    // (plain matmul, full backward) must agree.
    let m = &tiny_a().model;
    let (_vm, mv) = m.to_varmap().unwrap();
    let a = random_road(m, Variant::Road1, 8, 11);
    let grad = |model: &Llama| {
        let out = model.forward(&[IDS.to_vec()], Fwd { adapter: Some(&a), logits: LogitsAt::Last, differentiable: true, ..Default::default() }).unwrap();
        let g = out.logits.unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
        a.layers.values().map(|l| g.get(&l.theta).unwrap().clone()).collect::<Vec<_>>()
    };
    for (x, y) in grad(m).iter().zip(grad(&mv)) {
        let rel = max_abs_diff(x, &y) / (y.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() + 1e-6);
        assert!(rel < 1e-3, "relative gradient difference {rel}");
    }
}

#[test]
fn resumed_training_equals_uninterrupted() {
    let l = tiny_a();
    let (train_ex, dev) = toy_cls();
    let method = MethodCfg::Lora { r: 2, alpha: 4.0, dropout: 0.1, targets: vec![Proj::Q, Proj::Down], layers: None };
    let data = TrainData::Cls { train: train_ex, dev };
    let run = |dir: &std::path::Path, steps: usize, resume: bool| {
        let mut c = toy_cfg(method.clone(), steps);
        c.eval_every = 2;
        c.out_dir = Some(dir.to_path_buf());
        c.resume = resume;
        train::train(&l.model, &l.tok, &c, &data).unwrap()
    };
    let straight = run(&tmp("straight"), 6, false);
    let d = tmp("resumed");
    run(&d, 4, false);
    let resumed = run(&d, 6, true);
    let last = |o: &train::TrainOutput| o.log.last().unwrap().loss;
    assert_eq!(resumed.log.len(), 6);
    assert!((last(&straight) - last(&resumed)).abs() < 1e-5, "{} vs {}", last(&straight), last(&resumed));
    assert!(d.join("adapter/adapter_config.json").exists() && d.join("metrics.csv").exists());
}

#[test]
fn causal_lm_training_reduces_completion_loss() {
    let l = tiny_a();
    let ex: Vec<LmExample> = (0..8).map(|i| LmExample { prompt: format!("Count {i}:"), completion: format!(" {} {} {}", i + 1, i + 2, i + 3) }).collect();
    let mut c = TrainConfig::new(MethodCfg::Full, TaskCfg::CausalLm);
    c.steps = 30;
    c.lr = 5e-3;
    c.progress = false;
    c.eval_every = 30;
    let out = train::train(&l.model, &l.tok, &c, &TrainData::Lm { train: ex.clone(), dev: ex.clone() }).unwrap();
    let (first, _) = road_dii::train::lm::lm_loss(&l.model, None, &l.tok, &ex, 64, false).unwrap();
    let after = out.evals.last().unwrap().loss;
    let before = first.to_scalar::<f32>().unwrap() as f64;
    assert!(after < before * 0.8, "LM loss {before} -> {after}");
}

#[test]
fn unknown_spec_key_is_an_error_naming_it() {
    let base = "name = \"x\"\n[method]\nkind = \"road\"\n";
    assert!(road_dii::train::spec::parse(base, &[]).is_ok());
    let e = road_dii::train::spec::parse(&format!("{base}[train]\nstepz = 3\n"), &[]).unwrap_err().to_string();
    assert!(e.contains("stepz"), "{e}");
    let e = road_dii::train::spec::parse(base, &["method.varient=2".into()]).unwrap_err().to_string();
    assert!(e.contains("varient"), "{e}");
    let s = road_dii::train::spec::parse(base, &["train.steps=7".into()]).unwrap();
    assert_eq!(s.train.steps, 7);
    assert_eq!(s.train.weight_decay, Some(0.0)); // RoAd's default, recorded in config.toml
}

#[test]
fn compose_run_writes_all_task_block_combinations() {
    let spec = tmp("compose").join("c.toml");
    std::fs::write(&spec, format!(
        "name = \"compose-test\"\nmodel = \"{}\"\nlayer = 1\n[task_a]\nsource = \"parity\"\ntrain_examples = 16\ntest_examples = 8\n[task_b]\nsource = \"parity\"\ntrain_examples = 16\ntest_examples = 8\n[train]\nsteps = 2\nbatch_size = 4\nlr = 1e-2\n",
        reference_dir().join("hf-tiny-llama-a").display()
    )).unwrap();
    std::env::set_var("ROAD_OUT", spec.parent().unwrap().join("out"));
    let dir = road_dii::compose::run_compose(&spec, &[]).unwrap();
    let csv = std::fs::read_to_string(dir.join("compose.csv")).unwrap();
    assert_eq!(csv.lines().count(), 17, "{csv}");
    for t in ["joint", "separate"] {
        for b in ["none", "A", "B", "A+B"] {
            assert!(csv.contains(&format!("{t},parity,{b},")), "{csv}");
        }
    }
    // "none" switches every block off: the same accuracy whatever was trained.
    let none: Vec<&str> = csv.lines().filter(|l| l.contains(",none,")).map(|l| l.split(',').nth(4).unwrap()).collect();
    assert_eq!(none.len(), 4);
    assert!(none[0] == none[2] && none[1] == none[3], "joint vs separate, per task: {csv}");
}

/// `road finetune --write-init`'s parameters are the ones step 1 starts from: one Adam step
/// (lr 1e-3, no decay or dropout) moves each LoRA A entry by at most ≈ lr from them, while a
/// different init draw would differ by the init's own scale.
#[test]
fn the_written_init_is_what_training_starts_from() {
    let l = tiny_a();
    let (train_ex, dev) = toy_cls();
    let lora = MethodCfg::Lora { r: 4, alpha: 8.0, dropout: 0.0, targets: vec![Proj::Q, Proj::Down], layers: None };
    let mut c = toy_cfg(lora, 1);
    c.lr = 1e-3;
    c.seed = 7;
    let (init, _) = train::engine::initial(&l.model, &c).unwrap();
    let out = train::train(&l.model, &l.tok, &c, &TrainData::Cls { train: train_ex, dev }).unwrap();
    let (train::Trained::Lora(a0), train::Trained::Lora(a1)) = (&init, &out.trained) else { panic!("LoRA expected") };
    let other = LoraAdapter::new(&l.model.cfg, 4, 8.0, 0.0, 0..l.model.cfg.num_layers, &[Proj::Q, Proj::Down], &mut Rng::new(8), l.model.device()).unwrap();
    for (k, v0) in &a0.layers {
        let (x0, x1) = (v0.a.as_tensor(), a1.layers[k].a.as_tensor());
        let moved = max_abs_diff(x0, x1);
        assert!(moved > 0.0 && moved < 1.1e-3, "{k:?}: step 1 moved A by {moved}");
        assert!(max_abs_diff(x0, other.layers[k].a.as_tensor()) > 1e-2, "{k:?}: another seed's draw is not distinguishable");
    }
}
