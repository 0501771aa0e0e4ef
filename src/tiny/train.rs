//! Training the tiny ground-truth model from scratch: seeded init (`model::init`), a curriculum
//! over P(a==b), the equality loss plus the IIT loss, and the project's AdamW (`train::optim`)
//! in two groups (matrices decay, norm gains do not). Deterministic given [`TrainOpts`].
use super::arch::{build_tokenizer, llama_config, TinyArch};
use super::iit::{iit_accuracy, iit_labels, iit_position, iit_step, interchanged_logits};
use super::task::{accuracy, batch_acc, last_logits, TaskIds};
use crate::model::init::init_varmap;
use crate::model::Llama;
use crate::tasks::equality::Variable;
use crate::tokenizer::Tok;
use crate::train::optim::{AdamW, AdamWConfig};
use crate::util::rng::Rng;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use tokenizers::Tokenizer;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct TrainOpts {
    pub arch: TinyArch,
    pub steps: usize,
    pub batch: usize,
    /// Peak learning rate (linear warm-up, then cosine decay to `lr * min_lr_frac`).
    pub lr: f64,
    pub min_lr_frac: f64,
    pub warmup: usize,
    /// AdamW weight decay on matrices (embeddings included); norm gains are not decayed.
    pub weight_decay: f64,
    /// Curriculum over the sampling distribution: P(a==b) = P(c==d) starts at this value and
    /// anneals linearly to 0.5 over the first `curriculum_frac` of the steps (then stays 0.5).
    /// With both marginals above 0.5 the answer correlates with each equality on its own, which
    /// breaks the XNOR symmetry that otherwise stalls training at chance. 0.5 = no curriculum.
    pub p_equal_start: f64,
    pub curriculum_frac: f64,
    pub seed: u64,
    /// Held-out accuracy every this many steps (0 = only at the end).
    pub eval_every: usize,
    pub eval_examples: usize,
    /// Rayon threads for training (1 is fastest for tensors this small; results do not depend on it).
    pub threads: usize,
    /// Interchange-intervention training (Geiger et al., 2022): weight of the IIT loss (0 = off).
    /// Every step also runs the batch with part of the `block_output` of block `iit_layer` at
    /// position b (for a==b; with `iit_right`, at d for c==d in turn) taken from another example,
    /// and asks for the counterfactual answer (see `iit_dims` and `iit_step`). This pins where
    /// each equality variable lives, so the model is a ground truth for DAS by construction
    /// rather than by luck.
    pub iit_weight: f64,
    pub iit_layer: usize,
    /// Dimension of the subspace IIT swaps (a seeded random orthonormal basis of the residual
    /// stream, saved as `iit_subspace.safetensors`); 0 = the whole vector. A whole-vector swap
    /// would let the model pass symbol identities on and compare them later; a small subspace
    /// makes each equality a low-dimensional linear variable, the thing DAS looks for.
    pub iit_dims: usize,
    /// Also train c==d into the subspace at d (off by default: at this size and budget it
    /// competes with a==b and neither ends up a clean ground truth).
    pub iit_right: bool,
    /// Show an indicatif progress bar on stderr.
    #[serde(skip)]
    pub progress: bool,
}

impl Default for TrainOpts {
    fn default() -> Self {
        Self {
            arch: TinyArch::default(),
            steps: 6000,
            batch: 128,
            lr: 3e-3,
            min_lr_frac: 0.05,
            warmup: 100,
            weight_decay: 0.01,
            p_equal_start: 0.8,
            curriculum_frac: 0.5,
            seed: 0,
            eval_every: 100,
            eval_examples: 1000,
            threads: 1,
            iit_weight: 1.0,
            iit_layer: 1,
            iit_dims: 1,
            iit_right: false,
            progress: false,
        }
    }
}

/// The result of [`train`]: the model (its tensors are the VarMap's variables), its tokenizer,
/// and the training record.
pub struct Trained {
    pub model: Llama,
    pub tok: Tok,
    pub tokenizer: Tokenizer,
    pub varmap: VarMap,
    pub opts: TrainOpts,
    /// (step, training-batch loss, training-batch accuracy), every step.
    pub history: Vec<(usize, f32, f64)>,
    /// (step, held-out accuracy).
    pub evals: Vec<(usize, f64)>,
    /// Mean training loss over the last 50 steps (or fewer).
    pub final_loss: f32,
    /// Accuracy on `final_eval_examples` fresh examples at the end.
    pub final_acc: f64,
    /// With IIT: held-out interchange accuracy for (a==b at b, c==d at d) after block `iit_layer`.
    /// The same with the complement of the subspace swapped (the answer must not change).
    pub final_iit_acc: Option<((f64, f64), Option<(f64, f64)>)>,
    /// The subspace IIT swapped, `[iit_dims, hidden]` orthonormal rows (None: whole vector / no IIT).
    pub iit_basis: Option<Tensor>,
    pub final_eval_examples: usize,
    pub secs: f64,
    /// Why training stopped before `opts.steps` (a non-finite loss at a step); the weights are
    /// then those of the last step whose loss was finite.
    pub stopped: Option<String>,
}

