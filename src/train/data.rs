//! Datasets: the shipped tweet-sentiment corpus, bring-your-own CSV/JSONL, and the split rule.
//!
//! Split rule (deterministic, order-independent): `h = first 8 bytes of sha256(text)` as a
//! big-endian u64; `h % 100 < 80` → train, `< 90` → dev, else test. Duplicated texts therefore
//! always land in the same split (no train/test leakage through duplicates).
use crate::fetch;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::Path;

/// A classification example: `label` indexes the task's label list.
#[derive(Debug, Clone, PartialEq)]
pub struct ClsExample {
    pub text: String,
    pub label: usize,
}

/// A causal-LM example: the loss covers `completion` tokens only.
#[derive(Debug, Clone, PartialEq)]
pub struct LmExample {
    pub prompt: String,
    pub completion: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Dev,
    Test,
}

pub fn split_of(text: &str) -> Split {
    let h = Sha256::digest(text.as_bytes());
    let v = u64::from_be_bytes(h[..8].try_into().expect("8 bytes")) % 100;
    match v {
        0..=79 => Split::Train,
        80..=89 => Split::Dev,
        _ => Split::Test,
    }
}

#[derive(Debug, Clone)]
pub struct Splits<T> {
    pub train: Vec<T>,
    pub dev: Vec<T>,
    pub test: Vec<T>,
}

impl<T> Default for Splits<T> {
    fn default() -> Self {
        Self { train: vec![], dev: vec![], test: vec![] }
    }
}

impl Splits<ClsExample> {
    pub fn from_examples(all: Vec<ClsExample>) -> Self {
        let mut s = Self::default();
        for e in all {
            match split_of(&e.text) {
                Split::Train => s.train.push(e),
                Split::Dev => s.dev.push(e),
                Split::Test => s.test.push(e),
            }
        }
        s
    }
}

/// The binary sentiment task: labels `["negative", "positive"]`; neutral rows are dropped, and
/// rows below `min_confidence` (empty confidence counts as 1.0) too. Texts are trimmed.
pub fn load_sentiment(min_confidence: f32, verbose: bool) -> Result<Splits<ClsExample>> {
    let path = fetch::SENTIMENT.ensure(verbose)?;
    // The corpus has stray non-UTF-8 bytes; replace them rather than fail.
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let mut rd = csv::ReaderBuilder::new().flexible(true).from_reader(text.as_bytes());
    let mut all = Vec::new();
    for (i, rec) in rd.records().enumerate() {
        let rec = rec.with_context(|| format!("{}: row {}", path.display(), i + 2))?;
        let (Some(sent), Some(conf), Some(t)) = (rec.get(0), rec.get(1), rec.get(2)) else { continue };
        let label = match sent {
            "negative" => 0,
            "positive" => 1,
            _ => continue,
        };
        let c: f32 = conf.trim().parse().unwrap_or(1.0);
        let t = t.trim();
        if c < min_confidence || t.is_empty() {
            continue;
        }
        all.push(ClsExample { text: t.to_string(), label });
    }
    if all.is_empty() {
        bail!("{}: no positive/negative rows", path.display());
    }
    Ok(Splits::from_examples(all))
}

fn label_index(label: &str, labels: &[String], where_: &str) -> Result<usize> {
    match labels.iter().position(|l| l == label.trim()) {
        Some(i) => Ok(i),
        None => bail!("{where_}: label {label:?} is not one of the task's labels {labels:?}"),
    }
}

/// Bring-your-own classification data: `.csv` with header columns `text,label`, or `.jsonl` with
/// `{"text": ..., "label": ...}` per line. Labels are names from `labels`; split by the hash rule.
pub fn load_cls_file(path: &Path, labels: &[String]) -> Result<Splits<ClsExample>> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_cls_text(&text, ext, labels, &path.display().to_string())
}

/// [`load_cls_file`] of a file's text (`ext` = csv | jsonl); `origin` starts every error. A UTF-8
/// byte-order mark is dropped, and an empty text is an error naming its row.
pub fn parse_cls_text(text: &str, ext: &str, labels: &[String], origin: &str) -> Result<Splits<ClsExample>> {
    let text = crate::tasks::jsonl::strip_bom(text);
    let mut all = Vec::new();
    let mut push = |t: &str, label: usize, w: &str| -> Result<()> {
        if t.trim().is_empty() {
            bail!("{w}: empty text");
        }
        all.push(ClsExample { text: t.to_string(), label });
        Ok(())
    };
    match ext {
        "csv" => {
            let mut rd = csv::Reader::from_reader(text.as_bytes());
            let hdr = rd.headers().with_context(|| format!("{origin}: header"))?.clone();
            let col = |n: &str| hdr.iter().position(|h| h == n).with_context(|| format!("{origin}: no `{n}` column"));
            let (ti, li) = (col("text")?, col("label")?);
            for (i, rec) in rd.records().enumerate() {
                let w = format!("{origin}: row {}", i + 2);
                let rec = rec.with_context(|| w.clone())?;
                let label = label_index(rec.get(li).unwrap_or(""), labels, &w)?;
                push(rec.get(ti).unwrap_or(""), label, &w)?;
            }
        }
        "jsonl" => {
            for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let w = format!("{origin}: line {}", i + 1);
                let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{w}: not JSON"))?;
                let t = v.get("text").and_then(|x| x.as_str()).with_context(|| format!("{w}: no string `text`"))?;
                let l = match v.get("label") {
                    Some(serde_json::Value::String(s)) => s.clone(),
                    Some(serde_json::Value::Number(n)) => n.to_string(),
                    _ => bail!("{w}: no `label`"),
                };
                let label = label_index(&l, labels, &w)?;
                push(t, label, &w)?;
            }
        }
        _ => bail!("{origin}: expected a .csv or .jsonl file"),
    }
    if all.is_empty() {
        bail!("{origin}: no examples");
    }
    Ok(Splits::from_examples(all))
}

