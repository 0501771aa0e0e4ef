//! Background threads, so the UI never waits on a model: a run worker (a queue of experiment
//! runs, each with its own cancel flag) and a model worker (lazy model loading, top-k, tokenising).
use super::event::{AltRow, AltTop, Event, JobEvent, ModelInfo, ModelMsg, TopRow};
use super::whatif::{self, WhatIf};
use crate::experiment::{self, RunEvent, RunOptions, Sink, Spec};
use crate::model::{registry, Fwd, Loaded, LogitsAt};
pub use crate::util::panics::{guarded, Panicked};
use anyhow::{bail, Result};
use candle_core::DType;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;

/// What a queued job runs: an intervention sweep or a pilot study.
pub enum JobSpec {
    Sweep(Spec),
    Pilot(crate::pilot::PilotSpec),
}

impl JobSpec {
    fn model(&self) -> &str {
        match self {
            JobSpec::Sweep(s) => &s.model.name,
            JobSpec::Pilot(p) => &p.model,
        }
    }
}

struct RunJob {
    id: u64,
    spec: JobSpec,
    cancel: Arc<AtomicBool>,
}

pub enum ModelJob {
    Load { name: String },
    TopK { name: String, prompt: String, k: usize, whatif: Option<WhatIf> },
    Tokenize { name: String, text: String },
}

/// Tags runner events with their job id on the way into the UI channel.
struct JobSink {
    id: u64,
    tx: Sender<Event>,
}

impl Sink for JobSink {
    fn send(&mut self, e: RunEvent) {
        let _ = self.tx.send(Event::Job { id: self.id, ev: JobEvent::Run(e) });
    }
}

pub struct Worker {
    runs: Sender<RunJob>,
    models: Sender<ModelJob>,
    cancels: HashMap<u64, Arc<AtomicBool>>,
}

/// Registered models are fetched with pip on first use, which writes to the terminal; inside
/// the workbench only already-cached models are loaded.
fn ensure_local(name: &str) -> Result<()> {
    if let Some(s) = crate::fetch::lookup(name) {
        if !s.is_cached() {
            bail!("model {name} is not cached yet; fetch it first with `road fetch-model {name}`");
        }
    }
    Ok(())
}

impl Worker {
    pub fn spawn(tx: Sender<Event>) -> Worker {
        let (rtx, rrx) = channel::<RunJob>();
        let ui = tx.clone();
        std::thread::Builder::new()
            .name("road-run-worker".into())
            .spawn(move || {
                for job in rrx {
                    if job.cancel.load(Ordering::Relaxed) {
                        let _ = ui.send(Event::Job { id: job.id, ev: JobEvent::Skipped });
                        continue;
                    }
                    let opts = RunOptions { jobs: 1, cancel: job.cancel.clone(), ..Default::default() };
                    let mut sink = JobSink { id: job.id, tx: ui.clone() };
                    let result = guarded("the run", || {
                        ensure_local(job.spec.model()).and_then(|_| match &job.spec {
                            JobSpec::Sweep(s) => experiment::run(s, &opts, &mut sink).map(|_| ()),
                            JobSpec::Pilot(p) => {
                                let po = crate::pilot::PilotOptions { fresh: false, cancel: Some(job.cancel.clone()) };
                                match crate::pilot::run_pilot(p, po, &mut sink) {
                                    Err(e) if e.downcast_ref::<crate::pilot::run::Cancelled>().is_some() => Ok(()),
                                    r => r.map(|_| ()),
                                }
                            }
                        })
                    });
                    if let Err(e) = result {
                        let _ = ui.send(Event::Job { id: job.id, ev: JobEvent::Failed(format!("{e:#}")) });
                    }
                    let _ = ui.send(Event::Job { id: job.id, ev: JobEvent::Ended });
                }
            })
            .expect("spawning the run worker");

        let (mtx, mrx) = channel::<ModelJob>();
        std::thread::Builder::new()
            .name("road-model-worker".into())
            .spawn(move || {
                let mut cache: Option<(String, Loaded)> = None;
                for job in mrx {
                    let msg = match guarded("the model worker", || model_job(&mut cache, job)) {
                        Ok(m) => m,
                        Err(e) => {
                            if e.downcast_ref::<Panicked>().is_some() {
                                cache = None; // a panic may have left the model half-built
                            }
                            ModelMsg::Error(format!("{e:#}"))
                        }
                    };
                    if tx.send(Event::Model(msg)).is_err() {
                        break;
                    }
                }
            })
            .expect("spawning the model worker");
        Worker { runs: rtx, models: mtx, cancels: HashMap::new() }
    }

