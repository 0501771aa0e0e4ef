//! `road train-tiny` (the ground-truth equality model) and `road tiny-patch`.
use super::ModelArgs;
use crate::model::load;
use crate::tasks::equality::{Variable, POSITIONS};
use crate::tiny::{self, TinyArch, TrainOpts};
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct TrainTinyArgs {
    /// Output directory (a HF checkpoint: config.json, model.safetensors, tokenizer.json).
    #[arg(long, default_value = "data/models/tiny-equality")]
    pub out: PathBuf,
    #[arg(long, default_value_t = TrainOpts::default().steps)]
    pub steps: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = TrainOpts::default().batch)]
    pub batch: usize,
    #[arg(long, default_value_t = TrainOpts::default().lr)]
    pub lr: f64,
    #[arg(long, default_value_t = TrainOpts::default().weight_decay)]
    pub weight_decay: f64,
    /// Training threads (1 is fastest at this size; the weights do not depend on it).
    #[arg(long, default_value_t = TrainOpts::default().threads)]
    pub threads: usize,
    /// Curriculum: P(a==b)=P(c==d) at step 0, annealed to 0.5 (0.5 = off).
    #[arg(long, default_value_t = TrainOpts::default().p_equal_start)]
    pub p_equal_start: f64,
    #[arg(long, default_value_t = TrainOpts::default().warmup)]
    pub warmup: usize,
    /// Interchange-intervention training weight (0 = plain training; see `TrainOpts::iit_weight`).
    #[arg(long, default_value_t = TrainOpts::default().iit_weight)]
    pub iit_weight: f64,
    /// Block whose output at b (a==b) and d (c==d) IIT trains to carry the variables.
    #[arg(long, default_value_t = TrainOpts::default().iit_layer)]
    pub iit_layer: usize,
    /// Dimension of the subspace IIT swaps (0 = the whole vector).
    #[arg(long, default_value_t = TrainOpts::default().iit_dims)]
    pub iit_dims: usize,
    /// Also train c==d into the subspace at position d.
    #[arg(long)]
    pub iit_right: bool,
    #[arg(long, default_value_t = TinyArch::default().layers)]
    pub layers: usize,
    #[arg(long, default_value_t = TinyArch::default().hidden)]
    pub hidden: usize,
    #[arg(long, default_value_t = TinyArch::default().heads)]
    pub heads: usize,
    #[arg(long, default_value_t = TinyArch::default().kv_heads)]
    pub kv_heads: usize,
    #[arg(long, default_value_t = TinyArch::default().ffn)]
    pub ffn: usize,
}

