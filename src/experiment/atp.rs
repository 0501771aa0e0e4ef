//! Attribution patching over a sweep's whole grid (METHODS.md §6): per batch of pairs, one
//! forward of the sources (their activations at every unit), one differentiable forward of the
//! bases with every unit made a gradient leaf, and one backward of the metric; each cell's
//! estimate is then `(s − b) · ∂m/∂a` at its position (and head), nothing recomputed per cell.
//! `ig` takes the gradient at `steps` points between the base's and the source's input
//! embeddings (α = (j + ½)/steps) and averages it; `s` and `b` stay the clean runs'.
use super::data::left_pad;
use crate::intervene::atp::{attribution, interpolated_input, AtpMethod, AtpMetric, AtpOptions};
use crate::model::{Collector, Fwd, LastMetric, Llama, LogitsAt, Site, SitePass};
use crate::tasks::Pair;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use std::collections::HashMap;

/// Pairs per forward/backward (the backward keeps every unit's activation and gradient).
pub const ATP_BATCH: usize = 16;

/// One estimated cell: a unit at one position, the whole vector or one head.
#[derive(Debug, Clone, PartialEq)]
pub struct AtpCell {
    pub layer: usize,
    pub site: Site,
    pub position: String,
    /// None = the whole vector (for headed sites, the sum of its heads' estimates).
    pub head: Option<usize>,
}

impl AtpCell {
    /// The `heads` column of metrics.csv (empty for the whole vector).
    pub fn heads(&self) -> String {
        self.head.map(|h| h.to_string()).unwrap_or_default()
    }
}

/// Every cell's estimate for every pair.
pub struct Estimates {
    pub cells: Vec<AtpCell>,
    /// `[cell][pair]`: the estimated `m_patched − m_base` of that pair.
    pub per_pair: Vec<Vec<f64>>,
    /// The metric on each clean base run (as the AtP pass computed it).
    pub base_metric: Vec<f64>,
    /// GradDrop: `[layer][cell][pair]`, the estimate with that layer's gradient dropped.
    pub dropped: Option<Vec<Vec<Vec<f64>>>>,
}

impl Estimates {
    /// Each cell's estimate: the mean over pairs, or with GradDrop (AtP*, Kramár et al. 2024)
    /// the mean over pairs of `Σ_ℓ |estimate_ℓ| / (L − 1)`.
    pub fn means(&self) -> Vec<f64> {
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        match &self.dropped {
            None => self.per_pair.iter().map(|v| mean(v)).collect(),
            Some(d) => {
                let norm = (d.len().max(2) - 1) as f64;
                let n = self.base_metric.len();
                (0..self.cells.len()).map(|c| mean(&(0..n).map(|i| d.iter().map(|l| l[c][i].abs()).sum::<f64>() / norm).collect::<Vec<_>>())).collect()
            }
        }
    }
}

/// The grid: layer × site × position × (whole vector, then each head of a headed site, or the
/// listed `heads` only).
pub fn grid(model: &Llama, units: &[(usize, Site)], positions: &[String], heads: &[usize]) -> Result<Vec<AtpCell>> {
    let mut cells = Vec::new();
    for &(layer, site) in units {
        let n = site.n_heads(&model.cfg);
        if let Some(&h) = heads.iter().find(|&&h| h >= n) {
            bail!("head {h} is out of range for site {site} ({n} heads)");
        }
        for p in positions {
            cells.push(AtpCell { layer, site, position: p.clone(), head: None });
            if site.is_headed() {
                let hs: Vec<usize> = if heads.is_empty() { (0..n).collect() } else { heads.to_vec() };
                cells.extend(hs.into_iter().map(|h| AtpCell { layer, site, position: p.clone(), head: Some(h) }));
            }
        }
    }
    Ok(cells)
}

