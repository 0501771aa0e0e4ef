//! The interventional probe of the pilot study: at each block's output, at the last prompt
//! token, interchange the whole vector, only its magnitude, or only its direction from a
//! counterfactual run (an input of the other class) and count how often the prediction follows
//! the source. Only the last token changes, so the base's keys/values for earlier tokens are
//! computed once and every (layer, kind) re-runs one token from that layer on.
use crate::intervene::norm_swap::NormSwap;
use crate::intervene::{ApplyCtx, Intervention};
use crate::intervene::replace::Replace;
use super::PromptHooks;
use crate::model::sites::HookChain;
use crate::model::{Collector, Fwd, Hooks, KvCache, LinearAdapter, Llama, LogitsAt, Site};
use crate::train::cls::{score_hidden, Scorer};
use anyhow::{bail, Result};
use candle_core::Tensor;

/// What is interchanged (column `kind` of swap_probe.csv).
pub const KINDS: [&str; 3] = ["full", "magnitude", "angle"];

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SwapCounts {
    pub layer: usize,
    pub kind: &'static str,
    /// Pairs whose clean base and source predictions differ (the ones a swap can flip).
    pub n: usize,
    /// Of those, how many now predict the source's class (IIA = follows / n).
    pub follows_source: usize,
    /// Over all pairs, how many predictions changed from the clean base's.
    pub changed: usize,
    pub n_all: usize,
}

fn last_col(t: &Tensor) -> Result<Tensor> {
    let n = t.dim(1)?;
    Ok(t.narrow(1, n - 1, 1)?.squeeze(1)?)
}

/// Class scores of one pair: the clean base, the clean source, and per block the base with
/// each of [`KINDS`] interchanged at that block's output (last token).
pub struct PairScores {
    pub base: Vec<f32>,
    pub source: Vec<f32>,
    /// `[layer][kind]` class scores.
    pub swapped: Vec<Vec<Vec<f32>>>,
}

pub fn pair_scores(model: &Llama, adapter: Option<&dyn LinearAdapter>, scorer: &Scorer, base: &[u32], source: &[u32]) -> Result<PairScores> {
    pair_scores_with(model, adapter, None, scorer, base, source)
}

/// The fine-tune's own hooks (LoReFT) for `n` copies of a prompt of `len` tokens, chained before `then`.
fn chained<'a>(tuning: Option<PromptHooks>, len: usize, n: usize, then: &'a mut dyn Hooks) -> (Option<Box<dyn Hooks>>, &'a mut dyn Hooks) {
    (tuning.map(|f| f(&vec![len; n])), then)
}

