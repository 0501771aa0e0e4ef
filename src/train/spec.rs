//! TOML experiment specs for `road finetune`: parsed strictly (unknown keys are errors naming the
//! key), resolved (every default filled in, seed included) and written back as `config.toml`.
use super::data::{self, ClsExample, LmExample, Splits};
use super::engine::{MethodCfg, TaskCfg, TrainConfig};
use super::schedule::Decay;
use crate::model::Proj;
use crate::adapters::{Freeze, Variant};
use crate::util::rng::Rng;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const SENTIMENT_TEMPLATE: &str = "Tweet: {text}\nSentiment (negative or positive):";
pub const SENTIMENT_LABEL_WORDS: [&str; 2] = [" negative", " positive"];
pub const PARITY_TEMPLATE: &str = "Number: {text}\nIs it even or odd? Answer:";
pub const PARITY_LABEL_WORDS: [&str; 2] = [" even", " odd"];
pub const FIRST_PAIR_TEMPLATE: &str = "{text} =";
pub const FIRST_PAIR_LABEL_WORDS: [&str; 2] = ["false", "true"];

fn d_model() -> String {
    "smollm2-135m".into()
}
fn d_source() -> String {
    "sentiment".into()
}
fn d_train_examples() -> usize {
    2000
}
fn d_dev_examples() -> usize {
    200
}
fn d_kind_cls() -> String {
    "classify".into()
}
fn d_targets() -> Vec<String> {
    ["q", "k", "v", "o", "gate", "up", "down"].map(String::from).to_vec()
}
fn d_variant() -> u8 {
    1
}
fn d_group() -> usize {
    64
}
fn d_both() -> String {
    "both".into()
}
fn d_r() -> usize {
    8
}
fn d_lora_alpha() -> f64 {
    16.0
}
fn d_steps() -> usize {
    150
}
fn d_batch() -> usize {
    8
}
fn d_one() -> usize {
    1
}
fn d_lr() -> f64 {
    3e-3
}
fn d_warmup() -> f64 {
    0.1
}
fn d_linear() -> String {
    "linear".into()
}
fn d_clip() -> f64 {
    1.0
}
fn d_eval_every() -> usize {
    50
}
fn d_eval_batch() -> usize {
    16
}
fn d_max_len() -> usize {
    96
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub name: String,
    #[serde(default = "d_model")]
    pub model: String,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub data: DataSpec,
    #[serde(default)]
    pub task: TaskSpec,
    pub method: MethodSpec,
    #[serde(default)]
    pub train: TrainSpec,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// "sentiment" (shipped, fetched), "parity" or "first-pair" (synthetic), or a .csv/.jsonl path.
    #[serde(default = "d_source")]
    pub source: String,
    /// Label names of a custom classification file (in label-word order).
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default)]
    pub min_confidence: f32,
    /// Class-balanced subsample of the train split (0 = all).
    #[serde(default = "d_train_examples")]
    pub train_examples: usize,
    /// Class-balanced dev subset used for model selection (0 = all).
    #[serde(default = "d_dev_examples")]
    pub dev_examples: usize,
    /// Test examples for the final evaluation (0 = the whole test split).
    #[serde(default)]
    pub test_examples: usize,
}

