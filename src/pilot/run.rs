//! The pilot study, end to end: fine-tune (or load cached fine-tunes), measure ΔM/ΔD per layer,
//! train the disentanglement heads on pretrained and random backbones, run the swap probe, and
//! write the tables, figures and summary into a fresh run folder.
use super::finetunes::{self, FtRecord, Tuned};
use super::spec::{resolve_layer, PilotSpec};
use super::tables::*;
use super::{figures, summary};
use crate::runs::events::{RunEvent, Sink};
use crate::runs::{new_run_dir, short_hash, write_csv};
use crate::model::{registry, LinearAdapter, Llama};
use crate::probe::{self, HeadKind};
use crate::tokenizer::Tok;
use crate::train::cls::{self, encode_prompt, Scorer};
use crate::train::data::{balanced_take, ClsExample};
use crate::util::rng::Rng;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use std::time::Instant;

#[derive(Debug, Clone, Default)]
pub struct PilotOptions {
    /// Retrain every fine-tune even when the cache has it.
    pub fresh: bool,
    /// Checked between stages: a cancelled study stops there, keeps what it wrote and leaves
    /// an `INCOMPLETE` marker (finished fine-tunes stay cached).
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl PilotOptions {
    fn check(&self) -> Result<()> {
        if self.cancel.as_ref().is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed)) {
            bail!(Cancelled);
        }
        Ok(())
    }
}

/// The error a cancelled study stops with.
#[derive(Debug)]
pub struct Cancelled;
impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cancelled")
    }
}
impl std::error::Error for Cancelled {}

fn bar(len: usize, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(len as u64);
    pb.set_style(indicatif::ProgressStyle::with_template(&format!("{what:<14} {{bar:30}} {{pos}}/{{len}}  ETA {{eta}}")).expect("static template"));
    pb
}

fn log(sink: &mut dyn Sink, msg: String) {
    eprintln!("{msg}");
    sink.send(RunEvent::Log(msg));
}

fn prompts(tok: &Tok, template: &str, ex: &[ClsExample], max_len: usize) -> Result<Vec<Vec<u32>>> {
    ex.iter().map(|e| encode_prompt(tok, template, &e.text, max_len)).collect()
}

/// `[n, d]` rows as f32 vectors.
fn rows(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.to_vec2::<f32>()?)
}

/// A model of the same architecture with freshly initialised weights (the paper's random backbone).
/// Built from plain tensors, not `Var`s, so nothing downstream records gradients through it.
fn random_backbone(base: &Llama, seed: u64) -> Result<Llama> {
    let vm = crate::model::init::init_varmap(&base.cfg, &mut Rng::new(seed), base.device())?;
    let weights: std::collections::HashMap<String, Tensor> =
        vm.data().lock().map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?.iter().map(|(k, v)| (k.clone(), v.as_detached_tensor())).collect();
    Llama::load(candle_nn::VarBuilder::from_tensors(weights, DType::F32, base.device()), base.cfg.clone())
}

pub fn run_pilot(spec: &PilotSpec, opts: PilotOptions, sink: &mut dyn Sink) -> Result<PilotResult> {
    let t0 = Instant::now();
    let resolved = spec.to_toml()?;
    let run_dir = new_run_dir(&spec.name, &short_hash(&resolved))?;
    std::fs::write(run_dir.join("config.toml"), &resolved)?;
    sink.send(RunEvent::Started { run_dir: run_dir.clone(), cells: spec.methods.len() + 3, steps_per_cell: 1 });
    log(sink, format!("pilot study {}: outputs in {}", spec.name, run_dir.display()));
    let r = study(spec, &opts, sink, &run_dir, t0);
    if let Err(e) = &r {
        if e.downcast_ref::<Cancelled>().is_some() {
            std::fs::write(run_dir.join("INCOMPLETE"), "cancelled\n")?;
        } else {
            std::fs::write(run_dir.join("error.txt"), format!("{e:#}\n"))?;
        }
    }
    sink.send(RunEvent::Finished { run_dir: run_dir.clone(), complete: r.is_ok() });
    r
}