/// Prompt/completion pairs from `.jsonl` (`{"prompt": ..., "completion": ...}`).
pub fn load_lm_file(path: &Path) -> Result<Vec<LmExample>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_lm_text(&text, &path.display().to_string())
}

/// [`load_lm_file`] of a file's text; `origin` starts every error (byte-order mark dropped).
pub fn parse_lm_text(text: &str, origin: &str) -> Result<Vec<LmExample>> {
    let mut out = Vec::new();
    for (i, line) in crate::tasks::jsonl::strip_bom(text).lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let w = format!("{origin}: line {}", i + 1);
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{w}: not JSON"))?;
        let get = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string).with_context(|| format!("{w}: no string `{k}`"));
        let (prompt, completion) = (get("prompt")?, get("completion")?);
        if prompt.is_empty() || completion.is_empty() {
            bail!("{w}: empty {}", if prompt.is_empty() { "prompt" } else { "completion" });
        }
        out.push(LmExample { prompt, completion });
    }
    if out.is_empty() {
        bail!("{origin}: no examples");
    }
    Ok(out)
}

/// A synthetic binary task (shipped as code, no file): "is the number even or odd?".
/// Labels `["even", "odd"]`; all numbers 100..=999, split by the hash rule.
pub fn parity_task() -> Splits<ClsExample> {
    let all = (100u32..1000)
        .map(|n| ClsExample { text: n.to_string(), label: (n % 2) as usize })
        .collect();
    Splits::from_examples(all)
}

/// A synthetic binary task for the tiny equality model (shipped as code): "s3 s7 s3 s9" → is the
/// *first pair* equal (label 1 = `true`)? The model was trained on the hierarchical task
/// `(a==b) == (c==d)`, so answering this one needs fine-tuning — the pilot study's fast variant.
/// Half the rows have a==b and, independently, half c==d; 4000 seeded rows, split by the hash rule.
pub fn first_pair_task() -> Splits<ClsExample> {
    use crate::tasks::equality::N_SYMBOLS;
    let mut rng = crate::util::rng::Rng::new(0xF1257);
    let pick_pair = |equal: bool, rng: &mut crate::util::rng::Rng| {
        let a = rng.below(N_SYMBOLS);
        let b = if equal { a } else { (a + 1 + rng.below(N_SYMBOLS - 1)) % N_SYMBOLS };
        (a, b)
    };
    let mut all = Vec::with_capacity(4000);
    let mut seen = std::collections::HashSet::new();
    while all.len() < 4000 {
        let (e1, e2) = (rng.uniform() < 0.5, rng.uniform() < 0.5);
        let (a, b) = pick_pair(e1, &mut rng);
        let (c, d) = pick_pair(e2, &mut rng);
        let text = format!("s{a} s{b} s{c} s{d}");
        if seen.insert(text.clone()) {
            all.push(ClsExample { text, label: e1 as usize });
        }
    }
    Splits::from_examples(all)
}

/// Class-balanced subsample of at most `n` examples (round-robin over labels, seeded order), so a
/// small training budget is not dominated by the majority class.
pub fn balanced_take(ex: &[ClsExample], n: usize, n_labels: usize, rng: &mut crate::util::rng::Rng) -> Vec<ClsExample> {
    let mut by: Vec<Vec<&ClsExample>> = vec![Vec::new(); n_labels];
    for e in ex {
        if e.label < n_labels {
            by[e.label].push(e);
        }
    }
    for b in by.iter_mut() {
        rng.shuffle(b);
    }
    let mut out = Vec::with_capacity(n.min(ex.len()));
    let mut i = 0;
    while out.len() < n && by.iter().any(|b| i < b.len()) {
        for b in &by {
            if i < b.len() && out.len() < n {
                out.push(b[i].clone());
            }
        }
        i += 1;
    }
    rng.shuffle(&mut out);
    out
}
