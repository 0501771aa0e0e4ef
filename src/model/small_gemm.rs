//! Inference-only AVX-512 path for linear layers on a few dozen rows (short prefills, batch-1
//! prompts of a patching sweep): `y = x · wᵀ` with the `[out, in]` weight read in place.
//!
//! Why not the general GEMM: candle's gemm (without its `x86-v4` feature) runs AVX2 kernels, half
//! the machine's f32 rate; with that feature its AVX-512 kernels lose at these row counts (1×32
//! prefill measured at half speed). Here each task owns a block of output features; for 4 weight
//! rows at a time (kept in L1) it runs every 4-row block of `x` (kept in L2) through 16 zmm
//! accumulators — 8 loads per 16 FMAs — and reduces each accumulator once at the end. Each weight
//! row is read from memory once, as in the decode gemv.
use anyhow::Result;
use candle_core::Tensor;
use rayon::prelude::*;

/// Row counts this path takes: above the gemv's, up to where gemm's AVX-512 kernels (x86-v4) catch up
/// (equal at 64 rows on SmolLM2's shapes: `road bench gemm`).
pub const MIN_ROWS: usize = super::gemv::MAX_ROWS + 1;
pub const MAX_ROWS: usize = 48;

/// Output features per parallel task.
const CHUNK: usize = 64;

/// `x @ wᵀ` for `x` `[..., in]` with `MIN_ROWS..=MAX_ROWS` rows, or None when the path does not
/// apply (not the CPU fast path, not f32, other row counts, no AVX-512, non-contiguous weight).
pub fn try_linear(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    #[cfg(target_arch = "x86_64")]
    {
        if !enabled() {
            return Ok(None);
        }
        return super::gemv::cpu_linear(x, w, |rows| (MIN_ROWS..=MAX_ROWS).contains(&rows), |xs, ws, rows, in_d, out_d| {
            let mut y = vec![0f32; rows * out_d];
            let out = SharedOut(y.as_mut_ptr());
            (0..out_d.div_ceil(CHUNK)).into_par_iter().for_each(|c| {
                let out = &out;
                let (lo, hi) = (c * CHUNK, ((c + 1) * CHUNK).min(out_d));
                // SAFETY: AVX-512F was detected; every task writes only the columns lo..hi of y.
                unsafe { chunk(xs, ws, rows, in_d, out_d, lo, hi, out.0) };
            });
            y
        });
    }
    #[allow(unreachable_code)]
    Ok(None)
}

/// AVX-512F present, and not turned off (`ROAD_SMALL_GEMM=0` routes these shapes to the GEMM,
/// for comparisons).
#[cfg(target_arch = "x86_64")]
fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| is_x86_feature_detected!("avx512f") && std::env::var("ROAD_SMALL_GEMM").map_or(true, |v| v != "0"))
}

/// The output buffer, shared by tasks that write disjoint columns.
struct SharedOut(*mut f32);
unsafe impl Sync for SharedOut {}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn chunk(xs: &[f32], ws: &[f32], rows: usize, k: usize, out_d: usize, lo: usize, hi: usize, y: *mut f32) {
    let mut o = lo;
    while o < hi {
        let c = (hi - o).min(4);
        let mut r = 0;
        while r < rows {
            let n = (rows - r).min(4);
            let (x, w) = (xs.as_ptr().add(r * k), ws.as_ptr().add(o * k));
            let y0 = y.add(r * out_d + o);
            // Full 4×4 blocks are the common case; ragged edges take the same code at 1×c.
            if n == 4 && c == 4 {
                block::<4, 4>(x, w, k, y0, out_d);
            } else {
                for j in 0..n {
                    match c {
                        4 => block::<1, 4>(x.add(j * k), w, k, y0.add(j * out_d), out_d),
                        3 => block::<1, 3>(x.add(j * k), w, k, y0.add(j * out_d), out_d),
                        2 => block::<1, 2>(x.add(j * k), w, k, y0.add(j * out_d), out_d),
                        _ => block::<1, 1>(x.add(j * k), w, k, y0.add(j * out_d), out_d),
                    }
                }
            }
            r += n;
        }
        o += c;
    }
}

/// `R` rows of x against `C` weight rows over the whole inner dimension `k`: `R·C` dot products
/// in zmm accumulators, the last partial vector through a masked load.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn block<const R: usize, const C: usize>(x: *const f32, w: *const f32, k: usize, y: *mut f32, ldy: usize) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    let mut i = 0;
    while i + 16 <= k {
        let mut xv = [_mm512_setzero_ps(); R];
        for (j, v) in xv.iter_mut().enumerate() {
            *v = _mm512_loadu_ps(x.add(j * k + i));
        }
        for c in 0..C {
            let wv = _mm512_loadu_ps(w.add(c * k + i));
            for j in 0..R {
                acc[j][c] = _mm512_fmadd_ps(xv[j], wv, acc[j][c]);
            }
        }
        i += 16;
    }
    if i < k {
        let m: __mmask16 = ((1u32 << (k - i)) - 1) as u16;
        let mut xv = [_mm512_setzero_ps(); R];
        for (j, v) in xv.iter_mut().enumerate() {
            *v = _mm512_maskz_loadu_ps(m, x.add(j * k + i));
        }
        for c in 0..C {
            let wv = _mm512_maskz_loadu_ps(m, w.add(c * k + i));
            for j in 0..R {
                acc[j][c] = _mm512_fmadd_ps(xv[j], wv, acc[j][c]);
            }
        }
    }
    for j in 0..R {
        for c in 0..C {
            *y.add(j * ldy + c) = _mm512_reduce_add_ps(acc[j][c]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Equal to candle's matmul at every row count it takes, with ragged feature and row blocks
    /// and an inner size with a masked tail; other row counts are refused.
    #[test]
    fn small_gemm_equals_matmul() {
        let dev = Device::Cpu;
        for (out_d, in_d) in [(130, 70), (67, 64), (5, 17)] {
            let w = Tensor::randn(0f32, 1.0, (out_d, in_d), &dev).unwrap();
            for rows in [MIN_ROWS, 7, 8, 13, 32, MAX_ROWS] {
                let x = Tensor::randn(0f32, 1.0, (1, rows, in_d), &dev).unwrap();
                let Some(fast) = try_linear(&x, &w).unwrap() else { return }; // no AVX-512 here
                let slow = x.reshape((rows, in_d)).unwrap().matmul(&w.t().unwrap()).unwrap();
                let slow = slow.reshape((1, rows, out_d)).unwrap();
                let d = (fast - slow).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(d < 1e-4, "{out_d}x{in_d}, rows {rows}: max diff {d}");
            }
        }
        let w = Tensor::randn(0f32, 1.0, (8, 16), &dev).unwrap();
        for rows in [MIN_ROWS - 1, MAX_ROWS + 1] {
            let x = Tensor::randn(0f32, 1.0, (rows, 16), &dev).unwrap();
            assert!(try_linear(&x, &w).unwrap().is_none(), "rows {rows} go elsewhere");
        }
    }
}
