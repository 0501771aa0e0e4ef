//! Differentiable fused CPU ops for training (f32, contiguous), each a candle custom op with a
//! hand-written backward: RMSNorm, `silu(gate) · up`, RoPE (rotate-half) and the attention's
//! scaled, masked softmax.
//!
//! Why: candle's fused rms_norm, softmax and rope have no backward, so training composed them
//! from primitives: ~6 graph nodes per norm, ~7 per RoPE, 7 per softmax (scale, mask add, max,
//! sub, exp, sum, div) and 2 for the MLP gate. Every node is an allocation and a pass forward,
//! one to three more backward, and candle's gradient store adds each node's gradient into a
//! fresh zero tensor (two more passes). One node per op is one pass each way. A profile of a
//! RoAd fine-tuning step put these element-wise chains above the GEMMs.
//!
//! Each `try_*` returns None where it does not apply (another dtype or device, generic ops
//! forced, unexpected shapes) and the caller composes candle's differentiable primitives. On
//! CUDA devices the same ops run as road's kernels (`train_ops_cuda`).
use super::train_ops_cuda as cuda;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

/// Elements per parallel task (whole rows), about what one core passes over in ~10 µs.
const CHUNK: usize = 1 << 14;

/// On the CPU these ops and their backwards run here; on CUDA the forwards are `train_ops_cuda`'s
/// kernels (each op's `cuda_fwd`) and the backwards its one-launch kernels.
fn applies(ts: &[&Tensor]) -> bool {
    let dev = ts[0].device();
    (crate::runtime::cpu_fast_path(dev) || crate::runtime::cuda_fast_path(dev)) && ts.iter().all(|t| t.dtype() == DType::F32)
}

pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let (a, b) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("train-ops: non-contiguous input".into()))?;
    Ok(&s.as_slice::<f32>()?[a..b])
}

/// `t`'s f32 data (made contiguous first), handed to `f`: the backward passes (here and RoAd's)
/// read their saved inputs and the incoming gradient in place instead of copying them out.
pub(crate) fn with_data<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    let Storage::Cpu(c) = &*st else { bail!("train-ops: CPU tensors only") };
    f(slice(c, l)?)
}

/// Rows per parallel task for rows `d` wide.
fn rows_per_task(d: usize) -> usize {
    (CHUNK / d.max(1)).max(1)
}

// ---------- RMSNorm ----------

struct RmsNorm {
    eps: f32,
}

/// `1 / √(mean(x²) + eps)` of one row.
#[inline]
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32 + eps).sqrt().recip()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "train-rms-norm"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(xs, xl)?, slice(ws, wl)?);
        let d = w.len();
        let step = rows_per_task(d) * d;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(step).zip(x.par_chunks(step)).for_each(|(y, x)| {
            for (yr, xr) in y.chunks_mut(d).zip(x.chunks(d)) {
                let r = inv_rms(xr, self.eps);
                for ((o, v), g) in yr.iter_mut().zip(xr).zip(w) {
                    *o = v * r * g;
                }
            }
        });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout, ws: &CudaStorage, wl: &Layout) -> Result<(CudaStorage, Shape)> {
        cuda::rms_fwd(xs, xl, ws, wl, self.eps)
    }

    /// `dx = r (g⊙w − x r² ⟨g⊙w, x⟩ / d)` per row, `dw = Σ_rows g ⊙ x r` (only for a trained w).
    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, gy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if x.device().is_cuda() {
            return cuda::rms_bwd(x, w, gy, self.eps);
        }
        let want_dw = w.track_op();
        let (dx, dw) = with_data(x, |xv| {
            with_data(w, |wv| {
                with_data(gy, |gv| {
                    let d = wv.len();
                    let step = rows_per_task(d) * d;
                    let mut dx = vec![0f32; xv.len()];
                    let dw = dx
                        .par_chunks_mut(step)
                        .zip(xv.par_chunks(step).zip(gv.par_chunks(step)))
                        .map(|(dx, (x, g))| {
                            let mut dw = if want_dw { vec![0f32; d] } else { Vec::new() };
                            for ((dr, xr), gr) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
                                let r = inv_rms(xr, self.eps);
                                let c = gr.iter().zip(wv).zip(xr).map(|((g, w), x)| g * w * x).sum::<f32>() / d as f32;
                                let k = r * r * c;
                                for (((o, x), g), w) in dr.iter_mut().zip(xr).zip(gr).zip(wv) {
                                    *o = r * (g * w - x * k);
                                }
                                if want_dw {
                                    for ((a, x), g) in dw.iter_mut().zip(xr).zip(gr) {
                                        *a += g * x * r;
                                    }
                                }
                            }
                            dw
                        })
                        .collect::<Vec<_>>()
                        .into_iter()
                        .fold(Vec::new(), add_into);
                    Ok((dx, dw))
                })
            })
        })?;
        let dev = x.device();
        let dw = if want_dw { Some(Tensor::from_vec(dw, w.shape(), dev)?) } else { None };
        Ok((Some(Tensor::from_vec(dx, x.shape(), dev)?), dw))
    }
}

