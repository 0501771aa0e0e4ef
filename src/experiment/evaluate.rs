//! A cell's evaluation on one split: the intervened base runs' last-position logits, reduced
//! where they are to what the metrics need (IIA over the vocabulary and the answers, logit
//! difference, cross-entropy), and the per-example rows of `examples.csv`.
use super::cells::{batch_rows, groups, intervened_logits, Cell};
use super::data::{eval_batch, CellCache, Clean};
use super::outputs::ExampleRow;
use crate::intervene::{ApplyCtx, Intervention};
use crate::model::Llama;
use crate::tasks::Pair;
use anyhow::Result;
use candle_core::{DType, Tensor};

/// Per-split evaluation result.
#[derive(Debug, Clone, Default)]
pub struct Eval {
    pub iia_vocab: f64,
    pub iia_answers: f64,
    pub logit_diff: f64,
    pub normalized_effect: f64,
    pub base_acc: f64,
    pub source_acc: f64,
    pub n: usize,
    /// Mean cross-entropy of the intervened output against the counterfactual label.
    pub loss: f64,
    pub examples: Vec<(usize, u32, bool, f64)>, // (example, predicted, correct, logit diff)
}

pub fn evaluate(model: &Llama, cell: &Cell, cache: &CellCache<'_>, pairs: &[Pair], clean: &[&Clean], iv: &dyn Intervention) -> Result<Eval> {
    evaluate_on(model, cell, cache, pairs, clean, iv, None)
}

/// [`evaluate`] on the pairs `only` lists (all when None; `clean` is indexed like `pairs`).
pub fn evaluate_on(
    model: &Llama,
    cell: &Cell,
    cache: &CellCache<'_>,
    pairs: &[Pair],
    clean: &[&Clean],
    iv: &dyn Intervention,
    only: Option<&[usize]>,
) -> Result<Eval> {
    let keep: Vec<bool> = match only {
        None => vec![true; pairs.len()],
        Some(ix) => {
            let mut k = vec![false; pairs.len()];
            for &i in ix.iter().filter(|&&i| i < pairs.len()) {
                k[i] = true;
            }
            k
        }
    };
    let n = keep.iter().filter(|&&k| k).count();
    let mut e = Eval { n, ..Default::default() };
    if n == 0 {
        return Ok(e);
    }
    let (mut hit_v, mut hit_a, mut ld_sum, mut ce_sum) = (0usize, 0usize, 0f64, 0f64);
    // Units whose source vector equals the base's leave an interchange without effect: their
    // output is the clean base run's (e.g. every position before the first token that differs).
    // One comparison and one transfer for all pairs (not one device round trip per pair).
    let same: Vec<bool> = if iv.identity_on_equal() {
        let d = (&cache.source_rows - &cache.base_rows)?.abs()?.max(1)?;
        d.to_dtype(DType::F32)?.to_vec1::<f32>()?.into_iter().map(|x| x == 0.0).collect()
    } else {
        vec![false; pairs.len()]
    };
    let mut rows: Vec<(usize, RowStats)> = Vec::with_capacity(n);
    let same_idx: Vec<usize> = (0..pairs.len()).filter(|&i| same[i] && keep[i]).collect();
    if !same_idx.is_empty() {
        let stacked = match cache.base_logits_rows {
            Some(all) => all.index_select(&batch_rows(model, &same_idx)?, 0)?,
            None => Tensor::stack(&same_idx.iter().map(|&i| cache.base_logits[i]).collect::<Vec<_>>(), 0)?,
        };
        rows.extend(same_idx.iter().copied().zip(row_stats(&stacked, &same_idx, pairs)?));
    }
    // On a GPU, the cell is one replay of its (split, layer, site)'s captured forward.
    let needed: Vec<bool> = (0..pairs.len()).map(|i| !same[i] && keep[i]).collect();
    let replayed = match needed.contains(&true) && super::eval_graph::applies(model, cell, cache, pairs) {
        true => super::eval_graph::stats(model, cell, cache, pairs, iv, &needed)?,
        false => None,
    };
    match replayed {
        Some(all) => rows.extend(all.into_iter().enumerate().filter(|(i, _)| needed[*i]).map(|(i, r)| (i, r.expect("computed with its length")))),
        None => {
            for group in groups(cache, pairs) {
                let todo: Vec<usize> = group.into_iter().filter(|&i| !same[i] && keep[i]).collect();
                for chunk in todo.chunks(eval_batch(model.device())) {
                    let logits = intervened_logits(model, cell, cache, pairs, chunk, iv, ApplyCtx::EVAL, false)?;
                    rows.extend(chunk.iter().copied().zip(row_stats(&logits, chunk, pairs)?));
                }
            }
        }
    }
    for (i, r) in rows {
        let p = &pairs[i];
        hit_v += (r.pred == p.cf_label) as usize;
        hit_a += (r.pred_ans == p.cf_label) as usize;
        ld_sum += r.ld;
        ce_sum += r.ce;
        e.examples.push((i, r.pred, r.pred == p.cf_label, r.ld));
    }
    e.examples.sort_by_key(|x| x.0);
    let nf = n as f64;
    e.iia_vocab = hit_v as f64 / nf;
    e.iia_answers = hit_a as f64 / nf;
    e.logit_diff = ld_sum / nf;
    e.loss = ce_sum / nf;
    let clean: Vec<&Clean> = clean.iter().zip(&keep).filter(|(_, &k)| k).map(|(c, _)| *c).collect();
    let ld_base = clean.iter().map(|c| c.ld_base).sum::<f64>() / nf;
    let ld_source = clean.iter().map(|c| c.ld_source).sum::<f64>() / nf;
    let den = ld_source - ld_base;
    e.normalized_effect = if den.abs() > 1e-6 { (e.logit_diff - ld_base) / den } else { f64::NAN };
    e.base_acc = clean.iter().filter(|c| c.base_correct).count() as f64 / nf;
    e.source_acc = clean.iter().filter(|c| c.source_correct).count() as f64 / nf;
    Ok(e)
}

