//! LoReFT fine-tuning after pyreft: `Φ(h) = h + Rᵀ(W h + b − R h)` (the math of
//! [`crate::intervene::loreft`]) on the residual stream after chosen blocks (`block_output`,
//! pyreft's `model.layers[l].output`), at the first `first_n` and last `last_n` prompt tokens,
//! with everything else frozen. As pyreft without `share_weights`, the first and the last
//! positions of a layer have their own intervention; with it, one serves both.
//!
//! R keeps orthonormal rows the way the project's DAS does (Riemannian): its gradient is
//! projected onto the Stiefel tangent space before AdamW and the QR retraction follows each step
//! (pyreft instead re-parametrises R through torch's `orthogonal` parametrisation).
//!
//! Saved as `reft_config.json` + `reft_model.safetensors` (README, "LoReFT adapters"); tensor
//! names are pyvene's intervention keys plus pyreft's state-dict names.
use crate::intervene::loreft::LoReft;
use crate::intervene::orth;
use crate::model::{Hooks, LlamaConfig, Site, SiteCtx};
use crate::tokenizer::Tok;
use crate::util::rng::Rng;
use super::data::ClsExample;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::path::Path;

pub const CONFIG_FILE: &str = "reft_config.json";
pub const WEIGHTS_FILE: &str = "reft_model.safetensors";

/// Which prompt positions an intervention acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    First,
    Last,
    /// `share_weights`: the first and the last positions.
    Both,
}

#[derive(Clone)]
pub struct Unit {
    pub layer: usize,
    pub side: Side,
    pub int: LoReft,
}

impl Unit {
    /// pyvene's key of this intervention: the first-position copy of a layer is `#0`, the
    /// last-position one `#1` (pyreft lists the layers twice when weights are not shared).
    pub fn key(&self) -> String {
        let i = usize::from(self.side == Side::Last);
        format!("layer_{}_comp_block_output_unit_pos_nunit_1#{i}", self.layer)
    }
}

/// The trained interventions of one LoReFT fine-tune.
#[derive(Clone)]
pub struct LoreftSet {
    pub rank: usize,
    pub first_n: usize,
    pub last_n: usize,
    pub units: Vec<Unit>,
}

/// pyreft's positions for a prompt of `len` tokens (`get_intervention_locations` with
/// `last_position = len`): `min(len/2, first_n)` first and `min(len/2, last_n)` last ones. The
/// slots pyreft fills with a pad position are left out (a pad token changes nothing).
pub fn positions(len: usize, first_n: usize, last_n: usize) -> (Vec<usize>, Vec<usize>) {
    let (f, l) = ((len / 2).min(first_n), (len / 2).min(last_n));
    ((0..f).collect(), (len - l..len).collect())
}

impl LoreftSet {
    /// Fresh interventions: R random orthonormal, W ~ N(0, 1/d), b = 0 (pyreft: torch's
    /// orthogonal init and `nn.Linear`'s uniform ±1/√d).
    pub fn new(cfg: &LlamaConfig, rank: usize, first_n: usize, last_n: usize, layers: &[usize], share: bool, rng: &mut Rng, dev: &Device) -> Result<Self> {
        let d = cfg.hidden_size;
        if rank == 0 || rank > d {
            bail!("LoReFT rank {rank} must be between 1 and the hidden size {d}");
        }
        if first_n + last_n == 0 {
            bail!("LoReFT needs at least one position (first_n or last_n)");
        }
        if let Some(l) = layers.iter().find(|&&l| l >= cfg.num_layers) {
            bail!("LoReFT layer {l} out of range (the model has {} layers)", cfg.num_layers);
        }
        let sides: Vec<Side> = match (share, first_n > 0, last_n > 0) {
            (true, _, _) | (_, true, false) | (_, false, true) => vec![if last_n == 0 { Side::First } else if first_n == 0 { Side::Last } else { Side::Both }],
            _ => vec![Side::First, Side::Last],
        };
        let mut units = Vec::new();
        for &side in &sides {
            for &layer in layers {
                units.push(Unit { layer, side, int: LoReft::new(d, rank, rng.next_u64(), dev)? });
            }
        }
        Ok(Self { rank, first_n, last_n, units })
    }

    pub fn share_weights(&self) -> bool {
        self.units.iter().any(|u| u.side == Side::Both)
    }

