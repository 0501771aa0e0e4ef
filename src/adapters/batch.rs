//! Mixed-adapter batching: one batch whose rows use different adapters (or none).
//!
//! RoAd rows: each row's `(first, second)` column vectors are gathered into `[b, 1, d]` once per
//! batch (RoAd1-only projections: `[b, 1, d/2]`, each pair's shared value once), and the fused
//! in-place op (or `Rotation::apply`) broadcasts them — two element-wise multiplies per
//! projection, no matmul. LoRA rows: per-row `A`, `B` are gathered into `[b, r, in]`/`[b, out, r]` and applied
//! with two batched matmuls. DoRA rows use the LoRA stack plus a per-row factor `m/‖W+sBA‖`
//! (computed once, at construction, from the base weights) on `h` without its bias. OFT rows
//! rotate their input with per-row block stacks `[b, k, s, s]` (one batched matmul). Rows without
//! an adapter get the identity (RoAd, OFT) / zero (LoRA) / one (DoRA) slot. BOFT rows: the rows of
//! each BOFT adapter are gathered and rotated by that adapter's own butterfly product (any number
//! of factors, so any `boft_n_butterfly_factor`), then put back in place; BOFT's output scale `s`
//! shares DoRA's per-row factor stack (both scale `h` without its bias).
use super::boft::BoftRotation;
use super::{AnyAdapter, Rotation};
use crate::model::{BaseLinear, LinearAdapter, Llama, Proj};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use std::collections::HashMap;

/// Per-projection stacks over adapters; slot 0 is "no adapter".
struct RoadStack {
    rot: Rotation,
    first: Tensor,  // [n+1, d]
    second: Tensor, // [n+1, d]
    users: Vec<bool>,
    /// Every adapter here is RoAd1, whose two members of a pair share (θ, α): each group's
    /// second half of the columns repeats its first, so a batch gathers only the halves.
    paired: bool,
}

/// One projection's RoAd columns for the current batch's rows: `[b, 1, d]`, or `[b, 1, d/2]`
/// (each group's first half) when `paired` — half the bytes a decode step streams per row.
struct RoadRows {
    first: Tensor,
    second: Tensor,
    paired: bool,
}

struct LoraStack {
    a_t: Tensor, // [n+1, in, r_max]  (Aᵀ, zero-padded ranks)
    b_t: Tensor, // [n+1, r_max, out] (scaling · Bᵀ)
    users: Vec<bool>,
}

/// A per-slot stack `[n+1, ...]` (slot 0 = no adapter) and which slots use it.
struct Stack {
    t: Tensor,
    users: Vec<bool>,
}

/// The row assignment of the current batch, gathered once.
struct Gathered {
    road: HashMap<(usize, Proj), RoadRows>,
    lora: HashMap<(usize, Proj), (Tensor, Tensor)>,
    dora: HashMap<(usize, Proj), Tensor>,
    oft: HashMap<(usize, Proj), Tensor>,
    boft: HashMap<(usize, Proj), BoftRows>,
}

/// One projection's BOFT rows in the current batch: per adapter slot, the rows using it; the
/// other rows; and the gather that puts `[other rows, slot 1's rows, …]` back in batch order.
struct BoftRows {
    groups: Vec<(usize, Tensor)>,
    rest: Option<Tensor>,
    order: Tensor,
}

pub struct MixedAdapters {
    names: Vec<String>,
    road: HashMap<(usize, Proj), RoadStack>,
    lora: HashMap<(usize, Proj), LoraStack>,
    /// DoRA factors and BOFT scales `[n+1, out]` (ones for other slots).
    dora: HashMap<(usize, Proj), Stack>,
    /// BOFT input rotations per slot (None: not a BOFT adapter on this projection).
    boft: HashMap<(usize, Proj), Vec<Option<BoftRotation>>>,
    /// OFT blocks `[n+1, k, s, s]` (identity for other slots).
    oft: HashMap<(usize, Proj), Stack>,
    cur: Option<Gathered>,
}

