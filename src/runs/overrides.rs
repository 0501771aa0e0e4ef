//! `--set key.path=value` overrides, applied to a parsed TOML document before it is
//! deserialised strictly (one parser for experiments, fine-tunes, pilot studies and the TUI).
use anyhow::{bail, Context, Result};

/// One `--set key.path=value` override; the value is parsed as TOML when it can be, else taken
/// as a string (so `sites.layers=8..16` works).
pub fn apply_override(doc: &mut toml::Table, assignment: &str) -> Result<()> {
    let (path, raw) = assignment
        .split_once('=')
        .with_context(|| format!("--set {assignment:?}: expected key.path=value"))?;
    // `v = {raw}` below would parse a second line as a second key and silently drop it.
    if assignment.contains(['\n', '\r']) {
        bail!("--set {assignment:?}: one key=value per --set (the value has a line break)");
    }
    let keys: Vec<&str> = path.trim().split('.').collect();
    if keys.iter().any(|k| k.trim().is_empty()) {
        bail!("--set {assignment:?}: {:?} is not a key path (key.path=value)", path.trim());
    }
    let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").expect("parsed key"),
        Err(_) => toml::Value::String(raw.to_string()),
    };
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

#[cfg(test)]
mod tests {
    use super::apply_override;

    #[test]
    fn a_multi_line_value_is_an_error_not_a_dropped_key() {
        let mut doc = toml::Table::new();
        let e = apply_override(&mut doc, "a=1\nb=2").unwrap_err().to_string();
        assert!(e.contains("line break") && !e.contains('\n'), "{e}");
        assert!(doc.is_empty());
        assert!(apply_override(&mut doc, "a..b=1").is_err() && apply_override(&mut doc, "=1").is_err());
        apply_override(&mut doc, "train.lr=3e-3").unwrap();
        assert_eq!(doc["train"]["lr"].as_float(), Some(3e-3));
    }
}
