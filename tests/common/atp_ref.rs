//! The plainly written references of tests/atp.rs: a per-cell backward through a hand-made
//! replacement `a ← a + α (s − a)` (dm/dα at α = 0 is the cell's AtP estimate), the same with a
//! layer's attention and MLP outputs detached (GradDrop), central finite differences of the fused
//! inference forward, the QK fix as a real patch times the head-output gradient, and the pairs.
use candle_core::{DType, Device, Tensor, Var};
use road_dii::experiment::atp::{self, AtpCell};
use road_dii::experiment::data::left_pad;
use road_dii::intervene::atp::{AtpMetric, AtpOptions};
use road_dii::model::{registry, Collector, Fwd, Hooks, Llama, Loaded, LogitsAt, Site, SiteCtx};
use road_dii::tasks::{self, Pair, Prompt};
use std::collections::BTreeMap;
use std::sync::OnceLock;

pub fn tiny() -> &'static Loaded {
    static M: OnceLock<Loaded> = OnceLock::new();
    M.get_or_init(|| registry::load("tiny-equality", DType::F32, &Device::Cpu, false).expect("load data/models/tiny-equality"))
}

/// Replaces, in row i at position `pos[i]` (and the cell's head columns), `a` by `a + α (s_i − a)`.
pub struct AlphaSwap {
    layer: usize,
    site: Site,
    pos: Vec<usize>,
    source: Vec<Vec<f32>>,
    cols: std::ops::Range<usize>,
    /// The clean base vectors `(s − b)` is taken against; None = the run's own (the clean base
    /// when the run is the base's).
    base: Option<Vec<Vec<f32>>>,
    alpha: Tensor,
}

impl Hooks for AlphaSwap {
    fn wants(&self, l: usize, s: Site) -> bool {
        l == self.layer && s == self.site
    }
    fn on(&mut self, _: usize, _: Site, act: &Tensor, _: SiteCtx) -> anyhow::Result<Option<Tensor>> {
        let (b, t, w) = act.dims3()?;
        let a = act.detach().to_vec3::<f32>()?;
        let mut d = vec![0f32; b * t * w];
        for i in 0..b {
            for c in self.cols.clone() {
                let b = self.base.as_ref().map_or(a[i][self.pos[i]][c], |v| v[i][c]);
                d[(i * t + self.pos[i]) * w + c] = self.source[i][c] - b;
            }
        }
        let d = Tensor::from_vec(d, (b, t, w), act.device())?;
        Ok(Some((act + d.broadcast_mul(&self.alpha)?)?))
    }
}

/// Σ over rows of the metric from last-position logits.
pub fn metric_sum(logits: &Tensor, pairs: &[Pair], which: AtpMetric) -> Tensor {
    let l = logits.to_dtype(DType::F32).unwrap();
    let mut terms = Vec::new();
    for (i, p) in pairs.iter().enumerate() {
        let row = l.get(i).unwrap();
        let t = match which {
            AtpMetric::LogitDiff => (row.get(p.cf_label as usize).unwrap() - row.get(p.base.label as usize).unwrap()).unwrap(),
            AtpMetric::Logprob => candle_nn::ops::log_softmax(&row, 0).unwrap().get(p.cf_label as usize).unwrap(),
        };
        terms.push(t);
    }
    Tensor::stack(&terms, 0).unwrap().sum_all().unwrap()
}

/// Each row's clean source (or base) vector at the cell's position (a plain forward, padded).
pub fn clean_vectors(m: &Llama, pairs: &[Pair], c: &AtpCell, source: bool) -> Vec<Vec<f32>> {
    let side = |p: &Pair| if source { p.source.clone() } else { p.base.clone() };
    let (ids, mask, offs) = left_pad(&pairs.iter().map(|p| side(p).ids).collect::<Vec<_>>().iter().map(|v| v.as_slice()).collect::<Vec<_>>());
    let mut col = Collector::new([(c.layer, c.site)]);
    m.forward(&ids, Fwd { attention_mask: Some(&mask), hooks: Some(&mut col), logits: LogitsAt::None, ..Default::default() }).unwrap();
    let a = col.get(c.layer, c.site).unwrap().to_vec3::<f32>().unwrap();
    pairs.iter().enumerate().map(|(i, p)| a[i][offs[i] + side(p).position(&c.position).unwrap()].clone()).collect()
}

