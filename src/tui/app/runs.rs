//! The Runs view's state and keys: queued and running jobs, fed by the runner's progress events
//! (steps, losses, finished cells), with cancel and open-results.
use super::{csv_export, down, up, App, Command};
use crate::experiment::RunEvent;
use crate::tui::data;
use crate::tui::event::{JobEvent, Slot};
use ratatui::crossterm::event::{KeyCode, KeyEvent};
use std::path::PathBuf;
use std::time::{Duration, Instant};

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
    pub(super) fn new(id: u64, name: String) -> Self {
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

pub(super) fn on_job(app: &mut App, id: u64, ev: JobEvent) -> Vec<Command> {
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

pub(super) fn key(app: &mut App, k: KeyEvent) -> Vec<Command> {
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

/// `x` on Runs: the selected job's loss and IIA series, into its run folder.
pub(super) fn export(app: &mut App) -> Vec<Command> {
    let Some(j) = app.runs.jobs.get(app.runs.selected) else { return vec![] };
    let Some(dir) = &j.run_dir else {
        app.status = "this run has no output folder yet".into();
        return vec![];
    };
    let mut rows = vec![vec!["series".to_string(), "x".into(), "y".into()]];
    rows.extend(j.loss.iter().map(|(x, y)| vec!["loss".into(), x.to_string(), y.to_string()]));
    rows.extend(j.iia.iter().map(|(x, y)| vec!["iia".into(), x.to_string(), y.to_string()]));
    csv_export(dir, "run", data::csv_string(&rows))
}
