//! The terminal workbench: snapshots of every view (TestBackend + insta) from fixture runs,
//! keyboard flows driving `update` against the real worker and tiny model, and an end-to-end
//! check of the real binary in a pseudo terminal (tmux).
mod common;
use common::reference_dir;
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::KeyCode;
use ratatui::Terminal;
use road_dii::experiment::outputs;
use road_dii::tui::app::{update, App, Config, JobStatus, Panel, View};
use road_dii::tui::data::{Grid, Metric};
use road_dii::tui::event::{char_key, key, AltRow, AltTop, Event, JobEvent, ModelInfo, ModelMsg, Slot, TopRow};
use road_dii::tui::{dispatch, open_run, read_experiments, ui, Host};
use road_dii::experiment::RunEvent;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const RUN_A: &str = "tests/fixtures/runs/fixture-patching/20250101-120000-aaaa1111";
const RUN_B: &str = "tests/fixtures/runs/fixture-patching/20250102-120000-bbbb2222";

fn fixture_cfg(color: bool) -> Config {
    Config { experiments_dir: "tests/fixtures/experiments".into(), out_root: "tests/fixtures/runs".into(), color }
}

/// An app with the fixture experiments and runs loaded (no threads).
fn fixture_app(color: bool) -> App {
    let mut app = App::new(fixture_cfg(color));
    let (exps, runs) = (read_experiments(&app.cfg.experiments_dir), road_dii::tui::data::scan_runs(&app.cfg.out_root));
    feed(&mut app, Event::Experiments(exps));
    feed(&mut app, Event::Runs(runs));
    app
}

/// `update` without a host: file-read commands are carried out inline, the rest dropped.
fn feed(app: &mut App, ev: Event) {
    let mut pending = vec![ev];
    while let Some(ev) = pending.pop() {
        for c in update(app, ev) {
            use road_dii::tui::app::Command as C;
            match c {
                C::OpenRun { dir, slot } => pending.push(open_run(&dir, slot)),
                C::RefreshRuns => pending.push(Event::Runs(road_dii::tui::data::scan_runs(&app.cfg.out_root))),
                _ => {}
            }
        }
    }
}

fn keys(app: &mut App, ks: &[Event]) {
    for k in ks {
        feed(app, k.clone());
    }
}

fn render(app: &App, w: u16, h: u16) -> String {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| ui::draw(app, f)).unwrap();
    t.backend().to_string()
}

fn snap(name: &str, app: &App) {
    for (w, h) in [(80, 24), (120, 40)] {
        insta::assert_snapshot!(format!("{name}_{w}x{h}"), render(app, w, h));
    }
}

fn open_fixture_results(color: bool) -> App {
    let mut app = fixture_app(color);
    feed(&mut app, open_run(Path::new(RUN_A), Slot::Results));
    app
}

#[test]
fn snapshot_experiments() {
    let mut app = fixture_app(true);
    snap("experiments_list", &app);
    keys(&mut app, &[key(KeyCode::Enter)]);
    snap("experiments_spec", &app);
    app.exp.selected = app.exp.entries.iter().position(|e| e.file_name() == "ioi-das.toml").unwrap();
    keys(&mut app, &[key(KeyCode::Esc), char_key('e')]);
    snap("experiments_form", &app);
    keys(&mut app, &[key(KeyCode::Down), key(KeyCode::Down)]);
    // Make the intervention kind invalid: inline error.
    keys(&mut app, &[key(KeyCode::Backspace), key(KeyCode::Backspace), key(KeyCode::Backspace), char_key('x')]);
    snap("experiments_form_error", &app);
}

#[test]
fn broken_experiment_shows_its_parse_error() {
    let app = fixture_app(true);
    let broken = app.exp.entries.iter().find(|e| e.file_name() == "broken.toml").unwrap();
    let err = broken.spec.as_ref().unwrap_err();
    assert!(err.contains("colour"), "{err}");
    assert!(render(&app, 120, 40).contains("✗"), "inline error mark");
}

#[test]
fn form_edits_apply_as_overrides_and_revalidate() {
    let mut app = fixture_app(true);
    let das = app.exp.entries.iter().position(|e| e.file_name() == "ioi-das.toml").unwrap();
    app.exp.selected = das;
    keys(&mut app, &[char_key('e')]);
    // layers: replace with 8..10
    let clear: Vec<Event> = (0..30).map(|_| key(KeyCode::Backspace)).collect();
    keys(&mut app, &clear);
    keys(&mut app, &"8..10".chars().map(char_key).collect::<Vec<_>>());
    // steps (field 4): 7
    keys(&mut app, &[key(KeyCode::Tab), key(KeyCode::Tab), key(KeyCode::Tab), key(KeyCode::Tab)]);
    keys(&mut app, &clear);
    keys(&mut app, &[char_key('x')]);
    let f = app.exp.form.as_ref().unwrap();
    assert!(f.fields[4].error.is_some(), "non-numeric steps is flagged inline");
    keys(&mut app, &[key(KeyCode::Enter)]);
    assert!(app.exp.form.is_some(), "an invalid form is not applied");
    keys(&mut app, &[key(KeyCode::Backspace), char_key('7'), key(KeyCode::Enter)]);
    assert!(app.exp.form.is_none());
    let spec = app.exp.entries[das].spec.as_ref().unwrap();
    assert_eq!(spec.train.steps, 7);
    assert_eq!(spec.layer_list(30).unwrap(), vec![8, 9]);
    assert!(app.exp.entries[das].overrides.iter().any(|o| o == "train.steps=7"));
}

