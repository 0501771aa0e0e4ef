//! Attention: per-call positions, RoPE tables and masks (causal, padding, sliding window), and
//! grouped-query attention with the per-family knobs (q/k norm, score scale, soft-capping).
use super::{Block, Llama};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};

/// One attention call's output and what the frozen tail's backward needs from it.
pub(super) struct Attn {
    /// Queries / keys of the new rows before their per-head norm (`[b, heads, t, hd]`), kept
    /// only when the family normalises them (Qwen3) for the tail's backward.
    pub q_pre: Option<Tensor>,
    pub k_pre: Option<Tensor>,
    /// Rotated queries grouped by KV head (unscaled), `[b, n_kv, rep·t, hd]`.
    pub qg: Tensor,
    /// Keys/values over prefix + new rows, `[b, n_kv, past + t, hd]` (the layer's new cache).
    pub k: Tensor,
    pub v: Tensor,
    /// Soft-capped scores' `tanh(s/c)` (Gemma 2), `[b, heads, t, past + t]`, for the backward.
    pub capped_tanh: Option<Tensor>,
    /// Attention probabilities, `[b, n_kv, rep·t, past + t]`.
    pub probs: Tensor,
    /// `[b, t, heads·hd]`.
    pub heads: Tensor,
}

/// What [`Llama::prepare`] derives from a call's ids, mask and cache.
pub(super) struct Prepared {
    pub b: usize,
    pub t: usize,
    pub past: usize,
    pub mask_rows: Vec<Vec<u8>>,
    /// No padding anywhere in the mask (causal order and windows are the only masking).
    pub unpadded: bool,
    pub rope: Rope,
    /// Additive `[b, 1, t, past+t]` (CPU) or expanded `[b, heads, t, past+t]`; None for decode.
    pub mask: Option<Tensor>,
    /// The same for sliding-window layers (None when the window hides nothing).
    pub mask_sliding: Option<Tensor>,
}

impl Prepared {
    /// The same tables and masks in f32, for a bf16 model's attention on the CPU.
    pub fn to_f32(&self) -> Result<Prepared> {
        let f = |t: &Tensor| super::super::cpu_ops::to_dtype(t, DType::F32);
        let opt = |t: &Option<Tensor>| t.as_ref().map(f).transpose();
        Ok(Prepared {
            b: self.b,
            t: self.t,
            past: self.past,
            mask_rows: self.mask_rows.clone(),
            unpadded: self.unpadded,
            rope: Rope { cos: f(&self.rope.cos)?, sin: f(&self.rope.sin)? },
            mask: opt(&self.mask)?,
            mask_sliding: opt(&self.mask_sliding)?,
        })
    }

    /// The additive mask of a layer (sliding or full attention).
    pub fn mask_for(&self, blk: &Block) -> Option<&Tensor> {
        if blk.sliding {
            self.mask_sliding.as_ref()
        } else {
            self.mask.as_ref()
        }
    }
}

