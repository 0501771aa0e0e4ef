//! Intervention kinds. Each maps (base vectors, source vectors) at the intervened units to new
//! base vectors; trainable kinds expose their variables. Adding a kind = one file + one line in
//! [`build`].
pub mod ablation;
pub mod boundless;
pub mod das;
pub mod hook;
pub mod loreft;
pub mod norm_swap;
pub mod orth;
pub mod replace;
pub mod road_dii;
pub mod sigmoid_mask;
pub mod vanilla;

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
    /// A few numbers worth logging (β, temperature, subspace size).
    fn stats(&self, _ctx: ApplyCtx) -> Vec<(String, f64)> {
        vec![]
    }
    fn is_trainable(&self) -> bool {
        !self.params().is_empty()
    }
}

/// Everything an intervention kind may need to be built.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterventionSpec {
    /// vanilla | zero | mean | das | rotation | boundless | sigmoid_mask | road_dii | magnitude | angle | loreft
    pub kind: String,
    /// Subspace rank (das, rotation: swapped rotated coords, loreft, road_dii with fixed blocks).
    #[serde(default)]
    pub rank: Option<usize>,
    /// Coordinates for vanilla/zero/mean (default: all).
    #[serde(default)]
    pub dims: Option<Vec<usize>>,
    /// RoAd-DII: road_1 | road_2 | road_4.
    #[serde(default = "default_variant")]
    pub road_variant: String,
    /// RoAd-DII pairing: 2 = adjacent dims (paper), 64 = peft's default grouping.
    #[serde(default = "default_group")]
    pub road_group_size: usize,
    /// RoAd-DII subspace selection: "fixed" (first `rank` blocks), "learned" (sigmoid mask per
    /// rotated coordinate), "boundless" (β over rotated coordinates).
    #[serde(default = "default_selection")]
    pub road_selection: String,
    /// Boundless / sigmoid-mask temperature schedule, start and end (linear).
    #[serde(default = "default_temperature")]
    pub temperature: [f64; 2],
    /// Weight of the subspace-size penalty (boundless: λ·β; masks: λ·mean(m)).
    #[serde(default = "default_penalty")]
    pub penalty: f64,
}

fn default_variant() -> String {
    "road_1".into()
}
fn default_group() -> usize {
    2
}
fn default_selection() -> String {
    "learned".into()
}
fn default_temperature() -> [f64; 2] {
    [50.0, 0.1]
}
fn default_penalty() -> f64 {
    1.0
}

impl Default for InterventionSpec {
    fn default() -> Self {
        Self {
            kind: "vanilla".into(),
            rank: None,
            dims: None,
            road_variant: default_variant(),
            road_group_size: default_group(),
            road_selection: default_selection(),
            temperature: default_temperature(),
            penalty: default_penalty(),
        }
    }
}

pub const KINDS: [&str; 11] =
    ["vanilla", "zero", "mean", "das", "rotation", "boundless", "sigmoid_mask", "road_dii", "magnitude", "angle", "loreft"];

/// Build an intervention on `d`-dim vectors. `mean` is the mean base activation (mean ablation).
pub fn build(spec: &InterventionSpec, d: usize, seed: u64, mean: Option<&Tensor>, device: &Device) -> Result<Box<dyn Intervention>> {
    let rank = || -> Result<usize> {
        let r = spec.rank.unwrap_or(1);
        if r == 0 || r > d {
            bail!("intervention rank {r} must be in 1..={d}");
        }
        Ok(r)
    };
    Ok(match spec.kind.as_str() {
        "vanilla" => Box::new(vanilla::Vanilla::new(d, spec.dims.as_deref(), device)?),
        "zero" => Box::new(ablation::Ablation::zero(d, spec.dims.as_deref(), device)?),
        "mean" => {
            let Some(m) = mean else { bail!("mean ablation needs the mean activation") };
            Box::new(ablation::Ablation::mean(d, spec.dims.as_deref(), m.clone(), device)?)
        }
        "das" => Box::new(das::LowRankDas::new(d, rank()?, seed, device)?),
        "rotation" => Box::new(boundless::RotatedSpace::fixed(d, rank()?, seed, device)?),
        "boundless" => Box::new(boundless::RotatedSpace::boundless(d, seed, spec.temperature, spec.penalty, device)?),
        "sigmoid_mask" => Box::new(sigmoid_mask::SigmoidMask::new(d, spec.temperature, spec.penalty, device)?),
        "road_dii" => Box::new(road_dii::RoadDii::new(d, spec, seed, device)?),
        "magnitude" => Box::new(norm_swap::NormSwap::magnitude()),
        "angle" => Box::new(norm_swap::NormSwap::angle()),
        "loreft" => Box::new(loreft::LoReft::new(d, rank()?, seed, device)?),
        other => bail!("unknown intervention kind {other:?}; expected one of: {}", KINDS.join(", ")),
    })
}

/// Whether a kind has parameters to train (so a run needs a train split and steps).
pub fn is_trainable_kind(spec: &InterventionSpec) -> bool {
    match spec.kind.as_str() {
        "vanilla" | "zero" | "mean" | "magnitude" | "angle" => false,
        _ => true,
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