#[test]
fn snapshot_runs_view() {
    let mut app = fixture_app(true);
    let das = app.exp.entries.iter().position(|e| e.file_name() == "ioi-das.toml").unwrap();
    app.exp.selected = das;
    keys(&mut app, &[char_key('r')]);
    assert_eq!(app.view, View::Runs);
    let id = app.runs.jobs[0].id;
    let job = |ev: RunEvent| Event::Job { id, ev: JobEvent::Run(ev) };
    let evs = vec![
        job(RunEvent::Log("train split: 160 pairs, model accuracy 0.950".into())),
        job(RunEvent::Started { run_dir: "notebooks-out/ioi-das/20250101-000000-12345678".into(), cells: 4, steps_per_cell: 10 }),
        job(RunEvent::CellStarted { cell: 0, label: "L8 block_output @ last".into() }),
    ];
    for e in evs {
        feed(&mut app, e);
    }
    for s in 0..10 {
        feed(&mut app, job(RunEvent::Step { cell: 0, step: s, steps: 10, loss: 2.0 / (1.0 + s as f64) }));
    }
    feed(&mut app, job(RunEvent::CellDone { cell: 0, label: "L8 block_output @ last".into(), layer: 8, site: "block_output".into(), position: "last".into(), iia: 0.25, logit_diff: -1.5 }));
    feed(&mut app, job(RunEvent::CellStarted { cell: 1, label: "L8 block_output @ S2".into() }));
    for s in 0..4 {
        feed(&mut app, job(RunEvent::Step { cell: 1, step: s, steps: 10, loss: 1.5 / (1.0 + s as f64) }));
    }
    assert!((app.runs.jobs[0].progress() - 15.0 / 44.0).abs() < 1e-9);
    snap("runs_live", &app);
    // Training evaluation points: the dev IIA curve of the current cell appears beside the loss.
    assert!(!render(&app, 120, 40).contains("dev IIA"));
    feed(&mut app, job(RunEvent::Eval { cell: 1, step: 1, dev_iia: 0.25, dev_loss: 1.0 }));
    feed(&mut app, job(RunEvent::Eval { cell: 1, step: 3, dev_iia: 0.625, dev_loss: 0.5 }));
    let screen = render(&app, 120, 40);
    assert!(screen.contains("dev IIA, this cell") && screen.contains("last 0.625"), "{screen}");
    // `c` cancels: the job is flagged and the worker asked.
    let cmds = update(&mut app, char_key('c'));
    assert!(matches!(cmds.as_slice(), [road_dii::tui::app::Command::CancelRun { job }] if *job == id));
    feed(&mut app, job(RunEvent::Finished { run_dir: "notebooks-out/ioi-das/20250101-000000-12345678".into(), complete: false }));
    assert_eq!(app.runs.jobs[0].status, JobStatus::Cancelled);
}

#[test]
fn snapshot_results_views() {
    let mut app = fixture_app(true);
    keys(&mut app, &[char_key('3')]);
    snap("results_picker", &app);
    let mut app = open_fixture_results(true);
    assert_eq!(app.view, View::Results);
    snap("results_heatmap", &app);
    // Token labels on the position axis, as the model worker would send them.
    let text = app.results.open.as_ref().unwrap().first_base_prompt().unwrap().to_string();
    let toks: Vec<String> = ["After", " John", " and", " Mary", " left", ",", " John", " thanked"].map(String::from).to_vec();
    feed(&mut app, Event::Model(ModelMsg::Tokens { text, tokens: toks }));
    keys(&mut app, &[key(KeyCode::Down), key(KeyCode::Down), key(KeyCode::Down), key(KeyCode::Right), key(KeyCode::Right), key(KeyCode::Right), key(KeyCode::Right), key(KeyCode::Right)]);
    assert_eq!(app.results.cursor, (3, 5));
    snap("results_heatmap_tokens_cursor", &app);
    keys(&mut app, &[key(KeyCode::Tab), key(KeyCode::Tab), key(KeyCode::Tab), key(KeyCode::BackTab)]);
    assert_eq!(app.results.metric, Metric::LogitDiff);
    assert_eq!(app.results.site_name().as_deref(), Some("attn_output"));
    snap("results_logit_diff_attn", &app);
    keys(&mut app, &[char_key('t')]);
    snap("results_table", &app);
    keys(&mut app, &[char_key('s'), char_key('o')]);
    assert_eq!(app.results.sort_col, 4);
    keys(&mut app, &[char_key('h'), key(KeyCode::Enter)]);
    assert_eq!(app.results.panel, Panel::Examples);
    snap("results_examples", &app);
}

