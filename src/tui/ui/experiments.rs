use super::{theme, trunc};
use crate::tui::app::App;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Color;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Clear, List, ListItem, ListState, Paragraph, Wrap};
use ratatui::Frame;

pub fn draw(app: &App, f: &mut Frame, area: Rect) {
    let t = theme(app);
    let s = &app.exp;
    let split = if s.show_spec { [Constraint::Percentage(45), Constraint::Percentage(55)] } else { [Constraint::Min(3), Constraint::Length(5)] };
    let [list_area, detail] = Layout::vertical(split).areas(area);
    // Columns sized to the width; a file that does not parse shows its error across the row.
    let inner = list_area.width.saturating_sub(2) as usize;
    let (wn, wk, wt) = (inner * 34 / 100, 13usize, 9usize);
    let wm = inner.saturating_sub(wn + wk + wt + 3);
    let cols = |a: &str, b: &str, c: &str, d: &str| format!("{:<wn$} {:<wk$} {:<wm$} {}", trunc(a, wn), trunc(b, wk), trunc(c, wm), trunc(d, wt));
    let items: Vec<ListItem> = s
        .entries
        .iter()
        .map(|e| {
            let edited = if e.overrides.is_empty() { "" } else { "*" };
            if let Some(Ok(p)) = &e.pilot {
                return ListItem::new(cols(&p.name, "pilot study", &p.model, &p.data.source));
            }
            let err_of_pilot = e.pilot.as_ref().and_then(|p| p.as_ref().err());
            if let Some(err) = err_of_pilot {
                return ListItem::new(Line::from(vec![
                    Span::raw(format!("{:<wn$} ", trunc(&e.file_name(), wn))),
                    Span::styled(trunc(&format!("✗ {}", err.lines().last().unwrap_or("")), inner.saturating_sub(wn + 1)), t.error()),
                ]));
            }
            match &e.spec {
                Ok(sp) => ListItem::new(cols(&format!("{}{edited}", sp.name), sp.intervention.kind_name(), &sp.model.name, &sp.task.name)),
                Err(err) => ListItem::new(Line::from(vec![
                    Span::raw(format!("{:<wn$} ", trunc(&e.file_name(), wn))),
                    Span::styled(trunc(&format!("✗ {}", err.lines().last().unwrap_or("")), inner.saturating_sub(wn + 1)), t.error()),
                ])),
            }
        })
        .collect();
    let title = format!(" experiments ({}) ", app.cfg.experiments_dir.display());
    let block = Block::bordered().title(title);
    let header_area = Rect { height: 1, ..block.inner(list_area) };
    let mut ls = ListState::default().with_selected(if s.entries.is_empty() { None } else { Some(s.selected) });
    let list_inner = Rect { y: header_area.y + 1, height: block.inner(list_area).height.saturating_sub(1), ..header_area };
    f.render_widget(block, list_area);
    f.render_widget(Paragraph::new(Span::styled(cols("name", "intervention", "model", "task"), t.title())), header_area);
    f.render_stateful_widget(List::new(items).highlight_style(t.selected()), list_inner, &mut ls);

    let hint = Line::from(Span::styled("Enter spec · e edit · r run · R reload", t.dim()));
    match s.current() {
        None => f.render_widget(Paragraph::new("no experiments").block(Block::bordered()), detail),
        Some(e) if e.pilot.is_some() => {
            let lines: Vec<Line> = match e.pilot.as_ref().expect("checked") {
                Ok(p) if s.show_spec => p.to_toml().unwrap_or_default().lines().map(|l| Line::from(l.to_string())).collect(),
                Ok(p) => vec![
                    Line::from(trunc(&p.description, detail.width.saturating_sub(2) as usize)),
                    Line::from(Span::styled(
                        format!("pilot study · methods {} · swap {} · r runs it (fine-tunes are cached)", p.methods.iter().map(|m| m.label.as_str()).collect::<Vec<_>>().join(","), p.swap.models.join(",")),
                        t.dim(),
                    )),
                ],
                Err(err) => err.lines().map(|l| Line::from(Span::styled(l.to_string(), t.error()))).collect(),
            };
            f.render_widget(
                Paragraph::new(lines).wrap(Wrap { trim: false }).scroll((s.spec_scroll, 0)).block(Block::bordered().title(format!(" {} ", e.file_name())).title_bottom(hint)),
                detail,
            );
        }
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
