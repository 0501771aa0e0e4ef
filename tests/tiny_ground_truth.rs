//! DAS ground truth on the shipped tiny equality model. `road train-tiny` trained it with
//! interchange interventions (IIT) so that a==b lives in a 2-dim subspace of block 1's output at
//! position b (the subspace is saved with the model). DAS, starting from a random rotation, must
//! find it there (IIA ≥ 0.95, for several seeds) and not at position a, which has not seen b yet.
use road_dii::experiment::{outputs, run, RunOptions, Spec};

/// Test IIA (answer set) per (position, layer) of the experiment file as shipped.
fn das(seed: u64) -> Vec<(String, usize, f64)> {
    let out = std::env::temp_dir().join(format!("road-tiny-gt-{}", std::process::id()));
    std::env::set_var("ROAD_OUT", &out);
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/experiments/tiny-equality-das.toml");
    let spec = Spec::load(std::path::Path::new(file), &[format!("seed={seed}")]).unwrap();
    let s = run(&spec, &RunOptions { jobs: 2, ..Default::default() }, &mut road_dii::runs::events::Silent).unwrap();
    let m = outputs::read_metrics(&s.run_dir.join("metrics.csv")).unwrap();
    m.iter().filter(|r| r.split == "test" && r.is_main()).map(|r| (r.position.clone(), r.layer, r.iia_answers)).collect()
}

#[test]
fn das_finds_a_eq_b_where_iit_put_it_and_not_where_it_cannot_be() {
    for seed in [0, 1] {
        let iia = das(seed);
        let at = |p: &str, l: usize| iia.iter().find(|(q, m, _)| q == p && *m == l).unwrap().2;
        assert!(at("b", 1) >= 0.95, "seed {seed}: IIA at b/L1 = {}", at("b", 1));
        assert!(at("a", 1) <= 0.6, "seed {seed}: IIA at a/L1 = {} (a has not seen b)", at("a", 1));
    }
}

/// Cells trained at once give the same files as cells trained one after another (each cell has
/// its own seed; the tables are written in cell order).
#[test]
fn parallel_cells_match_sequential_cells() {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/experiments/tiny-equality-das.toml");
    let sets = ["train.steps=20".to_string(), "task.sizes=[128, 32, 64]".to_string()];
    let spec = Spec::load(std::path::Path::new(file), &sets).unwrap();
    let mut runs = Vec::new();
    for jobs in [1, 3] {
        let out = std::env::temp_dir().join(format!("road-tiny-jobs{jobs}-{}", std::process::id()));
        std::env::set_var("ROAD_OUT", &out);
        let opts = RunOptions { jobs, ..Default::default() };
        let s = run(&spec, &opts, &mut road_dii::runs::events::Silent).unwrap();
        assert!(s.complete && s.cells.len() == 4);
        runs.push(s.run_dir);
    }
    for f in ["metrics.csv", "examples.csv", "train_log.csv", "params.safetensors"] {
        let (a, b) = (std::fs::read(runs[0].join(f)).unwrap(), std::fs::read(runs[1].join(f)).unwrap());
        assert!(!a.is_empty() && a == b, "{f} differs between --jobs 1 and --jobs 3");
    }
}

/// `sites.sweep_heads`: one cell per head, each equal to a run restricted to that head alone,
/// with a figure per head.
#[test]
fn head_sweep_gives_one_cell_per_head_equal_to_single_head_runs() {
    let out = std::env::temp_dir().join(format!("road-tiny-heads-{}", std::process::id()));
    std::env::set_var("ROAD_OUT", &out);
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/experiments/tiny-equality-das.toml");
    let base = [
        "intervention.kind=\"vanilla\"".to_string(),
        "sites.site=\"head_output\"".to_string(),
        "sites.layers=[2]".to_string(),
        "sites.positions=[\"eq\"]".to_string(),
        "task.variable=\"output\"".to_string(),
        "task.sizes=[0, 0, 128]".to_string(),
    ];
    let go = |extra: &[&str]| {
        let sets: Vec<String> = base.iter().cloned().chain(extra.iter().map(|s| s.to_string())).collect();
        let spec = Spec::load(std::path::Path::new(file), &sets).unwrap();
        let s = run(&spec, &RunOptions::default(), &mut road_dii::runs::events::Silent).unwrap();
        (outputs::read_metrics(&s.run_dir.join("metrics.csv")).unwrap(), s.run_dir)
    };
    let (sweep, dir) = go(&["sites.sweep_heads=true"]);
    let heads: Vec<&str> = sweep.iter().map(|r| r.heads.as_str()).collect();
    assert_eq!(heads, ["0", "1", "2", "3"]);
    for (h, a) in sweep.iter().enumerate() {
        assert!(dir.join(format!("iia_heatmap_head_output_h{h}.svg")).is_file());
        let (one, _) = go(&[&format!("sites.heads=[{h}]")]);
        assert_eq!(one.len(), 1);
        let b = &one[0];
        assert_eq!((a.heads.as_str(), a.n), (b.heads.as_str(), b.n));
        assert_eq!((a.iia_vocab, a.logit_diff), (b.iia_vocab, b.logit_diff), "head {h}");
    }
    // Not every head does the same thing (the sweep is not one cell repeated).
    assert!(sweep.iter().any(|r| (r.logit_diff - sweep[0].logit_diff).abs() > 1e-6));
    // The workbench shows each head as its own heatmap, and drills down into its own examples.
    use road_dii::tui::data::{Grid, Metric, RunData};
    let d = RunData::load(&dir).unwrap();
    assert_eq!(d.sites(), ["head_output h0", "head_output h1", "head_output h2", "head_output h3"]);
    for (h, key) in d.sites().iter().enumerate() {
        let g = Grid::build(&d.metrics, key, Metric::LogitDiff);
        assert_eq!(g.values, vec![vec![Some(sweep[h].logit_diff)]], "{key}");
        let ex = d.examples_for(2, key, "eq");
        assert_eq!(ex.len(), sweep[h].n, "{key}");
        assert!(ex.iter().all(|e| e.heads == h.to_string()));
    }
}