/// What evaluation keeps of one output row.
pub(super) struct RowStats {
    /// Argmax over the vocabulary (first on ties) and over the pair's answers (last on ties).
    pred: u32,
    pred_ans: u32,
    /// logit(counterfactual label) − logit(base label).
    ld: f64,
    /// Cross-entropy against the counterfactual label.
    ce: f64,
}

/// Per row of pairs `idx`: the counterfactual label, the base label, then the answers (padded
/// with the first), as a `[n, width]` index matrix for one gather of the logits.
pub(super) fn picks(idx: &[usize], pairs: &[Pair]) -> (Vec<u32>, usize) {
    let width = 2 + idx.iter().map(|&i| pairs[i].answers.len()).max().unwrap_or(0);
    let mut pick = Vec::with_capacity(idx.len() * width);
    for &i in idx {
        let p = &pairs[i];
        let row: Vec<u32> = [p.cf_label, p.base.label].into_iter().chain(p.answers.iter().copied()).collect();
        pick.extend((0..width).map(|k| *row.get(k).unwrap_or(&p.cf_label)));
    }
    (pick, width)
}

/// [`RowStats`] of pair `i` from its argmax, log-sum-exp and picked logits (see [`picks`]).
pub(super) fn finish(p: &Pair, pred: u32, lse: f32, v: &[f32]) -> RowStats {
    let answers = &v[2..2 + p.answers.len()];
    let pred_ans = p.answers.iter().zip(answers).max_by(|a, b| a.1.total_cmp(b.1)).map_or(pred, |(a, _)| *a);
    RowStats { pred, pred_ans, ld: (v[0] - v[1]) as f64, ce: lse as f64 - v[0] as f64 }
}

/// [`RowStats`] of the logits `[n, vocab]` of pairs `idx`: the reductions over the vocabulary
/// run where the logits are, and only n·(answers + 4) numbers come to the host (not the n rows
/// of 49 152 logits, whose host-side log-sum-exp in f64 cost more than the forward).
fn row_stats(logits: &Tensor, idx: &[usize], pairs: &[Pair]) -> Result<Vec<RowStats>> {
    let logits = logits.to_dtype(DType::F32)?;
    let preds = crate::generate::argmax_rows(&logits)?;
    let lse = logits.log_sum_exp(candle_core::D::Minus1)?.to_vec1::<f32>()?;
    let (pick, width) = picks(idx, pairs);
    let pick_t = Tensor::from_vec(pick, (idx.len(), width), logits.device())?;
    let picked = logits.gather(&pick_t, 1)?.to_vec2::<f32>()?;
    Ok(idx.iter().zip(preds).zip(lse).zip(picked).map(|(((&i, pred), lse), v)| finish(&pairs[i], pred, lse, &v)).collect())
}

/// Rows of `examples.csv` for one cell's test split.
pub fn example_rows(cell: &Cell, pairs: &[Pair], e: &Eval, tok: &crate::tokenizer::Tok) -> Vec<ExampleRow> {
    e.examples
        .iter()
        .map(|&(i, pred, correct, ld)| ExampleRow {
            layer: cell.layer,
            site: cell.site.name().into(),
            position: cell.position.clone(),
            example: i,
            base: pairs[i].base.text.clone(),
            source: pairs[i].source.text.clone(),
            base_label: tok.token_str(pairs[i].base.label),
            cf_label: tok.token_str(pairs[i].cf_label),
            predicted: tok.token_str(pred),
            correct,
            logit_diff: ld,
            heads: cell.heads.clone(),
        })
        .collect()
}
