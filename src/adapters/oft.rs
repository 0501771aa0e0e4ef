//! OFT in peft's current formulation (`OFTConfig`, peft ≥ 0.15): the layer *input* is rotated,
//! `y = W (x · blockdiag(R_1 … R_k))`, each `R_i` a `b×b` orthogonal block from the Cayley
//! transform of a skew matrix (peft's default: a 5-term Neumann series instead of the inverse).
//! Parameters: `oft_R.weight` `[k, b(b−1)/2]`, the upper triangles of the skew matrices.
use super::orth;
use crate::model::{BaseLinear, LinearAdapter, LlamaConfig, Proj};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub struct OftLayer {
    /// `[k, b(b−1)/2]` (`[1, …]` with `block_share`).
    pub weight: Var,
    /// Block size `b` of this projection (peft may adjust it per layer; read from the tensor).
    pub block: usize,
}

pub struct OftAdapter {
    /// The configured `oft_block_size`.
    pub block_size: usize,
    /// `Some(t)`: peft's `t`-term Cayley–Neumann series; `None`: the exact Cayley transform.
    pub neumann_terms: Option<usize>,
    pub block_share: bool,
    /// Training-time block dropout probability (kept for the saved config; peft's Linear forward
    /// does not apply it either).
    pub module_dropout: f64,
    pub layers: BTreeMap<(usize, Proj), OftLayer>,
}

fn key(l: usize, p: Proj) -> String {
    super::adapter::peft_key(l, p, "oft_R.weight")
}

/// `b` with `b(b−1)/2 = n`, if any.
pub(crate) fn block_of_params(n: usize) -> Option<usize> {
    let b = ((1.0 + (1.0 + 8.0 * n as f64).sqrt()) / 2.0).round() as usize;
    (b >= 2 && b * (b - 1) / 2 == n).then_some(b)
}

/// Check that `block` tiles the input of `p` (a clear error instead of peft's silent adjustment).
pub(crate) fn check_block(cfg: &LlamaConfig, p: Proj, block: usize, what: &str) -> Result<usize> {
    let width = super::lora::proj_in_dim(cfg, p);
    if block < 2 {
        bail!("{what} must be at least 2, got {block}");
    }
    if width % block != 0 {
        bail!("{what} {block} does not divide the input width {width} of {}", p.hf_name());
    }
    Ok(width / block)
}

impl OftAdapter {
    /// Identity-initialised (zero skew parameters) OFT, peft's `init_weights=True`.
    pub fn new(
        cfg: &LlamaConfig,
        block_size: usize,
        neumann_terms: Option<usize>,
        layers: impl IntoIterator<Item = usize>,
        targets: &[Proj],
        device: &Device,
    ) -> Result<Self> {
        let map = super::per_target(cfg, layers, targets, |_, p| {
            let k = check_block(cfg, p, block_size, "oft_block_size")?;
            let w = Tensor::zeros((k, block_size * (block_size - 1) / 2), DType::F32, device)?;
            Ok(OftLayer { weight: Var::from_tensor(&w)?, block: block_size })
        })?;
        Ok(Self { block_size, neumann_terms, block_share: false, module_dropout: 0.0, layers: map })
    }

    pub fn vars(&self) -> Vec<Var> {
        self.layers.values().map(|l| l.weight.clone()).collect()
    }

    pub fn num_params(&self) -> usize {
        self.layers.values().map(|l| l.weight.elem_count()).sum()
    }

    /// The orthogonal blocks `[k, b, b]` of one projection (tracked for training): on the CPU
    /// the Neumann series as one op, elsewhere (and for the exact transform) composed.
    pub fn rotation(&self, l: usize, p: Proj) -> Result<Tensor> {
        let layer = &self.layers[&(l, p)];
        if let Some(t) = self.neumann_terms {
            if let Some(r) = super::neumann::try_cayley_neumann(layer.weight.as_tensor(), layer.block, t)? {
                return Ok(r);
            }
        }
        let q = orth::skew_from_upper(layer.weight.as_tensor(), layer.block)?;
        match self.neumann_terms {
            Some(t) => orth::cayley_neumann(&q, t),
            None => orth::cayley(&q),
        }
    }

    /// Merged weight `W Rᵀ` (peft: `Wᵀ ← R Wᵀ`), or its inverse `W (R⁻¹)ᵀ` (the Neumann series
    /// is only nearly orthogonal, so unmerging inverts rather than transposes, as peft does).
    pub fn merged(&self, l: usize, p: Proj, w: &Tensor, inverse: bool) -> Result<Tensor> {
        let r = self.rotation(l, p)?.detach();
        // The inverse in f64: Gauss–Jordan on a merely near-orthogonal block loses digits in f32.
        let r = if inverse { orth::inverse(&r.to_dtype(DType::F64)?)?.to_dtype(DType::F32)? } else { r };
        let dense = orth::dense_of(w.dim(1)?, w.device(), |e| orth::rotate_blocks(e, &r))?;
        Ok(w.to_dtype(DType::F32)?.matmul(&dense.t()?)?)
    }

