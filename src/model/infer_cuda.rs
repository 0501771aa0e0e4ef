//! road's element-wise CUDA kernels for bf16/f16 inference (`src/kernels/infer.cu`): one pass
//! where candle composes several (the training kernels in `train_ops_cuda` are f32 and carry
//! backwards; these serve forwards without gradients only).
use candle_core::{Result, Tensor};

/// `silu(g) · u` in one pass, for contiguous, 16-byte aligned bf16/f16 CUDA tensors of one shape
/// (None otherwise, or when generic ops are forced: the caller composes candle's ops).
#[allow(unused_variables)]
pub fn try_silu_mul(g: &Tensor, u: &Tensor) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::DType;
        let aligned = |x: &Tensor| x.is_contiguous() && x.layout().start_offset() % 8 == 0;
        if crate::runtime::cuda_fast_path(g.device())
            && g.dims() == u.dims()
            && matches!(g.dtype(), DType::BF16 | DType::F16)
            && u.dtype() == g.dtype()
            && aligned(g)
            && aligned(u)
        {
            return Ok(Some(g.apply_op2_no_bwd(u, &imp::SiluMul)?));
        }
    }
    Ok(None)
}

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits};
    use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
    use candle_core::{bail, CpuStorage, CudaDevice, CustomOp2, Layout, Result, Shape};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/infer_kernels.ptx"));

    pub struct SiluMul;

    fn launch<T: DeviceRepr + ValidAsZeroBits>(name: &str, dev: &CudaDevice, g: &CudaSlice<T>, gl: &Layout, u: &CudaSlice<T>, ul: &Layout) -> Result<CudaSlice<T>> {
        let n = gl.shape().elem_count();
        let func = dev.get_or_load_custom_func(name, "infer_kernels", PTX)?;
        // SAFETY: the kernel writes all n elements.
        let out = unsafe { dev.alloc::<T>(n)? };
        let (gv, uv) = (g.slice(gl.start_offset()..), u.slice(ul.start_offset()..));
        let n64 = n as u64;
        let mut b = func.builder();
        b.arg(&gv).arg(&uv).arg(&out).arg(&n64);
        let cfg = LaunchConfig { grid_dim: (n.div_ceil(8 * 256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: (g, u, m, n) matches infer.cu's signature; the caller checked contiguity and
        // 16-byte alignment (offsets multiple of 8 elements).
        unsafe { b.launch(cfg) }.w()?;
        Ok(out)
    }

    impl CustomOp2 for SiluMul {
        fn name(&self) -> &'static str {
            "silu-mul-infer-cuda"
        }
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            bail!("silu-mul-infer-cuda runs on CUDA devices only")
        }
        fn cuda_fwd(&self, g: &CudaStorage, gl: &Layout, u: &CudaStorage, ul: &Layout) -> Result<(CudaStorage, Shape)> {
            let dev = g.device();
            let slice = match (&g.slice, &u.slice) {
                (CudaStorageSlice::BF16(a), CudaStorageSlice::BF16(b)) => CudaStorageSlice::BF16(launch("infer_silu_mul_bf16", dev, a, gl, b, ul)?),
                (CudaStorageSlice::F16(a), CudaStorageSlice::F16(b)) => CudaStorageSlice::F16(launch("infer_silu_mul_f16", dev, a, gl, b, ul)?),
                _ => bail!("silu-mul-infer-cuda: bf16 or f16 inputs of one dtype"),
            };
            Ok((CudaStorage { slice, device: dev.clone() }, gl.shape().clone()))
        }
    }
}
