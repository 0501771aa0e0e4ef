//! A tiny LLaMA trained from scratch, with our own differentiable forward pass, on hierarchical
//! equality (`tasks::equality`): the ground-truth model for DAS, where the high-level variables
//! are known to be computed. Weights are drawn from the seeded project RNG into a candle `VarMap`,
//! `Llama::load` reads them through `VarBuilder::from_varmap`, AdamW trains them, and the result
//! is saved as a Hugging Face checkpoint directory (config.json, model.safetensors,
//! tokenizer.json with a WordLevel model, training_config.json).
//!
//! Also: plain activation patching of whole `block_output` vectors, per (layer, position), the
//! check that tells which sites can hold which equality variable.
use crate::model::{Collector, Fwd, Hooks, Llama, LlamaConfig, LogitsAt, Site, SiteCtx};
use crate::tasks::equality::{self, Variable};
use crate::tasks::Pair;
use crate::tokenizer::Tok;
use crate::util::rng::Rng;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use std::collections::HashMap;
use std::path::Path;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::Tokenizer;

pub const UNK: &str = "<unk>";
pub const PAD: &str = "<pad>";
/// The subspace IIT trained to carry each equality (rows of `basis`, `[k, hidden]`).
pub const IIT_SUBSPACE_FILE: &str = "iit_subspace.safetensors";

/// Shape of the tiny model (embeddings are always tied).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TinyArch {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub max_positions: usize,
    pub rope_theta: f32,
}

impl Default for TinyArch {
    fn default() -> Self {
        Self { layers: 3, hidden: 64, heads: 4, kv_heads: 2, ffn: 128, max_positions: 16, rope_theta: 10000.0 }
    }
}

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

/// The word-level vocabulary: specials, `=`, the answers, then the symbols.
pub fn vocab() -> Vec<String> {
    let mut v: Vec<String> = [PAD, UNK, equality::EQ, equality::TRUE, equality::FALSE].iter().map(|s| s.to_string()).collect();
    v.extend(equality::symbols());
    v
}

/// A `tokenizers` WordLevel model over [`vocab`] with a Whitespace pre-tokenizer.
pub fn build_tokenizer() -> Result<Tokenizer> {
    let map: ahash::AHashMap<String, u32> = vocab().into_iter().enumerate().map(|(i, w)| (w, i as u32)).collect();
    let wl = WordLevel::builder()
        .vocab(map)
        .unk_token(UNK.to_string())
        .build()
        .map_err(|e| anyhow!("building the WordLevel tokenizer: {e}"))?;
    let mut t = Tokenizer::new(wl);
    t.with_pre_tokenizer(Some(Whitespace {}));
    Ok(t)
}

pub fn llama_config(arch: &TinyArch) -> Result<LlamaConfig> {
    if arch.hidden % arch.heads != 0 {
        bail!("hidden size {} is not a multiple of {} heads", arch.hidden, arch.heads);
    }
    let cfg = LlamaConfig {
        vocab_size: vocab().len(),
        hidden_size: arch.hidden,
        intermediate_size: arch.ffn,
        num_layers: arch.layers,
        num_heads: arch.heads,
        num_kv_heads: arch.kv_heads,
        head_dim: arch.hidden / arch.heads,
        rms_norm_eps: 1e-5,
        rope_theta: arch.rope_theta,
        rope_scaling: None,
        max_position_embeddings: arch.max_positions,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_ids: vec![],
    };
    cfg.validate()?;
    Ok(cfg)
}

/// A transformers-compatible `config.json` for `cfg`.
pub fn hf_config_json(cfg: &LlamaConfig) -> serde_json::Value {
    let pad = vocab().iter().position(|w| w == PAD).unwrap();
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": null,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": false,
        "attention_dropout": 0.0,
        "mlp_bias": false,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "use_cache": true,
        "bos_token_id": null,
        "eos_token_id": null,
        "pad_token_id": pad,
        "torch_dtype": "float32",
    })
}

