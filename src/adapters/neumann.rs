//! peft's Cayley–Neumann OFT blocks straight from their parameters — skew matrix, truncated
//! series `R = Σ c_k Q^k` — as one differentiable CPU op (f32) with a hand-written backward.
//!
//! Why: composed (`orth::skew_from_upper` + `orth::cayley_neumann`) one projection's blocks are
//! ~15 candle nodes forward and ~30 backward on `[blocks, b, b]` tensors, each an allocation and
//! a pass; at b = 32 that was ~2 ms forward + backward per projection of SmolLM2 (18 blocks),
//! ~6 ms for `down_proj` (48), about a fifth of an OFT training step (210 projections). Here each
//! block is a few b×b GEMMs in place, blocks in parallel.
//!
//! Backward: the series in Horner form is `H_K = c_K I`, `H_k = c_k I + Q H_{k+1}`, `R = H_0`, so
//! with `dH_0 = dR`: `dQ = Σ_{k<K} dH_k H_{k+1}ᵀ` and `dH_{k+1} = Qᵀ dH_k` (the adjoint of each
//! Horner step; the forward evaluates the powers as peft does, the same polynomial). The skew
//! layout then gives `dv[(r, c)] = dQ[r, c] − dQ[c, r]`.
use super::orth::upper_entries;
use crate::model::rotated_linear::block_gemm;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The coefficients `c_0 … c_K` of peft's `terms`-term series, as its loop writes it:
/// `I + 2Q + 2Q² + … + 2Q^{t−2} + Q^{t−1}` for t ≥ 3 (t = 3 and t = 4 give the same series),
/// `I + 2Q` for t = 2, `I` for t ≤ 1.
pub fn coefficients(terms: usize) -> Vec<f32> {
    match terms {
        0 | 1 => vec![1.0],
        2 => vec![1.0, 2.0],
        t => {
            let top = (t - 1).max(3);
            let mut c = vec![2.0; top + 1];
            c[0] = 1.0;
            c[top] = 1.0;
            c
        }
    }
}

struct Neumann {
    h: usize,
    coeffs: Vec<f32>,
}

/// `dst = a · b` (or `a · bᵀ` with `bt`), all h×h row-major.
fn mm(h: usize, dst: &mut [f32], a: &[f32], b: &[f32], bt: bool) {
    let (rs, cs) = if bt { (1, h) } else { (h, 1) };
    // SAFETY: every operand is an h×h buffer addressed inside its bounds; dst is not aliased.
    unsafe { block_gemm(h, h, h, dst.as_mut_ptr(), h, a.as_ptr(), h, 1, b.as_ptr(), rs, cs) }
}

/// The skew matrix of one block's `h(h−1)/2` upper-triangle entries (torch's `triu_indices`
/// order): `Q[r, c] = v`, `Q[c, r] = −v`.
fn skew(v: &[f32], h: usize, q: &mut [f32]) {
    q.fill(0.0);
    for ((r, c), &x) in upper_entries(h).zip(v) {
        q[r * h + c] = x;
        q[c * h + r] = -x;
    }
}

fn add_scaled_eye(m: &mut [f32], h: usize, c: f32) {
    for i in 0..h {
        m[i * h + i] += c;
    }
}

impl Neumann {
    /// One block's `R = Σ c_k Q^k` (powers, in peft's order of accumulation).
    fn block(&self, v: &[f32], out: &mut [f32]) {
        let (h, c) = (self.h, &self.coeffs);
        let mut q = vec![0f32; h * h];
        skew(v, h, &mut q);
        out.fill(0.0);
        add_scaled_eye(out, h, c[0]);
        if c.len() == 1 {
            return;
        }
        out.iter_mut().zip(&q).for_each(|(o, x)| *o += c[1] * x);
        let (mut pw, mut next) = (q.clone(), vec![0f32; h * h]);
        for &ck in &c[2..] {
            mm(h, &mut next, &pw, &q, false);
            std::mem::swap(&mut pw, &mut next);
            out.iter_mut().zip(&pw).for_each(|(o, x)| *o += ck * x);
        }
    }

    /// One block's `dv` from its `dR` (the Horner adjoint in the module header).
    fn block_grad(&self, v: &[f32], g: &[f32], dv: &mut [f32]) {
        let (h, c) = (self.h, &self.coeffs);
        let kk = c.len() - 1;
        if kk == 0 {
            dv.fill(0.0);
            return;
        }
        let mut q = vec![0f32; h * h];
        skew(v, h, &mut q);
        // hs[k] = H_{k+1} for k = 0..K−1 (H_K = c_K I; H_k = c_k I + Q H_{k+1}).
        let mut hs = vec![vec![0f32; h * h]; kk];
        add_scaled_eye(&mut hs[kk - 1], h, c[kk]);
        for k in (0..kk - 1).rev() {
            let (lo, hi) = hs.split_at_mut(k + 1);
            mm(h, &mut lo[k], &q, &hi[0], false);
            add_scaled_eye(&mut lo[k], h, c[k + 1]);
        }
        let (mut dh, mut next, mut term) = (g.to_vec(), vec![0f32; h * h], vec![0f32; h * h]);
        let mut dq = vec![0f32; h * h];
        for k in 0..kk {
            mm(h, &mut term, &dh, &hs[k], true);
            dq.iter_mut().zip(&term).for_each(|(d, t)| *d += t);
            if k + 1 < kk {
                // Qᵀ dH = −Q dH (Q is skew).
                mm(h, &mut next, &q, &dh, false);
                next.iter_mut().for_each(|x| *x = -*x);
                std::mem::swap(&mut dh, &mut next);
            }
        }
        for ((r, c), d) in upper_entries(h).zip(dv.iter_mut()) {
            *d = dq[r * h + c] - dq[c * h + r];
        }
    }
}

