//! Fine-tuning: data, optimizer, schedule, the engine (a library call), and TOML experiment specs.
pub mod cls;
pub mod data;
pub mod engine;
pub mod lm;
pub mod methods;
pub mod optim;
mod optim_cuda;
mod params;
pub mod reft;
pub mod schedule;
pub mod run;
pub mod spec;
mod step_profile;

pub use engine::{train, MethodCfg, TaskCfg, TrainConfig, TrainData, TrainOutput, Trained};
