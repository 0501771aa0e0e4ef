//! The RoAd rotation itself: parameters -> per-dimension (cos, sin) columns -> element-wise apply.
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

/// How many (θ, α) values a 2x2 block has: RoAd1 shares one, RoAd2 one per row, RoAd4 four.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Variant {
    #[serde(rename = "road_1")]
    Road1,
    #[serde(rename = "road_2")]
    Road2,
    #[serde(rename = "road_4")]
    Road4,
}

impl Variant {
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim_start_matches("road_").trim_start_matches("road") {
            "1" => Ok(Variant::Road1),
            "2" => Ok(Variant::Road2),
            "4" => Ok(Variant::Road4),
            _ => bail!("unknown RoAd variant {s:?} (road_1, road_2 or road_4)"),
        }
    }
    pub fn peft_name(self) -> &'static str {
        match self {
            Variant::Road1 => "road_1",
            Variant::Road2 => "road_2",
            Variant::Road4 => "road_4",
        }
    }
    /// Length of the θ and α vectors for an output dimension `d` (peft's shapes).
    pub fn param_len(self, d: usize) -> usize {
        match self {
            Variant::Road1 => d / 2,
            Variant::Road2 => d,
            Variant::Road4 => 2 * d,
        }
    }
}

/// The geometry of a RoAd rotation on `dim` features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    pub variant: Variant,
    pub group_size: usize,
    pub dim: usize,
}

impl Rotation {
    pub fn new(variant: Variant, group_size: usize, dim: usize) -> Result<Self> {
        if group_size < 2 || group_size % 2 != 0 {
            bail!("RoAd group_size must be even and >= 2, got {group_size}");
        }
        if dim % group_size != 0 {
            bail!("RoAd: dimension {dim} is not divisible by group_size {group_size}");
        }
        Ok(Self { variant, group_size, dim })
    }

    /// Identity parameters: θ = 0, α = 1.
    pub fn identity_params(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        let n = self.variant.param_len(self.dim);
        Ok((Tensor::zeros(n, DType::F32, device)?, Tensor::ones(n, DType::F32, device)?))
    }

    /// Per-dimension columns `(first, second) = (α cos θ, α sin θ)` expanded to `dim` (differentiable).
    pub fn columns(&self, theta: &Tensor, alpha: &Tensor) -> Result<(Tensor, Tensor)> {
        let (d, g) = (self.dim, self.group_size);
        let n = self.variant.param_len(d);
        if theta.dims1()? != n || alpha.dims1()? != n {
            bail!(
                "RoAd {} on dim {d}: θ/α must have {n} values, got {}/{}",
                self.variant.peft_name(),
                theta.elem_count(),
                alpha.elem_count()
            );
        }
        Ok(match self.variant {
            Variant::Road1 => {
                // One value per pair, shared by both members (j and j + g/2 of its group).
                let expand = |p: &Tensor| -> Result<Tensor> {
                    let p = p.reshape((d / g, 1, g / 2))?;
                    Ok(Tensor::cat(&[&p, &p], 1)?.reshape(d)?)
                };
                let (t, a) = (expand(theta)?, expand(alpha)?);
                ((&a * t.cos()?)?, (&a * t.sin()?)?)
            }
            Variant::Road2 => ((alpha * theta.cos()?)?, (alpha * theta.sin()?)?),
            Variant::Road4 => {
                // Per group: g values for the diagonal, then g for the off-diagonal.
                let t = theta.reshape((d / g, 2, g))?;
                let a = alpha.reshape((d / g, 2, g))?;
                let first = (a.narrow(1, 0, 1)? * t.narrow(1, 0, 1)?.cos()?)?.reshape(d)?;
                let second = (a.narrow(1, 1, 1)? * t.narrow(1, 1, 1)?.sin()?)?.reshape(d)?;
                (first, second)
            }
        })
    }

