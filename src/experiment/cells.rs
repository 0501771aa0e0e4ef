//! One cell of a sweep = (layer, site, position[, heads]): train its intervention if it has
//! parameters, then evaluate it on every split.
use super::data::{left_pad, CellCache};
use super::outputs::TrainRow;
use super::spec::TrainSpec;
use crate::intervene::hook::InterventionHook;
use crate::intervene::{orth, ApplyCtx, Intervention};
use crate::model::{Fwd, KvCache, Llama, LogitsAt, Site};
use crate::tasks::Pair;
use crate::util::rng::Rng;
use anyhow::{bail, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use std::sync::atomic::{AtomicBool, Ordering};

pub struct Cell {
    pub layer: usize,
    pub site: Site,
    pub position: String,
    /// Column indices for head-restricted interventions.
    pub cols: Option<Tensor>,
    pub heads: String,
}

impl Cell {
    pub fn label(&self) -> String {
        let h = if self.heads.is_empty() { String::new() } else { format!(" heads {}", self.heads) };
        format!("L{} {} @{}{h}", self.layer, self.site, self.position)
    }
}

/// Where a resumed base run starts: its ids, the block input at the cell's layer, and either the
/// padding mask (rows resumed whole) or the clean run's keys/values of an unchanged prefix.
struct Resume<'a> {
    ids: Vec<Vec<u32>>,
    x0: Tensor,
    mask: Option<Vec<Vec<u8>>>,
    kv: Option<KvCache>,
    hook: InterventionHook<'a>,
}

impl Resume<'_> {
    fn fwd(&mut self, layer: usize, differentiable: bool) -> Fwd<'_> {
        Fwd {
            attention_mask: self.mask.as_deref(),
            cache: self.kv.as_mut(),
            hooks: Some(&mut self.hook),
            differentiable,
            start: Some((layer, self.x0.clone())),
            ..Default::default()
        }
    }
}

/// Logits `[b, vocab]` of the base runs of `idx` with the intervention applied at `cell`.
#[allow(clippy::too_many_arguments)]
pub fn intervened_logits(
    model: &Llama,
    cell: &Cell,
    cache: &CellCache<'_>,
    pairs: &[Pair],
    idx: &[usize],
    iv: &dyn Intervention,
    ctx: ApplyCtx,
    differentiable: bool,
) -> Result<Tensor> {
    let mut r = resume(model, cell, cache, pairs, idx, &Rows::of(model, cache, idx)?, iv, ctx)?;
    let ids = std::mem::take(&mut r.ids);
    let out = model.forward(&ids, Fwd { logits: LogitsAt::Last, ..r.fwd(cell.layer, differentiable) })?;
    Ok(out.logits.expect("requested logits").to_dtype(DType::F32)?)
}

/// How a training step computes its gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backward {
    /// Autograd covers the cell's own layer (where the intervention sits); the frozen blocks after
    /// it run through [`Llama::tail_loss_grad`], whose hand-written backward skips the weight
    /// gradients autograd would compute and discard.
    FrozenTail,
    /// candle's autograd over the whole resumed forward: the reference the frozen tail is tested
    /// against (`ROAD_AUTOGRAD_TAIL=1` makes training use it, for before/after benchmarks).
    Autograd,
}

impl Backward {
    fn for_training() -> Self {
        static F: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *F.get_or_init(|| std::env::var_os("ROAD_AUTOGRAD_TAIL").is_some_and(|v| v != "0")) {
            Backward::Autograd
        } else {
            Backward::FrozenTail
        }
    }
}

/// One training step's loss (cross-entropy against `targets` + the kind's penalty) and the
/// gradients of the intervention's variables.
#[allow(clippy::too_many_arguments)]
pub fn loss_grads(
    model: &Llama,
    cell: &Cell,
    cache: &CellCache<'_>,
    pairs: &[Pair],
    idx: &[usize],
    iv: &dyn Intervention,
    ctx: ApplyCtx,
    targets: &[u32],
    how: Backward,
) -> Result<(f64, GradStore)> {
    let (loss, grads) = eager_loss_grads(model, cell, cache, pairs, idx, iv, ctx, targets, how)?;
    Ok((loss.to_scalar::<f32>()? as f64, grads))
}

