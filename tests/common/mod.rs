//! Shared test helpers: where the reference fixtures live, and models loaded once per test binary.
#![allow(dead_code)]
pub mod fuzzing;
pub mod gguf;
use candle_core::{DType, Device, Tensor};
use road_dii::model::{load, registry, Hooks, Loaded, Site, SiteCtx};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

/// `../shared/reference` beside the checkout (override with ROAD_REFERENCE).
pub fn reference_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("ROAD_REFERENCE") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/reference")
}

pub fn ref_json(name: &str) -> serde_json::Value {
    let p = reference_dir().join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

pub fn ref_tensors(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(reference_dir().join(name), &Device::Cpu).unwrap()
}

/// SmolLM2-135M (fetched into the cache on first use), f32 on CPU.
pub fn smollm2() -> &'static Loaded {
    static M: OnceLock<Loaded> = OnceLock::new();
    M.get_or_init(|| registry::load("smollm2-135m", DType::F32, &Device::Cpu, true).expect("load smollm2-135m"))
}

/// The transformers-made tiny random LLaMA `a` (tied, GQA, f32).
pub fn tiny_a() -> &'static Loaded {
    static M: OnceLock<Loaded> = OnceLock::new();
    M.get_or_init(|| load::load_path(&reference_dir().join("hf-tiny-llama-a"), DType::F32, &Device::Cpu).unwrap())
}

/// One of the transformers-made tiny checkpoints of another family (`hf-tiny-qwen2`, ...),
/// loaded once per test binary.
pub fn tiny_family(name: &str) -> &'static Loaded {
    static M: OnceLock<std::sync::Mutex<HashMap<String, &'static Loaded>>> = OnceLock::new();
    let mut map = M.get_or_init(Default::default).lock().unwrap();
    map.entry(name.to_string())
        .or_insert_with(|| Box::leak(Box::new(load::load_path(&reference_dir().join(name), DType::F32, &Device::Cpu).unwrap())))
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Replaces one position's vector with a given one, over a full forward (the plain computation).
pub struct PlainSwap {
    pub layer: usize,
    pub site: Site,
    pub pos: Vec<usize>,
    pub with: Vec<Tensor>,
}
impl Hooks for PlainSwap {
    fn wants(&self, l: usize, s: Site) -> bool {
        l == self.layer && s == self.site
    }
    fn on(&mut self, _: usize, _: Site, act: &Tensor, _: SiteCtx) -> anyhow::Result<Option<Tensor>> {
        let mut rows = Vec::new();
        for (b, (&p, v)) in self.pos.iter().zip(&self.with).enumerate() {
            let row = act.get(b)?;
            let t = row.dim(0)?;
            let mut parts = Vec::new();
            if p > 0 {
                parts.push(row.narrow(0, 0, p)?);
            }
            parts.push(v.unsqueeze(0)?);
            if p + 1 < t {
                parts.push(row.narrow(0, p + 1, t - p - 1)?);
            }
            rows.push(Tensor::cat(&parts, 0)?);
        }
        Ok(Some(Tensor::stack(&rows, 0)?))
    }
}


/// Run the `road` binary (optionally with ROAD_OUT); (success, stdout, stderr).
pub fn road_bin(args: &[&str], out_root: Option<&std::path::Path>) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_road"));
    cmd.args(args);
    if let Some(o) = out_root {
        cmd.env("ROAD_OUT", o);
    }
    let out = cmd.output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// A fresh, empty temporary directory unique to this test process.