impl CustomOp1 for Neumann {
    fn name(&self) -> &'static str {
        "cayley-neumann"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (nb, n) = l.shape().dims2()?;
        let v = crate::model::train_ops::slice(s, l)?;
        let h = self.h;
        let mut r = vec![0f32; nb * h * h];
        r.par_chunks_mut(h * h).zip(v.par_chunks(n)).for_each(|(out, vj)| self.block(vj, out));
        Ok((CpuStorage::F32(r), Shape::from((nb, h, h))))
    }

    fn bwd(&self, v: &Tensor, _r: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (nb, n) = v.dims2()?;
        let h = self.h;
        let mut dv = vec![0f32; nb * n];
        crate::model::train_ops::with_data(v, |vv| {
            crate::model::train_ops::with_data(g, |gv| {
                dv.par_chunks_mut(n).zip(vv.par_chunks(n)).zip(gv.par_chunks(h * h)).for_each(|((d, vj), gj)| self.block_grad(vj, gj, d));
                Ok(())
            })
        })?;
        Ok(Some(Tensor::from_vec(dv, (nb, n), v.device())?))
    }
}

/// `[nb, h(h−1)/2]` skew parameters → `[nb, h, h]` blocks of peft's `terms`-term Cayley–Neumann
/// series, where the op applies (f32 on the CPU fast path); None elsewhere (the caller composes).
pub fn try_cayley_neumann(v: &Tensor, h: usize, terms: usize) -> Result<Option<Tensor>> {
    if v.dtype() != DType::F32 || !crate::runtime::cpu_fast_path(v.device()) {
        return Ok(None);
    }
    let (_, n) = v.dims2()?;
    if h < 2 || n != h * (h - 1) / 2 {
        bail!("{n} rotation parameters per block do not make a {h}x{h} skew matrix (need {})", h * (h - 1) / 2);
    }
    Ok(Some(v.contiguous()?.apply_op1(Neumann { h, coeffs: coefficients(terms) })?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::orth;
    use crate::util::rng::Rng;
    use candle_core::{Device, Var};

    use crate::util::max_abs_diff as max_diff;

    /// Values and parameter gradients equal candle's autograd of the composed skew + series, for
    /// every series length peft's loop distinguishes and odd block sizes.
    #[test]
    fn matches_the_composed_series_and_its_gradient() {
        let dev = Device::Cpu;
        let mut rng = Rng::new(5);
        for (h, nb) in [(3, 1), (4, 5), (7, 3)] {
            let v = Var::from_tensor(&rng.normal_tensor(&[nb, h * (h - 1) / 2], 0.3, &dev).unwrap()).unwrap();
            let probe = rng.normal_tensor(&[nb, h, h], 1.0, &dev).unwrap();
            for terms in 1..=7 {
                let fused = try_cayley_neumann(v.as_tensor(), h, terms).unwrap().unwrap();
                let comp = orth::cayley_neumann(&orth::skew_from_upper(v.as_tensor(), h).unwrap(), terms).unwrap();
                assert!(max_diff(&fused, &comp) < 1e-5, "h {h} terms {terms}: forward {}", max_diff(&fused, &comp));
                if terms == 1 {
                    continue; // R = I: the composed series has no path back to v.
                }
                let gf = (&fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                let gc = (&comp * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                let (f, c) = (gf.get(v.as_tensor()).unwrap(), gc.get(v.as_tensor()).unwrap());
                let scale = c.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
                assert!(scale > 0.1, "h {h} terms {terms}: the gradient reaches the parameters");
                assert!(max_diff(f, &c) <= 1e-5 * scale.max(1.0), "h {h} terms {terms}: dv {}", max_diff(f, &c));
            }
        }
    }

    #[test]
    fn coefficients_follow_pefts_loop() {
        assert_eq!(coefficients(1), vec![1.0]);
        assert_eq!(coefficients(2), vec![1.0, 2.0]);
        assert_eq!(coefficients(3), coefficients(4));
        assert_eq!(coefficients(3), vec![1.0, 2.0, 2.0, 1.0]);
        assert_eq!(coefficients(5), vec![1.0, 2.0, 2.0, 2.0, 1.0]);
    }
}
