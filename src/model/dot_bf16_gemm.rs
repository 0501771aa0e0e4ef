//! Inference-only bf16 GEMM on AVX512_BF16 (`vdpbf16ps`), for CPUs with the instruction and no
//! AMX (AMD Zen 4/5): `y = x · wᵀ` for a bf16 `[n, k]` weight packed once, bf16 in and out, f32
//! accumulation, rounded once to nearest even (as PyTorch's bf16 linear).
//!
//! Why a kernel of its own: without AMX a bf16 model fell through to candle's GEMM, which
//! converts bf16 in 8-lane helpers (95–98 tokens/s at 1×32 on SmolLM2, a quarter of f32). One
//! `vdpbf16ps zmm` multiplies 16 pairs of bf16 and adds them into 16 f32 lanes — twice the
//! flops of an f32 FMA where the instruction issues at the FMA rate (Zen 4: `road bench peak`) —
//! and bf16 weights are half the bytes to stream, which is what decode and the 32-row shapes
//! wait on. Layout as `packed_gemm`'s f32 panels, with k in pairs: panel p, pair step s holds 64
//! bf16 (two zmm), line c = features 32p + 16c .. +16, each as its (k = 2s, 2s + 1) pair. The
//! register block is the f32 kernel's 12 rows × 32 features (24 accumulators); the inner step
//! loads the two panel lines and broadcasts one 32-bit pair of x per row. `ROAD_DOT_BF16=0`
//! turns the path off (for comparisons).
use half::bf16;
use rayon::prelude::*;
use super::packed_gemm::CacheLine;
use std::sync::OnceLock;

/// Output features per panel (two zmm of f32 accumulators).
const NR: usize = 32;
/// Rows of `x` per register block (24 accumulators + 2 panel vectors + a broadcast ≤ 32 zmm).
const MR: usize = 12;
/// Rows of `x` per cache block: a task runs them across its panels before the next rows.
const MC: usize = 96;

type Line = CacheLine<u16, 32>;

/// A `[n, k]` bf16 weight in panels of 32 features and pair steps (see the module doc),
/// zero-padded to whole panels and an even k.
pub struct PackedDot {
    n: usize,
    k: usize,
    steps: usize,
    lines: Vec<Line>,
}