/// HF tensor names and shapes of a tied LLaMA, in a fixed order.
pub fn param_shapes(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let d = cfg.hidden_size;
    let (hq, hkv, f) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size);
    let mut v = vec![("model.embed_tokens.weight".to_string(), vec![cfg.vocab_size, d])];
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        v.push((format!("{p}.input_layernorm.weight"), vec![d]));
        v.push((format!("{p}.self_attn.q_proj.weight"), vec![hq, d]));
        v.push((format!("{p}.self_attn.k_proj.weight"), vec![hkv, d]));
        v.push((format!("{p}.self_attn.v_proj.weight"), vec![hkv, d]));
        v.push((format!("{p}.self_attn.o_proj.weight"), vec![d, hq]));
        v.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
        v.push((format!("{p}.mlp.gate_proj.weight"), vec![f, d]));
        v.push((format!("{p}.mlp.up_proj.weight"), vec![f, d]));
        v.push((format!("{p}.mlp.down_proj.weight"), vec![d, f]));
    }
    v.push(("model.norm.weight".to_string(), vec![d]));
    v
}

/// Fill a VarMap with seeded initial weights: norms 1; embeddings N(0, 1/d);
/// projections N(0, 1/fan_in), output projections (o, down) further scaled by 1/sqrt(2·layers).
pub fn init_varmap(cfg: &LlamaConfig, rng: &mut Rng, device: &Device) -> Result<VarMap> {
    let vm = VarMap::new();
    let out_scale = 1.0 / ((2 * cfg.num_layers) as f64).sqrt();
    {
        let mut data = vm.data().lock().map_err(|_| anyhow!("VarMap lock poisoned"))?;
        for (name, shape) in param_shapes(cfg) {
            let n: usize = shape.iter().product();
            let vals: Vec<f32> = if shape.len() == 1 {
                vec![1.0; n]
            } else {
                let std = if name.contains("embed_tokens") {
                    1.0 / (cfg.hidden_size as f64).sqrt()
                } else {
                    let s = 1.0 / (shape[1] as f64).sqrt();
                    if name.contains("o_proj") || name.contains("down_proj") {
                        s * out_scale
                    } else {
                        s
                    }
                };
                (0..n).map(|_| (rng.normal() * std) as f32).collect()
            };
            let t = Tensor::from_vec(vals, shape, device)?;
            data.insert(name, Var::from_tensor(&t)?);
        }
    }
    Ok(vm)
}

/// Symbols and answer ids of the tiny tokenizer.
struct TaskIds {
    syms: Vec<(String, u32)>,
    ans: (u32, u32),
}

impl TaskIds {
    fn new(tok: &Tok) -> Result<Self> {
        Ok(Self { syms: equality::symbol_tokens(tok)?, ans: equality::answer_ids(tok)? })
    }
    /// `n` examples over all symbols with P(a==b) = P(c==d) = `p_eq`, independently: (ids, labels).
    fn sample(&self, tok: &Tok, rng: &mut Rng, n: usize, p_eq: f64) -> Result<(Vec<Vec<u32>>, Vec<u32>)> {
        let mut ids = Vec::with_capacity(n);
        let mut labels = Vec::with_capacity(n);
        for _ in 0..n {
            let v = (rng.uniform() < p_eq, rng.uniform() < p_eq);
            let p = equality::prompt(tok, equality::draw(rng, &self.syms, v), self.ans)?;
            ids.push(p.ids);
            labels.push(p.label);
        }
        Ok((ids, labels))
    }
}

/// Last-position logits `[b, vocab]` through the differentiable path (tied head).
fn last_logits(model: &Llama, ids: &[Vec<u32>], differentiable: bool) -> Result<Tensor> {
    last_logits_hooked(model, ids, differentiable, None)
}

