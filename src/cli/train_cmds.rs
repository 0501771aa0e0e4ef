//! `road fetch-data`, `road finetune`, `road eval`.
use super::ModelArgs;
use crate::fetch;
use crate::adapters::AnyAdapter;
use crate::train::cls::{self, Head, Scorer};
use crate::train::data::{self, ClsExample};
use crate::train::reft::LoreftSet;
use crate::train::{run, spec};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct FinetuneArgs {
    /// Experiment spec (TOML), e.g. experiments/sentiment-road1.toml.
    pub spec: Option<PathBuf>,
    /// Override a spec key, e.g. --set train.steps=20 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Continue an interrupted run from its directory (uses its config.toml).
    #[arg(long, value_name = "RUN_DIR")]
    pub resume: Option<PathBuf>,
    /// Write the spec's train/dev/test examples, the prompt template and label words as JSONL
    /// (`{"split", "text", "label"}` rows after one `{"template", "label_words"}` row) and exit
    /// without training, so a reference script trains on exactly the same data.
    #[arg(long, value_name = "FILE")]
    pub write_split: Option<PathBuf>,
    /// Write the parameters a run of the spec starts from (its seed's init draws, before any
    /// step) as a new adapter directory and exit, so a reference script starts from the same
    /// parameters.
    #[arg(long, value_name = "DIR")]
    pub write_init: Option<PathBuf>,
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// A peft adapter directory (RoAd, LoRA, DoRA, OFT or BOFT) or a LoReFT one (none = the plain model).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// sentiment, parity, or a .csv/.jsonl file of (text, label).
    #[arg(long, default_value = "sentiment")]
    pub task: String,
    /// train, dev or test.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Evaluate at most N examples (0 = all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// Prompt template with {text} (default: the task's, or the run's config.toml next to --adapter).
    #[arg(long)]
    pub template: Option<String>,
    /// Comma-separated single-token label words, in label order.
    #[arg(long, value_delimiter = ',')]
    pub label_words: Vec<String>,
    /// Label names of a custom file, in label-word order.
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<String>,
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    #[arg(long, default_value_t = 96)]
    pub max_len: usize,
}

pub fn fetch_data(name: &str) -> Result<()> {
    let Some(s) = fetch::lookup_dataset(name) else {
        bail!("no registered dataset {name:?}; registered: {}", fetch::DATASETS.iter().map(|s| s.name).collect::<Vec<_>>().join(", "));
    };
    let p = s.fetch_or_verify(true)?;
    println!("{}", p.display());
    Ok(())
}

pub fn finetune(a: &FinetuneArgs) -> Result<()> {
    if let Some(out) = &a.write_split {
        let Some(p) = &a.spec else { bail!("--write-split needs a spec file") };
        return write_split(&spec::load(p, &a.set)?, out);
    }
    if let Some(out) = &a.write_init {
        let Some(p) = &a.spec else { bail!("--write-init needs a spec file") };
        return run::write_init(p, &a.set, out);
    }
    run::run_finetune(a.spec.as_deref(), &a.set, a.resume.as_deref())?;
    Ok(())
}

fn write_split(s: &spec::Spec, out: &Path) -> Result<()> {
    use std::io::Write;
    let d = s.cls_data(false)?;
    let mut f = std::io::BufWriter::new(std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?);
    // train_order: the example indices of road's batches, step by step (micro-batches in turn).
    let order = crate::train::engine::sample_order(s.seed, d.train.len(), s.train.steps * s.train.grad_accum * s.train.batch_size);
    writeln!(f, "{}", serde_json::json!({"template": s.task.template, "label_words": s.task.label_words, "max_len": s.train.max_len, "train_order": order}))?;
    for (name, rows) in [("train", &d.train), ("dev", &d.dev), ("test", &d.test)] {
        for e in rows.iter() {
            writeln!(f, "{}", serde_json::json!({"split": name, "text": e.text, "label": e.label}))?;
        }
    }
    f.flush()?;
    eprintln!("{}: {} train, {} dev, {} test", out.display(), d.train.len(), d.dev.len(), d.test.len());
    Ok(())
}

/// Template and label words recorded by the run that produced `adapter` (its parent's config.toml).
fn run_task_of(adapter: &Path) -> Option<spec::TaskSpec> {
    let cfg = adapter.parent()?.join("config.toml");
    let s = spec::load(&cfg, &[]).ok()?;
    eprintln!("using the prompt template and label words of {}", cfg.display());
    Some(s.task)
}