fn study(spec: &PilotSpec, opts: &PilotOptions, sink: &mut dyn Sink, run_dir: &std::path::Path, t0: Instant) -> Result<PilotResult> {
    // f32 whatever --dtype says: the study trains, and its deltas are small differences.
    let loaded = registry::load(&spec.model, DType::F32, &crate::runtime::device_for("auto")?, true)?;
    let (base, tok) = (&loaded.model, &loaded.tok);
    let n_layers = base.cfg.num_layers;
    let scatter_layer = resolve_layer(spec.probe.scatter_layer, n_layers, "probe.scatter_layer")?;
    let head_layers = spec.disentangle.layers.iter().map(|&l| resolve_layer(l, n_layers, "disentangle.layers")).collect::<Result<Vec<_>>>()?;
    // Data and the resolved task come from the first method's finetune spec (all share them).
    let ft0 = spec.finetune_spec(&spec.methods[0])?;
    let splits = ft0.cls_data(true)?;
    let (template, max_len) = (ft0.task.template.clone(), ft0.train.max_len);
    let label_ids = cls::label_token_ids(tok, &ft0.task.label_words)?;
    let scorer = Scorer::LabelWords(label_ids);
    let n_classes = ft0.task.label_words.len();
    if n_classes != 2 {
        bail!("the pilot study compares two classes (sentiment flips); this task has {n_classes} label words");
    }
    let mut probe_ex = splits.dev.clone();
    if spec.probe.examples > 0 {
        probe_ex.truncate(spec.probe.examples);
    }
    if probe_ex.is_empty() {
        bail!("no dev examples to probe (data.dev_examples / probe.examples)");
    }
    let probe_prompts = prompts(tok, &template, &probe_ex, max_len)?;
    let mut rng = Rng::new(spec.seed).fork(0x9110);

    // 1. Fine-tunes (cached).
    let mut tuned: Vec<(String, Tuned)> = Vec::new();
    let fingerprint = finetunes::weights_fingerprint(base)?;
    for (i, m) in spec.methods.iter().enumerate() {
        sink.send(RunEvent::CellStarted { cell: i, label: format!("fine-tune {}", m.label) });
        opts.check()?;
        let t = finetunes::obtain(spec, m, base, &fingerprint, tok, opts.fresh).with_context(|| format!("fine-tuning {:?}", m.label))?;
        sink.send(RunEvent::StageDone { cell: i, label: format!("fine-tune {}", m.label) });
        log(sink, format!("[{}] test accuracy {:.3} (majority {:.3}), {:.3}% trainable{}", m.label, t.record.test_accuracy, t.record.test_majority, t.record.trainable_pct, if t.record.cached { ", cached" } else { "" }));
        tuned.push((m.label.clone(), t));
    }
    let records: Vec<FtRecord> = tuned.iter().map(|(_, t)| t.record.clone()).collect();
    write_csv(&run_dir.join("finetunes.csv"), &records, &FINETUNE_HEADER)?;
    let road: Vec<FtRecord> = records.iter().filter(|r| r.kind == "road").cloned().collect();
    write_csv(&run_dir.join("road_ablation.csv"), &road, &FINETUNE_HEADER)?;

    // 2. ΔM / ΔD at the last prompt token of every dev example, every block.
    opts.check()?;
    sink.send(RunEvent::CellStarted { cell: spec.methods.len(), label: "ΔM / ΔD".into() });
    let ts = Instant::now();
    let pb = bar(probe_prompts.len() * (tuned.len() + 1), "ΔM/ΔD states");
    // The pretrained states also serve as the pretrained backbone's head evaluation features.
    let pretrained_states = probe::last_token_states(base, None, &probe_prompts, spec.probe.batch, Some(&pb))?;
    let states0: Vec<Vec<Vec<f32>>> = pretrained_states.iter().map(rows).collect::<Result<_>>()?;
    let mut deltas: Vec<DeltaRow> = Vec::new();
    for (label, t) in &tuned {
        let hooks = t.hooks();
        let tuning = hooks.as_ref().map(|f| f as probe::PromptHooks);
        let st = probe::last_token_states_with(t.model(base), t.adapter(), tuning, &probe_prompts, spec.probe.batch, Some(&pb))?;
        for (layer, s) in st.iter().enumerate() {
            for (example, x) in rows(s)?.iter().enumerate() {
                let (dm, dd) = probe::delta(x, &states0[layer][example]);
                deltas.push(DeltaRow { method: label.clone(), layer, example, label: probe_ex[example].label, delta_m: dm, delta_d: dd, angular_share: angular_share(dm, dd), seed: spec.seed });
            }
        }
    }
    pb.finish_and_clear();
    let layers: Vec<LayerRow> = tuned.iter().flat_map(|(l, _)| by_layer(&deltas, l, n_layers, spec.seed)).collect();
    write_csv(&run_dir.join("delta_per_example.csv"), &deltas, &DELTA_HEADER)?;
    write_csv(&run_dir.join("delta_by_layer.csv"), &layers, &LAYER_HEADER)?;
    // DoRA's own split of each weight row into magnitude and direction.
    let mut dora = Vec::new();
    for (label, t) in &tuned {
        if let Some(crate::adapters::AnyAdapter::Dora(a)) = t.saved_adapter() {
            dora.extend(super::dora_weights::rows(label, a, base)?);
        }
    }
    if !dora.is_empty() {
        write_csv(&run_dir.join("dora_weights.csv"), &dora, &super::dora_weights::DORA_WEIGHT_HEADER)?;
    }
    sink.send(RunEvent::StageDone { cell: spec.methods.len(), label: "ΔM / ΔD".into() });
    log(sink, format!("ΔM/ΔD over {} examples × {n_layers} blocks × {} methods in {:.0}s", probe_ex.len(), tuned.len(), ts.elapsed().as_secs_f64()));

    // 3. Disentanglement heads on frozen pretrained and random backbones.
    opts.check()?;
    sink.send(RunEvent::CellStarted { cell: spec.methods.len() + 1, label: "disentangle heads".into() });
    let ts = Instant::now();
    let ds = &spec.disentangle;
    let head_train = balanced_take(&splits.train, ds.train_examples, n_classes, &mut rng);
    let head_prompts = prompts(tok, &template, &head_train, max_len)?;
    let y_train: Vec<u32> = head_train.iter().map(|e| e.label as u32).collect();
    let y_eval: Vec<u32> = probe_ex.iter().map(|e| e.label as u32).collect();
    let random = random_backbone(base, ds.random_backbone_seed)?;
    let mut heads: Vec<DisentangleRow> = Vec::new();
    let pb = bar(2 * head_prompts.len() + probe_prompts.len(), "head features");
    for (name, model) in [("pretrained", base), ("random", &random)] {
        let tr = probe::last_token_states(model, None, &head_prompts, spec.probe.batch, Some(&pb))?;
        let ev = if name == "pretrained" {
            pretrained_states.clone()
        } else {
            probe::last_token_states(model, None, &probe_prompts, spec.probe.batch, Some(&pb))?
        };
        for &layer in &head_layers {
            // One scalar rescale (the mean training norm) keeps tanh out of saturation; it
            // changes neither directions nor the ordering of norms.
            let scale = tr[layer].sqr()?.sum(1)?.sqrt()?.mean_all()?.to_scalar::<f32>()?.max(1e-12) as f64;
            let (xt, xe) = ((&tr[layer] / scale)?, (&ev[layer] / scale)?);
            for kind in HeadKind::ALL {
                for &seed in &ds.seeds {
                    let f = probe::fit_head(kind, &xt, &y_train, &xe, &y_eval, n_classes, &ds.head, seed)?;
                    heads.push(DisentangleRow {
                        backbone: name.into(),
                        layer,
                        head: kind.name(),
                        seed,
                        train_accuracy: f.train_accuracy,
                        eval_accuracy: f.eval_accuracy,
                        n_train: y_train.len(),
                        n_eval: y_eval.len(),
                        final_loss: f.final_loss,
                    });
                }
            }
        }
    }
    pb.finish_and_clear();
    drop(random);
    let head_summary = summarize_heads(&heads);
    write_csv(&run_dir.join("disentangle.csv"), &heads, &DISENTANGLE_HEADER)?;
    write_csv(&run_dir.join("disentangle_summary.csv"), &head_summary, &DISENTANGLE_SUMMARY_HEADER)?;
    sink.send(RunEvent::StageDone { cell: spec.methods.len() + 1, label: "disentangle heads".into() });
    log(sink, format!("disentanglement heads ({} fits) in {:.0}s", heads.len(), ts.elapsed().as_secs_f64()));

    // 4. Swap probe: interchange magnitude / direction / everything from an opposite-label input.
    opts.check()?;
    sink.send(RunEvent::CellStarted { cell: spec.methods.len() + 2, label: "swap probe".into() });
    let ts = Instant::now();
    let pairs = swap_pairs(&probe_ex, &probe_prompts, spec.swap.pairs, &mut rng);
    let mut swap: Vec<SwapRow> = Vec::new();
    let pb = bar(pairs.len() * spec.swap.models.len(), "swap probe");
    for name in &spec.swap.models {
        let found = tuned.iter().find(|(l, _)| l == name).map(|(_, t)| t);
        let (model, adapter): (&Llama, Option<&dyn LinearAdapter>) = match found {
            Some(t) => (t.model(base), t.adapter()),
            None => (base, None),
        };
        let hooks = found.and_then(|t| t.hooks());
        let tuning = hooks.as_ref().map(|f| f as probe::PromptHooks);
        for c in probe::swap_probe_with(model, adapter, tuning, &scorer, &pairs, Some(&pb))? {
            swap.push(SwapRow {
                model: name.clone(),
                layer: c.layer,
                kind: c.kind,
                n: c.n,
                follows_source: c.follows_source,
                iia: if c.n > 0 { c.follows_source as f64 / c.n as f64 } else { f64::NAN },
                change_rate: c.changed as f64 / c.n_all.max(1) as f64,
                n_all: c.n_all,
                seed: spec.seed,
            });
        }
    }
    pb.finish_and_clear();
    write_csv(&run_dir.join("swap_probe.csv"), &swap, &SWAP_HEADER)?;
    sink.send(RunEvent::StageDone { cell: spec.methods.len() + 2, label: "swap probe".into() });
    log(sink, format!("swap probe ({} pairs × {} models) in {:.0}s", pairs.len(), spec.swap.models.len(), ts.elapsed().as_secs_f64()));

    let result = PilotResult {
        run_dir: run_dir.to_path_buf(),
        finetunes: records,
        layers,
        heads: head_summary,
        swap,
        dora,
        scatter_layer,
        n_layers,
        seconds: t0.elapsed().as_secs_f64(),
    };
    figures::write_all(run_dir, &result, &deltas)?;
    std::fs::write(run_dir.join("summary.md"), summary::render(spec, &result))?;
    log(sink, format!("pilot study finished in {:.0}s", result.seconds));
    Ok(result)
}

/// Base/source prompt pairs of opposite labels, alternating the base's label, seeded.
fn swap_pairs(ex: &[ClsExample], prompts: &[Vec<u32>], n: usize, rng: &mut Rng) -> Vec<(Vec<u32>, Vec<u32>)> {
    let by = |l: usize| ex.iter().enumerate().filter(|(_, e)| e.label == l).map(|(i, _)| i).collect::<Vec<_>>();
    let (mut a, mut b) = (by(0), by(1));
    rng.shuffle(&mut a);
    rng.shuffle(&mut b);
    let mut out = Vec::new();
    for i in 0..a.len().max(b.len()) {
        if out.len() >= n {
            break;
        }
        if i < a.len() && !b.is_empty() {
            out.push((prompts[a[i]].clone(), prompts[b[(i * 7 + 3) % b.len()]].clone()));
        }
        if out.len() < n && i < b.len() && !a.is_empty() {
            out.push((prompts[b[i]].clone(), prompts[a[(i * 5 + 1) % a.len()]].clone()));
        }
    }
    out
}
