//! Named intervention sites inside each block, and the hook interface the forward pass calls.
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::collections::HashMap;

/// A place in a block where activations can be read or replaced.
///
/// Shapes seen by hooks (b = batch, t = new tokens in this call, d = hidden size):
/// residual sites are `[b, t, d]`; `q` is `[b, t, n_heads*head_dim]`, `k`/`v` are
/// `[b, t, n_kv_heads*head_dim]` (projection outputs, before RoPE); `head_output` is
/// `[b, t, n_heads*head_dim]`, the per-head attention outputs concatenated (the input of o_proj;
/// head h occupies columns `h*head_dim..(h+1)*head_dim`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Site {
    BlockInput,
    Q,
    K,
    V,
    HeadOutput,
    AttnOutput,
    ResidMid,
    MlpOutput,
    BlockOutput,
}

impl Site {
    pub const ALL: [Site; 9] = [
        Site::BlockInput,
        Site::Q,
        Site::K,
        Site::V,
        Site::HeadOutput,
        Site::AttnOutput,
        Site::ResidMid,
        Site::MlpOutput,
        Site::BlockOutput,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Site::BlockInput => "block_input",
            Site::Q => "q",
            Site::K => "k",
            Site::V => "v",
            Site::HeadOutput => "head_output",
            Site::AttnOutput => "attn_output",
            Site::ResidMid => "resid_mid",
            Site::MlpOutput => "mlp_output",
            Site::BlockOutput => "block_output",
        }
    }

    pub fn parse(s: &str) -> Result<Site> {
        match Site::ALL.iter().find(|x| x.name() == s) {
            Some(x) => Ok(*x),
            None => bail!(
                "unknown site {s:?}; expected one of: {}",
                Site::ALL.map(|x| x.name()).join(", ")
            ),
        }
    }

    /// Whether the site carries per-head columns (so a `heads` selection makes sense).
    pub fn is_headed(self) -> bool {
        matches!(self, Site::Q | Site::K | Site::V | Site::HeadOutput)
    }

    /// Heads of a headed site: the KV heads for `k`/`v` (GQA), the query heads otherwise.
    pub fn n_heads(self, cfg: &super::LlamaConfig) -> usize {
        if matches!(self, Site::K | Site::V) {
            cfg.num_kv_heads
        } else {
            cfg.num_heads
        }
    }
}

impl std::fmt::Display for Site {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where in the sequence the current forward call starts (non-zero when decoding with a KV cache),
/// so hooks can map the `t` axis to absolute positions.
#[derive(Debug, Clone, Copy)]
pub struct SiteCtx {
    pub pos_offset: usize,
}

/// Reads and/or replaces activations at sites during one forward pass.
pub trait Hooks {
    /// Cheap filter: the forward pass only materialises/calls `on` where this is true, so a run
    /// with no requests costs nothing.
    fn wants(&self, layer: usize, site: Site) -> bool;
    /// Sees the activation; returning `Some(t)` replaces it (same shape) for the rest of the pass.
    fn on(&mut self, layer: usize, site: Site, act: &Tensor, ctx: SiteCtx) -> Result<Option<Tensor>>;
}

/// Records the full activation tensor at each requested (layer, site).
#[derive(Default)]
pub struct Collector {
    wanted: Vec<(usize, Site)>,
    pub acts: HashMap<(usize, Site), Tensor>,
}

impl Collector {
    pub fn new(wanted: impl IntoIterator<Item = (usize, Site)>) -> Self {
        Self { wanted: wanted.into_iter().collect(), acts: HashMap::new() }
    }
    pub fn get(&self, layer: usize, site: Site) -> Option<&Tensor> {
        self.acts.get(&(layer, site))
    }
}

impl Hooks for Collector {
    fn wants(&self, layer: usize, site: Site) -> bool {
        self.wanted.contains(&(layer, site))
    }
    fn on(&mut self, layer: usize, site: Site, act: &Tensor, _: SiteCtx) -> Result<Option<Tensor>> {
        self.acts.insert((layer, site), act.clone());
        Ok(None)
    }
}

/// Runs several hook sets in order (e.g. an intervention plus a collector).
pub struct HookChain<'a>(pub Vec<&'a mut dyn Hooks>);

