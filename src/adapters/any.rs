//! Either kind of weight adapter, detected from `adapter_config.json`'s `peft_type`.
use super::{LoraAdapter, RoadAdapter};
use crate::model::{LinearAdapter, LlamaConfig, Proj};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::path::Path;

pub enum AnyAdapter {
    Road(RoadAdapter),
    Lora(LoraAdapter),
}

/// `peft_type` of a saved adapter directory.
pub fn peft_type(dir: &Path) -> Result<String> {
    let p = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&p)
        .with_context(|| format!("{} is not an adapter directory: no adapter_config.json", dir.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", p.display()))?;
    Ok(v.get("peft_type").and_then(|t| t.as_str()).unwrap_or("").to_string())
}

impl AnyAdapter {
    pub fn load(dir: &Path, cfg: &LlamaConfig, device: &Device) -> Result<Self> {
        match peft_type(dir)?.as_str() {
            "ROAD" => Ok(Self::Road(RoadAdapter::load_peft(dir, cfg, device)?)),
            "LORA" => Ok(Self::Lora(LoraAdapter::load_peft(dir, cfg, device)?)),
            other => bail!("{}: peft_type {other:?} is not supported (ROAD or LORA)", dir.display()),
        }
    }
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Road(_) => "road",
            Self::Lora(_) => "lora",
        }
    }
    pub fn num_params(&self) -> usize {
        match self {
            Self::Road(a) => a.num_params(),
            Self::Lora(a) => a.num_params(),
        }
    }
    pub fn save_peft(&self, dir: &Path, base_model: &str) -> Result<()> {
        match self {
            Self::Road(a) => a.save_peft(dir, base_model),
            Self::Lora(a) => a.save_peft(dir, base_model),
        }
    }
}

impl LinearAdapter for AnyAdapter {
    fn touches(&self, layer: usize, proj: Proj) -> bool {
        match self {
            Self::Road(a) => a.touches(layer, proj),
            Self::Lora(a) => a.touches(layer, proj),
        }
    }
    fn adapt(&self, layer: usize, proj: Proj, x: &Tensor, h: Tensor) -> Result<Tensor> {
        match self {
            Self::Road(a) => a.adapt(layer, proj, x, h),
            Self::Lora(a) => a.adapt(layer, proj, x, h),
        }
    }
}
