//! The fine-tuning engine as a library call: `train(base, tok, &cfg, &data) -> TrainOutput`.
//!
//! Methods (`methods.rs`): full fine-tuning (every weight a `Var`), LoRA, DoRA, OFT, BOFT, RoAd
//! (1/2/4, either pairing, optional angle-only / magnitude-only), LoReFT (`reft.rs`, hooks). Tasks: classification at the
//! last prompt token (label words or a linear head) and causal-LM on prompt/completion pairs. AdamW with explicit weight decay,
//! warm-up + decay, global-norm clipping, gradient accumulation, periodic dev evaluation keeping
//! the best parameters, and resumable checkpoints (parameters + optimizer moments + step).
//! Batches are a pure function of (seed, step), so a resumed run sees exactly the same data.
use super::cls::{self, ClsMetrics, Head, Scorer};
use super::data::{ClsExample, LmExample};
use super::lm;
use super::optim::{clip_scale, AdamW, AdamWConfig};
use super::schedule::{Decay, Schedule};
use crate::model::{LinearAdapter, Llama};
pub use super::methods::{MethodCfg, Trained};
use crate::tokenizer::Tok;
use crate::util::rng::Rng;
use crate::runs::{read_csv, write_csv};
use super::params::{load_tensors, restore, save_tensors, snapshot, CkptState, LastGood};
use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone, PartialEq)]
pub enum TaskCfg {
    /// `template` contains `{text}`; `label_words[k]` is the single-token answer for label k.
    /// With `head`, a linear head on the last token replaces label-word scoring (trained too).
    Classify { template: String, label_words: Vec<String>, head: bool },
    CausalLm,
}

pub enum TrainData {
    Cls { train: Vec<ClsExample>, dev: Vec<ClsExample> },
    Lm { train: Vec<LmExample>, dev: Vec<LmExample> },
}

