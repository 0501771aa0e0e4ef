//! `road bench atp`: the whole AtP map of IOI (every layer × site × position × head) against a
//! real patching sweep of the block_output cells alone, in seconds per cell.
use crate::intervene::atp::{AtpMethod, AtpOptions};
use crate::model::Site;
use anyhow::{bail, Result};
use std::time::Instant;

pub fn atp(model: &str, pairs: usize, method: &str, steps: usize, patch_layers: Option<usize>) -> Result<()> {
    use crate::experiment::cells::Cell;
    use crate::experiment::evaluate::evaluate;
    use crate::experiment::data::{cache_split, Clean};
    let method = match method {
        "plain" => AtpMethod::Plain,
        "ig" => AtpMethod::Ig,
        other => bail!("--method {other:?}: expected plain or ig"),
    };
    let opts = AtpOptions { method, steps, ..Default::default() };
    opts.validate()?;
    let l = crate::model::registry::load_default(model)?;
    let model = &l.model;
    let cfg = crate::tasks::ioi::IoiConfig { variable: crate::tasks::ioi::Variable::Flip, templates: vec![0], sizes: [pairs, 0, 0], seed: 0 };
    let ps = crate::tasks::ioi::dataset(&l.tok, &cfg)?.train;
    if ps.is_empty() {
        bail!("--pairs must be at least 1");
    }
    let t = ps[0].base.ids.len();
    let positions: Vec<String> = (0..t).map(|i| i.to_string()).collect();
    let units: Vec<(usize, Site)> = (0..model.cfg.num_layers).flat_map(|l| Site::ALL.into_iter().map(move |s| (l, s))).collect();
    let t0 = Instant::now();
    let est = crate::experiment::atp::estimate(model, &ps, &units, &positions, &[], &opts)?;
    let atp_s = t0.elapsed().as_secs_f64();
    let n_atp = est.cells.len();
    println!(
        "road atp ({}, {} gradient point(s)): {n_atp} cells ({} layers x {} sites x {t} positions, + heads) on {} pairs in {atp_s:.2}s = {:.2} ms/cell",
        opts.method_name(),
        opts.alphas().len(),
        model.cfg.num_layers,
        Site::ALL.len(),
        ps.len(),
        1e3 * atp_s / n_atp as f64
    );
    // Real patching of the block_output cells, timed as a sweep runs them (clean caching included).
    let n_layers = patch_layers.unwrap_or(model.cfg.num_layers).min(model.cfg.num_layers);
    let iv = crate::intervene::InterventionSpec::default().build(model.cfg.hidden_size, 0, None, model.device())?;
    let clean = vec![Clean { ld_base: 0.0, ld_source: 1.0, base_correct: true, source_correct: true }; ps.len()];
    let clean_refs: Vec<&Clean> = clean.iter().collect();
    let t1 = Instant::now();
    let sc = cache_split(model, &ps, &(0..n_layers).map(|l| (l, Site::BlockOutput)).collect::<Vec<_>>())?;
    let mut cells = 0usize;
    for layer in 0..n_layers {
        for pos in &positions {
            let cell = Cell { layer, site: Site::BlockOutput, position: pos.clone(), cols: None, heads: String::new() };
            evaluate(model, &cell, &sc.cell(&ps, layer, Site::BlockOutput, pos)?, &ps, &clean_refs, iv.as_ref())?;
            cells += 1;
        }
    }
    let patch_s = t1.elapsed().as_secs_f64();
    let per_patch = patch_s / cells as f64;
    let per_atp = atp_s / n_atp as f64;
    println!("road patching: {cells} block_output cells ({n_layers} layers x {t} positions) in {patch_s:.2}s = {:.2} ms/cell", 1e3 * per_patch);
    println!("seconds per cell: AtP is {:.0}x cheaper than real patching", per_patch / per_atp);
    Ok(())
}
