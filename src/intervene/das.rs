//! Low-rank DAS: `DII(b, s; R) = b + Rᵀ(R s − R b)`, R (r x d) with orthonormal rows, kept on
//! the Stiefel manifold by a QR retraction after every step.
use super::orth::{random_orthonormal, retract};
use super::{ApplyCtx, Intervention, Param};
use anyhow::Result;
use candle_core::{Device, Tensor, Var};

pub struct LowRankDas {
    pub r: Var,
}

impl LowRankDas {
    pub fn new(d: usize, rank: usize, seed: u64, device: &Device) -> Result<Self> {
        Ok(Self { r: Var::from_tensor(&random_orthonormal(rank, d, seed, device)?)? })
    }
}

impl Intervention for LowRankDas {
    fn kind(&self) -> &'static str {
        "das"
    }
    fn apply(&self, base: &Tensor, source: &Tensor, _: ApplyCtx) -> Result<Tensor> {
        let r = self.r.as_tensor();
        // Row vectors: (s − b) Rᵀ R is the component of s − b inside the subspace.
        let delta = (source - base)?.matmul(&r.t()?)?.matmul(r)?;
        Ok((base + delta)?)
    }
    fn params(&self) -> Vec<Param> {
        vec![Param::orthonormal("rotation", &self.r)]
    }
    fn after_step(&mut self) -> Result<()> {
        retract(&self.r)
    }
    fn replayable(&self) -> bool {
        true
    }
}
