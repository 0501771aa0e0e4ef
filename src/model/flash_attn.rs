//! Fused ("flash") attention for inference on CUDA (`src/kernels/attn.cu`): scores, causal and
//! sliding-window masks, softmax and the value matmul in one launch per layer, so the
//! `[b, heads, t, s]` scores and probabilities never reach memory (composed, they were a third
//! of a 7B-shape 4×512 prefill on the H200: mask add, softmax, q scaling and the layout copies
//! around them). Queries, keys and values are read through their strides, so the projections'
//! `[b, t, heads, hd]` layout needs no transpose copies, and the output comes back as
//! `[b, t, heads·hd]`, the output projection's input.
//!
//! Returns None (the caller composes candle ops, the reference semantics) off CUDA, for f32
//! (the kernel's tensor cores take bf16/f16), head sizes other than 64 and 128, rows that are
//! not contiguous or 16-byte aligned, when generic ops are forced or with `ROAD_FLASH_ATTN=0`.
//! Padding masks are the caller's to exclude: this kernel sees causal order and the window only.
use candle_core::{Result, Tensor};

/// `softmax(scale · q kᵀ + mask) v` for `q` `[b, nh, t, hd]` and `k`, `v` `[b, nkv, s, hd]`
/// (any strides with contiguous rows; `s ≥ t`, query `i` at position `s − t + i`, GQA when
/// `nkv < nh`), causal, with `window`: keys fewer than `window` positions behind. Output
/// `[b, t, nh·hd]`.
#[allow(unused_variables)]
pub fn try_flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, window: Option<usize>, scale: f64) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if usable(q, k, v, window) {
        let op = imp::Flash { window: window.unwrap_or(0) as i32, scale: scale as f32 };
        return Ok(Some(q.apply_op3_no_bwd(k, v, &op)?));
    }
    Ok(None)
}

/// Whether the kernel can serve a model of this dtype and head size on `device` in this run
/// (CUDA build and device, bf16/f16, head size 64 or 128, generic ops not forced, not
/// `ROAD_FLASH_ATTN=0`): the caller checks it before preparing the kernel's layout, so a run
/// without the kernel does none of that work. Per-call shape and stride checks stay inside.
#[allow(unused_variables)]
pub fn available(device: &candle_core::Device, dtype: candle_core::DType, head_dim: usize) -> bool {
    #[cfg(feature = "cuda")]
    {
        use candle_core::DType;
        crate::runtime::cuda_fast_path(device) && matches!(dtype, DType::BF16 | DType::F16) && (head_dim == 64 || head_dim == 128) && enabled()
    }
    #[cfg(not(feature = "cuda"))]
    false
}

#[cfg(feature = "cuda")]
fn usable(q: &Tensor, k: &Tensor, v: &Tensor, window: Option<usize>) -> bool {
    let dims_ok = match (q.dims4(), k.dims4(), v.dims4()) {
        (Ok((b, nh, t, hd)), Ok(kd), Ok(vd)) => {
            let (_, nkv, s, _) = kd;
            kd == vd && kd.0 == b && kd.3 == hd && nkv > 0 && nh % nkv == 0 && s >= t && t > 0
        }
        _ => false,
    };
    // cp.async moves 16-byte chunks: rows contiguous, and every row start 8-element aligned.
    let rows = [q, k, v].iter().all(|x| {
        let st = x.stride();
        st.last() == Some(&1) && st[..3].iter().all(|s| s % 8 == 0) && x.layout().start_offset() % 8 == 0
    });
    let small = [q, k, v].iter().all(|x| x.elem_count() < i32::MAX as usize) && window.unwrap_or(0) < i32::MAX as usize;
    dims_ok
        && rows
        && small
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype()
        && available(q.device(), q.dtype(), q.dim(3).unwrap_or(0))
}

