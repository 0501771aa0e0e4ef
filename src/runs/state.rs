//! A run folder's life, in marker files: `RUNNING` (pid and host) from the start, removed at a
//! clean end; `summary.json` with `"complete": true` when every cell finished; `INCOMPLETE` (why)
//! when cancelled or interrupted by a signal; `error.txt` when it failed. A `RUNNING` whose
//! process is gone (kill -9, power loss) reads as crashed. The TUI and `merge-runs` read status
//! from here, never from the absence of a file alone.
use anyhow::{Context, Result};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    Running,
    Complete,
    Incomplete,
    Crashed,
    Failed,
}

impl RunStatus {
    pub fn label(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Complete => "complete",
            RunStatus::Incomplete => "incomplete",
            RunStatus::Crashed => "crashed",
            RunStatus::Failed => "failed",
        }
    }
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// Write `RUNNING` with this process's pid and host (and clear an old INCOMPLETE: a resumed run
/// is running again).
pub fn mark_running(dir: &Path) -> Result<()> {
    let _ = std::fs::remove_file(dir.join("INCOMPLETE"));
    let _ = std::fs::remove_file(dir.join("error.txt"));
    let mut marker = format!("pid {}\nhost {}\n", std::process::id(), host());
    if let Some(job) = slurm_job() {
        marker.push_str(&format!("slurm_job {job}\n"));
    }
    super::atomic::write(&dir.join("RUNNING"), marker.as_bytes())
        .with_context(|| format!("cannot mark {} as running", dir.display()))
}

/// The run ended (any way): no longer running.
pub fn clear_running(dir: &Path) {
    let _ = std::fs::remove_file(dir.join("RUNNING"));
}

/// Cancelled or interrupted: say why, so the folder is never mistaken for a finished run.
pub fn mark_incomplete(dir: &Path, why: &str) -> Result<()> {
    super::atomic::write(&dir.join("INCOMPLETE"), format!("{why}\n").as_bytes())
}

/// This process's Slurm job (an array task has its own id, kept when it is requeued).
fn slurm_job() -> Option<String> {
    std::env::var("SLURM_JOB_ID").ok().filter(|v| !v.is_empty())
}

/// Whether the process named in a RUNNING file is alive (same host: /proc/<pid> exists).
fn alive(running: &str) -> bool {
    let field = |k: &str| running.lines().find_map(|l| l.strip_prefix(k)).map(|v| v.trim().to_string());
    if field("slurm_job ").is_some_and(|j| Some(j) == slurm_job()) {
        // Our own Slurm job wrote it before it was pre-empted or requeued, perhaps on another
        // node: Slurm never runs two instances of one job, so that writer is gone.
        return false;
    }
    let (Some(pid), h) = (field("pid "), field("host ")) else { return false };
    if h.is_some_and(|h| h != host()) {
        // Another machine's run (a shared file system): trust the marker.
        return true;
    }
    Path::new("/proc").join(pid).exists()
}

pub fn status(dir: &Path) -> RunStatus {
    if let Ok(r) = std::fs::read_to_string(dir.join("RUNNING")) {
        return if alive(&r) { RunStatus::Running } else { RunStatus::Crashed };
    }
    if dir.join("error.txt").exists() {
        return RunStatus::Failed;
    }
    if dir.join("INCOMPLETE").exists() {
        return RunStatus::Incomplete;
    }
    let complete = std::fs::read_to_string(dir.join("summary.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v.get("complete").and_then(|c| c.as_bool()));
    match complete {
        Some(true) => RunStatus::Complete,
        Some(false) => RunStatus::Incomplete,
        // Older runs and fine-tunes/pilot studies without the flag: complete unless marked.
        None => RunStatus::Complete,
    }
}