    /// Trainable variables named `<key>.rotate_layer` (R, `[rank, d]`), `<key>.weight` and `<key>.bias`.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let mut v = Vec::new();
        for u in &self.units {
            let k = u.key();
            v.push((format!("{k}.rotate_layer"), u.int.r.clone()));
            v.push((format!("{k}.weight"), u.int.w.clone()));
            v.push((format!("{k}.bias"), u.int.bias.clone()));
        }
        v
    }

    pub fn num_params(&self) -> usize {
        self.named_vars().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Project the gradients of the R's (by name, from [`Self::named_vars`]) onto the Stiefel tangent space.
    pub fn project_grads(&self, params: &[(String, Var)], grads: &mut [Tensor]) -> Result<()> {
        for ((name, v), g) in params.iter().zip(grads.iter_mut()) {
            if name.ends_with(".rotate_layer") {
                *g = orth::tangent_projection(g, v.as_tensor())?.detach();
            }
        }
        Ok(())
    }

    /// Back onto orthonormal rows after an optimizer step.
    pub fn retract(&self) -> Result<()> {
        self.units.iter().try_for_each(|u| orth::retract(&u.int.r))
    }

    /// The hooks for a batch of prompts of these (unpadded) lengths, left-padded to the longest.
    pub fn hook(&self, lens: Vec<usize>) -> ReftHook {
        let rows = vec![Some(0); lens.len()];
        ReftHook::mixed(vec![self.clone()], rows, lens)
    }

    /// Per-batch hooks for [`super::cls::evaluate`]: the prompts' lengths as it encodes them.
    pub fn eval_hooks<'a>(&'a self, tok: &'a Tok, template: &'a str, max_len: usize) -> impl FnMut(&[ClsExample]) -> Result<Box<dyn Hooks>> + 'a {
        move |chunk: &[ClsExample]| {
            let lens = chunk.iter().map(|e| Ok(super::cls::encode_prompt(tok, template, &e.text, max_len)?.len())).collect::<Result<Vec<_>>>()?;
            Ok(Box::new(self.hook(lens)) as Box<dyn Hooks>)
        }
    }
}

/// Applies every unit of a [`LoreftSet`] at its layer's `block_output`, at the prompt positions
/// a call covers: columns are absolute (`pos_offset` + column, in the left-padded batch), so a
/// prompt split over KV-cache calls is intervened on once per position, and generated tokens
/// (beyond the prompt) are left alone, as in pyreft. Each row has its own set (or none): a mixed
/// batch of `road serve-batch`.
pub struct ReftHook {
    sets: Vec<LoreftSet>,
    /// Per batch row: the index of its set in `sets`, or None.
    rows: Vec<Option<usize>>,
    lens: Vec<usize>,
    width: usize,
}

impl ReftHook {
    /// Row `i` (prompt length `lens[i]`) gets `sets[rows[i]]`, or no intervention.
    pub fn mixed(sets: Vec<LoreftSet>, rows: Vec<Option<usize>>, lens: Vec<usize>) -> Self {
        let width = lens.iter().copied().max().unwrap_or(0);
        Self { sets, rows, lens, width }
    }
}