    /// `rot(h)`: within each group, `[-h_second_half, h_first_half]`.
    pub fn rotate_half(&self, h: &Tensor) -> Result<Tensor> {
        let g = self.group_size;
        let dims = h.dims().to_vec();
        let d = *dims.last().unwrap_or(&0);
        if d != self.dim {
            bail!("RoAd rotation is for dim {}, input has last dim {d}", self.dim);
        }
        let mut gshape = dims[..dims.len() - 1].to_vec();
        gshape.extend([d / g, 2, g / 2]);
        let x = h.reshape(gshape)?;
        let ax = x.rank() - 2;
        let x1 = x.narrow(ax, 0, 1)?;
        let x2 = x.narrow(ax, 1, 1)?;
        Ok(Tensor::cat(&[&x2.neg()?, &x1], ax)?.reshape(dims)?)
    }

    /// `R h = first ⊙ h + second ⊙ rot(h)`; `first`/`second` broadcast over leading dims
    /// (shape `[d]`, or `[b, 1, d]` for per-row adapters in a mixed batch).
    pub fn apply(&self, h: &Tensor, first: &Tensor, second: &Tensor) -> Result<Tensor> {
        let r = self.rotate_half(h)?;
        Ok((h.broadcast_mul(first)? + r.broadcast_mul(second)?)?)
    }

    /// `R⁻¹ z` element-wise: each 2x2 block [[a, -b], [c, e]] inverts in closed form.
    pub fn apply_inverse(&self, z: &Tensor, first: &Tensor, second: &Tensor) -> Result<Tensor> {
        // For a pair (j, k = partner): z_j = f_j h_j - s_j h_k, z_k = f_k h_k + s_k h_j.
        // det = f_j f_k + s_j s_k; h_j = (f_k z_j + s_j z_k)/det, h_k = (f_j z_k - s_k z_j)/det.
        let fp = self.partner(first)?;
        let sp = self.partner(second)?;
        let sign = self.half_sign(first.device())?; // -1 on first halves, +1 on second halves
        let det = ((first * &fp)? + (second * &sp)?)?;
        // For j in a first half: h_j = (f_k z_j + s_j z_k)/det  -> coeff_self = f_k, coeff_partner = s_j
        // For k in a second half: h_k = (f_j z_k - s_k z_j)/det -> coeff_self = f_j, coeff_partner = -s_k
        let coeff_self = fp.broadcast_div(&det)?;
        let coeff_partner = (second.broadcast_mul(&sign.neg()?)?).broadcast_div(&det)?;
        let zp = self.partner(z)?;
        Ok((z.broadcast_mul(&coeff_self)? + zp.broadcast_mul(&coeff_partner)?)?)
    }

    /// The value at each dim's pair partner (swap halves within each group).
    fn partner(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.group_size;
        let dims = x.dims().to_vec();
        let d = *dims.last().unwrap_or(&0);
        let mut gshape = dims[..dims.len() - 1].to_vec();
        gshape.extend([d / g, 2, g / 2]);
        let y = x.reshape(gshape)?;
        let ax = y.rank() - 2;
        Ok(Tensor::cat(&[&y.narrow(ax, 1, 1)?, &y.narrow(ax, 0, 1)?], ax)?.reshape(dims)?)
    }

    fn half_sign(&self, device: &Device) -> Result<Tensor> {
        let g = self.group_size;
        let v: Vec<f32> = (0..self.dim).map(|i| if i % g < g / 2 { -1.0 } else { 1.0 }).collect();
        Ok(Tensor::from_vec(v, self.dim, device)?)
    }

    /// The dense `[dim, dim]` matrix R (for merging into weights: `W ← R W`).
    pub fn dense(&self, first: &Tensor, second: &Tensor) -> Result<Tensor> {
        let (d, g) = (self.dim, self.group_size);
        let f = first.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let s = second.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let mut m = vec![0f32; d * d];
        for j in 0..d {
            let in_group = j % g;
            let (partner, sign) = if in_group < g / 2 { (j + g / 2, -1.0) } else { (j - g / 2, 1.0) };
            m[j * d + j] = f[j];
            m[j * d + partner] = sign * s[j];
        }
        Ok(Tensor::from_vec(m, (d, d), first.device())?)
    }
}
