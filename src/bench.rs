//! `road bench ...`: throughput measurements (reported, never asserted in tests).
use crate::cli::ModelArgs;
use crate::generate::greedy;
use crate::model::{Fwd, LogitsAt};
use anyhow::Result;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn forward(m: &ModelArgs, reps: usize, decode_tokens: usize) -> Result<()> {
    let l = m.load()?;
    let model = &l.model;
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    println!("model {} ({:?}, {:?}), threads {threads}", l.source.display(), model.dtype(), model.device());
    // Deterministic pseudo-text: ids spread over the vocabulary.
    let seq = |row: usize, t: usize| -> Vec<u32> {
        (0..t).map(|i| ((row * 7919 + i * 104729 + 17) % (model.cfg.vocab_size - 100) + 50) as u32).collect()
    };
    for &(b, t) in &[(1usize, 32usize), (16, 32)] {
        let ids: Vec<Vec<u32>> = (0..b).map(|r| seq(r, t)).collect();
        let run = || model.forward(&ids, Fwd { logits: LogitsAt::All, ..Default::default() });
        run()?; // warm-up
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps.max(1) {
            let t0 = Instant::now();
            let out = run()?;
            // Touch the result so lazy backends finish the work inside the timing.
            out.logits.expect("logits").sum_all()?.to_scalar::<f32>().ok();
            times.push(t0.elapsed().as_secs_f64());
        }
        let s = median(times);
        println!("prefill {b:>2}x{t}: {:>9.1} tokens/s  ({:.1} ms per batch, all-position logits)", (b * t) as f64 / s, s * 1e3);
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