impl Default for DataSpec {
    fn default() -> Self {
        Self { source: d_source(), labels: vec![], min_confidence: 0.0, train_examples: d_train_examples(), dev_examples: d_dev_examples(), test_examples: 0 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// "classify" or "causal_lm".
    #[serde(default = "d_kind_cls")]
    pub kind: String,
    /// Prompt template with `{text}`; empty = the source's default.
    #[serde(default)]
    pub template: String,
    /// Single-token answer per label; empty = the source's default.
    #[serde(default)]
    pub label_words: Vec<String>,
    /// Linear head on the last token instead of label-word scoring.
    #[serde(default)]
    pub head: bool,
}

impl Default for TaskSpec {
    fn default() -> Self {
        Self { kind: d_kind_cls(), template: String::new(), label_words: vec![], head: false }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodSpec {
    /// "road", "lora", "dora", "oft", "boft", "loreft" or "full".
    pub kind: String,
    #[serde(default = "d_targets")]
    pub targets: Vec<String>,
    /// Layers to adapt (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<Vec<usize>>,
    /// RoAd: 1, 2 or 4.
    #[serde(default = "d_variant")]
    pub variant: u8,
    /// RoAd pairing: 2 = the paper's adjacent pairs, 64 = peft's default.
    #[serde(default = "d_group")]
    pub group_size: usize,
    /// RoAd: "both", "angle" (α frozen at 1) or "magnitude" (θ frozen at 0).
    #[serde(default = "d_both")]
    pub train: String,
    #[serde(default = "d_r")]
    pub r: usize,
    #[serde(default = "d_lora_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f32,
    /// OFT / BOFT: the orthogonal block size (must divide every target's input width).
    /// Filled in (OFT 32, BOFT 4) for those kinds only, so other specs' TOML is unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<usize>,
    /// BOFT: butterfly factors (peft's `boft_n_butterfly_factor`; 1 = block-diagonal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub butterfly_factor: Option<usize>,
    /// OFT: terms of peft's Cayley–Neumann series (default 5); 0 = the exact Cayley transform.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neumann_terms: Option<usize>,
    /// LoReFT: pyreft's position string, `f<N>+l<M>` (first N, last M prompt tokens; default
    /// "f1+l1"); the rank is `r`, the layers `layers`, the site each block's output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub positions: Option<String>,
    /// LoReFT: one intervention per layer for the first and the last positions (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_weights: Option<bool>,
}

/// pyreft's `parse_positions`: "f1+l1", "f3", "l2" → (first_n, last_n).
pub fn parse_positions(s: &str) -> Result<(usize, usize)> {
    let (mut f, mut l) = (0, 0);
    for part in s.split('+') {
        let p = part.trim();
        let n = |x: &str| x.parse::<usize>().map_err(|_| anyhow::anyhow!("method.positions {s:?}: expected f<N>+l<M> (e.g. \"f1+l1\")"));
        match (p.strip_prefix('f'), p.strip_prefix('l')) {
            (Some(x), _) => f = n(x)?,
            (_, Some(x)) => l = n(x)?,
            _ => bail!("method.positions {s:?}: expected f<N>+l<M> (e.g. \"f1+l1\")"),
        }
    }
    if f + l == 0 {
        bail!("method.positions {s:?} selects no positions");
    }
    Ok((f, l))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    #[serde(default = "d_steps")]
    pub steps: usize,
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    #[serde(default = "d_one")]
    pub grad_accum: usize,
    #[serde(default = "d_lr")]
    pub lr: f64,
    /// Default: 0 for RoAd, 0.01 otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
    #[serde(default = "d_warmup")]
    pub warmup_ratio: f64,
    /// "constant", "linear" or "cosine".
    #[serde(default = "d_linear")]
    pub schedule: String,
    /// Global gradient-norm clip; 0 = off.
    #[serde(default = "d_clip")]
    pub clip_norm: f64,
    #[serde(default = "d_eval_every")]
    pub eval_every: usize,
    #[serde(default = "d_eval_batch")]
    pub eval_batch: usize,
    #[serde(default = "d_max_len")]
    pub max_len: usize,
}

impl Default for TrainSpec {
    fn default() -> Self {
        toml::from_str("").expect("all train fields have defaults")
    }
}

/// Apply `section.key=value` overrides to a parsed TOML document (value parsed as TOML, else a string).
/// Read a spec file, apply overrides, and parse strictly.
pub fn load(path: &Path, overrides: &[String]) -> Result<Spec> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read spec {}", path.display()))?;
    parse(&text, overrides).with_context(|| format!("in {}", path.display()))
}

pub fn parse(text: &str, overrides: &[String]) -> Result<Spec> {
    let mut doc: toml::Table = toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.message()))?;
    crate::runs::apply_overrides(&mut doc, overrides)?;
    let mut spec: Spec = Spec::deserialize(toml::Value::Table(doc)).map_err(|e| anyhow::anyhow!("{}", e.message()))?;
    spec.resolve()?;
    Ok(spec)
}

impl Spec {
    /// Fill source-dependent defaults so `config.toml` records exactly what ran.
    fn resolve(&mut self) -> Result<()> {
        let (tpl, words): (&str, &[&str]) = match self.data.source.as_str() {
            "sentiment" => (SENTIMENT_TEMPLATE, &SENTIMENT_LABEL_WORDS),
            "parity" => (PARITY_TEMPLATE, &PARITY_LABEL_WORDS),
            "first-pair" => (FIRST_PAIR_TEMPLATE, &FIRST_PAIR_LABEL_WORDS),
            _ => ("", &[]),
        };
        if self.task.kind == "classify" {
            if self.task.template.is_empty() {
                if tpl.is_empty() {
                    bail!("task.template is required for a custom data source");
                }
                self.task.template = tpl.into();
            }
            if self.task.label_words.is_empty() {
                if words.is_empty() {
                    bail!("task.label_words is required for a custom data source");
                }
                self.task.label_words = words.iter().map(|s| s.to_string()).collect();
            }
        }
        if self.train.weight_decay.is_none() {
            // Decay pulls RoAd's α, DoRA's magnitudes and BOFT's scales towards 0 (shrinking
            // outputs) and OFT's rotations towards I: off for those, as in peft's Trainer default.
            let decays = matches!(self.method.kind.as_str(), "lora" | "full");
            self.train.weight_decay = Some(if decays { 0.01 } else { 0.0 });
        }
        let m = &mut self.method;
        match m.kind.as_str() {
            "oft" => {
                m.block_size.get_or_insert(32);
                m.neumann_terms.get_or_insert(5);
            }
            "boft" => {
                m.block_size.get_or_insert(4);
                m.butterfly_factor.get_or_insert(1);
            }
            "loreft" => {
                m.positions.get_or_insert_with(|| "f1+l1".into());
                m.share_weights.get_or_insert(false);
            }
            _ => {}
        }
        self.check_values()?;
        self.method_cfg()?;
        self.task_cfg()?;
        Decay::parse(&self.train.schedule)?;
        Ok(())
    }

