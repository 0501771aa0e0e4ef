//! Small shared utilities.
pub mod fuzz;
pub mod nan_null;
pub mod panics;
pub mod paths;
pub mod rng;
pub mod stats;

pub use paths::check_model_path;

/// `MemAvailable` from /proc/meminfo, in bytes (None where there is no such file).
pub fn mem_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
