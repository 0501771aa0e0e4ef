//! Workbench state and the one function that changes it: `update(&mut App, Event) -> Vec<Command>`.
//! No terminal, no threads, no file system here: side effects are returned as [`Command`]s.
use super::data::{self, Grid, Metric, RunData, RunInfo};
use super::event::{AltTop, Event, JobEvent, ModelInfo, ModelMsg, Slot, TopRow};
use super::whatif::{self, FormAction, WhatIf};
use crate::experiment::{RunEvent, Spec};
use crate::pilot::PilotSpec;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Side effects for the host (main loop or test) to carry out.
#[derive(Debug, Clone)]
pub enum Command {
    LoadExperiments,
    RefreshRuns,
    OpenRun { dir: PathBuf, slot: Slot },
    QueueRun { job: u64, spec: Box<Spec> },
    QueuePilot { job: u64, spec: Box<PilotSpec> },
    CancelRun { job: u64 },
    LoadModel { name: String },
    TopK { name: String, prompt: String, k: usize, whatif: Option<WhatIf> },
    Tokenize { name: String, text: String },
    Export { path: PathBuf, csv: String },
    Quit,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub experiments_dir: PathBuf,
    pub out_root: PathBuf,
    /// False under NO_COLOR: no colours, shades for the heatmap.
    pub color: bool,
}

impl Config {
    pub fn from_env() -> Self {
        Self {
            experiments_dir: PathBuf::from("experiments"),
            out_root: crate::runs::out_root(),
            color: std::env::var_os("NO_COLOR").map(|v| v.is_empty()).unwrap_or(true),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Experiments,
    Runs,
    Results,
    Compare,
    Model,
}

impl View {
    pub const ALL: [View; 5] = [View::Experiments, View::Runs, View::Results, View::Compare, View::Model];
    pub fn title(self) -> &'static str {
        match self {
            View::Experiments => "Experiments",
            View::Runs => "Runs",
            View::Results => "Results",
            View::Compare => "Compare",
            View::Model => "Model",
        }
    }
}

// ---------------------------------------------------------------- experiments

#[derive(Debug, Clone)]
pub struct ExperimentEntry {
    pub path: PathBuf,
    pub text: Result<String, String>,
    /// `--set`-style overrides from the edit form.
    pub overrides: Vec<String>,
    pub spec: Result<Spec, String>,
    /// A pilot study (`kind = "pilot"`): runs as a whole, no edit form.
    pub pilot: Option<Result<PilotSpec, String>>,
}

impl ExperimentEntry {
    pub fn new(path: PathBuf, text: Result<String, String>) -> Self {
        let mut e = Self { path, text, overrides: vec![], spec: Err(String::new()), pilot: None };
        if let Ok(t) = &e.text {
            if crate::pilot::is_pilot(t) {
                let origin = e.file_name();
                e.pilot = Some(PilotSpec::parse(t, &[]).map_err(|x| format!("{origin}: {x:#}")));
                e.spec = Err("a pilot study: r runs it; the edit form is for intervention sweeps".into());
                return e;
            }
        }
        e.spec = e.resolve(&[]);
        e
    }

    pub fn file_name(&self) -> String {
        self.path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
    }

    /// Parse the file with overrides (the ones given, then none if `extra` is empty → self's).
    pub fn resolve(&self, overrides: &[String]) -> Result<Spec, String> {
        let text = self.text.as_ref().map_err(|e| e.clone())?;
        let origin = self.file_name();
        if overrides.is_empty() {
            return Spec::from_toml(text, &origin).map_err(|e| format!("{e:#}"));
        }
        Spec::from_toml_with(text, &format!("{origin} (edited)"), overrides).map_err(|e| format!("{e:#}"))
    }
}

#[derive(Debug, Clone)]
pub struct FormField {
    pub label: &'static str,
    pub value: String,
    pub error: Option<String>,
}

/// The edit form: layers, positions, intervention kind, rank, steps, lr, seed.
#[derive(Debug, Clone)]
pub struct Form {
    pub entry: usize,
    pub fields: Vec<FormField>,
    pub focus: usize,
    /// Validation of all fields together (None = valid).
    pub error: Option<String>,
}

pub const FORM_LABELS: [&str; 7] = ["layers", "positions", "intervention", "rank", "steps", "lr", "seed"];

impl Form {
    fn from_spec(entry: usize, s: &Spec) -> Form {
        use crate::experiment::spec::Layers;
        let layers = match &s.sites.layers {
            Layers::Text(t) => t.clone(),
            Layers::List(v) => v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(","),
        };
        let values = [
            layers,
            s.sites.positions.join(", "),
            s.intervention.kind_name().to_string(),
            s.intervention.rank().map(|r| r.to_string()).unwrap_or_default(),
            s.train.steps.to_string(),
            s.train.lr.to_string(),
            s.seed.to_string(),
        ];
        let fields = FORM_LABELS.iter().zip(values).map(|(l, v)| FormField { label: l, value: v, error: None }).collect();
        Form { entry, fields, focus: 0, error: None }
    }

