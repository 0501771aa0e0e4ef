//! RoAd-DII: RoAd's block-diagonal 2x2 rotations as the intervention basis. Each 2D block is an
//! independent 2-dim subspace; a selection of rotated coordinates is swapped from source into
//! base and the result mapped back with the exact inverse:
//! `out = R⁻¹((1−m)⊙Rb + m⊙Rs)`. O(d) parameters, element-wise compute.
//!
//! Swapping *both* coordinates of a block makes its angle irrelevant, so selections act on the
//! first coordinate of each block by default: the angle then chooses which direction of the
//! block's plane is interchanged.
use super::{Annealed, ApplyCtx, Intervention, Param, RoadSelection};
use crate::adapters::{Rotation, Variant};
use crate::util::rng::Rng;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};

enum Selection {
    /// A fixed 0/1 mask over rotated coordinates.
    Fixed(Tensor),
    /// m = σ(w/T) per rotated coordinate, penalty λ·mean(m).
    Learned { w: Var, temp: Annealed, lambda: f64 },
    /// Boundless over the coordinate order (block first-coordinates first): β learned.
    Boundless { beta: Var, order: Tensor, temp: Annealed, lambda: f64 },
}

pub struct RoadDii {
    rot: Rotation,
    theta: Var,
    alpha: Var,
    train_alpha: bool,
    sel: Selection,
}

/// Is dim `j` the first coordinate of its 2D block (RoAd's pairing j <-> j + g/2)?
fn is_first(j: usize, g: usize) -> bool {
    j % g < g / 2
}

/// Block index of a first coordinate, in natural order.
fn block_index(j: usize, g: usize) -> usize {
    (j / g) * (g / 2) + j % g
}

/// RoAd-DII's own settings (from its [`super::InterventionSpec`] variant).
pub struct RoadDiiOptions {
    /// Blocks swapped by the fixed selection.
    pub rank: usize,
    pub variant: Variant,
    pub group_size: usize,
    pub selection: RoadSelection,
    pub temperature: [f64; 2],
    pub penalty: f64,
}

impl RoadDii {
    pub fn new(d: usize, spec: &RoadDiiOptions, seed: u64, device: &Device) -> Result<Self> {
        let variant = spec.variant;
        let rot = Rotation::new(variant, spec.group_size, d)?;
        let g = spec.group_size;
        let n = variant.param_len(d);
        let mut rng = Rng::new(seed ^ 0xA11CE);
        // Small random angles break the symmetry between the two coordinates of a block.
        let theta: Vec<f32> = (0..n).map(|_| (rng.normal() * 0.1) as f32).collect();
        let theta = Var::from_tensor(&Tensor::from_vec(theta, n, device)?)?;
        let alpha = Var::from_tensor(&Tensor::ones(n, DType::F32, device)?)?;
        let sel = match spec.selection {
            RoadSelection::Fixed => {
                let k = spec.rank;
                if k == 0 || k > d / 2 {
                    bail!("road_dii fixed selection: rank {k} must be in 1..={} (one coordinate per block)", d / 2);
                }
                let m: Vec<f32> = (0..d).map(|j| if is_first(j, g) && block_index(j, g) < k { 1.0 } else { 0.0 }).collect();
                Selection::Fixed(Tensor::from_vec(m, d, device)?)
            }
            RoadSelection::All => Selection::Fixed(Tensor::ones(d, DType::F32, device)?),
            RoadSelection::Learned => {
                // Start with first coordinates slightly open and second ones closed.
                let w: Vec<f32> = (0..d).map(|j| if is_first(j, g) { 0.0 } else { -2.0 }).collect();
                Selection::Learned { w: Var::from_tensor(&Tensor::from_vec(w, d, device)?)?, temp: Annealed::new(spec.temperature, device)?, lambda: spec.penalty }
            }
            RoadSelection::Boundless => {
                let order: Vec<f32> = (0..d)
                    .map(|j| {
                        let b = block_index(if is_first(j, g) { j } else { j - g / 2 }, g);
                        (if is_first(j, g) { b } else { d / 2 + b }) as f32
                    })
                    .collect();
                Selection::Boundless {
                    beta: Var::from_tensor(&Tensor::new(&[0.5f32], device)?)?,
                    order: Tensor::from_vec(order, d, device)?,
                    temp: Annealed::new(spec.temperature, device)?,
                    lambda: spec.penalty,
                }
            }
        };
        Ok(Self { rot, theta, alpha, train_alpha: variant != Variant::Road1, sel })
    }

