//! `x @ Wᵀ` for a *frozen* weight in differentiable mode. candle's matmul backward always computes
//! the weight gradient too (an extra matmul per projection, thrown away when W is not trained);
//! this op's backward returns only `dL/dx = g @ W`, roughly halving backward cost for RoAd/LoRA.
//! Both directions run the packed AVX-512 GEMM where it applies (the backward against W's packed
//! transpose). On other devices (CUDA) a second op does the same with the backend's GEMM.
use super::packed_gemm::{PackSlot, PackedWeight};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Shape, Tensor};

struct FrozenLinear {
    w: Tensor, // [out, in], f32, CPU
    packed: Option<std::sync::Arc<PackedWeight>>,
    /// Wᵀ packed, for the backward.
    packed_t: Option<std::sync::Arc<PackedWeight>>,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("frozen-linear: input must be contiguous".into()))?;
        let xs = &storage.as_slice::<f32>()?[start..end];
        let dims = layout.dims();
        let in_d = *dims.last().unwrap_or(&0);
        let (out_d, w_in) = self.w.dims2()?;
        if w_in != in_d {
            candle_core::bail!("frozen-linear: input width {in_d} vs weight [{out_d}, {w_in}]");
        }
        let rows = xs.len() / in_d.max(1);
        // The packed AVX-512 GEMM where it applies, on the input in place.
        let y = match self.packed.as_deref() {
            Some(PackedWeight::F32(p)) if p.dims() == (out_d, in_d) && p.serves(rows) => p.matmul(xs, rows),
            _ => Tensor::from_slice(xs, (rows, in_d), &Device::Cpu)?.matmul(&self.w.t()?)?.flatten_all()?.to_vec1::<f32>()?,
        };
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("rank >= 1") = out_d;
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if let Some(pt) = &self.packed_t {
            let fast = super::packed_gemm::try_linear(grad, pt).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
            if let Some(dx) = fast {
                return Ok(Some(dx));
            }
        }
        Ok(Some(grad.broadcast_matmul(&self.w)?))
    }
}

/// The same op on any device (CUDA here): the backend's own GEMM forward, `dL/dx = g @ W`
/// backward and no gradient for W. candle's matmul backward would add, per frozen projection, a
/// weight-sized GEMM plus a zeroed buffer and an add (kernels and device memory, never read).
struct FrozenLinearAnyDevice;

impl FrozenLinearAnyDevice {
    fn fwd<S: BackendStorage>(x: &S, lx: &Layout, w: &S, lw: &Layout) -> candle_core::Result<(S, Shape)> {
        let dims = lx.dims();
        let in_d = *dims.last().unwrap_or(&0);
        let (out_d, w_in) = lw.shape().dims2()?;
        if w_in != in_d {
            candle_core::bail!("frozen-linear: input width {in_d} vs weight [{out_d}, {w_in}]");
        }
        let (start, _) = lx.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("frozen-linear: input must be contiguous".into()))?;
        let rows = lx.shape().elem_count() / in_d.max(1);
        // All rows as one GEMM against Wᵀ (a transposed view of W: no copy).
        let y = x.matmul(w, (1, rows, out_d, in_d), &Layout::contiguous_with_offset((rows, in_d), start), &lw.transpose(0, 1)?)?;
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("rank >= 1") = out_d;
        Ok((y, Shape::from(shape)))
    }
}

impl CustomOp2 for FrozenLinearAnyDevice {
    fn name(&self) -> &'static str {
        "frozen-linear-any-device"
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout, w: &CpuStorage, lw: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Self::fwd(x, lx, w, lw)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        w: &candle_core::CudaStorage,
        lw: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Self::fwd(x, lx, w, lw)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let out_d = w.dim(0)?;
        let rows = grad.elem_count() / out_d.max(1);
        let dx = grad.contiguous()?.reshape((rows, out_d))?.matmul(w)?.reshape(x.shape())?;
        Ok((Some(dx), None))
    }
}

/// `x @ Wᵀ` with a gradient for `x` only, when it applies (W not a trained `Var`, x carrying a
/// gradient, generic ops not forced): on the CPU (f32) the packed-GEMM op above, on other
/// devices the backend-GEMM op. Otherwise the caller uses candle's matmul, whose backward also
/// computes the unused weight gradient: correct, just more work.
pub fn try_frozen_linear(x: &Tensor, w: &Tensor, pack: &PackSlot) -> candle_core::Result<Option<Tensor>> {
    // Only worth it when x carries a gradient; otherwise a plain matmul tracks nothing anyway.
    if w.is_variable() || !x.track_op() || x.dtype() != w.dtype() || crate::runtime::generic_forced() {
        return Ok(None);
    }
    if crate::runtime::cpu_fast_path(x.device()) {
        if x.dtype() != DType::F32 {
            return Ok(None);
        }
        return Ok(Some(x.contiguous()?.apply_op1(FrozenLinear { w: w.clone(), packed: pack.get(w), packed_t: pack.get_transposed(w) })?));
    }
    // Here the device is not the CPU: with generic ops not forced, the CPU took the branch above.
    if !x.dtype().is_float() {
        return Ok(None);
    }
    Ok(Some(frozen_linear_any_device(x, w)?))
}

/// The any-device op itself (also on the CPU, where tests check it against candle's matmul).
fn frozen_linear_any_device(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, FrozenLinearAnyDevice)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// The any-device op against candle's matmul: same values, same input gradient, and no
    /// gradient entry for the frozen weight (candle's matmul makes one).
    #[test]
    fn any_device_op_matches_matmul_and_skips_the_weight_gradient() {
        let dev = Device::Cpu;
        let mut rng = crate::util::rng::Rng::new(7);
        let x = Var::from_tensor(&rng.normal_tensor(&[2, 5, 12], 1.0, &dev).unwrap()).unwrap();
        let w = rng.normal_tensor(&[7, 12], 0.5, &dev).unwrap();
        let c = rng.normal_tensor(&[2, 5, 7], 1.0, &dev).unwrap();
        let ours = frozen_linear_any_device(x.as_tensor(), &w).unwrap();
        let wt = w.t().unwrap();
        let theirs = x.as_tensor().broadcast_matmul(&wt).unwrap();
        let diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(ours.dims(), &[2, 5, 7]);
        assert!(diff(&ours, &theirs) < 1e-5);
        let g_ours = (&ours * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let g_theirs = (&theirs * &c).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(diff(g_ours.get(x.as_tensor()).unwrap(), g_theirs.get(x.as_tensor()).unwrap()) < 1e-5);
        assert!(g_theirs.get(&wt).is_some(), "candle's matmul makes a weight gradient");
        assert!(g_ours.get(&w).is_none(), "the frozen op must not");
    }
}
