//! DoRA (weight-decomposed LoRA), peft's `LoraConfig(use_dora=True)`:
//! `W' = m ⊙ (W + s·BA) / ‖W + s·BA‖` with one norm per output row (peft's `dim=1` of `[out, in]`)
//! and a learned magnitude `m` per output row. As in peft (DoRA paper §4.3) the norm is treated
//! as a constant in training: it is recomputed every forward but detached from the graph.
use super::lora::LoraAdapter;
use crate::model::{BaseLinear, LinearAdapter, Llama, LlamaConfig, Proj};
use crate::util::rng::Rng;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;

pub struct DoraAdapter {
    /// The low-rank direction update (`lora_A`, `lora_B`, α, r, dropout).
    pub lora: LoraAdapter,
    /// `lora_magnitude_vector`, `[out]` per adapted projection.
    pub magnitude: BTreeMap<(usize, Proj), Var>,
    /// Row norms used by `merge`: the merged weight no longer determines them, and `unmerge`
    /// must divide by exactly the same factor (peft caches them the same way).
    merged_norms: Mutex<HashMap<(usize, Proj), Tensor>>,
}

fn magnitude_key(l: usize, p: Proj) -> String {
    super::adapter::peft_key(l, p, "lora_magnitude_vector")
}

impl DoraAdapter {
    /// peft's init: LoRA's (B = 0) and `m = ‖W‖` per row, so the model starts unchanged.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model: &Llama,
        r: usize,
        alpha: f64,
        dropout: f32,
        layers: impl IntoIterator<Item = usize>,
        targets: &[Proj],
        rng: &mut Rng,
    ) -> Result<Self> {
        let lora = LoraAdapter::new(&model.cfg, r, alpha, dropout, layers, targets, rng, model.device())?;
        let mut magnitude = BTreeMap::new();
        for &(l, p) in lora.layers.keys() {
            let n = row_norms(model.proj_weight(l, p), None)?;
            magnitude.insert((l, p), Var::from_tensor(&n)?);
        }
        Ok(Self { lora, magnitude, merged_norms: Mutex::new(HashMap::new()) })
    }

    pub fn vars(&self) -> Vec<Var> {
        let mut v = self.lora.vars();
        v.extend(self.magnitude.values().cloned());
        v
    }

    pub fn num_params(&self) -> usize {
        self.lora.num_params() + self.magnitude.values().map(|m| m.elem_count()).sum::<usize>()
    }

    /// `‖W + s·BA‖` per output row, detached, `[out]` f32.
    pub fn norms(&self, l: usize, p: Proj, w: &Tensor) -> Result<Tensor> {
        if w.dtype() == DType::F32 && crate::runtime::cpu_fast_path(w.device()) {
            return self.norms_expanded(l, p, w);
        }
        let d = self.lora.delta(l, p)?.context("DoRA layer without LoRA factors")?;
        row_norms(w, Some(&d.detach()))
    }

    /// The same norms without materialising `W + s·BA` (`[out, in]`, every projection, every
    /// step): `‖w_o + s·b_o A‖² = ‖w_o‖² + 2s·b_o·(A w_o) + s²·b_o (A Aᵀ) b_oᵀ`, i.e. one pass
    /// over W and its `[out, r]` product with Aᵀ. On a DoRA training step on the CPU the
    /// materialised sum and its square were more passes over the weights than the forward.
    fn norms_expanded(&self, l: usize, p: Proj, w: &Tensor) -> Result<Tensor> {
        let lay = self.lora.layers.get(&(l, p)).context("DoRA layer without LoRA factors")?;
        let (a, b) = (lay.a.as_tensor().detach(), lay.b.as_tensor().detach());
        let s = self.lora.scaling();
        let w = w.detach().contiguous()?;
        let (out, inn) = w.dims2()?;
        let sq: Vec<f32> = crate::model::train_ops::with_data(&w, |v| {
            use rayon::prelude::*;
            Ok(v.par_chunks(inn).map(|r| r.iter().map(|x| x * x).sum()).collect())
        })?;
        let cross = (&b * w.matmul(&a.t()?)?)?.sum(1)?;
        let quad = (b.matmul(&a.matmul(&a.t()?)?)? * &b)?.sum(1)?;
        let n2 = ((Tensor::from_vec(sq, out, w.device())? + (cross * (2.0 * s))?)? + (quad * (s * s))?)?;
        Ok(n2.relu()?.sqrt()?)
    }

    /// `m / ‖W + s·BA‖`, `[out]` (the per-row factor DoRA applies to `W + s·BA`).
    pub fn factor(&self, l: usize, p: Proj, w: &Tensor) -> Result<Tensor> {
        Ok(self.magnitude[&(l, p)].as_tensor().div(&self.norms(l, p, w)?)?)
    }

    pub fn save_peft(&self, dir: &Path, base_model: &str) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut map = self.lora.peft_tensors();
        for (&(l, p), m) in &self.magnitude {
            map.insert(magnitude_key(l, p), m.as_tensor().clone());
        }
        super::adapter::write_peft(dir, &self.lora.peft_config(base_model, true), &map)
    }

    pub fn load_peft(dir: &Path, cfg: &LlamaConfig, device: &Device) -> Result<Self> {
        let conf = super::adapter::read_peft_config(dir, "LORA")?;
        if conf.get("use_dora").and_then(|v| v.as_bool()) != Some(true) {
            bail!("{}: use_dora is not true (a plain LoRA adapter)", dir.display());
        }
        let (lora, mut rest) = LoraAdapter::from_peft(dir, &conf, cfg, device)?;
        let mut magnitude = BTreeMap::new();
        for &(l, p) in lora.layers.keys() {
            let k = magnitude_key(l, p);
            let m = rest.remove(&k).with_context(|| format!("{}: DoRA adapter lacks {k}", dir.display()))?;
            let out = super::adapter::proj_out_dim(cfg, p);
            if m.dims() != [out] {
                bail!("{}: {k} has shape {:?}, expected [{out}]", dir.display(), m.dims());
            }
            magnitude.insert((l, p), Var::from_tensor(&m.to_dtype(DType::F32)?)?);
        }
        if !rest.is_empty() {
            bail!("{}: {} adapter tensors do not match this model", dir.display(), rest.len());
        }
        Ok(Self { lora, magnitude, merged_norms: Mutex::new(HashMap::new()) })
    }

    /// The merged weight `m/‖W+sBA‖ · (W + sBA)` (f32), remembering the norms for `unmerged`.
    pub fn merged(&self, l: usize, p: Proj, w: &Tensor) -> Result<Tensor> {
        let d = self.lora.delta(l, p)?.context("DoRA layer without LoRA factors")?;
        let n = self.norms(l, p, w)?;
        let f = self.magnitude[&(l, p)].as_tensor().div(&n)?;
        self.merged_norms.lock().expect("dora norm lock").insert((l, p), n);
        Ok((w.to_dtype(DType::F32)? + d)?.broadcast_mul(&f.unsqueeze(1)?)?)
    }

    /// The inverse of [`Self::merged`]: `W = W'·‖·‖/m − sBA`, with the norms `merged` used.
    pub fn unmerged(&self, l: usize, p: Proj, w: &Tensor) -> Result<Tensor> {
        let n = self.merged_norms.lock().expect("dora norm lock").remove(&(l, p));
        let Some(n) = n else {
            bail!("DoRA unmerge of layer {l} {}: this adapter was not merged into this model in this process (a merged checkpoint alone does not determine the row norms to divide by)", p.hf_name())
        };
        let d = self.lora.delta(l, p)?.context("DoRA layer without LoRA factors")?;
        let f = self.magnitude[&(l, p)].as_tensor().div(&n)?;
        Ok((w.to_dtype(DType::F32)?.broadcast_div(&f.unsqueeze(1)?)? - d)?)
    }
}

