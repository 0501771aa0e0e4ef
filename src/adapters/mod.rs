//! RoAd (2D rotary adaptation): block-diagonal 2x2 rotations applied to linear outputs.
//! See METHODS.md §1. Pairing is expressed by `group_size`: within each group of `g`
//! consecutive dims, dim `j` pairs with `j + g/2` (peft's layout); the paper's adjacent pairing
//! `(2i, 2i+1)` is exactly `g = 2`. The baselines the RoAd paper compares against live here too,
//! one file each, all in peft's format: LoRA, DoRA (`dora`), OFT (`oft`) and BOFT (`boft`), the
//! last two built on the orthogonal blocks of `orth`.
pub mod adapter;
pub mod any;
pub mod batch;
pub mod boft;
pub mod dora;
pub mod dropout;
pub mod fused;
pub mod fused_cuda;
pub mod lora;
pub mod merge;
pub mod neumann;
pub mod oft;
pub mod orth;
pub mod rotation;

pub use adapter::{Freeze, RoadAdapter, RoadLayer};
pub use any::AnyAdapter;
pub use batch::MixedAdapters;
pub use boft::BoftAdapter;
pub use dora::DoraAdapter;
pub use lora::LoraAdapter;
pub use oft::OftAdapter;
pub use rotation::{Rotation, Variant};

use crate::model::{LlamaConfig, Proj};
use std::collections::BTreeMap;

/// A freshly initialised layer per (block, projection) of an adapter: `make(l, p)` for each of
/// `targets` in each block of `layers`, a block past the model's depth refused. Every kind's
/// constructor builds its table through this.
pub fn per_target<V>(
    cfg: &LlamaConfig,
    layers: impl IntoIterator<Item = usize>,
    targets: &[Proj],
    mut make: impl FnMut(usize, Proj) -> anyhow::Result<V>,
) -> anyhow::Result<BTreeMap<(usize, Proj), V>> {
    let mut map = BTreeMap::new();
    for l in layers {
        if l >= cfg.num_layers {
            anyhow::bail!("layer {l} out of range (model has {} layers)", cfg.num_layers);
        }
        for &p in targets {
            map.insert((l, p), make(l, p)?);
        }
    }
    Ok(map)
}