/// [`loss_grads`] with the loss left on the device (the training loop reads it once the
/// update is queued).
#[allow(clippy::too_many_arguments)]
fn eager_loss_grads(
    model: &Llama,
    cell: &Cell,
    cache: &CellCache<'_>,
    pairs: &[Pair],
    idx: &[usize],
    iv: &dyn Intervention,
    ctx: ApplyCtx,
    targets: &[u32],
    how: Backward,
) -> Result<(Tensor, GradStore)> {
    let (rows, targets) = (Rows::of(model, cache, idx)?, Tensor::new(targets, model.device())?);
    loss_grads_on(model, cell, cache, pairs, idx, &rows, iv, ctx, &targets, how)
}

/// The batch's pair indices on the device (`[b]` u32): one gather per cached tensor.
pub(super) fn batch_rows(model: &Llama, idx: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_vec(idx.iter().map(|&i| i as u32).collect::<Vec<_>>(), idx.len(), model.device())?)
}

/// A batch's rows on the device (`[b]` u32 each): its pairs (for the tensors stacked over all
/// pairs) and their rows within their length's stacked caches (`CellCache::by_len`).
pub(super) struct Rows {
    pub pairs: Tensor,
    pub in_len: Tensor,
}

impl Rows {
    pub fn of(model: &Llama, cache: &CellCache<'_>, idx: &[usize]) -> Result<Self> {
        let local: Vec<usize> = idx.iter().map(|&i| cache.row_in_len[i]).collect();
        Ok(Rows { pairs: batch_rows(model, idx)?, in_len: batch_rows(model, &local)? })
    }

    /// Overwrite these buffers with another batch of the same size (before a graph replay).
    pub fn write(&self, model: &Llama, cache: &CellCache<'_>, idx: &[usize]) -> Result<()> {
        let new = Rows::of(model, cache, idx)?;
        self.pairs.slice_set(&new.pairs, 0, 0)?;
        self.in_len.slice_set(&new.in_len, 0, 0)?;
        Ok(())
    }
}

/// [`loss_grads`] with the batch's rows (`idx` on the device, see [`Rows`]) and targets as
/// device tensors and the loss left there: what [`super::step_graph`] captures. `idx` gives
/// the shapes and, outside the fast path, the rows' lengths and padding; on the fast path every
/// value that differs between batches of one group is read from `rows` and `targets`.
#[allow(clippy::too_many_arguments)]
pub(super) fn loss_grads_on(
    model: &Llama,
    cell: &Cell,
    cache: &CellCache<'_>,
    pairs: &[Pair],
    idx: &[usize],
    rows: &Rows,
    iv: &dyn Intervention,
    ctx: ApplyCtx,
    targets: &Tensor,
    how: Backward,
) -> Result<(Tensor, GradStore)> {
    let mut r = resume(model, cell, cache, pairs, idx, rows, iv, ctx)?;
    let ids = std::mem::take(&mut r.ids);
    let (loss, surrogate) = match how {
        Backward::Autograd => {
            let logits = model.forward(&ids, Fwd { logits: LogitsAt::Last, ..r.fwd(cell.layer, true) })?.logits.expect("requested logits");
            let loss = candle_nn::loss::cross_entropy(&logits.to_dtype(DType::F32)?, targets)?;
            (loss.clone(), loss)
        }
        Backward::FrozenTail => {
            let end = cell.layer + 1;
            // At a block's output the hook is the layer's last op: nothing after it needs a
            // backward, so the layer runs on the fused inference kernels.
            let differentiable = cell.site != Site::BlockOutput;
            let x = model.forward(&ids, Fwd { logits: LogitsAt::None, end: Some(end), ..r.fwd(cell.layer, differentiable) })?.hidden;
            let tail = Fwd { attention_mask: r.mask.as_deref(), cache: r.kv.as_mut(), start: Some((end, x.detach())), ..Default::default() };
            let (loss, dx) = model.tail_loss_grad_on(&ids, tail, targets)?;
            // d/dθ of Σ x·(dL/dx), with dL/dx held constant, is dL/dθ.
            (loss, (x.to_dtype(DType::F32)? * dx.to_dtype(DType::F32)?)?.sum_all()?)
        }
    };
    let (loss, surrogate) = match iv.penalty()? {
        Some(p) => ((loss + &p)?, (surrogate + p)?),
        None => (loss, surrogate),
    };
    Ok((loss, surrogate.backward()?))
}

