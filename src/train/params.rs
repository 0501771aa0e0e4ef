//! Trainable parameters as values: snapshots (the best dev checkpoint, the last step with a
//! finite loss), safetensors files of a checkpoint, and the checkpoint's state.
use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};
use std::path::Path;

/// Above this many trainable values (full fine-tuning), a copy per step costs more than it
/// protects: a diverged run then falls back to the best dev checkpoint only.
pub const LAST_GOOD_MAX_PARAMS: usize = 20_000_000;

/// The parameters of the last step whose loss and gradient were finite (before its update), so
/// a run that diverges keeps something trained even when no dev evaluation has run yet.
pub struct LastGood {
    pub enabled: bool,
    pub step: usize,
    pub values: Option<Vec<Tensor>>,
}

impl LastGood {
    pub fn new(trainable: usize) -> Self {
        Self { enabled: trainable <= LAST_GOOD_MAX_PARAMS, step: 0, values: None }
    }
    /// `params`, the result of `step` updates, just gave a finite loss and gradient (the
    /// untrained start, step 0, is not worth keeping).
    pub fn keep(&mut self, params: &[(String, Var)], step: usize) -> Result<()> {
        if self.enabled && step > 0 {
            self.values = Some(snapshot(params)?);
            self.step = step;
        }
        Ok(())
    }
}

pub(super) fn snapshot(params: &[(String, Var)]) -> Result<Vec<Tensor>> {
    params.iter().map(|(_, v)| Ok(v.as_tensor().copy()?)).collect()
}

pub(super) fn restore(params: &[(String, Var)], snap: &[Tensor]) -> Result<()> {
    for ((_, v), t) in params.iter().zip(snap) {
        v.set(t)?;
    }
    Ok(())
}

#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct CkptState {
    pub step: usize,
    pub best_step: usize,
    pub best_score: f64,
    pub seed: u64,
    pub method: String,
}

pub(super) fn save_tensors(params: &[(String, Var)], vals: Option<&[Tensor]>, path: &Path) -> Result<()> {
    let map: std::collections::HashMap<String, Tensor> = params
        .iter()
        .enumerate()
        .map(|(i, (n, v))| (n.clone(), vals.map(|s| s[i].clone()).unwrap_or_else(|| v.as_tensor().clone())))
        .collect();
    candle_core::safetensors::save(&map, path)?;
    Ok(())
}

pub(super) fn load_tensors(params: &[(String, Var)], path: &Path) -> Result<Vec<Tensor>> {
    let dev = params.first().map(|(_, v)| v.device().clone()).unwrap_or(candle_core::Device::Cpu);
    let map = candle_core::safetensors::load(path, &dev).with_context(|| format!("reading {}", path.display()))?;
    params
        .iter()
        .map(|(n, v)| {
            let t = map.get(n).with_context(|| format!("{}: no tensor {n} (different method or model?)", path.display()))?;
            if t.dims() != v.dims() {
                bail!("{}: {n} has shape {:?}, expected {:?}", path.display(), t.dims(), v.dims());
            }
            Ok(t.clone())
        })
        .collect()
}