/// Per-row metric values from a clean run's last-position logits (IG's base run).
fn metric_values(logits: &Tensor, pairs: &[&Pair], which: AtpMetric) -> Result<Vec<f64>> {
    let dev = logits.device();
    let logits = logits.to_dtype(DType::F32)?;
    let cf = Tensor::from_vec(pairs.iter().map(|p| p.cf_label).collect::<Vec<_>>(), (pairs.len(), 1), dev)?;
    let per_row = match which {
        AtpMetric::LogitDiff => {
            let base = Tensor::from_vec(pairs.iter().map(|p| p.base.label).collect::<Vec<_>>(), (pairs.len(), 1), dev)?;
            (logits.gather(&cf, 1)? - logits.gather(&base, 1)?)?
        }
        AtpMetric::Logprob => candle_nn::ops::log_softmax(&logits, D::Minus1)?.gather(&cf, 1)?,
    };
    Ok(per_row.flatten_all()?.to_vec1::<f32>()?.into_iter().map(f64::from).collect())
}

/// Every unit's `∂m/∂a` (f32) from a site pass.
fn grads_of(pass: &SitePass, units: &[(usize, Site)]) -> Result<HashMap<(usize, Site), Tensor>> {
    units.iter().map(|&(l, s)| Ok(((l, s), pass.grad(l, s)?))).collect()
}

/// Rows of `act` (`[n, t, w]`): entry j is row `j % n` at position `pos[j]`; returns `[pos.len(), w]`.
fn rows_at(act: &Tensor, pos: &[usize]) -> Result<Tensor> {
    let (n, t, w) = act.dims3()?;
    let idx: Vec<u32> = pos.iter().enumerate().map(|(j, &p)| ((j % n) * t + p) as u32).collect();
    Ok(act.reshape((n * t, w))?.index_select(&Tensor::from_vec(idx, pos.len(), act.device())?, 0)?)
}

