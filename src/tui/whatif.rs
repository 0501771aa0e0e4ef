//! The Model pane's quick what-if: one intervention — zero or mean ablation, or a swap from a
//! second ("source") prompt, at a (layer, site, position); or a peft adapter (RoAd or LoRA) on the
//! weights — whose top-k next tokens are shown beside the clean ones.
//!
//! This file is pure state (the spec, its form, validation); the forward passes that carry it
//! out are in [`exec`] and run in the model worker thread only.
pub mod exec;

use crate::model::Site;
use ratatui::crossterm::event::{KeyCode, KeyEvent};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Zero,
    Mean,
    Swap,
    Adapter,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Zero, Kind::Mean, Kind::Swap, Kind::Adapter];
    pub fn name(self) -> &'static str {
        match self {
            Kind::Zero => "zero",
            Kind::Mean => "mean",
            Kind::Swap => "swap",
            Kind::Adapter => "adapter",
        }
    }
    /// Whether layer / site / position apply (an adapter acts on every projection it carries).
    pub fn is_site(self) -> bool {
        self != Kind::Adapter
    }
}

/// Which token positions of the prompt are intervened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pos {
    Last,
    All,
    At(usize),
}

impl Pos {
    pub fn parse(s: &str) -> Result<Pos, String> {
        match s.trim() {
            "last" | "-1" => Ok(Pos::Last),
            "all" | "*" => Ok(Pos::All),
            n => n.parse().map(Pos::At).map_err(|_| format!("position {n:?}: a token index, last or all")),
        }
    }
    pub fn label(self) -> String {
        match self {
            Pos::Last => "last".into(),
            Pos::All => "all".into(),
            Pos::At(n) => n.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct WhatIf {
    pub kind: Kind,
    pub layer: usize,
    pub site: Site,
    pub pos: Pos,
    /// Source prompt (swap only).
    pub source: String,
    /// Adapter directory (adapter only).
    pub adapter: String,
}

impl WhatIf {
    /// One line for titles, e.g. `swap ← "Rome" · L3 block_output @last`.
    pub fn label(&self) -> String {
        let at = format!("L{} {} @{}", self.layer, self.site, self.pos.label());
        match self.kind {
            Kind::Zero | Kind::Mean => format!("{} ablation · {at}", self.kind.name()),
            Kind::Swap => format!("swap ← {:?} · {at}", self.source),
            Kind::Adapter => format!("adapter {}", self.adapter),
        }
    }
}

/// Form fields, in focus order.
pub const FIELDS: [&str; 6] = ["kind", "layer", "site", "position", "source", "adapter"];

/// The what-if form: `kind` and `site` cycle with ←/→ (or Space), the rest are typed.
#[derive(Debug, Clone)]
pub struct Form {
    pub kind: Kind,
    pub site: Site,
    pub layer: String,
    pub pos: String,
    pub source: String,
    pub adapter: String,
    pub focus: usize,
    pub error: Option<String>,
}

pub enum FormAction {
    Stay,
    Apply(WhatIf),
    Cancel,
}

impl Form {
    /// Pre-filled from the current what-if, else a last-token zero ablation at block 0's output.
    pub fn new(cur: Option<&WhatIf>) -> Form {
        match cur {
            Some(w) => Form {
                kind: w.kind,
                site: w.site,
                layer: w.layer.to_string(),
                pos: w.pos.label(),
                source: w.source.clone(),
                adapter: w.adapter.clone(),
                focus: 0,
                error: None,
            },
            None => Form {
                kind: Kind::Zero,
                site: Site::BlockOutput,
                layer: "0".into(),
                pos: "last".into(),
                source: String::new(),
                adapter: String::new(),
                focus: 0,
                error: None,
            },
        }
    }

    /// Whether field `i` matters for the chosen kind (others are drawn dimmed and skipped).
    pub fn active(&self, i: usize) -> bool {
        match FIELDS[i] {
            "kind" => true,
            "layer" | "site" | "position" => self.kind.is_site(),
            "source" => self.kind == Kind::Swap,
            _ => self.kind == Kind::Adapter,
        }
    }

    /// The displayed value of field `i`.
    pub fn value(&self, i: usize) -> String {
        match i {
            0 => self.kind.name().into(),
            1 => self.layer.clone(),
            2 => self.site.name().into(),
            3 => self.pos.clone(),
            4 => self.source.clone(),
            _ => self.adapter.clone(),
        }
    }

    fn text(&mut self) -> Option<&mut String> {
        match self.focus {
            1 => Some(&mut self.layer),
            3 => Some(&mut self.pos),
            4 => Some(&mut self.source),
            5 => Some(&mut self.adapter),
            _ => None,
        }
    }

    fn cycle(&mut self, step: isize) {
        fn next<T: Copy + PartialEq>(all: &[T], cur: T, step: isize) -> T {
            let i = all.iter().position(|x| *x == cur).unwrap_or(0) as isize;
            all[(i + step).rem_euclid(all.len() as isize) as usize]
        }
        match self.focus {
            0 => self.kind = next(&Kind::ALL, self.kind, step),
            2 => self.site = next(&Site::ALL, self.site, step),
            _ => {}
        }
    }

    fn move_focus(&mut self, step: isize) {
        // Skip fields the kind ignores; `kind` is always active, so this terminates.
        loop {
            self.focus = (self.focus as isize + step).rem_euclid(FIELDS.len() as isize) as usize;
            if self.active(self.focus) {
                break;
            }
        }
    }

    /// The spec, or the first problem. `layers` is the loaded model's block count, when known.
    pub fn validate(&self, layers: Option<usize>) -> Result<WhatIf, String> {
        let layer: usize = if self.kind.is_site() {
            let l = self.layer.trim().parse().map_err(|_| format!("layer {:?}: a block index", self.layer))?;
            if let Some(n) = layers.filter(|&n| l >= n) {
                return Err(format!("layer {l}: the model has blocks 0..{}", n - 1));
            }
            l
        } else {
            0
        };
        let pos = if self.kind.is_site() { Pos::parse(&self.pos)? } else { Pos::Last };
        if self.kind == Kind::Swap && self.source.trim().is_empty() {
            return Err("swap needs a source prompt".into());
        }
        if self.kind == Kind::Adapter && self.adapter.trim().is_empty() {
            return Err("adapter needs a directory (adapter_config.json + adapter_model.safetensors)".into());
        }
        Ok(WhatIf { kind: self.kind, layer, site: self.site, pos, source: self.source.clone(), adapter: self.adapter.trim().to_string() })
    }

    pub fn key(&mut self, k: KeyEvent, layers: Option<usize>) -> FormAction {
        match k.code {
            KeyCode::Esc => return FormAction::Cancel,
            KeyCode::Enter => {
                return match self.validate(layers) {
                    Ok(w) => FormAction::Apply(w),
                    Err(e) => {
                        self.error = Some(e);
                        FormAction::Stay
                    }
                }
            }
            KeyCode::Tab | KeyCode::Down => self.move_focus(1),
            KeyCode::BackTab | KeyCode::Up => self.move_focus(-1),
            KeyCode::Right => self.cycle(1),
            KeyCode::Left => self.cycle(-1),
            KeyCode::Backspace => {
                if let Some(t) = self.text() {
                    t.pop();
                }
            }
            KeyCode::Char(' ') if self.text().is_none() => self.cycle(1),
            KeyCode::Char(c) => {
                if let Some(t) = self.text() {
                    t.push(c);
                }
            }
            _ => {}
        }
        self.error = self.validate(layers).err();
        FormAction::Stay
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::crossterm::event::KeyModifiers;

    fn k(c: KeyCode) -> KeyEvent {
        KeyEvent::new(c, KeyModifiers::NONE)
    }

    #[test]
    fn form_validates_and_skips_inactive_fields() {
        let mut f = Form::new(None);
        assert!(matches!(f.validate(Some(30)), Ok(WhatIf { kind: Kind::Zero, layer: 0, pos: Pos::Last, .. })));
        f.key(k(KeyCode::Tab), Some(30));
        assert_eq!(FIELDS[f.focus], "layer");
        f.key(k(KeyCode::Backspace), Some(30));
        for c in "31".chars() {
            f.key(k(KeyCode::Char(c)), Some(30));
        }
        assert_eq!(f.error.as_deref(), Some("layer 31: the model has blocks 0..29"));
        f.key(k(KeyCode::Backspace), Some(30));
        assert!(f.error.is_none());
        // Zero ablation: source and adapter are skipped by Tab.
        f.focus = 3;
        f.key(k(KeyCode::Tab), Some(30));
        assert_eq!(FIELDS[f.focus], "kind");
        f.key(k(KeyCode::Right), Some(30));
        f.key(k(KeyCode::Right), Some(30));
        assert_eq!(f.kind, Kind::Swap);
        assert_eq!(f.error.as_deref(), Some("swap needs a source prompt"));
        assert_eq!(Pos::parse("7"), Ok(Pos::At(7)));
        assert!(Pos::parse("x").is_err());
    }
}