impl Hooks for ReftHook {
    fn wants(&self, layer: usize, site: Site) -> bool {
        site == Site::BlockOutput && self.sets.iter().any(|s| s.units.iter().any(|u| u.layer == layer))
    }
    fn on(&mut self, layer: usize, _: Site, act: &Tensor, ctx: SiteCtx) -> Result<Option<Tensor>> {
        let (b, t, _) = act.dims3()?;
        let o = ctx.pos_offset;
        if o >= self.width {
            return Ok(None);
        }
        if b != self.lens.len() || b != self.rows.len() {
            bail!("LoReFT hook has {} prompt lengths for a batch of {b}", self.lens.len());
        }
        let h = act.to_dtype(DType::F32)?;
        let mut out = h.clone();
        for (si, set) in self.sets.iter().enumerate() {
            for u in set.units.iter().filter(|u| u.layer == layer) {
                let mut mask = vec![0f32; b * t];
                for (i, &len) in self.lens.iter().enumerate().filter(|&(i, _)| self.rows[i] == Some(si)) {
                    let (first, last) = positions(len, set.first_n, set.last_n);
                    let pad = self.width - len; // left padding
                    let chosen: Vec<usize> = match u.side {
                        Side::First => first,
                        Side::Last => last,
                        Side::Both => first.into_iter().chain(last).collect(),
                    };
                    for c in chosen.into_iter().map(|p| pad + p).filter(|&c| (o..o + t).contains(&c)) {
                        mask[i * t + c - o] = 1.0;
                    }
                }
                if mask.iter().all(|&m| m == 0.0) {
                    continue;
                }
                let mask = Tensor::from_vec(mask, (b, t, 1), act.device())?;
                out = (out + u.int.delta(&h)?.broadcast_mul(&mask)?)?;
            }
        }
        Ok(Some(out.to_dtype(act.dtype())?))
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Representation {
    layer: usize,
    component: String,
    low_rank_dimension: usize,
    positions: Side,
    key: String,
}

/// `reft_config.json`: pyreft's `ReftConfig` fields plus the positions, so a directory is complete.
#[derive(serde::Serialize, serde::Deserialize)]
struct ReftConfigJson {
    intervention_type: String,
    base_model_name_or_path: String,
    /// pyreft's position string, e.g. "f1+l1".
    position: String,
    first_n: usize,
    last_n: usize,
    share_weights: bool,
    embed_dim: usize,
    low_rank_dimension: usize,
    representations: Vec<Representation>,
}

impl LoreftSet {
    /// Write `reft_config.json` and `reft_model.safetensors` (per unit `<key>.rotate_layer` as
    /// pyreft stores it, `[d, rank]` = Rᵀ; `<key>.weight` `[rank, d]`, `<key>.bias` `[rank]`).
    pub fn save(&self, dir: &Path, base_model: &str) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let d = self.units.first().map(|u| u.int.r.dim(1)).transpose()?.unwrap_or(0);
        let cfg = ReftConfigJson {
            intervention_type: "LoreftIntervention".into(),
            base_model_name_or_path: base_model.into(),
            position: format!("f{}+l{}", self.first_n, self.last_n),
            first_n: self.first_n,
            last_n: self.last_n,
            share_weights: self.share_weights(),
            embed_dim: d,
            low_rank_dimension: self.rank,
            representations: self
                .units
                .iter()
                .map(|u| Representation { layer: u.layer, component: "block_output".into(), low_rank_dimension: self.rank, positions: u.side, key: u.key() })
                .collect(),
        };
        std::fs::write(dir.join(CONFIG_FILE), serde_json::to_string_pretty(&cfg)?)?;
        let mut map = std::collections::HashMap::new();
        for u in &self.units {
            let k = u.key();
            map.insert(format!("{k}.rotate_layer"), u.int.r.as_tensor().t()?.contiguous()?);
            map.insert(format!("{k}.weight"), u.int.w.as_tensor().clone());
            map.insert(format!("{k}.bias"), u.int.bias.as_tensor().clone());
        }
        candle_core::safetensors::save(&map, dir.join(WEIGHTS_FILE))?;
        Ok(())
    }

    /// Whether `dir` holds a LoReFT fine-tune (rather than a peft adapter).
    pub fn is_reft_dir(dir: &Path) -> bool {
        dir.join(CONFIG_FILE).exists()
    }

    /// Read a directory written by [`Self::save`], checked against the model's hidden size and layers.
    pub fn load(dir: &Path, cfg: &LlamaConfig, dev: &Device) -> Result<Self> {
        let p = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        let c: ReftConfigJson = serde_json::from_str(&text).with_context(|| format!("{} is not a LoReFT config", p.display()))?;
        if c.intervention_type != "LoreftIntervention" {
            bail!("{}: intervention_type {:?} (only LoreftIntervention is supported)", p.display(), c.intervention_type);
        }
        if c.embed_dim != cfg.hidden_size {
            bail!("{}: embed_dim {} but the model's hidden size is {}", p.display(), c.embed_dim, cfg.hidden_size);
        }
        let w = dir.join(WEIGHTS_FILE);
        let t = candle_core::safetensors::load(&w, dev).with_context(|| format!("cannot read {}", w.display()))?;
        let get = |k: &str| t.get(k).cloned().with_context(|| format!("{}: no tensor {k}", w.display()));
        let mut units = Vec::new();
        for r in &c.representations {
            if r.layer >= cfg.num_layers || r.component != "block_output" {
                bail!("{}: intervention at layer {} {} (the model has {} layers; only block_output is supported)", p.display(), r.layer, r.component, cfg.num_layers);
            }
            let rot = get(&format!("{}.rotate_layer", r.key))?.t()?.contiguous()?;
            let int = LoReft::from_tensors(&rot, &get(&format!("{}.weight", r.key))?, &get(&format!("{}.bias", r.key))?)
                .with_context(|| format!("{}: {}", w.display(), r.key))?;
            units.push(Unit { layer: r.layer, side: r.positions, int });
        }
        Ok(Self { rank: c.low_rank_dimension, first_n: c.first_n, last_n: c.last_n, units })
    }
}
