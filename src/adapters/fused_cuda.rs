//! The fused RoAd apply on CUDA devices (inference): one launch of `src/kernels/road.cu` instead
//! of the ~6 composed candle ops. Without the `cuda` feature this module offers nothing and
//! callers use the composed (device-generic) path.
use candle_core::Tensor;

/// `f ⊙ h + s ⊙ rot(h)` for contiguous-izable `h` `[.., d]` with columns `[d]` (all rows) or
/// `[b, 1, d]` (per batch row, `h` `[b, t, d]`); None when not on CUDA, when any input carries
/// gradients (the kernel has no backward) or when generic ops are forced.
#[allow(unused_variables)]
pub fn try_fused_cuda(h: &Tensor, first: &Tensor, second: &Tensor, group_size: usize) -> candle_core::Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        // Training (anything carrying a gradient) takes the composed ops, which have a backward.
        if !h.device().is_cuda() || h.track_op() || first.track_op() || second.track_op() || crate::runtime::generic_forced() {
            return Ok(None);
        }
        let d = *h.dims().last().unwrap_or(&0);
        if d == 0 || d % group_size != 0 || first.dims() != second.dims() || first.dtype() != h.dtype() || second.dtype() != h.dtype() {
            return Ok(None);
        }
        let rows = h.elem_count() / d;
        let rows_per_col = match first.dims() {
            [n] if *n == d => rows,
            [b, 1, n] if *n == d && h.rank() == 3 && h.dim(0)? == *b => h.dim(1)?,
            _ => return Ok(None),
        };
        let op = imp::RoadCuda { g: group_size, rows_per_col };
        return Ok(Some(h.contiguous()?.apply_op3_no_bwd(&first.contiguous()?, &second.contiguous()?, &op)?));
    }
    #[allow(unreachable_code)]
    Ok(None)
}

/// RoAd straight from its parameters on CUDA (f32): `z = f ⊙ h + s ⊙ rot(h)` with
/// `f = α cos θ`, `s = α sin θ` computed inside the kernel, differentiable in h, θ and α (one
/// launch forward, two backward). Composed, the columns alone were ~8 launches per adapted
/// projection forward and more backward: most of a RoAd step's launches. None off CUDA, for
/// other dtypes or shapes, or when generic ops are forced.
pub fn try_road_params(h: &Tensor, theta: &Tensor, alpha: &Tensor, rot: &super::Rotation) -> candle_core::Result<Option<Tensor>> {
    let d = *h.dims().last().unwrap_or(&0);
    let g = rot.group_size;
    let np = rot.variant.param_len(d);
    let ok = crate::runtime::cuda_fast_path(h.device())
        && [h, theta, alpha].iter().all(|t| t.dtype() == candle_core::DType::F32)
        && d == rot.dim
        && g >= 2
        && g % 2 == 0
        && d % g == 0
        && theta.dims() == [np]
        && alpha.dims() == [np];
    if !ok {
        return Ok(None);
    }
    let op = RoadParams { g, variant: variant_id(rot.variant), backward: false };
    Ok(Some(h.contiguous()?.apply_op3(&theta.contiguous()?, &alpha.contiguous()?, op)?))
}

fn variant_id(v: super::Variant) -> i32 {
    match v {
        super::Variant::Road1 => 1,
        super::Variant::Road2 => 2,
        super::Variant::Road4 => 4,
    }
}

/// The forward (inputs h, θ, α) or, with `backward`, its gradient kernels (inputs h, dL/dz,
/// `[θ; α]`; output `[dh; dθ; dα]`).
#[derive(Clone, Copy)]
#[allow(dead_code)]
struct RoadParams {
    g: usize,
    variant: i32,
    backward: bool,
}

