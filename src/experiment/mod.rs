//! Experiments: spec (TOML) → runner → CSVs, figures and progress events.
pub mod cell_job;
pub mod cells;
pub mod controls;
pub mod data;
pub mod figures;
pub mod outputs;
pub mod runner;
pub mod spec;

pub use crate::runs::{RunEvent, Sink};
pub use runner::{run, RunOptions, RunSummary};
pub use spec::Spec;
