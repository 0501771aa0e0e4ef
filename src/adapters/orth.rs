//! Small orthogonal blocks for OFT and BOFT, built from differentiable candle ops only (candle has
//! no `linalg.solve`): skew-symmetric matrices from parameters, the Cayley transform (exact, via a
//! batched Gauss–Jordan inverse, or peft's truncated Neumann series), and `x ↦ x · blockdiag(R)`.
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};

/// `[b, n]` upper-triangle entries (row-major, diagonal excluded: torch's `triu_indices(h, h, 1)`
/// order, peft's layout) → `[b, h, h]` skew matrices `U − Uᵀ`. One gather, so the gradient flows
/// back to the entries through `index_select`.
pub fn skew_from_upper(v: &Tensor, h: usize) -> Result<Tensor> {
    let (b, n) = v.dims2()?;
    if n != h * (h - 1) / 2 {
        bail!("{n} rotation parameters per block do not make a {h}x{h} skew matrix (need {})", h * (h - 1) / 2);
    }
    // Slot 0 = 0, slots 1..=n = +v, n+1..=2n = −v.
    let table = Tensor::cat(&[&Tensor::zeros((b, 1), v.dtype(), v.device())?, v, &v.neg()?], 1)?;
    let mut idx = vec![0u32; h * h];
    for (k, (r, c)) in upper_entries(h).enumerate() {
        idx[r * h + c] = k as u32 + 1;
        idx[c * h + r] = (k + 1 + n) as u32;
    }
    let idx = Tensor::from_vec(idx, h * h, v.device())?;
    Ok(table.index_select(&idx, 1)?.reshape((b, h, h))?)
}

/// The (row, column) of each upper-triangle entry in parameter order: row-major, diagonal
/// excluded (torch's `triu_indices(h, h, 1)`, peft's layout of OFT/BOFT parameters).
pub fn upper_entries(h: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..h).flat_map(move |r| (r + 1..h).map(move |c| (r, c)))
}

fn eye(h: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(Tensor::eye(h, dtype, device)?.unsqueeze(0)?)
}

/// Batched inverse `[b, h, h]` by Gauss–Jordan without pivoting. Only used on `I + S` with `S`
/// skew (its symmetric part is `I`, so every pivot is ≥ 1 and elimination is stable) and on
/// near-orthogonal Cayley–Neumann blocks when unmerging.
pub fn inverse(m: &Tensor) -> Result<Tensor> {
    let (b, h, h2) = m.dims3()?;
    if h != h2 {
        bail!("inverse of a non-square [{h}x{h2}] block");
    }
    let mut a = Tensor::cat(&[m, &eye(h, m.dtype(), m.device())?.broadcast_as((b, h, h))?], 2)?;
    for k in 0..h {
        let row = a.narrow(1, k, 1)?; // [b, 1, 2h]
        let piv = row.broadcast_div(&row.narrow(2, k, 1)?)?;
        let mut onehot = vec![0f32; h];
        onehot[k] = 1.0;
        let e = Tensor::from_vec(onehot, (1, h, 1), m.device())?.to_dtype(m.dtype())?;
        // Row i ≠ k loses a[i,k]·piv; row k becomes piv (a[k,k]·piv − piv subtracted from it).
        let col = a.narrow(2, k, 1)?.broadcast_sub(&e)?; // [b, h, 1]
        a = (a - col.broadcast_mul(&piv)?)?;
    }
    Ok(a.narrow(2, h, h)?.contiguous()?)
}

/// Exact Cayley transform `(I − S)(I + S)⁻¹` (torch `solve(I+S, I−S, left=False)`): orthogonal.
pub fn cayley(s: &Tensor) -> Result<Tensor> {
    let h = s.dim(1)?;
    let i = eye(h, s.dtype(), s.device())?;
    let plus = s.broadcast_add(&i)?;
    let minus = s.neg()?.broadcast_add(&i)?;
    Ok(minus.matmul(&inverse(&plus)?)?)
}

/// peft's Cayley–Neumann series with `terms` terms: `I + 2Q + 2Q² + … + 2Q^{t−2} + Q^{t−1}`
/// (for t ≥ 3; peft's loop makes t = 3 and t = 4 the same series, reproduced here as written).
/// On the CPU, OFT computes it from the parameters as one op (`neumann::try_cayley_neumann`,
/// tested against this); this composed form serves the other devices.
pub fn cayley_neumann(q: &Tensor, terms: usize) -> Result<Tensor> {
    let h = q.dim(1)?;
    let mut r = eye(h, q.dtype(), q.device())?.broadcast_as(q.shape())?.contiguous()?;
    if terms > 1 {
        r = (r + (q * 2.0)?)?;
        if terms > 2 {
            let q2 = q.matmul(q)?;
            r = (r + (&q2 * 2.0)?)?;
            let mut pw = q2;
            for _ in 3..terms.saturating_sub(1) {
                pw = pw.matmul(q)?;
                r = (r + (&pw * 2.0)?)?;
            }
            pw = pw.matmul(q)?;
            r = (r + pw)?;
        }
    }
    Ok(r)
}

