//! Issue 17's hostile inputs, one regression test each: a one-line error naming the key, file or
//! line (never a panic, abort or silent default), or the correct output.
mod common;
use common::{fresh_dir, reference_dir, road_bin};
use road_dii::experiment::Spec;
use road_dii::tokenizer::Tok;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tiny_dir() -> PathBuf {
    root().join("data/models/tiny-equality")
}

fn tiny_tok() -> Tok {
    Tok::from_file(&tiny_dir().join("tokenizer.json"), None, &[]).unwrap()
}

/// A valid tiny-model sweep with one line replaced or added.
fn sweep(extra: &str) -> String {
    let base = "name = \"t\"\n[model]\nname = \"tiny-equality\"\n[task]\nname = \"equality\"\nsizes = [8, 4, 4]\n[sites]\nlayers = [0]\nsite = \"block_output\"\npositions = [\"b\"]\n[intervention]\nkind = \"vanilla\"\n";
    let mut doc: toml::Table = toml::from_str(base).unwrap();
    let patch: toml::Table = toml::from_str(extra).unwrap();
    for (k, v) in patch {
        match (doc.get_mut(&k), v) {
            (Some(toml::Value::Table(t)), toml::Value::Table(p)) => t.extend(p),
            (_, v) => {
                doc.insert(k, v);
            }
        }
    }
    toml::to_string(&doc).unwrap()
}

fn sweep_err(extra: &str) -> String {
    let e = Spec::from_toml(&sweep(extra), "t.toml").expect_err(extra);
    let s = format!("{e:#}");
    assert!(!s.contains('\n'), "{extra}: not one line: {s}");
    s
}

#[test]
fn layer_ranges_sizes_and_min_accuracy_are_checked_before_use() {
    assert!(Spec::from_toml(&sweep(""), "t.toml").is_ok());
    for l in ["0..100000000000", "0..=18446744073709551615", "0..5000"] {
        let e = sweep_err(&format!("[sites]\nlayers = \"{l}\""));
        assert!(e.contains("sites.layers") && e.contains("out of range"), "{e}");
    }
    // Against the model's depth too (the tiny model has 3 blocks), before anything expands.
    let s = Spec::from_toml(&sweep("[sites]\nlayers = \"0..=9\""), "t.toml").unwrap();
    assert!(s.layer_list(3).unwrap_err().to_string().contains("layer 9 is out of range"));
    assert_eq!(Spec::from_toml(&sweep("[sites]\nlayers = \"1..3\""), "t.toml").unwrap().layer_list(3).unwrap(), vec![1, 2]);
    let e = sweep_err("[task]\nsizes = [100000000000, 1, 1]");
    assert!(e.contains("task.sizes[0] = 100000000000") && e.contains("at most 100000"), "{e}");
    for v in ["nan", "inf", "-0.5", "1.5"] {
        assert!(sweep_err(&format!("[task]\nmin_accuracy = {v}")).contains("task.min_accuracy"), "{v}");
    }
    // A task called from code gets the same bound (no `Vec::with_capacity(10^11)` abort).
    let e = road_dii::tasks::equality::dataset(&tiny_tok(), road_dii::tasks::equality::Variable::Left, [100_000_000_000, 1, 1], 0).unwrap_err();
    assert!(e.to_string().contains("task.sizes[0]"), "{e}");
}

#[test]
fn non_finite_training_numbers_name_their_key() {
    for (extra, key) in [
        ("[train]\nlr = nan", "train.lr"),
        ("[train]\nlr = inf", "train.lr"),
        ("[train]\nboundary_lr = -inf", "train.boundary_lr"),
        ("[train]\nweight_decay = nan", "train.weight_decay"),
        ("[train]\nsteps = 10\nwarmup = 9223372036854775807", "train.warmup"),
        ("[intervention]\nkind = \"boundless\"\ntemperature = [0.0, 0.0]", "intervention.temperature"),
        ("[intervention]\nkind = \"sigmoid_mask\"\npenalty = nan", "intervention.penalty"),
        ("[train]\nsteps = 9223372036854775807", "train.steps = 9223372036854775807 is more than"),
        ("[train]\nbatch = 100000000000", "train.batch = 100000000000 is more than"),
    ] {
        let e = sweep_err(extra);
        assert!(e.contains(key), "{extra}: {e}");
    }
    let ft = |train: &str| {
        let t = format!("name = \"f\"\nmodel = \"tiny-equality\"\n[data]\nsource = \"first-pair\"\n[method]\nkind = \"road\"\n[train]\n{train}\n");
        road_dii::train::spec::parse(&t, &[]).map(|_| ()).map_err(|e| format!("{e:#}"))
    };
    assert!(ft("").is_ok());
    for (train, key) in [
        ("lr = nan", "train.lr"),
        ("lr = inf", "train.lr"),
        ("lr = 0.0", "train.lr"),
        ("warmup_ratio = 1.5", "train.warmup_ratio"),
        ("warmup_ratio = nan", "train.warmup_ratio"),
        ("clip_norm = nan", "train.clip_norm"),
        ("weight_decay = -1.0", "train.weight_decay"),
        ("steps = 0", "train.steps"),
        ("batch_size = 0", "train.batch_size"),
        ("steps = 100000000000", "train.steps = 100000000000 is more than"),
        ("grad_accum = 9223372036854775807", "train.grad_accum"),
    ] {
        let e = ft(train).unwrap_err();
        assert!(e.contains(key) && !e.contains('\n'), "{train}: {e}");
    }
}

