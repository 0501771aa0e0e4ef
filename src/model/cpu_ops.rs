//! Inference-only AVX-512 element-wise ops of the forward on the CPU: the residual add, the MLP's
//! `silu(gate) · up` and RMSNorm, for contiguous f32 or bf16 tensors, and f32 ↔ bf16 conversion
//! (a bf16 model's attention runs in f32).
//!
//! Why: candle's bf16 add converts through 8-lane helpers and took 29% of a bf16 16×32 prefill
//! once the GEMMs ran on AMX; its silu calls a scalar `expf` per element, and `silu(g) · u` is
//! two passes and a temporary. bf16 values are widened to f32, computed, and rounded back to
//! nearest even, one rounding per result (candle and PyTorch round the same way per op).
use candle_core::{DType, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;
use std::sync::OnceLock;

/// Elements per parallel chunk (and below which one thread does it all).
const CHUNK: usize = 1 << 14;

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    #[cfg(target_arch = "x86_64")]
    let has = || is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512vl");
    #[cfg(not(target_arch = "x86_64"))]
    let has = || false;
    *ON.get_or_init(|| has() && std::env::var("ROAD_CPU_OPS").map_or(true, |v| v != "0"))
}

/// `a + b`, or None where the fast path does not apply (the caller uses candle's op).
pub fn add(a: &Tensor, b: &Tensor) -> candle_core::Result<Option<Tensor>> {
    binary(a, b, Op::Add)
}

/// `silu(g) · u`, or None where the fast path does not apply.
pub fn silu_mul(g: &Tensor, u: &Tensor) -> candle_core::Result<Option<Tensor>> {
    binary(g, u, Op::SiluMul)
}

/// `t` converted between f32 and bf16 (nearest even), or None where the fast path does not apply.
pub fn convert(t: &Tensor, to: DType) -> candle_core::Result<Option<Tensor>> {
    let from = t.dtype();
    if !enabled() || !crate::runtime::cpu_fast_path(t.device()) || !t.is_contiguous() || from == to {
        return Ok(None);
    }
    let n = t.elem_count();
    let (st, l) = t.storage_and_layout();
    let Storage::Cpu(c) = &*st else { return Ok(None) };
    let range = l.start_offset()..l.start_offset() + n;
    let out = match (from, to) {
        (DType::BF16, DType::F32) => {
            let x = &c.as_slice::<bf16>()?[range];
            let mut o = vec![0f32; n];
            o.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, x)| {
                // SAFETY: AVX-512F was detected (`enabled`).
                unsafe { widen_all(x, o) }
            });
            Tensor::from_vec(o, t.dims(), t.device())?
        }
        (DType::F32, DType::BF16) => {
            let x = &c.as_slice::<f32>()?[range];
            let mut o = vec![bf16::ZERO; n];
            o.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, x)| {
                // SAFETY: AVX-512F/BF16/VL were detected (`enabled`).
                unsafe { narrow_all(x, o) }
            });
            Tensor::from_vec(o, t.dims(), t.device())?
        }
        _ => return Ok(None),
    };
    Ok(Some(out))
}

