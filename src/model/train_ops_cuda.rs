//! `train_ops` on CUDA devices: the forwards as one launch each (`src/kernels/train.cu`), the
//! backwards from the tail's one-launch kernels (`llama::tail_cuda`). Composed from candle's
//! primitives these ops were ~2,700 launches of a SmolLM2 RoAd step's forward and more than
//! twice that backward; an H200 step is bound by launches, not by arithmetic.
//!
//! The backward helpers are plain tensor code (they exist in every build and are only reached
//! for CUDA tensors); the forwards exist with the `cuda` feature.
use candle_core::{bail, Result, Tensor, D};

/// `(dx, dw)` of RMSNorm `y = x r w` (`r = 1/√(mean(x²) + eps)` per row); `dw` only when `w`
/// is trained (full fine-tuning), composed (it is not on the adapters' hot path).
pub(super) fn rms_bwd(x: &Tensor, w: &Tensor, gy: &Tensor, eps: f32) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let gy = gy.contiguous()?;
    let Some(dx) = super::llama::tail_cuda::rms_bwd(x, w, &gy, eps as f64)? else { bail!("train-ops: no CUDA RMSNorm backward for {:?}", x.device()) };
    let dw = if w.track_op() {
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps as f64)?.sqrt()?.recip()?;
        let d = w.elem_count();
        Some((gy * x.broadcast_mul(&r)?)?.reshape(((), d))?.sum(0)?)
    } else {
        None
    };
    Ok((Some(dx), dw))
}

/// `(dg, du)` of `silu(g) · u` given the output's gradient `gm`.
pub(super) fn silu_mul_bwd(g: &Tensor, u: &Tensor, gm: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let Some((dg, du)) = super::llama::tail_cuda::swiglu_bwd(&gm.contiguous()?, g, u)? else { bail!("train-ops: no CUDA SiLU-gate backward for {:?}", g.device()) };
    Ok((Some(dg), Some(du)))
}

/// `dx = scale · p ⊙ (gp − ⟨gp, p⟩)` of the scaled, masked softmax.
pub(super) fn masked_softmax_bwd(p: &Tensor, gp: &Tensor, scale: f32) -> Result<Option<Tensor>> {
    let Some(ds) = super::llama::tail_cuda::softmax_bwd(p, &gp.contiguous()?)? else { bail!("train-ops: no CUDA softmax backward for {:?}", p.device()) };
    Ok(Some((ds * scale as f64)?))
}

