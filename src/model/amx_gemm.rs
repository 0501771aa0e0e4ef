//! Inference-only bf16 GEMM on Intel AMX: `y = x · wᵀ` for a bf16 `[n, k]` weight packed once,
//! bf16 in and out, f32 accumulation (as PyTorch's bf16 linear).
//!
//! Why AMX and not AVX512_BF16: on this CPU `vdpbf16ps` issues at a quarter of the f32 FMA rate
//! (`road bench peak`: 243 vs 483 GFLOP/s), so a bf16 path on it would lose to f32 wherever it
//! computes; an AMX tile multiply does 16·16·32 products per instruction. Tiles: C = 16×16 f32,
//! A = 16 rows × 32 bf16 of x (read in place, row stride = 2k bytes), B = 16 pairs × 16 features
//! × 2 bf16 (the packed weight). A 32 × 32 output block keeps 4 C tiles, 2 A and 2 B tiles live:
//! 4 tile loads per 4 multiplies. Rust has no stable AMX intrinsics, so the instructions are
//! inline assembly; the kernel checks CPUID and asks Linux for the tile state
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`) once, and every other machine keeps candle's path.
use half::bf16;
use rayon::prelude::*;
use super::packed_gemm::CacheLine;
use std::sync::OnceLock;

/// Output features per panel (two B tiles).
const NR: usize = 32;
/// Inner-dimension step: one A tile row holds 32 bf16.
const KB: usize = 32;
/// Rows per block (two A tiles).
const MB: usize = 32;

type Line = CacheLine<u16, 32>;

/// A `[n, k]` bf16 weight as B tiles: panel p, step s holds two 1 KiB tiles (features
/// p·32..+16, then +16..+32), tile row i = pair (k = 32s + 2i, 32s + 2i + 1) of its 16 features.
/// Zero-padded to whole panels and steps.
pub struct PackedBf16 {
    n: usize,
    k: usize,
    steps: usize,
    lines: Vec<Line>,
}

impl PackedBf16 {
    /// Pack a row-major `[n, k]` bf16 weight, parallel over panels. (Crate-internal: the GEMM
    /// needs AMX, which `PackSlot` checks before it packs.)
    pub(super) fn pack(ws: &[bf16], n: usize, k: usize) -> Self {
        assert_eq!(ws.len(), n * k, "weight length");
        let steps = k.div_ceil(KB);
        let panels = n.div_ceil(NR);
        // Per panel and step: 2 tiles × 16 rows × 32 bf16 = 32 lines of 32 bf16.
        let per_panel = steps * 32;
        let mut lines = vec![CacheLine([0; 32]); panels * per_panel];
        lines.par_chunks_mut(per_panel).enumerate().for_each(|(p, panel)| {
            for s in 0..steps {
                for c in 0..2 {
                    for i in 0..16 {
                        let line = &mut panel[s * 32 + c * 16 + i].0;
                        for j in 0..16 {
                            let o = p * NR + c * 16 + j;
                            if o >= n {
                                continue;
                            }
                            for h in 0..2 {
                                let kk = s * KB + 2 * i + h;
                                if kk < k {
                                    line[2 * j + h] = ws[o * k + kk].to_bits();
                                }
                            }
                        }
                    }
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
        let kp = self.steps * KB;
        // Rows whose tiles can be read from x in place: whole 32-row blocks when k fills whole
        // steps; the rest is copied, zero-padded, into a block-aligned buffer.
        let direct = if k == kp { m / MB * MB } else { 0 };
        let rest = m - direct;
        let mut pad = vec![bf16::ZERO; rest.div_ceil(MB) * MB * kp];
        for r in 0..rest {
            pad[r * kp..r * kp + k].copy_from_slice(&xs[(direct + r) * k..(direct + r + 1) * k]);
        }
        // Not zero-filled (the all-position logits are 50 MB at 16×32 on SmolLM2): every block
        // stores all its rows × columns, and the length is set once they have.
        let mut y: Vec<bf16> = super::packed_gemm::output_buffer(m * n);
        let out = super::gemm_tasks::SharedOut(y.as_mut_ptr());
        let panels = n.div_ceil(NR);
        let group = super::packed_gemm::panel_group(panels);
        let per_panel = self.steps * 32;
        super::gemm_tasks::par_tasks(panels.div_ceil(group), m * n * k, |g| {
            let out = &out;
            let mut c = [0f32; MB * NR];
            // SAFETY: AMX was detected and permitted (`available`); this thread's tile state is
            // configured here and released below.
            unsafe { configure() };
            for p in g * group..((g + 1) * group).min(panels) {
                let b = self.lines[p * per_panel..].as_ptr() as *const u8;
                let cols = NR.min(n - p * NR);
                let mut r = 0;
                while r < m {
                    let rows = MB.min(m - r);
                    let (a, lda) = if r < direct {
                        (xs[r * k..].as_ptr() as *const u8, 2 * k)
                    } else {
                        (pad[(r - direct) * kp..].as_ptr() as *const u8, 2 * kp)
                    };
                    // SAFETY: A rows r..r+32 (or +16) lie within x or the padded copy, the panel
                    // holds `steps` steps, c holds 32 × 32 f32.
                    unsafe { block(a, lda, b, self.steps, rows > 16, c.as_mut_ptr()) };
                    for i in 0..rows {
                        // SAFETY: rows r.., columns p·32..+cols of y belong to this task alone;
                        // AVX512_BF16/VL were detected with AMX (`available`).
                        unsafe {
                            let dst = std::slice::from_raw_parts_mut(out.0.add((r + i) * n + p * NR), cols);
                            super::cpu_ops::narrow_all(&c[i * NR..i * NR + cols], dst);
                        }
                    }
                    r += rows;
                }
            }
            // SAFETY: as above.
            unsafe { release() };
        });
        // SAFETY: the blocks above wrote all m·n elements (capacity m·n).
        unsafe { y.set_len(m * n) };
        y
    }
}

/// AMX-BF16 (with AVX512_BF16 for the output rounding) present and granted by the OS, and not
/// turned off (`ROAD_AMX=0`).
pub fn available() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("ROAD_AMX").map_or(true, |v| v != "0") && detect())
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    use std::arch::x86_64::__cpuid_count;
    if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512vl")) {
        return false;
    }
    // SAFETY: CPUID is always available on x86-64 (a safe function in newer Rust).
    #[allow(unused_unsafe)]
    let leaf7 = unsafe { __cpuid_count(7, 0) };
    let (amx_bf16, amx_tile) = (leaf7.edx & (1 << 22) != 0, leaf7.edx & (1 << 24) != 0);
    if !(amx_bf16 && amx_tile) {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain syscall with integer arguments; it only changes this process's permissions.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// Palette 1, tiles 0–7 all 16 rows × 64 bytes.
#[cfg(target_arch = "x86_64")]
unsafe fn configure() {
    let mut cfg = [0u8; 64];
    cfg[0] = 1;
    for t in 0..8 {
        cfg[16 + 2 * t] = 64; // bytes per row (u16, little-endian)
        cfg[48 + t] = 16; // rows
    }
    std::arch::asm!("ldtilecfg [{}]", in(reg) cfg.as_ptr(), options(nostack, readonly));
}

#[cfg(target_arch = "x86_64")]
unsafe fn release() {
    std::arch::asm!("tilerelease", options(nostack, nomem));
}

/// One 32 × 32 block (16 × 32 when `!two`): C tiles 0–3 accumulate A (tiles 4, 5: rows of x
/// from `a`, row stride `lda` bytes) times B (tiles 6, 7: the panel at `b`) over `steps` steps,
/// then land in `c` (32 rows × 32 f32).
#[cfg(target_arch = "x86_64")]
unsafe fn block(a: *const u8, lda: usize, b: *const u8, steps: usize, two: bool, c: *mut f32) {
    use std::arch::asm;
    asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
    let b_stride = 64usize;
    for s in 0..steps {
        let (ap, bp) = (a.add(s * 64), b.add(s * 2048));
        if two {
            asm!(
                "tileloadd tmm4, [{a} + {lda}*1]",
                "tileloadd tmm5, [{a2} + {lda}*1]",
                "tileloadd tmm6, [{b} + {bs}*1]",
                "tileloadd tmm7, [{b2} + {bs}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a = in(reg) ap,
                a2 = in(reg) ap.add(16 * lda),
                lda = in(reg) lda,
                b = in(reg) bp,
                b2 = in(reg) bp.add(1024),
                bs = in(reg) b_stride,
                options(nostack, readonly),
            );
        } else {
            asm!(
                "tileloadd tmm4, [{a} + {lda}*1]",
                "tileloadd tmm6, [{b} + {bs}*1]",
                "tileloadd tmm7, [{b2} + {bs}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                a = in(reg) ap,
                lda = in(reg) lda,
                b = in(reg) bp,
                b2 = in(reg) bp.add(1024),
                bs = in(reg) b_stride,
                options(nostack, readonly),
            );
        }
    }
    let cs = 4 * NR; // bytes per row of c
    asm!(
        "tilestored [{c} + {cs}*1], tmm0",
        "tilestored [{c1} + {cs}*1], tmm1",
        c = in(reg) c,
        c1 = in(reg) c.add(16),
        cs = in(reg) cs,
        options(nostack),
    );
    if two {
        asm!(
            "tilestored [{c} + {cs}*1], tmm2",
            "tilestored [{c1} + {cs}*1], tmm3",
            c = in(reg) c.add(16 * NR),
            c1 = in(reg) c.add(16 * NR + 16),
            cs = in(reg) cs,
            options(nostack),
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn configure() {}
#[cfg(not(target_arch = "x86_64"))]
unsafe fn release() {}
#[cfg(not(target_arch = "x86_64"))]
unsafe fn block(_: *const u8, _: usize, _: *const u8, _: usize, _: bool, _: *mut f32) {
    unreachable!("AMX is x86-64 only (`available` is false elsewhere)")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against an f64 product of the same bf16 inputs: every row-block remainder (1, 16, 17, 32,
    /// 33 rows), ragged panels and inner sizes that are not whole steps.
    #[test]
    fn amx_gemm_equals_the_bf16_product() {
        if !available() {
            return; // no AMX here: the path is never taken
        }
        let shapes = [(40, 64), (33, 70), (5, 17), (64, 576)];
        super::super::dot_bf16_gemm::check_against_f64(7, &shapes, &[1, 16, 17, 32, 33, 70], |w, n, k, x, m| {
            PackedBf16::pack(w, n, k).matmul(x, m)
        });
    }
}
