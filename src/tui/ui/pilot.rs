//! Results of a pilot-study run: ΔD and ΔM per block for every method (braille charts), the
//! disentanglement table and the fine-tunes. The figures and CSVs are in the run folder.
use super::{theme, trunc};
use crate::tui::app::App;
use crate::tui::data::{PilotData, RunData};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::symbols::Marker;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Axis, Block, Chart, Dataset, GraphType, LegendPosition, Paragraph, Row, Table};
use ratatui::Frame;

pub fn draw(app: &App, f: &mut Frame, area: Rect, d: &RunData, p: &PilotData) {
    let t = theme(app);
    let [head, body] = Layout::vertical([Constraint::Length(1), Constraint::Min(3)]).areas(area);
    let mut spans = vec![Span::styled(format!("{}/{}", d.info.experiment, d.info.name()), t.title()), Span::raw(" · pilot study (magnitude vs angle)")];
    if d.error.is_some() {
        spans.push(Span::styled(" FAILED", t.error()));
    }
    f.render_widget(Paragraph::new(Line::from(spans)), head);
    let [charts, tables] = Layout::vertical([Constraint::Percentage(55), Constraint::Min(6)]).areas(body);
    let [dd, dm] = Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(charts);
    // ΔD falls and ΔM grows with depth: each legend goes where its curves are not.
    curves(app, f, dd, p, " ΔD = cos(x, x⁰) per block ", LegendPosition::TopRight, |r| r.3);
    curves(app, f, dm, p, " ΔM = Δ‖x‖/‖x⁰‖ per block ", LegendPosition::TopLeft, |r| r.2);
    let [heads, fts] = Layout::horizontal([Constraint::Length(52), Constraint::Min(20)]).areas(tables);
    heads_table(app, f, heads, p);
    finetunes_table(app, f, fts, p);
}

type LayerPoint = (String, usize, f64, f64);

fn curves(app: &App, f: &mut Frame, area: Rect, p: &PilotData, title: &str, legend: LegendPosition, value: impl Fn(&LayerPoint) -> f64) {
    let t = theme(app);
    let methods = p.methods();
    let series: Vec<Vec<(f64, f64)>> = methods
        .iter()
        .map(|m| p.layers.iter().filter(|r| &r.0 == m).map(|r| (r.1 as f64, value(r))).filter(|x| x.1.is_finite()).collect())
        .collect();
    let all: Vec<f64> = series.iter().flatten().map(|x| x.1).collect();
    if all.is_empty() {
        f.render_widget(Block::bordered().title(title.to_string()), area);
        return;
    }
    let (lo, hi) = all.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    let (lo, hi) = if hi > lo { (lo, hi) } else { (lo - 0.5, hi + 0.5) };
    let x1 = p.layers.iter().map(|r| r.1).max().unwrap_or(1).max(1) as f64;
    let datasets: Vec<Dataset> = methods
        .iter()
        .zip(&series)
        .enumerate()
        .map(|(i, (m, s))| Dataset::default().name(trunc(m, 14)).marker(Marker::Braille).graph_type(GraphType::Line).style(t.series(i)).data(s))
        .collect();
    let chart = Chart::new(datasets)
        .block(Block::bordered().title(title.to_string()))
        .legend_position(Some(legend))
        .hidden_legend_constraints((Constraint::Percentage(70), Constraint::Percentage(70)))
        .x_axis(Axis::default().bounds([0.0, x1]).labels(["0".to_string(), format!("{x1:.0}")]).style(t.dim()))
        .y_axis(Axis::default().bounds([lo, hi]).labels([format!("{lo:.3}"), format!("{hi:.3}")]).style(t.dim()));
    f.render_widget(chart, area);
}

/// One row per (backbone, block); columns standard / magnitude-only / angle-only (mean ± std).
fn heads_table(app: &App, f: &mut Frame, area: Rect, p: &PilotData) {
    let t = theme(app);
    let mut keys: Vec<(String, usize)> = Vec::new();
    for (b, l, ..) in &p.heads {
        if !keys.contains(&(b.clone(), *l)) {
            keys.push((b.clone(), *l));
        }
    }
    let cell = |b: &str, l: usize, h: &str| {
        p.heads.iter().find(|x| x.0 == b && x.1 == l && x.2 == h).map(|x| format!("{:.3}±{:.2}", x.3, x.4)).unwrap_or_else(|| "–".into())
    };
    let rows: Vec<Row> = keys
        .iter()
        .map(|(b, l)| Row::new(vec![b.clone(), format!("{l}"), cell(b, *l, "standard"), cell(b, *l, "magnitude_only"), cell(b, *l, "angle_only")]))
        .collect();
    let w = Constraint::Length(10);
    let table = Table::new(rows, [Constraint::Length(10), Constraint::Length(3), w, w, w])
        .header(Row::new(vec!["backbone", "blk", "standard", "magnitude", "angle"]).style(t.title()))
        .block(Block::bordered().title(" frozen-backbone heads (eval acc) "));
    f.render_widget(table, area);
}

fn finetunes_table(app: &App, f: &mut Frame, area: Rect, p: &PilotData) {
    let t = theme(app);
    let rows: Vec<Row> = p.finetunes.iter().map(|(m, tr, pct, acc)| Row::new(vec![trunc(m, 16), trunc(tr, 9), format!("{pct:.2}%"), format!("{acc:.3}")])).collect();
    let table = Table::new(rows, [Constraint::Min(8), Constraint::Length(9), Constraint::Length(8), Constraint::Length(6)])
        .header(Row::new(vec!["method", "trains", "params", "test"]).style(t.title()))
        .block(Block::bordered().title(" fine-tunes "));
    f.render_widget(table, area);
}
