//! Every site's activation and `∂m/∂activation` for attribution patching, from one forward with
//! the fused inference kernels and one walk back through the frozen tail's hand-written backward
//! (`tail.rs`), for a metric `m` of the last real position's logits.
//!
//! The same numbers as candle's autograd through a hooked `a + 0` leaf at every site (tests/atp.rs
//! checks them against it), without autograd's zero-fill-and-add per node, the thrown-away weight
//! gradients, the per-site leaves, or — for the logit difference — the full-vocabulary logits:
//! `d(logit_a − logit_b)/d(last) = W[a] − W[b]` needs two rows of the head.
//!
//! GradDrop (AtP*): the gradient with layer ℓ's attention and MLP contributions passed on
//! without a gradient is the plain one above ℓ; at ℓ only the skip path carries it, and below ℓ
//! it is walked back again ([`Llama::dropped_grads`]), ℓ blocks instead of a full pass.
use super::tail::{BlockGrads, Saved};
use super::{last_rows, Fwd, Llama, Prepared, Site};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use std::collections::HashMap;

/// The per-row scalar whose gradient is taken, from the last real position's logits.
pub enum LastMetric<'a> {
    /// `logit[plus] − logit[minus]` (after Gemma 2's final soft-cap).
    LogitDiff { plus: &'a [u32], minus: &'a [u32] },
    /// `log softmax(logits)[target]`.
    Logprob { target: &'a [u32] },
}

/// One forward and backward: the metric per row, every block's saved activations and
/// `∂m/∂(block output)` and inner gradients.
pub struct SitePass {
    pub values: Vec<f64>,
    saved: Vec<Saved>,
    /// `∂m/∂(output of block l)` at index l.
    dys: Vec<Tensor>,
    grads: Vec<BlockGrads>,
    p: Prepared,
    neg_sin: Tensor,
}

impl SitePass {
    /// The activation of a site (`[b, t, w]`, the model's dtype).
    pub fn act(&self, layer: usize, site: Site) -> Result<&Tensor> {
        let s = self.saved.get(layer).ok_or_else(|| anyhow::anyhow!("layer {layer} is outside the model"))?;
        Ok(match site {
            Site::BlockInput => &s.x,
            Site::Q => &s.q,
            Site::K => &s.k,
            Site::V => &s.v,
            Site::HeadOutput => &s.attn.heads,
            Site::AttnOutput => &s.attn_out,
            Site::ResidMid => &s.h,
            Site::MlpOutput => &s.mlp_out,
            Site::BlockOutput => &s.y,
        })
    }

    /// `∂m/∂(site activation)` (`[b, t, w]`, f32).
    pub fn grad(&self, layer: usize, site: Site) -> Result<Tensor> {
        let (Some(dy), Some(g)) = (self.dys.get(layer), self.grads.get(layer)) else {
            bail!("layer {layer} is outside the model");
        };
        Ok(site_grad(site, dy, Some(g), self.act(layer, site)?)?.to_dtype(DType::F32)?)
    }
}

/// A site's gradient from its block's `∂m/∂y` and inner gradients (None: the block's attention
/// and MLP pass no gradient, GradDrop's dropped layer: only the residual stream carries one).
fn site_grad(site: Site, dy: &Tensor, g: Option<&BlockGrads>, act: &Tensor) -> Result<Tensor> {
    Ok(match (site, g) {
        (Site::BlockOutput | Site::MlpOutput, _) => dy.clone(),
        (Site::ResidMid | Site::AttnOutput, Some(g)) => g.dh.clone(),
        (Site::HeadOutput, Some(g)) => g.dheads.clone(),
        (Site::Q, Some(g)) => g.dq.clone(),
        (Site::K, Some(g)) => g.dk.clone(),
        (Site::V, Some(g)) => g.dv.clone(),
        (Site::BlockInput, Some(g)) => g.dx.clone(),
        (Site::ResidMid | Site::AttnOutput | Site::BlockInput, None) => dy.clone(),
        (Site::HeadOutput | Site::Q | Site::K | Site::V, None) => act.zeros_like()?,
    })
}