fn hook<'a>(cell: &Cell, cache: &CellCache<'_>, rows: &Tensor, positions: Vec<usize>, iv: &'a dyn Intervention, ctx: ApplyCtx) -> Result<InterventionHook<'a>> {
    let source = cache.source_rows.index_select(rows, 0)?;
    Ok(InterventionHook { layer: cell.layer, site: cell.site, positions, source, cols: cell.cols.clone(), intervention: iv, ctx, onehot: None })
}

/// The resumed base run of `idx` at the cell's layer, with the intervention hooked.
///
/// Fast path when every row has the same length and intervened position p: positions < p are
/// unchanged by the intervention, so only positions p.. run from the cell's layer, attending to
/// the clean run's cached keys/values for 0..p. Otherwise whole rows, left padded.
#[allow(clippy::too_many_arguments)]
fn resume<'a>(
    model: &Llama,
    cell: &Cell,
    cache: &CellCache<'_>,
    pairs: &[Pair],
    idx: &[usize],
    rows: &Rows,
    iv: &'a dyn Intervention,
    ctx: ApplyCtx,
) -> Result<Resume<'a>> {
    let sel = &rows.pairs;
    let (t, p) = (pairs[idx[0]].base.ids.len(), cache.base_pos[idx[0]]);
    if p == 0 || idx.iter().any(|&i| pairs[i].base.ids.len() != t || cache.base_pos[i] != p) {
        let rows: Vec<&[u32]> = idx.iter().map(|&i| pairs[i].base.ids.as_slice()).collect();
        let (ids, mask, offs) = left_pad(&rows);
        let t = ids[0].len();
        let d = model.cfg.hidden_size;
        // The clean base's block input at the cell's layer, left padded with zeros.
        let mut xs = Vec::with_capacity(idx.len());
        for (k, &i) in idx.iter().enumerate() {
            let x = &cache.base_input[i];
            xs.push(if offs[k] > 0 { Tensor::cat(&[&Tensor::zeros((offs[k], d), x.dtype(), x.device())?, x], 0)? } else { x.clone() });
        }
        let x0 = Tensor::stack(&xs, 0)?;
        debug_assert_eq!(x0.dim(1)?, t);
        let positions: Vec<usize> = idx.iter().zip(&offs).map(|(&i, o)| o + cache.base_pos[i]).collect();
        let hook = hook(cell, cache, sel, positions, iv, ctx)?;
        return Ok(Resume { ids, x0, mask: Some(mask), kv: None, hook });
    }
    let n_layers = model.cfg.num_layers;
    let mut layers: Vec<Option<(Tensor, Tensor)>> = vec![None; n_layers];
    let stacked = cache.by_len.get(&t);
    let local = &rows.in_len;
    for l in cell.layer..n_layers {
        layers[l] = Some(match stacked {
            // One gather per layer for the whole batch.
            Some((kv, _)) => (kv[l].0.index_select(local, 0)?.narrow(2, 0, p)?, kv[l].1.index_select(local, 0)?.narrow(2, 0, p)?),
            None => {
                let ks: Vec<Tensor> = idx.iter().map(|&i| cache.base_kv[i][l].0.narrow(1, 0, p)).collect::<candle_core::Result<_>>()?;
                let vs: Vec<Tensor> = idx.iter().map(|&i| cache.base_kv[i][l].1.narrow(1, 0, p)).collect::<candle_core::Result<_>>()?;
                (Tensor::stack(&ks, 0)?, Tensor::stack(&vs, 0)?)
            }
        });
    }
    let x0 = match stacked {
        Some((_, x)) => x.index_select(local, 0)?.narrow(1, p, t - p)?,
        None => Tensor::stack(&idx.iter().map(|&i| cache.base_input[i].narrow(0, p, t - p)).collect::<candle_core::Result<Vec<_>>>()?, 0)?,
    };
    let ids: Vec<Vec<u32>> = idx.iter().map(|&i| pairs[i].base.ids[p..].to_vec()).collect();
    let hook = hook(cell, cache, sel, vec![p; idx.len()], iv, ctx)?;
    Ok(Resume { ids, x0, mask: None, kv: Some(KvCache::from_layers(layers)), hook })
}

