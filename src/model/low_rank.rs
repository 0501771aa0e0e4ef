//! `x Wᵀ + s · (drop(x) Aᵀ) Bᵀ` — a frozen projection plus a trained low-rank update (LoRA, and
//! DoRA's direction) — as one differentiable CPU op for training (f32); and DoRA's per-row
//! factor on its output (`try_scale_columns`).
//!
//! Why: composed in candle's graph this is six nodes (dropout, two skinny matmuls, the scale,
//! the frozen matmul, the add), and candle's backward gives every node a zero-filled gradient
//! that it adds into; `x` alone collects two gradients per projection. A LoRA step spent more
//! time in those adds and fills than in its own GEMMs. Here the forward accumulates the update
//! into the frozen GEMM's output, and the backward returns `dx = g W + s (g B A) ⊙ m` in one
//! buffer, `dA` and `dB` from two GEMMs, nothing else.
use super::packed_gemm::{PackSlot, PackedWeight};
use super::train_ops::with_data;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

const CHUNK: usize = 1 << 14;

/// An inverted-dropout mask: element i is kept (and scaled by `scale`) where `keep[i] != 0`.
pub struct Mask {
    pub keep: Vec<u8>,
    pub scale: f32,
}

impl Mask {
    /// `x ⊙ m`.
    pub fn apply(&self, x: &[f32]) -> Vec<f32> {
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(self.keep.par_chunks(CHUNK))).for_each(|(y, (x, k))| {
            for ((o, v), k) in y.iter_mut().zip(x).zip(k) {
                *o = if *k != 0 { v * self.scale } else { 0.0 };
            }
        });
        y
    }

    /// `dst += src ⊙ m`.
    fn add_masked(&self, dst: &mut [f32], src: &[f32]) {
        dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK).zip(self.keep.par_chunks(CHUNK))).for_each(|(d, (s, k))| {
            for ((o, v), k) in d.iter_mut().zip(s).zip(k) {
                if *k != 0 {
                    *o += v * self.scale;
                }
            }
        });
    }
}

/// Row-major `dst [m, n] = alpha·dst + beta·lhs·rhs` (`read_dst` false: `beta·lhs·rhs`), each
/// operand given by its (row, column) strides.
#[allow(clippy::too_many_arguments)]
fn gemm(m: usize, n: usize, k: usize, dst: &mut [f32], read_dst: bool, beta: f32, lhs: (&[f32], isize, isize), rhs: (&[f32], isize, isize)) {
    assert!(dst.len() >= m * n);
    // SAFETY: the strides address only elements inside the given slices (checked by callers'
    // shapes: lhs is m×k, rhs k×n, dst m×n), and dst does not alias either operand.
    unsafe {
        gemm::gemm(
            m, n, k,
            dst.as_mut_ptr(), 1, n as isize,
            read_dst,
            lhs.0.as_ptr(), lhs.2, lhs.1,
            rhs.0.as_ptr(), rhs.2, rhs.1,
            1.0, beta,
            false, false, false,
            gemm::Parallelism::Rayon(0),
        )
    }
}

struct LowRankLinear {
    w: Tensor, // [out, in], frozen
    packed: Option<Arc<PackedWeight>>,
    packed_t: Option<Arc<PackedWeight>>,
    scale: f32,
    mask: Option<Mask>,
}

impl LowRankLinear {
    /// `x W`ᵀ (the packed GEMM where it applies).
    fn base(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let (out_d, in_d) = self.w.dims2()?;
        match self.packed.as_deref() {
            Some(PackedWeight::F32(p)) if p.dims() == (out_d, in_d) && p.serves(rows) => Ok(p.matmul(x, rows)),
            _ => Tensor::from_slice(x, (rows, in_d), &Device::Cpu)?.matmul(&self.w.t()?)?.flatten_all()?.to_vec1::<f32>(),
        }
    }

    /// `g W` (the packed transpose where it applies).
    fn base_t(&self, g: &[f32], rows: usize) -> Result<Vec<f32>> {
        let (out_d, in_d) = self.w.dims2()?;
        match self.packed_t.as_deref() {
            Some(PackedWeight::F32(p)) if p.dims() == (in_d, out_d) && p.serves(rows) => Ok(p.matmul(g, rows)),
            _ => Tensor::from_slice(g, (rows, out_d), &Device::Cpu)?.matmul(&self.w)?.flatten_all()?.to_vec1::<f32>(),
        }
    }