#[test]
fn snapshot_no_color_heatmap_uses_shades() {
    let app = open_fixture_results(false);
    let s = render(&app, 80, 24);
    assert!(s.contains('█') && s.contains('░'), "{s}");
    insta::assert_snapshot!("results_heatmap_no_color_80x24", s);
    let mut t = Terminal::new(TestBackend::new(80, 24)).unwrap();
    t.draw(|f| ui::draw(&app, f)).unwrap();
    let colored = t.backend().buffer().content.iter().any(|c| c.fg != ratatui::style::Color::Reset || c.bg != ratatui::style::Color::Reset);
    assert!(!colored, "NO_COLOR: no cell has a colour");
}

#[test]
fn heatmap_cells_equal_metrics_csv_of_fixture() {
    let app = open_fixture_results(true);
    let g = app.results.grid().unwrap();
    assert_eq!(g.layers, (0..6).collect::<Vec<_>>());
    assert_eq!(g.positions, (0..8).map(|i| i.to_string()).collect::<Vec<_>>());
    check_grid_against_csv(&g, &Path::new(RUN_A).join("metrics.csv"), "block_output");
}

fn check_grid_against_csv(g: &Grid, metrics: &Path, site: &str) {
    let rows = outputs::read_metrics(metrics).unwrap();
    let test: Vec<_> = rows.iter().filter(|r| r.split == "test" && r.site == site).collect();
    assert_eq!(test.len(), g.layers.len() * g.positions.len());
    for r in test {
        let li = g.layers.iter().position(|l| *l == r.layer).unwrap();
        let pi = g.positions.iter().position(|p| *p == r.position).unwrap();
        assert_eq!(g.get(li, pi), Some(r.iia_vocab), "L{} {}", r.layer, r.position);
    }
}

#[test]
fn snapshot_compare() {
    let mut app = fixture_app(true);
    keys(&mut app, &[char_key('4')]);
    snap("compare_picker_empty", &app);
    // Newest first: mark the older run as A, then the newer as B.
    keys(&mut app, &[key(KeyCode::Down), char_key(' '), key(KeyCode::Up), char_key(' ')]);
    assert_eq!(app.compare.marked, vec![PathBuf::from(RUN_A), PathBuf::from(RUN_B)]);
    snap("compare_picker_marked", &app);
    keys(&mut app, &[key(KeyCode::Enter)]);
    assert!(app.compare.showing);
    let (ga, gb, gd) = app.compare.grids().unwrap();
    assert_eq!(gd.get(5, 7), Some(gb.get(5, 7).unwrap() - ga.get(5, 7).unwrap()));
    snap("compare_diff", &app);
}

#[test]
fn snapshot_model_and_help() {
    let mut app = fixture_app(true);
    let das = app.exp.entries.iter().position(|e| e.file_name() == "ioi-das.toml").unwrap();
    app.exp.selected = das;
    let cmds = update(&mut app, char_key('5'));
    assert!(matches!(cmds.as_slice(), [road_dii::tui::app::Command::LoadModel { name }] if name == "smollm2-135m"), "lazy load in the worker");
    snap("model_loading", &app);
    let info = ModelInfo {
        name: "smollm2-135m".into(),
        source: "~/.cache/road-dii/smollm2-135m.gguf".into(),
        format: "gguf".into(),
        layers: 30,
        hidden: 576,
        ffn: 1536,
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        vocab: 49152,
        params: 134_515_008,
        context: 8192,
        tied: true,
    };
    feed(&mut app, Event::Model(ModelMsg::Loaded(info)));
    keys(&mut app, &[char_key('i')]);
    keys(&mut app, &"The capital of France is".chars().map(char_key).collect::<Vec<_>>());
    let cmds = update(&mut app, key(KeyCode::Enter));
    assert!(matches!(cmds.as_slice(), [road_dii::tui::app::Command::TopK { .. }]));
    let rows = [(7042u32, " Paris", 17.5f32, 0.61), (253, " the", 15.9, 0.12), (314, " a", 14.8, 0.04)]
        .map(|(id, t, l, p)| TopRow { id, token: t.into(), logit: l, prob: p })
        .to_vec();
    let prompt = app.model.prompt.clone();
    feed(&mut app, Event::Model(ModelMsg::TopK { model: "smollm2-135m".into(), prompt: prompt.clone(), ids: vec![504, 3575, 282, 4649, 314], rows: rows.clone(), alt: None }));
    snap("model_topk", &app);
    // What-if: the form (swap from a source prompt at L12 resid_mid, last position), then the
    // clean and intervened top-k side by side.
    keys(&mut app, &[char_key('w'), key(KeyCode::Left), key(KeyCode::Tab), key(KeyCode::Backspace), char_key('1'), char_key('2')]);
    keys(&mut app, &[key(KeyCode::Tab), key(KeyCode::Left), key(KeyCode::Left), key(KeyCode::Tab), key(KeyCode::Tab)]);
    keys(&mut app, &"The capital of Italy is".chars().map(char_key).collect::<Vec<_>>());
    snap("model_whatif_form", &app);
    let cmds = update(&mut app, key(KeyCode::Enter));
    let Some(road_dii::tui::app::Command::TopK { whatif: Some(w), .. }) = cmds.first() else { panic!("top-k with the what-if: {cmds:?}") };
    assert_eq!(w.label(), "vanilla ← \"The capital of Italy is\" · L12 resid_mid @last");
    let alt = [(12039u32, " Rome", 0.58, 0.0004, 212usize), (7042, " Paris", 0.09, 0.61, 1), (253, " the", 0.07, 0.12, 2)]
        .map(|(id, t, p, cp, cr)| AltRow { row: TopRow { id, token: t.into(), logit: 0.0, prob: p }, clean_prob: cp, clean_rank: cr })
        .to_vec();
    let alt = AltTop { label: w.label(), rows: alt, kl: 1.234 };
    feed(&mut app, Event::Model(ModelMsg::TopK { model: "smollm2-135m".into(), prompt, ids: vec![504, 3575, 282, 4649, 314], rows, alt: Some(Ok(alt)) }));
    snap("model_whatif", &app);
    keys(&mut app, &[char_key('?')]);
    snap("help", &app);
    keys(&mut app, &[char_key('z')]);
    assert!(!app.help);
}