impl Llama {
    /// Checks shared by every forward call, padding-aware position ids, RoPE tables and the
    /// additive attention masks for `t` new tokens after `past` cached ones.
    pub(super) fn prepare(&self, ids: &[Vec<u32>], attention_mask: Option<&[Vec<u8>]>, past: usize) -> Result<Prepared> {
        let b = ids.len();
        if b == 0 {
            bail!("empty batch");
        }
        let t = ids[0].len();
        if t == 0 {
            bail!("empty prompt: nothing to run");
        }
        if ids.iter().any(|r| r.len() != t) {
            bail!("all rows of a batch must have the same length (pad them and pass an attention mask)");
        }
        if let Some(&bad) = ids.iter().flatten().find(|&&x| x as usize >= self.cfg.vocab_size) {
            bail!("token id {bad} is outside the vocabulary (size {})", self.cfg.vocab_size);
        }
        let total = past + t;
        if total > self.cfg.max_position_embeddings {
            bail!(
                "sequence of {total} tokens is longer than the model's context ({} tokens)",
                self.cfg.max_position_embeddings
            );
        }
        let mask_rows: Vec<Vec<u8>> = match attention_mask {
            Some(m) => {
                if m.len() != b || m.iter().any(|r| r.len() != total) {
                    bail!("attention mask must be [batch={b}, past+new={total}]");
                }
                m.to_vec()
            }
            None => vec![vec![1u8; total]; b],
        };
        // Position ids count real tokens only, so left padding does not shift RoPE phases (as HF).
        let mut pos = Vec::with_capacity(b * t);
        for row in &mask_rows {
            let mut c: i64 = -1;
            let mut rp = Vec::with_capacity(total);
            for &m in row {
                c += m as i64;
                rp.push(c.max(0) as u32);
            }
            pos.extend_from_slice(&rp[past..]);
        }
        let rope = self.rope_tables(&pos, b, t)?;
        let unpadded = mask_rows.iter().all(|r| r.iter().all(|&m| m == 1));
        // A single new token with no padding may attend to everything: no mask needed (decode).
        let mask = if t == 1 && unpadded { None } else { Some(self.expand_mask(self.attn_mask(&mask_rows, past, t, None)?, b, t, total)?) };
        let window = self.cfg.arch.sliding_window.filter(|_| self.blocks.iter().any(|blk| blk.sliding));
        let mask_sliding = match window {
            // The window hides nothing when every key is within it.
            Some(w) if total > w || mask.is_some() => {
                Some(self.expand_mask(self.attn_mask(&mask_rows, past, t, Some(w))?, b, t, total)?)
            }
            _ => None,
        };
        Ok(Prepared { b, t, past, mask_rows, unpadded, rope, mask, mask_sliding })
    }

    fn expand_mask(&self, m: Tensor, b: usize, t: usize, total: usize) -> Result<Tensor> {
        if crate::runtime::cpu_fast_path(&self.device) {
            Ok(m)
        } else {
            // Off the CPU, candle's broadcasting add walks strides per element: on a
            // [b, heads, t, s] score tensor that one add took over a quarter of a 7B-shape
            // prefill. Expanded once per call (shared by every layer), the add is a plain
            // contiguous one.
            Ok(m.broadcast_as((b, self.cfg.num_heads, t, total))?.contiguous()?)
        }
    }

