//! The `?` overlay: every key of the workbench, by view.
use super::{centered, theme};
use crate::tui::app::App;
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

/// Every key, for `?` (the help overlay draws this list; it fits 80×24).
pub const HELP: &[(&str, &str)] = &[
    ("1-5", "views: Experiments Runs Results Compare Model"),
    ("? / q, Ctrl-C", "this help / quit (cancels runs, restores terminal)"),
    ("x", "export the current view as CSV (into the run folder)"),
    ("↑↓ / j k", "move the selection"),
    ("Experiments", ""),
    ("Enter / e", "show spec / edit layers positions kind rank steps lr seed"),
    ("  in the form", "Tab ↑↓ field · Enter apply (as --set) · Esc discard"),
    ("r / R", "queue a run of the selection / reload the files"),
    ("Runs", ""),
    ("c / Enter", "cancel the selected run (keeps partial results) / results"),
    ("Results", ""),
    ("Enter / Esc", "open a run; on a cell: its examples / back"),
    ("← → ↑ ↓", "move the heatmap cursor"),
    ("Tab / S-Tab", "next metric / next site"),
    ("h t d", "heatmap · sortable table · per-example drill-down"),
    ("s / o", "table: next sort column / reverse the order"),
    ("Compare", ""),
    ("Space / Enter", "mark runs A and B / compare (Tab, S-Tab, arrows)"),
    ("Model", ""),
    ("i, Enter / l", "type a prompt → top-10 next tokens / reload model"),
    ("w / c", "what-if: an experiment kind (vanilla, zero, mean, magnitude, angle) or an adapter / clear"),
];