#[test]
fn export_writes_csv_into_the_run_folder() {
    let tmp = tmpdir("export");
    let run = tmp.join("fixture-patching/20250101-120000-aaaa1111");
    std::fs::create_dir_all(&run).unwrap();
    for f in ["config.toml", "metrics.csv", "examples.csv"] {
        std::fs::copy(Path::new(RUN_A).join(f), run.join(f)).unwrap();
    }
    let mut app = App::new(Config { out_root: tmp.clone(), ..fixture_cfg(true) });
    let (mut host, _rx) = Host::new(app.cfg.clone());
    dispatch(&mut app, &mut host, open_run(&run, Slot::Results));
    dispatch(&mut app, &mut host, char_key('x'));
    let csv = std::fs::read_to_string(run.join("tui-export-heatmap-iia_vocab-block_output.csv")).unwrap();
    assert!(csv.starts_with("layer,position,iia_vocab\n"), "{csv}");
    assert_eq!(csv.lines().count(), 1 + 6 * 8);
    dispatch(&mut app, &mut host, char_key('t'));
    dispatch(&mut app, &mut host, char_key('x'));
    assert!(run.join("tui-export-table.csv").exists());
    dispatch(&mut app, &mut host, char_key('d'));
    dispatch(&mut app, &mut host, char_key('x'));
    let ex = std::fs::read_to_string(run.join("tui-export-examples.csv")).unwrap();
    assert_eq!(ex.lines().count(), 1 + 3);
    assert!(app.status.starts_with("exported"), "{}", app.status);
}

// ------------------------------------------------------------------ flows with the real worker

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("road-tui-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// One output root for every flow test in this process (the runner reads ROAD_OUT).
fn out_root() -> PathBuf {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        let d = tmpdir("out");
        std::env::set_var("ROAD_OUT", &d);
        d
    })
    .clone()
}

/// A JSONL task whose labels are what the tiny random model predicts, so the accuracy filter
/// keeps every pair and the runner produces real metrics in seconds.
fn tiny_experiment(dir: &Path, name: &str, intervention: &str, train: &str) -> PathBuf {
    let model_dir = reference_dir().join("hf-tiny-llama-a");
    let l = &common::tiny_a();
    let prompts = [
        "The capital of France is", "The capital of Spain is", "My favourite colour is", "Once upon a time there",
        "The cat sat on the", "In the beginning was", "Two plus two equals", "She opened the door and",
        "The river flows into the", "He picked up the phone and", "Yesterday we went to the", "A long time ago in",
    ];
    let mut usable = vec![];
    for p in prompts {
        let ids = l.tok.encode(p).unwrap();
        let out = l.model.forward(&[ids], road_dii::model::Fwd { logits: road_dii::model::LogitsAt::Last, ..Default::default() }).unwrap();
        let v = out.logits.unwrap().get(0).unwrap().to_vec1::<f32>().unwrap();
        let pred = road_dii::generate::argmax(&v);
        let label = l.tok.token_str(pred);
        if l.tok.encode(&label).unwrap().first() == Some(&pred) {
            usable.push((p, label));
        }
    }
    assert!(usable.len() >= 6, "need six prompts whose argmax token round-trips, got {}", usable.len());
    let splits = ["train", "train", "dev", "test", "test", "test"];
    let mut jsonl = String::new();
    for i in 0..6 {
        let (b, bl) = &usable[i];
        let (s, sl) = &usable[(i + 1) % usable.len()];
        let row = serde_json::json!({"base": b, "source": s, "base_label": bl, "cf_label": sl, "split": splits[i]});
        jsonl.push_str(&format!("{row}\n"));
    }
    let pairs = dir.join(format!("{name}.jsonl"));
    std::fs::write(&pairs, jsonl).unwrap();
    let exp_dir = dir.join("experiments");
    std::fs::create_dir_all(&exp_dir).unwrap();
    let toml = format!(
        r#"name = "{name}"
description = "tiny random model, labels = its own predictions"
seed = 0

[model]
name = {model:?}

[task]
name = "jsonl"
path = {pairs:?}
min_accuracy = 0

[sites]
layers = "all"
site = "block_output"
positions = ["last"]

[intervention]
{intervention}

[train]
{train}
"#,
        model = model_dir.display().to_string(),
        pairs = pairs.display().to_string(),
    );
    std::fs::write(exp_dir.join(format!("{name}.toml")), toml).unwrap();
    exp_dir
}

