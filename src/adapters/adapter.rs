//! RoAd as a weight adapter on linear outputs, saved and loaded in peft's format.
use super::rotation::{Rotation, Variant};
use crate::model::{BaseLinear, LinearAdapter, LlamaConfig, Proj};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use std::collections::BTreeMap;
use std::path::Path;

/// One adapted projection: its rotation geometry and trainable θ, α.
pub struct RoadLayer {
    pub rot: Rotation,
    pub theta: Var,
    pub alpha: Var,
}

impl RoadLayer {
    pub fn columns(&self) -> Result<(Tensor, Tensor)> {
        self.rot.columns(self.theta.as_tensor(), self.alpha.as_tensor())
    }

    /// (θ, α) with frozen parameters detached, so no gradient is computed for them at all.
    fn params_frozen(&self, freeze: Freeze) -> (Tensor, Tensor) {
        let t = if freeze.theta { self.theta.as_detached_tensor() } else { self.theta.as_tensor().clone() };
        let a = if freeze.alpha { self.alpha.as_detached_tensor() } else { self.alpha.as_tensor().clone() };
        (t, a)
    }

    /// Columns with frozen parameters detached.
    pub fn columns_frozen(&self, freeze: Freeze) -> Result<(Tensor, Tensor)> {
        let (t, a) = self.params_frozen(freeze);
        self.rot.columns(&t, &a)
    }
}

/// Which RoAd parameters are held fixed: α frozen = angle-only, θ frozen = magnitude-only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Freeze {
    pub theta: bool,
    pub alpha: bool,
}

/// RoAd on a set of (layer, projection) outputs.
pub struct RoadAdapter {
    pub variant: Variant,
    pub group_size: usize,
    pub layers: BTreeMap<(usize, Proj), RoadLayer>,
    /// Frozen parameters get no gradient (training only; inference is unaffected).
    pub freeze: Freeze,
}

/// Output dimension of a projection.
pub fn proj_out_dim(cfg: &LlamaConfig, p: Proj) -> usize {
    match p {
        Proj::Q => cfg.num_heads * cfg.head_dim,
        Proj::K | Proj::V => cfg.num_kv_heads * cfg.head_dim,
        Proj::O | Proj::Down => cfg.hidden_size,
        Proj::Gate | Proj::Up => cfg.intermediate_size,
    }
}

/// peft's tensor name for a parameter of an adapted projection.
pub(crate) fn peft_key(layer: usize, p: Proj, what: &str) -> String {
    format!("{}.{what}", crate::model::weights::peft_module(layer, p))
}

/// peft's `target_modules`: the distinct projection names adapted.
pub(crate) fn target_modules<'a>(keys: impl Iterator<Item = &'a (usize, Proj)>) -> Vec<&'static str> {
    let mut t: Vec<&str> = keys.map(|(_, p)| p.hf_name()).collect();
    t.sort();
    t.dedup();
    t
}

/// Write a peft adapter directory: `adapter_config.json` + `adapter_model.safetensors`.
pub(crate) fn write_peft(dir: &Path, conf: &serde_json::Value, tensors: &std::collections::HashMap<String, Tensor>) -> Result<()> {
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_string_pretty(conf)?)?;
    candle_core::safetensors::save(tensors, dir.join("adapter_model.safetensors"))?;
    Ok(())
}

/// Read `adapter_model.safetensors` of a peft adapter directory.
pub(crate) fn read_peft_tensors(dir: &Path, device: &Device) -> Result<std::collections::HashMap<String, Tensor>> {
    candle_core::safetensors::load(dir.join("adapter_model.safetensors"), device)
        .with_context(|| format!("reading {}/adapter_model.safetensors", dir.display()))
}

/// Read `adapter_config.json` of a peft adapter directory, checking its `peft_type`.
pub(crate) fn read_peft_config(dir: &Path, peft_type: &str) -> Result<serde_json::Value> {
    let conf_path = dir.join("adapter_config.json");
    let conf: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&conf_path).with_context(|| format!("no adapter_config.json in {}", dir.display()))?,
    )
    .with_context(|| format!("{} is not valid JSON", conf_path.display()))?;
    let got = conf.get("peft_type").and_then(|v| v.as_str()).unwrap_or("");
    if got != peft_type {
        bail!("{}: peft_type {got:?} is not {peft_type}", conf_path.display());
    }
    Ok(conf)
}

impl RoadAdapter {
    /// Identity-initialised (θ = 0, α = 1) RoAd on `targets` of every layer in `layers`.
    pub fn new_identity(
        cfg: &LlamaConfig,
        variant: Variant,
        group_size: usize,
        layers: impl IntoIterator<Item = usize>,
        targets: &[Proj],
        device: &Device,
    ) -> Result<Self> {
        let map = super::per_target(cfg, layers, targets, |_, p| {
            let rot = Rotation::new(variant, group_size, proj_out_dim(cfg, p))?;
            let (t, a) = rot.identity_params(device)?;
            Ok(RoadLayer { rot, theta: Var::from_tensor(&t)?, alpha: Var::from_tensor(&a)? })
        })?;
        Ok(Self { variant, group_size, layers: map, freeze: Freeze::default() })
    }