#[test]
fn names_are_single_path_components_everywhere() {
    for bad in ["..", ".", "", "a/b", "../../escaped", "a\\b"] {
        let e = sweep_err(&format!("name = {bad:?}"));
        assert!(e.starts_with("name"), "{bad:?}: {e}");
        let ft = format!("name = {bad:?}\nmodel = \"tiny-equality\"\n[data]\nsource = \"first-pair\"\n[method]\nkind = \"road\"\n");
        assert!(road_dii::train::spec::parse(&ft, &[]).unwrap_err().to_string().starts_with("name"), "{bad:?}");
        let compose = std::fs::read_to_string(root().join("experiments/road-compose.toml")).unwrap().replacen("name = \"road-compose\"", &format!("name = {bad:?}"), 1);
        assert!(road_dii::compose::parse_spec(&compose).unwrap_err().to_string().starts_with("name"), "{bad:?}");
        let pilot = std::fs::read_to_string(root().join("experiments/pilot-tiny.toml")).unwrap();
        let e = road_dii::pilot::PilotSpec::parse(&pilot, &[format!("name={bad:?}")]).unwrap_err().to_string();
        assert!(e.starts_with("name"), "{bad:?}: {e}");
        // Wherever a name comes from (a crafted metrics.csv column in `merge`), the folder is checked.
        assert!(road_dii::runs::new_run_dir(bad, "abcd").is_err(), "{bad:?}");
    }
    let pilot = std::fs::read_to_string(root().join("experiments/pilot-tiny.toml")).unwrap();
    let label = pilot.find("label = \"").map(|i| &pilot[i..]).and_then(|s| s.lines().next()).unwrap().to_string();
    let e = road_dii::pilot::PilotSpec::parse(&pilot.replacen(&label, "label = \"../x\"", 1), &[]).unwrap_err().to_string();
    assert!(e.starts_with("methods.label"), "{e}");
}

#[test]
fn run_and_merge_runs_write_nothing_outside_notebooks_out() {
    let d = fresh_dir("road-reliability", "paths");
    let out = d.join("notebooks-out");
    std::fs::create_dir_all(&out).unwrap();
    let spec = d.join("dots.toml");
    std::fs::write(&spec, sweep("name = \"..\"")).unwrap();
    let (ok, _, err) = road_bin(&["run", spec.to_str().unwrap()], Some(&out));
    assert!(!ok && err.contains("name = \"..\"") && !err.contains("panicked"), "{err}");
    let (ok, _, err) = road_bin(&["merge-runs", out.to_str().unwrap(), "--name", "../../escaped"], Some(&out));
    assert!(!ok && err.contains("--name = \"../../escaped\""), "{err}");
    let listing = |p: &Path| std::fs::read_dir(p).unwrap().map(|e| e.unwrap().file_name()).collect::<Vec<_>>();
    assert!(listing(&out).is_empty(), "{:?}", listing(&out));
    assert_eq!(listing(&d).len(), 2, "{:?}", listing(&d)); // notebooks-out and dots.toml only
}

#[test]
fn multi_line_set_is_an_error_not_a_dropped_key() {
    let e = Spec::from_toml_with(&sweep(""), "t.toml", &["train.lr=1e-3\ntrain.steps=2".into()]).unwrap_err().to_string();
    assert!(e.contains("line break"), "{e}");
}

#[test]
fn unknown_label_words_are_errors_not_unk() {
    let tok = tiny_tok();
    let e = road_dii::train::cls::label_token_ids(&tok, &["true".into(), "maybe".into()]).unwrap_err().to_string();
    assert!(e.contains("\"maybe\" is not in the model's vocabulary"), "{e}");
    assert_eq!(road_dii::train::cls::label_token_ids(&tok, &["false".into(), "true".into()]).unwrap(), vec![4, 3]);
    let row = r#"{"base": "s1 s1 s2 s2 =", "source": "s1 s3 s2 s2 =", "base_label": "true", "cf_label": "maybe"}"#;
    let e = road_dii::tasks::jsonl::dataset_from_text(&tok, row, "p.jsonl", 0).unwrap_err();
    let e = format!("{e:#}");
    assert!(e.starts_with("p.jsonl: line 1") && e.contains("cf_label \"maybe\" is not in the model's vocabulary"), "{e}");
}

