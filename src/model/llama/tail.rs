//! The frozen tail of a forward pass with a hand-written backward.
//!
//! Training an intervention at layer L needs only dL/d(residual stream after L): the blocks
//! after it are constants. Under candle's autograd every matmul's backward also computes the
//! weight gradient (thrown away), and every accumulated gradient costs a zero-fill and an add;
//! on a GPU, where a step of this size is bound by kernel launches, that doubles the work.
//! Here the tail runs forward with the fused inference kernels, keeps what its backward needs,
//! and walks back once. The result equals autograd's (tests/tail_grad.rs), for every family's
//! knobs: biases (no effect on dL/dx), Qwen3's q/k norms, sliding windows (only the mask),
//! Gemma 2's sandwich norms, GeGLU and both soft-caps.
use super::tail_cuda;
use super::{last_rows, Act, Attn, Block, Fwd, Llama, Prepared};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, D};

/// What one block's backward needs from its forward, and the block's site activations
/// (`[b, t, w]`; `site_grads.rs` reads them).
pub(super) struct Saved {
    pub x: Tensor,
    /// The q, k, v projection outputs (the `q`, `k`, `v` sites: before q/k norm and RoPE).
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub attn: Attn,
    /// o_proj's output, when a post-attention norm follows it (Gemma 2).
    o: Option<Tensor>,
    /// What attention and the MLP add to the residual stream (after Gemma's post-norms).
    pub attn_out: Tensor,
    pub mlp_out: Tensor,
    pub h: Tensor,
    gate: Tensor,
    up: Tensor,
    /// down_proj's output, when a post-MLP norm follows it (Gemma 2).
    down: Option<Tensor>,
    /// The block's output.
    pub y: Tensor,
}

/// `dL/d·` inside one block given `dL/dy`: of its input `x`, of the residual stream between
/// attention and MLP `h` (= of `attn_out`), of the heads (o_proj's input) and of the q, k, v
/// projection outputs, each `[b, t, w]`.
pub(super) struct BlockGrads {
    pub dx: Tensor,
    pub dh: Tensor,
    pub dheads: Tensor,
    pub dq: Tensor,
    pub dk: Tensor,
    pub dv: Tensor,
}

/// `dL/dx` of `y = x @ wᵀ` given `dL/dy`.
fn linear_bwd(dy: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = dy.dims();
    let out_d = *dims.last().expect("rank >= 1");
    let rows = dy.elem_count() / out_d.max(1);
    let dx = dy.reshape((rows, out_d))?.matmul(w)?;
    let mut shape = dims.to_vec();
    *shape.last_mut().expect("rank >= 1") = w.dim(1)?;
    Ok(dx.reshape(shape)?)
}

impl Llama {
    /// Cross-entropy (mean over rows) of the last-position logits against `targets`, from the
    /// residual stream `x` entering block `from` (`fwd.start = Some((from, x))`, with
    /// `from == num_layers` meaning only the final norm and head), and `dL/dx` computed by hand.
    /// `fwd.cache` holds the prefix's keys/values for blocks `from..` (read only); hooks and
    /// adapters are not allowed here (the tail is the frozen model).
    pub fn tail_loss_grad(&self, ids: &[Vec<u32>], fwd: Fwd<'_>, targets: &[u32]) -> Result<(Tensor, Tensor)> {
        self.tail_loss_grad_on(ids, fwd, &Tensor::new(targets, &self.device)?)
    }