impl MixedAdapters {
    /// Stack `adapters` (name, adapter). RoAd adapters sharing a projection must share its pairing
    /// (group_size), since `rot(h)` is computed once for the whole batch.
    pub fn new(adapters: &[(String, AnyAdapter)], model: &Llama) -> Result<Self> {
        let (cfg, device) = (&model.cfg, model.device());
        let mut road = HashMap::new();
        let mut lora = HashMap::new();
        let mut dora = HashMap::new();
        let mut oft = HashMap::new();
        let mut boft = HashMap::new();
        for l in 0..cfg.num_layers {
            for p in Proj::ALL {
                let (out_d, in_d) = (super::adapter::proj_out_dim(cfg, p), super::lora::proj_in_dim(cfg, p));
                // RoAd slots.
                let mut rot: Option<Rotation> = None;
                let mut firsts = vec![Tensor::ones(out_d, DType::F32, device)?];
                let mut seconds = vec![Tensor::zeros(out_d, DType::F32, device)?];
                let mut users = vec![false];
                let mut paired = true;
                for (name, ad) in adapters {
                    match ad {
                        AnyAdapter::Road(a) if a.touches(l, p) => {
                            let layer = &a.layers[&(l, p)];
                            if let Some(r) = rot {
                                if r.group_size != layer.rot.group_size {
                                    bail!("adapter {name}: RoAd group_size {} on layer {l} {} differs from another adapter's {} (cannot share a batch)", layer.rot.group_size, p.hf_name(), r.group_size);
                                }
                            }
                            rot = Some(layer.rot);
                            paired &= layer.rot.variant == super::Variant::Road1;
                            let (f, s) = layer.columns()?;
                            firsts.push(f);
                            seconds.push(s);
                            users.push(true);
                        }
                        _ => {
                            firsts.push(firsts[0].clone());
                            seconds.push(seconds[0].clone());
                            users.push(false);
                        }
                    }
                }
                if let Some(rot) = rot {
                    road.insert((l, p), RoadStack { rot, first: Tensor::stack(&firsts, 0)?, second: Tensor::stack(&seconds, 0)?, users, paired });
                }
                // LoRA slots, ranks zero-padded to the largest.
                let r_max = adapters
                    .iter()
                    .filter_map(|(_, a)| match a {
                        AnyAdapter::Lora(a) if a.touches(l, p) => Some(a.r),
                        AnyAdapter::Dora(a) if a.touches(l, p) => Some(a.lora.r),
                        _ => None,
                    })
                    .max();
                if let Some(r_max) = r_max {
                    let mut a_ts = vec![Tensor::zeros((in_d, r_max), DType::F32, device)?];
                    let mut b_ts = vec![Tensor::zeros((r_max, out_d), DType::F32, device)?];
                    let mut users = vec![false];
                    for (_, ad) in adapters {
                        let low_rank = match ad {
                            AnyAdapter::Lora(a) if a.touches(l, p) => Some(a),
                            AnyAdapter::Dora(a) if a.touches(l, p) => Some(&a.lora),
                            _ => None,
                        };
                        match low_rank {
                            Some(a) => {
                                let layer = &a.layers[&(l, p)];
                                let at = layer.a.as_tensor().t()?.pad_with_zeros(1, 0, r_max - a.r)?;
                                let bt = (layer.b.as_tensor().t()? * a.scaling())?.pad_with_zeros(0, 0, r_max - a.r)?;
                                a_ts.push(at);
                                b_ts.push(bt);
                                users.push(true);
                            }
                            _ => {
                                a_ts.push(a_ts[0].clone());
                                b_ts.push(b_ts[0].clone());
                                users.push(false);
                            }
                        }
                    }
                    lora.insert((l, p), LoraStack { a_t: Tensor::stack(&a_ts, 0)?, b_t: Tensor::stack(&b_ts, 0)?, users });
                }
                let w = model.proj_weight(l, p);
                let ones = Tensor::ones(out_d, DType::F32, device)?;
                if let Some(st) = stack(adapters, &ones, |ad| match ad {
                    AnyAdapter::Dora(a) if a.touches(l, p) => Some(a.factor(l, p, w).map(|f| f.detach())),
                    AnyAdapter::Boft(a) if a.touches(l, p) => Some(a.layers[&(l, p)].s.as_tensor().squeeze(1).map(|s| s.detach()).map_err(Into::into)),
                    _ => None,
                })? {
                    dora.insert((l, p), st);
                }
                let mut rots = vec![None];
                for (name, ad) in adapters {
                    rots.push(match ad {
                        AnyAdapter::Boft(a) if a.touches(l, p) => Some(a.rotation(l, p).with_context(|| format!("adapter {name}"))?.detach()),
                        _ => None,
                    });
                }
                if rots.iter().any(Option::is_some) {
                    boft.insert((l, p), rots);
                }
                // OFT rows of one projection must share a block size: the rotation is one bmm.
                let block = adapters.iter().find_map(|(_, a)| match a {
                    AnyAdapter::Oft(a) if a.touches(l, p) => Some(a.layers[&(l, p)].block),
                    _ => None,
                });
                if let Some(bs) = block {
                    let eye = Tensor::eye(bs, DType::F32, device)?.unsqueeze(0)?.repeat((in_d / bs, 1, 1))?;
                    let st = stack(adapters, &eye, |ad| match ad {
                        AnyAdapter::Oft(a) if a.touches(l, p) => Some((|| -> Result<Tensor> {
                            if a.layers[&(l, p)].block != bs {
                                bail!("OFT block size {} on layer {l} {} differs from another adapter's {bs} (cannot share a batch)", a.layers[&(l, p)].block, p.hf_name());
                            }
                            let r = a.rotation(l, p)?.detach();
                            Ok(r.broadcast_as(eye.shape())?.contiguous()?)
                        })()),
                        _ => None,
                    })?;
                    oft.insert((l, p), st.expect("an OFT adapter touches this projection"));
                }
            }
        }
        Ok(Self { names: adapters.iter().map(|(n, _)| n.clone()).collect(), road, lora, dora, oft, boft, cur: None })
    }

