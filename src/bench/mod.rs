//! `road bench ...`: throughput measurements (reported, never asserted in tests). Each bench
//! takes plain arguments (a model name; device and dtype are the run-wide choice in `runtime`),
//! so only the CLI layer knows clap.
pub mod atp;
pub mod batching;
pub mod dii;
pub mod forward;
pub mod gemm;
pub mod peak;

use anyhow::Result;

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Parse `BxT` prefill shapes.
pub(crate) fn parse_shapes(shapes: &[String]) -> Result<Vec<(usize, usize)>> {
    shapes
        .iter()
        .map(|s| {
            let (b, t) = s.split_once('x').ok_or_else(|| anyhow::anyhow!("shape {s:?}: expected BxT, e.g. 16x32"))?;
            Ok((b.trim().parse()?, t.trim().parse()?))
        })
        .collect()
}

/// Wait for queued device work (CUDA launches are asynchronous), so timings cover the work.
pub fn sync(dev: &candle_core::Device) -> Result<()> {
    dev.synchronize()?;
    Ok(())
}
