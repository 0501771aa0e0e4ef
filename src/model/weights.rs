//! The one owner of tensor names: Hugging Face checkpoint names, llama.cpp GGUF names and peft
//! module paths. Every loader, saver and adapter asks here, so a new family's naming is one table.
use super::arch::Family;
use super::sites::Proj;

pub const EMBED: &str = "model.embed_tokens.weight";
pub const FINAL_NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";

/// The RMSNorms of a block, by role (HF names differ by family: LLaMA's
/// `post_attention_layernorm` is the pre-MLP norm, Gemma 2's is the norm after attention).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norm {
    /// Before attention (every family).
    PreAttn,
    /// On the attention output, before the residual add (Gemma 2).
    PostAttn,
    /// Before the MLP (every family).
    PreMlp,
    /// On the MLP output, before the residual add (Gemma 2).
    PostMlp,
    /// Per-head, on queries / keys before RoPE (Qwen3).
    Q,
    K,
}

/// `model.layers.{l}`.
pub fn layer_prefix(l: usize) -> String {
    format!("model.layers.{l}")
}

/// The HF name of a block norm's weight.
pub fn norm(family: Family, l: usize, n: Norm) -> String {
    let leaf = match (family, n) {
        (_, Norm::PreAttn) => "input_layernorm",
        (Family::Gemma2, Norm::PostAttn) => "post_attention_layernorm",
        (Family::Gemma2, Norm::PreMlp) => "pre_feedforward_layernorm",
        (_, Norm::PreMlp) => "post_attention_layernorm",
        // Only Gemma 2 has sandwich norms today; a new such family adds its own arm above.
        (_, Norm::PostAttn) => "post_attention_norm",
        (_, Norm::PostMlp) => "post_feedforward_layernorm",
        (_, Norm::Q) => "self_attn.q_norm",
        (_, Norm::K) => "self_attn.k_norm",
    };
    format!("{}.{leaf}.weight", layer_prefix(l))
}

/// The module name of a projection used by HF and peft (`q_proj`, ..., `down_proj`).
pub fn proj_leaf(p: Proj) -> &'static str {
    match p {
        Proj::Q => "q_proj",
        Proj::K => "k_proj",
        Proj::V => "v_proj",
        Proj::O => "o_proj",
        Proj::Gate => "gate_proj",
        Proj::Up => "up_proj",
        Proj::Down => "down_proj",
    }
}

/// The HF module path of a projection inside a layer (`self_attn.q_proj`, `mlp.down_proj`).
pub fn proj_path(p: Proj) -> &'static str {
    match p {
        Proj::Q => "self_attn.q_proj",
        Proj::K => "self_attn.k_proj",
        Proj::V => "self_attn.v_proj",
        Proj::O => "self_attn.o_proj",
        Proj::Gate => "mlp.gate_proj",
        Proj::Up => "mlp.up_proj",
        Proj::Down => "mlp.down_proj",
    }
}

/// `model.layers.{l}.self_attn.q_proj` (append `.weight` / `.bias`).
pub fn proj_module(l: usize, p: Proj) -> String {
    format!("{}.{}", layer_prefix(l), proj_path(p))
}

pub fn proj_weight(l: usize, p: Proj) -> String {
    format!("{}.weight", proj_module(l, p))
}

pub fn proj_bias(l: usize, p: Proj) -> String {
    format!("{}.bias", proj_module(l, p))
}

/// peft's module path of an adapted projection (append `.lora_A.weight`, `.road_theta`, ...).
pub fn peft_module(l: usize, p: Proj) -> String {
    format!("base_model.model.{}", proj_module(l, p))
}

/// The HF name of a llama.cpp GGUF tensor, for the families whose GGUF layout road-dii reads
/// (`None` for tensors the model does not use, e.g. `rope_freqs`).
pub fn hf_from_gguf(family: Family, gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some(EMBED.into()),
        "output_norm.weight" => return Some(FINAL_NORM.into()),
        "output.weight" => return Some(LM_HEAD.into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, name) = rest.split_once('.')?;
    let l: usize = layer.parse().ok()?;
    let (stem, kind) = name.rsplit_once('.')?;
    let proj = |p: Proj| match kind {
        "weight" => Some(proj_weight(l, p)),
        "bias" => Some(proj_bias(l, p)),
        _ => None,
    };
    let norm_w = |n: Norm| (kind == "weight").then(|| norm(family, l, n));
    match stem {
        "attn_q" => proj(Proj::Q),
        "attn_k" => proj(Proj::K),
        "attn_v" => proj(Proj::V),
        "attn_output" => proj(Proj::O),
        "ffn_gate" => proj(Proj::Gate),
        "ffn_up" => proj(Proj::Up),
        "ffn_down" => proj(Proj::Down),
        "attn_norm" => norm_w(Norm::PreAttn),
        "ffn_norm" => norm_w(Norm::PreMlp),
        "attn_q_norm" => norm_w(Norm::Q),
        "attn_k_norm" => norm_w(Norm::K),
        _ => None,
    }
}

/// Whether llama.cpp stored this family's Q/K rows permuted for interleaved RoPE (its converter
/// does it for `llama` only; qwen2/qwen3 use the rotate-half "neox" layout as transformers).
pub fn gguf_qk_permuted(family: Family) -> bool {
    family == Family::Llama
}

/// If `gguf` is a Q or K projection weight: the heads to un-permute it with (`q` or `k` heads).
pub fn gguf_qk_kind(gguf: &str) -> Option<Proj> {
    if gguf.ends_with("attn_q.weight") {
        Some(Proj::Q)
    } else if gguf.ends_with("attn_k.weight") {
        Some(Proj::K)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_map_to_hf_per_family() {
        let f = Family::Qwen2;
        assert_eq!(hf_from_gguf(f, "blk.3.attn_q.bias").as_deref(), Some("model.layers.3.self_attn.q_proj.bias"));
        assert_eq!(hf_from_gguf(f, "blk.0.ffn_norm.weight").as_deref(), Some("model.layers.0.post_attention_layernorm.weight"));
        assert_eq!(hf_from_gguf(Family::Qwen3, "blk.1.attn_k_norm.weight").as_deref(), Some("model.layers.1.self_attn.k_norm.weight"));
        assert_eq!(hf_from_gguf(f, "output.weight").as_deref(), Some(LM_HEAD));
        assert_eq!(hf_from_gguf(f, "rope_freqs.weight"), None);
        assert_eq!(norm(Family::Gemma2, 2, Norm::PreMlp), "model.layers.2.pre_feedforward_layernorm.weight");
        assert_eq!(norm(Family::Gemma2, 2, Norm::PostAttn), "model.layers.2.post_attention_layernorm.weight");
        assert_eq!(peft_module(4, Proj::Down), "base_model.model.model.layers.4.mlp.down_proj");
    }
}