/// Whether [`resume`] reads everything that differs between batches of `idx`'s group from
/// device tensors indexed by the batch's rows (the fast path with stacked caches): what a
/// captured step (`step_graph`) needs, since a replay re-runs no host code.
pub(super) fn replayable(cache: &CellCache<'_>, pairs: &[Pair], idx: &[usize]) -> bool {
    let Some(&first) = idx.first() else { return false };
    let (t, p) = (pairs[first].base.ids.len(), cache.base_pos[first]);
    p > 0 && cache.by_len.contains_key(&t) && idx.iter().all(|&i| pairs[i].base.ids.len() == t && cache.base_pos[i] == p)
}

/// Pair indices grouped by (base length, intervened position).
pub(super) fn groups(cache: &CellCache<'_>, pairs: &[Pair]) -> Vec<Vec<usize>> {
    let mut m: std::collections::BTreeMap<(usize, usize), Vec<usize>> = Default::default();
    for (i, p) in pairs.iter().enumerate() {
        m.entry((p.base.ids.len(), cache.base_pos[i])).or_default().push(i);
    }
    m.into_values().collect()
}

fn lr_at(spec: &TrainSpec, base: f64, step: usize) -> f64 {
    let total = spec.steps.max(1);
    if step < spec.warmup {
        return base * (step + 1) as f64 / spec.warmup as f64;
    }
    let p = (step - spec.warmup) as f64 / (total - spec.warmup.min(total)).max(1) as f64;
    match spec.schedule.as_str() {
        "linear" => base * (1.0 - p),
        "cosine" => base * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
        _ => base,
    }
}

/// Evaluation points during training (train_log.csv) and early stopping on the dev loss.
pub struct Monitor<'a> {
    /// Evaluate every this many steps and after the last one (0 = never).
    pub every: usize,
    /// Stop after this many evaluations without a better dev loss, keeping the best parameters
    /// (0 = never stop early).
    pub patience: usize,
    /// (dev loss, dev IIA, train IIA) of the intervention as it is now.
    pub eval: &'a dyn Fn(&dyn Intervention) -> Result<(f64, f64, f64)>,
}

/// What training did: its log, and whether it ran to the end.
pub struct Trained {
    pub log: Vec<TrainRow>,
    /// Cancelled before its last step (early stopping is not a cut: it is a finished training).
    pub cut: bool,
    pub stopped_early: bool,
}