    fn dropped<'a>(&self, x: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        match &self.mask {
            Some(m) => m.apply(x).into(),
            None => x.into(),
        }
    }
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let (a, b) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("low-rank linear: non-contiguous input".into()))?;
    Ok(&s.as_slice::<f32>()?[a..b])
}

impl CustomOp3 for LowRankLinear {
    fn name(&self) -> &'static str {
        "frozen-low-rank-linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, as_: &CpuStorage, al: &Layout, bs: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, a, b) = (slice(xs, xl)?, slice(as_, al)?, slice(bs, bl)?);
        let (out_d, in_d) = self.w.dims2()?;
        let r = a.len() / in_d;
        let rows = x.len() / in_d;
        let mut y = self.base(x, rows)?;
        let xd = self.dropped(x);
        let mut t = vec![0f32; rows * r];
        // t = drop(x) Aᵀ, then y += s · t Bᵀ (A is [r, in], B is [out, r], row-major).
        gemm(rows, r, in_d, &mut t, false, 1.0, (&xd, in_d as isize, 1), (a, 1, in_d as isize));
        gemm(rows, out_d, r, &mut y, true, self.scale, (&t, r as isize, 1), (b, 1, r as isize));
        let mut shape = xl.dims().to_vec();
        *shape.last_mut().expect("rank >= 1") = out_d;
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }

    /// `u = s·g B`; `dB = s·gᵀ t` with `t = drop(x) Aᵀ` recomputed; `dA = uᵀ drop(x)`;
    /// `dx = g W + (u A) ⊙ m`.
    fn bwd(&self, x: &Tensor, a: &Tensor, b: &Tensor, _y: &Tensor, gy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out_d, in_d) = self.w.dims2()?;
        let r = a.dim(0)?;
        let rows = x.elem_count() / in_d;
        let want_dx = x.track_op();
        let (dx, da, db) = with_data(x, |xv| {
            with_data(a, |av| {
                with_data(b, |bv| {
                    with_data(gy, |g| {
                        let xd = self.dropped(xv);
                        let mut t = vec![0f32; rows * r];
                        gemm(rows, r, in_d, &mut t, false, 1.0, (&xd, in_d as isize, 1), (av, 1, in_d as isize));
                        let mut db = vec![0f32; out_d * r];
                        gemm(out_d, r, rows, &mut db, false, self.scale, (g, 1, out_d as isize), (&t, r as isize, 1));
                        let mut u = vec![0f32; rows * r];
                        gemm(rows, r, out_d, &mut u, false, self.scale, (g, out_d as isize, 1), (bv, r as isize, 1));
                        let mut da = vec![0f32; r * in_d];
                        gemm(r, in_d, rows, &mut da, false, 1.0, (&u, 1, r as isize), (&xd, in_d as isize, 1));
                        let dx = if want_dx {
                            let mut dx = self.base_t(g, rows)?;
                            match &self.mask {
                                None => gemm(rows, in_d, r, &mut dx, true, 1.0, (&u, r as isize, 1), (av, in_d as isize, 1)),
                                Some(m) => {
                                    let mut v = vec![0f32; rows * in_d];
                                    gemm(rows, in_d, r, &mut v, false, 1.0, (&u, r as isize, 1), (av, in_d as isize, 1));
                                    m.add_masked(&mut dx, &v);
                                }
                            }
                            Some(dx)
                        } else {
                            None
                        };
                        Ok((dx, da, db))
                    })
                })
            })
        })?;
        let dev = x.device();
        let dx = dx.map(|v| Tensor::from_vec(v, x.shape(), dev)).transpose()?;
        Ok((dx, Some(Tensor::from_vec(da, a.shape(), dev)?), Some(Tensor::from_vec(db, b.shape(), dev)?)))
    }
}

