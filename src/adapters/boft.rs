//! BOFT (butterfly orthogonal fine-tuning), peft's `BOFTConfig`: the input is rotated by a product
//! of `N` permuted block-diagonal orthogonal matrices, `x ↦ x · M_{N−1} ⋯ M_0` with
//! `M_i = P_i · blockdiag(Cayley(R_i)) · P_iᵀ`, and each output row is scaled by `s` (bias excluded).
//! `boft_R` is `[N, k, b, b]` (the skew part `½(R − Rᵀ)` is used), `boft_s` is `[out, 1]`.
//!
//! peft without its CUDA extension (every CPU install) builds `N = 1` whatever
//! `boft_n_butterfly_factor` says, so `N` is read from the saved tensor, not from the config.
use super::orth;
use crate::model::{BaseLinear, LinearAdapter, LlamaConfig, Proj};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub struct BoftLayer {
    pub r: Var,
    pub s: Var,
    /// Per factor `i`: `(σ_i⁻¹, σ_i)` as gather indices, `x·P_i = x[σ_i⁻¹]`, `y·P_iᵀ = y[σ_i]`;
    /// `None` for the identity permutation.
    perms: Vec<Option<(Tensor, Tensor)>>,
}

pub struct BoftAdapter {
    pub block_size: usize,
    /// `N`, the number of butterfly factors actually stored.
    pub factors: usize,
    pub dropout: f64,
    pub layers: BTreeMap<(usize, Proj), BoftLayer>,
}

fn key(l: usize, p: Proj, what: &str) -> String {
    super::adapter::peft_key(l, p, what)
}

/// peft's `block_butterfly_perm(n, b, r, nbf)`: within each chunk of `n/b` dims, the `r`-wide
/// pieces are reordered evens first, then odds.
fn butterfly_perm(n: usize, b: usize, r: usize, nbf: usize) -> Result<Vec<usize>> {
    if nbf == 0 {
        return Ok((0..n).collect());
    }
    if b == 0 || r == 0 || b * r * 2 > n {
        bail!("invalid butterfly: {b} blocks of {r} pairs in width {n}");
    }
    let chunk = n / b;
    let step = chunk / r;
    let seq: Vec<usize> = (0..step).step_by(2).chain((1..step).step_by(2)).collect();
    let mut order = vec![0usize; chunk];
    for (i, &pos) in seq.iter().enumerate() {
        for j in 0..r {
            order[i * r + j] = pos * r + j;
        }
    }
    Ok((0..n).map(|t| (t / chunk) * chunk + order[t % chunk]).collect())
}

/// Validate peft's BOFT constraints for one projection; returns the block count `k`.
fn check(cfg: &LlamaConfig, p: Proj, block: usize, factors: usize) -> Result<usize> {
    let width = super::lora::proj_in_dim(cfg, p);
    if block == 0 || width % block != 0 {
        bail!("boft_block_size {block} does not divide the input width {width} of {}", p.hf_name());
    }
    let k = width / block;
    if factors > 1 {
        let span = block << (factors - 1);
        if width % span != 0 || k % 2 != 0 || block % 2 != 0 {
            bail!("boft_n_butterfly_factor {factors} with boft_block_size {block} does not tile the input width {width} of {}", p.hf_name());
        }
    }
    Ok(k)
}

fn perms(width: usize, k: usize, block: usize, factors: usize, device: &Device) -> Result<Vec<Option<(Tensor, Tensor)>>> {
    (0..factors)
        .map(|i| {
            let sigma = butterfly_perm(width, k >> i, block / 2, factors - 1)?;
            if sigma.iter().enumerate().all(|(a, &b)| a == b) {
                return Ok(None);
            }
            let mut inv = vec![0u32; width];
            for (a, &b) in sigma.iter().enumerate() {
                inv[b] = a as u32;
            }
            let sig: Vec<u32> = sigma.iter().map(|&v| v as u32).collect();
            Ok(Some((Tensor::from_vec(inv, width, device)?, Tensor::from_vec(sig, width, device)?)))
        })
        .collect()
}