fn lr_at(o: &TrainOpts, step: usize) -> f64 {
    if step < o.warmup {
        return o.lr * (step + 1) as f64 / o.warmup as f64;
    }
    let span = (o.steps.saturating_sub(o.warmup)).max(1) as f64;
    let frac = ((step - o.warmup) as f64 / span).min(1.0);
    let min = o.lr * o.min_lr_frac;
    min + (o.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * frac).cos())
}

/// Train a tiny LLaMA on equality from scratch (CPU, f32), in a dedicated rayon pool of
/// `opts.threads` threads. Deterministic given `opts` (weights were bit-identical with 1 and 2
/// threads when checked; candle's CPU GEMM does not split reductions across threads here).
pub fn train(opts: &TrainOpts) -> Result<Trained> {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(opts.threads.max(1)).build()?;
    pool.install(|| train_in_pool(opts))
}

fn train_in_pool(opts: &TrainOpts) -> Result<Trained> {
    // Bounded before anything is sized by them.
    {
        use crate::runs::checks::{at_least_one, at_most, positive, MAX_BATCH, MAX_STEPS};
        at_least_one(&[("--batch", opts.batch)])?;
        at_most(&[("--steps", opts.steps, MAX_STEPS), ("--batch", opts.batch, MAX_BATCH)])?;
        positive("--lr", opts.lr)?;
    }
    let start = std::time::Instant::now();
    // CPU: a run is reproduced bit for bit there, and a model this small gains nothing from a
    // GPU. (The checked-in model predates the switch to train::optim; see its README.)
    let device = crate::runtime::device_for("cpu")?;
    let cfg = llama_config(&opts.arch)?;
    let tokenizer = build_tokenizer()?;
    let tok = Tok::from_tokenizer(tokenizer.clone(), None, vec![]);
    let task = TaskIds::new(&tok)?;
    let mut rng = Rng::new(opts.seed);
    let mut init_rng = rng.fork(1);
    let mut data_rng = rng.fork(2);
    let eval_seed = rng.fork(3).next_u64();
    let final_seed = rng.fork(4).next_u64();
    // Its own stream, so turning IIT off reproduces the plain model bit for bit.
    let mut iit_rng = rng.fork(5);
    if opts.iit_weight > 0.0 && opts.iit_layer >= opts.arch.layers {
        bail!("--iit-layer {} is out of range: the model has {} blocks", opts.iit_layer, opts.arch.layers);
    }
    if opts.iit_dims > opts.arch.hidden {
        bail!("--iit-dims {} exceeds the hidden size {}", opts.iit_dims, opts.arch.hidden);
    }
    let iit_basis = if opts.iit_weight > 0.0 && opts.iit_dims > 0 {
        Some(crate::intervene::orth::random_orthonormal(opts.iit_dims, opts.arch.hidden, rng.fork(6).next_u64(), &device)?)
    } else {
        None
    };

    let varmap = init_varmap(&cfg, &mut init_rng, &device)?;
    let n_vars = varmap.all_vars().len();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let model = Llama::load(vb, cfg.clone())?;
    if varmap.all_vars().len() != n_vars {
        bail!("Llama::load asked for a tensor the initialiser did not create");
    }
    // Two parameter groups: matrices decay, norm gains do not. Sorted by name so the optimiser
    // state is laid out the same way every run.
    let mut named: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .map_err(|_| anyhow!("VarMap lock poisoned"))?
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let (mats, gains): (Vec<_>, Vec<_>) = named.into_iter().partition(|(_, v)| v.rank() >= 2);
    let adamw = |wd: f64| AdamWConfig { beta1: 0.9, beta2: 0.98, eps: 1e-8, weight_decay: wd };
    let mut optimisers = [AdamW::new(mats, adamw(opts.weight_decay))?, AdamW::new(gains, adamw(0.0))?];

    let pb = if opts.progress {
        let pb = indicatif::ProgressBar::new(opts.steps as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] step {pos}/{len} {msg}")
                .map_err(|e| anyhow!("{e}"))?
                .progress_chars("=> "),
        );
        pb
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut history = Vec::with_capacity(opts.steps);
    let mut evals = Vec::new();
    let mut last_eval = f64::NAN;
    let all_vars = varmap.all_vars();
    // Weights that last gave a finite loss (the model is tiny: a copy per step is cheap).
    let mut last_good: Option<Vec<Tensor>> = None;
    let mut stopped = None;
    for step in 0..opts.steps {
        let lr = lr_at(opts, step);
        let cur_steps = opts.curriculum_frac * opts.steps as f64;
        let p_eq = if cur_steps > 0.0 {
            0.5 + (opts.p_equal_start - 0.5) * (1.0 - step as f64 / cur_steps).max(0.0)
        } else {
            0.5
        };
        let (x, y) = task.sample(&tok, &mut data_rng, opts.batch, p_eq)?;
        let logits = last_logits(&model, &x, true)?;
        let target = Tensor::new(y.as_slice(), &device)?;
        let mut loss = candle_nn::loss::cross_entropy(&logits, &target)?;
        let mut iit_acc = f64::NAN;
        if opts.iit_weight > 0.0 {
            let (src, _) = task.sample(&tok, &mut iit_rng, opts.batch, p_eq)?;
            let (var, complement) = iit_step(step, iit_basis.is_some(), opts.iit_right);
            let cf = iit_labels(var, &x, &src, task.ans, complement);
            let at = (opts.iit_layer, iit_position(var)?);
            let il = interchanged_logits(&model, &x, &src, at, iit_basis.as_ref(), complement, true)?;
            let il_loss = candle_nn::loss::cross_entropy(&il, &Tensor::new(cf.as_slice(), &device)?)?;
            iit_acc = batch_acc(&il, &cf)?;
            loss = (loss + (il_loss * opts.iit_weight)?)?;
        }
        // Checked before the update: a NaN gradient must not reach the weights.
        let l = loss.to_scalar::<f32>()?;
        if !l.is_finite() {
            stopped = Some(format!("loss became {l} at step {} (--lr {:e} too high?); kept the weights of step {step}", step + 1, opts.lr));
            if let Some(good) = &last_good {
                for (v, t) in all_vars.iter().zip(good) {
                    v.set(t)?;
                }
            }
            break;
        }
        last_good = Some(all_vars.iter().map(|v| v.as_tensor().copy()).collect::<candle_core::Result<_>>()?);
        let grads = loss.backward()?;
        for opt in &mut optimisers {
            let g = opt
                .params()
                .iter()
                .map(|(name, v)| grads.get(v).cloned().with_context(|| format!("parameter {name} received no gradient")))
                .collect::<Result<Vec<_>>>()?;
            opt.apply(&g, lr)?;
        }
        let acc = batch_acc(&logits, &y)?;
        history.push((step + 1, l, acc));
        if opts.eval_every > 0 && (step + 1) % opts.eval_every == 0 {
            last_eval = accuracy(&model, &tok, opts.eval_examples, eval_seed)?;
            evals.push((step + 1, last_eval));
        }
        pb.set_position(step as u64 + 1);
        pb.set_message(format!("loss {l:.4} acc {acc:.3} iit {iit_acc:.3} held-out {last_eval:.4} lr {lr:.1e}"));
    }
    pb.finish();
    let tail = &history[history.len().saturating_sub(50)..];
    let final_loss = if tail.is_empty() { f32::NAN } else { tail.iter().map(|h| h.1).sum::<f32>() / tail.len() as f32 };
    let final_eval_examples = 2000;
    let final_acc = accuracy(&model, &tok, final_eval_examples, final_seed)?;
    let final_iit_acc = if opts.iit_weight > 0.0 {
        let at = |c, v| iit_accuracy(&model, &tok, opts.iit_layer, iit_basis.as_ref(), c, v, final_eval_examples, final_seed ^ 0x11);
        let complement = if iit_basis.is_some() { Some((at(true, Variable::Left)?, at(true, Variable::Right)?)) } else { None };
        // Right is measured either way: without `iit_right` it says how far c==d happens to sit there.
        Some(((at(false, Variable::Left)?, at(false, Variable::Right)?), complement))
    } else {
        None
    };
    Ok(Trained {
        model,
        tok,
        tokenizer,
        varmap,
        opts: opts.clone(),
        history,
        evals,
        final_loss,
        final_acc,
        final_iit_acc,
        iit_basis,
        final_eval_examples,
        secs: start.elapsed().as_secs_f64(),
        stopped,
    })
}