/// Element-wise sum of two partial sums (either may be the empty identity). Partials are
/// collected per fixed chunk and summed in order, so a gradient does not depend on how rayon
/// happened to split the work (a `reduce` would make runs irreproducible in the last bits).
pub(crate) fn add_into(mut a: Vec<f32>, b: Vec<f32>) -> Vec<f32> {
    if a.is_empty() {
        return b;
    }
    a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
    a
}

/// RMSNorm over the last dim, `x / √(mean(x²) + eps) · w`, differentiable in x and w.
pub fn try_rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Option<Tensor>> {
    if !applies(&[x, w]) || w.rank() != 1 || x.dims().last() != Some(&w.elem_count()) || w.elem_count() == 0 {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })?))
}

// ---------- silu(gate) · up ----------

struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "train-silu-mul"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, us: &CpuStorage, ul: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (slice(gs, gl)?, slice(us, ul)?);
        let mut m = vec![0f32; g.len()];
        m.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK))).for_each(|(m, (g, u))| {
            super::cpu_ops::sigmoid_into(g, m);
            for ((o, g), u) in m.iter_mut().zip(g).zip(u) {
                *o = g * *o * u;
            }
        });
        Ok((CpuStorage::F32(m), gl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, gs: &CudaStorage, gl: &Layout, us: &CudaStorage, ul: &Layout) -> Result<(CudaStorage, Shape)> {
        cuda::silu_mul_fwd(gs, gl, us, ul)
    }

    /// With σ = sigmoid(g): `dg = gm · u · σ (1 + g (1 − σ))`, `du = gm · g σ`.
    fn bwd(&self, g: &Tensor, u: &Tensor, _m: &Tensor, gm: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if g.device().is_cuda() {
            return cuda::silu_mul_bwd(g, u, gm);
        }
        let n = g.elem_count();
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        with_data(g, |gv| {
            with_data(u, |uv| {
                with_data(gm, |mv| {
                    dg.par_chunks_mut(CHUNK)
                        .zip(du.par_chunks_mut(CHUNK))
                        .zip(gv.par_chunks(CHUNK).zip(uv.par_chunks(CHUNK)).zip(mv.par_chunks(CHUNK)))
                        .for_each(|((dg, du), ((g, u), m))| {
                            super::cpu_ops::sigmoid_into(g, du);
                            for ((((dg, du), g), u), m) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(m) {
                                let s = *du;
                                *dg = m * u * s * (1.0 + g * (1.0 - s));
                                *du = m * g * s;
                            }
                        });
                    Ok(())
                })
            })
        })?;
        let dev = g.device();
        Ok((Some(Tensor::from_vec(dg, g.shape(), dev)?), Some(Tensor::from_vec(du, u.shape(), dev)?)))
    }
}

/// `silu(g) · u`, differentiable in both.
pub fn try_silu_mul(g: &Tensor, u: &Tensor) -> Result<Option<Tensor>> {
    if !applies(&[g, u]) || g.dims() != u.dims() {
        return Ok(None);
    }
    Ok(Some(g.contiguous()?.apply_op2(&u.contiguous()?, SiluMul)?))
}

