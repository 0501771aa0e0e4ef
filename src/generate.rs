//! Greedy decoding with the KV cache.
use crate::model::{Fwd, KvCache, Llama, LogitsAt};
use anyhow::Result;

pub struct Generated {
    pub tokens: Vec<u32>,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

/// Greedy continuation of `prompt` for up to `max_tokens`, stopping at an EOS id.
pub fn greedy(model: &Llama, prompt: &[u32], max_tokens: usize, eos: &[u32]) -> Result<Generated> {
    let mut cache = KvCache::new(model.cfg.num_layers);
    let t0 = std::time::Instant::now();
    let out = model.forward(
        &[prompt.to_vec()],
        Fwd { cache: Some(&mut cache), logits: LogitsAt::Last, ..Default::default() },
    )?;
    let mut next = argmax(&out.logits.expect("requested logits").get(0)?.to_vec1::<f32>()?);
    let prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let mut tokens = Vec::with_capacity(max_tokens);
    while tokens.len() < max_tokens {
        tokens.push(next);
        if eos.contains(&next) || tokens.len() == max_tokens {
            break;
        }
        if cache.seq_len() + 1 > model.cfg.max_position_embeddings {
            break;
        }
        let out = model.forward(
            &[vec![next]],
            Fwd { cache: Some(&mut cache), logits: LogitsAt::Last, ..Default::default() },
        )?;
        next = argmax(&out.logits.expect("requested logits").get(0)?.to_vec1::<f32>()?);
    }
    Ok(Generated { tokens, prefill_secs, decode_secs: t1.elapsed().as_secs_f64() })
}

/// Index of the largest value (first one on ties, like torch.argmax).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Indices of the k largest values, descending.
pub fn top_k(v: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..v.len() as u32).collect();
    let k = k.min(v.len());
    idx.select_nth_unstable_by(k.saturating_sub(1).min(v.len() - 1), |&a, &b| v[b as usize].total_cmp(&v[a as usize]));
    let mut top: Vec<(u32, f32)> = idx[..k].iter().map(|&i| (i, v[i as usize])).collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    top
}