/// Train the intervention on the train pairs: cross-entropy of the intervened output against
/// the counterfactual label (+ the kind's penalty). Only the intervention's variables get
/// gradients; the model's weights are constants. Orthonormal variables take Riemannian steps.
#[allow(clippy::too_many_arguments)]
pub fn train(
    model: &Llama,
    cell: &Cell,
    cache: &CellCache<'_>,
    pairs: &[Pair],
    iv: &mut dyn Intervention,
    spec: &TrainSpec,
    seed: u64,
    cancel: &AtomicBool,
    monitor: Option<&Monitor<'_>>,
    on_step: &mut dyn FnMut(&TrainRow),
) -> Result<Trained> {
    let params = iv.params();
    let group = |g: &str| params.iter().filter(|p| p.group == g).map(|p| p.var.clone()).collect::<Vec<_>>();
    let mk = |vars: Vec<candle_core::Var>, lr: f64| -> Result<Option<AdamW>> {
        if vars.is_empty() {
            return Ok(None);
        }
        Ok(Some(AdamW::new(vars, ParamsAdamW { lr, weight_decay: spec.weight_decay, ..Default::default() })?))
    };
    let mut opt_main = mk(group("main"), spec.lr)?;
    let mut opt_bound = mk(group("boundary"), spec.boundary_lr)?;
    let riemannian = spec.orthonormal == "riemannian";
    let mut rng = Rng::new(seed);
    // Batches come from one (length, position) group at a time, so each can reuse the clean
    // prefix; groups are drawn in proportion to their size.
    let mut groups = groups(cache, pairs);
    let mut cursors = vec![usize::MAX; groups.len()];
    let total: usize = groups.iter().map(|g| g.len()).sum();
    let mut out = Trained { log: Vec::with_capacity(spec.steps), cut: false, stopped_early: false };
    let how = Backward::for_training();
    let mut graphs = super::step_graph::applies(model, &*iv, how).then(super::step_graph::StepGraphs::default);
    let t0 = std::time::Instant::now();
    let mut best: Option<(f64, Vec<Tensor>)> = None;
    let mut since_best = 0usize;
    for step in 0..spec.steps {
        if cancel.load(Ordering::Relaxed) {
            out.cut = true;
            break;
        }
        let mut r = rng.below(total);
        let gi = groups.iter().position(|g| if r < g.len() { true } else { r -= g.len(); false }).expect("r < total");
        let g = &mut groups[gi];
        let mut idx = Vec::with_capacity(spec.batch);
        while idx.len() < spec.batch.min(g.len()) {
            if cursors[gi] >= g.len() {
                rng.shuffle(g);
                cursors[gi] = 0;
            }
            idx.push(g[cursors[gi]]);
            cursors[gi] += 1;
        }
        let ctx = ApplyCtx { progress: step as f64 / spec.steps.max(1) as f64, train: true };
        let targets: Vec<u32> = idx.iter().map(|&i| pairs[i].cf_label).collect();
        let replayed = match graphs.as_mut() {
            Some(g) => g.step(model, cell, cache, pairs, gi, &idx, &*iv, ctx, &targets)?,
            None => None,
        };
        let (loss, mut grads) = match replayed {
            Some(r) => r,
            None => eager_loss_grads(model, cell, cache, pairs, &idx, iv, ctx, &targets, how)?,
        };
        let lr = lr_at(spec, spec.lr, step);
        // The loss is read after the update is queued (below): on a GPU the host then queues the
        // optimiser while the step still runs, instead of waiting for it. A non-finite loss
        // still fails the cell at this step.
        if riemannian {
            for p in params.iter().filter(|p| p.orthonormal) {
                if let Some(g) = grads.get(p.var.as_tensor()) {
                    let t = orth::tangent_projection(g, p.var.as_tensor())?;
                    grads.insert(p.var.as_tensor(), t);
                }
            }
        }
        if let Some(o) = opt_main.as_mut() {
            o.set_learning_rate(lr);
            o.step(&grads)?;
        }
        if let Some(o) = opt_bound.as_mut() {
            o.set_learning_rate(lr_at(spec, spec.boundary_lr, step));
            o.step(&grads)?;
        }
        iv.after_step()?;
        let l = loss.to_scalar::<f32>()? as f64;
        if !l.is_finite() {
            bail!("{}: training loss is {l} at step {step} (learning rate {lr} too high, or a NaN in the model's activations?)", cell.label());
        }
        let stats = iv.stats(ctx);
        let stat = |k: &str| stats.iter().find(|(n, _)| n == k).map(|x| x.1).unwrap_or(f64::NAN);
        let mut row = TrainRow {
            layer: cell.layer,
            site: cell.site.name().into(),
            position: cell.position.clone(),
            heads: cell.heads.clone(),
            control: "none".into(),
            step,
            loss: l,
            lr,
            beta: stat("beta"),
            temperature: stat("temperature"),
            subspace_dims: stat("subspace_dims"),
            dev_loss: f64::NAN,
            dev_iia: f64::NAN,
            train_iia: f64::NAN,
            seconds: f64::NAN,
        };
        let mut stop = false;
        if let Some(m) = monitor.filter(|m| m.every > 0 && ((step + 1) % m.every == 0 || step + 1 == spec.steps)) {
            let (dl, di, ti) = (m.eval)(&*iv)?;
            (row.dev_loss, row.dev_iia, row.train_iia) = (dl, di, ti);
            if m.patience > 0 {
                if best.as_ref().is_none_or(|(b, _)| dl < *b) {
                    best = Some((dl, params.iter().map(|p| p.var.as_tensor().copy()).collect::<candle_core::Result<_>>()?));
                    since_best = 0;
                } else {
                    since_best += 1;
                    stop = since_best >= m.patience;
                }
            }
        }
        row.seconds = t0.elapsed().as_secs_f64();
        on_step(&row);
        out.log.push(row);
        if stop {
            out.stopped_early = step + 1 < spec.steps;
            break;
        }
    }
    if let Some((_, saved)) = best {
        // Early stopping keeps the parameters of the best dev loss seen.
        for (p, t) in params.iter().zip(saved) {
            p.var.set(&t)?;
        }
    }
    Ok(out)
}