    /// One field as a `--set` override (None = leave the file's value, for an empty rank).
    fn override_of(i: usize, value: &str) -> Result<Option<String>, String> {
        let v = value.trim();
        let num = |what: &str| -> Result<(), String> {
            match what {
                "int" => v.parse::<u64>().map(|_| ()).map_err(|_| format!("{v:?} is not a whole number")),
                _ => v.parse::<f64>().map(|_| ()).map_err(|_| format!("{v:?} is not a number")),
            }
        };
        Ok(Some(match i {
            0 => {
                if v.is_empty() {
                    return Err("layers: empty (use all, 8..16, 8..=16, 3 or 1,2,3)".into());
                }
                if v == "all" || v.contains("..") || v.parse::<usize>().is_ok() {
                    format!("sites.layers={}", toml::Value::String(v.to_string()))
                } else {
                    let nums: Result<Vec<usize>, _> = v.split(',').map(|x| x.trim().parse::<usize>()).collect();
                    let nums = nums.map_err(|_| format!("layers: {v:?} is not all, a range or a list of numbers"))?;
                    format!("sites.layers={}", toml::Value::Array(nums.iter().map(|&n| toml::Value::Integer(n as i64)).collect()))
                }
            }
            1 => {
                let items: Vec<toml::Value> =
                    v.split(',').map(|x| x.trim()).filter(|x| !x.is_empty()).map(|x| toml::Value::String(x.to_string())).collect();
                format!("sites.positions={}", toml::Value::Array(items))
            }
            2 => format!("intervention.kind={}", toml::Value::String(v.to_string())),
            3 => {
                if v.is_empty() {
                    return Ok(None);
                }
                num("int")?;
                format!("intervention.rank={v}")
            }
            4 => {
                num("int")?;
                format!("train.steps={v}")
            }
            5 => {
                num("float")?;
                let f: f64 = v.parse().unwrap_or(0.0);
                if !(f > 0.0) {
                    return Err("lr must be positive".into());
                }
                format!("train.lr={}", toml::Value::Float(f))
            }
            _ => {
                num("int")?;
                format!("seed={v}")
            }
        }))
    }