const ROW: &str = r#"{"base": "s1 s1 s2 s2 =", "source": "s1 s3 s2 s2 =", "base_label": "true", "cf_label": "false", "split": "train"}"#;

#[test]
fn jsonl_byte_order_mark_empty_prompt_and_bad_rows_name_file_and_line() {
    let tok = tiny_tok();
    let ds = road_dii::tasks::jsonl::dataset_from_text(&tok, &format!("\u{feff}{ROW}\n"), "p.jsonl", 0).unwrap();
    assert_eq!(ds.train.len(), 1);
    let empty = ROW.replace("\"s1 s3 s2 s2 =\"", "\"\"");
    let e = format!("{:#}", road_dii::tasks::jsonl::dataset_from_text(&tok, &format!("{ROW}\n\n{empty}\n"), "p.jsonl", 0).unwrap_err());
    assert_eq!(e, "p.jsonl: line 3: source is empty");
    let e = format!("{:#}", road_dii::tasks::jsonl::dataset_from_text(&tok, &ROW.replace("train", "holdout"), "p.jsonl", 0).unwrap_err());
    assert!(e.starts_with("p.jsonl: line 1: unknown split \"holdout\""), "{e}");
    // Fine-tune data files: the same byte-order mark, and an empty prompt with its line.
    let labels = vec!["negative".to_string(), "positive".to_string()];
    let s = road_dii::train::data::parse_cls_text("\u{feff}text,label\nnice,positive\n", "csv", &labels, "d.csv").unwrap();
    assert_eq!(s.train.len() + s.dev.len() + s.test.len(), 1);
    let e = road_dii::train::data::parse_lm_text("\u{feff}{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"\", \"completion\": \"b\"}\n", "lm.jsonl").unwrap_err();
    assert_eq!(e.to_string(), "lm.jsonl: line 2: empty prompt");
}