    pub fn save_peft(&self, dir: &Path, base_model: &str) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let conf = serde_json::json!({
            "peft_type": "OFT", "r": 0, "oft_block_size": self.block_size,
            "use_cayley_neumann": self.neumann_terms.is_some(), "num_cayley_neumann_terms": self.neumann_terms.unwrap_or(5),
            "block_share": self.block_share, "coft": false, "eps": 6e-5, "module_dropout": self.module_dropout,
            "target_modules": super::adapter::target_modules(self.layers.keys()), "base_model_name_or_path": base_model,
            "bias": "none", "fan_in_fan_out": false, "inference_mode": true, "init_weights": true,
            "modules_to_save": null, "task_type": null, "revision": null,
        });
        let map: HashMap<String, Tensor> = self.layers.iter().map(|(&(l, p), x)| (key(l, p), x.weight.as_tensor().clone())).collect();
        super::adapter::write_peft(dir, &conf, &map)
    }

    pub fn load_peft(dir: &Path, cfg: &LlamaConfig, device: &Device) -> Result<Self> {
        let conf = super::adapter::read_peft_config(dir, "OFT")?;
        let conf_path = dir.join("adapter_config.json");
        let flag = |k: &str| conf.get(k).and_then(|v| v.as_bool());
        if flag("coft") == Some(true) {
            bail!("{}: coft = true (constrained OFT) is not supported", conf_path.display());
        }
        if flag("fan_in_fan_out") == Some(true) {
            bail!("{}: fan_in_fan_out = true is not supported", conf_path.display());
        }
        let block_share = flag("block_share") == Some(true);
        let neumann_terms = match flag("use_cayley_neumann") {
            Some(false) => None,
            _ => Some(conf.get("num_cayley_neumann_terms").and_then(|v| v.as_u64()).unwrap_or(5) as usize),
        };
        let block_size = conf.get("oft_block_size").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
        let module_dropout = conf.get("module_dropout").and_then(|v| v.as_f64()).unwrap_or(0.0);
        let mut tensors = super::adapter::read_peft_tensors(dir, device)?;
        let mut layers = BTreeMap::new();
        for l in 0..cfg.num_layers {
            for p in Proj::ALL {
                let k = key(l, p);
                let Some(w) = tensors.remove(&k) else { continue };
                let (nb, n) = w.dims2().with_context(|| format!("{}: {k} must be 2-D", dir.display()))?;
                let block = block_of_params(n).with_context(|| format!("{}: {k} has {n} entries per block, not b(b-1)/2", dir.display()))?;
                let k_blocks = check_block(cfg, p, block, &format!("{}: {k}: block size", dir.display()))?;
                if nb != if block_share { 1 } else { k_blocks } {
                    bail!("{}: {k} has {nb} blocks of size {block}; the input width needs {k_blocks}", dir.display());
                }
                layers.insert((l, p), OftLayer { weight: Var::from_tensor(&w.to_dtype(DType::F32)?)?, block });
            }
        }
        if layers.is_empty() {
            bail!("{}: no OFT tensors matching this model's layers", dir.display());
        }
        if !tensors.is_empty() {
            bail!("{}: {} adapter tensors do not match this model", dir.display(), tensors.len());
        }
        // A config that gave `r` (blocks) instead of `oft_block_size` saves back with the size.
        let block_size = if block_size == 0 { layers.values().next().map(|l| l.block).unwrap_or(0) } else { block_size };
        Ok(Self { block_size, neumann_terms, block_share, module_dropout, layers })
    }
}

impl LinearAdapter for OftAdapter {
    fn touches(&self, layer: usize, proj: Proj) -> bool {
        self.layers.contains_key(&(layer, proj))
    }
    fn adapt_input(&self, layer: usize, proj: Proj, x: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(orth::rotate_blocks(x, &self.rotation(layer, proj)?)?))
    }
    fn adapt(&self, _layer: usize, _proj: Proj, _x: &Tensor, h: Tensor, _base: BaseLinear) -> Result<Tensor> {
        Ok(h)
    }
    /// Training on the CPU: the rotation and the frozen projection as one op
    /// (`model::rotated_linear`), then the bias.
    fn fused(&self, layer: usize, proj: Proj, x: &Tensor, base: BaseLinear, differentiable: bool) -> Result<Option<Tensor>> {
        if !differentiable || x.dtype() != DType::F32 || !crate::runtime::cpu_fast_path(x.device()) {
            return Ok(None);
        }
        let r = self.rotation(layer, proj)?;
        let Some(y) = crate::model::rotated_linear::try_rotated_linear(x, base.w, base.pack, &r)? else { return Ok(None) };
        Ok(Some(base.add_bias(y)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_size_from_param_count() {
        assert_eq!(block_of_params(496), Some(32));
        assert_eq!(block_of_params(6), Some(4));
        assert_eq!(block_of_params(7), None);
    }
}