fn last_logits_hooked(model: &Llama, ids: &[Vec<u32>], differentiable: bool, hooks: Option<&mut dyn Hooks>) -> Result<Tensor> {
    let out = model.forward(ids, Fwd { logits: LogitsAt::None, differentiable, hooks, ..Default::default() })?;
    let t = ids[0].len();
    let last = out.hidden.narrow(1, t - 1, 1)?.squeeze(1)?;
    Ok(last.matmul(&model.embeddings().t()?)?)
}

/// What an IIT step trains, cycling: the variable (a==b, and c==d too when `right`), and
/// whether the subspace (the answer follows the source's variable) or everything but it (the
/// answer must not change: nothing else at that position may matter) is swapped. The
/// complement half only exists with a subspace.
fn iit_step(step: usize, with_complement: bool, right: bool) -> (Variable, bool) {
    let vars = if right { 2 } else { 1 };
    let modes = if with_complement { 2 } else { 1 };
    let k = step % (vars * modes);
    let var = if k % vars == 0 { Variable::Left } else { Variable::Right };
    (var, k / vars == 1)
}

/// The prompt position IIT puts a variable at: b for a==b, d for c==d (`a b c d =`).
fn iit_position(var: Variable) -> Result<usize> {
    match var {
        Variable::Left => Ok(1),
        Variable::Right => Ok(3),
        Variable::Output => bail!("IIT is defined for the left and right equalities"),
    }
}

/// Counterfactual answer ids when `var` is taken from `src` into `base` (prompts `a b c d =`);
/// with `complement` (everything but the variable taken), the base's own answers.
fn iit_labels(var: Variable, base: &[Vec<u32>], src: &[Vec<u32>], ans: (u32, u32), complement: bool) -> Vec<u32> {
    base.iter()
        .zip(src)
        .map(|(b, s)| {
            let (vb, vs) = ((b[0] == b[1], b[2] == b[3]), (s[0] == s[1], s[2] == s[3]));
            let out = if complement { equality::counterfactual(var, vb, vb) } else { equality::counterfactual(var, vb, vs) };
            if out {
                ans.0
            } else {
                ans.1
            }
        })
        .collect()
}

/// Last-position logits of `base` with block `layer`'s output at `pos` taken from the `src` run:
/// the whole vector, or its part in the span of `basis` rows (gradients flow into both runs when
/// `differentiable`).
fn interchanged_logits(
    model: &Llama,
    base: &[Vec<u32>],
    src: &[Vec<u32>],
    (layer, pos): (usize, usize),
    basis: Option<&Tensor>,
    complement: bool,
    differentiable: bool,
) -> Result<Tensor> {
    let mut col = Collector::new(vec![(layer, Site::BlockOutput)]);
    model.forward(src, Fwd { hooks: Some(&mut col), logits: LogitsAt::None, differentiable, ..Default::default() })?;
    let source = col.get(layer, Site::BlockOutput).context("collected source activation")?.clone();
    let mut hook = PatchPosition { layer, site: Site::BlockOutput, pos, source, direction: basis.cloned(), complement };
    last_logits_hooked(model, base, differentiable, Some(&mut hook))
}

/// Interchange-intervention accuracy (argmax over the whole vocabulary) of the swap at block
/// `layer` (position b for a==b, d for c==d; whole vector or the `basis` subspace) on `n` fresh
/// pairs over all symbols.
pub fn iit_accuracy(
    model: &Llama,
    tok: &Tok,
    layer: usize,
    basis: Option<&Tensor>,
    complement: bool,
    var: Variable,
    n: usize,
    seed: u64,
) -> Result<f64> {
    let pos = iit_position(var)?;
    let ids = TaskIds::new(tok)?;
    let mut rng = Rng::new(seed);
    let (mut correct, mut done) = (0.0, 0);
    while done < n {
        let m = (n - done).min(512);
        let (base, _) = ids.sample(tok, &mut rng, m, 0.5)?;
        let (src, _) = ids.sample(tok, &mut rng, m, 0.5)?;
        let cf = iit_labels(var, &base, &src, ids.ans, complement);
        correct += batch_acc(&interchanged_logits(model, &base, &src, (layer, pos), basis, complement, false)?, &cf)? * m as f64;
        done += m;
    }
    Ok(correct / n as f64)
}

