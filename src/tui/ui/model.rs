use super::{theme, trunc};
use crate::model::Site;
use crate::tui::app::{App, ModelState};
use crate::tui::event::AltTop;
use crate::tui::whatif::{Form, FIELDS};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Color;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Clear, Paragraph, Row, Table, Wrap};
use ratatui::Frame;

pub fn draw(app: &App, f: &mut Frame, area: Rect) {
    let t = theme(app);
    let s = &app.model;
    // Small terminals drop the sites line (the what-if form lists sites) to leave room for top-k.
    let compact = area.height < 30;
    let [info, prompt, top] = Layout::vertical([Constraint::Length(if compact { 6 } else { 8 }), Constraint::Length(4), Constraint::Min(3)]).areas(area);
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
            if !compact {
                let sites: Vec<&str> = Site::ALL.iter().map(|s| s.name()).collect();
                lines.push(Line::from(vec![Span::styled("sites   ", t.dim()), Span::raw(format!("L0..{} × {}", m.layers.saturating_sub(1), sites.join(" ")))]));
            }
        }
        None if s.loading => lines.push(Line::from(Span::styled(format!("loading {name} in the background…"), t.dim()))),
        None => lines.push(Line::from(Span::styled("press l to load the selected experiment's model", t.dim()))),
    }
    f.render_widget(Paragraph::new(lines).wrap(Wrap { trim: true }).block(Block::bordered().title(format!(" model {name} "))), info);
    let cursor = if s.editing { "▏" } else { "" };
    let hint = if s.editing { " Enter top-k · Esc stop typing " } else { " i type a prompt · w what-if · c clear · l reload " };
    let whatif = match &s.whatif {
        Some(w) => Line::from(vec![Span::styled("what-if ", t.dim()), Span::styled(w.label(), t.fg(Color::Yellow))]),
        None => Line::from(Span::styled("what-if: none (w adds an intervention)", t.dim())),
    };
    f.render_widget(
        Paragraph::new(vec![Line::from(vec![Span::raw(s.prompt.clone()), Span::styled(cursor, t.title())]), whatif])
            .block(Block::bordered().title(" prompt ").title_bottom(hint).border_style(if s.editing { t.title() } else { t.dim() })),
        prompt,
    );
    let title = if s.busy {
        " next tokens: computing… ".to_string()
    } else if s.top.is_empty() {
        " next tokens ".to_string()
    } else {
        format!(" top-{} after {:?} ({} tokens) ", s.top.len(), trunc(&s.top_prompt, 30), s.top_ids.len())
    };
    match &s.alt {
        None => clean_table(app, s, f, top, title, true),
        Some(alt) => {
            let [l, r] = Layout::horizontal([Constraint::Percentage(45), Constraint::Percentage(55)]).areas(top);
            clean_table(app, s, f, l, " clean ".into(), false);
            alt_table(app, alt, f, r);
        }
    }
    if let Some(form) = &s.form {
        draw_form(app, form, f, top);
    }
}

fn clean_table(app: &App, s: &ModelState, f: &mut Frame, area: Rect, title: String, wide: bool) {
    let t = theme(app);
    let rows: Vec<Row> = s
        .top
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut c = vec![(i + 1).to_string(), format!("{:?}", r.token), format!("{:.3}", r.logit), format!("{:.4}", r.prob)];
            if wide {
                c.insert(1, r.id.to_string());
                c.push("█".repeat(((r.prob * 20.0).round() as usize).min(20)));
            }
            Row::new(c)
        })
        .collect();
    let (header, widths): (Vec<&str>, Vec<u16>) =
        if wide { (vec!["#", "id", "token", "logit", "prob", ""], vec![3, 7, 14, 9, 8, 20]) } else { (vec!["#", "token", "logit", "prob"], vec![3, 14, 8, 7]) };
    let table = Table::new(rows, widths.into_iter().map(Constraint::Length)).header(Row::new(header).style(t.title())).block(Block::bordered().title(title));
    f.render_widget(table, area);
}

/// The intervened top-k: probability, change from the clean probability of the same token, and
/// the token's clean rank (↑ marks tokens the intervention promoted).
fn alt_table(app: &App, alt: &Result<AltTop, String>, f: &mut Frame, area: Rect) {
    let t = theme(app);
    match alt {
        Err(e) => f.render_widget(
            Paragraph::new(Line::from(Span::styled(e.clone(), t.error()))).wrap(Wrap { trim: true }).block(Block::bordered().title(" what-if failed ")),
            area,
        ),
        Ok(a) => {
            let rows: Vec<Row> = a
                .rows
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let d = r.row.prob - r.clean_prob;
                    let style = if d > 0.005 { t.fg(Color::Green) } else if d < -0.005 { t.fg(Color::Red) } else { t.dim() };
                    let moved = if r.clean_rank > i + 1 { "↑" } else { "" };
                    Row::new(vec![
                        (i + 1).to_string(),
                        format!("{:?}", r.row.token),
                        format!("{:.4}", r.row.prob),
                        format!("{d:+.3}"),
                        format!("{moved}{}", r.clean_rank),
                    ])
                    .style(style)
                })
                .collect();
            let table = Table::new(rows, [3, 14, 7, 7, 6].map(Constraint::Length))
                .header(Row::new(vec!["#", "token", "prob", "Δprob", "clean"]).style(t.title()))
                .block(Block::bordered().title(format!(" what-if · KL {:.3} ", a.kl)).title_bottom(Line::from(format!(" {} ", trunc(&a.label, area.width.saturating_sub(4) as usize)))));
            f.render_widget(table, area);
        }
    }
}

fn draw_form(app: &App, form: &Form, f: &mut Frame, area: Rect) {
    let t = theme(app);
    let r = super::centered(area, 72, FIELDS.len() as u16 + 4);
    f.render_widget(Clear, r);
    let mut lines: Vec<Line> = FIELDS
        .iter()
        .enumerate()
        .map(|(i, label)| {
            let focus = i == form.focus;
            let cyclic = i == 0 || i == 2;
            let val = form.value(i);
            let shown = if focus && cyclic { format!("◂ {val} ▸") } else if focus { format!("{val}▏") } else { val };
            let style = if !form.active(i) {
                t.dim()
            } else if focus {
                t.selected()
            } else {
                t.fg(Color::White)
            };
            let hint = match (i, form.active(i)) {
                (_, false) => "",
                (0, _) => "  ←→ vanilla zero mean magnitude angle adapter",
                (3, _) => "  token index, last or all",
                (5, _) => "  peft dir (RoAd or LoRA)",
                _ => "",
            };
            Line::from(vec![Span::styled(format!("{label:<10}"), t.title()), Span::styled(trunc(&shown, 44), style), Span::styled(hint, t.dim())])
        })
        .collect();
    lines.push(match &form.error {
        Some(e) => Line::from(Span::styled(trunc(e, 68), t.error())),
        None => Line::from(Span::styled("valid · Enter applies and reruns the prompt", t.ok())),
    });
    f.render_widget(Paragraph::new(lines).block(Block::bordered().title(" what-if ").title_bottom(" Tab/↑↓ field · Enter apply · Esc cancel ")), r);
}
