//! spec → model + data → cells (train/evaluate interventions) → CSVs, figures, events.
//! The same runner serves `road run` (headless) and the TUI (through a `Sink`).
use super::cell_job::{run_cell, CellCtx, CellResult};
use super::cells::Cell;
use super::controls;
use super::data::{self, Prepared};
use crate::runs::{RunEvent, Sink};
use super::cell_store;
use super::outputs;
use super::tables;
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
    /// A fixed run folder `notebooks-out/<name>/<run_id>/` (with a shard:
    /// `.../<run_id>/shards/<i>-of-<n>/`) instead of a new timestamped one; every task of one
    /// submission names the same id. An existing folder of the same spec is resumed.
    pub run_id: Option<String>,
    /// Finish this (killed, cancelled) run folder: its finished cells are kept.
    pub resume: Option<PathBuf>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CellSummary {
    pub label: String,
    pub layer: usize,
    pub site: String,
    pub position: String,
    #[serde(deserialize_with = "crate::util::nan_null::f64")]
    pub test_iia_vocab: f64,
    #[serde(deserialize_with = "crate::util::nan_null::f64")]
    pub test_iia_answers: f64,
    #[serde(deserialize_with = "crate::util::nan_null::f64")]
    pub test_logit_diff: f64,
    /// Test IIA (vocabulary argmax) of each control, beside the trained value.
    #[serde(deserialize_with = "crate::util::nan_null::pairs")]
    pub controls: Vec<(String, f64)>,
    /// Trained test IIA minus the best control's (NaN without controls).
    #[serde(deserialize_with = "crate::util::nan_null::f64")]
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
pub(super) fn head_cols(heads: &[usize], model: &Llama, site: Site) -> Result<Option<Tensor>> {
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

/// The resolved spec as written to `config.toml` (a shard adds its own line).
pub fn config_text(spec: &Spec, shard: Option<(usize, usize)>) -> Result<String> {
    let mut config = spec.to_toml()?;
    if let Some((i, n)) = shard {
        if n == 0 || i >= n {
            bail!("--shard {i}/{n}: expected i/n with i < n");
        }
        config.push_str(&format!("\n# shard {i}/{n}\n"));
    }
    Ok(config)
}

/// The shard a run folder's config.toml names (`# shard i/n`), if any.
pub fn shard_of(config: &str) -> Option<(usize, usize)> {
    let line = config.lines().find_map(|l| l.strip_prefix("# shard "))?;
    let (i, n) = line.trim().split_once('/')?;
    Some((i.parse().ok()?, n.parse().ok()?))
}

/// The folder this run writes to, and whether it was made now (a fresh folder that fails before
/// its first cell is removed again).
fn open_run_dir(spec: &Spec, opts: &RunOptions, config: &str) -> Result<(PathBuf, bool)> {
    // A folder holding this very spec is reused (resumed) unless a live process still writes it.
    let existing = |dir: &std::path::Path| -> Result<bool> {
        match std::fs::read_to_string(dir.join("config.toml")) {
            Ok(old) if old == config => {
                if crate::runs::state::status(dir) == crate::runs::RunStatus::Running {
                    bail!(
                        "{} is still being written by a live process (its RUNNING names it); if that process or job is gone (another node), delete the RUNNING file",
                        dir.display()
                    );
                }
                Ok(true)
            }
            Ok(_) => bail!(
                "{} holds a run of a different spec (config.toml differs); use another --run-id, or resume it with its own config",
                dir.display()
            ),
            Err(_) => Ok(false),
        }
    };
    if let Some(dir) = &opts.resume {
        if !existing(dir)? {
            bail!("--resume {}: no config.toml there (not a run folder)", dir.display());
        }
        return Ok((dir.clone(), false));
    }
    let Some(id) = &opts.run_id else {
        let dir = crate::runs::new_run_dir(&spec.name, &crate::runs::short_hash(config))?;
        crate::runs::atomic::write(&dir.join("config.toml"), config.as_bytes())?;
        return Ok((dir, true));
    };
    if id.is_empty() || id == "." || id == ".." || id.contains(['/', '\\', '\0']) {
        bail!("--run-id {id:?} must be one folder name (no separators, not . or ..)");
    }
    let mut dir = crate::runs::out_root().join(&spec.name).join(id);
    if let Some((i, n)) = opts.shard {
        dir = dir.join("shards").join(format!("{i}-of-{n}"));
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    if existing(&dir)? {
        return Ok((dir, false));
    }
    crate::runs::atomic::write(&dir.join("config.toml"), config.as_bytes())?;
    Ok((dir, true))
}

/// Run a sweep into its run folder. The folder is marked RUNNING from the start; every finished
/// cell is stored whole; a cancel (or SIGINT/SIGTERM/SIGHUP, through `opts.cancel`) stops at the
/// next step and marks it INCOMPLETE; `opts.resume` / a repeated `opts.run_id` finishes it.
pub fn run(spec: &Spec, opts: &RunOptions, sink: &mut dyn Sink) -> Result<RunSummary> {
    let t0 = std::time::Instant::now();
    let config = config_text(spec, opts.shard)?;
    let (run_dir, fresh) = open_run_dir(spec, opts, &config)?;
    crate::runs::state::mark_running(&run_dir)?;
    // A panic (a bug) fails the run like an error: error.txt beside the partial outputs.
    let result = crate::util::panics::guarded("the run", || run_in(spec, opts, sink, &run_dir, t0));
    if let Err(e) = &result {
        sink.send(RunEvent::Log(format!("run failed: {e:#}")));
        sink.send(RunEvent::Finished { run_dir: run_dir.clone(), complete: false });
        if fresh && !run_dir.join("cells").exists() {
            // Nothing finished: leave no empty folder behind (the error is the caller's to show).
            let _ = std::fs::remove_dir_all(&run_dir);
            let _ = std::fs::remove_dir(run_dir.parent().unwrap_or(&run_dir));
            return result;
        }
        // Keep the failure next to the partial outputs.
        let _ = std::fs::write(run_dir.join("error.txt"), format!("{e:#}\n"));
    }
    crate::runs::state::clear_running(&run_dir);
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
    if let crate::intervene::InterventionSpec::Atp { atp } = &spec.intervention {
        if opts.shard.is_some() {
            bail!("an atp run is not sharded: one backward pass covers every cell");
        }
        let r = super::atp_run::AtpRun { spec, opts: atp, model, prepared: &prepared, layers: &layers, sites: &sites, positions: &positions, run_dir };
        let (summary, complete) = super::atp_run::run(&r, sink, &opts.cancel, t0)?;
        if !complete {
            crate::runs::state::mark_incomplete(run_dir, "cancelled during verification; run it again to redo it")?;
        }
        sink.send(RunEvent::Finished { run_dir: run_dir.to_path_buf(), complete });
        return Ok(summary);
    }

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
    let random_model = if control_list.contains(&controls::Control::RandomModel) {
        sink.send(RunEvent::Log("random_model control: re-initialising the model's weights and caching its clean runs".into()));
        let splits: Vec<Split> = split_caches.keys().copied().collect();
        Some(controls::RandomModel::build(model, &prepared.data, &splits, &needed, spec.seed)?)
    } else {
        None
    };
    let ctx = CellCtx {
        spec,
        opts,
        model,
        tok,
        prepared: &prepared,
        split_caches: &split_caches,
        steps,
        controls: &control_list,
        permuted: &permuted,
        random_model: random_model.as_ref(),
    };
    let jobs = parallel_cells(opts.jobs, cells.len(), spec, model);
    if jobs > 1 {
        sink.send(RunEvent::Log(format!("running {jobs} cells at a time")));
    }
    let mut results: Vec<Option<CellResult>> = (0..cells.len()).map(|_| None).collect();
    // Cells a killed or cancelled run of this folder already finished are read back, not redone.
    for (ci, (global_idx, cell)) in cells.iter().enumerate() {
        if let Some(r) = cell_store::load(run_dir, *global_idx)? {
            sink.send(RunEvent::Log(format!("  {}: finished earlier, kept", cell.label())));
            results[ci] = Some(r);
        }
    }
    let todo: Vec<usize> = (0..cells.len()).filter(|&ci| results[ci].is_none()).collect();
    if todo.len() < cells.len() {
        sink.send(RunEvent::Log(format!("resuming: {} of {} cells left", todo.len(), cells.len())));
    }
    // Each finished cell is stored whole (cells/<i>.toml), then the tables are rewritten in cell
    // order, so a killed run keeps what it finished; results do not depend on `jobs` (each cell
    // has its own seed).
    let record = |ci: usize, r: CellResult, results: &mut Vec<Option<CellResult>>| -> Result<()> {
        if r.complete {
            cell_store::save(run_dir, cells[ci].0, &r)?;
        }
        results[ci] = Some(r);
        let (m, e, t) = tables::gather(results);
        tables::write_tables(run_dir, &m, &e, &t)
    };
    if jobs <= 1 {
        for &ci in &todo {
            let (global_idx, cell) = &cells[ci];
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
                let (ctx, cells, next, todo) = (&ctx, &cells, &next, &todo);
                scope.spawn(move || loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= todo.len() || ctx.opts.cancel.load(Ordering::Relaxed) {
                        break;
                    }
                    let ci = todo[k];
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
    let meta = tables::RunMeta {
        complete,
        seconds: t0.elapsed().as_secs_f64(),
        task_accuracy: prepared.task_accuracy,
        kept_fraction: prepared.report.iter().map(|(s, _, k, _)| (s.name().to_string(), *k)).collect(),
    };
    let summary = tables::write_outputs(run_dir, spec, &results, meta)?;
    if !complete {
        let why = if opts.cancel.load(Ordering::Relaxed) { "cancelled or interrupted" } else { "a cell did not finish" };
        crate::runs::state::mark_incomplete(run_dir, &format!("{why} before every cell finished; `road run --resume {}` finishes it", run_dir.display()))?;
    }
    sink.send(RunEvent::Finished { run_dir: run_dir.to_path_buf(), complete });
    Ok(summary)
}

enum Msg {
    Event(RunEvent),
    Done(usize, Result<CellResult>),
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

