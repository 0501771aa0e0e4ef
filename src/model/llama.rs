//! Our own LLaMA forward pass (GQA, RoPE, RMSNorm, SwiGLU) with named intervention sites,
//! padding-aware batching, a KV cache, and a differentiable mode for training.
use super::config::LlamaConfig;
use super::sites::{Hooks, LinearAdapter, Proj, Site, SiteCtx};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Linear, VarBuilder};

mod tail;
mod tail_cuda;

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsAt {
    All,
    Last,
    None,
}

/// Per-call options for [`Llama::forward`].
pub struct Fwd<'a> {
    /// `[b, past + t]`, 1 for real tokens and 0 for padding (left or right). None = no padding.
    pub attention_mask: Option<&'a [Vec<u8>]>,
    pub cache: Option<&'a mut KvCache>,
    pub hooks: Option<&'a mut dyn Hooks>,
    pub adapter: Option<&'a dyn LinearAdapter>,
    pub logits: LogitsAt,
    /// Use only ops with a backward pass (candle's fused rms_norm/softmax have none).
    pub differentiable: bool,
    /// Resume at block `layer` with this `[b, t, d]` block input instead of embedding `ids`
    /// (ids still give the shape). Interventions at layer L reuse the clean run's blocks < L.
    pub start: Option<(usize, Tensor)>,
    /// Stop before block `end`: `hidden` is the residual stream entering it (no final norm, no
    /// logits). Training runs the rest through [`Llama::tail_loss_grad`].
    pub end: Option<usize>,
}

impl Default for Fwd<'_> {
    fn default() -> Self {
        Self {
            attention_mask: None,
            cache: None,
            hooks: None,
            adapter: None,
            logits: LogitsAt::All,
            differentiable: false,
            start: None,
            end: None,
        }
    }
}

/// Per-layer keys/values (after RoPE) of everything seen so far.
#[derive(Default, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self { layers: vec![None; n_layers] }
    }
    /// A cache from per-layer (k, v) `[b, n_kv, s, head_dim]`; `None` for layers a resumed
    /// forward skips.
    pub fn from_layers(layers: Vec<Option<(Tensor, Tensor)>>) -> Self {
        Self { layers }
    }
    pub fn layer(&self, l: usize) -> Option<&(Tensor, Tensor)> {
        self.layers.get(l).and_then(|x| x.as_ref())
    }
    /// Cached positions (of the first layer that has any).
    pub fn seq_len(&self) -> usize {
        self.layers.iter().flatten().next().map(|(k, _)| k.dim(2).unwrap_or(0)).unwrap_or(0)
    }
}

/// Output of one forward call.
pub struct FwdOut {
    /// `[b, t, vocab]` (All), `[b, vocab]` (Last: last *real* token of each row), or None.
    pub logits: Option<Tensor>,
    /// Final hidden states after the last RMSNorm, `[b, t, d]`.
    pub hidden: Tensor,
}

