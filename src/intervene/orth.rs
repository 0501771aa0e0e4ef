//! Orthonormal matrices: seeded random init and the QR (Gram–Schmidt) retraction that keeps DAS
//! rotations on the Stiefel manifold after each optimiser step.
use crate::util::rng::Rng;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};

/// Orthonormalise the rows of `m` (`r x d`, r <= d) in f64 with modified Gram–Schmidt (twice,
/// for stability). Returns row-major data.
pub fn orthonormal_rows(m: &[f64], r: usize, d: usize) -> Result<Vec<f64>> {
    if r > d {
        bail!("cannot have {r} orthonormal rows in dimension {d}");
    }
    let mut q = m.to_vec();
    for _pass in 0..2 {
        for i in 0..r {
            for j in 0..i {
                let dot: f64 = (0..d).map(|k| q[i * d + k] * q[j * d + k]).sum();
                for k in 0..d {
                    q[i * d + k] -= dot * q[j * d + k];
                }
            }
            let n: f64 = (0..d).map(|k| q[i * d + k].powi(2)).sum::<f64>().sqrt();
            if n < 1e-12 {
                bail!("rotation became rank-deficient");
            }
            for k in 0..d {
                q[i * d + k] /= n;
            }
        }
    }
    Ok(q)
}

/// A random `r x d` matrix with orthonormal rows.
pub fn random_orthonormal(r: usize, d: usize, seed: u64, device: &Device) -> Result<Tensor> {
    let mut rng = Rng::new(seed);
    let m: Vec<f64> = (0..r * d).map(|_| rng.normal()).collect();
    let q = orthonormal_rows(&m, r, d)?;
    Ok(Tensor::from_vec(q.into_iter().map(|x| x as f32).collect::<Vec<_>>(), (r, d), device)?)
}

/// Project a variable back onto orthonormal rows: on the CPU, the QR retraction (Gram–Schmidt
/// in f64, where the data already is); elsewhere the polar one on the device, since a QR on the
/// host would bring the matrix across every optimiser step.
pub fn retract(v: &Var) -> Result<()> {
    if crate::runtime::cpu_fast_path(v.device()) {
        retract_qr(v)
    } else {
        retract_polar(v)
    }
}

/// Newton–Schulz iterations towards the polar factor, `X ← 1.5 X − 0.5 (X Xᵀ) X`: device ops
/// only, no host round trip. Converges quadratically for singular values in (0, √3); rows are
/// first scaled to unit RMS norm, and an optimiser step leaves them near-orthonormal anyway.
pub fn retract_polar(v: &Var) -> Result<()> {
    const ITERS: usize = 6;
    let (r, _) = v.dims2()?;
    let x0 = v.as_tensor().to_dtype(DType::F32)?;
    let scale = (x0.sqr()?.sum_all()? / r as f64)?.sqrt()?;
    let mut x = x0.broadcast_div(&scale)?;
    for _ in 0..ITERS {
        let g = x.matmul(&x.t()?)?;
        x = ((&x * 1.5)? - (g.matmul(&x)? * 0.5)?)?;
    }
    v.set(&x.to_dtype(v.dtype())?)?;
    Ok(())
}

/// The QR retraction (modified Gram–Schmidt in f64, on the host).
pub fn retract_qr(v: &Var) -> Result<()> {
    let (r, d) = v.dims2()?;
    let m: Vec<f64> = v.as_tensor().to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let q = orthonormal_rows(&m, r, d)?;
    let t = Tensor::from_vec(q, (r, d), v.device())?.to_dtype(v.dtype())?;
    v.set(&t)?;
    Ok(())
}

/// max |R Rᵀ − I|, for checks and tests.
pub fn orthonormality_error(r: &Tensor) -> Result<f32> {
    let n = r.dim(0)?;
    let g = r.matmul(&r.t()?)?;
    let eye = Tensor::eye(n, r.dtype(), r.device())?;
    Ok((g - eye)?.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F32)?.to_scalar()?)
}

/// The Euclidean gradient `g` of a row-orthonormal `r` (`R Rᵀ = I`) projected onto the Stiefel
/// manifold's tangent space at `r`: `G − ½(G Rᵀ + R Gᵀ) R`.
///
/// Why: Adam normalises every coordinate's step to ≈ lr, so the radial part of the raw gradient
/// (which the retraction throws away) dominated each step of a unit vector in d = 576 and DAS
/// stalled on a plateau (METHODS.md §8: train IIA 0.50 vs 0.90). With only the tangent part
/// in Adam's moments the step moves along the manifold, as pyvene's orthogonal parametrisation
/// does.
pub fn tangent_projection(g: &Tensor, r: &Tensor) -> Result<Tensor> {
    let g = g.to_dtype(DType::F32)?;
    let r = r.to_dtype(DType::F32)?;
    let sym = ((g.matmul(&r.t()?)? + r.matmul(&g.t()?)?)? * 0.5)?;
    Ok((&g - sym.matmul(&r)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The projection lands in the tangent space (`Δ Rᵀ + R Δᵀ = 0`), is idempotent, and keeps a
    /// gradient that already is tangent.
    #[test]
    fn tangent_projection_is_the_stiefel_projection() {
        let dev = Device::Cpu;
        let r = random_orthonormal(3, 10, 1, &dev).unwrap();
        let mut rng = Rng::new(2);
        let g = Tensor::from_vec((0..30).map(|_| rng.normal() as f32).collect::<Vec<_>>(), (3, 10), &dev).unwrap();
        let p = tangent_projection(&g, &r).unwrap();
        let sym = (p.matmul(&r.t().unwrap()).unwrap() + r.matmul(&p.t().unwrap()).unwrap()).unwrap();
        let max = |t: &Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(max(&sym) < 1e-5, "not tangent: {}", max(&sym));
        let pp = tangent_projection(&p, &r).unwrap();
        assert!(max(&(&pp - &p).unwrap()) < 1e-5, "not idempotent");
        assert!(max(&(&g - &p).unwrap()) > 1e-2, "a generic gradient has a normal part");
    }
}
