//! Inference-only fast path for linear layers on very few rows (greedy decode) on machines with
//! AVX2 but not AVX-512 (with AVX-512 the packed GEMM serves every row count, decode 1.5× this):
//! a bandwidth-bound AVX2/FMA matrix-vector product over the `[out, in]` weight, split across
//! threads. candle's general GEMM reaches ~16 GB/s on these shapes; this reaches ~24 GB/s.
use anyhow::Result;
use candle_core::{DType, Storage, Tensor};
use rayon::prelude::*;

/// Rows up to which the gemv path wins over GEMM.
const MAX_ROWS: usize = 4;

/// `x @ wᵀ` for `x` of shape `[..., in]` with at most `MAX_ROWS` rows, or None when the fast path
/// does not apply (non-CPU or generic ops forced, non-f32, too many rows, no AVX2/FMA); the
/// caller then uses the device-generic matmul.
pub fn try_linear(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    #[cfg(target_arch = "x86_64")]
    let has = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    let has = false;
    if !has || !crate::runtime::cpu_fast_path(x.device()) || x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        return Ok(None);
    }
    let (out_d, in_d) = w.dims2()?;
    let rows = x.elem_count() / in_d.max(1);
    if rows == 0 || rows > MAX_ROWS || !w.is_contiguous() {
        return Ok(None);
    }
    let xc = x.contiguous()?;
    let y = {
        let (xst, xl) = xc.storage_and_layout();
        let (wst, wl) = w.storage_and_layout();
        let (Storage::Cpu(xcpu), Storage::Cpu(wcpu)) = (&*xst, &*wst) else { return Ok(None) };
        let xs = &xcpu.as_slice::<f32>()?[xl.start_offset()..xl.start_offset() + rows * in_d];
        let ws = &wcpu.as_slice::<f32>()?[wl.start_offset()..wl.start_offset() + out_d * in_d];
        gemv(xs, ws, rows, in_d, out_d)
    };
    let mut shape = x.dims().to_vec();
    *shape.last_mut().expect("x has a last dim") = out_d;
    Ok(Some(Tensor::from_vec(y, shape, x.device())?))
}

/// `[rows, out]` values of `x · wᵀ` (both read in place), parallel over blocks of output
/// features; each block serves every row, so each weight row is read from memory once. Results
/// go straight into one `[out, rows]` buffer (no per-block allocations: the lm_head alone has 768
/// blocks per decode step).
fn gemv(xs: &[f32], ws: &[f32], rows: usize, in_d: usize, out_d: usize) -> Vec<f32> {
    const CHUNK: usize = 64;
    let mut yt = vec![0f32; out_d * rows];
    yt.par_chunks_mut(CHUNK * rows).enumerate().for_each(|(c, part)| {
        let lo = c * CHUNK;
        for (k, out) in part.chunks_mut(rows).enumerate() {
            let wr = &ws[(lo + k) * in_d..(lo + k + 1) * in_d];
            for (r, o) in out.iter_mut().enumerate() {
                // SAFETY: AVX2 and FMA were detected (`try_linear`, the only caller).
                *o = unsafe { dot_avx2(wr, &xs[r * in_d..(r + 1) * in_d]) };
            }
        }
    });
    if rows == 1 {
        return yt;
    }
    let mut y = vec![0f32; rows * out_d];
    for (o, vals) in yt.chunks(rows).enumerate() {
        for (r, v) in vals.iter().enumerate() {
            y[r * out_d + o] = *v;
        }
    }
    y
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot_avx2(_: &[f32], _: &[f32]) -> f32 {
    unreachable!("the gemv is x86-64 only (`try_linear` declines elsewhere)")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (j, a_j) in acc.iter_mut().enumerate() {
            let x = _mm256_loadu_ps(a.as_ptr().add(i + 8 * j));
            let y = _mm256_loadu_ps(b.as_ptr().add(i + 8 * j));
            *a_j = _mm256_fmadd_ps(x, y, *a_j);
        }
        i += 32;
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut buf = [0f32; 8];
    _mm256_storeu_ps(buf.as_mut_ptr(), s);
    let mut r: f32 = buf.iter().sum();
    while i < n {
        r += a[i] * b[i];
        i += 1;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn gemv_equals_matmul_for_every_row_count() {
        let dev = Device::Cpu;
        // 130 outputs: two full 64-blocks and a ragged one; 70 inputs: the scalar tail of the dot.
        let w = Tensor::randn(0f32, 1.0, (130, 70), &dev).unwrap();
        for rows in 1..=MAX_ROWS {
            let x = Tensor::randn(0f32, 1.0, (1, rows, 70), &dev).unwrap();
            let Some(fast) = try_linear(&x, &w).unwrap() else { return }; // no AVX2/FMA here
            let slow = x.reshape((rows, 70)).unwrap().matmul(&w.t().unwrap()).unwrap().reshape((1, rows, 130)).unwrap();
            let d = (fast - slow).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-4, "rows {rows}: max diff {d}");
        }
        let x = Tensor::randn(0f32, 1.0, (MAX_ROWS + 1, 70), &dev).unwrap();
        assert!(try_linear(&x, &w).unwrap().is_none(), "more rows than MAX_ROWS go to the GEMM");
    }
}