pub fn train_tiny(a: &TrainTinyArgs) -> Result<()> {
    // candle sizes its CPU worker pool (spinning barrier threads) from these variables on first
    // use; at this model size extra workers only spin, and under load they cost 3-4x wall time.
    // Nothing has touched candle yet, so setting them here takes effect.
    std::env::set_var("CANDLE_NUM_THREADS", a.threads.max(1).to_string());
    std::env::set_var("RAYON_NUM_THREADS", a.threads.max(1).to_string());
    let opts = TrainOpts {
        arch: TinyArch { layers: a.layers, hidden: a.hidden, heads: a.heads, kv_heads: a.kv_heads, ffn: a.ffn, ..Default::default() },
        steps: a.steps,
        batch: a.batch,
        lr: a.lr,
        weight_decay: a.weight_decay,
        seed: a.seed,
        threads: a.threads,
        warmup: a.warmup,
        p_equal_start: a.p_equal_start,
        iit_weight: a.iit_weight,
        iit_layer: a.iit_layer,
        iit_dims: a.iit_dims,
        iit_right: a.iit_right,
        progress: true,
        ..Default::default()
    };
    let cfg = tiny::llama_config(&opts.arch)?;
    eprintln!(
        "training a tiny LLaMA on hierarchical equality: {} blocks, d={}, {} heads / {} kv heads, ffn {}, vocab {} ({} parameters); {} steps x batch {}, seed {}, {} threads",
        cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, cfg.vocab_size,
        cfg.param_count(), opts.steps, opts.batch, opts.seed, opts.threads
    );
    let tr = tiny::train(&opts)?;
    tiny::save(&tr, &a.out)?;
    // Round trip: the saved directory must load through the ordinary HF loader and score the same.
    let l = load::load_hf_dir(&a.out, candle_core::DType::F32, tr.model.device())?;
    let check = tiny::accuracy(&l.model, &l.tok, 1000, 12345)?;
    let orig = tiny::accuracy(&tr.model, &tr.tok, 1000, 12345)?;
    if (check - orig).abs() > 1e-9 {
        bail!("reloaded model scores {check} but the trained one {orig}");
    }
    println!(
        "done in {:.1}s: final train loss {:.5} (mean of last 50 steps), held-out accuracy {:.4} on {} fresh examples",
        tr.secs, tr.final_loss, tr.final_acc, tr.final_eval_examples
    );
    if let Some(why) = &tr.stopped {
        // Saved (the last finite weights, with training_config.json saying where it stopped),
        // but not a success.
        bail!("{why}: training stopped; the model in {} is that step's", a.out.display());
    }
    if let Some(((l, r), comp)) = tr.final_iit_acc {
        println!(
            "interchange accuracy (block_output of block {}, {} swapped): a==b at b {:.4}, c==d at d {:.4}",
            opts.iit_layer,
            if opts.iit_dims == 0 { "whole vector".to_string() } else { format!("{}-dim IIT subspace", opts.iit_dims) },
            l,
            r
        );
        if let Some((l, r)) = comp {
            println!("answer unchanged when everything but the subspace is swapped: at b {l:.4}, at d {r:.4}");
        }
    }
    println!("saved {} (reload check: accuracy {:.4})", a.out.display(), check);
    Ok(())
}

#[derive(Args)]
pub struct TinyPatchArgs {
    #[arg(long, default_value = "tiny-equality")]
    pub model: String,
    /// left, right, output, or all.
    #[arg(long, default_value = "all")]
    pub variable: String,
    /// Test-split pairs per variable.
    #[arg(long, default_value_t = 1024)]
    pub n: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write the table as CSV here.
    #[arg(long)]
    pub csv: Option<PathBuf>,
}

pub fn tiny_patch(a: &TinyPatchArgs) -> Result<()> {
    let m = ModelArgs { model: a.model.clone() };
    let l = m.load()?;
    let vars: Vec<Variable> = if a.variable == "all" { Variable::ALL.to_vec() } else { vec![Variable::parse(&a.variable)?] };
    let mut all = Vec::new();
    for v in vars {
        let cells = tiny::equality_patching(&l.model, &l.tok, v, a.n, a.seed)?;
        println!(
            "\n{}: IIA over {{true,false}} on {} test pairs ({} whose cf label differs from the base label).\n\
             Each cell: whole-vector patch | rank-1 DII along the class-mean difference; [same on changed pairs]",
            v.name(), cells[0].n, cells[0].n_changed
        );
        print!("{:>6}", "layer");
        for p in POSITIONS {
            print!(" {:>25}", p);
        }
        println!();
        for chunk in cells.chunks(POSITIONS.len()) {
            let name = if chunk[0].layer < 0 { "emb".to_string() } else { format!("L{}", chunk[0].layer) };
            print!("{name:>6}");
            for c in chunk {
                print!(" {:.2}|{:.2} [{:.2}|{:.2}]", c.iia, c.iia_meandiff, c.iia_changed, c.iia_meandiff_changed);
            }
            println!();
        }
        all.extend(cells);
    }
    if let Some(p) = &a.csv {
        let mut w = csv::Writer::from_path(p)?;
        for c in &all {
            w.serialize(c)?;
        }
        w.flush()?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}