impl candle_core::CustomOp3 for RoadParams {
    fn name(&self) -> &'static str {
        if self.backward {
            "road-params-bwd-cuda"
        } else {
            "road-params-cuda"
        }
    }

    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &candle_core::Layout, _: &candle_core::CpuStorage, _: &candle_core::Layout, _: &candle_core::CpuStorage, _: &candle_core::Layout) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("{} runs on CUDA devices only", self.name())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a: &candle_core::CudaStorage,
        al: &candle_core::Layout,
        b: &candle_core::CudaStorage,
        bl: &candle_core::Layout,
        c: &candle_core::CudaStorage,
        cl: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        if self.backward {
            imp::road_params_bwd(self.g, self.variant, a, al, b, bl, c, cl)
        } else {
            imp::road_params_fwd(self.g, self.variant, a, al, b, bl, c, cl)
        }
    }

    /// `(dh, dθ, dα)` from the two backward kernels (θ and α travel as one `[θ; α]` input).
    fn bwd(&self, h: &Tensor, theta: &Tensor, alpha: &Tensor, _z: &Tensor, gz: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, np) = (h.elem_count(), theta.elem_count());
        let ta = Tensor::cat(&[theta, alpha], 0)?;
        let out = h.apply_op3_no_bwd(&gz.contiguous()?, &ta, &RoadParams { backward: true, ..*self })?;
        Ok((Some(out.narrow(0, 0, n)?.reshape(h.shape())?), Some(out.narrow(0, n, np)?), Some(out.narrow(0, n + np, np)?)))
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
    use crate::model::train_ops_cuda::f32_view;
    use candle_core::{CpuStorage, CudaDevice, CustomOp3, Layout, Shape};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/road_kernels.ptx"));

    pub struct RoadCuda {
        pub g: usize,
        pub rows_per_col: usize,
    }

    fn slice<'a, T>(s: &'a CudaSlice<T>, l: &Layout) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
        let (a, b) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("road-cuda: non-contiguous input".into()))?;
        Ok(s.slice(a..b))
    }

    impl RoadCuda {
        #[allow(clippy::too_many_arguments)]
        fn run<T: DeviceRepr>(
            &self,
            name: &str,
            dev: &CudaDevice,
            h: &CudaSlice<T>,
            hl: &Layout,
            f: &CudaSlice<T>,
            fl: &Layout,
            s: &CudaSlice<T>,
            sl: &Layout,
        ) -> candle_core::Result<CudaSlice<T>> {
            let n = hl.shape().elem_count();
            let d = *hl.dims().last().unwrap_or(&1);
            let (h, f, s) = (slice(h, hl)?, slice(f, fl)?, slice(s, sl)?);
            let func = dev.get_or_load_custom_func(name, "road_kernels", PTX)?;
            // SAFETY: every element is written by the kernel below.
            let z = unsafe { dev.alloc::<T>(n)? };
            let mut b = func.builder();
            b.arg(&h);
            b.arg(&f);
            b.arg(&s);
            b.arg(&z);
            candle_core::builder_arg!(b, d as u32, self.g as u32, self.rows_per_col.max(1) as u32, n as u64);
            let cfg = LaunchConfig::for_num_elems(n as u32);
            // SAFETY: argument types and order match road.cu's road_rows_* signatures.
            unsafe { b.launch(cfg) }.w()?;
            Ok(z)
        }
    }

    /// road.cu's `road_param_fwd`.
    #[allow(clippy::too_many_arguments)]
    pub fn road_params_fwd(g: usize, variant: i32, h: &CudaStorage, hl: &Layout, t: &CudaStorage, tl: &Layout, a: &CudaStorage, al: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = h.device();
        let (hv, tv, av) = (f32_view(h, hl)?, f32_view(t, tl)?, f32_view(a, al)?);
        let n = hv.len();
        let d = *hl.dims().last().unwrap_or(&1);
        let func = dev.get_or_load_custom_func("road_param_fwd", "road_kernels", PTX)?;
        // SAFETY: the kernel writes every element.
        let z = unsafe { dev.alloc::<f32>(n)? };
        if n > 0 {
            let (d32, g32, n64) = (d as u32, g as u32, n as u64);
            let mut b = func.builder();
            b.arg(&hv).arg(&tv).arg(&av).arg(&z).arg(&d32).arg(&g32).arg(&variant).arg(&n64);
            // SAFETY: argument types and order match road.cu's road_param_fwd.
            unsafe { b.launch(LaunchConfig::for_num_elems(n as u32)) }.w()?;
        }
        Ok((CudaStorage { slice: CudaStorageSlice::F32(z), device: dev.clone() }, hl.shape().clone()))
    }

    /// road.cu's `road_param_bwd_cols` then `road_param_bwd_params`: out = [dh; dθ; dα].
    #[allow(clippy::too_many_arguments)]
    pub fn road_params_bwd(g: usize, variant: i32, h: &CudaStorage, hl: &Layout, gz: &CudaStorage, gl: &Layout, ta: &CudaStorage, tal: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = h.device();
        let (hv, gv, tav) = (f32_view(h, hl)?, f32_view(gz, gl)?, f32_view(ta, tal)?);
        let (n, np) = (hv.len(), tav.len() / 2);
        let d = *hl.dims().last().unwrap_or(&1);
        let rows = (n / d.max(1)) as u64;
        // SAFETY: the two kernels write every element of out (dh, then dθ and dα) and of dfds.
        let out = unsafe { dev.alloc::<f32>(n + 2 * np)? };
        let dfds = unsafe { dev.alloc::<f32>(2 * d)? };
        let (d32, g32, np32) = (d as u32, g as u32, np as u32);
        let cols = dev.get_or_load_custom_func("road_param_bwd_cols", "road_kernels", PTX)?;
        let mut b = cols.builder();
        b.arg(&hv).arg(&gv).arg(&tav).arg(&out).arg(&dfds).arg(&d32).arg(&g32).arg(&variant).arg(&np32).arg(&rows);
        let cfg = LaunchConfig { grid_dim: (d.div_ceil(32) as u32, 1, 1), block_dim: (32, 16, 1), shared_mem_bytes: 0 };
        // SAFETY: argument types and order match road.cu's road_param_bwd_cols.
        unsafe { b.launch(cfg) }.w()?;
        let params = dev.get_or_load_custom_func("road_param_bwd_params", "road_kernels", PTX)?;
        let mut b = params.builder();
        b.arg(&tav).arg(&dfds).arg(&out).arg(&d32).arg(&g32).arg(&variant).arg(&np32).arg(&rows);
        // SAFETY: argument types and order match road.cu's road_param_bwd_params.
        unsafe { b.launch(LaunchConfig::for_num_elems(np as u32)) }.w()?;
        Ok((CudaStorage { slice: CudaStorageSlice::F32(out), device: dev.clone() }, Shape::from(n + 2 * np)))
    }

    impl CustomOp3 for RoadCuda {
        fn name(&self) -> &'static str {
            "road-fused-cuda"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("road-fused-cuda runs on CUDA devices only")
        }

        fn cuda_fwd(&self, h: &CudaStorage, hl: &Layout, f: &CudaStorage, fl: &Layout, s: &CudaStorage, sl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
            let dev = h.device();
            let slice = match (&h.slice, &f.slice, &s.slice) {
                (CudaStorageSlice::F32(h), CudaStorageSlice::F32(f), CudaStorageSlice::F32(s)) => {
                    CudaStorageSlice::F32(self.run("road_rows_f32", dev, h, hl, f, fl, s, sl)?)
                }
                (CudaStorageSlice::BF16(h), CudaStorageSlice::BF16(f), CudaStorageSlice::BF16(s)) => {
                    CudaStorageSlice::BF16(self.run("road_rows_bf16", dev, h, hl, f, fl, s, sl)?)
                }
                (CudaStorageSlice::F16(h), CudaStorageSlice::F16(f), CudaStorageSlice::F16(s)) => {
                    CudaStorageSlice::F16(self.run("road_rows_f16", dev, h, hl, f, fl, s, sl)?)
                }
                _ => candle_core::bail!("road-fused-cuda: f32, bf16 or f16 with matching dtypes"),
            };
            Ok((CudaStorage { slice, device: dev.clone() }, hl.shape().clone()))
        }
    }
}
