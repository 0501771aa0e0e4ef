//! Small shared utilities.
pub mod fuzz;
pub mod nan_null;
pub mod panics;
pub mod paths;
pub mod rng;
pub mod stats;

pub use paths::check_model_path;

/// Largest `|a − b|` over two same-shaped tensors: the unit tests' comparison of a fused op with
/// its composed reference.
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// `MemAvailable` from /proc/meminfo, in bytes (None where there is no such file).
pub fn mem_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// User + system CPU time of this process so far, from /proc/self/stat (Linux; 0 elsewhere).
pub fn cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    // CLK_TCK is 100 on every Linux this runs on (glibc/musl x86-64 and aarch64).
    (ticks(11) + ticks(12)) / 100.0
}
