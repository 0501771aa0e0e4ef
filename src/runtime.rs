//! Where tensors live and in what precision: `--device` / `--dtype` parsing, the process-wide
//! choice the CLI makes once, and the switch that turns off CPU-only fast paths.
//!
//! Library code never hard-codes `Device::Cpu`: it takes the device of the model (or of its
//! inputs), and loaders that have no model yet ask [`device_for`] / [`dtype_for`], which return
//! the command line's choice when one was given and otherwise the spec's (or the default).
use anyhow::{bail, Result};
use candle_core::{DType, Device};
use std::cell::Cell;
use std::sync::RwLock;

pub mod graph;

/// `cpu`, `cuda`, `cuda:N`, or `auto` (CUDA device 0 when this build has CUDA and a GPU
/// answers, else the CPU). N counts the GPUs CUDA_VISIBLE_DEVICES leaves visible (all when
/// unset), so inside a Slurm task with `--gpus-per-task` `cuda` is the task's own GPU.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(auto_device()),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let idx: usize = s.strip_prefix("cuda:").map(|n| n.parse()).transpose()?.unwrap_or(0);
            if !candle_core::utils::cuda_is_available() {
                bail!("--device {s}: this build has no CUDA support (build with scripts/build-cuda.sh, i.e. `--features cuda`)");
            }
            Device::new_cuda(idx).map_err(|e| match std::env::var("CUDA_VISIBLE_DEVICES") {
                // Inside a Slurm allocation (--gpus-per-task) or a per-GPU process loop the
                // visible GPUs are renumbered from 0: `cuda` / `cuda:0` is the first one given.
                Ok(v) => anyhow::anyhow!("--device {s}: {e} (CUDA_VISIBLE_DEVICES={v:?}: the visible GPUs are numbered from 0)"),
                Err(_) => anyhow::anyhow!("--device {s}: {e}"),
            })
        }
        _ => bail!("unknown device {s:?} (expected auto, cpu or cuda[:N])"),
    }
}

/// CUDA devices this process can open (0 in a build without CUDA): counted by opening them, as
/// `CUDA_VISIBLE_DEVICES` renumbers them from 0.
pub fn cuda_device_count() -> usize {
    if !candle_core::utils::cuda_is_available() {
        return 0;
    }
    (0..64).take_while(|&i| Device::new_cuda(i).is_ok()).count()
}

fn auto_device() -> Device {
    if candle_core::utils::cuda_is_available() {
        // A CUDA build on a machine without a GPU (or driver) falls back to the CPU here, once,
        // at start-up: never later inside a loop.
        if let Ok(d) = Device::new_cuda(0) {
            return d;
        }
    }
    Device::Cpu
}

pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        _ => bail!("unsupported dtype {s:?} (expected f32, bf16 or f16)"),
    }
}

/// The command line's `--device` / `--dtype`, when given (None = not given).
static CHOICE: RwLock<(Option<Device>, Option<DType>)> = RwLock::new((None, None));

/// Record the command line's choice (called once by the CLI before dispatch).
pub fn set_choice(device: Option<Device>, dtype: Option<DType>) {
    *CHOICE.write().expect("runtime choice lock") = (device, dtype);
}

/// The command line's device if one was given, else `spec` parsed (`auto` when empty).
pub fn device_for(spec: &str) -> Result<Device> {
    if let Some(d) = CHOICE.read().expect("runtime choice lock").0.clone() {
        return Ok(d);
    }
    parse_device(if spec.is_empty() { "auto" } else { spec })
}

/// The command line's dtype if one was given, else `spec` parsed (`f32` when empty).
pub fn dtype_for(spec: &str) -> Result<DType> {
    if let Some(d) = CHOICE.read().expect("runtime choice lock").1 {
        return Ok(d);
    }
    parse_dtype(if spec.is_empty() { "f32" } else { spec })
}

thread_local! {
    /// Set: every CPU-only fast path (packed GEMMs, fused RoAd op, frozen-weight op) declines, so
    /// the CPU runs exactly the device-generic ops a GPU runs. Tests use it to check both paths
    /// agree; `ROAD_GENERIC_OPS=1` sets it for a whole run.
    static GENERIC_ONLY: Cell<bool> = Cell::new(std::env::var_os("ROAD_GENERIC_OPS").is_some_and(|v| v != "0"));
}

/// Whether generic ops are forced on this thread (see [`with_generic_ops`]).
pub fn generic_forced() -> bool {
    GENERIC_ONLY.with(|g| g.get())
}

/// Whether a CPU-only fast path may run for tensors on `device`.
pub fn cpu_fast_path(device: &Device) -> bool {
    matches!(device, Device::Cpu) && !GENERIC_ONLY.with(|g| g.get())
}

/// Whether road's own CUDA kernels may run for tensors on `device` (builds with `cuda`).
pub fn cuda_fast_path(device: &Device) -> bool {
    cfg!(feature = "cuda") && device.is_cuda() && !generic_forced()
}

/// Run `f` with the CPU fast paths off on this thread (they are checked on the calling thread,
/// before any work is split across rayon's pool).
pub fn with_generic_ops<T>(f: impl FnOnce() -> T) -> T {
    let old = GENERIC_ONLY.with(|g| g.replace(true));
    let out = f();
    GENERIC_ONLY.with(|g| g.set(old));
    out
}

/// Large negative for additive attention masks, finite in `dtype` (f16 tops out at 65504, where
/// -1e30 becomes -inf and a fully padded row would turn into NaN).
pub fn mask_neg(dtype: DType) -> f32 {
    match dtype {
        DType::F16 => -6.0e4,
        _ => -1e30,
    }
}
