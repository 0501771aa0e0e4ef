//! The workbench on a pilot-study run: its results view shows ΔD/ΔM curves per method, the
//! disentanglement table and the fine-tunes (snapshots at 80×24 and 120×40), and the results
//! keys do nothing harmful on a run that has no intervention metrics.
use ratatui::crossterm::event::KeyCode;
use ratatui::backend::TestBackend;
use ratatui::Terminal;
use road_dii::tui::app::{update, App, Command, Config, View};
use road_dii::tui::event::{char_key, key, Event, Slot};
use road_dii::tui::{open_run, ui};
use std::path::Path;

const RUN: &str = "tests/fixtures/pilot-runs/pilot-tiny/20250103-120000-cccc3333";

fn feed(app: &mut App, ev: Event) {
    let mut pending = vec![ev];
    while let Some(ev) = pending.pop() {
        for c in update(app, ev) {
            if let Command::OpenRun { dir, slot } = c {
                pending.push(open_run(&dir, slot));
            }
        }
    }
}

fn render(app: &App, w: u16, h: u16) -> String {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| ui::draw(app, f)).unwrap();
    t.backend().to_string()
}

fn app() -> App {
    let mut app = App::new(Config { experiments_dir: "tests/fixtures/experiments".into(), out_root: "tests/fixtures/pilot-runs".into(), color: true });
    let runs = road_dii::tui::data::scan_runs(&app.cfg.out_root);
    feed(&mut app, Event::Runs(runs));
    feed(&mut app, open_run(Path::new(RUN), Slot::Results));
    app
}

#[test]
fn pilot_run_shows_curves_heads_and_finetunes() {
    let app = app();
    assert_eq!(app.view, View::Results);
    let p = app.results.open.as_ref().unwrap().pilot.as_ref().expect("pilot tables loaded");
    assert_eq!(p.methods(), ["full", "lora", "road1"]);
    assert_eq!(p.heads.len(), 2 * 2 * 3);
    for (w, h) in [(80, 24), (120, 40)] {
        let s = render(&app, w, h);
        assert!(s.contains("ΔD") && s.contains("frozen-backbone heads") && s.contains("fine-tunes"), "{s}");
        insta::assert_snapshot!(format!("pilot_results_{w}x{h}"), s);
    }
}

#[test]
fn results_keys_are_harmless_on_a_pilot_run() {
    let mut app = app();
    for k in [KeyCode::Tab, KeyCode::BackTab, KeyCode::Down, KeyCode::Right, KeyCode::Up, KeyCode::Left, KeyCode::Enter, KeyCode::Esc, KeyCode::Enter] {
        feed(&mut app, key(k));
        render(&app, 80, 24);
    }
    for c in ['t', 's', 'o', 'h'] {
        feed(&mut app, char_key(c));
        render(&app, 120, 40);
    }
}

#[test]
fn pilot_files_are_listed_and_r_queues_a_pilot_job() {
    let mut app = App::new(Config { experiments_dir: "experiments".into(), out_root: "tests/fixtures/pilot-runs".into(), color: true });
    let files = road_dii::tui::read_experiments(&app.cfg.experiments_dir);
    feed(&mut app, Event::Experiments(files));
    let idx = app.exp.entries.iter().position(|e| e.file_name() == "pilot-tiny.toml").expect("pilot-tiny.toml listed");
    assert!(matches!(app.exp.entries[idx].pilot, Some(Ok(_))), "pilot file parsed as a pilot study");
    app.exp.selected = idx;
    let s = render(&app, 120, 40);
    assert!(s.contains("pilot study") && !s.contains("unknown field"), "{s}");
    let cmds = update(&mut app, char_key('r'));
    assert!(cmds.iter().any(|c| matches!(c, Command::QueuePilot { spec, .. } if spec.name == "pilot-tiny")), "{cmds:?}");
    assert_eq!(app.view, View::Runs);
    assert_eq!(app.runs.jobs.last().unwrap().name, "pilot-tiny");
}
