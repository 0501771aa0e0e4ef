//! road-dii: distributed interchange interventions and RoAd on LLaMA-family models.
pub mod bench;
pub mod cli;
pub mod compose;
pub mod experiment;
pub mod fetch;
pub mod generate;
pub mod intervene;
pub mod model;
pub mod pilot;
pub mod probe;
pub mod runs;
pub mod adapters;
pub mod runtime;
pub mod tasks;
pub mod tiny;
pub mod tokenizer;
pub mod train;
pub mod tui;
pub mod util;

/// candle asks for the thread count on every matmul and, without RAYON_NUM_THREADS, re-reads
/// /proc/cpuinfo each time (measurable in decode). Fix it once at start-up.
pub fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}