    /// Assign an adapter (index into the list given to `new`, or None) to each row of the next
    /// batch, and gather the per-row parameters once for the whole generation.
    pub fn set_rows(&mut self, rows: &[Option<usize>], dtype: DType) -> Result<()> {
        if let Some(&bad) = rows.iter().flatten().find(|&&i| i >= self.names.len()) {
            bail!("row adapter index {bad} out of range ({} adapters)", self.names.len());
        }
        let slots: Vec<u32> = rows.iter().map(|r| r.map(|i| i as u32 + 1).unwrap_or(0)).collect();
        let b = slots.len();
        let any = |users: &Vec<bool>| slots.iter().any(|&s| users[s as usize]);
        let mut g = Gathered { road: HashMap::new(), lora: HashMap::new(), dora: HashMap::new(), oft: HashMap::new(), boft: HashMap::new() };
        for (k, rots) in &self.boft {
            if let Some(rows) = boft_rows(&slots, rots)? {
                g.boft.insert(*k, rows);
            }
        }
        for (k, st) in &self.dora {
            if any(&st.users) {
                let idx = Tensor::from_vec(slots.clone(), b, st.t.device())?;
                let f = st.t.index_select(&idx, 0)?;
                // Kept in f32 (as DoRA's own forward): bf16 would round the ≈1 factors to 1.
                g.dora.insert(*k, f.unsqueeze(1)?.detach());
            }
        }
        for (k, st) in &self.oft {
            if any(&st.users) {
                let idx = Tensor::from_vec(slots.clone(), b, st.t.device())?;
                g.oft.insert(*k, st.t.index_select(&idx, 0)?.contiguous()?.detach());
            }
        }
        for (k, st) in &self.road {
            if any(&st.users) {
                let idx = Tensor::from_vec(slots.clone(), b, st.first.device())?;
                let (d, gs) = (st.rot.dim, st.rot.group_size);
                // Halves only where the fused CPU op reads them (f32 rows on the CPU fast path).
                let paired = st.paired && dtype == DType::F32 && crate::runtime::cpu_fast_path(st.first.device());
                // Detached: mixed batches are inference, and a tensor that still tracks the
                // adapters' Vars would keep the CUDA kernel (which has no backward) from running.
                let rows = |c: &Tensor| -> Result<Tensor> {
                    let c = c.index_select(&idx, 0)?;
                    let c = if paired { c.reshape((b, d / gs, gs))?.narrow(2, 0, gs / 2)?.contiguous()?.reshape((b, 1, d / 2))? } else { c.reshape((b, 1, d))? };
                    Ok(c.to_dtype(dtype)?.detach())
                };
                g.road.insert(*k, RoadRows { first: rows(&st.first)?, second: rows(&st.second)?, paired });
            }
        }
        for (k, st) in &self.lora {
            if any(&st.users) {
                let idx = Tensor::from_vec(slots.clone(), b, st.a_t.device())?;
                let a = st.a_t.index_select(&idx, 0)?.to_dtype(dtype)?.contiguous()?.detach();
                let bb = st.b_t.index_select(&idx, 0)?.to_dtype(dtype)?.contiguous()?.detach();
                g.lora.insert(*k, (a, bb));
            }
        }
        self.cur = Some(g);
        Ok(())
    }
}

