//! spec → model + data → cells (train/evaluate interventions) → CSVs, figures, events.
//! The same runner serves `road run` (headless) and the TUI (through a `Sink`).
use super::cell_job::{run_cell, CellCtx, CellResult};
use super::cells::Cell;
use super::controls;
use super::data::{self, Prepared};
use crate::runs::{RunEvent, Sink};
use super::figures;
use super::outputs::{self, ExampleRow, MetricRow, TrainRow};
use super::spec::Spec;
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
    /// Test IIA (vocabulary argmax) of each control, beside the trained value.
    pub controls: Vec<(String, f64)>,
    /// Trained test IIA minus the best control's (NaN without controls).
    pub margin: f64,
    /// The margin is under [`super::controls::MIN_MARGIN`]: the subspace is not clearly a
    /// variable (it may be an illusion, or there is no signal).
    pub low_margin: bool,
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

    let control_list = controls::of(&spec.intervention, &spec.controls)?;
    let permuted = controls::permuted_splits(&control_list, spec.seed, &prepared.data);
    let ctx = CellCtx { spec, opts, model, tok, prepared: &prepared, split_caches: &split_caches, steps, controls: &control_list, permuted: &permuted };
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

fn write_tables(dir: &std::path::Path, m: &[MetricRow], e: &[ExampleRow], t: &[TrainRow]) -> Result<()> {
    crate::runs::write_csv(&dir.join("metrics.csv"), m, &outputs::METRIC_HEADER)?;
    crate::runs::write_csv(&dir.join("examples.csv"), e, &["layer", "site", "position", "example", "base", "source", "base_label", "cf_label", "predicted", "correct", "logit_diff", "heads"])?;
    crate::runs::write_csv(&dir.join("train_log.csv"), t, &outputs::TRAIN_HEADER)?;
    let timing: Vec<outputs::TimingRow> = t.iter().map(outputs::TimingRow::from).collect();
    crate::runs::write_csv(&dir.join("timing.csv"), &timing, &outputs::TIMING_HEADER)?;
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
        let main: Vec<&MetricRow> = rows.iter().copied().filter(|r| r.is_main()).collect();
        figures::heatmap(&dir.join(format!("iia_heatmap_{site}{suffix}.svg")), &title, &main, |r| r.iia_vocab)?;
        figures::by_layer(&dir.join(format!("iia_by_layer_{site}{suffix}.svg")), &title, "IIA (vocab argmax)", &rows, |r| r.iia_vocab)?;
    }
    Ok(())
}
