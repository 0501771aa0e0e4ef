//! AdamW's update and the gradient norm on CUDA as one launch per parameter tensor
//! (`src/kernels/optim.cu`). Composed from candle ops they were ~16 launches per tensor, a
//! quarter of an H200 RoAd step on SmolLM2 (420 tensors). Each function returns None (the caller
//! composes candle ops) off CUDA, for non-f32 or non-contiguous tensors, in builds without
//! `cuda`, or when generic ops are forced.
use candle_core::{Tensor, Var};

/// The AdamW hyper-parameters of one step; `c1`, `c2` are the bias corrections and `gscale` the
/// clip factor applied to the gradient first.
#[derive(Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub struct Step {
    pub lr: f32,
    pub b1: f32,
    pub b2: f32,
    pub c1: f32,
    pub c2: f32,
    pub eps: f32,
    pub wd: f32,
    pub gscale: f32,
}

/// Whether the in-place kernels may run on all of these tensors.
#[cfg(feature = "cuda")]
fn usable(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| crate::runtime::cuda_fast_path(t.device()) && t.dtype() == candle_core::DType::F32 && t.is_contiguous())
}

/// `Σ g²` over all gradients, per-block partials added on the host in f64 in order (one copy
/// back, no atomics: reproducible).
#[allow(unused_variables)]
pub fn sum_squares(grads: &[Tensor]) -> candle_core::Result<Option<f64>> {
    #[cfg(feature = "cuda")]
    if !grads.is_empty() && usable(&grads.iter().collect::<Vec<_>>()) {
        return imp::sum_squares(grads).map(Some);
    }
    Ok(None)
}

/// One AdamW update of `p` in place, its moments `m`, `v` too (each owned by the optimizer
/// alone: nothing else may share their storage). False when the kernel does not apply.
#[allow(unused_variables)]
pub fn adamw(p: &Var, m: &Tensor, v: &Tensor, g: &Tensor, step: Step) -> candle_core::Result<bool> {
    #[cfg(feature = "cuda")]
    if usable(&[p.as_tensor(), m, v, g]) && p.elem_count() == g.elem_count() {
        imp::adamw(p.as_tensor(), m, v, g, step)?;
        return Ok(true);
    }
    Ok(false)
}

#[cfg(feature = "cuda")]
mod imp {
    use super::Step;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorage, WrapErr};
    use candle_core::{bail, Result, Storage, Tensor};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/optim_kernels.ptx"));
    const BLOCK: u32 = 256;
    /// Blocks of the sum of squares per tensor (at most): enough to fill the GPU for the large
    /// ones, a handful of partials to copy back for the small ones.
    const MAX_BLOCKS: usize = 64;

    fn cuda(t: &Tensor) -> Result<(impl std::ops::Deref<Target = Storage> + '_, usize)> {
        let (st, l) = t.storage_and_layout();
        let Some((a, _)) = l.contiguous_offsets() else { bail!("optim kernel: non-contiguous tensor") };
        if !matches!(&*st, Storage::Cuda(_)) {
            bail!("optim kernel: tensor not on the CUDA device");
        }
        Ok((st, a))
    }

    fn storage(st: &Storage) -> &CudaStorage {
        match st {
            Storage::Cuda(c) => c,
            _ => unreachable!("checked in cuda()"),
        }
    }

    pub fn sum_squares(grads: &[Tensor]) -> Result<f64> {
        let blocks: Vec<usize> = grads.iter().map(|g| g.elem_count().div_ceil(BLOCK as usize).clamp(1, MAX_BLOCKS)).collect();
        let total: usize = blocks.iter().sum();
        let (st0, _) = cuda(&grads[0])?;
        let dev = storage(&st0).device.clone();
        drop(st0);
        let mut parts = dev.alloc_zeros::<f32>(total)?;
        let func = dev.get_or_load_custom_func("sumsq_f32", "optim_kernels", PTX)?;
        let mut at = 0;
        for (g, &nb) in grads.iter().zip(&blocks) {
            let (st, off) = cuda(g)?;
            let n = g.elem_count();
            if n > 0 {
                let src = storage(&st).as_cuda_slice::<f32>()?.slice(off..off + n);
                let mut dst = parts.slice_mut(at..at + nb);
                let n64 = n as u64;
                let mut b = func.builder();
                b.arg(&src).arg(&n64).arg(&mut dst);
                let cfg = LaunchConfig { grid_dim: (nb as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
                // SAFETY: argument types and order match optim.cu's sumsq_f32; it writes out[0..nb].
                unsafe { b.launch(cfg) }.w()?;
            }
            at += nb;
        }
        let host = dev.clone_dtoh(&parts)?;
        Ok(host.iter().map(|&x| x as f64).sum())
    }

    pub fn adamw(p: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor, s: Step) -> Result<()> {
        let n = p.elem_count();
        if n == 0 {
            return Ok(());
        }
        let ((sp, op), (sm, om), (sv, ov), (sg, og)) = (cuda(p)?, cuda(m)?, cuda(v)?, cuda(g)?);
        let (cp, cm, cv, cg) = (storage(&sp), storage(&sm), storage(&sv), storage(&sg));
        let dev = &cp.device;
        // The kernel writes p, m and v through these views: each is the sole owner of its
        // storage (a Var's, and the optimizer's moments), so nothing else observes the writes
        // except through those tensors.
        let pv = cp.as_cuda_slice::<f32>()?.slice(op..op + n);
        let mv = cm.as_cuda_slice::<f32>()?.slice(om..om + n);
        let vv = cv.as_cuda_slice::<f32>()?.slice(ov..ov + n);
        let gv = cg.as_cuda_slice::<f32>()?.slice(og..og + n);
        let func = dev.get_or_load_custom_func("adamw_f32", "optim_kernels", PTX)?;
        let n64 = n as u64;
        let mut b = func.builder();
        b.arg(&pv).arg(&mv).arg(&vv).arg(&gv).arg(&n64);
        b.arg(&s.lr).arg(&s.b1).arg(&s.b2).arg(&s.c1).arg(&s.c2).arg(&s.eps).arg(&s.wd).arg(&s.gscale);
        // SAFETY: argument types and order match optim.cu's adamw_f32.
        unsafe { b.launch(LaunchConfig::for_num_elems(n as u32)) }.w()?;
        Ok(())
    }
}
