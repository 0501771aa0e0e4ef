//! `road info` and `road logits`.
use super::ModelArgs;
use crate::generate::top_k;
use crate::model::{Fwd, LinearAdapter, LogitsAt, Site};
use crate::adapters::AnyAdapter;
use crate::train::reft::LoreftSet;
use std::path::Path;
use anyhow::Result;
use candle_core::DType;

pub fn info(m: &ModelArgs, json: bool) -> Result<()> {
    let l = m.load()?;
    let c = &l.model.cfg;
    let sites: Vec<&str> = Site::ALL.iter().map(|s| s.name()).collect();
    if json {
        let v = serde_json::json!({
            "source": l.source, "format": l.format, "config": c, "parameters": c.param_count(),
            "sites": sites, "layers": c.num_layers, "tokenizer_vocab": l.tok.vocab_size(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("model      {} ({})", l.source.display(), l.format);
    println!(
        "arch       {}: {} blocks, d={}, ffn={}, vocab={}{}",
        c.arch.family.model_type(),
        c.num_layers,
        c.hidden_size,
        c.intermediate_size,
        c.vocab_size,
        knobs(&c.arch)
    );
    println!(
        "attention  {} heads x {} (GQA: {} kv heads, {} q heads per kv head)",
        c.num_heads, c.head_dim, c.num_kv_heads, c.kv_groups()
    );
    let scaling = c.rope_scaling.as_ref().map(|s| format!(", llama3 scaling x{}", s.factor)).unwrap_or_default();
    println!("rope       theta={}{scaling}; rms_norm eps={:e}", c.rope_theta, c.rms_norm_eps as f32);
    println!("context    {} tokens; tied embeddings: {}", c.max_position_embeddings, c.tie_word_embeddings);
    println!("parameters {} ({:.1} M)", c.param_count(), c.param_count() as f64 / 1e6);
    println!("dtype      {:?} on {:?}", l.model.dtype(), l.model.device());
    println!("sites      layers 0..{} x {{{}}}", c.num_layers - 1, sites.join(", "));
    println!("tokenizer  {} tokens; bos {:?}, eos {:?}", l.tok.vocab_size(), l.tok.bos, l.tok.eos);
    Ok(())
}

/// The non-LLaMA knobs of a family, for `road info`.
fn knobs(a: &crate::model::config::Arch) -> String {
    let mut k = Vec::new();
    if a.qkv_bias {
        k.push("q/k/v bias".to_string());
    }
    if a.qk_norm {
        k.push("q/k norm".into());
    }
    if let Some(w) = a.sliding_window {
        let n = a.sliding_layers.iter().filter(|&&s| s).count();
        k.push(format!("sliding window {w} on {n}/{} layers", a.sliding_layers.len()));
    }
    if a.sandwich_norms {
        k.push("sandwich norms".into());
    }
    if a.act == crate::model::config::Act::GeluTanh {
        k.push("GeGLU".into());
    }
    if let Some(c) = a.attn_softcap {
        k.push(format!("attention soft-cap {c}"));
    }
    if let Some(c) = a.final_softcap {
        k.push(format!("logit soft-cap {c}"));
    }
    if k.is_empty() { String::new() } else { format!(" ({})", k.join(", ")) }
}

pub fn logits(m: &ModelArgs, adapter: Option<&Path>, prompt: &str, top: usize, json: bool) -> Result<()> {
    let l = m.load()?;
    // A LoReFT directory (reft_config.json) runs as hooks at its prompt positions; else a peft adapter.
    let reft = adapter.filter(|d| LoreftSet::is_reft_dir(d)).map(|d| LoreftSet::load(d, &l.model.cfg, l.model.device())).transpose()?;
    let ad = adapter.filter(|_| reft.is_none()).map(|d| AnyAdapter::load(d, &l.model.cfg, l.model.device())).transpose()?;
    let ids = l.tok.encode(prompt)?;
    let mut hook = reft.as_ref().map(|s| s.hook(vec![ids.len()]));
    let out = l.model.forward(
        &[ids.clone()],
        Fwd {
            logits: LogitsAt::Last,
            adapter: ad.as_ref().map(|a| a as &dyn LinearAdapter),
            hooks: hook.as_mut().map(|h| h as &mut dyn crate::model::Hooks),
            ..Default::default()
        },
    )?;
    let v = out.logits.expect("requested logits").get(0)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let maxv = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let z: f64 = v.iter().map(|x| ((x - maxv) as f64).exp()).sum();
    let best = top_k(&v, top);
    if json {
        let rows: Vec<_> = best
            .iter()
            .map(|&(id, lg)| {
                serde_json::json!({"id": id, "token": l.tok.token_str(id), "logit": lg,
                    "prob": (((lg - maxv) as f64).exp() / z)})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"prompt": prompt, "ids": ids, "top": rows}))?);
        return Ok(());
    }
    println!("prompt ids {:?}", ids);
    println!("{:>4} {:>7} {:>10} {:>8}  token", "rank", "id", "logit", "prob");
    for (r, &(id, lg)) in best.iter().enumerate() {
        let p = ((lg - maxv) as f64).exp() / z;
        println!("{:>4} {:>7} {:>10.4} {:>8.4}  {:?}", r + 1, id, lg, p, l.tok.token_str(id));
    }
    Ok(())
}