impl BoftAdapter {
    /// Identity-initialised BOFT (R = 0, s = 1), peft's `init_weights=True`.
    pub fn new(
        cfg: &LlamaConfig,
        block_size: usize,
        factors: usize,
        layers: impl IntoIterator<Item = usize>,
        targets: &[Proj],
        device: &Device,
    ) -> Result<Self> {
        if factors == 0 {
            bail!("boft_n_butterfly_factor must be at least 1");
        }
        let map = super::per_target(cfg, layers, targets, |_, p| {
            let k = check(cfg, p, block_size, factors)?;
            let r = Tensor::zeros((factors, k, block_size, block_size), DType::F32, device)?;
            let s = Tensor::ones((super::adapter::proj_out_dim(cfg, p), 1), DType::F32, device)?;
            let perms = perms(super::lora::proj_in_dim(cfg, p), k, block_size, factors, device)?;
            Ok(BoftLayer { r: Var::from_tensor(&r)?, s: Var::from_tensor(&s)?, perms })
        })?;
        Ok(Self { block_size, factors, dropout: 0.0, layers: map })
    }

    pub fn vars(&self) -> Vec<Var> {
        self.layers.values().flat_map(|l| [l.r.clone(), l.s.clone()]).collect()
    }

    pub fn num_params(&self) -> usize {
        self.layers.values().map(|l| l.r.elem_count() + l.s.elem_count()).sum()
    }

    /// `x · M_{N−1} ⋯ M_0` (the input rotation of one projection).
    pub fn rotate(&self, l: usize, p: Proj, x: &Tensor) -> Result<Tensor> {
        self.rotation(l, p)?.apply(x)
    }

    /// One projection's rotation: its Cayley blocks and permutations, which a mixed batch keeps
    /// (detached) to rotate the rows that use this adapter.
    pub fn rotation(&self, l: usize, p: Proj) -> Result<BoftRotation> {
        let layer = &self.layers[&(l, p)];
        let (n, k, b, _) = layer.r.as_tensor().dims4()?;
        let data = layer.r.as_tensor().reshape((n * k, b, b))?;
        let skew = ((&data - data.transpose(1, 2)?)? * 0.5)?;
        Ok(BoftRotation { q: orth::cayley(&skew)?.reshape((n, k, b, b))?, perms: layer.perms.clone() })
    }

    /// Merged weight `s ⊙ (W Mᵀ)` (peft's merge), or its inverse `(W'/s) M` (M orthogonal).
    pub fn merged(&self, l: usize, p: Proj, w: &Tensor, inverse: bool) -> Result<Tensor> {
        let layer = &self.layers[&(l, p)];
        let s = layer.s.as_tensor().detach();
        let m = orth::dense_of(w.dim(1)?, w.device(), |e| self.rotate(l, p, e))?.detach();
        let w = w.to_dtype(DType::F32)?;
        Ok(if inverse { w.broadcast_div(&s)?.matmul(&m)? } else { w.matmul(&m.t()?)?.broadcast_mul(&s)? })
    }

    pub fn save_peft(&self, dir: &Path, base_model: &str) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let conf = serde_json::json!({
            "peft_type": "BOFT", "boft_block_size": self.block_size, "boft_block_num": 0,
            "boft_n_butterfly_factor": self.factors, "boft_dropout": self.dropout,
            "target_modules": super::adapter::target_modules(self.layers.keys()), "base_model_name_or_path": base_model,
            "bias": "none", "fan_in_fan_out": false, "inference_mode": true, "init_weights": true,
            "modules_to_save": null, "task_type": null, "revision": null,
        });
        let mut map = HashMap::new();
        for (&(l, p), x) in &self.layers {
            map.insert(key(l, p, "boft_R"), x.r.as_tensor().clone());
            map.insert(key(l, p, "boft_s"), x.s.as_tensor().clone());
        }
        super::adapter::write_peft(dir, &conf, &map)
    }

    pub fn load_peft(dir: &Path, cfg: &LlamaConfig, device: &Device) -> Result<Self> {
        let conf = super::adapter::read_peft_config(dir, "BOFT")?;
        if conf.get("fan_in_fan_out").and_then(|v| v.as_bool()) == Some(true) {
            bail!("{}/adapter_config.json: fan_in_fan_out = true is not supported", dir.display());
        }
        let dropout = conf.get("boft_dropout").and_then(|v| v.as_f64()).unwrap_or(0.0);
        let mut tensors = super::adapter::read_peft_tensors(dir, device)?;
        let mut layers = BTreeMap::new();
        let mut shape: Option<(usize, usize)> = None;
        for l in 0..cfg.num_layers {
            for p in Proj::ALL {
                let (rk, sk) = (key(l, p, "boft_R"), key(l, p, "boft_s"));
                if !tensors.contains_key(&rk) {
                    continue;
                }
                let r = tensors.remove(&rk).expect("checked").to_dtype(DType::F32)?;
                let s = tensors.remove(&sk).with_context(|| format!("{}: BOFT adapter lacks {sk}", dir.display()))?.to_dtype(DType::F32)?;
                let (n, k, b, b2) = r.dims4().with_context(|| format!("{}: {rk} must be [N, blocks, b, b]", dir.display()))?;
                let want_k = check(cfg, p, b, n).with_context(|| format!("{}: {rk}", dir.display()))?;
                if b != b2 || k != want_k {
                    bail!("{}: {rk} has shape {:?}; the input width needs [{n}, {want_k}, {b}, {b}]", dir.display(), r.dims());
                }
                let out = super::adapter::proj_out_dim(cfg, p);
                if s.dims() != [out, 1] {
                    bail!("{}: {sk} has shape {:?}, expected [{out}, 1]", dir.display(), s.dims());
                }
                shape = Some((b, n));
                let perms = perms(super::lora::proj_in_dim(cfg, p), k, b, n, device)?;
                layers.insert((l, p), BoftLayer { r: Var::from_tensor(&r)?, s: Var::from_tensor(&s)?, perms });
            }
        }
        let Some((block_size, factors)) = shape else { bail!("{}: no BOFT tensors matching this model's layers", dir.display()) };
        if !tensors.is_empty() {
            bail!("{}: {} adapter tensors do not match this model", dir.display(), tensors.len());
        }
        Ok(Self { block_size, factors, dropout, layers })
    }
}

