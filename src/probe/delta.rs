//! ΔM = (‖x‖ − ‖x⁰‖)/‖x⁰‖ and ΔD = cos(x, x⁰) for one token's representation before (x⁰) and
//! after (x) fine-tuning, and the summary statistics of Figure B.1.

/// `(ΔM, ΔD)` in f64. Every sum runs in the same order, so an unchanged vector gives exactly
/// `(0, 1)`: `Σx² = Σx·x⁰` bit for bit and `sqrt(a·a) = a` under IEEE rounding.
pub fn delta(x: &[f32], x0: &[f32]) -> (f64, f64) {
    debug_assert_eq!(x.len(), x0.len());
    let (mut xx, mut x0x0, mut dot) = (0f64, 0f64, 0f64);
    for (&a, &b) in x.iter().zip(x0) {
        let (a, b) = (a as f64, b as f64);
        xx += a * a;
        x0x0 += b * b;
        dot += a * b;
    }
    let (n, n0) = (xx.sqrt(), x0x0.sqrt());
    let dm = if n0 > 0.0 { (n - n0) / n0 } else { f64::NAN };
    let den = (xx * x0x0).sqrt();
    let dd = if den > 0.0 { (dot / den).clamp(-1.0, 1.0) } else { f64::NAN };
    (dm, dd)
}

/// Mean, standard deviation and quantiles of a sample (NaNs dropped).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Stats {
    pub n: usize,
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub q05: f64,
    pub q25: f64,
    pub median: f64,
    pub q75: f64,
    pub q95: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(values: &[f64]) -> Stats {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return Stats { mean: f64::NAN, std: f64::NAN, min: f64::NAN, q05: f64::NAN, q25: f64::NAN, median: f64::NAN, q75: f64::NAN, q95: f64::NAN, max: f64::NAN, n: 0 };
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let mean = v.iter().sum::<f64>() / n as f64;
        let var = if n > 1 { v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64 } else { 0.0 };
        // Linear interpolation between order statistics (numpy's default).
        let q = |p: f64| {
            let h = p * (n - 1) as f64;
            let (lo, hi) = (h.floor() as usize, h.ceil() as usize);
            v[lo] + (h - lo as f64) * (v[hi] - v[lo])
        };
        Stats { n, mean, std: var.sqrt(), min: v[0], q05: q(0.05), q25: q(0.25), median: q(0.5), q75: q(0.75), q95: q(0.95), max: v[n - 1] }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_vectors_give_exactly_zero_and_one() {
        let x: Vec<f32> = (0..577).map(|i| ((i * 7919) % 1013) as f32 * 0.37 - 150.0).collect();
        assert_eq!(delta(&x, &x), (0.0, 1.0));
    }

    #[test]
    fn scaling_changes_only_magnitude_and_rotation_only_angle() {
        let x0 = [3.0f32, 4.0];
        let (dm, dd) = delta(&[6.0, 8.0], &x0);
        assert!((dm - 1.0).abs() < 1e-12 && (dd - 1.0).abs() < 1e-12);
        let (dm, dd) = delta(&[-4.0, 3.0], &x0); // rotated by 90°
        assert!(dm.abs() < 1e-12 && dd.abs() < 1e-12);
    }

    #[test]
    fn quantiles_interpolate_like_numpy() {
        let s = Stats::of(&[4.0, 1.0, 3.0, 2.0, f64::NAN]);
        assert_eq!((s.n, s.min, s.max, s.median), (4, 1.0, 4.0, 2.5));
        assert!((s.q25 - 1.75).abs() < 1e-12 && (s.mean - 2.5).abs() < 1e-12);
        assert!((s.std - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
    }
}