impl LinearAdapter for MixedAdapters {
    fn touches(&self, layer: usize, proj: Proj) -> bool {
        let k = (layer, proj);
        self.cur.as_ref().is_some_and(|g| {
            g.road.contains_key(&k) || g.lora.contains_key(&k) || g.dora.contains_key(&k) || g.oft.contains_key(&k) || g.boft.contains_key(&k)
        })
    }
    fn adapt_input(&self, layer: usize, proj: Proj, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(g) = &self.cur else { return Ok(None) };
        let k = (layer, proj);
        let y = match g.oft.get(&k) {
            Some(r) => Some(oft_rows(x, r)?),
            None => None,
        };
        let Some(rows) = g.boft.get(&k) else { return Ok(y) };
        // BOFT rows (their OFT slot is the identity): each adapter's rows through its own
        // rotation, the rest as they are, then back in batch order.
        let x = y.as_ref().unwrap_or(x);
        if x.dim(0)? != rows.order.dim(0)? {
            bail!("MixedAdapters: batch has {} rows but set_rows was given {}", x.dim(0)?, rows.order.dim(0)?);
        }
        let rots = &self.boft[&k];
        let mut pieces = Vec::with_capacity(rows.groups.len() + 1);
        if let Some(rest) = &rows.rest {
            pieces.push(x.index_select(rest, 0)?);
        }
        for (slot, idx) in &rows.groups {
            let rot = rots[*slot].as_ref().expect("a group's slot has a rotation");
            pieces.push(rot.apply(&x.index_select(idx, 0)?)?);
        }
        Ok(Some(Tensor::cat(&pieces, 0)?.index_select(&rows.order, 0)?))
    }
    fn adapt(&self, layer: usize, proj: Proj, x: &Tensor, h: Tensor, base: BaseLinear) -> Result<Tensor> {
        let Some(g) = &self.cur else { bail!("MixedAdapters: call set_rows before the forward pass") };
        let k = (layer, proj);
        let b = h.dim(0)?;
        let mut out = h.clone();
        if let Some(rr) = g.road.get(&k) {
            if rr.first.dim(0)? != b {
                bail!("MixedAdapters: batch has {b} rows but set_rows was given {}", rr.first.dim(0)?);
            }
            let rot = &self.road[&k].rot;
            out = match super::fused::try_fused_rows(&h, &rr.first, &rr.second, rot.group_size, rr.paired)? {
                Some(z) => z,
                // The fused op gone since `set_rows` (e.g. generic ops switched on): rebuild the
                // full columns from the halves.
                None if rr.paired => {
                    let (d, gs) = (rot.dim, rot.group_size);
                    let full = |c: &Tensor| -> Result<Tensor> {
                        let c = c.reshape((b, d / gs, gs / 2))?;
                        Ok(Tensor::cat(&[&c, &c], 2)?.reshape((b, 1, d))?)
                    };
                    rot.apply(&h, &full(&rr.first)?, &full(&rr.second)?)?
                }
                None => rot.apply(&h, &rr.first, &rr.second)?,
            };
        }
        if let Some((a, bb)) = g.lora.get(&k) {
            if a.dim(0)? != b {
                bail!("MixedAdapters: batch has {b} rows but set_rows was given {}", a.dim(0)?);
            }
            // [b, t, in] @ [b, in, r] @ [b, r, out]: one batched matmul pair for all rows.
            let d = x.contiguous()?.matmul(a)?.matmul(bb)?;
            out = (out + d)?;
        }
        if let Some(f) = g.dora.get(&k) {
            // DoRA rows: f ⊙ (W x + s·BA x) with the bias outside the factor; f = 1 elsewhere.
            let dt = out.dtype();
            let o32 = out.to_dtype(DType::F32)?;
            out = match base.b {
                Some(bias) => {
                    let bias = bias.to_dtype(DType::F32)?;
                    o32.broadcast_sub(&bias)?.broadcast_mul(f)?.broadcast_add(&bias)?
                }
                None => o32.broadcast_mul(f)?,
            }
            .to_dtype(dt)?;
        }
        Ok(out)
    }
}

