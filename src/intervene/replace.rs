//! The one hook that writes given vectors into the forward pass: at one (layer, site), the whole
//! activation, or the vectors at some positions, replaced by stored ones (activation patching,
//! ablation by a fixed vector, the TUI's what-if, the swap probe), or only their part in a
//! subspace (a rank-k interchange with a fixed basis, as IIT training and the patching table's
//! mean-difference direction use). Interventions that compute the new vector from the base
//! (DAS, RoAd-DII, …) go through [`super::hook::InterventionHook`] instead.
use crate::model::{Hooks, Site, SiteCtx};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;

/// Replaces activations at one (layer, site) with `with`, the whole activation (`at: None`,
/// `with` of the activation's shape `[b, t, w]`) or the vectors at absolute positions `at[j]`
/// (`with[:, j]`, so `with` is `[b, at.len(), w]`). With a `subspace` (orthonormal rows `U`,
/// `[k, w]`, or one unit vector `[w]`) only the replaced vectors' components in its span change:
/// `b + Uᵀ U (s − b)`; with `complement`, everything but that span: `b + (I − Uᵀ U)(s − b)`.
/// Gradients flow into `with` and the activation (IIT trains through it).
pub struct Replace {
    pub layer: usize,
    pub site: Site,
    pub at: Option<Vec<usize>>,
    pub with: Tensor,
    pub subspace: Option<Tensor>,
    pub complement: bool,
}

impl Replace {
    /// The whole activation at (layer, site) becomes `with` (same shape).
    pub fn whole(layer: usize, site: Site, with: Tensor) -> Self {
        Self { layer, site, at: None, with, subspace: None, complement: false }
    }

    /// The vectors at absolute positions `at` become `with[:, j]` (`[b, at.len(), w]`).
    pub fn at(layer: usize, site: Site, at: Vec<usize>, with: Tensor) -> Self {
        Self { layer, site, at: Some(at), with, subspace: None, complement: false }
    }

    /// Position `pos` takes the source run's vector there (`source` `[b, t, w]` at the same site).
    pub fn from_source(layer: usize, site: Site, pos: usize, source: &Tensor) -> Result<Self> {
        let t = source.dim(1)?;
        if pos >= t {
            bail!("patch position {pos} is past the source's {t} positions");
        }
        Ok(Self::at(layer, site, vec![pos], source.narrow(1, pos, 1)?))
    }

    /// Only the part in the span of `basis` rows (or, with `complement`, outside it) is replaced.
    pub fn within(mut self, basis: Option<Tensor>, complement: bool) -> Self {
        self.subspace = basis;
        self.complement = complement;
        self
    }

    /// The new vectors `[b, n, w]` for base vectors `base` and stored vectors `src`.
    fn mix(&self, base: &Tensor, src: &Tensor) -> Result<Tensor> {
        let Some(u) = &self.subspace else { return Ok(src.clone()) };
        let d = *u.dims().last().context("replacement subspace has no dimensions")?;
        let u = u.reshape((u.elem_count() / d, d))?;
        // [b, n, d] · Uᵀ → [b, n, k] · U → [b, n, d]
        let delta = (src - base)?;
        let proj = delta.broadcast_matmul(&u.t()?)?.broadcast_matmul(&u)?;
        Ok(if self.complement { (base + (delta - proj)?)? } else { (base + proj)? })
    }
}

impl Hooks for Replace {
    fn wants(&self, layer: usize, site: Site) -> bool {
        layer == self.layer && site == self.site
    }

    fn on(&mut self, _: usize, _: Site, act: &Tensor, ctx: SiteCtx) -> Result<Option<Tensor>> {
        let Some(at) = &self.at else {
            if act.dims() != self.with.dims() {
                bail!("replacement of shape {:?} does not fit the activation {:?} at {} of layer {}", self.with.dims(), act.dims(), self.site, self.layer);
            }
            return Ok(Some(self.mix(act, &self.with)?));
        };
        let (b, t, w) = act.dims3()?;
        let (wb, wn, ww) = self.with.dims3()?;
        if (wb, wn, ww) != (b, at.len(), w) {
            bail!("replacement [{wb}, {wn}, {ww}] does not fit {} positions of the activation [{b}, {t}, {w}]", at.len());
        }
        // (position in this call, row of `with`), in position order.
        let mut order = at
            .iter()
            .enumerate()
            .map(|(j, &p)| match p.checked_sub(ctx.pos_offset).filter(|&q| q < t) {
                Some(q) => Ok((q, j)),
                None => bail!("replaced position {p} is outside this call's positions {}..{}", ctx.pos_offset, ctx.pos_offset + t),
            })
            .collect::<Result<Vec<_>>>()?;
        order.sort_unstable();
        if order.windows(2).any(|w| w[0].0 == w[1].0) {
            bail!("a position is replaced twice");
        }
        let mut parts = Vec::with_capacity(2 * order.len() + 1);
        let mut next = 0;
        for (q, j) in order {
            if q > next {
                parts.push(act.narrow(1, next, q - next)?);
            }
            parts.push(self.mix(&act.narrow(1, q, 1)?, &self.with.narrow(1, j, 1)?)?);
            next = q + 1;
        }
        if next < t {
            parts.push(act.narrow(1, next, t - next)?);
        }
        Ok(Some(Tensor::cat(&parts, 1)?))
    }
}
