//! GGUF loading per tensor type and architecture: the tiny transformers checkpoints written as
//! llama.cpp-layout GGUF files (Q/K rows permuted for `llama`, q/k/v biases for `qwen2`, q/k
//! norms and head_dim 12 for `qwen3`), each
//! 2-D weight stored in one ggml type, must load to the same logits as the HF checkpoint with
//! the same round-tripped (quantised, de-quantised) weights. K-quants need rows of 256, which the
//! tiny models lack: Q4_K / Q6_K are covered by the real Qwen file (tests/parity_qwen.rs).
mod common;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::*;
use road_dii::model::config::Family;
use road_dii::model::{load, weights, Fwd, Llama, LogitsAt};
use std::collections::HashMap;

/// HF name → GGUF name, from the one table (`weights::hf_from_gguf`) run backwards.
fn gguf_names(family: Family, layers: usize) -> HashMap<String, String> {
    let mut cands = vec!["token_embd.weight".to_string(), "output_norm.weight".into(), "output.weight".into()];
    for l in 0..layers {
        for stem in ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm"] {
            for kind in ["weight", "bias"] {
                cands.push(format!("blk.{l}.{stem}.{kind}"));
            }
        }
    }
    cands.into_iter().filter_map(|g| weights::hf_from_gguf(family, &g).map(|h| (h, g))).collect()
}

/// llama.cpp's permutation of Q/K rows for interleaved RoPE (the inverse of the loader's).
fn permute(w: &Tensor, n_head: usize) -> Tensor {
    let (out, inp) = w.dims2().unwrap();
    w.reshape((n_head, 2, out / n_head / 2, inp)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap().reshape((out, inp)).unwrap()
}

fn write_gguf(dir: &str, arch: &str, ty: GgmlDType, path: &std::path::Path) -> Llama {
    let hf = load::load_path(&reference_dir().join(dir), DType::F32, &Device::Cpu).unwrap();
    let cfg = &hf.model.cfg;
    let names = gguf_names(cfg.arch.family, cfg.num_layers);
    let mut qts: Vec<(String, QTensor)> = Vec::new();
    let mut roundtrip = HashMap::new();
    for (name, t) in hf.model.named_weights().unwrap() {
        let g = names.get(&name).unwrap_or_else(|| panic!("no GGUF name for {name}")).clone();
        // Norms and biases stay f32 (as llama.cpp writes them); matrices take the type.
        // (llama.cpp, too, falls back for rows that are not a whole number of blocks: Qwen3's o_proj of 48.)
        let fits = t.rank() == 2 && t.dim(1).unwrap() % ty.block_size() == 0;
        let q = QTensor::quantize(&t, if fits { ty } else { GgmlDType::F32 }).unwrap();
        let deq = q.dequantize(&Device::Cpu).unwrap();
        let stored = match (arch, g.as_str()) {
            ("llama", n) if n.ends_with("attn_q.weight") => QTensor::quantize(&permute(&t, cfg.num_heads), q.dtype()).unwrap(),
            ("llama", n) if n.ends_with("attn_k.weight") => QTensor::quantize(&permute(&t, cfg.num_kv_heads), q.dtype()).unwrap(),
            _ => q,
        };
        roundtrip.insert(name, deq);
        qts.push((g, stored));
    }
    // The tokenizer from its tokenizer.json: tokens by id, merges, GPT-2 pre-tokenizer.
    let tj: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(reference_dir().join(dir).join("tokenizer.json")).unwrap()).unwrap();
    let vocab = tj["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = t.clone();
    }
    let merges: Vec<gguf_file::Value> = tj["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| gguf_file::Value::String(match m {
            serde_json::Value::Array(p) => format!("{} {}", p[0].as_str().unwrap(), p[1].as_str().unwrap()),
            s => s.as_str().unwrap().to_string(),
        }))
        .collect();
    use gguf_file::Value as V;
    let u = |x: usize| V::U32(x as u32);
    let md: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String(arch.into())),
        (format!("{arch}.block_count"), u(cfg.num_layers)),
        (format!("{arch}.context_length"), u(cfg.max_position_embeddings)),
        (format!("{arch}.embedding_length"), u(cfg.hidden_size)),
        (format!("{arch}.feed_forward_length"), u(cfg.intermediate_size)),
        (format!("{arch}.attention.head_count"), u(cfg.num_heads)),
        (format!("{arch}.attention.head_count_kv"), u(cfg.num_kv_heads)),
        (format!("{arch}.attention.key_length"), u(cfg.head_dim)),
        (format!("{arch}.rope.freq_base"), V::F32(cfg.rope_theta)),
        (format!("{arch}.attention.layer_norm_rms_epsilon"), V::F32(cfg.rms_norm_eps as f32)),
        ("tokenizer.ggml.model".into(), V::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), V::String("smollm".into())),
        ("tokenizer.ggml.tokens".into(), V::Array(tokens.into_iter().map(V::String).collect())),
        ("tokenizer.ggml.merges".into(), V::Array(merges)),
    ];
    let mut f = std::fs::File::create(path).unwrap();
    let mdr: Vec<(&str, &V)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tr: Vec<(&str, &QTensor)> = qts.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &mdr, &tr).unwrap();
    Llama::load(VarBuilder::from_tensors(roundtrip, DType::F32, &Device::Cpu), cfg.clone()).unwrap()
}

