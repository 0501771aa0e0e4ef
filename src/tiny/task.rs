//! Examples of the equality task for training and scoring the tiny model: seeded batches over all
//! symbols with a chosen P(a==b) = P(c==d), last-position logits through the differentiable
//! forward (tied head), and held-out accuracy (argmax over the whole vocabulary).
use crate::model::{Fwd, Hooks, Llama, LogitsAt};
use crate::tasks::equality;
use crate::tokenizer::Tok;
use crate::util::rng::Rng;
use anyhow::Result;
use candle_core::{Tensor, D};

/// Symbols and answer ids of the tiny tokenizer.
pub(crate) struct TaskIds {
    syms: Vec<(String, u32)>,
    pub(crate) ans: (u32, u32),
}

impl TaskIds {
    pub(crate) fn new(tok: &Tok) -> Result<Self> {
        Ok(Self { syms: equality::symbol_tokens(tok)?, ans: equality::answer_ids(tok)? })
    }
    /// `n` examples over all symbols with P(a==b) = P(c==d) = `p_eq`, independently: (ids, labels).
    pub(crate) fn sample(&self, tok: &Tok, rng: &mut Rng, n: usize, p_eq: f64) -> Result<(Vec<Vec<u32>>, Vec<u32>)> {
        let mut ids = Vec::with_capacity(n);
        let mut labels = Vec::with_capacity(n);
        for _ in 0..n {
            let v = (rng.uniform() < p_eq, rng.uniform() < p_eq);
            let p = equality::prompt(tok, equality::draw(rng, &self.syms, v), self.ans)?;
            ids.push(p.ids);
            labels.push(p.label);
        }
        Ok((ids, labels))
    }
}

/// Last-position logits `[b, vocab]` through the differentiable path (tied head).
pub(crate) fn last_logits(model: &Llama, ids: &[Vec<u32>], differentiable: bool) -> Result<Tensor> {
    last_logits_hooked(model, ids, differentiable, None)
}

pub(crate) fn last_logits_hooked(model: &Llama, ids: &[Vec<u32>], differentiable: bool, hooks: Option<&mut dyn Hooks>) -> Result<Tensor> {
    let out = model.forward(ids, Fwd { logits: LogitsAt::None, differentiable, hooks, ..Default::default() })?;
    let t = ids[0].len();
    let last = out.hidden.narrow(1, t - 1, 1)?.squeeze(1)?;
    Ok(last.matmul(&model.embeddings().t()?)?)
}

/// Accuracy of argmax over the whole vocabulary vs the label ids.
pub(crate) fn batch_acc(logits: &Tensor, labels: &[u32]) -> Result<f64> {
    let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    Ok(pred.iter().zip(labels).filter(|(p, l)| p == l).count() as f64 / labels.len().max(1) as f64)
}

/// Accuracy (argmax over the whole vocabulary) on `n` fresh examples over all symbols.
pub fn accuracy(model: &Llama, tok: &Tok, n: usize, seed: u64) -> Result<f64> {
    let ids = TaskIds::new(tok)?;
    let mut rng = Rng::new(seed);
    let mut correct = 0.0;
    let mut done = 0;
    while done < n {
        let m = (n - done).min(512);
        let (x, y) = ids.sample(tok, &mut rng, m, 0.5)?;
        let logits = last_logits(model, &x, false)?;
        correct += batch_acc(&logits, &y)? * m as f64;
        done += m;
    }
    Ok(correct / n as f64)
}
