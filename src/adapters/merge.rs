//! Merging adapters into the base weights (zero inference overhead) and undoing it, and writing
//! the result as a Hugging Face checkpoint.
use super::AnyAdapter;
use crate::model::Llama;
use crate::tokenizer::Tok;
use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use std::path::Path;

/// Fold an adapter into the base weights: `W ← R W`, `b ← R b` (RoAd), `W ← W + (α/r) B A`
/// (LoRA), `W ← m/‖W+sBA‖ ⊙ (W + sBA)` (DoRA), `W ← W Rᵀ` (OFT), `W ← s ⊙ W Mᵀ` (BOFT).
pub fn merge(model: &mut Llama, ad: &AnyAdapter) -> Result<()> {
    transform(model, ad, false)
}

/// The inverse of [`merge`]: `W ← R⁻¹ W` (R is not orthogonal once α ≠ 1), `W ← W − (α/r) B A`,
/// DoRA with the norms its merge used (so only after merging this adapter), OFT with the
/// inverse blocks (the Neumann series is only nearly orthogonal), BOFT with `Mᵀ` and `1/s`.
pub fn unmerge(model: &mut Llama, ad: &AnyAdapter) -> Result<()> {
    transform(model, ad, true)
}

fn transform(model: &mut Llama, ad: &AnyAdapter, inverse: bool) -> Result<()> {
    for (l, p) in ad.keys() {
        let w = model.proj_weight(l, p).clone();
        let dt = w.dtype();
        // Merge in f32 so bf16 checkpoints lose precision only once, at the final cast.
        let w32 = w.to_dtype(DType::F32)?;
        let new = match ad {
            AnyAdapter::Road(a) => {
                let layer = &a.layers[&(l, p)];
                let (f, s) = layer.columns()?;
                // R acts on the output dim; W's columns are output vectors, so rotate Wᵀ's rows.
                let wt = w32.t()?.contiguous()?;
                let r = if inverse { layer.rot.apply_inverse(&wt, &f, &s)? } else { layer.rot.apply(&wt, &f, &s)? };
                r.t()?.contiguous()?
            }
            AnyAdapter::Lora(a) => {
                let d = a.delta(l, p)?.context("LoRA layer vanished")?;
                if inverse { (w32 - d)? } else { (w32 + d)? }
            }
            AnyAdapter::Dora(a) => if inverse { a.unmerged(l, p, &w32)? } else { a.merged(l, p, &w32)? },
            AnyAdapter::Oft(a) => a.merged(l, p, &w32, inverse)?,
            AnyAdapter::Boft(a) => a.merged(l, p, &w32, inverse)?,
        };
        model.set_proj_weight(l, p, new.detach().to_dtype(dt)?)?;
        // R acts on the projection's whole output, bias included (Qwen2's q/k/v): b ← R b. The
        // other kinds leave the bias alone, as their forward does.
        if let (AnyAdapter::Road(a), Some(b)) = (ad, model.proj_bias(l, p).cloned()) {
            let layer = &a.layers[&(l, p)];
            let (f, s) = layer.columns()?;
            let row = b.to_dtype(DType::F32)?.unsqueeze(0)?;
            let r = if inverse { layer.rot.apply_inverse(&row, &f, &s)? } else { layer.rot.apply(&row, &f, &s)? };
            model.set_proj_bias(l, p, r.squeeze(0)?.to_dtype(b.dtype())?)?;
        }
    }
    Ok(())
}

/// Write `config.json`, `model.safetensors` and `tokenizer.json` (HF layout, loadable by
/// transformers and by `road --model DIR`).
pub fn save_hf(model: &Llama, tok: &Tok, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dtype = match model.dtype() {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    };
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&model.cfg.to_hf_json(dtype))?)?;
    let mut map = std::collections::HashMap::<String, Tensor>::new();
    for (n, t) in model.named_weights()? {
        map.insert(n, t.contiguous()?);
    }
    candle_core::safetensors::save(&map, dir.join("model.safetensors"))?;
    tok.save(&dir.join("tokenizer.json"))?;
    Ok(())
}
