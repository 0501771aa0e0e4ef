//! The Experiments view's state and keys: the experiment files (sweeps and pilot studies), the
//! edit form that turns field edits into `--set` overrides validated against the real spec
//! parser, and queueing the selection as a run.
use super::runs::Job;
use super::{csv_export, down, up, App, Command, View};
use crate::experiment::Spec;
use crate::pilot::PilotSpec;
use crate::tui::data;
use ratatui::crossterm::event::{KeyCode, KeyEvent};
use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct ExperimentEntry {
    pub path: PathBuf,
    pub text: Result<String, String>,
    /// `--set`-style overrides from the edit form.
    pub overrides: Vec<String>,
    pub spec: Result<Spec, String>,
    /// A pilot study (`kind = "pilot"`): runs as a whole, no edit form.
    pub pilot: Option<Result<PilotSpec, String>>,
}

impl ExperimentEntry {
    pub fn new(path: PathBuf, text: Result<String, String>) -> Self {
        let mut e = Self { path, text, overrides: vec![], spec: Err(String::new()), pilot: None };
        if let Ok(t) = &e.text {
            if crate::pilot::is_pilot(t) {
                let origin = e.file_name();
                e.pilot = Some(PilotSpec::parse(t, &[]).map_err(|x| format!("{origin}: {x:#}")));
                e.spec = Err("a pilot study: r runs it; the edit form is for intervention sweeps".into());
                return e;
            }
        }
        e.spec = e.resolve(&[]);
        e
    }

    pub fn file_name(&self) -> String {
        self.path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
    }

    /// Parse the file with overrides (the ones given, then none if `extra` is empty → self's).
    pub fn resolve(&self, overrides: &[String]) -> Result<Spec, String> {
        let text = self.text.as_ref().map_err(|e| e.clone())?;
        let origin = self.file_name();
        if overrides.is_empty() {
            return Spec::from_toml(text, &origin).map_err(|e| format!("{e:#}"));
        }
        Spec::from_toml_with(text, &format!("{origin} (edited)"), overrides).map_err(|e| format!("{e:#}"))
    }
}

#[derive(Debug, Clone)]
pub struct FormField {
    pub label: &'static str,
    pub value: String,
    pub error: Option<String>,
}

/// The edit form: layers, positions, intervention kind, rank, steps, lr, seed.
#[derive(Debug, Clone)]
pub struct Form {
    pub entry: usize,
    pub fields: Vec<FormField>,
    pub focus: usize,
    /// Validation of all fields together (None = valid).
    pub error: Option<String>,
}

pub const FORM_LABELS: [&str; 7] = ["layers", "positions", "intervention", "rank", "steps", "lr", "seed"];

impl Form {
    fn from_spec(entry: usize, s: &Spec) -> Form {
        use crate::experiment::spec::Layers;
        let layers = match &s.sites.layers {
            Layers::Text(t) => t.clone(),
            Layers::List(v) => v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(","),
        };
        let values = [
            layers,
            s.sites.positions.join(", "),
            s.intervention.kind_name().to_string(),
            s.intervention.rank().map(|r| r.to_string()).unwrap_or_default(),
            s.train.steps.to_string(),
            s.train.lr.to_string(),
            s.seed.to_string(),
        ];
        let fields = FORM_LABELS.iter().zip(values).map(|(l, v)| FormField { label: l, value: v, error: None }).collect();
        Form { entry, fields, focus: 0, error: None }
    }

