//! The bridge between an [`Intervention`] and the forward pass: at one (layer, site), for each
//! batch row, the vector at that row's position (optionally only some heads' columns) is replaced
//! by `intervention.apply(base, source)`.
use super::{ApplyCtx, Intervention};
use crate::model::{Hooks, Site, SiteCtx};
use anyhow::{bail, Result};
use candle_core::{Tensor, D};

pub struct InterventionHook<'a> {
    pub layer: usize,
    pub site: Site,
    /// Position (within this batch's padded sequence) intervened in each row.
    pub positions: Vec<usize>,
    /// Source vectors `[b, w]` at the site (full site width), one per row.
    pub source: Tensor,
    /// Column subset (heads) or None for the whole vector.
    pub cols: Option<Tensor>,
    pub intervention: &'a dyn Intervention,
    pub ctx: ApplyCtx,
    /// The positions as a `[b, t, 1]` one-hot already on the device (a captured evaluation
    /// reads them from a buffer rewritten per cell); `positions` is then ignored.
    pub onehot: Option<Tensor>,
}

impl Hooks for InterventionHook<'_> {
    fn wants(&self, layer: usize, site: Site) -> bool {
        layer == self.layer && site == self.site
    }
    fn on(&mut self, _: usize, _: Site, act: &Tensor, ctx: SiteCtx) -> Result<Option<Tensor>> {
        let (b, t, w) = act.dims3()?;
        let oh = match &self.onehot {
            Some(oh) if oh.dims() == [b, t, 1] => oh.to_dtype(act.dtype())?,
            Some(oh) => bail!("intervention one-hot of shape {:?} for activations [{b}, {t}, {w}]", oh.dims()),
            None => {
                if b != self.positions.len() {
                    bail!("intervention has {} positions for a batch of {b}", self.positions.len());
                }
                // One-hot over positions: gather and scatter stay differentiable and allocation-light.
                let mut oh = vec![0f32; b * t];
                for (i, &p) in self.positions.iter().enumerate() {
                    let p = p.checked_sub(ctx.pos_offset).filter(|&p| p < t);
                    let Some(p) = p else { bail!("intervened position out of range for this call") };
                    oh[i * t + p] = 1.0;
                }
                Tensor::from_vec(oh, (b, t, 1), act.device())?.to_dtype(act.dtype())?
            }
        };
        // Interventions work in f32 whatever the model's dtype.
        let old = act.broadcast_mul(&oh)?.sum(1)?.to_dtype(candle_core::DType::F32)?; // [b, w]
        let new = match &self.cols {
            None => self.intervention.apply(&old, &self.source, self.ctx)?,
            Some(cols) => {
                let ob = old.index_select(cols, D::Minus1)?;
                let sb = self.source.index_select(cols, D::Minus1)?;
                let nb = self.intervention.apply(&ob, &sb, self.ctx)?;
                old.index_add(cols, &(nb - ob)?, 1)?
            }
        };
        if new.dims() != [b, w] {
            bail!("intervention returned shape {:?}, expected [{b}, {w}]", new.dims());
        }
        let delta = (new - old)?.unsqueeze(1)?.to_dtype(act.dtype())?; // [b, 1, w]
        Ok(Some((act + delta.broadcast_mul(&oh)?)?))
    }
}
