//! LLaMA-family hyper-parameters, read from a HF `config.json` or from GGUF metadata; the
//! per-family knobs live in [`Arch`].
pub use super::arch::{Act, Arch, Family};
use anyhow::{bail, Context, Result};
use serde_json::Value;

/// Llama-3 style frequency-dependent RoPE scaling (`rope_type = "llama3"`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Llama3Scaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope_scaling: Option<Llama3Scaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Where this family departs from LLaMA (default: plain LLaMA).
    pub arch: Arch,
}

impl LlamaConfig {
    pub fn kv_groups(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Sanity checks shared by every loader, so a malformed file fails here with a clear message
    /// instead of as a shape error deep inside the forward pass.
    pub fn validate(&self) -> Result<()> {
        if self.num_layers == 0 || self.hidden_size == 0 || self.num_heads == 0 {
            bail!("model config has zero layers, width or heads");
        }
        if self.num_kv_heads == 0 || self.num_heads % self.num_kv_heads != 0 {
            bail!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_heads,
                self.num_kv_heads
            );
        }
        if self.head_dim % 2 != 0 {
            bail!("head_dim {} must be even for RoPE", self.head_dim);
        }
        Ok(())
    }

    /// Parse a Hugging Face `config.json` (transformers 4.x `rope_theta`/`rope_scaling` keys or
    /// transformers 5.x `rope_parameters`).
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).context("config.json is not valid JSON")?;
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        let archs: Vec<&str> = v
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let family = Family::from_hf(model_type, &archs)?;
        let req = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .with_context(|| format!("config.json: missing or non-integer key `{k}`"))
        };
        let hidden_size = req("hidden_size")?;
        let num_heads = req("num_attention_heads")?;
        let num_kv_heads = v
            .get("num_key_value_heads")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(num_heads);
        let head_dim = v
            .get("head_dim")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(hidden_size / num_heads);
        // transformers 5 moved rope settings into `rope_parameters`; older files use top-level keys.
        let rope = v.get("rope_parameters").filter(|r| r.is_object());
        let rope_theta = rope
            .and_then(|r| r.get("rope_theta"))
            .or_else(|| v.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0) as f32;
        let scaling_obj = rope.or_else(|| v.get("rope_scaling").filter(|r| r.is_object()));
        let rope_scaling = match scaling_obj {
            None => None,
            Some(s) => {
                let ty = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                match ty {
                    "default" => None,
                    "llama3" => {
                        let f = |k: &str| -> Result<f64> {
                            s.get(k).and_then(Value::as_f64).with_context(|| {
                                format!("config.json: llama3 rope scaling needs `{k}`")
                            })
                        };
                        Some(Llama3Scaling {
                            factor: f("factor")? as f32,
                            low_freq_factor: f("low_freq_factor")? as f32,
                            high_freq_factor: f("high_freq_factor")? as f32,
                            original_max_position_embeddings: f("original_max_position_embeddings")?
                                as usize,
                        })
                    }
                    other => bail!("config.json: unsupported rope type {other:?} (supported: default, llama3)"),
                }
            }
        };
        let eos_token_ids = match v.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
            _ => vec![],
        };
        let num_layers = req("num_hidden_layers")?;
        let arch = Arch::from_hf(family, &v, num_layers)?;
        let cfg = Self {
            vocab_size: req("vocab_size")?,
            hidden_size,
            intermediate_size: req("intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: v.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: v
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .unwrap_or(2048) as usize,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                // Gemma ties by default; the others (transformers' configs) do not.
                .unwrap_or(family == Family::Gemma2),
            bos_token_id: v.get("bos_token_id").and_then(Value::as_u64).map(|x| x as u32),
            eos_token_ids,
            arch,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Inverse frequencies for RoPE, computed in f32 like transformers, with llama3 scaling.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f32> = (0..d)
            .step_by(2)
            .map(|i| 1.0 / self.rope_theta.powf(i as f32 / d as f32))
            .collect();
        let Some(s) = &self.rope_scaling else { return base };
        let old = s.original_max_position_embeddings as f32;
        let low_wavelen = old / s.low_freq_factor;
        let high_wavelen = old / s.high_freq_factor;
        base.into_iter()
            .map(|f| {
                let wavelen = 2.0 * std::f32::consts::PI / f;
                if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    f / s.factor
                } else {
                    let smooth = (old / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * f / s.factor + smooth * f
                }
            })
            .collect()
    }

    /// A transformers-4 style `config.json` for this model (used when writing merged checkpoints).
    pub fn to_hf_json(&self, torch_dtype: &str) -> serde_json::Value {
        let rope_scaling = self.rope_scaling.as_ref().map(|s| {
            serde_json::json!({"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings})
        });
        let mut v = serde_json::json!({
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling, "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids.first(), "hidden_act": "silu",
            "mlp_bias": false, "torch_dtype": torch_dtype,
        });
        if let Some(m) = v.as_object_mut() {
            self.arch.hf_json_fields(m);
        }
        v
    }

    /// Parameter count of the model (embeddings counted once when tied).
    pub fn param_count(&self) -> usize {
        let d = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let a = &self.arch;
        let bias = if a.qkv_bias { q + 2 * kv } else { 0 } + if a.o_bias { d } else { 0 };
        let norms = if a.sandwich_norms { 4 * d } else { 2 * d } + if a.qk_norm { 2 * self.head_dim } else { 0 };
        let per_block = d * q + 2 * d * kv + q * d + 3 * d * self.intermediate_size + bias + norms;
        let emb = self.vocab_size * d;
        let head = if self.tie_word_embeddings { 0 } else { emb };
        emb + head + self.num_layers * per_block + d
    }
}
