//! The GPU runs only device-generic candle ops; the CPU adds fast paths (the packed AVX-512/AVX2
//! and AMX GEMMs, the element-wise ops of `model/cpu_ops.rs`, the fused RoAd op, the
//! frozen-weight matmul op). With the fast paths forced off
//! (`runtime::with_generic_ops`), the CPU runs exactly what a CUDA device runs: these tests check
//! that every workload goes through, and equals the fast path, that way.
mod common;
use candle_core::{DType, Device, Tensor};
use common::{max_abs_diff, reference_dir, tiny_a};
use road_dii::generate::{greedy_batch, greedy_with};
use road_dii::model::{load, Fwd, LogitsAt, Proj};
use road_dii::adapters::{AnyAdapter, Freeze, LoraAdapter, MixedAdapters, RoadAdapter, Variant};
use road_dii::runtime::with_generic_ops;
use road_dii::train::data::ClsExample;
use road_dii::train::{self, MethodCfg, TaskCfg, TrainConfig, TrainData};
use road_dii::util::rng::Rng;

const IDS: [u32; 6] = [504, 3575, 282, 4649, 314, 1010];

#[test]
fn fast_paths_decline_when_generic_ops_are_forced() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(1);
    let x = rng.normal_tensor(&[1, 2, 16], 1.0, &dev).unwrap();
    let w = rng.normal_tensor(&[8, 16], 1.0, &dev).unwrap();
    let f = rng.normal_tensor(&[16], 1.0, &dev).unwrap();
    with_generic_ops(|| {
        assert!(road_dii::adapters::fused::try_fused(&x, &f, &f, 8).unwrap().is_none());
        let xv = candle_core::Var::from_tensor(&x).unwrap();
        let slot = road_dii::model::packed_gemm::PackSlot::default();
        assert!(road_dii::model::frozen::try_frozen_linear(xv.as_tensor(), &w, &slot).unwrap().is_none());
        if let Some(p) = slot.get(&w) {
            assert!(road_dii::model::packed_gemm::try_linear(&x, &p).unwrap().is_none());
        }
        use road_dii::model::cpu_ops;
        assert!(cpu_ops::add(&x, &x).unwrap().is_none());
        assert!(cpu_ops::silu_mul(&x, &x).unwrap().is_none());
        assert!(cpu_ops::rms_norm(&x, &f, 1e-5).unwrap().is_none());
        assert!(cpu_ops::convert(&x, candle_core::DType::BF16).unwrap().is_none());
    });
    // ...and the flag is scoped: outside, the CPU fast path is back (where AVX2 exists).
    assert!(road_dii::runtime::cpu_fast_path(&dev));
}

#[test]
fn forward_and_decode_agree_between_fast_and_generic_paths() {
    let m = &tiny_a().model;
    let run = || {
        let all = m.forward(&[IDS.to_vec()], Fwd { logits: LogitsAt::All, ..Default::default() }).unwrap().logits.unwrap();
        let g = greedy_with(m, None, &IDS, 8, &[]).unwrap();
        (all, g.tokens)
    };
    let (fast, fast_tokens) = run();
    let (generic, generic_tokens) = with_generic_ops(run);
    let d = max_abs_diff(&fast, &generic);
    assert!(d < 1e-4, "logits differ by {d}");
    assert_eq!(fast_tokens, generic_tokens);
}

fn random_road(m: &road_dii::model::Llama, seed: u64) -> RoadAdapter {
    let a = RoadAdapter::new_identity(&m.cfg, Variant::Road1, 8, 0..m.cfg.num_layers, &Proj::ALL, m.device()).unwrap();
    let mut rng = Rng::new(seed);
    for l in a.layers.values() {
        let n = l.theta.elem_count();
        l.theta.set(&rng.normal_tensor(&[n], 0.5, m.device()).unwrap()).unwrap();
        l.alpha.set(&(rng.normal_tensor(&[n], 0.2, m.device()).unwrap() + 1.0).unwrap()).unwrap();
    }
    a
}

#[test]
fn mixed_adapter_batches_agree_between_fast_and_generic_paths() {
    let m = &tiny_a().model;
    let mut rng = Rng::new(5);
    let lora = LoraAdapter::new(&m.cfg, 4, 8.0, 0.0, 0..m.cfg.num_layers, &Proj::ALL, &mut rng, m.device()).unwrap();
    for l in lora.layers.values() {
        l.b.set(&rng.normal_tensor(l.b.dims(), 0.1, m.device()).unwrap()).unwrap();
    }
    let named = vec![("r".to_string(), AnyAdapter::Road(random_road(m, 3))), ("l".to_string(), AnyAdapter::Lora(lora))];
    let mut mixed = MixedAdapters::new(&named, m).unwrap();
    mixed.set_rows(&[Some(0), None, Some(1), Some(0)], m.dtype()).unwrap();
    let prompts: Vec<Vec<u32>> = vec![IDS.to_vec(), IDS[1..].to_vec(), vec![7, 8, 9], IDS[..4].to_vec()];
    let run = || {
        let g = greedy_batch(m, Some(&mixed), &prompts, &[5, 5, 5, 5], &[]).unwrap();
        let (ids, mask) = road_dii::train::cls::left_pad(&prompts, 0);
        let lg = m
            .forward(&ids, Fwd { attention_mask: Some(&mask), adapter: Some(&mixed), logits: LogitsAt::Last, ..Default::default() })
            .unwrap()
            .logits
            .unwrap();
        (g.tokens, lg)
    };
    let (ft, fl) = run();
    let (gt, gl) = with_generic_ops(run);
    assert_eq!(ft, gt);
    let d = max_abs_diff(&fl, &gl);
    assert!(d < 1e-4, "mixed-batch logits differ by {d}");
}

