//! The pilot study on the tiny model: invariants of the probes, the fast swap path against a
//! plain intervened forward, and the whole `road run experiments/pilot-tiny.toml` end to end
//! (every file, the cache, reproducibility).
mod common;
use candle_core::{DType, Device, Tensor};
use common::fresh_dir;
use road_dii::intervene::hook::InterventionHook;
use road_dii::intervene::norm_swap::NormSwap;
use road_dii::intervene::vanilla::Vanilla;
use road_dii::intervene::{ApplyCtx, Intervention};
use road_dii::model::{registry, Collector, Fwd, Llama, LogitsAt, Site};
use road_dii::probe;
use road_dii::train::cls::{encode_prompt, label_token_ids, score_hidden, Scorer};
use road_dii::train::data::first_pair_task;
use road_dii::train::spec::{FIRST_PAIR_LABEL_WORDS, FIRST_PAIR_TEMPLATE};
use std::path::Path;
use std::process::Command;

fn tiny() -> road_dii::model::Loaded {
    registry::load("tiny-equality", DType::F32, &Device::Cpu, false).unwrap()
}

fn prompts(l: &road_dii::model::Loaded, n: usize) -> Vec<Vec<u32>> {
    first_pair_task().dev.iter().take(n).map(|e| encode_prompt(&l.tok, FIRST_PAIR_TEMPLATE, &e.text, 16).unwrap()).collect()
}

fn scorer(l: &road_dii::model::Loaded) -> Scorer<'static> {
    let words: Vec<String> = FIRST_PAIR_LABEL_WORDS.iter().map(|s| s.to_string()).collect();
    Scorer::LabelWords(label_token_ids(&l.tok, &words).unwrap())
}

#[test]
fn identical_model_gives_delta_m_zero_and_delta_d_one_exactly() {
    let l = tiny();
    let p = prompts(&l, 40);
    let a = probe::last_token_states(&l.model, None, &p, 7, None).unwrap();
    let b = probe::last_token_states(&l.model, None, &p, 7, None).unwrap();
    assert_eq!(a.len(), l.model.cfg.num_layers);
    for (x, y) in a.iter().zip(&b) {
        for (u, v) in x.to_vec2::<f32>().unwrap().iter().zip(y.to_vec2::<f32>().unwrap()) {
            assert_eq!(probe::delta(u, &v), (0.0, 1.0));
        }
    }
}

/// The swap probe re-runs only the last token from the intervened block on (cached keys/values);
/// its scores must equal a plain full forward with the interchange hooked at that block.
#[test]
fn fast_swap_path_equals_full_intervened_forward() {
    let l = tiny();
    let m: &Llama = &l.model;
    let sc = scorer(&l);
    let p = prompts(&l, 6);
    let kinds: [Box<dyn Intervention>; 3] = [Box::new(Vanilla::new(m.cfg.hidden_size, None, &Device::Cpu).unwrap()), Box::new(NormSwap::magnitude()), Box::new(NormSwap::angle())];
    for pair in p.chunks(2) {
        let (base, source) = (&pair[0], &pair[1]);
        let fast = probe::pair_scores(m, None, &sc, base, source).unwrap();
        let mut col = Collector::new((0..m.cfg.num_layers).map(|i| (i, Site::BlockOutput)));
        m.forward(&[source.clone()], Fwd { hooks: Some(&mut col), logits: LogitsAt::None, ..Default::default() }).unwrap();
        for layer in 0..m.cfg.num_layers {
            let act = col.get(layer, Site::BlockOutput).unwrap();
            let s = act.narrow(1, source.len() - 1, 1).unwrap().squeeze(1).unwrap();
            for (k, iv) in kinds.iter().enumerate() {
                let mut hook = InterventionHook {
                    layer,
                    site: Site::BlockOutput,
                    positions: vec![base.len() - 1],
                    source: s.clone(),
                    cols: None,
                    intervention: iv.as_ref(),
                    ctx: ApplyCtx::EVAL,
                    onehot: None,
                };
                let out = m.forward(&[base.clone()], Fwd { hooks: Some(&mut hook), logits: LogitsAt::None, ..Default::default() }).unwrap();
                let t = out.hidden.dim(1).unwrap();
                let slow = score_hidden(m, &out.hidden.narrow(1, t - 1, 1).unwrap().squeeze(1).unwrap(), &sc).unwrap().squeeze(0).unwrap();
                let fast_k = Tensor::new(fast.swapped[layer][k].as_slice(), &Device::Cpu).unwrap();
                let d = (slow - fast_k).unwrap().abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
                assert!(d < 1e-4, "layer {layer} kind {k}: fast and full paths differ by {d}");
            }
        }
    }
}

#[test]
fn swapping_with_the_base_itself_changes_nothing() {
    let l = tiny();
    let sc = scorer(&l);
    let pairs: Vec<(Vec<u32>, Vec<u32>)> = prompts(&l, 12).into_iter().map(|x| (x.clone(), x)).collect();
    let counts = probe::swap_probe(&l.model, None, &sc, &pairs, None).unwrap();
    assert_eq!(counts.len(), l.model.cfg.num_layers * probe::swap::KINDS.len());
    for c in counts {
        assert_eq!((c.changed, c.n, c.n_all), (0, 0, 12), "{c:?}");
    }
}