#[cfg(feature = "cuda")]
pub(crate) use imp::*;

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchArgs, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorage, WrapErr};
    use candle_core::{bail, CudaDevice, Layout, Result, Shape, Storage, Tensor};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/train_kernels.ptx"));

    /// The f32 elements of a contiguous CUDA storage.
    pub(crate) fn f32_view<'a>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, f32>> {
        let Some((a, b)) = l.contiguous_offsets() else { bail!("cuda kernel: non-contiguous input") };
        Ok(s.as_cuda_slice::<f32>()?.slice(a..b))
    }

    fn per_row(rows: usize, width: usize) -> LaunchConfig {
        LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (crate::model::llama::tail_cuda::imp::row_block(width), 1, 1), shared_mem_bytes: 0 }
    }

    /// Runs `f` on the CUDA storage of `t` (a constant of the op: RoPE tables, the mask).
    fn with_cuda<R>(t: &Tensor, f: impl FnOnce(&CudaStorage, &Layout) -> Result<R>) -> Result<R> {
        let (st, l) = t.storage_and_layout();
        let Storage::Cuda(c) = &*st else { bail!("train-ops: tensor not on the CUDA device") };
        f(c, l)
    }

    /// An output of `n` f32s. SAFETY (for the callers): every kernel of train.cu writes each
    /// element of its output.
    fn out(dev: &CudaDevice, n: usize) -> Result<CudaSlice<f32>> {
        unsafe { dev.alloc::<f32>(n) }
    }

    /// Launches the kernel whose arguments `b` holds, unless there is nothing to compute.
    fn go(mut b: LaunchArgs<'_>, cfg: LaunchConfig, n: usize) -> Result<()> {
        if n > 0 {
            // SAFETY: each caller pushed its kernel's arguments in the order of its signature.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(())
    }

    pub(crate) fn rms_fwd(xs: &CudaStorage, xl: &Layout, ws: &CudaStorage, wl: &Layout, eps: f32) -> Result<(CudaStorage, Shape)> {
        let dev = xs.device();
        let (x, w) = (f32_view(xs, xl)?, f32_view(ws, wl)?);
        let (n, d) = (x.len(), w.len());
        let (y, d32, f) = (out(dev, n)?, d as u32, dev.get_or_load_custom_func("train_rms_fwd", "train_kernels", PTX)?);
        let mut b = f.builder();
        b.arg(&x).arg(&w).arg(&y).arg(&d32).arg(&eps);
        go(b, per_row(n / d.max(1), d), n)?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), xl.shape().clone()))
    }

    pub(crate) fn silu_mul_fwd(gs: &CudaStorage, gl: &Layout, us: &CudaStorage, ul: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = gs.device();
        let (g, u) = (f32_view(gs, gl)?, f32_view(us, ul)?);
        let n = g.len();
        let (m, n64, f) = (out(dev, n)?, n as u64, dev.get_or_load_custom_func("train_silu_mul", "train_kernels", PTX)?);
        let mut b = f.builder();
        b.arg(&g).arg(&u).arg(&m).arg(&n64);
        go(b, LaunchConfig::for_num_elems(n as u32), n)?;
        Ok((CudaStorage::wrap_cuda_slice(m, dev.clone()), gl.shape().clone()))
    }

    /// RoPE of `x` `[b, heads, t, hd]` by `cos`/`sin` `[b, t, hd/2]` (`sign` −1: the inverse).
    pub(crate) fn rope(xs: &CudaStorage, xl: &Layout, cos: &Tensor, sin: &Tensor, heads: usize, sign: f32) -> Result<(CudaStorage, Shape)> {
        let dev = xs.device();
        let x = f32_view(xs, xl)?;
        let (bt, t, half) = cos.dims3()?;
        let pairs = x.len() / 2;
        let (b32, h32, t32, half32, p64) = (bt as u32, heads as u32, t as u32, half as u32, pairs as u64);
        let (y, f) = (out(dev, x.len())?, dev.get_or_load_custom_func("train_rope", "train_kernels", PTX)?);
        with_cuda(cos, |cs, cl| {
            with_cuda(sin, |ss, sl| {
                let (c, s) = (f32_view(cs, cl)?, f32_view(ss, sl)?);
                let mut b = f.builder();
                b.arg(&x).arg(&c).arg(&s).arg(&y).arg(&b32).arg(&h32).arg(&t32).arg(&half32).arg(&sign).arg(&p64);
                go(b, LaunchConfig::for_num_elems(pairs as u32), pairs)
            })
        })?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), xl.shape().clone()))
    }

    /// Inverted dropout of `x` with splitmix64's uniforms from state `s0` (`Rng::skip`).
    pub(crate) fn dropout(xs: &CudaStorage, xl: &Layout, s0: u64, keep: f32, scale: f32) -> Result<(CudaStorage, Shape)> {
        let dev = xs.device();
        let x = f32_view(xs, xl)?;
        let n = x.len();
        let (y, n64, f) = (out(dev, n)?, n as u64, dev.get_or_load_custom_func("train_dropout", "train_kernels", PTX)?);
        let mut b = f.builder();
        b.arg(&x).arg(&y).arg(&s0).arg(&n64).arg(&keep).arg(&scale);
        go(b, LaunchConfig::for_num_elems(n as u32), n)?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), xl.shape().clone()))
    }

    /// `softmax(scale · x + mask)` over the last dim of `[b, heads, t, n]`, mask `[b, 1, t, n]`.
    pub(crate) fn masked_softmax(xs: &CudaStorage, xl: &Layout, mask: Option<&Tensor>, heads: usize, scale: f32) -> Result<(CudaStorage, Shape)> {
        let dev = xs.device();
        let x = f32_view(xs, xl)?;
        let dims = xl.dims();
        let (t, n) = (dims[2], dims[3]);
        let (h32, t32, n32, has) = (heads as u32, t as u32, n as u32, mask.is_some() as i32);
        let (p, f) = (out(dev, x.len())?, dev.get_or_load_custom_func("train_masked_softmax", "train_kernels", PTX)?);
        let cfg = per_row(x.len() / n.max(1), n);
        let run = |m: &CudaView<'_, f32>| {
            let mut b = f.builder();
            b.arg(&x).arg(m).arg(&p).arg(&h32).arg(&t32).arg(&n32).arg(&scale).arg(&has);
            go(b, cfg, x.len())
        };
        match mask {
            Some(m) => with_cuda(m, |ms, ml| run(&f32_view(ms, ml)?))?,
            // The kernel never reads the mask then; any valid pointer will do.
            None => run(&x)?,
        }
        Ok((CudaStorage::wrap_cuda_slice(p, dev.clone()), xl.shape().clone()))
    }
}