    /// Load a peft-saved RoAd adapter (`adapter_config.json` + `adapter_model.safetensors`).
    pub fn load_peft(dir: &Path, cfg: &LlamaConfig, device: &Device) -> Result<Self> {
        let conf = read_peft_config(dir, "ROAD")?;
        let variant = Variant::parse(conf.get("variant").and_then(|v| v.as_str()).unwrap_or("road_1"))?;
        let group_size = conf.get("group_size").and_then(|v| v.as_u64()).unwrap_or(64) as usize;
        let tensors = read_peft_tensors(dir, device)?;
        let mut layers = BTreeMap::new();
        for l in 0..cfg.num_layers {
            for p in Proj::ALL {
                let (tk, ak) = (peft_key(l, p, "road_theta"), peft_key(l, p, "road_alpha"));
                let (Some(t), Some(a)) = (tensors.get(&tk), tensors.get(&ak)) else { continue };
                let rot = Rotation::new(variant, group_size, proj_out_dim(cfg, p))?;
                let (t, a) = (t.to_dtype(candle_core::DType::F32)?, a.to_dtype(candle_core::DType::F32)?);
                rot.columns(&t, &a).with_context(|| format!("adapter tensor {tk}"))?;
                layers.insert((l, p), RoadLayer { rot, theta: Var::from_tensor(&t)?, alpha: Var::from_tensor(&a)? });
            }
        }
        let known = layers.len() * 2;
        if known == 0 {
            bail!("{}: no RoAd tensors matching this model's layers", dir.display());
        }
        if known != tensors.len() {
            bail!(
                "{}: {} of {} adapter tensors do not match this model (wrong base model?)",
                dir.display(),
                tensors.len() - known,
                tensors.len()
            );
        }
        Ok(Self { variant, group_size, layers, freeze: Freeze::default() })
    }

    /// Save in peft's format, loadable by `PeftModel.from_pretrained`.
    pub fn save_peft(&self, dir: &Path, base_model: &str) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let conf = serde_json::json!({
            "peft_type": "ROAD", "variant": self.variant.peft_name(), "group_size": self.group_size,
            "target_modules": target_modules(self.layers.keys()), "base_model_name_or_path": base_model, "init_weights": true,
            "inference_mode": true, "modules_to_save": null, "revision": null, "task_type": null,
        });
        let mut map = std::collections::HashMap::new();
        for ((l, p), layer) in &self.layers {
            map.insert(peft_key(*l, *p, "road_theta"), layer.theta.as_tensor().clone());
            map.insert(peft_key(*l, *p, "road_alpha"), layer.alpha.as_tensor().clone());
        }
        write_peft(dir, &conf, &map)
    }

    /// Trainable variables with stable names (peft keys), honouring `freeze`.
    pub fn named_trainables(&self) -> Vec<(String, Var)> {
        let mut v = Vec::new();
        for ((l, p), layer) in &self.layers {
            if !self.freeze.theta {
                v.push((peft_key(*l, *p, "road_theta"), layer.theta.clone()));
            }
            if !self.freeze.alpha {
                v.push((peft_key(*l, *p, "road_alpha"), layer.alpha.clone()));
            }
        }
        v
    }

    /// Trainable variables (θ and/or α of every layer).
    pub fn vars(&self, theta: bool, alpha: bool) -> Vec<Var> {
        let mut v = Vec::new();
        for l in self.layers.values() {
            if theta {
                v.push(l.theta.clone());
            }
            if alpha {
                v.push(l.alpha.clone());
            }
        }
        v
    }

    pub fn num_params(&self) -> usize {
        self.layers.values().map(|l| l.theta.elem_count() + l.alpha.elem_count()).sum()
    }
}

impl LinearAdapter for RoadAdapter {
    fn touches(&self, layer: usize, proj: Proj) -> bool {
        self.layers.contains_key(&(layer, proj))
    }
    fn adapt(&self, layer: usize, proj: Proj, _x: &Tensor, h: Tensor, _base: BaseLinear) -> Result<Tensor> {
        let l = &self.layers[&(layer, proj)];
        // CUDA, f32: the columns are computed inside the apply's kernel.
        let (t, a) = l.params_frozen(self.freeze);
        if let Some(z) = super::fused_cuda::try_road_params(&h, &t, &a, &l.rot)? {
            return Ok(z);
        }
        let (f, s) = l.rot.columns(&t, &a)?;
        let (f, s) = (f.to_dtype(h.dtype())?, s.to_dtype(h.dtype())?);
        if let Some(z) = super::fused::try_fused(&h, &f, &s, l.rot.group_size)? {
            return Ok(z);
        }
        l.rot.apply(&h, &f, &s)
    }
}