/// Pump worker events into the app until `done` holds (or fail after `secs`).
fn pump(app: &mut App, host: &mut Host, rx: &std::sync::mpsc::Receiver<Event>, secs: u64, mut done: impl FnMut(&App) -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !done(app) {
        let left = end.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out; status: {}; jobs: {:?}", app.status, app.runs.jobs.iter().map(|j| (&j.status, &j.log)).collect::<Vec<_>>());
        if let Ok(ev) = rx.recv_timeout(left.min(Duration::from_millis(200))) {
            app.now = Instant::now();
            dispatch(app, host, ev);
        }
    }
}

fn finished(app: &App) -> bool {
    app.runs.jobs.last().map(|j| !matches!(j.status, JobStatus::Queued | JobStatus::Running)).unwrap_or(false)
}

#[test]
fn flow_open_experiment_run_it_and_see_its_heatmap() {
    let root = out_root();
    let dir = tmpdir("flow");
    let exp_dir = tiny_experiment(&dir, "tiny-flow", "kind = \"vanilla\"", "steps = 0");
    let cfg = Config { experiments_dir: exp_dir, out_root: root.clone(), color: true };
    let (mut host, rx) = Host::new(cfg.clone());
    let mut app = App::new(cfg);
    for c in app.init() {
        for ev in host.exec(c) {
            dispatch(&mut app, &mut host, ev);
        }
    }
    assert_eq!(app.exp.entries.len(), 1);
    assert!(app.exp.entries[0].spec.is_ok(), "{:?}", app.exp.entries[0].spec);
    // Open the experiment: the resolved spec is shown.
    dispatch(&mut app, &mut host, key(KeyCode::Enter));
    assert!(app.exp.show_spec);
    assert!(render(&app, 80, 24).contains("tiny-flow"));
    // Run it.
    dispatch(&mut app, &mut host, char_key('r'));
    assert_eq!(app.view, View::Runs);
    // The UI answers keys while the run is queued/running: `?` toggles help at once.
    let t0 = Instant::now();
    dispatch(&mut app, &mut host, char_key('?'));
    dispatch(&mut app, &mut host, char_key('?'));
    assert!(t0.elapsed() < Duration::from_millis(100));
    pump(&mut app, &mut host, &rx, 300, finished);
    let job = app.runs.jobs.last().unwrap().clone();
    assert_eq!(job.status, JobStatus::Done, "{:?}", job.log);
    assert_eq!(job.cells_done, 2, "two layers × one position");
    assert!(render(&app, 80, 24).contains("100%"));
    // Enter opens the finished run's results: a heatmap whose cells equal metrics.csv.
    dispatch(&mut app, &mut host, key(KeyCode::Enter));
    assert_eq!(app.view, View::Results);
    let run_dir = job.run_dir.clone().unwrap();
    assert!(run_dir.starts_with(&root));
    let g = app.results.grid().unwrap();
    assert_eq!(g.layers, vec![0, 1]);
    assert_eq!(g.positions, vec!["last".to_string()]);
    check_grid_against_csv(&g, &run_dir.join("metrics.csv"), "block_output");
    let screen = render(&app, 80, 24);
    let v = g.get(0, 0).unwrap();
    assert!(screen.contains(&road_dii::tui::ui::heatmap::fmt_value(Some(v), 4)), "{screen}");
    assert!(screen.contains("layer × position"));
    // Drill-down lists the cell's test examples from examples.csv.
    dispatch(&mut app, &mut host, key(KeyCode::Enter));
    assert_eq!(app.results.panel, Panel::Examples);
    let n = app.results.open.as_ref().unwrap().examples_for(0, "block_output", "last").len();
    assert_eq!(n, 3);
    // The run is listed among past runs.
    dispatch(&mut app, &mut host, char_key('3'));
    assert!(app.run_list.iter().any(|r| r.dir == run_dir));

    // Model pane: loads lazily in the worker, then top-k for a typed prompt.
    dispatch(&mut app, &mut host, char_key('1'));
    dispatch(&mut app, &mut host, char_key('5'));
    assert!(app.model.loading);
    pump(&mut app, &mut host, &rx, 60, |a| a.model.info.is_some() || a.model.error.is_some());
    assert_eq!(app.model.info.as_ref().map(|i| i.layers), Some(2), "{:?}", app.model.error);
    dispatch(&mut app, &mut host, char_key('i'));
    for c in "The capital of France is".chars() {
        dispatch(&mut app, &mut host, char_key(c));
    }
    dispatch(&mut app, &mut host, key(KeyCode::Enter));
    pump(&mut app, &mut host, &rx, 60, |a| !a.model.top.is_empty() || a.model.error.is_some());
    assert_eq!(app.model.top.len(), 10);
    assert_eq!(app.model.top[0].id, 47921, "transformers' argmax for this prompt");

    // What-if in the worker: swapping the last block's output at the last position from a source
    // prompt makes the next-token distribution exactly the source prompt's own.
    let source = "Paris is the capital of";
    dispatch(&mut app, &mut host, char_key('w'));
    dispatch(&mut app, &mut host, key(KeyCode::Left));
    dispatch(&mut app, &mut host, key(KeyCode::Tab));
    dispatch(&mut app, &mut host, key(KeyCode::Backspace));
    dispatch(&mut app, &mut host, char_key('1'));
    for _ in 0..3 {
        dispatch(&mut app, &mut host, key(KeyCode::Tab));
    }
    for c in source.chars() {
        dispatch(&mut app, &mut host, char_key(c));
    }
    dispatch(&mut app, &mut host, key(KeyCode::Enter));
    assert!(app.model.form.is_none() && app.model.busy, "{:?}", app.model.form.as_ref().and_then(|f| f.error.clone()));
    pump(&mut app, &mut host, &rx, 60, |a| !a.model.busy);
    let alt = app.model.alt.clone().expect("what-if ran").expect("what-if succeeded");
    let l = common::tiny_a();
    let src_ids = l.tok.encode(source).unwrap();
    let want = l.model.forward(&[src_ids], road_dii::model::Fwd { logits: road_dii::model::LogitsAt::Last, ..Default::default() }).unwrap();
    let want = want.logits.unwrap().get(0).unwrap().to_vec1::<f32>().unwrap();
    let top = road_dii::generate::top_k(&want, 10);
    assert_eq!(alt.rows.iter().map(|r| r.row.id).collect::<Vec<_>>(), top.iter().map(|t| t.0).collect::<Vec<_>>());
    for (r, (_, lg)) in alt.rows.iter().zip(&top) {
        assert!((r.row.logit - lg).abs() < 1e-4, "{} vs {lg}", r.row.logit);
    }
    assert!(alt.kl > 0.0);
    let screen = render(&app, 120, 40);
    assert!(screen.contains("what-if · KL") && screen.contains(" clean "), "{screen}");
    // `c` clears it: back to the clean top-k alone.
    dispatch(&mut app, &mut host, char_key('c'));
    assert!(app.model.whatif.is_none() && app.model.alt.is_none());
}

