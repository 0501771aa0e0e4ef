//! The tiny ground-truth model's shape and its word-level tokenizer: a tied-embedding LLaMA small
//! enough to train from scratch on hierarchical equality (`tasks::equality`) in minutes, with one
//! token per symbol so every prompt `a b c d =` has fixed positions.
use crate::model::LlamaConfig;
use crate::tasks::equality;
use anyhow::{anyhow, bail, Result};
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::Tokenizer;

pub const UNK: &str = "<unk>";
pub const PAD: &str = "<pad>";

/// Shape of the tiny model (embeddings are always tied).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TinyArch {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub max_positions: usize,
    pub rope_theta: f32,
}

impl Default for TinyArch {
    fn default() -> Self {
        Self { layers: 3, hidden: 64, heads: 4, kv_heads: 2, ffn: 128, max_positions: 16, rope_theta: 10000.0 }
    }
}

/// The word-level vocabulary: specials, `=`, the answers, then the symbols.
pub fn vocab() -> Vec<String> {
    let mut v: Vec<String> = [PAD, UNK, equality::EQ, equality::TRUE, equality::FALSE].iter().map(|s| s.to_string()).collect();
    v.extend(equality::symbols());
    v
}

/// A `tokenizers` WordLevel model over [`vocab`] with a Whitespace pre-tokenizer.
pub fn build_tokenizer() -> Result<Tokenizer> {
    let map: ahash::AHashMap<String, u32> = vocab().into_iter().enumerate().map(|(i, w)| (w, i as u32)).collect();
    let wl = WordLevel::builder()
        .vocab(map)
        .unk_token(UNK.to_string())
        .build()
        .map_err(|e| anyhow!("building the WordLevel tokenizer: {e}"))?;
    let mut t = Tokenizer::new(wl);
    t.with_pre_tokenizer(Some(Whitespace {}));
    Ok(t)
}

pub fn llama_config(arch: &TinyArch) -> Result<LlamaConfig> {
    if arch.hidden % arch.heads != 0 {
        bail!("hidden size {} is not a multiple of {} heads", arch.hidden, arch.heads);
    }
    let cfg = LlamaConfig {
        vocab_size: vocab().len(),
        hidden_size: arch.hidden,
        intermediate_size: arch.ffn,
        num_layers: arch.layers,
        num_heads: arch.heads,
        num_kv_heads: arch.kv_heads,
        head_dim: arch.hidden / arch.heads,
        rms_norm_eps: 1e-5,
        rope_theta: arch.rope_theta,
        rope_scaling: None,
        max_position_embeddings: arch.max_positions,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_ids: vec![],
        arch: Default::default(),
    };
    cfg.validate()?;
    Ok(cfg)
}
