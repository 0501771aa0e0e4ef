//! Run folders. A run never overwrites another: its folder is
//! `notebooks-out/<experiment>/<UTC timestamp>-<config hash>[-N]/`, created atomically.
use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// `notebooks-out/` (override with ROAD_OUT).
pub fn out_root() -> PathBuf {
    std::env::var_os("ROAD_OUT").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("notebooks-out"))
}

/// UTC `YYYYmmdd-HHMMSS` from the system clock.
pub fn timestamp() -> String {
    jiff::Timestamp::now().strftime("%Y%m%d-%H%M%S").to_string()
}

pub fn short_hash(text: &str) -> String {
    let h = Sha256::digest(text.as_bytes());
    h.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

/// Create a fresh run directory for `experiment` whose resolved config hashes to `hash`.
/// `experiment` must be one path component (a crafted name or metrics.csv column cannot
/// write outside `notebooks-out/`).
pub fn new_run_dir(experiment: &str, hash: &str) -> Result<PathBuf> {
    super::checks::check_name("name", experiment)?;
    let parent = out_root().join(experiment);
    std::fs::create_dir_all(&parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let stem = format!("{}-{hash}", timestamp());
    for n in 1.. {
        let name = if n == 1 { stem.clone() } else { format!("{stem}-{n}") };
        let dir = parent.join(name);
        // create_dir (not _all) fails if it exists: two runs can never share a folder.
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
        }
    }
    unreachable!()
}

/// Every past run under `notebooks-out/`, newest first: (experiment, run dir).
pub fn list_runs(root: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let Ok(exps) = std::fs::read_dir(root) else { return out };
    for e in exps.flatten() {
        let Ok(runs) = std::fs::read_dir(e.path()) else { continue };
        for r in runs.flatten() {
            if r.path().join("config.toml").exists() {
                out.push((e.file_name().to_string_lossy().into_owned(), r.path()));
            }
        }
    }
    out.sort_by(|a, b| b.1.file_name().cmp(&a.1.file_name()));
    out
}
