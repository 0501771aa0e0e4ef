//! The disentanglement heads of the pilot study: a 2-layer classifier on a frozen representation
//! whose first layer sees the whole vector, only its magnitude, or only its direction
//! (METHODS.md §3): `z_i = W_iᵀx`, `‖W_i‖·‖x‖`, or `cos(W_i, x)`; then tanh and a linear output.
use crate::train::optim::{AdamW, AdamWConfig};
use crate::util::rng::Rng;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var, D};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadKind {
    Standard,
    Magnitude,
    Angle,
}

impl HeadKind {
    pub const ALL: [HeadKind; 3] = [HeadKind::Standard, HeadKind::Magnitude, HeadKind::Angle];
    pub fn name(self) -> &'static str {
        match self {
            HeadKind::Standard => "standard",
            HeadKind::Magnitude => "magnitude_only",
            HeadKind::Angle => "angle_only",
        }
    }
}

pub struct ProbeHead {
    pub kind: HeadKind,
    /// First layer, one row per hidden unit: `[h, d]` (row i is the paper's column `W_{:,i}`).
    pub w: Var,
    /// Output layer `[k, h]` and bias `[k]`.
    pub o: Var,
    pub c: Var,
}

fn row_norms(x: &Tensor) -> Result<Tensor> {
    // Floor avoids 0/0 for an all-zero vector (its direction is then 0, not NaN).
    Ok(x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12f32, f32::MAX)?)
}

impl ProbeHead {
    pub fn new(kind: HeadKind, d: usize, h: usize, k: usize, rng: &mut Rng, device: &Device) -> Result<Self> {
        Ok(Self {
            kind,
            w: Var::from_tensor(&rng.normal_tensor(&[h, d], (1.0 / d as f64).sqrt() as f32, device)?)?,
            o: Var::from_tensor(&rng.normal_tensor(&[k, h], (1.0 / h as f64).sqrt() as f32, device)?)?,
            c: Var::from_tensor(&Tensor::zeros(k, DType::F32, device)?)?,
        })
    }

    /// The first layer's pre-activations `z` `[n, h]` for inputs `[n, d]`.
    pub fn first_layer(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.w.as_tensor();
        Ok(match self.kind {
            HeadKind::Standard => x.matmul(&w.t()?)?,
            // Outer product ‖x‖ ⊗ ‖W_i‖: the input's direction cannot reach the output.
            HeadKind::Magnitude => row_norms(x)?.matmul(&row_norms(w)?.t()?)?,
            // Cosines: the input's scale cancels.
            HeadKind::Angle => x.broadcast_div(&row_norms(x)?)?.matmul(&w.broadcast_div(&row_norms(w)?)?.t()?)?,
        })
    }

    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.first_layer(x)?.tanh()?.matmul(&self.o.as_tensor().t()?)?.broadcast_add(self.c.as_tensor())?)
    }

    fn vars(&self) -> Vec<(String, Var)> {
        vec![("w".into(), self.w.clone()), ("o".into(), self.o.clone()), ("c".into(), self.c.clone())]
    }
}

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeadTrain {
    /// Hidden width of the first layer (0 = the representation's width d, as in the paper).
    pub hidden: usize,
    pub steps: usize,
    pub lr: f64,
    pub batch: usize,
    pub weight_decay: f64,
}