    /// Numbers that would train on NaN, train nothing or allocate without bound are errors
    /// naming their key (checked before any data or model is loaded).
    fn check_values(&self) -> Result<()> {
        use crate::runs::checks::{at_least_one, at_most, finite, fraction, non_negative, positive, MAX_BATCH, MAX_STEPS};
        crate::runs::check_name("name", &self.name)?;
        crate::util::check_model_path("model", &self.model)?;
        let t = &self.train;
        at_least_one(&[("train.steps", t.steps), ("train.batch_size", t.batch_size), ("train.grad_accum", t.grad_accum), ("train.eval_batch", t.eval_batch), ("train.max_len", t.max_len)])?;
        at_most(&[
            ("train.steps", t.steps, MAX_STEPS),
            ("train.batch_size", t.batch_size, MAX_BATCH),
            ("train.grad_accum", t.grad_accum, MAX_BATCH),
            ("train.eval_batch", t.eval_batch, MAX_BATCH),
        ])?;
        positive("train.lr", t.lr)?;
        non_negative("train.weight_decay", t.weight_decay.unwrap_or(0.0))?;
        fraction("train.warmup_ratio", t.warmup_ratio)?;
        non_negative("train.clip_norm", t.clip_norm)?;
        finite("method.alpha", self.method.alpha)?;
        finite("data.min_confidence", self.data.min_confidence as f64)?;
        fraction("method.dropout", self.method.dropout as f64)?;
        if matches!(self.method.kind.as_str(), "lora" | "dora" | "loreft") && self.method.r == 0 {
            bail!("method.r must be at least 1");
        }
        Ok(())
    }

    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }

    pub fn method_cfg(&self) -> Result<MethodCfg> {
        let m = &self.method;
        let targets = m.targets.iter().map(|t| Proj::parse(t)).collect::<Result<Vec<_>>>()?;
        if targets.is_empty() && m.kind != "full" {
            bail!("method.targets is empty");
        }
        Ok(match m.kind.as_str() {
            "full" => MethodCfg::Full,
            "lora" => MethodCfg::Lora { r: m.r, alpha: m.alpha, dropout: m.dropout, targets, layers: m.layers.clone() },
            "dora" => MethodCfg::Dora { r: m.r, alpha: m.alpha, dropout: m.dropout, targets, layers: m.layers.clone() },
            "oft" => {
                let terms = m.neumann_terms.unwrap_or(5);
                MethodCfg::Oft { block_size: m.block_size.unwrap_or(32), neumann_terms: (terms > 0).then_some(terms), targets, layers: m.layers.clone() }
            }
            "boft" => MethodCfg::Boft { block_size: m.block_size.unwrap_or(4), factors: m.butterfly_factor.unwrap_or(1), targets, layers: m.layers.clone() },
            "loreft" => {
                let (first_n, last_n) = parse_positions(m.positions.as_deref().unwrap_or("f1+l1"))?;
                MethodCfg::Loreft { rank: m.r, first_n, last_n, share_weights: m.share_weights.unwrap_or(false), layers: m.layers.clone() }
            }
            "road" => {
                let freeze = match m.train.as_str() {
                    "both" => Freeze::default(),
                    "angle" => Freeze { theta: false, alpha: true },
                    "magnitude" => Freeze { theta: true, alpha: false },
                    o => bail!("method.train = {o:?}: expected both, angle or magnitude"),
                };
                let variant = Variant::parse(&m.variant.to_string())?;
                MethodCfg::Road { variant, group_size: m.group_size, freeze, targets, layers: m.layers.clone() }
            }
            o => bail!("method.kind = {o:?}: expected road, lora, dora, oft, boft, loreft or full"),
        })
    }

