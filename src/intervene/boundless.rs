//! Full-rotation interventions: swap the first k rotated coordinates (fixed k), or Boundless DAS
//! with a learned soft boundary β: `m_i = σ(i/T)·σ((β·d − i)/T)`,
//! `out = Rᵀ((1−m)⊙Rb + m⊙Rs)`, β ∈ [1e-3, 1] (init 0.5), T annealed, loss + λ·β.
use super::orth::{random_orthonormal, retract};
use super::{Annealed, ApplyCtx, Intervention, Param};
use anyhow::Result;
use candle_core::{Device, Tensor, Var};

pub struct RotatedSpace {
    r: Var,
    d: usize,
    mode: Mode,
}

enum Mode {
    Fixed { mask: Tensor, k: usize },
    Boundless { beta: Var, temp: Annealed, lambda: f64, index: Tensor },
}

impl RotatedSpace {
    pub fn fixed(d: usize, k: usize, seed: u64, device: &Device) -> Result<Self> {
        let m: Vec<f32> = (0..d).map(|i| if i < k { 1.0 } else { 0.0 }).collect();
        Ok(Self {
            r: Var::from_tensor(&random_orthonormal(d, d, seed, device)?)?,
            d,
            mode: Mode::Fixed { mask: Tensor::from_vec(m, d, device)?, k },
        })
    }

    pub fn boundless(d: usize, seed: u64, temp: [f64; 2], lambda: f64, device: &Device) -> Result<Self> {
        let index = Tensor::arange(0f32, d as f32, device)?;
        Ok(Self {
            r: Var::from_tensor(&random_orthonormal(d, d, seed, device)?)?,
            d,
            mode: Mode::Boundless { beta: Var::from_tensor(&Tensor::new(&[0.5f32], device)?)?, temp: Annealed::new(temp, device)?, lambda, index },
        })
    }

    fn mask(&self, ctx: ApplyCtx) -> Result<Tensor> {
        match &self.mode {
            Mode::Fixed { mask, .. } => Ok(mask.clone()),
            Mode::Boundless { beta, temp, index, .. } => {
                let hi = (beta.as_tensor() * self.d as f64)?;
                let lower = candle_nn::ops::sigmoid(&temp.divide(index, ctx)?)?;
                let upper = candle_nn::ops::sigmoid(&temp.divide(&hi.broadcast_sub(index)?, ctx)?)?;
                Ok((lower * upper)?)
            }
        }
    }
}

impl Intervention for RotatedSpace {
    fn kind(&self) -> &'static str {
        match self.mode {
            Mode::Fixed { .. } => "rotation",
            Mode::Boundless { .. } => "boundless",
        }
    }
    fn apply(&self, base: &Tensor, source: &Tensor, ctx: ApplyCtx) -> Result<Tensor> {
        let r = self.r.as_tensor();
        let rb = base.matmul(&r.t()?)?;
        let rs = source.matmul(&r.t()?)?;
        let m = self.mask(ctx)?;
        let mixed = (rb.broadcast_mul(&(1.0 - &m)?)? + rs.broadcast_mul(&m)?)?;
        Ok(mixed.matmul(r)?)
    }
    fn replayable(&self) -> bool {
        true
    }
    fn write_step_inputs(&self, ctx: ApplyCtx) -> Result<()> {
        match &self.mode {
            Mode::Boundless { temp, .. } => temp.write(ctx),
            Mode::Fixed { .. } => Ok(()),
        }
    }
    fn params(&self) -> Vec<Param> {
        let mut v = vec![Param::orthonormal("rotation", &self.r)];
        if let Mode::Boundless { beta, .. } = &self.mode {
            v.push(Param::new("beta", &beta, "boundary"));
        }
        v
    }
    fn after_step(&mut self) -> Result<()> {
        retract(&self.r)?;
        if let Mode::Boundless { beta, .. } = &self.mode {
            beta.set(&beta.as_tensor().clamp(1e-3f32, 1f32)?)?;
        }
        Ok(())
    }
    fn penalty(&self) -> Result<Option<Tensor>> {
        Ok(match &self.mode {
            Mode::Boundless { beta, lambda, .. } => Some((beta.as_tensor().sum_all()? * *lambda)?),
            Mode::Fixed { .. } => None,
        })
    }
    fn stats(&self, ctx: ApplyCtx) -> Vec<(String, f64)> {
        match &self.mode {
            Mode::Fixed { k, .. } => vec![("subspace_dims".into(), *k as f64)],
            Mode::Boundless { beta, temp, .. } => {
                let b = beta.as_tensor().to_vec1::<f32>().map(|v| v[0] as f64).unwrap_or(f64::NAN);
                vec![
                    ("beta".into(), b),
                    ("temperature".into(), temp.at(ctx)),
                    ("subspace_dims".into(), (b * self.d as f64).round()),
                ]
            }
        }
    }
}