fn run_tiny(out: &Path, cache: &Path, extra: &[&str]) -> serde_json::Value {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/experiments/pilot-tiny.toml");
    let o = Command::new(env!("CARGO_BIN_EXE_road"))
        .args(["run", file, "--json"])
        .args(extra)
        .env("ROAD_OUT", out)
        .env("ROAD_CACHE", cache)
        .env("ROAD_OFFLINE", "1")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "road run pilot-tiny failed:\n{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("bad --json output ({e}): {stdout}"))
}

fn csv(dir: &Path, name: &str) -> (Vec<String>, Vec<csv::StringRecord>) {
    let mut r = csv::Reader::from_path(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let h = r.headers().unwrap().iter().map(String::from).collect();
    (h, r.records().map(|x| x.unwrap()).collect())
}

#[test]
fn tiny_study_writes_every_file_reuses_its_cache_and_reproduces() {
    let root = fresh_dir("road-pilot", "e2e");
    let (out, cache) = (root.join("out"), root.join("cache"));
    let first = run_tiny(&out, &cache, &[]);
    let dir = Path::new(first["run_dir"].as_str().unwrap()).to_path_buf();
    for f in [
        "config.toml",
        "delta_per_example.csv",
        "delta_by_layer.csv",
        "disentangle.csv",
        "disentangle_summary.csv",
        "finetunes.csv",
        "road_ablation.csv",
        "swap_probe.csv",
        "summary.md",
        "figures/scatter-full.svg",
        "figures/delta-d-by-layer.svg",
        "figures/delta-m-by-layer.svg",
        "figures/swap-probe.svg",
    ] {
        assert!(dir.join(f).is_file(), "missing {f}");
    }
    assert!(std::fs::read_dir(dir.join("figures")).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().starts_with("disentangle-block")));
    // Seeds are recorded.
    assert!(std::fs::read_to_string(dir.join("config.toml")).unwrap().contains("seed = 0"));

    // ΔM/ΔD: one row per method × block × example, ΔD a cosine.
    let (h, rows) = csv(&dir, "delta_per_example.csv");
    assert_eq!(h[..6], ["method", "layer", "example", "label", "delta_m", "delta_d"]);
    assert_eq!(rows.len(), 5 * 3 * 200);
    for r in &rows {
        let dd: f64 = r[5].parse().unwrap();
        assert!((-1.0..=1.0).contains(&dd));
    }
    // Fine-tuning on a task the model was not trained for must actually learn it.
    let (_, ft) = csv(&dir, "finetunes.csv");
    let acc = |m: &str| -> f64 { ft.iter().find(|r| &r[0] == m).unwrap()[10].parse().unwrap() };
    assert!(acc("full") > 0.9 && acc("road1") > 0.9, "full {} road1 {}", acc("full"), acc("road1"));
    let (_, ab) = csv(&dir, "road_ablation.csv");
    assert_eq!(ab.iter().map(|r| r[2].to_string()).collect::<Vec<_>>(), ["both", "angle", "magnitude"]);
    let (_, heads) = csv(&dir, "disentangle.csv");
    assert_eq!(heads.len(), 2 * 2 * 3 * 3, "backbones × layers × heads × seeds");
    let (_, swap) = csv(&dir, "swap_probe.csv");
    assert_eq!(swap.len(), 4 * 3 * 3, "models × layers × kinds");
    assert!(first["finetunes"].as_array().unwrap().iter().all(|f| f["cached"] == false));

    // Second run: every fine-tune comes from the cache, and every number is the same.
    let second = run_tiny(&out, &cache, &[]);
    let dir2 = Path::new(second["run_dir"].as_str().unwrap()).to_path_buf();
    assert_ne!(dir, dir2, "a run never overwrites another");
    assert!(second["finetunes"].as_array().unwrap().iter().all(|f| f["cached"] == true));
    for f in ["delta_per_example.csv", "disentangle.csv", "swap_probe.csv"] {
        assert_eq!(std::fs::read_to_string(dir.join(f)).unwrap(), std::fs::read_to_string(dir2.join(f)).unwrap(), "{f} differs on re-run");
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn bad_pilot_files_are_one_line_errors() {
    let root = fresh_dir("road-pilot", "bad");
    let base = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/experiments/pilot-tiny.toml")).unwrap();
    for (edit, want) in [
        (base.replace("scatter_layer = -2", "scatter_layer = 7"), "out of range"),
        (base.replace("[swap]\n", "[swap]\nbogus = 1\n"), "bogus"),
        (base.replace("\"pretrained\", \"full\"", "\"pretrained\", \"nope\""), "nope"),
    ] {
        let f = root.join("p.toml");
        std::fs::write(&f, edit).unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_road")).args(["run", f.to_str().unwrap()]).env("ROAD_OUT", root.join("out")).env("ROAD_CACHE", root.join("c")).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want) && !err.contains("panicked"), "{err}");
    }
    let _ = std::fs::remove_dir_all(&root);
}