/// `x Wᵀ + scale · (drop(x) Aᵀ) Bᵀ` for a frozen `w` `[out, in]` and trained `a` `[r, in]`, `b`
/// `[out, r]`, where it applies (f32 on the CPU fast path, `w` not a `Var`); None elsewhere (the
/// caller composes the update). `mask` (as many elements as `x`) is the input dropout.
pub fn try_low_rank_linear(x: &Tensor, w: &Tensor, pack: &PackSlot, a: &Tensor, b: &Tensor, scale: f32, mask: Option<Mask>) -> Result<Option<Tensor>> {
    let f32s = [x, w, a, b].iter().all(|t| t.dtype() == DType::F32);
    if w.is_variable() || !f32s || !crate::runtime::cpu_fast_path(x.device()) {
        return Ok(None);
    }
    let (out_d, in_d) = w.dims2()?;
    let (r, a_in) = a.dims2()?;
    if x.dims().last() != Some(&in_d) || a_in != in_d || b.dims2()? != (out_d, r) {
        bail!("low-rank linear: x {:?}, W {:?}, A {:?}, B {:?}", x.dims(), w.dims(), a.dims(), b.dims());
    }
    if mask.as_ref().is_some_and(|m| m.keep.len() != x.elem_count()) {
        bail!("low-rank linear: dropout mask of {} for {} inputs", mask.map_or(0, |m| m.keep.len()), x.elem_count());
    }
    let op = LowRankLinear { w: w.clone(), packed: pack.get(w), packed_t: pack.get_transposed(w), scale, mask };
    Ok(Some(x.contiguous()?.apply_op3(&a.contiguous()?, &b.contiguous()?, op)?))
}

/// `y ⊙ f` over the last dim (DoRA's per-output-row factor on `[.., out]` activations).
struct ScaleCols;

impl candle_core::CustomOp2 for ScaleCols {
    fn name(&self) -> &'static str {
        "train-scale-columns"
    }

    fn cpu_fwd(&self, ys: &CpuStorage, yl: &Layout, fs: &CpuStorage, fl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (y, f) = (slice(ys, yl)?, slice(fs, fl)?);
        let d = f.len();
        let mut o = vec![0f32; y.len()];
        let step = (CHUNK / d).max(1) * d;
        o.par_chunks_mut(step).zip(y.par_chunks(step)).for_each(|(o, y)| {
            for (or, yr) in o.chunks_mut(d).zip(y.chunks(d)) {
                or.iter_mut().zip(yr).zip(f).for_each(|((o, y), f)| *o = y * f);
            }
        });
        Ok((CpuStorage::F32(o), yl.shape().clone()))
    }

    /// `dy = g ⊙ f`, `df = Σ_rows g ⊙ y` in one pass (candle's broadcast backward sums a
    /// `[rows, out]` product over its leading dims with a strided reduction: a tenth of a DoRA
    /// step), partial sums per fixed chunk added in order, so the result is reproducible.
    fn bwd(&self, y: &Tensor, f: &Tensor, _o: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dy, df) = with_data(y, |yv| {
            with_data(f, |fv| {
                with_data(g, |gv| {
                    let d = fv.len();
                    let step = (CHUNK / d).max(1) * d;
                    let mut dy = vec![0f32; yv.len()];
                    let df = dy
                        .par_chunks_mut(step)
                        .zip(yv.par_chunks(step).zip(gv.par_chunks(step)))
                        .map(|(dy, (y, g))| {
                            let mut df = vec![0f32; d];
                            for ((dr, yr), gr) in dy.chunks_mut(d).zip(y.chunks(d)).zip(g.chunks(d)) {
                                for j in 0..d {
                                    dr[j] = gr[j] * fv[j];
                                    df[j] += gr[j] * yr[j];
                                }
                            }
                            df
                        })
                        .collect::<Vec<_>>()
                        .into_iter()
                        .fold(Vec::new(), super::train_ops::add_into);
                    Ok((dy, df))
                })
            })
        })?;
        let dev = y.device();
        Ok((Some(Tensor::from_vec(dy, y.shape(), dev)?), Some(Tensor::from_vec(df, f.shape(), dev)?)))
    }
}

