//! Activation patching on the tiny model: for each residual site (the embeddings, then every
//! block_output) and each named position, swap the source's whole vector into the base run, and
//! a rank-1 interchange along the variable's class-mean difference; the table that tells which
//! sites can hold which equality variable before DAS looks for it.
use crate::intervene::replace::Replace;
use crate::model::{Collector, Fwd, Llama, LogitsAt, Site};
use crate::tasks::equality::{self, Variable};
use crate::tasks::{Pair, Prompt};
use crate::tokenizer::Tok;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};

/// One cell of the patching table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PatchCell {
    pub variable: String,
    /// `-1` = the embeddings (block_input of layer 0); else block_output of this layer.
    pub layer: i64,
    pub position: String,
    /// Fraction of pairs whose patched argmax over {true,false} equals the counterfactual label.
    pub iia: f64,
    /// The same over pairs whose counterfactual label differs from the base label.
    pub iia_changed: f64,
    /// IIA of a rank-1 DII along the difference of class means of the variable (fitted on
    /// separate pairs): a cheap lower bound on what a learned rank-1 DAS direction can do.
    pub iia_meandiff: f64,
    pub iia_meandiff_changed: f64,
    pub n: usize,
    pub n_changed: usize,
}

/// Argmax over the answer set of last-position logits.
fn answer_argmax(logits: &Tensor, pairs: &[Pair]) -> Result<Vec<u32>> {
    let l = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    Ok(pairs
        .iter()
        .zip(&l)
        .map(|(p, row)| {
            *p.answers
                .iter()
                .max_by(|&&a, &&b| row[a as usize].total_cmp(&row[b as usize]))
                .expect("answers")
        })
        .collect())
}

fn ids_of(pairs: &[Pair]) -> Result<(Vec<Vec<u32>>, Vec<Vec<u32>>)> {
    let base: Vec<Vec<u32>> = pairs.iter().map(|p| p.base.ids.clone()).collect();
    let src: Vec<Vec<u32>> = pairs.iter().map(|p| p.source.ids.clone()).collect();
    let t = base[0].len();
    if base.iter().chain(&src).any(|r| r.len() != t) {
        bail!("patching_table needs prompts of one length");
    }
    Ok((base, src))
}

/// The residual sites of the table: embeddings, then every block_output.
fn residual_sites(n_layers: usize) -> Vec<(usize, Site)> {
    let mut sites = vec![(0, Site::BlockInput)];
    sites.extend((0..n_layers).map(|l| (l, Site::BlockOutput)));
    sites
}