/// Row norms of `w (+ delta)`, computed in f32 and detached.
fn row_norms(w: &Tensor, delta: Option<&Tensor>) -> Result<Tensor> {
    let w = w.to_dtype(DType::F32)?.detach();
    let w = match delta {
        Some(d) => (w + d)?,
        None => w,
    };
    Ok(w.sqr()?.sum(1)?.sqrt()?.detach())
}

impl LinearAdapter for DoraAdapter {
    fn touches(&self, layer: usize, proj: Proj) -> bool {
        self.magnitude.contains_key(&(layer, proj))
    }
    fn adapt(&self, layer: usize, proj: Proj, x: &Tensor, h: Tensor, base: BaseLinear) -> Result<Tensor> {
        // In f32: the factor is ≈ 1, and bf16's spacing near 1 (2⁻⁷) would swallow its change.
        let dt = h.dtype();
        let f = self.factor(layer, proj, base.w)?;
        let lr = self.lora.low_rank(layer, proj, x, dt)?.to_dtype(DType::F32)?;
        let h = h.to_dtype(DType::F32)?;
        // The factor scales `W x + s·BA x` only; the bias (Qwen2's q/k/v) stays as it is.
        let b = base.b.map(|b| b.to_dtype(DType::F32)).transpose()?;
        let hb = match &b {
            Some(b) => h.broadcast_sub(b)?,
            None => h,
        };
        let y = (hb + lr)?.broadcast_mul(&f)?;
        let y = match &b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        Ok(y.to_dtype(dt)?)
    }
    /// Training on the CPU: `f ⊙ (x Wᵀ + s·BA dropout(x)) + b` with the bracket as LoRA's one op.
    fn fused(&self, layer: usize, proj: Proj, x: &Tensor, base: BaseLinear, differentiable: bool) -> Result<Option<Tensor>> {
        let Some(y) = self.lora.fused_low_rank(layer, proj, x, base, differentiable)? else { return Ok(None) };
        let f = self.factor(layer, proj, base.w)?;
        let y = match crate::model::low_rank::try_scale_columns(&y, &f)? {
            Some(y) => y,
            None => y.broadcast_mul(&f)?,
        };
        Ok(Some(base.add_bias(y)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The expanded norms equal the norms of the materialised `W + s·BA`, for a non-zero B.
    #[test]
    fn expanded_norms_equal_the_materialised_ones() {
        let cfg = crate::model::random::preset("tiny").unwrap();
        let model = crate::model::random::random_llama(&cfg, DType::F32, &Device::Cpu).unwrap();
        let mut rng = Rng::new(4);
        let ad = DoraAdapter::new(&model, 4, 8.0, 0.0, 0..cfg.num_layers, &[Proj::Q, Proj::Down], &mut rng).unwrap();
        for ((l, p), lay) in &ad.lora.layers {
            lay.b.set(&rng.normal_tensor(lay.b.dims(), 0.5, &Device::Cpu).unwrap()).unwrap();
            let w = model.proj_weight(*l, *p);
            let direct = row_norms(w, Some(&ad.lora.delta(*l, *p).unwrap().unwrap())).unwrap();
            let fast = ad.norms_expanded(*l, *p, w).unwrap();
            let rel = ((&fast - &direct).unwrap().abs().unwrap() / &direct).unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(rel < 1e-5, "layer {l} {p:?}: relative error {rel}");
            let moved = ((&direct - row_norms(w, None).unwrap()).unwrap().abs().unwrap()).max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(moved > 1e-2, "the update changes the norms ({moved})");
        }
    }
}
