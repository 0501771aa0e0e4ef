//! A sweep's cell evaluations replayed from CUDA graphs (`runtime::graph`). On a GPU a cell's
//! evaluation is a few hundred kernel launches on a few thousand numbers: launch-bound. Every
//! cell at one (split, layer, site) runs the same forward — the clean block inputs at the layer
//! for all pairs (whole rows), one position per row replaced, the layers after it, and the
//! last position's logits reduced to what the metrics need — and differs only in which position
//! is replaced and by what. So that forward is captured once per (split, layer, site), with the
//! one-hot positions and the replacement vectors as device buffers, and each cell is: the
//! intervention applied to the cached base/source vectors (eager, a few launches), two buffer
//! writes, one replay, one transfer.
//!
//! Whole rows instead of the clean prefix's cached keys/values: positions before the replaced
//! one are recomputed from the clean block input, which gives the clean values again (causal
//! attention), so the numbers equal the prefix path's up to float rounding.
use super::cells::{batch_rows, Cell};
use super::data::{eval_batch, CellCache};
use super::evaluate::{finish, picks, RowStats};
use crate::intervene::hook::InterventionHook;
use crate::intervene::{ApplyCtx, Intervention};
use crate::model::{Fwd, Llama, LogitsAt, Site};
use crate::runtime::graph::{self, Graph};
use crate::tasks::Pair;
use anyhow::Result;
use candle_core::{DType, Tensor, TensorId, D};
use std::cell::RefCell;
use std::collections::HashMap;

/// One (split, layer, site)'s captured forward: its buffers and the graph writing
/// `[n, 2 + width]` numbers per row (argmax, log-sum-exp, picked logits).
struct Captured {
    onehot: Tensor,
    new: Tensor,
    graph: Graph<Tensor>,
}

/// Keyed by the stacked block input at the layer of one base length's pairs (a tensor of one
/// model's cache of one split: its id is never reused), the layer and the site.
type Key = (TensorId, usize, Site);

/// Device memory the kept graphs may hold (each keeps its forward's peak): a sweep runs its
/// cells layer by layer, so when a new graph would pass this all are dropped and the current
/// layer's are captured again.
const GRAPH_BYTES: usize = 2 << 30;

thread_local! {
    static GRAPHS: RefCell<(HashMap<Key, Option<Captured>>, usize)> = RefCell::new((HashMap::new(), 0));
}

/// A rough upper bound on one graph's memory: a few layers' temporaries over `n × t` rows and
/// the logits with their reductions.
fn footprint(model: &Llama, n: usize, t: usize) -> usize {
    let c = &model.cfg;
    n * (t * (8 * c.hidden_size + 3 * c.intermediate_size) + 3 * c.vocab_size) * 4
}

/// The vectors written into the forward are given (the intervention was applied outside).
struct Given;
impl Intervention for Given {
    fn kind(&self) -> &'static str {
        "given"
    }
    fn apply(&self, _base: &Tensor, given: &Tensor, _: ApplyCtx) -> Result<Tensor> {
        Ok(given.clone())
    }
}

/// Whether `cell`'s evaluation can replay graphs: CUDA with graphs on, the whole site vector
/// (no head subset), and each base length's pairs in one forward.
pub(super) fn applies(model: &Llama, cell: &Cell, cache: &CellCache<'_>, pairs: &[Pair]) -> bool {
    graph::enabled(model.device())
        && cell.cols.is_none()
        && !pairs.is_empty()
        && cache.by_len.values().all(|(_, x)| x.dim(0).is_ok_and(|n| n <= eval_batch(model.device())))
        && pairs.iter().all(|p| cache.by_len.contains_key(&p.base.ids.len()))
}

