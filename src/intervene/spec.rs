//! What an experiment file's `[intervention]` table says: one variant per kind, each carrying
//! only its own fields (pyvene's one class per intervention type, with its kwargs). A key that a
//! kind does not take is an error naming it; adding a kind = one variant here + one file.
use super::atp::AtpOptions;
use super::{ablation, boundless, das, loreft, norm_swap, road_dii, sigmoid_mask, vanilla, Intervention};
use anyhow::{bail, Result};
use crate::adapters::Variant;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// Temperature schedule (start, end; linear) and subspace-size penalty of the learned-boundary
/// kinds.
fn default_temperature() -> [f64; 2] {
    [50.0, 0.1]
}
fn default_penalty() -> f64 {
    1.0
}
fn default_rank() -> usize {
    1
}
fn default_group() -> usize {
    2
}
fn default_variant() -> Variant {
    Variant::Road1
}

/// Which rotated coordinates RoAd-DII interchanges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RoadSelection {
    /// The first coordinate of the first `rank` blocks.
    Fixed,
    /// Every rotated coordinate.
    All,
    /// A sigmoid mask per rotated coordinate.
    #[default]
    Learned,
    /// Boundless over the coordinate order (β learned).
    Boundless,
}

/// `[intervention]`: the kind and its own fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum InterventionSpec {
    /// Interchange of every coordinate, or of `dims`.
    Vanilla {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dims: Option<Vec<usize>>,
    },
    /// Zero ablation (sourceless).
    Zero {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dims: Option<Vec<usize>>,
    },
    /// Mean ablation: the mean base activation over the train split (needs statistics).
    Mean {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dims: Option<Vec<usize>>,
    },
    /// Low-rank DAS: `b + Rᵀ(R s − R b)`, R `rank × d` with orthonormal rows.
    Das {
        #[serde(default = "default_rank")]
        rank: usize,
    },
    /// Full rotation, the first `rank` rotated coordinates interchanged.
    Rotation {
        #[serde(default = "default_rank")]
        rank: usize,
    },
    /// Boundless DAS: a full rotation with a learned boundary β.
    Boundless {
        #[serde(default = "default_temperature")]
        temperature: [f64; 2],
        #[serde(default = "default_penalty")]
        penalty: f64,
    },
    /// A learned sigmoid mask over the raw coordinates.
    SigmoidMask {
        #[serde(default = "default_temperature")]
        temperature: [f64; 2],
        #[serde(default = "default_penalty")]
        penalty: f64,
    },
    /// RoAd's block-diagonal 2×2 rotations as the basis.
    RoadDii {
        /// Blocks swapped by the fixed selection.
        #[serde(default = "default_rank")]
        rank: usize,
        /// The rotation family (`road_1`, `road_2`, `road_4`: the adapters' own variants).
        #[serde(default = "default_variant")]
        road_variant: Variant,
        /// 2 = adjacent dims (paper), 64 = peft's default grouping.
        #[serde(default = "default_group")]
        road_group_size: usize,
        #[serde(default)]
        road_selection: RoadSelection,
        #[serde(default = "default_temperature")]
        temperature: [f64; 2],
        #[serde(default = "default_penalty")]
        penalty: f64,
    },
    /// Interchange of the norm only (direction kept).
    Magnitude {},
    /// Interchange of the direction only (norm kept).
    Angle {},
    /// LoReFT, a sourceless learned edit in a rank-`rank` subspace.
    Loreft {
        #[serde(default = "default_rank")]
        rank: usize,
    },
    /// Attribution patching: every cell's vanilla patching effect estimated from gradients
    /// (`[intervention.atp]`); its verification patches for real, with `vanilla`.
    Atp {
        #[serde(default)]
        atp: AtpOptions,
    },
}

impl Default for InterventionSpec {
    fn default() -> Self {
        InterventionSpec::Vanilla { dims: None }
    }
}

impl InterventionSpec {
    /// One default spec per kind, in the order the TUI cycles them.
    pub fn all() -> Vec<InterventionSpec> {
        let t = default_temperature();
        let p = default_penalty();
        vec![
            InterventionSpec::Vanilla { dims: None },
            InterventionSpec::Zero { dims: None },
            InterventionSpec::Mean { dims: None },
            InterventionSpec::Das { rank: 1 },
            InterventionSpec::Rotation { rank: 1 },
            InterventionSpec::Boundless { temperature: t, penalty: p },
            InterventionSpec::SigmoidMask { temperature: t, penalty: p },
            InterventionSpec::RoadDii {
                rank: 1,
                road_variant: default_variant(),
                road_group_size: default_group(),
                road_selection: RoadSelection::default(),
                temperature: t,
                penalty: p,
            },
            InterventionSpec::Magnitude {},
            InterventionSpec::Angle {},
            InterventionSpec::Loreft { rank: 1 },
            InterventionSpec::Atp { atp: AtpOptions::default() },
        ]
    }