    pub fn task_cfg(&self) -> Result<TaskCfg> {
        Ok(match self.task.kind.as_str() {
            "classify" => TaskCfg::Classify { template: self.task.template.clone(), label_words: self.task.label_words.clone(), head: self.task.head },
            "causal_lm" => TaskCfg::CausalLm,
            o => bail!("task.kind = {o:?}: expected classify or causal_lm"),
        })
    }

    pub fn train_cfg(&self) -> Result<TrainConfig> {
        let t = &self.train;
        let mut c = TrainConfig::new(self.method_cfg()?, self.task_cfg()?);
        c.steps = t.steps;
        c.batch_size = t.batch_size;
        c.grad_accum = t.grad_accum;
        c.lr = t.lr;
        c.weight_decay = t.weight_decay.unwrap_or(c.weight_decay);
        c.warmup_ratio = t.warmup_ratio;
        c.decay = Decay::parse(&t.schedule)?;
        c.clip_norm = if t.clip_norm > 0.0 { Some(t.clip_norm) } else { None };
        c.eval_every = t.eval_every;
        c.eval_batch = t.eval_batch;
        c.max_len = t.max_len;
        c.seed = self.seed;
        c.base_model = self.model.clone();
        Ok(c)
    }

    /// Classification splits after subsampling (train/dev balanced; test as-is or a prefix).
    pub fn cls_data(&self, verbose: bool) -> Result<Splits<ClsExample>> {
        let d = &self.data;
        let full = match d.source.as_str() {
            "sentiment" => data::load_sentiment(d.min_confidence, verbose)?,
            "parity" => data::parity_task(),
            "first-pair" => data::first_pair_task(),
            path => {
                if d.labels.is_empty() {
                    bail!("data.labels is required for a custom file (label names in label-word order)");
                }
                data::load_cls_file(Path::new(path), &d.labels)?
            }
        };
        let k = self.task.label_words.len();
        let mut rng = Rng::new(self.seed).fork(0x5EED);
        let take = |v: &[ClsExample], n: usize, rng: &mut Rng| if n == 0 { v.to_vec() } else { data::balanced_take(v, n, k, rng) };
        let train = take(&full.train, d.train_examples, &mut rng);
        let dev = take(&full.dev, d.dev_examples, &mut rng);
        // A test subset is a seeded random sample (the file is sorted by label), class ratio kept.
        let test = if d.test_examples == 0 {
            full.test
        } else {
            let mut t = full.test;
            rng.shuffle(&mut t);
            t.truncate(d.test_examples);
            t
        };
        if train.is_empty() || test.is_empty() {
            bail!("data source {:?} gives an empty train or test split", d.source);
        }
        Ok(Splits { train, dev, test })
    }

    /// Prompt/completion splits (hash of the prompt) for causal-LM specs.
    pub fn lm_data(&self) -> Result<Splits<LmExample>> {
        let all = data::load_lm_file(Path::new(&self.data.source))?;
        let mut s = Splits::default();
        for e in all {
            match data::split_of(&e.prompt) {
                data::Split::Train => s.train.push(e),
                data::Split::Dev => s.dev.push(e),
                data::Split::Test => s.test.push(e),
            }
        }
        if self.data.train_examples > 0 {
            s.train.truncate(self.data.train_examples);
        }
        if self.data.dev_examples > 0 {
            s.dev.truncate(self.data.dev_examples);
        }
        Ok(s)
    }
}
