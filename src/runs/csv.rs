//! Tidy CSV files: one writer and one reader for every workload.
use anyhow::{Context, Result};
use std::path::Path;

/// Write rows with a header; an empty table still gets its header line (`header`; pass `&[]`
/// where an empty table may stay an empty file).
pub fn write_csv<T: serde::Serialize>(path: &Path, rows: &[T], header: &[&str]) -> Result<()> {
    // Whole or absent (runs rewrite their tables as cells finish and may be killed at any time).
    let mut w = csv::Writer::from_writer(Vec::new());
    if rows.is_empty() && !header.is_empty() {
        w.write_record(header)?;
    }
    for r in rows {
        w.serialize(r)?;
    }
    let bytes = w.into_inner().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    super::atomic::write(path, &bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// Read every row of a CSV file; a missing file is an empty table.
pub fn read_csv<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    if !path.exists() {
        return Ok(vec![]);
    }
    let mut r = csv::Reader::from_path(path).with_context(|| format!("cannot read {}", path.display()))?;
    r.deserialize().map(|x| x.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))).collect()
}
