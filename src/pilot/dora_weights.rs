//! DoRA in weight space (`dora_weights.csv`): how far each adapted projection's learned magnitude
//! moved against its direction. Per output row `i`, the fine-tuned row is
//! `W'_i = m_i · V_i/‖V_i‖` with `V = W + s·BA`, so `ΔM_i = m_i/‖W_i‖ − 1` (radial) and
//! `ΔD_i = cos(V_i, W_i)` (angular) split `‖W'_i − W_i‖²/‖W_i‖²` exactly as the representation
//! probe splits a hidden state's change — the same rule decides whether the angle dominates.
use super::tables::angular_share;
use crate::adapters::DoraAdapter;
use crate::model::Llama;
use anyhow::Result;
use candle_core::DType;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DoraWeightRow {
    pub method: String,
    pub layer: usize,
    pub proj: String,
    /// Output rows.
    pub n: usize,
    pub dm_median: f64,
    pub dm_abs_mean: f64,
    pub dd_median: f64,
    pub angular_share_median: f64,
}

pub const DORA_WEIGHT_HEADER: [&str; 8] = ["method", "layer", "proj", "n", "dm_median", "dm_abs_mean", "dd_median", "angular_share_median"];

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let k = v.len();
    if k % 2 == 1 { v[k / 2] } else { (v[k / 2 - 1] + v[k / 2]) / 2.0 }
}

/// One row per adapted projection of a DoRA fine-tune of `base`.
pub fn rows(method: &str, ad: &DoraAdapter, base: &Llama) -> Result<Vec<DoraWeightRow>> {
    let mut out = Vec::new();
    for (&(layer, p), m) in &ad.magnitude {
        let w = base.proj_weight(layer, p).to_dtype(DType::F32)?;
        let v = (&w + ad.lora.delta(layer, p)?.expect("DoRA layers have LoRA factors").detach())?;
        let wn = w.sqr()?.sum(1)?.sqrt()?.to_vec1::<f32>()?;
        let vn = v.sqr()?.sum(1)?.sqrt()?.to_vec1::<f32>()?;
        let dot = (&v * &w)?.sum(1)?.to_vec1::<f32>()?;
        let mv = m.as_tensor().to_vec1::<f32>()?;
        let dm: Vec<f64> = mv.iter().zip(&wn).map(|(&m, &n)| m as f64 / n as f64 - 1.0).collect();
        let dd: Vec<f64> = dot.iter().zip(wn.iter().zip(&vn)).map(|(&d, (&a, &b))| d as f64 / (a as f64 * b as f64)).collect();
        let share: Vec<f64> = dm.iter().zip(&dd).map(|(&a, &b)| angular_share(a, b)).collect();
        out.push(DoraWeightRow {
            method: method.into(),
            layer,
            proj: p.hf_name().into(),
            n: dm.len(),
            dm_abs_mean: dm.iter().map(|x| x.abs()).sum::<f64>() / dm.len().max(1) as f64,
            dm_median: median(dm),
            dd_median: median(dd),
            angular_share_median: median(share),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_skips_non_finite() {
        assert_eq!(median(vec![3.0, f64::NAN, 1.0, 2.0]), 2.0);
        assert!(median(vec![]).is_nan());
    }
}