    /// [`Self::tail_loss_grad`] with the targets already on the device (`[b]` u32): a captured
    /// training step reads them from a buffer rewritten before each replay.
    pub fn tail_loss_grad_on(&self, ids: &[Vec<u32>], fwd: Fwd<'_>, targets: &Tensor) -> Result<(Tensor, Tensor)> {
        let Fwd { attention_mask, cache, hooks, adapter, start, end, .. } = fwd;
        if hooks.is_some() || adapter.is_some() || end.is_some() {
            bail!("the frozen tail takes no hooks, adapters or end layer");
        }
        let (from, x0) = start.context("the frozen tail needs a start layer and its input")?;
        let n = self.cfg.num_layers;
        if from > n {
            bail!("cannot resume at layer {from}: the model has {n} layers");
        }
        // The prefix length is that of the tail's own layers (a caller's cache may already
        // hold more rows at earlier layers).
        let prefix = |l: usize| cache.as_deref().and_then(|c| c.layer(l));
        let past = (from..n).find_map(&prefix).map(|(k, _)| k.dim(2)).transpose()?.unwrap_or(0);
        let p = self.prepare(ids, attention_mask, past)?;
        if x0.dims() != [p.b, p.t, self.cfg.hidden_size] {
            bail!("tail input must be [b={}, t={}, d={}]", p.b, p.t, self.cfg.hidden_size);
        }
        if targets.dims() != [p.b] {
            bail!("targets of shape {:?} for a batch of {}", targets.dims(), p.b);
        }
        let neg_sin = p.rope.sin.neg()?;
        let mut saved = Vec::with_capacity(n - from);
        let mut x = x0.contiguous()?;
        for li in from..n {
            let (y, s) = self.block_saved(&self.blocks[li], &x, &p, prefix(li))?;
            saved.push(s);
            x = y;
        }
        // Head: final norm, last real position, logits in f32, cross-entropy.
        let d = self.cfg.hidden_size;
        let idx = last_rows(&p.mask_rows, p.past, p.t, &self.device)?;
        let hidden = self.rms(&x, &self.norm, false)?;
        let last = hidden.reshape((p.b * p.t, d))?.index_select(&idx, 0)?;
        let raw = self.head(&last, false)?.to_dtype(DType::F32)?;
        // Gemma 2's final soft-cap c·tanh(z/c): dz = dlogits · (1 − tanh²).
        let (logits, cap_tanh) = match self.cfg.arch.final_softcap {
            Some(c) => {
                let th = (raw / c)?.tanh()?;
                ((&th * c)?, Some(th))
            }
            None => (raw, None),
        };
        let tgt = targets.reshape((p.b, 1))?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let loss = (logp.gather(&tgt, 1)?.sum_all()? / -(p.b as f64))?;
        // dL/dlogits = (softmax − onehot) / b.
        let minus_one = Tensor::full(-1f32, (p.b, 1), &self.device)?;
        let dlogits = (logp.exp()?.scatter_add(&tgt, &minus_one, 1)? / p.b as f64)?;
        let dlogits = match &cap_tanh {
            Some(th) => (dlogits * th.sqr()?.affine(-1.0, 1.0)?)?,
            None => dlogits,
        };
        let dlast = dlogits.to_dtype(self.dtype)?.matmul(&self.lm_head)?;
        let dhidden = Tensor::zeros((p.b * p.t, d), self.dtype, &self.device)?.index_add(&idx, &dlast, 0)?.reshape((p.b, p.t, d))?;
        let mut dx = self.rms_bwd(&x, &self.norm, &dhidden)?;
        for (li, s) in (from..n).zip(&saved).rev() {
            dx = self.block_bwd(&self.blocks[li], s, &dx, &p, &neg_sin)?.dx;
        }
        Ok((loss, dx))
    }

    /// One block forward (fused inference kernels), keeping what [`Self::block_bwd`] needs.
    pub(super) fn block_saved(&self, blk: &Block, x: &Tensor, p: &Prepared, prefix: Option<&(Tensor, Tensor)>) -> Result<(Tensor, Saved)> {
        let hn = self.rms(x, &blk.ln1, false)?;
        let (q, k, v) = (self.lin(&blk.q, &hn, false)?, self.lin(&blk.k, &hn, false)?, self.lin(&blk.v, &hn, false)?);
        let attn = self.attention(blk, &q, &k, &v, p, prefix, false)?;
        let o = self.lin(&blk.o, &attn.heads, false)?;
        let (attn_out, o) = match &blk.post_attn {
            Some(w) => (self.rms(&o, w, false)?, Some(o)),
            None => (o, None),
        };
        let h = (x + &attn_out)?;
        let hn = self.rms(&h, &blk.ln2, false)?;
        let gate = self.lin(&blk.gate, &hn, false)?;
        let up = self.lin(&blk.up, &hn, false)?;
        let dn = self.lin(&blk.down, &(self.act(&gate)? * &up)?, false)?;
        let (mlp_out, down) = match &blk.post_mlp {
            Some(w) => (self.rms(&dn, w, false)?, Some(dn)),
            None => (dn, None),
        };
        let y = (&h + &mlp_out)?;
        Ok((y.clone(), Saved { x: x.clone(), q, k, v, attn, o, attn_out, mlp_out, h, gate, up, down, y }))
    }

    /// `(dL/dgate, dL/dup)` of `act(gate) · up` given `dL/dm`.
    fn glu_bwd(&self, dm: &Tensor, gate: &Tensor, up: &Tensor) -> Result<(Tensor, Tensor)> {
        match self.cfg.arch.act {
            Act::Silu => {
                if let Some(g) = tail_cuda::swiglu_bwd(dm, gate, up)? {
                    return Ok(g);
                }
                let sg = candle_nn::ops::sigmoid(gate)?;
                let silu = (gate * &sg)?;
                // silu'(g) = σ(g) · (1 + g · (1 − σ(g))) = σ(g) + silu(g) · (1 − σ(g)).
                let dsilu = (&sg + (&silu * sg.affine(-1.0, 1.0)?)?)?;
                Ok((((dm * up)? * dsilu)?, (dm * &silu)?))
            }
            Act::GeluTanh => {
                // gelu(g) = ½ g (1 + tanh u), u = √(2/π) (g + 0.044715 g³);
                // gelu'(g) = ½ (1 + tanh u) + ½ g (1 − tanh² u) · √(2/π) (1 + 3·0.044715 g²).
                let k = (2.0 / std::f64::consts::PI).sqrt();
                let g2 = gate.sqr()?;
                let u = ((gate * &g2)?.affine(0.044715 * k, 0.0)? + gate.affine(k, 0.0)?)?;
                let th = u.tanh()?;
                let du = g2.affine(3.0 * 0.044715 * k, k)?;
                let left = th.affine(0.5, 0.5)?;
                let dgelu = (&left + ((gate * th.sqr()?.affine(-1.0, 1.0)?)? * du)?.affine(0.5, 0.0)?)?;
                let gelu = (gate * &left)?;
                Ok((((dm * up)? * dgelu)?, (dm * gelu)?))
            }
        }
    }

