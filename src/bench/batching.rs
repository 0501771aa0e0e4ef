//! `road bench batching`: throughput of mixed-adapter batches (every row may use a different
//! adapter) for RoAd vs LoRA vs DoRA vs OFT vs the plain model, like the RoAd paper's Figure 4. Adapters are
//! random (non-identity), on every projection of every layer; rows use adapter `row % n`.
//! Every configuration is measured `repeats` times in interleaved rounds (the machine is shared:
//! a burst of someone else's load then lands on all methods, not on one), each round starting one
//! configuration later, and compared by medians.
use crate::generate::greedy_batch;
use crate::model::{LinearAdapter, Llama, Proj};
use crate::adapters::{AnyAdapter, DoraAdapter, LoraAdapter, MixedAdapters, OftAdapter, RoadAdapter, Variant};
use crate::util::rng::Rng;
use anyhow::Result;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub round: usize,
    pub method: String,
    pub n_adapters: usize,
    pub batch: usize,
    pub gen_tokens: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
    /// Generated tokens (all rows) per second of prefill + decode.
    pub tokens_per_s: f64,
    /// Process CPU seconds (user + system, all threads) over prefill + decode: on a shared,
    /// oversubscribed machine this moves far less with others' load than wall time does.
    pub cpu_s: f64,
    pub tokens_per_cpu_s: f64,
}

fn random_road(m: &Llama, rng: &mut Rng) -> Result<AnyAdapter> {
    // peft's default pairing where the widths allow it (tiny test models are narrower).
    let g = if Proj::ALL.iter().all(|&p| crate::adapters::adapter::proj_out_dim(&m.cfg, p) % 64 == 0) { 64 } else { 2 };
    let a = RoadAdapter::new_identity(&m.cfg, Variant::Road1, g, 0..m.cfg.num_layers, &Proj::ALL, m.device())?;
    for l in a.layers.values() {
        let n = l.theta.elem_count();
        l.theta.set(&rng.normal_tensor(&[n], 0.1, m.device())?)?;
        l.alpha.set(&(rng.normal_tensor(&[n], 0.05, m.device())? + 1.0)?)?;
    }
    Ok(AnyAdapter::Road(a))
}

fn random_lora(m: &Llama, r: usize, rng: &mut Rng) -> Result<AnyAdapter> {
    let a = LoraAdapter::new(&m.cfg, r, 2.0 * r as f64, 0.0, 0..m.cfg.num_layers, &Proj::ALL, rng, m.device())?;
    for l in a.layers.values() {
        l.b.set(&rng.normal_tensor(l.b.dims(), 0.01, m.device())?)?;
    }
    Ok(AnyAdapter::Lora(a))
}

fn random_dora(m: &Llama, r: usize, rng: &mut Rng) -> Result<AnyAdapter> {
    let a = DoraAdapter::new(m, r, 2.0 * r as f64, 0.0, 0..m.cfg.num_layers, &Proj::ALL, rng)?;
    for l in a.lora.layers.values() {
        l.b.set(&rng.normal_tensor(l.b.dims(), 0.01, m.device())?)?;
    }
    for v in a.magnitude.values() {
        v.set(&(v.as_tensor() * (rng.normal_tensor(v.dims(), 0.01, m.device())? + 1.0)?)?)?;
    }
    Ok(AnyAdapter::Dora(a))
}

fn random_oft(m: &Llama, rng: &mut Rng) -> Result<AnyAdapter> {
    // peft's usual block of 32 where every input width allows it (tiny test models are narrower).
    let b = [32, 16, 8, 4, 2].into_iter().find(|&b| Proj::ALL.iter().all(|&p| crate::adapters::lora::proj_in_dim(&m.cfg, p) % b == 0)).unwrap_or(2);
    let a = OftAdapter::new(&m.cfg, b, Some(5), 0..m.cfg.num_layers, &Proj::ALL, m.device())?;
    for l in a.layers.values() {
        l.weight.set(&rng.normal_tensor(l.weight.dims(), 0.01, m.device())?)?;
    }
    Ok(AnyAdapter::Oft(a))
}

pub struct Sweep {
    pub batches: Vec<usize>,
    pub n_adapters: Vec<usize>,
    pub tokens: Vec<usize>,
    pub lora_r: usize,
    pub prompt_len: usize,
    pub repeats: usize,
    /// Which of `METHODS` to measure.
    pub methods: Vec<String>,
}

const METHODS: [&str; 5] = ["base", "road", "lora", "dora", "oft"];

