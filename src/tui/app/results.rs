//! The Results view's state and keys: the run picker, then one run's heatmap (metric × site,
//! cursor on a cell), its sortable cell table and the per-example drill-down of a cell.
use super::{csv_export, down, up, App, Command, View};
use crate::tui::data::{self, Grid, Metric, RunData};
use crate::tui::event::Slot;
use ratatui::crossterm::event::{KeyCode, KeyEvent};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Panel {
    Heatmap,
    Table,
    Examples,
}

#[derive(Debug, Clone)]
pub struct ResultsState {
    pub picker: usize,
    pub open: Option<RunData>,
    pub metric: Metric,
    pub site: usize,
    /// (row = layer index, column = position index) in the grid.
    pub cursor: (usize, usize),
    pub panel: Panel,
    pub sort_col: usize,
    pub sort_desc: bool,
    pub table_sel: usize,
    pub example_sel: usize,
    /// Token strings of the first test base prompt (position labels), when known.
    pub tokens: Option<Vec<String>>,
    pub loading: bool,
}

impl Default for ResultsState {
    fn default() -> Self {
        Self {
            picker: 0,
            open: None,
            metric: Metric::IiaVocab,
            site: 0,
            cursor: (0, 0),
            panel: Panel::Heatmap,
            sort_col: 3,
            sort_desc: true,
            table_sel: 0,
            example_sel: 0,
            tokens: None,
            loading: false,
        }
    }
}

impl ResultsState {
    pub fn site_name(&self) -> Option<String> {
        let sites = self.open.as_ref()?.sites();
        sites.get(self.site.min(sites.len().saturating_sub(1))).cloned()
    }

    /// The heatmap grid of the open run for the current metric and site.
    pub fn grid(&self) -> Option<Grid> {
        let d = self.open.as_ref()?;
        Some(Grid::build(&d.metrics, &self.site_name()?, self.metric))
    }

    /// (layer, position) under the cursor.
    pub fn cursor_cell(&self) -> Option<(usize, String)> {
        let g = self.grid()?;
        Some((*g.layers.get(self.cursor.0)?, g.positions.get(self.cursor.1)?.clone()))
    }
}

/// A run opened for the Results view: reset the cursor unless it is the same run, ask for
/// position labels when the positions are numeric.
pub(super) fn on_loaded(app: &mut App, data: RunData) -> Vec<Command> {
    let r = &mut app.results;
    let same = r.open.as_ref().map(|o| o.info.dir == data.info.dir).unwrap_or(false);
    if !same {
        r.cursor = (0, 0);
        r.site = 0;
        r.table_sel = 0;
        r.example_sel = 0;
        r.tokens = None;
    }
    r.loading = false;
    // An AtP run has no IIA: open it on its estimates, its table sorted by the estimated LD.
    if data.intervention == "atp" && matches!(r.metric, Metric::IiaVocab | Metric::IiaAnswers) {
        r.metric = Metric::EffectEstimate;
        r.sort_col = 6;
    }
    let mut cmds = vec![];
    let numeric = Grid::build(&data.metrics, &data.sites().first().cloned().unwrap_or_default(), Metric::IiaVocab).numeric_positions();
    if numeric && r.tokens.is_none() {
        if let (Some(m), Some(t)) = (&data.model, data.first_base_prompt()) {
            cmds.push(Command::Tokenize { name: m.clone(), text: t.to_string() });
        }
    }
    app.status = format!("opened {}/{}", data.info.experiment, data.info.name());
    r.open = Some(data);
    app.view = View::Results;
    cmds
}