    /// cos/sin tables `[b, t, head_dim/2]` for the given positions (one copy to the device per
    /// forward call, not per layer).
    fn rope_tables(&self, pos: &[u32], b: usize, t: usize) -> Result<Rope> {
        let hd = self.cfg.head_dim;
        let mut cos = Vec::with_capacity(pos.len() * hd / 2);
        let mut sin = Vec::with_capacity(pos.len() * hd / 2);
        for &p in pos {
            // f32 products like transformers (inv_freq @ position_ids in float32).
            let ang = self.inv_freq.iter().map(|f| f * p as f32);
            for a in ang {
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let shape = (b, t, hd / 2);
        // `graph::constant`: the same tables at every step of a captured training step.
        let cos = crate::runtime::graph::constant(cos, shape, &self.device)?.to_dtype(self.dtype)?;
        let sin = crate::runtime::graph::constant(sin, shape, &self.device)?.to_dtype(self.dtype)?;
        Ok(Rope { cos, sin })
    }

    /// Additive mask `[b, 1, t, past+t]`: causal, padding keys excluded, and with a `window`
    /// keys `window` or more positions behind the query too (transformers counts sequence
    /// indices, padding included, for the window).
    fn attn_mask(&self, rows: &[Vec<u8>], past: usize, t: usize, window: Option<usize>) -> Result<Tensor> {
        let total = past + t;
        let b = rows.len();
        let mut m = vec![0f32; b * t * total];
        let neg = crate::runtime::mask_neg(self.dtype);
        for (bi, row) in rows.iter().enumerate() {
            for qi in 0..t {
                let qpos = past + qi;
                for (kj, &keep) in row.iter().enumerate() {
                    let outside = window.is_some_and(|w| qpos >= kj + w);
                    if kj > qpos || keep == 0 || outside {
                        // Large finite value, so a fully padded query row stays finite.
                        m[(bi * t + qi) * total + kj] = neg;
                    }
                }
            }
        }
        Ok(crate::runtime::graph::constant(m, (b, 1, t, total), &self.device)?.to_dtype(self.dtype)?)
    }

    /// Attention of `t` new rows (projections `[b, t, heads·hd]`) over `prefix` (cached keys and
    /// values, `[b, n_kv, past, hd]`, already normalised and rotated) and themselves.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention(
        &self,
        blk: &Block,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        p: &Prepared,
        prefix: Option<&(Tensor, Tensor)>,
        differentiable: bool,
    ) -> Result<Attn> {
        let (b, t) = (p.b, p.t);
        let (nh, nkv, hd) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let q = q.reshape((b, t, nh, hd))?.transpose(1, 2)?;
        let k = k.reshape((b, t, nkv, hd))?.transpose(1, 2)?;
        let v = v.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        // Qwen3: RMSNorm over each head's vector before RoPE.
        let (q_pre, k_pre, q, k) = match (&blk.q_norm, &blk.k_norm) {
            (Some(qn), Some(kn)) => {
                let (q, k) = (q.contiguous()?, k.contiguous()?);
                let (qn_, kn_) = (self.rms(&q, qn, differentiable)?, self.rms(&k, kn, differentiable)?);
                (Some(q), Some(k), qn_, kn_)
            }
            _ => (None, None, q, k),
        };
        let q = p.rope.apply(&q, differentiable)?;
        let k = p.rope.apply(&k, differentiable)?;
        let (k, v) = match prefix {
            Some((pk, pv)) => (cat_keys(pk, &k)?, cat_keys(pv, &v)?),
            None => (k, v),
        };
        let s = k.dim(2)?;
        // GQA without copying K/V: fold the query heads of one KV group into the row axis.
        let rep = nh / nkv;
        let qg = q.reshape((b, nkv, rep * t, hd))?;
        let scale = self.attn_scale();
        let own_ops = crate::runtime::cpu_fast_path(q.device()) || crate::runtime::cuda_fast_path(q.device());
        if differentiable && self.cfg.arch.attn_softcap.is_none() && own_ops {
            // Training (CPU, or CUDA with road's kernels): scale, mask and softmax as one node with
            // its own backward (f32; other dtypes compose the same ops inside `masked_softmax`).
            let raw = qg.matmul(&k.t()?)?.reshape((b, nh, t, s))?;
            let probs = super::super::train_ops::masked_softmax(&raw, scale, p.mask_for(blk))?.reshape((b, nkv, rep * t, s))?;
            let heads = probs.matmul(&v)?.reshape((b, nh, t, hd))?.transpose(1, 2)?.reshape((b, t, nh * hd))?;
            return Ok(Attn { q_pre, k_pre, qg, k, v, capped_tanh: None, probs, heads });
        }
        let scores = if crate::runtime::cpu_fast_path(q.device()) {
            (qg.matmul(&k.t()?)? * scale)?
        } else {
            // Scaling q ([.., t, hd]) instead of the scores ([.., t, s]) saves a pass over the
            // largest tensor of long prefills.
            (&qg * scale)?.matmul(&k.t()?)?
        };
        let scores = scores.reshape((b, nh, t, s))?;
        // Gemma 2: c · tanh(s / c), before the mask.
        let (scores, capped_tanh) = match self.cfg.arch.attn_softcap {
            Some(c) => {
                let th = (scores / c)?.tanh()?;
                ((&th * c)?, Some(th))
            }
            None => (scores, None),
        };
        let scores = match p.mask_for(blk) {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = if differentiable {
            candle_nn::ops::softmax(&scores, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        let probs = probs.reshape((b, nkv, rep * t, s))?;
        let heads = probs.matmul(&v)?.reshape((b, nh, t, hd))?.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        Ok(Attn { q_pre, k_pre, qg, k, v, capped_tanh, probs, heads })
    }

    /// Inference attention: the layer's cache (keys/values over prefix + new rows; contiguous
    /// `[b, n_kv, past + t, hd]` when `want_cache`, else possibly a strided view) and the heads
    /// `[b, t, heads·hd]`. On CUDA in bf16/f16, prefill of an unpadded batch runs the fused
    /// kernel (`flash_attn`) on the projections in place: RoPE in their `[b, t, heads, hd]`
    /// layout, no transposes, no materialised scores. Everything else composes [`Self::attention`].
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_inference(
        &self,
        blk: &Block,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        p: &Prepared,
        prefix: Option<&(Tensor, Tensor)>,
        want_cache: bool,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t) = (p.b, p.t);
        let (nh, nkv, hd) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        // Decode (t = 1) keeps the composed path: one query row per head fills no tile.
        let fused = t > 1 && p.unpadded && self.cfg.arch.attn_softcap.is_none();
        if fused && super::super::flash_attn::available(q.device(), self.dtype, hd) {
            let rows = |x: &Tensor, n: usize| x.reshape((b, t, n, hd));
            let (mut qt, mut kt, vt) = (rows(q, nh)?, rows(k, nkv)?, rows(v, nkv)?);
            if let (Some(qn), Some(kn)) = (&blk.q_norm, &blk.k_norm) {
                qt = self.rms(&qt, qn, false)?;
                kt = self.rms(&kt, kn, false)?;
            }
            let qt = candle_nn::rotary_emb::rope_thd(&qt.contiguous()?, &p.rope.cos, &p.rope.sin)?;
            let kt = candle_nn::rotary_emb::rope_thd(&kt.contiguous()?, &p.rope.cos, &p.rope.sin)?;
            // [b, heads, rows, hd] views of the [b, rows, heads, hd] tensors.
            let (qh, kh, vh) = (qt.transpose(1, 2)?, kt.transpose(1, 2)?, vt.transpose(1, 2)?);
            let (k_all, v_all) = match prefix {
                Some((pk, pv)) => (cat_keys(pk, &kh)?, cat_keys(pv, &vh)?),
                None if want_cache => (kh.contiguous()?, vh.contiguous()?),
                None => (kh, vh),
            };
            let window = if blk.sliding { self.cfg.arch.sliding_window } else { None };
            if let Some(heads) = super::super::flash_attn::try_flash_attention(&qh, &k_all, &v_all, window, self.attn_scale())? {
                return Ok((k_all, v_all, heads));
            }
        }
        let a = self.attention(blk, q, k, v, p, prefix, false)?;
        Ok((a.k, a.v, a.heads))
    }

    /// Inference attention of a bf16 model on the CPU, computed in f32 (`p32`: the call's tables
    /// and masks in f32): candle's bf16 scores, mask add, softmax and RoPE convert through
    /// narrow helpers and took ~27% of a bf16 prefill; PyTorch's CPU sdpa also accumulates bf16
    /// attention in f32. Returns the layer's cache (keys/values over prefix + new rows, bf16 as
    /// the model) and the heads (bf16).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_upcast(
        &self,
        blk: &Block,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        p32: &Prepared,
        prefix: Option<&(Tensor, Tensor)>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let up = |t: &Tensor| super::super::cpu_ops::to_dtype(&t.contiguous()?, DType::F32);
        let down = |t: &Tensor| super::super::cpu_ops::to_dtype(&t.contiguous()?, self.dtype);
        let prefix32 = match prefix {
            Some((pk, pv)) => Some((up(pk)?, up(pv)?)),
            None => None,
        };
        let a = self.attention(blk, &up(q)?, &up(k)?, &up(v)?, p32, prefix32.as_ref(), false)?;
        Ok((down(&a.k)?, down(&a.v)?, down(&a.heads)?))
    }

    /// The attention scores' scale: `1/√head_dim`, or `query_pre_attn_scalar^-½` (Gemma 2).
    pub(super) fn attn_scale(&self) -> f64 {
        match self.cfg.arch.query_pre_attn_scalar {
            Some(s) => 1.0 / s.sqrt(),
            None => 1.0 / (self.cfg.head_dim as f64).sqrt(),
        }
    }
}

/// Flat row index (into `[b·t, ..]`) of each row's last real token (right padding leaves
/// trailing zeros in the mask).
pub(super) fn last_rows(mask_rows: &[Vec<u8>], past: usize, t: usize, device: &Device) -> Result<Tensor> {
    let idx: Vec<u32> = mask_rows
        .iter()
        .enumerate()
        .map(|(bi, r)| {
            let last = r[past..].iter().rposition(|&m| m == 1).unwrap_or(t - 1);
            (bi * t + last) as u32
        })
        .collect();
    Ok(Tensor::from_vec(idx, mask_rows.len(), device)?)
}

/// Cached keys (or values) `[b, kv_heads, past, hd]` followed by new ones, contiguous. candle's cat
/// falls back to a transposed, non-contiguous result when a view's strides look non-collapsible
/// (e.g. a size-1 batch dim with an arbitrary stride), and the CUDA matmul then refuses it;
/// `contiguous()` is a no-op in the usual case.
fn cat_keys(past: &Tensor, new: &Tensor) -> Result<Tensor> {
    Ok(Tensor::cat(&[past, new], 2)?.contiguous()?)
}

/// Per-call RoPE tables, `[b, t, head_dim/2]` (rotate-half layout).
pub(super) struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl Rope {
    /// RoPE on `[b, heads, t, head_dim]`. Inference uses candle's fused kernel (CPU and CUDA:
    /// one launch instead of ~6 per call); training uses `train_ops`' RoPE with its backward on the
    /// CPU, elsewhere composes differentiable primitives (candle's fused op has no backward).
    pub fn apply(&self, x: &Tensor, differentiable: bool) -> Result<Tensor> {
        if !differentiable {
            return Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, &self.cos, &self.sin)?);
        }
        if let Some(y) = super::super::train_ops::try_rope(x, &self.cos, &self.sin)? {
            return Ok(y);
        }
        let hd = x.dim(D::Minus1)?;
        let cos = Tensor::cat(&[&self.cos, &self.cos], D::Minus1)?.unsqueeze(1)?;
        let sin = Tensor::cat(&[&self.sin, &self.sin], D::Minus1)?.unsqueeze(1)?;
        let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
        let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
        let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        Ok((x.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn cached_keys_of_a_one_row_batch_concatenate_contiguously() {
        // A one-row batch of a narrowed cache: the size-1 batch dim gets a stride candle's cat
        // does not see as collapsible.
        let full = Tensor::arange(0f32, (3 * 13 * 4) as f32, &Device::Cpu).unwrap().reshape((3, 13, 4)).unwrap();
        let past = full.narrow(1, 0, 11).unwrap().unsqueeze(0).unwrap();
        let new = Tensor::ones((1, 3, 2, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(!Tensor::cat(&[&past, &new], 2).unwrap().is_contiguous(), "the case guarded against");
        let k = cat_keys(&past, &new).unwrap();
        assert!(k.is_contiguous());
        assert_eq!(k.dims(), [1, 3, 13, 4]);
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(&k.narrow(2, 0, 11).unwrap()), flat(&past));
        assert_eq!(flat(&k.narrow(2, 11, 2).unwrap()), flat(&new));
    }
}