impl Llama {
    /// Forward from `start` (the layer-0 input, `[b, t, d]`; None = the ids' embeddings) and
    /// back from `metric`, keeping every site's activation and gradient. No cache, hooks or
    /// adapters: the frozen model on one batch (`fwd`'s attention mask is honoured).
    pub fn site_pass(&self, ids: &[Vec<u32>], fwd: Fwd<'_>, metric: &LastMetric<'_>) -> Result<SitePass> {
        let Fwd { attention_mask, cache, hooks, adapter, start, end, .. } = fwd;
        if cache.is_some() || hooks.is_some() || adapter.is_some() || end.is_some() || start.as_ref().is_some_and(|(l, _)| *l != 0) {
            bail!("a site pass runs the whole frozen model from layer 0, without cache, hooks or adapters");
        }
        let p = self.prepare(ids, attention_mask, 0)?;
        let (b, t, d) = (p.b, p.t, self.cfg.hidden_size);
        let mut x = match start {
            Some((_, x0)) if x0.dims() != [b, t, d] => bail!("site pass input must be [b={b}, t={t}, d={d}]"),
            Some((_, x0)) => x0.contiguous()?,
            None => self.embed_ids(ids, b, t)?,
        };
        let rows = match metric {
            LastMetric::LogitDiff { plus, minus } => [plus.len(), minus.len()],
            LastMetric::Logprob { target } => [target.len(); 2],
        };
        if rows != [b, b] {
            bail!("the metric names {} labels for a batch of {b}", rows[0]);
        }
        let neg_sin = p.rope.sin.neg()?;
        let mut saved = Vec::with_capacity(self.blocks.len());
        for blk in &self.blocks {
            let (y, s) = self.block_saved(blk, &x, &p, None)?;
            saved.push(s);
            x = y;
        }
        let idx = last_rows(&p.mask_rows, 0, t, &self.device)?;
        let hidden = self.rms(&x, &self.norm, false)?;
        let last = hidden.reshape((b * t, d))?.index_select(&idx, 0)?.to_dtype(DType::F32)?;
        let (values, dlast) = self.last_metric(&last, metric)?;
        let dhidden = Tensor::zeros((b * t, d), self.dtype, &self.device)?.index_add(&idx, &dlast.to_dtype(self.dtype)?, 0)?.reshape((b, t, d))?;
        let mut dy = self.rms_bwd(&x, &self.norm, &dhidden)?;
        let (mut dys, mut grads) = (Vec::with_capacity(saved.len()), Vec::with_capacity(saved.len()));
        for (blk, s) in self.blocks.iter().zip(&saved).rev() {
            let g = self.block_bwd(blk, s, &dy, &p, &neg_sin)?;
            dys.push(std::mem::replace(&mut dy, g.dx.clone()));
            grads.push(g);
        }
        dys.reverse();
        grads.reverse();
        Ok(SitePass { values, saved, dys, grads, p, neg_sin })
    }

    /// Per-row metric values and `∂m/∂last` (`[b, d]`, f32) from the final-normed last rows.
    fn last_metric(&self, last: &Tensor, metric: &LastMetric<'_>) -> Result<(Vec<f64>, Tensor)> {
        let dev = &self.device;
        // Gemma 2's final soft-cap c·tanh(z/c) and its derivative 1 − tanh².
        let cap = |raw: Tensor| -> Result<(Tensor, Tensor)> {
            Ok(match self.cfg.arch.final_softcap {
                Some(c) => {
                    let th = (raw / c)?.tanh()?;
                    ((&th * c)?, th.sqr()?.affine(-1.0, 1.0)?)
                }
                None => (raw.clone(), raw.ones_like()?),
            })
        };
        let (values, dlast) = match metric {
            LastMetric::LogitDiff { plus, minus } => {
                // Two rows of the head, in f32 (not the whole head: a bf16 model's is 10⁷+ values).
                let rows = |ids: &[u32]| self.lm_head.index_select(&Tensor::new(ids, dev)?, 0)?.to_dtype(DType::F32);
                let (wp, wm) = (rows(plus)?, rows(minus)?);
                let (lp, dp) = cap((last * &wp)?.sum_keepdim(D::Minus1)?)?;
                let (lm, dm) = cap((last * &wm)?.sum_keepdim(D::Minus1)?)?;
                ((lp - lm)?, (wp.broadcast_mul(&dp)? - wm.broadcast_mul(&dm)?)?)
            }
            LastMetric::Logprob { target } => {
                let head = self.lm_head.to_dtype(DType::F32)?;
                let (logits, dcap) = cap(last.matmul(&head.t()?)?)?;
                let tgt = Tensor::new(*target, dev)?.unsqueeze(1)?;
                let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
                // d log p[target] / d logits = onehot − softmax.
                let one = Tensor::ones((target.len(), 1), DType::F32, dev)?;
                let dlogits = logp.exp()?.neg()?.scatter_add(&tgt, &one, 1)?;
                (logp.gather(&tgt, 1)?, (dlogits * dcap)?.matmul(&head)?)
            }
        };
        let values = values.flatten_all()?.to_vec1::<f32>()?.into_iter().map(f64::from).collect();
        Ok((values, dlast))
    }

    /// GradDrop's gradients with layer `layer`'s attention and MLP outputs passing no gradient,
    /// for the `wanted` sites at layers ≤ `layer` (above it they are the plain ones).
    pub fn dropped_grads(&self, pass: &SitePass, layer: usize, wanted: &[(usize, Site)]) -> Result<HashMap<(usize, Site), Tensor>> {
        let Some(dy) = pass.dys.get(layer) else {
            bail!("layer {layer} is outside the model");
        };
        let mut out = HashMap::new();
        for &(l, s) in wanted.iter().filter(|u| u.0 == layer) {
            out.insert((l, s), site_grad(s, dy, None, pass.act(l, s)?)?.to_dtype(DType::F32)?);
        }
        let Some(lowest) = wanted.iter().map(|u| u.0).filter(|&l| l < layer).min() else {
            return Ok(out);
        };
        // Skip path only through `layer`: its block's input gradient is dy itself.
        let mut dy = dy.clone();
        for li in (lowest..layer).rev() {
            let g = self.block_bwd(&self.blocks[li], &pass.saved[li], &dy, &pass.p, &pass.neg_sin)?;
            for &(l, s) in wanted.iter().filter(|u| u.0 == li) {
                out.insert((l, s), site_grad(s, &dy, Some(&g), pass.act(l, s)?)?.to_dtype(DType::F32)?);
            }
            dy = g.dx;
        }
        Ok(out)
    }
}
