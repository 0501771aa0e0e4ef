//! From a spec's task to checked pairs: build the dataset, run the clean model on every base and
//! source once, report task accuracy, drop pairs the model gets wrong, and cache what cells reuse.
use super::spec::Spec;
use crate::model::{Collector, Fwd, Llama, LogitsAt, Site};
use crate::tasks::{self, Dataset, Pair, Split};
use crate::tokenizer::Tok;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

/// Clean-run facts about one pair.
#[derive(Debug, Clone)]
pub struct Clean {
    /// logit[cf] − logit[base_label] on the clean base and source runs.
    pub ld_base: f64,
    pub ld_source: f64,
    pub base_correct: bool,
    pub source_correct: bool,
}

pub struct Prepared {
    pub data: Dataset,
    pub clean: HashMap<(Split, usize), Clean>,
    /// (accuracy on base+source prompts, kept fraction) per split, before filtering.
    pub report: Vec<(Split, f64, f64, usize)>,
    pub task_accuracy: f64,
}

pub fn build_dataset(spec: &Spec, tok: &Tok) -> Result<Dataset> {
    let t = &spec.task;
    let seed = spec.seed;
    match t.name.as_str() {
        "ioi" => {
            let variable = if t.variable.is_empty() { "flip" } else { &t.variable };
            tasks::ioi::dataset(
                tok,
                &tasks::ioi::IoiConfig { variable: tasks::ioi::Variable::parse(variable)?, templates: t.templates.clone(), sizes: t.sizes, seed },
            )
        }
        "capitals" => {
            if !t.variable.is_empty() && t.variable != "country" {
                bail!("capitals task has one variable, `country`; got {:?}", t.variable);
            }
            let path = if t.path.is_empty() { data_dir().join("capitals.csv") } else { PathBuf::from(&t.path) };
            tasks::capitals::dataset(tok, &tasks::capitals::load_facts(&path)?, t.sizes, seed)
        }
        "equality" => {
            let variable = if t.variable.is_empty() { "left" } else { &t.variable };
            tasks::equality::dataset(tok, tasks::equality::Variable::parse(variable)?, t.sizes, seed)
        }
        "jsonl" => {
            if t.path.is_empty() {
                bail!("task jsonl needs task.path = \"pairs.jsonl\"");
            }
            tasks::jsonl::dataset(tok, &PathBuf::from(&t.path), seed)
        }
        other => bail!("unknown task {other:?} (ioi, capitals, equality, jsonl)"),
    }
}

