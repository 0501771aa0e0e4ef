//! Our own LLaMA-family forward pass (GQA, RoPE, RMSNorm, SwiGLU/GeGLU, and the per-family knobs
//! of `model/arch.rs`) with named intervention sites, padding-aware batching, a KV cache, and a
//! differentiable mode for training. Attention and masks: `llama/attention.rs`.
use super::config::{Act, LlamaConfig};
use super::packed_gemm::PackSlot;
use super::sites::{BaseLinear, Hooks, LinearAdapter, Proj, Site, SiteCtx};
use super::weights::{self, Norm};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, TensorId};
use candle_nn::VarBuilder;

mod attention;
mod ops;
mod site_grads;
mod tail;
pub(crate) mod tail_cuda;

use attention::{last_rows, Attn, Prepared};
pub use site_grads::{LastMetric, SitePass};

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

/// A projection: weight `[out, in]` and, for the families that have one, a bias `[out]`.
struct Lin {
    w: Tensor,
    b: Option<Tensor>,
    /// The weight's packed copy for the CPU GEMM, made on first use.
    pack: PackSlot,
}

impl Lin {
    fn weight(&self) -> &Tensor {
        &self.w
    }
}

/// One block's weights. Norm weights are stored as the factor the norm multiplies by (Gemma's
/// `1 + w` already folded in), so every norm is an ordinary RMSNorm here and in the tail.
struct Block {
    /// Before attention.
    ln1: Tensor,
    q: Lin,
    k: Lin,
    v: Lin,
    o: Lin,
    /// Qwen3's per-head norms of queries and keys (`[head_dim]`).
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    /// Gemma 2's norm of the attention output, before the residual add.
    post_attn: Option<Tensor>,
    /// Before the MLP.
    ln2: Tensor,
    /// Gemma 2's norm of the MLP output, before the residual add.
    post_mlp: Option<Tensor>,
    gate: Lin,
    up: Lin,
    down: Lin,
    /// Whether this layer attends through the sliding window.
    sliding: bool,
}

pub struct Llama {
    pub cfg: LlamaConfig,
    embed: Tensor,
    /// √hidden rounded to the weights' dtype (Gemma; transformers rounds it the same way).
    embed_scale: Option<f64>,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Tensor,
    lm_head_pack: PackSlot,
    inv_freq: Vec<f32>,
    device: Device,
    dtype: DType,
}

