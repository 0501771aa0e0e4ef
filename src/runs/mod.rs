//! Services every workload shares: run folders, CSV files, `--set` overrides and progress
//! events. Below the workloads (experiment, train, pilot, compose, bench, tui) and above
//! nothing but util: any of them may use it, it uses none of them.
pub mod atomic;
pub mod checks;
pub mod csv;
pub mod dirs;
pub mod events;
pub mod overrides;
pub mod slurm;
pub mod state;

pub use self::csv::{read_csv, write_csv};
pub use dirs::{list_runs, new_run_dir, out_root, short_hash, timestamp};
pub use events::{RunEvent, Sink};
pub use checks::check_name;
pub use overrides::{apply_override, apply_overrides};
pub use state::RunStatus;
