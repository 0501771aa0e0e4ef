//! Carrying out a [`WhatIf`] (model worker thread only): the intervened next-token logits.
//!
//! Site interventions build the experiment kind (`InterventionSpec::build`), apply it to the clean
//! vectors at the chosen positions, and write the result there for the rest of one forward pass.
//! Mean ablation uses the mean over the prompt's own positions (a quick what-if has no dataset);
//! source vectors come from the source prompt at the same position (`last` pairs last with last,
//! so prompts of different lengths can be swapped there).
use super::{Kind, Pos, WhatIf};
use crate::adapters::AnyAdapter;
use crate::intervene::replace::Replace;
use crate::intervene::ApplyCtx;
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
    let spec = match &w.kind {
        Kind::Adapter => {
            let ad = AnyAdapter::load(Path::new(&w.adapter), &l.model.cfg, l.model.device())?;
            return fwd_last(l, ids, None, Some(&ad));
        }
        Kind::Site(spec) => spec,
    };
    if w.layer >= l.model.cfg.num_layers {
        bail!("layer {} is past the model's {} blocks", w.layer, l.model.cfg.num_layers);
    }
    let t = ids.len();
    let ps = positions(w.pos, t)?;
    let dev = l.model.device();
    let base = collect(l, ids, w.layer, w.site)?;
    let width = base[0].len();
    let rows = |acts: &[Vec<f32>], at: &[usize]| -> Result<Tensor> {
        let flat: Vec<f32> = at.iter().flat_map(|&p| acts[p].iter().copied()).collect();
        Ok(Tensor::from_vec(flat, (at.len(), width), dev)?)
    };
    // A quick what-if has no dataset: the mean ablation's statistics are the prompt's own mean.
    let mean = match spec.needs_statistics() {
        true => Some(rows(&base, &(0..t).collect::<Vec<_>>())?.mean(0)?),
        false => None,
    };
    let iv = spec.build(width, 0, mean.as_ref(), dev)?;
    let base_rows = rows(&base, &ps)?;
    let source = if spec.uses_source() {
        let src = l.tok.encode(&w.source)?;
        if src.is_empty() {
            bail!("the source prompt has no tokens");
        }
        let acts = collect(l, &src, w.layer, w.site)?;
        let s = acts.len();
        let from = |p: usize| -> Result<usize> {
            match w.pos {
                Pos::Last => Ok(s - 1),
                Pos::All if s != t => bail!("{} at all positions needs prompts of equal length (base {t} tokens, source {s})", spec.kind_name()),
                _ if p >= s => bail!("position {p} is past the source prompt's {s} tokens"),
                _ => Ok(p),
            }
        };
        rows(&acts, &ps.iter().map(|&p| from(p)).collect::<Result<Vec<_>>>()?)?
    } else {
        base_rows.clone()
    };
    // The same `apply` an experiment cell runs, on the clean vectors at the chosen positions.
    let new = iv.apply(&base_rows, &source, ApplyCtx::EVAL)?;
    let with = new.reshape((1, ps.len(), width))?.to_dtype(l.model.dtype())?;
    let mut hook = Replace::at(w.layer, w.site, ps, with);
    fwd_last(l, ids, Some(&mut hook), None)
}