/// [`pair_scores`] with a fine-tune's own hooks (LoReFT): they act on every forward (the split
/// prefix / last-token calls see the prompt's absolute positions) before the collectors and the swap.
pub fn pair_scores_with(model: &Llama, adapter: Option<&dyn LinearAdapter>, tuning: Option<PromptHooks>, scorer: &Scorer, base: &[u32], source: &[u32]) -> Result<PairScores> {
    let n_layers = model.cfg.num_layers;
    let (mag, ang) = (NormSwap::magnitude(), NormSwap::angle());
    let every = |s: Site| (0..n_layers).map(move |l| (l, s));
    if base.is_empty() || source.is_empty() {
        bail!("empty prompt in a swap pair");
    }
    let t = base.len();
    // Base: keys/values of tokens before the last, then the last token with its block I/O.
    let mut kv = KvCache::new(n_layers);
    if t > 1 {
        let mut own = tuning.map(|f| f(&[t]));
        let hooks = own.as_mut().map(|h| h.as_mut() as &mut dyn Hooks);
        model.forward(&[base[..t - 1].to_vec()], Fwd { cache: Some(&mut kv), hooks, adapter, logits: LogitsAt::None, ..Default::default() })?;
    }
    let last = vec![base[t - 1]];
    let mut col = Collector::new(every(Site::BlockInput).chain(every(Site::BlockOutput)));
    let (mut own, c) = chained(tuning, t, 1, &mut col);
    let mut chain = HookChain(own.iter_mut().map(|h| h.as_mut() as &mut dyn Hooks).chain([c]).collect());
    let clean = model.forward(&[last.clone()], Fwd { cache: Some(&mut kv.clone()), hooks: Some(&mut chain), adapter, logits: LogitsAt::None, ..Default::default() })?;
    drop(chain);
    let base_scores = score_hidden(model, &last_col(&clean.hidden)?, scorer)?.squeeze(0)?.to_vec1::<f32>()?;
    let mut scol = Collector::new(every(Site::BlockOutput));
    let (mut own, c) = chained(tuning, source.len(), 1, &mut scol);
    let mut chain = HookChain(own.iter_mut().map(|h| h.as_mut() as &mut dyn Hooks).chain([c]).collect());
    let src = model.forward(&[source.to_vec()], Fwd { hooks: Some(&mut chain), adapter, logits: LogitsAt::None, ..Default::default() })?;
    drop(chain);
    let source_scores = score_hidden(model, &last_col(&src.hidden)?, scorer)?.squeeze(0)?.to_vec1::<f32>()?;
    let mut swapped = Vec::with_capacity(n_layers);
    for l in 0..n_layers {
        let b = last_col(col.get(l, Site::BlockOutput).expect("collected"))?.to_dtype(candle_core::DType::F32)?; // [1, d]
        let s = last_col(scol.get(l, Site::BlockOutput).expect("collected"))?.to_dtype(candle_core::DType::F32)?;
        let rows = [s.clone(), mag.apply(&b, &s, ApplyCtx::EVAL)?, ang.apply(&b, &s, ApplyCtx::EVAL)?];
        let with = Tensor::cat(&rows, 0)?.unsqueeze(1)?.to_dtype(model.dtype())?; // [3, 1, d]
        let layers = (0..n_layers)
            .map(|i| match kv.layer(i) {
                Some((k, v)) if i >= l => Ok(Some((Tensor::cat(&[k, k, k], 0)?, Tensor::cat(&[v, v, v], 0)?))),
                _ => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        let mut kv3 = KvCache::from_layers(layers);
        let x0 = last_col(col.get(l, Site::BlockInput).expect("collected"))?.unsqueeze(1)?;
        let x0 = Tensor::cat(&[&x0, &x0, &x0], 0)?;
        let mut hook = Replace::whole(l, Site::BlockOutput, with);
        // The fine-tune's hooks first: at block l the swap then overrides their output.
        let (mut own, h) = chained(tuning, t, 3, &mut hook);
        let mut chain = HookChain(own.iter_mut().map(|x| x.as_mut() as &mut dyn Hooks).chain([h]).collect());
        let out = model.forward(
            &vec![last.clone(); 3],
            Fwd { cache: if t > 1 { Some(&mut kv3) } else { None }, hooks: Some(&mut chain), adapter, logits: LogitsAt::None, start: Some((l, x0)), ..Default::default() },
        )?;
        drop(chain);
        swapped.push(score_hidden(model, &last_col(&out.hidden)?, scorer)?.to_vec2::<f32>()?);
    }
    Ok(PairScores { base: base_scores, source: source_scores, swapped })
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap_or(0)
}

/// Counts per (layer, kind), layers in order, kinds as [`KINDS`]. `pairs` are (base ids, source ids).
pub fn swap_probe(
    model: &Llama,
    adapter: Option<&dyn LinearAdapter>,
    scorer: &Scorer,
    pairs: &[(Vec<u32>, Vec<u32>)],
    progress: Option<&indicatif::ProgressBar>,
) -> Result<Vec<SwapCounts>> {
    swap_probe_with(model, adapter, None, scorer, pairs, progress)
}

/// [`swap_probe`] with a fine-tune's own hooks (LoReFT).
pub fn swap_probe_with(
    model: &Llama,
    adapter: Option<&dyn LinearAdapter>,
    tuning: Option<PromptHooks>,
    scorer: &Scorer,
    pairs: &[(Vec<u32>, Vec<u32>)],
    progress: Option<&indicatif::ProgressBar>,
) -> Result<Vec<SwapCounts>> {
    let n_layers = model.cfg.num_layers;
    let mut counts: Vec<SwapCounts> =
        (0..n_layers).flat_map(|layer| KINDS.iter().map(move |&kind| SwapCounts { layer, kind, ..Default::default() })).collect();
    for (base, source) in pairs {
        let ps = pair_scores_with(model, adapter, tuning, scorer, base, source)?;
        let (base_pred, source_pred) = (argmax(&ps.base), argmax(&ps.source));
        let differ = base_pred != source_pred;
        for (l, per_kind) in ps.swapped.iter().enumerate() {
            for (k, scores) in per_kind.iter().enumerate() {
                let p = argmax(scores);
                let c = &mut counts[l * KINDS.len() + k];
                c.n_all += 1;
                c.changed += (p != base_pred) as usize;
                if differ {
                    c.n += 1;
                    c.follows_source += (p == source_pred) as usize;
                }
            }
        }
        if let Some(pb) = progress {
            pb.inc(1);
        }
    }
    Ok(counts)
}