    /// Every kind's name, for messages.
    pub fn kind_names() -> Vec<&'static str> {
        Self::all().iter().map(|s| s.kind_name()).collect()
    }

    /// The default spec of the kind called `name`.
    pub fn from_kind(name: &str) -> Result<Self> {
        match Self::all().into_iter().find(|s| s.kind_name() == name) {
            Some(s) => Ok(s),
            None => bail!("unknown intervention kind {name:?}; expected one of: {}", Self::kind_names().join(", ")),
        }
    }

    /// The same spec with `rank` set, for kinds that take one (others unchanged).
    pub fn with_rank(mut self, r: usize) -> Self {
        match &mut self {
            InterventionSpec::Das { rank } | InterventionSpec::Rotation { rank } | InterventionSpec::Loreft { rank } => *rank = r,
            InterventionSpec::RoadDii { rank, .. } => *rank = r,
            _ => {}
        }
        self
    }

    pub fn kind_name(&self) -> &'static str {
        match self {
            InterventionSpec::Vanilla { .. } => "vanilla",
            InterventionSpec::Zero { .. } => "zero",
            InterventionSpec::Mean { .. } => "mean",
            InterventionSpec::Das { .. } => "das",
            InterventionSpec::Rotation { .. } => "rotation",
            InterventionSpec::Boundless { .. } => "boundless",
            InterventionSpec::SigmoidMask { .. } => "sigmoid_mask",
            InterventionSpec::RoadDii { .. } => "road_dii",
            InterventionSpec::Magnitude {} => "magnitude",
            InterventionSpec::Angle {} => "angle",
            InterventionSpec::Loreft { .. } => "loreft",
            InterventionSpec::Atp { .. } => "atp",
        }
    }

    /// The subspace rank, for kinds that have one.
    pub fn rank(&self) -> Option<usize> {
        match self {
            InterventionSpec::Das { rank } | InterventionSpec::Rotation { rank } | InterventionSpec::Loreft { rank } => Some(*rank),
            InterventionSpec::RoadDii { rank, road_selection: RoadSelection::Fixed, .. } => Some(*rank),
            _ => None,
        }
    }

    /// Whether the kind has parameters to train (so a run needs a train split and steps).
    pub fn trainable(&self) -> bool {
        !matches!(
            self,
            InterventionSpec::Vanilla { .. }
                | InterventionSpec::Zero { .. }
                | InterventionSpec::Mean { .. }
                | InterventionSpec::Magnitude {}
                | InterventionSpec::Angle {}
                | InterventionSpec::Atp { .. }
        )
    }

    /// Whether the built intervention reads the source run (sourceless edits and ablations do
    /// not, so a caller can skip the source forward; agrees with [`Intervention::uses_source`]).
    pub fn uses_source(&self) -> bool {
        !matches!(self, InterventionSpec::Zero { .. } | InterventionSpec::Mean { .. } | InterventionSpec::Loreft { .. })
    }

    /// Whether building it needs dataset statistics (the mean activation over the train split).
    pub fn needs_statistics(&self) -> bool {
        matches!(self, InterventionSpec::Mean { .. })
    }

    /// Build the intervention on `d`-dim vectors. `mean`: the statistics [`needs_statistics`]
    /// asks for.
    pub fn build(&self, d: usize, seed: u64, mean: Option<&Tensor>, device: &Device) -> Result<Box<dyn Intervention>> {
        let rank = |r: usize| -> Result<usize> {
            if r == 0 || r > d {
                bail!("intervention rank {r} must be in 1..={d}");
            }
            Ok(r)
        };
        Ok(match self {
            InterventionSpec::Vanilla { dims } => Box::new(vanilla::Vanilla::new(d, dims.as_deref(), device)?),
            InterventionSpec::Zero { dims } => Box::new(ablation::Ablation::zero(d, dims.as_deref(), device)?),
            InterventionSpec::Mean { dims } => {
                let Some(m) = mean else { bail!("mean ablation needs the mean activation") };
                Box::new(ablation::Ablation::mean(d, dims.as_deref(), m.clone(), device)?)
            }
            InterventionSpec::Das { rank: r } => Box::new(das::LowRankDas::new(d, rank(*r)?, seed, device)?),
            InterventionSpec::Rotation { rank: r } => Box::new(boundless::RotatedSpace::fixed(d, rank(*r)?, seed, device)?),
            InterventionSpec::Boundless { temperature, penalty } => {
                Box::new(boundless::RotatedSpace::boundless(d, seed, *temperature, *penalty, device)?)
            }
            InterventionSpec::SigmoidMask { temperature, penalty } => {
                Box::new(sigmoid_mask::SigmoidMask::new(d, *temperature, *penalty, device)?)
            }
            InterventionSpec::RoadDii { rank, road_variant, road_group_size, road_selection, temperature, penalty } => {
                let o = road_dii::RoadDiiOptions {
                    rank: *rank,
                    variant: *road_variant,
                    group_size: *road_group_size,
                    selection: *road_selection,
                    temperature: *temperature,
                    penalty: *penalty,
                };
                Box::new(road_dii::RoadDii::new(d, &o, seed, device)?)
            }
            InterventionSpec::Magnitude {} => Box::new(norm_swap::NormSwap::magnitude()),
            InterventionSpec::Angle {} => Box::new(norm_swap::NormSwap::angle()),
            InterventionSpec::Loreft { rank: r } => Box::new(loreft::LoReft::new(d, rank(*r)?, seed, device)?),
            // What AtP estimates, and what its verification runs: the whole-vector interchange.
            InterventionSpec::Atp { .. } => Box::new(vanilla::Vanilla::new(d, None, device)?),
        })
    }

    /// Finite, positive temperatures and a finite, non-negative penalty (NaN would train
    /// hundreds of NaN steps and still look finished).
    pub fn validate(&self) -> Result<()> {
        let check = |temperature: &[f64; 2], penalty: f64| -> Result<()> {
            if temperature.iter().any(|t| !t.is_finite() || *t <= 0.0) {
                bail!("intervention.temperature {temperature:?} must be two finite numbers > 0");
            }
            if !penalty.is_finite() || penalty < 0.0 {
                bail!("intervention.penalty {penalty} must be finite and >= 0");
            }
            Ok(())
        };
        match self {
            InterventionSpec::Boundless { temperature, penalty } | InterventionSpec::SigmoidMask { temperature, penalty } => {
                check(temperature, *penalty)
            }
            InterventionSpec::RoadDii { temperature, penalty, road_group_size, .. } => {
                if *road_group_size < 2 || road_group_size % 2 != 0 {
                    bail!("intervention.road_group_size {road_group_size} must be an even number >= 2");
                }
                check(temperature, *penalty)
            }
            InterventionSpec::Atp { atp } => atp.validate(),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_with_their_own_fields_only() {
        let s: InterventionSpec = toml::from_str("kind = \"das\"\nrank = 4").unwrap();
        assert_eq!(s, InterventionSpec::Das { rank: 4 });
        let e = toml::from_str::<InterventionSpec>("kind = \"vanilla\"\nrank = 4").unwrap_err().to_string();
        assert!(e.contains("rank"), "{e}");
        let e = toml::from_str::<InterventionSpec>("kind = \"nope\"").unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
        let s: InterventionSpec = toml::from_str("kind = \"road_dii\"\nroad_variant = \"road_4\"\nroad_selection = \"fixed\"\nrank = 3").unwrap();
        assert_eq!(s.rank(), Some(3));
        assert!(toml::from_str::<InterventionSpec>("kind = \"road_dii\"\nroad_variant = \"road_3\"").is_err());
        let s: InterventionSpec = toml::from_str("kind = \"atp\"\n[atp]\nmethod = \"ig\"\nsteps = 3").unwrap();
        assert!(matches!(&s, InterventionSpec::Atp { atp } if atp.steps == 3 && atp.method == crate::intervene::atp::AtpMethod::Ig));
        let e = toml::from_str::<InterventionSpec>("kind = \"atp\"\n[atp]\nmethods = \"ig\"").unwrap_err().to_string();
        assert!(e.contains("methods"), "{e}");
    }

    #[test]
    fn every_kind_round_trips_and_builds() {
        for s in InterventionSpec::all() {
            let text = toml::to_string(&s).unwrap();
            let back: InterventionSpec = toml::from_str(&text).unwrap();
            assert_eq!(back, s, "{text}");
            assert_eq!(InterventionSpec::from_kind(s.kind_name()).unwrap(), s);
            let mean = Tensor::zeros(8, candle_core::DType::F32, &Device::Cpu).unwrap();
            let iv = s.build(8, 0, Some(&mean), &Device::Cpu).unwrap();
            // AtP builds the vanilla interchange it estimates (its verification patches with it).
            let want = if s.kind_name() == "atp" { "vanilla" } else { s.kind_name() };
            assert_eq!(iv.kind(), want);
            assert_eq!(iv.is_trainable(), s.trainable(), "{}", s.kind_name());
            assert_eq!(iv.uses_source(), s.uses_source(), "{}", s.kind_name());
        }
    }
}
