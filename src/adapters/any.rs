//! Any kind of weight adapter, detected from `adapter_config.json`'s `peft_type` (and `use_dora`).
use super::{BoftAdapter, DoraAdapter, LoraAdapter, OftAdapter, RoadAdapter};
use crate::model::{BaseLinear, LinearAdapter, LlamaConfig, Proj};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::path::Path;

pub enum AnyAdapter {
    Road(RoadAdapter),
    Lora(LoraAdapter),
    Dora(DoraAdapter),
    Oft(OftAdapter),
    Boft(BoftAdapter),
}

/// `adapter_config.json` of a saved adapter directory.
fn config(dir: &Path) -> Result<serde_json::Value> {
    let p = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&p)
        .with_context(|| format!("{} is not an adapter directory: no adapter_config.json", dir.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", p.display()))
}

/// `peft_type` of a saved adapter directory.
pub fn peft_type(dir: &Path) -> Result<String> {
    Ok(config(dir)?.get("peft_type").and_then(|t| t.as_str()).unwrap_or("").to_string())
}

/// Calls `$body` with `$a` bound to the inner adapter, whatever its kind.
macro_rules! each {
    ($s:expr, $a:ident => $body:expr) => {
        match $s {
            AnyAdapter::Road($a) => $body,
            AnyAdapter::Lora($a) => $body,
            AnyAdapter::Dora($a) => $body,
            AnyAdapter::Oft($a) => $body,
            AnyAdapter::Boft($a) => $body,
        }
    };
}

impl AnyAdapter {
    pub fn load(dir: &Path, cfg: &LlamaConfig, device: &Device) -> Result<Self> {
        let conf = config(dir)?;
        let dora = conf.get("use_dora").and_then(|v| v.as_bool()) == Some(true);
        match conf.get("peft_type").and_then(|t| t.as_str()).unwrap_or("") {
            "ROAD" => Ok(Self::Road(RoadAdapter::load_peft(dir, cfg, device)?)),
            "LORA" if dora => Ok(Self::Dora(DoraAdapter::load_peft(dir, cfg, device)?)),
            "LORA" => Ok(Self::Lora(LoraAdapter::load_peft(dir, cfg, device)?)),
            "OFT" => Ok(Self::Oft(OftAdapter::load_peft(dir, cfg, device)?)),
            "BOFT" => Ok(Self::Boft(BoftAdapter::load_peft(dir, cfg, device)?)),
            other => bail!("{}: peft_type {other:?} is not supported (ROAD, LORA (with or without DoRA), OFT or BOFT)", dir.display()),
        }
    }
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Road(_) => "road",
            Self::Lora(_) => "lora",
            Self::Dora(_) => "dora",
            Self::Oft(_) => "oft",
            Self::Boft(_) => "boft",
        }
    }
    pub fn num_params(&self) -> usize {
        each!(self, a => a.num_params())
    }
    pub fn save_peft(&self, dir: &Path, base_model: &str) -> Result<()> {
        each!(self, a => a.save_peft(dir, base_model))
    }
    /// The adapted (layer, projection) pairs, in order.
    pub fn keys(&self) -> Vec<(usize, Proj)> {
        match self {
            Self::Road(a) => a.layers.keys().copied().collect(),
            Self::Lora(a) => a.layers.keys().copied().collect(),
            Self::Dora(a) => a.magnitude.keys().copied().collect(),
            Self::Oft(a) => a.layers.keys().copied().collect(),
            Self::Boft(a) => a.layers.keys().copied().collect(),
        }
    }
}

impl LinearAdapter for AnyAdapter {
    fn touches(&self, layer: usize, proj: Proj) -> bool {
        each!(self, a => a.touches(layer, proj))
    }
    fn adapt_input(&self, layer: usize, proj: Proj, x: &Tensor) -> Result<Option<Tensor>> {
        each!(self, a => a.adapt_input(layer, proj, x))
    }
    fn adapt(&self, layer: usize, proj: Proj, x: &Tensor, h: Tensor, base: BaseLinear) -> Result<Tensor> {
        each!(self, a => a.adapt(layer, proj, x, h, base))
    }
    fn fused(&self, layer: usize, proj: Proj, x: &Tensor, base: BaseLinear, differentiable: bool) -> Result<Option<Tensor>> {
        each!(self, a => a.fused(layer, proj, x, base, differentiable))
    }
}
