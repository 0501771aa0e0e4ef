//! LoReFT (sourceless baseline): `Φ(h) = h + Rᵀ(W h + b − R h)`, R with orthonormal rows.
use super::orth::{random_orthonormal, retract};
use super::{ApplyCtx, Intervention, Param};
use crate::util::rng::Rng;
use anyhow::Result;
use candle_core::{Device, Tensor, Var};

pub struct LoReft {
    r: Var,
    w: Var,
    bias: Var,
}

impl LoReft {
    pub fn new(d: usize, rank: usize, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = Rng::new(seed ^ 0x5EED);
        let scale = 1.0 / (d as f64).sqrt();
        let w: Vec<f32> = (0..rank * d).map(|_| (rng.normal() * scale) as f32).collect();
        Ok(Self {
            r: Var::from_tensor(&random_orthonormal(rank, d, seed, device)?)?,
            w: Var::from_tensor(&Tensor::from_vec(w, (rank, d), device)?)?,
            bias: Var::from_tensor(&Tensor::zeros(rank, candle_core::DType::F32, device)?)?,
        })
    }
}

impl Intervention for LoReft {
    fn kind(&self) -> &'static str {
        "loreft"
    }
    fn apply(&self, base: &Tensor, _source: &Tensor, _: ApplyCtx) -> Result<Tensor> {
        let r = self.r.as_tensor();
        let target = base.matmul(&self.w.as_tensor().t()?)?.broadcast_add(self.bias.as_tensor())?;
        let cur = base.matmul(&r.t()?)?;
        Ok((base + (target - cur)?.matmul(r)?)?)
    }
    fn params(&self) -> Vec<Param> {
        vec![
            Param::orthonormal("rotation", &self.r),
            Param::new("weight", &self.w, "main"),
            Param::new("bias", &self.bias, "main"),
        ]
    }
    fn after_step(&mut self) -> Result<()> {
        retract(&self.r)
    }
    fn uses_source(&self) -> bool {
        false
    }
}
