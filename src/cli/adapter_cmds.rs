//! `road merge` and `road serve-batch`.
use super::ModelArgs;
use crate::generate::greedy_batch_hooked;
use crate::train::reft::{LoreftSet, ReftHook};
use crate::model::LinearAdapter;
use crate::adapters::{merge, AnyAdapter, MixedAdapters};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct MergeArgs {
    /// Run directories whose metrics.csv to join (sharded sweeps); omit with --adapter.
    pub runs: Vec<PathBuf>,
    /// Name of the joined run's experiment folder (default: the runs' experiment).
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub m: ModelArgs,
    /// peft adapter directory (RoAd, LoRA, DoRA, OFT or BOFT) to merge into the model's weights.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Output checkpoint directory (config.json, model.safetensors, tokenizer.json); must not exist.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Undo a merge instead: `--model` is a merged checkpoint, the result is the base weights.
    #[arg(long)]
    pub unmerge: bool,
}

/// `road merge-runs RUN_DIR... [--name N]`: join sharded runs' metrics into a new run folder.
#[derive(Args)]
pub struct MergeRunsArgs {
    /// Run directories whose metrics.csv to join (the shards of one sweep).
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Name of the joined run's experiment folder (default: the runs' experiment).
    #[arg(long)]
    pub name: Option<String>,
    /// Merge even if shards are missing or did not finish (the result is marked INCOMPLETE).
    #[arg(long)]
    pub allow_incomplete: bool,
}

/// `road merge-adapter --model M --adapter DIR --out DIR [--unmerge]`.
#[derive(Args)]
pub struct MergeAdapterArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// peft adapter directory to merge into the model's weights.
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output checkpoint directory (config.json, model.safetensors, tokenizer.json); must not exist.
    #[arg(long)]
    pub out: PathBuf,
    /// Undo a merge instead: `--model` is a merged checkpoint, the result is the base weights.
    #[arg(long)]
    pub unmerge: bool,
}

pub fn merge_runs_cmd(a: &MergeRunsArgs) -> Result<()> {
    merge_runs(&a.runs, a.name.as_deref(), a.allow_incomplete)
}

/// `--name` is a folder under notebooks-out/: checked before any shard is read.
fn merge_runs(runs: &[PathBuf], name: Option<&str>, allow_incomplete: bool) -> Result<()> {
    if let Some(n) = name {
        crate::runs::check_name("--name", n)?;
    }
    super::experiment_cmds::merge(runs, name, allow_incomplete)
}

pub fn merge_adapter_cmd(a: &MergeAdapterArgs) -> Result<()> {
    merge_adapter(&a.m, &a.adapter, &a.out, a.unmerge)
}

/// The old spelling, kept working: dispatches on whether `--adapter` was given.
pub fn merge_cmd(a: &MergeArgs) -> Result<()> {
    eprintln!("note: `road merge` is now two commands, `road merge-runs` and `road merge-adapter`");
    let Some(adapter) = &a.adapter else {
        if a.runs.is_empty() {
            bail!("road merge needs run directories (to join metrics) or --adapter DIR --out DIR (to merge an adapter)");
        }
        return merge_runs(&a.runs, a.name.as_deref(), false);
    };
    if !a.runs.is_empty() {
        bail!("road merge: give either run directories or --adapter, not both");
    }
    let Some(out) = &a.out else { bail!("road merge --adapter needs --out DIR") };
    merge_adapter(&a.m, adapter, out, a.unmerge)
}

fn merge_adapter(m: &ModelArgs, adapter: &Path, out: &Path, unmerge: bool) -> Result<()> {
    if out.exists() {
        bail!("{} already exists; not overwriting", out.display());
    }
    let mut l = m.load()?;
    let ad = AnyAdapter::load(adapter, &l.model.cfg, l.model.device())?;
    if unmerge {
        merge::unmerge(&mut l.model, &ad)?;
    } else {
        merge::merge(&mut l.model, &ad)?;
    }
    merge::save_hf(&l.model, &l.tok, out)?;
    println!("{} {} adapter into {}", if unmerge { "unmerged" } else { "merged" }, ad.kind(), out.display());
    Ok(())
}