struct Block {
    ln1: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln2: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

pub struct Llama {
    pub cfg: LlamaConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Tensor,
    inv_freq: Vec<f32>,
    device: Device,
    dtype: DType,
}

fn linear(vb: &VarBuilder, name: &str, out_d: usize, in_d: usize) -> Result<Linear> {
    let w = vb
        .get((out_d, in_d), &format!("{name}.weight"))
        .with_context(|| format!("loading {name}.weight"))?;
    Ok(Linear::new(w, None))
}

impl Llama {
    /// Load from HF-named tensors (`model.layers.N.self_attn.q_proj.weight`, ...).
    pub fn load(vb: VarBuilder, cfg: LlamaConfig) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.hidden_size;
        let (hq, hkv) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
        let m = vb.pp("model");
        let embed = m
            .get((cfg.vocab_size, d), "embed_tokens.weight")
            .context("loading model.embed_tokens.weight")?;
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let l = m.pp(format!("layers.{i}"));
            blocks.push(Block {
                ln1: l.get(d, "input_layernorm.weight")?,
                q: linear(&l, "self_attn.q_proj", hq, d)?,
                k: linear(&l, "self_attn.k_proj", hkv, d)?,
                v: linear(&l, "self_attn.v_proj", hkv, d)?,
                o: linear(&l, "self_attn.o_proj", d, hq)?,
                ln2: l.get(d, "post_attention_layernorm.weight")?,
                gate: linear(&l, "mlp.gate_proj", cfg.intermediate_size, d)?,
                up: linear(&l, "mlp.up_proj", cfg.intermediate_size, d)?,
                down: linear(&l, "mlp.down_proj", d, cfg.intermediate_size)?,
            });
        }
        let norm = m.get(d, "norm.weight").context("loading model.norm.weight")?;
        let lm_head = if cfg.tie_word_embeddings || !vb.contains_tensor("lm_head.weight") {
            embed.clone()
        } else {
            vb.get((cfg.vocab_size, d), "lm_head.weight")?
        };
        Ok(Self {
            inv_freq: cfg.rope_inv_freq(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
            cfg,
            embed,
            blocks,
            norm,
            lm_head,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn embeddings(&self) -> &Tensor {
        &self.embed
    }
    /// The output projection `[vocab, d]` (the embedding matrix when tied).
    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    /// Rebuild this model with every weight a `Var` in a fresh `VarMap` (HF names), so a
    /// differentiable forward pass yields gradients for all of them (full fine-tuning).
    pub fn to_varmap(&self) -> Result<(candle_nn::VarMap, Llama)> {
        let vm = candle_nn::VarMap::new();
        {
            let mut data = vm.data().lock().map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?;
            for (name, t) in self.named_weights() {
                // A copy, so training never mutates the tensors of the model we started from.
                data.insert(name, candle_core::Var::from_tensor(&t.copy()?)?);
            }
        }
        let vb = VarBuilder::from_varmap(&vm, self.dtype, &self.device);
        let model = Llama::load(vb, self.cfg.clone())?;
        Ok((vm, model))
    }

    /// The weight `[out, in]` of a projection, for merging adapters.
    pub fn proj_weight(&self, layer: usize, proj: Proj) -> &Tensor {
        let b = &self.blocks[layer];
        match proj {
            Proj::Q => b.q.weight(),
            Proj::K => b.k.weight(),
            Proj::V => b.v.weight(),
            Proj::O => b.o.weight(),
            Proj::Gate => b.gate.weight(),
            Proj::Up => b.up.weight(),
            Proj::Down => b.down.weight(),
        }
    }

    /// Replace a projection's weight (used by adapter merge/unmerge and full fine-tuning).
    pub fn set_proj_weight(&mut self, layer: usize, proj: Proj, w: Tensor) -> Result<()> {
        let old = self.proj_weight(layer, proj);
        if old.dims() != w.dims() {
            bail!("weight shape {:?} does not match {:?}", w.dims(), old.dims());
        }
        let b = &mut self.blocks[layer];
        let slot = match proj {
            Proj::Q => &mut b.q,
            Proj::K => &mut b.k,
            Proj::V => &mut b.v,
            Proj::O => &mut b.o,
            Proj::Gate => &mut b.gate,
            Proj::Up => &mut b.up,
            Proj::Down => &mut b.down,
        };
        *slot = Linear::new(w, None);
        Ok(())
    }

    /// All weights under their HF names (tied lm_head omitted), for saving merged checkpoints.
    pub fn named_weights(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed.clone())];
        for (i, b) in self.blocks.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), b.ln1.clone()));
            out.push((format!("{p}.post_attention_layernorm.weight"), b.ln2.clone()));
            for proj in Proj::ALL {
                out.push((format!("{p}.{}.weight", proj.hf_path()), self.proj_weight(i, proj).clone()));
            }
        }
        out.push(("model.norm.weight".into(), self.norm.clone()));
        if !self.cfg.tie_word_embeddings {
            out.push(("lm_head.weight".into(), self.lm_head.clone()));
        }
        out
    }

    /// Run the model on token ids `[b][t]` (all rows the same length; pad with any id and mark
    /// padding in `fwd.attention_mask`).
    pub fn forward(&self, ids: &[Vec<u32>], fwd: Fwd<'_>) -> Result<FwdOut> {
        let Fwd { attention_mask, mut cache, mut hooks, adapter, logits, differentiable, start, end } = fwd;
        let past = cache.as_ref().map(|c| c.seq_len()).unwrap_or(0);
        let Prepared { b, t, mask_rows, rope, mask, .. } = self.prepare(ids, attention_mask, past)?;
        let stop_early = end.is_some();
        let end = end.unwrap_or(self.cfg.num_layers);
        if end > self.cfg.num_layers {
            bail!("cannot stop before layer {end}: the model has {} layers", self.cfg.num_layers);
        }
        let (first_layer, mut x) = match start {
            Some((l, x0)) => {
                // l == num_layers: only the final norm and head are left.
                if l > self.cfg.num_layers {
                    bail!("cannot resume at layer {l}: the model has {} layers", self.cfg.num_layers);
                }
                if x0.dims() != [b, t, self.cfg.hidden_size] {
                    bail!("resumed block input must be [b={b}, t={t}, d={}]", self.cfg.hidden_size);
                }
                // Fused kernels need contiguous rows (a no-op when they already are).
                (l, x0.contiguous()?)
            }
            None => {
                let flat: Vec<u32> = ids.iter().flatten().copied().collect();
                let flat = Tensor::from_vec(flat, b * t, &self.device)?;
                (0, self.embed.index_select(&flat, 0)?.reshape((b, t, self.cfg.hidden_size))?)
            }
        };
        let ctx = SiteCtx { pos_offset: past };

        if first_layer > end {
            bail!("cannot resume at layer {first_layer} and stop before layer {end}");
        }
        for (li, blk) in self.blocks.iter().enumerate().take(end).skip(first_layer) {
            let mut site = |s: Site, a: Tensor| -> Result<Tensor> {
                if let Some(h) = hooks.as_deref_mut() {
                    if h.wants(li, s) {
                        if let Some(r) = h.on(li, s, &a, ctx)? {
                            if r.dims() != a.dims() {
                                bail!("hook at layer {li} site {s} returned shape {:?}, expected {:?}", r.dims(), a.dims());
                            }
                            return Ok(r);
                        }
                    }
                }
                Ok(a)
            };
            let lin = |p: Proj, l: &Linear, xin: &Tensor| -> Result<Tensor> {
                let h = self.linear(l.weight(), xin, differentiable)?;
                match adapter {
                    Some(ad) if ad.touches(li, p) => ad.adapt(li, p, xin, h),
                    _ => Ok(h),
                }
            };
            x = site(Site::BlockInput, x)?;
            let hn = self.rms(&x, &blk.ln1, differentiable)?;
            let q = site(Site::Q, lin(Proj::Q, &blk.q, &hn)?)?;
            let k = site(Site::K, lin(Proj::K, &blk.k, &hn)?)?;
            let v = site(Site::V, lin(Proj::V, &blk.v, &hn)?)?;
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[li]);
            let prefix = layer_cache.as_deref().and_then(Option::as_ref);
            let a = self.attention(&q, &k, &v, &rope, mask.as_ref(), prefix, b, t, differentiable)?;
            if let Some(slot) = layer_cache {
                *slot = Some((a.k, a.v));
            }
            let heads = site(Site::HeadOutput, a.heads)?;
            let attn = site(Site::AttnOutput, lin(Proj::O, &blk.o, &heads)?)?;
            x = site(Site::ResidMid, (x + attn)?)?;
            let hn = self.rms(&x, &blk.ln2, differentiable)?;
            let g = lin(Proj::Gate, &blk.gate, &hn)?;
            let u = lin(Proj::Up, &blk.up, &hn)?;
            let mlp = site(Site::MlpOutput, lin(Proj::Down, &blk.down, &(candle_nn::ops::silu(&g)? * u)?)?)?;
            x = site(Site::BlockOutput, (x + mlp)?)?;
        }
        if stop_early {
            return Ok(FwdOut { logits: None, hidden: x });
        }
        let hidden = self.rms(&x, &self.norm, differentiable)?;
        let logits = match logits {
            LogitsAt::None => None,
            LogitsAt::All => Some(hidden.broadcast_matmul(&self.lm_head.t()?)?),
            LogitsAt::Last => {
                // Last real token per row (right padding leaves trailing zeros in the mask).
                // One gather over the flattened `[b·t, d]` rows (not b slices + a stack: on a GPU
                // each slice is a kernel launch, every decode step).
                let idx = last_rows(&mask_rows, past, t, &self.device)?;
                let last = hidden.reshape((b * t, self.cfg.hidden_size))?.index_select(&idx, 0)?;
                Some(self.linear(&self.lm_head, &last, differentiable)?)
            }
        };
        Ok(FwdOut { logits, hidden })
    }

    /// Checks shared by every forward call, padding-aware position ids, RoPE tables and the
    /// additive attention mask for `t` new tokens after `past` cached ones.
    fn prepare(&self, ids: &[Vec<u32>], attention_mask: Option<&[Vec<u8>]>, past: usize) -> Result<Prepared> {
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
        // A single new token with no padding may attend to everything: no mask needed (decode).
        let mask = if t == 1 && mask_rows.iter().all(|r| r.iter().all(|&m| m == 1)) {
            None
        } else {
            let m = self.attn_mask(&mask_rows, past, t)?;
            if crate::runtime::cpu_fast_path(&self.device) {
                Some(m)
            } else {
                // Off the CPU, candle's broadcasting add walks strides per element: on a
                // [b, heads, t, s] score tensor that one add took over a quarter of a 7B-shape
                // prefill. Expanded once per call (shared by every layer), the add is a plain
                // contiguous one.
                Some(m.broadcast_as((b, self.cfg.num_heads, t, past + t))?.contiguous()?)
            }
        };

        Ok(Prepared { b, t, past, mask_rows, rope, mask })
    }

    /// `x @ wᵀ`, through the decode fast path when it applies (inference only).
    fn linear(&self, w: &Tensor, x: &Tensor, differentiable: bool) -> Result<Tensor> {
        if !differentiable {
            if let Some(y) = super::gemv::try_linear(x, w)? {
                return Ok(y);
            }
        } else if let Some(y) = super::frozen::try_frozen_linear(x, w)? {
            return Ok(y);
        }
        // One GEMM over all rows: a `[b, t, in]` batch as `[b·t, in]`. broadcast_matmul would
        // run b small GEMMs against a stride-0 weight, which on CUDA is a strided-batched call
        // far from peak for short sequences.
        let dims = x.dims();
        let in_d = *dims.last().expect("rank >= 1");
        let rows = x.elem_count() / in_d.max(1);
        let y = x.reshape((rows, in_d))?.matmul(&w.t()?)?;
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("rank >= 1") = w.dim(0)?;
        Ok(y.reshape(shape)?)
    }

    fn rms(&self, x: &Tensor, w: &Tensor, differentiable: bool) -> Result<Tensor> {
        let eps = self.cfg.rms_norm_eps as f32;
        Ok(if differentiable {
            candle_nn::ops::rms_norm_slow(x, w, eps)?
        } else {
            candle_nn::ops::rms_norm(x, w, eps)?
        })
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
        let cos = Tensor::from_vec(cos, shape, &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, shape, &self.device)?.to_dtype(self.dtype)?;
        Ok(Rope { cos, sin })
    }

    /// Additive mask `[b, 1, t, past+t]`: causal, and padding keys excluded.
    fn attn_mask(&self, rows: &[Vec<u8>], past: usize, t: usize) -> Result<Tensor> {
        let total = past + t;
        let b = rows.len();
        let mut m = vec![0f32; b * t * total];
        let neg = crate::runtime::mask_neg(self.dtype);
        for (bi, row) in rows.iter().enumerate() {
            for qi in 0..t {
                let qpos = past + qi;
                for (kj, &keep) in row.iter().enumerate() {
                    if kj > qpos || keep == 0 {
                        // Large finite value, so a fully padded query row stays finite.
                        m[(bi * t + qi) * total + kj] = neg;
                    }
                }
            }
        }
        Ok(Tensor::from_vec(m, (b, 1, t, total), &self.device)?.to_dtype(self.dtype)?)
    }

    /// Attention of `t` new rows (projections `[b, t, heads·hd]`) over `prefix` (cached keys and
    /// values, `[b, n_kv, past, hd]`, already rotated) and themselves.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        rope: &Rope,
        mask: Option<&Tensor>,
        prefix: Option<&(Tensor, Tensor)>,
        b: usize,
        t: usize,
        differentiable: bool,
    ) -> Result<Attn> {
        let (nh, nkv, hd) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let q = q.reshape((b, t, nh, hd))?.transpose(1, 2)?;
        let k = k.reshape((b, t, nkv, hd))?.transpose(1, 2)?;
        let v = v.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let q = rope.apply(&q, differentiable)?;
        let k = rope.apply(&k, differentiable)?;
        let (k, v) = match prefix {
            Some((pk, pv)) => (cat_keys(pk, &k)?, cat_keys(pv, &v)?),
            None => (k, v),
        };
        let s = k.dim(2)?;
        // GQA without copying K/V: fold the query heads of one KV group into the row axis.
        let rep = nh / nkv;
        let qg = q.reshape((b, nkv, rep * t, hd))?;
        let scale = self.attn_scale();
        let scores = if crate::runtime::cpu_fast_path(q.device()) {
            (qg.matmul(&k.t()?)? * scale)?
        } else {
            // Scaling q ([.., t, hd]) instead of the scores ([.., t, s]) saves a pass over the
            // largest tensor of long prefills.
            (&qg * scale)?.matmul(&k.t()?)?
        };
        let scores = scores.reshape((b, nh, t, s))?;
        let scores = match mask {
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
        Ok(Attn { qg, k, v, probs, heads })
    }

    /// `1/√head_dim`, the attention scores' scale.
    fn attn_scale(&self) -> f64 {
        1.0 / (self.cfg.head_dim as f64).sqrt()
    }
}

