//! Per-family architecture knobs of the one LLaMA-style forward (TransformerLens-style: one
//! hooked forward, a handful of switches), read from a HF `config.json` or GGUF metadata.
//!
//! Adding a family = a `Family` variant, its knobs in [`Arch::from_hf`] / [`Arch::from_gguf`],
//! and its tensor names in `model/weights.rs`.
use super::json_keys::Keys;
use anyhow::{bail, Result};
use serde_json::Value;

/// The model families road-dii runs. Each is LLaMA plus some of the knobs in [`Arch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    #[default]
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma2,
}

impl Family {
    pub const ALL: [Family; 5] = [Family::Llama, Family::Mistral, Family::Qwen2, Family::Qwen3, Family::Gemma2];

    /// HF `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma2 => "gemma2",
        }
    }

    /// HF `architectures[0]`.
    pub fn hf_class(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Gemma2 => "Gemma2ForCausalLM",
        }
    }

    /// From HF `model_type`, or failing that the `architectures` class names.
    pub fn from_hf(model_type: &str, archs: &[&str]) -> Result<Family> {
        if let Some(f) = Family::ALL.iter().find(|f| f.model_type() == model_type) {
            return Ok(*f);
        }
        if let Some(f) = Family::ALL.iter().find(|f| archs.contains(&f.hf_class())) {
            return Ok(*f);
        }
        bail!(
            "unsupported architecture: model_type {model_type:?} {archs:?} (supported model_type: {})",
            Family::ALL.map(|f| f.model_type()).join(", ")
        )
    }
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Act {
    /// SwiGLU (`silu`).
    #[default]
    Silu,
    /// GeGLU with the tanh approximation of GELU (`gelu_pytorch_tanh`, Gemma).
    GeluTanh,
}

/// Where a family departs from LLaMA. `Arch::default()` is plain LLaMA.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct Arch {
    pub family: Family,
    /// Bias on the q/k/v projections (Qwen2; LLaMA's `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (LLaMA's `attention_bias` only).
    pub o_bias: bool,
    /// Per-head RMSNorm of queries and keys before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Sliding-window width: on a sliding layer a query sees keys less than this many positions
    /// back (transformers' `sliding_window`).
    pub sliding_window: Option<usize>,
    /// Per layer: whether it uses the sliding window.
    pub sliding_layers: Vec<bool>,
    /// RMSNorm scales by `1 + w` (Gemma). The loader folds the 1 into the stored weight, so the
    /// forward and the frozen tail's backward see an ordinary RMSNorm.
    pub norm_plus_one: bool,
    /// RMSNorm also after attention and after the MLP, before the residual add (Gemma 2).
    pub sandwich_norms: bool,
    /// Embeddings multiplied by √hidden (Gemma).
    pub embed_scale: bool,
    pub act: Act,
    /// Scores scaled by `query_pre_attn_scalar^-0.5` instead of `head_dim^-0.5` (Gemma 2).
    pub query_pre_attn_scalar: Option<f64>,
    /// `c · tanh(s / c)` on attention scores before the mask (Gemma 2).
    pub attn_softcap: Option<f64>,
    /// `c · tanh(z / c)` on the final logits (Gemma 2).
    pub final_softcap: Option<f64>,
}

impl Arch {
    /// Whether layer `l` attends through the sliding window.
    pub fn is_sliding(&self, l: usize) -> bool {
        self.sliding_window.is_some() && self.sliding_layers.get(l).copied().unwrap_or(false)
    }

