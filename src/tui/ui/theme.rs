//! Colours, and their NO_COLOR fallbacks (plain text, modifiers and shade characters).
use ratatui::style::{Color, Modifier, Style};

#[derive(Clone, Copy)]
pub struct Theme {
    pub color: bool,
}

impl Theme {
    pub fn fg(self, c: Color) -> Style {
        if self.color {
            Style::new().fg(c)
        } else {
            Style::new()
        }
    }
    pub fn title(self) -> Style {
        self.fg(Color::Cyan).add_modifier(Modifier::BOLD)
    }
    pub fn dim(self) -> Style {
        if self.color {
            Style::new().fg(Color::DarkGray)
        } else {
            Style::new()
        }
    }
    pub fn error(self) -> Style {
        self.fg(Color::Red).add_modifier(Modifier::BOLD)
    }
    pub fn ok(self) -> Style {
        self.fg(Color::Green)
    }
    pub fn selected(self) -> Style {
        Style::new().add_modifier(Modifier::REVERSED)
    }
    /// Line colours of chart series (NO_COLOR: default colour, the markers differ instead).
    pub fn series(self, i: usize) -> Style {
        const C: [Color; 6] = [Color::Cyan, Color::Yellow, Color::Magenta, Color::Green, Color::Red, Color::Blue];
        self.fg(C[i % C.len()])
    }

    /// Style and fill character of a heatmap cell with `t` in [0, 1] (None = missing/NaN).
    /// Colour: a viridis-like ramp as the background. NO_COLOR: shade characters.
    pub fn heat(self, t: Option<f64>) -> (Style, char) {
        let Some(t) = t.filter(|t| t.is_finite()) else { return (self.dim(), '·') };
        let t = t.clamp(0.0, 1.0);
        if !self.color {
            return (Style::new(), shade(t));
        }
        let (r, g, b) = ramp(t);
        let fg = if 0.299 * r as f64 + 0.587 * g as f64 + 0.114 * b as f64 > 140.0 { Color::Black } else { Color::White };
        (Style::new().bg(Color::Rgb(r, g, b)).fg(fg), ' ')
    }

    /// Diverging colours for differences: `t` in [-1, 1], blue (negative) to red (positive).
    pub fn diverging(self, t: Option<f64>) -> (Style, char) {
        let Some(t) = t.filter(|t| t.is_finite()) else { return (self.dim(), '·') };
        let t = t.clamp(-1.0, 1.0);
        if !self.color {
            return (Style::new(), if t.abs() < 0.05 { '·' } else if t > 0.0 { '+' } else { '-' });
        }
        let a = t.abs();
        let mix = |from: u8, to: u8| (from as f64 + (to as f64 - from as f64) * a).round() as u8;
        let (r, g, b) = if t >= 0.0 { (mix(245, 200), mix(245, 40), mix(245, 40)) } else { (mix(245, 40), mix(245, 90), mix(245, 200)) };
        (Style::new().bg(Color::Rgb(r, g, b)).fg(if a > 0.6 { Color::White } else { Color::Black }), ' ')
    }
}

/// Five levels: ' ' ░ ▒ ▓ █.
pub fn shade(t: f64) -> char {
    const S: [char; 5] = [' ', '░', '▒', '▓', '█'];
    S[((t * 4.0).round() as usize).min(4)]
}

/// Viridis, piecewise linear through five stops.
fn ramp(t: f64) -> (u8, u8, u8) {
    const STOPS: [(f64, f64, f64); 5] = [(68., 1., 84.), (59., 82., 139.), (33., 145., 140.), (94., 201., 98.), (253., 231., 37.)];
    let x = t * 4.0;
    let i = (x.floor() as usize).min(3);
    let f = x - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let l = |p: f64, q: f64| (p + (q - p) * f).round() as u8;
    (l(a.0, b.0), l(a.1, b.1), l(a.2, b.2))
}
