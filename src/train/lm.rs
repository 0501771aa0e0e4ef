//! Causal-LM loss on prompt/completion pairs: cross-entropy over the full vocabulary at the
//! positions that predict completion tokens only (the prompt is context, not a target).
use super::data::LmExample;
use crate::model::{Fwd, LinearAdapter, Llama, LogitsAt};
use crate::tokenizer::Tok;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};

/// Token ids of prompt+completion (truncated to `max_len` from the right, dropping completion
/// tail first) and the number of prompt tokens.
pub fn encode_pair(tok: &Tok, ex: &LmExample, max_len: usize) -> Result<(Vec<u32>, usize)> {
    let p = tok.encode(&ex.prompt)?;
    let c = tok.encode(&ex.completion)?;
    if p.is_empty() || c.is_empty() {
        bail!("prompt and completion must both be non-empty (prompt {:?})", ex.prompt);
    }
    if p.len() >= max_len {
        bail!("prompt of {} tokens leaves no room for the completion (max_len {max_len})", p.len());
    }
    let mut ids = p.clone();
    ids.extend(c);
    ids.truncate(max_len);
    Ok((ids, p.len()))
}

/// Mean completion-token loss and the fraction of completion tokens predicted exactly (argmax).
pub fn lm_loss(
    model: &Llama,
    adapter: Option<&dyn LinearAdapter>,
    tok: &Tok,
    batch: &[LmExample],
    max_len: usize,
    differentiable: bool,
) -> Result<(Tensor, f64)> {
    let enc = batch.iter().map(|e| encode_pair(tok, e, max_len)).collect::<Result<Vec<_>>>()?;
    let t = enc.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
    // Right padding: positions are unaffected and padded keys are masked out.
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    let (mut pos, mut tgt) = (Vec::new(), Vec::new());
    for (bi, (row, plen)) in enc.iter().enumerate() {
        let mut r = row.clone();
        r.resize(t, 0);
        ids.push(r);
        let mut m = vec![1u8; row.len()];
        m.resize(t, 0);
        mask.push(m);
        // Position i predicts token i+1; targets are the completion tokens.
        for i in plen - 1..row.len() - 1 {
            pos.push((bi * t + i) as u32);
            tgt.push(row[i + 1]);
        }
    }
    let out = model.forward(
        &ids,
        Fwd { attention_mask: Some(&mask), adapter, logits: LogitsAt::None, differentiable, ..Default::default() },
    )?;
    let d = out.hidden.dim(D::Minus1)?;
    let flat = out.hidden.reshape((ids.len() * t, d))?;
    let n = pos.len();
    let sel = flat.index_select(&Tensor::from_vec(pos, n, model.device())?, 0)?;
    let logits = model.cap_logits(sel.matmul(&model.lm_head().t()?)?)?.to_dtype(DType::F32)?;
    let y = Tensor::from_vec(tgt.clone(), n, model.device())?;
    let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
    let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let acc = pred.iter().zip(&tgt).filter(|(a, b)| a == b).count() as f64 / n as f64;
    Ok((loss, acc))
}
