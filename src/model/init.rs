//! Parameter names, shapes and seeded initial values of a tied LLaMA, the one list every
//! from-scratch model (the tiny ground-truth model, random benchmark models, the pilot's fresh
//! heads) builds its weights from, so they all agree with the loader's HF names.
use super::config::LlamaConfig;
use crate::util::rng::Rng;
use anyhow::{anyhow, Result};
use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;

/// HF tensor names and shapes of a tied LLaMA, in a fixed order.
pub fn param_shapes(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let d = cfg.hidden_size;
    let (hq, hkv, f) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size);
    let mut v = vec![("model.embed_tokens.weight".to_string(), vec![cfg.vocab_size, d])];
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        v.push((format!("{p}.input_layernorm.weight"), vec![d]));
        v.push((format!("{p}.self_attn.q_proj.weight"), vec![hq, d]));
        v.push((format!("{p}.self_attn.k_proj.weight"), vec![hkv, d]));
        v.push((format!("{p}.self_attn.v_proj.weight"), vec![hkv, d]));
        v.push((format!("{p}.self_attn.o_proj.weight"), vec![d, hq]));
        v.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
        v.push((format!("{p}.mlp.gate_proj.weight"), vec![f, d]));
        v.push((format!("{p}.mlp.up_proj.weight"), vec![f, d]));
        v.push((format!("{p}.mlp.down_proj.weight"), vec![d, f]));
    }
    v.push(("model.norm.weight".to_string(), vec![d]));
    v
}

/// Fill a VarMap with seeded initial weights: norms 1; embeddings N(0, 1/d);
/// projections N(0, 1/fan_in), output projections (o, down) further scaled by 1/sqrt(2·layers).
pub fn init_varmap(cfg: &LlamaConfig, rng: &mut Rng, device: &Device) -> Result<VarMap> {
    let vm = VarMap::new();
    let out_scale = 1.0 / ((2 * cfg.num_layers) as f64).sqrt();
    {
        let mut data = vm.data().lock().map_err(|_| anyhow!("VarMap lock poisoned"))?;
        for (name, shape) in param_shapes(cfg) {
            let n: usize = shape.iter().product();
            let vals: Vec<f32> = if shape.len() == 1 {
                vec![1.0; n]
            } else {
                let std = if name.contains("embed_tokens") {
                    1.0 / (cfg.hidden_size as f64).sqrt()
                } else {
                    let s = 1.0 / (shape[1] as f64).sqrt();
                    if name.contains("o_proj") || name.contains("down_proj") {
                        s * out_scale
                    } else {
                        s
                    }
                };
                (0..n).map(|_| (rng.normal() * std) as f32).collect()
            };
            let t = Tensor::from_vec(vals, shape, device)?;
            data.insert(name, Var::from_tensor(&t)?);
        }
    }
    Ok(vm)
}
