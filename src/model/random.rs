//! Randomly initialised LLaMAs in well-known shapes, for throughput benchmarks where no weights
//! of that size are at hand (throughput does not depend on weight values).
use super::config::LlamaConfig;
use super::llama::Llama;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::collections::HashMap;

/// `7b` (LLaMA-2-7B: 32 blocks, d=4096, MHA 32 heads, FFN 11008, vocab 32000, untied),
/// `1b` (Llama-3.2-1B: 16 blocks, d=2048, GQA 32/8, FFN 8192, vocab 128256, tied),
/// `smollm2` (SmolLM2-135M), `tiny` (for tests).
pub fn preset(name: &str) -> Result<LlamaConfig> {
    let c = |vocab, d, ffn, layers, heads, kv, hd, theta, tie| LlamaConfig {
        vocab_size: vocab,
        hidden_size: d,
        intermediate_size: ffn,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim: hd,
        rms_norm_eps: 1e-5,
        rope_theta: theta,
        rope_scaling: None,
        max_position_embeddings: 4096,
        tie_word_embeddings: tie,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        arch: Default::default(),
    };
    Ok(match name {
        "7b" => c(32000, 4096, 11008, 32, 32, 32, 128, 10000.0, false),
        "1b" => c(128256, 2048, 8192, 16, 32, 8, 64, 500000.0, true),
        "smollm2" => c(49152, 576, 1536, 30, 9, 3, 64, 100000.0, true),
        "tiny" => c(256, 64, 128, 2, 4, 2, 16, 10000.0, false),
        _ => bail!("unknown random config {name:?} (expected 7b, 1b, smollm2 or tiny)"),
    })
}

/// A model of shape `cfg` with N(0, 0.02²) projections/embeddings and unit norms, generated on
/// `device` (on a GPU, curand: no multi-GB upload) in f32 and cast to `dtype`.
pub fn random_llama(cfg: &LlamaConfig, dtype: DType, device: &Device) -> Result<Llama> {
    let mut tensors = HashMap::new();
    for (name, shape) in super::init::param_shapes(cfg) {
        let t = if shape.len() == 1 {
            Tensor::ones(shape, dtype, device)?
        } else {
            Tensor::randn(0f32, 0.02, shape, device)?.to_dtype(dtype)?
        };
        tensors.insert(name, t);
    }
    if !cfg.tie_word_embeddings {
        let t = Tensor::randn(0f32, 0.02, (cfg.vocab_size, cfg.hidden_size), device)?.to_dtype(dtype)?;
        tensors.insert(super::weights::LM_HEAD.to_string(), t);
    }
    Llama::load(VarBuilder::from_tensors(tensors, dtype, device), cfg.clone())
}

/// The random-model control's model (METHODS.md §7): `model`'s architecture with every weight
/// matrix redrawn from N(0, σ²), σ the matrix's own standard deviation (so activations keep
/// their scale and the forward stays finite in every family), from `seed`; vectors (norm gains,
/// biases) are kept. Whatever a trained intervention finds there, it did not find in the
/// model's learned weights.
pub fn reinitialised(model: &Llama, seed: u64) -> Result<Llama> {
    let mut rng = crate::util::rng::Rng::new(seed);
    let (dtype, device) = (model.dtype(), model.device().clone());
    let mut tensors = HashMap::new();
    for (i, (name, w)) in model.named_weights()?.into_iter().enumerate() {
        let t = if w.rank() >= 2 {
            let w32 = w.to_dtype(DType::F32)?;
            let mean = w32.mean_all()?.to_scalar::<f32>()?;
            let mean_sq = w32.sqr()?.mean_all()?.to_scalar::<f32>()?;
            let std = (mean_sq - mean * mean).max(0.0).sqrt();
            rng.fork(i as u64).normal_tensor(w.dims(), std, &device)?.to_dtype(dtype)?
        } else {
            w
        };
        tensors.insert(name, t);
    }
    Llama::load(VarBuilder::from_tensors(tensors, dtype, &device), model.cfg.clone())
}