// ---------- RoPE ----------

/// Rotate-half RoPE of `[b, heads, t, hd]` by tables `[b, t, hd/2]`: `y₁ = x₁c − x₂s`,
/// `y₂ = x₂c + x₁s` (`sign` −1: the inverse). The backward is the inverse rotation (s → −s).
#[derive(Clone)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
    heads: usize,
    sign: f32,
}

impl Rope {
    fn rotate(&self, x: &[f32], sign: f32) -> Result<Vec<f32>> {
        let (b, t, half) = self.cos.dims3()?;
        let hd = 2 * half;
        let block = t * hd; // one (batch row, head)
        let mut y = vec![0f32; x.len()];
        with_data(&self.cos, |c| {
            with_data(&self.sin, |s| {
                y.par_chunks_mut(block).zip(x.par_chunks(block)).enumerate().for_each(|(bh, (y, x))| {
                    let bi = (bh / self.heads).min(b - 1);
                    for ti in 0..t {
                        let (xr, yr) = (&x[ti * hd..(ti + 1) * hd], &mut y[ti * hd..(ti + 1) * hd]);
                        let tab = (bi * t + ti) * half;
                        let (c, s) = (&c[tab..tab + half], &s[tab..tab + half]);
                        let (x1, x2) = xr.split_at(half);
                        let (y1, y2) = yr.split_at_mut(half);
                        for i in 0..half {
                            let si = sign * s[i];
                            y1[i] = x1[i] * c[i] - x2[i] * si;
                            y2[i] = x2[i] * c[i] + x1[i] * si;
                        }
                    }
                });
                Ok(())
            })
        })?;
        Ok(y)
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "train-rope"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(self.rotate(slice(xs, xl)?, self.sign)?), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        cuda::rope(xs, xl, &self.cos, &self.sin, self.heads, self.sign)
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, gy: &Tensor) -> Result<Option<Tensor>> {
        let inverse = Rope { sign: -self.sign, ..self.clone() };
        Ok(Some(gy.contiguous()?.apply_op1_no_bwd(&inverse)?))
    }
}

/// RoPE on `[b, heads, t, hd]` with tables `[b, t, hd/2]`, differentiable in x.
pub fn try_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Option<Tensor>> {
    if !applies(&[x, cos, sin]) || x.rank() != 4 || cos.rank() != 3 || cos.dims() != sin.dims() {
        return Ok(None);
    }
    let (b, heads, t, hd) = x.dims4()?;
    if cos.dims() != [b, t, hd / 2] || hd % 2 != 0 {
        return Ok(None);
    }
    let op = Rope { cos: cos.contiguous()?, sin: sin.contiguous()?, heads, sign: 1.0 };
    Ok(Some(x.contiguous()?.apply_op1(op)?))
}

// ---------- scaled, masked softmax ----------

