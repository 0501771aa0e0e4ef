//! Classification by label words (or a linear head) at the last prompt token, and its evaluation.
//!
//! Label-word scoring restricts the LM's next-token logits to the K label tokens:
//! `logits_k = h_last · E[label_k]` (h_last after the final RMSNorm, E the LM head). Training uses
//! cross-entropy over those K logits (not the full vocabulary), and accuracy is the argmax over
//! the same K — so "accuracy" means "which label word the model prefers", the usual protocol.
use super::data::ClsExample;
use crate::model::{Fwd, Hooks, LinearAdapter, Llama, LogitsAt};
use crate::tokenizer::Tok;
use crate::util::rng::Rng;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var, D};

/// A linear classifier on the last prompt token's final hidden state: `W h + b`.
pub struct Head {
    pub w: Var, // [K, d]
    pub b: Var, // [K]
}

impl Head {
    /// Small random init (N(0, 0.02²) like HF classifier heads), zero bias.
    pub fn new(k: usize, d: usize, rng: &mut Rng, device: &Device) -> Result<Self> {
        Ok(Self {
            w: Var::from_tensor(&rng.normal_tensor(&[k, d], 0.02, device)?)?,
            b: Var::from_tensor(&Tensor::zeros(k, DType::F32, device)?)?,
        })
    }
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        vec![("head.weight".into(), self.w.clone()), ("head.bias".into(), self.b.clone())]
    }
}

/// How the K class logits are read off the last position.
pub enum Scorer<'a> {
    /// Rows of the LM head for each label's token id.
    LabelWords(Vec<u32>),
    Head(&'a Head),
}

/// The single token id of each label word; a word that is not one token is an error, because a
/// multi-token label cannot be scored at one position.
pub fn label_token_ids(tok: &Tok, words: &[String]) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for w in words {
        let t = tok.encode_known(w, "label word")?;
        if t.len() != 1 {
            bail!("label word {w:?} is {} tokens ({t:?}); label words must be single tokens (try a leading space)", t.len());
        }
        ids.push(t[0]);
    }
    let mut u = ids.clone();
    u.sort();
    u.dedup();
    if u.len() != ids.len() {
        bail!("label words {words:?} share a token");
    }
    Ok(ids)
}

/// Apply `template` (must contain `{text}`) and tokenize; keep the last `max_len` tokens so the
/// template's answer cue (its end) always survives truncation.
pub fn encode_prompt(tok: &Tok, template: &str, text: &str, max_len: usize) -> Result<Vec<u32>> {
    if !template.contains("{text}") {
        bail!("prompt template {template:?} has no {{text}} placeholder");
    }
    let ids = tok.encode(&template.replace("{text}", text))?;
    Ok(if ids.len() > max_len { ids[ids.len() - max_len..].to_vec() } else { ids })
}

/// Left-pad rows to one length (so every row's last prompt token is the last column).
pub fn left_pad(rows: &[Vec<u32>], pad: u32) -> (Vec<Vec<u32>>, Vec<Vec<u8>>) {
    let t = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(rows.len());
    let mut mask = Vec::with_capacity(rows.len());
    for r in rows {
        let p = t - r.len();
        ids.push(std::iter::repeat_n(pad, p).chain(r.iter().copied()).collect());
        mask.push(std::iter::repeat_n(0u8, p).chain(std::iter::repeat_n(1u8, r.len())).collect());
    }
    (ids, mask)
}

/// Class logits `[b, K]` for left-padded prompts.
pub fn class_logits(
    model: &Llama,
    adapter: Option<&dyn LinearAdapter>,
    hooks: Option<&mut dyn Hooks>,
    prompts: &[Vec<u32>],
    scorer: &Scorer,
    differentiable: bool,
) -> Result<Tensor> {
    let (ids, mask) = left_pad(prompts, 0);
    // Re-borrow so the hook object's lifetime can shrink to this call's.
    let hooks: Option<&mut dyn Hooks> = match hooks {
        Some(h) => Some(h),
        None => None,
    };
    let padded = mask.iter().any(|r| r.contains(&0));
    let out = model.forward(
        &ids,
        Fwd {
            attention_mask: if padded { Some(&mask) } else { None },
            hooks,
            adapter,
            logits: LogitsAt::None,
            differentiable,
            ..Default::default()
        },
    )?;
    let t = out.hidden.dim(1)?;
    let last = out.hidden.narrow(1, t - 1, 1)?.squeeze(1)?; // [b, d]
    score_hidden(model, &last, scorer)
}

