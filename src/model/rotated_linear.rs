//! `(x · blockdiag(R₀ … R_{nb−1})) Wᵀ` — a frozen projection of a block-rotated input (OFT) — as
//! one differentiable CPU op for training (f32), with gradients for `x` and the blocks `R`.
//!
//! Why: composed, the rotation is a transpose copy of `x` to `[nb, rows, h]`, a batched matmul,
//! a transpose copy back, then the frozen GEMM; each node's backward allocates, copies and adds
//! its gradient into a zero-filled store. Here each block is one strided GEMM straight on the
//! rows of `x` (no copies), blocks run in parallel, and the backward is `g W` through the packed
//! transpose, then per block `dR_j = x_jᵀ (gW)_j` and `dx_j = (gW)_j R_jᵀ`.
use super::packed_gemm::{PackSlot, PackedWeight};
use super::train_ops::{slice, with_data};
use candle_core::{bail, CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// A pointer that crosses into rayon tasks; each task writes a disjoint column block.
#[derive(Clone, Copy)]
struct Out(*mut f32);
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// Single-threaded `dst = beta · lhs · rhs` (`m×k` by `k×n`), every operand by (row, column)
/// strides, for one block (the blocks themselves run in parallel).
///
/// SAFETY: the caller guarantees every addressed element lies inside its buffer and that no
/// other task writes the same destination elements.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn block_gemm(m: usize, n: usize, k: usize, dst: *mut f32, dst_rs: usize, lhs: *const f32, lhs_rs: usize, lhs_cs: usize, rhs: *const f32, rhs_rs: usize, rhs_cs: usize) {
    gemm::gemm(
        m, n, k,
        dst, 1, dst_rs as isize,
        false,
        lhs, lhs_cs as isize, lhs_rs as isize,
        rhs, rhs_cs as isize, rhs_rs as isize,
        0.0, 1.0,
        false, false, false,
        gemm::Parallelism::None,
    )
}

struct RotatedLinear {
    w: Tensor, // [out, in], frozen
    packed: Option<Arc<PackedWeight>>,
    packed_t: Option<Arc<PackedWeight>>,
}

/// `y[:, j·h..] = x[:, j·h..] · R_{j or 0}` for all blocks, `x` `[rows, nb·h]`.
fn rotate(x: &[f32], r: &[f32], rows: usize, nb: usize, h: usize, transpose: bool) -> Vec<f32> {
    let width = nb * h;
    let shared = r.len() == h * h;
    let mut y = vec![0f32; x.len()];
    let out = Out(y.as_mut_ptr());
    (0..nb).into_par_iter().for_each(|j| {
        let out = out;
        let rj = &r[if shared { 0 } else { j * h * h }..][..h * h];
        // R_j (row-major h×h) or its transpose, as the right operand.
        let (rs, cs) = if transpose { (1, h) } else { (h, 1) };
        // SAFETY: block j reads columns j·h..(j+1)·h of x's rows and writes the same columns of
        // y (disjoint across tasks); rows × width elements in each.
        unsafe { block_gemm(rows, h, h, out.0.add(j * h), width, x.as_ptr().add(j * h), width, 1, rj.as_ptr(), rs, cs) }
    });
    y
}

impl RotatedLinear {
    fn dims(&self, x: &Layout, r: &Layout) -> Result<(usize, usize, usize, usize)> {
        let (out_d, in_d) = self.w.dims2()?;
        let (_, h, _) = r.shape().dims3()?;
        let rows = x.shape().elem_count() / in_d;
        Ok((rows, in_d / h, h, out_d))
    }
}

impl CustomOp2 for RotatedLinear {
    fn name(&self) -> &'static str {
        "frozen-rotated-linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, rs: &CpuStorage, rl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, nb, h, out_d) = self.dims(xl, rl)?;
        let x = slice(xs, xl)?;
        let r = slice(rs, rl)?;
        let xr = rotate(x, r, rows, nb, h, false);
        let y = match self.packed.as_deref() {
            Some(PackedWeight::F32(p)) if p.dims() == (out_d, nb * h) && p.serves(rows) => p.matmul(&xr, rows),
            _ => Tensor::from_vec(xr, (rows, nb * h), &Device::Cpu)?.matmul(&self.w.t()?)?.flatten_all()?.to_vec1::<f32>()?,
        };
        let mut shape = xl.dims().to_vec();
        *shape.last_mut().expect("rank >= 1") = out_d;
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }

    fn bwd(&self, x: &Tensor, r: &Tensor, _y: &Tensor, gy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (out_d, in_d) = self.w.dims2()?;
        let (nb_r, h, _) = r.dims3()?;
        let (rows, nb) = (x.elem_count() / in_d, in_d / h);
        let gxr = with_data(gy, |g| match self.packed_t.as_deref() {
            Some(PackedWeight::F32(p)) if p.dims() == (in_d, out_d) && p.serves(rows) => Ok(p.matmul(g, rows)),
            _ => Tensor::from_slice(g, (rows, out_d), &Device::Cpu)?.matmul(&self.w)?.flatten_all()?.to_vec1::<f32>(),
        })?;
        let want_dx = x.track_op();
        let (dx, dr) = with_data(x, |xv| {
            with_data(r, |rv| {
                let dx = want_dx.then(|| rotate(&gxr, rv, rows, nb, h, true));
                let mut blocks = vec![0f32; nb * h * h];
                let out = Out(blocks.as_mut_ptr());
                (0..nb).into_par_iter().for_each(|j| {
                    let out = out;
                    // dR_j = x_jᵀ (gW)_j: x_jᵀ is h×rows with (row, col) strides (1, in).
                    // SAFETY: block j writes its own h×h slot; reads stay inside x and gxr.
                    unsafe { block_gemm(h, h, rows, out.0.add(j * h * h), h, xv.as_ptr().add(j * h), 1, in_d, gxr.as_ptr().add(j * h), in_d, 1) }
                });
                // One shared block (OFT's block_share): the sum of every block's gradient, in order.
                let dr = if nb_r == 1 { blocks.chunks(h * h).fold(vec![0f32; h * h], |acc, b| super::train_ops::add_into(acc, b.to_vec())) } else { blocks };
                Ok((dx, dr))
            })
        })?;
        let dev = x.device();
        Ok((dx.map(|v| Tensor::from_vec(v, x.shape(), dev)).transpose()?, Some(Tensor::from_vec(dr, r.shape(), dev)?)))
    }
}