/// The what-if's adapter kind on SmolLM2 with peft's saved RoAd adapters reproduces peft's logits.
#[test]
fn whatif_adapter_reproduces_peft_road_logits() {
    use road_dii::tui::whatif::{exec, Kind, Pos, WhatIf};
    let refj = common::ref_json("public.json");
    let reft = common::ref_tensors("public.safetensors");
    for v in ["road_1", "road_4"] {
        let info = &refj["peft_road"][v];
        let ids = common::ids_of(&info["ids"]);
        let dir = reference_dir().join(info["adapter_dir"].as_str().unwrap());
        let w = WhatIf { kind: Kind::Adapter, layer: 0, site: road_dii::model::Site::BlockOutput, pos: Pos::Last, source: String::new(), adapter: dir.display().to_string() };
        let got = exec::logits(common::smollm2(), &ids, &w).unwrap();
        let want = reft[&format!("peft_{v}.last_logits")].to_vec1::<f32>().unwrap();
        let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(d < 1e-3, "{v}: max |Δlogit| {d}");
    }
}

/// Zero ablation of every position of block 0's input (the embeddings) leaves the logits a
/// function of position only: two different prompts of equal length then give the same logits.
#[test]
fn whatif_zero_ablation_of_all_embeddings_erases_the_prompt() {
    use road_dii::tui::whatif::{exec, Kind, Pos, WhatIf};
    let l = common::tiny_a();
    let w = WhatIf { kind: Kind::named("zero").unwrap(), layer: 0, site: road_dii::model::Site::BlockInput, pos: Pos::All, source: String::new(), adapter: String::new() };
    let (a, b) = (l.tok.encode("The capital of France is").unwrap(), l.tok.encode("My favourite colour is blue").unwrap());
    let n = a.len().min(b.len());
    let (la, lb) = (exec::logits(l, &a[..n], &w).unwrap(), exec::logits(l, &b[..n], &w).unwrap());
    assert_eq!(la, lb);
    let clean = l.model.forward(&[a[..n].to_vec()], road_dii::model::Fwd { logits: road_dii::model::LogitsAt::Last, ..Default::default() }).unwrap();
    assert_ne!(clean.logits.unwrap().get(0).unwrap().to_vec1::<f32>().unwrap(), la);
    // Positions past the prompt are an error, not a silent no-op.
    let past = WhatIf { pos: Pos::At(n), ..w.clone() };
    assert!(exec::logits(l, &a[..n], &past).unwrap_err().to_string().contains("past the prompt"));
}

