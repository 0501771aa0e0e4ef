//! What each fine-tuning method trains: its configuration (`MethodCfg`), the trained result
//! (`Trained`; LoReFT's in [`super::reft`]) and the named trainable `Var`s the engine's optimizer and checkpoints see.
use crate::adapters::{BoftAdapter, DoraAdapter, Freeze, LoraAdapter, OftAdapter, RoadAdapter, Variant};
use crate::model::{LinearAdapter, Llama, Proj};
use super::reft::{LoreftSet, ReftHook};
use crate::util::rng::Rng;
use anyhow::{bail, Result};
use candle_core::Var;

#[derive(Debug, Clone, PartialEq)]
pub enum MethodCfg {
    Full,
    Lora { r: usize, alpha: f64, dropout: f32, targets: Vec<Proj>, layers: Option<Vec<usize>> },
    Road { variant: Variant, group_size: usize, freeze: Freeze, targets: Vec<Proj>, layers: Option<Vec<usize>> },
    Dora { r: usize, alpha: f64, dropout: f32, targets: Vec<Proj>, layers: Option<Vec<usize>> },
    /// `neumann_terms: None` = the exact Cayley transform.
    Oft { block_size: usize, neumann_terms: Option<usize>, targets: Vec<Proj>, layers: Option<Vec<usize>> },
    Boft { block_size: usize, factors: usize, targets: Vec<Proj>, layers: Option<Vec<usize>> },
    /// pyreft's LoReFT at `block_output` of `layers` (default all), first/last prompt positions.
    Loreft { rank: usize, first_n: usize, last_n: usize, share_weights: bool, layers: Option<Vec<usize>> },
}

impl MethodCfg {
    pub fn label(&self) -> String {
        match self {
            MethodCfg::Full => "full".into(),
            MethodCfg::Lora { r, .. } => format!("lora-r{r}"),
            MethodCfg::Dora { r, .. } => format!("dora-r{r}"),
            MethodCfg::Oft { block_size, .. } => format!("oft-b{block_size}"),
            MethodCfg::Boft { block_size, factors, .. } => format!("boft-b{block_size}-m{factors}"),
            MethodCfg::Loreft { rank, first_n, last_n, .. } => format!("loreft-r{rank}-f{first_n}l{last_n}"),
            MethodCfg::Road { variant, freeze, .. } => {
                let v = variant.peft_name().replace('_', "");
                match (freeze.theta, freeze.alpha) {
                    (false, true) => format!("{v}-angle"),
                    (true, false) => format!("{v}-magnitude"),
                    _ => v,
                }
            }
        }
    }
}

/// The trained parameters (the best dev checkpoint when evaluation ran, else the last step).
pub enum Trained {
    Road(RoadAdapter),
    Lora(LoraAdapter),
    Dora(DoraAdapter),
    Oft(OftAdapter),
    Boft(BoftAdapter),
    /// LoReFT: hooks on the residual stream, no weight adapter.
    Loreft(LoreftSet),
    /// Full fine-tuning: a complete model whose weights are `Var`s.
    Full(Box<Llama>),
}

impl Trained {
    /// Save in peft format (`adapter_config.json` + `adapter_model.safetensors`; a head, if any,
    /// as `head.safetensors`), LoReFT in its own format, or an HF checkpoint for full fine-tuning.
    pub fn save(&self, head: Option<&super::cls::Head>, dir: &std::path::Path, tok: &crate::tokenizer::Tok, base_model: &str) -> Result<()> {
        match self {
            Trained::Road(a) => a.save_peft(dir, base_model)?,
            Trained::Lora(a) => a.save_peft(dir, base_model)?,
            Trained::Dora(a) => a.save_peft(dir, base_model)?,
            Trained::Oft(a) => a.save_peft(dir, base_model)?,
            Trained::Boft(a) => a.save_peft(dir, base_model)?,
            Trained::Loreft(s) => s.save(dir, base_model)?,
            Trained::Full(m) => crate::adapters::merge::save_hf(m, tok, dir)?,
        }
        if let Some(h) = head {
            let map: std::collections::HashMap<String, candle_core::Tensor> = h.named_vars().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
            candle_core::safetensors::save(&map, dir.join("head.safetensors"))?;
        }
        Ok(())
    }
    /// The adapter to run with the base model (`None` for full fine-tuning).
    pub fn adapter(&self) -> Option<&dyn LinearAdapter> {
        match self {
            Trained::Road(a) => Some(a),
            Trained::Lora(a) => Some(a),
            Trained::Dora(a) => Some(a),
            Trained::Oft(a) => Some(a),
            Trained::Boft(a) => Some(a),
            Trained::Full(_) | Trained::Loreft(_) => None,
        }
    }

    pub fn reft(&self) -> Option<&LoreftSet> {
        match self {
            Trained::Loreft(s) => Some(s),
            _ => None,
        }
    }

