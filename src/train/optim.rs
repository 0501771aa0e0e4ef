//! AdamW (decoupled weight decay, always explicit), global-norm gradient clipping, and a
//! saveable optimizer state for resumable runs. Our own, because candle's AdamW defaults
//! weight_decay to 0.01 and does not expose its moments for checkpointing.
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamWConfig {
    pub fn with_weight_decay(weight_decay: f64) -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay }
    }
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    params: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Optimizer steps taken (bias correction uses step + 1).
    pub step: usize,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        // Two separate allocations: on CUDA the update writes the moments in place.
        let m = params.iter().map(|(_, p)| p.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        let v = params.iter().map(|(_, p)| p.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { cfg, params, m, v, step: 0 })
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// One update with `grads[i]` for `params[i]` at learning rate `lr`.
    pub fn apply(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.apply_scaled(grads, lr, 1.0)
    }

    /// One update with the gradients scaled by `gscale` first (the clip factor of
    /// [`clip_scale`]: on CUDA the scaling happens inside the update's one launch per tensor).
    pub fn apply_scaled(&mut self, grads: &[Tensor], lr: f64, gscale: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            bail!("AdamW: {} gradients for {} parameters", grads.len(), self.params.len());
        }
        let AdamWConfig { beta1: b1, beta2: b2, eps, weight_decay: wd } = self.cfg;
        let t = (self.step + 1) as i32;
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        let step = super::optim_cuda::Step {
            lr: lr as f32,
            b1: b1 as f32,
            b2: b2 as f32,
            c1: c1 as f32,
            c2: c2 as f32,
            eps: eps as f32,
            wd: wd as f32,
            gscale: gscale as f32,
        };
        for (i, (_, p)) in self.params.iter().enumerate() {
            if super::optim_cuda::adamw(p, &self.m[i], &self.v[i], &grads[i], step)? {
                continue;
            }
            let g = grads[i].to_dtype(DType::F32)?;
            let g = if gscale != 1.0 { (g * gscale)? } else { g };
            let m = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let upd = ((&m / c1)? / ((&v / c2)?.sqrt()? + eps)?)?;
            let pt = p.as_tensor().to_dtype(DType::F32)?;
            let decayed = if wd != 0.0 { (&pt * (1.0 - lr * wd))? } else { pt };
            let new = (decayed - (upd * lr)?)?;
            p.set(&new.to_dtype(p.dtype())?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        self.step += 1;
        Ok(())
    }

    /// Moments under `m.<name>` / `v.<name>`; the step count goes in the caller's state file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut map = HashMap::new();
        for (i, (n, _)) in self.params.iter().enumerate() {
            map.insert(format!("m.{n}"), self.m[i].clone());
            map.insert(format!("v.{n}"), self.v[i].clone());
        }
        candle_core::safetensors::save(&map, path)?;
        Ok(())
    }

    pub fn load(&mut self, path: &Path, step: usize) -> Result<()> {
        let dev = self.m.first().map(|t| t.device().clone()).unwrap_or(candle_core::Device::Cpu);
        let map = candle_core::safetensors::load(path, &dev).with_context(|| format!("reading {}", path.display()))?;
        for (i, (n, _)) in self.params.iter().enumerate() {
            let (m, v) = (map.get(&format!("m.{n}")), map.get(&format!("v.{n}")));
            let (Some(m), Some(v)) = (m, v) else { bail!("{}: no optimizer state for {n}", path.display()) };
            if m.dims() != self.m[i].dims() {
                bail!("{}: optimizer state for {n} has shape {:?}, expected {:?}", path.display(), m.dims(), self.m[i].dims());
            }
            self.m[i] = m.clone();
            self.v[i] = v.clone();
        }
        self.step = step;
        Ok(())
    }
}

/// L2 norm over all gradients together.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    if grads.is_empty() {
        return Ok(0.0);
    }
    if let Some(s) = super::optim_cuda::sum_squares(grads)? {
        return Ok(s.sqrt());
    }
    // The per-tensor sums come back in one copy: on a GPU, a read per tensor was one device
    // synchronise per parameter tensor (420 for LoRA on SmolLM2). Summed in f64 on the host in
    // the same order as before, so the norm is bit-identical.
    let sums = grads.iter().map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all()).collect::<candle_core::Result<Vec<_>>>()?;
    let s: f64 = Tensor::stack(&sums, 0)?.to_vec1::<f32>()?.iter().map(|&x| x as f64).sum();
    Ok(s.sqrt())
}

/// The factor that brings a global gradient norm `norm` down to at most `max_norm` (1 when it
/// is already below, when there is no limit, or when the norm is not finite).
pub fn clip_scale(norm: f64, max_norm: Option<f64>) -> f64 {
    match max_norm {
        Some(c) if norm > c && norm.is_finite() => c / (norm + 1e-6),
        _ => 1.0,
    }
}

/// Scale all gradients so their global norm is at most `max_norm`; returns the norm before.
pub fn clip_global_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let n = global_norm(grads)?;
    let f = clip_scale(n, Some(max_norm));
    if f != 1.0 {
        for g in grads.iter_mut() {
            *g = (&*g * f)?;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The global norm and the clip against the squares summed in f64 here, over tensors of
    /// several shapes (a scalar, a vector, a matrix).
    #[test]
    fn global_norm_and_clip_match_a_direct_sum() {
        let dev = Device::Cpu;
        let vals: [Vec<f32>; 3] = [vec![3.0], vec![1.0, -2.0, 0.5], vec![0.25, -4.0, 2.0, 1.5, -0.75, 6.0]];
        let mut grads = vec![
            Tensor::new(vals[0][0], &dev).unwrap(),
            Tensor::new(vals[1].as_slice(), &dev).unwrap(),
            Tensor::from_vec(vals[2].clone(), (2, 3), &dev).unwrap(),
        ];
        let want = vals.iter().flatten().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        assert!((global_norm(&grads).unwrap() - want).abs() < 1e-9);
        assert_eq!(global_norm(&[]).unwrap(), 0.0);
        let before = clip_global_norm(&mut grads, 1.0).unwrap();
        assert!((before - want).abs() < 1e-9);
        assert!((global_norm(&grads).unwrap() - 1.0).abs() < 1e-5, "clipped to norm 1");
        assert_eq!(grads[2].dims(), &[2, 3]);
    }
}