#[test]
fn a_pairs_file_without_test_rows_says_so() {
    let d = fresh_dir("road-reliability", "notest");
    let pairs = d.join("pairs.jsonl");
    std::fs::write(&pairs, format!("{ROW}\n{}\n", ROW.replace("s2 s2 =", "s4 s4 ="))).unwrap();
    let spec = Spec::from_toml(
        &sweep(&format!("[task]\nname = \"jsonl\"\npath = {:?}\nmin_accuracy = 0.0\n[sites]\npositions = [\"last\"]", pairs.display())),
        "t.toml",
    )
    .unwrap();
    let l = road_dii::model::load::load_path(&tiny_dir(), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let e = road_dii::experiment::data::prepare(&spec, &l.model, &l.tok, &mut |_| {}).err().expect("no test rows").to_string();
    assert!(e.contains("pairs.jsonl: no test pairs") && !e.contains("filtering"), "{e}");
}

#[cfg(unix)]
#[test]
fn model_paths_symlink_loops_and_fifos_are_refused_at_once() {
    let d = fresh_dir("road-reliability", "model-paths");
    let (a, b) = (d.join("a"), d.join("b"));
    std::os::unix::fs::symlink(&b, &a).unwrap();
    std::os::unix::fs::symlink(&a, &b).unwrap();
    let (ok, _, err) = road_bin(&["info", "--model", a.to_str().unwrap()], Some(&d));
    assert!(!ok && err.contains("symlink loop"), "{err}");
    let fifo = d.join("model.gguf");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_road"))
        .args(["info", "--model", fifo.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > std::time::Duration::from_secs(60) {
            let _ = child.kill();
            panic!("`road info --model FIFO` blocked");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("is a FIFO"), "{err}");
}

#[test]
fn generate_max_tokens_is_bounded_by_the_context() {
    let d = fresh_dir("road-reliability", "generate");
    let m = tiny_dir();
    for n in ["18446744073709551615", "1000000000000"] {
        let (ok, _, err) = road_bin(&["generate", "--model", m.to_str().unwrap(), "--prompt", "s1 s2 s3", "--max-tokens", n], Some(&d));
        assert!(!ok && err.contains(&format!("--max-tokens = {n} is more than the model's context")) && err.contains("at most 14"), "{err}");
    }
    let (ok, out, err) = road_bin(&["generate", "--model", m.to_str().unwrap(), "--prompt", "s1 s2 s3", "--max-tokens", "14"], Some(&d));
    assert!(ok && out.starts_with("s1 s2 s3"), "{err}");
}

/// `road finetune` on a tiny HF model: a finished run, then a resume with `--set` raising the
/// lr until the loss is not finite, then a resume that only exports the kept parameters.
#[test]
fn finetune_nan_keeps_the_best_parameters_and_resume_may_change_settings() {
    let d = fresh_dir("road-reliability", "ft-nan");
    let spec = d.join("nan.toml");
    std::fs::write(&spec, format!(
        "name = \"nan\"\nmodel = \"{}\"\n[data]\nsource = \"parity\"\ntrain_examples = 16\ndev_examples = 8\ntest_examples = 8\n[method]\nkind = \"lora\"\nr = 2\n[train]\nsteps = 2\nbatch_size = 4\neval_every = 1\nwarmup_ratio = 0.0\nlr = 1e-2\n",
        reference_dir().join("hf-tiny-llama-a").display()
    )).unwrap();
    let (ok, _, err) = road_bin(&["finetune", spec.to_str().unwrap()], Some(&d));
    assert!(ok, "{err}");
    let run = std::fs::read_dir(d.join("nan")).unwrap().next().unwrap().unwrap().path();
    let r = run.to_str().unwrap();
    let (ok, _, err) = road_bin(&["finetune", "--resume", r, "--set", "train.lr=1e38", "--set", "train.steps=8"], Some(&d));
    assert!(!ok && err.contains("training stopped; kept the parameters of step") && !err.contains("panicked"), "{err}");
    assert!(err.contains("became") && err.contains("at step"), "{err}");
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert!(summary["stopped"].as_str().unwrap().contains("at step"), "{summary}");
    assert!(summary["test"]["accuracy"].as_f64().unwrap().is_finite(), "{summary}");
    for f in ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "config.before-resume-1.toml"] {
        assert!(run.join(f).exists(), "missing {f}");
    }
    let w = candle_core::safetensors::load(run.join("adapter/adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert!(w.values().all(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|x| x.is_finite())));
    // Export what was kept: a resume that has no step left to train.
    let (ok, _, err) = road_bin(&["finetune", "--resume", r, "--set", "train.steps=2"], Some(&d));
    assert!(ok, "{err}");
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert!(summary.get("stopped").is_none() && summary["best_step"].as_u64().unwrap() >= 1, "{summary}");
    assert!(std::fs::read_to_string(run.join("config.toml")).unwrap().contains("steps = 2"));
}

#[test]
fn tiny_trainer_stops_on_nan_and_keeps_finite_weights() {
    let huge = road_dii::tiny::TrainOpts { steps: usize::MAX, ..Default::default() };
    let e = road_dii::tiny::train(&huge).err().expect("2^64 - 1 steps is an error").to_string();
    assert!(e.starts_with("--steps = 18446744073709551615 is more than"), "{e}");
    let opts = road_dii::tiny::TrainOpts { steps: 6, batch: 8, lr: 1e38, warmup: 0, eval_every: 0, iit_weight: 0.0, ..Default::default() };
    let tr = road_dii::tiny::train(&opts).unwrap();
    let why = tr.stopped.as_deref().expect("a loss of 1e38-lr training is not finite");
    assert!(why.contains("loss became") && why.contains("at step"), "{why}");
    for v in tr.varmap.all_vars() {
        assert!(v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|x| x.is_finite()));
    }
}

/// A cached model is checked against its pinned sha256 at every load (a sidecar keeps it
/// cheap): a corrupt file in the cache is an error naming the fix, not a silent load.
#[test]
fn a_corrupt_cached_model_is_refused_at_load() {
    let cache = std::env::temp_dir().join(format!("road-corrupt-cache-{}", std::process::id()));
    let s = road_dii::fetch::lookup("smollm2-135m").unwrap();
    let f = cache.join("models").join(s.name).join(s.file);
    std::fs::create_dir_all(f.parent().unwrap()).unwrap();
    std::fs::write(&f, b"GGUF but not the pinned bytes").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_road"))
        .args(["info", "--model", "smollm2-135m"])
        .env("ROAD_CACHE", &cache)
        .env("ROAD_OFFLINE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("is corrupt") && err.contains("road fetch-model smollm2-135m"), "{err}");
    let _ = std::fs::remove_dir_all(&cache);
}

/// `--shard` numbers that do not parse name the flag and the value.
#[test]
fn shard_flag_errors_name_the_flag() {
    for (arg, want) in [("0/99999999999999999999", "\"99999999999999999999\" is not a shard number"), ("x", "expected i/n"), ("5/2", "need 0 <= i < n")] {
        let (ok, _, err) = road_bin(&["run", "experiments/tiny-equality-das.toml", "--shard", arg], None);
        assert!(!ok && err.contains("--shard") && err.contains(want), "{arg}: {err}");
    }
}