/// The swap of cell `c` over the left-padded base batch, at scale `alpha`.
pub fn swap_for(m: &Llama, pairs: &[Pair], c: &AtpCell, alpha: Tensor, clean_base: bool) -> (AlphaSwap, Vec<Vec<u32>>, Vec<Vec<u8>>) {
    let (ids, mask, offs) = left_pad(&pairs.iter().map(|p| p.base.ids.as_slice()).collect::<Vec<_>>());
    let hd = m.cfg.head_dim;
    let source = clean_vectors(m, pairs, c, true);
    let w = source[0].len();
    let cols = match c.head {
        Some(h) => h * hd..(h + 1) * hd,
        None => 0..w,
    };
    let pos = pairs.iter().enumerate().map(|(i, p)| offs[i] + p.base.position(&c.position).unwrap()).collect();
    let base = clean_base.then(|| clean_vectors(m, pairs, c, false));
    (AlphaSwap { layer: c.layer, site: c.site, pos, source, cols, base, alpha }, ids, mask)
}

/// Passes layer `layer`'s attn_output and mlp_output on detached (GradDrop, written plainly).
pub struct Detach {
    layer: usize,
}

impl Hooks for Detach {
    fn wants(&self, l: usize, s: Site) -> bool {
        l == self.layer && matches!(s, Site::AttnOutput | Site::MlpOutput)
    }
    fn on(&mut self, _: usize, _: Site, act: &Tensor, _: SiteCtx) -> anyhow::Result<Option<Tensor>> {
        Ok(Some(act.detach()))
    }
}

/// dm/dα at α = 0 by candle's backward through the hand-made replacement, with the forward
/// starting from `start` embeddings when given (IG's midpoint).
pub fn direct(m: &Llama, pairs: &[Pair], c: &AtpCell, which: AtpMetric, start: Option<Tensor>) -> f64 {
    direct_dropping(m, pairs, c, which, start, None)
}

pub fn direct_dropping(m: &Llama, pairs: &[Pair], c: &AtpCell, which: AtpMetric, start: Option<Tensor>, drop: Option<usize>) -> f64 {
    let alpha = Var::zeros((), DType::F32, m.device()).unwrap();
    let (mut h, ids, mask) = swap_for(m, pairs, c, alpha.as_tensor().clone(), start.is_some());
    let mut d = Detach { layer: drop.unwrap_or(usize::MAX) };
    // The detach first: a unit at a dropped site still gets the gradient from after it.
    let mut chain = road_dii::model::sites::HookChain(vec![&mut d, &mut h]);
    let out = m
        .forward(&ids, Fwd { attention_mask: Some(&mask), hooks: Some(&mut chain), logits: LogitsAt::Last, differentiable: true, start: start.map(|x| (0, x)), ..Default::default() })
        .unwrap();
    let g = metric_sum(out.logits.as_ref().unwrap(), pairs, which).backward().unwrap();
    g.get(alpha.as_tensor()).map_or(0.0, |g| g.to_scalar::<f32>().unwrap() as f64)
}

/// Central finite difference of the metric at α = 0 on the fused (non-differentiable) forward.
pub fn finite_difference(m: &Llama, pairs: &[Pair], c: &AtpCell, eps: f64) -> f64 {
    let at = |a: f64| -> f64 {
        let alpha = Tensor::new(a as f32, m.device()).unwrap();
        let (mut h, ids, mask) = swap_for(m, pairs, c, alpha, false);
        let out = m.forward(&ids, Fwd { attention_mask: Some(&mask), hooks: Some(&mut h), logits: LogitsAt::Last, ..Default::default() }).unwrap();
        metric_sum(out.logits.as_ref().unwrap(), pairs, AtpMetric::LogitDiff).to_scalar::<f32>().unwrap() as f64
    };
    (at(eps) - at(-eps)) / (2.0 * eps)
}

pub fn equality_pairs(n: usize, seed: u64) -> Vec<Pair> {
    tasks::equality::dataset(&tiny().tok, tasks::equality::Variable::Left, [0, 0, n], seed).unwrap().test
}

/// Pairs of random token prompts of different lengths (so batches are padded), with one named
/// position `x` and equal base/source lengths per pair (what IG needs).
pub fn padded_pairs(vocab: u32, n: usize, seed: u64) -> Vec<Pair> {
    let mut rng = road_dii::util::rng::Rng::new(seed);
    let mut prompt = |len: usize| -> Prompt {
        let ids: Vec<u32> = (0..len).map(|_| rng.below(vocab as usize) as u32).collect();
        let positions: BTreeMap<String, usize> = [("x".to_string(), 1), ("last".to_string(), len - 1)].into_iter().collect();
        Prompt { text: format!("{ids:?}"), label: ids[0], ids, positions }
    };
    (0..n)
        .map(|i| {
            let len = 4 + i % 4;
            let (base, source) = (prompt(len), prompt(len));
            Pair { cf_label: source.label, answers: vec![base.label, source.label], base, source }
        })
        .collect()
}

pub fn close(got: f64, want: f64, tol: f64) -> bool {
    (got - want).abs() <= tol * want.abs().max(1.0)
}

