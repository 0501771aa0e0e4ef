//! RoAd's `z = f ⊙ h + s ⊙ rot(h)` as one fused CPU op with a hand-written backward.
//!
//! Composed from candle ops, each projection costs ~8 single-threaded element-wise passes forward
//! and more backward (reshape/narrow/cat of rotate-half); fused, it is one parallel pass each way.
//! Pairing: within each group of `g` dims, `j < g/2` pairs with `j + g/2`;
//! `rot(h)_j = −h_{j+g/2}` (first half), `+h_{j−g/2}` (second half).
use candle_core::{CpuStorage, CustomOp3, DType, InplaceOp3, Layout, Shape, Tensor};
#[cfg(test)]
use candle_core::Device;
use crate::model::train_ops::{add_into, with_data};
use rayon::prelude::*;

/// Below this many elements a pass runs on the calling thread: a decode step's `[8, 1, 1536]`
/// takes ~1 µs, less than handing it to rayon's pool (measured in `road bench batching`).
const PAR_MIN: usize = 1 << 15;

/// One row: `z = f ⊙ h + s ⊙ rot(h)`, written group by group over split halves so the inner
/// loops are zipped slices (no bounds checks, no per-element partner lookup) and vectorise.
/// `h = None` rotates `z` in place.
#[inline]
fn rotate_row(z: &mut [f32], h: Option<&[f32]>, f: &[f32], s: &[f32], g: usize) {
    let half = g / 2;
    for (gi, zc) in z.chunks_exact_mut(g).enumerate() {
        let o = gi * g;
        let (f1, f2) = f[o..o + g].split_at(half);
        let (s1, s2) = s[o..o + g].split_at(half);
        let (z1, z2) = zc.split_at_mut(half);
        match h {
            Some(h) => {
                let (h1, h2) = h[o..o + g].split_at(half);
                for i in 0..half {
                    let (a, b) = (h1[i], h2[i]);
                    z1[i] = f1[i] * a - s1[i] * b;
                    z2[i] = f2[i] * b + s2[i] * a;
                }
            }
            None => {
                for ((((a, b), (f1, f2)), s1), s2) in z1.iter_mut().zip(z2.iter_mut()).zip(f1.iter().zip(f2)).zip(s1).zip(s2) {
                    let (x, y) = (*a, *b);
                    *a = f1 * x - s1 * y;
                    *b = f2 * y + s2 * x;
                }
            }
        }
    }
}

/// `rotate_row` for RoAd1's pair-shared columns: `f`, `s` hold each group's first half only
/// (both members of a pair use the same value), so a row reads `d/2` of each. In place.
#[inline]
fn rotate_row_paired(z: &mut [f32], f: &[f32], s: &[f32], g: usize) {
    let half = g / 2;
    for ((zc, fc), sc) in z.chunks_exact_mut(g).zip(f.chunks_exact(half)).zip(s.chunks_exact(half)) {
        let (z1, z2) = zc.split_at_mut(half);
        for (((a, b), f), s) in z1.iter_mut().zip(z2.iter_mut()).zip(fc).zip(sc) {
            let (x, y) = (*a, *b);
            *a = f * x - s * y;
            *b = f * y + s * x;
        }
    }
}

/// Apply `rotate_row` to every `d`-wide row of `z` (row r uses column row `r / rpc`); with
/// `paired`, the columns are `d/2` wide (`rotate_row_paired`, in place: `h` must be None).
fn rotate_rows(z: &mut [f32], h: Option<&[f32]>, (f, s): (&[f32], &[f32]), d: usize, g: usize, rpc: usize, paired: bool) {
    let cw = if paired { d / 2 } else { d };
    let one = |r: usize, zr: &mut [f32]| {
        let c = (r / rpc) * cw;
        let (f, s) = (&f[c..c + cw], &s[c..c + cw]);
        match (paired, h) {
            (true, _) => rotate_row_paired(zr, f, s, g),
            (false, h) => rotate_row(zr, h.map(|h| &h[r * d..(r + 1) * d]), f, s, g),
        }
    };
    if z.len() < PAR_MIN {
        z.chunks_mut(d).enumerate().for_each(|(r, zr)| one(r, zr));
    } else {
        crate::model::gemm_tasks::par_row_chunks(z, d, |r0, zc| zc.chunks_mut(d).enumerate().for_each(|(r, zr)| one(r0 + r, zr)));
    }
}

