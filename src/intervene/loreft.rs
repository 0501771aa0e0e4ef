//! LoReFT (sourceless baseline): `Φ(h) = h + Rᵀ(W h + b − R h)`, R with orthonormal rows.
use super::orth::{random_orthonormal, retract};
use super::{ApplyCtx, Intervention, Param};
use crate::util::rng::Rng;
use anyhow::Result;
use candle_core::{Device, Tensor, Var};

/// The three trainable tensors: `r` `[rank, d]` (orthonormal rows), `w` `[rank, d]`, `bias` `[rank]`.
/// Cloning shares the variables (candle `Var`s are reference-counted).
#[derive(Clone)]
pub struct LoReft {
    pub r: Var,
    pub w: Var,
    pub bias: Var,
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

impl LoReft {
    /// From saved tensors (`r` and `w` `[rank, d]`, `bias` `[rank]`).
    pub fn from_tensors(r: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Self> {
        let (k, d) = r.dims2()?;
        if w.dims() != [k, d] || bias.dims() != [k] {
            anyhow::bail!("LoReFT shapes differ: rotation {:?}, weight {:?}, bias {:?}", r.dims(), w.dims(), bias.dims());
        }
        Ok(Self { r: Var::from_tensor(r)?, w: Var::from_tensor(w)?, bias: Var::from_tensor(bias)? })
    }

    /// `Φ(h) − h = Rᵀ(W h + b − R h)` for `h` `[..., d]` (any leading dims), in `h`'s dtype.
    pub fn delta(&self, h: &Tensor) -> Result<Tensor> {
        let r = self.r.as_tensor();
        let target = h.broadcast_matmul(&self.w.as_tensor().t()?)?.broadcast_add(self.bias.as_tensor())?;
        let cur = h.broadcast_matmul(&r.t()?)?;
        Ok((target - cur)?.broadcast_matmul(r)?)
    }
}

impl Intervention for LoReft {
    fn kind(&self) -> &'static str {
        "loreft"
    }
    fn apply(&self, base: &Tensor, _source: &Tensor, _: ApplyCtx) -> Result<Tensor> {
        Ok((base + self.delta(base)?)?)
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
    fn replayable(&self) -> bool {
        true
    }
    fn uses_source(&self) -> bool {
        false
    }
}
