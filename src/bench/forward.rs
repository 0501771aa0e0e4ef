//! `road bench forward`: prefill and greedy-decode throughput.
use super::{median, parse_shapes, sync};
use crate::generate::greedy;
use crate::model::{Fwd, LogitsAt};
use anyhow::Result;
use std::time::Instant;

pub fn forward(model: &str, random_config: Option<&str>, shapes: &[String], reps: usize, decode_tokens: usize) -> Result<()> {
    let shapes = parse_shapes(shapes)?;
    let t_load = Instant::now();
    let (model, source) = match random_config {
        Some(name) => {
            let cfg = crate::model::random::preset(name)?;
            let model = crate::model::random::random_llama(&cfg, crate::runtime::dtype_for("f32")?, &crate::runtime::device_for("auto")?)?;
            (model, format!("random-init {name} ({} parameters)", cfg.param_count()))
        }
        None => {
            let l = crate::model::registry::load_default(model)?;
            (l.model, l.source.display().to_string())
        }
    };
    let model = &model;
    sync(model.device())?;
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    println!(
        "model {source} ({:?}, {:?}), threads {threads}, load {:.1}s",
        model.dtype(),
        model.device(),
        t_load.elapsed().as_secs_f64()
    );
    // Deterministic pseudo-text: ids spread over the vocabulary.
    let seq = |row: usize, t: usize| -> Vec<u32> {
        (0..t).map(|i| ((row * 7919 + i * 104729 + 17) % (model.cfg.vocab_size - 100) + 50) as u32).collect()
    };
    // On a GPU, model FLOP utilisation against this run's own measured matmul rate.
    let peak = match model.device().is_cuda() {
        true => Some(super::peak::matmul_tflops(model.device(), model.dtype(), 8192, 5)?),
        false => None,
    };
    if let Some(p) = peak {
        println!("measured {:?} matmul rate (8192^3, cuBLAS): {p:.1} TFLOP/s", model.dtype());
    }
    for (si, &(b, t)) in shapes.iter().enumerate() {
        let ids: Vec<Vec<u32>> = (0..b).map(|r| seq(r, t)).collect();
        let run = || model.forward(&ids, Fwd { logits: LogitsAt::All, ..Default::default() });
        let warm = run()?; // warm-up (on CUDA also the first-use kernel loads)
        if si == 0 && model.device().is_cuda() {
            // The timed path's numbers against candle's generic ops (no road kernels, composed
            // attention) on the same input: what the speed costs in accuracy, if anything.
            let generic = crate::runtime::with_generic_ops(|| run())?;
            let f = |o: crate::model::FwdOut| o.logits.expect("requested logits").to_dtype(candle_core::DType::F32);
            let (a, g) = (f(warm)?, f(generic)?);
            let diff = (&a - &g)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            let top = g.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            println!("logits {b}x{t} vs candle's generic ops: max |diff| {diff:.4} (max |logit| {top:.2})");
        }
        sync(model.device())?;
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps.max(1) {
            let t0 = Instant::now();
            let out = run()?;
            // Finish the queued work inside the timing (CUDA launches return before the work).
            sync(model.device())?;
            drop(out);
            times.push(t0.elapsed().as_secs_f64());
        }
        let s = median(times);
        let tflops = model.cfg.prefill_flops(b, t) / s / 1e12;
        let mfu = peak.map(|p| format!(", MFU {:.1}%", 100.0 * tflops / p)).unwrap_or_default();
        println!(
            "prefill {b:>2}x{t}: {:>9.1} tokens/s  ({:.1} ms per batch, all-position logits; model {tflops:.3} TFLOP/s{mfu})",
            (b * t) as f64 / s,
            s * 1e3
        );
    }
    let prompt = seq(0, 8);
    greedy(model, &prompt, 4, &[])?; // warm-up
    let mut rates = Vec::new();
    for _ in 0..reps.max(1).min(3) {
        let g = greedy(model, &prompt, decode_tokens, &[])?;
        rates.push((g.tokens.len() - 1) as f64 / g.decode_secs);
    }
    println!("greedy decode (KV cache, batch 1, {decode_tokens} tokens): {:.1} tokens/s", median(rates));
    Ok(())
}
