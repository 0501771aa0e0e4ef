use super::{theme, trunc};
use crate::model::Site;
use crate::tui::app::App;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph, Row, Table, Wrap};
use ratatui::Frame;

pub fn draw(app: &App, f: &mut Frame, area: Rect) {
    let t = theme(app);
    let s = &app.model;
    let [info, prompt, top] = Layout::vertical([Constraint::Length(8), Constraint::Length(3), Constraint::Min(3)]).areas(area);
    let name = s.name.clone().unwrap_or_else(|| "(none)".into());
    let mut lines = vec![];
    if let Some(e) = &s.error {
        lines.push(Line::from(Span::styled(trunc(e, 300), t.error())));
    }
    match &s.info {
        Some(m) => {
            lines.push(Line::from(vec![Span::styled("source  ", t.dim()), Span::raw(format!("{} ({})", m.source, m.format))]));
            lines.push(Line::from(vec![
                Span::styled("arch    ", t.dim()),
                Span::raw(format!("llama · {} blocks · d={} · ffn={} · vocab={}", m.layers, m.hidden, m.ffn, m.vocab)),
            ]));
            lines.push(Line::from(vec![
                Span::styled("attn    ", t.dim()),
                Span::raw(format!("{} heads × {} · {} kv heads (GQA ×{})", m.heads, m.head_dim, m.kv_heads, m.heads / m.kv_heads.max(1))),
            ]));
            lines.push(Line::from(vec![
                Span::styled("params  ", t.dim()),
                Span::raw(format!("{:.2} M · context {} · tied embeddings {}", m.params as f64 / 1e6, m.context, m.tied)),
            ]));
            let sites: Vec<&str> = Site::ALL.iter().map(|s| s.name()).collect();
            lines.push(Line::from(vec![Span::styled("sites   ", t.dim()), Span::raw(format!("L0..{} × {}", m.layers.saturating_sub(1), sites.join(" ")))]));
        }
        None if s.loading => lines.push(Line::from(Span::styled(format!("loading {name} in the background…"), t.dim()))),
        None => lines.push(Line::from(Span::styled("press l to load the selected experiment's model", t.dim()))),
    }
    f.render_widget(Paragraph::new(lines).wrap(Wrap { trim: true }).block(Block::bordered().title(format!(" model {name} "))), info);
    let cursor = if s.editing { "▏" } else { "" };
    let hint = if s.editing { " Enter top-k · Esc stop typing " } else { " i type a prompt · l reload " };
    f.render_widget(
        Paragraph::new(Line::from(vec![Span::raw(s.prompt.clone()), Span::styled(cursor, t.title())]))
            .block(Block::bordered().title(" prompt ").title_bottom(hint).border_style(if s.editing { t.title() } else { t.dim() })),
        prompt,
    );
    let rows: Vec<Row> = s
        .top
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let bar = "█".repeat(((r.prob * 20.0).round() as usize).min(20));
            Row::new(vec![(i + 1).to_string(), r.id.to_string(), format!("{:?}", r.token), format!("{:.3}", r.logit), format!("{:.4}", r.prob), bar])
        })
        .collect();
    let title = if s.busy {
        " next tokens: computing… ".to_string()
    } else if s.top.is_empty() {
        " next tokens ".to_string()
    } else {
        format!(" top-{} after {:?} ({} tokens) ", s.top.len(), trunc(&s.top_prompt, 30), s.top_ids.len())
    };
    let table = Table::new(rows, [3, 7, 14, 9, 8, 20].map(Constraint::Length))
        .header(Row::new(vec!["#", "id", "token", "logit", "prob", ""]).style(t.title()))
        .block(Block::bordered().title(title));
    f.render_widget(table, top);
}