pub fn batching(model: &str, sw: &Sweep) -> Result<PathBuf> {
    if let Some(bad) = sw.methods.iter().find(|m| !METHODS.contains(&m.as_str())) {
        anyhow::bail!("bench batching: unknown method {bad:?} (expected any of {})", METHODS.join(", "));
    }
    let l = crate::model::registry::load_default(model)?;
    let model = &l.model;
    let mut rng = Rng::new(0);
    let max_n = *sw.n_adapters.iter().max().unwrap_or(&1);
    let roads: Vec<(String, AnyAdapter)> = (0..max_n).map(|i| Ok((format!("road{i}"), random_road(model, &mut rng)?))).collect::<Result<_>>()?;
    let loras: Vec<(String, AnyAdapter)> = (0..max_n).map(|i| Ok((format!("lora{i}"), random_lora(model, sw.lora_r, &mut rng)?))).collect::<Result<_>>()?;
    let doras: Vec<(String, AnyAdapter)> = (0..max_n).map(|i| Ok((format!("dora{i}"), random_dora(model, sw.lora_r, &mut rng)?))).collect::<Result<_>>()?;
    let ofts: Vec<(String, AnyAdapter)> = (0..max_n).map(|i| Ok((format!("oft{i}"), random_oft(model, &mut rng)?))).collect::<Result<_>>()?;
    let prompt = |row: usize| -> Vec<u32> { (0..sw.prompt_len).map(|i| ((row * 7919 + i * 104_729 + 17) % 40_000 + 100) as u32).collect() };
    // Configurations: (method, n_adapters, batch); the plain model once per batch size.
    let mut configs = vec![];
    let want = |m: &str| sw.methods.iter().any(|x| x == m);
    for &b in &sw.batches {
        if want("base") {
            configs.push(("base", 0, b));
        }
        // A batch of b rows can use at most b distinct adapters: n is capped at b.
        let mut ns: Vec<usize> = sw.n_adapters.iter().map(|&n| n.min(b).max(1)).collect();
        ns.sort_unstable();
        ns.dedup();
        for n in ns {
            configs.extend(METHODS[1..].iter().filter(|m| want(m)).map(|&m| (m, n, b)));
        }
    }
    let total = configs.len() * sw.tokens.len() * sw.repeats.max(1);
    let pb = indicatif::ProgressBar::new(total as u64);
    pb.set_style(indicatif::ProgressStyle::with_template("bench batching {bar:30} {pos}/{len}  {msg}  ETA {eta}").expect("static template"));
    // Adapter stacks and row assignments are built once per configuration (serving-time setup).
    let mut prepared = vec![];
    for &(method, n, b) in &configs {
        let mut mixed = match method {
            "road" => Some(MixedAdapters::new(&roads[..n], model)?),
            "lora" => Some(MixedAdapters::new(&loras[..n], model)?),
            "dora" => Some(MixedAdapters::new(&doras[..n], model)?),
            "oft" => Some(MixedAdapters::new(&ofts[..n], model)?),
            _ => None,
        };
        if let Some(mx) = mixed.as_mut() {
            let assign: Vec<Option<usize>> = (0..b).map(|r| Some(r % n)).collect();
            mx.set_rows(&assign, model.dtype())?;
        }
        prepared.push((method, n, b, mixed));
    }
    let mut rows = vec![];
    for round in 0..sw.repeats.max(1) {
        // Each round starts one configuration later, so no method always runs right after the
        // same other one (position in the round measurably moves a method's time).
        let k = prepared.len().max(1);
        for (method, n, b, mixed) in prepared.iter().cycle().skip(round % k).take(prepared.len()) {
            let (method, n, b) = (*method, *n, *b);
            let prompts: Vec<Vec<u32>> = (0..b).map(prompt).collect();
            let ad = mixed.as_ref().map(|m| m as &dyn LinearAdapter);
            greedy_batch(model, ad, &prompts, &vec![2; b], &[])?; // warm-up (caches, allocator)
            for &t in &sw.tokens {
                pb.set_message(format!("round {round} {method} n={n} b={b} t={t}"));
                let c0 = crate::util::cpu_secs();
                let g = greedy_batch(model, ad, &prompts, &vec![t; b], &[])?;
                let cpu_s = crate::util::cpu_secs() - c0;
                let secs = g.prefill_secs + g.decode_secs;
                let toks = (b * t) as f64;
                rows.push(Row {
                    round,
                    method: method.into(),
                    n_adapters: n,
                    batch: b,
                    gen_tokens: t,
                    prefill_s: g.prefill_secs,
                    decode_s: g.decode_secs,
                    tokens_per_s: toks / secs,
                    cpu_s,
                    tokens_per_cpu_s: toks / cpu_s.max(1e-9),
                });
                pb.inc(1);
            }
        }
    }
    pb.finish_and_clear();
    let dir = crate::runs::new_run_dir("bench-batching", &crate::runs::short_hash(&format!("{:?} {:?} {:?}", sw.batches, sw.n_adapters, sw.tokens)))?;
    let mut w = csv::Writer::from_path(dir.join("batching.csv"))?;
    for r in &rows {
        w.serialize(r)?;
    }
    w.flush()?;
    let med = medians(&rows);
    plot(&med, &dir.join("batching.svg"), *sw.tokens.iter().max().unwrap_or(&1), max_n)?;
    let mut w = csv::Writer::from_path(dir.join("batching_median.csv"))?;
    for r in &med {
        w.serialize(r)?;
    }
    w.flush()?;
    println!("medians over {} interleaved rounds", sw.repeats.max(1));
    println!("{:<6} {:>3} {:>5} {:>6} {:>9} {:>8} {:>8} {:>9} {:>8} {:>8}", "method", "n", "batch", "tokens", "tok/s", "/plain", "/lora", "tok/cpu-s", "/plain", "/lora");
    let find = |m: &str, r: &Row| med.iter().find(|x| x.method == m && (m == "base" || x.n_adapters == r.n_adapters) && x.batch == r.batch && x.gen_tokens == r.gen_tokens);
    for r in &med {
        let rel = |m: &str, f: fn(&Row) -> f64| find(m, r).map(|o| format!("{:.3}", f(r) / f(o))).unwrap_or_default();
        let (wall, cpu): (fn(&Row) -> f64, fn(&Row) -> f64) = (|x| x.tokens_per_s, |x| x.tokens_per_cpu_s);
        println!(
            "{:<6} {:>3} {:>5} {:>6} {:>9.1} {:>8} {:>8} {:>9.1} {:>8} {:>8}",
            r.method, r.n_adapters, r.batch, r.gen_tokens, r.tokens_per_s, rel("base", wall), rel("lora", wall), r.tokens_per_cpu_s, rel("base", cpu), rel("lora", cpu)
        );
    }
    println!("{}", dir.display());
    Ok(dir)
}