/// `data/` of the project: the working directory's, else the source tree's.
pub fn data_dir() -> PathBuf {
    let local = PathBuf::from("data");
    if local.is_dir() {
        return local;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data")
}

/// Left-pad a batch of id rows; returns (ids, mask, left offsets).
pub fn left_pad(rows: &[&[u32]]) -> (Vec<Vec<u32>>, Vec<Vec<u8>>, Vec<usize>) {
    let t = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(rows.len());
    let mut mask = Vec::with_capacity(rows.len());
    let mut offs = Vec::with_capacity(rows.len());
    for r in rows {
        let o = t - r.len();
        let mut row = vec![0u32; o];
        row.extend_from_slice(r);
        let mut m = vec![0u8; o];
        m.extend(std::iter::repeat_n(1u8, r.len()));
        ids.push(row);
        mask.push(m);
        offs.push(o);
    }
    (ids, mask, offs)
}

/// Last-position logits for prompts (batched, left padded), with optional activation collection.
pub fn last_logits(model: &Llama, prompts: &[&[u32]], col: Option<&mut Collector>) -> Result<Tensor> {
    let (ids, mask, _) = left_pad(prompts);
    let out = model.forward(
        &ids,
        Fwd {
            attention_mask: Some(&mask),
            hooks: col.map(|c| c as &mut dyn crate::model::Hooks),
            logits: LogitsAt::Last,
            ..Default::default()
        },
    )?;
    Ok(out.logits.expect("requested logits").to_dtype(DType::F32)?)
}

pub const EVAL_BATCH: usize = 32;

/// Rows per intervened forward in a cell's evaluation: [`EVAL_BATCH`] on the CPU; on a GPU,
/// where a forward costs hundreds of kernel launches whatever its size, up to 256 (a
/// 48-pair split is one forward, not two).
pub fn eval_batch(device: &candle_core::Device) -> usize {
    if device.is_cpu() {
        EVAL_BATCH
    } else {
        256
    }
}

/// The clean base and source runs' facts about each pair (last-position logits only).
pub fn clean_facts(model: &Llama, pairs: &[Pair]) -> Result<Vec<Clean>> {
    let mut facts = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(EVAL_BATCH) {
        let prompts: Vec<&[u32]> = chunk.iter().flat_map(|p| [p.base.ids.as_slice(), p.source.ids.as_slice()]).collect();
        let logits = last_logits(model, &prompts, None)?.to_vec2::<f32>()?;
        for (i, p) in chunk.iter().enumerate() {
            let (lb, ls) = (&logits[2 * i], &logits[2 * i + 1]);
            facts.push(Clean {
                ld_base: (lb[p.cf_label as usize] - lb[p.base.label as usize]) as f64,
                ld_source: (ls[p.cf_label as usize] - ls[p.base.label as usize]) as f64,
                base_correct: crate::generate::argmax(lb) == p.base.label,
                source_correct: crate::generate::argmax(ls) == p.source.label,
            });
        }
    }
    Ok(facts)
}

pub fn prepare(spec: &Spec, model: &Llama, tok: &Tok, log: &mut dyn FnMut(String)) -> Result<Prepared> {
    let mut data = build_dataset(spec, tok)?;
    let mut clean = HashMap::new();
    let mut report = Vec::new();
    let (mut right, mut total, mut test_before_filtering) = (0usize, 0usize, 0usize);
    for split in [Split::Train, Split::Dev, Split::Test] {
        let pairs = data.split(split).clone();
        let facts = clean_facts(model, &pairs)?;
        let n = pairs.len();
        let correct: usize = facts.iter().map(|c| c.base_correct as usize + c.source_correct as usize).sum();
        right += correct;
        total += 2 * n;
        let keep: Vec<(Pair, Clean)> = pairs.into_iter().zip(facts).filter(|(_, c)| c.base_correct && c.source_correct).collect();
        let acc = if n > 0 { correct as f64 / (2 * n) as f64 } else { f64::NAN };
        let kept = if n > 0 { keep.len() as f64 / n as f64 } else { f64::NAN };
        if n == 0 {
            log(format!("{:<5} split: 0 pairs", split.name()));
        } else {
            log(format!("{:<5} split: {n} pairs, model accuracy {acc:.3} on base+source prompts, kept {} ({:.0}%)", split.name(), keep.len(), kept * 100.0));
        }
        report.push((split, acc, kept, keep.len()));
        if split == Split::Test {
            test_before_filtering = n;
        }
        let (kept_pairs, kept_clean): (Vec<Pair>, Vec<Clean>) = keep.into_iter().unzip();
        for (i, c) in kept_clean.into_iter().enumerate() {
            clean.insert((split, i), c);
        }
        *data.split_mut(split) = kept_pairs;
    }
    let task_accuracy = right as f64 / total.max(1) as f64;
    if task_accuracy < spec.task.min_accuracy {
        bail!(
            "the model gets only {:.1}% of the task's prompts right (threshold {:.0}%): interventions on a task it cannot do are not meaningful; stopping",
            task_accuracy * 100.0,
            spec.task.min_accuracy * 100.0
        );
    }
    if data.test.is_empty() {
        bail!("{}", no_test_pairs(spec, test_before_filtering));
    }
    Ok(Prepared { data, clean, report, task_accuracy })
}

/// Why no test pair is left: the task made none (a pairs file without test rows, `sizes[2] = 0`),
/// or the model got every one wrong.
fn no_test_pairs(spec: &Spec, before_filtering: usize) -> String {
    if before_filtering > 0 {
        return format!("no test pair left after filtering out the {before_filtering} the model gets wrong");
    }
    match spec.task.name.as_str() {
        "jsonl" => format!("{}: no test pairs (rows with \"split\": \"test\", or rows without a split, 20% of which go to test)", spec.task.path),
        _ => format!("the task has no test pairs (task.sizes[2] = {})", spec.task.sizes[2]),
    }
}

/// Indices grouped by prompt length, so every forward here runs without padding.
fn by_length(prompts: &[&crate::tasks::Prompt]) -> Vec<Vec<usize>> {
    let mut groups: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for (i, p) in prompts.iter().enumerate() {
        groups.entry(p.ids.len()).or_default().push(i);
    }
    groups.into_values().flat_map(|g| g.chunks(EVAL_BATCH).map(|c| c.to_vec()).collect::<Vec<_>>()).collect()
}

/// Clean activations of one split, computed once and shared by every cell of a sweep.
pub struct SplitCache {
    /// Per pair: layer -> block input `[t, d]`.
    base_input: Vec<HashMap<usize, Tensor>>,
    /// Per pair: per layer (k, v) `[n_kv, t, head_dim]`.
    base_kv: Vec<Vec<(Tensor, Tensor)>>,
    /// Per base length, the pairs of that length stacked: a batch (always of one length) gathers
    /// its clean prefix and block input in one launch per tensor instead of one copy per pair.
    by_len: HashMap<usize, LenRows>,
    /// Pair i's row in its length's stacked tensors.
    row_in_len: Vec<usize>,
    /// Per pair: (layer, site) -> activation `[t, w]` (f32).
    base_act: Vec<HashMap<(usize, Site), Tensor>>,
    /// Per pair: the clean base run's last-position logits `[vocab]` (f32).
    base_logits: Vec<Option<Tensor>>,
    /// The same stacked, `[n_pairs, vocab]`: a cell's unchanged rows are one gather.
    base_logits_rows: Option<Tensor>,
    /// When the base (source) prompts share one length: per (layer, site) the activations of
    /// all pairs `[n_pairs, t, w]`, so a cell's rows are one gather each (not one copy per
    /// pair: on a GPU, one launch, not 48).
    base_act_rows: HashMap<(usize, Site), Tensor>,
    source_act_rows: HashMap<(usize, Site), Tensor>,
    source_act: Vec<HashMap<(usize, Site), Tensor>>,
}

/// The base runs of one prompt length, stacked over its pairs (in pair order).
struct LenRows {
    /// Per layer (k, v) `[rows, n_kv, t, hd]`.
    kv: Vec<(Tensor, Tensor)>,
    /// Per cached layer, the block input `[rows, t, d]`.
    input: HashMap<usize, Tensor>,
}

/// Run the clean base and source prompts once, keeping what the cells at `cells` need.
pub fn cache_split(model: &Llama, pairs: &[Pair], cells: &[(usize, Site)]) -> Result<SplitCache> {
    let n = pairs.len();
    let layers: Vec<usize> = {
        let mut l: Vec<usize> = cells.iter().map(|c| c.0).collect();
        l.sort();
        l.dedup();
        l
    };
    let mut sc = SplitCache {
        base_input: vec![HashMap::new(); n],
        base_kv: vec![Vec::new(); n],
        base_act: vec![HashMap::new(); n],
        base_logits: vec![None; n],
        source_act: vec![HashMap::new(); n],
        by_len: HashMap::new(),
        row_in_len: vec![0; n],
        base_logits_rows: None,
        base_act_rows: HashMap::new(),
        source_act_rows: HashMap::new(),
    };
    // Per base group (one length, pair order): its KV cache, to stack per length below.
    let mut group_kv: Vec<(usize, Vec<(Tensor, Tensor)>)> = Vec::new();
    let uniform = pairs.windows(2).all(|w| w[0].base.ids.len() == w[1].base.ids.len());
    for is_base in [true, false] {
        let prompts: Vec<&crate::tasks::Prompt> = pairs.iter().map(|p| if is_base { &p.base } else { &p.source }).collect();
        for group in by_length(&prompts) {
            let ids: Vec<Vec<u32>> = group.iter().map(|&i| prompts[i].ids.clone()).collect();
            let mut wanted: Vec<(usize, Site)> = cells.to_vec();
            if is_base {
                wanted.extend(layers.iter().map(|&l| (l, Site::BlockInput)));
            }
            let mut col = Collector::new(wanted);
            let mut kv = crate::model::KvCache::new(model.cfg.num_layers);
            let out = model.forward(
                &ids,
                Fwd {
                    hooks: Some(&mut col),
                    cache: if is_base { Some(&mut kv) } else { None },
                    logits: if is_base { LogitsAt::Last } else { LogitsAt::None },
                    ..Default::default()
                },
            )?;
            for (k, &i) in group.iter().enumerate() {
                for &c in cells {
                    let a = col.get(c.0, c.1).expect("collected").get(k)?.to_dtype(DType::F32)?;
                    if is_base { &mut sc.base_act[i] } else { &mut sc.source_act[i] }.insert(c, a);
                }
                if is_base {
                    sc.base_logits[i] = Some(out.logits.as_ref().expect("requested logits").get(k)?.to_dtype(DType::F32)?);
                    for &l in &layers {
                        sc.base_input[i].insert(l, col.get(l, Site::BlockInput).expect("collected").get(k)?);
                    }
                    sc.base_kv[i] = (0..model.cfg.num_layers)
                        .map(|l| {
                            let (kk, vv) = kv.layer(l).expect("cache filled");
                            Ok((kk.get(k)?, vv.get(k)?))
                        })
                        .collect::<Result<_>>()?;
                }
            }
            if is_base {
                group_kv.push((ids[0].len(), (0..model.cfg.num_layers).map(|l| kv.layer(l).expect("cache filled").clone()).collect()));
            }
        }
    }
    // by_length keeps pair order within one length, so a length's concatenated groups are its
    // pairs in order.
    let mut lengths: Vec<usize> = group_kv.iter().map(|g| g.0).collect();
    lengths.dedup();
    for len in lengths {
        let groups: Vec<&Vec<(Tensor, Tensor)>> = group_kv.iter().filter(|g| g.0 == len).map(|g| &g.1).collect();
        let kv = (0..model.cfg.num_layers)
            .map(|l| {
                let ks: Vec<&Tensor> = groups.iter().map(|g| &g[l].0).collect();
                let vs: Vec<&Tensor> = groups.iter().map(|g| &g[l].1).collect();
                Ok((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let members: Vec<usize> = (0..n).filter(|&i| pairs[i].base.ids.len() == len).collect();
        for (r, &i) in members.iter().enumerate() {
            sc.row_in_len[i] = r;
        }
        let mut input = HashMap::new();
        for &l in &layers {
            input.insert(l, Tensor::stack(&members.iter().map(|&i| &sc.base_input[i][&l]).collect::<Vec<_>>(), 0)?);
        }
        sc.by_len.insert(len, LenRows { kv, input });
    }
    if n > 0 {
        let logits: Vec<&Tensor> = sc.base_logits.iter().map(|l| l.as_ref().expect("cached with the base run")).collect();
        sc.base_logits_rows = Some(Tensor::stack(&logits, 0)?);
        let source_uniform = pairs.windows(2).all(|w| w[0].source.ids.len() == w[1].source.ids.len());
        let stack = |acts: &[HashMap<(usize, Site), Tensor>], c: &(usize, Site)| Tensor::stack(&acts.iter().map(|a| &a[c]).collect::<Vec<_>>(), 0);
        for c in cells {
            if uniform {
                sc.base_act_rows.insert(*c, stack(&sc.base_act, c)?);
            }
            if source_uniform {
                sc.source_act_rows.insert(*c, stack(&sc.source_act, c)?);
            }
        }
    }
    Ok(sc)
}

/// One base length's stacked caches as a cell sees them: per layer (k, v), and the block input
/// at the cell's layer.
pub type LenView<'a> = (&'a [(Tensor, Tensor)], Tensor);

/// What one cell reads from a split's cache.
pub struct CellCache<'a> {
    /// `[t_i, d]` per pair: the clean base's block input at the cell's layer.
    pub base_input: Vec<Tensor>,
    /// Per pair, all layers: clean (k, v), so positions before the intervened one are reused.
    pub base_kv: Vec<&'a [(Tensor, Tensor)]>,
    /// Per base length: the pairs of that length stacked, per layer their clean (k, v)
    /// `[rows, n_kv, t, hd]`, and their block input at the cell's layer `[rows, t, d]`; pair
    /// i is row `row_in_len[i]` of its length.
    pub by_len: HashMap<usize, LenView<'a>>,
    pub row_in_len: &'a [usize],
    /// `[w]` per pair at the intervened position.
    pub base_vec: Vec<Tensor>,
    /// `base_vec` stacked, `[n_pairs, w]`.
    pub base_rows: Tensor,
    pub source_vec: Vec<Tensor>,
    /// `source_vec` stacked, `[n_pairs, w]`: a batch's sources are one gather.
    pub source_rows: Tensor,
    pub base_pos: Vec<usize>,
    /// Clean base last-position logits `[vocab]` per pair.
    pub base_logits: Vec<&'a Tensor>,
    /// The same stacked, `[n_pairs, vocab]`.
    pub base_logits_rows: Option<&'a Tensor>,
}

impl SplitCache {
    pub fn cell(&self, pairs: &[Pair], layer: usize, site: Site, position: &str) -> Result<CellCache<'_>> {
        let mut c = CellCache {
            base_input: vec![],
            base_kv: vec![],
            by_len: self.by_len.iter().filter_map(|(&len, r)| Some((len, (r.kv.as_slice(), r.input.get(&layer)?.clone())))).collect(),
            row_in_len: &self.row_in_len,
            base_vec: vec![],
            source_vec: vec![],
            source_rows: Tensor::zeros(0, DType::F32, &candle_core::Device::Cpu)?,
            base_rows: Tensor::zeros(0, DType::F32, &candle_core::Device::Cpu)?,
            base_logits_rows: self.base_logits_rows.as_ref(),
            base_pos: vec![],
            base_logits: vec![],
        };
        let mut source_pos = Vec::with_capacity(pairs.len());
        for (i, p) in pairs.iter().enumerate() {
            let (pb, ps) = (p.base.position(position)?, p.source.position(position)?);
            source_pos.push(ps);
            c.base_input.push(self.base_input[i][&layer].clone());
            c.base_kv.push(&self.base_kv[i]);
            c.base_vec.push(self.base_act[i][&(layer, site)].get(pb)?);
            c.source_vec.push(self.source_act[i][&(layer, site)].get(ps)?);
            c.base_pos.push(pb);
            c.base_logits.push(self.base_logits[i].as_ref().expect("cached with the base run"));
        }
        if !pairs.is_empty() {
            c.source_rows = match self.source_act_rows.get(&(layer, site)) {
                Some(all) => at_positions(all, &source_pos)?,
                None => Tensor::stack(&c.source_vec, 0)?,
            };
            c.base_rows = match self.base_act_rows.get(&(layer, site)) {
                Some(all) => at_positions(all, &c.base_pos)?,
                None => Tensor::stack(&c.base_vec, 0)?,
            };
        }
        Ok(c)
    }
}

/// Row i of `all` (`[n, t, w]`) at position `pos[i]`: `[n, w]`, one gather.
fn at_positions(all: &Tensor, pos: &[usize]) -> Result<Tensor> {
    let (n, t, w) = all.dims3()?;
    let flat: Vec<u32> = pos.iter().enumerate().map(|(i, &p)| (i * t + p) as u32).collect();
    let idx = Tensor::from_vec(flat, n, all.device())?;
    Ok(all.reshape((n * t, w))?.index_select(&idx, 0)?)
}
