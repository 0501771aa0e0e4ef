//! Workbench state and the one function that changes it: `update(&mut App, Event) -> Vec<Command>`.
//! No terminal, no threads, no file system here: side effects are returned as [`Command`]s.
//! Each view's state, keys and CSV export live in `app/<view>.rs` (mirroring `ui/<view>.rs`);
//! this file routes events and global keys to them.
mod compare;
mod experiments;
mod model;
mod results;
mod runs;

pub use compare::CompareState;
pub use experiments::{ExperimentEntry, ExperimentsState, Form, FormField, FORM_LABELS};
pub use model::ModelState;
pub use results::{Panel, ResultsState};
pub use runs::{Job, JobStatus, RunsState};

use super::data::RunInfo;
use super::event::{Event, Slot};
use super::whatif::WhatIf;
use crate::experiment::Spec;
use crate::pilot::PilotSpec;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use std::path::{Path, PathBuf};
use std::time::Instant;

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

pub fn update(app: &mut App, ev: Event) -> Vec<Command> {
    match ev {
        Event::Key(k) => on_key(app, k),
        Event::Resize | Event::Tick => vec![],
        Event::Experiments(files) => experiments::on_files(app, files),
        Event::Runs(list) => {
            app.run_list = list;
            app.results.picker = app.results.picker.min(app.run_list.len().saturating_sub(1));
            app.compare.picker = app.compare.picker.min(app.run_list.len().saturating_sub(1));
            vec![]
        }
        Event::RunLoaded { slot: Slot::Results, data } => results::on_loaded(app, *data),
        Event::RunLoaded { slot, data } => compare::on_loaded(app, slot, *data),
        Event::RunLoadFailed { slot, error } => {
            if slot == Slot::Results {
                app.results.loading = false;
            }
            app.status = format!("cannot open run: {error}");
            vec![]
        }
        Event::Job { id, ev } => runs::on_job(app, id, ev),
        Event::Model(m) => model::on_model(app, m),
        Event::Exported(r) => {
            app.status = match r {
                Ok(p) => format!("exported {}", p.display()),
                Err(e) => format!("export failed: {e}"),
            };
            vec![]
        }
    }
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
            View::Experiments => experiments::form_key(app, k),
            _ if app.model.form.is_some() => model::whatif_key(app, k),
            _ => model::prompt_key(app, k),
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
        View::Experiments => experiments::key(app, k),
        View::Runs => runs::key(app, k),
        View::Results => results::key(app, k),
        View::Compare => compare::key(app, k),
        View::Model => model::key(app, k),
    }
}

fn switch_view(app: &mut App, v: View) -> Vec<Command> {
    app.view = v;
    match v {
        View::Results | View::Compare => vec![Command::RefreshRuns],
        View::Model => model::ensure_model(app),
        _ => vec![],
    }
}

/// `x`: the current view's data as CSV, into the run folder when there is one.
fn export(app: &mut App) -> Vec<Command> {
    match app.view {
        View::Experiments => experiments::export(app),
        View::Runs => runs::export(app),
        View::Results => results::export(app),
        View::Compare => compare::export(app),
        View::Model => model::export(app),
    }
}

/// The export command for `csv` as `tui-export-<name>.csv` in `dir`.
fn csv_export(dir: &Path, name: &str, csv: String) -> Vec<Command> {
    vec![Command::Export { path: dir.join(format!("tui-export-{name}.csv")), csv }]
}
