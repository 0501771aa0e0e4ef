//! AtP*'s QK fix (Kramár et al. 2024): for `q` and `k` cells the attention softmax is not
//! linearised. The patched query/key's attention pattern is recomputed exactly (the scores are
//! cheap), and only what follows the pattern is linear: `Σ_t (A'(t,·) − A(t,·)) · ∂m/∂A(t,·)`,
//! with `∂m/∂A(t, j) = ∂m/∂head_output(t) · v(j)` per head (heads = A·V). Recomputed here from
//! the base run's q, k, v (projection outputs, RoPE applied as the model does) and the gradient at
//! head_output; LLaMA-style attention only (no q/k norm, soft-capping or sliding window).
use super::atp::AtpCell;
use crate::model::{Llama, Site};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use std::collections::HashMap;

/// The units the fix reads at every layer that has a q or k cell.
pub fn needed(cells: &[AtpCell]) -> Vec<(usize, Site)> {
    let mut layers: Vec<usize> = cells.iter().filter(|c| matches!(c.site, Site::Q | Site::K)).map(|c| c.layer).collect();
    layers.sort();
    layers.dedup();
    layers.into_iter().flat_map(|l| [Site::Q, Site::K, Site::V, Site::HeadOutput].map(|s| (l, s))).collect()
}

pub fn check(model: &Llama) -> Result<()> {
    let a = &model.cfg.arch;
    if a.qk_norm || a.attn_softcap.is_some() || a.sliding_window.is_some() {
        bail!("intervention.atp.qk_fix supports LLaMA-style attention only (no q/k norm, soft-capping or sliding window)");
    }
    Ok(())
}

/// One batch's inputs: per unit `[b, t, w]` activations, and the rows' padding masks.
pub struct Batch<'a> {
    pub source: &'a HashMap<(usize, Site), Tensor>,
    pub base: &'a HashMap<(usize, Site), Tensor>,
    pub grads: &'a HashMap<(usize, Site), Tensor>,
    pub mask: &'a [Vec<u8>],
}

type Rows = Vec<Vec<Vec<f32>>>;
/// `[t][head][head_dim]` of one row.
type Heads = Vec<Vec<Vec<f32>>>;

fn rows(t: &Tensor) -> Result<Rows> {
    Ok(t.to_dtype(DType::F32)?.to_vec3::<f32>()?)
}

