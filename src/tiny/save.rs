//! Writing a trained tiny model as a Hugging Face checkpoint directory that the ordinary loader
//! reads back: config.json (`LlamaConfig::to_hf_json` plus the pad id), model.safetensors,
//! tokenizer.json, training_config.json (the full training record and the command that
//! regenerates it) and, with IIT, the trained subspace.
use super::arch::{vocab, PAD};
use super::train::Trained;
use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// The subspace IIT trained to carry each equality (rows of `basis`, `[k, hidden]`).
pub const IIT_SUBSPACE_FILE: &str = "iit_subspace.safetensors";

/// Write a Hugging Face checkpoint directory: config.json, model.safetensors (f32, HF names, tied
/// head omitted), tokenizer.json, training_config.json.
pub fn save(tr: &Trained, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cfg = &tr.model.cfg;
    let mut config = cfg.to_hf_json("float32");
    config["pad_token_id"] = vocab().iter().position(|w| w == PAD).context("the vocabulary has no pad token")?.into();
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config)? + "\n")?;
    let tensors: HashMap<String, Tensor> = tr
        .model
        .named_weights()?
        .into_iter()
        .map(|(k, t)| Ok((k, t.detach().to_dtype(DType::F32)?.contiguous()?)))
        .collect::<Result<_>>()?;
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    tr.tokenizer
        .save(dir.join("tokenizer.json"), true)
        .map_err(|e| anyhow!("saving tokenizer.json: {e}"))?;
    let o = &tr.opts;
    let rec = serde_json::json!({
        "task": "hierarchical equality: (a==b)==(c==d) over symbols s0..s29, answer token true/false",
        "seed": o.seed, "steps": o.steps, "batch": o.batch, "lr": o.lr, "min_lr_frac": o.min_lr_frac,
        "warmup": o.warmup, "schedule": "linear warm-up, cosine decay",
        "curriculum": {"p_equal_start": o.p_equal_start, "anneal_to_0.5_over_fraction_of_steps": o.curriculum_frac},
        "optimizer": {"name": "AdamW", "implementation": "src/train/optim.rs", "beta1": 0.9, "beta2": 0.98, "eps": 1e-8,
            "weight_decay": o.weight_decay, "weight_decay_on": "matrices (norm gains: 0)"},
        "arch": o.arch, "parameters": cfg.param_count(),
        "final_train_loss_last50": tr.final_loss,
        "final_heldout_accuracy": tr.final_acc, "final_heldout_examples": tr.final_eval_examples,
        "iit": {"weight": o.iit_weight, "layer": o.iit_layer, "site": "block_output",
            "subspace_dims": o.iit_dims, "subspace_file": if tr.iit_basis.is_some() { Some(IIT_SUBSPACE_FILE) } else { None },
            "positions": if o.iit_right { serde_json::json!({"left (a==b)": "b", "right (c==d)": "d"}) } else { serde_json::json!({"left (a==b)": "b"}) },
            "trained_variables": if o.iit_right { "left, right" } else { "left (right reported, not trained)" },
            "schedule": "cycle per step over the trained variables: subspace swapped (answer follows the source's variable), then everything but the subspace swapped (answer must not change)",
            "final_heldout_iit_accuracy": tr.final_iit_acc.map(|((l, r), c)| serde_json::json!({
                "subspace": {"left": l, "right": r},
                "complement": c.map(|(l, r)| serde_json::json!({"left": l, "right": r})),
            }))},
        "heldout_accuracy_curve": tr.evals,
        "train_seconds": tr.secs,
        "stopped": tr.stopped,
        "threads": o.threads,
        "regenerate": format!(
            "road train-tiny --out {} --steps {} --seed {} --iit-weight {} --iit-layer {} --iit-dims {}{}",
            dir.display(), o.steps, o.seed, o.iit_weight, o.iit_layer, o.iit_dims, if o.iit_right { " --iit-right" } else { "" }
        ),
    });
    std::fs::write(dir.join("training_config.json"), serde_json::to_string_pretty(&rec)? + "\n")?;
    if let Some(b) = &tr.iit_basis {
        let t = HashMap::from([("basis".to_string(), b.contiguous()?)]);
        candle_core::safetensors::save(&t, dir.join(IIT_SUBSPACE_FILE))?;
    }
    Ok(())
}
