//! The pilot-study experiment file (`kind = "pilot"`): which fine-tunes to compare and how to probe
//! them. Data, task and training sections are those of `road finetune` specs, so each fine-tune
//! is exactly a finetune spec (and is cached under its hash).
use crate::probe::HeadTrain;
use crate::train::spec::{self as ft, DataSpec, MethodSpec, TaskSpec, TrainSpec};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PilotSpec {
    /// Always "pilot" (what makes `road run` choose this runner).
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub seed: u64,
    pub model: String,
    #[serde(default)]
    pub data: DataSpec,
    #[serde(default)]
    pub task: TaskSpec,
    /// Training settings shared by every method (a method may override lr and steps).
    #[serde(default)]
    pub finetune: TrainSpec,
    pub methods: Vec<PilotMethod>,
    #[serde(default)]
    pub probe: ProbeSpec,
    #[serde(default)]
    pub disentangle: DisentangleSpec,
    #[serde(default)]
    pub swap: SwapSpec,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PilotMethod {
    /// Column `method` in every CSV.
    pub label: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    pub method: MethodSpec,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeSpec {
    /// Dev examples whose last prompt token is measured (0 = the whole dev subset).
    #[serde(default)]
    pub examples: usize,
    /// Block for the ΔM-vs-ΔD scatter (negative counts from the end; -2 = second-to-last).
    #[serde(default = "d_scatter")]
    pub scatter_layer: i64,
    #[serde(default = "d_batch")]
    pub batch: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisentangleSpec {
    /// Blocks whose last-token output feeds the heads (negative counts from the end).
    #[serde(default = "d_layers")]
    pub layers: Vec<i64>,
    /// Training examples for the heads (class-balanced, from the train split).
    #[serde(default = "d_head_train")]
    pub train_examples: usize,
    /// Seeds of the head initialisation / batch order (one row each).
    #[serde(default = "d_seeds")]
    pub seeds: Vec<u64>,
    /// Seed of the randomly initialised backbone.
    #[serde(default)]
    pub random_backbone_seed: u64,
    #[serde(default)]
    pub head: HeadTrain,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwapSpec {
    /// Base/source pairs of opposite labels (from the probe examples).
    #[serde(default = "d_pairs")]
    pub pairs: usize,
    /// Models probed: "pretrained" and/or method labels.
    #[serde(default = "d_swap_models")]
    pub models: Vec<String>,
}

fn d_scatter() -> i64 {
    -2
}
fn d_batch() -> usize {
    16
}
fn d_layers() -> Vec<i64> {
    vec![-2]
}
fn d_head_train() -> usize {
    512
}
fn d_seeds() -> Vec<u64> {
    vec![0, 1, 2]
}
fn d_pairs() -> usize {
    48
}
fn d_swap_models() -> Vec<String> {
    vec!["pretrained".into()]
}

impl Default for ProbeSpec {
    fn default() -> Self {
        Self { examples: 0, scatter_layer: d_scatter(), batch: d_batch() }
    }
}
impl Default for DisentangleSpec {
    fn default() -> Self {
        Self { layers: d_layers(), train_examples: d_head_train(), seeds: d_seeds(), random_backbone_seed: 0, head: HeadTrain::default() }
    }
}
impl Default for SwapSpec {
    fn default() -> Self {
        Self { pairs: d_pairs(), models: d_swap_models() }
    }
}

/// Whether an experiment file is a pilot study (`kind = "pilot"` at the top level).
pub fn is_pilot(text: &str) -> bool {
    toml::from_str::<toml::Table>(text).ok().and_then(|t| t.get("kind").and_then(|k| k.as_str().map(|s| s == "pilot"))).unwrap_or(false)
}

/// A layer index that may count from the end, checked against the model.
pub fn resolve_layer(l: i64, n_layers: usize, what: &str) -> Result<usize> {
    let r = if l < 0 { n_layers as i64 + l } else { l };
    if r < 0 || r >= n_layers as i64 {
        bail!("{what} = {l} is out of range: the model has {n_layers} blocks (0..{}, or -1..-{n_layers})", n_layers - 1);
    }
    Ok(r as usize)
}

impl PilotSpec {
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read experiment file {}", path.display()))?;
        Self::parse(&text, overrides).with_context(|| format!("in {}", path.display()))
    }

    pub fn parse(text: &str, overrides: &[String]) -> Result<Self> {
        let mut doc: toml::Table = toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e))?;
        crate::runs::apply_overrides(&mut doc, overrides)?;
        let s = PilotSpec::deserialize(toml::Value::Table(doc)).map_err(|e| anyhow::anyhow!("{}", e.message()))?;
        if s.kind != "pilot" {
            bail!("kind = {:?}: a pilot-study file has kind = \"pilot\"", s.kind);
        }
        crate::runs::check_name("name", &s.name)?;
        crate::util::check_model_path("model", &s.model)?;
        for m in &s.methods {
            crate::runs::check_name("methods.label", &m.label)?;
        }
        if s.methods.is_empty() {
            bail!("no [[methods]]: list at least one fine-tuning method");
        }
        let mut labels: Vec<&str> = s.methods.iter().map(|m| m.label.as_str()).collect();
        labels.sort();
        if let Some(w) = labels.windows(2).find(|w| w[0] == w[1]) {
            bail!("two methods are labelled {:?}", w[0]);
        }
        if labels.contains(&"pretrained") {
            bail!("the label \"pretrained\" is reserved for the unchanged model");
        }
        for m in &s.swap.models {
            if m != "pretrained" && !labels.contains(&m.as_str()) {
                bail!("swap.models: {m:?} is neither \"pretrained\" nor a method label ({})", labels.join(", "));
            }
        }
        if s.disentangle.seeds.is_empty() || s.disentangle.layers.is_empty() {
            bail!("disentangle.seeds and disentangle.layers must not be empty");
        }
        if s.task.head {
            bail!("task.head is not supported by the pilot study (it compares label-word classifiers)");
        }
        // Resolve every fine-tune now so a bad method fails before hours of work.
        for m in &s.methods {
            s.finetune_spec(m).with_context(|| format!("method {:?}", m.label))?;
        }
        Ok(s)
    }

    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }

    /// The `road finetune` spec of one method (data, task, training shared; lr/steps overridable).
    pub fn finetune_spec(&self, m: &PilotMethod) -> Result<ft::Spec> {
        let mut train = self.finetune.clone();
        if let Some(lr) = m.lr {
            train.lr = lr;
        }
        if let Some(steps) = m.steps {
            train.steps = steps;
        }
        #[derive(Serialize)]
        struct Doc<'a> {
            name: String,
            model: &'a str,
            seed: u64,
            data: &'a DataSpec,
            task: &'a TaskSpec,
            method: &'a MethodSpec,
            train: &'a TrainSpec,
        }
        let doc = Doc { name: format!("{}-{}", self.name, m.label), model: &self.model, seed: self.seed, data: &self.data, task: &self.task, method: &m.method, train: &train };
        ft::parse(&toml::to_string(&doc)?, &[])
    }
}
