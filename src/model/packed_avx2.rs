//! The packed GEMM's register block for CPUs with AVX2/FMA but not AVX-512 (`packed_gemm`'s
//! panel layout, its loops; only the innermost block differs).
//!
//! Why: without AVX-512 a decode step's projections (8 rows × 576 × 1536 on SmolLM2) ran through
//! candle's GEMM, which repacks the weight on every call: 15 GFLOP/s, a weight stream of ~4 GB/s
//! where the machine reads ~11 GB/s on one core (`road bench gemm --cold-mib 256`, an AVX2-only
//! Zen 3). Against the copy packed once the same shape streams the weight at the memory's pace.
//!
//! Sixteen ymm registers hold half a 32-feature panel per block: two panel vectors, one
//! broadcast, and 2 × `MR` accumulators for up to `MR` = 6 rows (15 registers). Each half-panel
//! step is one aligned 64-byte line (the panel's `[k][32]` rows are lines 0–1, 2–3, …), so the
//! block reads every other line and the second half finds its lines in L1/L2.

/// Rows of `x` per register block.
pub(super) const MR: usize = 6;
/// Features per half-panel (two ymm).
const HALF: usize = 16;
/// Panel width of the packed layout (`packed_gemm::NR`).
const NR: usize = 32;

/// Panel steps ahead that the first half's pass prefetches both lines of a step (the second
/// half then finds its lines in cache): 4 KiB ahead, into the next k block or panel where the
/// slice ends (they follow in memory; a prefetch past the weight's end is harmless). On
/// 8 × 576 × 1536 with cold weights, 40–43 → 50–54 GFLOP/s; 8 and 16 steps ahead were between.
const PF_STEPS: usize = 32;

/// Rows up to which the AVX2 block serves a GEMM; above it candle's GEMM (gemm 0.19's AVX2
/// kernels, which pack their own operands) is as fast: `road bench gemm` on an AVX2-only Zen 3,
/// packed ÷ candle, two runs: 1.3–2.2× at 32 rows, 1.1–1.2× at 64, 1.05–1.1× at 128,
/// 1.0–1.07× at 256, 0.95–1.06× at 512 (576 × 1536 and 1536 × 576).
pub(super) const MAX_ROWS: usize = 256;

/// `rows` (1..=MR) rows of x (row stride `ldx`) against `k` steps of one 32-feature panel `bp`
/// (both halves, `cols` real features, the rest padding), into y (row stride `ldy`); added to
/// y's values when `accumulate`.
///
/// # Safety
/// AVX2 and FMA must be present; `bp` is a 64-byte aligned panel slice of `k` steps; x has
/// `rows` rows of `k` values at stride `ldx`; y has `rows` rows of `cols` writable values at
/// stride `ldy`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn panel(rows: usize, x: *const f32, ldx: usize, k: usize, bp: *const f32, y: *mut f32, ldy: usize, cols: usize, accumulate: bool) {
    for h in 0..2 {
        let c = cols.saturating_sub(h * HALF).min(HALF);
        if c == 0 {
            break;
        }
        let (b, yh) = (bp.add(h * HALF), y.add(h * HALF));
        let pf = if h == 0 { PF_STEPS } else { 0 };
        match rows {
            6 => tile::<6>(x, ldx, k, b, yh, ldy, c, accumulate, pf),
            5 => tile::<5>(x, ldx, k, b, yh, ldy, c, accumulate, pf),
            4 => tile::<4>(x, ldx, k, b, yh, ldy, c, accumulate, pf),
            3 => tile::<3>(x, ldx, k, b, yh, ldy, c, accumulate, pf),
            2 => tile::<2>(x, ldx, k, b, yh, ldy, c, accumulate, pf),
            _ => tile::<1>(x, ldx, k, b, yh, ldy, c, accumulate, pf),
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn panel(_: usize, _: *const f32, _: usize, _: usize, _: *const f32, _: *mut f32, _: usize, _: usize, _: bool) {
    unreachable!("the packed GEMM is x86-64 only")
}

/// `R` rows against one half-panel (`c` ≤ 16 real features; fewer only on the last panel),
/// prefetching `pf` steps ahead (0: none).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const R: usize>(x: *const f32, ldx: usize, k: usize, bp: *const f32, y: *mut f32, ldy: usize, c: usize, accumulate: bool, pf: usize) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for kk in 0..k {
        if pf > 0 {
            let a = bp.wrapping_add((kk + pf) * NR) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(a);
            _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(64));
        }
        let b0 = _mm256_load_ps(bp.add(kk * NR));
        let b1 = _mm256_load_ps(bp.add(kk * NR + 8));
        for (r, a) in acc.iter_mut().enumerate() {
            let xv = _mm256_broadcast_ss(&*x.add(r * ldx + kk));
            a[0] = _mm256_fmadd_ps(xv, b0, a[0]);
            a[1] = _mm256_fmadd_ps(xv, b1, a[1]);
        }
    }
    for (r, a) in acc.iter().enumerate() {
        let yr = y.add(r * ldy);
        if c == HALF {
            let (mut v0, mut v1) = (a[0], a[1]);
            if accumulate {
                v0 = _mm256_add_ps(v0, _mm256_loadu_ps(yr));
                v1 = _mm256_add_ps(v1, _mm256_loadu_ps(yr.add(8)));
            }
            _mm256_storeu_ps(yr, v0);
            _mm256_storeu_ps(yr.add(8), v1);
        } else {
            // The last, padded panel: only its real features are y's.
            let mut t = [0f32; HALF];
            _mm256_storeu_ps(t.as_mut_ptr(), a[0]);
            _mm256_storeu_ps(t.as_mut_ptr().add(8), a[1]);
            for (j, v) in t.iter().enumerate().take(c) {
                let o = yr.add(j);
                *o = if accumulate { *o + v } else { *v };
            }
        }
    }
}
