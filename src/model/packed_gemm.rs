//! Inference-only AVX-512 GEMM against a weight packed once: `y = x · wᵀ` for a frozen `[n, k]`
//! weight, every row count (without AVX-512 but with AVX2/FMA: the same layout and loops with
//! `packed_avx2`'s register block, for few-row GEMMs only — `Packed::serves`).
//!
//! Why a packed copy: in its checkpoint layout a weight row runs along `k`, so a kernel that reads
//! it in place computes dot products and pays a horizontal reduction per output (the earlier
//! small GEMM reached 25–39% of peak), while a general GEMM repacks the weight on every call
//! (gemm's packing is ~8% of a 512-row prefill). Packed once into panels of `NR` = 32 output
//! features laid out `[k][32]`, every step of the inner loop is two aligned vector loads of the
//! panel, one broadcast per row of `x` (read in place) and two FMAs per row into a 12 × 32 block
//! of zmm accumulators: 24 FMAs per 14 loads, so the FMA pipes set the pace. The copy costs the
//! weight's size once more in memory; `ROAD_PACKED_GEMM=0` turns the path off.
use candle_core::{DType, Storage, Tensor};
use super::gemm_tasks::{par_tasks, SharedOut};
use rayon::prelude::*;
use std::sync::{Arc, OnceLock};

/// Output features per panel (two zmm).
const NR: usize = 32;
/// Rows of `x` per register block (24 accumulators + 2 panel vectors + a broadcast ≤ 32 zmm).
const MR: usize = 12;
/// Rows of `x` per cache block: a task runs this many rows across all of its panels before the
/// next rows, so a panel is reused from L1/L2 and the row block from L2.
const MC: usize = 96;
/// Inner-dimension block: a panel slice (KC × 32 floats, 24 KiB) stays in L1 while every register
/// block of the row block runs through it; partial sums accumulate in y.
const KC: usize = 192;
/// f32 values per cache line.
const LINE: usize = 16;
/// Lines of the next panel slice prefetched per inner step: its two lines, so a slice run by one
/// row block (m ≤ 12: decode) prefetches all of the next slice, not its first half.
const PF_PER_STEP: usize = 2;
// `tile` issues the two prefetches by hand: a loop over PF_PER_STEP lines measured 30% slower
// on 8×576×1536 (`road bench gemm`).
const _: () = assert!(PF_PER_STEP == 2);

/// One 64-byte cache line of a packed weight (64-byte aligned, so a panel's vector loads are
/// aligned): `[f32; 16]` here, `[u16; 32]` (bf16 bits) in the AMX and AVX512_BF16 GEMMs.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(super) struct CacheLine<T: Copy, const N: usize>(pub(super) [T; N]);

type Line = CacheLine<f32, 16>;

/// `tile::<R>(args…)` with R = `rows` (1..=12: callers pass `MR.min(…)`, MR = 12; 0 is never
/// passed): a register block's row count is a const generic so that its
/// accumulators live in registers; this is the one table from a run-time row count to the
/// instantiations, for this f32 tile and the AVX512_BF16 one (`dot_bf16_gemm`).
macro_rules! tile_for_rows {
    ($rows:expr, $tile:ident($($arg:expr),* $(,)?)) => {
        match $rows {
            12 => $tile::<12>($($arg),*),
            11 => $tile::<11>($($arg),*),
            10 => $tile::<10>($($arg),*),
            9 => $tile::<9>($($arg),*),
            8 => $tile::<8>($($arg),*),
            7 => $tile::<7>($($arg),*),
            6 => $tile::<6>($($arg),*),
            5 => $tile::<5>($($arg),*),
            4 => $tile::<4>($($arg),*),
            3 => $tile::<3>($($arg),*),
            2 => $tile::<2>($($arg),*),
            _ => $tile::<1>($($arg),*),
        }
    };
}
pub(super) use tile_for_rows;

