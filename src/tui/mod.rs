//! `road tui`: the terminal workbench. State and `update` live in [`app`], drawing in [`ui`],
//! long work (runs, model loading, top-k) in [`worker`] threads; [`event`] merges terminal input
//! and worker messages into one channel. [`Host`] carries out the commands `update` returns.
pub mod app;
pub mod data;
pub mod event;
pub mod ui;
pub mod whatif;
pub mod worker;

use anyhow::Result;
use app::{App, Command, Config};
use event::{Event, Slot};
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::{cursor, execute, terminal};
use ratatui::Terminal;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};
use worker::{ModelJob, Worker};

/// Carries out [`Command`]s: quick file reads inline (their results come back as events),
/// everything slow through the worker threads.
pub struct Host {
    pub worker: Worker,
    pub tx: Sender<Event>,
    pub cfg: Config,
}

impl Host {
    /// A host with its worker threads; worker messages arrive on the returned receiver.
    pub fn new(cfg: Config) -> (Host, Receiver<Event>) {
        let (tx, rx) = channel();
        (Host { worker: Worker::spawn(tx.clone()), tx, cfg }, rx)
    }

    /// Run one command; immediate results are returned as events to feed back into `update`.
    pub fn exec(&mut self, cmd: Command) -> Vec<Event> {
        match cmd {
            Command::LoadExperiments => vec![Event::Experiments(read_experiments(&self.cfg.experiments_dir))],
            Command::RefreshRuns => vec![Event::Runs(data::scan_runs(&self.cfg.out_root))],
            Command::OpenRun { dir, slot } => vec![open_run(&dir, slot)],
            Command::QueueRun { job, spec } => {
                self.worker.queue(job, worker::JobSpec::Sweep(*spec));
                vec![]
            }
            Command::QueuePilot { job, spec } => {
                self.worker.queue(job, worker::JobSpec::Pilot(*spec));
                vec![]
            }
            Command::CancelRun { job } => {
                self.worker.cancel(job);
                vec![]
            }
            Command::LoadModel { name } => {
                self.worker.model(ModelJob::Load { name });
                vec![]
            }
            Command::TopK { name, prompt, k, whatif } => {
                self.worker.model(ModelJob::TopK { name, prompt, k, whatif });
                vec![]
            }
            Command::Tokenize { name, text } => {
                self.worker.model(ModelJob::Tokenize { name, text });
                vec![]
            }
            Command::Export { path, csv } => vec![Event::Exported(std::fs::write(&path, csv).map(|_| path.clone()).map_err(|e| format!("{}: {e}", path.display())))],
            Command::Quit => {
                self.worker.cancel_all();
                vec![]
            }
        }
    }
}

/// `update`, then every command it returns, feeding immediate results back in.
pub fn dispatch(app: &mut App, host: &mut Host, ev: Event) {
    let mut pending = vec![ev];
    while let Some(ev) = pending.pop() {
        for cmd in app::update(app, ev) {
            pending.extend(host.exec(cmd));
        }
    }
}

pub fn open_run(dir: &std::path::Path, slot: Slot) -> Event {
    match data::RunData::load(dir) {
        Ok(d) => Event::RunLoaded { slot, data: Box::new(d) },
        Err(e) => Event::RunLoadFailed { slot, error: format!("{e:#}") },
    }
}

/// `experiments/*.toml`, sorted by file name.
pub fn read_experiments(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Result<String, String>)> {
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "toml")).collect())
        .unwrap_or_default();
    files.sort();
    files.into_iter().map(|p| (p.clone(), std::fs::read_to_string(&p).map_err(|e| e.to_string()))).collect()
}

fn restore_terminal() {
    let _ = terminal::disable_raw_mode();
    let _ = execute!(std::io::stdout(), terminal::LeaveAlternateScreen, cursor::Show);
    let _ = std::io::stdout().flush();
}

/// Open the workbench; the terminal is restored on quit, on error and on panic.
pub fn run_tui() -> Result<()> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() || !std::io::stdout().is_terminal() {
        anyhow::bail!("the workbench needs an interactive terminal; `road --help` lists the headless commands");
    }
    // Panics on the UI thread restore the terminal before the message is printed. Worker
    // threads catch their own panics and report them as failed jobs, so printing them here
    // would only scribble over the screen.
    let ui_thread = std::thread::current().id();
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().id() == ui_thread {
            restore_terminal();
            prev(info);
        }
    }));
    terminal::enable_raw_mode()?;
    if let Err(e) = execute!(std::io::stdout(), terminal::EnterAlternateScreen, cursor::Hide) {
        restore_terminal();
        return Err(e.into());
    }
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(main_loop));
    restore_terminal();
    match result {
        Ok(r) => r,
        Err(_) => anyhow::bail!("the workbench panicked (terminal restored; the message is above)"),
    }
}

fn main_loop() -> Result<()> {
    let cfg = Config::from_env();
    let (mut host, rx) = Host::new(cfg.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let input = event::spawn_input(host.tx.clone(), stop.clone());
    let mut term = Terminal::new(CrosstermBackend::new(std::io::stdout()))?;
    term.clear()?;
    let mut app = App::new(cfg);
    for c in app.init() {
        for ev in host.exec(c) {
            dispatch(&mut app, &mut host, ev);
        }
    }
    let result = (|| -> Result<()> {
        loop {
            term.draw(|f| ui::draw(&app, f))?;
            // Wake at least every 100 ms for the clock (ETA), then drain everything queued so
            // bursts of training steps cost one redraw.
            let first = match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(ev) => ev,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Event::Tick,
                Err(e) => return Err(e.into()),
            };
            let deadline = Instant::now() + Duration::from_millis(30);
            let mut ev = Some(first);
            while let Some(e) = ev {
                app.now = Instant::now();
                dispatch(&mut app, &mut host, e);
                if app.quit || Instant::now() > deadline {
                    break;
                }
                ev = rx.try_recv().ok();
            }
            if app.quit {
                return Ok(());
            }
        }
    })();
    host.worker.cancel_all();
    stop.store(true, Ordering::Relaxed);
    let _ = input.join();
    result
}