/// `rotate_blocks(x, r) Wᵀ` for a frozen `w` `[out, in]` and blocks `r` `[nb, h, h]` (or one
/// shared block `[1, h, h]`), where it applies (f32 on the CPU fast path, `w` not a `Var`); None
/// elsewhere (the caller composes the rotation and the projection).
pub fn try_rotated_linear(x: &Tensor, w: &Tensor, pack: &PackSlot, r: &Tensor) -> Result<Option<Tensor>> {
    let f32s = [x, w, r].iter().all(|t| t.dtype() == DType::F32);
    if w.is_variable() || !f32s || !crate::runtime::cpu_fast_path(x.device()) {
        return Ok(None);
    }
    let (_, in_d) = w.dims2()?;
    let (nb_r, h, h2) = r.dims3()?;
    if h == 0 || h != h2 || in_d % h != 0 || x.dims().last() != Some(&in_d) || (nb_r != 1 && nb_r * h != in_d) {
        bail!("rotated linear: x {:?}, W {:?}, blocks {:?}", x.dims(), w.dims(), r.dims());
    }
    let op = RotatedLinear { w: w.clone(), packed: pack.get(w), packed_t: pack.get_transposed(w) };
    Ok(Some(x.contiguous()?.apply_op2(&r.contiguous()?, op)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::Rng;
    use candle_core::Var;

    use crate::util::max_abs_diff as max_diff;

    /// Values and the gradients of x and R equal candle's autograd of the composed
    /// `rotate_blocks(x, R) Wᵀ` (its blocks as one batched matmul), per-block and shared.
    #[test]
    fn matches_the_composed_rotation_and_its_gradients() {
        let dev = Device::Cpu;
        let (h, nb, out_d) = (4, 6, 19);
        let mut rng = Rng::new(11);
        let x = Var::from_tensor(&rng.normal_tensor(&[3, 5, nb * h], 1.0, &dev).unwrap()).unwrap();
        let w = rng.normal_tensor(&[out_d, nb * h], 0.3, &dev).unwrap();
        let probe = rng.normal_tensor(&[3, 5, out_d], 1.0, &dev).unwrap();
        let pack = PackSlot::default();
        for blocks in [nb, 1] {
            let r = Var::from_tensor(&rng.normal_tensor(&[blocks, h, h], 0.5, &dev).unwrap()).unwrap();
            let fused = try_rotated_linear(x.as_tensor(), &w, &pack, r.as_tensor()).unwrap().unwrap();
            // The composed reference, written out: [rows, nb, h] · R_j per block.
            let xb = x.as_tensor().reshape((15, nb, h)).unwrap().transpose(0, 1).unwrap();
            let rb = if blocks == 1 { r.as_tensor().broadcast_as((nb, h, h)).unwrap() } else { r.as_tensor().clone() };
            let xr = xb.matmul(&rb).unwrap().transpose(0, 1).unwrap().reshape((3, 5, nb * h)).unwrap();
            let comp = xr.broadcast_matmul(&w.t().unwrap()).unwrap();
            assert!(max_diff(&fused, &comp) < 1e-4, "forward {}", max_diff(&fused, &comp));
            let gf = (&fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (&comp * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("x", x.as_tensor()), ("R", r.as_tensor())] {
                let (f, c) = (gf.get(v).unwrap(), gc.get(v).unwrap());
                let scale = c.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
                assert!(scale > 0.1, "{name}: the gradient reaches it");
                assert!(max_diff(f, c) < 1e-4 * scale.max(1.0), "d{name} blocks={blocks}: {}", max_diff(f, c));
            }
        }
    }
}