/// `softmax(scale · x + mask)` over the last dim of `[b, heads, t, s]` scores, the additive mask
/// `[b, 1, t, s]` shared by the heads.
struct MaskedSoftmax {
    scale: f32,
    mask: Option<Tensor>,
    heads: usize,
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "train-masked-softmax"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(xs, xl)?;
        let dims = xl.dims();
        let (t, s) = (dims[2], dims[3]);
        let block = t * s; // one (batch row, head)
        let mut p = vec![0f32; x.len()];
        let mut run = |m: Option<&[f32]>| {
            p.par_chunks_mut(block).zip(x.par_chunks(block)).enumerate().for_each(|(bh, (p, x))| {
                let mrow = m.map(|m| &m[(bh / self.heads) * block..(bh / self.heads + 1) * block]);
                for ti in 0..t {
                    let (pr, xr) = (&mut p[ti * s..(ti + 1) * s], &x[ti * s..(ti + 1) * s]);
                    // The composed op's order: scale, add the mask, subtract the max, exp, divide.
                    match mrow {
                        Some(m) => pr.iter_mut().zip(xr).zip(&m[ti * s..(ti + 1) * s]).for_each(|((o, v), m)| *o = v * self.scale + m),
                        None => pr.iter_mut().zip(xr).for_each(|(o, v)| *o = v * self.scale),
                    }
                    let max = pr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0f32;
                    for o in pr.iter_mut() {
                        *o = (*o - max).exp();
                        sum += *o;
                    }
                    pr.iter_mut().for_each(|o| *o /= sum);
                }
            })
        };
        match &self.mask {
            Some(m) => with_data(m, |mv| {
                run(Some(mv));
                Ok(())
            })?,
            None => run(None),
        }
        Ok((CpuStorage::F32(p), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        cuda::masked_softmax(xs, xl, self.mask.as_ref(), self.heads, self.scale)
    }

    /// `dx = scale · p ⊙ (gp − ⟨gp, p⟩)` per row (the mask is a constant).
    fn bwd(&self, x: &Tensor, p: &Tensor, gp: &Tensor) -> Result<Option<Tensor>> {
        if x.device().is_cuda() {
            return cuda::masked_softmax_bwd(p, gp, self.scale);
        }
        let s = x.dim(3)?;
        let step = rows_per_task(s) * s;
        let mut dx = vec![0f32; x.elem_count()];
        with_data(p, |pv| {
            with_data(gp, |gv| {
                dx.par_chunks_mut(step).zip(pv.par_chunks(step).zip(gv.par_chunks(step))).for_each(|(dx, (p, g))| {
                    for ((dr, pr), gr) in dx.chunks_mut(s).zip(p.chunks(s)).zip(g.chunks(s)) {
                        let dot = pr.iter().zip(gr).map(|(p, g)| p * g).sum::<f32>();
                        for ((o, p), g) in dr.iter_mut().zip(pr).zip(gr) {
                            *o = self.scale * p * (g - dot);
                        }
                    }
                });
                Ok(())
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// `softmax(scale · scores + mask)` over the last dim, differentiable in the scores (`[b, heads,
/// t, s]`; mask `[b, 1, t, s]`, or None). Where the fused op does not apply, the same thing
/// composed from candle's differentiable ops.
pub fn masked_softmax(scores: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    let fits = scores.rank() == 4
        && match mask {
            Some(m) => m.dtype() == DType::F32 && m.dims() == [scores.dims()[0], 1, scores.dims()[2], scores.dims()[3]],
            None => true,
        };
    if applies(&[scores]) && fits {
        let op = MaskedSoftmax { scale: scale as f32, mask: mask.map(Tensor::contiguous).transpose()?, heads: scores.dim(1)? };
        return scores.contiguous()?.apply_op1(op);
    }
    let z = (scores * scale)?;
    let z = match mask {
        Some(m) => z.broadcast_add(m)?,
        None => z,
    };
    candle_nn::ops::softmax(&z, candle_core::D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::Rng;
    use candle_core::{Device, Var};

    /// Largest |a − b| over all elements.
    use crate::util::max_abs_diff as max_diff;

    /// Forward values and the gradients of a random linear functional of the output, fused op
    /// against the same function composed from candle's primitives (whose backward candle
    /// derives), on ragged shapes (rows not a multiple of the parallel chunk).
    fn check(name: &str, inputs: &[Var], fused: impl Fn(&[Tensor]) -> Tensor, composed: impl Fn(&[Tensor]) -> Tensor, rng: &mut Rng) {
        let xs: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
        let (a, b) = (fused(&xs), composed(&xs));
        assert_eq!(a.dims(), b.dims(), "{name}: shape");
        let fwd = max_diff(&a, &b);
        assert!(fwd < 2e-5, "{name}: forward differs by {fwd}");
        let w = rng.normal_tensor(a.dims(), 1.0, &Device::Cpu).unwrap();
        let ga = (&a * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&b * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, v) in inputs.iter().enumerate() {
            let (x, y) = (ga.get(v).expect("fused gradient reaches the input"), gb.get(v).unwrap());
            let scale = y.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1.0);
            let d = max_diff(x, y) / scale;
            assert!(d < 5e-5, "{name}: gradient of input {i} differs by {d} (relative)");
            assert!(max_diff(x, &x.zeros_like().unwrap()) > 0.0, "{name}: gradient of input {i} is zero");
        }
    }

    #[test]
    fn fused_training_ops_match_composed_gradients() {
        let dev = Device::Cpu;
        let mut rng = Rng::new(11);
        let var = |shape: &[usize], s: f32, rng: &mut Rng| Var::from_tensor(&rng.normal_tensor(shape, s, &dev).unwrap()).unwrap();
        // RMSNorm, x and w both trained (full fine-tuning trains the norms).
        let (x, w) = (var(&[3, 5, 40], 1.0, &mut rng), var(&[40], 1.0, &mut rng));
        check(
            "rms_norm",
            &[x, w],
            |t| try_rms_norm(&t[0], &t[1], 1e-5).unwrap().unwrap(),
            |t| candle_nn::ops::rms_norm_slow(&t[0], &t[1], 1e-5).unwrap(),
            &mut rng,
        );
        // silu · up, over silu's saturation.
        let (g, u) = (var(&[7, 333], 6.0, &mut rng), var(&[7, 333], 1.0, &mut rng));
        check("silu_mul", &[g, u], |t| try_silu_mul(&t[0], &t[1]).unwrap().unwrap(), |t| (candle_nn::ops::silu(&t[0]).unwrap() * &t[1]).unwrap(), &mut rng);
        // RoPE against the rotate-half composition.
        let (b, h, t, hd) = (2, 3, 5, 8);
        let x = var(&[b, h, t, hd], 1.0, &mut rng);
        let ang = rng.normal_tensor(&[b, t, hd / 2], 2.0, &dev).unwrap();
        let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
        let composed = |t: &[Tensor]| {
            let x = &t[0];
            let c = Tensor::cat(&[&cos, &cos], 2).unwrap().unsqueeze(1).unwrap();
            let s = Tensor::cat(&[&sin, &sin], 2).unwrap().unsqueeze(1).unwrap();
            let (x1, x2) = (x.narrow(3, 0, hd / 2).unwrap(), x.narrow(3, hd / 2, hd / 2).unwrap());
            let rot = Tensor::cat(&[&x2.neg().unwrap(), &x1], 3).unwrap();
            (x.broadcast_mul(&c).unwrap() + rot.broadcast_mul(&s).unwrap()).unwrap()
        };
        check("rope", &[x], |t| try_rope(&t[0], &cos, &sin).unwrap().unwrap(), composed, &mut rng);
        // Masked softmax: causal mask with a padded first key in batch row 1, and no mask.
        let (t, s) = (4, 6);
        let mut m = vec![0f32; b * t * s];
        for bi in 0..b {
            for ti in 0..t {
                for si in 0..s {
                    if si > ti + (s - t) || (bi == 1 && si == 0) {
                        m[(bi * t + ti) * s + si] = -1e30;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(m, (b, 1, t, s), &dev).unwrap();
        for mk in [Some(&mask), None] {
            let x = var(&[b, h, t, s], 3.0, &mut rng);
            let composed = |t: &[Tensor]| {
                let z = (&t[0] * 0.35).unwrap();
                let z = mk.map_or(z.clone(), |m| z.broadcast_add(m).unwrap());
                candle_nn::ops::softmax(&z, candle_core::D::Minus1).unwrap()
            };
            assert!(applies(&[x.as_tensor()]), "the fused op, not its composed fallback, is under test");
            check("masked_softmax", &[x], |t| masked_softmax(&t[0], 0.35, mk).unwrap(), composed, &mut rng);
        }
    }

    #[test]
    fn training_ops_decline_off_the_fast_path() {
        let x = Tensor::ones((2, 4), DType::BF16, &candle_core::Device::Cpu).unwrap();
        assert!(try_silu_mul(&x, &x).unwrap().is_none());
        let w = Tensor::ones(4, DType::F32, &candle_core::Device::Cpu).unwrap();
        let xf = x.to_dtype(DType::F32).unwrap();
        assert!(crate::runtime::with_generic_ops(|| try_rms_norm(&xf, &w, 1e-5).unwrap().is_none()));
    }
}
