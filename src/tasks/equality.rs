//! Hierarchical equality (Geiger et al.): four symbols `a b c d`, output `(a==b) == (c==d)`.
//! Prompt text is word-level, e.g. `"s3 s7 s3 s9 ="`, answered by the token `true` or `false`;
//! named positions `a`, `b`, `c`, `d`, `eq` (and `last` = `eq`).
//!
//! High-level model: `V1 = a==b` (`left`), `V2 = c==d` (`right`), `O = V1==V2` (`output`).
//! Interchanging a variable from a source into a base gives the counterfactual label
//! `left: V1_src==V2_base`, `right: V1_base==V2_src`, `output: O_src`.
//!
//! Pairs are stratified over the 16 combinations of (V1, V2) for base and source, so V1, V2,
//! base/source labels and counterfactual labels are each balanced (exactly, per block of 16).
//! Symbols are partitioned into disjoint train/dev/test pools; the model itself is trained on all.
use super::{partition, single_token, Dataset, Pair, Prompt, Split};
use crate::tokenizer::Tok;
use crate::util::rng::Rng;
use anyhow::{bail, Context, Result};

/// Number of symbols `s0..s{N-1}` in the vocabulary of the tiny model.
pub const N_SYMBOLS: usize = 30;
pub const TRUE: &str = "true";
pub const FALSE: &str = "false";
pub const EQ: &str = "=";
/// Named positions, in prompt order.
pub const POSITIONS: [&str; 5] = ["a", "b", "c", "d", "eq"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variable {
    /// V1 = (a == b)
    Left,
    /// V2 = (c == d)
    Right,
    /// O = (V1 == V2)
    Output,
}

impl Variable {
    pub const ALL: [Variable; 3] = [Variable::Left, Variable::Right, Variable::Output];

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "left" | "v1" => Ok(Variable::Left),
            "right" | "v2" => Ok(Variable::Right),
            "output" | "o" => Ok(Variable::Output),
            _ => bail!("unknown equality variable {s:?} (left, right, output)"),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Variable::Left => "left",
            Variable::Right => "right",
            Variable::Output => "output",
        }
    }
}

/// The symbol words `s0..s{N_SYMBOLS-1}`.
pub fn symbols() -> Vec<String> {
    (0..N_SYMBOLS).map(|i| format!("s{i}")).collect()
}

/// The high-level model: `(a==b) == (c==d)`.
pub fn high_level<T: PartialEq>(x: &[T; 4]) -> bool {
    (x[0] == x[1]) == (x[2] == x[3])
}

/// The high-level model on intermediate values, with `var` taken from the source:
/// the counterfactual output of an interchange.
pub fn counterfactual(var: Variable, base: (bool, bool), source: (bool, bool)) -> bool {
    match var {
        Variable::Left => source.0 == base.1,
        Variable::Right => base.0 == source.1,
        Variable::Output => source.0 == source.1,
    }
}

/// Prompt text for four symbols: `"a b c d ="`.
pub fn prompt_text(x: &[&str; 4]) -> String {
    format!("{} {} {} {} {EQ}", x[0], x[1], x[2], x[3])
}

/// Ids of the answer tokens `true` and `false`.
pub fn answer_ids(tok: &Tok) -> Result<(u32, u32)> {
    let t = single_token(tok, TRUE, true).context("the tokenizer has no single token `true` (is this the tiny equality model?)")?;
    let f = single_token(tok, FALSE, true).context("the tokenizer has no single token `false`")?;
    Ok((t, f))
}

/// Symbols that are single tokens in this tokenizer, with their ids, in index order.
pub fn symbol_tokens(tok: &Tok) -> Result<Vec<(String, u32)>> {
    let mut out = Vec::with_capacity(N_SYMBOLS);
    for s in symbols() {
        let id = single_token(tok, &s, true)
            .with_context(|| format!("symbol {s:?} is not a single token: the equality task needs the tiny model's word-level tokenizer"))?;
        out.push((s, id));
    }
    Ok(out)
}

/// Draw four symbols from `pool` with the given `(a==b, c==d)`; unequal pairs are distinct symbols.
pub fn draw<'a, T>(rng: &mut Rng, pool: &'a [T], v: (bool, bool)) -> [&'a T; 4] {
    let mut pair = |eq: bool| -> (&'a T, &'a T) {
        let i = rng.below(pool.len());
        if eq {
            (&pool[i], &pool[i])
        } else {
            let mut j = rng.below(pool.len() - 1);
            if j >= i {
                j += 1;
            }
            (&pool[i], &pool[j])
        }
    };
    let (a, b) = pair(v.0);
    let (c, d) = pair(v.1);
    [a, b, c, d]
}

/// A prompt for four symbols; its label is the high-level output.
pub fn prompt(tok: &Tok, x: [&(String, u32); 4], ans: (u32, u32)) -> Result<Prompt> {
    let text = prompt_text(&[&x[0].0, &x[1].0, &x[2].0, &x[3].0]);
    let out = high_level(&[x[0].1, x[1].1, x[2].1, x[3].1]);
    let label = if out { ans.0 } else { ans.1 };
    let p = Prompt::new(tok, text, label, &[("a", 0), ("b", 1), ("c", 2), ("d", 3), ("eq", 4)])?;
    if p.ids.len() != 5 || p.ids[..4] != [x[0].1, x[1].1, x[2].1, x[3].1] {
        bail!("equality prompt {:?} tokenised as {:?}, expected 5 word tokens", p.text, p.ids);
    }
    Ok(p)
}

/// The 16 combinations of base (V1, V2) and source (V1, V2), in a random order per block of 16.
struct Strata {
    order: Vec<usize>,
    next: usize,
}

impl Strata {
    fn new() -> Self {
        Self { order: (0..16).collect(), next: 16 }
    }
    fn draw(&mut self, rng: &mut Rng) -> ((bool, bool), (bool, bool)) {
        if self.next == 16 {
            rng.shuffle(&mut self.order);
            self.next = 0;
        }
        let k = self.order[self.next];
        self.next += 1;
        let bit = |i: usize| (k >> i) & 1 == 1;
        ((bit(0), bit(1)), (bit(2), bit(3)))
    }
}

/// Base/source pairs for `variable`, `sizes` = [train, dev, test], symbols disjoint across splits.
pub fn dataset(tok: &Tok, variable: Variable, sizes: [usize; 3], seed: u64) -> Result<Dataset> {
    super::check_sizes(sizes)?;
    let syms = symbol_tokens(tok)?;
    let ans = answer_ids(tok)?;
    let mut rng = Rng::new(seed);
    let parts = partition(&syms, [0.6, 0.2, 0.2], &mut rng.fork(1));
    let mut ds = Dataset::default();
    for (si, split) in [Split::Train, Split::Dev, Split::Test].into_iter().enumerate() {
        let pool = &parts[si];
        if pool.len() < 2 {
            bail!("equality: too few symbols for the {} split", split.name());
        }
        let mut r = rng.fork(10 + si as u64);
        let mut strata = Strata::new();
        let mut pairs = Vec::with_capacity(sizes[si]);
        for _ in 0..sizes[si] {
            let (vb, vs) = strata.draw(&mut r);
            let base = prompt(tok, draw(&mut r, pool, vb), ans)?;
            let source = prompt(tok, draw(&mut r, pool, vs), ans)?;
            let cf = if counterfactual(variable, vb, vs) { ans.0 } else { ans.1 };
            pairs.push(Pair { base, source, cf_label: cf, answers: vec![ans.0, ans.1] });
        }
        *ds.split_mut(split) = pairs;
    }
    Ok(ds)
}
