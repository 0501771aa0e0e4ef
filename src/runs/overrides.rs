//! `--set key.path=value` overrides, applied to a parsed TOML document before it is
//! deserialised strictly (one parser for experiments, fine-tunes, pilot studies and the TUI).
use anyhow::{Context, Result};

/// One `--set key.path=value` override; the value is parsed as TOML when it can be, else taken
/// as a string (so `sites.layers=8..16` works).
pub fn apply_override(doc: &mut toml::Table, assignment: &str) -> Result<()> {
    let (path, raw) = assignment
        .split_once('=')
        .with_context(|| format!("--set {assignment:?}: expected key.path=value"))?;
    let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").expect("parsed key"),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let keys: Vec<&str> = path.trim().split('.').collect();
    let mut cur = doc;
    for k in &keys[..keys.len() - 1] {
        let entry = cur.entry(k.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry.as_table_mut().with_context(|| format!("--set {path}: `{k}` is not a table"))?;
    }
    cur.insert(keys[keys.len() - 1].to_string(), value);
    Ok(())
}

/// Apply every override in order.
pub fn apply_overrides(doc: &mut toml::Table, overrides: &[String]) -> Result<()> {
    for o in overrides {
        apply_override(doc, o)?;
    }
    Ok(())
}