/// Estimate every cell of the grid on `pairs`.
pub fn estimate(model: &Llama, pairs: &[Pair], units: &[(usize, Site)], positions: &[String], heads: &[usize], opts: &AtpOptions) -> Result<Estimates> {
    opts.validate()?;
    let cells = grid(model, units, positions, heads)?;
    let mut per_pair = vec![vec![0f64; pairs.len()]; cells.len()];
    let mut base_metric = vec![0f64; pairs.len()];
    let mut dropped = opts.grad_drop.then(|| vec![vec![vec![0f64; pairs.len()]; cells.len()]; model.cfg.num_layers]);
    // Each pair's index at every named position, resolved once (a bad name fails before any run).
    let mut at: HashMap<&str, (Vec<usize>, Vec<usize>)> = HashMap::new();
    for p in positions {
        let b = pairs.iter().map(|x| x.base.position(p)).collect::<Result<Vec<_>>>()?;
        let s = pairs.iter().map(|x| x.source.position(p)).collect::<Result<Vec<_>>>()?;
        at.insert(p.as_str(), (b, s));
    }
    if opts.method == AtpMethod::Ig {
        if let Some(i) = pairs.iter().position(|p| p.base.ids.len() != p.source.ids.len()) {
            bail!("atp method \"ig\" interpolates base and source embeddings: pair {i} has prompts of {} and {} tokens", pairs[i].base.ids.len(), pairs[i].source.ids.len());
        }
    }
    let hd = model.cfg.head_dim;
    // The QK fix reads q, k, v and ∂m/∂head_output at its layers, requested or not.
    let mut hooked: Vec<(usize, Site)> = units.to_vec();
    if opts.qk_fix {
        super::atp_qk::check(model)?;
        hooked.extend(super::atp_qk::needed(&cells));
        hooked.sort();
        hooked.dedup();
    }
    let units = hooked.as_slice();
    for start in (0..pairs.len()).step_by(ATP_BATCH) {
        let idx: Vec<usize> = (start..(start + ATP_BATCH).min(pairs.len())).collect();
        let batch: Vec<&Pair> = idx.iter().map(|&i| &pairs[i]).collect();
        let (ids_b, mask_b, offs_b) = left_pad(&batch.iter().map(|p| p.base.ids.as_slice()).collect::<Vec<_>>());
        let (ids_s, mask_s, offs_s) = left_pad(&batch.iter().map(|p| p.source.ids.as_slice()).collect::<Vec<_>>());
        // The sources' clean activations at every unit.
        let mut col = Collector::new(units.iter().copied());
        model.forward(&ids_s, Fwd { attention_mask: Some(&mask_s), hooks: Some(&mut col), logits: LogitsAt::None, ..Default::default() })?;
        let cf: Vec<u32> = batch.iter().map(|p| p.cf_label).collect();
        let bl: Vec<u32> = batch.iter().map(|p| p.base.label).collect();
        let lm = match opts.metric {
            AtpMetric::LogitDiff => LastMetric::LogitDiff { plus: &cf, minus: &bl },
            AtpMetric::Logprob => LastMetric::Logprob { target: &cf },
        };
        // One forward + hand-written backward per gradient point (the model's site pass).
        let pass_at = |start: Option<Tensor>| model.site_pass(&ids_b, Fwd { attention_mask: Some(&mask_b), start: start.map(|x| (0, x)), ..Default::default() }, &lm);
        // Base activations and gradients: one pass for plain, a clean pass + one per point for ig.
        let (base_acts, grads, m_base, plain_pass) = match opts.method {
            AtpMethod::Plain => {
                let pass = pass_at(None)?;
                let acts = units.iter().map(|&(l, s)| Ok(((l, s), pass.act(l, s)?.clone()))).collect::<Result<HashMap<_, _>>>()?;
                (acts, grads_of(&pass, units)?, pass.values.clone(), Some(pass))
            }
            AtpMethod::Ig => {
                let mut clean = Collector::new(units.iter().copied());
                let out = model.forward(&ids_b, Fwd { attention_mask: Some(&mask_b), hooks: Some(&mut clean), logits: LogitsAt::Last, ..Default::default() })?;
                let values = metric_values(out.logits.as_ref().expect("requested logits"), &batch, opts.metric)?;
                // Equal lengths per pair: both sides are padded alike, so rows line up.
                let (eb, es) = (model.embed(&ids_b)?, model.embed(&ids_s)?);
                let alphas = opts.alphas();
                let mut sum: HashMap<(usize, Site), Tensor> = HashMap::new();
                for &a in &alphas {
                    for (k, g) in grads_of(&pass_at(Some(interpolated_input(&eb, &es, a)?))?, units)? {
                        let acc = match sum.remove(&k) {
                            Some(s) => (s + g)?,
                            None => g,
                        };
                        sum.insert(k, acc);
                    }
                }
                let k = alphas.len() as f64;
                let g = sum.into_iter().map(|(u, s)| Ok((u, (s / k)?))).collect::<Result<HashMap<_, _>>>()?;
                (clean.acts, g, values, None)
            }
        };
        for (k, &i) in idx.iter().enumerate() {
            base_metric[i] = m_base[k];
        }
        let side = Side { idx: &idx, offs_b: &offs_b, offs_s: &offs_s, source: &col.acts, base: &base_acts, grads: &grads };
        let mut vals = cell_values(&cells, &at, &side, hd)?;
        if opts.qk_fix {
            let pos_of = |c: &AtpCell| -> (Vec<usize>, Vec<usize>) {
                let (pb, ps) = &at[c.position.as_str()];
                (idx.iter().enumerate().map(|(k, &i)| offs_b[k] + pb[i]).collect(), idx.iter().enumerate().map(|(k, &i)| offs_s[k] + ps[i]).collect())
            };
            let b = super::atp_qk::Batch { source: &col.acts, base: &base_acts, grads: &grads, mask: &mask_b };
            for (ci, q) in super::atp_qk::estimates(model, &cells, &pos_of, &b)?.into_iter().enumerate() {
                if let Some(q) = q {
                    vals[ci] = q;
                }
            }
        }
        if let (Some(d), Some(pass)) = (dropped.as_mut(), plain_pass.as_ref()) {
            for (l, per_cell) in d.iter_mut().enumerate() {
                // Above layer l the gradient is the plain one: only cells at layers ≤ l change.
                let mut g = grads.clone();
                g.extend(model.dropped_grads(pass, l, units)?);
                let (low, at_low): (Vec<usize>, Vec<AtpCell>) = cells.iter().enumerate().filter(|(_, c)| c.layer <= l).map(|(ci, c)| (ci, c.clone())).unzip();
                let mut new = vals.clone();
                for (ci, v) in low.into_iter().zip(cell_values(&at_low, &at, &Side { grads: &g, ..side }, hd)?) {
                    new[ci] = v;
                }
                for (ci, v) in new.into_iter().enumerate() {
                    for (k, &i) in idx.iter().enumerate() {
                        per_cell[ci][i] = v[k];
                    }
                }
            }
        }
        for (ci, v) in vals.into_iter().enumerate() {
            for (k, &i) in idx.iter().enumerate() {
                per_pair[ci][i] = v[k];
            }
        }
    }
    Ok(Estimates { cells, per_pair, base_metric, dropped })
}