#[derive(Args)]
pub struct ServeBatchArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// name=DIR pairs, comma-separated (e.g. a=runs/x/adapter,b=runs/y/adapter): peft adapters of
    /// any kind, or LoReFT directories (reft_config.json), each row its own.
    #[arg(long, value_delimiter = ',')]
    pub adapters: Vec<String>,
    /// JSONL, one request a line: {"adapter": NAME or null, "prompt": TEXT, "max_tokens": N}.
    #[arg(long)]
    pub requests: PathBuf,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    #[serde(default)]
    adapter: Option<String>,
    prompt: String,
    #[serde(default = "default_max")]
    max_tokens: usize,
}

fn default_max() -> usize {
    32
}

pub fn serve_batch(a: &ServeBatchArgs) -> Result<()> {
    let l = a.m.load()?;
    // peft adapters share the weight path (MixedAdapters); LoReFT directories the per-row hooks.
    let (mut named, mut refts) = (Vec::new(), Vec::new());
    for spec in &a.adapters {
        let (name, dir) = spec.split_once('=').with_context(|| format!("--adapters entry {spec:?} is not NAME=DIR"))?;
        if named.iter().any(|(n, _)| n == name) || refts.iter().any(|(n, _)| n == name) {
            bail!("--adapters: the name {name:?} is given twice");
        }
        let dir = std::path::Path::new(dir);
        if LoreftSet::is_reft_dir(dir) {
            refts.push((name.to_string(), LoreftSet::load(dir, &l.model.cfg, l.model.device()).with_context(|| format!("adapter {name}"))?));
        } else {
            named.push((name.to_string(), AnyAdapter::load(dir, &l.model.cfg, l.model.device()).with_context(|| format!("adapter {name}"))?));
        }
    }
    let text = std::fs::read_to_string(&a.requests).with_context(|| format!("cannot read {}", a.requests.display()))?;
    let mut reqs = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let r: Request = serde_json::from_str(line).with_context(|| format!("{}: line {}", a.requests.display(), i + 1))?;
        reqs.push(r);
    }
    if reqs.is_empty() {
        bail!("{}: no requests", a.requests.display());
    }
    let mut mixed = MixedAdapters::new(&named, &l.model)?;
    let reft_row = |r: &Request| r.adapter.as_deref().and_then(|n| refts.iter().position(|(m, _)| m == n));
    let rows = reqs
        .iter()
        .map(|r| match r.adapter.as_deref() {
            None => Ok(None),
            Some(_) if reft_row(r).is_some() => Ok(None),
            Some(n) => named.iter().position(|(m, _)| m == n).map(Some).with_context(|| {
                let all: Vec<&str> = named.iter().map(|(n, _)| n.as_str()).chain(refts.iter().map(|(n, _)| n.as_str())).collect();
                format!("request adapter {n:?} is not among --adapters ({})", all.join(", "))
            }),
        })
        .collect::<Result<Vec<_>>>()?;
    mixed.set_rows(&rows, l.model.dtype())?;
    let prompts = reqs.iter().map(|r| l.tok.encode(&r.prompt)).collect::<Result<Vec<_>>>()?;
    let mut hook = (!refts.is_empty()).then(|| {
        let sets = refts.iter().map(|(_, s)| s.clone()).collect();
        ReftHook::mixed(sets, reqs.iter().map(reft_row).collect(), prompts.iter().map(Vec::len).collect())
    });
    for (i, (r, p)) in reqs.iter().zip(&prompts).enumerate() {
        crate::generate::check_max_tokens(&l.model, p.len(), r.max_tokens, &format!("{}: request {} max_tokens", a.requests.display(), i + 1))?;
    }
    let maxes: Vec<usize> = reqs.iter().map(|r| r.max_tokens).collect();
    let hooks = hook.as_mut().map(|h| h as &mut dyn crate::model::Hooks);
    let g = greedy_batch_hooked(&l.model, Some(&mixed as &dyn LinearAdapter), hooks, &prompts, &maxes, &l.tok.eos)?;
    for (r, toks) in reqs.iter().zip(&g.tokens) {
        let v = serde_json::json!({"adapter": r.adapter, "prompt": r.prompt, "completion": l.tok.decode(toks)?, "tokens": toks});
        println!("{}", serde_json::to_string(&v)?);
    }
    let n: usize = g.tokens.iter().map(|t| t.len()).sum();
    eprintln!("[{} rows in one batch, {} adapters; {n} tokens generated in {:.2}s]", reqs.len(), named.len() + refts.len(), g.prefill_secs + g.decode_secs);
    Ok(())
}