/// `y ⊙ f` for `y` `[.., d]` and `f` `[d]`, differentiable in both, on the CPU fast path (f32);
/// None elsewhere (the caller uses `broadcast_mul`).
pub fn try_scale_columns(y: &Tensor, f: &Tensor) -> Result<Option<Tensor>> {
    let fits = y.dtype() == DType::F32 && f.dtype() == DType::F32 && crate::runtime::cpu_fast_path(y.device());
    if !fits || f.rank() != 1 || y.dims().last() != Some(&f.dim(0)?) {
        return Ok(None);
    }
    Ok(Some(y.contiguous()?.apply_op2(&f.contiguous()?, ScaleCols)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::Rng;
    use candle_core::Var;

    use crate::util::max_abs_diff as max_diff;

    /// Values and the gradients of x, A and B equal candle's autograd of the composed
    /// `x Wᵀ + s (x ⊙ m) Aᵀ Bᵀ`, with and without a mask, on a ragged shape.
    #[test]
    fn matches_the_composed_update_and_its_gradients() {
        let dev = Device::Cpu;
        let (rows, in_d, out_d, r) = ((3, 7), 45, 70, 5);
        let mut rng = Rng::new(3);
        let x = Var::from_tensor(&rng.normal_tensor(&[rows.0, rows.1, in_d], 1.0, &dev).unwrap()).unwrap();
        let w = rng.normal_tensor(&[out_d, in_d], 0.2, &dev).unwrap();
        let a = Var::from_tensor(&rng.normal_tensor(&[r, in_d], 0.3, &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&rng.normal_tensor(&[out_d, r], 0.3, &dev).unwrap()).unwrap();
        let probe = rng.normal_tensor(&[rows.0, rows.1, out_d], 1.0, &dev).unwrap();
        let pack = PackSlot::default();
        for masked in [false, true] {
            let n = x.elem_count();
            let keep: Vec<u8> = (0..n).map(|i| (i % 3 != 0) as u8).collect();
            let mv: Vec<f32> = keep.iter().map(|k| *k as f32 * 1.5).collect();
            let mask = masked.then(|| Mask { keep: keep.clone(), scale: 1.5 });
            let fused = try_low_rank_linear(x.as_tensor(), &w, &pack, a.as_tensor(), b.as_tensor(), 0.7, mask).unwrap().unwrap();
            let xd = if masked { (x.as_tensor() * Tensor::from_vec(mv, x.shape(), &dev).unwrap()).unwrap() } else { x.as_tensor().clone() };
            let comp = (x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap()
                + (xd.broadcast_matmul(&a.as_tensor().t().unwrap()).unwrap().broadcast_matmul(&b.as_tensor().t().unwrap()).unwrap() * 0.7).unwrap())
            .unwrap();
            assert!(max_diff(&fused, &comp) < 1e-4, "forward {}", max_diff(&fused, &comp));
            let gf = (&fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (&comp * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("x", x.as_tensor()), ("A", a.as_tensor()), ("B", b.as_tensor())] {
                let (f, c) = (gf.get(v).unwrap(), gc.get(v).unwrap());
                let scale = c.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
                assert!(scale > 0.1, "{name}: the gradient reaches it");
                assert!(max_diff(f, c) < 1e-4 * scale.max(1.0), "d{name} masked={masked}: {}", max_diff(f, c));
            }
        }
    }

    /// `y ⊙ f` and its gradients in y and f equal candle's `broadcast_mul`.
    #[test]
    fn column_scale_matches_broadcast_mul() {
        let dev = Device::Cpu;
        let mut rng = Rng::new(8);
        let y = Var::from_tensor(&rng.normal_tensor(&[5, 3, 37], 1.0, &dev).unwrap()).unwrap();
        let f = Var::from_tensor(&rng.normal_tensor(&[37], 1.0, &dev).unwrap()).unwrap();
        let probe = rng.normal_tensor(&[5, 3, 37], 1.0, &dev).unwrap();
        let fused = try_scale_columns(y.as_tensor(), f.as_tensor()).unwrap().unwrap();
        let comp = y.as_tensor().broadcast_mul(f.as_tensor()).unwrap();
        assert!(max_diff(&fused, &comp) == 0.0);
        let gf = (&fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (&comp * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [y.as_tensor(), f.as_tensor()] {
            assert!(max_diff(gf.get(v).unwrap(), gc.get(v).unwrap()) < 1e-5);
            assert!(gc.get(v).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 1.0);
        }
    }
}
