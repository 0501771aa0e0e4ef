//! Experiment files (TOML): what to run, fully resolved before anything runs. Unknown keys and
//! wrong types are errors naming the key and line.
use crate::intervene::InterventionSpec;
use crate::model::Site;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Master seed: datasets, initialisation and batch order derive from it.
    #[serde(default)]
    pub seed: u64,
    pub model: ModelSpec,
    pub task: TaskSpec,
    pub sites: SitesSpec,
    #[serde(default)]
    pub intervention: InterventionSpec,
    #[serde(default)]
    pub train: TrainSpec,
    /// Controls beside every trained cell (METHODS.md §7): absent = `["random_subspace"]`;
    /// listed ones are added to it; `[]` = none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controls: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub name: String,
    #[serde(default = "default_dtype")]
    pub dtype: String,
    #[serde(default = "default_device")]
    pub device: String,
}

fn default_dtype() -> String {
    "f32".into()
}
fn default_device() -> String {
    "auto".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// ioi | capitals | equality | jsonl
    pub name: String,
    /// The causal variable interchanged (task-specific; see experiments/README.md).
    #[serde(default)]
    pub variable: String,
    /// Pairs per split: [train, dev, test].
    #[serde(default = "default_sizes")]
    pub sizes: [usize; 3],
    /// IOI: template indices (empty = all).
    #[serde(default)]
    pub templates: Vec<usize>,
    /// jsonl: the pairs file; capitals: the facts CSV (default data/capitals.csv).
    #[serde(default)]
    pub path: String,
    /// Stop when the model's accuracy on the task's prompts is below this.
    #[serde(default = "default_min_acc")]
    pub min_accuracy: f64,
}

