//! The Compare view's state and keys: mark two runs (A, then B) and see A, B and B − A as
//! heatmaps over the sites they share.
use super::{csv_export, down, up, App, Command};
use crate::tui::data::{self, Grid, Metric, RunData};
use crate::tui::event::Slot;
use ratatui::crossterm::event::{KeyCode, KeyEvent};
use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct CompareState {
    pub picker: usize,
    /// Marked runs (directories), at most two, in marking order: A then B.
    pub marked: Vec<PathBuf>,
    pub a: Option<RunData>,
    pub b: Option<RunData>,
    pub showing: bool,
    pub metric: Metric,
    pub site: usize,
    pub cursor: (usize, usize),
}

impl Default for CompareState {
    fn default() -> Self {
        Self { picker: 0, marked: vec![], a: None, b: None, showing: false, metric: Metric::IiaVocab, site: 0, cursor: (0, 0) }
    }
}

impl CompareState {
    pub fn sites(&self) -> Vec<String> {
        let (Some(a), Some(b)) = (&self.a, &self.b) else { return vec![] };
        let sb = b.sites();
        a.sites().into_iter().filter(|s| sb.contains(s)).collect()
    }
    pub fn site_name(&self) -> Option<String> {
        let s = self.sites();
        s.get(self.site.min(s.len().saturating_sub(1))).cloned()
    }
    /// (grid A, grid B, B − A) for the current metric and site.
    pub fn grids(&self) -> Option<(Grid, Grid, Grid)> {
        let (a, b) = (self.a.as_ref()?, self.b.as_ref()?);
        let site = self.site_name()?;
        let ga = Grid::build(&a.metrics, &site, self.metric);
        let gb = Grid::build(&b.metrics, &site, self.metric);
        let d = Grid::diff(&ga, &gb);
        Some((ga, gb, d))
    }
}

/// Run A or B of a comparison arrived; with both, show the difference.
pub(super) fn on_loaded(app: &mut App, slot: Slot, data: RunData) -> Vec<Command> {
    let c = &mut app.compare;
    if slot == Slot::CompareA {
        c.a = Some(data);
    } else {
        c.b = Some(data);
    }
    if c.a.is_some() && c.b.is_some() {
        c.showing = true;
        c.cursor = (0, 0);
        c.site = 0;
    }
    vec![]
}

pub(super) fn key(app: &mut App, k: KeyEvent) -> Vec<Command> {
    let c = &mut app.compare;
    if c.showing {
        let (rows, cols) = c.grids().map(|(_, _, d)| (d.layers.len(), d.positions.len())).unwrap_or((0, 0));
        let n_sites = c.sites().len().max(1);
        match k.code {
            KeyCode::Esc | KeyCode::Backspace => c.showing = false,
            KeyCode::Tab => c.metric = c.metric.next(),
            KeyCode::BackTab => c.site = (c.site + 1) % n_sites,
            KeyCode::Up | KeyCode::Char('k') => up(&mut c.cursor.0),
            KeyCode::Down | KeyCode::Char('j') => down(&mut c.cursor.0, rows),
            KeyCode::Left => up(&mut c.cursor.1),
            KeyCode::Right => down(&mut c.cursor.1, cols),
            _ => {}
        }
        return vec![];
    }
    match k.code {
        KeyCode::Up | KeyCode::Char('k') => up(&mut c.picker),
        KeyCode::Down | KeyCode::Char('j') => down(&mut c.picker, app.run_list.len()),
        KeyCode::Char(' ') | KeyCode::Char('m') => {
            if let Some(info) = app.run_list.get(c.picker) {
                if let Some(i) = c.marked.iter().position(|d| *d == info.dir) {
                    c.marked.remove(i);
                } else {
                    if c.marked.len() == 2 {
                        c.marked.remove(0);
                    }
                    c.marked.push(info.dir.clone());
                }
            }
        }
        KeyCode::Enter => {
            if c.marked.len() == 2 {
                c.a = None;
                c.b = None;
                return vec![
                    Command::OpenRun { dir: c.marked[0].clone(), slot: Slot::CompareA },
                    Command::OpenRun { dir: c.marked[1].clone(), slot: Slot::CompareB },
                ];
            }
            app.status = "mark two runs with Space first (A, then B)".into();
        }
        KeyCode::Char('R') => return vec![Command::RefreshRuns],
        _ => {}
    }
    vec![]
}

/// `x` on Compare: A, B and B − A per (layer, position), into run B's folder.
pub(super) fn export(app: &mut App) -> Vec<Command> {
    let c = &app.compare;
    let (Some((ga, gb, gd)), Some(b)) = (c.grids(), &c.b) else {
        app.status = "compare two runs first".into();
        return vec![];
    };
    let mut rows = vec![["layer", "position", "a", "b", "b_minus_a"].map(String::from).to_vec()];
    for (li, l) in gd.layers.iter().enumerate() {
        for (pi, p) in gd.positions.iter().enumerate() {
            let find = |g: &Grid| {
                let r = g.layers.iter().position(|x| x == l)?;
                let c = g.positions.iter().position(|x| x == p)?;
                g.get(r, c)
            };
            let f = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_default();
            rows.push(vec![l.to_string(), p.clone(), f(find(&ga)), f(find(&gb)), f(gd.get(li, pi))]);
        }
    }
    csv_export(&b.info.dir, "compare", data::csv_string(&rows))
}
