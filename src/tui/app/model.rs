//! The Model view's state and keys: the experiment's model (loaded by the worker), a prompt and
//! its top-10 next tokens, and a what-if intervention compared side by side with the clean run.
use super::{csv_export, App, Command};
use crate::tui::data;
use crate::tui::event::{AltTop, ModelInfo, ModelMsg, TopRow};
use crate::tui::whatif::{self, FormAction, WhatIf};
use ratatui::crossterm::event::{KeyCode, KeyEvent};

#[derive(Debug, Clone, Default)]
pub struct ModelState {
    /// The model asked for (from the selected experiment).
    pub name: Option<String>,
    pub loading: bool,
    pub info: Option<ModelInfo>,
    pub prompt: String,
    pub editing: bool,
    pub busy: bool,
    pub top: Vec<TopRow>,
    pub top_prompt: String,
    pub top_ids: Vec<u32>,
    pub error: Option<String>,
    /// The what-if applied to every top-k request (None: clean only).
    pub whatif: Option<WhatIf>,
    /// The what-if form while it is open (`w`).
    pub form: Option<whatif::Form>,
    /// The what-if side of the last top-k (or why it failed).
    pub alt: Option<Result<AltTop, String>>,
}

pub(super) fn on_model(app: &mut App, m: ModelMsg) -> Vec<Command> {
    let s = &mut app.model;
    match m {
        ModelMsg::Loaded(info) => {
            s.loading = false;
            s.error = None;
            s.info = Some(info);
        }
        ModelMsg::TopK { model, prompt, ids, rows, alt } => {
            s.busy = false;
            s.error = None;
            if s.name.as_deref() == Some(model.as_str()) {
                s.top = rows;
                s.top_prompt = prompt;
                s.top_ids = ids;
                s.alt = alt;
            }
        }
        ModelMsg::Tokens { text, tokens } => {
            let matches = app.results.open.as_ref().and_then(|d| d.first_base_prompt()).map(|t| t == text).unwrap_or(false);
            if matches {
                app.results.tokens = Some(tokens);
            }
        }
        ModelMsg::Error(e) => {
            s.loading = false;
            s.busy = false;
            s.error = Some(e);
        }
    }
    vec![]
}

/// Ask the worker for the selected experiment's model unless it is loaded or loading.
pub(super) fn ensure_model(app: &mut App) -> Vec<Command> {
    let Some(name) = app.exp.current().and_then(|e| e.spec.as_ref().ok()).map(|s| s.model.name.clone()) else {
        if app.model.name.is_none() {
            app.model.error = Some("select a valid experiment first (its model is shown here)".into());
        }
        return vec![];
    };
    if app.model.name.as_deref() == Some(name.as_str()) && (app.model.loading || app.model.info.is_some()) {
        return vec![];
    }
    let (prompt, whatif) = (std::mem::take(&mut app.model.prompt), app.model.whatif.take());
    app.model = ModelState { name: Some(name.clone()), loading: true, prompt, whatif, ..Default::default() };
    vec![Command::LoadModel { name }]
}

pub(super) fn prompt_key(app: &mut App, k: KeyEvent) -> Vec<Command> {
    let s = &mut app.model;
    match k.code {
        KeyCode::Esc => s.editing = false,
        KeyCode::Backspace => {
            s.prompt.pop();
        }
        KeyCode::Char(c) => s.prompt.push(c),
        KeyCode::Enter => {
            s.editing = false;
            return top_k(s);
        }
        _ => {}
    }
    vec![]
}

/// Ask the worker for the prompt's top-10, with the what-if when one is set.
fn top_k(s: &mut ModelState) -> Vec<Command> {
    match s.name.clone() {
        Some(name) if !s.prompt.is_empty() => {
            s.busy = true;
            vec![Command::TopK { name, prompt: s.prompt.clone(), k: 10, whatif: s.whatif.clone() }]
        }
        _ => vec![],
    }
}

pub(super) fn whatif_key(app: &mut App, k: KeyEvent) -> Vec<Command> {
    let s = &mut app.model;
    let layers = s.info.as_ref().map(|i| i.layers);
    let Some(form) = s.form.as_mut() else { return vec![] };
    match form.key(k, layers) {
        FormAction::Stay => vec![],
        FormAction::Cancel => {
            s.form = None;
            app.status = "what-if unchanged".into();
            vec![]
        }
        FormAction::Apply(w) => {
            s.form = None;
            app.status = format!("what-if: {}", w.label());
            s.whatif = Some(w);
            top_k(s)
        }
    }
}

pub(super) fn key(app: &mut App, k: KeyEvent) -> Vec<Command> {
    match k.code {
        KeyCode::Char('i') | KeyCode::Char('/') | KeyCode::Enter => app.model.editing = true,
        KeyCode::Char('w') => app.model.form = Some(whatif::Form::new(app.model.whatif.as_ref())),
        KeyCode::Char('c') if app.model.whatif.is_some() => {
            app.model.whatif = None;
            app.model.alt = None;
            app.status = "what-if cleared".into();
        }
        KeyCode::Char('l') => {
            app.model.info = None;
            app.model.name = None;
            return ensure_model(app);
        }
        _ => {}
    }
    vec![]
}

/// `x` on Model: the last top-k, into the output root.
pub(super) fn export(app: &mut App) -> Vec<Command> {
    if app.model.top.is_empty() {
        app.status = "nothing to export: run a prompt first".into();
        return vec![];
    }
    let mut rows = vec![["rank", "id", "token", "logit", "prob"].map(String::from).to_vec()];
    for (i, t) in app.model.top.iter().enumerate() {
        rows.push(vec![(i + 1).to_string(), t.id.to_string(), t.token.clone(), t.logit.to_string(), t.prob.to_string()]);
    }
    csv_export(&app.cfg.out_root, "model", data::csv_string(&rows))
}
