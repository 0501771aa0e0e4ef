//! Magnitude-only and angle-only interchange: `b·‖s‖/‖b‖` and `‖b‖·s/‖s‖`.
use super::{ApplyCtx, Intervention};
use anyhow::Result;
use candle_core::{Tensor, D};

pub struct NormSwap {
    magnitude: bool,
}

impl NormSwap {
    pub fn magnitude() -> Self {
        Self { magnitude: true }
    }
    pub fn angle() -> Self {
        Self { magnitude: false }
    }
}

fn norm(x: &Tensor) -> Result<Tensor> {
    Ok(x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12f32, f32::MAX)?)
}

impl Intervention for NormSwap {
    fn kind(&self) -> &'static str {
        if self.magnitude {
            "magnitude"
        } else {
            "angle"
        }
    }
    fn apply(&self, base: &Tensor, source: &Tensor, _: ApplyCtx) -> Result<Tensor> {
        let (nb, ns) = (norm(base)?, norm(source)?);
        Ok(if self.magnitude {
            base.broadcast_mul(&ns.broadcast_div(&nb)?)?
        } else {
            source.broadcast_mul(&nb.broadcast_div(&ns)?)?
        })
    }
}
