//! `road finetune SPEC`: load a spec, fine-tune, evaluate on the test split, and write
//! `notebooks-out/<name>/<YYYYmmdd-HHMMSS>-<hash>/` (config.toml, train_log.csv, metrics.csv,
//! summary.json, adapter/).
use super::cls::{self, ClsMetrics};
use super::engine::{self, EvalRow, TrainData, TrainOutput};
use super::spec::{self, Spec};
use crate::model::{registry, Llama};
use crate::tokenizer::Tok;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Where run directories go (relative to the working directory).
pub use crate::runs::out_root;

/// Run a spec file (or resume `resume_dir`, whose `config.toml` is then the spec). Returns the run dir.
pub fn run_finetune(spec_path: Option<&Path>, overrides: &[String], resume_dir: Option<&Path>) -> Result<PathBuf> {
    let (spec, dir) = match (spec_path, resume_dir) {
        (_, Some(d)) => {
            // --set may change a resumed run's settings (a lower lr after a NaN, fewer steps to
            // export the best checkpoint as it is); the checkpoint must still be for the same
            // method and seed (the engine checks), and config.toml records what the rest ran with.
            let s = spec::load(&d.join("config.toml"), overrides)?;
            if !overrides.is_empty() {
                let n = (1..).find(|n| !d.join(format!("config.before-resume-{n}.toml")).exists()).unwrap_or(1);
                std::fs::copy(d.join("config.toml"), d.join(format!("config.before-resume-{n}.toml")))?;
                std::fs::write(d.join("config.toml"), s.to_toml()?)?;
                eprintln!("resuming with {} (the previous settings: config.before-resume-{n}.toml)", overrides.join(" "));
            }
            (s, d.to_path_buf())
        }
        (Some(p), None) => {
            let s = spec::load(p, overrides)?;
            let dir = crate::runs::new_run_dir(&s.name, &crate::runs::short_hash(&s.to_toml()?))?;
            std::fs::write(dir.join("config.toml"), s.to_toml()?)?;
            (s, dir)
        }
        (None, None) => bail!("give a spec file (or --resume RUN_DIR)"),
    };
    eprintln!("run directory {}", dir.display());
    let l = registry::load_default(&spec.model)?;
    let summary = finetune_and_test(&spec, &l.model, &l.tok, &dir, resume_dir.is_some())?;
    std::fs::write(dir.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    println!("{}", serde_json::to_string(&summary)?);
    if let Some(why) = &summary.stopped {
        // Exit non-zero, but after the summary and the adapter of the kept parameters exist.
        bail!(
            "{why}: training stopped; kept the parameters of step {} (adapter in {}, summary.json beside it); `road finetune --resume {} --set train.lr=...` continues from the last checkpoint",
            summary.best_step,
            dir.join("adapter").display(),
            dir.display()
        );
    }
    Ok(dir)
}

/// `road finetune SPEC --write-init DIR`: the parameters a run of `spec` starts from, before any
/// step, saved as its adapter would be (peft format; LoReFT's own), so a reference
/// implementation can start from road's init draws (`peft_sentiment.py --init-adapter`): with
/// `--write-split`'s batch order and dropout 0, a fully paired comparison.
pub fn write_init(spec_path: &Path, overrides: &[String], out: &Path) -> Result<()> {
    if out.exists() {
        bail!("{} exists; --write-init writes a new directory (never over another)", out.display());
    }
    let spec = spec::load(spec_path, overrides)?;
    let cfg = spec.train_cfg()?;
    let l = registry::load_default(&spec.model)?;
    let (trained, head) = engine::initial(&l.model, &cfg)?;
    std::fs::create_dir_all(out)?;
    trained.save(head.as_ref(), out, &l.tok, &cfg.base_model)?;
    eprintln!("{}: {} seed {} before step 1", out.display(), cfg.method.label(), cfg.seed);
    Ok(())
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub name: String,
    pub method: String,
    pub seed: u64,
    pub trainable_params: usize,
    pub base_params: usize,
    pub trainable_pct: f64,
    pub steps: usize,
    pub best_step: usize,
    pub train_secs: f64,
    pub dev_accuracy: Option<f64>,
    pub test: Option<ClsMetrics>,
    /// Set when training stopped early on a non-finite loss or gradient (the reason and step).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
}

/// Train per `spec` into `dir` and evaluate the best parameters on the test split.
pub fn finetune_and_test(spec: &Spec, model: &Llama, tok: &Tok, dir: &Path, resume: bool) -> Result<Summary> {
    let mut cfg = spec.train_cfg()?;
    cfg.out_dir = Some(dir.to_path_buf());
    cfg.resume = resume;
    let (data, test) = match spec.task.kind.as_str() {
        "causal_lm" => {
            let s = spec.lm_data()?;
            (TrainData::Lm { train: s.train, dev: s.dev }, None)
        }
        _ => {
            let s = spec.cls_data(true)?;
            eprintln!("data {}: {} train, {} dev, {} test", spec.data.source, s.train.len(), s.dev.len(), s.test.len());
            (TrainData::Cls { train: s.train, dev: s.dev }, Some(s.test))
        }
    };
    let out: TrainOutput = engine::train(model, tok, &cfg, &data)?;
    let mut evals = out.evals.clone();
    let test_m = match (&test, &spec.task_cfg()?) {
        (Some(test), engine::TaskCfg::Classify { template, .. }) => {
            let pb = indicatif::ProgressBar::new(test.len() as u64);
            pb.set_style(indicatif::ProgressStyle::with_template("test  {bar:30} {pos}/{len}  ETA {eta}").expect("static template"));
            let mut hf = out.trained.reft().map(|s| s.eval_hooks(tok, template, cfg.max_len));
            let hf = hf.as_mut().map(|f| f as &mut dyn FnMut(&[super::data::ClsExample]) -> Result<Box<dyn crate::model::Hooks>>);
            let m = cls::evaluate(out.model(model), out.adapter(), tok, test, template, &out.scorer(), cfg.max_len, cfg.eval_batch, hf, Some(&pb))?;
            pb.finish_and_clear();
            evals.push(EvalRow { step: out.best_step, split: "test".into(), n: m.n, loss: m.loss, accuracy: m.accuracy });
            let mut w = csv::Writer::from_path(dir.join("metrics.csv")).context("writing metrics.csv")?;
            for r in &evals {
                w.serialize(r)?;
            }
            w.flush()?;
            Some(m)
        }
        _ => None,
    };
    let dev_acc = out.evals.iter().filter(|r| r.step == out.best_step && r.split == "dev").map(|r| r.accuracy).next();
    Ok(Summary {
        name: spec.name.clone(),
        method: cfg.method.label(),
        seed: spec.seed,
        trainable_params: out.trainable_params,
        base_params: out.base_params,
        trainable_pct: out.trainable_pct(),
        steps: cfg.steps,
        best_step: out.best_step,
        train_secs: out.log.last().map(|r| r.elapsed_s).unwrap_or(0.0),
        dev_accuracy: dev_acc,
        test: test_m,
        stopped: out.stopped.clone(),
    })
}
