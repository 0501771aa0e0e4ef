//! GGUF loading per tensor type and architecture: the tiny transformers checkpoints written as
//! llama.cpp-layout GGUF files (Q/K rows permuted for `llama`, q/k/v biases for `qwen2`, q/k
//! norms and head_dim 12 for `qwen3`), each
//! 2-D weight stored in one ggml type, must load to the same logits as the HF checkpoint with
//! the same round-tripped (quantised, de-quantised) weights. K-quants need rows of 256, which the
//! tiny models lack: Q4_K / Q6_K are covered by the real Qwen file (tests/parity_qwen.rs).
mod common;
use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{DType, Device};
use common::gguf::write_gguf;
use common::*;
use road_dii::model::{load, Fwd, Llama, LogitsAt};

#[test]
fn every_common_ggml_type_loads_for_llama_qwen2_and_qwen3() {
    let dir = fresh_dir("gguf-types", "all");
    let ids = vec![ids_of(&ref_json("hf-tiny-qwen2.reference.json")["prompts"][2]["ids"])];
    let types = [GgmlDType::F32, GgmlDType::F16, GgmlDType::BF16, GgmlDType::Q8_0, GgmlDType::Q5_0, GgmlDType::Q5_1, GgmlDType::Q4_0, GgmlDType::Q4_1];
    for (fixture, arch) in [("hf-tiny-llama-a", "llama"), ("hf-tiny-qwen2", "qwen2"), ("hf-tiny-qwen3", "qwen3")] {
        for ty in types {
            let path = dir.join(format!("{arch}-{ty:?}.gguf"));
            let want = write_gguf(fixture, arch, ty, &path);
            let got = load::load_path(&path, DType::F32, &Device::Cpu).unwrap();
            assert_eq!(got.format, "gguf");
            assert_eq!(got.model.cfg.arch.family, want.cfg.arch.family);
            assert_eq!(got.model.cfg.arch.qkv_bias, arch == "qwen2");
            assert_eq!((got.model.cfg.arch.qk_norm, got.model.cfg.head_dim), (arch == "qwen3", want.cfg.head_dim));
            let text = ref_json("hf-tiny-qwen2.reference.json")["prompts"][2]["prompt"].as_str().unwrap().to_string();
            assert_eq!(got.tok.encode(&text).unwrap(), ids[0], "{arch} {ty:?}: GGUF tokenizer ids");
            let run = |m: &Llama| m.forward(&ids, Fwd { logits: LogitsAt::All, ..Default::default() }).unwrap().logits.unwrap();
            let d = max_abs_diff(&run(&got.model), &run(&want));
            assert!(d < 1e-4, "{arch} {ty:?}: max |Δlogit| = {d}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unknown_gguf_architecture_fails_with_one_clear_line() {
    let dir = fresh_dir("gguf-types", "unknown");
    let path = dir.join("x.gguf");
    let md = [("general.architecture", &gguf_file::Value::String("mamba".into()))];
    gguf_file::write(&mut std::fs::File::create(&path).unwrap(), &md, &[]).unwrap();
    let e = format!("{:#}", load::load_path(&path, DType::F32, &Device::Cpu).err().expect("must fail"));
    assert!(e.contains("unsupported GGUF architecture \"mamba\"") && !e.contains('\n'), "{e}");
    let cfg = r#"{"model_type": "mamba", "architectures": ["MambaForCausalLM"]}"#;
    let e = road_dii::model::LlamaConfig::from_hf_json(cfg).unwrap_err().to_string();
    assert!(e.contains("unsupported architecture") && e.contains("gemma2") && !e.contains('\n'), "{e}");
}
