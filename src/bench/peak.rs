//! `road bench peak`: the machine's measured arithmetic peak, the denominator of every "fraction
//! of peak" in BENCHMARKS.md. Each thread runs a register-only loop of independent fused
//! multiply-adds (enough accumulators to hide the FMA latency on two pipes), so the loop is bound
//! by FMA throughput alone: no memory traffic, no dependency stalls.
//!
//! Kernels, each used only where the CPU reports its instructions (runtime detection; others are
//! reported as unavailable): AVX-512 f32 FMA (`vfmadd231ps zmm`, 32 flop per instruction), AVX2
//! f32 FMA (`ymm`, 16 flop: the rate of code that does not use AVX-512, e.g. MKL's path on AMD),
//! and AVX512_BF16 dot products (`vdpbf16ps zmm`: 32 bf16 products summed into 16 f32 lanes, 64
//! flop).
use anyhow::Result;
use std::time::Instant;

/// Independent accumulators per loop: FMA latency (4 cycles) × 2 pipes needs ≥ 8; 16 leaves margin.
const ACC: usize = 16;

/// One kernel's result: GFLOP/s over all threads, and per thread.
pub struct Peak {
    pub kernel: &'static str,
    pub threads: usize,
    pub gflops: Option<f64>,
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::ACC;
    use std::arch::x86_64::*;

    /// `iters` rounds of ACC independent 512-bit f32 FMAs; returns a value so nothing is elided.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma512(iters: u64) -> f32 {
        let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        let mut acc = [_mm512_set1_ps(1.0); ACC];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for x in acc {
            s = _mm512_add_ps(s, x);
        }
        _mm512_reduce_add_ps(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fma256(iters: u64) -> f32 {
        let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        let mut acc = [_mm256_set1_ps(1.0); ACC];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        let mut s = _mm256_setzero_ps();
        for x in acc {
            s = _mm256_add_ps(s, x);
        }
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), s);
        out.iter().sum()
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn dpbf16(iters: u64) -> f32 {
        let a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.5), _mm512_set1_ps(0.25));
        let b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3), _mm512_set1_ps(1e-3));
        let mut acc = [_mm512_setzero_ps(); ACC];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_dpbf16_ps(*x, a, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for x in acc {
            s = _mm512_add_ps(s, x);
        }
        _mm512_reduce_add_ps(s)
    }
}