/// `ROAD_FLASH_ATTN=0` turns the kernel off for a run (the composed ops then answer), so its
/// speed and its numbers can be compared with the reference path on one machine in one session.
#[cfg(feature = "cuda")]
fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("ROAD_FLASH_ATTN").is_none_or(|v| v != "0"))
}

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
    use candle_core::{bail, CpuStorage, CudaDevice, CustomOp3, Layout, Result, Shape};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attn_kernels.ptx"));
    /// Query rows per block (attn.cu's BM).
    const ROWS: usize = 64;

    pub struct Flash {
        pub window: i32,
        pub scale: f32,
    }

    /// attn.cu's `Strides`: q's batch/head/row strides, then k's, then v's.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Strides([i64; 9]);
    // SAFETY: plain old data with the kernel's layout (nine 64-bit integers).
    unsafe impl DeviceRepr for Strides {}

    impl Flash {
        #[allow(clippy::too_many_arguments)]
        fn launch<T: DeviceRepr + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits>(
            &self,
            suffix: &str,
            dev: &CudaDevice,
            (q, ql): (&CudaSlice<T>, &Layout),
            (k, kl): (&CudaSlice<T>, &Layout),
            (v, vl): (&CudaSlice<T>, &Layout),
        ) -> Result<(CudaSlice<T>, Shape)> {
            let (b, nh, t, hd) = ql.shape().dims4()?;
            let (_, nkv, s, _) = kl.shape().dims4()?;
            let st = |l: &Layout| [l.stride()[0] as i64, l.stride()[1] as i64, l.stride()[2] as i64];
            let (sq, sk, sv) = (st(ql), st(kl), st(vl));
            let strides = Strides([sq[0], sq[1], sq[2], sk[0], sk[1], sk[2], sv[0], sv[1], sv[2]]);
            let func = dev.get_or_load_custom_func(&format!("flash_attn_{suffix}_{hd}"), "attn_kernels", PTX)?;
            // SAFETY: the kernel writes every element of every row < t.
            let out = unsafe { dev.alloc::<T>(b * t * nh * hd)? };
            let (qv, kv, vv) = (q.slice(ql.start_offset()..), k.slice(kl.start_offset()..), v.slice(vl.start_offset()..));
            let (nh32, nkv32, t32, s32) = (nh as i32, nkv as i32, t as i32, s as i32);
            let scale_log2 = self.scale * std::f32::consts::LOG2_E;
            let mut bld = func.builder();
            bld.arg(&qv).arg(&kv).arg(&vv).arg(&out);
            bld.arg(&nh32).arg(&nkv32).arg(&t32).arg(&s32).arg(&self.window).arg(&scale_log2).arg(&strides);
            let cfg = LaunchConfig { grid_dim: (t.div_ceil(ROWS) as u32, nh as u32, b as u32), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: argument types and order match attn.cu's FLASH signature; `usable` checked
            // shapes, head size and contiguous rows.
            unsafe { bld.launch(cfg) }.w()?;
            Ok((out, Shape::from((b, t, nh * hd))))
        }
    }

    impl CustomOp3 for Flash {
        fn name(&self) -> &'static str {
            "flash-attention-cuda"
        }
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            bail!("flash attention runs on CUDA devices only")
        }
        fn cuda_fwd(&self, q: &CudaStorage, ql: &Layout, k: &CudaStorage, kl: &Layout, v: &CudaStorage, vl: &Layout) -> Result<(CudaStorage, Shape)> {
            let dev = q.device();
            let (slice, shape) = match (&q.slice, &k.slice, &v.slice) {
                (CudaStorageSlice::BF16(q), CudaStorageSlice::BF16(k), CudaStorageSlice::BF16(v)) => {
                    let (o, s) = self.launch("bf16", dev, (q, ql), (k, kl), (v, vl))?;
                    (CudaStorageSlice::BF16(o), s)
                }
                (CudaStorageSlice::F16(q), CudaStorageSlice::F16(k), CudaStorageSlice::F16(v)) => {
                    let (o, s) = self.launch("f16", dev, (q, ql), (k, kl), (v, vl))?;
                    (CudaStorageSlice::F16(o), s)
                }
                _ => bail!("flash attention: bf16 or f16 q, k, v of one dtype"),
            };
            Ok((CudaStorage { slice, device: dev.clone() }, shape))
        }
    }
}
