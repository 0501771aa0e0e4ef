//! Composability of RoAd subspaces (METHODS §4), measured: RoAd1 as an intervention at one
//! block's output (last prompt token), half of its 2D blocks trained on task A, the other half on
//! task B — jointly (one optimizer and one clipped gradient over both tasks' batches; A rows switch
//! on only A blocks, B rows only B blocks) and/or separately (A blocks on task A alone, then B
//! blocks on task B alone, each with its own optimizer). Then, per training, accuracy on each task
//! with no blocks, A blocks, B blocks, and both → `compose.csv`.

use crate::model::{registry, Hooks, Site};
use crate::train::cls::{self, Scorer};
use crate::train::data::{self, ClsExample, Splits};
use crate::train::optim::{clip_global_norm, AdamW, AdamWConfig};
use crate::train::schedule::{Decay, Schedule};
use crate::runs::apply_overrides;
use crate::train::spec::{PARITY_LABEL_WORDS, PARITY_TEMPLATE, SENTIMENT_LABEL_WORDS, SENTIMENT_TEMPLATE};
use crate::util::rng::Rng;
use anyhow::{bail, Context, Result};
use crate::intervene::road_rows::{half_masks, RoadIntervention};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

fn d_model() -> String {
    "smollm2-135m".into()
}
fn d_site() -> String {
    "block_output".into()
}
fn d_group() -> usize {
    2
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComposeSpec {
    pub name: String,
    #[serde(default = "d_model")]
    pub model: String,
    #[serde(default)]
    pub seed: u64,
    /// Block (0-based) whose output is intervened on.
    pub layer: usize,
    #[serde(default = "d_site")]
    pub site: String,
    /// RoAd pairing of the intervention: 2 = the paper's adjacent pairs.
    #[serde(default = "d_group")]
    pub group_size: usize,
    pub task_a: ComposeTask,
    pub task_b: ComposeTask,
    pub train: ComposeTrain,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComposeTask {
    /// "sentiment" (shipped corpus) or "parity" (synthetic, shipped as code).
    pub source: String,
    pub train_examples: usize,
    pub test_examples: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComposeTrain {
    pub steps: usize,
    /// Rows per task per step (each step sees one A batch and one B batch).
    pub batch_size: usize,
    pub lr: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default)]
    pub warmup_ratio: f64,
    #[serde(default = "d_clip")]
    pub clip_norm: f64,
    #[serde(default = "d_max_len")]
    pub max_len: usize,
    /// Which trainings to run and compare: "joint" and/or "separate".
    #[serde(default = "d_trainings")]
    pub trainings: Vec<String>,
}

fn d_trainings() -> Vec<String> {
    vec!["joint".into(), "separate".into()]
}

fn d_clip() -> f64 {
    1.0
}
fn d_max_len() -> usize {
    64
}

struct Task {
    name: String,
    template: &'static str,
    label_ids: Vec<u32>,
    splits: Splits<ClsExample>,
}

fn load_task(t: &ComposeTask, tok: &crate::tokenizer::Tok, rng: &mut Rng) -> Result<Task> {
    let (template, words, full) = match t.source.as_str() {
        "sentiment" => (SENTIMENT_TEMPLATE, SENTIMENT_LABEL_WORDS, data::load_sentiment(0.0, true)?),
        "parity" => (PARITY_TEMPLATE, PARITY_LABEL_WORDS, data::parity_task()),
        o => bail!("compose task source {o:?}: expected sentiment or parity"),
    };
    let words: Vec<String> = words.iter().map(|s| s.to_string()).collect();
    let train = data::balanced_take(&full.train, t.train_examples, 2, rng);
    let mut test = full.test;
    rng.shuffle(&mut test);
    test.truncate(t.test_examples);
    if train.is_empty() || test.is_empty() {
        bail!("compose task {}: empty train or test set", t.source);
    }
    Ok(Task { name: t.source.clone(), template, label_ids: cls::label_token_ids(tok, &words)?, splits: Splits { train, dev: vec![], test } })
}

/// Parse a composability spec from TOML text (no overrides).
pub fn parse_spec(text: &str) -> Result<ComposeSpec> {
    let doc: toml::Table = toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.message()))?;
    let spec = ComposeSpec::deserialize(toml::Value::Table(doc)).map_err(|e| anyhow::anyhow!("{}", e.message()))?;
    spec.validate()?;
    Ok(spec)
}

pub fn load_spec(path: &Path, overrides: &[String]) -> Result<ComposeSpec> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read spec {}", path.display()))?;
    let mut doc: toml::Table = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message()))?;
    apply_overrides(&mut doc, overrides)?;
    let spec = ComposeSpec::deserialize(toml::Value::Table(doc)).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message()))?;
    spec.validate().with_context(|| format!("in {}", path.display()))?;
    Ok(spec)
}