/// OFT rows: `[b, t, k·s] → [b, k, t, s] · [b, k, s, s] →` back; every row its own blocks, one
/// bmm, in f32 as OFT's own forward (`orth::rotate_blocks`).
fn oft_rows(x: &Tensor, r: &Tensor) -> Result<Tensor> {
    let (b, k, s, _) = r.dims4()?;
    let (xb, t, width) = x.dims3()?;
    if xb != b {
        bail!("MixedAdapters: batch has {xb} rows but set_rows was given {b}");
    }
    let x32 = x.to_dtype(DType::F32)?;
    let y = x32.reshape((b, t, k, s))?.transpose(1, 2)?.contiguous()?.matmul(r)?;
    Ok(y.transpose(1, 2)?.reshape((b, t, width))?.to_dtype(x.dtype())?)
}

/// The BOFT row groups of one projection for rows assigned `slots`; None when no row uses a BOFT
/// adapter there.
fn boft_rows(slots: &[u32], rots: &[Option<BoftRotation>]) -> Result<Option<BoftRows>> {
    let uses = |s: u32| rots[s as usize].is_some();
    if !slots.iter().any(|&s| uses(s)) {
        return Ok(None);
    }
    let device = rots.iter().flatten().next().expect("a rotation").q.device().clone();
    let idx = |rows: &[u32]| Tensor::from_vec(rows.to_vec(), rows.len(), &device);
    let rest: Vec<u32> = (0..slots.len() as u32).filter(|&r| !uses(slots[r as usize])).collect();
    let mut cat_order = rest.clone();
    let mut groups = Vec::new();
    for slot in 1..rots.len() as u32 {
        let rows: Vec<u32> = (0..slots.len() as u32).filter(|&r| slots[r as usize] == slot && uses(slot)).collect();
        if !rows.is_empty() {
            cat_order.extend(&rows);
            groups.push((slot as usize, idx(&rows)?));
        }
    }
    let mut order = vec![0u32; slots.len()];
    for (i, &r) in cat_order.iter().enumerate() {
        order[r as usize] = i as u32;
    }
    let rest = if rest.is_empty() { None } else { Some(idx(&rest)?) };
    Ok(Some(BoftRows { groups, rest, order: idx(&order)? }))
}

/// Stack `[n+1, ...]` of per-adapter tensors: slot 0 and adapters `f` skips get `none`; `None`
/// when no adapter has one.
fn stack(adapters: &[(String, AnyAdapter)], none: &Tensor, f: impl Fn(&AnyAdapter) -> Option<Result<Tensor>>) -> Result<Option<Stack>> {
    let mut ts = vec![none.clone()];
    let mut users = vec![false];
    for (name, ad) in adapters {
        match f(ad) {
            Some(t) => {
                ts.push(t.with_context(|| format!("adapter {name}"))?);
                users.push(true);
            }
            None => {
                ts.push(none.clone());
                users.push(false);
            }
        }
    }
    if !users.iter().any(|&u| u) {
        return Ok(None);
    }
    Ok(Some(Stack { t: Tensor::stack(&ts, 0)?, users }))
}
