use super::{dur, theme, trunc};
use crate::tui::app::{App, Job, JobStatus};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Color;
use ratatui::symbols::Marker;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Axis, Block, Chart, Dataset, Gauge, GraphType, List, ListItem, ListState, Paragraph};
use ratatui::Frame;

pub fn draw(app: &App, f: &mut Frame, area: Rect) {
    let t = theme(app);
    let jobs = &app.runs.jobs;
    if jobs.is_empty() {
        f.render_widget(
            Paragraph::new(vec![
                Line::from("No runs in this session."),
                Line::from(Span::styled("Select an experiment in view 1 and press r to queue one.", t.dim())),
            ])
            .block(Block::bordered().title(" runs ")),
            area,
        );
        return;
    }
    let qh = (jobs.len() as u16 + 2).clamp(3, 6);
    let [queue, gauge, charts, log] =
        Layout::vertical([Constraint::Length(qh), Constraint::Length(3), Constraint::Min(6), Constraint::Length(5)]).areas(area);
    let items: Vec<ListItem> = jobs
        .iter()
        .map(|j| {
            let st = match j.status {
                JobStatus::Done => t.ok(),
                JobStatus::Failed(_) => t.error(),
                JobStatus::Running => t.fg(Color::Yellow),
                _ => t.dim(),
            };
            let dir = j.run_dir.as_ref().and_then(|d| d.file_name()).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let cancelling = if j.cancel_requested && matches!(j.status, JobStatus::Running) { " (cancelling)" } else { "" };
            ListItem::new(Line::from(vec![
                Span::raw(format!("#{:<3}", j.id)),
                Span::styled(format!("{:<10}", j.status.label()), st),
                Span::raw(format!("{:<24} ", trunc(&j.name, 24))),
                Span::styled(format!("{dir}{cancelling}"), t.dim()),
            ]))
        })
        .collect();
    let mut ls = ListState::default().with_selected(Some(app.runs.selected.min(jobs.len() - 1)));
    f.render_stateful_widget(
        List::new(items).highlight_style(t.selected()).block(Block::bordered().title(" queue (c cancel · Enter results) ")),
        queue,
        &mut ls,
    );
    let j = &jobs[app.runs.selected.min(jobs.len() - 1)];
    draw_gauge(app, f, gauge, j);
    // The current cell's curves (each cell trains its own intervention from scratch). The dev
    // IIA beside the loss makes under-training visible while it happens.
    let start = (j.cells_done.min(j.cells.saturating_sub(1)) * j.steps_per_cell) as f64;
    // Before the next cell's first step, the finished cell's points (those since the start of
    // the last point's cell).
    let this_cell = |pts: &[(f64, f64)]| -> Vec<(f64, f64)> {
        let cur: Vec<(f64, f64)> = pts.iter().copied().filter(|p| p.0 >= start).map(|(x, y)| (x - start, y)).collect();
        if !cur.is_empty() {
            return cur;
        }
        let per = j.steps_per_cell.max(1) as f64;
        let s = pts.last().map_or(0.0, |p| (p.0 / per).floor() * per);
        pts.iter().copied().filter(|p| p.0 >= s).map(|(x, y)| (x - s, y)).collect()
    };
    if j.dev_iia.is_empty() {
        let [loss, iia] = Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(charts);
        line_chart(app, f, loss, " loss, this cell ", "step", &this_cell(&j.loss), None);
        line_chart(app, f, iia, " test IIA so far ", "cell", &j.iia, Some((0.0, 1.0)));
    } else {
        let [loss, dev, iia] =
            Layout::horizontal([Constraint::Percentage(40), Constraint::Percentage(30), Constraint::Percentage(30)]).areas(charts);
        line_chart(app, f, loss, " loss, this cell ", "step", &this_cell(&j.loss), None);
        line_chart(app, f, dev, " dev IIA, this cell ", "step", &this_cell(&j.dev_iia), Some((0.0, 1.0)));
        line_chart(app, f, iia, " test IIA so far ", "cell", &j.iia, Some((0.0, 1.0)));
    }
    let n = log.height.saturating_sub(2) as usize;
    let lines: Vec<Line> = j.log.iter().rev().take(n).rev().map(|s| Line::from(trunc(s, log.width.saturating_sub(2) as usize))).collect();
    f.render_widget(Paragraph::new(lines).block(Block::bordered().title(" log ")), log);
}

fn draw_gauge(app: &App, f: &mut Frame, area: Rect, j: &Job) {
    let t = theme(app);
    let p = j.progress();
    let eta = j.eta(app.now).map(dur).unwrap_or_else(|| "—".into());
    let label = format!(
        "{:.0}% · cell {}/{} {} · elapsed {} · ETA {}",
        p * 100.0,
        (j.cells_done + usize::from(j.status == JobStatus::Running && j.cells_done < j.cells)).min(j.cells),
        j.cells,
        trunc(&j.cell_label, 28),
        dur(j.elapsed(app.now)),
        eta
    );
    let g = Gauge::default()
        .ratio(p)
        .label(label)
        .gauge_style(if t.color { ratatui::style::Style::new().fg(Color::Green).bg(Color::Black) } else { ratatui::style::Style::new() })
        .use_unicode(true)
        .block(Block::bordered().title(format!(" {} ", j.name)));
    f.render_widget(g, area);
}

/// A braille line chart of `pts` with automatic bounds (or `fixed_y`).
pub fn line_chart(app: &App, f: &mut Frame, area: Rect, title: &str, xname: &str, pts: &[(f64, f64)], fixed_y: Option<(f64, f64)>) {
    let t = theme(app);
    let finite: Vec<(f64, f64)> = pts.iter().copied().filter(|p| p.1.is_finite()).collect();
    if finite.is_empty() {
        f.render_widget(Paragraph::new(Span::styled("no data yet", t.dim())).block(Block::bordered().title(title.to_string())), area);
        return;
    }
    let (x0, x1) = (finite[0].0, finite.iter().map(|p| p.0).fold(f64::MIN, f64::max).max(finite[0].0 + 1.0));
    let (y0, y1) = fixed_y.unwrap_or_else(|| {
        let lo = finite.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let hi = finite.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        if hi > lo { (lo, hi) } else { (lo - 0.5, hi + 0.5) }
    });
    let ds = Dataset::default().marker(Marker::Braille).graph_type(GraphType::Line).style(t.series(0)).data(&finite);
    let last = finite.last().map(|p| p.1).unwrap_or(0.0);
    let chart = Chart::new(vec![ds])
        .block(Block::bordered().title(format!("{title}(last {last:.3}) ")))
        .x_axis(Axis::default().title(xname.to_string()).bounds([x0, x1]).labels([format!("{x0:.0}"), format!("{x1:.0}")]).style(t.dim()))
        .y_axis(Axis::default().bounds([y0, y1]).labels([format!("{y0:.2}"), format!("{y1:.2}")]).style(t.dim()));
    f.render_widget(chart, area);
}