/// Accuracy of argmax over the whole vocabulary vs the label ids.
fn batch_acc(logits: &Tensor, labels: &[u32]) -> Result<f64> {
    let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    Ok(pred.iter().zip(labels).filter(|(p, l)| p == l).count() as f64 / labels.len().max(1) as f64)
}

/// Accuracy (argmax over the whole vocabulary) on `n` fresh examples over all symbols.
pub fn accuracy(model: &Llama, tok: &Tok, n: usize, seed: u64) -> Result<f64> {
    let ids = TaskIds::new(tok)?;
    let mut rng = Rng::new(seed);
    let mut correct = 0.0;
    let mut done = 0;
    while done < n {
        let m = (n - done).min(512);
        let (x, y) = ids.sample(tok, &mut rng, m, 0.5)?;
        let logits = last_logits(model, &x, false)?;
        correct += batch_acc(&logits, &y)? * m as f64;
        done += m;
    }
    Ok(correct / n as f64)
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
    let start = std::time::Instant::now();
    // CPU unless --device says otherwise: the checked-in tiny model is reproduced bit for bit
    // on the CPU, and a model this small gains nothing from a GPU.
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
    {
        use crate::runs::checks::{at_least_one, at_most, positive, MAX_BATCH, MAX_STEPS};
        at_least_one(&[("--batch", opts.batch)])?;
        at_most(&[("--steps", opts.steps, MAX_STEPS), ("--batch", opts.batch, MAX_BATCH)])?;
        positive("--lr", opts.lr)?;
    }
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
    let mut named: Vec<(String, Var)> = varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let (mats, gains): (Vec<_>, Vec<_>) = named.into_iter().partition(|(_, v)| v.rank() >= 2);
    let params = |wd: f64| ParamsAdamW { lr: opts.lr, beta1: 0.9, beta2: 0.98, eps: 1e-8, weight_decay: wd };
    let mut opt_mats = AdamW::new(mats.into_iter().map(|(_, v)| v).collect(), params(opts.weight_decay))?;
    let mut opt_gains = AdamW::new(gains.into_iter().map(|(_, v)| v).collect(), params(0.0))?;

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
        opt_mats.set_learning_rate(lr);
        opt_gains.set_learning_rate(lr);
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
        opt_mats.step(&grads)?;
        opt_gains.step(&grads)?;
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

/// Write a Hugging Face checkpoint directory: config.json, model.safetensors (f32, HF names, tied
/// head omitted), tokenizer.json, training_config.json.
pub fn save(tr: &Trained, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cfg = &tr.model.cfg;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&hf_config_json(cfg))? + "\n")?;
    let tensors: HashMap<String, Tensor> = tr
        .model
        .named_weights()
        .into_iter()
        .map(|(k, t)| Ok((k, t.detach().to_dtype(DType::F32)?.contiguous()?)))
        .collect::<Result<_>>()?;
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    tr.tokenizer
        .save(dir.join("tokenizer.json"), true)
        .map_err(|e| anyhow!("saving tokenizer.json: {e}"))?;
    let o = &tr.opts;
    let rec = serde_json::json!({
        "task": "hierarchical equality: (a==b)==(c==d) over symbols s0..s29, answer token true/false",
        "seed": o.seed, "steps": o.steps, "batch": o.batch, "lr": o.lr, "min_lr_frac": o.min_lr_frac,
        "warmup": o.warmup, "schedule": "linear warm-up, cosine decay",
        "curriculum": {"p_equal_start": o.p_equal_start, "anneal_to_0.5_over_fraction_of_steps": o.curriculum_frac},
        "optimizer": {"name": "AdamW", "beta1": 0.9, "beta2": 0.98, "eps": 1e-8,
            "weight_decay": o.weight_decay, "weight_decay_on": "matrices (norm gains: 0)"},
        "arch": o.arch, "parameters": cfg.param_count(),
        "final_train_loss_last50": tr.final_loss,
        "final_heldout_accuracy": tr.final_acc, "final_heldout_examples": tr.final_eval_examples,
        "iit": {"weight": o.iit_weight, "layer": o.iit_layer, "site": "block_output",
            "subspace_dims": o.iit_dims, "subspace_file": if tr.iit_basis.is_some() { Some(IIT_SUBSPACE_FILE) } else { None },
            "positions": if o.iit_right { serde_json::json!({"left (a==b)": "b", "right (c==d)": "d"}) } else { serde_json::json!({"left (a==b)": "b"}) },
            "trained_variables": if o.iit_right { "left, right" } else { "left (right reported, not trained)" },
            "schedule": "cycle per step over the trained variables: subspace swapped (answer follows the source's variable), then everything but the subspace swapped (answer must not change)",
            "final_heldout_iit_accuracy": tr.final_iit_acc.map(|((l, r), c)| serde_json::json!({
                "subspace": {"left": l, "right": r},
                "complement": c.map(|(l, r)| serde_json::json!({"left": l, "right": r})),
            }))},
        "heldout_accuracy_curve": tr.evals,
        "train_seconds": tr.secs,
        "stopped": tr.stopped,
        "threads": o.threads,
        "regenerate": format!(
            "road train-tiny --out {} --steps {} --seed {} --iit-weight {} --iit-layer {} --iit-dims {}{}",
            dir.display(), o.steps, o.seed, o.iit_weight, o.iit_layer, o.iit_dims, if o.iit_right { " --iit-right" } else { "" }
        ),
    });
    std::fs::write(dir.join("training_config.json"), serde_json::to_string_pretty(&rec)? + "\n")?;
    if let Some(b) = &tr.iit_basis {
        let t = HashMap::from([("basis".to_string(), b.contiguous()?)]);
        candle_core::safetensors::save(&t, dir.join(IIT_SUBSPACE_FILE))?;
    }
    Ok(())
}

