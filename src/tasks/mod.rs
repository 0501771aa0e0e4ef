//! Tasks: high-level causal models that generate base/source pairs and counterfactual labels.
//! Every task yields [`Pair`]s whose prompts are already tokenised, with named positions.
pub mod capitals;
pub mod equality;
pub mod ioi;
pub mod jsonl;

use crate::tokenizer::Tok;
use anyhow::{bail, Result};
use std::collections::BTreeMap;

/// Pairs per split: each is run through the model at least twice and its clean activations are
/// cached, so more than this is a mistake rather than an experiment (and must not reach an
/// allocation: `Vec::with_capacity(10^11)` aborts the process).
pub const MAX_PAIRS_PER_SPLIT: usize = 100_000;

/// `task.sizes` = [train, dev, test], each at most [`MAX_PAIRS_PER_SPLIT`].
pub fn check_sizes(sizes: [usize; 3]) -> Result<()> {
    if let Some((i, &n)) = sizes.iter().enumerate().find(|(_, &n)| n > MAX_PAIRS_PER_SPLIT) {
        bail!("task.sizes[{i}] = {n}: at most {MAX_PAIRS_PER_SPLIT} pairs per split (every pair is run through the model)");
    }
    Ok(())
}

/// One prompt with its correct next token and named positions (e.g. `IO`, `S2`, `last`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Prompt {
    pub text: String,
    pub ids: Vec<u32>,
    /// The token the model should predict next.
    pub label: u32,
    pub positions: BTreeMap<String, usize>,
}

impl Prompt {
    pub fn new(tok: &Tok, text: String, label: u32, named: &[(&str, usize)]) -> Result<Self> {
        let ids = tok.encode(&text)?;
        if ids.is_empty() {
            bail!("empty prompt");
        }
        let mut positions: BTreeMap<String, usize> = named.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        positions.insert("last".into(), ids.len() - 1);
        Ok(Self { text, ids, label, positions })
    }

    /// Resolve a position spec: a name (`last`, `S2`, ...), an absolute index, or a negative index
    /// counted from the end (-1 = last).
    pub fn position(&self, spec: &str) -> Result<usize> {
        if let Some(p) = self.positions.get(spec) {
            return Ok(*p);
        }
        if let Ok(i) = spec.parse::<i64>() {
            let n = self.ids.len() as i64;
            let p = if i < 0 { n + i } else { i };
            if p < 0 || p >= n {
                bail!("position {spec} is outside the prompt ({n} tokens): {:?}", self.text);
            }
            return Ok(p as usize);
        }
        bail!(
            "unknown position {spec:?} for this task; named positions: {}",
            self.positions.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    }
}

/// A base/source pair and what the causal model predicts when the variable is interchanged.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pair {
    pub base: Prompt,
    pub source: Prompt,
    /// The high-level model's output for the base with the variable taken from the source.
    pub cf_label: u32,
    /// Candidate answers for "IIA over the task's answer set".
    pub answers: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Dev,
    Test,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Dev => "dev",
            Split::Test => "test",
        }
    }
}

/// Pairs per split; entities (names, countries, symbols) are disjoint across splits.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    pub train: Vec<Pair>,
    pub dev: Vec<Pair>,
    pub test: Vec<Pair>,
}

impl Dataset {
    pub fn split(&self, s: Split) -> &Vec<Pair> {
        match s {
            Split::Train => &self.train,
            Split::Dev => &self.dev,
            Split::Test => &self.test,
        }
    }
    pub fn split_mut(&mut self, s: Split) -> &mut Vec<Pair> {
        match s {
            Split::Train => &mut self.train,
            Split::Dev => &mut self.dev,
            Split::Test => &mut self.test,
        }
    }
}

/// Split a list of entities into three disjoint parts by fractions (after a seeded shuffle).
pub fn partition<T: Clone>(items: &[T], fracs: [f64; 3], rng: &mut crate::util::rng::Rng) -> [Vec<T>; 3] {
    let mut v = items.to_vec();
    rng.shuffle(&mut v);
    let n = v.len();
    let a = ((n as f64) * fracs[0]).round() as usize;
    let b = a + ((n as f64) * fracs[1]).round() as usize;
    let (a, b) = (a.min(n), b.min(n));
    [v[..a].to_vec(), v[a..b].to_vec(), v[b..].to_vec()]
}

/// The single token a word starts with (e.g. " Paris" -> id), failing if it is not one token
/// when `exact` is set. A word outside the vocabulary (the unknown token) has none.
pub fn single_token(tok: &Tok, word: &str, exact: bool) -> Option<u32> {
    // A leading-space word is tokenised after a letter, as it appears mid-sentence: that is the
    // token a prompt holds whatever the tokenizer's convention (GPT-2 `Ġ`, SentencePiece `▁`,
    // a BOS it prepends). For byte-level BPE it is the same as encoding the word alone.
    let ids = match word.strip_prefix(' ') {
        Some(_) => {
            let pre = tok.encode("a").ok()?;
            let all = tok.encode(&format!("a{word}")).ok()?;
            all.strip_prefix(pre.as_slice())?.to_vec()
        }
        None => {
            let ids = tok.encode(word).ok()?;
            match (tok.add_bos, tok.bos) {
                (true, Some(b)) if ids.first() == Some(&b) => ids[1..].to_vec(),
                _ => ids,
            }
        }
    };
    // A word outside the vocabulary is no single token (never `<unk>`).
    if tok.unk_id().is_some_and(|u| ids.contains(&u)) {
        return None;
    }
    match ids.len() {
        1 => Some(ids[0]),
        n if n > 1 && !exact => Some(ids[0]),
        _ => None,
    }
}
