use super::heatmap::{fmt_value, Heatmap};
use super::{theme, trunc};
use crate::tui::app::App;
use crate::tui::data::mean_max;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph, Row, Table};
use ratatui::Frame;

pub fn draw(app: &App, f: &mut Frame, area: Rect) {
    let c = &app.compare;
    if !c.showing {
        let title = format!(" compare: Space marks A then B ({} marked) · Enter compares ", c.marked.len());
        super::results::picker(app, f, area, &title, Some(c.picker), &c.marked);
        return;
    }
    let t = theme(app);
    let (Some(a), Some(b), Some((ga, gb, gd))) = (&c.a, &c.b, c.grids()) else {
        f.render_widget(Paragraph::new("loading…").block(Block::bordered()), area);
        return;
    };
    let site = c.site_name().unwrap_or_default();
    let [summary, bottom] = Layout::vertical([Constraint::Length(9), Constraint::Min(3)]).areas(area);
    let (ma, xa) = mean_max(&ga);
    let (mb, xb) = mean_max(&gb);
    let w = (summary.width.saturating_sub(24) / 2).saturating_sub(1) as usize;
    let rows = vec![
        Row::new(vec!["experiment".to_string(), trunc(&a.info.experiment, w), trunc(&b.info.experiment, w)]),
        Row::new(vec!["run".to_string(), trunc(&a.info.name(), w), trunc(&b.info.name(), w)]),
        Row::new(vec!["intervention".to_string(), a.intervention.clone(), b.intervention.clone()]),
        Row::new(vec![format!("mean {}", c.metric.name()), format!("{ma:.3}"), format!("{mb:.3} ({:+.3})", mb - ma)]),
        Row::new(vec![format!("max {}", c.metric.name()), format!("{xa:.3}"), format!("{xb:.3} ({:+.3})", xb - xa)]),
        Row::new(vec!["test cells".to_string(), ga.values.iter().flatten().flatten().count().to_string(), gb.values.iter().flatten().flatten().count().to_string()]),
    ];
    let table = Table::new(rows, [Constraint::Length(22), Constraint::Percentage(40), Constraint::Percentage(40)])
        .header(Row::new(vec!["", "A", "B"]).style(t.title()))
        .block(Block::bordered().title(format!(" {} @ {site} · Tab metric · Shift-Tab site · Esc back ", c.metric.name())));
    f.render_widget(table, summary);
    let m = gd.range().map(|(lo, hi)| lo.abs().max(hi.abs())).unwrap_or(1.0);
    let hm = Heatmap { grid: &gd, cursor: c.cursor, tokens: None, range: (-m, m), diverging: true, theme: t };
    let need = (4 + hm.cell_width() * gd.positions.len().max(1) + 2) as u16;
    let [left, right] = Layout::horizontal([Constraint::Length(need.min(bottom.width.saturating_sub(26)).max(20)), Constraint::Min(0)]).areas(bottom);
    let block = Block::bordered().title(" B − A ").title_bottom(format!(" ±{} ", fmt_value(Some(m), 5)));
    let inner = block.inner(left);
    f.render_widget(block, left);
    hm.render(inner, f.buffer_mut());
    let (layer, pos) = (gd.layers.get(c.cursor.0).copied(), gd.positions.get(c.cursor.1).cloned());
    let find = |g: &crate::tui::data::Grid| -> Option<f64> {
        let r = g.layers.iter().position(|x| Some(*x) == layer)?;
        let col = g.positions.iter().position(|x| Some(x) == pos.as_ref())?;
        g.get(r, col)
    };
    let f4 = |v: Option<f64>| v.map(|x| format!("{x:.4}")).unwrap_or_else(|| "—".into());
    let lines = vec![
        Line::from(format!("L{} · pos {}", layer.map(|l| l.to_string()).unwrap_or_default(), pos.clone().unwrap_or_default())),
        Line::from(vec![Span::styled("A  ", t.dim()), Span::raw(f4(find(&ga)))]),
        Line::from(vec![Span::styled("B  ", t.dim()), Span::raw(f4(find(&gb)))]),
        Line::from(vec![Span::styled("B−A ", t.dim()), Span::styled(f4(gd.get(c.cursor.0, c.cursor.1)), t.title())]),
    ];
    f.render_widget(Paragraph::new(lines).block(Block::bordered().title(" cell ")), right);
}
