//! Controls for trained subspace interventions (METHODS.md §7): a subspace that flips the
//! output is not yet a variable (Makelov et al. 2023's interpretability illusion). Every trained
//! cell is evaluated beside
//! - `random_subspace`: an untrained intervention of the same rank (on by default; cheap), and
//! - `permuted_labels`: the same training with counterfactual labels permuted across the pairs
//!   of each split, evaluated against the permuted labels (a control task: high IIA there means
//!   the intervention can fit noise), and
//! - `random_model`: the same training on the same pairs in a randomly re-initialised copy of the
//!   model ([`crate::model::random::reinitialised`]): what the method finds without learned
//!   weights.
//! A cell whose trained test IIA beats its best control by less than [`MIN_MARGIN`] is flagged.
use super::data::{self, Clean, SplitCache};
use crate::intervene::InterventionSpec;
use crate::model::{Llama, Site};
use crate::tasks::{Dataset, Pair, Split};
use crate::util::rng::Rng;
use anyhow::{bail, Result};
use std::collections::HashMap;

/// Trained IIA must beat the best control by this much for a cell to count as localised.
pub const MIN_MARGIN: f64 = 0.2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    RandomSubspace,
    PermutedLabels,
    RandomModel,
}

impl Control {
    pub fn name(self) -> &'static str {
        match self {
            Control::RandomSubspace => "random_subspace",
            Control::PermutedLabels => "permuted_labels",
            Control::RandomModel => "random_model",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "random_subspace" => Ok(Control::RandomSubspace),
            "permuted_labels" => Ok(Control::PermutedLabels),
            "random_model" => Ok(Control::RandomModel),
            other => bail!("controls: unknown control {other:?} (random_subspace, permuted_labels, random_model)"),
        }
    }
}

/// The controls a run evaluates: none for kinds that do not train; `random_subspace` unless
/// `controls = []`; plus whatever `controls` lists.
pub fn of(intervention: &InterventionSpec, controls: &Option<Vec<String>>) -> Result<Vec<Control>> {
    if !intervention.trainable() {
        return Ok(vec![]);
    }
    let listed = match controls {
        None => return Ok(vec![Control::RandomSubspace]),
        Some(v) if v.is_empty() => return Ok(vec![]),
        Some(v) => v.iter().map(|s| Control::parse(s)).collect::<Result<Vec<_>>>()?,
    };
    let mut out = vec![Control::RandomSubspace];
    out.extend(listed.into_iter().filter(|c| *c != Control::RandomSubspace));
    Ok(out)
}

/// The untrained intervention of the random-subspace control: the same kind from another
/// seed; kinds that learn their subspace's size get a random rotation of the size they learned.
pub fn random_subspace(spec: &InterventionSpec, learned_dims: Option<f64>) -> InterventionSpec {
    match spec {
        InterventionSpec::Boundless { .. } | InterventionSpec::SigmoidMask { .. } | InterventionSpec::RoadDii { .. }
            if spec.rank().is_none() =>
        {
            let k = learned_dims.filter(|k| k.is_finite()).map(|k| k.round().max(1.0) as usize).unwrap_or(1);
            InterventionSpec::Rotation { rank: k }
        }
        other => other.clone(),
    }
}

/// Seed offset of the random-subspace control's initialisation (never the trained one's).
pub const RANDOM_SUBSPACE_SEED: u64 = 0x5EED_0C0A_7201;

/// Each split's pairs with their counterfactual labels permuted (seeded by the run's seed), when
/// `controls` has the permuted-label control (else empty).
pub fn permuted_splits(controls: &[Control], seed: u64, data: &Dataset) -> HashMap<Split, Vec<Pair>> {
    if !controls.contains(&Control::PermutedLabels) {
        return HashMap::new();
    }
    let mut rng = Rng::new(seed ^ 0x9E37_79B9_7F4A_7C15);
    [Split::Train, Split::Dev, Split::Test]
        .into_iter()
        .map(|s| {
            let pairs = data.split(s).clone();
            let mut labels: Vec<u32> = pairs.iter().map(|p| p.cf_label).collect();
            rng.shuffle(&mut labels);
            let permuted = pairs.into_iter().zip(labels).map(|(mut p, l)| {
                p.cf_label = l;
                p
            });
            (s, permuted.collect())
        })
        .collect()
}

/// Seed offset of the random-model control's weights.
pub const RANDOM_MODEL_SEED: u64 = 0x0DE1_0C0A_7202;

/// The random-model control's model and its clean runs of the run's (kept) pairs, built once
/// per run when `controls` has it. The pairs are not re-filtered: the random model gets them
/// wrong, and the question is whether training makes it say the counterfactual label anyway.
pub struct RandomModel {
    pub model: Llama,
    pub split_caches: HashMap<Split, SplitCache>,
    pub clean: HashMap<(Split, usize), Clean>,
}

impl RandomModel {
    pub fn build(model: &Llama, data: &Dataset, splits: &[Split], cells: &[(usize, Site)], seed: u64) -> Result<Self> {
        let model = crate::model::random::reinitialised(model, seed ^ RANDOM_MODEL_SEED)?;
        let (mut split_caches, mut clean) = (HashMap::new(), HashMap::new());
        for &s in splits {
            let pairs = data.split(s);
            for (i, c) in data::clean_facts(&model, pairs)?.into_iter().enumerate() {
                clean.insert((s, i), c);
            }
            split_caches.insert(s, data::cache_split(&model, pairs, cells)?);
        }
        Ok(Self { model, split_caches, clean })
    }
}