/// The what-if runs the experiments' own kinds: an interchange whose source is the base prompt
/// itself changes nothing, a magnitude swap from another prompt changes the logits, and a mean
/// ablation at a single position is the identity (the mean over one vector is that vector).
#[test]
fn whatif_runs_the_experiment_kinds() {
    use road_dii::tui::whatif::{exec, Kind, Pos, WhatIf};
    let l = common::tiny_a();
    let prompt = "The capital of France is";
    let ids = l.tok.encode(prompt).unwrap();
    let clean = l.model.forward(&[ids.clone()], road_dii::model::Fwd { logits: road_dii::model::LogitsAt::Last, ..Default::default() }).unwrap();
    let clean = clean.logits.unwrap().get(0).unwrap().to_vec1::<f32>().unwrap();
    let at = |kind: &str, pos: Pos, source: &str| WhatIf { kind: Kind::named(kind).unwrap(), layer: 1, site: road_dii::model::Site::ResidMid, pos, source: source.into(), adapter: String::new() };
    let max_diff = |a: &[f32]| a.iter().zip(&clean).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    for kind in ["vanilla", "angle", "magnitude"] {
        assert!(max_diff(&exec::logits(l, &ids, &at(kind, Pos::All, prompt)).unwrap()) < 1e-4, "{kind} from itself");
    }
    assert!(max_diff(&exec::logits(l, &ids, &at("magnitude", Pos::Last, "My favourite colour is blue")).unwrap()) > 1e-3);
    let n = ids.len();
    let one = exec::logits(l, &ids[..1], &at("mean", Pos::All, "")).unwrap();
    let clean1 = l.model.forward(&[ids[..1].to_vec()], road_dii::model::Fwd { logits: road_dii::model::LogitsAt::Last, ..Default::default() }).unwrap();
    let clean1 = clean1.logits.unwrap().get(0).unwrap().to_vec1::<f32>().unwrap();
    assert!(one.iter().zip(&clean1).all(|(a, b)| (a - b).abs() < 1e-4), "mean of one vector is that vector");
    assert!(max_diff(&exec::logits(l, &ids, &at("mean", Pos::All, "")).unwrap()) > 1e-3, "mean over {n} positions changes the run");
    let e = exec::logits(l, &ids, &at("vanilla", Pos::All, "Hi")).unwrap_err().to_string();
    assert!(e.contains("equal length"), "{e}");
}

#[test]
fn flow_cancel_keeps_partial_results_and_marks_incomplete() {
    out_root();
    let dir = tmpdir("cancel");
    let exp_dir = tiny_experiment(&dir, "tiny-cancel", "kind = \"das\"\nrank = 1", "steps = 100000\nbatch = 2");
    let cfg = Config { experiments_dir: exp_dir, out_root: out_root(), color: true };
    let (mut host, rx) = Host::new(cfg.clone());
    let mut app = App::new(cfg);
    for c in app.init() {
        for ev in host.exec(c) {
            dispatch(&mut app, &mut host, ev);
        }
    }
    // Queue it twice: the second is cancelled while still queued and never starts.
    dispatch(&mut app, &mut host, char_key('r'));
    dispatch(&mut app, &mut host, char_key('1'));
    dispatch(&mut app, &mut host, char_key('r'));
    assert_eq!(app.runs.jobs.len(), 2);
    dispatch(&mut app, &mut host, char_key('c'));
    pump(&mut app, &mut host, &rx, 120, |a| a.runs.jobs[0].loss.len() >= 3);
    app.runs.selected = 0;
    dispatch(&mut app, &mut host, char_key('c'));
    pump(&mut app, &mut host, &rx, 120, |a| a.runs.jobs.iter().all(|j| !matches!(j.status, JobStatus::Queued | JobStatus::Running)));
    assert_eq!(app.runs.jobs[0].status, JobStatus::Cancelled);
    assert_eq!(app.runs.jobs[1].status, JobStatus::Cancelled);
    assert!(app.runs.jobs[1].run_dir.is_none(), "the queued job never started");
    let d = app.runs.jobs[0].run_dir.clone().unwrap();
    assert!(d.join("INCOMPLETE").exists());
    assert!(d.join("train_log.csv").exists());
}

