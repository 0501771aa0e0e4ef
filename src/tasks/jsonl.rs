//! Bring-your-own pairs: a JSONL file of
//! `{"base": str, "source": str, "base_label": str, "cf_label": str, "positions": {name: int}?, "split": "train|dev|test"?}`.
//! Labels are strings whose first token is the answer (write them with their leading space).
//! Rows without a split go train/dev/test in a seeded 60/20/20 partition.
use super::{Dataset, Pair, Prompt, Split};
use crate::tokenizer::Tok;
use crate::util::rng::Rng;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Row {
    base: String,
    source: String,
    base_label: String,
    cf_label: String,
    #[serde(default)]
    source_label: Option<String>,
    #[serde(default)]
    positions: BTreeMap<String, i64>,
    #[serde(default)]
    split: Option<String>,
}

fn first_token(tok: &Tok, s: &str, what: &str, line: usize) -> Result<u32> {
    tok.encode(s)?.first().copied().with_context(|| format!("line {line}: {what} {s:?} has no tokens"))
}

pub fn dataset(tok: &Tok, path: &Path, seed: u64) -> Result<Dataset> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut rng = Rng::new(seed);
    let mut ds = Dataset::default();
    let mut labels = Vec::new();
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let ln = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let row: Row = serde_json::from_str(line).with_context(|| format!("{}: line {ln}", path.display()))?;
        let bl = first_token(tok, &row.base_label, "base_label", ln)?;
        let cl = first_token(tok, &row.cf_label, "cf_label", ln)?;
        let sl = match &row.source_label {
            Some(s) => first_token(tok, s, "source_label", ln)?,
            None => cl,
        };
        let named: Vec<(String, i64)> = row.positions.clone().into_iter().collect();
        let mk = |text: &str, label: u32| -> Result<Prompt> {
            let mut p = Prompt::new(tok, text.to_string(), label, &[])?;
            for (k, v) in &named {
                let n = p.ids.len() as i64;
                let idx = if *v < 0 { n + v } else { *v };
                if idx < 0 || idx >= n {
                    bail!("line {ln}: position {k}={v} outside the prompt ({n} tokens)");
                }
                p.positions.insert(k.clone(), idx as usize);
            }
            Ok(p)
        };
        labels.extend([bl, cl]);
        rows.push((mk(&row.base, bl)?, mk(&row.source, sl)?, cl, row.split.clone()));
    }
    if rows.is_empty() {
        bail!("{}: no pairs", path.display());
    }
    labels.sort();
    labels.dedup();
    for (base, source, cf, split) in rows {
        let split = match split.as_deref() {
            Some("train") => Split::Train,
            Some("dev") => Split::Dev,
            Some("test") => Split::Test,
            Some(other) => bail!("{}: unknown split {other:?}", path.display()),
            None => match rng.below(10) {
                0..=5 => Split::Train,
                6 | 7 => Split::Dev,
                _ => Split::Test,
            },
        };
        ds.split_mut(split).push(Pair { base, source, cf_label: cf, answers: labels.clone() });
    }
    Ok(ds)
}