/// `x · blockdiag(r_0, …, r_{nb−1})` on the last dim of `x` (`[..., nb·h]`), `r` `[nb, h, h]`;
/// one block broadcast to all when `r` holds a single block (OFT's `block_share`).
pub fn rotate_blocks(x: &Tensor, r: &Tensor) -> Result<Tensor> {
    let (nb_r, h, _) = r.dims3()?;
    let dims = x.dims().to_vec();
    let width = *dims.last().unwrap_or(&0);
    if h == 0 || width % h != 0 {
        bail!("input width {width} is not a multiple of the block size {h}");
    }
    let nb = width / h;
    let rows = x.elem_count() / width.max(1);
    // In f32 whatever the model's dtype (as peft casts the input to the adapter's dtype): a bf16
    // rotation, applied at every adapted projection, drifts the logits by whole units.
    let dt = x.dtype();
    let (x, r) = (x.to_dtype(DType::F32)?, r.to_dtype(DType::F32)?);
    let y = if nb_r == 1 {
        x.reshape((rows * nb, h))?.matmul(&r.squeeze(0)?)?
    } else {
        if nb_r != nb {
            bail!("{nb_r} rotation blocks of size {h} do not cover an input of width {width}");
        }
        // [rows, nb, h] → [nb, rows, h] so one batched matmul applies every block.
        let xb = x.reshape((rows, nb, h))?.transpose(0, 1)?.contiguous()?;
        xb.matmul(&r)?.transpose(0, 1)?.contiguous()?
    };
    Ok(y.reshape(dims)?.to_dtype(dt)?)
}

/// The dense `[n, n]` matrix `M` with `x ↦ x · M` equal to `f` (merging input-side rotations).
pub fn dense_of(n: usize, device: &Device, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    f(&Tensor::eye(n, DType::F32, device)?)
}

/// Largest `|RᵀR − I|` over a batch of blocks (a diagnostic for Cayley–Neumann truncation).
pub fn orthogonality_error(r: &Tensor) -> Result<f32> {
    let h = r.dim(1)?;
    let g = r.transpose(1, 2)?.matmul(r)?.broadcast_sub(&eye(h, r.dtype(), r.device())?)?;
    Ok(g.abs()?.flatten_all()?.max(D::Minus1)?.to_dtype(DType::F32)?.to_scalar::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rnd(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = crate::util::rng::Rng::new(seed);
        rng.uniform_tensor(shape, 0.3, &Device::Cpu).unwrap()
    }

    #[test]
    fn skew_layout_matches_triu_order() {
        let v = Tensor::new(&[[1f32, 2., 3.]], &Device::Cpu).unwrap();
        let m = skew_from_upper(&v, 3).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(m, vec![vec![0., 1., 2.], vec![-1., 0., 3.], vec![-2., -3., 0.]]);
    }

    #[test]
    fn inverse_and_cayley_are_exact() {
        let s = skew_from_upper(&rnd(&[5, 6], 1), 4).unwrap();
        let q = cayley(&s).unwrap();
        assert!(orthogonality_error(&q).unwrap() < 1e-5);
        let m = (s.broadcast_add(&eye(4, DType::F32, &Device::Cpu).unwrap())).unwrap();
        let id = m.matmul(&inverse(&m).unwrap()).unwrap();
        assert!(orthogonality_error(&id).unwrap() < 1e-5, "M M⁻¹ must be I (and so orthogonal)");
    }

    #[test]
    fn neumann_series_approaches_cayley_of_2q() {
        // peft's series I + 2Q + 2Q² + … is the Neumann expansion of (I + Q)(I − Q)⁻¹ = cayley(−Q).
        let q = (skew_from_upper(&rnd(&[3, 10], 2), 5).unwrap() * 0.1).unwrap();
        let exact = cayley(&q.neg().unwrap()).unwrap();
        let approx = cayley_neumann(&q, 12).unwrap();
        let d = (exact - approx).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-5, "{d}");
    }

    #[test]
    fn rotate_blocks_is_blockdiag_matmul() {
        let r = cayley(&skew_from_upper(&rnd(&[2, 3], 3), 3).unwrap()).unwrap();
        let x = rnd(&[2, 4, 6], 4);
        let y = rotate_blocks(&x, &r).unwrap();
        let dense = dense_of(6, &Device::Cpu, |e| rotate_blocks(e, &r)).unwrap();
        let y2 = x.broadcast_matmul(&dense).unwrap();
        let d = (y - y2).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-6, "{d}");
        assert!(rotate_blocks(&rnd(&[2, 5], 5), &r).is_err(), "width 5 is not a multiple of 3");
    }
}