impl Llama {
    /// Load from HF-named tensors (names: `model/weights.rs`), with the family's knobs.
    pub fn load(vb: VarBuilder, cfg: LlamaConfig) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.hidden_size;
        let (hq, hkv, hd) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.head_dim);
        let arch = &cfg.arch;
        let dtype = vb.dtype();
        let get = |shape: &[usize], name: &str| -> Result<Tensor> {
            vb.get(shape, name).with_context(|| format!("loading {name}"))
        };
        let norm_w = |name: &str, n: usize| -> Result<Tensor> {
            let w = get(&[n], name)?;
            if !arch.norm_plus_one {
                return Ok(w);
            }
            // x·(1 + w): the 1 is added in f32, as transformers' Gemma RMSNorm does.
            Ok((w.to_dtype(DType::F32)? + 1.0)?.to_dtype(dtype)?)
        };
        let lin = |l: usize, p: Proj, out_d: usize, in_d: usize, bias: bool| -> Result<Lin> {
            let w = get(&[out_d, in_d], &weights::proj_weight(l, p))?;
            let b = if bias { Some(get(&[out_d], &weights::proj_bias(l, p))?) } else { None };
            Ok(Lin { w, b, pack: PackSlot::default() })
        };
        let embed = get(&[cfg.vocab_size, d], weights::EMBED)?;
        let f = arch.family;
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let opt_norm = |on: bool, n: Norm, size: usize| -> Result<Option<Tensor>> {
                if on { Ok(Some(norm_w(&weights::norm(f, i, n), size)?)) } else { Ok(None) }
            };
            blocks.push(Block {
                ln1: norm_w(&weights::norm(f, i, Norm::PreAttn), d)?,
                q: lin(i, Proj::Q, hq, d, arch.qkv_bias)?,
                k: lin(i, Proj::K, hkv, d, arch.qkv_bias)?,
                v: lin(i, Proj::V, hkv, d, arch.qkv_bias)?,
                o: lin(i, Proj::O, d, hq, arch.o_bias)?,
                q_norm: opt_norm(arch.qk_norm, Norm::Q, hd)?,
                k_norm: opt_norm(arch.qk_norm, Norm::K, hd)?,
                post_attn: opt_norm(arch.sandwich_norms, Norm::PostAttn, d)?,
                ln2: norm_w(&weights::norm(f, i, Norm::PreMlp), d)?,
                post_mlp: opt_norm(arch.sandwich_norms, Norm::PostMlp, d)?,
                gate: lin(i, Proj::Gate, cfg.intermediate_size, d, false)?,
                up: lin(i, Proj::Up, cfg.intermediate_size, d, false)?,
                down: lin(i, Proj::Down, d, cfg.intermediate_size, false)?,
                sliding: arch.is_sliding(i),
            });
        }
        let norm = norm_w(weights::FINAL_NORM, d)?;
        if !cfg.tie_word_embeddings && !vb.contains_tensor(weights::LM_HEAD) {
            // transformers would initialise a random head here; a silent tie is no better.
            bail!("tie_word_embeddings is false but the checkpoint has no {}", weights::LM_HEAD);
        }
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            get(&[cfg.vocab_size, d], weights::LM_HEAD)?
        };
        let embed_scale = if arch.embed_scale {
            // transformers: torch.tensor(hidden ** 0.5, dtype=hidden_states.dtype).
            let s = Tensor::new(&[(d as f64).sqrt() as f32], &Device::Cpu)?.to_dtype(dtype)?;
            Some(s.to_dtype(DType::F32)?.to_vec1::<f32>()?[0] as f64)
        } else {
            None
        };
        Ok(Self {
            inv_freq: cfg.rope_inv_freq(),
            device: vb.device().clone(),
            dtype,
            cfg,
            embed,
            embed_scale,
            blocks,
            norm,
            lm_head,
            lm_head_pack: PackSlot::default(),
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

    /// Final-logit soft-capping `c · tanh(z / c)` (Gemma 2); identity for other families. Code
    /// that multiplies hidden states by [`Self::lm_head`] itself applies this to match the forward.
    pub fn cap_logits(&self, logits: Tensor) -> Result<Tensor> {
        match self.cfg.arch.final_softcap {
            Some(c) => Ok(((logits / c)?.tanh()? * c)?),
            None => Ok(logits),
        }
    }

    /// Rebuild this model with every weight a `Var` in a fresh `VarMap` (HF names), so a
    /// differentiable forward pass yields gradients for all of them (full fine-tuning).
    pub fn to_varmap(&self) -> Result<(candle_nn::VarMap, Llama)> {
        let vm = candle_nn::VarMap::new();
        {
            let mut data = vm.data().lock().map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?;
            for (name, t) in self.named_weights()? {
                // A copy, so training never mutates the tensors of the model we started from.
                data.insert(name, candle_core::Var::from_tensor(&t.copy()?)?);
            }
        }
        let vb = VarBuilder::from_varmap(&vm, self.dtype, &self.device);
        let model = Llama::load(vb, self.cfg.clone())?;
        Ok((vm, model))
    }

    fn lin_slot(&self, layer: usize, proj: Proj) -> &Lin {
        let b = &self.blocks[layer];
        match proj {
            Proj::Q => &b.q,
            Proj::K => &b.k,
            Proj::V => &b.v,
            Proj::O => &b.o,
            Proj::Gate => &b.gate,
            Proj::Up => &b.up,
            Proj::Down => &b.down,
        }
    }

    /// The weight `[out, in]` of a projection, for merging adapters.
    pub fn proj_weight(&self, layer: usize, proj: Proj) -> &Tensor {
        &self.lin_slot(layer, proj).w
    }

    /// The bias `[out]` of a projection, where the family has one (Qwen2's q/k/v).
    pub fn proj_bias(&self, layer: usize, proj: Proj) -> Option<&Tensor> {
        self.lin_slot(layer, proj).b.as_ref()
    }

    /// Replace a projection's weight (used by adapter merge/unmerge and full fine-tuning).
    pub fn set_proj_weight(&mut self, layer: usize, proj: Proj, w: Tensor) -> Result<()> {
        let slot = self.lin_slot_mut(layer, proj);
        if slot.w.dims() != w.dims() {
            bail!("weight shape {:?} does not match {:?}", w.dims(), slot.w.dims());
        }
        slot.w = w;
        slot.pack = PackSlot::default();
        Ok(())
    }

    /// Replace a projection's bias (merging a RoAd rotation rotates the bias too).
    pub fn set_proj_bias(&mut self, layer: usize, proj: Proj, b: Tensor) -> Result<()> {
        let slot = self.lin_slot_mut(layer, proj);
        match &slot.b {
            Some(old) if old.dims() == b.dims() => {}
            Some(old) => bail!("bias shape {:?} does not match {:?}", b.dims(), old.dims()),
            None => bail!("layer {layer} {} has no bias", proj.hf_name()),
        }
        slot.b = Some(b);
        Ok(())
    }

    fn lin_slot_mut(&mut self, layer: usize, proj: Proj) -> &mut Lin {
        let b = &mut self.blocks[layer];
        match proj {
            Proj::Q => &mut b.q,
            Proj::K => &mut b.k,
            Proj::V => &mut b.v,
            Proj::O => &mut b.o,
            Proj::Gate => &mut b.gate,
            Proj::Up => &mut b.up,
            Proj::Down => &mut b.down,
        }
    }

    /// All weights under their HF names (tied lm_head omitted), for saving merged checkpoints.
    /// Norm weights are given in the checkpoint's convention (Gemma: `w`, not `1 + w`).
    pub fn named_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let f = self.cfg.arch.family;
        let norm = |w: &Tensor| -> Result<Tensor> {
            if !self.cfg.arch.norm_plus_one {
                return Ok(w.clone());
            }
            Ok((w.to_dtype(DType::F32)? - 1.0)?.to_dtype(self.dtype)?)
        };
        let mut out = vec![(weights::EMBED.to_string(), self.embed.clone())];
        for (i, b) in self.blocks.iter().enumerate() {
            out.push((weights::norm(f, i, Norm::PreAttn), norm(&b.ln1)?));
            out.push((weights::norm(f, i, Norm::PreMlp), norm(&b.ln2)?));
            for (n, w) in [(Norm::Q, &b.q_norm), (Norm::K, &b.k_norm), (Norm::PostAttn, &b.post_attn), (Norm::PostMlp, &b.post_mlp)] {
                if let Some(w) = w {
                    out.push((weights::norm(f, i, n), norm(w)?));
                }
            }
            for proj in Proj::ALL {
                let l = self.lin_slot(i, proj);
                out.push((weights::proj_weight(i, proj), l.w.clone()));
                if let Some(bias) = &l.b {
                    out.push((weights::proj_bias(i, proj), bias.clone()));
                }
            }
        }
        out.push((weights::FINAL_NORM.into(), norm(&self.norm)?));
        if !self.cfg.tie_word_embeddings {
            out.push((weights::LM_HEAD.into(), self.lm_head.clone()));
        }
        Ok(out)
    }

    /// Run the model on token ids `[b][t]` (all rows the same length; pad with any id and mark
    /// padding in `fwd.attention_mask`).
    pub fn forward(&self, ids: &[Vec<u32>], fwd: Fwd<'_>) -> Result<FwdOut> {
        let Fwd { attention_mask, mut cache, mut hooks, adapter, logits, differentiable, start, end } = fwd;
        let past = cache.as_ref().map(|c| c.seq_len()).unwrap_or(0);
        let p = self.prepare(ids, attention_mask, past)?;
        let (b, t) = (p.b, p.t);
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
            None => (0, self.embed_ids(ids, b, t)?),
        };
        let ctx = SiteCtx { pos_offset: past };
        // A bf16 model's inference attention runs in f32 on the CPU (`attention_upcast`); not
        // with Qwen3's per-head norms, whose bf16 weights would meet f32 queries.
        let upcast = !differentiable && self.dtype == DType::BF16 && !self.cfg.arch.qk_norm;
        let p32 = if upcast && crate::runtime::cpu_fast_path(&self.device) {
            Some(p.to_f32()?)
        } else {
            None
        };

        if first_layer > end {
            bail!("cannot resume at layer {first_layer} and stop before layer {end}");
        }
        // A norm computed together with the residual add that produced `x` (fused on CUDA),
        // valid only while `x` is that sum (a hook that replaces it voids it).
        let mut pending: Option<(TensorId, Tensor)> = None;
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
            let lin = |p: Proj, l: &Lin, xin: &Tensor| -> Result<Tensor> {
                match adapter {
                    Some(ad) if ad.touches(li, p) => {
                        let base = BaseLinear { w: &l.w, b: l.b.as_ref(), pack: &l.pack };
                        if let Some(y) = ad.fused(li, p, xin, base, differentiable)? {
                            return Ok(y);
                        }
                        let rotated = ad.adapt_input(li, p, xin)?;
                        let xin = rotated.as_ref().unwrap_or(xin);
                        let h = self.lin(l, xin, differentiable)?;
                        ad.adapt(li, p, xin, h, base)
                    }
                    _ => self.lin(l, xin, differentiable),
                }
            };
            let post = |n: &Option<Tensor>, a: Tensor| -> Result<Tensor> {
                match n {
                    Some(w) => self.rms(&a, w, differentiable),
                    None => Ok(a),
                }
            };
            x = site(Site::BlockInput, x)?;
            let hn = self.normed(&x, &blk.ln1, pending.take(), differentiable)?;
            let q = site(Site::Q, lin(Proj::Q, &blk.q, &hn)?)?;
            let k = site(Site::K, lin(Proj::K, &blk.k, &hn)?)?;
            let v = site(Site::V, lin(Proj::V, &blk.v, &hn)?)?;
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[li]);
            let prefix = layer_cache.as_deref().and_then(Option::as_ref);
            let (ak, av, heads) = match &p32 {
                Some(p32) => self.attention_upcast(blk, &q, &k, &v, p32, prefix)?,
                None if !differentiable => self.attention_inference(blk, &q, &k, &v, &p, prefix, layer_cache.is_some())?,
                None => {
                    let a = self.attention(blk, &q, &k, &v, &p, prefix, differentiable)?;
                    (a.k, a.v, a.heads)
                }
            };
            if let Some(slot) = layer_cache {
                *slot = Some((ak, av));
            }
            let heads = site(Site::HeadOutput, heads)?;
            // attn_output / mlp_output are what the sublayer adds to the residual stream (after
            // Gemma's post-norms).
            let attn = site(Site::AttnOutput, post(&blk.post_attn, lin(Proj::O, &blk.o, &heads)?)?)?;
            let (sum, pre) = self.add_then_norm(&x, &attn, Some(&blk.ln2), differentiable)?;
            x = site(Site::ResidMid, sum)?;
            let hn = self.normed(&x, &blk.ln2, pre, differentiable)?;
            let g = lin(Proj::Gate, &blk.gate, &hn)?;
            let u = lin(Proj::Up, &blk.up, &hn)?;
            let m = self.act_mul(&g, &u, differentiable)?;
            let mlp = site(Site::MlpOutput, post(&blk.post_mlp, lin(Proj::Down, &blk.down, &m)?)?)?;
            // The next norm (the following block's, or the final one) rides on the add.
            let next = match self.blocks.get(li + 1) {
                Some(nb) if li + 1 < end => Some(&nb.ln1),
                _ if li + 1 == self.cfg.num_layers && !stop_early => Some(&self.norm),
                _ => None,
            };
            let (sum, pre) = self.add_then_norm(&x, &mlp, next, differentiable)?;
            pending = pre;
            x = site(Site::BlockOutput, sum)?;
        }
        if stop_early {
            return Ok(FwdOut { logits: None, hidden: x });
        }
        let hidden = self.normed(&x, &self.norm, pending.take(), differentiable)?;
        let logits = match logits {
            LogitsAt::None => None,
            LogitsAt::All => Some(self.cap_logits(self.head(&hidden, differentiable)?)?),
            LogitsAt::Last => {
                // Last real token per row (right padding leaves trailing zeros in the mask).
                // One gather over the flattened `[b·t, d]` rows (not b slices + a stack: on a GPU
                // each slice is a kernel launch, every decode step).
                let idx = last_rows(&p.mask_rows, past, t, &self.device)?;
                let last = hidden.reshape((b * t, self.cfg.hidden_size))?.index_select(&idx, 0)?;
                Some(self.cap_logits(self.head(&last, differentiable)?)?)
            }
        };
        Ok(FwdOut { logits, hidden })
    }

    /// The block input of layer 0 for `ids` (all rows one length): what [`Fwd::start`] at layer
    /// 0 takes, so a caller can run the model on its own mix of embeddings (integrated
    /// gradients interpolate base and source inputs).
    pub fn embed(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        let p = self.prepare(ids, None, 0)?;
        self.embed_ids(ids, p.b, p.t)
    }

    /// Token embeddings `[b, t, d]` (× √hidden for Gemma).
    fn embed_ids(&self, ids: &[Vec<u32>], b: usize, t: usize) -> Result<Tensor> {
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let flat = Tensor::from_vec(flat, b * t, &self.device)?;
        let x = self.embed.index_select(&flat, 0)?.reshape((b, t, self.cfg.hidden_size))?;
        match self.embed_scale {
            Some(s) => Ok((x * s)?),
            None => Ok(x),
        }
    }
}