pub fn fresh_dir(prefix: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("{prefix}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Four pairs from the tiny model's tokenizer (labels are arbitrary: the engine does not care).
/// Pairs 0 and 2 share a length (the clean-prefix path); all four need padding.
pub fn tiny_pairs() -> Vec<road_dii::tasks::Pair> {
    use road_dii::tasks::{Pair, Prompt};
    let tok = &tiny_a().tok;
    let mk = |t: &str| Prompt::new(tok, t.into(), 5, &[("mid", 2)]).unwrap();
    let texts = [
        ("When Mary and John went to the store", "When Alice and Bob went to the park"),
        ("The capital of France is a city", "The capital of Spain is a place"),
        ("When John and Mary went to the store", "When Bob and Alice went to the park"),
        ("one two three four five six", "six five four three two one"),
    ];
    texts.iter().enumerate().map(|(i, (b, s))| Pair { base: mk(b), source: mk(s), cf_label: 7 + i as u32, answers: vec![5, 7] }).collect()
}

/// The one definition of "a merged sharded run equals the unsharded run", shared by the shard
/// and Slurm tests: every file the unsharded run folder holds at its top level is in the merged
/// folder with the same bytes (metrics, examples, train log, parameters, pairs, config, figures),
/// except the wall-clock fields that differ between any two runs: `timing.csv`'s `seconds`
/// column, and `summary.json`'s `seconds` and `run_dir` (compared as JSON without them). The
/// merged folder has no other files at its top level (its `shards/` and `slurm/` are folders).
pub fn assert_same_outputs(unsharded: &std::path::Path, merged: &std::path::Path) {
    let files = |d: &std::path::Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap_or_else(|e| panic!("{}: {e}", d.display()))
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let names = files(unsharded);
    assert_eq!(names, files(merged), "the merged folder {} holds other files than the unsharded run {}", merged.display(), unsharded.display());
    for n in ["metrics.csv", "examples.csv", "train_log.csv", "params.safetensors", "config.toml", "summary.json", "timing.csv"] {
        assert!(names.iter().any(|x| x == n), "the unsharded run has no {n}");
    }
    for n in &names {
        let (a, b) = (std::fs::read(unsharded.join(n)).unwrap(), std::fs::read(merged.join(n)).unwrap());
        match n.as_str() {
            "timing.csv" => {
                let drop_seconds = |t: &[u8]| -> Vec<String> {
                    let t = String::from_utf8_lossy(t).into_owned();
                    let header: Vec<&str> = t.lines().next().unwrap_or("").split(',').collect();
                    let col = header.iter().position(|h| *h == "seconds").expect("timing.csv has a seconds column");
                    t.lines().map(|l| l.split(',').enumerate().filter(|(i, _)| *i != col).map(|(_, f)| f).collect::<Vec<_>>().join(",")).collect()
                };
                assert_eq!(drop_seconds(&a), drop_seconds(&b), "timing.csv differs beyond its seconds column");
            }
            "summary.json" => {
                let strip = |t: &[u8]| {
                    let mut v: serde_json::Value = serde_json::from_slice(t).unwrap();
                    let o = v.as_object_mut().unwrap();
                    assert!(o.remove("seconds").is_some() && o.remove("run_dir").is_some(), "summary.json lacks seconds/run_dir");
                    v
                };
                assert_eq!(strip(&a), strip(&b), "summary.json differs beyond seconds and run_dir");
            }
            _ => assert!(a == b, "{n} differs between {} and {}", unsharded.display(), merged.display()),
        }
    }
}

/// The only run folder under `root/<experiment>/` (an unsharded `road run` makes one).
pub fn only_run(root: &std::path::Path, experiment: &str) -> PathBuf {
    let runs: Vec<PathBuf> = std::fs::read_dir(root.join(experiment)).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    runs[0].clone()
}

/// Sixteen "<word> is good/bad" examples, labels 0/1: the fine-tuning tests' toy task.
pub fn toy_cls() -> Vec<road_dii::train::data::ClsExample> {
    use road_dii::train::data::ClsExample;
    let words = ["apple", "river", "stone", "cloud", "green", "music", "paper", "light"];
    words.iter().flat_map(|w| [ClsExample { text: format!("{w} is good"), label: 0 }, ClsExample { text: format!("{w} is bad"), label: 1 }]).collect()
}

/// The one definition of "a resumed fine-tune equals an uninterrupted one": `run(dir, steps,
/// resume)` trains 6 steps straight, then 4 and a resume to 6; the last logged losses agree.
pub fn assert_resume_matches(tag: &str, run: impl Fn(&std::path::Path, usize, bool) -> road_dii::train::TrainOutput) {
    let base = std::env::temp_dir().join(format!("road-{tag}-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let straight = run(&base.join("a"), 6, false);
    run(&base.join("b"), 4, false);
    let resumed = run(&base.join("b"), 6, true);
    let last = |o: &road_dii::train::TrainOutput| o.log.last().unwrap().loss;
    assert_eq!(resumed.log.len(), 6);
    assert!((last(&straight) - last(&resumed)).abs() < 1e-5, "{tag}: {} vs {}", last(&straight), last(&resumed));
    let _ = std::fs::remove_dir_all(&base);
}

/// Central differences of `loss` (the plain, non-differentiable forward) at the entry of largest
/// gradient and at one other entry of `v`, against autograd's gradient `g` (3% of max |g|).
pub fn assert_grad_matches_fd(v: &candle_core::Var, g: &Tensor, what: &str, loss: impl Fn() -> f32) {
    let flat = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let gmax = flat.iter().fold(0f32, |a, &x| a.max(x.abs()));
    assert!(gmax > 1e-6, "{what}: zero gradient (not wired into the loss?)");
    let imax = flat.iter().position(|&x| x.abs() == gmax).unwrap();
    let base = v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for i in [imax, flat.len() / 3] {
        let eps = 1e-2f32;
        let at = |d: f32| {
            let mut x = base.clone();
            x[i] += d;
            v.set(&Tensor::from_vec(x, v.dims(), &Device::Cpu).unwrap()).unwrap();
            loss()
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * eps);
        v.set(&Tensor::from_vec(base.clone(), v.dims(), &Device::Cpu).unwrap()).unwrap();
        assert!((fd - flat[i]).abs() <= 0.03 * gmax + 1e-4, "{what}[{i}]: autograd {} vs finite difference {fd} (max |g| {gmax})", flat[i]);
    }
}
