//! The fine-tuning/adapter commands as a user runs them (tiny model; no network).
mod common;
use common::{fresh_dir, reference_dir, road_bin};

fn road(args: &[&str], out_root: &std::path::Path) -> (bool, String, String) {
    road_bin(args, Some(out_root))
}

fn tmp(name: &str) -> std::path::PathBuf {
    fresh_dir("road-cli-road", name)
}

#[test]
fn finetune_parity_then_logits_eval_merge_and_serve_batch() {
    let d = tmp("e2e");
    let model = reference_dir().join("hf-tiny-llama-a");
    let spec = d.join("p.toml");
    std::fs::write(&spec, format!(
        "name = \"p\"\nmodel = \"{}\"\n[data]\nsource = \"parity\"\ntrain_examples = 32\ndev_examples = 8\ntest_examples = 16\n[method]\nkind = \"road\"\ngroup_size = 8\n[train]\nsteps = 2\nbatch_size = 4\neval_every = 1\n",
        model.display()
    )).unwrap();
    let (ok, out, err) = road(&["finetune", spec.to_str().unwrap()], &d);
    assert!(ok, "{err}");
    let summary: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(summary["method"], "road1");
    let run = std::fs::read_dir(d.join("p")).unwrap().next().unwrap().unwrap().path();
    for f in ["config.toml", "train_log.csv", "metrics.csv", "summary.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"] {
        assert!(run.join(f).exists(), "missing {f}");
    }
    let adapter = run.join("adapter");
    let m = model.to_str().unwrap();
    let (ok, out, err) = road(&["logits", "--model", m, "--prompt", "Number: 12", "--adapter", adapter.to_str().unwrap(), "--json"], &d);
    assert!(ok && out.contains("\"top\""), "{err}");
    let (ok, out, err) = road(&["eval", "--model", m, "--adapter", adapter.to_str().unwrap(), "--task", "parity", "--limit", "8"], &d);
    assert!(ok && out.contains("accuracy"), "{err}");
    let merged = d.join("merged");
    let (ok, _, err) = road(&["merge", "--model", m, "--adapter", adapter.to_str().unwrap(), "--out", merged.to_str().unwrap()], &d);
    assert!(ok && merged.join("model.safetensors").exists() && merged.join("tokenizer.json").exists(), "{err}");
    let reqs = d.join("reqs.jsonl");
    std::fs::write(&reqs, "{\"adapter\": \"a\", \"prompt\": \"Number: 5\", \"max_tokens\": 3}\n{\"adapter\": null, \"prompt\": \"Hi\", \"max_tokens\": 2}\n").unwrap();
    let (ok, out, err) = road(&["serve-batch", "--model", m, "--adapters", &format!("a={}", adapter.display()), "--requests", reqs.to_str().unwrap()], &d);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 2);
    let (ok, _, err) = road(&["serve-batch", "--model", m, "--adapters", &format!("a={}", adapter.display()), "--requests", reqs.to_str().unwrap().replace("reqs", "nope").as_str()], &d);
    assert!(!ok && err.lines().count() <= 2 && !err.contains("panicked"), "{err}");
}

#[test]
fn finetune_unknown_key_is_a_one_line_error_naming_it() {
    let d = tmp("badkey");
    let spec = d.join("bad.toml");
    std::fs::write(&spec, "name = \"x\"\n[method]\nkind = \"road\"\nvarient = 2\n").unwrap();
    let (ok, _, err) = road(&["finetune", spec.to_str().unwrap()], &d);
    assert!(!ok && err.contains("varient") && !err.contains("panicked"), "{err}");
}
