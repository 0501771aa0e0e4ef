//! Learned soft mask in the neuron basis: `m = σ(w / T)`, `out = (1−m)⊙b + m⊙s`, penalty λ·mean(m).
use super::{Annealed, ApplyCtx, Intervention, Param};
use anyhow::Result;
use candle_core::{Device, Tensor, Var};

pub struct SigmoidMask {
    w: Var,
    temp: Annealed,
    lambda: f64,
}

impl SigmoidMask {
    pub fn new(d: usize, temp: [f64; 2], lambda: f64, device: &Device) -> Result<Self> {
        // Start half-open (w = 0 -> m = 0.5) so gradients flow to every coordinate.
        Ok(Self { w: Var::from_tensor(&Tensor::zeros(d, candle_core::DType::F32, device)?)?, temp: Annealed::new(temp, device)?, lambda })
    }
    fn mask(&self, ctx: ApplyCtx) -> Result<Tensor> {
        Ok(candle_nn::ops::sigmoid(&self.temp.divide(self.w.as_tensor(), ctx)?)?)
    }
}

impl Intervention for SigmoidMask {
    fn kind(&self) -> &'static str {
        "sigmoid_mask"
    }
    fn apply(&self, base: &Tensor, source: &Tensor, ctx: ApplyCtx) -> Result<Tensor> {
        let m = self.mask(ctx)?;
        Ok((base.broadcast_mul(&(1.0 - &m)?)? + source.broadcast_mul(&m)?)?)
    }
    fn params(&self) -> Vec<Param> {
        vec![Param::new("mask_logits", &self.w, "main")]
    }
    fn replayable(&self) -> bool {
        true
    }
    fn write_step_inputs(&self, ctx: ApplyCtx) -> Result<()> {
        self.temp.write(ctx)
    }
    fn penalty(&self) -> Result<Option<Tensor>> {
        let m = candle_nn::ops::sigmoid(self.w.as_tensor())?;
        Ok(Some((m.mean_all()? * self.lambda)?))
    }
    fn stats(&self, ctx: ApplyCtx) -> Vec<(String, f64)> {
        let n = self
            .mask(ctx)
            .and_then(|m| Ok(m.ge(0.5f32)?.to_dtype(candle_core::DType::F32)?.sum_all()?.to_scalar::<f32>()?))
            .unwrap_or(f32::NAN);
        vec![("subspace_dims".into(), n as f64), ("temperature".into(), self.temp.at(ctx))]
    }
}
