//! Country -> capital recall: "... The capital of France is" -> " Paris". Variable: the country.
//! Interchanging it from a source about another country predicts that country's capital.
//! Facts: `data/capitals.csv` (country,capital); the label is the capital's first token.
use super::{partition, single_token, Dataset, Pair, Prompt, Split};
use crate::tokenizer::Tok;
use crate::util::rng::Rng;
use anyhow::{bail, Context, Result};
use std::path::Path;

/// One solved example first: without it SmolLM2-135M mostly continues "... is the" (measured:
/// 46/80 right without, most of the rest right with). Kenya is therefore not in the fact list.
pub const TEMPLATE: &str = "The capital of Kenya is Nairobi. The capital of {C} is";

pub fn load_facts(path: &Path) -> Result<Vec<(String, String)>> {
    let mut rdr = csv::Reader::from_path(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, rec) in rdr.records().enumerate() {
        let rec = rec.with_context(|| format!("{}: row {}", path.display(), i + 2))?;
        let (Some(c), Some(k)) = (rec.get(0), rec.get(1)) else {
            bail!("{}: row {} needs country,capital", path.display(), i + 2);
        };
        out.push((c.trim().to_string(), k.trim().to_string()));
    }
    Ok(out)
}

fn prompt(tok: &Tok, country: &str, capital_id: u32) -> Result<Prompt> {
    let text = TEMPLATE.replace("{C}", country);
    let ids = tok.encode(&text)?;
    // The country's last token sits just before " is".
    let subject_last = ids.len() - 2;
    let n_subject = tok.encode(&format!(" {country}"))?.len();
    Prompt::new(tok, text, capital_id, &[("subject_last", subject_last), ("subject_first", ids.len() - 1 - n_subject)])
}

pub fn dataset(tok: &Tok, facts: &[(String, String)], sizes: [usize; 3], seed: u64) -> Result<Dataset> {
    super::check_sizes(sizes)?;
    let items: Vec<(String, u32)> = facts
        .iter()
        .filter_map(|(c, k)| single_token(tok, &format!(" {k}"), false).map(|id| (c.clone(), id)))
        .collect();
    let mut rng = Rng::new(seed);
    let parts = partition(&items, [0.5, 0.25, 0.25], &mut rng.fork(1));
    let mut ds = Dataset::default();
    for (si, split) in [Split::Train, Split::Dev, Split::Test].into_iter().enumerate() {
        let pool = &parts[si];
        if pool.len() < 2 {
            bail!("capitals: too few countries for the {} split", split.name());
        }
        let answers: Vec<u32> = {
            let mut a: Vec<u32> = pool.iter().map(|x| x.1).collect();
            a.sort();
            a.dedup();
            a
        };
        let mut r = rng.fork(10 + si as u64);
        let mut pairs = Vec::new();
        for _ in 0..sizes[si] {
            let b = r.pick(pool);
            let mut s = r.pick(pool);
            while s.1 == b.1 {
                s = r.pick(pool);
            }
            pairs.push(Pair {
                base: prompt(tok, &b.0, b.1)?,
                source: prompt(tok, &s.0, s.1)?,
                cf_label: s.1,
                answers: answers.clone(),
            });
        }
        *ds.split_mut(split) = pairs;
    }
    Ok(ds)
}
