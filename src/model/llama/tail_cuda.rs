//! One-launch CUDA versions of the tail's backward pieces (`src/kernels/tail.cu`). Each returns
//! None off CUDA, for non-contiguous or mixed-dtype inputs, or when generic ops are forced; the
//! caller then composes candle ops (same math, tests/tail_grad.rs checks those on the CPU).
use candle_core::Tensor;

/// `dL/dx` of RMSNorm (`x`, `dy`: `[.., d]`; `w`: `[d]`).
#[allow(unused_variables)]
pub fn rms_bwd(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> candle_core::Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if usable(&[x, w, dy]) && x.dims() == dy.dims() {
        return Ok(Some(x.apply_op3_no_bwd(w, dy, &imp::Tail { kind: imp::Kind::Rms { eps: eps as f32 } })?));
    }
    Ok(None)
}

/// `dL/ds` of a last-dim softmax from its output `p` and `dL/dp`.
#[allow(unused_variables)]
pub fn softmax_bwd(p: &Tensor, dp: &Tensor) -> candle_core::Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if usable(&[p, dp]) && p.dims() == dp.dims() {
        return Ok(Some(p.apply_op2_no_bwd(dp, &imp::Tail { kind: imp::Kind::Softmax })?));
    }
    Ok(None)
}

/// `(dL/dgate, dL/dup)` of `silu(gate) · up` given `dL/dm`.
#[allow(unused_variables)]
pub fn swiglu_bwd(dm: &Tensor, gate: &Tensor, up: &Tensor) -> candle_core::Result<Option<(Tensor, Tensor)>> {
    #[cfg(feature = "cuda")]
    if usable(&[dm, gate, up]) && dm.dims() == gate.dims() && dm.dims() == up.dims() {
        let both = dm.apply_op3_no_bwd(gate, up, &imp::Tail { kind: imp::Kind::SwiGlu })?;
        return Ok(Some((both.get(0)?, both.get(1)?)));
    }
    Ok(None)
}

#[cfg(feature = "cuda")]
fn usable(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.device().is_cuda() && t.is_contiguous() && t.dtype() == ts[0].dtype()) && !crate::runtime::generic_forced()
}

#[cfg(feature = "cuda")]
pub(crate) mod imp {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
    use candle_core::{CpuStorage, CudaDevice, CustomOp2, CustomOp3, Layout, Shape};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/tail_kernels.ptx"));

    #[derive(Clone, Copy)]
    pub enum Kind {
        Rms { eps: f32 },
        Softmax,
        SwiGlu,
    }

    pub struct Tail {
        pub kind: Kind,
    }

    fn view<'a, T>(s: &'a CudaSlice<T>, l: &Layout) -> candle_core::Result<CudaView<'a, T>> {
        let (a, b) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("tail kernel: non-contiguous input".into()))?;
        Ok(s.slice(a..b))
    }

    /// Threads per row block: a multiple of 32, enough for short rows, at most 256.
    pub(crate) fn row_block(n: usize) -> u32 {
        (n.div_ceil(32) * 32).clamp(32, 256) as u32
    }

    impl Tail {
        fn launch<T: DeviceRepr>(&self, suffix: &str, dev: &CudaDevice, ins: &[(&CudaSlice<T>, &Layout)]) -> candle_core::Result<CudaSlice<T>> {
            let l0 = ins[0].1;
            let n = l0.shape().elem_count();
            let last = *l0.dims().last().unwrap_or(&1);
            let views = ins.iter().map(|(s, l)| view(s, l)).collect::<candle_core::Result<Vec<_>>>()?;
            let (name, out_len) = match self.kind {
                Kind::Rms { .. } => ("rms_bwd", n),
                Kind::Softmax => ("softmax_bwd", n),
                Kind::SwiGlu => ("swiglu_bwd", 2 * n),
            };
            let func = dev.get_or_load_custom_func(&format!("{name}_{suffix}"), "tail_kernels", PTX)?;
            // SAFETY: every element is written by the kernel below.
            let out = unsafe { dev.alloc::<T>(out_len)? };
            let mut b = func.builder();
            for v in &views {
                b.arg(v);
            }
            b.arg(&out);
            let rows = (n / last.max(1)) as u32;
            // Scalar arguments live until the launch.
            let (d32, n64) = (last as u32, n as u64);
            let eps = match self.kind {
                Kind::Rms { eps } => eps,
                _ => 0.0,
            };
            let per_row = LaunchConfig { grid_dim: (rows, 1, 1), block_dim: (row_block(last), 1, 1), shared_mem_bytes: 0 };
            let cfg = match self.kind {
                Kind::Rms { .. } => {
                    b.arg(&d32);
                    b.arg(&eps);
                    per_row
                }
                Kind::Softmax => {
                    b.arg(&d32);
                    per_row
                }
                Kind::SwiGlu => {
                    b.arg(&n64);
                    LaunchConfig::for_num_elems(n as u32)
                }
            };
            // SAFETY: argument types and order match tail.cu's signatures.
            unsafe { b.launch(cfg) }.w()?;
            Ok(out)
        }

        fn shape(&self, l: &Layout) -> Shape {
            match self.kind {
                Kind::SwiGlu => {
                    let mut d = vec![2];
                    d.extend_from_slice(l.dims());
                    Shape::from(d)
                }
                _ => l.shape().clone(),
            }
        }
    }

    macro_rules! dispatch {
        ($self:ident, $dev:ident, [$(($s:ident, $l:ident)),+]) => {{
            let slice = match ($(&$s.slice),+) {
                ($(CudaStorageSlice::F32($s)),+) => CudaStorageSlice::F32($self.launch("f32", $dev, &[$(($s, $l)),+])?),
                ($(CudaStorageSlice::BF16($s)),+) => CudaStorageSlice::BF16($self.launch("bf16", $dev, &[$(($s, $l)),+])?),
                ($(CudaStorageSlice::F16($s)),+) => CudaStorageSlice::F16($self.launch("f16", $dev, &[$(($s, $l)),+])?),
                _ => candle_core::bail!("tail kernel: f32, bf16 or f16 with matching dtypes"),
            };
            slice
        }};
    }

    impl CustomOp2 for Tail {
        fn name(&self) -> &'static str {
            "tail-bwd-cuda"
        }
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("tail kernels run on CUDA devices only")
        }
        fn cuda_fwd(&self, a: &CudaStorage, al: &Layout, b: &CudaStorage, bl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
            let dev = a.device();
            let slice = dispatch!(self, dev, [(a, al), (b, bl)]);
            Ok((CudaStorage { slice, device: dev.clone() }, self.shape(al)))
        }
    }

    impl CustomOp3 for Tail {
        fn name(&self) -> &'static str {
            "tail-bwd-cuda"
        }
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("tail kernels run on CUDA devices only")
        }
        fn cuda_fwd(&self, a: &CudaStorage, al: &Layout, b: &CudaStorage, bl: &Layout, c: &CudaStorage, cl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
            let dev = a.device();
            let slice = dispatch!(self, dev, [(a, al), (b, bl), (c, cl)]);
            Ok((CudaStorage { slice, device: dev.clone() }, self.shape(al)))
        }
    }
}
