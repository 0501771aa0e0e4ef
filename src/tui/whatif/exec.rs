//! Carrying out a [`WhatIf`] (model worker thread only): the intervened next-token logits.
//!
//! Site interventions replace the site's vector at the chosen positions for the rest of one
//! forward pass: zeros; the mean of the site's vectors over the prompt's own positions (a quick
//! what-if has no dataset to average over); or the source prompt's vector at the same position
//! (`last` pairs last with last, so prompts of different lengths can be swapped there).
use super::{Kind, Pos, WhatIf};
use crate::adapters::AnyAdapter;
use crate::intervene::replace::Replace;
use crate::model::{Collector, Fwd, Hooks, LinearAdapter, Loaded, LogitsAt, Site};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use std::path::Path;

/// `[t, w]` activations of `ids` at (layer, site).
fn collect(l: &Loaded, ids: &[u32], layer: usize, site: Site) -> Result<Vec<Vec<f32>>> {
    let mut c = Collector::new([(layer, site)]);
    l.model.forward(&[ids.to_vec()], Fwd { hooks: Some(&mut c), logits: LogitsAt::None, ..Default::default() })?;
    let Some(a) = c.get(layer, site) else { bail!("site {site} of layer {layer} was not reached") };
    Ok(a.get(0)?.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

fn positions(pos: Pos, t: usize) -> Result<Vec<usize>> {
    match pos {
        Pos::Last => Ok(vec![t - 1]),
        Pos::All => Ok((0..t).collect()),
        Pos::At(p) if p < t => Ok(vec![p]),
        Pos::At(p) => bail!("position {p} is past the prompt's {t} tokens (0..{})", t - 1),
    }
}

fn fwd_last<'a>(l: &Loaded, ids: &[u32], hooks: Option<&'a mut dyn Hooks>, adapter: Option<&'a dyn LinearAdapter>) -> Result<Vec<f32>> {
    let out = l.model.forward(&[ids.to_vec()], Fwd { hooks, adapter, logits: LogitsAt::Last, ..Default::default() })?;
    Ok(out.logits.expect("requested logits").get(0)?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

/// Last-position logits of `ids` with `w` applied.
pub fn logits(l: &Loaded, ids: &[u32], w: &WhatIf) -> Result<Vec<f32>> {
    if w.kind == Kind::Adapter {
        let ad = AnyAdapter::load(Path::new(&w.adapter), &l.model.cfg, l.model.device())?;
        return fwd_last(l, ids, None, Some(&ad));
    }
    if w.layer >= l.model.cfg.num_layers {
        bail!("layer {} is past the model's {} blocks", w.layer, l.model.cfg.num_layers);
    }
    let t = ids.len();
    let ps = positions(w.pos, t)?;
    let rows: Vec<(usize, Vec<f32>)> = match w.kind {
        Kind::Zero => {
            let width = collect(l, &ids[..1], w.layer, w.site)?[0].len();
            ps.iter().map(|&p| (p, vec![0.0; width])).collect()
        }
        Kind::Mean => {
            let acts = collect(l, ids, w.layer, w.site)?;
            let mut mean = vec![0f32; acts[0].len()];
            for a in &acts {
                mean.iter_mut().zip(a).for_each(|(m, x)| *m += x / t as f32);
            }
            ps.iter().map(|&p| (p, mean.clone())).collect()
        }
        Kind::Swap => {
            let src = l.tok.encode(&w.source)?;
            if src.is_empty() {
                bail!("the source prompt has no tokens");
            }
            let acts = collect(l, &src, w.layer, w.site)?;
            let s = acts.len();
            let from = |p: usize| -> Result<usize> {
                match w.pos {
                    Pos::Last => Ok(s - 1),
                    Pos::All if s != t => bail!("swap at all positions needs prompts of equal length (base {t} tokens, source {s})"),
                    _ if p >= s => bail!("position {p} is past the source prompt's {s} tokens"),
                    _ => Ok(p),
                }
            };
            ps.iter().map(|&p| Ok((p, acts[from(p)?].clone()))).collect::<Result<_>>()?
        }
        Kind::Adapter => unreachable!("handled above"),
    };
    let (at, vals): (Vec<usize>, Vec<Vec<f32>>) = rows.into_iter().unzip();
    let width = vals.first().map_or(0, Vec::len);
    let with = Tensor::from_vec(vals.concat(), (1, at.len(), width), l.model.device())?.to_dtype(l.model.dtype())?;
    let mut hook = Replace::at(w.layer, w.site, at, with);
    fwd_last(l, ids, Some(&mut hook), None)
}
