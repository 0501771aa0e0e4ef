//! Mutation fuzzing of model files (issue 17): GGUF files, HF `config.json` and safetensors.
//! Every mutant must be refused with an error or load into a model whose logits are finite and
//! whose tokenizer works — never a panic, never a hang, never NaN output. The tiny transformers
//! checkpoints are the seeds (three families); mutants stay in memory. Binary files are fuzzed
//! twice: mutations anywhere (mostly the tensor data), and mutations of the header only, the
//! unchanged data appended (dims, types, offsets, metadata).
mod common;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use common::fuzzing::*;
use common::gguf::{small_vocab_copy, write_gguf};
use common::fresh_dir;
use road_dii::model::{load, Fwd, Llama, LlamaConfig, LogitsAt};
use road_dii::util::fuzz::run_cases;
use std::path::Path;

const FAMILIES: [(&str, &str); 3] = [("hf-tiny-llama-a", "llama"), ("hf-tiny-qwen2", "qwen2"), ("hf-tiny-qwen3", "qwen3")];
/// The fixtures' 49,152-token vocabulary cut to this (byte tokens kept): a case then costs about
/// a millisecond instead of fifteen, so 10,000 mutants per format fit CI.
const VOCAB: usize = 512;

/// The seed checkpoints: each family's tiny fixture with the small vocabulary (written once per
/// test binary: the tests run in parallel).
fn fixtures() -> Vec<std::path::PathBuf> {
    static F: std::sync::OnceLock<Vec<std::path::PathBuf>> = std::sync::OnceLock::new();
    F.get_or_init(|| {
        let dir = fresh_dir("fuzz-models", "hf");
        FAMILIES.iter().map(|(f, _)| small_vocab_copy(f, VOCAB, &dir)).collect()
    })
    .clone()
}

/// Logits of a short prompt (ids inside every tiny vocabulary) must be finite.
fn finite_logits(m: &Llama) -> Result<(), String> {
    let ids = vec![vec![1u32, 50, 300, 3]];
    let out = m.forward(&ids, Fwd { logits: LogitsAt::All, ..Default::default() }).map_err(|e| e.to_string())?;
    let v = out.logits.unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(v.iter().all(|x| x.is_finite()), "a model that loaded gives non-finite logits");
    Ok(())
}

fn gguf_seeds() -> Vec<Vec<u8>> {
    static S: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    S.get_or_init(gguf_files).clone()
}

fn gguf_files() -> Vec<Vec<u8>> {
    let dir = fresh_dir("fuzz-models", "gguf");
    FAMILIES
        .iter()
        .zip(fixtures())
        .map(|((_, arch), fixture)| {
            let p = dir.join(format!("{arch}.gguf"));
            // An absolute path: `reference_dir().join` takes it as it is.
            write_gguf(fixture.to_str().unwrap(), arch, GgmlDType::Q8_0, &p);
            std::fs::read(&p).unwrap()
        })
        .collect()
}

fn load_gguf_bytes(b: &[u8]) -> Result<(), String> {
    let l = load::load_gguf_from(&mut std::io::Cursor::new(b), Path::new("fuzz.gguf"), DType::F32, &Device::Cpu).map_err(|e| format!("{e:#}"))?;
    l.tok.encode("hello world").map_err(|e| e.to_string())?;
    finite_logits(&l.model)
}

/// Where a GGUF file's data section starts (the header is everything before it).
fn gguf_data_offset(b: &[u8]) -> usize {
    let c = candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(b)).unwrap();
    c.tensor_data_offset as usize
}

#[test]
fn fuzz_gguf_files() {
    let seeds = gguf_seeds();
    fuzz("GGUF files, mutated anywhere (`load::load_gguf_from`)", move || run_cases(&seeds, n_cases(), seed(0x66), CASE_LIMIT, load_gguf_bytes));
}

#[test]
fn fuzz_gguf_headers() {
    let files = gguf_seeds();
    // Most edits of a length-prefixed header break its framing; 1 in 200 must still load.
    fuzz_accepting("GGUF headers (metadata, dims, types, offsets)", 200, move || {
        split_cases(files.len(), n_cases(), |i, k| {
            let at = gguf_data_offset(&files[i]);
            let (head, data) = (files[i][..at].to_vec(), files[i][at..].to_vec());
            // The family's own data after the mutated header, which may now describe it wrongly.
            // Padded to the alignment as a writer would, so a header edit that keeps the
            // structure still finds its data.
            run_cases(&[head], k, seed(0x67 + i as u64), CASE_LIMIT, |h| {
                let pad = vec![0u8; (32 - h.len() % 32) % 32];
                load_gguf_bytes(&[h, &pad[..], &data[..]].concat())
            })
        })
    });
}

type Weights = Vec<(std::path::PathBuf, std::collections::HashMap<String, candle_core::Tensor>)>;

#[test]
fn fuzz_hf_config_json() {
    let fixtures: Vec<(String, Weights)> = fixtures()
        .into_iter()
        .map(|d| {
            let st = d.join("model.safetensors");
            let t = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
            (std::fs::read_to_string(d.join("config.json")).unwrap(), vec![(st, t)])
        })
        .collect();
    fuzz("HF config.json (`LlamaConfig::from_hf_json` + weights)", move || {
        split_cases(fixtures.len(), n_cases(), |i, k| {
            let (cfg_text, weights) = &fixtures[i];
            run_cases(&[cfg_text.clone().into_bytes()], k, seed(0xC0F + i as u64), CASE_LIMIT, |b| {
                let cfg = LlamaConfig::from_hf_json(&text(b)).map_err(|e| e.to_string())?;
                // With the family's weights: a config that does not fit them must be an error.
                let m = load::hf_model(cfg, weights.clone(), DType::F32, &Device::Cpu).map_err(|e| format!("{e:#}"))?;
                finite_logits(&m)
            })
        })
    });
}

fn load_safetensors(cfg: &str, b: &[u8]) -> Result<(), String> {
    let t = candle_core::safetensors::load_buffer(b, &Device::Cpu).map_err(|e| e.to_string())?;
    let cfg = LlamaConfig::from_hf_json(cfg).unwrap();
    let m = load::hf_model(cfg, vec![("fuzz.safetensors".into(), t)], DType::F32, &Device::Cpu).map_err(|e| format!("{e:#}"))?;
    finite_logits(&m)
}

#[test]
fn fuzz_safetensors() {
    let files: Vec<(String, Vec<u8>)> = fixtures()
        .into_iter()
        .map(|d| {
            (std::fs::read_to_string(d.join("config.json")).unwrap(), std::fs::read(d.join("model.safetensors")).unwrap())
        })
        .collect();
    fuzz("safetensors (`safetensors::load_buffer` + weights)", move || {
        split_cases(files.len(), n_cases(), |i, k| {
            let (cfg, whole) = &files[i];
            // Seeds: the header (8-byte length + JSON: names, dtypes, shapes, offsets), its data
            // appended back to each mutant; and the whole file, mutated anywhere.
            let n = 8 + u64::from_le_bytes(whole[..8].try_into().unwrap()) as usize;
            let (head, data) = (&whole[..n], &whole[n..]);
            run_cases(&[head.to_vec(), whole.clone()], k, seed(0x5AFE + i as u64), CASE_LIMIT, |b| {
                if b.len() < whole.len() / 2 {
                    load_safetensors(cfg, &[b, data].concat())
                } else {
                    load_safetensors(cfg, b)
                }
            })
        })
    });
}