impl ComposeSpec {
    /// Names and numbers, before the model loads (one-line errors naming the key).
    pub fn validate(&self) -> Result<()> {
        use crate::runs::checks::{at_least_one, at_most, fraction, non_negative, positive, MAX_BATCH, MAX_STEPS};
        crate::runs::check_name("name", &self.name)?;
        crate::util::check_model_path("model", &self.model)?;
        let t = &self.train;
        at_least_one(&[
            ("train.steps", t.steps),
            ("train.batch_size", t.batch_size),
            ("train.max_len", t.max_len),
            ("task_a.train_examples", self.task_a.train_examples),
            ("task_a.test_examples", self.task_a.test_examples),
            ("task_b.train_examples", self.task_b.train_examples),
            ("task_b.test_examples", self.task_b.test_examples),
        ])?;
        at_most(&[("train.steps", t.steps, MAX_STEPS), ("train.batch_size", t.batch_size, MAX_BATCH)])?;
        positive("train.lr", t.lr)?;
        non_negative("train.weight_decay", t.weight_decay)?;
        fraction("train.warmup_ratio", t.warmup_ratio)?;
        non_negative("train.clip_norm", t.clip_norm)?;
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ComposeRow {
    pub training: String,
    pub task: String,
    pub blocks: String,
    pub n: usize,
    pub accuracy: f64,
    pub loss: f64,
    pub majority: f64,
}

/// Run a composability spec; returns the run directory (`notebooks-out/<name>/<stamp>-<hash>/`).
pub fn run_compose(spec_path: &Path, overrides: &[String]) -> Result<PathBuf> {
    let spec = load_spec(spec_path, overrides)?;
    let site = Site::parse(&spec.site)?;
    let l = registry::load_default(&spec.model)?;
    let (model, tok) = (&l.model, &l.tok);
    if spec.layer >= model.cfg.num_layers {
        bail!("layer {} out of range (model has {} blocks)", spec.layer, model.cfg.num_layers);
    }
    let resolved = toml::to_string_pretty(&spec)?;
    let dir = crate::runs::new_run_dir(&spec.name, &crate::runs::short_hash(&resolved))?;
    std::fs::write(dir.join("config.toml"), &resolved)?;
    eprintln!("run directory {}", dir.display());

    let mut rng = Rng::new(spec.seed);
    let ta = load_task(&spec.task_a, tok, &mut rng.fork(0xA))?;
    let tb = load_task(&spec.task_b, tok, &mut rng.fork(0xB))?;
    let dim = match site {
        Site::Q | Site::HeadOutput => model.cfg.num_heads * model.cfg.head_dim,
        Site::K | Site::V => model.cfg.num_kv_heads * model.cfg.head_dim,
        _ => model.cfg.hidden_size,
    };
    let mut iv = RoadIntervention::new(spec.layer, site, dim, spec.group_size, model.device())?;
    let (mask_a, mask_b) = half_masks(iv.n_blocks());
    let mut log = csv::Writer::from_path(dir.join("train_log.csv"))?;
    log.write_record(["training", "phase", "step", "lr", "loss_a", "loss_b", "grad_norm"])?;
    let mut rows = vec![];
    for training in &spec.train.trainings {
        // Every training starts from the identity (θ = 0, α = 1) with the same data order.
        iv.reset()?;
        let mut order_rng = rng.fork(0x0D);
        // (task, its blocks, its loss column in train_log.csv)
        let (a, b) = ((&ta, &mask_a, 0), (&tb, &mask_b, 1));
        let phases: Vec<Vec<(&Task, &Vec<f32>, usize)>> = match training.as_str() {
            "joint" => vec![vec![a, b]],
            "separate" => vec![vec![a], vec![b]],
            o => bail!("train.trainings: {o:?} is not joint or separate"),
        };
        for (phase, tasks) in phases.iter().enumerate() {
            train_phase(model, tok, &mut iv, tasks, &spec.train, &mut order_rng, &mut log, (training, phase + 1))?;
        }
        let params: std::collections::HashMap<String, candle_core::Tensor> =
            [("theta".to_string(), iv.theta.as_tensor().clone()), ("alpha".to_string(), iv.alpha.as_tensor().clone())].into_iter().collect();
        candle_core::safetensors::save(&params, dir.join(format!("intervention-{training}.safetensors")))?;
        rows.extend(evaluate(model, tok, &mut iv, [&ta, &tb], (&mask_a, &mask_b), spec.train.max_len, training)?);
    }
    log.flush()?;
    let mut w = csv::Writer::from_path(dir.join("compose.csv"))?;
    for r in &rows {
        w.serialize(r)?;
    }
    w.flush()?;
    println!("{}", dir.join("compose.csv").display());
    Ok(dir)
}

/// Train the intervention for `tr.steps` steps; each step takes one batch per task in `tasks`
/// (each row switching on its task's blocks) and one clipped AdamW update over their summed loss.
#[allow(clippy::too_many_arguments)]
fn train_phase(
    model: &crate::model::Llama,
    tok: &crate::tokenizer::Tok,
    iv: &mut RoadIntervention,
    tasks: &[(&Task, &Vec<f32>, usize)],
    tr: &ComposeTrain,
    order_rng: &mut Rng,
    log: &mut csv::Writer<std::fs::File>,
    (training, phase): (&str, usize),
) -> Result<()> {
    let params = vec![("theta".to_string(), iv.theta.clone()), ("alpha".to_string(), iv.alpha.clone())];
    let mut opt = AdamW::new(params.clone(), AdamWConfig::with_weight_decay(tr.weight_decay))?;
    let sched = Schedule { base_lr: tr.lr, warmup_steps: (tr.warmup_ratio * tr.steps as f64) as usize, total_steps: tr.steps, decay: Decay::Linear };
    let pb = indicatif::ProgressBar::new(tr.steps as u64);
    pb.set_style(indicatif::ProgressStyle::with_template("compose {prefix} [{elapsed_precise}] {bar:30} {pos}/{len}  {msg}  ETA {eta}").expect("static template"));
    pb.set_prefix(format!("{training} phase {phase}"));
    for step in 0..tr.steps {
        let lr = sched.lr(step);
        let mut losses = vec![String::new(); 2];
        let mut total: Option<candle_core::Tensor> = None;
        for &(task, mask, col) in tasks {
            let batch: Vec<&ClsExample> = (0..tr.batch_size).map(|_| &task.splits.train[order_rng.below(task.splits.train.len())]).collect();
            let prompts = batch.iter().map(|e| cls::encode_prompt(tok, task.template, &e.text, tr.max_len)).collect::<Result<Vec<_>>>()?;
            iv.set_rows(&vec![mask.clone(); batch.len()])?;
            let logits = cls::class_logits(model, None, Some(iv as &mut dyn Hooks), &prompts, &Scorer::LabelWords(task.label_ids.clone()), true)?;
            let loss = cls::cross_entropy(&logits, &batch.iter().map(|e| e.label).collect::<Vec<_>>())?;
            losses[col] = (loss.to_scalar::<f32>()? as f64).to_string();
            total = Some(match total {
                None => loss,
                Some(t) => (t + loss)?,
            });
        }
        let grads = total.context("at least one task")?.backward()?;
        let mut gs = params.iter().map(|(n, v)| grads.get(v).cloned().with_context(|| format!("{n} got no gradient"))).collect::<Result<Vec<_>>>()?;
        let gn = if tr.clip_norm > 0.0 { clip_global_norm(&mut gs, tr.clip_norm)? } else { crate::train::optim::global_norm(&gs)? };
        opt.apply(&gs, lr)?;
        log.write_record([training.to_string(), phase.to_string(), (step + 1).to_string(), lr.to_string(), losses[0].clone(), losses[1].clone(), gn.to_string()])?;
        pb.set_message(format!("loss A {} B {}", trunc_num(&losses[0]), trunc_num(&losses[1])));
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(())
}

fn trunc_num(s: &str) -> String {
    s.parse::<f64>().map(|x| format!("{x:.3}")).unwrap_or_else(|_| "-".into())
}

/// Accuracy and loss of every (task, block set) pair on the test splits.
fn evaluate(
    model: &crate::model::Llama,
    tok: &crate::tokenizer::Tok,
    iv: &mut RoadIntervention,
    tasks: [&Task; 2],
    (mask_a, mask_b): (&Vec<f32>, &Vec<f32>),
    max_len: usize,
    training: &str,
) -> Result<Vec<ComposeRow>> {
    let none = vec![0f32; iv.n_blocks()];
    let both = vec![1f32; iv.n_blocks()];
    let mut rows = vec![];
    for task in tasks {
        for (label, mask) in [("none", &none), ("A", mask_a), ("B", mask_b), ("A+B", &both)] {
            let scorer = Scorer::LabelWords(task.label_ids.clone());
            let (mut correct, mut loss_sum, n) = (0usize, 0f64, task.splits.test.len());
            for ch in task.splits.test.chunks(16) {
                let prompts = ch.iter().map(|e| cls::encode_prompt(tok, task.template, &e.text, max_len)).collect::<Result<Vec<_>>>()?;
                iv.set_rows(&vec![mask.clone(); ch.len()])?;
                let lg = cls::class_logits(model, None, Some(iv as &mut dyn Hooks), &prompts, &scorer, false)?;
                let labels: Vec<usize> = ch.iter().map(|e| e.label).collect();
                loss_sum += cls::cross_entropy(&lg, &labels)?.to_scalar::<f32>()? as f64 * ch.len() as f64;
                let pred = lg.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?;
                correct += pred.iter().zip(&labels).filter(|(p, l)| **p as usize == **l).count();
            }
            let pos = task.splits.test.iter().filter(|e| e.label == 1).count() as f64 / n as f64;
            let r = ComposeRow {
                training: training.into(),
                task: task.name.clone(),
                blocks: label.into(),
                n,
                accuracy: correct as f64 / n as f64,
                loss: loss_sum / n as f64,
                majority: pos.max(1.0 - pos),
            };
            eprintln!("{:<8} task {:<10} blocks {:<4} accuracy {:.4} (n={}, majority {:.3})", r.training, r.task, r.blocks, r.accuracy, r.n, r.majority);
            rows.push(r);
        }
    }
    Ok(rows)
}