/// RMSNorm over the last dim, `x / √(mean(x²) + eps) · w`, computed in f32 (bf16 rounded once at
/// the end), or None where the fast path does not apply (the caller uses candle's fused op).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> candle_core::Result<Option<Tensor>> {
    let d = w.elem_count();
    if !enabled()
        || !crate::runtime::cpu_fast_path(x.device())
        || x.dtype() != w.dtype()
        || !matches!(x.dtype(), DType::F32 | DType::BF16)
        || x.dims().last() != Some(&d)
        || w.rank() != 1
        || !x.is_contiguous()
        || !w.is_contiguous()
        || d == 0
    {
        return Ok(None);
    }
    let n = x.elem_count();
    let (sx, lx) = x.storage_and_layout();
    let (sw, lw) = w.storage_and_layout();
    let (Storage::Cpu(cx), Storage::Cpu(cw)) = (&*sx, &*sw) else { return Ok(None) };
    let (rx, rw) = (lx.start_offset()..lx.start_offset() + n, lw.start_offset()..lw.start_offset() + d);
    // Rows per task: about CHUNK elements.
    let rows = (CHUNK / d).max(1);
    let out = match x.dtype() {
        DType::F32 => {
            let (xs, ws) = (&cx.as_slice::<f32>()?[rx], &cw.as_slice::<f32>()?[rw]);
            let mut o = vec![0f32; n];
            o.par_chunks_mut(rows * d).zip(xs.par_chunks(rows * d)).for_each(|(o, xs)| {
                for (o, xr) in o.chunks_mut(d).zip(xs.chunks(d)) {
                    let s = (xr.iter().map(|v| v * v).sum::<f32>() / d as f32 + eps).sqrt().recip();
                    for ((o, v), g) in o.iter_mut().zip(xr).zip(ws) {
                        *o = v * s * g;
                    }
                }
            });
            Tensor::from_vec(o, x.dims(), x.device())?
        }
        _ => {
            let (xs, ws) = (&cx.as_slice::<bf16>()?[rx], &cw.as_slice::<bf16>()?[rw]);
            let wf: Vec<f32> = ws.iter().map(|v| v.to_f32()).collect();
            let mut o = vec![bf16::ZERO; n];
            o.par_chunks_mut(rows * d).zip(xs.par_chunks(rows * d)).for_each(|(o, xs)| {
                let mut row = vec![0f32; d];
                for (o, xr) in o.chunks_mut(d).zip(xs.chunks(d)) {
                    // SAFETY: AVX-512F/BF16/VL were detected (`enabled`).
                    unsafe { widen_all(xr, &mut row) };
                    let s = (row.iter().map(|v| v * v).sum::<f32>() / d as f32 + eps).sqrt().recip();
                    for (v, g) in row.iter_mut().zip(&wf) {
                        *v = *v * s * g;
                    }
                    // SAFETY: as above.
                    unsafe { narrow_all(&row, o) };
                }
            });
            Tensor::from_vec(o, x.dims(), x.device())?
        }
    };
    Ok(Some(out))
}

