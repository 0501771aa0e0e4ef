//! Last-prompt-token representations at every block's output, for many prompts.
use super::PromptHooks;
use crate::model::sites::HookChain;
use crate::model::{Collector, Fwd, Hooks, LinearAdapter, Llama, LogitsAt, Site};
use crate::train::cls::left_pad;
use anyhow::Result;
use candle_core::{DType, Tensor};

/// `[n_layers]` tensors of shape `[n_prompts, d]` (f32): block `l`'s output at each prompt's last
/// token. Prompts are left padded, so the last token is the last column of every row. The states
/// are detached: probes trained on them must not backpropagate into a model built from `Var`s.
pub fn last_token_states(
    model: &Llama,
    adapter: Option<&dyn LinearAdapter>,
    prompts: &[Vec<u32>],
    batch: usize,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<Vec<Tensor>> {
    last_token_states_with(model, adapter, None, prompts, batch, progress)
}

/// [`last_token_states`] with a fine-tune's own hooks (LoReFT) running before the collector.
pub fn last_token_states_with(
    model: &Llama,
    adapter: Option<&dyn LinearAdapter>,
    tuning: Option<PromptHooks>,
    prompts: &[Vec<u32>],
    batch: usize,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<Vec<Tensor>> {
    let n_layers = model.cfg.num_layers;
    let mut per_layer: Vec<Vec<Tensor>> = vec![Vec::new(); n_layers];
    for chunk in prompts.chunks(batch.max(1)) {
        let (ids, mask) = left_pad(chunk, 0);
        let padded = mask.iter().any(|r| r.contains(&0));
        let mut col = Collector::new((0..n_layers).map(|l| (l, Site::BlockOutput)));
        let mut own = tuning.map(|f| f(&chunk.iter().map(|p| p.len()).collect::<Vec<_>>()));
        let mut chain = HookChain(own.iter_mut().map(|h| h.as_mut() as &mut dyn Hooks).chain([&mut col as &mut dyn Hooks]).collect());
        model.forward(
            &ids,
            Fwd { attention_mask: if padded { Some(&mask) } else { None }, hooks: Some(&mut chain), adapter, logits: LogitsAt::None, ..Default::default() },
        )?;
        drop(chain);
        for (l, out) in per_layer.iter_mut().enumerate() {
            let a = col.get(l, Site::BlockOutput).expect("collector saw every block");
            let t = a.dim(1)?;
            out.push(a.narrow(1, t - 1, 1)?.squeeze(1)?.to_dtype(DType::F32)?.detach());
        }
        if let Some(pb) = progress {
            pb.inc(chunk.len() as u64);
        }
    }
    per_layer.into_iter().map(|v| Ok(Tensor::cat(&v, 0)?)).collect()
}
