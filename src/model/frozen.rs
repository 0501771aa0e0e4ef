//! `x @ Wᵀ` for a *frozen* weight in differentiable mode. candle's matmul backward always computes
//! the weight gradient too (an extra matmul per projection, thrown away when W is not trained);
//! this op's backward returns only `dL/dx = g @ W`, roughly halving backward cost for RoAd/LoRA.
//! Both directions run the packed AVX-512 GEMM where it applies (the backward against W's packed
//! transpose).
use super::packed_gemm::{PackSlot, PackedWeight};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

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
            Some(PackedWeight::F32(p)) if p.dims() == (out_d, in_d) => p.matmul(xs, rows),
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

/// `x @ Wᵀ` with a gradient for `x` only, when it applies (f32 on CPU, W not a trained `Var`).
/// Elsewhere (CUDA, or generic ops forced) the caller uses candle's matmul, whose backward also
/// computes the unused weight gradient: correct, just more work.
pub fn try_frozen_linear(x: &Tensor, w: &Tensor, pack: &PackSlot) -> candle_core::Result<Option<Tensor>> {
    if w.is_variable() || !crate::runtime::cpu_fast_path(x.device()) || x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        return Ok(None);
    }
    // Only worth it when x carries a gradient; otherwise a plain matmul tracks nothing anyway.
    if !x.track_op() {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op1(FrozenLinear { w: w.clone(), packed: pack.get(w), packed_t: pack.get_transposed(w) })?))
}