/// `x ↦ x · M_{N−1} ⋯ M_0` for one projection: Cayley blocks `q` `[N, k, b, b]` and the factors'
/// permutations.
pub struct BoftRotation {
    pub q: Tensor,
    perms: Vec<Option<(Tensor, Tensor)>>,
}

impl BoftRotation {
    pub fn detach(self) -> Self {
        Self { q: self.q.detach(), perms: self.perms }
    }

    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let last = x.rank() - 1;
        // f32 throughout (see `orth::rotate_blocks`), back to the model's dtype at the end.
        let mut y = x.to_dtype(DType::F32)?;
        for i in (0..self.q.dim(0)?).rev() {
            if let Some((inv, _)) = &self.perms[i] {
                y = y.index_select(inv, last)?;
            }
            y = orth::rotate_blocks(&y, &self.q.get(i)?)?;
            if let Some((_, sig)) = &self.perms[i] {
                y = y.index_select(sig, last)?;
            }
        }
        Ok(y.to_dtype(x.dtype())?)
    }
}

impl LinearAdapter for BoftAdapter {
    fn touches(&self, layer: usize, proj: Proj) -> bool {
        self.layers.contains_key(&(layer, proj))
    }
    fn adapt_input(&self, layer: usize, proj: Proj, x: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.rotate(layer, proj, x)?))
    }
    fn adapt(&self, layer: usize, proj: Proj, _x: &Tensor, h: Tensor, base: BaseLinear) -> Result<Tensor> {
        // The scale in f32: bf16 cannot tell 1.003 from 1 (its spacing near 1 is 2⁻⁷).
        let s = self.layers[&(layer, proj)].s.as_tensor().squeeze(1)?;
        let h32 = h.to_dtype(DType::F32)?;
        let y = match base.b {
            Some(b) => {
                let b = b.to_dtype(DType::F32)?;
                h32.broadcast_sub(&b)?.broadcast_mul(&s)?.broadcast_add(&b)?
            }
            None => h32.broadcast_mul(&s)?,
        };
        Ok(y.to_dtype(h.dtype())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn butterfly_perm_matches_peft() {
        // peft: block_butterfly_perm(8, 2, 1, 1) → [0, 2, 1, 3, 4, 6, 5, 7]; factor 0 → identity.
        assert_eq!(butterfly_perm(8, 2, 1, 1).unwrap(), vec![0, 2, 1, 3, 4, 6, 5, 7]);
        assert_eq!(butterfly_perm(8, 4, 1, 1).unwrap(), (0..8).collect::<Vec<_>>());
        assert_eq!(butterfly_perm(8, 1, 2, 2).unwrap(), vec![0, 1, 4, 5, 2, 3, 6, 7]);
        assert_eq!(butterfly_perm(6, 3, 1, 0).unwrap(), (0..6).collect::<Vec<_>>());
    }
}
