//! The layer × position heatmap used by Results and Compare: labels, cell values, a cursor,
//! and scrolling so the cursor stays visible in small terminals.
use super::theme::Theme;
use crate::tui::data::{show_token, Grid};
use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::style::{Modifier, Style};

pub struct Heatmap<'a> {
    pub grid: &'a Grid,
    pub cursor: (usize, usize),
    /// Token strings for numeric positions (header row), when known.
    pub tokens: Option<&'a [String]>,
    /// Colour scale: (lo, hi); diverging maps [-hi, hi].
    pub range: (f64, f64),
    pub diverging: bool,
    pub theme: Theme,
}

/// Cell text: fits `w` characters ("0.93", "-1.2", "12").
pub fn fmt_value(v: Option<f64>, w: usize) -> String {
    match v {
        None => "·".into(),
        Some(x) if x.is_nan() => "nan".into(),
        Some(x) => {
            for prec in (0..=3).rev() {
                let s = format!("{x:.prec$}");
                let s = if x.abs() < 1.0 && prec > 0 { s.replacen("0.", ".", 1) } else { s };
                if s.chars().count() <= w {
                    return s;
                }
            }
            if x > 0.0 { "+∞".into() } else { "-∞".into() }
        }
    }
}

impl Heatmap<'_> {
    /// Width of one cell column: at least 5 (4 characters and a gap), wider (up to 8) when
    /// `avail` columns leave room, so larger terminals show longer token labels.
    pub fn cell_width_in(&self, avail: usize) -> usize {
        let label = self.grid.positions.iter().map(|p| p.chars().count()).max().unwrap_or(1);
        let min = label.clamp(4, 7) + 1;
        let fit = avail.saturating_sub(4) / self.grid.positions.len().max(1);
        fit.clamp(min, 8.max(min))
    }

    pub fn cell_width(&self) -> usize {
        self.cell_width_in(0)
    }

    pub fn render(&self, area: Rect, buf: &mut Buffer) {
        let g = self.grid;
        if g.layers.is_empty() || area.height < 3 || area.width < 10 {
            buf.set_string(area.x, area.y, "no test-split cells for this site", self.theme.dim());
            return;
        }
        let cw = self.cell_width_in(area.width as usize);
        let label_w = 4usize;
        let header_rows = if self.tokens.is_some() { 2 } else { 1 };
        let vis_cols = ((area.width as usize).saturating_sub(label_w) / cw).max(1);
        let vis_rows = (area.height as usize).saturating_sub(header_rows).max(1);
        let col0 = self.cursor.1.saturating_sub(vis_cols - 1).min(g.positions.len().saturating_sub(vis_cols));
        let row0 = self.cursor.0.saturating_sub(vis_rows - 1).min(g.layers.len().saturating_sub(vis_rows));
        let (lo, hi) = self.range;
        let dim = self.theme.dim();
        // Header: position names, then token strings.
        buf.set_string(area.x, area.y, "pos", dim);
        if self.tokens.is_some() {
            buf.set_string(area.x, area.y + 1, "tok", dim);
        }
        for (vc, c) in (col0..g.positions.len()).take(vis_cols).enumerate() {
            let x = area.x + (label_w + vc * cw) as u16;
            let mut st = dim;
            if c == self.cursor.1 {
                st = st.add_modifier(Modifier::BOLD);
            }
            let p: String = g.positions[c].chars().take(cw - 1).collect();
            buf.set_string(x, area.y, format!("{p:>w$}", w = cw - 1), st);
            if let Some(toks) = self.tokens {
                let t = g.positions[c].parse::<usize>().ok().and_then(|i| toks.get(i)).map(|t| show_token(t)).unwrap_or_default();
                let t: String = t.chars().take(cw - 1).collect();
                buf.set_string(x, area.y + 1, format!("{t:>w$}", w = cw - 1), st);
            }
        }
        for (vr, r) in (row0..g.layers.len()).take(vis_rows).enumerate() {
            let y = area.y + (header_rows + vr) as u16;
            let mut st = dim;
            if r == self.cursor.0 {
                st = st.add_modifier(Modifier::BOLD);
            }
            buf.set_string(area.x, y, format!("L{:<3}", g.layers[r]), st);
            for (vc, c) in (col0..g.positions.len()).take(vis_cols).enumerate() {
                let x = area.x + (label_w + vc * cw) as u16;
                let v = g.get(r, c);
                let (style, fill) = if self.diverging {
                    let m = hi.abs().max(lo.abs()).max(1e-12);
                    self.theme.diverging(v.map(|v| v / m))
                } else {
                    let t = v.map(|v| if hi > lo { (v - lo) / (hi - lo) } else { 0.5 });
                    self.theme.heat(t)
                };
                let text = if self.theme.color || fill == '·' {
                    format!("{:>w$} ", fmt_value(v, cw - 1), w = cw - 1)
                } else if self.diverging {
                    // NO_COLOR differences: sign and value.
                    format!("{:>w$} ", fmt_value(v, cw - 1), w = cw - 1)
                } else {
                    std::iter::repeat_n(fill, cw - 1).collect::<String>() + " "
                };
                let style = if (r, c) == self.cursor { style.add_modifier(Modifier::REVERSED | Modifier::BOLD) } else { style };
                buf.set_string(x, y, &text[..], style);
                if (r, c) == self.cursor && !self.theme.color {
                    // Mark the cursor with brackets when there is no colour to show it.
                    buf.set_string(x + cw as u16 - 1, y, "◂", Style::new());
                }
            }
        }
    }
}