pub(super) fn key(app: &mut App, k: KeyEvent) -> Vec<Command> {
    let r = &mut app.results;
    let Some(data) = &r.open else {
        // The run picker.
        match k.code {
            KeyCode::Up | KeyCode::Char('k') => up(&mut r.picker),
            KeyCode::Down | KeyCode::Char('j') => down(&mut r.picker, app.run_list.len()),
            KeyCode::Char('R') => return vec![Command::RefreshRuns],
            KeyCode::Enter => {
                if let Some(info) = app.run_list.get(r.picker) {
                    r.loading = true;
                    return vec![Command::OpenRun { dir: info.dir.clone(), slot: Slot::Results }];
                }
            }
            _ => {}
        }
        return vec![];
    };
    let n_sites = data.sites().len().max(1);
    let n_examples = r.cursor_cell().map(|(l, p)| data.examples_for(l, &r.site_name().unwrap_or_default(), &p).len()).unwrap_or(0);
    let n_table = data.metrics.iter().filter(|m| m.split == "test" && m.is_main()).count();
    let (rows, cols) = r.grid().map(|g| (g.layers.len(), g.positions.len())).unwrap_or((0, 0));
    match k.code {
        KeyCode::Esc | KeyCode::Backspace => {
            if r.panel != Panel::Heatmap {
                r.panel = Panel::Heatmap;
            } else {
                r.open = None;
                return vec![Command::RefreshRuns];
            }
        }
        KeyCode::Tab => r.metric = r.metric.next(),
        KeyCode::BackTab => {
            r.site = (r.site + 1) % n_sites;
            r.example_sel = 0;
        }
        KeyCode::Char('h') => r.panel = Panel::Heatmap,
        KeyCode::Char('t') => r.panel = Panel::Table,
        KeyCode::Char('d') => {
            r.panel = Panel::Examples;
            r.example_sel = 0;
        }
        KeyCode::Char('s') => {
            r.sort_col = (r.sort_col + 1) % data::TABLE_COLUMNS.len();
            r.table_sel = 0;
        }
        KeyCode::Char('o') => r.sort_desc = !r.sort_desc,
        KeyCode::Char('R') => {
            let dir = data.info.dir.clone();
            return vec![Command::OpenRun { dir, slot: Slot::Results }];
        }
        KeyCode::Enter if r.panel == Panel::Heatmap => {
            r.panel = Panel::Examples;
            r.example_sel = 0;
        }
        KeyCode::Enter if r.panel == Panel::Table => {
            // Jump to the selected cell in the heatmap.
            let picked = data::sorted_cells(&data.metrics, r.sort_col, r.sort_desc).get(r.table_sel).map(|m| (*m).clone());
            if let Some(m) = picked {
                if let Some(si) = data.sites().iter().position(|s| *s == data::site_key(&m.site, &m.heads)) {
                    r.site = si;
                }
                if let Some(g) = r.grid() {
                    let row = g.layers.iter().position(|l| *l == m.layer).unwrap_or(0);
                    let col = g.positions.iter().position(|p| *p == m.position).unwrap_or(0);
                    r.cursor = (row, col);
                }
                r.panel = Panel::Heatmap;
            }
        }
        code => match (r.panel, code) {
            (Panel::Heatmap, KeyCode::Up | KeyCode::Char('k')) => up(&mut r.cursor.0),
            (Panel::Heatmap, KeyCode::Down | KeyCode::Char('j')) => down(&mut r.cursor.0, rows),
            (Panel::Heatmap, KeyCode::Left) => up(&mut r.cursor.1),
            (Panel::Heatmap, KeyCode::Right) => down(&mut r.cursor.1, cols),
            (Panel::Table, KeyCode::Up | KeyCode::Char('k')) => up(&mut r.table_sel),
            (Panel::Table, KeyCode::Down | KeyCode::Char('j')) => down(&mut r.table_sel, n_table),
            (Panel::Table, KeyCode::PageDown) => r.table_sel = (r.table_sel + 10).min(n_table.saturating_sub(1)),
            (Panel::Table, KeyCode::PageUp) => r.table_sel = r.table_sel.saturating_sub(10),
            (Panel::Examples, KeyCode::Up | KeyCode::Char('k')) => up(&mut r.example_sel),
            (Panel::Examples, KeyCode::Down | KeyCode::Char('j')) => down(&mut r.example_sel, n_examples),
            // In drill-down, arrows left/right walk positions so neighbouring cells are one key away.
            (Panel::Examples, KeyCode::Left) => {
                up(&mut r.cursor.1);
                r.example_sel = 0;
            }
            (Panel::Examples, KeyCode::Right) => {
                down(&mut r.cursor.1, cols);
                r.example_sel = 0;
            }
            _ => {}
        },
    }
    // Keep the cursor inside the (possibly smaller) grid of the new metric/site.
    if let Some(g) = r.grid() {
        r.cursor.0 = r.cursor.0.min(g.layers.len().saturating_sub(1));
        r.cursor.1 = r.cursor.1.min(g.positions.len().saturating_sub(1));
    }
    vec![]
}

/// `x` on Results: the open panel (heatmap grid, sorted table, or the cell's examples), into the run folder.
pub(super) fn export(app: &mut App) -> Vec<Command> {
    let r = &app.results;
    let Some(d) = &r.open else {
        app.status = "open a run first".into();
        return vec![];
    };
    let dir = d.info.dir.clone();
    match r.panel {
        Panel::Heatmap => {
            let g = r.grid().unwrap_or_default();
            let site = r.site_name().unwrap_or_default();
            csv_export(&dir, &format!("heatmap-{}-{site}", r.metric.name()), g.to_csv(r.metric.name()))
        }
        Panel::Table => {
            let mut rows = vec![data::TABLE_COLUMNS.map(String::from).to_vec()];
            rows.extend(data::sorted_cells(&d.metrics, r.sort_col, r.sort_desc).iter().map(|m| data::table_row(m).to_vec()));
            csv_export(&dir, "table", data::csv_string(&rows))
        }
        Panel::Examples => {
            let Some((l, p)) = r.cursor_cell() else { return vec![] };
            let site = r.site_name().unwrap_or_default();
            let mut rows = vec![["layer", "site", "position", "example", "base", "source", "expected", "predicted", "correct", "logit_diff"]
                .map(String::from)
                .to_vec()];
            for e in d.examples_for(l, &site, &p) {
                rows.push(vec![
                    e.layer.to_string(),
                    e.site.clone(),
                    e.position.clone(),
                    e.example.to_string(),
                    e.base.clone(),
                    e.source.clone(),
                    e.cf_label.clone(),
                    e.predicted.clone(),
                    e.correct.to_string(),
                    e.logit_diff.to_string(),
                ]);
            }
            csv_export(&dir, "examples", data::csv_string(&rows))
        }
    }
}
