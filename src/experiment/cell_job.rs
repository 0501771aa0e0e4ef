//! One cell of a sweep: build the intervention, train it (if its kind learns) with dev
//! evaluations, evaluate it on every split, and run its controls beside it. The runner
//! schedules cells; everything a cell produces is in its [`CellResult`].
use super::cells::{self, Cell, Monitor};
use super::evaluate::{self, Eval};
use super::controls::{self, Control};
use super::data::{self, CellCache, Prepared};
use super::outputs::{ExampleRow, MetricRow, TrainRow};
use super::runner::{CellSummary, RunOptions};
use super::spec::Spec;
use crate::intervene::{ApplyCtx, Intervention, InterventionSpec};
use crate::model::Llama;
use crate::runs::RunEvent;
use crate::tasks::{Pair, Split};
use anyhow::Result;
use candle_core::Tensor;
use std::collections::HashMap;

/// What every cell of a run reads (shared by the worker threads).
pub struct CellCtx<'a> {
    pub spec: &'a Spec,
    pub opts: &'a RunOptions,
    pub model: &'a Llama,
    pub tok: &'a crate::tokenizer::Tok,
    pub prepared: &'a Prepared,
    pub split_caches: &'a HashMap<Split, data::SplitCache>,
    pub steps: usize,
    pub controls: &'a [Control],
    /// The splits with permuted counterfactual labels (the permuted-label control), or empty.
    pub permuted: &'a HashMap<Split, Vec<Pair>>,
    /// The random-model control's model and clean runs, when the run has that control.
    pub random_model: Option<&'a controls::RandomModel>,
}

/// One cell's rows and trained parameters.
pub struct CellResult {
    pub metrics: Vec<MetricRow>,
    pub examples: Vec<ExampleRow>,
    pub train_log: Vec<TrainRow>,
    pub params: Vec<(String, Tensor)>,
    pub summary: CellSummary,
    pub complete: bool,
}

/// Train pairs the monitor scores train IIA on: at most 64, spread over the split.
fn train_probe(n: usize) -> Vec<usize> {
    let step = n.div_ceil(64).max(1);
    (0..n).step_by(step).collect()
}

/// Everything one evaluation of an intervention needs, for one labelling of the pairs.
struct Evaluator<'a> {
    ctx: &'a CellCtx<'a>,
    /// The model evaluated and trained through (the run's, or the random-model control's) and
    /// its clean runs of the pairs.
    model: &'a Llama,
    clean: &'a HashMap<(Split, usize), data::Clean>,
    cell: &'a Cell,
    caches: &'a HashMap<Split, CellCache<'a>>,
    /// Pairs per split (the real ones, or the permuted-label control's).
    pairs: &'a dyn Fn(Split) -> &'a [Pair],
}