struct RoadOp {
    g: usize,
    /// Consecutive rows of `h` (each `d` wide) that share one (f, s) row: all of them for `[d]`
    /// columns, `t` for per-batch-row `[b, 1, d]` columns (mixed-adapter batches).
    rows_per_col: usize,
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let (a, b) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("road-fused: non-contiguous input".into()))?;
    Ok(&s.as_slice::<f32>()?[a..b])
}

impl CustomOp3 for RoadOp {
    fn name(&self) -> &'static str {
        "road-fused"
    }

    fn cpu_fwd(
        &self,
        hs: &CpuStorage,
        hl: &Layout,
        fs: &CpuStorage,
        fl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (h, f, s) = (slice(hs, hl)?, slice(fs, fl)?, slice(ss, sl)?);
        let d = *hl.dims().last().unwrap_or(&0);
        let (g, rpc) = (self.g, self.rows_per_col.max(1));
        let mut z = vec![0f32; h.len()];
        rotate_rows(&mut z, Some(h), (f, s), d, g, rpc, false);
        Ok((CpuStorage::F32(z), hl.shape().clone()))
    }

    fn bwd(&self, h: &Tensor, f: &Tensor, s: &Tensor, _z: &Tensor, gz: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if f.rank() != 1 {
            candle_core::bail!("road-fused: per-row columns are inference-only (no backward)");
        }
        let d = f.elem_count();
        let half = self.g / 2;
        // Group by group (no per-element partner lookup), reading the saved input and incoming
        // gradient in place. With i < g/2 in a group and j = i + g/2 (z_i = f_i h_i − s_i h_j,
        // z_j = f_j h_j + s_j h_i): dh_i = g_i f_i + g_j s_j, dh_j = g_j f_j − g_i s_i;
        // df_k = Σ g_k h_k; ds_i = −Σ g_i h_j, ds_j = Σ g_j h_i.
        let rows = (PAR_MIN / d.max(1)).max(1);
        let mut dh = vec![0f32; h.elem_count()];
        let (df, ds) = with_data(h, |hv| {
            with_data(gz, |gv| {
                with_data(f, |fv| {
                    with_data(s, |sv| {
                        Ok(dh
                            .par_chunks_mut(rows * d)
                            .zip(hv.par_chunks(rows * d).zip(gv.par_chunks(rows * d)))
                            .map(|(dh, (hc, gc))| {
                                let (mut df, mut ds) = (vec![0f32; d], vec![0f32; d]);
                                for ((dr, hr), gr) in dh.chunks_mut(d).zip(hc.chunks(d)).zip(gc.chunks(d)) {
                                    for gb in (0..d).step_by(2 * half) {
                                        for i in gb..gb + half {
                                            let j = i + half;
                                            dr[i] = gr[i] * fv[i] + gr[j] * sv[j];
                                            dr[j] = gr[j] * fv[j] - gr[i] * sv[i];
                                            df[i] += gr[i] * hr[i];
                                            df[j] += gr[j] * hr[j];
                                            ds[i] -= gr[i] * hr[j];
                                            ds[j] += gr[j] * hr[i];
                                        }
                                    }
                                }
                                (df, ds)
                            })
                            // Partials per fixed chunk, summed in order: reproducible runs.
                            .collect::<Vec<_>>()
                            .into_iter()
                            .fold((Vec::new(), Vec::new()), |(a, b), (c, e)| (add_into(a, c), add_into(b, e))))
                    })
                })
            })
        })?;
        let dev = h.device();
        Ok((
            Some(Tensor::from_vec(dh, h.shape(), dev)?),
            Some(Tensor::from_vec(df, d, dev)?),
            Some(Tensor::from_vec(ds, d, dev)?),
        ))
    }
}

/// The per-batch-row forward, in place on `h` (inference: the projection output is a fresh
/// tensor nobody else holds, so overwriting it saves an allocation and a pass).
struct RoadInplace {
    g: usize,
    rows_per_col: usize,
    paired: bool,
}

impl InplaceOp3 for RoadInplace {
    fn name(&self) -> &'static str {
        "road-fused-inplace"
    }
    fn cpu_fwd(&self, hs: &mut CpuStorage, hl: &Layout, fs: &CpuStorage, fl: &Layout, ss: &CpuStorage, sl: &Layout) -> candle_core::Result<()> {
        let (f, s) = (slice(fs, fl)?, slice(ss, sl)?);
        let d = *hl.dims().last().unwrap_or(&0);
        let (a, b) = hl.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("road-fused: non-contiguous input".into()))?;
        let CpuStorage::F32(h) = hs else { candle_core::bail!("road-fused: f32 only") };
        rotate_rows(&mut h[a..b], None, (f, s), d, self.g, self.rows_per_col.max(1), self.paired);
        Ok(())
    }
}