    /// Re-validate: each field on its own (inline errors), then all together.
    fn validate(&mut self, entry: &ExperimentEntry) -> Option<Vec<String>> {
        let mut all = Vec::new();
        let mut ok = true;
        // A kind without a rank ignores the rank field (switching das → vanilla keeps it typed).
        let takes_rank = crate::intervene::InterventionSpec::from_kind(self.fields[2].value.trim()).map_or(true, |s| s.rank().is_some());
        for (i, f) in self.fields.iter_mut().enumerate() {
            f.error = match Form::override_of(i, &f.value) {
                Ok(Some(_)) if i == 3 && !takes_rank => None,
                Err(e) => Some(e),
                Ok(None) => None,
                Ok(Some(o)) => {
                    let r = entry.resolve(std::slice::from_ref(&o)).err();
                    all.push(o);
                    r.map(|e| e.lines().last().unwrap_or("").to_string())
                }
            };
            ok &= f.error.is_none();
        }
        if !ok {
            self.error = Some("fix the fields marked ✗".into());
            return None;
        }
        match entry.resolve(&all) {
            Ok(_) => {
                self.error = None;
                Some(all)
            }
            Err(e) => {
                self.error = Some(e);
                None
            }
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct ExperimentsState {
    pub entries: Vec<ExperimentEntry>,
    pub selected: usize,
    pub show_spec: bool,
    pub form: Option<Form>,
    pub spec_scroll: u16,
}

impl ExperimentsState {
    pub fn current(&self) -> Option<&ExperimentEntry> {
        self.entries.get(self.selected)
    }
}

// ---------------------------------------------------------------- runs (jobs)

#[derive(Debug, Clone, PartialEq)]
pub enum JobStatus {
    Queued,
    Running,
    Done,
    Cancelled,
    Failed(String),
}

impl JobStatus {
    pub fn label(&self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Done => "done",
            JobStatus::Cancelled => "cancelled",
            JobStatus::Failed(_) => "failed",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Job {
    pub id: u64,
    pub name: String,
    pub status: JobStatus,
    pub cancel_requested: bool,
    pub run_dir: Option<PathBuf>,
    pub cells: usize,
    pub steps_per_cell: usize,
    pub cells_done: usize,
    pub steps_in_cell: usize,
    pub cell_label: String,
    /// (global step, loss) over all cells.
    pub loss: Vec<(f64, f64)>,
    /// (global step, dev IIA) at the training's evaluation points.
    pub dev_iia: Vec<(f64, f64)>,
    /// (cell index, test IIA) of finished cells.
    pub iia: Vec<(f64, f64)>,
    pub log: Vec<String>,
    pub started: Option<Instant>,
    pub ended: Option<Instant>,
}

impl Job {
    fn new(id: u64, name: String) -> Self {
        Job {
            id,
            name,
            status: JobStatus::Queued,
            cancel_requested: false,
            run_dir: None,
            cells: 0,
            steps_per_cell: 0,
            cells_done: 0,
            steps_in_cell: 0,
            cell_label: String::new(),
            loss: vec![],
            dev_iia: vec![],
            iia: vec![],
            log: vec![],
            started: None,
            ended: None,
        }
    }

    /// Fraction done: training steps plus one unit per cell's evaluation.
    pub fn progress(&self) -> f64 {
        if self.cells == 0 {
            return if self.status == JobStatus::Done { 1.0 } else { 0.0 };
        }
        let per = self.steps_per_cell as f64 + 1.0;
        let done = self.cells_done as f64 * per + self.steps_in_cell.min(self.steps_per_cell) as f64;
        (done / (self.cells as f64 * per)).clamp(0.0, 1.0)
    }

    pub fn elapsed(&self, now: Instant) -> Duration {
        match (self.started, self.ended) {
            (Some(s), Some(e)) => e.saturating_duration_since(s),
            (Some(s), None) => now.saturating_duration_since(s),
            _ => Duration::ZERO,
        }
    }

    /// Remaining time from the rate so far (None before any progress).
    pub fn eta(&self, now: Instant) -> Option<Duration> {
        let p = self.progress();
        if self.status != JobStatus::Running || p <= 0.0 {
            return None;
        }
        let el = self.elapsed(now).as_secs_f64();
        Some(Duration::from_secs_f64(el * (1.0 - p) / p))
    }

    fn push_log(&mut self, s: String) {
        self.log.push(s);
        if self.log.len() > 500 {
            self.log.drain(..100);
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct RunsState {
    pub jobs: Vec<Job>,
    pub selected: usize,
    pub next_id: u64,
}

// ---------------------------------------------------------------- results

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Panel {
    Heatmap,
    Table,
    Examples,
}

#[derive(Debug, Clone)]
pub struct ResultsState {
    pub picker: usize,
    pub open: Option<RunData>,
    pub metric: Metric,
    pub site: usize,
    /// (row = layer index, column = position index) in the grid.
    pub cursor: (usize, usize),
    pub panel: Panel,
    pub sort_col: usize,
    pub sort_desc: bool,
    pub table_sel: usize,
    pub example_sel: usize,
    /// Token strings of the first test base prompt (position labels), when known.
    pub tokens: Option<Vec<String>>,
    pub loading: bool,
}

impl Default for ResultsState {
    fn default() -> Self {
        Self {
            picker: 0,
            open: None,
            metric: Metric::IiaVocab,
            site: 0,
            cursor: (0, 0),
            panel: Panel::Heatmap,
            sort_col: 3,
            sort_desc: true,
            table_sel: 0,
            example_sel: 0,
            tokens: None,
            loading: false,
        }
    }
}

impl ResultsState {
    pub fn site_name(&self) -> Option<String> {
        let sites = self.open.as_ref()?.sites();
        sites.get(self.site.min(sites.len().saturating_sub(1))).cloned()
    }

    /// The heatmap grid of the open run for the current metric and site.
    pub fn grid(&self) -> Option<Grid> {
        let d = self.open.as_ref()?;
        Some(Grid::build(&d.metrics, &self.site_name()?, self.metric))
    }

    /// (layer, position) under the cursor.
    pub fn cursor_cell(&self) -> Option<(usize, String)> {
        let g = self.grid()?;
        Some((*g.layers.get(self.cursor.0)?, g.positions.get(self.cursor.1)?.clone()))
    }
}

#[derive(Debug, Clone)]
pub struct CompareState {
    pub picker: usize,
    /// Marked runs (directories), at most two, in marking order: A then B.
    pub marked: Vec<PathBuf>,
    pub a: Option<RunData>,
    pub b: Option<RunData>,
    pub showing: bool,
    pub metric: Metric,
    pub site: usize,
    pub cursor: (usize, usize),
}

impl Default for CompareState {
    fn default() -> Self {
        Self { picker: 0, marked: vec![], a: None, b: None, showing: false, metric: Metric::IiaVocab, site: 0, cursor: (0, 0) }
    }
}

impl CompareState {
    pub fn sites(&self) -> Vec<String> {
        let (Some(a), Some(b)) = (&self.a, &self.b) else { return vec![] };
        let sb = b.sites();
        a.sites().into_iter().filter(|s| sb.contains(s)).collect()
    }
    pub fn site_name(&self) -> Option<String> {
        let s = self.sites();
        s.get(self.site.min(s.len().saturating_sub(1))).cloned()
    }
    /// (grid A, grid B, B − A) for the current metric and site.
    pub fn grids(&self) -> Option<(Grid, Grid, Grid)> {
        let (a, b) = (self.a.as_ref()?, self.b.as_ref()?);
        let site = self.site_name()?;
        let ga = Grid::build(&a.metrics, &site, self.metric);
        let gb = Grid::build(&b.metrics, &site, self.metric);
        let d = Grid::diff(&ga, &gb);
        Some((ga, gb, d))
    }
}

#[derive(Debug, Clone, Default)]
pub struct ModelState {
    /// The model asked for (from the selected experiment).
    pub name: Option<String>,
    pub loading: bool,
    pub info: Option<ModelInfo>,
    pub prompt: String,
    pub editing: bool,
    pub busy: bool,
    pub top: Vec<TopRow>,
    pub top_prompt: String,
    pub top_ids: Vec<u32>,
    pub error: Option<String>,
    /// The what-if applied to every top-k request (None: clean only).
    pub whatif: Option<WhatIf>,
    /// The what-if form while it is open (`w`).
    pub form: Option<whatif::Form>,
    /// The what-if side of the last top-k (or why it failed).
    pub alt: Option<Result<AltTop, String>>,
}

// ---------------------------------------------------------------- app

pub struct App {
    pub cfg: Config,
    pub view: View,
    pub help: bool,
    pub quit: bool,
    /// The clock, set by the host before each update (ETA, elapsed).
    pub now: Instant,
    pub status: String,
    pub exp: ExperimentsState,
    pub runs: RunsState,
    /// Run folders under the output root.
    pub run_list: Vec<RunInfo>,
    pub results: ResultsState,
    pub compare: CompareState,
    pub model: ModelState,
}

impl App {
    pub fn new(cfg: Config) -> Self {
        App {
            cfg,
            view: View::Experiments,
            help: false,
            quit: false,
            now: Instant::now(),
            status: "? help · 1-5 views · q quit".into(),
            exp: Default::default(),
            runs: Default::default(),
            run_list: vec![],
            results: Default::default(),
            compare: Default::default(),
            model: Default::default(),
        }
    }

    /// What to do at start-up.
    pub fn init(&self) -> Vec<Command> {
        vec![Command::LoadExperiments, Command::RefreshRuns]
    }

    /// True while a text field owns the keyboard (global keys are typed instead).
    pub fn editing(&self) -> bool {
        (self.view == View::Experiments && self.exp.form.is_some()) || (self.view == View::Model && (self.model.editing || self.model.form.is_some()))
    }
}

fn up(i: &mut usize) {
    *i = i.saturating_sub(1);
}
fn down(i: &mut usize, n: usize) {
    if *i + 1 < n {
        *i += 1;
    }
}

/// True for TOML that is a valid fine-tuning or composability spec (listed by other commands).
fn is_other_spec(text: &str) -> bool {
    crate::train::spec::parse(text, &[]).is_ok() || crate::compose::parse_spec(text).is_ok()
}

pub fn update(app: &mut App, ev: Event) -> Vec<Command> {
    match ev {
        Event::Key(k) => on_key(app, k),
        Event::Resize | Event::Tick => vec![],
        Event::Experiments(files) => {
            let sel = app.exp.current().map(|e| e.path.clone());
            // Fine-tuning and composability specs share the folder but run through
            // `road finetune` / `road compose`, not the interchange-intervention runner.
            app.exp.entries = files
                .into_iter()
                .filter(|(_, t)| !t.as_ref().map(|t| is_other_spec(t)).unwrap_or(false))
                .map(|(p, t)| ExperimentEntry::new(p, t))
                .collect();
            app.exp.selected = sel.and_then(|p| app.exp.entries.iter().position(|e| e.path == p)).unwrap_or(0);
            if app.exp.entries.is_empty() {
                app.status = format!("no experiment files in {}", app.cfg.experiments_dir.display());
            }
            vec![]
        }
        Event::Runs(list) => {
            app.run_list = list;
            app.results.picker = app.results.picker.min(app.run_list.len().saturating_sub(1));
            app.compare.picker = app.compare.picker.min(app.run_list.len().saturating_sub(1));
            vec![]
        }
        Event::RunLoaded { slot, data } => on_run_loaded(app, slot, *data),
        Event::RunLoadFailed { slot, error } => {
            if slot == Slot::Results {
                app.results.loading = false;
            }
            app.status = format!("cannot open run: {error}");
            vec![]
        }
        Event::Job { id, ev } => on_job(app, id, ev),
        Event::Model(m) => on_model(app, m),
        Event::Exported(r) => {
            app.status = match r {
                Ok(p) => format!("exported {}", p.display()),
                Err(e) => format!("export failed: {e}"),
            };
            vec![]
        }
    }
}

fn on_run_loaded(app: &mut App, slot: Slot, data: RunData) -> Vec<Command> {
    match slot {
        Slot::Results => {
            let r = &mut app.results;
            let same = r.open.as_ref().map(|o| o.info.dir == data.info.dir).unwrap_or(false);
            if !same {
                r.cursor = (0, 0);
                r.site = 0;
                r.table_sel = 0;
                r.example_sel = 0;
                r.tokens = None;
            }
            r.loading = false;
            let mut cmds = vec![];
            let numeric = Grid::build(&data.metrics, &data.sites().first().cloned().unwrap_or_default(), Metric::IiaVocab).numeric_positions();
            if numeric && r.tokens.is_none() {
                if let (Some(m), Some(t)) = (&data.model, data.first_base_prompt()) {
                    cmds.push(Command::Tokenize { name: m.clone(), text: t.to_string() });
                }
            }
            app.status = format!("opened {}/{}", data.info.experiment, data.info.name());
            r.open = Some(data);
            app.view = View::Results;
            cmds
        }
        Slot::CompareA | Slot::CompareB => {
            let c = &mut app.compare;
            if slot == Slot::CompareA {
                c.a = Some(data);
            } else {
                c.b = Some(data);
            }
            if c.a.is_some() && c.b.is_some() {
                c.showing = true;
                c.cursor = (0, 0);
                c.site = 0;
            }
            vec![]
        }
    }
}

fn on_job(app: &mut App, id: u64, ev: JobEvent) -> Vec<Command> {
    let now = app.now;
    let Some(job) = app.runs.jobs.iter_mut().find(|j| j.id == id) else { return vec![] };
    match ev {
        JobEvent::Run(e) => match e {
            RunEvent::Started { run_dir, cells, steps_per_cell } => {
                job.status = JobStatus::Running;
                job.run_dir = Some(run_dir.clone());
                job.cells = cells;
                job.steps_per_cell = steps_per_cell;
                job.started = Some(now);
                job.push_log(format!("run directory: {}", run_dir.display()));
            }
            RunEvent::Log(s) => {
                if job.status == JobStatus::Queued {
                    job.status = JobStatus::Running;
                    job.started = Some(now);
                }
                job.push_log(s)
            }
            RunEvent::CellStarted { label, .. } => {
                job.cell_label = label;
                job.steps_in_cell = 0;
            }
            RunEvent::Step { cell, step, loss, .. } => {
                job.steps_in_cell = step + 1;
                let x = (cell * job.steps_per_cell + step) as f64;
                job.loss.push((x, loss));
            }
            RunEvent::Eval { cell, step, dev_iia, .. } => {
                job.dev_iia.push(((cell * job.steps_per_cell + step) as f64, dev_iia));
            }
            RunEvent::StageDone { cell, label } => {
                job.cells_done = cell + 1;
                job.steps_in_cell = 0;
                job.push_log(format!("{label}: done"));
            }
            RunEvent::CellDone { cell, label, iia, logit_diff, .. } => {
                job.cells_done = cell + 1;
                job.steps_in_cell = 0;
                job.iia.push((cell as f64, iia));
                job.push_log(format!("{label}: test IIA {iia:.3}, logit diff {logit_diff:+.3}"));
            }
            RunEvent::Finished { run_dir, complete } => {
                job.run_dir = Some(run_dir);
                job.ended = Some(now);
                if !matches!(job.status, JobStatus::Failed(_)) {
                    job.status = if complete { JobStatus::Done } else { JobStatus::Cancelled };
                }
                let msg = format!("{} {} ({} cells)", job.name, job.status.label(), job.cells_done);
                job.push_log(msg.clone());
                app.status = msg + " · Enter opens its results";
                return vec![Command::RefreshRuns];
            }
        },
        JobEvent::Failed(e) => {
            job.push_log(format!("error: {e}"));
            job.status = JobStatus::Failed(e.clone());
            job.ended = Some(now);
            app.status = format!("{} failed: {}", job.name, e.lines().next().unwrap_or(""));
            return vec![Command::RefreshRuns];
        }
        JobEvent::Skipped => {
            job.status = JobStatus::Cancelled;
            job.push_log("cancelled before it started".into());
        }
        JobEvent::Ended => {
            if job.status == JobStatus::Running {
                job.status = if job.cancel_requested { JobStatus::Cancelled } else { JobStatus::Done };
                job.ended.get_or_insert(now);
            }
        }
    }
    vec![]
}

fn on_model(app: &mut App, m: ModelMsg) -> Vec<Command> {
    let s = &mut app.model;
    match m {
        ModelMsg::Loaded(info) => {
            s.loading = false;
            s.error = None;
            s.info = Some(info);
        }
        ModelMsg::TopK { model, prompt, ids, rows, alt } => {
            s.busy = false;
            s.error = None;
            if s.name.as_deref() == Some(model.as_str()) {
                s.top = rows;
                s.top_prompt = prompt;
                s.top_ids = ids;
                s.alt = alt;
            }
        }
        ModelMsg::Tokens { text, tokens } => {
            let matches = app.results.open.as_ref().and_then(|d| d.first_base_prompt()).map(|t| t == text).unwrap_or(false);
            if matches {
                app.results.tokens = Some(tokens);
            }
        }
        ModelMsg::Error(e) => {
            s.loading = false;
            s.busy = false;
            s.error = Some(e);
        }
    }
    vec![]
}

fn on_key(app: &mut App, k: KeyEvent) -> Vec<Command> {
    let ctrl = k.modifiers.contains(KeyModifiers::CONTROL);
    if ctrl && k.code == KeyCode::Char('c') {
        app.quit = true;
        return vec![Command::Quit];
    }
    if app.help {
        app.help = false;
        return vec![];
    }
    if app.editing() {
        return match app.view {
            View::Experiments => form_key(app, k),
            _ if app.model.form.is_some() => whatif_key(app, k),
            _ => prompt_key(app, k),
        };
    }
    match k.code {
        KeyCode::Char('q') => {
            app.quit = true;
            return vec![Command::Quit];
        }
        KeyCode::Char('?') => {
            app.help = true;
            return vec![];
        }
        KeyCode::Char(c @ '1'..='5') => return switch_view(app, View::ALL[c as usize - '1' as usize]),
        KeyCode::Char('x') => return export(app),
        _ => {}
    }
    match app.view {
        View::Experiments => experiments_key(app, k),
        View::Runs => runs_key(app, k),
        View::Results => results_key(app, k),
        View::Compare => compare_key(app, k),
        View::Model => model_key(app, k),
    }
}

fn switch_view(app: &mut App, v: View) -> Vec<Command> {
    app.view = v;
    match v {
        View::Results | View::Compare => vec![Command::RefreshRuns],
        View::Model => ensure_model(app),
        _ => vec![],
    }
}

/// Ask the worker for the selected experiment's model unless it is loaded or loading.
fn ensure_model(app: &mut App) -> Vec<Command> {
    let Some(name) = app.exp.current().and_then(|e| e.spec.as_ref().ok()).map(|s| s.model.name.clone()) else {
        if app.model.name.is_none() {
            app.model.error = Some("select a valid experiment first (its model is shown here)".into());
        }
        return vec![];
    };
    if app.model.name.as_deref() == Some(name.as_str()) && (app.model.loading || app.model.info.is_some()) {
        return vec![];
    }
    let (prompt, whatif) = (std::mem::take(&mut app.model.prompt), app.model.whatif.take());
    app.model = ModelState { name: Some(name.clone()), loading: true, prompt, whatif, ..Default::default() };
    vec![Command::LoadModel { name }]
}

fn experiments_key(app: &mut App, k: KeyEvent) -> Vec<Command> {
    let n = app.exp.entries.len();
    match k.code {
        KeyCode::Up | KeyCode::Char('k') => {
            up(&mut app.exp.selected);
            app.exp.spec_scroll = 0;
        }
        KeyCode::Down | KeyCode::Char('j') => {
            down(&mut app.exp.selected, n);
            app.exp.spec_scroll = 0;
        }
        KeyCode::PageDown => app.exp.spec_scroll = app.exp.spec_scroll.saturating_add(10),
        KeyCode::PageUp => app.exp.spec_scroll = app.exp.spec_scroll.saturating_sub(10),
        KeyCode::Enter => app.exp.show_spec = !app.exp.show_spec,
        KeyCode::Esc => app.exp.show_spec = false,
        KeyCode::Char('R') => return vec![Command::LoadExperiments],
        KeyCode::Char('e') => match app.exp.current().map(|e| e.spec.clone()) {
            Some(Ok(spec)) => {
                // The spec already carries earlier edits, so the form starts from them.
                app.exp.form = Some(Form::from_spec(app.exp.selected, &spec));
            }
            Some(Err(e)) => app.status = format!("cannot edit: the file does not parse ({})", e.lines().next().unwrap_or("")),
            None => {}
        },
        KeyCode::Char('r') => return queue_selected(app),
        _ => {}
    }
    vec![]
}

fn queue_selected(app: &mut App) -> Vec<Command> {
    let Some(e) = app.exp.current() else { return vec![] };
    // A pilot study or a sweep, whichever the file is; a parse error is reported, not queued.
    let parsed: Result<(String, Box<dyn FnOnce(u64) -> Command>), String> = match &e.pilot {
        Some(p) => p.clone().map(|s| (s.name.clone(), Box::new(move |job| Command::QueuePilot { job, spec: Box::new(s) }) as Box<dyn FnOnce(u64) -> Command>)),
        None => e.spec.clone().map(|s| (s.name.clone(), Box::new(move |job| Command::QueueRun { job, spec: Box::new(s) }) as Box<dyn FnOnce(u64) -> Command>)),
    };
    let (name, command) = match parsed {
        Ok(x) => x,
        Err(err) => {
            app.status = format!("cannot run {}: {}", e.file_name(), err.lines().next().unwrap_or(""));
            return vec![];
        }
    };
    let id = app.runs.next_id;
    app.runs.next_id += 1;
    app.runs.jobs.push(Job::new(id, name.clone()));
    app.runs.selected = app.runs.jobs.len() - 1;
    app.status = format!("queued {name} (job {id})");
    app.view = View::Runs;
    vec![command(id)]
}

fn form_key(app: &mut App, k: KeyEvent) -> Vec<Command> {
    let entry_idx = app.exp.form.as_ref().map(|f| f.entry).unwrap_or(0);
    let Some(entry) = app.exp.entries.get(entry_idx).cloned() else {
        app.exp.form = None;
        return vec![];
    };
    let form = app.exp.form.as_mut().expect("editing");
    match k.code {
        KeyCode::Esc => {
            app.exp.form = None;
            app.status = "edit discarded".into();
            return vec![];
        }
        KeyCode::Up | KeyCode::BackTab => up(&mut form.focus),
        KeyCode::Down | KeyCode::Tab => down(&mut form.focus, form.fields.len()),
        KeyCode::Backspace => {
            form.fields[form.focus].value.pop();
        }
        KeyCode::Char(c) => form.fields[form.focus].value.push(c),
        KeyCode::Enter => {
            if let Some(overrides) = form.validate(&entry) {
                let e = &mut app.exp.entries[entry_idx];
                e.spec = e.resolve(&overrides);
                e.overrides = overrides;
                app.exp.form = None;
                app.exp.show_spec = true;
                app.status = "edits applied (r runs the edited spec; the file is unchanged)".into();
            }
            return vec![];
        }
        _ => return vec![],
    }
    form.validate(&entry);
    vec![]
}

fn prompt_key(app: &mut App, k: KeyEvent) -> Vec<Command> {
    let s = &mut app.model;
    match k.code {
        KeyCode::Esc => s.editing = false,
        KeyCode::Backspace => {
            s.prompt.pop();
        }
        KeyCode::Char(c) => s.prompt.push(c),
        KeyCode::Enter => {
            s.editing = false;
            return top_k(s);
        }
        _ => {}
    }
    vec![]
}

/// Ask the worker for the prompt's top-10, with the what-if when one is set.
fn top_k(s: &mut ModelState) -> Vec<Command> {
    match s.name.clone() {
        Some(name) if !s.prompt.is_empty() => {
            s.busy = true;
            vec![Command::TopK { name, prompt: s.prompt.clone(), k: 10, whatif: s.whatif.clone() }]
        }
        _ => vec![],
    }
}

fn whatif_key(app: &mut App, k: KeyEvent) -> Vec<Command> {
    let s = &mut app.model;
    let layers = s.info.as_ref().map(|i| i.layers);
    let Some(form) = s.form.as_mut() else { return vec![] };
    match form.key(k, layers) {
        FormAction::Stay => vec![],
        FormAction::Cancel => {
            s.form = None;
            app.status = "what-if unchanged".into();
            vec![]
        }
        FormAction::Apply(w) => {
            s.form = None;
            app.status = format!("what-if: {}", w.label());
            s.whatif = Some(w);
            top_k(s)
        }
    }
}

fn model_key(app: &mut App, k: KeyEvent) -> Vec<Command> {
    match k.code {
        KeyCode::Char('i') | KeyCode::Char('/') | KeyCode::Enter => app.model.editing = true,
        KeyCode::Char('w') => app.model.form = Some(whatif::Form::new(app.model.whatif.as_ref())),
        KeyCode::Char('c') if app.model.whatif.is_some() => {
            app.model.whatif = None;
            app.model.alt = None;
            app.status = "what-if cleared".into();
        }
        KeyCode::Char('l') => {
            app.model.info = None;
            app.model.name = None;
            return ensure_model(app);
        }
        _ => {}
    }
    vec![]
}

fn runs_key(app: &mut App, k: KeyEvent) -> Vec<Command> {
    let n = app.runs.jobs.len();
    match k.code {
        KeyCode::Up | KeyCode::Char('k') => up(&mut app.runs.selected),
        KeyCode::Down | KeyCode::Char('j') => down(&mut app.runs.selected, n),
        KeyCode::Char('c') => {
            if let Some(j) = app.runs.jobs.get_mut(app.runs.selected) {
                match j.status {
                    JobStatus::Queued | JobStatus::Running => {
                        j.cancel_requested = true;
                        app.status = format!("cancelling {} (job {})", j.name, j.id);
                        return vec![Command::CancelRun { job: j.id }];
                    }
                    _ => app.status = "that run is not running".into(),
                }
            }
        }
        KeyCode::Enter => {
            if let Some(dir) = app.runs.jobs.get(app.runs.selected).and_then(|j| j.run_dir.clone()) {
                app.results.loading = true;
                return vec![Command::OpenRun { dir, slot: Slot::Results }];
            }
            app.status = "this run has no output folder yet".into();
        }
        _ => {}
    }
    vec![]
}

fn results_key(app: &mut App, k: KeyEvent) -> Vec<Command> {
    let r = &mut app.results;
    let Some(data) = &r.open else {
        // The run picker.
        match k.code {
            KeyCode::Up | KeyCode::Char('k') => up(&mut r.picker),
            KeyCode::Down | KeyCode::Char('j') => down(&mut r.picker, app.run_list.len()),
            KeyCode::Char('R') => return vec![Command::RefreshRuns],
            KeyCode::Enter => {
                if let Some(info) = app.run_list.get(r.picker) {
                    r.loading = true;
                    return vec![Command::OpenRun { dir: info.dir.clone(), slot: Slot::Results }];
                }
            }
            _ => {}
        }
        return vec![];
    };
    let n_sites = data.sites().len().max(1);
    let n_examples = r.cursor_cell().map(|(l, p)| data.examples_for(l, &r.site_name().unwrap_or_default(), &p).len()).unwrap_or(0);
    let n_table = data.metrics.iter().filter(|m| m.split == "test" && m.is_main()).count();
    let (rows, cols) = r.grid().map(|g| (g.layers.len(), g.positions.len())).unwrap_or((0, 0));
    match k.code {
        KeyCode::Esc | KeyCode::Backspace => {
            if r.panel != Panel::Heatmap {
                r.panel = Panel::Heatmap;
            } else {
                r.open = None;
                return vec![Command::RefreshRuns];
            }
        }
        KeyCode::Tab => r.metric = r.metric.next(),
        KeyCode::BackTab => {
            r.site = (r.site + 1) % n_sites;
            r.example_sel = 0;
        }
        KeyCode::Char('h') => r.panel = Panel::Heatmap,
        KeyCode::Char('t') => r.panel = Panel::Table,
        KeyCode::Char('d') => {
            r.panel = Panel::Examples;
            r.example_sel = 0;
        }
        KeyCode::Char('s') => {
            r.sort_col = (r.sort_col + 1) % data::TABLE_COLUMNS.len();
            r.table_sel = 0;
        }
        KeyCode::Char('o') => r.sort_desc = !r.sort_desc,
        KeyCode::Char('R') => {
            let dir = data.info.dir.clone();
            return vec![Command::OpenRun { dir, slot: Slot::Results }];
        }
        KeyCode::Enter if r.panel == Panel::Heatmap => {
            r.panel = Panel::Examples;
            r.example_sel = 0;
        }
        KeyCode::Enter if r.panel == Panel::Table => {
            // Jump to the selected cell in the heatmap.
            let picked = data::sorted_cells(&data.metrics, r.sort_col, r.sort_desc).get(r.table_sel).map(|m| (*m).clone());
            if let Some(m) = picked {
                if let Some(si) = data.sites().iter().position(|s| *s == data::site_key(&m.site, &m.heads)) {
                    r.site = si;
                }
                if let Some(g) = r.grid() {
                    let row = g.layers.iter().position(|l| *l == m.layer).unwrap_or(0);
                    let col = g.positions.iter().position(|p| *p == m.position).unwrap_or(0);
                    r.cursor = (row, col);
                }
                r.panel = Panel::Heatmap;
            }
        }
        code => match (r.panel, code) {
            (Panel::Heatmap, KeyCode::Up | KeyCode::Char('k')) => up(&mut r.cursor.0),
            (Panel::Heatmap, KeyCode::Down | KeyCode::Char('j')) => down(&mut r.cursor.0, rows),
            (Panel::Heatmap, KeyCode::Left) => up(&mut r.cursor.1),
            (Panel::Heatmap, KeyCode::Right) => down(&mut r.cursor.1, cols),
            (Panel::Table, KeyCode::Up | KeyCode::Char('k')) => up(&mut r.table_sel),
            (Panel::Table, KeyCode::Down | KeyCode::Char('j')) => down(&mut r.table_sel, n_table),
            (Panel::Table, KeyCode::PageDown) => r.table_sel = (r.table_sel + 10).min(n_table.saturating_sub(1)),
            (Panel::Table, KeyCode::PageUp) => r.table_sel = r.table_sel.saturating_sub(10),
            (Panel::Examples, KeyCode::Up | KeyCode::Char('k')) => up(&mut r.example_sel),
            (Panel::Examples, KeyCode::Down | KeyCode::Char('j')) => down(&mut r.example_sel, n_examples),
            // In drill-down, arrows left/right walk positions so neighbouring cells are one key away.
            (Panel::Examples, KeyCode::Left) => {
                up(&mut r.cursor.1);
                r.example_sel = 0;
            }
            (Panel::Examples, KeyCode::Right) => {
                down(&mut r.cursor.1, cols);
                r.example_sel = 0;
            }
            _ => {}
        },
    }
    // Keep the cursor inside the (possibly smaller) grid of the new metric/site.
    if let Some(g) = r.grid() {
        r.cursor.0 = r.cursor.0.min(g.layers.len().saturating_sub(1));
        r.cursor.1 = r.cursor.1.min(g.positions.len().saturating_sub(1));
    }
    vec![]
}

fn compare_key(app: &mut App, k: KeyEvent) -> Vec<Command> {
    let c = &mut app.compare;
    if c.showing {
        let (rows, cols) = c.grids().map(|(_, _, d)| (d.layers.len(), d.positions.len())).unwrap_or((0, 0));
        let n_sites = c.sites().len().max(1);
        match k.code {
            KeyCode::Esc | KeyCode::Backspace => c.showing = false,
            KeyCode::Tab => c.metric = c.metric.next(),
            KeyCode::BackTab => c.site = (c.site + 1) % n_sites,
            KeyCode::Up | KeyCode::Char('k') => up(&mut c.cursor.0),
            KeyCode::Down | KeyCode::Char('j') => down(&mut c.cursor.0, rows),
            KeyCode::Left => up(&mut c.cursor.1),
            KeyCode::Right => down(&mut c.cursor.1, cols),
            _ => {}
        }
        return vec![];
    }
    match k.code {
        KeyCode::Up | KeyCode::Char('k') => up(&mut c.picker),
        KeyCode::Down | KeyCode::Char('j') => down(&mut c.picker, app.run_list.len()),
        KeyCode::Char(' ') | KeyCode::Char('m') => {
            if let Some(info) = app.run_list.get(c.picker) {
                if let Some(i) = c.marked.iter().position(|d| *d == info.dir) {
                    c.marked.remove(i);
                } else {
                    if c.marked.len() == 2 {
                        c.marked.remove(0);
                    }
                    c.marked.push(info.dir.clone());
                }
            }
        }
        KeyCode::Enter => {
            if c.marked.len() == 2 {
                c.a = None;
                c.b = None;
                return vec![
                    Command::OpenRun { dir: c.marked[0].clone(), slot: Slot::CompareA },
                    Command::OpenRun { dir: c.marked[1].clone(), slot: Slot::CompareB },
                ];
            }
            app.status = "mark two runs with Space first (A, then B)".into();
        }
        KeyCode::Char('R') => return vec![Command::RefreshRuns],
        _ => {}
    }
    vec![]
}

/// `x`: the current view's data as CSV, into the run folder when there is one.
fn export(app: &mut App) -> Vec<Command> {
    let out = |dir: &std::path::Path, name: &str, csv: String| vec![Command::Export { path: dir.join(format!("tui-export-{name}.csv")), csv }];
    match app.view {
        View::Experiments => {
            let mut rows = vec![["file", "name", "intervention", "model", "task", "overrides", "error"].map(String::from).to_vec()];
            for e in &app.exp.entries {
                let (n, k, m, t, err) = match &e.spec {
                    Ok(s) => (s.name.clone(), s.intervention.kind_name().to_string(), s.model.name.clone(), s.task.name.clone(), String::new()),
                    Err(x) => (String::new(), String::new(), String::new(), String::new(), x.lines().next().unwrap_or("").to_string()),
                };
                rows.push(vec![e.file_name(), n, k, m, t, e.overrides.join(" "), err]);
            }
            out(&app.cfg.out_root, "experiments", data::csv_string(&rows))
        }
        View::Runs => {
            let Some(j) = app.runs.jobs.get(app.runs.selected) else { return vec![] };
            let Some(dir) = &j.run_dir else {
                app.status = "this run has no output folder yet".into();
                return vec![];
            };
            let mut rows = vec![vec!["series".to_string(), "x".into(), "y".into()]];
            rows.extend(j.loss.iter().map(|(x, y)| vec!["loss".into(), x.to_string(), y.to_string()]));
            rows.extend(j.iia.iter().map(|(x, y)| vec!["iia".into(), x.to_string(), y.to_string()]));
            out(dir, "run", data::csv_string(&rows))
        }
        View::Results => {
            let r = &app.results;
            let Some(d) = &r.open else {
                app.status = "open a run first".into();
                return vec![];
            };
            let dir = d.info.dir.clone();
            match r.panel {
                Panel::Heatmap => {
                    let g = r.grid().unwrap_or_default();
                    let site = r.site_name().unwrap_or_default();
                    out(&dir, &format!("heatmap-{}-{site}", r.metric.name()), g.to_csv(r.metric.name()))
                }
                Panel::Table => {
                    let mut rows = vec![data::TABLE_COLUMNS.map(String::from).to_vec()];
                    rows.extend(data::sorted_cells(&d.metrics, r.sort_col, r.sort_desc).iter().map(|m| data::table_row(m).to_vec()));
                    out(&dir, "table", data::csv_string(&rows))
                }
                Panel::Examples => {
                    let Some((l, p)) = r.cursor_cell() else { return vec![] };
                    let site = r.site_name().unwrap_or_default();
                    let mut rows = vec![["layer", "site", "position", "example", "base", "source", "expected", "predicted", "correct", "logit_diff"]
                        .map(String::from)
                        .to_vec()];
                    for e in d.examples_for(l, &site, &p) {
                        rows.push(vec![
                            e.layer.to_string(),
                            e.site.clone(),
                            e.position.clone(),
                            e.example.to_string(),
                            e.base.clone(),
                            e.source.clone(),
                            e.cf_label.clone(),
                            e.predicted.clone(),
                            e.correct.to_string(),
                            e.logit_diff.to_string(),
                        ]);
                    }
                    out(&dir, "examples", data::csv_string(&rows))
                }
            }
        }
        View::Compare => {
            let c = &app.compare;
            let (Some((ga, gb, gd)), Some(b)) = (c.grids(), &c.b) else {
                app.status = "compare two runs first".into();
                return vec![];
            };
            let mut rows = vec![["layer", "position", "a", "b", "b_minus_a"].map(String::from).to_vec()];
            for (li, l) in gd.layers.iter().enumerate() {
                for (pi, p) in gd.positions.iter().enumerate() {
                    let find = |g: &Grid| {
                        let r = g.layers.iter().position(|x| x == l)?;
                        let c = g.positions.iter().position(|x| x == p)?;
                        g.get(r, c)
                    };
                    let f = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_default();
                    rows.push(vec![l.to_string(), p.clone(), f(find(&ga)), f(find(&gb)), f(gd.get(li, pi))]);
                }
            }
            out(&b.info.dir, "compare", data::csv_string(&rows))
        }
        View::Model => {
            if app.model.top.is_empty() {
                app.status = "nothing to export: run a prompt first".into();
                return vec![];
            }
            let mut rows = vec![["rank", "id", "token", "logit", "prob"].map(String::from).to_vec()];
            for (i, t) in app.model.top.iter().enumerate() {
                rows.push(vec![(i + 1).to_string(), t.id.to_string(), t.token.clone(), t.logit.to_string(), t.prob.to_string()]);
            }
            out(&app.cfg.out_root, "model", data::csv_string(&rows))
        }
    }
}

/// Every key, for `?` (the help overlay draws this list; it fits 80×24).
pub const HELP: &[(&str, &str)] = &[
    ("1-5", "views: Experiments Runs Results Compare Model"),
    ("? / q, Ctrl-C", "this help / quit (cancels runs, restores terminal)"),
    ("x", "export the current view as CSV (into the run folder)"),
    ("↑↓ / j k", "move the selection"),
    ("Experiments", ""),
    ("Enter / e", "show spec / edit layers positions kind rank steps lr seed"),
    ("  in the form", "Tab ↑↓ field · Enter apply (as --set) · Esc discard"),
    ("r / R", "queue a run of the selection / reload the files"),
    ("Runs", ""),
    ("c / Enter", "cancel the selected run (keeps partial results) / results"),
    ("Results", ""),
    ("Enter / Esc", "open a run; on a cell: its examples / back"),
    ("← → ↑ ↓", "move the heatmap cursor"),
    ("Tab / S-Tab", "next metric / next site"),
    ("h t d", "heatmap · sortable table · per-example drill-down"),
    ("s / o", "table: next sort column / reverse the order"),
    ("Compare", ""),
    ("Space / Enter", "mark runs A and B / compare (Tab, S-Tab, arrows)"),
    ("Model", ""),
    ("i, Enter / l", "type a prompt → top-10 next tokens / reload model"),
    ("w / c", "what-if: intervene (zero, mean, swap, adapter) / clear"),
];