/// The [`RowStats`] of every pair of a base length with a `needed` pair, with `iv` applied at
/// the cell, from that (split, length, layer, site)'s graph; None when a graph cannot be
/// captured (the caller evaluates eagerly).
pub(super) fn stats(model: &Llama, cell: &Cell, cache: &CellCache<'_>, pairs: &[Pair], iv: &dyn Intervention, needed: &[bool]) -> Result<Option<Vec<Option<RowStats>>>> {
    let mut out: Vec<Option<RowStats>> = (0..pairs.len()).map(|_| None).collect();
    // Pairs per base length, in pair order: the rows of that length's stacked block input.
    let mut by_len: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for (i, p) in pairs.iter().enumerate() {
        by_len.entry(p.base.ids.len()).or_default().push(i);
    }
    for (len, idx) in by_len {
        if !idx.iter().any(|&i| needed[i]) {
            continue;
        }
        let x0 = &cache.by_len[&len].1;
        let (n, t, _) = x0.dims3()?;
        if n != idx.len() {
            anyhow::bail!("{n} stacked rows for the {} pairs of length {len}", idx.len());
        }
        let mut oh = vec![0f32; n * t];
        for (k, &i) in idx.iter().enumerate() {
            let p = cache.base_pos[i];
            if p >= t {
                anyhow::bail!("intervened position {p} outside a prompt of {t} tokens");
            }
            oh[k * t + p] = 1.0;
        }
        let oh = Tensor::from_vec(oh, (n, t, 1), model.device())?;
        let sel = batch_rows(model, &idx)?;
        let (base, source) = (cache.base_rows.index_select(&sel, 0)?, cache.source_rows.index_select(&sel, 0)?);
        let new = iv.apply(&base, &source, ApplyCtx::EVAL)?.to_dtype(DType::F32)?.contiguous()?;
        let numbers = GRAPHS.with(|g| -> Result<Option<Vec<Vec<f32>>>> {
            let (graphs, bytes) = &mut *g.borrow_mut();
            let key = (x0.id(), cell.layer, cell.site);
            if !graphs.contains_key(&key) {
                let cost = footprint(model, n, t);
                if *bytes + cost > GRAPH_BYTES {
                    graphs.clear();
                    *bytes = 0;
                }
                *bytes += cost;
            }
            let entry = graphs.entry(key).or_insert_with(|| capture(model, cell, x0, pairs, &idx, &oh, &new));
            let Some(c) = entry.as_ref().filter(|c| c.new.dims() == new.dims()) else { return Ok(None) };
            c.onehot.slice_set(&oh, 0, 0)?;
            c.new.slice_set(&new, 0, 0)?;
            c.graph.launch()?;
            Ok(Some(c.graph.out().to_vec2::<f32>()?))
        })?;
        let Some(numbers) = numbers else { return Ok(None) };
        for (&i, v) in idx.iter().zip(numbers) {
            out[i] = Some(finish(&pairs[i], v[0] as u32, v[1], &v[2..]));
        }
    }
    Ok(Some(out))
}

/// Capture the forward of pairs `idx` (one base length, `x0` their stacked block input) from
/// `cell.layer` with the buffers' positions and vectors; None (noted once on stderr) when
/// capture fails.
#[allow(clippy::too_many_arguments)]
fn capture(model: &Llama, cell: &Cell, x0: &Tensor, pairs: &[Pair], idx: &[usize], oh: &Tensor, new: &Tensor) -> Option<Captured> {
    let attempt = || -> Result<Captured> {
        let (onehot, new) = (oh.copy()?, new.copy()?);
        let ids: Vec<Vec<u32>> = idx.iter().map(|&i| pairs[i].base.ids.clone()).collect();
        let (pick, width) = picks(idx, pairs);
        let graph = graph::capture(model.device(), || {
            let mut hook = InterventionHook {
                layer: cell.layer,
                site: cell.site,
                positions: Vec::new(),
                source: new.clone(),
                cols: None,
                intervention: &Given,
                ctx: ApplyCtx::EVAL,
                onehot: Some(onehot.clone()),
            };
            let fwd = Fwd { hooks: Some(&mut hook), start: Some((cell.layer, x0.clone())), logits: LogitsAt::Last, ..Default::default() };
            let logits = model.forward(&ids, fwd)?.logits.expect("requested logits").to_dtype(DType::F32)?;
            let preds = logits.argmax_keepdim(D::Minus1)?.to_dtype(DType::F32)?;
            let lse = logits.log_sum_exp(D::Minus1)?.unsqueeze(1)?;
            let pick_t = graph::constant(pick.clone(), (idx.len(), width), model.device())?;
            let picked = logits.gather(&pick_t, 1)?;
            Ok(Tensor::cat(&[&preds, &lse, &picked], 1)?)
        })?;
        Ok(Captured { onehot, new, graph })
    };
    graph::or_eager(attempt(), "cell evaluations")
}