#[test]
fn every_common_ggml_type_loads_for_llama_qwen2_and_qwen3() {
    let dir = fresh_dir("gguf-types", "all");
    let ids = vec![ids_of(&ref_json("hf-tiny-qwen2.reference.json")["prompts"][2]["ids"])];
    let types = [GgmlDType::F32, GgmlDType::F16, GgmlDType::BF16, GgmlDType::Q8_0, GgmlDType::Q5_0, GgmlDType::Q5_1, GgmlDType::Q4_0, GgmlDType::Q4_1];
    for (fixture, arch) in [("hf-tiny-llama-a", "llama"), ("hf-tiny-qwen2", "qwen2"), ("hf-tiny-qwen3", "qwen3")] {
        for ty in types {
            let path = dir.join(format!("{arch}-{ty:?}.gguf"));
            let want = write_gguf(fixture, arch, ty, &path);
            let got = load::load_path(&path, DType::F32, &Device::Cpu).unwrap();
            assert_eq!(got.format, "gguf");
            assert_eq!(got.model.cfg.arch.family, want.cfg.arch.family);
            assert_eq!(got.model.cfg.arch.qkv_bias, arch == "qwen2");
            assert_eq!((got.model.cfg.arch.qk_norm, got.model.cfg.head_dim), (arch == "qwen3", want.cfg.head_dim));
            let text = ref_json("hf-tiny-qwen2.reference.json")["prompts"][2]["prompt"].as_str().unwrap().to_string();
            assert_eq!(got.tok.encode(&text).unwrap(), ids[0], "{arch} {ty:?}: GGUF tokenizer ids");
            let run = |m: &Llama| m.forward(&ids, Fwd { logits: LogitsAt::All, ..Default::default() }).unwrap().logits.unwrap();
            let d = max_abs_diff(&run(&got.model), &run(&want));
            assert!(d < 1e-4, "{arch} {ty:?}: max |Δlogit| = {d}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unknown_gguf_architecture_fails_with_one_clear_line() {
    let dir = fresh_dir("gguf-types", "unknown");
    let path = dir.join("x.gguf");
    let md = [("general.architecture", &gguf_file::Value::String("mamba".into()))];
    gguf_file::write(&mut std::fs::File::create(&path).unwrap(), &md, &[]).unwrap();
    let e = format!("{:#}", load::load_path(&path, DType::F32, &Device::Cpu).err().expect("must fail"));
    assert!(e.contains("unsupported GGUF architecture \"mamba\"") && !e.contains('\n'), "{e}");
    let cfg = r#"{"model_type": "mamba", "architectures": ["MambaForCausalLM"]}"#;
    let e = road_dii::model::LlamaConfig::from_hf_json(cfg).unwrap_err().to_string();
    assert!(e.contains("unsupported architecture") && e.contains("gemma2") && !e.contains('\n'), "{e}");
}
