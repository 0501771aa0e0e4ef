//! Experiments: spec (TOML) → runner → CSVs, figures and progress events.
pub mod cells;
pub mod data;
pub mod events;
pub mod figures;
pub mod outputs;
pub mod runner;
pub mod spec;

pub use events::{RunEvent, Sink};
pub use runner::{run, RunOptions, RunSummary};
pub use spec::Spec;
