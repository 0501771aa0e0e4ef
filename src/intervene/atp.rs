//! Attribution patching (AtP; METHODS.md §6): the options of `kind = "atp"`, IG's interpolated
//! input, and the per-unit sum of the first-order estimate `(s_u − b_u) · ∂m/∂a_u`. The gradients
//! at every site come from the model's site pass (`Llama::site_pass`: one forward, one
//! hand-written backward).
use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// Where the gradient is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AtpMethod {
    /// At the clean base run (Nanda 2023).
    #[default]
    Plain,
    /// Averaged over `steps` points on the line from the base's input embeddings to the
    /// source's, at α = (j + ½)/steps (the midpoint rule: one point = α ½).
    Ig,
}

/// The metric whose patching effect is estimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AtpMetric {
    /// logit[cf label] − logit[base label] at the answer position (the runs' `logit_diff`).
    #[default]
    LogitDiff,
    /// log p(cf label) at the answer position.
    Logprob,
}

fn default_steps() -> usize {
    5
}

/// `[intervention.atp]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AtpOptions {
    #[serde(default)]
    pub method: AtpMethod,
    /// Integration points of `ig` (ignored by `plain`).
    #[serde(default = "default_steps")]
    pub steps: usize,
    #[serde(default)]
    pub metric: AtpMetric,
    /// Really patch the K cells of largest |estimate| and K random ones, and write verify.csv
    /// (0 = no verification).
    #[serde(default)]
    pub verify_top: usize,
    /// AtP*'s GradDrop (Kramár et al. 2024): per layer ℓ, the gradient with ℓ's residual
    /// contributions (attn_output, mlp_output) passing none (walked back from ℓ down, reusing the
    /// plain pass above it); a cell's estimate becomes the mean over pairs of
    /// `Σ_ℓ |estimate_ℓ| / (L − 1)`, a magnitude that exposes effects whose paths cancel in the
    /// total gradient. Plain method only.
    #[serde(default)]
    pub grad_drop: bool,
    /// AtP*'s QK fix: q and k cells get the exactly recomputed attention pattern, linearised
    /// only after it (LLaMA-style attention, plain method, not with grad_drop).
    #[serde(default)]
    pub qk_fix: bool,
}

impl Default for AtpOptions {
    fn default() -> Self {
        Self { method: AtpMethod::Plain, steps: default_steps(), metric: AtpMetric::LogitDiff, verify_top: 0, grad_drop: false, qk_fix: false }
    }
}

/// IG points beyond this are a mistake (each is a forward + backward over the test split).
pub const MAX_STEPS: usize = 256;

impl AtpOptions {
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 || self.steps > MAX_STEPS {
            bail!("intervention.atp.steps = {} must be in 1..={MAX_STEPS}", self.steps);
        }
        if (self.grad_drop || self.qk_fix) && self.method != AtpMethod::Plain {
            bail!("intervention.atp.grad_drop and qk_fix need method = \"plain\"");
        }
        if self.grad_drop && self.qk_fix {
            bail!("intervention.atp: grad_drop and qk_fix are separate runs (set one)");
        }
        Ok(())
    }

    /// The interpolation points α (0 = base, 1 = source) whose gradients are averaged.
    pub fn alphas(&self) -> Vec<f64> {
        match self.method {
            AtpMethod::Plain => vec![0.0],
            AtpMethod::Ig => (0..self.steps).map(|j| (j as f64 + 0.5) / self.steps as f64).collect(),
        }
    }

    pub fn method_name(&self) -> &'static str {
        match (self.method, self.grad_drop, self.qk_fix) {
            (AtpMethod::Ig, ..) => "ig",
            (_, true, _) => "plain+graddrop",
            (_, _, true) => "plain+qk",
            _ => "plain",
        }
    }
}

/// IG's input at α: the base's layer-0 input moved a fraction α towards the source's
/// (`[b, t, d]` each, rows aligned), the block input the forward then starts from.
pub fn interpolated_input(base: &Tensor, source: &Tensor, alpha: f64) -> Result<Tensor> {
    Ok((base + ((source - base)? * alpha)?)?)
}

/// Per-row attribution of one unit: `Σ_cols (s − b) · g` over each group of `group` columns
/// (a head's `head_dim`, or the whole width). `s`, `b`, `g`: `[n, w]`; returns `[n, w / group]`.
pub fn attribution(s: &Tensor, b: &Tensor, g: &Tensor, group: usize) -> Result<Tensor> {
    let (n, w) = s.dims2()?;
    if group == 0 || w % group != 0 {
        bail!("attribution groups of {group} columns do not divide width {w}");
    }
    let prod = ((s - b)? * g)?;
    Ok(prod.reshape((n, w / group, group))?.sum(2)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn options_parse_with_defaults_and_reject_unknown_keys() {
        let o: AtpOptions = toml::from_str("method = \"ig\"").unwrap();
        assert_eq!((o.method, o.steps, o.metric, o.verify_top), (AtpMethod::Ig, 5, AtpMetric::LogitDiff, 0));
        assert_eq!(o.alphas(), vec![0.1, 0.3, 0.5, 0.7, 0.9]);
        assert!(toml::from_str::<AtpOptions>("method = \"ig\"\nstep = 3").unwrap_err().to_string().contains("step"));
        assert!(toml::from_str::<AtpOptions>("method = \"nope\"").is_err());
        let one = AtpOptions { method: AtpMethod::Ig, steps: 1, ..Default::default() };
        assert_eq!(one.alphas(), vec![0.5]);
        assert!(AtpOptions { steps: 0, ..Default::default() }.validate().unwrap_err().to_string().contains("steps"));
        let gd_ig = AtpOptions { method: AtpMethod::Ig, grad_drop: true, ..Default::default() };
        assert!(gd_ig.validate().unwrap_err().to_string().contains("grad_drop"));
    }

    #[test]
    fn attribution_sums_each_head_group() {
        let d = Device::Cpu;
        let s = Tensor::new(&[[1f32, 2., 3., 4.]], &d).unwrap();
        let b = Tensor::new(&[[0f32, 1., 1., 1.]], &d).unwrap();
        let g = Tensor::new(&[[2f32, 1., -1., 0.5]], &d).unwrap();
        // (s − b) = [1, 1, 2, 3]; · g = [2, 1, −2, 1.5].
        assert_eq!(attribution(&s, &b, &g, 2).unwrap().to_vec2::<f32>().unwrap(), vec![vec![3.0, -0.5]]);
        assert_eq!(attribution(&s, &b, &g, 4).unwrap().to_vec2::<f32>().unwrap(), vec![vec![2.5]]);
        assert!(attribution(&s, &b, &g, 3).is_err());
    }
}