/// `convert`, falling back to candle's `to_dtype`.
pub fn to_dtype(t: &Tensor, to: DType) -> candle_core::Result<Tensor> {
    match convert(t, to)? {
        Some(c) => Ok(c),
        None => t.to_dtype(to),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn widen_all(x: &[bf16], o: &mut [f32]) {
    let n = o.len();
    let mut i = 0;
    while i + 16 <= n {
        _mm512_storeu_ps(o.as_mut_ptr().add(i), widen(x.as_ptr().add(i)));
        i += 16;
    }
    for j in i..n {
        o[j] = x[j].to_f32();
    }
}

/// `x` rounded to bf16 (nearest even) into `o` (same length); also the AMX GEMM's output rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
pub(super) unsafe fn narrow_all(x: &[f32], o: &mut [bf16]) {
    let n = o.len();
    let mut i = 0;
    while i + 16 <= n {
        let v = _mm512_cvtneps_pbh(_mm512_loadu_ps(x.as_ptr().add(i)));
        _mm256_storeu_si256(o.as_mut_ptr().add(i) as *mut __m256i, std::mem::transmute(v));
        i += 16;
    }
    for j in i..n {
        o[j] = bf16::from_f32(x[j]);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn widen_all(_: &[bf16], _: &mut [f32]) {}
#[cfg(not(target_arch = "x86_64"))]
pub(super) unsafe fn narrow_all(_: &[f32], _: &mut [bf16]) {}

#[derive(Clone, Copy)]
enum Op {
    Add,
    SiluMul,
}

fn binary(a: &Tensor, b: &Tensor, op: Op) -> candle_core::Result<Option<Tensor>> {
    if !enabled()
        || !crate::runtime::cpu_fast_path(a.device())
        || a.dims() != b.dims()
        || a.dtype() != b.dtype()
        || !matches!(a.dtype(), DType::F32 | DType::BF16)
        || !a.is_contiguous()
        || !b.is_contiguous()
    {
        return Ok(None);
    }
    let n = a.elem_count();
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (Storage::Cpu(ca), Storage::Cpu(cb)) = (&*sa, &*sb) else { return Ok(None) };
    let (ra, rb) = (la.start_offset()..la.start_offset() + n, lb.start_offset()..lb.start_offset() + n);
    let out = match a.dtype() {
        DType::F32 => {
            let (x, y) = (&ca.as_slice::<f32>()?[ra], &cb.as_slice::<f32>()?[rb]);
            let mut o = vec![0f32; n];
            o.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(y.par_chunks(CHUNK))).for_each(|(o, (x, y))| {
                // SAFETY: AVX-512F was detected (`enabled`).
                unsafe { f32_kernel(x, y, o, op) }
            });
            Tensor::from_vec(o, a.dims(), a.device())?
        }
        _ => {
            let (x, y) = (&ca.as_slice::<bf16>()?[ra], &cb.as_slice::<bf16>()?[rb]);
            let mut o = vec![bf16::ZERO; n];
            o.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(y.par_chunks(CHUNK))).for_each(|(o, (x, y))| {
                // SAFETY: AVX-512F/BF16/VL were detected (`enabled`).
                unsafe { bf16_kernel(x, y, o, op) }
            });
            Tensor::from_vec(o, a.dims(), a.device())?
        }
    };
    Ok(Some(out))
}

/// `σ(x) = 1 / (1 + e^-x)` into `out` (same length): 16 lanes at a time through this file's
/// `exp` where AVX-512 is there, else scalar `expf`. For the training ops' SiLU and its backward.
pub(crate) fn sigmoid_into(x: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if enabled() {
        // SAFETY: AVX-512F was detected (`enabled`).
        unsafe { sigmoid_kernel(x, out) };
        return;
    }
    for (o, v) in out.iter_mut().zip(x) {
        *o = 1.0 / (1.0 + (-v).exp());
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sigmoid_kernel(x: &[f32], o: &mut [f32]) {
    let n = o.len().min(x.len());
    let one = _mm512_set1_ps(1.0);
    let mut i = 0;
    while i + 16 <= n {
        let v = _mm512_loadu_ps(x.as_ptr().add(i));
        let e = exp(_mm512_sub_ps(_mm512_set1_ps(0.0), v));
        _mm512_storeu_ps(o.as_mut_ptr().add(i), _mm512_div_ps(one, _mm512_add_ps(one, e)));
        i += 16;
    }
    for j in i..n {
        o[j] = 1.0 / (1.0 + (-x[j]).exp());
    }
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{
    __m256i, __m512, _mm256_loadu_si256, _mm256_storeu_si256, _mm512_add_ps, _mm512_cvtepu16_epi32, _mm512_cvtneps_pbh,
    _mm512_div_ps, _mm512_loadu_ps, _mm512_mul_ps, _mm512_set1_ps, _mm512_slli_epi32, _mm512_storeu_ps, _mm512_sub_ps,
};

/// One op on 16 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn lanes(x: __m512, y: __m512, op: Op) -> __m512 {
    match op {
        Op::Add => _mm512_add_ps(x, y),
        // silu(x) = x / (1 + e^-x); e^-x saturates to +inf for x < -88, giving -0 like expf.
        Op::SiluMul => _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0), exp(_mm512_sub_ps(_mm512_set1_ps(0.0), x)))), y),
    }
}

/// e^x on 16 lanes: 2^n · p(r) with n = round(x / ln 2), r = x − n ln 2 (two-part ln 2), p a
/// degree-6 Taylor polynomial (relative error < 2e-7 on |r| ≤ ln 2 / 2); over/underflow clamped
/// to inf/0 like `expf`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn exp(x: __m512) -> __m512 {
    use std::arch::x86_64::*;
    let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0)), _mm512_set1_ps(89.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
    let mut p = _mm512_set1_ps(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    // 2^n · p, with scalef handling n beyond the exponent range (→ inf or 0).
    _mm512_scalef_ps(p, n)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn f32_kernel(x: &[f32], y: &[f32], o: &mut [f32], op: Op) {
    let n = o.len();
    let mut i = 0;
    while i + 16 <= n {
        let v = lanes(_mm512_loadu_ps(x.as_ptr().add(i)), _mm512_loadu_ps(y.as_ptr().add(i)), op);
        _mm512_storeu_ps(o.as_mut_ptr().add(i), v);
        i += 16;
    }
    if i < n {
        let (mut a, mut b, mut c) = ([0f32; 16], [0f32; 16], [0f32; 16]);
        a[..n - i].copy_from_slice(&x[i..]);
        b[..n - i].copy_from_slice(&y[i..]);
        _mm512_storeu_ps(c.as_mut_ptr(), lanes(_mm512_loadu_ps(a.as_ptr()), _mm512_loadu_ps(b.as_ptr()), op));
        o[i..].copy_from_slice(&c[..n - i]);
    }
}

/// 16 bf16 widened to f32 (exact: a bf16 is the high half of an f32).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn widen(p: *const bf16) -> __m512 {
    std::mem::transmute(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i))))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
