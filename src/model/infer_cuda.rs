//! road's element-wise CUDA kernels for bf16/f16 inference (`src/kernels/infer.cu`): one pass
//! where candle composes several (the training kernels in `train_ops_cuda` are f32 and carry
//! backwards; these serve forwards without gradients only).
use candle_core::{Result, Tensor};

/// Contiguous and starting on a 16-byte boundary (8 bf16/f16 elements): the kernels' vector loads.
#[cfg(feature = "cuda")]
fn aligned(x: &Tensor) -> bool {
    x.is_contiguous() && x.layout().start_offset() % 8 == 0
}

/// `silu(g) · u` in one pass, for contiguous, 16-byte aligned bf16/f16 CUDA tensors of one shape
/// (None otherwise, or when generic ops are forced: the caller composes candle's ops).
#[allow(unused_variables)]
pub fn try_silu_mul(g: &Tensor, u: &Tensor) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::DType;
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

/// The residual add `s = a + b` and `rms_norm(s) · w` in one pass: `(s, normed)`, both shaped
/// like `a`, for contiguous, aligned bf16/f16 CUDA rows with `d % 8 == 0` (None otherwise or
/// when generic ops are forced).
#[allow(unused_variables)]
pub fn try_add_rms(a: &Tensor, b: &Tensor, w: &Tensor, eps: f32) -> Result<Option<(Tensor, Tensor)>> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::{DType, D};
        let d = a.dim(D::Minus1)?;
        if crate::runtime::cuda_fast_path(a.device())
            && a.dims() == b.dims()
            && w.dims() == [d]
            && d % 8 == 0
            && matches!(a.dtype(), DType::BF16 | DType::F16)
            && b.dtype() == a.dtype()
            && w.dtype() == a.dtype()
            && [a, b, w].into_iter().all(aligned)
        {
            let both = a.apply_op3_no_bwd(b, w, &imp::AddRms { eps })?;
            return Ok(Some((both.get(0)?, both.get(1)?)));
        }
    }
    Ok(None)
}

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits};
    use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
    use candle_core::{bail, CpuStorage, CudaDevice, CustomOp2, CustomOp3, Layout, Result, Shape};

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

    pub struct AddRms {
        pub eps: f32,
    }

    fn launch_add_rms<T: DeviceRepr + ValidAsZeroBits>(name: &str, dev: &CudaDevice, eps: f32, (a, al): (&CudaSlice<T>, &Layout), (b, bl): (&CudaSlice<T>, &Layout), (w, wl): (&CudaSlice<T>, &Layout)) -> Result<CudaSlice<T>> {
        let n = al.shape().elem_count();
        let d = *al.dims().last().expect("rows of d");
        let rows = n / d;
        let func = dev.get_or_load_custom_func(name, "infer_kernels", PTX)?;
        // SAFETY: the kernel writes both halves in full (every row's d sums and d outputs).
        let out = unsafe { dev.alloc::<T>(2 * n)? };
        let (av, bv, wv) = (a.slice(al.start_offset()..), b.slice(bl.start_offset()..), w.slice(wl.start_offset()..));
        let (rows32, d32) = (rows as i32, d as i32);
        let mut bld = func.builder();
        bld.arg(&av).arg(&bv).arg(&wv).arg(&out).arg(&rows32).arg(&d32).arg(&eps);
        let threads = (d / 8).clamp(32, 256).next_multiple_of(32) as u32;
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: (a, b, w, out, rows, d, eps) matches infer.cu's ADD_RMS; the caller checked
        // shapes, contiguity, d % 8 == 0 and alignment.
        unsafe { bld.launch(cfg) }.w()?;
        Ok(out)
    }

    impl CustomOp3 for AddRms {
        fn name(&self) -> &'static str {
            "add-rms-infer-cuda"
        }
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            bail!("add-rms-infer-cuda runs on CUDA devices only")
        }
        fn cuda_fwd(&self, a: &CudaStorage, al: &Layout, b: &CudaStorage, bl: &Layout, w: &CudaStorage, wl: &Layout) -> Result<(CudaStorage, Shape)> {
            let dev = a.device();
            let slice = match (&a.slice, &b.slice, &w.slice) {
                (CudaStorageSlice::BF16(x), CudaStorageSlice::BF16(y), CudaStorageSlice::BF16(z)) => {
                    CudaStorageSlice::BF16(launch_add_rms("infer_add_rms_bf16", dev, self.eps, (x, al), (y, bl), (z, wl))?)
                }
                (CudaStorageSlice::F16(x), CudaStorageSlice::F16(y), CudaStorageSlice::F16(z)) => {
                    CudaStorageSlice::F16(launch_add_rms("infer_add_rms_f16", dev, self.eps, (x, al), (y, bl), (z, wl))?)
                }
                _ => bail!("add-rms-infer-cuda: bf16 or f16 inputs of one dtype"),
            };
            let mut dims = vec![2];
            dims.extend_from_slice(al.dims());
            Ok((CudaStorage { slice, device: dev.clone() }, Shape::from(dims)))
        }
    }
}