/// Every cell's summed estimate against the direct backward; returns how many were non-zero.
pub fn check_plain(m: &Llama, pairs: &[Pair], units: &[(usize, Site)], positions: &[&str], which: AtpMetric) -> usize {
    let positions: Vec<String> = positions.iter().map(|s| s.to_string()).collect();
    let opts = AtpOptions { metric: which, ..Default::default() };
    let est = atp::estimate(m, pairs, units, &positions, &[], &opts).unwrap();
    let mut nonzero = 0;
    for (c, v) in est.cells.iter().zip(&est.per_pair) {
        let got: f64 = v.iter().sum();
        let want = direct(m, pairs, c, which, None);
        // The estimate's forward runs road's CPU paths (the packed GEMM: AVX-512, or AVX2 up
        // to 256 rows and gemm's AVX2 kernels above), the reference's candle's differentiable ops: their
        // f32 summation orders differ, and each pair's term carries its own rounding. So the
        // tolerance scales with the terms summed, not with their net (which can cancel: on an
        // AVX2-only Zen 3 one cell netted 1.124 from terms summing to 12.7 in magnitude and
        // differed by 2.5e-4 = 2e-5 of them). A wrong or missing term is of a term's size.
        let scale: f64 = v.iter().map(|x| x.abs()).sum();
        assert!((got - want).abs() <= 1e-4 * scale.max(1.0), "{c:?}: AtP {got} vs direct backward {want} (terms sum to {scale} in magnitude)");
        nonzero += (want.abs() > 1e-3) as usize;
    }
    nonzero
}

pub const ALL_SITES: [Site; 9] = Site::ALL;

/// Makes one site's activation `a` the autograd leaf `a + z`, `z = 0` a Var: `∂m/∂z = ∂m/∂a`.
pub struct Leaf {
    layer: usize,
    site: Site,
    z: Option<Var>,
    act: Option<Tensor>,
}

impl Hooks for Leaf {
    fn wants(&self, l: usize, s: Site) -> bool {
        (l, s) == (self.layer, self.site)
    }
    fn on(&mut self, _: usize, _: Site, act: &Tensor, _: SiteCtx) -> anyhow::Result<Option<Tensor>> {
        let z = Var::zeros(act.shape(), act.dtype(), act.device())?;
        let out = (act + z.as_tensor())?;
        (self.z, self.act) = (Some(z), Some(act.detach()));
        Ok(Some(out))
    }
}

/// The QK fix written plainly: patch the cell for real (the source's projection at that
/// position), read layer l's head outputs H' from that forward, and take
/// `Σ_t (H'(t) − H(t)) · ∂m/∂H(t)` over the heads the cell reaches (a q/k patch changes only
/// the attention pattern, and heads = A·V, so this is `ΔA · ∂m/∂A` with ΔA exact).
pub fn qk_direct(m: &Llama, pairs: &[Pair], c: &AtpCell) -> f64 {
    use road_dii::model::sites::HookChain;
    let (ids, mask, _) = left_pad(&pairs.iter().map(|p| p.base.ids.as_slice()).collect::<Vec<_>>());
    let mut g = Leaf { layer: c.layer, site: Site::HeadOutput, z: None, act: None };
    let out = m.forward(&ids, Fwd { attention_mask: Some(&mask), hooks: Some(&mut g), logits: LogitsAt::Last, differentiable: true, ..Default::default() }).unwrap();
    let store = metric_sum(out.logits.as_ref().unwrap(), pairs, AtpMetric::LogitDiff).backward().unwrap();
    let gh = store.get(g.z.as_ref().unwrap().as_tensor()).unwrap().to_vec3::<f32>().unwrap();
    let h0 = g.act.as_ref().unwrap().to_vec3::<f32>().unwrap();
    let (mut swap, ids, mask) = swap_for(m, pairs, c, Tensor::new(1f32, m.device()).unwrap(), false);
    let mut col = Collector::new([(c.layer, Site::HeadOutput)]);
    let mut chain = HookChain(vec![&mut swap, &mut col]);
    m.forward(&ids, Fwd { attention_mask: Some(&mask), hooks: Some(&mut chain), logits: LogitsAt::None, ..Default::default() }).unwrap();
    let h1 = col.get(c.layer, Site::HeadOutput).unwrap().to_vec3::<f32>().unwrap();
    let (hd, rep) = (m.cfg.head_dim, m.cfg.num_heads / m.cfg.num_kv_heads);
    let heads: Vec<usize> = match (c.site, c.head) {
        (Site::Q, Some(h)) => vec![h],
        (Site::K, Some(g)) => (g * rep..(g + 1) * rep).collect(),
        _ => (0..m.cfg.num_heads).collect(),
    };
    let mut e = 0.0;
    for i in 0..h0.len() {
        for t in 0..h0[i].len() {
            for &h in &heads {
                for d in h * hd..(h + 1) * hd {
                    e += ((h1[i][t][d] - h0[i][t][d]) * gh[i][t][d]) as f64;
                }
            }
        }
    }
    e
}