impl TrainData {
    fn train_len(&self) -> usize {
        match self {
            TrainData::Cls { train, .. } => train.len(),
            TrainData::Lm { train, .. } => train.len(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub method: MethodCfg,
    pub task: TaskCfg,
    /// Optimizer steps (each `grad_accum` micro-batches of `batch_size`).
    pub steps: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub warmup_ratio: f64,
    pub decay: Decay,
    /// Global gradient-norm clip (None = no clipping).
    pub clip_norm: Option<f64>,
    /// Evaluate on dev every N optimizer steps (and after the last); 0 = only at the end.
    pub eval_every: usize,
    pub eval_batch: usize,
    pub max_len: usize,
    pub seed: u64,
    /// Where logs, checkpoints and the best adapter go; None = in memory only.
    pub out_dir: Option<PathBuf>,
    /// Continue from `out_dir/checkpoint/` if it exists.
    pub resume: bool,
    pub progress: bool,
    /// Recorded in saved adapters (`base_model_name_or_path`).
    pub base_model: String,
}

impl TrainConfig {
    /// Defaults that fit a few-minute SmolLM2 run on 2 cores; the method and task must be given.
    pub fn new(method: MethodCfg, task: TaskCfg) -> Self {
        let weight_decay = match method {
            // Decaying α / magnitudes / scales towards 0 would shrink outputs (see spec.rs).
            MethodCfg::Road { .. } | MethodCfg::Dora { .. } | MethodCfg::Oft { .. } | MethodCfg::Boft { .. } | MethodCfg::Loreft { .. } => 0.0,
            _ => 0.01,
        };
        Self {
            method,
            task,
            steps: 100,
            batch_size: 8,
            grad_accum: 1,
            lr: 1e-3,
            weight_decay,
            warmup_ratio: 0.1,
            decay: Decay::Linear,
            clip_norm: Some(1.0),
            eval_every: 50,
            eval_batch: 16,
            max_len: 96,
            seed: 0,
            out_dir: None,
            resume: false,
            progress: true,
            base_model: String::new(),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LogRow {
    pub step: usize,
    pub lr: f64,
    pub loss: f64,
    pub grad_norm: f64,
    pub elapsed_s: f64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EvalRow {
    pub step: usize,
    pub split: String,
    pub n: usize,
    pub loss: f64,
    /// Classification: label accuracy; causal LM: completion-token accuracy.
    pub accuracy: f64,
}

pub struct TrainOutput {
    pub trained: Trained,
    pub head: Option<Head>,
    pub trainable_params: usize,
    pub base_params: usize,
    pub log: Vec<LogRow>,
    pub evals: Vec<EvalRow>,
    pub best_step: usize,
    pub label_ids: Vec<u32>,
    /// Why training stopped before `steps` (a non-finite loss or gradient): the parameters are
    /// then the best dev checkpoint, else the last step with a finite loss (`best_step`).
    pub stopped: Option<String>,
}

impl TrainOutput {
    pub fn trainable_pct(&self) -> f64 {
        100.0 * self.trainable_params as f64 / self.base_params as f64
    }
    /// The model to run: the fine-tuned one for full FT, else the base.
    pub fn model<'a>(&'a self, base: &'a Llama) -> &'a Llama {
        match &self.trained {
            Trained::Full(m) => m,
            _ => base,
        }
    }
    pub fn adapter(&self) -> Option<&dyn LinearAdapter> {
        self.trained.adapter()
    }
    pub fn scorer(&self) -> Scorer<'_> {
        match &self.head {
            Some(h) => Scorer::Head(h),
            None => Scorer::LabelWords(self.label_ids.clone()),
        }
    }
    /// Save in peft format (`adapter_config.json` + `adapter_model.safetensors`; a head, if any,
    /// as `head.safetensors`), or an HF checkpoint for full fine-tuning.
    pub fn save(&self, dir: &Path, tok: &Tok, base_model: &str) -> Result<()> {
        self.trained.save(self.head.as_ref(), dir, tok, base_model)
    }
}

/// The parameters a run of `cfg` starts from (the method's and head's init draws for its seed,
/// as `train` makes them), untrained: `road finetune --write-init`.
pub fn initial(base: &Llama, cfg: &TrainConfig) -> Result<(Trained, Option<Head>)> {
    let Setup { trained, head, .. } = setup(base, cfg, &mut Rng::new(cfg.seed))?;
    Ok((trained, head))
}

/// Human-readable count like the paper's tables: `0.123M (0.09%)`.
pub fn describe_params(trainable: usize, base: usize) -> String {
    format!("{:.3}M trainable of {:.1}M ({:.3}%)", trainable as f64 / 1e6, base as f64 / 1e6, 100.0 * trainable as f64 / base as f64)
}

/// The data order: sample `k` of the run is `perm_{k / n}[k % n]`, one seeded permutation per epoch.
struct Order {
    seed: u64,
    n: usize,
    epoch: usize,
    perm: Vec<usize>,
}

impl Order {
    fn new(seed: u64, n: usize) -> Self {
        let mut o = Self { seed, n, epoch: usize::MAX, perm: vec![] };
        o.set_epoch(0);
        o
    }
    fn set_epoch(&mut self, e: usize) {
        if e != self.epoch {
            self.perm = (0..self.n).collect();
            Rng::new(self.seed).fork(0xDA7A + e as u64).shuffle(&mut self.perm);
            self.epoch = e;
        }
    }
    fn take(&mut self, start: usize, len: usize) -> Vec<usize> {
        (start..start + len)
            .map(|k| {
                self.set_epoch(k / self.n);
                self.perm[k % self.n]
            })
            .collect()
    }
}

/// The first `count` training-example indices a run with this seed draws from `n` examples, in
/// step order (`road finetune --write-split` records them so a reference implementation can be
/// fed road's batches: a paired comparison, the batch order taken out).
pub fn sample_order(seed: u64, n: usize, count: usize) -> Vec<usize> {
    Order::new(seed, n).take(0, count)
}

struct Setup {
    trained: Trained,
    head: Option<Head>,
    params: Vec<(String, Var)>,
}

fn setup(base: &Llama, cfg: &TrainConfig, rng: &mut Rng) -> Result<Setup> {
    let dev = base.device();
    let (trained, mut params) = super::methods::build(base, &cfg.method, rng)?;
    let head = match &cfg.task {
        TaskCfg::Classify { head: true, label_words, .. } => {
            let h = Head::new(label_words.len(), base.cfg.hidden_size, &mut rng.fork(2), dev)?;
            params.extend(h.named_vars());
            Some(h)
        }
        _ => None,
    };
    if params.is_empty() {
        bail!("nothing to train: the method selects no parameters (check targets/layers)");
    }
    Ok(Setup { trained, head, params })
}

/// Fine-tune per `cfg`. Returns the best (by dev metric) parameters, logs and parameter counts.
pub fn train(base: &Llama, tok: &Tok, cfg: &TrainConfig, data: &TrainData) -> Result<TrainOutput> {
    if cfg.steps == 0 || cfg.batch_size == 0 || cfg.grad_accum == 0 {
        bail!("steps, batch_size and grad_accum must all be >= 1");
    }
    if cfg.lr.is_nan() || cfg.lr <= 0.0 || cfg.weight_decay < 0.0 || !(0.0..1.0).contains(&cfg.warmup_ratio) {
        bail!("need lr > 0, weight_decay >= 0 and 0 <= warmup_ratio < 1");
    }
    if data.train_len() == 0 {
        bail!("no training examples");
    }
    let (label_ids, template) = match (&cfg.task, data) {
        (TaskCfg::Classify { template, label_words, .. }, TrainData::Cls { train, dev }) => {
            if label_words.len() < 2 {
                bail!("classification needs at least two label words");
            }
            if let Some(e) = train.iter().chain(dev).find(|e| e.label >= label_words.len()) {
                bail!("example label {} has no label word ({} given)", e.label, label_words.len());
            }
            (cls::label_token_ids(tok, label_words)?, template.clone())
        }
        (TaskCfg::CausalLm, TrainData::Lm { .. }) if matches!(cfg.method, MethodCfg::Loreft { .. }) => {
            bail!("LoReFT fine-tuning supports classification tasks only (its prompt positions are the classified text's)")
        }
        (TaskCfg::CausalLm, TrainData::Lm { .. }) => (vec![], String::new()),
        _ => bail!("task and data kinds differ (classification needs (text, label) data; causal LM needs prompt/completion pairs)"),
    };
    let mut rng = Rng::new(cfg.seed);
    let Setup { trained, head, params } = setup(base, cfg, &mut rng)?;
    let trainable_params: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
    let base_params = base.cfg.param_count();
    let model: &Llama = match &trained {
        Trained::Full(m) => m,
        _ => base,
    };
    let adapter: Option<&dyn LinearAdapter> = trained.adapter();
    let scorer = match &head {
        Some(h) => Scorer::Head(h),
        None => Scorer::LabelWords(label_ids.clone()),
    };
    let mut opt = AdamW::new(params.clone(), AdamWConfig::with_weight_decay(cfg.weight_decay))?;
    let sched = Schedule {
        base_lr: cfg.lr,
        warmup_steps: (cfg.warmup_ratio * cfg.steps as f64).round() as usize,
        total_steps: cfg.steps,
        decay: cfg.decay,
    };
    if cfg.progress {
        eprintln!("[{}] {}", cfg.method.label(), describe_params(trainable_params, base_params));
    }

    // Resume state.
    let ckpt = cfg.out_dir.as_ref().map(|d| d.join("checkpoint"));
    let (mut start, mut best_step, mut best_score) = (0usize, 0usize, f64::NEG_INFINITY);
    let mut best: Option<Vec<Tensor>> = None;
    let mut log: Vec<LogRow> = vec![];
    let mut evals: Vec<EvalRow> = vec![];
    if let (true, Some(ck)) = (cfg.resume, &ckpt) {
        if ck.join("state.json").exists() {
            let st: CkptState = serde_json::from_str(&std::fs::read_to_string(ck.join("state.json"))?)?;
            if st.method != cfg.method.label() || st.seed != cfg.seed {
                bail!("{}: checkpoint is for {} seed {}, not {} seed {}", ck.display(), st.method, st.seed, cfg.method.label(), cfg.seed);
            }
            restore(&params, &load_tensors(&params, &ck.join("params.safetensors"))?)?;
            opt.load(&ck.join("optim.safetensors"), st.step)?;
            if ck.join("best.safetensors").exists() {
                best = Some(load_tensors(&params, &ck.join("best.safetensors"))?);
            }
            (start, best_step, best_score) = (st.step, st.best_step, st.best_score);
            let dir = cfg.out_dir.as_ref().expect("ckpt implies out_dir");
            log = read_csv::<LogRow>(&dir.join("train_log.csv"))?.into_iter().filter(|r| r.step <= start).collect();
            evals = read_csv::<EvalRow>(&dir.join("metrics.csv"))?.into_iter().filter(|r| r.step <= start).collect();
            if cfg.progress {
                eprintln!("resuming from {} at step {start}", ck.display());
            }
        }
    }

    let evaluate = |step: usize| -> Result<(EvalRow, f64)> {
        match data {
            TrainData::Cls { dev, .. } => {
                let mut hf = trained.reft().map(|s| s.eval_hooks(tok, &template, cfg.max_len));
                let hf = hf.as_mut().map(|f| f as &mut dyn FnMut(&[ClsExample]) -> Result<Box<dyn crate::model::Hooks>>);
                let m: ClsMetrics = cls::evaluate(model, adapter, tok, dev, &template, &scorer, cfg.max_len, cfg.eval_batch, hf, None)?;
                Ok((EvalRow { step, split: "dev".into(), n: m.n, loss: m.loss, accuracy: m.accuracy }, m.accuracy))
            }
            TrainData::Lm { dev, .. } => {
                let (mut ls, mut acc, mut n) = (0.0, 0.0, 0usize);
                for ch in dev.chunks(cfg.eval_batch.max(1)) {
                    let (l, a) = lm::lm_loss(model, adapter, tok, ch, cfg.max_len, false)?;
                    ls += l.to_scalar::<f32>()? as f64 * ch.len() as f64;
                    acc += a * ch.len() as f64;
                    n += ch.len();
                }
                let (loss, accuracy) = (ls / n as f64, acc / n as f64);
                // Lower loss is better.
                Ok((EvalRow { step, split: "dev".into(), n, loss, accuracy }, -loss))
            }
        }
    };
    let has_dev = match data {
        TrainData::Cls { dev, .. } => !dev.is_empty(),
        TrainData::Lm { dev, .. } => !dev.is_empty(),
    };

    let pb = if cfg.progress {
        let pb = indicatif::ProgressBar::new(cfg.steps as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
                .expect("static template"),
        );
        pb.set_position(start as u64);
        pb
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut order = Order::new(cfg.seed, data.train_len());
    let t0 = Instant::now();
    let prev_elapsed = log.last().map(|r| r.elapsed_s).unwrap_or(0.0);
    let mut last_good = LastGood::new(trainable_params);
    let mut stopped: Option<String> = None;
    let mut prof = super::step_profile::StepProfile::from_env();
    'steps: for step in start..cfg.steps {
        prof.start();
        let lr = sched.lr(step);
        let mut acc: Option<Vec<Tensor>> = None;
        let mut loss_sum = 0f64;
        for micro in 0..cfg.grad_accum {
            let idx = order.take((step * cfg.grad_accum + micro) * cfg.batch_size, cfg.batch_size);
            // Dropout masks are a function of (seed, step, micro) too, for exact resumes.
            trained.set_training(Some(Rng::new(cfg.seed).fork(((step * cfg.grad_accum + micro) as u64) << 8 | 3)));
            let loss = match data {
                TrainData::Cls { train, .. } => {
                    let b: Vec<&ClsExample> = idx.iter().map(|&i| &train[i]).collect();
                    let prompts = b.iter().map(|e| cls::encode_prompt(tok, &template, &e.text, cfg.max_len)).collect::<Result<Vec<_>>>()?;
                    let mut hooks = trained.prompt_hooks(&prompts);
                    let logits = cls::class_logits(model, adapter, hooks.as_mut().map(|h| h as &mut dyn crate::model::Hooks), &prompts, &scorer, true)?;
                    cls::cross_entropy(&logits, &b.iter().map(|e| e.label).collect::<Vec<_>>())?
                }
                TrainData::Lm { train, .. } => {
                    let b: Vec<LmExample> = idx.iter().map(|&i| train[i].clone()).collect();
                    lm::lm_loss(model, adapter, tok, &b, cfg.max_len, true)?.0
                }
            };
            let lv = loss.to_scalar::<f32>()? as f64; // (a device sync: `prof` times the forward up to here)
            prof.mark(0, None)?;
            if !lv.is_finite() {
                stopped = Some(format!("loss became {lv} at step {} (lr {lr:e} too high?)", step + 1));
                break 'steps;
            }
            loss_sum += lv;
            let grads = (loss / cfg.grad_accum as f64)?.backward()?;
            prof.mark(1, Some(base.device()))?;
            let mut gs = Vec::with_capacity(params.len());
            for (name, v) in &params {
                // A trainable parameter without a gradient means it is not wired into the loss.
                let g = grads.get(v).with_context(|| format!("trainable parameter {name} received no gradient"))?;
                // Detached: a leaf's gradient from candle still references the forward graph, which
                // AdamW's moments would otherwise keep alive step after step.
                gs.push(g.detach());
            }
            acc = Some(match acc {
                None => gs,
                Some(a) => a.iter().zip(&gs).map(|(x, y)| x + y).collect::<candle_core::Result<Vec<_>>>()?,
            });
        }
        trained.set_training(None);
        let mut grads = acc.expect("grad_accum >= 1");
        trained.project_grads(&params, &mut grads)?;
        // The clip factor goes into the update (one launch per tensor on CUDA).
        let grad_norm = super::optim::global_norm(&grads)?;
        let gscale = clip_scale(grad_norm, cfg.clip_norm);
        if !grad_norm.is_finite() {
            stopped = Some(format!("the gradient norm became {grad_norm} at step {} (lr {lr:e} too high, or an overflow in {:?}?)", step + 1, base.dtype()));
            break;
        }
        last_good.keep(&params, step)?;
        opt.apply_scaled(&grads, lr, gscale)?;
        trained.after_step()?;
        prof.mark(2, Some(base.device()))?;
        prof.report(step + 1);
        let loss = loss_sum / cfg.grad_accum as f64;
        log.push(LogRow { step: step + 1, lr, loss, grad_norm, elapsed_s: prev_elapsed + t0.elapsed().as_secs_f64() });
        pb.set_message(format!("loss {loss:.4}"));
        pb.inc(1);
        let last = step + 1 == cfg.steps;
        let eval_now = has_dev && (last || (cfg.eval_every > 0 && (step + 1) % cfg.eval_every == 0));
        if eval_now {
            let (row, score) = evaluate(step + 1)?;
            pb.println(format!("step {:>5}  dev loss {:.4}  acc {:.4}", row.step, row.loss, row.accuracy));
            // Parameters whose dev loss is not finite are neither the best nor worth a checkpoint
            // (a resume must restart from finite ones).
            let finite = row.loss.is_finite();
            evals.push(row);
            if finite && score > best_score {
                best_score = score;
                best_step = step + 1;
                best = Some(snapshot(&params)?);
            }
            if let (true, Some(dir), Some(ck)) = (finite, &cfg.out_dir, &ckpt) {
                std::fs::create_dir_all(ck)?;
                save_tensors(&params, None, &ck.join("params.safetensors"))?;
                opt.save(&ck.join("optim.safetensors"))?;
                if let Some(b) = &best {
                    save_tensors(&params, Some(b), &ck.join("best.safetensors"))?;
                }
                let st = CkptState { step: step + 1, best_step, best_score, seed: cfg.seed, method: cfg.method.label() };
                std::fs::write(ck.join("state.json"), serde_json::to_string_pretty(&st)?)?;
                write_csv(&dir.join("train_log.csv"), &log, &[])?;
                write_csv(&dir.join("metrics.csv"), &evals, &[])?;
            }
        }
    }
    trained.set_training(None); // a stop inside the micro-batch loop skipped the reset above
    pb.finish_and_clear();
    if let Some(b) = &best {
        restore(&params, b)?;
    } else if let Some(why) = &stopped {
        // No dev checkpoint yet: the last parameters that gave a finite loss, if kept.
        let Some(v) = &last_good.values else {
            bail!("{why}; stopped with nothing trained to keep (no dev evaluation yet{})", if last_good.enabled { "" } else { ", and full fine-tuning keeps no per-step copy" });
        };
        restore(&params, v)?;
        best_step = last_good.step;
    } else {
        best_step = cfg.steps;
    }
    if let Some(why) = &stopped {
        pb.println(format!("stopped: {why}; keeping the parameters of step {best_step}"));
    }
    let out = TrainOutput { trained, head, trainable_params, base_params, log, evals, best_step, label_ids, stopped };
    if let Some(dir) = &cfg.out_dir {
        write_csv(&dir.join("train_log.csv"), &out.log, &[])?;
        write_csv(&dir.join("metrics.csv"), &out.evals, &[])?;
        out.save(&dir.join("adapter"), tok, &cfg.base_model)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::sample_order;

    #[test]
    fn sample_order_is_one_seeded_permutation_per_epoch() {
        let (n, seed) = (37, 5);
        let o = sample_order(seed, n, 3 * n + 4);
        for e in 0..3 {
            let mut epoch = o[e * n..(e + 1) * n].to_vec();
            epoch.sort_unstable();
            assert_eq!(epoch, (0..n).collect::<Vec<_>>(), "epoch {e} is not a permutation");
        }
        assert_ne!(o[..n], o[n..2 * n], "epochs must be shuffled afresh");
        assert_eq!(o, sample_order(seed, n, 3 * n + 4), "same seed, same order");
        assert_ne!(o[..n], sample_order(seed + 1, n, n)[..], "another seed, another order");
        // A prefix of a longer draw is the shorter draw: the order does not depend on the run length.
        assert_eq!(o[..10], sample_order(seed, n, 10)[..]);
    }
}
