use super::heatmap::{fmt_value, Heatmap};
use super::{theme, trunc};
use crate::tui::app::{App, Panel};
use crate::tui::data::{self, show_token, Grid, RunData, RunInfo};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::symbols::Marker;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Axis, Block, Chart, Dataset, GraphType, LegendPosition, Paragraph, Row, Table, TableState, Wrap};
use ratatui::Frame;

pub fn draw(app: &App, f: &mut Frame, area: Rect) {
    match &app.results.open {
        None => picker(app, f, area, " runs (Enter opens · R refresh) ", None, &[]),
        Some(d) => open(app, f, area, d),
    }
}

/// The list of runs under the output root (also used by Compare, with marks).
pub fn picker(app: &App, f: &mut Frame, area: Rect, title: &str, sel: Option<usize>, marked: &[std::path::PathBuf]) {
    let t = theme(app);
    let list: &[RunInfo] = &app.run_list;
    if list.is_empty() {
        f.render_widget(
            Paragraph::new(vec![
                Line::from(format!("No runs under {}.", app.cfg.out_root.display())),
                Line::from(Span::styled("Queue one from the Experiments view (r), or set ROAD_OUT.", t.dim())),
            ])
            .block(Block::bordered().title(title.to_string())),
            area,
        );
        return;
    }
    let rows: Vec<Row> = list
        .iter()
        .map(|r| {
            let mark = match marked.iter().position(|m| *m == r.dir) {
                Some(0) => "A",
                Some(_) => "B",
                None => " ",
            };
            Row::new(vec![
                Line::from(mark),
                Line::from(r.experiment.clone()),
                Line::from(r.name()),
                if r.complete { Line::from(Span::styled("complete", t.ok())) } else { Line::from(Span::styled("INCOMPLETE", t.error())) },
            ])
        })
        .collect();
    let table = Table::new(rows, [Constraint::Length(1), Constraint::Percentage(40), Constraint::Percentage(40), Constraint::Length(10)])
        .header(Row::new(vec!["", "experiment", "run", "status"]).style(t.title()))
        .row_highlight_style(t.selected())
        .block(Block::bordered().title(title.to_string()));
    let mut st = TableState::default().with_selected(Some(sel.unwrap_or(app.results.picker).min(list.len() - 1)));
    f.render_stateful_widget(table, area, &mut st);
}

fn open(app: &App, f: &mut Frame, area: Rect, d: &RunData) {
    if let Some(p) = &d.pilot {
        return super::pilot::draw(app, f, area, d, p);
    }
    let t = theme(app);
    let r = &app.results;
    let [head, body] = Layout::vertical([Constraint::Length(1), Constraint::Min(3)]).areas(area);
    let site = r.site_name().unwrap_or_else(|| "-".into());
    let mut spans = vec![
        Span::styled(format!("{}/{}", d.info.experiment, d.info.name()), t.title()),
        Span::raw(format!(" · {} · ", d.intervention)),
        Span::styled(r.metric.name(), t.fg(ratatui::style::Color::Yellow)),
        Span::raw(" @ "),
        Span::styled(site.clone(), t.fg(ratatui::style::Color::Yellow)),
    ];
    if !d.info.complete {
        spans.push(Span::styled(" INCOMPLETE", t.error()));
    }
    if d.error.is_some() {
        spans.push(Span::styled(" FAILED", t.error()));
    }
    f.render_widget(Paragraph::new(Line::from(spans)), head);
    let grid = r.grid().unwrap_or_default();
    match r.panel {
        Panel::Heatmap => heatmap_panel(app, f, body, d, &grid, &site),
        Panel::Table => table_panel(app, f, body, d),
        Panel::Examples => examples_panel(app, f, body, d, &grid, &site),
    }
}

pub fn pos_label(grid: &Grid, col: usize, tokens: Option<&[String]>) -> String {
    let Some(p) = grid.positions.get(col) else { return "-".into() };
    match (p.parse::<usize>().ok(), tokens) {
        (Some(i), Some(toks)) => match toks.get(i) {
            Some(tok) => format!("{p} {:?}", show_token(tok)),
            None => p.clone(),
        },
        _ => p.clone(),
    }
}

