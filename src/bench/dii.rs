//! `road bench patching` / `road bench das`: intervention workloads on SmolLM2 IOI.
use anyhow::Result;
use std::time::Instant;

/// IOI pairs for the intervention benchmarks (the same prompts pyvene's script uses).
fn ioi_pairs(tok: &crate::tokenizer::Tok, variable: crate::tasks::ioi::Variable, n: usize) -> Result<Vec<crate::tasks::Pair>> {
    let cfg = crate::tasks::ioi::IoiConfig { variable, templates: vec![0], sizes: [n, 0, 0], seed: 0 };
    // Entities are split 60/20/20; the train split alone is enough here.
    Ok(crate::tasks::ioi::dataset(tok, &cfg)?.train)
}

/// `road bench patching`: a full layer x position activation-patching sweep on IOI.
pub fn patching(model: &str, pairs: usize, layers: Option<usize>) -> Result<()> {
    use crate::experiment::cells::Cell;
    use crate::experiment::evaluate::evaluate;
    use crate::experiment::data::{cache_split, Clean};
    use crate::model::Site;
    let l = crate::model::registry::load_default(model)?;
    let model = &l.model;
    let ps = ioi_pairs(&l.tok, crate::tasks::ioi::Variable::Flip, pairs)?;
    let n_layers = layers.unwrap_or(model.cfg.num_layers).min(model.cfg.num_layers);
    let t = ps[0].base.ids.len();
    let iv = crate::intervene::InterventionSpec::default().build(model.cfg.hidden_size, 0, None, model.device())?;
    let clean: Vec<Clean> = vec![Clean { ld_base: 0.0, ld_source: 1.0, base_correct: true, source_correct: true }; ps.len()];
    let clean_refs: Vec<&Clean> = clean.iter().collect();
    let t0 = Instant::now();
    let needed: Vec<(usize, Site)> = (0..n_layers).map(|l| (l, Site::BlockOutput)).collect();
    let sc = cache_split(model, &ps, &needed)?;
    let cache_s = t0.elapsed().as_secs_f64();
    let t_sweep = Instant::now();
    let mut cells = 0usize;
    for layer in 0..n_layers {
        for p in 0..t {
            let pos = p.to_string();
            let cell = Cell { layer, site: Site::BlockOutput, position: pos.clone(), cols: None, heads: String::new() };
            let cc = sc.cell(&ps, layer, Site::BlockOutput, &pos)?;
            evaluate(model, &cell, &cc, &ps, &clean_refs, iv.as_ref())?;
            cells += 1;
        }
    }
    let s = t0.elapsed().as_secs_f64();
    let sweep_s = t_sweep.elapsed().as_secs_f64();
    println!(
        "road patching: {:.2} cells/s, {:.1} examples/s ({cells} cells = {n_layers} layers x {t} positions, {} pairs, {:.1}s incl. clean caching)",
        cells as f64 / s,
        (cells * ps.len()) as f64 / s,
        ps.len(),
        s
    );
    // The sweep alone (as pyvene's harness times it: no clean caching in the timed region).
    println!("road patching sweep only: {:.2} cells/s ({sweep_s:.2}s; clean caching {cache_s:.2}s)", cells as f64 / sweep_s);
    Ok(())
}

/// `road bench das`: rank-1 DAS training throughput at one layer's final token.
pub fn das(model: &str, layer: usize, steps: usize, batch: usize) -> Result<()> {
    use crate::experiment::cells::{train, Cell};
    use crate::experiment::data::cache_split;
    use crate::experiment::spec::TrainSpec;
    use crate::model::Site;
    let l = crate::model::registry::load_default(model)?;
    let model = &l.model;
    if layer >= model.cfg.num_layers {
        anyhow::bail!("--layer {layer} out of range (0..{})", model.cfg.num_layers);
    }
    let ps = ioi_pairs(&l.tok, crate::tasks::ioi::Variable::SPosition, 160)?;
    let spec = crate::intervene::InterventionSpec::Das { rank: 1 };
    let mut iv = spec.build(model.cfg.hidden_size, 0, None, model.device())?;
    let t0 = Instant::now();
    let sc = cache_split(model, &ps, &[(layer, Site::BlockOutput)])?;
    let cache_s = t0.elapsed().as_secs_f64();
    let cc = sc.cell(&ps, layer, Site::BlockOutput, "last")?;
    let cell = Cell { layer, site: Site::BlockOutput, position: "last".into(), cols: None, heads: String::new() };
    // On this device, one batch's gradients through the hand-written tail (and its kernels)
    // against autograd over the whole resumed forward.
    {
        use crate::experiment::cells::{loss_grads, Backward};
        let idx: Vec<usize> = (0..batch.min(ps.len())).collect();
        let targets: Vec<u32> = idx.iter().map(|&i| ps[i].cf_label).collect();
        let ctx = crate::intervene::ApplyCtx { progress: 0.0, train: true };
        let (la, ga) = loss_grads(model, &cell, &cc, &ps, &idx, iv.as_ref(), ctx, &targets, Backward::Autograd)?;
        let (lt, gt) = loss_grads(model, &cell, &cc, &ps, &idx, iv.as_ref(), ctx, &targets, Backward::FrozenTail)?;
        let mut err = 0f32;
        for p in iv.params() {
            let (Some(a), Some(t)) = (ga.get(p.var.as_tensor()), gt.get(p.var.as_tensor())) else { anyhow::bail!("{}: no gradient", p.name) };
            let scale = a.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?.max(1e-12);
            err = err.max((a - t)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? / scale);
        }
        println!("road das gradient check: loss {la:.6} (autograd) vs {lt:.6} (frozen tail), max relative gradient error {err:.2e}");
    }
    let ts = TrainSpec { steps, batch, lr: 1e-2, ..Default::default() };
    let replays = crate::runtime::graph::launches();
    let t1 = Instant::now();
    let log = train(model, &cell, &cc, &ps, iv.as_mut(), &ts, 0, &std::sync::atomic::AtomicBool::new(false), None, &mut |_| {})?.log;
    let s = t1.elapsed().as_secs_f64();
    let (first, last) = (log.first().map_or(f64::NAN, |r| r.loss), log.last().map_or(f64::NAN, |r| r.loss));
    let replays = crate::runtime::graph::launches() - replays;
    println!(
        "road das: {:.1} examples/s ({steps} steps x batch {batch}, layer {layer}, last token; {:.1}s training + {:.1}s one-off clean caching of {} pairs; loss {first:.4} -> {last:.4}; {replays} steps replayed from CUDA graphs)",
        (steps * batch) as f64 / s,
        s,
        cache_s,
        ps.len()
    );
    Ok(())
}
