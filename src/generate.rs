//! Greedy decoding with the KV cache.
use crate::model::{Fwd, Hooks, KvCache, LinearAdapter, Llama, LogitsAt};
use anyhow::Result;

pub struct Generated {
    pub tokens: Vec<u32>,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

/// Most tokens greedy decoding can produce after a `prompt_len`-token prompt within a context of
/// `ctx` positions: the prompt fills `prompt_len`, every generated token but the last is fed back.
pub fn room_after(ctx: usize, prompt_len: usize) -> usize {
    (ctx + 1).saturating_sub(prompt_len.max(1))
}

/// `max_tokens` checked against the model's context before anything is allocated for it
/// (`--max-tokens 18446744073709551615` must be this error, not a capacity overflow).
/// `what` names the flag or request in the error.
pub fn check_max_tokens(model: &Llama, prompt_len: usize, max_tokens: usize, what: &str) -> Result<()> {
    let ctx = model.cfg.max_position_embeddings;
    if prompt_len > ctx {
        anyhow::bail!("{what}: the prompt has {prompt_len} tokens, more than the model's context of {ctx}");
    }
    let room = room_after(ctx, prompt_len);
    if max_tokens > room {
        anyhow::bail!("{what} = {max_tokens} is more than the model's context ({ctx} tokens) leaves after the {prompt_len}-token prompt: at most {room}");
    }
    Ok(())
}

/// Greedy continuation of `prompt` for up to `max_tokens`, stopping at an EOS id.
pub fn greedy(model: &Llama, prompt: &[u32], max_tokens: usize, eos: &[u32]) -> Result<Generated> {
    greedy_with(model, None, prompt, max_tokens, eos)
}

/// [`greedy`] with an optional weight adapter (RoAd/LoRA) applied at every step.
pub fn greedy_with(
    model: &Llama,
    adapter: Option<&dyn LinearAdapter>,
    prompt: &[u32],
    max_tokens: usize,
    eos: &[u32],
) -> Result<Generated> {
    greedy_hooked(model, adapter, None, prompt, max_tokens, eos)
}

/// [`greedy_with`] with hooks on every forward pass too (LoReFT interventions: they see each
/// call's position offset, so they act on the prompt's positions and leave generated ones alone).
pub fn greedy_hooked(
    model: &Llama,
    adapter: Option<&dyn LinearAdapter>,
    mut hooks: Option<&mut dyn Hooks>,
    prompt: &[u32],
    max_tokens: usize,
    eos: &[u32],
) -> Result<Generated> {
    let mut cache = KvCache::new(model.cfg.num_layers);
    let t0 = std::time::Instant::now();
    let out = model.forward(
        &[prompt.to_vec()],
        Fwd { cache: Some(&mut cache), adapter, hooks: hooks.as_deref_mut().map(|h| h as &mut dyn Hooks), logits: LogitsAt::Last, ..Default::default() },
    )?;
    let mut next = argmax_rows(&out.logits.expect("requested logits"))?[0];
    let prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    // Generation stops at the context anyway; never reserve more than it can hold.
    let mut tokens = Vec::with_capacity(max_tokens.min(room_after(model.cfg.max_position_embeddings, prompt.len())));
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
            Fwd { cache: Some(&mut cache), adapter, hooks: hooks.as_deref_mut().map(|h| h as &mut dyn Hooks), logits: LogitsAt::Last, ..Default::default() },
        )?;
        next = argmax_rows(&out.logits.expect("requested logits"))?[0];
    }
    Ok(Generated { tokens, prefill_secs, decode_secs: t1.elapsed().as_secs_f64() })
}