impl PackedDot {
    /// Pack a row-major `[n, k]` bf16 weight, parallel over panels. (Crate-internal: the GEMM
    /// needs AVX512_BF16, which `PackSlot` checks before it packs.)
    pub(super) fn pack(ws: &[bf16], n: usize, k: usize) -> Self {
        assert_eq!(ws.len(), n * k, "weight length");
        let steps = k.div_ceil(2);
        let per_panel = steps * 2;
        let mut lines = vec![CacheLine([0; 32]); n.div_ceil(NR) * per_panel];
        lines.par_chunks_mut(per_panel).enumerate().for_each(|(p, panel)| {
            for j in 0..NR.min(n - p * NR) {
                let row = &ws[(p * NR + j) * k..(p * NR + j + 1) * k];
                for (kk, w) in row.iter().enumerate() {
                    panel[(kk / 2) * 2 + j / 16].0[2 * (j % 16) + kk % 2] = w.to_bits();
                }
            }
        });
        Self { n, k, steps, lines }
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// `y [m, n] = x [m, k] · wᵀ` in bf16, f32 accumulation, rounded to nearest even.
    pub(super) fn matmul(&self, xs: &[bf16], m: usize) -> Vec<bf16> {
        let (n, k) = (self.n, self.k);
        assert_eq!(xs.len(), m * k, "input length");
        // The pair broadcast reads x in place when k is even (every model's widths are); an odd k
        // is copied once into rows padded with a zero.
        let padded: Vec<bf16>;
        let (x, ldx) = if k % 2 == 0 {
            (xs, k)
        } else {
            let kp = k + 1;
            let mut p = vec![bf16::ZERO; m * kp];
            for r in 0..m {
                p[r * kp..r * kp + k].copy_from_slice(&xs[r * k..(r + 1) * k]);
            }
            padded = p;
            (&padded[..], kp)
        };
        // Not zero-filled (the all-position logits are 50 MB at 16×32 on SmolLM2): every tile
        // stores all its rows × columns, and the length is set once they have.
        let mut y: Vec<bf16> = super::packed_gemm::output_buffer(m * n);
        let out = super::gemm_tasks::SharedOut(y.as_mut_ptr());
        let panels = n.div_ceil(NR);
        let group = super::packed_gemm::panel_group(panels);
        let per_panel = self.steps * 2;
        let flat = &self.lines;
        super::gemm_tasks::par_tasks(panels.div_ceil(group), m * n * k, |g| {
            let out = &out;
            let (p0, p1) = (g * group, ((g + 1) * group).min(panels));
            let mut r0 = 0;
            while r0 < m {
                let r1 = (r0 + MC).min(m);
                for p in p0..p1 {
                    let cols = NR.min(n - p * NR);
                    let bp = flat[p * per_panel..].as_ptr() as *const u16;
                    // The next panel, prefetched whole by this panel's first row block (two lines
                    // per step), so it arrives from L3/DRAM while the block computes.
                    let (next, next_steps) = if p + 1 < p1 { (flat[(p + 1) * per_panel..].as_ptr() as *const u16, self.steps) } else { (bp, 0) };
                    let mut r = r0;
                    while r < r1 {
                        let rows = MR.min(r1 - r);
                        let pf_steps = if r == r0 { next_steps } else { 0 };
                        // SAFETY: AVX512_BF16/BW/VL were detected (`available`); the tile writes
                        // rows r..r+rows, columns p·32..+cols of y, which no other task writes; x
                        // rows hold `steps` pairs and the panel `steps` steps.
                        unsafe {
                            let xr = x.as_ptr().add(r * ldx) as *const u16;
                            tile_dispatch(rows, xr, ldx, self.steps, bp, out.0.add(r * n + p * NR) as *mut u16, n, cols, next, pf_steps);
                        }
                        r += rows;
                    }
                }
                r0 = r1;
            }
        });
        // SAFETY: the tiles above wrote all m·n elements (capacity m·n).
        unsafe { y.set_len(m * n) };
        y
    }
}

/// AVX512_BF16 (with BW/VL for the masked bf16 stores) present, and not turned off
/// (`ROAD_DOT_BF16=0`).
pub fn available() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        let has = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bf16")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl");
        #[cfg(not(target_arch = "x86_64"))]
        let has = false;
        has && std::env::var("ROAD_DOT_BF16").map_or(true, |v| v != "0")
    })
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_dispatch(rows: usize, x: *const u16, ldx: usize, steps: usize, bp: *const u16, y: *mut u16, ldy: usize, cols: usize, pf: *const u16, pf_steps: usize) {
    super::packed_gemm::tile_for_rows!(rows, tile(x, ldx, steps, bp, y, ldy, cols, pf, pf_steps))
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_dispatch(_: usize, _: *const u16, _: usize, _: usize, _: *const u16, _: *mut u16, _: usize, _: usize, _: *const u16, _: usize) {
    unreachable!("the AVX512_BF16 GEMM is x86-64 only (`available` is false elsewhere)")
}

/// `R` rows of x (bf16 bits, row stride `ldx`, `steps` pairs each) against one panel, into
/// `R × cols` bf16 outputs of y (row stride `ldy`; `cols < 32` only on the last, padded panel);
/// meanwhile `pf_steps` steps of the next panel at `pf` are prefetched.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const R: usize>(x: *const u16, ldx: usize, steps: usize, bp: *const u16, y: *mut u16, ldy: usize, cols: usize, pf: *const u16, pf_steps: usize) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for s in 0..steps {
        if s < pf_steps {
            _mm_prefetch::<_MM_HINT_T0>(pf.add(s * 64) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(pf.add(s * 64 + 32) as *const i8);
        }
        let b0: __m512bh = std::mem::transmute(_mm512_load_si512(bp.add(s * 64) as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_load_si512(bp.add(s * 64 + 32) as *const _));
        for (r, a) in acc.iter_mut().enumerate() {
            let pair = (x.add(r * ldx + 2 * s) as *const i32).read_unaligned();
            let xv: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
            a[0] = _mm512_dpbf16_ps(a[0], xv, b0);
            a[1] = _mm512_dpbf16_ps(a[1], xv, b1);
        }
    }
    let (m0, m1) = super::packed_gemm::col_masks(cols);
    for (r, a) in acc.iter().enumerate() {
        let yr = y.add(r * ldy) as *mut i16;
        let lo: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(a[0]));
        let hi: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(a[1]));
        _mm256_mask_storeu_epi16(yr, m0, lo);
        _mm256_mask_storeu_epi16(yr.add(16), m1, hi);
    }
}

/// Checks a bf16 GEMM `(w [n, k], n, k, x [m, k], m) -> y [m, n]` against an f64 product of the
/// same bf16 inputs (pseudo-random in [-1, 1) from `seed`) for every shape and row count; the
/// tolerance is bf16 output rounding (relative 2^-8) plus f32 accumulation error. Shared by this
/// GEMM's test and the AMX one's.
#[cfg(test)]
pub(super) fn check_against_f64(mut seed: u64, shapes: &[(usize, usize)], rows: &[usize], gemm: impl Fn(&[bf16], usize, usize, &[bf16], usize) -> Vec<bf16>) {
    let mut rnd = || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        bf16::from_f32(((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
    };
    for &(n, k) in shapes {
        let w: Vec<bf16> = (0..n * k).map(|_| rnd()).collect();
        for &m in rows {
            let x: Vec<bf16> = (0..m * k).map(|_| rnd()).collect();
            let y = gemm(&w, n, k, &x, m);
            assert_eq!(y.len(), m * n);
            for r in 0..m {
                for o in 0..n {
                    let want: f64 = (0..k).map(|i| x[r * k + i].to_f64() * w[o * k + i].to_f64()).sum();
                    let got = y[r * n + o].to_f64();
                    assert!((got - want).abs() <= 4e-3 * want.abs() + 1e-4 * k as f64, "{n}x{k}, m {m}, ({r},{o}): {got} vs {want}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every register-block remainder, rows beyond one cache block, ragged last panels (under 16
    /// and over 16 features) and odd inner sizes.
    #[test]
    fn dot_bf16_gemm_equals_the_bf16_product() {
        if !available() {
            return; // no AVX512_BF16 here: the path is never taken
        }
        let shapes = [(40, 64), (33, 71), (5, 17), (64, 576), (70, 2)];
        check_against_f64(11, &shapes, &[1, 2, 11, 12, 13, 97, 110], |w, n, k, x, m| PackedDot::pack(w, n, k).matmul(x, m));
    }
}
