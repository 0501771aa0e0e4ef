//! Drawing: pure functions of the state, `draw(&App, &mut Frame)`, one file per view.
mod compare;
mod experiments;
pub mod heatmap;
mod help;
mod model;
mod pilot;
mod results;
mod runs;
pub mod theme;

use super::app::{App, View};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;
use ratatui::Frame;
use theme::Theme;

pub fn theme(app: &App) -> Theme {
    Theme { color: app.cfg.color }
}

pub fn draw(app: &App, f: &mut Frame) {
    let [top, body, status] = Layout::vertical([Constraint::Length(1), Constraint::Min(3), Constraint::Length(1)]).areas(f.area());
    tabs(app, f, top);
    match app.view {
        View::Experiments => experiments::draw(app, f, body),
        View::Runs => runs::draw(app, f, body),
        View::Results => results::draw(app, f, body),
        View::Compare => compare::draw(app, f, body),
        View::Model => model::draw(app, f, body),
    }
    let t = theme(app);
    let running = app.runs.jobs.iter().filter(|j| j.status == super::app::JobStatus::Running).count();
    let queued = app.runs.jobs.iter().filter(|j| j.status == super::app::JobStatus::Queued).count();
    let mut spans = vec![Span::raw(app.status.clone())];
    if running + queued > 0 {
        spans.push(Span::styled(format!("  [{running} running, {queued} queued]"), t.fg(ratatui::style::Color::Yellow)));
    }
    f.render_widget(Paragraph::new(Line::from(spans)).style(t.dim()), status);
    if app.help {
        help::draw(app, f, f.area());
    }
}

fn tabs(app: &App, f: &mut Frame, area: Rect) {
    let t = theme(app);
    let mut spans = vec![Span::styled(" road ", t.title())];
    for (i, v) in View::ALL.iter().enumerate() {
        let label = format!(" {} {} ", i + 1, v.title());
        spans.push(if *v == app.view { Span::styled(label, t.selected()) } else { Span::raw(label) });
    }
    spans.push(Span::styled(" ?help q quit", t.dim()));
    f.render_widget(Paragraph::new(Line::from(spans)), area);
}

/// A centred rectangle of at most `w` × `h` inside `area`.
pub fn centered(area: Rect, w: u16, h: u16) -> Rect {
    let w = w.min(area.width);
    let h = h.min(area.height);
    Rect { x: area.x + (area.width - w) / 2, y: area.y + (area.height - h) / 2, width: w, height: h }
}

/// Truncate to `n` characters with an ellipsis.
pub fn trunc(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else if n == 0 {
        String::new()
    } else {
        s.chars().take(n - 1).collect::<String>() + "…"
    }
}

/// "1m05s" / "12s".
pub fn dur(d: std::time::Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}
