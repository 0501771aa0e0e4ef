//! LoRA (`h + (α/r) · B A x`) as a `LinearAdapter`, saved and loaded in peft's format.
use super::adapter::proj_out_dim;
use crate::model::{BaseLinear, LinearAdapter, LlamaConfig, Proj};
use crate::util::rng::Rng;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

/// Input dimension of a projection.
pub fn proj_in_dim(cfg: &LlamaConfig, p: Proj) -> usize {
    match p {
        Proj::O => cfg.num_heads * cfg.head_dim,
        Proj::Down => cfg.intermediate_size,
        _ => cfg.hidden_size,
    }
}

/// One adapted projection: `A` is `[r, in]`, `B` is `[out, r]` (peft's shapes).
pub struct LoraLayer {
    pub a: Var,
    pub b: Var,
}

pub struct LoraAdapter {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub layers: BTreeMap<(usize, Proj), LoraLayer>,
    /// Dropout is active only while training; its masks come from our seeded RNG.
    train_rng: Mutex<Option<Rng>>,
}

fn peft_key(layer: usize, p: Proj, what: &str) -> String {
    format!("{}.weight", super::adapter::peft_key(layer, p, what))
}

impl LoraAdapter {
    /// peft's default init: A ~ kaiming-uniform(a=√5) = U(±1/√in), B = 0 (the model starts unchanged).
    pub fn new(
        cfg: &LlamaConfig,
        r: usize,
        alpha: f64,
        dropout: f32,
        layers: impl IntoIterator<Item = usize>,
        targets: &[Proj],
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Self> {
        if r == 0 {
            bail!("LoRA rank r must be >= 1");
        }
        if !(0.0..1.0).contains(&dropout) {
            bail!("LoRA dropout must be in [0, 1), got {dropout}");
        }
        let map = super::per_target(cfg, layers, targets, |_, p| {
            let (i, o) = (proj_in_dim(cfg, p), proj_out_dim(cfg, p));
            let a = rng.uniform_tensor(&[r, i], 1.0 / (i as f32).sqrt(), device)?;
            let b = Tensor::zeros((o, r), DType::F32, device)?;
            Ok(LoraLayer { a: Var::from_tensor(&a)?, b: Var::from_tensor(&b)? })
        })?;
        Ok(Self { r, alpha, dropout, layers: map, train_rng: Mutex::new(None) })
    }

    pub fn scaling(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// Turn dropout on (with its own RNG stream) or off (`None`, inference).
    pub fn set_training(&self, rng: Option<Rng>) {
        *self.train_rng.lock().expect("lora rng lock") = rng;
    }

    pub fn vars(&self) -> Vec<Var> {
        self.layers.values().flat_map(|l| [l.a.clone(), l.b.clone()]).collect()
    }

    pub fn num_params(&self) -> usize {
        self.layers.values().map(|l| l.a.elem_count() + l.b.elem_count()).sum()
    }

    /// `scaling · B A`, `[out, in]` (for merging).
    pub fn delta(&self, layer: usize, p: Proj) -> Result<Option<Tensor>> {
        let Some(l) = self.layers.get(&(layer, p)) else { return Ok(None) };
        Ok(Some((l.b.as_tensor().matmul(l.a.as_tensor())? * self.scaling())?))
    }

    pub fn save_peft(&self, dir: &Path, base_model: &str) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        super::adapter::write_peft(dir, &self.peft_config(base_model, false), &self.peft_tensors())
    }

    /// peft's `LoraConfig` for this adapter (`use_dora` marks a DoRA adapter built on it).
    pub(crate) fn peft_config(&self, base_model: &str, use_dora: bool) -> serde_json::Value {
        serde_json::json!({
            "peft_type": "LORA", "r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
            "target_modules": super::adapter::target_modules(self.layers.keys()), "base_model_name_or_path": base_model, "bias": "none",
            "fan_in_fan_out": false, "inference_mode": true, "init_lora_weights": true,
            "modules_to_save": null, "task_type": "CAUSAL_LM", "use_rslora": false, "use_dora": use_dora,
        })
    }

    pub(crate) fn peft_tensors(&self) -> std::collections::HashMap<String, Tensor> {
        let mut map = std::collections::HashMap::new();
        for ((l, p), layer) in &self.layers {
            map.insert(peft_key(*l, *p, "lora_A"), layer.a.as_tensor().clone());
            map.insert(peft_key(*l, *p, "lora_B"), layer.b.as_tensor().clone());
        }
        map
    }

    pub fn load_peft(dir: &Path, cfg: &LlamaConfig, device: &Device) -> Result<Self> {
        let conf = super::adapter::read_peft_config(dir, "LORA")?;
        if conf.get("use_dora").and_then(|v| v.as_bool()) == Some(true) {
            bail!("{}: use_dora = true is a DoRA adapter, not plain LoRA", dir.display());
        }
        let (me, rest) = Self::from_peft(dir, &conf, cfg, device)?;
        if !rest.is_empty() {
            bail!("{}: {} adapter tensors do not match this model", dir.display(), rest.len());
        }
        Ok(me)
    }

    /// The LoRA part of a peft `LORA` directory, and the tensors it did not use (DoRA's
    /// magnitudes, or names of another model).
    pub(crate) fn from_peft(
        dir: &Path,
        conf: &serde_json::Value,
        cfg: &LlamaConfig,
        device: &Device,
    ) -> Result<(Self, std::collections::HashMap<String, Tensor>)> {
        let conf_path = dir.join("adapter_config.json");
        for (k, bad) in [("use_rslora", true), ("fan_in_fan_out", true)] {
            if conf.get(k).and_then(|v| v.as_bool()) == Some(bad) {
                bail!("{}: {k} = true is not supported", conf_path.display());
            }
        }
        let r = conf.get("r").and_then(|v| v.as_u64()).context("adapter_config.json: missing `r`")? as usize;
        let alpha = conf.get("lora_alpha").and_then(|v| v.as_f64()).unwrap_or(8.0);
        let dropout = conf.get("lora_dropout").and_then(|v| v.as_f64()).unwrap_or(0.0) as f32;
        let mut tensors = super::adapter::read_peft_tensors(dir, device)?;
        let mut layers = BTreeMap::new();
        for l in 0..cfg.num_layers {
            for p in Proj::ALL {
                let (ak, bk) = (peft_key(l, p, "lora_A"), peft_key(l, p, "lora_B"));
                if !tensors.contains_key(&ak) || !tensors.contains_key(&bk) {
                    continue;
                }
                let (a, b) = (tensors.remove(&ak).expect("checked"), tensors.remove(&bk).expect("checked"));
                let (i, o) = (proj_in_dim(cfg, p), proj_out_dim(cfg, p));
                if a.dims() != [r, i] || b.dims() != [o, r] {
                    bail!("{}: {ak} {:?} / lora_B {:?} do not match r={r}, [{o}x{i}]", dir.display(), a.dims(), b.dims());
                }
                let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
                layers.insert((l, p), LoraLayer { a: Var::from_tensor(&a)?, b: Var::from_tensor(&b)? });
            }
        }
        if layers.is_empty() {
            bail!("{}: no LoRA tensors matching this model's layers", dir.display());
        }
        Ok((Self { r, alpha, dropout, layers, train_rng: Mutex::new(None) }, tensors))
    }

    /// `scaling · B A dropout(x)` for one adapted projection, in `dtype` (DoRA reuses it).
    /// The rows are flattened to one `[n, in]` matrix first: two plain GEMMs forward (and two
    /// per weight backward) instead of one small GEMM per batch row against a broadcast weight,
    /// whose backward also sums the broadcast copies.
    pub(crate) fn low_rank(&self, layer: usize, proj: Proj, x: &Tensor, dtype: DType) -> Result<Tensor> {
        let l = &self.layers[&(layer, proj)];
        let x = self.dropped(x)?;
        let a = l.a.as_tensor().to_dtype(dtype)?;
        let b = l.b.as_tensor().to_dtype(dtype)?;
        let dims = x.dims().to_vec();
        let rows = x.elem_count() / dims[dims.len() - 1];
        let d = x.reshape((rows, dims[dims.len() - 1]))?.matmul(&a.t()?)?.matmul(&b.t()?)?;
        let mut out = dims;
        *out.last_mut().expect("rank ≥ 1") = d.dim(1)?;
        Ok((d.reshape(out)? * self.scaling())?)
    }

    /// `x` through dropout while training (its own RNG stream), unchanged otherwise.
    fn dropped(&self, x: &Tensor) -> Result<Tensor> {
        if self.dropout == 0.0 {
            return Ok(x.clone());
        }
        let mut g = self.train_rng.lock().expect("lora rng lock");
        match g.as_mut() {
            Some(rng) => Ok(super::dropout::dropout(x, self.dropout, rng)?),
            None => Ok(x.clone()),
        }
    }

    /// `x Wᵀ + s·B A dropout(x)` (no bias) as one training op (`model::low_rank`), where it
    /// applies: differentiable mode, f32 on the CPU. It draws the same dropout mask from the same
    /// stream as the composed path.
    pub(crate) fn fused_low_rank(&self, layer: usize, proj: Proj, x: &Tensor, base: BaseLinear, differentiable: bool) -> Result<Option<Tensor>> {
        let l = &self.layers[&(layer, proj)];
        let fits = differentiable && x.dtype() == DType::F32 && crate::runtime::cpu_fast_path(x.device());
        if !fits || base.w.is_variable() || base.w.dtype() != DType::F32 {
            return Ok(None);
        }
        let mask = match self.train_rng.lock().expect("lora rng lock").as_mut() {
            Some(rng) if self.dropout > 0.0 => Some(super::dropout::draw(x.elem_count(), self.dropout, rng)),
            _ => None,
        };
        let (a, b) = (l.a.as_tensor(), l.b.as_tensor());
        Ok(crate::model::low_rank::try_low_rank_linear(x, base.w, base.pack, a, b, self.scaling() as f32, mask)?)
    }
}

impl LinearAdapter for LoraAdapter {
    fn touches(&self, layer: usize, proj: Proj) -> bool {
        self.layers.contains_key(&(layer, proj))
    }
    fn adapt(&self, layer: usize, proj: Proj, x: &Tensor, h: Tensor, _base: BaseLinear) -> Result<Tensor> {
        let d = self.low_rank(layer, proj, x, h.dtype())?;
        Ok((h + d)?)
    }
    fn fused(&self, layer: usize, proj: Proj, x: &Tensor, base: BaseLinear, differentiable: bool) -> Result<Option<Tensor>> {
        let Some(y) = self.fused_low_rank(layer, proj, x, base, differentiable)? else { return Ok(None) };
        Ok(Some(base.add_bias(y)?))
    }
}