impl Default for HeadTrain {
    fn default() -> Self {
        Self { hidden: 0, steps: 400, lr: 3e-3, batch: 64, weight_decay: 0.0 }
    }
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct HeadFit {
    pub train_accuracy: f64,
    pub eval_accuracy: f64,
    pub final_loss: f64,
}

fn accuracy(logits: &Tensor, y: &[u32]) -> Result<f64> {
    let p = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    Ok(p.iter().zip(y).filter(|(a, b)| a == b).count() as f64 / y.len().max(1) as f64)
}

/// Train one head with AdamW on minibatches of the frozen features `train_x` `[n, d]`, then report
/// accuracy on the training and evaluation features. Deterministic given `seed`.
pub fn fit_head(kind: HeadKind, train_x: &Tensor, train_y: &[u32], eval_x: &Tensor, eval_y: &[u32], n_classes: usize, cfg: &HeadTrain, seed: u64) -> Result<HeadFit> {
    let (n, d) = train_x.dims2()?;
    if n != train_y.len() || eval_x.dim(0)? != eval_y.len() {
        bail!("head features and labels disagree in length");
    }
    if n == 0 {
        bail!("no training features for the head");
    }
    let device = train_x.device();
    let mut rng = Rng::new(seed);
    let head = ProbeHead::new(kind, d, if cfg.hidden == 0 { d } else { cfg.hidden }, n_classes, &mut rng, device)?;
    let mut opt = AdamW::new(head.vars(), AdamWConfig::with_weight_decay(cfg.weight_decay))?;
    let mut order: Vec<usize> = (0..n).collect();
    let bs = cfg.batch.clamp(1, n);
    let (mut cursor, mut last_loss) = (n, f64::NAN);
    for _ in 0..cfg.steps {
        if cursor + bs > n {
            rng.shuffle(&mut order);
            cursor = 0;
        }
        let idx: Vec<u32> = order[cursor..cursor + bs].iter().map(|&i| i as u32).collect();
        cursor += bs;
        let y: Vec<u32> = idx.iter().map(|&i| train_y[i as usize]).collect();
        let it = Tensor::from_vec(idx, bs, device)?;
        let logits = head.logits(&train_x.index_select(&it, 0)?)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &Tensor::from_vec(y, bs, device)?)?;
        last_loss = loss.to_scalar::<f32>()? as f64;
        let grads = loss.backward()?;
        let g = head.vars().iter().map(|(_, v)| grads.get(v).cloned().map_or_else(|| v.zeros_like(), Ok)).collect::<candle_core::Result<Vec<_>>>()?;
        opt.apply(&g, cfg.lr)?;
    }
    Ok(HeadFit {
        train_accuracy: accuracy(&head.logits(train_x)?, train_y)?,
        eval_accuracy: accuracy(&head.logits(eval_x)?, eval_y)?,
        final_loss: last_loss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(kind: HeadKind) -> ProbeHead {
        ProbeHead::new(kind, 16, 8, 2, &mut Rng::new(7), &Device::Cpu).unwrap()
    }

    use crate::util::max_abs_diff as max_diff;

    /// Property: for random inputs, random rotations/reflections of the input (direction changes,
    /// norm kept) leave the magnitude-only head's output unchanged; positive rescaling leaves the
    /// angle-only head's output unchanged; and the standard head sees both.
    #[test]
    fn magnitude_head_ignores_direction_and_angle_head_ignores_scale() {
        let mut rng = Rng::new(11);
        for case in 0..64 {
            // Small inputs keep tanh unsaturated, so a rescale is visible where it should be.
            let x = rng.normal_tensor(&[5, 16], 0.05 + case as f32 * 0.005, &Device::Cpu).unwrap();
            // A random orthogonal map: a product of Householder reflections.
            let mut y = x.clone();
            for _ in 0..3 {
                let v = rng.normal_tensor(&[1, 16], 1.0, &Device::Cpu).unwrap();
                let v = v.broadcast_div(&row_norms(&v).unwrap()).unwrap();
                let proj = y.matmul(&v.t().unwrap()).unwrap().matmul(&v).unwrap();
                y = (y - (proj * 2.0).unwrap()).unwrap();
            }
            let scale = 0.01 + 100.0 * rng.uniform() as f32;
            let xs = (&x * scale as f64).unwrap();
            let (m, a, s) = (head(HeadKind::Magnitude), head(HeadKind::Angle), head(HeadKind::Standard));
            assert!(max_diff(&m.logits(&x).unwrap(), &m.logits(&y).unwrap()) < 1e-4, "magnitude head saw a rotation");
            assert!(max_diff(&a.logits(&x).unwrap(), &a.logits(&xs).unwrap()) < 1e-4, "angle head saw a rescale by {scale}");
            if (scale - 1.0).abs() > 0.2 {
                assert!(max_diff(&m.logits(&x).unwrap(), &m.logits(&xs).unwrap()) > 1e-4, "magnitude head blind to scale");
                assert!(max_diff(&s.logits(&x).unwrap(), &s.logits(&xs).unwrap()) > 1e-4);
            }
            assert!(max_diff(&a.logits(&x).unwrap(), &a.logits(&y).unwrap()) > 1e-4, "angle head blind to rotation");
        }
    }

    /// Labels carried only by the norm are learnt by the magnitude head and not by the angle head;
    /// labels carried only by the direction the other way round (accuracy on held-out features).
    #[test]
    fn heads_learn_exactly_what_they_can_see() {
        let mut rng = Rng::new(3);
        let n = 512;
        let dir = rng.normal_tensor(&[n, 8], 1.0, &Device::Cpu).unwrap();
        let dir = dir.broadcast_div(&row_norms(&dir).unwrap()).unwrap();
        let y_norm: Vec<u32> = (0..n).map(|_| rng.below(2) as u32).collect();
        let scale: Vec<f32> = y_norm.iter().map(|&y| if y == 1 { 3.0 } else { 1.0 }).collect();
        let x_norm = dir.broadcast_mul(&Tensor::from_vec(scale, (n, 1), &Device::Cpu).unwrap()).unwrap();
        let y_dir: Vec<u32> = dir.narrow(1, 0, 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|&v| (v > 0.0) as u32).collect();
        let cfg = HeadTrain { hidden: 16, steps: 300, lr: 1e-2, batch: 64, weight_decay: 0.0 };
        let h = n / 2;
        let fit = |k, x: &Tensor, y: &[u32]| {
            fit_head(k, &x.narrow(0, 0, h).unwrap(), &y[..h], &x.narrow(0, h, h).unwrap(), &y[h..], 2, &cfg, 1).unwrap().eval_accuracy
        };
        assert!(fit(HeadKind::Magnitude, &x_norm, &y_norm) > 0.95);
        assert!(fit(HeadKind::Angle, &x_norm, &y_norm) < 0.7);
        assert!(fit(HeadKind::Angle, &dir, &y_dir) > 0.9);
        assert!(fit(HeadKind::Magnitude, &dir, &y_dir) < 0.7);
    }
}
