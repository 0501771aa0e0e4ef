//! Resolving `--model`: a registered name (fetched into the cache on first use), a model shipped
//! in `data/models/`, a `.gguf` file, or a Hugging Face checkpoint directory.
use super::load::{load_path, Loaded};
use crate::fetch;
use anyhow::{bail, Result};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

/// `data/models/` of the project: the working directory's, else the source tree's.
pub fn shipped_models_dir() -> PathBuf {
    let local = PathBuf::from("data/models");
    if local.is_dir() {
        return local;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/models")
}

/// Names of models shipped in `data/models/`.
pub fn shipped_models() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(shipped_models_dir())
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().join("config.json").exists())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Turn a `--model` argument into a path, fetching registered models when needed.
pub fn resolve(spec: &str, verbose: bool) -> Result<PathBuf> {
    // Every entry point: a FIFO must not block, a symlink loop must not read as "not found".
    crate::util::check_model_path("model", spec)?;
    if let Some(s) = fetch::lookup(spec) {
        return s.ensure(verbose);
    }
    let shipped = shipped_models_dir().join(spec);
    if shipped.join("config.json").exists() {
        return Ok(shipped);
    }
    let p = PathBuf::from(spec);
    if p.exists() {
        return Ok(p);
    }
    let names: Vec<String> = fetch::REGISTRY
        .iter()
        .map(|s| s.name.to_string())
        .chain(shipped_models())
        .collect();
    bail!(
        "model {spec:?} not found: it is not a registered name ({}), not in data/models/, and no such file or directory",
        names.join(", ")
    )
}

/// Load on the run-wide device and dtype (the `--device` / `--dtype` flags; auto / f32).
pub fn load_default(spec: &str) -> Result<Loaded> {
    load(spec, crate::runtime::dtype_for("f32")?, &crate::runtime::device_for("auto")?, true)
}

pub fn load(spec: &str, dtype: DType, device: &Device, verbose: bool) -> Result<Loaded> {
    let path = resolve(spec, verbose)?;
    load_path(&path, dtype, device)
}
