//! The study's fine-tunes, cached: each method is a `road finetune` spec whose resolved TOML
//! (plus the crate version and a fingerprint of the base weights) hashes to a folder under
//! `$ROAD_CACHE/finetunes/`. A re-run loads the finished fine-tune from there instead of training
//! again (unless `--fresh`). Training writes into the cache and the study always reads back from
//! it, so both paths give the same model.
use super::spec::{PilotMethod, PilotSpec};
use crate::runs::short_hash;
use crate::model::{load, LinearAdapter, Llama};
use crate::adapters::AnyAdapter;
use crate::tokenizer::Tok;
use crate::train::reft::LoreftSet;
use crate::train::run::{finetune_and_test, Summary};
use anyhow::{bail, Context, Result};
use candle_core::DType;
use std::path::PathBuf;

/// One method's result, as recorded in `finetunes.csv` / `road_ablation.csv`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FtRecord {
    pub method: String,
    pub kind: String,
    /// RoAd: which of θ/α trained ("both", "angle", "magnitude"); empty otherwise.
    pub trains: String,
    pub trainable_params: usize,
    pub trainable_pct: f64,
    pub steps: usize,
    pub lr: f64,
    pub best_step: usize,
    pub train_secs: f64,
    pub dev_accuracy: f64,
    pub test_accuracy: f64,
    pub test_majority: f64,
    pub test_n: usize,
    pub seed: u64,
    /// The cache key (resolved finetune spec hash).
    pub hash: String,
    /// Whether this run loaded it from the cache.
    #[serde(default)]
    pub cached: bool,
}

pub struct Tuned {
    pub record: FtRecord,
    full: Option<Llama>,
    adapter: Option<AnyAdapter>,
    reft: Option<LoreftSet>,
}

impl Tuned {
    pub fn model<'a>(&'a self, base: &'a Llama) -> &'a Llama {
        self.full.as_ref().unwrap_or(base)
    }
    pub fn adapter(&self) -> Option<&dyn LinearAdapter> {
        self.adapter.as_ref().map(|a| a as &dyn LinearAdapter)
    }
    /// LoReFT's interventions as per-call hooks for prompts of these lengths (`None` otherwise).
    pub fn hooks(&self) -> Option<impl Fn(&[usize]) -> Box<dyn crate::model::Hooks> + '_> {
        self.reft.as_ref().map(|s| move |lens: &[usize]| Box::new(s.hook(lens.to_vec())) as Box<dyn crate::model::Hooks>)
    }
    /// The saved adapter itself (its kind and parameters), `None` for full fine-tuning.
    pub fn saved_adapter(&self) -> Option<&AnyAdapter> {
        self.adapter.as_ref()
    }
}

/// Per-tensor sum and sum of squares of the base weights, hashed: cheap (one pass over the
/// weights) and different for any retrained model. Computed once per study and passed to
/// [`obtain`] for every method.
pub fn weights_fingerprint(base: &Llama) -> Result<String> {
    let mut s = String::new();
    for (name, t) in base.named_weights()? {
        let t = t.to_dtype(candle_core::DType::F32)?.flatten_all()?;
        let sum = t.sum_all()?.to_scalar::<f32>()?;
        let sq = t.sqr()?.sum_all()?.to_scalar::<f32>()?;
        s.push_str(&format!("{name}:{sum:e}:{sq:e};"));
    }
    Ok(short_hash(&s))
}

pub fn cache_root() -> PathBuf {
    crate::fetch::cache_dir().join("finetunes")
}

/// Train (or load from the cache) the fine-tune of method `m`; `base_fingerprint` is
/// [`weights_fingerprint`] of `base`.
pub fn obtain(spec: &PilotSpec, m: &PilotMethod, base: &Llama, base_fingerprint: &str, tok: &Tok, fresh: bool) -> Result<Tuned> {
    let ft = spec.finetune_spec(m)?;
    let text = ft.to_toml()?;
    // The spec names the model, not its weights: a retrained or replaced model under the same
    // name must not reuse fine-tunes of the old one.
    let hash = short_hash(&format!("{text}\nroad-dii {}\nweights {base_fingerprint}", env!("CARGO_PKG_VERSION")));
    let dir = cache_root().join(format!("{}-{hash}", ft.name));
    let record_path = dir.join("record.json");
    let cached = !fresh && record_path.exists();
    if !cached {
        // Train into a private folder and rename it into place, so an interrupted run never
        // leaves a half-written fine-tune that a later run would take for finished.
        let tmp = cache_root().join(format!(".{}-{hash}.partial-{}", ft.name, std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        std::fs::write(tmp.join("config.toml"), &text)?;
        eprintln!("[{}] fine-tuning ({} steps); cache {}", m.label, ft.train.steps, dir.display());
        let s: Summary = finetune_and_test(&ft, base, tok, &tmp, false)?;
        if let Some(why) = &s.stopped {
            // A diverged fine-tune is not cached as if it had finished.
            bail!("[{}] {why}: training stopped (lower this method's lr)", m.label);
        }
        let test = s.test.context("the fine-tune has no test metrics (classification tasks only)")?;
        let mk = &ft.method;
        let record = FtRecord {
            method: m.label.clone(),
            kind: mk.kind.clone(),
            trains: if mk.kind == "road" { mk.train.clone() } else { String::new() },
            trainable_params: s.trainable_params,
            trainable_pct: s.trainable_pct,
            steps: s.steps,
            lr: ft.train.lr,
            best_step: s.best_step,
            train_secs: s.train_secs,
            dev_accuracy: s.dev_accuracy.unwrap_or(f64::NAN),
            test_accuracy: test.accuracy,
            test_majority: test.majority,
            test_n: test.n,
            seed: s.seed,
            hash: hash.clone(),
            cached: false,
        };
        std::fs::write(tmp.join("record.json"), serde_json::to_string_pretty(&record)?)?;
        // Optimizer moments are only for resuming; a finished fine-tune does not need them.
        let _ = std::fs::remove_dir_all(tmp.join("checkpoint"));
        if fresh {
            let _ = std::fs::remove_dir_all(&dir);
        }
        std::fs::rename(&tmp, &dir).with_context(|| format!("cannot move {} to {}", tmp.display(), dir.display()))?;
    } else {
        eprintln!("[{}] reusing the cached fine-tune {}", m.label, dir.display());
    }
    let mut record: FtRecord = serde_json::from_str(&std::fs::read_to_string(&record_path)?)
        .with_context(|| format!("{} is damaged; re-run with --fresh", record_path.display()))?;
    record.cached = cached;
    let saved = dir.join("adapter");
    let (full, adapter, reft) = match ft.method.kind.as_str() {
        "full" => (Some(load::load_hf_dir(&saved, DType::F32, base.device())?.model), None, None),
        "loreft" => (None, None, Some(LoreftSet::load(&saved, &base.cfg, base.device())?)),
        _ => (None, Some(AnyAdapter::load(&saved, &base.cfg, base.device())?), None),
    };
    Ok(Tuned { record, full, adapter, reft })
}