fn default_sizes() -> [usize; 3] {
    [160, 40, 40]
}
fn default_min_acc() -> f64 {
    0.7
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Layers {
    /// "all", "8..16" (end exclusive), "8..=16", "20"
    Text(String),
    List(Vec<usize>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SitesSpec {
    pub layers: Layers,
    pub site: OneOrMany,
    /// Named positions (`last`, `S2`, `IO`, `subject_last`, ...), indices ("3", "-1"), or "all".
    pub positions: Vec<String>,
    /// Heads to intervene on (headed sites only: q, k, v, head_output); empty = whole vector.
    #[serde(default)]
    pub heads: Vec<usize>,
    /// One cell per head (those in `heads`, or every head of the site when `heads` is empty)
    /// instead of one cell for all of `heads` together.
    #[serde(default)]
    pub sweep_heads: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSpec {
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    /// Learning rate for boundaries/masks (boundless β, mask logits).
    pub boundary_lr: f64,
    pub weight_decay: f64,
    /// constant | linear | cosine (after warm-up)
    pub schedule: String,
    pub warmup: usize,
    /// How orthonormal rotations are trained: "riemannian" (the gradient projected onto the
    /// Stiefel tangent space, Adam, then the retraction) or "euclidean" (Adam on the raw
    /// gradient, then the retraction: the pre-0.2 optimiser, kept for before/after comparisons).
    pub orthonormal: String,
    /// Evaluate dev IIA/loss (and train IIA on up to 64 train pairs) every this many steps and
    /// at the end, into train_log.csv (0 = never).
    pub eval_every: usize,
    /// Stop when the dev loss has not improved for this many evaluations, keeping the best
    /// parameters (0 = train all steps).
    pub early_stop: usize,
}

impl Default for TrainSpec {
    fn default() -> Self {
        Self {
            steps: 50,
            batch: 16,
            lr: 1e-2,
            boundary_lr: 1e-2,
            weight_decay: 0.0,
            schedule: "constant".into(),
            warmup: 0,
            orthonormal: "riemannian".into(),
            eval_every: 10,
            early_stop: 0,
        }
    }
}


impl Spec {
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        let spec: Spec = toml::from_str(text).map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Read a file, apply `--set` overrides, and validate.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read experiment file {}", path.display()))?;
        let origin = path.display().to_string();
        // Parse once as-is first, so errors carry the file's own line numbers.
        if overrides.is_empty() {
            return Self::from_toml(&text, &origin);
        }
        Self::from_toml(&text, &origin)?;
        Self::from_toml_with(&text, &format!("{origin} (with --set overrides)"), overrides)
    }

    /// Parse `text` with `--set` overrides applied. An override that switches
    /// `intervention.kind` drops the file's other `[intervention]` keys (a DAS file's `rank`
    /// means nothing to `vanilla`); keys the overrides set themselves are kept, whether set one
    /// by one (`intervention.rank=4`) or as a whole table (`intervention={kind="road_dii", rank=4}`).
    pub fn from_toml_with(text: &str, origin: &str, overrides: &[String]) -> Result<Self> {
        let mut doc: toml::Table = toml::from_str(text).map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
        let kind_of = |d: &toml::Table| d.get("intervention").and_then(|t| t.get("kind")).and_then(|k| k.as_str()).map(str::to_string);
        let file_kind = kind_of(&doc);
        // The same overrides on the file without its [intervention] keys: what they set themselves.
        let mut bare = doc.clone();
        if let Some(t) = bare.get_mut("intervention").and_then(|t| t.as_table_mut()) {
            t.clear();
        }
        crate::runs::apply_overrides(&mut doc, overrides)?;
        if kind_of(&doc) != file_kind {
            crate::runs::apply_overrides(&mut bare, overrides)?;
            if let Some(t) = bare.remove("intervention") {
                doc.insert("intervention".into(), t);
            }
        }
        Self::from_toml(&toml::to_string(&doc)?, origin)
    }

    pub fn validate(&self) -> Result<()> {
        crate::runs::check_name("name", &self.name)?;
        crate::util::check_model_path("model.name", &self.model.name)?;
        if let Layers::Text(t) = &self.sites.layers {
            // Before any model is loaded: a range is checked against a depth no model reaches,
            // so "0..100000000000" is an error here, never a huge allocation.
            parse_layers(t, MAX_LAYERS)?;
        }
        crate::tasks::check_sizes(self.task.sizes)?;
        let a = self.task.min_accuracy;
        if !(0.0..=1.0).contains(&a) {
            bail!("task.min_accuracy = {a} must be a number in [0, 1]");
        }
        for s in self.site_list()? {
            if (!self.sites.heads.is_empty() || self.sites.sweep_heads) && !s.is_headed() {
                bail!("sites.heads / sites.sweep_heads is set but site {s} has no heads (use q, k, v or head_output)");
            }
        }
        if self.sites.positions.is_empty() {
            bail!("sites.positions is empty");
        }
        self.intervention.validate()?;
        super::controls::of(&self.intervention, &self.controls)?;
        if !["riemannian", "euclidean"].contains(&self.train.orthonormal.as_str()) {
            bail!("train.orthonormal {:?} must be riemannian or euclidean", self.train.orthonormal);
        }
        crate::runs::checks::positive("train.lr", self.train.lr)?;
        crate::runs::checks::positive("train.boundary_lr", self.train.boundary_lr)?;
        crate::runs::checks::non_negative("train.weight_decay", self.train.weight_decay)?;
        if self.train.warmup > self.train.steps {
            bail!("train.warmup = {} is more than train.steps = {}", self.train.warmup, self.train.steps);
        }
        if !["constant", "linear", "cosine"].contains(&self.train.schedule.as_str()) {
            bail!("train.schedule {:?} must be constant, linear or cosine", self.train.schedule);
        }
        if self.train.batch == 0 {
            bail!("train.batch must be at least 1");
        }
        {
            use crate::runs::checks::{at_most, MAX_BATCH, MAX_STEPS};
            at_most(&[("train.steps", self.train.steps, MAX_STEPS), ("train.batch", self.train.batch, MAX_BATCH)])?;
        }
        Ok(())
    }

    pub fn site_list(&self) -> Result<Vec<Site>> {
        match &self.sites.site {
            OneOrMany::One(s) => Ok(vec![Site::parse(s)?]),
            OneOrMany::Many(v) => v.iter().map(|s| Site::parse(s)).collect(),
        }
    }

    /// Layers, checked against the model's depth.
    pub fn layer_list(&self, n_layers: usize) -> Result<Vec<usize>> {
        let v: Vec<usize> = match &self.sites.layers {
            Layers::List(v) => v.clone(),
            Layers::Text(s) => parse_layers(s, n_layers)?,
        };
        if v.is_empty() {
            bail!("sites.layers selects no layer");
        }
        if let Some(&bad) = v.iter().find(|&&l| l >= n_layers) {
            bail!("sites.layers: layer {bad} is out of range (the model has layers 0..{})", n_layers.saturating_sub(1));
        }
        Ok(v)
    }

    /// TOML of the resolved spec (what `config.toml` records).
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }
}

/// No LLaMA-family model has this many blocks; ranges beyond it are errors before a model loads.
pub const MAX_LAYERS: usize = 4096;

/// `"all"`, `"a..b"`, `"a..=b"` or `"3,5,7"`, bounds-checked against `n` layers before anything
/// is expanded (a range's size is known from its ends).
fn parse_layers(s: &str, n: usize) -> Result<Vec<usize>> {
    let s = s.trim();
    if s == "all" {
        return Ok((0..n).collect());
    }
    let num = |x: &str| -> Result<usize> { x.trim().parse().with_context(|| format!("sites.layers: {x:?} is not a layer number")) };
    let in_range = |l: usize| -> Result<usize> {
        if l >= n {
            bail!("sites.layers: layer {l} is out of range (the model has {n} layers, 0..{})", n.saturating_sub(1));
        }
        Ok(l)
    };
    let range = |a: usize, last: usize| -> Result<Vec<usize>> {
        if a > last {
            bail!("sites.layers {s:?} is an empty range");
        }
        in_range(last)?;
        Ok((a..=last).collect())
    };
    if let Some((a, b)) = s.split_once("..=") {
        return range(num(a)?, num(b)?);
    }
    if let Some((a, b)) = s.split_once("..") {
        let (a, b) = (num(a)?, num(b)?);
        if b == 0 {
            bail!("sites.layers {s:?} is an empty range");
        }
        return range(a, b - 1);
    }
    s.split(',').map(|x| num(x).and_then(in_range)).collect()
}

#[cfg(test)]
mod tests {
    use super::parse_layers;

    #[test]
    fn layer_ranges_are_bounded_before_expansion() {
        assert_eq!(parse_layers("2..5", 30).unwrap(), vec![2, 3, 4]);
        assert_eq!(parse_layers("2..=5", 30).unwrap(), vec![2, 3, 4, 5]);
        assert_eq!(parse_layers("28..30", 30).unwrap(), vec![28, 29]);
        assert_eq!(parse_layers("3, 5", 30).unwrap(), vec![3, 5]);
        for bad in ["0..100000000000", "0..=18446744073709551615", "5..2", "0..0", "2..=31", "40", "0..31"] {
            let e = parse_layers(bad, 30).unwrap_err().to_string();
            assert!(e.starts_with("sites.layers") && !e.contains('\n'), "{bad}: {e}");
        }
    }
}