    /// One field as a `--set` override (None = leave the file's value, for an empty rank).
    fn override_of(i: usize, value: &str) -> Result<Option<String>, String> {
        let v = value.trim();
        let num = |what: &str| -> Result<(), String> {
            match what {
                "int" => v.parse::<u64>().map(|_| ()).map_err(|_| format!("{v:?} is not a whole number")),
                _ => v.parse::<f64>().map(|_| ()).map_err(|_| format!("{v:?} is not a number")),
            }
        };
        Ok(Some(match i {
            0 => {
                if v.is_empty() {
                    return Err("layers: empty (use all, 8..16, 8..=16, 3 or 1,2,3)".into());
                }
                if v == "all" || v.contains("..") || v.parse::<usize>().is_ok() {
                    format!("sites.layers={}", toml::Value::String(v.to_string()))
                } else {
                    let nums: Result<Vec<usize>, _> = v.split(',').map(|x| x.trim().parse::<usize>()).collect();
                    let nums = nums.map_err(|_| format!("layers: {v:?} is not all, a range or a list of numbers"))?;
                    format!("sites.layers={}", toml::Value::Array(nums.iter().map(|&n| toml::Value::Integer(n as i64)).collect()))
                }
            }
            1 => {
                let items: Vec<toml::Value> =
                    v.split(',').map(|x| x.trim()).filter(|x| !x.is_empty()).map(|x| toml::Value::String(x.to_string())).collect();
                format!("sites.positions={}", toml::Value::Array(items))
            }
            2 => format!("intervention.kind={}", toml::Value::String(v.to_string())),
            3 => {
                if v.is_empty() {
                    return Ok(None);
                }
                num("int")?;
                format!("intervention.rank={v}")
            }
            4 => {
                num("int")?;
                format!("train.steps={v}")
            }
            5 => {
                num("float")?;
                let f: f64 = v.parse().unwrap_or(0.0);
                if !(f > 0.0) {
                    return Err("lr must be positive".into());
                }
                format!("train.lr={}", toml::Value::Float(f))
            }
            _ => {
                num("int")?;
                format!("seed={v}")
            }
        }))
    }

