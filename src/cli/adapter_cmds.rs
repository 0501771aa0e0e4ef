//! `road merge` and `road serve-batch`.
use super::ModelArgs;
use crate::generate::greedy_batch;
use crate::model::LinearAdapter;
use crate::road::{merge, AnyAdapter, MixedAdapters};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct MergeArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// peft RoAd or LoRA adapter directory.
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output checkpoint directory (config.json, model.safetensors, tokenizer.json); must not exist.
    #[arg(long)]
    pub out: PathBuf,
    /// Undo a merge instead: `--model` is a merged checkpoint, the result is the base weights.
    #[arg(long)]
    pub unmerge: bool,
}

pub fn merge_cmd(a: &MergeArgs) -> Result<()> {
    if a.out.exists() {
        bail!("{} already exists; not overwriting", a.out.display());
    }
    let mut l = a.m.load()?;
    let ad = AnyAdapter::load(&a.adapter, &l.model.cfg, l.model.device())?;
    if a.unmerge {
        merge::unmerge(&mut l.model, &ad)?;
    } else {
        merge::merge(&mut l.model, &ad)?;
    }
    merge::save_hf(&l.model, &l.tok, &a.out)?;
    println!("{} {} adapter into {}", if a.unmerge { "unmerged" } else { "merged" }, ad.kind(), a.out.display());
    Ok(())
}

#[derive(Args)]
pub struct ServeBatchArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// name=DIR pairs, comma-separated (e.g. a=runs/x/adapter,b=runs/y/adapter).
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
    let mut named = Vec::new();
    for spec in &a.adapters {
        let (name, dir) = spec.split_once('=').with_context(|| format!("--adapters entry {spec:?} is not NAME=DIR"))?;
        named.push((name.to_string(), AnyAdapter::load(std::path::Path::new(dir), &l.model.cfg, l.model.device()).with_context(|| format!("adapter {name}"))?));
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
    let mut mixed = MixedAdapters::new(&named, &l.model.cfg, l.model.device())?;
    let rows = reqs.iter().map(|r| r.adapter.as_deref().map(|n| mixed.index(n)).transpose()).collect::<Result<Vec<_>>>()?;
    mixed.set_rows(&rows, l.model.dtype())?;
    let prompts = reqs.iter().map(|r| l.tok.encode(&r.prompt)).collect::<Result<Vec<_>>>()?;
    let maxes: Vec<usize> = reqs.iter().map(|r| r.max_tokens).collect();
    let g = greedy_batch(&l.model, Some(&mixed as &dyn LinearAdapter), &prompts, &maxes, &l.tok.eos)?;
    for (r, toks) in reqs.iter().zip(&g.tokens) {
        let v = serde_json::json!({"adapter": r.adapter, "prompt": r.prompt, "completion": l.tok.decode(toks)?, "tokens": toks});
        println!("{}", serde_json::to_string(&v)?);
    }
    let n: usize = g.tokens.iter().map(|t| t.len()).sum();
    eprintln!("[{} rows in one batch, {} adapters; {n} tokens generated in {:.2}s]", reqs.len(), named.len(), g.prefill_secs + g.decode_secs);
    Ok(())
}