impl Evaluator<'_> {
    fn clean(&self, split: Split) -> Vec<&data::Clean> {
        (0..self.pairs(split).len()).map(|i| &self.clean[&(split, i)]).collect()
    }
    fn pairs(&self, split: Split) -> &[Pair] {
        (self.pairs)(split)
    }
    fn eval(&self, split: Split, iv: &dyn Intervention, only: Option<&[usize]>) -> Result<Option<Eval>> {
        let Some(cache) = self.caches.get(&split) else { return Ok(None) };
        let clean = self.clean(split);
        Ok(Some(evaluate::evaluate_on(self.model, self.cell, cache, self.pairs(split), &clean, iv, only)?))
    }
    /// (dev loss, dev IIA, train IIA on the probe pairs), for the training monitor.
    fn monitor(&self, iv: &dyn Intervention) -> Result<(f64, f64, f64)> {
        let dev = self.eval(Split::Dev, iv, None)?;
        let probe = train_probe(self.pairs(Split::Train).len());
        let train = self.eval(Split::Train, iv, Some(&probe))?;
        let (dl, di) = dev.filter(|e| e.n > 0).map_or((f64::NAN, f64::NAN), |e| (e.loss, e.iia_vocab));
        Ok((dl, di, train.filter(|e| e.n > 0).map_or(f64::NAN, |e| e.iia_vocab)))
    }
    /// Train `iv` on the train split (with the monitor).
    fn train(&self, iv: &mut dyn Intervention, seed: u64, ci: usize, emit: &mut dyn FnMut(RunEvent)) -> Result<cells::Trained> {
        let spec = self.ctx.spec;
        let eval = |iv: &dyn Intervention| self.monitor(iv);
        let monitor = Monitor { every: spec.train.eval_every, patience: spec.train.early_stop, eval: &eval };
        let steps = self.ctx.steps;
        cells::train(
            self.model,
            self.cell,
            &self.caches[&Split::Train],
            self.pairs(Split::Train),
            iv,
            &spec.train,
            seed,
            &self.ctx.opts.cancel,
            Some(&monitor),
            &mut |r| {
                emit(RunEvent::Step { cell: ci, step: r.step, steps, loss: r.loss });
                if r.dev_iia.is_finite() {
                    emit(RunEvent::Eval { cell: ci, step: r.step, dev_iia: r.dev_iia, dev_loss: r.dev_loss });
                }
            },
        )
    }
    /// A control that trains: the cell's kind from the cell's seed, trained and evaluated here;
    /// its training log rows are labelled with the control.
    fn train_control(
        &self,
        build: &dyn Fn(&InterventionSpec, u64) -> Result<Box<dyn Intervention>>,
        cell_seed: u64,
        ci: usize,
        c: Control,
        log: &mut Vec<TrainRow>,
    ) -> Result<(Vec<MetricRow>, Eval)> {
        let mut civ = build(&self.ctx.spec.intervention, cell_seed)?;
        let t = self.train(civ.as_mut(), cell_seed, ci, &mut |_| {})?;
        log.extend(t.log.into_iter().map(|mut r| {
            r.control = c.name().into();
            r
        }));
        self.rows(civ.as_ref(), c.name())
    }
    /// Metric rows of `iv` on every split, labelled with `control`; the test split's Eval.
    fn rows(&self, iv: &dyn Intervention, control: &str) -> Result<(Vec<MetricRow>, Eval)> {
        let (spec, cell) = (self.ctx.spec, self.cell);
        let mut rows = Vec::new();
        let mut test = Eval::default();
        for split in [Split::Train, Split::Dev, Split::Test] {
            let Some(e) = self.eval(split, iv, None)? else { continue };
            rows.push(MetricRow {
                experiment: spec.name.clone(),
                seed: spec.seed,
                layer: cell.layer,
                site: cell.site.name().into(),
                position: cell.position.clone(),
                heads: cell.heads.clone(),
                intervention: iv.kind().into(),
                split: split.name().into(),
                iia_vocab: e.iia_vocab,
                iia_answers: e.iia_answers,
                logit_diff: e.logit_diff,
                normalized_effect: e.normalized_effect,
                base_acc: e.base_acc,
                source_acc: e.source_acc,
                n: e.n,
                control: control.into(),
                cut: false,
                effect_estimate: f64::NAN,
                method: String::new(),
            });
            if split == Split::Test {
                test = e;
            }
        }
        Ok((rows, test))
    }
}

/// One cell's view of a model's per-split clean caches (the run's model, or the random model's).
fn cell_caches<'a>(split_caches: &'a HashMap<Split, data::SplitCache>, prepared: &Prepared, cell: &Cell) -> Result<HashMap<Split, CellCache<'a>>> {
    split_caches
        .iter()
        .map(|(s, sc)| Ok((*s, sc.cell(prepared.data.split(*s), cell.layer, cell.site, &cell.position)?)))
        .collect()
}

