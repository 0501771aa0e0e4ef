//! Experiments: spec (TOML) → runner → CSVs, figures and progress events.
pub mod atp;
pub mod atp_qk;
pub mod atp_run;
pub mod atp_verify;
pub mod cell_job;
pub mod cell_store;
pub mod cells;
pub mod controls;
pub mod merge;
pub mod data;
pub mod eval_graph;
pub mod evaluate;
pub mod local_pool;
pub mod figures;
pub mod outputs;
pub mod runner;
pub mod search;
pub mod spec;
pub mod step_graph;
pub mod submit;
pub mod tables;

pub use crate::runs::{RunEvent, Sink};
pub use runner::{run, RunOptions, RunSummary};
pub use spec::Spec;