fn toy() -> (TrainData, TrainConfig) {
    let words = ["apple", "river", "stone", "cloud", "green", "music"];
    let mut ex = vec![];
    for w in words {
        ex.push(ClsExample { text: format!("{w} is good"), label: 0 });
        ex.push(ClsExample { text: format!("{w} is bad"), label: 1 });
    }
    let task = TaskCfg::Classify { template: "Review: {text}. Verdict:".into(), label_words: vec![" yes".into(), " no".into()], head: false };
    let road = MethodCfg::Road { variant: Variant::Road1, group_size: 8, freeze: Freeze::default(), targets: Proj::ALL.to_vec(), layers: None };
    let mut c = TrainConfig::new(road, task);
    c.steps = 4;
    c.batch_size = 6;
    c.lr = 2e-2;
    c.eval_every = 0;
    c.progress = false;
    c.warmup_ratio = 0.0;
    (TrainData::Cls { train: ex.clone(), dev: ex }, c)
}

#[test]
fn finetuning_agrees_between_fast_and_generic_paths() {
    let l = tiny_a();
    let (data, base_cfg) = toy();
    let lora = MethodCfg::Lora { r: 4, alpha: 8.0, dropout: 0.0, targets: vec![Proj::Q, Proj::V, Proj::Down], layers: None };
    // With dropout: the fused CPU op (model::low_rank) must draw the composed path's masks.
    let lora_drop = MethodCfg::Lora { r: 4, alpha: 8.0, dropout: 0.2, targets: Proj::ALL.to_vec(), layers: None };
    let dora_drop = MethodCfg::Dora { r: 4, alpha: 8.0, dropout: 0.2, targets: Proj::ALL.to_vec(), layers: None };
    // OFT's rotation through model::rotated_linear on the fast path.
    let oft = MethodCfg::Oft { block_size: 8, neumann_terms: Some(5), targets: Proj::ALL.to_vec(), layers: None };
    for method in [base_cfg.method.clone(), lora, lora_drop, dora_drop, oft, MethodCfg::Full] {
        let mut c = base_cfg.clone();
        c.method = method.clone();
        if matches!(method, MethodCfg::Full) {
            c.lr = 1e-3;
        }
        let logits = |out: &train::TrainOutput| -> Tensor {
            out.model(&l.model)
                .forward(&[IDS.to_vec()], Fwd { adapter: out.adapter(), logits: LogitsAt::Last, ..Default::default() })
                .unwrap()
                .logits
                .unwrap()
        };
        let fast = train::train(&l.model, &l.tok, &c, &data).unwrap();
        let generic = with_generic_ops(|| train::train(&l.model, &l.tok, &c, &data).unwrap());
        let d = with_generic_ops(|| max_abs_diff(&logits(&fast), &logits(&generic)));
        assert!(d < 1e-3, "{}: trained models differ by {d}", method.label());
    }
}

#[test]
fn bf16_models_generate_and_random_configs_run() {
    let m = load::load_path(&reference_dir().join("hf-tiny-llama-a"), DType::BF16, &Device::Cpu).unwrap().model;
    let g = greedy_with(&m, None, &IDS, 4, &[]).unwrap();
    assert_eq!(g.tokens.len(), 4);
    let cfg = road_dii::model::random::preset("tiny").unwrap();
    let r = road_dii::model::random::random_llama(&cfg, DType::F32, &Device::Cpu).unwrap();
    let out = r.forward(&[vec![1, 2, 3]], Fwd::default()).unwrap().logits.unwrap();
    assert_eq!(out.dims(), &[1, 3, cfg.vocab_size]);
    assert!(road_dii::model::random::preset("7b").unwrap().param_count() > 6_000_000_000);
}

#[test]
fn device_retraction_keeps_rows_orthonormal_and_matches_qr_for_one_row() {
    use road_dii::intervene::orth::{orthonormality_error, random_orthonormal, retract_polar, retract_qr};
    let dev = Device::Cpu;
    let mut rng = Rng::new(9);
    for r in [1usize, 4] {
        let q = random_orthonormal(r, 32, 3, &dev).unwrap();
        let x = (q + rng.normal_tensor(&[r, 32], 0.05, &dev).unwrap()).unwrap();
        let (a, b) = (candle_core::Var::from_tensor(&x).unwrap(), candle_core::Var::from_tensor(&x).unwrap());
        retract_qr(&a).unwrap();
        retract_polar(&b).unwrap();
        assert!(orthonormality_error(b.as_tensor()).unwrap() < 1e-5);
        if r == 1 {
            // One row: both retractions are x / |x|.
            assert!(max_abs_diff(a.as_tensor(), b.as_tensor()) < 1e-5);
        }
    }
}
