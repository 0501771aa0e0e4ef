//! The forward's per-op helpers (`impl Llama`): activations, residual adds (with the next
//! RMSNorm fused on CUDA), projections through the packed/frozen GEMMs, and RMSNorm — each
//! choosing between road's fused kernels and candle's ops by device, dtype and whether a
//! backward is needed.
use super::{Lin, Llama};
use crate::model::config::Act;
use crate::model::packed_gemm::PackSlot;
use anyhow::Result;
use candle_core::{Tensor, TensorId};

impl Llama {
    /// The MLP's gate activation.
    pub(super) fn act(&self, g: &Tensor) -> Result<Tensor> {
        Ok(match self.cfg.arch.act {
            Act::Silu => candle_nn::ops::silu(g)?,
            // candle's `gelu` is the tanh approximation (`gelu_pytorch_tanh`), with a backward.
            Act::GeluTanh => g.gelu()?,
        })
    }

    /// The MLP's `act(gate) · up`: one fused pass on the CPU (SiLU families; in training with its
    /// own backward).
    pub(super) fn act_mul(&self, g: &Tensor, u: &Tensor, differentiable: bool) -> Result<Tensor> {
        if self.cfg.arch.act == Act::Silu {
            let fused = match differentiable {
                true => crate::model::train_ops::try_silu_mul(g, u)?,
                false => match crate::model::cpu_ops::silu_mul(g, u)? {
                    Some(m) => Some(m),
                    None => crate::model::infer_cuda::try_silu_mul(g, u)?,
                },
            };
            if let Some(m) = fused {
                return Ok(m);
            }
        }
        Ok((self.act(g)? * u)?)
    }

    /// `a + b`, and with `norm` the sum's RMSNorm too where one fused pass computes both (CUDA
    /// bf16/f16 inference), tagged with the sum's id for [`Self::normed`].
    pub(super) fn add_then_norm(&self, a: &Tensor, b: &Tensor, norm: Option<&Tensor>, differentiable: bool) -> Result<(Tensor, Option<(TensorId, Tensor)>)> {
        if let (false, Some(w)) = (differentiable, norm) {
            if let Some((s, n)) = crate::model::infer_cuda::try_add_rms(a, b, w, self.cfg.rms_norm_eps as f32)? {
                let id = s.id();
                return Ok((s, Some((id, n))));
            }
        }
        Ok((self.add(a, b, differentiable)?, None))
    }

    /// `rms(x, w)`, or the precomputed norm when it is of this very tensor.
    pub(super) fn normed(&self, x: &Tensor, w: &Tensor, pre: Option<(TensorId, Tensor)>, differentiable: bool) -> Result<Tensor> {
        match pre {
            Some((id, n)) if id == x.id() => Ok(n),
            _ => self.rms(x, w, differentiable),
        }
    }

    /// A residual add: one AVX-512 pass on the CPU in inference (candle's bf16 add is slow).
    pub(super) fn add(&self, a: &Tensor, b: &Tensor, differentiable: bool) -> Result<Tensor> {
        if !differentiable {
            if let Some(s) = crate::model::cpu_ops::add(a, b)? {
                return Ok(s);
            }
        }
        Ok((a + b)?)
    }

    /// A projection with its bias, if any.
    pub(super) fn lin(&self, l: &Lin, x: &Tensor, differentiable: bool) -> Result<Tensor> {
        let y = self.linear(&l.w, &l.pack, x, differentiable)?;
        match &l.b {
            Some(b) => Ok(y.broadcast_add(b)?),
            None => Ok(y),
        }
    }

    /// `x @ lm_headᵀ`: the logits before any soft-capping.
    pub(super) fn head(&self, x: &Tensor, differentiable: bool) -> Result<Tensor> {
        self.linear(&self.lm_head, &self.lm_head_pack, x, differentiable)
    }

    /// `x @ wᵀ`. Inference on the CPU: the packed GEMM against w's copy in `pack` (AVX-512 at
    /// every row count; AVX2 up to `Packed::serves`' rows: decode and short prompts). Differentiable with a
    /// frozen w: an op whose backward skips the weight gradient. Elsewhere candle's matmul.
    pub(super) fn linear(&self, w: &Tensor, pack: &PackSlot, x: &Tensor, differentiable: bool) -> Result<Tensor> {
        if !differentiable {
            if let Some(p) = pack.get(w) {
                if let Some(y) = crate::model::packed_gemm::try_linear(x, &p)? {
                    return Ok(y);
                }
            }
        } else if let Some(y) = crate::model::frozen::try_frozen_linear(x, w, pack)? {
            return Ok(y);
        }
        // One GEMM over all rows: a `[b, t, in]` batch as `[b·t, in]`. broadcast_matmul would
        // run b small GEMMs against a stride-0 weight, which on CUDA is a strided-batched call
        // far from peak for short sequences.
        let dims = x.dims();
        let in_d = *dims.last().expect("rank >= 1");
        let rows = x.elem_count() / in_d.max(1);
        let y = x.reshape((rows, in_d))?.matmul(&w.t()?)?;
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("rank >= 1") = w.dim(0)?;
        Ok(y.reshape(shape)?)
    }

    pub(super) fn rms(&self, x: &Tensor, w: &Tensor, differentiable: bool) -> Result<Tensor> {
        let eps = self.cfg.rms_norm_eps as f32;
        if differentiable {
            if let Some(y) = crate::model::train_ops::try_rms_norm(x, w, eps)? {
                return Ok(y);
            }
            return Ok(candle_nn::ops::rms_norm_slow(x, w, eps)?);
        }
        // candle's fused norm runs bf16 per element through half's conversions (5% of a bf16
        // prefill); this one computes in f32 (for f32 as fast as candle's).
        if let Some(y) = crate::model::cpu_ops::rms_norm(x, w, eps)? {
            return Ok(y);
        }
        Ok(candle_nn::ops::rms_norm(x, w, eps)?)
    }
}