/// Replaces the activation at one position of one (layer, site) with a stored source activation:
/// the whole vector (`direction: None`, activation patching), or only its components in the span
/// of orthonormal rows `direction` `[k, d]` (or one unit vector `[d]`): `b + Uᵀ U (s − b)`, a
/// rank-k DII; with `complement`, everything but that span: `b + (I − Uᵀ U)(s − b)`.
pub struct PatchPosition {
    pub layer: usize,
    pub site: Site,
    pub pos: usize,
    /// Source activations `[b, t, d]` at the same site.
    pub source: Tensor,
    pub direction: Option<Tensor>,
    pub complement: bool,
}

impl Hooks for PatchPosition {
    fn wants(&self, layer: usize, site: Site) -> bool {
        layer == self.layer && site == self.site
    }
    fn on(&mut self, _: usize, _: Site, act: &Tensor, ctx: SiteCtx) -> Result<Option<Tensor>> {
        let t = act.dim(1)?;
        let p = self.pos.checked_sub(ctx.pos_offset).filter(|&p| p < t).context("patch position outside this call")?;
        let src = self.source.narrow(1, p, 1)?;
        let new = match &self.direction {
            None => src,
            Some(u) => {
                let base = act.narrow(1, p, 1)?;
                let d = *u.dims().last().context("direction")?;
                let u = u.reshape((u.elem_count() / d, d))?;
                // [b, 1, d] · Uᵀ → [b, 1, k] · U → [b, 1, d]
                let delta = (&src - &base)?;
                let proj = delta.broadcast_matmul(&u.t()?)?.broadcast_matmul(&u)?;
                if self.complement {
                    (base + (delta - proj)?)?
                } else {
                    (base + proj)?
                }
            }
        };
        let mut parts = Vec::with_capacity(3);
        if p > 0 {
            parts.push(act.narrow(1, 0, p)?);
        }
        parts.push(new);
        if p + 1 < t {
            parts.push(act.narrow(1, p + 1, t - p - 1)?);
        }
        Ok(Some(Tensor::cat(&parts, 1)?))
    }
}