    /// Knobs from a HF `config.json` of a known family.
    pub fn from_hf(family: Family, v: &Value, num_layers: usize) -> Result<Arch> {
        let k = Keys(v);
        let flag = |key: &str| -> Result<bool> { Ok(k.flag(key)?.unwrap_or(false)) };
        if flag("mlp_bias")? {
            bail!("config.json: mlp_bias = true is not supported");
        }
        let act_key = match k.text("hidden_activation")? {
            Some(a) => Some(a),
            None => k.text("hidden_act")?,
        };
        let act = match act_key {
            None if family == Family::Gemma2 => Act::GeluTanh,
            None | Some("silu") => Act::Silu,
            Some("gelu_pytorch_tanh") => Act::GeluTanh,
            Some(other) => bail!("config.json: activation {other:?} is not supported (silu, gelu_pytorch_tanh)"),
        };
        let window = k.uint("sliding_window")?;
        let (use_window, max_window_layers) = (flag("use_sliding_window")?, k.uint("max_window_layers")?.unwrap_or(0));
        // Which layers slide: `layer_types` when given (transformers 5), else the family's rule.
        let sliding_layers: Vec<bool> = match v.get("layer_types").and_then(Value::as_array) {
            Some(types) => {
                if types.len() != num_layers {
                    bail!("config.json: layer_types has {} entries for {num_layers} layers", types.len());
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        Some("sliding_attention") => Ok(true),
                        Some("full_attention") => Ok(false),
                        other => bail!("config.json: layer type {other:?} is not supported (sliding_attention, full_attention)"),
                    })
                    .collect::<Result<_>>()?
            }
            None => (0..num_layers)
                .map(|i| match family {
                    Family::Mistral => true,
                    // transformers: sliding from `max_window_layers` on, when enabled.
                    Family::Qwen2 | Family::Qwen3 => use_window && i >= max_window_layers,
                    Family::Gemma2 => i % 2 == 0,
                    Family::Llama => false,
                })
                .collect(),
        };
        if sliding_layers.iter().any(|&s| s) && window.is_none() {
            bail!("config.json: sliding-attention layers but no sliding_window");
        }
        if window == Some(0) {
            bail!("config.json: sliding_window must be positive");
        }
        let attn_bias = flag("attention_bias")?;
        let mut a = Arch { family, act, sliding_window: window, sliding_layers, ..Default::default() };
        match family {
            Family::Llama | Family::Mistral => {
                a.qkv_bias = attn_bias;
                a.o_bias = attn_bias;
            }
            Family::Qwen2 => a.qkv_bias = true,
            Family::Qwen3 => {
                a.qk_norm = true;
                a.qkv_bias = attn_bias;
                a.o_bias = attn_bias;
            }
            Family::Gemma2 => {
                a.qkv_bias = attn_bias;
                a.o_bias = attn_bias;
                a.norm_plus_one = true;
                a.sandwich_norms = true;
                a.embed_scale = true;
                a.query_pre_attn_scalar = Some(k.num("query_pre_attn_scalar")?.unwrap_or(256.0));
                a.attn_softcap = k.num("attn_logit_softcapping")?;
                a.final_softcap = k.num("final_logit_softcapping")?;
            }
        }
        if a.sliding_window.is_some() && !a.sliding_layers.iter().any(|&s| s) {
            // A window no layer uses (qwen2 with use_sliding_window = false) is no window.
            a.sliding_window = None;
        }
        Ok(a)
    }

    /// Knobs from GGUF metadata (`general.architecture`): the families llama.cpp writes whose
    /// layout road-dii maps (Mistral GGUFs say `llama`).
    pub fn from_gguf(arch: &str) -> Result<Arch> {
        let family = match arch {
            "llama" => Family::Llama,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            other => bail!("unsupported GGUF architecture {other:?} (supported: llama, qwen2, qwen3)"),
        };
        Ok(Arch {
            family,
            qkv_bias: family == Family::Qwen2,
            qk_norm: family == Family::Qwen3,
            ..Default::default()
        })
    }

    /// The family-specific keys of a HF `config.json` for these knobs (merged checkpoints).
    pub fn hf_json_fields(&self, out: &mut serde_json::Map<String, Value>) {
        use serde_json::json;
        out.insert("model_type".into(), json!(self.family.model_type()));
        out.insert("architectures".into(), json!([self.family.hf_class()]));
        out.insert(
            "hidden_act".into(),
            json!(match self.act {
                Act::Silu => "silu",
                Act::GeluTanh => "gelu_pytorch_tanh",
            }),
        );
        if self.family == Family::Gemma2 {
            out.insert("hidden_activation".into(), out["hidden_act"].clone());
        }
        out.insert("attention_bias".into(), json!(self.o_bias));
        if self.family == Family::Qwen2 {
            out.remove("attention_bias");
        }
        out.insert("sliding_window".into(), json!(self.sliding_window));
        if !self.sliding_layers.is_empty() && self.family != Family::Llama {
            let types: Vec<&str> =
                self.sliding_layers.iter().map(|&s| if s && self.sliding_window.is_some() { "sliding_attention" } else { "full_attention" }).collect();
            out.insert("layer_types".into(), json!(types));
            if matches!(self.family, Family::Qwen2 | Family::Qwen3) {
                out.insert("use_sliding_window".into(), json!(self.sliding_window.is_some()));
            }
        }
        if let Some(s) = self.query_pre_attn_scalar {
            out.insert("query_pre_attn_scalar".into(), json!(s));
        }
        out.insert("attn_logit_softcapping".into(), json!(self.attn_softcap));
        out.insert("final_logit_softcapping".into(), json!(self.final_softcap));
    }
}
