//! Run directories `notebooks-out/<name>/<YYYYmmdd-HHMMSS>-<shorthash>/`, never overwritten.
use anyhow::{bail, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// UTC timestamp `YYYYmmdd-HHMMSS` (no chrono dependency: civil-from-days by H. Hinnant).
pub fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}{m:02}{d:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// First 7 hex digits of sha256(text).
pub fn short_hash(text: &str) -> String {
    let h = Sha256::digest(text.as_bytes());
    h.iter().take(4).map(|b| format!("{b:02x}")).collect::<String>()[..7].to_string()
}

/// Create a fresh run directory under `root/name/`. The hash covers the resolved config, so two
/// runs in the same second with different configs differ; an identical collision is refused.
pub fn create(root: &Path, name: &str, resolved_config: &str) -> Result<PathBuf> {
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        bail!("run name {name:?} must be a plain file name");
    }
    let dir = root.join(name).join(format!("{}-{}", timestamp(), short_hash(resolved_config)));
    if dir.exists() {
        bail!("{} already exists (same config in the same second); not overwriting", dir.display());
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