#[test]
fn e2e_real_binary_in_tmux() {
    let out = std::process::Command::new("bash")
        .arg(".ci/tui-e2e.sh")
        .env("ROAD_BIN", env!("CARGO_BIN_EXE_road"))
        .output()
        .expect("running .ci/tui-e2e.sh");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    if text.contains("skipping") {
        eprintln!("{text}");
        return;
    }
    assert!(text.contains("tui-e2e: ok"), "{text}");
}

#[test]
fn heatmap_scrolls_to_keep_the_cursor_visible() {
    // 30 layers × 15 positions (the size of ioi-patching on SmolLM2) in an 80×24 terminal.
    let tmp = tmpdir("big");
    let run = tmp.join("big/20250101-000000-cafebabe");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("config.toml"), "name = \"big\"\n[model]\nname = \"x\"\n[intervention]\nkind = \"vanilla\"\n").unwrap();
    let mut rows = Vec::new();
    for layer in 0..30 {
        for pos in 0..15 {
            rows.push(outputs::MetricRow {
                experiment: "big".into(),
                seed: 0,
                layer,
                site: "block_output".into(),
                position: pos.to_string(),
                heads: String::new(),
                intervention: "vanilla".into(),
                split: "test".into(),
                iia_vocab: (layer * 15 + pos) as f64 / 449.0,
                iia_answers: 0.0,
                logit_diff: 0.0,
                normalized_effect: 0.0,
                base_acc: 1.0,
                source_acc: 1.0,
                n: 1,
                control: "none".into(),
                cut: false,
                effect_estimate: f64::NAN,
                method: String::new(),
            });
        }
    }
    road_dii::runs::write_csv(&run.join("metrics.csv"), &rows, &outputs::METRIC_HEADER).unwrap();
    let mut app = App::new(Config { out_root: tmp.clone(), ..fixture_cfg(true) });
    feed(&mut app, open_run(&run, Slot::Results));
    let first = render(&app, 80, 24);
    assert!(first.contains("│L0  ") && !first.contains("│L29 "), "{first}");
    for _ in 0..40 {
        keys(&mut app, &[key(KeyCode::Down), key(KeyCode::Right)]);
    }
    assert_eq!(app.results.cursor, (29, 14));
    let s = render(&app, 80, 24);
    assert!(s.contains("│L29 ") && !s.contains("│L0  ") && s.contains("  14 "), "{s}");
    assert!(s.contains("iia_vocab = 1.0000"), "{s}");
}

#[test]
fn an_atp_run_opens_on_its_estimates_with_a_view_per_head() {
    let tmp = tmpdir("atp");
    let run = tmp.join("atp/20250101-000000-a7a7a7a7");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("config.toml"), "name = \"atp\"\n[model]\nname = \"x\"\n[intervention]\nkind = \"atp\"\n").unwrap();
    let mut rows = Vec::new();
    for layer in 0..3 {
        for pos in 0..4 {
            for heads in ["", "0", "1"] {
                let est = (layer * 4 + pos) as f64 * 0.25 - if heads == "1" { 10.0 } else { 0.0 };
                rows.push(outputs::MetricRow {
                    experiment: "atp".into(),
                    seed: 0,
                    layer,
                    site: "head_output".into(),
                    position: pos.to_string(),
                    heads: heads.into(),
                    intervention: "atp".into(),
                    split: "test".into(),
                    iia_vocab: f64::NAN,
                    iia_answers: f64::NAN,
                    logit_diff: -3.0 + est,
                    normalized_effect: est / 6.0,
                    base_acc: 1.0,
                    source_acc: 1.0,
                    n: 44,
                    control: "none".into(),
                    cut: false,
                    effect_estimate: est,
                    method: "plain".into(),
                });
            }
        }
    }
    road_dii::runs::write_csv(&run.join("metrics.csv"), &rows, &outputs::METRIC_HEADER).unwrap();
    let mut app = App::new(Config { out_root: tmp.clone(), ..fixture_cfg(true) });
    feed(&mut app, open_run(&run, Slot::Results));
    assert_eq!(app.results.metric, Metric::EffectEstimate, "no IIA in an AtP run: it opens on the estimates");
    let data = app.results.open.as_ref().unwrap();
    assert_eq!(data.sites(), vec!["head_output".to_string(), "head_output h0".into(), "head_output h1".into()]);
    let g = Grid::build(&data.metrics, "head_output h1", Metric::EffectEstimate);
    assert_eq!(g.values[2][3], Some(11.0 * 0.25 - 10.0));
    let s = render(&app, 120, 40);
    assert!(s.contains("effect_estimate"), "{s}");
}
