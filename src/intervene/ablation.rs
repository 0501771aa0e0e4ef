//! Zero and mean ablation of a coordinate set (sourceless).
use super::{dim_mask, ApplyCtx, Intervention};
use anyhow::Result;
use candle_core::{Device, Tensor};

pub struct Ablation {
    mask: Tensor,
    /// `[d]` replacement values: zeros or the dataset mean.
    fill: Option<Tensor>,
}

impl Ablation {
    pub fn zero(d: usize, dims: Option<&[usize]>, device: &Device) -> Result<Self> {
        Ok(Self { mask: dim_mask(d, dims, device)?, fill: None })
    }
    pub fn mean(d: usize, dims: Option<&[usize]>, mean: Tensor, device: &Device) -> Result<Self> {
        Ok(Self { mask: dim_mask(d, dims, device)?, fill: Some(mean.flatten_all()?) })
    }
}

impl Intervention for Ablation {
    fn kind(&self) -> &'static str {
        if self.fill.is_some() {
            "mean"
        } else {
            "zero"
        }
    }
    fn apply(&self, base: &Tensor, _source: &Tensor, _: ApplyCtx) -> Result<Tensor> {
        let keep = (1.0 - &self.mask)?;
        let kept = base.broadcast_mul(&keep)?;
        Ok(match &self.fill {
            Some(m) => kept.broadcast_add(&(m * &self.mask)?)?,
            None => kept,
        })
    }
    fn uses_source(&self) -> bool {
        false
    }
}
