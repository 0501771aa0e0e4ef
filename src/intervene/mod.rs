//! Intervention kinds. Each maps (base vectors, source vectors) at the intervened units to new
//! base vectors; trainable kinds expose their variables. Adding a kind = one file + one variant
//! of [`InterventionSpec`] (which builds it).
pub mod ablation;
pub mod atp;
pub mod boundless;
pub mod das;
pub mod hook;
pub mod loreft;
pub mod norm_swap;
pub mod orth;
pub mod replace;
pub mod road_dii;
pub mod road_rows;
pub mod sigmoid_mask;
pub mod spec;
pub mod vanilla;

pub use spec::{InterventionSpec, RoadSelection};

use anyhow::{bail, Result};
use candle_core::{Device, Tensor, Var};

/// Per-call context: training progress drives temperature schedules.
#[derive(Debug, Clone, Copy)]
pub struct ApplyCtx {
    /// Fraction of training done, in [0, 1]; 1 at evaluation.
    pub progress: f64,
    pub train: bool,
}

impl ApplyCtx {
    pub const EVAL: ApplyCtx = ApplyCtx { progress: 1.0, train: false };
}

/// A trainable variable with its learning-rate group ("main" or "boundary").
pub struct Param {
    pub name: String,
    pub var: Var,
    pub group: &'static str,
    /// Rows kept orthonormal (DAS/rotation/LoReFT's R): the trainer moves it on the Stiefel
    /// manifold (tangent-projected gradient, then the kind's retraction in `after_step`).
    pub orthonormal: bool,
}

impl Param {
    pub fn new(name: &str, var: &Var, group: &'static str) -> Self {
        Param { name: name.into(), var: var.clone(), group, orthonormal: false }
    }
    /// A variable whose rows stay orthonormal.
    pub fn orthonormal(name: &str, var: &Var) -> Self {
        Param { name: name.into(), var: var.clone(), group: "main", orthonormal: true }
    }
}

pub trait Intervention: Send + Sync {
    fn kind(&self) -> &'static str;
    /// `base`, `source`: `[n, d]`. Returns the intervened base vectors `[n, d]`.
    fn apply(&self, base: &Tensor, source: &Tensor, ctx: ApplyCtx) -> Result<Tensor>;
    fn params(&self) -> Vec<Param> {
        vec![]
    }
    /// Called after every optimiser step (retractions, clamps).
    fn after_step(&mut self) -> Result<()> {
        Ok(())
    }
    /// Extra loss term (boundless DAS: λ·β).
    fn penalty(&self) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// False for sourceless edits (LoReFT, RoAd edit): the source run can be skipped.
    fn uses_source(&self) -> bool {
        true
    }
    /// Whether `apply(b, b) == b` (every interchange does; ablations and edits do not), so a
    /// unit whose source vector equals its base vector leaves the run unchanged.
    fn identity_on_equal(&self) -> bool {
        self.uses_source()
    }
    /// Whether a training step is a function of the variables and the step's inputs only (no
    /// schedule read from `ctx.progress`, no randomness): such a step may be captured once
    /// into a CUDA graph and replayed (`experiment::step_graph`).
    fn replayable(&self) -> bool {
        false
    }
    /// Write the per-step values a replayed step reads from the device (an [`Annealed`]
    /// temperature), before each replay.
    fn write_step_inputs(&self, _ctx: ApplyCtx) -> Result<()> {
        Ok(())
    }
    /// A few numbers worth logging (β, temperature, subspace size).
    fn stats(&self, _ctx: ApplyCtx) -> Vec<(String, f64)> {
        vec![]
    }
    fn is_trainable(&self) -> bool {
        !self.params().is_empty()
    }
}

/// An annealed temperature `T` (linear from `schedule[0]` to `schedule[1]` over training) that
/// masks divide by. While training on a GPU, `1/T` lives in a one-element device buffer, so a
/// step captured into a CUDA graph reads each step's value (`Intervention::write_step_inputs`
/// writes it before a replay); multiplying by the buffer equals candle's `x / T` (its affine
/// op, `x · (1/T)`) bit for bit. Evaluation and the CPU use the host value directly.
pub struct Annealed {
    schedule: [f64; 2],
    inv: Tensor,
}

impl Annealed {
    pub fn new(schedule: [f64; 2], device: &Device) -> Result<Self> {
        Ok(Self { schedule, inv: Tensor::zeros(1, candle_core::DType::F32, device)? })
    }

    /// The temperature at `ctx`'s point of training.
    pub fn at(&self, ctx: ApplyCtx) -> f64 {
        temperature(self.schedule, ctx.progress)
    }

    /// Write `1/T` at `ctx` into the device buffer (a no-op off the GPU).
    pub fn write(&self, ctx: ApplyCtx) -> Result<()> {
        if self.inv.device().is_cuda() {
            self.inv.slice_set(&Tensor::new(&[(1.0 / self.at(ctx)) as f32], self.inv.device())?, 0, 0)?;
        }
        Ok(())
    }

    /// `x / T`, with `1/T` from the buffer in GPU training (written here, unless a graph is
    /// being recorded: then the replay writes it).
    pub fn divide(&self, x: &Tensor, ctx: ApplyCtx) -> Result<Tensor> {
        if !ctx.train || !self.inv.device().is_cuda() {
            return Ok((x / self.at(ctx))?);
        }
        if !crate::runtime::graph::capturing() {
            self.write(ctx)?;
        }
        Ok(x.broadcast_mul(&self.inv)?)
    }
}

/// A `[d]` 0/1 mask with ones at `dims` (all ones when None).
pub fn dim_mask(d: usize, dims: Option<&[usize]>, device: &Device) -> Result<Tensor> {
    let mut m = vec![0f32; d];
    match dims {
        None => m.iter_mut().for_each(|x| *x = 1.0),
        Some(ix) => {
            for &i in ix {
                if i >= d {
                    bail!("intervention dim {i} out of range (0..{d})");
                }
                m[i] = 1.0;
            }
        }
    }
    Ok(Tensor::from_vec(m, d, device)?)
}

/// Linear temperature schedule from `t[0]` to `t[1]`.
pub fn temperature(t: [f64; 2], progress: f64) -> f64 {
    t[0] + (t[1] - t[0]) * progress.clamp(0.0, 1.0)
}