/// Class logits `[b, K]` from final (post-norm) hidden states `[b, d]`.
pub fn score_hidden(model: &Llama, last: &Tensor, scorer: &Scorer) -> Result<Tensor> {
    // Callers pass the last position of `[b, t, d]`, a strided view: cuBLAS's matmul needs it
    // contiguous (the CPU's gemm takes strides, so only a device run showed it).
    let last = last.to_dtype(DType::F32)?.contiguous()?;
    Ok(match scorer {
        Scorer::LabelWords(ids) => {
            let idx = Tensor::from_vec(ids.clone(), ids.len(), model.device())?;
            let rows = model.lm_head().index_select(&idx, 0)?.to_dtype(DType::F32)?; // [K, d]
            // The label words' logits as the forward computes them (Gemma's soft-cap included).
            model.cap_logits(last.matmul(&rows.t()?)?)?
        }
        Scorer::Head(h) => last.matmul(&h.w.as_tensor().t()?)?.broadcast_add(h.b.as_tensor())?,
    })
}

/// Mean cross-entropy of `[b, K]` logits against labels.
pub fn cross_entropy(logits: &Tensor, labels: &[usize]) -> Result<Tensor> {
    let y = Tensor::from_vec(labels.iter().map(|&l| l as u32).collect::<Vec<_>>(), labels.len(), logits.device())?;
    Ok(candle_nn::loss::cross_entropy(logits, &y)?)
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ClsMetrics {
    pub n: usize,
    pub accuracy: f64,
    pub loss: f64,
    /// Accuracy of always answering the most frequent label of this set (context for `accuracy`).
    pub majority: f64,
}

/// Accuracy and mean loss over `examples` (inference mode). `hooks_for` builds the hooks for each
/// batch (e.g. a per-row intervention), or None.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    model: &Llama,
    adapter: Option<&dyn LinearAdapter>,
    tok: &Tok,
    examples: &[ClsExample],
    template: &str,
    scorer: &Scorer,
    max_len: usize,
    batch: usize,
    mut hooks_for: Option<&mut dyn FnMut(&[ClsExample]) -> Result<Box<dyn Hooks>>>,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<ClsMetrics> {
    if examples.is_empty() {
        bail!("no examples to evaluate");
    }
    let (mut correct, mut loss_sum) = (0usize, 0f64);
    let mut counts = std::collections::HashMap::<usize, usize>::new();
    for chunk in examples.chunks(batch.max(1)) {
        let prompts = chunk.iter().map(|e| encode_prompt(tok, template, &e.text, max_len)).collect::<Result<Vec<_>>>()?;
        let mut h = match hooks_for.as_deref_mut() {
            Some(f) => Some(f(chunk)?),
            None => None,
        };
        let logits = class_logits(model, adapter, h.as_deref_mut().map(|x| x as &mut dyn Hooks), &prompts, scorer, false)?;
        let labels: Vec<usize> = chunk.iter().map(|e| e.label).collect();
        loss_sum += cross_entropy(&logits, &labels)?.to_scalar::<f32>()? as f64 * chunk.len() as f64;
        let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        correct += pred.iter().zip(&labels).filter(|(p, l)| **p as usize == **l).count();
        for l in labels {
            *counts.entry(l).or_default() += 1;
        }
        if let Some(pb) = progress {
            pb.inc(chunk.len() as u64);
        }
    }
    let n = examples.len();
    Ok(ClsMetrics {
        n,
        accuracy: correct as f64 / n as f64,
        loss: loss_sum / n as f64,
        majority: *counts.values().max().unwrap_or(&0) as f64 / n as f64,
    })
}