fn heatmap_panel(app: &App, f: &mut Frame, area: Rect, d: &RunData, grid: &Grid, site: &str) {
    let t = theme(app);
    let r = &app.results;
    let tokens = if grid.numeric_positions() { r.tokens.as_deref() } else { None };
    let range = r.metric.fixed_range().or_else(|| grid.range()).unwrap_or((0.0, 1.0));
    let hm = Heatmap { grid, cursor: r.cursor, tokens, range, diverging: false, theme: t };
    // The heatmap takes up to 60% of the width (more when it needs it), the rest goes to the
    // cell details and the per-layer chart.
    let side = 30u16.min(area.width / 2);
    let room = (area.width as usize * 6 / 10).max(area.width.saturating_sub(side) as usize);
    let room = if area.width >= 110 { area.width as usize * 6 / 10 } else { room };
    let need = 4 + hm.cell_width_in(room.saturating_sub(2)) * grid.positions.len().max(1) + 2;
    let hw = (need as u16).min(area.width.saturating_sub(side)).max(20);
    let [left, right] = Layout::horizontal([Constraint::Length(hw), Constraint::Min(0)]).areas(area);
    let block = Block::bordered()
        .title(" layer × position ")
        .title_bottom(Line::from(format!(" scale {} … {} ", fmt_value(Some(range.0), 5), fmt_value(Some(range.1), 5))));
    let inner = block.inner(left);
    f.render_widget(block, left);
    hm.render(inner, f.buffer_mut());

    let value = grid.get(r.cursor.0, r.cursor.1);
    let (layer, pos) = r.cursor_cell().unwrap_or((0, "-".into()));
    let at = |m: &&crate::experiment::outputs::MetricRow| {
        m.split == "test" && crate::tui::data::site_key(&m.site, &m.heads) == site && m.layer == layer && m.position == pos
    };
    let row = d.metrics.iter().filter(|m| m.is_main()).find(at);
    // The cell's controls (METHODS.md §7), with a flag when the trained IIA does not clear them.
    let controls: Vec<&crate::experiment::outputs::MetricRow> = d.metrics.iter().filter(|m| !m.is_main()).filter(at).collect();
    let extra = if controls.is_empty() { 0 } else { controls.len() as u16 + 1 };
    let [detail, chart] = Layout::vertical([Constraint::Length(7 + extra), Constraint::Min(0)]).areas(right);
    let mut lines = vec![
        Line::from(vec![Span::raw(format!("L{layer} · ")), Span::raw(trunc(&pos_label(grid, r.cursor.1, tokens), 20))]),
        Line::from(vec![
            Span::raw(format!("{} = ", r.metric.name())),
            Span::styled(value.map(|v| format!("{v:.4}")).unwrap_or_else(|| "—".into()), t.title()),
        ]),
    ];
    if let Some(m) = row {
        lines.push(Line::from(format!("iia {:.3} ans {:.3}", m.iia_vocab, m.iia_answers)));
        lines.push(Line::from(format!("ld {:+.3} ne {:.3} n={}", m.logit_diff, m.normalized_effect, m.n)));
        for c in &controls {
            lines.push(Line::from(Span::styled(format!("{} {:.3}", c.control, c.iia_vocab), t.dim())));
        }
        if !controls.is_empty() {
            let best = controls.iter().map(|c| c.iia_vocab).fold(f64::NAN, f64::max);
            let margin = m.iia_vocab - best;
            let text = format!("margin {margin:+.3}{}", if margin < crate::experiment::controls::MIN_MARGIN { " ⚠ not clearly a variable" } else { "" });
            lines.push(Line::from(Span::styled(text, if margin < crate::experiment::controls::MIN_MARGIN { t.error() } else { t.ok() })));
        }
    }
    lines.push(Line::from(Span::styled("Enter examples · t table", t.dim())));
    f.render_widget(Paragraph::new(lines).block(Block::bordered().title(" cell ")), detail);
    if chart.height >= 5 {
        by_layer_chart(app, f, chart, grid, r.cursor.1, r.metric.fixed_range());
    }
}

/// Per-layer line chart: the cursor's position and the max over positions.
fn by_layer_chart(app: &App, f: &mut Frame, area: Rect, grid: &Grid, col: usize, fixed: Option<(f64, f64)>) {
    let t = theme(app);
    let at: Vec<(f64, f64)> = grid
        .layers
        .iter()
        .enumerate()
        .filter_map(|(i, l)| grid.get(i, col).filter(|v| v.is_finite()).map(|v| (*l as f64, v)))
        .collect();
    let best: Vec<(f64, f64)> = grid
        .layers
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            let m = grid.values[i].iter().flatten().copied().filter(|v| v.is_finite()).fold(f64::NEG_INFINITY, f64::max);
            m.is_finite().then_some((*l as f64, m))
        })
        .collect();
    if best.is_empty() {
        f.render_widget(Block::bordered().title(" by layer "), area);
        return;
    }
    let x0 = *grid.layers.first().unwrap_or(&0) as f64;
    let x1 = (*grid.layers.last().unwrap_or(&1) as f64).max(x0 + 1.0);
    let (y0, y1) = fixed.or_else(|| grid.range()).map(|(a, b)| if b > a { (a, b) } else { (a - 0.5, b + 0.5) }).unwrap_or((0.0, 1.0));
    let pos = grid.positions.get(col).cloned().unwrap_or_default();
    let datasets = vec![
        Dataset::default().name(format!("pos {}", trunc(&pos, 8))).marker(Marker::Braille).graph_type(GraphType::Line).style(t.series(0)).data(&at),
        Dataset::default().name("max").marker(if t.color { Marker::Braille } else { Marker::Dot }).graph_type(GraphType::Line).style(t.series(1)).data(&best),
    ];
    let chart = Chart::new(datasets)
        .block(Block::bordered().title(" by layer "))
        .legend_position(Some(LegendPosition::BottomRight))
        .hidden_legend_constraints((Constraint::Percentage(60), Constraint::Percentage(60)))
        .x_axis(Axis::default().bounds([x0, x1]).labels([format!("L{x0:.0}"), format!("L{x1:.0}")]).style(t.dim()))
        .y_axis(Axis::default().bounds([y0, y1]).labels([fmt_value(Some(y0), 4), fmt_value(Some(y1), 4)]).style(t.dim()));
    f.render_widget(chart, area);
}

