//! What a running experiment reports. The headless CLI prints these (progress bar); the TUI
//! renders them. The runner never knows who listens.
use std::path::PathBuf;

#[derive(Debug, Clone)]
pub enum RunEvent {
    Started { run_dir: PathBuf, cells: usize, steps_per_cell: usize },
    Log(String),
    CellStarted { cell: usize, label: String },
    Step { cell: usize, step: usize, steps: usize, loss: f64 },
    /// A training evaluation point (`train.eval_every`): dev IIA and loss of the cell so far.
    Eval { cell: usize, step: usize, dev_iia: f64, dev_loss: f64 },
    /// One finished cell with its test-split IIA (vocabulary argmax) and logit difference.
    CellDone { cell: usize, label: String, layer: usize, site: String, position: String, iia: f64, logit_diff: f64 },
    /// A stage of a multi-stage study (the pilot) finished; no metrics attached.
    StageDone { cell: usize, label: String },
    Finished { run_dir: PathBuf, complete: bool },
}

/// Where events go: a channel (TUI), a progress printer (CLI), or nowhere (tests).
pub trait Sink: Send {
    fn send(&mut self, e: RunEvent);
}

impl Sink for std::sync::mpsc::Sender<RunEvent> {
    fn send(&mut self, e: RunEvent) {
        // A closed receiver (UI gone) must not stop the run.
        let _ = std::sync::mpsc::Sender::send(self, e);
    }
}

/// Discards events.
pub struct Silent;
impl Sink for Silent {
    fn send(&mut self, _: RunEvent) {}
}

/// Terminal progress for headless runs: one bar over all cells' steps, plus log lines.
pub struct ProgressPrinter {
    bar: Option<indicatif::ProgressBar>,
    quiet: bool,
}

impl ProgressPrinter {
    pub fn new(quiet: bool) -> Self {
        Self { bar: None, quiet }
    }
    /// A line above the bar; printed plainly when the bar is hidden (stderr not a terminal).
    fn line(&self, s: String) {
        match &self.bar {
            Some(b) if !b.is_hidden() => b.println(s),
            _ if !self.quiet => eprintln!("{s}"),
            _ => {}
        }
    }
}

impl Sink for ProgressPrinter {
    fn send(&mut self, e: RunEvent) {
        match e {
            RunEvent::Started { run_dir, cells, steps_per_cell } => {
                let total = (cells * steps_per_cell.max(1)) as u64;
                let bar = if self.quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(total) };
                bar.set_style(
                    indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  ETA {eta}  {msg}")
                        .expect("valid template"),
                );
                self.bar = Some(bar);
                self.line(format!("run directory: {}", run_dir.display()));
            }
            RunEvent::Log(s) => self.line(s),
            RunEvent::CellStarted { label, .. } => {
                if let Some(b) = &self.bar {
                    b.set_message(label);
                }
            }
            RunEvent::Step { loss, .. } => {
                if let Some(b) = &self.bar {
                    b.inc(1);
                    let msg = b.message();
                    let cell = msg.split("  loss").next().unwrap_or("").to_string();
                    b.set_message(format!("{cell}  loss {loss:.4}"));
                }
            }
            RunEvent::CellDone { label, iia, logit_diff, .. } => {
                self.line(format!("  {label:<40} test IIA {iia:.3}  logit diff {logit_diff:+.3}"));
            }
            RunEvent::StageDone { label, .. } => self.line(format!("  {label}: done")),
            RunEvent::Eval { .. } => {}
            RunEvent::Finished { .. } => {
                if let Some(b) = self.bar.take() {
                    b.finish_and_clear();
                }
            }
        }
    }
}