    /// LoReFT's hooks for a batch of left-padded prompts of these lengths (`None` for the others).
    pub fn prompt_hooks(&self, prompts: &[Vec<u32>]) -> Option<ReftHook> {
        self.reft().map(|s| s.hook(prompts.iter().map(|p| p.len()).collect()))
    }

    /// LoReFT: R's gradients onto the Stiefel tangent space (before clipping and AdamW).
    pub(super) fn project_grads(&self, params: &[(String, Var)], grads: &mut [candle_core::Tensor]) -> Result<()> {
        self.reft().map_or(Ok(()), |s| s.project_grads(params, grads))
    }

    /// LoReFT: R back onto orthonormal rows after the optimizer step.
    pub(super) fn after_step(&self) -> Result<()> {
        self.reft().map_or(Ok(()), |s| s.retract())
    }

    /// Turn LoRA/DoRA dropout on (training, with its own RNG) or off (`None`).
    pub(super) fn set_training(&self, rng: Option<Rng>) {
        match self {
            Trained::Lora(a) => a.set_training(rng),
            Trained::Dora(a) => a.lora.set_training(rng),
            _ => {}
        }
    }
}

/// A fresh adapter (or the full model as `Var`s) for `method`, with its trainable parameters
/// named by their peft keys (checkpoints and resumes match them by name).
pub(super) fn build(base: &Llama, method: &MethodCfg, rng: &mut Rng) -> Result<(Trained, Vec<(String, Var)>)> {
    let layers_of = |l: &Option<Vec<usize>>| l.clone().unwrap_or_else(|| (0..base.cfg.num_layers).collect());
    let dev = base.device();
    Ok(match method {
        MethodCfg::Full => {
            let (vm, m) = base.to_varmap()?;
            let mut p: Vec<(String, Var)> =
                vm.data().lock().map_err(|_| anyhow::anyhow!("VarMap lock"))?.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            p.sort_by(|a, b| a.0.cmp(&b.0));
            (Trained::Full(Box::new(m)), p)
        }
        MethodCfg::Lora { r, alpha, dropout, targets, layers } => {
            let a = LoraAdapter::new(&base.cfg, *r, *alpha, *dropout, layers_of(layers), targets, &mut rng.fork(1), dev)?;
            let p = a.layers.iter().flat_map(|((l, pj), x)| {
                let k = crate::model::weights::peft_module(*l, *pj);
                [(format!("{k}.lora_A.weight"), x.a.clone()), (format!("{k}.lora_B.weight"), x.b.clone())]
            });
            let p = p.collect();
            (Trained::Lora(a), p)
        }
        MethodCfg::Dora { r, alpha, dropout, targets, layers } => {
            let a = DoraAdapter::new(base, *r, *alpha, *dropout, layers_of(layers), targets, &mut rng.fork(1))?;
            let mut p = Vec::new();
            for ((l, pj), x) in &a.lora.layers {
                let k = crate::model::weights::peft_module(*l, *pj);
                p.push((format!("{k}.lora_A.weight"), x.a.clone()));
                p.push((format!("{k}.lora_B.weight"), x.b.clone()));
                p.push((format!("{k}.lora_magnitude_vector"), a.magnitude[&(*l, *pj)].clone()));
            }
            (Trained::Dora(a), p)
        }
        MethodCfg::Oft { block_size, neumann_terms, targets, layers } => {
            let a = OftAdapter::new(&base.cfg, *block_size, *neumann_terms, layers_of(layers), targets, dev)?;
            let p = a.layers.iter().map(|((l, pj), x)| (format!("{}.oft_R.weight", crate::model::weights::peft_module(*l, *pj)), x.weight.clone())).collect();
            (Trained::Oft(a), p)
        }
        MethodCfg::Boft { block_size, factors, targets, layers } => {
            let a = BoftAdapter::new(&base.cfg, *block_size, *factors, layers_of(layers), targets, dev)?;
            let p = a.layers.iter().flat_map(|((l, pj), x)| {
                let k = crate::model::weights::peft_module(*l, *pj);
                [(format!("{k}.boft_R"), x.r.clone()), (format!("{k}.boft_s"), x.s.clone())]
            });
            let p = p.collect();
            (Trained::Boft(a), p)
        }
        MethodCfg::Loreft { rank, first_n, last_n, share_weights, layers } => {
            let s = LoreftSet::new(&base.cfg, *rank, *first_n, *last_n, &layers_of(layers), *share_weights, &mut rng.fork(4), dev)?;
            let p = s.named_vars();
            (Trained::Loreft(s), p)
        }
        MethodCfg::Road { variant, group_size, freeze, targets, layers } => {
            if freeze.theta && freeze.alpha {
                bail!("RoAd with both θ and α frozen has nothing to train");
            }
            let mut a = RoadAdapter::new_identity(&base.cfg, *variant, *group_size, layers_of(layers), targets, dev)?;
            a.freeze = *freeze;
            let p = a.named_trainables();
            (Trained::Road(a), p)
        }
    })
}