/// Per-configuration medians of tokens/s (and of the times), rounds folded into `round = 0`.
fn medians(rows: &[Row]) -> Vec<Row> {
    let mut out: Vec<Row> = vec![];
    for r in rows.iter().filter(|r| r.round == 0) {
        let same: Vec<&Row> = rows.iter().filter(|x| x.method == r.method && x.n_adapters == r.n_adapters && x.batch == r.batch && x.gen_tokens == r.gen_tokens).collect();
        let med = |f: &dyn Fn(&Row) -> f64| -> f64 {
            let mut v: Vec<f64> = same.iter().map(|x| f(x)).collect();
            v.sort_by(f64::total_cmp);
            let k = v.len();
            if k % 2 == 1 { v[k / 2] } else { (v[k / 2 - 1] + v[k / 2]) / 2.0 }
        };
        out.push(Row {
            round: 0,
            prefill_s: med(&|x| x.prefill_s),
            decode_s: med(&|x| x.decode_s),
            tokens_per_s: med(&|x| x.tokens_per_s),
            cpu_s: med(&|x| x.cpu_s),
            tokens_per_cpu_s: med(&|x| x.tokens_per_cpu_s),
            ..r.clone()
        });
    }
    out
}

/// Throughput vs batch size (each method with min(batch, max_n) adapters) at `tokens` generated:
/// wall-clock tokens/s on the left, tokens per CPU-second (robust to others' load) on the right.
fn plot(rows: &[Row], path: &Path, tokens: usize, max_n: usize) -> Result<()> {
    let root = SVGBackend::new(path, (1100, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (left, right) = root.split_horizontally(550);
    let panels: [(&_, &str, fn(&Row) -> f64); 2] =
        [(&left, "generated tokens / s (wall)", |r| r.tokens_per_s), (&right, "generated tokens / CPU-second", |r| r.tokens_per_cpu_s)];
    for (area, ydesc, metric) in panels {
        let series = |m: &str| -> Vec<(f64, f64)> {
            rows.iter()
                .filter(|r| r.method == m && r.gen_tokens == tokens && (m == "base" || r.n_adapters == r.batch.min(max_n)))
                .map(|r| ((r.batch as f64).log2(), metric(r)))
                .collect()
        };
        let ymax = rows.iter().map(metric).fold(1.0, f64::max) * 1.1;
        let xmax = rows.iter().map(|r| (r.batch as f64).log2()).fold(0.0, f64::max);
        let mut ch = ChartBuilder::on(area)
            .caption(format!("Mixed-adapter batching, {tokens} tokens/row"), ("sans-serif", 17))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.2..xmax + 0.2, 0.0..ymax)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        ch.configure_mesh()
            .x_desc(format!("batch size (row i uses adapter i % {max_n})"))
            .y_desc(ydesc)
            // Ticks fall at half steps too; only whole log2 steps are batch sizes.
            .x_label_formatter(&|x| if (x - x.round()).abs() < 1e-6 { format!("{}", 2f64.powf(x.round()) as usize) } else { String::new() })
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        for (m, color) in [("base", BLACK), ("road", BLUE), ("lora", RED), ("dora", GREEN), ("oft", MAGENTA)] {
            let s = series(m);
            ch.draw_series(LineSeries::new(s.clone(), color.stroke_width(2)))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label(match m {
                    "base" => "no adapter",
                    "road" => "RoAd1 (element-wise)",
                    "lora" => "LoRA r=8 (bmm)",
                    "dora" => "DoRA (bmm + row scale)",
                    _ => "OFT (per-row input blocks, bmm)",
                })
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
            ch.draw_series(s.iter().map(|&(x, y)| Circle::new((x, y), 3, color.filled()))).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        ch.configure_series_labels().position(SeriesLabelPosition::LowerRight).border_style(BLACK).background_style(WHITE).draw().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
