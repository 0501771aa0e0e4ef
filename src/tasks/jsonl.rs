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

fn first_token(tok: &Tok, s: &str, what: &str) -> Result<u32> {
    tok.encode_known(s, what)?.first().copied().with_context(|| format!("{what} {s:?} has no tokens"))
}

/// Text with a UTF-8 byte-order mark removed: editors on Windows write one, and it is not part
/// of the first row's JSON.
pub fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

pub fn dataset(tok: &Tok, path: &Path, seed: u64) -> Result<Dataset> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    dataset_from_text(tok, &text, &path.display().to_string(), seed)
}

/// [`dataset`] of a file's text; `origin` (the file) starts every error, with the line.
pub fn dataset_from_text(tok: &Tok, text: &str, origin: &str, seed: u64) -> Result<Dataset> {
    let mut rng = Rng::new(seed);
    let mut ds = Dataset::default();
    let mut labels = Vec::new();
    let mut rows = Vec::new();
    for (i, line) in strip_bom(text).lines().enumerate() {
        let ln = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let at = |e: anyhow::Error| e.context(format!("{origin}: line {ln}"));
        let row: Row = serde_json::from_str(line).map_err(|e| at(e.into()))?;
        let bl = first_token(tok, &row.base_label, "base_label").map_err(at)?;
        let cl = first_token(tok, &row.cf_label, "cf_label").map_err(at)?;
        let sl = match &row.source_label {
            Some(s) => first_token(tok, s, "source_label").map_err(at)?,
            None => cl,
        };
        let named: Vec<(String, i64)> = row.positions.clone().into_iter().collect();
        let mk = |what: &str, text: &str, label: u32| -> Result<Prompt> {
            if text.trim().is_empty() {
                bail!("{origin}: line {ln}: {what} is empty");
            }
            let mut p = Prompt::new(tok, text.to_string(), label, &[]).with_context(|| format!("{origin}: line {ln}: {what}"))?;
            for (k, v) in &named {
                let n = p.ids.len() as i64;
                let idx = if *v < 0 { n.checked_add(*v).unwrap_or(-1) } else { *v };
                if idx < 0 || idx >= n {
                    bail!("{origin}: line {ln}: position {k}={v} outside the {what} ({n} tokens)");
                }
                p.positions.insert(k.clone(), idx as usize);
            }
            Ok(p)
        };
        let split = match row.split.as_deref() {
            None => None,
            Some("train") => Some(Split::Train),
            Some("dev") => Some(Split::Dev),
            Some("test") => Some(Split::Test),
            Some(other) => bail!("{origin}: line {ln}: unknown split {other:?} (train, dev or test)"),
        };
        labels.extend([bl, cl]);
        rows.push((mk("base", &row.base, bl)?, mk("source", &row.source, sl)?, cl, split));
    }
    if rows.is_empty() {
        bail!("{origin}: no pairs");
    }
    labels.sort();
    labels.dedup();
    for (base, source, cf, split) in rows {
        // Rows without a split: a seeded 60/20/20 partition.
        let split = split.unwrap_or_else(|| match rng.below(10) {
            0..=5 => Split::Train,
            6 | 7 => Split::Dev,
            _ => Split::Test,
        });
        ds.split_mut(split).push(Pair { base, source, cf_label: cf, answers: labels.clone() });
    }
    Ok(ds)
}
