//! RoAd (2D rotary adaptation): block-diagonal 2x2 rotations applied to linear outputs.
//! See METHODS.md §1. Pairing is expressed by `group_size`: within each group of `g`
//! consecutive dims, dim `j` pairs with `j + g/2` (peft's layout); the paper's adjacent pairing
//! `(2i, 2i+1)` is exactly `g = 2`.
pub mod adapter;
pub mod rotation;

pub use adapter::{RoadAdapter, RoadLayer};
pub use rotation::{Variant, Rotation};
