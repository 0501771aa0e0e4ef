//! The LLaMA-family model: config and per-family knobs, tensor names, loaders, and the forward
//! pass with intervention sites.
pub mod amx_gemm;
pub mod dot_bf16_gemm;
pub mod arch;
pub mod config;
pub mod cpu_ops;
pub mod file_checks;
pub mod flash_attn;
pub mod frozen;
pub mod infer_cuda;
pub mod gemm_tasks;
pub mod packed_gemm;
mod packed_avx2;
pub mod init;
mod json_keys;
pub mod llama;
pub mod low_rank;
pub mod load;
pub mod random;
pub mod registry;
pub mod rotated_linear;
pub mod sites;
pub mod train_ops;
pub(crate) mod train_ops_cuda;
pub mod weights;

pub use config::LlamaConfig;
pub use llama::{Fwd, FwdOut, KvCache, LastMetric, Llama, LogitsAt, SitePass};
pub use load::Loaded;
pub use sites::{BaseLinear, Collector, Hooks, LinearAdapter, Proj, Site, SiteCtx};
