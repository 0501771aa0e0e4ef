//! Inverted dropout on an adapter's input (LoRA and DoRA, as peft's `lora_dropout`): keep each
//! element with probability `1 − p` and scale it by `1 / (1 − p)`.
//!
//! Why an op of its own: as `x * mask` in candle's graph, the backward also computes the mask's
//! gradient (`grad · x`, a zero-filled store and an add), three passes over every adapted
//! input that nothing reads. On the CPU (f32) the mask is one custom op that keeps its bytes and
//! multiplies the incoming gradient by them (LoRA's training path folds it into
//! `model::low_rank` instead). On CUDA (f32) a kernel computes the same mask from the stream's
//! state on the device, forward and backward (a host-drawn mask was ~3 MB uploaded per
//! projection per step: most of a LoRA step on the H200); elsewhere it is the composed product.
use crate::model::low_rank::Mask;
use crate::util::rng::Rng;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// One uniform per element in row-major order, kept where `u < 1 − p`: the fused and the
/// composed paths draw the same mask from the same stream.
pub fn draw(n: usize, p: f32, rng: &mut Rng) -> Mask {
    let keep = 1.0 - p;
    let mut mask = vec![0u8; n];
    rng.fill_uniform(&mut mask, |u| ((u as f32) < keep) as u8);
    Mask { keep: mask, scale: 1.0 / keep }
}

struct Dropout(Mask);

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "adapter-dropout"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (a, b) = xl.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("dropout: non-contiguous input".into()))?;
        Ok((CpuStorage::F32(self.0.apply(&xs.as_slice::<f32>()?[a..b])), xl.shape().clone()))
    }

    /// The same mask and scale on the gradient: `dx = g ⊙ m / (1 − p)`.
    fn bwd(&self, x: &Tensor, _y: &Tensor, gy: &Tensor) -> Result<Option<Tensor>> {
        let dx = crate::model::train_ops::with_data(gy, |g| Ok(self.0.apply(g)))?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Dropout on a CUDA tensor from splitmix64's state `s0`: the mask never exists on the host.
#[derive(Clone, Copy)]
struct DeviceDropout {
    #[allow(dead_code)]
    s0: u64,
    #[allow(dead_code)]
    keep: f32,
}

impl CustomOp1 for DeviceDropout {
    fn name(&self) -> &'static str {
        "adapter-dropout-cuda"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("adapter-dropout-cuda runs on CUDA devices only")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, xs: &candle_core::CudaStorage, xl: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::model::train_ops_cuda::dropout(xs, xl, self.s0, self.keep, 1.0 / self.keep)
    }

    /// The same mask (same state) on the gradient.
    fn bwd(&self, _x: &Tensor, _y: &Tensor, gy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(gy.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

/// `x` with each element kept with probability `1 − p` (scaled by `1/(1 − p)`), drawn from `rng`.
pub fn dropout(x: &Tensor, p: f32, rng: &mut Rng) -> Result<Tensor> {
    if crate::runtime::cuda_fast_path(x.device()) && x.dtype() == DType::F32 {
        let s0 = rng.skip(x.elem_count());
        return x.contiguous()?.apply_op1(DeviceDropout { s0, keep: 1.0 - p });
    }
    let mask = draw(x.elem_count(), p, rng);
    if crate::runtime::cpu_fast_path(x.device()) && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1(Dropout(mask));
    }
    let m: Vec<f32> = mask.keep.iter().map(|k| if *k != 0 { mask.scale } else { 0.0 }).collect();
    x * Tensor::from_vec(m, x.dims(), x.device())?.to_dtype(x.dtype())?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The fused op equals the composed `x * mask` (same stream, same mask) forward and backward,
    /// and drops about `p` of the elements.
    #[test]
    fn fused_dropout_matches_the_composed_product() {
        let dev = Device::Cpu;
        let n = 3 * 7 * 1000;
        let x = Var::from_tensor(&Rng::new(5).normal_tensor(&[3, 7, 1000], 1.0, &dev).unwrap()).unwrap();
        let w = Rng::new(6).normal_tensor(&[3, 7, 1000], 1.0, &dev).unwrap();
        let fused = dropout(x.as_tensor(), 0.25, &mut Rng::new(9)).unwrap();
        let mut m = vec![0f32; n];
        Rng::new(9).fill_uniform(&mut m, |u| if (u as f32) < 0.75 { 1.0 / 0.75 } else { 0.0 });
        let composed = (x.as_tensor() * Tensor::from_vec(m.clone(), (3, 7, 1000), &dev).unwrap()).unwrap();
        let diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff(&fused, &composed), 0.0);
        let dropped = m.iter().filter(|v| **v == 0.0).count() as f64 / n as f64;
        assert!((dropped - 0.25).abs() < 0.02, "dropped fraction {dropped}");
        let gf = (&fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (&composed * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let (gf, gc) = (gf.get(x.as_tensor()).unwrap(), gc.get(x.as_tensor()).unwrap());
        assert_eq!(diff(gf, gc), 0.0);
        assert!(gf.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 1000.0, "gradient reaches x");
    }
}