/// One attention call's output and what the frozen tail's backward needs from it.
struct Attn {
    /// Rotated queries grouped by KV head (unscaled), `[b, n_kv, rep·t, hd]`.
    qg: Tensor,
    /// Keys/values over prefix + new rows, `[b, n_kv, past + t, hd]` (the layer's new cache).
    k: Tensor,
    v: Tensor,
    /// Attention probabilities, `[b, n_kv, rep·t, past + t]`.
    probs: Tensor,
    /// `[b, t, heads·hd]`.
    heads: Tensor,
}

/// What [`Llama::prepare`] derives from a call's ids, mask and cache.
struct Prepared {
    b: usize,
    t: usize,
    past: usize,
    mask_rows: Vec<Vec<u8>>,
    rope: Rope,
    /// Additive `[b, 1, t, past+t]` (CPU) or expanded `[b, heads, t, past+t]`; None for decode.
    mask: Option<Tensor>,
}

/// Flat row index (into `[b·t, ..]`) of each row's last real token (right padding leaves
/// trailing zeros in the mask).
fn last_rows(mask_rows: &[Vec<u8>], past: usize, t: usize, device: &Device) -> Result<Tensor> {
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
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// RoPE on `[b, heads, t, head_dim]`. Inference uses candle's fused kernel (CPU and CUDA:
    /// one launch instead of ~6 per call); training composes differentiable primitives, since
    /// the fused op has no backward.
    fn apply(&self, x: &Tensor, differentiable: bool) -> Result<Tensor> {
        if !differentiable {
            return Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, &self.cos, &self.sin)?);
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
