//! The Model pane's quick what-if: one untrained intervention of the experiments' own kinds — a
//! vanilla interchange (or magnitude/angle swap) from a second ("source") prompt, zero or mean
//! ablation — at a (layer, site, position); or a peft adapter (RoAd or LoRA) on the weights —
//! whose top-k next tokens are shown beside the clean ones.
//!
//! This file is pure state (the spec, its form, validation); the forward passes that carry it
//! out are in [`exec`] and run in the model worker thread only.
pub mod exec;

use crate::intervene::InterventionSpec;
use crate::model::Site;
use ratatui::crossterm::event::{KeyCode, KeyEvent};

/// What the what-if does: one of the experiments' own intervention kinds that needs no training
/// (vanilla interchange from a source prompt, zero/mean ablation, magnitude/angle swaps…), built
/// and applied by `intervene` exactly as an experiment cell would; or a peft adapter.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Site(InterventionSpec),
    Adapter,
}

impl Kind {
    /// Every untrained intervention kind (in `InterventionSpec::all`'s order), then the adapter.
    /// AtP is left out: it estimates a whole sweep, it is no edit to try on one prompt.
    pub fn all() -> Vec<Kind> {
        let edit = |s: &InterventionSpec| !s.trainable() && !matches!(s, InterventionSpec::Atp { .. });
        InterventionSpec::all().into_iter().filter(edit).map(Kind::Site).chain([Kind::Adapter]).collect()
    }
    /// The kind by its experiment-file name (`zero`, `vanilla`, …, or `adapter`).
    pub fn named(name: &str) -> Option<Kind> {
        Kind::all().into_iter().find(|k| k.name() == name)
    }
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Site(s) => s.kind_name(),
            Kind::Adapter => "adapter",
        }
    }
    /// Whether layer / site / position apply (an adapter acts on every projection it carries).
    pub fn is_site(&self) -> bool {
        *self != Kind::Adapter
    }
    /// Whether a source prompt is needed.
    pub fn uses_source(&self) -> bool {
        matches!(self, Kind::Site(s) if s.uses_source())
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
    /// One line for titles, e.g. `vanilla ← "Rome" · L3 block_output @last`.
    pub fn label(&self) -> String {
        let at = format!("L{} {} @{}", self.layer, self.site, self.pos.label());
        match &self.kind {
            Kind::Adapter => format!("adapter {}", self.adapter),
            k if k.uses_source() => format!("{} ← {:?} · {at}", k.name(), self.source),
            k => format!("{} · {at}", k.name()),
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
                kind: w.kind.clone(),
                site: w.site,
                layer: w.layer.to_string(),
                pos: w.pos.label(),
                source: w.source.clone(),
                adapter: w.adapter.clone(),
                focus: 0,
                error: None,
            },
            None => Form {
                kind: Kind::Site(InterventionSpec::Zero { dims: None }),
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
            "source" => self.kind.uses_source(),
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
        fn next<T: Clone + PartialEq>(all: &[T], cur: &T, step: isize) -> T {
            let i = all.iter().position(|x| x == cur).unwrap_or(0) as isize;
            all[(i + step).rem_euclid(all.len() as isize) as usize].clone()
        }
        match self.focus {
            0 => self.kind = next(&Kind::all(), &self.kind, step),
            2 => self.site = next(&Site::ALL, &self.site, step),
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
        if self.kind.uses_source() && self.source.trim().is_empty() {
            return Err(format!("{} needs a source prompt", self.kind.name()));
        }
        if self.kind == Kind::Adapter && self.adapter.trim().is_empty() {
            return Err("adapter needs a directory (adapter_config.json + adapter_model.safetensors)".into());
        }
        Ok(WhatIf { kind: self.kind.clone(), layer, site: self.site, pos, source: self.source.clone(), adapter: self.adapter.trim().to_string() })
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
        let w = f.validate(Some(30)).unwrap();
        assert_eq!((w.kind.name(), w.layer, w.pos), ("zero", 0, Pos::Last));
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
        f.key(k(KeyCode::Left), Some(30));
        assert_eq!(f.kind.name(), "vanilla");
        assert_eq!(f.error.as_deref(), Some("vanilla needs a source prompt"));
        // Every untrained experiment kind is offered, and nothing trainable.
        let names: Vec<_> = Kind::all().iter().map(|k| k.name()).collect();
        assert_eq!(names, ["vanilla", "zero", "mean", "magnitude", "angle", "adapter"]);
        assert_eq!(Pos::parse("7"), Ok(Pos::At(7)));
        assert!(Pos::parse("x").is_err());
    }
}