/// One batch's rows: pair indices, left-padding offsets, and the activations and gradients.
struct Side<'a> {
    idx: &'a [usize],
    offs_b: &'a [usize],
    offs_s: &'a [usize],
    source: &'a HashMap<(usize, Site), Tensor>,
    base: &'a HashMap<(usize, Site), Tensor>,
    grads: &'a HashMap<(usize, Site), Tensor>,
}

/// `[cell][row]` estimates of one batch: per unit the rows of all its positions are gathered
/// once, then the whole vector's and every head's sums come from them.
fn cell_values(cells: &[AtpCell], at: &HashMap<&str, (Vec<usize>, Vec<usize>)>, sd: &Side<'_>, hd: usize) -> Result<Vec<Vec<f64>>> {
    let n = sd.idx.len();
    let mut out = vec![Vec::new(); cells.len()];
    let mut ci = 0;
    while ci < cells.len() {
        // A unit's cells are consecutive in the grid, each position's together.
        let u = (cells[ci].layer, cells[ci].site);
        let end = ci + cells[ci..].iter().take_while(|c| (c.layer, c.site) == u).count();
        let mut positions: Vec<&str> = cells[ci..end].iter().map(|c| c.position.as_str()).collect();
        positions.dedup();
        let (mut rb, mut rs) = (Vec::with_capacity(n * positions.len()), Vec::with_capacity(n * positions.len()));
        for p in &positions {
            let (pb, ps) = &at[p];
            for (k, &i) in sd.idx.iter().enumerate() {
                rb.push(sd.offs_b[k] + pb[i]);
                rs.push(sd.offs_s[k] + ps[i]);
            }
        }
        let s = rows_at(&sd.source[&u].to_dtype(DType::F32)?, &rs)?;
        let b = rows_at(&sd.base[&u].to_dtype(DType::F32)?, &rb)?;
        let g = rows_at(&sd.grads[&u], &rb)?;
        let whole = attribution(&s, &b, &g, s.dim(1)?)?.to_vec2::<f32>()?;
        let per_head = if u.1.is_headed() { Some(attribution(&s, &b, &g, hd)?.to_vec2::<f32>()?) } else { None };
        for c in ci..end {
            let pi = positions.iter().position(|&p| p == cells[c].position).expect("listed above");
            out[c] = (0..n)
                .map(|k| match (cells[c].head, &per_head) {
                    (Some(h), Some(ph)) => ph[pi * n + k][h] as f64,
                    _ => whole[pi * n + k][0] as f64,
                })
                .collect();
        }
        ci = end;
    }
    Ok(out)
}