/// One cell of the patching table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PatchCell {
    pub variable: String,
    /// `-1` = the embeddings (block_input of layer 0); else block_output of this layer.
    pub layer: i64,
    pub position: String,
    /// Fraction of pairs whose patched argmax over {true,false} equals the counterfactual label.
    pub iia: f64,
    /// The same over pairs whose counterfactual label differs from the base label.
    pub iia_changed: f64,
    /// IIA of a rank-1 DII along the difference of class means of the variable (fitted on
    /// separate pairs): a cheap lower bound on what a learned rank-1 DAS direction can do.
    pub iia_meandiff: f64,
    pub iia_meandiff_changed: f64,
    pub n: usize,
    pub n_changed: usize,
}

/// Argmax over the answer set of last-position logits.
fn answer_argmax(logits: &Tensor, pairs: &[Pair]) -> Result<Vec<u32>> {
    let l = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    Ok(pairs
        .iter()
        .zip(&l)
        .map(|(p, row)| {
            *p.answers
                .iter()
                .max_by(|&&a, &&b| row[a as usize].total_cmp(&row[b as usize]))
                .expect("answers")
        })
        .collect())
}

fn ids_of(pairs: &[Pair]) -> Result<(Vec<Vec<u32>>, Vec<Vec<u32>>)> {
    let base: Vec<Vec<u32>> = pairs.iter().map(|p| p.base.ids.clone()).collect();
    let src: Vec<Vec<u32>> = pairs.iter().map(|p| p.source.ids.clone()).collect();
    let t = base[0].len();
    if base.iter().chain(&src).any(|r| r.len() != t) {
        bail!("patching_table needs prompts of one length");
    }
    Ok((base, src))
}

/// The residual sites of the table: embeddings, then every block_output.
fn residual_sites(n_layers: usize) -> Vec<(usize, Site)> {
    let mut sites = vec![(0, Site::BlockInput)];
    sites.extend((0..n_layers).map(|l| (l, Site::BlockOutput)));
    sites
}