unsafe fn bf16_kernel(x: &[bf16], y: &[bf16], o: &mut [bf16], op: Op) {
    let n = o.len();
    let mut i = 0;
    while i + 16 <= n {
        let v = lanes(widen(x.as_ptr().add(i)), widen(y.as_ptr().add(i)), op);
        _mm256_storeu_si256(o.as_mut_ptr().add(i) as *mut __m256i, std::mem::transmute(_mm512_cvtneps_pbh(v)));
        i += 16;
    }
    for j in i..n {
        let (a, b) = (x[j].to_f32(), y[j].to_f32());
        o[j] = bf16::from_f32(match op {
            Op::Add => a + b,
            Op::SiluMul => a / (1.0 + (-a).exp()) * b,
        });
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn f32_kernel(_: &[f32], _: &[f32], _: &mut [f32], _: Op) {}
#[cfg(not(target_arch = "x86_64"))]
unsafe fn bf16_kernel(_: &[bf16], _: &[bf16], _: &mut [bf16], _: Op) {}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Both ops, both dtypes, against candle's ops on values spanning silu's saturation (±100)
    /// and a ragged tail; f32 within 1e-6 relative, bf16 within one bf16 rounding; conversions
    /// bit-equal to candle's.
    #[test]
    fn cpu_ops_equal_candles() {
        if !enabled() {
            return;
        }
        let dev = Device::Cpu;
        let a = (Tensor::randn(0f32, 1.0, (3, 1001), &dev).unwrap() * 30.0).unwrap();
        let b = Tensor::randn(0f32, 1.0, (3, 1001), &dev).unwrap();
        for dt in [DType::F32, DType::BF16] {
            let (a, b) = (a.to_dtype(dt).unwrap(), b.to_dtype(dt).unwrap());
            let cases = [
                (add(&a, &b).unwrap().unwrap(), (&a + &b).unwrap()),
                (silu_mul(&a, &b).unwrap().unwrap(), (candle_nn::ops::silu(&a.to_dtype(DType::F32).unwrap()).unwrap() * b.to_dtype(DType::F32).unwrap()).unwrap()),
            ];
            let w = Tensor::randn(1f32, 0.1, 1001, &dev).unwrap().to_dtype(dt).unwrap();
            let rms = rms_norm(&a, &w, 1e-5).unwrap().unwrap().to_dtype(DType::F32).unwrap();
            let want = candle_nn::ops::rms_norm_slow(&a.to_dtype(DType::F32).unwrap(), &w.to_dtype(DType::F32).unwrap(), 1e-5).unwrap();
            let tol = if dt == DType::F32 { 1e-5 } else { 8e-3 };
            let excess = ((&rms - &want).unwrap().abs().unwrap() - (want.abs().unwrap() * tol).unwrap()).unwrap();
            assert!(excess.max_all().unwrap().to_scalar::<f32>().unwrap() <= 1e-6, "{dt:?} rms_norm");
            let other = if dt == DType::F32 { DType::BF16 } else { DType::F32 };
            let conv = (convert(&a, other).unwrap().unwrap(), a.to_dtype(other).unwrap());
            let diff = (conv.0.to_dtype(DType::F32).unwrap() - conv.1.to_dtype(DType::F32).unwrap()).unwrap();
            assert_eq!(diff.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0, "{dt:?} → {other:?} equals candle's rounding");
            for (i, (fast, want)) in cases.iter().enumerate() {
                let (f, w) = (fast.to_dtype(DType::F32).unwrap(), want.to_dtype(DType::F32).unwrap());
                let err = ((&f - &w).unwrap().abs().unwrap() - (w.abs().unwrap() * if dt == DType::F32 { 1e-6 } else { 8e-3 }).unwrap()).unwrap();
                let worst = err.max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(worst <= 1e-6, "{dt:?} op {i}: worst excess error {worst}");
            }
        }
    }
}
