use super::{theme, trunc};
use crate::tui::app::App;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Color;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Clear, Paragraph, Row, Table, TableState, Wrap};
use ratatui::Frame;

pub fn draw(app: &App, f: &mut Frame, area: Rect) {
    let t = theme(app);
    let s = &app.exp;
    let split = if s.show_spec { [Constraint::Percentage(45), Constraint::Percentage(55)] } else { [Constraint::Min(3), Constraint::Length(5)] };
    let [list_area, detail] = Layout::vertical(split).areas(area);
    let rows: Vec<Row> = s
        .entries
        .iter()
        .map(|e| {
            let edited = if e.overrides.is_empty() { "" } else { "*" };
            match &e.spec {
                Ok(sp) => Row::new(vec![
                    format!("{}{edited}", sp.name),
                    sp.intervention.kind.clone(),
                    sp.model.name.clone(),
                    sp.task.name.clone(),
                ]),
                Err(err) => Row::new(vec![
                    Line::from(e.file_name()),
                    Line::from(Span::styled(format!("✗ {}", err.lines().last().unwrap_or("")), t.error())),
                ]),
            }
        })
        .collect();
    let table = Table::new(rows, [Constraint::Percentage(34), Constraint::Length(12), Constraint::Percentage(30), Constraint::Length(9)])
        .header(Row::new(vec!["name", "intervention", "model", "task"]).style(t.title()))
        .row_highlight_style(t.selected())
        .block(Block::bordered().title(format!(" experiments ({}) ", app.cfg.experiments_dir.display())));
    let mut st = TableState::default().with_selected(if s.entries.is_empty() { None } else { Some(s.selected) });
    f.render_stateful_widget(table, list_area, &mut st);

    let hint = Line::from(Span::styled("Enter spec · e edit · r run · R reload", t.dim()));
    match s.current() {
        None => f.render_widget(Paragraph::new("no experiments").block(Block::bordered()), detail),
        Some(e) if s.show_spec => {
            let text = match &e.spec {
                Ok(sp) => {
                    let mut head = vec![Line::from(Span::styled(
                        if e.overrides.is_empty() { "# resolved spec".to_string() } else { format!("# resolved spec, edited: {}", e.overrides.join(" ")) },
                        t.dim(),
                    ))];
                    head.extend(sp.to_toml().unwrap_or_default().lines().map(|l| Line::from(l.to_string())));
                    head
                }
                Err(err) => err.lines().map(|l| Line::from(Span::styled(l.to_string(), t.error()))).collect(),
            };
            f.render_widget(
                Paragraph::new(text).scroll((s.spec_scroll, 0)).block(Block::bordered().title(format!(" {} ", e.file_name())).title_bottom(hint)),
                detail,
            );
        }
        Some(e) => {
            let lines = match &e.spec {
                Ok(sp) => vec![
                    Line::from(trunc(&sp.description, detail.width.saturating_sub(2) as usize)),
                    Line::from(Span::styled(
                        format!(
                            "layers {} · site {} · positions {} · steps {}",
                            layers_text(&sp.sites.layers),
                            site_text(&sp.sites.site),
                            sp.sites.positions.join(","),
                            sp.train.steps
                        ),
                        t.dim(),
                    )),
                ],
                Err(err) => vec![Line::from(Span::styled(err.lines().last().unwrap_or("").to_string(), t.error()))],
            };
            f.render_widget(
                Paragraph::new(lines).wrap(Wrap { trim: true }).block(Block::bordered().title(format!(" {} ", e.file_name())).title_bottom(hint)),
                detail,
            );
        }
    }
    if let Some(form) = &s.form {
        let h = (form.fields.len() as u16 + 6).min(area.height);
        let r = super::centered(area, 76, h);
        f.render_widget(Clear, r);
        let mut lines: Vec<Line> = form
            .fields
            .iter()
            .enumerate()
            .map(|(i, fl)| {
                let focus = i == form.focus;
                let mark = if fl.error.is_some() { Span::styled("✗ ", t.error()) } else { Span::styled("✓ ", t.ok()) };
                let val = Span::styled(format!("{}{}", fl.value, if focus { "▏" } else { "" }), if focus { t.selected() } else { t.fg(Color::White) });
                let mut v = vec![mark, Span::styled(format!("{:<13}", fl.label), t.title()), val];
                if let Some(e) = &fl.error {
                    v.push(Span::styled(format!("  {}", trunc(e, 40)), t.error()));
                }
                Line::from(v)
            })
            .collect();
        lines.push(Line::from(""));
        lines.push(match &form.error {
            Some(e) => Line::from(Span::styled(trunc(e.lines().last().unwrap_or(""), 72), t.error())),
            None => Line::from(Span::styled("valid · Enter applies, Esc discards", t.ok())),
        });
        let name = s.entries.get(form.entry).map(|e| e.file_name()).unwrap_or_default();
        f.render_widget(
            Paragraph::new(lines).block(Block::bordered().title(format!(" edit {name} (as --set overrides) ")).title_bottom(" Tab/↑↓ field · Enter apply · Esc cancel ")),
            r,
        );
    }
}

pub fn layers_text(l: &crate::experiment::spec::Layers) -> String {
    match l {
        crate::experiment::spec::Layers::Text(t) => t.clone(),
        crate::experiment::spec::Layers::List(v) => v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(","),
    }
}

pub fn site_text(s: &crate::experiment::spec::OneOrMany) -> String {
    match s {
        crate::experiment::spec::OneOrMany::One(x) => x.clone(),
        crate::experiment::spec::OneOrMany::Many(v) => v.join(","),
    }
}
