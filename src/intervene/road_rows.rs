//! RoAd1 as a sourceless intervention `Φ(h) = R h` on one site of one block, at the last prompt
//! token only (METHODS §4), trained per task by `compose`. It lives here because every activation
//! replacement does; it is its own hook (not an [`super::Intervention`]) since each batch row
//! switches on its own subset of blocks. Each row of a batch may switch on a different subset of the 2D blocks:
//! an inactive block has θ = 0, α = 1 (identity), so tasks trained on disjoint blocks compose.
use crate::model::{Hooks, Site, SiteCtx};
use crate::adapters::{Rotation, Variant};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor, Var};

pub struct RoadIntervention {
    pub layer: usize,
    pub site: Site,
    pub rot: Rotation,
    /// One θ and one α per 2D block (RoAd1): `[d/2]` each.
    pub theta: Var,
    pub alpha: Var,
    /// `[b, d/2]` 0/1 mask of active blocks per row of the current batch.
    row_masks: Option<Tensor>,
}

impl RoadIntervention {
    /// Identity-initialised RoAd1 on `dim` features with the given pairing.
    pub fn new(layer: usize, site: Site, dim: usize, group_size: usize, device: &Device) -> Result<Self> {
        let rot = Rotation::new(Variant::Road1, group_size, dim)?;
        let (t, a) = rot.identity_params(device)?;
        Ok(Self { layer, site, rot, theta: Var::from_tensor(&t)?, alpha: Var::from_tensor(&a)?, row_masks: None })
    }

    /// Back to the identity (θ = 0, α = 1), e.g. before a second training.
    pub fn reset(&mut self) -> Result<()> {
        let (t, a) = self.rot.identity_params(self.theta.device())?;
        self.theta.set(&t)?;
        self.alpha.set(&a)?;
        Ok(())
    }

    pub fn n_blocks(&self) -> usize {
        self.rot.dim / 2
    }

    /// Set the active blocks of each row (`masks[row][block]`).
    pub fn set_rows(&mut self, masks: &[Vec<f32>]) -> Result<()> {
        let nb = self.n_blocks();
        if masks.iter().any(|m| m.len() != nb) {
            bail!("block mask must have {nb} entries per row");
        }
        let flat: Vec<f32> = masks.iter().flatten().copied().collect();
        self.row_masks = Some(Tensor::from_vec(flat, (masks.len(), nb), self.theta.device())?);
        Ok(())
    }

    /// Per-row `(first, second)` columns `[b, 1, d]` with inactive blocks at identity.
    fn row_columns(&self, m: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, _) = m.dims2()?;
        let (d, g) = (self.rot.dim, self.rot.group_size);
        let theta = m.broadcast_mul(self.theta.as_tensor())?;
        let alpha = (m.broadcast_mul(&(self.alpha.as_tensor() - 1.0)?)? + 1.0)?;
        // RoAd1 layout: the value of pair i sits on both members (j and j + g/2 of its group).
        let expand = |p: &Tensor| -> Result<Tensor> {
            let p = p.reshape((b, d / g, 1, g / 2))?;
            Ok(Tensor::cat(&[&p, &p], 2)?.reshape((b, 1, d))?)
        };
        let (t, a) = (expand(&theta)?, expand(&alpha)?);
        Ok(((&a * t.cos()?)?, (&a * t.sin()?)?))
    }
}

impl Hooks for RoadIntervention {
    fn wants(&self, layer: usize, site: Site) -> bool {
        layer == self.layer && site == self.site
    }
    fn on(&mut self, _layer: usize, _site: Site, act: &Tensor, ctx: SiteCtx) -> Result<Option<Tensor>> {
        // Prompt pass only: generated tokens (decode steps) are not intervened on.
        if ctx.pos_offset > 0 {
            return Ok(None);
        }
        let Some(m) = &self.row_masks else { bail!("RoadIntervention: set_rows before the forward pass") };
        let (b, t, _) = act.dims3()?;
        if m.dim(0)? != b {
            bail!("RoadIntervention: masks for {} rows, batch has {b}", m.dim(0)?);
        }
        let (f, s) = self.row_columns(m)?;
        let (f, s) = (f.to_dtype(act.dtype())?, s.to_dtype(act.dtype())?);
        // Prompts are left-padded, so the last prompt token is the last column.
        let last = act.narrow(1, t - 1, 1)?;
        let new_last = self.rot.apply(&last, &f, &s)?;
        let out = if t == 1 { new_last } else { Tensor::cat(&[&act.narrow(1, 0, t - 1)?, &new_last], 1)? };
        Ok(Some(out))
    }
}

/// Block masks: A = the first half of the 2D blocks, B = the second half.
pub fn half_masks(n_blocks: usize) -> (Vec<f32>, Vec<f32>) {
    let a: Vec<f32> = (0..n_blocks).map(|i| if i < n_blocks / 2 { 1.0 } else { 0.0 }).collect();
    let b: Vec<f32> = a.iter().map(|x| 1.0 - x).collect();
    (a, b)
}