/// (name, flop per accumulator update, kernel if this CPU has its instructions).
type Kernel = (&'static str, f64, Option<fn(u64) -> f32>);

fn kernels() -> Vec<Kernel> {
    #[cfg(target_arch = "x86_64")]
    {
        let f512: fn(u64) -> f32 = |n| unsafe { x86::fma512(n) };
        let f256: fn(u64) -> f32 = |n| unsafe { x86::fma256(n) };
        let bf16: fn(u64) -> f32 = |n| unsafe { x86::dpbf16(n) };
        vec![
            ("f32 FMA, AVX-512 (zmm)", 32.0, is_x86_feature_detected!("avx512f").then_some(f512)),
            ("f32 FMA, AVX2 (ymm)", 16.0, (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")).then_some(f256)),
            (
                "bf16 dot product, AVX512_BF16 (vdpbf16ps zmm)",
                64.0,
                (is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")).then_some(bf16),
            ),
        ]
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        vec![("f32 FMA, AVX-512 (zmm)", 32.0, None), ("f32 FMA, AVX2 (ymm)", 16.0, None), ("bf16 dot product, AVX512_BF16", 64.0, None)]
    }
}

/// GFLOP/s of `f` on `threads` threads running `iters` rounds each (the best of `reps`).
fn measure(f: fn(u64) -> f32, flop_per_update: f64, threads: usize, iters: u64, reps: usize) -> f64 {
    let mut best = 0f64;
    for _ in 0..reps {
        let t = Instant::now();
        let sink: f32 = std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads).map(|_| s.spawn(move || f(iters))).collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        });
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(sink);
        let flops = flop_per_update * ACC as f64 * iters as f64 * threads as f64;
        best = best.max(flops / secs / 1e9);
    }
    best
}

/// Measure every kernel on 1 thread and on `threads` (default: all the cores the process may use).
pub fn peaks(threads: Option<usize>, iters: u64, reps: usize) -> Vec<Peak> {
    let all = threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let mut out = Vec::new();
    for (name, flop, f) in kernels() {
        let mut counts = vec![1];
        if all > 1 {
            counts.push(all);
        }
        for n in counts {
            out.push(Peak { kernel: name, threads: n, gflops: f.map(|f| measure(f, flop, n, iters, reps)) });
        }
    }
    out
}

/// `road bench peak`: print the table (the figure BENCHMARKS.md divides by).
pub fn peak(threads: Option<usize>, iters: u64, reps: usize) -> Result<()> {
    let device = crate::runtime::device_for("cpu")?;
    if device.is_cuda() {
        println!("{device:?} matmul peak (8192x8192x8192, best of {reps}):");
        for dtype in [candle_core::DType::BF16, candle_core::DType::F16, candle_core::DType::F32] {
            println!("  {:<6} {:>8.1} TFLOP/s", format!("{dtype:?}"), matmul_tflops(&device, dtype, 8192, reps)?);
        }
        return Ok(());
    }
    println!("machine peak (register-only FMA loops, {ACC} accumulators, best of {reps}):");
    for p in peaks(threads, iters, reps) {
        match p.gflops {
            Some(g) => println!("  {:<48} {:>2} thread{}  {:>8.1} GFLOP/s", p.kernel, p.threads, if p.threads == 1 { " " } else { "s" }, g),
            None => println!("  {:<48} not available on this CPU", p.kernel),
        }
    }
    Ok(())
}

/// TFLOP/s of one `n`×`n`×`n` matmul in `dtype` on `device` (cuBLAS on CUDA), the best of
/// `reps`: the GPU's measured matmul rate, the denominator of model FLOP utilisation.
pub fn matmul_tflops(device: &candle_core::Device, dtype: candle_core::DType, n: usize, reps: usize) -> Result<f64> {
    let a = candle_core::Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(dtype)?;
    let b = candle_core::Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(dtype)?;
    drop(a.matmul(&b)?); // warm-up (cuBLAS handle and heuristics)
    device.synchronize()?;
    let mut best = f64::MAX;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        let c = a.matmul(&b)?;
        device.synchronize()?;
        best = best.min(t.elapsed().as_secs_f64());
        drop(c);
    }
    Ok(2.0 * (n as f64).powi(3) / best / 1e12)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loops do the arithmetic they are timed for: each available kernel's result equals the
    /// same updates done in scalar code (so a loop the compiler shortened would fail here).
    #[test]
    fn each_available_kernel_computes_its_updates() {
        let n = 7u64;
        let mut x = 1f32;
        for _ in 0..n {
            x = x.mul_add(0.999_999, 1e-7);
        }
        // bf16 operands: 0.5·1e-3 + 0.25·1e-3 per lane pair, both rounded to bf16 first.
        let bf = |v: f32| f32::from_bits(v.to_bits().wrapping_add(0x7fff + ((v.to_bits() >> 16) & 1)) & 0xffff_0000);
        let per_pair = bf(0.5) * bf(1e-3) + bf(0.25) * bf(1e-3);
        let expect = [(ACC * 16) as f32 * x, (ACC * 8) as f32 * x, (ACC * 16) as f32 * per_pair * n as f32];
        for ((name, _, f), want) in kernels().into_iter().zip(expect) {
            if let Some(f) = f {
                let got = f(n);
                assert!((got - want).abs() <= 1e-4 * want.abs(), "{name}: {got} vs {want}");
            }
        }
    }
}
