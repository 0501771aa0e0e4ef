//! A cell's training steps replayed from CUDA graphs (`runtime::graph`). A batch group (one
//! base length and intervened position) on the resumed fast path runs the same kernels at every
//! step: only which pairs (gathered through a row-index tensor) and their targets change. Its
//! first step captures [`cells::loss_grads_on`] — the resumed forward from the cell's layer, the
//! frozen tail's backward and autograd for the intervention's variables — with those two tensors
//! as device buffers; every later step writes them and replays the graph with one launch. The
//! optimiser, tangent projection and retraction stay eager (their step-dependent scalars would
//! be frozen into a graph), updating the variables in place, where the graph reads them.
use super::cells::{self, Backward, Cell, Rows};
use super::data::CellCache;
use crate::intervene::{ApplyCtx, Intervention};
use crate::model::Llama;
use crate::runtime::graph::{self, Graph};
use crate::tasks::Pair;
use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, TensorId};
use std::collections::HashMap;

/// One group's captured step: its input buffers and the graph writing loss and gradients.
struct Captured {
    rows: Rows,
    targets: Tensor,
    graph: Graph<(Tensor, Vec<(TensorId, Tensor)>)>,
}

/// The graphs of one cell's training, by batch group (None: the group runs eagerly).
#[derive(Default)]
pub struct StepGraphs {
    by_group: HashMap<usize, Option<Captured>>,
}

/// Whether a cell's steps can be captured at all: on a CUDA device with graphs on, through the
/// frozen tail, for an intervention whose step is a function of its variables and inputs only.
pub fn applies(model: &Llama, iv: &dyn Intervention, how: Backward) -> bool {
    how == Backward::FrozenTail && iv.replayable() && graph::enabled(model.device())
}

impl StepGraphs {
    /// The step's loss (on the device: read it once the update is queued) and gradients from
    /// group `group`'s graph (captured on the group's first step), or None when the group
    /// cannot be replayed: the caller runs the eager step.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        model: &Llama,
        cell: &Cell,
        cache: &CellCache<'_>,
        pairs: &[Pair],
        group: usize,
        idx: &[usize],
        iv: &dyn Intervention,
        ctx: ApplyCtx,
        targets: &[u32],
    ) -> Result<Option<(Tensor, GradStore)>> {
        if !cells::replayable(cache, pairs, idx) {
            return Ok(None);
        }
        let entry = self.by_group.entry(group).or_insert_with(|| capture(model, cell, cache, pairs, idx, iv, ctx, targets));
        let Some(c) = entry.as_ref().filter(|c| c.rows.pairs.dims() == [idx.len()]) else { return Ok(None) };
        c.rows.write(model, cache, idx)?;
        c.targets.slice_set(&Tensor::new(targets, model.device())?, 0, 0)?;
        iv.write_step_inputs(ctx)?;
        c.graph.launch()?;
        let (loss, grads) = c.graph.out();
        let mut store = GradStore::default();
        for (id, g) in grads {
            store.insert_id(*id, g.clone());
        }
        Ok(Some((loss.clone(), store)))
    }
}

/// Capture one group's step; None (with a one-time note on stderr) when capture fails, so the
/// group falls back to eager steps with the same numbers.
#[allow(clippy::too_many_arguments)]
fn capture(model: &Llama, cell: &Cell, cache: &CellCache<'_>, pairs: &[Pair], idx: &[usize], iv: &dyn Intervention, ctx: ApplyCtx, targets: &[u32]) -> Option<Captured> {
    let attempt = || -> Result<Captured> {
        let rows = Rows::of(model, cache, idx)?;
        let targets = Tensor::new(targets, model.device())?;
        let vars: Vec<Tensor> = iv.params().iter().map(|p| p.var.as_tensor().clone()).collect();
        let graph = graph::capture(model.device(), || {
            let (loss, grads) = cells::loss_grads_on(model, cell, cache, pairs, idx, &rows, iv, ctx, &targets, Backward::FrozenTail)?;
            // Only the variables' gradients outlive the step; the rest is freed inside the graph.
            let kept = vars.iter().filter_map(|v| grads.get(v).map(|g| (v.id(), g.clone()))).collect();
            Ok((loss, kept))
        })?;
        Ok(Captured { rows, targets, graph })
    };
    graph::or_eager(attempt(), "training steps")
}