fn table_panel(app: &App, f: &mut Frame, area: Rect, d: &RunData) {
    let t = theme(app);
    let r = &app.results;
    let cells = data::sorted_cells(&d.metrics, r.sort_col, r.sort_desc);
    let header: Vec<String> = data::TABLE_COLUMNS
        .iter()
        .enumerate()
        .map(|(i, c)| if i == r.sort_col { format!("{c}{}", if r.sort_desc { "▼" } else { "▲" }) } else { c.to_string() })
        .collect();
    let rows: Vec<Row> = cells.iter().map(|m| Row::new(data::table_row(m).to_vec())).collect();
    let widths = [5, 13, 8, 10, 11, 9, 10, 4].map(Constraint::Length);
    let table = Table::new(rows, widths)
        .header(Row::new(header).style(t.title()))
        .row_highlight_style(t.selected())
        .block(Block::bordered().title(format!(" {} test cells · s sort · o order · Enter jump ", cells.len())));
    let mut st = TableState::default().with_selected(if cells.is_empty() { None } else { Some(r.table_sel.min(cells.len() - 1)) });
    f.render_stateful_widget(table, area, &mut st);
}

fn examples_panel(app: &App, f: &mut Frame, area: Rect, d: &RunData, grid: &Grid, site: &str) {
    let t = theme(app);
    let r = &app.results;
    let Some((layer, pos)) = r.cursor_cell() else {
        f.render_widget(Paragraph::new("no cell selected").block(Block::bordered()), area);
        return;
    };
    let ex = d.examples_for(layer, site, &pos);
    let correct = ex.iter().filter(|e| e.correct).count();
    let [list, detail] = Layout::vertical([Constraint::Min(3), Constraint::Length(6)]).areas(area);
    let w = list.width.saturating_sub(2 + 4 + 10 + 10 + 3 + 5) as usize / 2;
    let rows: Vec<Row> = ex
        .iter()
        .map(|e| {
            let ok = if e.correct { Span::styled("✓", t.ok()) } else { Span::styled("✗", t.error()) };
            Row::new(vec![
                Line::from(e.example.to_string()),
                Line::from(trunc(&e.base, w)),
                Line::from(trunc(&e.source, w)),
                Line::from(format!("{:?}", e.cf_label)),
                Line::from(format!("{:?}", e.predicted)),
                Line::from(ok),
            ])
        })
        .collect();
    let widths = [
        Constraint::Length(3),
        Constraint::Length(w as u16),
        Constraint::Length(w as u16),
        Constraint::Length(10),
        Constraint::Length(10),
        Constraint::Length(1),
    ];
    let title = format!(
        " L{layer} · {} · {site}: {correct}/{} match · ←→ position · Esc back ",
        trunc(&pos_label(grid, r.cursor.1, if grid.numeric_positions() { r.tokens.as_deref() } else { None }), 16),
        ex.len()
    );
    let table = Table::new(rows, widths)
        .header(Row::new(vec!["#", "base", "source", "expected", "predicted", ""]).style(t.title()))
        .row_highlight_style(t.selected())
        .block(Block::bordered().title(title));
    let mut st = TableState::default().with_selected(if ex.is_empty() { None } else { Some(r.example_sel.min(ex.len() - 1)) });
    f.render_stateful_widget(table, list, &mut st);
    let lines = match ex.get(r.example_sel.min(ex.len().saturating_sub(1))) {
        Some(e) => vec![
            Line::from(vec![Span::styled("base   ", t.dim()), Span::raw(e.base.clone()), Span::styled(format!(" → {:?}", e.base_label), t.dim())]),
            Line::from(vec![Span::styled("source ", t.dim()), Span::raw(e.source.clone())]),
            Line::from(vec![
                Span::styled("expected ", t.dim()),
                Span::raw(format!("{:?}", e.cf_label)),
                Span::styled("  predicted ", t.dim()),
                Span::styled(format!("{:?}", e.predicted), if e.correct { t.ok() } else { t.error() }),
                Span::styled(format!("  logit diff {:+.3}", e.logit_diff), t.dim()),
            ]),
        ],
        None => vec![Line::from(Span::styled("examples.csv has no rows for this cell", t.dim()))],
    };
    f.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }).block(Block::bordered().title(" example ")), detail);
}
