//! Hugging Face checkpoint directories against transformers' all-position logits.
mod common;
use candle_core::{DType, Device};
use common::*;
use road_dii::model::{load, Fwd, LogitsAt};

/// All-position logits on the recorded ids (no BOS) against transformers'; returns the largest
/// |Δlogit| over the prompts.
fn check(name: &str, tol: f32) -> f32 {
    let m = load::load_path(&reference_dir().join(name), DType::F32, &Device::Cpu).unwrap();
    let refj = ref_json(&format!("{name}.reference.json"));
    let reft = ref_tensors(&format!("{name}.reference.safetensors"));
    let mut worst = 0f32;
    for (i, p) in refj["prompts"].as_array().unwrap().iter().enumerate() {
        let text = p["prompt"].as_str().unwrap();
        let ids = ids_of(&p["ids"]);
        assert_eq!(m.tok.encode(text).unwrap(), ids, "{name} prompt {i} ids");
        let out = m.model.forward(&[ids], Fwd { logits: LogitsAt::All, ..Default::default() }).unwrap();
        let logits = out.logits.unwrap().get(0).unwrap();
        let expect = &reft[&format!("p{i}.logits")];
        assert_eq!(logits.dims(), expect.dims());
        let d = max_abs_diff(&logits, expect);
        assert!(d < tol, "{name} prompt {i}: max |Δlogit| = {d}");
        worst = worst.max(d);
        let am = road_dii::generate::argmax(&logits.get(logits.dim(0).unwrap() - 1).unwrap().to_vec1::<f32>().unwrap());
        assert_eq!(am as u64, p["argmax_last"].as_u64().unwrap());
    }
    eprintln!("{name}: max |Δlogit| over all positions = {worst:.2e}");
    worst
}

#[test]
fn tiny_a_tied_gqa_f32_matches() {
    check("hf-tiny-llama-a", 1e-3);
}

