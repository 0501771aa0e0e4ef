//! Learning-rate schedule: linear warm-up, then constant, linear or cosine decay to zero.
use anyhow::{bail, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    Constant,
    Linear,
    Cosine,
}

impl Decay {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "constant" => Ok(Self::Constant),
            "linear" => Ok(Self::Linear),
            "cosine" => Ok(Self::Cosine),
            _ => bail!("unknown schedule {s:?} (constant, linear or cosine)"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub base_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
    pub decay: Decay,
}

impl Schedule {
    /// Learning rate of optimizer step `step` (0-based). Warm-up ramps (step+1)/warmup so the
    /// first step already moves; decay reaches 0 after the last step.
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.base_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let p = ((step - self.warmup_steps) as f64 / span).clamp(0.0, 1.0);
        match self.decay {
            Decay::Constant => self.base_lr,
            Decay::Linear => self.base_lr * (1.0 - p),
            Decay::Cosine => self.base_lr * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn warmup_then_decay() {
        let s = Schedule { base_lr: 1.0, warmup_steps: 10, total_steps: 110, decay: Decay::Linear };
        assert!((s.lr(0) - 0.1).abs() < 1e-12);
        assert!((s.lr(9) - 1.0).abs() < 1e-12);
        assert!((s.lr(60) - 0.5).abs() < 1e-12);
        let c = Schedule { decay: Decay::Cosine, ..s };
        assert!((c.lr(60) - 0.5).abs() < 1e-12 && c.lr(109) < 0.01);
    }
}