/// Train (if the kind learns) and evaluate one cell on every split, then its controls.
pub fn run_cell(ctx: &CellCtx, ci: usize, global_idx: usize, cell: &Cell, emit: &mut dyn FnMut(RunEvent)) -> Result<CellResult> {
    let (spec, model, prepared) = (ctx.spec, ctx.model, ctx.prepared);
    emit(RunEvent::CellStarted { cell: ci, label: cell.label() });
    let real = |s: Split| -> &[Pair] { prepared.data.split(s) };
    let caches = cell_caches(ctx.split_caches, prepared, cell)?;
    let width = caches[&Split::Test].source_vec[0].dim(0)?;
    let d_iv = cell.cols.as_ref().map(|c| c.dim(0)).transpose()?.unwrap_or(width);
    let mean = match caches.get(&Split::Train) {
        Some(c) if spec.intervention.needs_statistics() => {
            let m = Tensor::stack(&c.base_vec, 0)?.mean(0)?;
            Some(match &cell.cols {
                Some(cols) => m.index_select(cols, 0)?,
                None => m,
            })
        }
        _ => None,
    };
    let cell_seed = spec.seed.wrapping_mul(1_000_003).wrapping_add(global_idx as u64);
    let build = |s: &InterventionSpec, seed: u64| s.build(d_iv, seed, mean.as_ref(), model.device());
    let ev = Evaluator { ctx, model, clean: &prepared.clean, cell, caches: &caches, pairs: &real };
    let mut iv = build(&spec.intervention, cell_seed)?;
    let mut out = CellResult {
        metrics: Vec::new(),
        examples: Vec::new(),
        train_log: Vec::new(),
        params: Vec::new(),
        summary: CellSummary {
            label: cell.label(),
            layer: cell.layer,
            site: cell.site.name().into(),
            position: cell.position.clone(),
            test_iia_vocab: f64::NAN,
            test_iia_answers: f64::NAN,
            test_logit_diff: f64::NAN,
            controls: Vec::new(),
            margin: f64::NAN,
            low_margin: false,
        },
        complete: true,
    };
    if iv.is_trainable() {
        let t = ev.train(iv.as_mut(), cell_seed, ci, emit)?;
        out.complete = !t.cut;
        if t.stopped_early {
            emit(RunEvent::Log(format!("  {}: stopped early at step {} (dev loss)", cell.label(), t.log.len())));
        }
        out.train_log = t.log;
        for p in iv.params() {
            out.params
                .push((format!("L{}.{}.{}.{}", cell.layer, cell.site, cell.position, p.name), p.var.as_tensor().clone()));
        }
    }
    let (mut rows, test_eval) = ev.rows(iv.as_ref(), "none")?;
    rows.iter_mut().for_each(|r| r.cut = !out.complete);
    out.metrics = rows;
    out.examples.extend(evaluate::example_rows(cell, real(Split::Test), &test_eval, ctx.tok));
    let stats = iv.stats(ApplyCtx::EVAL);
    if !stats.is_empty() {
        let s: Vec<String> = stats.iter().map(|(k, v)| format!("{k}={v:.3}")).collect();
        emit(RunEvent::Log(format!("  {}: {}", cell.label(), s.join(" "))));
    }
    // Controls run only beside a training that finished (a cut cell is re-done on resume).
    if out.complete {
        let learned_dims = stats.iter().find(|(k, _)| k == "subspace_dims").map(|x| x.1);
        for &c in ctx.controls {
            let (rows, e) = match c {
                Control::RandomSubspace => {
                    let s = controls::random_subspace(&spec.intervention, learned_dims);
                    let civ = build(&s, cell_seed ^ controls::RANDOM_SUBSPACE_SEED)?;
                    ev.rows(civ.as_ref(), c.name())?
                }
                Control::PermutedLabels => {
                    let permuted = |s: Split| -> &[Pair] { ctx.permuted.get(&s).map_or(&[], |v| v.as_slice()) };
                    let pev = Evaluator { ctx, model, clean: &prepared.clean, cell, caches: &caches, pairs: &permuted };
                    pev.train_control(&build, cell_seed, ci, c, &mut out.train_log)?
                }
                Control::RandomModel => {
                    let rm = ctx.random_model.ok_or_else(|| anyhow::anyhow!("random_model control without its model"))?;
                    let rcaches = cell_caches(&rm.split_caches, prepared, cell)?;
                    // Its own closure, declared after the caches it is paired with (Evaluator ties
                    // both to one lifetime, so `real`, declared before them, cannot serve).
                    let pairs = |s: Split| -> &[Pair] { prepared.data.split(s) };
                    let rev = Evaluator { ctx, model: &rm.model, clean: &rm.clean, cell, caches: &rcaches, pairs: &pairs };
                    rev.train_control(&build, cell_seed, ci, c, &mut out.train_log)?
                }
            };
            out.metrics.extend(rows);
            out.summary.controls.push((c.name().to_string(), e.iia_vocab));
        }
    }
    let best_control = out.summary.controls.iter().map(|x| x.1).fold(f64::NAN, f64::max);
    out.summary.margin = test_eval.iia_vocab - best_control;
    out.summary.low_margin = out.summary.margin < controls::MIN_MARGIN;
    if !out.summary.controls.is_empty() {
        let c: Vec<String> = out.summary.controls.iter().map(|(k, v)| format!("{k} {v:.3}")).collect();
        let flag = if out.summary.low_margin { "  [margin < 0.2: not clearly a variable]" } else { "" };
        emit(RunEvent::Log(format!("  {}: controls (test IIA) {}{flag}", cell.label(), c.join(", "))));
    }
    emit(RunEvent::CellDone {
        cell: ci,
        label: cell.label(),
        layer: cell.layer,
        site: cell.site.name().into(),
        position: cell.position.clone(),
        iia: test_eval.iia_vocab,
        logit_diff: test_eval.logit_diff,
    });
    out.summary.test_iia_vocab = test_eval.iia_vocab;
    out.summary.test_iia_answers = test_eval.iia_answers;
    out.summary.test_logit_diff = test_eval.logit_diff;
    Ok(out)
}