#[test]
fn mistral_sliding_window_matches() {
    let m = load::load_path(&reference_dir().join("hf-tiny-mistral"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(m.model.cfg.arch.sliding_window, Some(4));
    check("hf-tiny-mistral", 1e-3);
}

#[test]
fn qwen2_qkv_bias_matches() {
    let m = load::load_path(&reference_dir().join("hf-tiny-qwen2"), DType::F32, &Device::Cpu).unwrap();
    assert!(m.model.cfg.arch.qkv_bias && m.model.proj_bias(0, road_dii::model::Proj::Q).is_some());
    check("hf-tiny-qwen2", 1e-3);
}

#[test]
fn qwen3_qk_norm_and_explicit_head_dim_match() {
    let m = load::load_path(&reference_dir().join("hf-tiny-qwen3"), DType::F32, &Device::Cpu).unwrap();
    assert!(m.model.cfg.arch.qk_norm);
    assert_ne!(m.model.cfg.head_dim * m.model.cfg.num_heads, m.model.cfg.hidden_size);
    check("hf-tiny-qwen3", 1e-3);
}

#[test]
fn gemma2_matches() {
    let m = load::load_path(&reference_dir().join("hf-tiny-gemma2"), DType::F32, &Device::Cpu).unwrap();
    let a = &m.model.cfg.arch;
    assert!(a.sandwich_norms && a.norm_plus_one && a.embed_scale && a.attn_softcap.is_some() && a.final_softcap.is_some());
    assert_eq!((a.is_sliding(0), a.is_sliding(1)), (true, false));
    check("hf-tiny-gemma2", 1e-3);
}

/// Each knob matters: switching it off moves the logits well past the tolerance, so the parity
/// tests above cannot pass by accident. (Gemma's soft-caps at 50/30 barely touch this random
/// model's small scores and logits; the frozen-tail test covers their derivatives.)
#[test]
fn every_family_knob_changes_the_logits() {
    use road_dii::model::{Fwd, LogitsAt};
    let ids = vec![ids_of(&ref_json("hf-tiny-gemma2.reference.json")["prompts"][2]["ids"])];
    for (name, tweak) in [
        ("hf-tiny-mistral", (|a: &mut road_dii::model::config::Arch| a.sliding_window = None) as fn(&mut _)),
        ("hf-tiny-gemma2", |a| a.sliding_window = None),
        ("hf-tiny-gemma2", |a| a.query_pre_attn_scalar = None),
    ] {
        let dir = reference_dir().join(name);
        let base = load::load_path(&dir, DType::F32, &Device::Cpu).unwrap();
        let mut cfg = base.model.cfg.clone();
        tweak(&mut cfg.arch);
        let vb = candle_nn::VarBuilder::from_tensors(base.model.named_weights().unwrap().into_iter().collect(), DType::F32, &Device::Cpu);
        let changed = road_dii::model::Llama::load(vb, cfg).unwrap();
        let run = |m: &road_dii::model::Llama| m.forward(&ids, Fwd { logits: LogitsAt::All, ..Default::default() }).unwrap().logits.unwrap();
        let d = max_abs_diff(&run(&base.model), &run(&changed));
        assert!(d > 1e-2, "{name}: the knob changed the logits by only {d}");
    }
}

#[test]
fn tiny_b_untied_llama3_rope_bf16_matches() {
    let m = load::load_path(&reference_dir().join("hf-tiny-llama-b"), DType::F32, &Device::Cpu).unwrap();
    assert!(m.model.cfg.rope_scaling.is_some(), "rope_parameters llama3 scaling must be read");
    assert!(!m.model.cfg.tie_word_embeddings);
    check("hf-tiny-llama-b", 1e-2);
}

/// Decoding one token at a time with the KV cache gives the full forward's logits at every
/// position, for every family (the sliding window must mask cached keys too once the sequence
/// outgrows it).
#[test]
fn kv_cache_decode_equals_the_full_forward_for_every_family() {
    use road_dii::model::{Fwd, KvCache, LogitsAt};
    for name in ["hf-tiny-mistral", "hf-tiny-qwen2", "hf-tiny-qwen3", "hf-tiny-gemma2"] {
        let m = load::load_path(&reference_dir().join(name), DType::F32, &Device::Cpu).unwrap().model;
        let ids = ids_of(&ref_json(&format!("{name}.reference.json"))["prompts"][2]["ids"]);
        let full = m.forward(&[ids.clone()], Fwd { logits: LogitsAt::All, ..Default::default() }).unwrap().logits.unwrap().get(0).unwrap();
        let mut kv = KvCache::new(m.cfg.num_layers);
        let pre = 2;
        m.forward(&[ids[..pre].to_vec()], Fwd { cache: Some(&mut kv), logits: LogitsAt::None, ..Default::default() }).unwrap();
        for (i, &id) in ids.iter().enumerate().skip(pre) {
            let step = m.forward(&[vec![id]], Fwd { cache: Some(&mut kv), logits: LogitsAt::Last, ..Default::default() }).unwrap();
            let d = max_abs_diff(&step.logits.unwrap().get(0).unwrap(), &full.get(i).unwrap());
            assert!(d < 1e-4, "{name} position {i}: decode differs from the full forward by {d}");
        }
    }
}

/// A left-padded batch gives each row its unbatched logits, for every family (positions count
/// real tokens; the sliding window counts sequence distance, which left padding leaves alone).
#[test]
fn left_padded_batches_match_unbatched_rows_for_every_family() {
    use road_dii::model::{Fwd, LogitsAt};
    for name in ["hf-tiny-mistral", "hf-tiny-qwen2", "hf-tiny-qwen3", "hf-tiny-gemma2"] {
        let m = load::load_path(&reference_dir().join(name), DType::F32, &Device::Cpu).unwrap().model;
        let refj = ref_json(&format!("{name}.reference.json"));
        let rows: Vec<Vec<u32>> = (0..3).map(|i| ids_of(&refj["prompts"][i]["ids"])).collect();
        let t = rows.iter().map(Vec::len).max().unwrap();
        let padded: Vec<Vec<u32>> = rows.iter().map(|r| [vec![0; t - r.len()], r.clone()].concat()).collect();
        let mask: Vec<Vec<u8>> = rows.iter().map(|r| [vec![0u8; t - r.len()], vec![1; r.len()]].concat()).collect();
        let batch = m.forward(&padded, Fwd { attention_mask: Some(&mask), logits: LogitsAt::Last, ..Default::default() }).unwrap().logits.unwrap();
        for (i, r) in rows.iter().enumerate() {
            let one = m.forward(&[r.clone()], Fwd { logits: LogitsAt::Last, ..Default::default() }).unwrap().logits.unwrap();
            let d = max_abs_diff(&batch.get(i).unwrap(), &one.get(0).unwrap());
            assert!(d < 1e-4, "{name} row {i}: padded batch differs by {d}");
        }
    }
}