/// Per-row argmax of `[b, vocab]` logits, any dtype. On the CPU the logits are read directly
/// (first index on ties, like torch.argmax); on a GPU the argmax runs there and only `b` ids
/// cross to the host instead of `b × vocab` logits each step.
pub fn argmax_rows(logits: &candle_core::Tensor) -> Result<Vec<u32>> {
    if logits.device().is_cpu() {
        let lg = logits.to_dtype(candle_core::DType::F32)?;
        return (0..lg.dim(0)?).map(|i| Ok(argmax(&lg.get(i)?.to_vec1::<f32>()?))).collect();
    }
    Ok(logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?)
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

pub struct BatchGenerated {
    /// Generated ids per row (each stops at its own EOS or `max_tokens`).
    pub tokens: Vec<Vec<u32>>,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    /// Decode forward passes run (the longest row's length minus one).
    pub decode_steps: usize,
}

/// Greedy generation for several prompts in one batch: left padding + attention mask, one shared
/// KV cache. `adapter` may be a per-row `MixedAdapters`. Rows that finished keep riding along
/// (their outputs are ignored) until every row is done.
pub fn greedy_batch(
    model: &Llama,
    adapter: Option<&dyn LinearAdapter>,
    prompts: &[Vec<u32>],
    max_tokens: &[usize],
    eos: &[u32],
) -> Result<BatchGenerated> {
    greedy_batch_hooked(model, adapter, None, prompts, max_tokens, eos)
}

/// [`greedy_batch`] with hooks on every forward pass (per-row LoReFT interventions in a mixed
/// batch; the prompts are left-padded to the longest, as the hooks expect).
pub fn greedy_batch_hooked(
    model: &Llama,
    adapter: Option<&dyn LinearAdapter>,
    mut hooks: Option<&mut dyn Hooks>,
    prompts: &[Vec<u32>],
    max_tokens: &[usize],
    eos: &[u32],
) -> Result<BatchGenerated> {
    let b = prompts.len();
    if b == 0 || max_tokens.len() != b {
        anyhow::bail!("greedy_batch: need one max_tokens per prompt and at least one prompt");
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        anyhow::bail!("prompt {i} is empty");
    }
    let t = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(b);
    let mut mask: Vec<Vec<u8>> = Vec::with_capacity(b);
    for p in prompts {
        let pad = t - p.len();
        ids.push(std::iter::repeat_n(0u32, pad).chain(p.iter().copied()).collect::<Vec<_>>());
        mask.push(std::iter::repeat_n(0u8, pad).chain(std::iter::repeat_n(1u8, p.len())).collect());
    }
    let mut cache = KvCache::new(model.cfg.num_layers);
    let t0 = std::time::Instant::now();
    let out = model.forward(
        &ids,
        Fwd { attention_mask: Some(&mask), cache: Some(&mut cache), adapter, hooks: hooks.as_deref_mut().map(|h| h as &mut dyn Hooks), logits: LogitsAt::Last, ..Default::default() },
    )?;
    let lg = out.logits.expect("requested logits");
    let mut next: Vec<u32> = argmax_rows(&lg)?;
    let prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut done: Vec<bool> = max_tokens.iter().map(|&m| m == 0).collect();
    let mut steps = 0;
    loop {
        for i in 0..b {
            if !done[i] {
                tokens[i].push(next[i]);
                if eos.contains(&next[i]) || tokens[i].len() >= max_tokens[i] {
                    done[i] = true;
                }
            }
        }
        if done.iter().all(|&d| d) || cache.seq_len() + 1 > model.cfg.max_position_embeddings {
            break;
        }
        for m in mask.iter_mut() {
            m.push(1);
        }
        let step_ids: Vec<Vec<u32>> = next.iter().map(|&n| vec![n]).collect();
        let out = model.forward(
            &step_ids,
            Fwd { attention_mask: Some(&mask), cache: Some(&mut cache), adapter, hooks: hooks.as_deref_mut().map(|h| h as &mut dyn Hooks), logits: LogitsAt::Last, ..Default::default() },
        )?;
        let lg = out.logits.expect("requested logits");
        next = argmax_rows(&lg)?;
        steps += 1;
    }
    Ok(BatchGenerated { tokens, prefill_secs, decode_secs: t1.elapsed().as_secs_f64(), decode_steps: steps })
}
