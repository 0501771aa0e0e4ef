//! Indirect object identification: "When A and B went to the store, B gave a drink to" -> " A".
//! Variables (METHODS.md §5): `s_position` (which first-clause slot holds S; source BAB,
//! counterfactual label = base S), `io_name` (source with fresh names CDD, label = source IO),
//! and `flip` (answer-flipping source ABA, the usual activation-patching pair).
use super::{partition, single_token, Dataset, Pair, Prompt, Split};
use crate::tokenizer::Tok;
use crate::util::rng::Rng;
use anyhow::{bail, Result};

pub const TEMPLATES: [&str; 8] = [
    "When {A} and {B} went to the store, {S} gave a drink to",
    "When {A} and {B} went to the park, {S} gave a ball to",
    "After {A} and {B} went to the market, {S} handed a flower to",
    "When {A} and {B} arrived at the school, {S} gave a book to",
    "While {A} and {B} were working at the office, {S} gave a report to",
    "After {A} and {B} had lunch at the cafe, {S} passed the salt to",
    "When {A} and {B} got a letter at the house, {S} showed it to",
    "After {A} and {B} went to the beach, {S} threw a towel to",
];

const NAMES: [&str; 64] = [
    "Mary", "John", "Tom", "James", "Anna", "Paul", "Kate", "Mark", "Sarah", "David", "Lisa", "Peter",
    "Emma", "Jack", "Laura", "Michael", "Alice", "Robert", "Rachel", "Daniel", "Julia", "Steven",
    "Emily", "Richard", "Jessica", "Thomas", "Linda", "George", "Susan", "Frank", "Karen", "Henry",
    "Helen", "Joseph", "Amy", "Edward", "Nancy", "Brian", "Grace", "Kevin", "Rose", "Jason", "Lucy",
    "Adam", "Jane", "Eric", "Sophie", "Ryan", "Claire", "Sam", "Nina", "Alex", "Maria", "Chris",
    "Diana", "Victor", "Emily", "Oscar", "Ruby", "Leo", "Ivy", "Max", "Ella", "Ben",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variable {
    SPosition,
    IoName,
    Flip,
}

impl Variable {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "s_position" | "io_position" => Ok(Variable::SPosition),
            "io_name" => Ok(Variable::IoName),
            "flip" => Ok(Variable::Flip),
            _ => bail!("unknown IOI variable {s:?} (s_position, io_name, flip)"),
        }
    }
}

/// Names that are a single token with a leading space, deduplicated, in a fixed order.
pub fn single_token_names(tok: &Tok) -> Vec<(String, u32)> {
    let mut out: Vec<(String, u32)> = Vec::new();
    for n in NAMES {
        if out.iter().any(|(m, _)| m == n) {
            continue;
        }
        if let Some(id) = single_token(tok, &format!(" {n}"), true) {
            out.push((n.to_string(), id));
        }
    }
    out
}

fn fill(template: &str, a: &str, b: &str, s: &str) -> String {
    template.replace("{A}", a).replace("{B}", b).replace("{S}", s)
}

/// Build a prompt and locate its three name slots (N1, N2, S2) by token id.
fn prompt(tok: &Tok, template: &str, n1: &(String, u32), n2: &(String, u32), s: &(String, u32), io: &(String, u32)) -> Result<Prompt> {
    let text = fill(template, &n1.0, &n2.0, &s.0);
    let ids = tok.encode(&text)?;
    let slots: Vec<usize> = ids.iter().enumerate().filter(|(_, &t)| t == n1.1 || t == n2.1).map(|(i, _)| i).collect();
    if slots.len() != 3 {
        bail!("IOI template {template:?}: expected 3 name tokens, found {}", slots.len());
    }
    let (p_io, p_s1) = if io.1 == n1.1 { (slots[0], slots[1]) } else { (slots[1], slots[0]) };
    Prompt::new(tok, text, io.1, &[("N1", slots[0]), ("N2", slots[1]), ("S2", slots[2]), ("IO", p_io), ("S1", p_s1)])
}

pub struct IoiConfig {
    pub variable: Variable,
    /// Indices into TEMPLATES; empty = all.
    pub templates: Vec<usize>,
    pub sizes: [usize; 3],
    pub seed: u64,
}

pub fn dataset(tok: &Tok, cfg: &IoiConfig) -> Result<Dataset> {
    let names = single_token_names(tok);
    if names.len() < 12 {
        bail!("IOI needs at least 12 single-token names in this tokenizer, found {}", names.len());
    }
    let templates: Vec<&str> = if cfg.templates.is_empty() {
        TEMPLATES.to_vec()
    } else {
        cfg.templates
            .iter()
            .map(|&i| TEMPLATES.get(i).copied().ok_or_else(|| anyhow::anyhow!("IOI template index {i} out of range (0..{})", TEMPLATES.len())))
            .collect::<Result<_>>()?
    };
    super::check_sizes(cfg.sizes)?;
    let mut rng = Rng::new(cfg.seed);
    // Names are split first so train/dev/test never share an entity.
    let parts = partition(&names, [0.6, 0.2, 0.2], &mut rng.fork(1));
    let mut ds = Dataset::default();
    for (si, split) in [Split::Train, Split::Dev, Split::Test].into_iter().enumerate() {
        let pool = &parts[si];
        if pool.len() < 4 {
            bail!("IOI: too few names for the {} split", split.name());
        }
        let mut r = rng.fork(10 + si as u64);
        let mut pairs = Vec::with_capacity(cfg.sizes[si]);
        for _ in 0..cfg.sizes[si] {
            let t = *r.pick(&templates);
            let mut pick4 = pool.clone();
            r.shuffle(&mut pick4);
            let (a, b, c, d) = (&pick4[0], &pick4[1], &pick4[2], &pick4[3]);
            // Base ABB: IO = A, S = B.
            let base = prompt(tok, t, a, b, b, a)?;
            let (source, cf, answers) = match cfg.variable {
                Variable::SPosition => (prompt(tok, t, b, a, b, a)?, b.1, vec![a.1, b.1]),
                Variable::IoName => (prompt(tok, t, c, d, d, c)?, c.1, vec![a.1, b.1, c.1, d.1]),
                Variable::Flip => (prompt(tok, t, a, b, a, b)?, b.1, vec![a.1, b.1]),
            };
            pairs.push(Pair { base, source, cf_label: cf, answers });
        }
        *ds.split_mut(split) = pairs;
    }
    Ok(ds)
}