impl Hooks for HookChain<'_> {
    fn wants(&self, layer: usize, site: Site) -> bool {
        self.0.iter().any(|h| h.wants(layer, site))
    }
    fn on(&mut self, layer: usize, site: Site, act: &Tensor, ctx: SiteCtx) -> Result<Option<Tensor>> {
        let mut cur: Option<Tensor> = None;
        for h in self.0.iter_mut() {
            if h.wants(layer, site) {
                let a = cur.as_ref().unwrap_or(act);
                if let Some(t) = h.on(layer, site, a, ctx)? {
                    cur = Some(t);
                }
            }
        }
        Ok(cur)
    }
}

/// The linear projections inside a block, the places a weight adapter (RoAd, LoRA) attaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];
    /// The module name used by HF/peft (`q_proj`, ..., `down_proj`); names live in `weights`.
    pub fn hf_name(self) -> &'static str {
        super::weights::proj_leaf(self)
    }
    /// The HF module path inside a layer (`self_attn.q_proj`, `mlp.down_proj`, ...).
    pub fn hf_path(self) -> &'static str {
        super::weights::proj_path(self)
    }
    pub fn parse(s: &str) -> Result<Proj> {
        let s = s.trim();
        let short = s.strip_suffix("_proj").unwrap_or(s);
        match Proj::ALL.iter().find(|p| p.hf_name().strip_suffix("_proj") == Some(short)) {
            Some(p) => Ok(*p),
            None => bail!("unknown projection {s:?}; expected q,k,v,o,gate,up,down"),
        }
    }
}

/// The frozen projection an adapter wraps, `h = x Wᵀ + b`: DoRA needs `W` (its row norms) and
/// BOFT/DoRA rescale `h` without its bias.
#[derive(Clone, Copy)]
pub struct BaseLinear<'a> {
    pub w: &'a Tensor,
    pub b: Option<&'a Tensor>,
    /// The weight's packed copies (the CPU's GEMM), for adapters that fuse the projection.
    pub pack: &'a super::packed_gemm::PackSlot,
}

impl BaseLinear<'_> {
    /// `y + b` where the projection has a bias (Qwen2's q/k/v), `y` otherwise.
    pub fn add_bias(&self, y: Tensor) -> candle_core::Result<Tensor> {
        match self.b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// Transforms a linear projection: its output `h = W x` (RoAd: `R h`; LoRA: `h + B A x`; DoRA:
/// `m/‖W+sBA‖ · (h + s B A x)`) and, for input-side adapters (OFT, BOFT), its input first.
pub trait LinearAdapter: Send + Sync {
    fn touches(&self, layer: usize, proj: Proj) -> bool;
    /// `x` before the projection sees it (OFT/BOFT: `x R`); `None` leaves it unchanged.
    fn adapt_input(&self, _layer: usize, _proj: Proj, _x: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// `h` is the projection of `x` (after `adapt_input`); `base` the frozen weight and bias.
    fn adapt(&self, layer: usize, proj: Proj, x: &Tensor, h: Tensor, base: BaseLinear) -> Result<Tensor>;
    /// The whole adapted projection of `x` (bias included) as one op, where the adapter has one
    /// for the case (LoRA and DoRA training on the CPU: `model::low_rank`); `None` takes the
    /// composed path (`adapt_input`, the base projection, `adapt`).
    fn fused(&self, _layer: usize, _proj: Proj, _x: &Tensor, _base: BaseLinear, _differentiable: bool) -> Result<Option<Tensor>> {
        Ok(None)
    }
}