/// A `[n, k]` f32 weight in panels of `NR` features: element `(o, kk)` at
/// `(o / NR) · k · NR + kk · NR + o % NR`, the last panel zero-padded.
pub struct Packed {
    n: usize,
    k: usize,
    lines: Vec<Line>,
}

impl Packed {
    /// Pack a row-major `[n, k]` weight (parallel over panels). (Crate-internal, as
    /// `pack_transposed` and `matmul`: the GEMM needs AVX-512, which `PackSlot` checks before it
    /// packs.)
    fn pack(ws: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(ws.len(), n * k, "weight length");
        Self::pack_with(n, k, |o, i| ws[o * k + i])
    }

    /// Pack the transpose of a row-major `[n, k]` weight: the `[k, n]` operand of `g · W` (the
    /// input gradient of `x · Wᵀ`).
    fn pack_transposed(ws: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(ws.len(), n * k, "weight length");
        Self::pack_with(k, n, |o, i| ws[i * k + o])
    }

    /// Pack the `[n, k]` operand whose element `(o, i)` is `at(o, i)`.
    fn pack_with(n: usize, k: usize, at: impl Fn(usize, usize) -> f32 + Sync) -> Self {
        let panels = n.div_ceil(NR);
        let mut lines = vec![CacheLine([0.0; 16]); panels * k * (NR / 16)];
        lines.par_chunks_mut(k * NR / 16).enumerate().for_each(|(p, panel)| {
            let flat: &mut [f32] = bytemuck_lines(panel);
            for kk in 0..k {
                for j in 0..NR.min(n - p * NR) {
                    flat[kk * NR + j] = at(p * NR + j, kk);
                }
            }
        });
        Self { n, k, lines }
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Whether `matmul` is the path for `rows` rows: always with AVX-512; with AVX2 only up to
    /// `packed_avx2::MAX_ROWS` (callers use candle's GEMM otherwise).
    pub fn serves(&self, rows: usize) -> bool {
        match isa() {
            Some(Isa::Avx512) => true,
            Some(Isa::Avx2) => rows <= super::packed_avx2::MAX_ROWS,
            None => false,
        }
    }

    /// `y [m, n] = x [m, k] · wᵀ`, parallel over groups of panels.
    pub(super) fn matmul(&self, xs: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        assert_eq!(xs.len(), m * k, "input length");
        let isa = isa().expect("a packed weight exists only where a packed GEMM runs");
        let mr = if isa == Isa::Avx512 { MR } else { super::packed_avx2::MR };
        // Not zero-filled (that matters for the all-position logits, 100 MB at 16×32 on
        // SmolLM2): the first inner-dimension block's tiles store all m × n values, and the
        // length is set once they have.
        let mut y: Vec<f32> = output_buffer(m * n);
        let panels = n.div_ceil(NR);
        // One row block: nothing to keep in L1 across blocks, so each panel streams whole.
        let kc_max = if m <= mr { k } else { KC };
        let group = panel_group(panels);
        let out = SharedOut(y.as_mut_ptr());
        let flat: &[f32] = bytemuck_lines_ref(&self.lines);
        par_tasks(panels.div_ceil(group), m * n * k, |g| {
            let out = &out;
            let (p0, p1) = (g * group, ((g + 1) * group).min(panels));
            let mut r0 = 0;
            while r0 < m {
                let r1 = (r0 + MC).min(m);
                // Panel by panel, its k blocks in turn: a block of y (MC rows × 32) stays in L1/L2
                // while its partial sums accumulate (k blocks outermost re-read and re-wrote all
                // of y per block: 0.85–0.91× candle's GEMM on a 49152-wide lm_head at 512 rows).
                for p in p0..p1 {
                    let cols = NR.min(n - p * NR);
                    let mut k0 = 0;
                    while k0 < k {
                        let kc = kc_max.min(k - k0);
                        let bp = flat[p * k * NR + k0 * NR..].as_ptr();
                        // The slice the task needs next (this panel's next k block, or the next
                        // panel's first), prefetched by this slice's row blocks a line per inner
                        // step: from L3/DRAM it arrives while they compute.
                        let next = if k0 + kc < k {
                            Some((p, k0 + kc, kc_max.min(k - k0 - kc)))
                        } else if p + 1 < p1 {
                            Some((p + 1, 0, kc_max.min(k)))
                        } else {
                            None
                        };
                        let (next_ptr, next_lines) = match next {
                            Some((np, nk0, nkc)) => (flat[np * k * NR + nk0 * NR..].as_ptr(), nkc * NR / LINE),
                            None => (bp, 0),
                        };
                        let mut r = r0;
                        let mut done_lines = 0;
                        while r < r1 {
                            let rows = mr.min(r1 - r);
                            // SAFETY: the ISA's features were detected (`isa`); the block
                            // writes rows r..r+rows, columns p·NR..p·NR+cols of y, which no other
                            // task writes; x and the panel are read within their lengths.
                            unsafe {
                                let (x, yp) = (xs.as_ptr().add(r * k + k0), out.0.add(r * n + p * NR));
                                if isa == Isa::Avx512 {
                                    let lines = next_lines.saturating_sub(done_lines).min(PF_PER_STEP * kc);
                                    let pf = next_ptr.add(done_lines.min(next_lines) * LINE);
                                    tile_dispatch(rows, x, k, kc, bp, yp, n, cols, k0 > 0, pf, lines);
                                } else {
                                    super::packed_avx2::panel(rows, x, k, kc, bp, yp, n, cols, k0 > 0);
                                }
                            }
                            r += rows;
                            done_lines += PF_PER_STEP * kc;
                        }
                        k0 += kc;
                    }
                }
                r0 = r1;
            }
        });
        // SAFETY: all m·n elements were written above (capacity m·n).
        unsafe { y.set_len(m * n) };
        y
    }
}

/// An empty output buffer with room for `len` values (here and in the bf16 GEMMs), on
/// transparent huge pages where it is large. Why: an output above glibc's 32 MiB mmap cap (the
/// all-position logits, 100 MB at 16×32 on SmolLM2) is a fresh mapping on every call, and with
/// THP in `madvise` mode its first touch took one 4 KiB page fault per page (~25k per call; the
/// kernel's share of `road bench gemm` on the lm_heads fell from 10.6 s to 7.1 s with the advice).
/// Advice only: where the kernel declines, nothing changes.
pub(super) fn output_buffer<T>(len: usize) -> Vec<T> {
    #[cfg_attr(not(target_os = "linux"), allow(unused_mut))]
    let mut y = Vec::with_capacity(len);
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let (ptr, bytes) = (y.as_mut_ptr() as usize, len * std::mem::size_of::<T>());
        let (start, end) = (ptr.next_multiple_of(HUGE), (ptr + bytes) & !(HUGE - 1));
        if bytes >= 4 * HUGE && end > start {
            // SAFETY: the range lies inside y's allocation; MADV_HUGEPAGE changes no contents
            // and only advises the kernel.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    y
}

fn bytemuck_lines(l: &mut [Line]) -> &mut [f32] {
    // SAFETY: Line is 16 f32 with no padding (repr(C)).
    unsafe { std::slice::from_raw_parts_mut(l.as_mut_ptr() as *mut f32, l.len() * 16) }
}

fn bytemuck_lines_ref(l: &[Line]) -> &[f32] {
    // SAFETY: as above.
    unsafe { std::slice::from_raw_parts(l.as_ptr() as *const f32, l.len() * 16) }
}


/// Panels per parallel task (here and in the bf16 GEMMs): enough tasks to balance the pool, few
/// enough that each keeps its row blocks busy.
pub(super) fn panel_group(panels: usize) -> usize {
    panels.div_ceil(rayon::current_num_threads().max(1) * 4).max(1)
}

/// Store masks for the two 16-lane halves of a 32-feature panel with `cols` real features (here
/// and in the AVX512_BF16 GEMM): all lanes except on the last, padded panel.
pub(super) fn col_masks(cols: usize) -> (u16, u16) {
    if cols >= NR {
        (0xffff, 0xffff)
    } else if cols >= 16 {
        (0xffff, ((1u32 << (cols - 16)) - 1) as u16)
    } else {
        (((1u32 << cols) - 1) as u16, 0)
    }
}

/// Which register block the f32 packed GEMM runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Isa {
    Avx512,
    Avx2,
}

/// The f32 packed GEMM's instruction set on this CPU: AVX-512F, else AVX2 with FMA, else none.
/// `ROAD_PACKED_GEMM=0` turns the path off and `ROAD_PACKED_GEMM=avx2` takes the AVX2 block on
/// an AVX-512 CPU (both for comparisons).
pub fn isa() -> Option<Isa> {
    static ISA: OnceLock<Option<Isa>> = OnceLock::new();
    *ISA.get_or_init(|| {
        let want = std::env::var("ROAD_PACKED_GEMM").unwrap_or_default();
        if want == "0" {
            return None;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            if is_x86_feature_detected!("avx512f") && want != "avx2" {
                return Some(Isa::Avx512);
            }
            if avx2 {
                return Some(Isa::Avx2);
            }
        }
        None
    })
}

/// An f32 packed GEMM runs on this CPU (`isa`).
pub fn enabled() -> bool {
    isa().is_some()
}

/// A frozen weight's packed copy: f32 for the AVX-512 GEMM here, bf16 for the AMX one or (no
/// AMX) the AVX512_BF16 one.
pub enum PackedWeight {
    F32(Packed),
    Bf16(super::amx_gemm::PackedBf16),
    DotBf16(super::dot_bf16_gemm::PackedDot),
}

/// A weight's packed copies, made on first use and kept beside the weight (a slot per weight; a
/// replaced weight gets a fresh slot): the weight itself for `x · Wᵀ`, and (f32 training with the
/// weight frozen) its transpose for the backward's `g · W`.
#[derive(Default)]
pub struct PackSlot {
    w: OnceLock<Option<Arc<PackedWeight>>>,
    wt: OnceLock<Option<Arc<PackedWeight>>>,
}

impl PackSlot {
    /// The packed copy of `w` (contiguous, on the CPU; f32 with AVX-512, bf16 with AMX or else
    /// AVX512_BF16), or None where no packed path applies.
    pub fn get(&self, w: &Tensor) -> Option<Arc<PackedWeight>> {
        use super::{amx_gemm, dot_bf16_gemm};
        let usable = match w.dtype() {
            DType::F32 => enabled(),
            DType::BF16 => amx_gemm::available() || dot_bf16_gemm::available(),
            _ => false,
        };
        if !usable {
            return None;
        }
        once(&self.w, w, |cpu, range, n, k| {
            Some(match w.dtype() {
                DType::F32 => PackedWeight::F32(Packed::pack(&cpu.as_slice::<f32>().ok()?[range], n, k)),
                _ if amx_gemm::available() => PackedWeight::Bf16(amx_gemm::PackedBf16::pack(&cpu.as_slice::<half::bf16>().ok()?[range], n, k)),
                _ => PackedWeight::DotBf16(dot_bf16_gemm::PackedDot::pack(&cpu.as_slice::<half::bf16>().ok()?[range], n, k)),
            })
        })
    }

