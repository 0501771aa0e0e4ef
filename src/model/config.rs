//! LLaMA-family hyper-parameters, read from a HF `config.json` or from GGUF metadata; the
//! per-family knobs live in [`Arch`].
pub use super::arch::{Act, Arch, Family};
use super::json_keys::Keys;
use anyhow::{bail, Context, Result};
use serde_json::Value;

/// More blocks than any released model has; a larger count is a corrupt or hostile file.
pub const MAX_LAYERS: usize = 4096;

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
    /// instead of as a shape error (or NaN logits, or an allocation abort) inside the forward.
    /// Sizes are bounded well above any released model, so nothing is reserved from a bad number.
    pub fn validate(&self) -> Result<()> {
        let sizes = [
            ("vocab_size", self.vocab_size, 1 << 23),
            ("hidden_size", self.hidden_size, 1 << 17),
            ("intermediate_size", self.intermediate_size, 1 << 20),
            ("num_hidden_layers", self.num_layers, MAX_LAYERS),
            ("num_attention_heads", self.num_heads, 4096),
            ("num_key_value_heads", self.num_kv_heads, 4096),
            ("head_dim", self.head_dim, 4096),
            ("max_position_embeddings", self.max_position_embeddings, 1 << 24),
        ];
        for (k, v, max) in sizes {
            if v == 0 || v > max {
                bail!("model config: {k} = {v} must be in 1..={max}");
            }
        }
        if self.num_heads % self.num_kv_heads != 0 {
            bail!(
                "model config: num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_heads,
                self.num_kv_heads
            );
        }
        if self.head_dim % 2 != 0 {
            bail!("model config: head_dim {} must be even for RoPE", self.head_dim);
        }
        let positive = |k: &str, x: f64| -> Result<()> {
            if !x.is_finite() || x <= 0.0 {
                bail!("model config: {k} = {x} must be a finite number > 0");
            }
            Ok(())
        };
        positive("rms_norm_eps", self.rms_norm_eps)?;
        positive("rope_theta", self.rope_theta as f64)?;
        if let Some(s) = &self.rope_scaling {
            positive("rope_scaling.factor", s.factor as f64)?;
            positive("rope_scaling.low_freq_factor", s.low_freq_factor as f64)?;
            positive("rope_scaling.high_freq_factor", s.high_freq_factor as f64)?;
            positive("rope_scaling.original_max_position_embeddings", s.original_max_position_embeddings as f64)?;
            if s.high_freq_factor <= s.low_freq_factor {
                bail!("model config: rope_scaling.high_freq_factor ({}) must exceed low_freq_factor ({})", s.high_freq_factor, s.low_freq_factor);
            }
        }
        let a = &self.arch;
        for (k, x) in [("query_pre_attn_scalar", a.query_pre_attn_scalar), ("attn_logit_softcapping", a.attn_softcap), ("final_logit_softcapping", a.final_softcap)] {
            if let Some(x) = x {
                positive(k, x)?;
            }
        }
        if !a.sliding_layers.is_empty() && a.sliding_layers.len() != self.num_layers {
            bail!("model config: {} layer types for {} layers", a.sliding_layers.len(), self.num_layers);
        }
        Ok(())
    }

    /// Parse a Hugging Face `config.json` (transformers 4.x `rope_theta`/`rope_scaling` keys or
    /// transformers 5.x `rope_parameters`).
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).context("config.json is not valid JSON")?;
        let k = Keys(&v);
        let model_type = k.text("model_type")?.unwrap_or("");
        let archs: Vec<&str> = v
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let family = Family::from_hf(model_type, &archs)?;
        let hidden_size = k.req_uint("hidden_size")?;
        let num_heads = k.req_uint("num_attention_heads")?;
        let num_kv_heads = k.uint("num_key_value_heads")?.unwrap_or(num_heads);
        // 0 heads: left to `validate`, which names the key (no division by zero here).
        let head_dim = k.uint("head_dim")?.unwrap_or(hidden_size.checked_div(num_heads).unwrap_or(0));
        // transformers 5 moved rope settings into `rope_parameters`; older files use top-level keys.
        let rope = v.get("rope_parameters").filter(|r| r.is_object());
        let rope_theta = match rope.map(|r| Keys(r).num("rope_theta")).transpose()?.flatten() {
            Some(t) => t,
            None => k.num("rope_theta")?.unwrap_or(10000.0),
        } as f32;
        let scaling_obj = rope.or_else(|| v.get("rope_scaling").filter(|r| r.is_object()));
        let rope_scaling = match scaling_obj {
            None => None,
            Some(s) => {
                let sk = Keys(s);
                let ty = match sk.text("rope_type")? {
                    Some(t) => t,
                    None => sk.text("type")?.unwrap_or("default"),
                };
                match ty {
                    "default" => None,
                    "llama3" => {
                        let f = |key: &str| -> Result<f64> {
                            sk.num(key)?.with_context(|| format!("config.json: llama3 rope scaling needs `{key}`"))
                        };
                        Some(Llama3Scaling {
                            factor: f("factor")? as f32,
                            low_freq_factor: f("low_freq_factor")? as f32,
                            high_freq_factor: f("high_freq_factor")? as f32,
                            original_max_position_embeddings: sk
                                .uint("original_max_position_embeddings")?
                                .context("config.json: llama3 rope scaling needs `original_max_position_embeddings`")?,
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
        let num_layers = k.req_uint("num_hidden_layers")?;
        // Bounded before `Arch::from_hf` sizes its per-layer table by it.
        if num_layers > MAX_LAYERS {
            bail!("model config: num_hidden_layers = {num_layers} must be in 1..={MAX_LAYERS}");
        }
        let arch = Arch::from_hf(family, &v, num_layers)?;
        let cfg = Self {
            vocab_size: k.req_uint("vocab_size")?,
            hidden_size,
            intermediate_size: k.req_uint("intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: k.num("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: k.uint("max_position_embeddings")?.unwrap_or(2048),
            // Gemma ties by default; the others (transformers' configs) do not.
            tie_word_embeddings: k.flag("tie_word_embeddings")?.unwrap_or(family == Family::Gemma2),
            bos_token_id: k.uint("bos_token_id")?.map(|x| x as u32),
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
    /// Weights of one block's seven projections (q, k, v, o, gate, up, down).
    fn block_matmul_params(&self) -> usize {
        let d = self.hidden_size;
        let (q, kv) = (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim);
        d * q + 2 * d * kv + q * d + 3 * d * self.intermediate_size
    }

    pub fn param_count(&self) -> usize {
        let d = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let a = &self.arch;
        let bias = if a.qkv_bias { q + 2 * kv } else { 0 } + if a.o_bias { d } else { 0 };
        let norms = if a.sandwich_norms { 4 * d } else { 2 * d } + if a.qk_norm { 2 * self.head_dim } else { 0 };
        let per_block = self.block_matmul_params() + bias + norms;
        let emb = self.vocab_size * d;
        let head = if self.tie_word_embeddings { 0 } else { emb };
        emb + head + self.num_layers * per_block + d
    }

    /// Model FLOPs of one prefill of `b` rows × `t` tokens with all-position logits: 2 per
    /// multiply-add of every projection and the LM head, plus attention's two matmuls over the
    /// (query, key) pairs it scores (causal; sliding layers only within their window). The
    /// numerator of "model FLOP utilisation".
    pub fn prefill_flops(&self, b: usize, t: usize) -> f64 {
        let linear = 2.0 * (self.num_layers * self.block_matmul_params() + self.vocab_size * self.hidden_size) as f64 * (b * t) as f64;
        let pairs = |window: Option<usize>| -> f64 { (0..t).map(|i| window.map_or(i + 1, |w| (i + 1).min(w)) as f64).sum() };
        let attn: f64 = (0..self.num_layers)
            .map(|l| {
                let w = if self.arch.is_sliding(l) { self.arch.sliding_window } else { None };
                4.0 * (self.num_heads * self.head_dim) as f64 * pairs(w)
            })
            .sum();
        linear + attn * b as f64
    }
}