pub fn eval(a: &EvalArgs) -> Result<()> {
    let (tpl, words): (&str, &[&str]) = match a.task.as_str() {
        "sentiment" => (spec::SENTIMENT_TEMPLATE, &spec::SENTIMENT_LABEL_WORDS),
        "parity" => (spec::PARITY_TEMPLATE, &spec::PARITY_LABEL_WORDS),
        _ => ("", &[]),
    };
    let recorded = a.adapter.as_deref().and_then(run_task_of);
    let template = a.template.clone().or(recorded.as_ref().map(|t| t.template.clone())).unwrap_or(tpl.to_string());
    let label_words: Vec<String> = if !a.label_words.is_empty() {
        a.label_words.clone()
    } else if let Some(t) = recorded.as_ref().filter(|t| !t.label_words.is_empty()) {
        t.label_words.clone()
    } else {
        words.iter().map(|s| s.to_string()).collect()
    };
    if template.is_empty() || label_words.is_empty() {
        bail!("task {:?} needs --template and --label-words", a.task);
    }
    let splits = match a.task.as_str() {
        "sentiment" => data::load_sentiment(0.0, true)?,
        "parity" => data::parity_task(),
        f => {
            if a.labels.is_empty() {
                bail!("a custom task file needs --labels (label names in label-word order)");
            }
            data::load_cls_file(Path::new(f), &a.labels)?
        }
    };
    let mut ex: Vec<ClsExample> = match a.split.as_str() {
        "train" => splits.train,
        "dev" => splits.dev,
        "test" => splits.test,
        s => bail!("unknown split {s:?} (train, dev or test)"),
    };
    if a.limit > 0 {
        // The corpus is sorted by label: sample (seed 0) instead of taking a prefix.
        crate::util::rng::Rng::new(0).shuffle(&mut ex);
        ex.truncate(a.limit);
    }
    // A full fine-tuning run saves a whole checkpoint: evaluate it as the model.
    let (model_spec, adapter_dir) = match &a.adapter {
        Some(d) if d.join("config.json").exists() => (d.to_string_lossy().to_string(), None),
        other => (a.m.model.clone(), other.clone()),
    };
    let m = ModelArgs { model: model_spec, ..a.m.clone() };
    let l = m.load()?;
    let reft = match &adapter_dir {
        Some(d) if LoreftSet::is_reft_dir(d) => Some(LoreftSet::load(d, &l.model.cfg, l.model.device())?),
        _ => None,
    };
    let adapter = match &adapter_dir {
        Some(d) if reft.is_none() => Some(AnyAdapter::load(d, &l.model.cfg, l.model.device())?),
        _ => None,
    };
    let head_path = a.adapter.as_ref().map(|d| d.join("head.safetensors")).filter(|p| p.exists());
    let head = match &head_path {
        Some(p) => {
            let t = candle_core::safetensors::load(p, l.model.device()).with_context(|| format!("reading {}", p.display()))?;
            let get = |k: &str| t.get(k).cloned().with_context(|| format!("{}: no {k}", p.display()));
            Some(Head { w: candle_core::Var::from_tensor(&get("head.weight")?)?, b: candle_core::Var::from_tensor(&get("head.bias")?)? })
        }
        None => None,
    };
    let scorer = match &head {
        Some(h) => Scorer::Head(h),
        None => Scorer::LabelWords(cls::label_token_ids(&l.tok, &label_words)?),
    };
    let pb = indicatif::ProgressBar::new(ex.len() as u64);
    pb.set_style(indicatif::ProgressStyle::with_template("eval {bar:30} {pos}/{len}  ETA {eta}").expect("static template"));
    let mut hf = reft.as_ref().map(|s| s.eval_hooks(&l.tok, &template, a.max_len));
    let t0 = std::time::Instant::now();
    let r = cls::evaluate(
        &l.model,
        adapter.as_ref().map(|a| a as &dyn crate::model::LinearAdapter),
        &l.tok,
        &ex,
        &template,
        &scorer,
        a.max_len,
        a.batch,
        hf.as_mut().map(|f| f as &mut dyn FnMut(&[ClsExample]) -> Result<Box<dyn crate::model::Hooks>>),
        Some(&pb),
    )?;
    pb.finish_and_clear();
    let what = match (&a.adapter, &adapter) {
        (Some(d), Some(ad)) => format!("{} adapter {}", ad.kind(), d.display()),
        (Some(d), None) if reft.is_some() => format!("loreft interventions {}", d.display()),
        (Some(d), None) => format!("fine-tuned model {}", d.display()),
        _ => "no adapter".into(),
    };
    println!(
        "task {} split {} n={}  accuracy {:.4}  (majority-class {:.4}, loss {:.4}; {what}; {:.0}s)",
        a.task, a.split, r.n, r.accuracy, r.majority, r.loss, t0.elapsed().as_secs_f64()
    );
    Ok(())
}