    /// The packed transpose of an f32 `w` (the backward's `g · W` as `g · (Wᵀ)ᵀ`), or None where
    /// the path does not apply. AVX-512 only: a backward's rows (batch × sequence) are above
    /// what the AVX2 block serves, so there the copy would never be read.
    pub fn get_transposed(&self, w: &Tensor) -> Option<Arc<PackedWeight>> {
        if isa() != Some(Isa::Avx512) || w.dtype() != DType::F32 {
            return None;
        }
        once(&self.wt, w, |cpu, range, n, k| Some(PackedWeight::F32(Packed::pack_transposed(&cpu.as_slice::<f32>().ok()?[range], n, k))))
    }
}

/// `slot`'s value, made on first use by `pack(storage, w's element range, n, k)` from a
/// contiguous `[n, k]` CPU weight; None (cached) where `w` is not one.
fn once(
    slot: &OnceLock<Option<Arc<PackedWeight>>>,
    w: &Tensor,
    pack: impl FnOnce(&candle_core::CpuStorage, std::ops::Range<usize>, usize, usize) -> Option<PackedWeight>,
) -> Option<Arc<PackedWeight>> {
    if !w.is_contiguous() || !matches!(w.device(), candle_core::Device::Cpu) {
        return None;
    }
    slot.get_or_init(|| {
        let (n, k) = w.dims2().ok()?;
        let (st, l) = w.storage_and_layout();
        let Storage::Cpu(cpu) = &*st else { return None };
        pack(cpu, l.start_offset()..l.start_offset() + n * k, n, k).map(Arc::new)
    })
    .clone()
}

/// `x @ wᵀ` through a packed weight for `x` `[..., k]` of the packed copy's dtype on the CPU fast
/// path; None when it does not apply (the caller then uses another path).
pub fn try_linear(x: &Tensor, packed: &PackedWeight) -> anyhow::Result<Option<Tensor>> {
    let (dtype, (n, k)) = match packed {
        PackedWeight::F32(p) => (DType::F32, p.dims()),
        PackedWeight::Bf16(p) => (DType::BF16, p.dims()),
        PackedWeight::DotBf16(p) => (DType::BF16, p.dims()),
    };
    if !crate::runtime::cpu_fast_path(x.device()) || x.dtype() != dtype || x.dims().last() != Some(&k) {
        return Ok(None);
    }
    let rows = x.elem_count() / k.max(1);
    if let PackedWeight::F32(p) = packed {
        if !p.serves(rows) {
            return Ok(None);
        }
    }
    let xc = x.contiguous()?;
    let mut shape = x.dims().to_vec();
    *shape.last_mut().expect("x has a last dim") = n;
    let (st, l) = xc.storage_and_layout();
    let Storage::Cpu(cpu) = &*st else { return Ok(None) };
    let range = l.start_offset()..l.start_offset() + rows * k;
    let y = match packed {
        PackedWeight::F32(p) => Tensor::from_vec(p.matmul(&cpu.as_slice::<f32>()?[range], rows), shape, x.device())?,
        PackedWeight::Bf16(p) => Tensor::from_vec(p.matmul(&cpu.as_slice::<half::bf16>()?[range], rows), shape, x.device())?,
        PackedWeight::DotBf16(p) => Tensor::from_vec(p.matmul(&cpu.as_slice::<half::bf16>()?[range], rows), shape, x.device())?,
    };
    Ok(Some(y))
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_dispatch(rows: usize, x: *const f32, ldx: usize, k: usize, bp: *const f32, y: *mut f32, ldy: usize, cols: usize, acc: bool, pf: *const f32, pf_lines: usize) {
    tile_for_rows!(rows, tile(x, ldx, k, bp, y, ldy, cols, acc, pf, pf_lines))
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_dispatch(_: usize, _: *const f32, _: usize, _: usize, _: *const f32, _: *mut f32, _: usize, _: usize, _: bool, _: *const f32, _: usize) {
    unreachable!("the packed GEMM is x86-64 only (`enabled` is false elsewhere)")
}

/// `R` rows of x (row stride `ldx`) against `k` steps of one panel, into `R × cols` outputs of y
/// (row stride `ldy`; `cols < 32` only on the last, padded panel), added to y's values when
/// `accumulate` (the later inner-dimension blocks).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const R: usize>(x: *const f32, ldx: usize, k: usize, bp: *const f32, y: *mut f32, ldy: usize, cols: usize, accumulate: bool, pf: *const f32, pf_lines: usize) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for kk in 0..k {
        if PF_PER_STEP * kk < pf_lines {
            _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(PF_PER_STEP * kk * LINE) as *const i8);
            if PF_PER_STEP * kk + 1 < pf_lines {
                _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add((PF_PER_STEP * kk + 1) * LINE) as *const i8);
            }
        }
        let b0 = _mm512_load_ps(bp.add(kk * NR));
        let b1 = _mm512_load_ps(bp.add(kk * NR + 16));
        for (r, a) in acc.iter_mut().enumerate() {
            let xv = _mm512_set1_ps(*x.add(r * ldx + kk));
            a[0] = _mm512_fmadd_ps(xv, b0, a[0]);
            a[1] = _mm512_fmadd_ps(xv, b1, a[1]);
        }
    }
    let (m0, m1) = col_masks(cols);
    for (r, a) in acc.iter_mut().enumerate() {
        let yr = y.add(r * ldy);
        if accumulate {
            a[0] = _mm512_add_ps(a[0], _mm512_maskz_loadu_ps(m0, yr));
            a[1] = _mm512_add_ps(a[1], _mm512_maskz_loadu_ps(m1, yr.add(16)));
        }
        _mm512_mask_storeu_ps(yr, m0, a[0]);
        _mm512_mask_storeu_ps(yr.add(16), m1, a[1]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Equal to candle's matmul at every row-block remainder (AVX-512's 12 rows, AVX2's 6), a
    /// ragged last panel (n not a multiple of 32, under 16, and 16 < n % 32), row counts beyond
    /// one cache block, and odd inner sizes; the transposed copy likewise for `g · W` (AVX-512);
    /// `try_linear` takes the path exactly where `serves` says.
    #[test]
    fn packed_gemm_equals_matmul() {
        if !enabled() {
            return; // neither AVX-512 nor AVX2 here: the path is never taken
        }
        let dev = Device::Cpu;
        let max_diff = |a: Tensor, b: Tensor| crate::util::max_abs_diff(&a, &b);
        for (n, k) in [(130, 70), (64, 64), (5, 17), (200, 1), (57, 600)] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let slot = PackSlot::default();
            let p = slot.get(&w).unwrap();
            let PackedWeight::F32(packed) = &*p else { panic!("an f32 weight packs as f32") };
            for rows in [1, 2, 5, 6, 7, 11, 12, 13, 32, 33, 97, 200] {
                let x = Tensor::randn(0f32, 1.0, (1, rows, k), &dev).unwrap();
                let slow = x.reshape((rows, k)).unwrap().matmul(&w.t().unwrap()).unwrap().reshape((1, rows, n)).unwrap();
                let fast = Tensor::from_vec(packed.matmul(&x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), rows), (1, rows, n), &dev).unwrap();
                let d = max_diff(fast, slow.clone());
                assert!(d < 1e-4, "{n}x{k}, rows {rows}: max diff {d}");
                let via = try_linear(&x, &p).unwrap();
                assert_eq!(via.is_some(), packed.serves(rows), "{n}x{k}, rows {rows}: try_linear vs serves");
                if let Some(y) = via {
                    assert!(max_diff(y, slow) < 1e-4);
                }
                // The transposed copy (AVX-512 only): g [rows, n] · W.
                if let Some(pt) = slot.get_transposed(&w) {
                    let g = Tensor::randn(0f32, 1.0, (rows, n), &dev).unwrap();
                    let fast = try_linear(&g, &pt).unwrap().unwrap();
                    let d = max_diff(fast, g.matmul(&w).unwrap());
                    assert!(d < 1e-4, "transposed {n}x{k}, rows {rows}: max diff {d}");
                }
            }
        }
    }
}