    /// `dL/dx` of one block given `dL/dy`, with the gradients inside it.
    pub(super) fn block_bwd(&self, blk: &Block, s: &Saved, dy: &Tensor, p: &Prepared, neg_sin: &Tensor) -> Result<BlockGrads> {
        let (b, t) = (p.b, p.t);
        let (nh, nkv, hd) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let rep = nh / nkv;
        // MLP: y = h + post(down(act(gate) · up)).
        let ddown = match (&blk.post_mlp, &s.down) {
            (Some(w), Some(dn)) => self.rms_bwd(dn, w, dy)?,
            _ => dy.clone(),
        };
        let dm = linear_bwd(&ddown, blk.down.weight())?;
        let (dgate, dup) = self.glu_bwd(&dm, &s.gate, &s.up)?;
        let dhn = (linear_bwd(&dgate, blk.gate.weight())? + linear_bwd(&dup, blk.up.weight())?)?;
        let dh = (dy + self.rms_bwd(&s.h, &blk.ln2, &dhn)?)?;
        // Attention: h = x + post(o(attn(rope(norm(q(xn))), rope(norm(k(xn))), v(xn)))).
        let dproj = match (&blk.post_attn, &s.o) {
            (Some(w), Some(o)) => self.rms_bwd(o, w, &dh)?,
            _ => dh.clone(),
        };
        let dheads = linear_bwd(&dproj, blk.o.weight())?;
        let dout = dheads.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?.reshape((b, nkv, rep * t, hd))?;
        let a = &s.attn;
        let dprobs = dout.matmul(&a.v.t()?)?;
        let dv = a.probs.t()?.matmul(&dout)?;
        let dscores = match tail_cuda::softmax_bwd(&a.probs, &dprobs)? {
            Some(d) => d,
            None => (&a.probs * dprobs.broadcast_sub(&(&dprobs * &a.probs)?.sum_keepdim(D::Minus1)?)?)?,
        };
        // Soft-capped scores c·tanh(s/c): ds = dcapped · (1 − tanh²).
        let dscores = match &a.capped_tanh {
            Some(th) => (dscores * th.sqr()?.affine(-1.0, 1.0)?.reshape(a.probs.dims())?)?,
            None => dscores,
        };
        // scores = scale · qg kᵀ.
        let dscores = (dscores * self.attn_scale())?;
        let dqg = dscores.matmul(&a.k)?;
        let dk = dscores.t()?.matmul(&a.qg)?;
        // Only the new rows' keys/values come from x; the prefix ones are the clean run's.
        let past = a.k.dim(2)? - t;
        let (dk, dv) = (dk.narrow(2, past, t)?, dv.narrow(2, past, t)?);
        // RoPE is a rotation: its transpose is the rotation by −θ.
        let unrope = |g: &Tensor| candle_nn::rotary_emb::rope(&g.contiguous()?, &p.rope.cos, neg_sin);
        let mut dq = unrope(&dqg.reshape((b, nh, t, hd))?)?;
        let mut dk = unrope(&dk)?;
        // Qwen3's per-head norms sit between the projections and RoPE.
        if let (Some(qn), Some(kn), Some(qp), Some(kp)) = (&blk.q_norm, &blk.k_norm, &a.q_pre, &a.k_pre) {
            dq = self.rms_bwd(qp, qn, &dq)?;
            dk = self.rms_bwd(kp, kn, &dk)?;
        }
        let flat = |g: Tensor, heads: usize| g.transpose(1, 2).and_then(|g| g.reshape((b, t, heads * hd)));
        let dq = flat(dq, nh)?;
        let dk = flat(dk, nkv)?;
        let dv = flat(dv, nkv)?;
        let dxn = ((linear_bwd(&dq, blk.q.weight())? + linear_bwd(&dk, blk.k.weight())?)? + linear_bwd(&dv, blk.v.weight())?)?;
        let dx = (&dh + self.rms_bwd(&s.x, &blk.ln1, &dxn)?)?;
        Ok(BlockGrads { dx, dh, dheads, dq, dk, dv })
    }

    /// `dL/dx` of `y = x / rms(x) · w` given `dL/dy`:
    /// `r · (dy·w − x · r² · mean(dy·w·x))` with `r = 1 / sqrt(mean(x²) + eps)`.
    pub(super) fn rms_bwd(&self, x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<Tensor> {
        let eps = self.cfg.rms_norm_eps;
        if let Some(dx) = tail_cuda::rms_bwd(x, w, dy, eps)? {
            return Ok(dx);
        }
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        let dyw = dy.broadcast_mul(w)?;
        let c = ((&dyw * x)?.mean_keepdim(D::Minus1)? * r.sqr()?)?;
        Ok((dyw - x.broadcast_mul(&c)?)?.broadcast_mul(&r)?)
    }
}