    /// Re-validate: each field on its own (inline errors), then all together.
    fn validate(&mut self, entry: &ExperimentEntry) -> Option<Vec<String>> {
        let mut all = Vec::new();
        let mut ok = true;
        // A kind without a rank ignores the rank field (switching das → vanilla keeps it typed).
        let takes_rank = crate::intervene::InterventionSpec::from_kind(self.fields[2].value.trim()).map_or(true, |s| s.rank().is_some());
        for (i, f) in self.fields.iter_mut().enumerate() {
            f.error = match Form::override_of(i, &f.value) {
                Ok(Some(_)) if i == 3 && !takes_rank => None,
                Err(e) => Some(e),
                Ok(None) => None,
                Ok(Some(o)) => {
                    let r = entry.resolve(std::slice::from_ref(&o)).err();
                    all.push(o);
                    r.map(|e| e.lines().last().unwrap_or("").to_string())
                }
            };
            ok &= f.error.is_none();
        }
        if !ok {
            self.error = Some("fix the fields marked ✗".into());
            return None;
        }
        match entry.resolve(&all) {
            Ok(_) => {
                self.error = None;
                Some(all)
            }
            Err(e) => {
                self.error = Some(e);
                None
            }
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct ExperimentsState {
    pub entries: Vec<ExperimentEntry>,
    pub selected: usize,
    pub show_spec: bool,
    pub form: Option<Form>,
    pub spec_scroll: u16,
}

impl ExperimentsState {
    pub fn current(&self) -> Option<&ExperimentEntry> {
        self.entries.get(self.selected)
    }
}

/// True for TOML that is a valid fine-tuning or composability spec (listed by other commands).
fn is_other_spec(text: &str) -> bool {
    crate::train::spec::parse(text, &[]).is_ok() || crate::compose::parse_spec(text).is_ok()
}

/// New experiment files: keep the selection, drop the specs other commands run.
pub(super) fn on_files(app: &mut App, files: Vec<(PathBuf, Result<String, String>)>) -> Vec<Command> {
    let sel = app.exp.current().map(|e| e.path.clone());
    // Fine-tuning and composability specs share the folder but run through
    // `road finetune` / `road compose`, not the interchange-intervention runner.
    app.exp.entries = files
        .into_iter()
        .filter(|(_, t)| !t.as_ref().map(|t| is_other_spec(t)).unwrap_or(false))
        .map(|(p, t)| ExperimentEntry::new(p, t))
        .collect();
    app.exp.selected = sel.and_then(|p| app.exp.entries.iter().position(|e| e.path == p)).unwrap_or(0);
    if app.exp.entries.is_empty() {
        app.status = format!("no experiment files in {}", app.cfg.experiments_dir.display());
    }
    vec![]
}

pub(super) fn key(app: &mut App, k: KeyEvent) -> Vec<Command> {
    let n = app.exp.entries.len();
    match k.code {
        KeyCode::Up | KeyCode::Char('k') => {
            up(&mut app.exp.selected);
            app.exp.spec_scroll = 0;
        }
        KeyCode::Down | KeyCode::Char('j') => {
            down(&mut app.exp.selected, n);
            app.exp.spec_scroll = 0;
        }
        KeyCode::PageDown => app.exp.spec_scroll = app.exp.spec_scroll.saturating_add(10),
        KeyCode::PageUp => app.exp.spec_scroll = app.exp.spec_scroll.saturating_sub(10),
        KeyCode::Enter => app.exp.show_spec = !app.exp.show_spec,
        KeyCode::Esc => app.exp.show_spec = false,
        KeyCode::Char('R') => return vec![Command::LoadExperiments],
        KeyCode::Char('e') => match app.exp.current().map(|e| e.spec.clone()) {
            Some(Ok(spec)) => {
                // The spec already carries earlier edits, so the form starts from them.
                app.exp.form = Some(Form::from_spec(app.exp.selected, &spec));
            }
            Some(Err(e)) => app.status = format!("cannot edit: the file does not parse ({})", e.lines().next().unwrap_or("")),
            None => {}
        },
        KeyCode::Char('r') => return queue_selected(app),
        _ => {}
    }
    vec![]
}

fn queue_selected(app: &mut App) -> Vec<Command> {
    let Some(e) = app.exp.current() else { return vec![] };
    // A pilot study or a sweep, whichever the file is; a parse error is reported, not queued.
    let parsed: Result<(String, Box<dyn FnOnce(u64) -> Command>), String> = match &e.pilot {
        Some(p) => p.clone().map(|s| (s.name.clone(), Box::new(move |job| Command::QueuePilot { job, spec: Box::new(s) }) as Box<dyn FnOnce(u64) -> Command>)),
        None => e.spec.clone().map(|s| (s.name.clone(), Box::new(move |job| Command::QueueRun { job, spec: Box::new(s) }) as Box<dyn FnOnce(u64) -> Command>)),
    };
    let (name, command) = match parsed {
        Ok(x) => x,
        Err(err) => {
            app.status = format!("cannot run {}: {}", e.file_name(), err.lines().next().unwrap_or(""));
            return vec![];
        }
    };
    let id = app.runs.next_id;
    app.runs.next_id += 1;
    app.runs.jobs.push(Job::new(id, name.clone()));
    app.runs.selected = app.runs.jobs.len() - 1;
    app.status = format!("queued {name} (job {id})");
    app.view = View::Runs;
    vec![command(id)]
}

pub(super) fn form_key(app: &mut App, k: KeyEvent) -> Vec<Command> {
    let entry_idx = app.exp.form.as_ref().map(|f| f.entry).unwrap_or(0);
    let Some(entry) = app.exp.entries.get(entry_idx).cloned() else {
        app.exp.form = None;
        return vec![];
    };
    let form = app.exp.form.as_mut().expect("editing");
    match k.code {
        KeyCode::Esc => {
            app.exp.form = None;
            app.status = "edit discarded".into();
            return vec![];
        }
        KeyCode::Up | KeyCode::BackTab => up(&mut form.focus),
        KeyCode::Down | KeyCode::Tab => down(&mut form.focus, form.fields.len()),
        KeyCode::Backspace => {
            form.fields[form.focus].value.pop();
        }
        KeyCode::Char(c) => form.fields[form.focus].value.push(c),
        KeyCode::Enter => {
            if let Some(overrides) = form.validate(&entry) {
                let e = &mut app.exp.entries[entry_idx];
                e.spec = e.resolve(&overrides);
                e.overrides = overrides;
                app.exp.form = None;
                app.exp.show_spec = true;
                app.status = "edits applied (r runs the edited spec; the file is unchanged)".into();
            }
            return vec![];
        }
        _ => return vec![],
    }
    form.validate(&entry);
    vec![]
}

/// `x` on Experiments: one row per file (name, intervention, model, task, overrides, or the parse error), into the output root.
pub(super) fn export(app: &mut App) -> Vec<Command> {
    let mut rows = vec![["file", "name", "intervention", "model", "task", "overrides", "error"].map(String::from).to_vec()];
    for e in &app.exp.entries {
        let (n, k, m, t, err) = match &e.spec {
            Ok(s) => (s.name.clone(), s.intervention.kind_name().to_string(), s.model.name.clone(), s.task.name.clone(), String::new()),
            Err(x) => (String::new(), String::new(), String::new(), String::new(), x.lines().next().unwrap_or("").to_string()),
        };
        rows.push(vec![e.file_name(), n, k, m, t, e.overrides.join(" "), err]);
    }
    csv_export(&app.cfg.out_root, "experiments", data::csv_string(&rows))
}
