//! RoAd (2D rotary adaptation): block-diagonal 2x2 rotations applied to linear outputs.
//! See METHODS.md §1. Pairing is expressed by `group_size`: within each group of `g`
//! consecutive dims, dim `j` pairs with `j + g/2` (peft's layout); the paper's adjacent pairing
//! `(2i, 2i+1)` is exactly `g = 2`. LoRA lives here too, as the baseline weight adapter.
pub mod adapter;
pub mod any;
pub mod batch;
pub mod fused;
pub mod fused_cuda;
pub mod lora;
pub mod merge;
pub mod rotation;

pub use adapter::{Freeze, RoadAdapter, RoadLayer};
pub use any::AnyAdapter;
pub use batch::MixedAdapters;
pub use lora::LoraAdapter;
pub use rotation::{Rotation, Variant};