    pub fn queue(&mut self, id: u64, spec: JobSpec) {
        let cancel = Arc::new(AtomicBool::new(false));
        self.cancels.insert(id, cancel.clone());
        let _ = self.runs.send(RunJob { id, spec, cancel });
    }

    /// Cancel a queued (skipped when reached) or running (stops after the current step) job.
    pub fn cancel(&self, id: u64) {
        if let Some(c) = self.cancels.get(&id) {
            c.store(true, Ordering::Relaxed);
        }
    }

    pub fn cancel_all(&self) {
        for c in self.cancels.values() {
            c.store(true, Ordering::Relaxed);
        }
    }

    pub fn model(&self, job: ModelJob) {
        let _ = self.models.send(job);
    }
}

fn get<'a>(cache: &'a mut Option<(String, Loaded)>, name: &str) -> Result<&'a Loaded> {
    if cache.as_ref().map(|(n, _)| n != name).unwrap_or(true) {
        ensure_local(name)?;
        crate::util::check_model_path("model", name)?; // a FIFO must not block the worker
        *cache = None; // free the previous model first
        let l = registry::load(name, crate::runtime::dtype_for("f32")?, &crate::runtime::device_for("auto")?, false)?;
        *cache = Some((name.to_string(), l));
    }
    Ok(&cache.as_ref().expect("just loaded").1)
}

fn model_job(cache: &mut Option<(String, Loaded)>, job: ModelJob) -> Result<ModelMsg> {
    match job {
        ModelJob::Load { name } => {
            let l = get(cache, &name)?;
            let c = &l.model.cfg;
            Ok(ModelMsg::Loaded(ModelInfo {
                name,
                source: l.source.display().to_string(),
                format: l.format.to_string(),
                layers: c.num_layers,
                hidden: c.hidden_size,
                ffn: c.intermediate_size,
                heads: c.num_heads,
                kv_heads: c.num_kv_heads,
                head_dim: c.head_dim,
                vocab: c.vocab_size,
                params: c.param_count(),
                context: c.max_position_embeddings,
                tied: c.tie_word_embeddings,
            }))
        }
        ModelJob::TopK { name, prompt, k, whatif } => {
            let l = get(cache, &name)?;
            let ids = l.tok.encode(&prompt)?;
            if ids.len() > l.model.cfg.max_position_embeddings {
                bail!("the prompt has {} tokens; the model's context is {}", ids.len(), l.model.cfg.max_position_embeddings);
            }
            let out = l.model.forward(&[ids.clone()], Fwd { logits: LogitsAt::Last, ..Default::default() })?;
            let v = out.logits.expect("requested logits").get(0)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            let clean = log_softmax(&v);
            let rows = top_rows(l, &v, &clean, k);
            // A failed what-if still shows the clean top-k, with the error beside it.
            let alt = whatif.map(|w| {
                whatif::exec::logits(l, &ids, &w).map_err(|e| format!("{e:#}")).map(|a| {
                    let alt = log_softmax(&a);
                    let kl = clean.iter().zip(&alt).map(|(p, q)| p.exp() * (p - q)).sum::<f64>().max(0.0);
                    let rows = top_rows(l, &a, &alt, k)
                        .into_iter()
                        .map(|row| {
                            let c = clean[row.id as usize];
                            // Ties count for the token (rank = 1 + strictly more probable tokens).
                            let clean_rank = 1 + clean.iter().filter(|&&x| x > c).count();
                            AltRow { row, clean_prob: c.exp(), clean_rank }
                        })
                        .collect();
                    AltTop { label: w.label(), rows, kl }
                })
            });
            Ok(ModelMsg::TopK { model: name, prompt, ids, rows, alt })
        }
        ModelJob::Tokenize { name, text } => {
            let l = get(cache, &name)?;
            let tokens = l.tok.encode(&text)?.iter().map(|&i| l.tok.token_str(i)).collect();
            Ok(ModelMsg::Tokens { text, tokens })
        }
    }
}

/// Log-probabilities (f64, numerically stable).
fn log_softmax(v: &[f32]) -> Vec<f64> {
    let m = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lz = v.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
    v.iter().map(|&x| x as f64 - lz).collect()
}

fn top_rows(l: &Loaded, v: &[f32], logp: &[f64], k: usize) -> Vec<TopRow> {
    crate::generate::top_k(v, k).into_iter().map(|(id, logit)| TopRow { id, token: l.tok.token_str(id), logit, prob: logp[id as usize].exp() }).collect()
}