    /// Build with explicit angles and a fixed mask (tests, and composing trained subspaces).
    pub fn with_params(rot: Rotation, theta: Tensor, alpha: Tensor, mask: Tensor) -> Result<Self> {
        let train_alpha = rot.variant != Variant::Road1;
        Ok(Self { rot, theta: Var::from_tensor(&theta)?, alpha: Var::from_tensor(&alpha)?, train_alpha, sel: Selection::Fixed(mask) })
    }

    fn mask(&self, ctx: ApplyCtx) -> Result<Tensor> {
        Ok(match &self.sel {
            Selection::Fixed(m) => m.clone(),
            Selection::Learned { w, temp, .. } => candle_nn::ops::sigmoid(&temp.divide(w.as_tensor(), ctx)?)?,
            Selection::Boundless { beta, order, temp, .. } => {
                let hi = (beta.as_tensor() * self.rot.dim as f64)?;
                let lower = candle_nn::ops::sigmoid(&temp.divide(order, ctx)?)?;
                let upper = candle_nn::ops::sigmoid(&temp.divide(&hi.broadcast_sub(order)?, ctx)?)?;
                (lower * upper)?
            }
        })
    }
}

impl Intervention for RoadDii {
    fn kind(&self) -> &'static str {
        "road_dii"
    }
    fn apply(&self, base: &Tensor, source: &Tensor, ctx: ApplyCtx) -> Result<Tensor> {
        let (f, s) = self.rot.columns(self.theta.as_tensor(), self.alpha.as_tensor())?;
        let rb = self.rot.apply(base, &f, &s)?;
        let rs = self.rot.apply(source, &f, &s)?;
        let m = self.mask(ctx)?;
        let mixed = (rb.broadcast_mul(&(1.0 - &m)?)? + rs.broadcast_mul(&m)?)?;
        self.rot.apply_inverse(&mixed, &f, &s)
    }
    fn replayable(&self) -> bool {
        true
    }
    fn write_step_inputs(&self, ctx: ApplyCtx) -> Result<()> {
        match &self.sel {
            Selection::Learned { temp, .. } | Selection::Boundless { temp, .. } => temp.write(ctx),
            Selection::Fixed(_) => Ok(()),
        }
    }
    fn params(&self) -> Vec<Param> {
        let mut v = vec![Param::new("road_theta", &self.theta, "main")];
        if self.train_alpha {
            v.push(Param::new("road_alpha", &self.alpha, "main"));
        }
        match &self.sel {
            Selection::Fixed(_) => {}
            Selection::Learned { w, .. } => v.push(Param::new("mask_logits", &w, "boundary")),
            Selection::Boundless { beta, .. } => v.push(Param::new("beta", &beta, "boundary")),
        }
        v
    }
    fn after_step(&mut self) -> Result<()> {
        if let Selection::Boundless { beta, .. } = &self.sel {
            beta.set(&beta.as_tensor().clamp(1e-3f32, 1f32)?)?;
        }
        Ok(())
    }
    fn penalty(&self) -> Result<Option<Tensor>> {
        Ok(match &self.sel {
            Selection::Fixed(_) => None,
            Selection::Learned { w, lambda, .. } => Some((candle_nn::ops::sigmoid(w.as_tensor())?.mean_all()? * *lambda)?),
            Selection::Boundless { beta, lambda, .. } => Some((beta.as_tensor().sum_all()? * *lambda)?),
        })
    }
    fn stats(&self, ctx: ApplyCtx) -> Vec<(String, f64)> {
        let dims = self
            .mask(ctx)
            .and_then(|m| Ok(m.ge(0.5f32)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?))
            .unwrap_or(f32::NAN) as f64;
        let mut v = vec![("subspace_dims".into(), dims)];
        match &self.sel {
            Selection::Learned { temp, .. } => v.push(("temperature".into(), temp.at(ctx))),
            Selection::Boundless { beta, temp, .. } => {
                v.push(("beta".into(), beta.as_tensor().to_vec1::<f32>().map(|x| x[0] as f64).unwrap_or(f64::NAN)));
                v.push(("temperature".into(), temp.at(ctx)));
            }
            Selection::Fixed(_) => {}
        }
        v
    }
}