/// Fused `f ⊙ h + s ⊙ rot(h)` with `f`, `s` of shape `[d]`: this CPU op for f32 (with its
/// backward), or on CUDA the inference kernel of `fused_cuda`; None when neither applies (the
/// caller then uses the composed, device-generic `Rotation::apply`).
pub fn try_fused(h: &Tensor, first: &Tensor, second: &Tensor, group_size: usize) -> candle_core::Result<Option<Tensor>> {
    if let Some(z) = super::fused_cuda::try_fused_cuda(h, first, second, group_size)? {
        return Ok(Some(z));
    }
    let ok = crate::runtime::cpu_fast_path(h.device())
        && h.dtype() == DType::F32
        && first.dtype() == DType::F32
        && second.dtype() == DType::F32
        && first.rank() == 1
        && second.rank() == 1
        && h.dims().last() == Some(&first.elem_count())
        && first.elem_count() % group_size == 0;
    if !ok {
        return Ok(None);
    }
    let rows = h.elem_count() / first.elem_count().max(1);
    Ok(Some(h.contiguous()?.apply_op3(&first.contiguous()?, &second.contiguous()?, RoadOp { g: group_size, rows_per_col: rows })?))
}

/// Fused apply with per-batch-row columns `[b, 1, d]` for `h` of shape `[b, t, d]` (inference:
/// mixed-adapter batches), overwriting `h`: the caller must own it (a projection output). With
/// `paired` the columns are RoAd1's halves `[b, 1, d/2]` (`rotate_row_paired`; CPU only). None
/// when it does not apply or `h` carries gradients.
pub fn try_fused_rows(h: &Tensor, first: &Tensor, second: &Tensor, group_size: usize, paired: bool) -> candle_core::Result<Option<Tensor>> {
    if !paired {
        if let Some(z) = super::fused_cuda::try_fused_cuda(h, first, second, group_size)? {
            return Ok(Some(z));
        }
    }
    let last = h.dims().last().copied().unwrap_or(0);
    let width = if paired { last / 2 } else { last };
    let ok = crate::runtime::cpu_fast_path(h.device())
        && !h.track_op()
        && h.dtype() == DType::F32
        && first.dtype() == DType::F32
        && second.dtype() == DType::F32
        && h.rank() == 3
        && first.rank() == 3
        && first.dims() == second.dims()
        && first.dim(0)? == h.dim(0)?
        && first.dim(1)? == 1
        && first.dim(2)? == width
        && h.dim(2)? % group_size == 0;
    if !ok {
        return Ok(None);
    }
    let t = h.dim(1)?;
    let h = h.contiguous()?;
    h.inplace_op3(&first.contiguous()?, &second.contiguous()?, &RoadInplace { g: group_size, rows_per_col: t, paired })?;
    Ok(Some(h))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::{Rotation, Variant};
    use crate::util::rng::Rng;
    use candle_core::Var;

    #[test]
    fn fused_matches_composed_forward_and_gradients() {
        let dev = Device::Cpu;
        let mut rng = Rng::new(3);
        for g in [2usize, 8] {
            let rot = Rotation::new(Variant::Road1, g, 16).unwrap();
            let h = Var::from_tensor(&rng.normal_tensor(&[2, 3, 16], 1.0, &dev).unwrap()).unwrap();
            let th = Var::from_tensor(&rng.normal_tensor(&[8], 0.5, &dev).unwrap()).unwrap();
            let al = Var::from_tensor(&(rng.normal_tensor(&[8], 0.2, &dev).unwrap() + 1.0).unwrap()).unwrap();
            let w = rng.normal_tensor(&[2, 3, 16], 1.0, &dev).unwrap();
            let (f, s) = rot.columns(th.as_tensor(), al.as_tensor()).unwrap();
            let a = rot.apply(h.as_tensor(), &f, &s).unwrap();
            let b = try_fused(h.as_tensor(), &f, &s, g).unwrap().unwrap();
            let diff = (&a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-6, "forward differs by {diff}");
            let ga = (a * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (b * &w).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&h, &th, &al] {
                let (x, y) = (ga.get(v).unwrap(), gb.get(v).unwrap());
                let d = (x - y).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
                assert!(d < 1e-5, "gradient differs by {d} (g={g})");
            }
        }
    }
}
