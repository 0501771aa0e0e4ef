//! Loaders: GGUF files (llama.cpp layout, de-quantised) and Hugging Face checkpoint directories.
//! Both produce HF-named tensors so one `Llama::load` serves every source.
use super::config::{Arch, LlamaConfig};
use super::llama::Llama;
use super::sites::Proj;
use super::weights;
use crate::tokenizer::Tok;
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A loaded model with its tokenizer and where it came from.
pub struct Loaded {
    pub model: Llama,
    pub tok: Tok,
    pub source: PathBuf,
    pub format: &'static str,
}

pub use crate::runtime::parse_dtype;

/// Load a `.gguf` file or a HF directory (already resolved to a path).
pub fn load_path(path: &Path, dtype: DType, device: &Device) -> Result<Loaded> {
    if !path.exists() {
        bail!("model path {} does not exist", path.display());
    }
    if path.is_dir() {
        load_hf_dir(path, dtype, device)
    } else {
        load_gguf(path, dtype, device)
    }
}

pub fn load_hf_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Loaded> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("{} is not a Hugging Face checkpoint: no config.json", dir.display()))?;
    let cfg = LlamaConfig::from_hf_json(&text).with_context(|| format!("reading {}", cfg_path.display()))?;
    let files = safetensors_files(dir)?;
    let mut tensors = HashMap::new();
    for f in &files {
        let part = candle_core::safetensors::load(f, &Device::Cpu)
            .with_context(|| format!("reading {}", f.display()))?;
        for (name, t) in part {
            match t.dtype() {
                DType::F32 | DType::BF16 | DType::F16 => {}
                other => bail!("{}: tensor {name} has unsupported dtype {other:?} (f32/bf16/f16 only)", f.display()),
            }
            tensors.insert(name, t.to_dtype(dtype)?.to_device(device)?);
        }
    }
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    let model = Llama::load(vb, cfg).with_context(|| format!("building the model from {}", dir.display()))?;
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.exists() {
        bail!("{} has no tokenizer.json", dir.display());
    }
    let tok = Tok::from_file(&tok_path, model.cfg.bos_token_id, &model.cfg.eos_token_ids)?;
    Ok(Loaded { model, tok, source: dir.to_path_buf(), format: "hf" })
}

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index)?)
            .with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{}: no weight_map", index.display()))?;
        let mut files: Vec<PathBuf> = map.values().filter_map(|f| f.as_str()).map(|f| dir.join(f)).collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    bail!("{}: no model.safetensors or model.safetensors.index.json", dir.display())
}

/// Read GGUF metadata into a config (architectures: `model::arch::Arch::from_gguf`).
pub fn gguf_config(content: &gguf_file::Content) -> Result<LlamaConfig> {
    let md = &content.metadata;
    let arch_name = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    let arch = Arch::from_gguf(&arch_name)?;
    // llama.cpp prefixes hyper-parameters with the architecture name (`qwen2.block_count`).
    let u = |k: &str| -> Result<usize> {
        let key = format!("{arch_name}.{k}");
        let v = md.get(&key).with_context(|| format!("GGUF metadata lacks {key}"))?;
        Ok(v.to_u64().or_else(|_| v.to_u32().map(|x| x as u64)).or_else(|_| v.to_i32().map(|x| x as u64))? as usize)
    };
    let f = |k: &str, default: f32| -> f32 {
        md.get(&format!("{arch_name}.{k}")).and_then(|v| v.to_f32().ok()).unwrap_or(default)
    };
    let hidden = u("embedding_length")?;
    let heads = u("attention.head_count")?;
    let kv = u("attention.head_count_kv").unwrap_or(heads);
    let head_dim = u("attention.key_length")
        .or_else(|_| u("rope.dimension_count"))
        .unwrap_or(hidden / heads);
    let tok_count = md
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.to_vec().ok())
        .map(|v| v.len());
    let vocab = u("vocab_size").ok().or(tok_count).context("GGUF metadata lacks the vocabulary size")?;
    let tok_id = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
    let cfg = LlamaConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: u("feed_forward_length")?,
        num_layers: u("block_count")?,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        rms_norm_eps: f("attention.layer_norm_rms_epsilon", 1e-5) as f64,
        rope_theta: f("rope.freq_base", 10000.0),
        rope_scaling: None,
        max_position_embeddings: u("context_length").unwrap_or(2048),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        bos_token_id: tok_id("tokenizer.ggml.bos_token_id"),
        eos_token_ids: tok_id("tokenizer.ggml.eos_token_id").into_iter().collect(),
        arch,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// llama.cpp stores Q/K rows permuted for interleaved RoPE; undo it to get the HF
/// (rotate-half) layout, so sites q/k and head slices mean the same as in transformers.
fn unpermute(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let hd = out / n_head;
    Ok(w.reshape((n_head, hd / 2, 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

pub fn load_gguf(path: &Path, dtype: DType, device: &Device) -> Result<Loaded> {
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let content = gguf_file::Content::read(&mut file)
        .map_err(|e| anyhow::anyhow!("{} is not a valid GGUF file: {e}", path.display()))?;
    let cfg = gguf_config(&content).with_context(|| format!("reading {}", path.display()))?;
    let mut tensors = HashMap::new();
    let family = cfg.arch.family;
    for name in content.tensor_infos.keys() {
        let Some(hf) = weights::hf_from_gguf(family, name) else { continue };
        let q = content
            .tensor(&mut file, name, &Device::Cpu)
            .map_err(|e| anyhow::anyhow!("{}: reading tensor {name}: {e} (truncated or corrupt file?)", path.display()))?;
        let mut t = q.dequantize(&Device::Cpu)?;
        if weights::gguf_qk_permuted(family) {
            match weights::gguf_qk_kind(name) {
                Some(Proj::Q) => t = unpermute(&t, cfg.num_heads)?,
                Some(_) => t = unpermute(&t, cfg.num_kv_heads)?,
                None => {}
            }
        }
        tensors.insert(hf, t.to_dtype(dtype)?.to_device(device)?);
    }
    let tok = Tok::from_gguf(&content, cfg.bos_token_id, &cfg.eos_token_ids)?;
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    let model = Llama::load(vb, cfg).with_context(|| format!("building the model from {}", path.display()))?;
    Ok(Loaded { model, tok, source: path.to_path_buf(), format: "gguf" })
}
