//! spec → model + data → cells (train/evaluate interventions) → CSVs, figures, events.
//! The same runner serves `road run` (headless) and the TUI (through a `Sink`).
use super::cells::{self, Cell, Eval};
use super::data::{self, Prepared};
use crate::runs::{RunEvent, Sink};
use super::figures;
use super::outputs::{self, ExampleRow, MetricRow, TrainRow};
use super::spec::Spec;
use crate::intervene::ApplyCtx;
use crate::model::{registry, Llama, Site};
use crate::tasks::Split;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Default, Clone)]
pub struct RunOptions {
    /// Run only cells with index % n == i (`--shard i/n`).
    pub shard: Option<(usize, usize)>,
    /// Cells run at once (`--jobs`; 0 or 1 = one after another; capped by memory; 1 on a GPU).
    pub jobs: usize,
    pub cancel: Arc<AtomicBool>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CellSummary {
    pub label: String,
    pub layer: usize,
    pub site: String,
    pub position: String,
    pub test_iia_vocab: f64,
    pub test_iia_answers: f64,
    pub test_logit_diff: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RunSummary {
    pub experiment: String,
    pub run_dir: PathBuf,
    pub seed: u64,
    pub complete: bool,
    pub seconds: f64,
    pub task_accuracy: f64,
    pub kept_fraction: Vec<(String, f64)>,
    pub cells: Vec<CellSummary>,
}

/// Expand position specs; "all" means every index of the (equal-length) prompts.
fn positions(spec: &Spec, prepared: &Prepared) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for p in &spec.sites.positions {
        if p == "all" {
            let lens: Vec<usize> = [Split::Train, Split::Dev, Split::Test]
                .iter()
                .flat_map(|s| prepared.data.split(*s).iter().flat_map(|x| [x.base.ids.len(), x.source.ids.len()]))
                .collect();
            let t = lens[0];
            if lens.iter().any(|&l| l != t) {
                bail!("sites.positions = \"all\" needs prompts of one length (use a single template, or named positions)");
            }
            out.extend((0..t).map(|i| i.to_string()));
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// The head groups a site is swept over: one group per head with `sweep_heads` (the listed
/// heads, or all of the site's), else the listed heads together (empty = the whole vector).
fn head_groups(spec: &Spec, model: &Llama, site: Site) -> Vec<Vec<usize>> {
    match (spec.sites.sweep_heads, spec.sites.heads.is_empty()) {
        (true, true) => (0..site.n_heads(&model.cfg)).map(|h| vec![h]).collect(),
        (true, false) => spec.sites.heads.iter().map(|&h| vec![h]).collect(),
        (false, _) => vec![spec.sites.heads.clone()],
    }
}

/// Column indices of `heads` in a headed site's vector (None = the whole vector).
fn head_cols(heads: &[usize], model: &Llama, site: Site) -> Result<Option<Tensor>> {
    if heads.is_empty() {
        return Ok(None);
    }
    let c = &model.cfg;
    let n = site.n_heads(c);
    let mut cols = Vec::new();
    for &h in heads {
        if h >= n {
            bail!("head {h} is out of range for site {site} ({n} heads)");
        }
        cols.extend((h * c.head_dim..(h + 1) * c.head_dim).map(|x| x as u32));
    }
    Ok(Some(Tensor::new(cols, model.device())?))
}

pub fn run(spec: &Spec, opts: &RunOptions, sink: &mut dyn Sink) -> Result<RunSummary> {
    let t0 = std::time::Instant::now();
    let mut config = spec.to_toml()?;
    if let Some((i, n)) = opts.shard {
        if n == 0 || i >= n {
            bail!("--shard {i}/{n}: expected i/n with i < n");
        }
        config.push_str(&format!("\n# shard {i}/{n}\n"));
    }
    let run_dir = crate::runs::new_run_dir(&spec.name, &crate::runs::short_hash(&config))?;
    std::fs::write(run_dir.join("config.toml"), &config)?;
    let result = run_in(spec, opts, sink, &run_dir, t0);
    if let Err(e) = &result {
        // Keep the failure next to the partial outputs.
        let _ = std::fs::write(run_dir.join("error.txt"), format!("{e:#}\n"));
        sink.send(RunEvent::Log(format!("run failed: {e:#}")));
        sink.send(RunEvent::Finished { run_dir: run_dir.clone(), complete: false });
    }
    result
}

fn run_in(spec: &Spec, opts: &RunOptions, sink: &mut dyn Sink, run_dir: &std::path::Path, t0: std::time::Instant) -> Result<RunSummary> {
    let device = crate::runtime::device_for(&spec.model.device)?;
    let loaded = registry::load(&spec.model.name, crate::runtime::dtype_for(&spec.model.dtype)?, &device, true)
        .with_context(|| format!("loading model {:?}", spec.model.name))?;
    let (model, tok) = (&loaded.model, &loaded.tok);
    let layers = spec.layer_list(model.cfg.num_layers)?;
    let sites = spec.site_list()?;
    let prepared = data::prepare(spec, model, tok, &mut |s| sink.send(RunEvent::Log(s)))?;
    let positions = positions(spec, &prepared)?;
    outputs::write_pairs(&run_dir.join("pairs.jsonl"), &prepared.data, tok)?;

    let mut cells = Vec::new();
    for &layer in &layers {
        for &site in &sites {
            for p in &positions {
                for group in head_groups(spec, model, site) {
                    let heads = group.iter().map(|h| h.to_string()).collect::<Vec<_>>().join("+");
                    cells.push(Cell { layer, site, position: p.clone(), cols: head_cols(&group, model, site)?, heads });
                }
            }
        }
    }
    let cells: Vec<(usize, Cell)> = cells
        .into_iter()
        .enumerate()
        .filter(|(i, _)| opts.shard.map(|(s, n)| i % n == s).unwrap_or(true))
        .collect();
    let trainable = spec.intervention.trainable();
    let steps = if trainable { spec.train.steps } else { 0 };
    sink.send(RunEvent::Started { run_dir: run_dir.to_path_buf(), cells: cells.len(), steps_per_cell: steps });
    sink.send(RunEvent::Log(format!(
        "{} cells ({} layers x {} sites x {} positions{}), intervention {}{}",
        cells.len(),
        layers.len(),
        sites.len(),
        positions.len(),
        if spec.sites.sweep_heads { " x heads" } else { "" },
        spec.intervention.kind_name(),
        if trainable { format!(", {} training steps each", steps) } else { String::new() }
    )));

    // Clean activations once per split, shared by every cell.
    let needed: Vec<(usize, Site)> = {
        let mut v: Vec<(usize, Site)> = cells.iter().map(|(_, c)| (c.layer, c.site)).collect();
        v.sort();
        v.dedup();
        v
    };
    let mut split_caches: HashMap<Split, data::SplitCache> = HashMap::new();
    for s in [Split::Train, Split::Dev, Split::Test] {
        let pairs = prepared.data.split(s);
        if !pairs.is_empty() && (s != Split::Train || trainable || spec.intervention.needs_statistics()) {
            sink.send(RunEvent::Log(format!("caching clean activations of the {} split ({} pairs)", s.name(), pairs.len())));
            split_caches.insert(s, data::cache_split(model, pairs, &needed)?);
        }
    }

    let ctx = CellCtx { spec, opts, model, tok, prepared: &prepared, split_caches: &split_caches, steps };
    let jobs = parallel_cells(opts.jobs, cells.len(), spec, model);
    if jobs > 1 {
        sink.send(RunEvent::Log(format!("running {jobs} cells at a time")));
    }
    let mut results: Vec<Option<CellResult>> = (0..cells.len()).map(|_| None).collect();
    // Rewrite the tables as cells finish (in cell order), so a cancelled or crashed run keeps
    // what it finished; results do not depend on `jobs` (each cell has its own seed).
    let record = |ci: usize, r: CellResult, results: &mut Vec<Option<CellResult>>| -> Result<()> {
        results[ci] = Some(r);
        let (m, e, t) = gather(results);
        write_tables(run_dir, &m, &e, &t)
    };
    if jobs <= 1 {
        for (ci, (global_idx, cell)) in cells.iter().enumerate() {
            if opts.cancel.load(Ordering::Relaxed) {
                break;
            }
            let r = run_cell(&ctx, ci, *global_idx, cell, &mut |e| sink.send(e))?;
            record(ci, r, &mut results)?;
        }
    } else {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let (tx, rx) = std::sync::mpsc::channel::<Msg>();
        std::thread::scope(|scope| -> Result<()> {
            for _ in 0..jobs {
                let tx = tx.clone();
                let (ctx, cells, next) = (&ctx, &cells, &next);
                scope.spawn(move || loop {
                    let ci = next.fetch_add(1, Ordering::Relaxed);
                    if ci >= cells.len() || ctx.opts.cancel.load(Ordering::Relaxed) {
                        break;
                    }
                    let (global_idx, cell) = &cells[ci];
                    let r = run_cell(ctx, ci, *global_idx, cell, &mut |e| {
                        let _ = tx.send(Msg::Event(e));
                    });
                    let failed = r.is_err();
                    let _ = tx.send(Msg::Done(ci, r));
                    if failed {
                        // Stop the other workers at their next cell.
                        ctx.opts.cancel.store(true, Ordering::Relaxed);
                        break;
                    }
                });
            }
            drop(tx);
            let mut first_err = None;
            for m in rx {
                match m {
                    Msg::Event(e) => sink.send(e),
                    Msg::Done(ci, Ok(r)) => record(ci, r, &mut results)?,
                    Msg::Done(_, Err(e)) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            first_err.map_or(Ok(()), Err)
        })?;
    }
    // Complete = every cell ran all its steps (a cancelled run leaves cells unrun or cut short).
    let complete = results.iter().all(|r| r.as_ref().is_some_and(|r| r.complete));
    let (metrics, examples, train_log) = gather(&results);
    let params: HashMap<String, Tensor> = results.iter().flatten().flat_map(|r| r.params.iter().cloned()).collect();
    let summaries: Vec<CellSummary> = results.iter().flatten().map(|r| r.summary.clone()).collect();
    write_tables(run_dir, &metrics, &examples, &train_log)?;
    if !params.is_empty() {
        candle_core::safetensors::save(&params, run_dir.join("params.safetensors"))?;
    }
    write_figures(run_dir, spec, &metrics)?;
    let summary = RunSummary {
        experiment: spec.name.clone(),
        run_dir: run_dir.to_path_buf(),
        seed: spec.seed,
        complete,
        seconds: t0.elapsed().as_secs_f64(),
        task_accuracy: prepared.task_accuracy,
        kept_fraction: prepared.report.iter().map(|(s, _, k, _)| (s.name().to_string(), *k)).collect(),
        cells: summaries,
    };
    std::fs::write(run_dir.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    if !complete {
        std::fs::write(run_dir.join("INCOMPLETE"), "cancelled before every cell finished\n")?;
    }
    sink.send(RunEvent::Finished { run_dir: run_dir.to_path_buf(), complete });
    Ok(summary)
}

/// What every cell of a run reads (shared by the worker threads).
struct CellCtx<'a> {
    spec: &'a Spec,
    opts: &'a RunOptions,
    model: &'a Llama,
    tok: &'a crate::tokenizer::Tok,
    prepared: &'a Prepared,
    split_caches: &'a HashMap<Split, data::SplitCache>,
    steps: usize,
}

/// One cell's rows and trained parameters.
struct CellResult {
    metrics: Vec<MetricRow>,
    examples: Vec<ExampleRow>,
    train_log: Vec<TrainRow>,
    params: Vec<(String, Tensor)>,
    summary: CellSummary,
    complete: bool,
}

enum Msg {
    Event(RunEvent),
    Done(usize, Result<CellResult>),
}

/// The finished cells' rows, in cell order.
fn gather(results: &[Option<CellResult>]) -> (Vec<MetricRow>, Vec<ExampleRow>, Vec<TrainRow>) {
    let done = || results.iter().flatten();
    (
        done().flat_map(|r| r.metrics.iter().cloned()).collect(),
        done().flat_map(|r| r.examples.iter().cloned()).collect(),
        done().flat_map(|r| r.train_log.iter().cloned()).collect(),
    )
}

/// How many cells to run at once: the request (`--jobs`; 0 or 1 = one after another), capped by the
/// number of cells and by the memory a cell's training graph may take (a rough upper bound:
/// batch × tokens × layers × (12·hidden + heads·tokens) floats, twice for the backward pass)
/// against what the OS reports available, keeping half of it free.
fn parallel_cells(requested: usize, n_cells: usize, spec: &Spec, model: &Llama) -> usize {
    let want = requested.min(n_cells).max(1);
    if want == 1 || !model.device().is_cpu() {
        // One GPU runs one cell at a time (its kernels already fill the device).
        return 1;
    }
    let c = &model.cfg;
    let tokens = 64usize;
    let floats = spec.train.batch.max(1) * tokens * c.num_layers * (12 * c.hidden_size + c.num_heads * tokens) * 2;
    let per_cell = (floats * model.dtype().size_in_bytes()) as u64;
    match crate::util::mem_available_bytes() {
        Some(avail) => want.min(((avail / 2) / per_cell.max(1)).max(1) as usize),
        None => want,
    }
}

/// Train (if the kind learns) and evaluate one cell on every split.
fn run_cell(ctx: &CellCtx, ci: usize, global_idx: usize, cell: &Cell, emit: &mut dyn FnMut(RunEvent)) -> Result<CellResult> {
    let (spec, model, prepared) = (ctx.spec, ctx.model, ctx.prepared);
    emit(RunEvent::CellStarted { cell: ci, label: cell.label() });
    let split_pairs = |s: Split| prepared.data.split(s);
    let caches: HashMap<Split, data::CellCache> = ctx
        .split_caches
        .iter()
        .map(|(s, sc)| Ok((*s, sc.cell(split_pairs(*s), cell.layer, cell.site, &cell.position)?)))
        .collect::<Result<_>>()?;
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
    let mut iv = spec.intervention.build(d_iv, cell_seed, mean.as_ref(), model.device())?;
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
        },
        complete: true,
    };
    if iv.is_trainable() {
        let steps = ctx.steps;
        let log = cells::train(
            model,
            cell,
            &caches[&Split::Train],
            split_pairs(Split::Train),
            iv.as_mut(),
            &spec.train,
            cell_seed,
            &ctx.opts.cancel,
            &mut |step, loss| emit(RunEvent::Step { cell: ci, step, steps, loss }),
        )?;
        out.complete = log.len() >= spec.train.steps;
        out.train_log = log;
        for p in iv.params() {
            out.params
                .push((format!("L{}.{}.{}.{}", cell.layer, cell.site, cell.position, p.name), p.var.as_tensor().clone()));
        }
    }
    let mut test_eval = Eval::default();
    for split in [Split::Train, Split::Dev, Split::Test] {
        let Some(cache) = caches.get(&split) else { continue };
        let pairs = split_pairs(split);
        let clean: Vec<&data::Clean> = (0..pairs.len()).map(|i| &prepared.clean[&(split, i)]).collect();
        let e = cells::evaluate(model, cell, cache, pairs, &clean, iv.as_ref())?;
        out.metrics.push(MetricRow {
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
        });
        if split == Split::Test {
            out.examples.extend(cells::example_rows(cell, pairs, &e, ctx.tok));
            test_eval = e;
        }
    }
    let stats = iv.stats(ApplyCtx::EVAL);
    if !stats.is_empty() {
        let s: Vec<String> = stats.iter().map(|(k, v)| format!("{k}={v:.3}")).collect();
        emit(RunEvent::Log(format!("  {}: {}", cell.label(), s.join(" "))));
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

fn write_tables(dir: &std::path::Path, m: &[MetricRow], e: &[ExampleRow], t: &[TrainRow]) -> Result<()> {
    crate::runs::write_csv(&dir.join("metrics.csv"), m, &outputs::METRIC_HEADER)?;
    crate::runs::write_csv(&dir.join("examples.csv"), e, &["layer", "site", "position", "example", "base", "source", "base_label", "cf_label", "predicted", "correct", "logit_diff", "heads"])?;
    crate::runs::write_csv(&dir.join("train_log.csv"), t, &outputs::TRAIN_HEADER)?;
    Ok(())
}

/// One heatmap and one per-layer line chart per site (test split).
pub fn write_figures(dir: &std::path::Path, spec: &Spec, metrics: &[MetricRow]) -> Result<()> {
    // One figure pair per (site, head group): a head sweep gets a heatmap per head.
    let mut groups: Vec<(&str, &str)> = metrics.iter().map(|r| (r.site.as_str(), r.heads.as_str())).collect();
    groups.sort();
    groups.dedup();
    for (site, heads) in groups {
        let rows: Vec<&MetricRow> = metrics.iter().filter(|r| r.site == site && r.heads == heads && r.split == "test").collect();
        if rows.is_empty() {
            continue;
        }
        let (suffix, label) = if heads.is_empty() { (String::new(), String::new()) } else { (format!("_h{heads}"), format!(", heads {heads}")) };
        let title = format!("{}: test IIA ({}, {site}{label})", spec.name, spec.intervention.kind_name());
        figures::heatmap(&dir.join(format!("iia_heatmap_{site}{suffix}.svg")), &title, &rows, |r| r.iia_vocab)?;
        figures::by_layer(&dir.join(format!("iia_by_layer_{site}{suffix}.svg")), &title, "IIA (vocab argmax)", &rows, |r| r.iia_vocab)?;
    }
    Ok(())
}