/// Activation patching of the whole residual vector: for each layer (embeddings, then every
/// block_output) and each named position, swap source into base and score vs the cf labels; and
/// a rank-1 DII along the class-mean difference of `value` (the variable's value in a prompt),
/// fitted on the prompts of `fit` pairs. All prompts must share one length and positions.
pub fn patching_table(
    model: &Llama,
    pairs: &[Pair],
    fit: &[Pair],
    value: &dyn Fn(&Prompt) -> bool,
    variable: &str,
    positions: &[&str],
) -> Result<Vec<PatchCell>> {
    if pairs.is_empty() || fit.is_empty() {
        bail!("no pairs");
    }
    let (base_ids, src_ids) = ids_of(pairs)?;
    let sites = residual_sites(model.cfg.num_layers);
    let collect = |ids: &[Vec<u32>]| -> Result<Collector> {
        let mut col = Collector::new(sites.clone());
        model.forward(ids, Fwd { hooks: Some(&mut col), logits: LogitsAt::None, ..Default::default() })?;
        Ok(col)
    };
    let col = collect(&src_ids)?;
    // Fitting prompts: bases and sources of `fit`, with the variable's value in each.
    let (fb, fs) = ids_of(fit)?;
    let fit_ids: Vec<Vec<u32>> = fb.into_iter().chain(fs).collect();
    let fit_val: Vec<bool> = fit.iter().map(|p| value(&p.base)).chain(fit.iter().map(|p| value(&p.source))).collect();
    let fit_col = collect(&fit_ids)?;
    let changed: Vec<bool> = pairs.iter().map(|p| p.cf_label != p.base.label).collect();
    let n_changed = changed.iter().filter(|&&c| c).count();
    let score = |pred: &[u32]| -> (f64, f64) {
        let hit: Vec<bool> = pred.iter().zip(pairs).map(|(a, p)| *a == p.cf_label).collect();
        let iia = hit.iter().filter(|&&h| h).count() as f64 / pairs.len() as f64;
        let hc = hit.iter().zip(&changed).filter(|(h, c)| **h && **c).count();
        (iia, if n_changed > 0 { hc as f64 / n_changed as f64 } else { f64::NAN })
    };
    let mut out = Vec::new();
    for (li, &(layer, site)) in sites.iter().enumerate() {
        for &pos in positions {
            let p = pairs[0].base.position(pos)?;
            let source = col.get(layer, site).context("collected activation")?;
            // Class-mean difference at this site and position, normalised.
            let acts = fit_col.get(layer, site).context("collected activation")?.narrow(1, p, 1)?.squeeze(1)?;
            let rows = acts.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            let d = rows[0].len();
            let (mut m1, mut m0, mut n1, mut n0) = (vec![0f64; d], vec![0f64; d], 0f64, 0f64);
            for (r, &v) in rows.iter().zip(&fit_val) {
                let (m, n) = if v { (&mut m1, &mut n1) } else { (&mut m0, &mut n0) };
                for (a, x) in m.iter_mut().zip(r) {
                    *a += *x as f64;
                }
                *n += 1.0;
            }
            let diff: Vec<f32> = m1.iter().zip(&m0).map(|(a, b)| (a / n1.max(1.0) - b / n0.max(1.0)) as f32).collect();
            let norm = diff.iter().map(|x| x * x).sum::<f32>().sqrt();
            let run = |direction: Option<Tensor>| -> Result<(f64, f64)> {
                let mut hook = Replace::from_source(layer, site, p, source)?.within(direction, false);
                let o = model.forward(&base_ids, Fwd { hooks: Some(&mut hook), logits: LogitsAt::Last, ..Default::default() })?;
                Ok(score(&answer_argmax(&o.logits.context("logits")?, pairs)?))
            };
            let (iia, iia_changed) = run(None)?;
            let (iia_md, iia_md_changed) = if norm > 1e-6 && n1 > 0.0 && n0 > 0.0 {
                let u: Vec<f32> = diff.iter().map(|x| x / norm).collect();
                run(Some(Tensor::from_vec(u, d, model.device())?.to_dtype(model.dtype())?))?
            } else {
                // No difference between the classes here (e.g. the `=` embedding): no effect.
                run(Some(Tensor::zeros(d, model.dtype(), model.device())?))?
            };
            out.push(PatchCell {
                variable: variable.to_string(),
                layer: li as i64 - 1,
                position: pos.to_string(),
                iia,
                iia_changed,
                iia_meandiff: iia_md,
                iia_meandiff_changed: iia_md_changed,
                n: pairs.len(),
                n_changed,
            });
        }
    }
    Ok(out)
}

/// Patching table for an equality variable: `n` test-split pairs scored, `n` train-split pairs
/// for fitting the mean-difference directions.
pub fn equality_patching(model: &Llama, tok: &Tok, variable: Variable, n: usize, seed: u64) -> Result<Vec<PatchCell>> {
    let ds = equality::dataset(tok, variable, [n, 0, n], seed)?;
    let (t_id, _) = equality::answer_ids(tok)?;
    let value = move |p: &Prompt| -> bool {
        match variable {
            Variable::Left => p.ids[0] == p.ids[1],
            Variable::Right => p.ids[2] == p.ids[3],
            Variable::Output => p.label == t_id,
        }
    };
    patching_table(model, &ds.test, &ds.train, &value, variable.name(), &equality::POSITIONS)
}