/// RoPE (rotate-half) of one head's vector at position `pos`, with the model's f32 angles.
fn rope(x: &[f32], pos: u32, inv_freq: &[f32]) -> Vec<f32> {
    let half = x.len() / 2;
    let mut out = vec![0f32; x.len()];
    for i in 0..half {
        let a = inv_freq[i] * pos as f32;
        let (c, s) = (a.cos(), a.sin());
        out[i] = x[i] * c - x[i + half] * s;
        out[i + half] = x[i + half] * c + x[i] * s;
    }
    out
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn softmax(s: &[f32]) -> Vec<f32> {
    let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
    let z: f32 = e.iter().sum();
    e.into_iter().map(|x| x / z).collect()
}

/// QK-fixed estimates `[cell][row]` for the q/k cells (None for the others). `pb`, `ps`: each
/// cell's base/source row position (padded index) per batch row.
pub fn estimates(model: &Llama, cells: &[AtpCell], pos_of: &dyn Fn(&AtpCell) -> (Vec<usize>, Vec<usize>), b: &Batch<'_>) -> Result<Vec<Option<Vec<f64>>>> {
    let c = &model.cfg;
    let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
    let rep = nh / nkv;
    let scale = match c.arch.query_pre_attn_scalar {
        Some(s) => 1.0 / s.sqrt(),
        None => 1.0 / (hd as f64).sqrt(),
    } as f32;
    let inv_freq = c.rope_inv_freq();
    let neg = crate::runtime::mask_neg(DType::F32);
    // Position ids count real tokens only (as the model's).
    let pos_ids: Vec<Vec<u32>> = b
        .mask
        .iter()
        .map(|r| {
            let mut k: i64 = -1;
            r.iter().map(|&m| {
                k += m as i64;
                k.max(0) as u32
            }).collect()
        })
        .collect();
    let mut out: Vec<Option<Vec<f64>>> = vec![None; cells.len()];
    // Per layer: base q, k, v, ∂m/∂heads, source q, k, and every row's rotated q and k heads.
    let mut per_layer: HashMap<usize, ([Rows; 6], Vec<Heads>, Vec<Heads>)> = HashMap::new();
    for (ci, cell) in cells.iter().enumerate() {
        if !matches!(cell.site, Site::Q | Site::K) {
            continue;
        }
        let l = cell.layer;
        if !per_layer.contains_key(&l) {
            let g = |m: &HashMap<(usize, Site), Tensor>, s: Site| rows(&m[&(l, s)]);
            let v = [g(b.base, Site::Q)?, g(b.base, Site::K)?, g(b.base, Site::V)?, g(b.grads, Site::HeadOutput)?, g(b.source, Site::Q)?, g(b.source, Site::K)?];
            let rot = |x: &Rows, n: usize| -> Vec<Heads> {
                x.iter()
                    .zip(&pos_ids)
                    .map(|(r, ids)| r.iter().zip(ids).map(|(row, &pid)| (0..n).map(|h| rope(&row[h * hd..(h + 1) * hd], pid, &inv_freq)).collect()).collect())
                    .collect()
            };
            let (qr, kr) = (rot(&v[0], nh), rot(&v[1], nkv));
            per_layer.insert(l, (v, qr, kr));
        }
        let ([_, _, v, gh, qs, ks], qrot, krot) = &per_layer[&l];
        let (pb, ps) = pos_of(cell);
        let mut vals = Vec::with_capacity(pb.len());
        for i in 0..pb.len() {
            let (qr, kr) = (&qrot[i], &krot[i]);
            let t = qr.len();
            let seg = |row: &[f32], h: usize| row[h * hd..(h + 1) * hd].to_vec();
            let masked = |tq: usize, j: usize| j > tq || b.mask[i][j] == 0;
            let score = |qv: &[f32], kv: &[f32], tq: usize, j: usize| if masked(tq, j) { neg } else { scale * dot(qv, kv) };
            // ∂m/∂A(h, tq, j) = ∂m/∂heads(tq, h) · v(j, group of h).
            let ga = |h: usize, tq: usize, j: usize| dot(&gh[i][tq][h * hd..(h + 1) * hd], &v[i][j][(h / rep) * hd..(h / rep + 1) * hd]);
            // (ΔA of row tq of head h with the scores of that row) · ∂m/∂A.
            let row_effect = |h: usize, tq: usize, new: &[f32]| -> f64 {
                let old: Vec<f32> = (0..t).map(|j| score(&qr[tq][h], &kr[j][h / rep], tq, j)).collect();
                let (a0, a1) = (softmax(&old), softmax(new));
                (0..t).map(|j| ((a1[j] - a0[j]) * ga(h, tq, j)) as f64).sum()
            };
            let (p, sp) = (pb[i], ps[i]);
            let heads: Vec<usize> = match (cell.site, cell.head) {
                (Site::Q, Some(h)) => vec![h],
                (Site::Q, None) => (0..nh).collect(),
                (_, Some(g)) => (g * rep..(g + 1) * rep).collect(),
                (_, None) => (0..nh).collect(),
            };
            let mut e = 0.0;
            for h in heads {
                if cell.site == Site::Q {
                    // The patched query's own row: the source's query rotated at the base's position.
                    let qn = rope(&seg(&qs[i][sp], h), pos_ids[i][p], &inv_freq);
                    let new: Vec<f32> = (0..t).map(|j| score(&qn, &kr[j][h / rep], p, j)).collect();
                    e += row_effect(h, p, &new);
                } else {
                    // Every query row attends to the patched key at column p.
                    let kn = rope(&seg(&ks[i][sp], h / rep), pos_ids[i][p], &inv_freq);
                    for tq in p..t {
                        let mut new: Vec<f32> = (0..t).map(|j| score(&qr[tq][h], &kr[j][h / rep], tq, j)).collect();
                        new[p] = score(&qr[tq][h], &kn, tq, p);
                        e += row_effect(h, tq, &new);
                    }
                }
            }
            vals.push(e);
        }
        out[ci] = Some(vals);
    }
    Ok(out)
}
