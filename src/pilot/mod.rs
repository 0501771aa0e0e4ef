//! The RoAd paper's pilot study (METHODS.md §3) as one experiment: `road run` on a file with
//! `kind = "pilot"`. Spec → cached fine-tunes → probes (ΔM/ΔD, heads, swap) → CSV/SVG/summary.
pub mod dora_weights;
pub mod figures;
pub mod finetunes;
pub mod run;
pub mod spec;
pub mod summary;
pub mod tables;

pub use run::{run_pilot, PilotOptions};
pub use tables::PilotResult;
pub use spec::{is_pilot, PilotSpec};
