//! `road search FILE`: the guided search a researcher runs on a new model. An AtP screen of the
//! file's grid (`kind = "atp"`), real patching of its top and random cells (`verify_top`), then
//! low-rank DAS (with its controls) on the few cells of largest verified effect; one table
//! (`search.csv` in the AtP run folder) ranks them by verified effect and DAS test IIA.
use super::atp_verify::VerifyRow;
use super::runner::{run, RunOptions};
use super::spec::{Layers, OneOrMany, SitesSpec, Spec};
use crate::intervene::InterventionSpec;
use crate::runs::{RunEvent, Sink};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

pub struct SearchOptions {
    /// Cells trained with DAS (the largest |true effect| among the verified ones).
    pub das_cells: usize,
    pub rank: usize,
    /// Pairs per split of the DAS runs (DAS trains: the screen's test-only sizes will not do).
    pub sizes: [usize; 3],
    /// `verify_top` when the file leaves it at 0.
    pub verify_top: usize,
}

impl Default for SearchOptions {
    fn default() -> Self {
        Self { das_cells: 3, rank: 1, sizes: [160, 40, 40], verify_top: 10 }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SearchRow {
    pub layer: usize,
    pub site: String,
    pub position: String,
    pub heads: String,
    pub effect_estimate: f64,
    pub true_effect: f64,
    /// DAS test IIA (vocabulary argmax), its best control's, and the margin between them.
    pub das_test_iia: f64,
    pub control_iia: f64,
    pub margin: f64,
    pub das_run: String,
}

pub const SEARCH_HEADER: [&str; 10] =
    ["layer", "site", "position", "heads", "effect_estimate", "true_effect", "das_test_iia", "control_iia", "margin", "das_run"];

/// Screen, verify, train; returns the AtP run folder and the table (best first).
pub fn search(spec: &Spec, o: &SearchOptions, sink: &mut dyn Sink) -> Result<(PathBuf, Vec<SearchRow>)> {
    let mut screen = spec.clone();
    let InterventionSpec::Atp { atp } = &mut screen.intervention else {
        bail!("road search needs an experiment file with intervention.kind = \"atp\" (got {:?})", spec.intervention.kind_name());
    };
    if o.das_cells == 0 || o.rank == 0 {
        bail!("road search: --das-cells and --rank must be at least 1");
    }
    if atp.verify_top == 0 {
        atp.verify_top = o.verify_top.max(o.das_cells);
    }
    screen.validate()?;
    let summary = run(&screen, &RunOptions::default(), sink)?;
    let dir = summary.run_dir.clone();
    let verified: Vec<VerifyRow> = crate::runs::read_csv(&dir.join("verify.csv")).context("reading the screen's verify.csv")?;
    if verified.is_empty() {
        bail!("the screen verified no cell (cancelled?); see {}", dir.display());
    }
    let mut best = verified.clone();
    best.sort_by(|a, b| b.true_effect.abs().total_cmp(&a.true_effect.abs()));
    best.truncate(o.das_cells);
    let mut rows = Vec::new();
    for v in &best {
        let mut das = spec.clone();
        das.name = format!("{}-das", spec.name);
        das.intervention = InterventionSpec::Das { rank: o.rank };
        das.task.sizes = o.sizes;
        das.controls = None;
        das.sites = SitesSpec {
            layers: Layers::List(vec![v.layer]),
            site: OneOrMany::One(v.site.clone()),
            positions: vec![v.position.clone()],
            heads: if v.heads.is_empty() { vec![] } else { vec![v.heads.parse().context("a verified cell's head")?] },
            sweep_heads: false,
        };
        das.validate()?;
        sink.send(RunEvent::Log(format!("DAS (rank {}) at L{} {} @{} {}", o.rank, v.layer, v.site, v.position, v.heads)));
        let s = run(&das, &RunOptions::default(), sink)?;
        let c = s.cells.first().context("the DAS run has no cell")?;
        let control = c.controls.iter().map(|x| x.1).fold(f64::NAN, f64::max);
        rows.push(SearchRow {
            layer: v.layer,
            site: v.site.clone(),
            position: v.position.clone(),
            heads: v.heads.clone(),
            effect_estimate: v.effect_estimate,
            true_effect: v.true_effect,
            das_test_iia: c.test_iia_vocab,
            control_iia: control,
            margin: c.margin,
            das_run: s.run_dir.display().to_string(),
        });
    }
    // Localised first: DAS IIA, then the verified effect.
    rows.sort_by(|a, b| b.das_test_iia.total_cmp(&a.das_test_iia).then(b.true_effect.abs().total_cmp(&a.true_effect.abs())));
    crate::runs::write_csv(&dir.join("search.csv"), &rows, &SEARCH_HEADER)?;
    Ok((dir, rows))
}