/// Activation patching of the whole residual vector: for each layer (embeddings, then every
/// block_output) and each named position, swap source into base and score vs the cf labels; and
/// a rank-1 DII along the class-mean difference of `value` (the variable's value in a prompt),
/// fitted on the prompts of `fit` pairs. All prompts must share one length and positions.
pub fn patching_table(
    model: &Llama,
    pairs: &[Pair],
    fit: &[Pair],
    value: &dyn Fn(&crate::tasks::Prompt) -> bool,
    variable: &str,
    positions: &[&str],
) -> Result<Vec<PatchCell>> {
    if pairs.is_empty() || fit.is_empty() {
        bail!("no pairs");
    }
    let (base_ids, src_ids) = ids_of(pairs)?;
    let sites = residual_sites(model.cfg.num_layers);
    let collect = |ids: &[Vec<u32>]| -> Result<Collector> {
        let mut col = Collector::new(sites.clone());
        model.forward(ids, Fwd { hooks: Some(&mut col), logits: LogitsAt::None, ..Default::default() })?;
        Ok(col)
    };
    let col = collect(&src_ids)?;
    // Fitting prompts: bases and sources of `fit`, with the variable's value in each.
    let (fb, fs) = ids_of(fit)?;
    let fit_ids: Vec<Vec<u32>> = fb.into_iter().chain(fs).collect();
    let fit_val: Vec<bool> = fit.iter().map(|p| value(&p.base)).chain(fit.iter().map(|p| value(&p.source))).collect();
    let fit_col = collect(&fit_ids)?;
    let changed: Vec<bool> = pairs.iter().map(|p| p.cf_label != p.base.label).collect();
    let n_changed = changed.iter().filter(|&&c| c).count();
    let score = |pred: &[u32]| -> (f64, f64) {
        let hit: Vec<bool> = pred.iter().zip(pairs).map(|(a, p)| *a == p.cf_label).collect();
        let iia = hit.iter().filter(|&&h| h).count() as f64 / pairs.len() as f64;
        let hc = hit.iter().zip(&changed).filter(|(h, c)| **h && **c).count();
        (iia, if n_changed > 0 { hc as f64 / n_changed as f64 } else { f64::NAN })
    };
    let mut out = Vec::new();
    for (li, &(layer, site)) in sites.iter().enumerate() {
        for &pos in positions {
            let p = pairs[0].base.position(pos)?;
            let source = col.get(layer, site).context("collected activation")?.clone();
            // Class-mean difference at this site and position, normalised.
            let acts = fit_col.get(layer, site).context("collected activation")?.narrow(1, p, 1)?.squeeze(1)?;
            let rows = acts.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            let d = rows[0].len();
            let (mut m1, mut m0, mut n1, mut n0) = (vec![0f64; d], vec![0f64; d], 0f64, 0f64);
            for (r, &v) in rows.iter().zip(&fit_val) {
                let (m, n) = if v { (&mut m1, &mut n1) } else { (&mut m0, &mut n0) };
                for (a, x) in m.iter_mut().zip(r) {
                    *a += *x as f64;
                }
                *n += 1.0;
            }
            let diff: Vec<f32> = m1.iter().zip(&m0).map(|(a, b)| (a / n1.max(1.0) - b / n0.max(1.0)) as f32).collect();
            let norm = diff.iter().map(|x| x * x).sum::<f32>().sqrt();
            let run = |direction: Option<Tensor>| -> Result<(f64, f64)> {
                let mut hook = PatchPosition { layer, site, pos: p, source: source.clone(), direction, complement: false };
                let o = model.forward(&base_ids, Fwd { hooks: Some(&mut hook), logits: LogitsAt::Last, ..Default::default() })?;
                Ok(score(&answer_argmax(&o.logits.context("logits")?, pairs)?))
            };
            let (iia, iia_changed) = run(None)?;
            let (iia_md, iia_md_changed) = if norm > 1e-6 && n1 > 0.0 && n0 > 0.0 {
                let u: Vec<f32> = diff.iter().map(|x| x / norm).collect();
                run(Some(Tensor::from_vec(u, d, model.device())?.to_dtype(model.dtype())?))?
            } else {
                // No difference between the classes here (e.g. the `=` embedding): no effect.
                run(Some(Tensor::zeros(d, model.dtype(), model.device())?))?
            };
            out.push(PatchCell {
                variable: variable.to_string(),
                layer: li as i64 - 1,
                position: pos.to_string(),
                iia,
                iia_changed,
                iia_meandiff: iia_md,
                iia_meandiff_changed: iia_md_changed,
                n: pairs.len(),
                n_changed,
            });
        }
    }
    Ok(out)
}

/// Patching table for an equality variable: `n` test-split pairs scored, `n` train-split pairs
/// for fitting the mean-difference directions.
pub fn equality_patching(model: &Llama, tok: &Tok, variable: Variable, n: usize, seed: u64) -> Result<Vec<PatchCell>> {
    let ds = equality::dataset(tok, variable, [n, 0, n], seed)?;
    let (t_id, _) = equality::answer_ids(tok)?;
    let value = move |p: &crate::tasks::Prompt| -> bool {
        match variable {
            Variable::Left => p.ids[0] == p.ids[1],
            Variable::Right => p.ids[2] == p.ids[3],
            Variable::Output => p.label == t_id,
        }
    };
    patching_table(model, &ds.test, &ds.train, &value, variable.name(), &equality::POSITIONS)
}
