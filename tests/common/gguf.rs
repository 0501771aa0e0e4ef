//! Writing the tiny transformers checkpoints as llama.cpp-layout GGUF files (tests of the GGUF
//! loader: every tensor type, and hostile edits of the header).
use super::reference_dir;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use road_dii::model::config::Family;
use road_dii::model::{load, weights, Llama};
use std::collections::HashMap;

/// HF name → GGUF name, from the one table (`weights::hf_from_gguf`) run backwards.
pub fn gguf_names(family: Family, layers: usize) -> HashMap<String, String> {
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
pub fn permute(w: &Tensor, n_head: usize) -> Tensor {
    let (out, inp) = w.dims2().unwrap();
    w.reshape((n_head, 2, out / n_head / 2, inp)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap().reshape((out, inp)).unwrap()
}

/// The tiny HF checkpoint `dir` as a llama.cpp-layout GGUF of architecture `arch`, every matrix
/// in type `ty`; returns the model with the same round-tripped weights.
pub fn write_gguf(dir: &str, arch: &str, ty: GgmlDType, path: &std::path::Path) -> Llama {
    write_gguf_with(dir, arch, ty, path, |_| {})
}

/// [`write_gguf`] with the metadata edited by `edit` before writing (hostile-file tests).
pub fn write_gguf_with(dir: &str, arch: &str, ty: GgmlDType, path: &std::path::Path, edit: impl FnOnce(&mut Vec<(String, gguf_file::Value)>)) -> Llama {
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
    let mut md: Vec<(String, V)> = vec![
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
    edit(&mut md);
    let mut f = std::fs::File::create(path).unwrap();
    let mdr: Vec<(&str, &V)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tr: Vec<(&str, &QTensor)> = qts.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &mdr, &tr).unwrap();
    Llama::load(VarBuilder::from_tensors(roundtrip, DType::F32, &Device::Cpu), cfg.clone()).unwrap()
}


/// A copy of the tiny checkpoint `fixture` cut to its first `v` vocabulary entries (embeddings,
/// head, tokenizer vocab, merges of kept tokens only), written into `out`: the same architecture
/// at a fraction of the load cost, for fuzzing thousands of mutants. Keeps the 256 byte-level
/// tokens when `v` ≥ 273, so any ASCII text still encodes.
pub fn small_vocab_copy(fixture: &str, v: usize, out: &std::path::Path) -> std::path::PathBuf {
    let src = reference_dir().join(fixture);
    let dst = out.join(format!("{fixture}-v{v}"));
    std::fs::create_dir_all(&dst).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["vocab_size"] = v.into();
    std::fs::write(dst.join("config.json"), cfg.to_string()).unwrap();
    let mut ts = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        if let Some(t) = ts.get(name) {
            let cut = t.narrow(0, 0, v).unwrap().contiguous().unwrap();
            ts.insert(name.into(), cut);
        }
    }
    candle_core::safetensors::save(&ts, dst.join("model.safetensors")).unwrap();
    let mut tj: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap()).unwrap();
    let kept: serde_json::Map<String, serde_json::Value> =
        tj["model"]["vocab"].as_object().unwrap().iter().filter(|(_, id)| (id.as_u64().unwrap() as usize) < v).map(|(k, id)| (k.clone(), id.clone())).collect();
    let merges: Vec<serde_json::Value> = tj["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| {
            let (a, b) = match m {
                serde_json::Value::Array(p) => (p[0].as_str().unwrap().to_string(), p[1].as_str().unwrap().to_string()),
                s => {
                    let (a, b) = s.as_str().unwrap().split_once(' ').unwrap();
                    (a.to_string(), b.to_string())
                }
            };
            kept.contains_key(&a) && kept.contains_key(&b) && kept.contains_key(&format!("{a}{b}"))
        })
        .cloned()
        .collect();
    tj["model"]["vocab"] = serde_json::Value::Object(kept);
    tj["model"]["merges"] = serde_json::Value::Array(merges);
    if let Some(a) = tj["added_tokens"].as_array_mut() {
        a.retain(|t| (t["id"].as_u64().unwrap() as usize) < v);
    }
    std::fs::write(dst.join("tokenizer.json"), tj.to_string()).unwrap();
    dst
}
