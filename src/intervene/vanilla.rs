//! Vanilla interchange: `b[idx] ← s[idx]` (all dims = activation patching).
use super::{dim_mask, ApplyCtx, Intervention};
use anyhow::Result;
use candle_core::{Device, Tensor};

pub struct Vanilla {
    mask: Tensor,
}

impl Vanilla {
    pub fn new(d: usize, dims: Option<&[usize]>, device: &Device) -> Result<Self> {
        Ok(Self { mask: dim_mask(d, dims, device)? })
    }
}

impl Intervention for Vanilla {
    fn kind(&self) -> &'static str {
        "vanilla"
    }
    fn apply(&self, base: &Tensor, source: &Tensor, _: ApplyCtx) -> Result<Tensor> {
        let keep = (1.0 - &self.mask)?;
        Ok((base.broadcast_mul(&keep)? + source.broadcast_mul(&self.mask)?)?)
    }
    fn replayable(&self) -> bool {
        true
    }
}
