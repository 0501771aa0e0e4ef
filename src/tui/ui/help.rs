use super::{centered, theme};
use crate::tui::app::{App, HELP};
use ratatui::layout::Rect;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Clear, Paragraph};
use ratatui::Frame;

pub fn draw(app: &App, f: &mut Frame, area: Rect) {
    let t = theme(app);
    let lines: Vec<Line> = HELP
        .iter()
        .map(|(k, d)| {
            if d.is_empty() {
                Line::from(Span::styled(k.to_string(), t.title()))
            } else {
                Line::from(vec![Span::styled(format!("  {k:<15}"), t.fg(ratatui::style::Color::Yellow)), Span::raw(d.to_string())])
            }
        })
        .collect();
    let h = (lines.len() as u16 + 2).min(area.height);
    let r = centered(area, 78, h);
    f.render_widget(Clear, r);
    f.render_widget(Paragraph::new(lines).block(Block::bordered().title(" keys (any key closes) ")), r);
}
