//! `road bench gemm`: one linear layer `y = x · wᵀ` (`x` `[m, k]`, `w` `[n, k]`, f32, or bf16 with
//! `--dtype bf16`: candle's bf16 matmul against the AMX path) through
//! candle's GEMM and through the path road's forward takes (the AVX-512 GEMM against the weight
//! packed once, packed outside the timing as the model packs it once per weight; without AVX-512
//! its AVX2 register block up to 256 rows), interleaved rep by rep so a busy machine slows both alike; GFLOP/s and the
//! fraction of the machine's measured FMA peak (`road bench peak`).
use super::median;
use crate::model::packed_gemm::{self, PackSlot};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use std::time::Instant;

fn parse(s: &str) -> Result<(usize, usize, usize)> {
    let v: Vec<usize> = s.split('x').map(|p| p.trim().parse()).collect::<Result<_, _>>()?;
    match v[..] {
        [m, k, n] if m > 0 && k > 0 && n > 0 => Ok((m, k, n)),
        _ => bail!("gemm shape {s:?}: expected MxKxN with positive sizes, e.g. 32x576x1536"),
    }
}

pub fn gemm(shapes: &[String], reps: usize, cold_mib: usize) -> Result<()> {
    let dev = Device::Cpu;
    let dtype = crate::runtime::dtype_for("f32")?;
    let peak = super::peak::peaks(None, 20_000_000, 3);
    let best = |name: &str| peak.iter().filter(|p| p.kernel.starts_with(name)).filter_map(|p| p.gflops).fold(0f64, f64::max);
    let (p512, p256) = (best("f32 FMA, AVX-512"), best("f32 FMA, AVX2"));
    println!("measured f32 peak: {p512:.1} GFLOP/s (AVX-512), {p256:.1} GFLOP/s (AVX2), all threads");
    println!("{:>14}  {:>16}  {:>16}  {:>7}", "m x k x n", "candle GFLOP/s", "road GFLOP/s", "ratio");
    for s in shapes {
        let (m, k, n) = parse(s)?;
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?.to_dtype(dtype)?;
        // Distinct weights (and their packed copies) cycled call by call when --cold-mib asks
        // for more than one: the working set then exceeds the caches, as a decode step's does.
        let copies = (cold_mib << 20).div_ceil(n * k * dtype.size_in_bytes()).max(1);
        let ws: Vec<(Tensor, PackSlot)> = (0..copies).map(|_| Ok((Tensor::randn(0f32, 1.0, (n, k), &dev)?.to_dtype(dtype)?, PackSlot::default()))).collect::<Result<_>>()?;
        let packed: Vec<_> = ws.iter().map(|(w, slot)| slot.get(w)).collect();
        let road = |i: usize, x: &Tensor| -> Result<Option<Tensor>> {
            match &packed[i] {
                Some(p) => packed_gemm::try_linear(x, p),
                None => Ok(None),
            }
        };
        let has_road = road(0, &x)?.is_some();
        let (mut tc, mut tr) = (Vec::new(), Vec::new());
        for rep in 0..reps.max(1) + 1 {
            let i = rep % copies;
            let t = Instant::now();
            std::hint::black_box(x.matmul(&ws[i].0.t()?)?);
            tc.push(t.elapsed().as_secs_f64());
            if has_road {
                let i = (rep + copies / 2) % copies;
                let t = Instant::now();
                std::hint::black_box(road(i, &x)?);
                tr.push(t.elapsed().as_secs_f64());
            }
        }
        let flop = 2.0 * (m * k * n) as f64;
        let gc = flop / median(tc[1..].to_vec()) / 1e9;
        let pct = |g: f64| if p512 > 0.0 { format!(" ({:>4.0}%)", 100.0 * g / p512) } else { String::new() };
        if has_road {
            let gr = flop / median(tr[1..].to_vec()) / 1e9;
            println!("{s:>14}  {gc:>8.1}{:<8}  {gr:>8.1}{:<8}  {:>6.2}x", pct(gc), pct(gr), gr / gc);
        } else {
            println!("{s:>14}  {gc:>8.1}{:<8}  {:>16}", pct(gc), "(GEMM)");
        }
    }
    println!("(percentages: of the AVX-512 f32 peak; {dtype:?} operands)");
    Ok(())
}
