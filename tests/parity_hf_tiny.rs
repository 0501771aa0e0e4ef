//! Hugging Face checkpoint directories against transformers' all-position logits.
mod common;
use candle_core::{DType, Device};
use common::*;
use road_dii::model::{load, Fwd, LogitsAt};

fn check(name: &str, tol: f32) {
    let m = load::load_path(&reference_dir().join(name), DType::F32, &Device::Cpu).unwrap();
    let refj = ref_json(&format!("{name}.reference.json"));
    let reft = ref_tensors(&format!("{name}.reference.safetensors"));
    for (i, p) in refj["prompts"].as_array().unwrap().iter().enumerate() {
        let text = p["prompt"].as_str().unwrap();
        let ids = m.tok.encode(text).unwrap();
        assert_eq!(ids, ids_of(&p["ids"]), "{name} prompt {i} ids");
        let out = m.model.forward(&[ids], Fwd { logits: LogitsAt::All, ..Default::default() }).unwrap();
        let logits = out.logits.unwrap().get(0).unwrap();
        let expect = &reft[&format!("p{i}.logits")];
        assert_eq!(logits.dims(), expect.dims());
        let d = max_abs_diff(&logits, expect);
        assert!(d < tol, "{name} prompt {i}: max |Δlogit| = {d}");
        let am = road_dii::generate::argmax(&logits.get(logits.dim(0).unwrap() - 1).unwrap().to_vec1::<f32>().unwrap());
        assert_eq!(am as u64, p["argmax_last"].as_u64().unwrap());
    }
}

#[test]
fn tiny_a_tied_gqa_f32_matches() {
    check("hf-tiny-llama-a", 1e-3);
}

#[test]
fn tiny_b_untied_llama3_rope_bf16_matches() {
    let m = load::load_path(&reference_dir().join("hf-tiny-llama-b"), DType::F32, &Device::Cpu).unwrap();
    assert!(m.model.cfg.rope_scaling.is_some(), "rope_parameters llama3 scaling must be read");
    assert!(!m.model.cfg.tie_word_embeddings);
    check("hf-tiny-llama-b", 1e-2);
}
