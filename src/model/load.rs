//! Loaders: GGUF files (llama.cpp layout, de-quantised) and Hugging Face checkpoint directories.
//! Both produce HF-named tensors so one `Llama::load` serves every source.
use super::config::{Arch, LlamaConfig};
use super::file_checks;
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
    let mut parts = Vec::new();
    for f in safetensors_files(dir)? {
        let part = candle_core::safetensors::load(&f, &Device::Cpu).with_context(|| format!("reading {}", f.display()))?;
        parts.push((f, part));
    }
    let model = hf_model(cfg, parts, dtype, device).with_context(|| format!("building the model from {}", dir.display()))?;
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.exists() {
        bail!("{} has no tokenizer.json", dir.display());
    }
    let tok = Tok::from_file(&tok_path, model.cfg.bos_token_id, &model.cfg.eos_token_ids)?;
    Ok(Loaded { model, tok, source: dir.to_path_buf(), format: "hf" })
}

/// The model from a parsed config and its safetensors files' tensors (`(file, tensors)`), with
/// the checks every HF checkpoint gets: float dtypes, finite weights, no blocks beyond the config,
/// finite logits from a check forward.
pub fn hf_model(cfg: LlamaConfig, parts: Vec<(PathBuf, HashMap<String, Tensor>)>, dtype: DType, device: &Device) -> Result<Llama> {
    // Errors about the whole model name the checkpoint's folder (its files' parent).
    let source = parts.first().and_then(|(f, _)| f.parent()).map(Path::to_path_buf).unwrap_or_default();
    let mut tensors = HashMap::new();
    for (f, part) in parts {
        for (name, t) in part {
            match t.dtype() {
                DType::F32 | DType::BF16 | DType::F16 => {}
                other => bail!("{}: tensor {name} has unsupported dtype {other:?} (f32/bf16/f16 only)", f.display()),
            }
            file_checks::check_finite(&f, &name, &t)?;
            tensors.insert(name, t.to_dtype(dtype)?.to_device(device)?);
        }
    }
    file_checks::check_block_count(tensors.keys().cloned(), file_checks::hf_block, cfg.num_layers, "num_hidden_layers")?;
    let model = Llama::load(VarBuilder::from_tensors(tensors, dtype, device), cfg)?;
    file_checks::check_runs(&source, &model)?;
    Ok(model)
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
    // Present with the wrong type (or negative) is an error naming the key, never a default.
    let u = |k: &str| -> Result<usize> {
        let key = format!("{arch_name}.{k}");
        let v = md.get(&key).with_context(|| format!("GGUF metadata lacks {key}"))?;
        let n = match v {
            gguf_file::Value::U8(x) => Some(*x as u64),
            gguf_file::Value::U16(x) => Some(*x as u64),
            gguf_file::Value::U32(x) => Some(*x as u64),
            gguf_file::Value::U64(x) => Some(*x),
            gguf_file::Value::I8(x) => u64::try_from(*x).ok(),
            gguf_file::Value::I16(x) => u64::try_from(*x).ok(),
            gguf_file::Value::I32(x) => u64::try_from(*x).ok(),
            gguf_file::Value::I64(x) => u64::try_from(*x).ok(),
            _ => None,
        };
        match n.and_then(|n| usize::try_from(n).ok()) {
            Some(n) => Ok(n),
            None => bail!("GGUF {key} must be a non-negative integer, got {v:?}"),
        }
    };
    let f = |k: &str, default: Option<f32>| -> Result<f32> {
        let key = format!("{arch_name}.{k}");
        match (md.get(&key), default) {
            (Some(gguf_file::Value::F32(x)), _) => Ok(*x),
            (Some(gguf_file::Value::F64(x)), _) => Ok(*x as f32),
            (Some(v), _) => bail!("GGUF {key} must be a float, got {v:?}"),
            (None, Some(d)) => Ok(d),
            (None, None) => bail!("GGUF metadata lacks {key}"),
        }
    };
    let opt = |k: &str| -> Result<Option<usize>> {
        if md.contains_key(&format!("{arch_name}.{k}")) { u(k).map(Some) } else { Ok(None) }
    };
    let hidden = u("embedding_length")?;
    let heads = u("attention.head_count")?;
    let kv = opt("attention.head_count_kv")?.unwrap_or(heads);
    // 0 heads: left to `validate`, which names the key (no division by zero here).
    let head_dim = match opt("attention.key_length")? {
        Some(d) => d,
        None => opt("rope.dimension_count")?.unwrap_or(hidden.checked_div(heads).unwrap_or(0)),
    };
    let tok_count = md
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.to_vec().ok())
        .map(|v| v.len());
    let vocab = opt("vocab_size")?.or(tok_count).context("GGUF metadata lacks the vocabulary size")?;
    let tok_id = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
    let cfg = LlamaConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: u("feed_forward_length")?,
        num_layers: u("block_count")?,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        // Required, as llama.cpp requires them: a renamed key must not become a default.
        rms_norm_eps: f("attention.layer_norm_rms_epsilon", None)? as f64,
        rope_theta: f("rope.freq_base", Some(10000.0))?,
        rope_scaling: None,
        max_position_embeddings: u("context_length")?,
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
    let mut l = load_gguf_from(&mut file, path, dtype, device)?;
    l.source = path.to_path_buf();
    Ok(l)
}

/// A GGUF model from any reader (`path` names it in errors): a file, or bytes in memory (the
/// fuzz tests feed mutants without writing them out).
pub fn load_gguf_from<R: std::io::Read + std::io::Seek>(file: &mut R, path: &Path, dtype: DType, device: &Device) -> Result<Loaded> {
    let invalid = |e: &dyn std::fmt::Display| anyhow::anyhow!("{} is not a valid GGUF file: {e}", path.display());
    file_checks::check_header(file).map_err(|e| invalid(&e))?;
    let content = gguf_file::Content::read(file).map_err(|e| invalid(&e))?;
    let len = file.seek(std::io::SeekFrom::End(0))?;
    file_checks::check_layout(&content, len).map_err(|e| invalid(&e))?;
    let cfg = gguf_config(&content).with_context(|| format!("reading {}", path.display()))?;
    let arch_name = content.metadata.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
    file_checks::check_block_count(content.tensor_infos.keys().cloned(), file_checks::gguf_block, cfg.num_layers, &format!("{arch_name}.block_count"))
        .map_err(|e| invalid(&e))?;
    let mut tensors = HashMap::new();
    let family = cfg.arch.family;
    for name in content.tensor_infos.keys() {
        let Some(hf) = weights::hf_from_gguf(family, name) else { continue };
        let q = content
            .tensor(file, name, &Device::Cpu)
            .map_err(|e| anyhow::anyhow!("{}: reading tensor {name}: {e} (truncated or corrupt file?)", path.display()))?;
        let mut t = q.dequantize(&Device::Cpu)?;
        file_checks::check_finite(path, name, &t)?;
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
    file_checks::check_runs(path, &model)?;
    Ok(Loaded { model, tok, source: path.to_path_buf(), format: "gguf" })
}
