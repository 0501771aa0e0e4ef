//! The `road` binary as a user runs it: successful commands and one-line errors for bad input.
mod common;
use common::{fresh_dir, reference_dir, road_bin};

fn road(args: &[&str]) -> (bool, String, String) {
    road_bin(args, None)
}

fn tmp(name: &str) -> std::path::PathBuf {
    fresh_dir("road-cli-test", name)
}

#[test]
fn logits_json_on_a_hf_directory() {
    let dir = reference_dir().join("hf-tiny-llama-a");
    let (ok, out, err) = road(&["logits", "--model", dir.to_str().unwrap(), "--prompt", "The capital of France is", "--top", "3", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ids"], serde_json::json!([504, 3575, 282, 4649, 314]));
    assert_eq!(v["top"][0]["id"], 47921); // transformers' argmax for this prompt
    assert_eq!(v["top"].as_array().unwrap().len(), 3);
}

#[test]
fn nonexistent_model_is_a_one_line_error() {
    let (ok, _, err) = road(&["logits", "--model", "/no/such/model.gguf", "--prompt", "x"]);
    assert!(!ok);
    assert!(err.contains("not found") && err.contains("smollm2-135m"), "{err}");
    assert!(!err.contains("panicked"));
}

#[test]
fn corrupt_gguf_is_reported() {
    let d = tmp("corrupt");
    let f = d.join("broken.gguf");
    std::fs::write(&f, b"GGUF\x03\x00\x00\x00garbage that is not a gguf file").unwrap();
    let (ok, _, err) = road(&["info", "--model", f.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("not a valid GGUF file"), "{err}");
    assert!(!err.contains("panicked"));
}

#[test]
fn non_llama_architecture_is_rejected() {
    let d = tmp("gpt2");
    std::fs::write(d.join("config.json"), r#"{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 8}"#).unwrap();
    let (ok, _, err) = road(&["info", "--model", d.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("unsupported architecture") && err.contains("gpt2"), "{err}");
}

#[test]
fn prompt_longer_than_the_context_is_rejected() {
    let dir = reference_dir().join("hf-tiny-llama-a"); // max_position_embeddings = 256
    let long = "word ".repeat(400);
    let (ok, _, err) = road(&["logits", "--model", dir.to_str().unwrap(), "--prompt", &long]);
    assert!(!ok);
    assert!(err.contains("longer than the model's context"), "{err}");
}

#[test]
fn generate_and_info_work_on_a_hf_directory() {
    let dir = reference_dir().join("hf-tiny-llama-b");
    let (ok, out, err) = road(&["generate", "--model", dir.to_str().unwrap(), "--prompt", "Hello", "--max-tokens", "5"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("Hello"));
    let (ok, out, err) = road(&["info", "--model", dir.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["layers"], 3);
    assert_eq!(v["config"]["rope_scaling"]["factor"], 8.0);
}
