//! One channel for everything the UI reacts to: terminal input (a thread polling with a short
//! timeout), worker progress, and results of file reads.
use super::data::{RunData, RunInfo};
use crate::experiment::RunEvent;
use ratatui::crossterm::event::{self as ct, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

/// Which pane a loaded run is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Results,
    CompareA,
    CompareB,
}

#[derive(Debug, Clone)]
pub enum JobEvent {
    Run(RunEvent),
    /// The runner returned an error (the message is also in the run's error.txt).
    Failed(String),
    /// Cancelled while still queued: never started.
    Skipped,
    /// The runner returned (successfully or not).
    Ended,
}

#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub source: String,
    pub format: String,
    pub layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub params: usize,
    pub context: usize,
    pub tied: bool,
}

#[derive(Debug, Clone)]
pub struct TopRow {
    pub id: u32,
    pub token: String,
    pub logit: f32,
    pub prob: f64,
}

/// A top-k row under a what-if, with where that token stood in the clean run.
#[derive(Debug, Clone)]
pub struct AltRow {
    pub row: TopRow,
    pub clean_prob: f64,
    /// 1-based rank in the clean distribution.
    pub clean_rank: usize,
}

/// The intervened side of a what-if.
#[derive(Debug, Clone)]
pub struct AltTop {
    pub label: String,
    pub rows: Vec<AltRow>,
    /// KL(clean ‖ what-if) over the whole vocabulary, in nats.
    pub kl: f64,
}

#[derive(Debug, Clone)]
pub enum ModelMsg {
    Loaded(ModelInfo),
    /// Clean top-k, plus the what-if's (or the error that stopped it) when one was applied.
    TopK { model: String, prompt: String, ids: Vec<u32>, rows: Vec<TopRow>, alt: Option<Result<AltTop, String>> },
    /// Token strings of `text` (position labels of a results heatmap).
    Tokens { text: String, tokens: Vec<String> },
    Error(String),
}

#[derive(Debug, Clone)]
pub enum Event {
    Key(KeyEvent),
    Resize,
    Tick,
    /// Experiment files: (path, contents or read error).
    Experiments(Vec<(PathBuf, Result<String, String>)>),
    Runs(Vec<RunInfo>),
    RunLoaded { slot: Slot, data: Box<RunData> },
    RunLoadFailed { slot: Slot, error: String },
    Job { id: u64, ev: JobEvent },
    Model(ModelMsg),
    Exported(Result<PathBuf, String>),
}

/// A key press as an event (tests and the input thread).
pub fn key(code: KeyCode) -> Event {
    Event::Key(KeyEvent::new(code, KeyModifiers::NONE))
}

pub fn char_key(c: char) -> Event {
    key(KeyCode::Char(c))
}

/// Forward terminal input into `tx` until `stop` is set. Polls with a 50 ms timeout, so input
/// is answered promptly and the thread notices `stop` quickly.
pub fn spawn_input(tx: Sender<Event>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match ct::poll(Duration::from_millis(50)) {
                Ok(true) => {
                    let ev = match ct::read() {
                        Ok(ct::Event::Key(k)) if k.kind != KeyEventKind::Release => Event::Key(k),
                        Ok(ct::Event::Resize(..)) => Event::Resize,
                        Ok(_) => continue,
                        Err(_) => break,
                    };
                    if tx.send(ev).is_err() {
                        break;
                    }
                }
                Ok(false) => {}
                Err(_) => break,
            }
        }
    })
}
