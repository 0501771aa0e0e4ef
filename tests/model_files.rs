//! Hostile and corrupt model files (issue 17): each edit of a valid HF checkpoint or GGUF file
//! that used to panic, abort, or load into NaN / plausible wrong output is refused with one
//! line naming what is wrong — and the unedited file still loads.
mod common;
use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{DType, Device, Tensor};
use common::gguf::write_gguf_with;
use common::*;
use road_dii::model::load;
use std::path::{Path, PathBuf};

fn load_err(p: &Path) -> String {
    match load::load_path(p, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{} loaded but must be refused", p.display()),
        Err(e) => format!("{e:#}"),
    }
}

/// A copy of the tiny LLaMA checkpoint with its config.json edited by `edit`.
fn hf_copy(tag: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let src = reference_dir().join("hf-tiny-llama-a");
    let dir = fresh_dir("model-files", tag);
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    dir
}

#[test]
fn hf_configs_with_bad_values_name_the_key() {
    assert!(load::load_path(&hf_copy("ok", |_| {}), DType::F32, &Device::Cpu).is_ok());
    let cases: Vec<(&str, Box<dyn Fn(&mut serde_json::Value)>, &str)> = vec![
        ("heads0", Box::new(|c| c["num_attention_heads"] = 0.into()), "num_attention_heads = 0"),
        ("heads0-hd", Box::new(|c| { c["num_attention_heads"] = 0.into(); c["head_dim"] = 8.into(); }), "num_attention_heads = 0"),
        ("layers1e9", Box::new(|c| c["num_hidden_layers"] = serde_json::json!(1e9)), "`num_hidden_layers` must be a non-negative integer"),
        ("layers-huge", Box::new(|c| c["num_hidden_layers"] = serde_json::json!(4611686018427387904u64)), "num_hidden_layers = 4611686018427387904"),
        ("eps-neg", Box::new(|c| c["rms_norm_eps"] = serde_json::json!(-1e-5)), "rms_norm_eps = -0.00001 must be a finite number > 0"),
        ("theta0", Box::new(|c| c["rope_theta"] = serde_json::json!(0.0)), "rope_theta = 0"),
        ("theta-abc", Box::new(|c| c["rope_theta"] = "abc".into()), "`rope_theta` must be a number, got \"abc\""),
        ("tie-str", Box::new(|c| c["tie_word_embeddings"] = "yes".into()), "`tie_word_embeddings` must be true or false"),
        (
            "scale0",
            Box::new(|c| {
                c["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 0.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8})
            }),
            "rope_scaling.factor = 0",
        ),
        ("untied-no-head", Box::new(|c| c["tie_word_embeddings"] = false.into()), "no lm_head.weight"),
        ("fewer-layers", Box::new(|c| c["num_hidden_layers"] = 1.into()), "weights for blocks 0..=1 but num_hidden_layers = 1"),
    ];
    for (tag, edit, want) in cases {
        let e = load_err(&hf_copy(tag, edit));
        assert!(e.contains(want) && !e.contains('\n'), "{tag}: {e}");
    }
}

#[test]
fn nan_weights_are_refused_at_load() {
    let dir = hf_copy("nan", |_| {});
    let f = dir.join("model.safetensors");
    let mut ts = candle_core::safetensors::load(&f, &Device::Cpu).unwrap();
    let name = "model.layers.1.mlp.up_proj.weight";
    let w = &ts[name];
    let mut v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v[7] = f32::NAN;
    ts.insert(name.into(), Tensor::from_vec(v, w.dims(), &Device::Cpu).unwrap());
    candle_core::safetensors::save(&ts, &f).unwrap();
    let e = load_err(&dir);
    assert!(e.contains(name) && e.contains("NaN or infinite"), "{e}");
}

/// Header offsets of one tensor-info record: (dtype field, offset field).
fn tensor_info_fields(bytes: &[u8], name: &str) -> (usize, usize) {
    let mut key = (name.len() as u64).to_le_bytes().to_vec();
    key.extend_from_slice(name.as_bytes());
    let at = bytes.windows(key.len()).position(|w| w == key.as_slice()).expect("tensor name in header") + key.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let dtype = at + 4 + 8 * n_dims;
    (dtype, dtype + 4)
}

fn gguf(tag: &str, edit: impl FnOnce(&mut Vec<(String, gguf_file::Value)>)) -> PathBuf {
    let path = fresh_dir("model-files", tag).join("m.gguf");
    write_gguf_with("hf-tiny-llama-a", "llama", GgmlDType::Q4_1, &path, edit);
    path
}

fn set(md: &mut [(String, gguf_file::Value)], key: &str, v: gguf_file::Value) {
    md.iter_mut().find(|(k, _)| k == key).unwrap_or_else(|| panic!("{key}")).1 = v;
}

#[test]
fn gguf_metadata_edits_are_refused() {
    use gguf_file::Value as V;
    assert!(load::load_path(&gguf("g-ok", |_| {}), DType::F32, &Device::Cpu).is_ok());
    let n = common::tiny_a().model.cfg.num_layers;
    let cases: Vec<(&str, Box<dyn FnOnce(&mut Vec<(String, V)>)>, String)> = vec![
        ("g-align0", Box::new(|md| md.push(("general.alignment".into(), V::U32(0)))), "general.alignment = 0 must be a power of two".into()),
        ("g-align3", Box::new(|md| md.push(("general.alignment".into(), V::U32(3)))), "general.alignment = 3".into()),
        ("g-heads0", Box::new(|md| set(md, "llama.attention.head_count", V::U32(0))), "num_attention_heads = 0".into()),
        ("g-blocks-max", Box::new(|md| set(md, "llama.block_count", V::U32(u32::MAX))), "num_hidden_layers = 4294967295".into()),
        ("g-blocks-less", Box::new(move |md| set(md, "llama.block_count", V::U32(n as u32 - 1))), format!("weights for blocks 0..={} but llama.block_count = {}", n - 1, n - 1)),
        ("g-ctx", Box::new(|md| md.retain(|(k, _)| k != "llama.context_length")), "lacks llama.context_length".into()),
        ("g-eps", Box::new(|md| md.retain(|(k, _)| k != "llama.attention.layer_norm_rms_epsilon")), "lacks llama.attention.layer_norm_rms_epsilon".into()),
        ("g-theta-neg", Box::new(|md| set(md, "llama.rope.freq_base", V::F32(-1.0))), "rope_theta = -1".into()),
        ("g-theta-type", Box::new(|md| set(md, "llama.rope.freq_base", V::String("x".into()))), "llama.rope.freq_base must be a float".into()),
    ];
    for (tag, edit, want) in cases {
        let e = load_err(&gguf(tag, edit));
        assert!(e.contains(&want) && !e.contains('\n'), "{tag}: {e}");
    }
}

#[test]
fn gguf_tensor_layout_edits_are_refused() {
    let base = gguf("g-layout", |_| {});
    let bytes = std::fs::read(&base).unwrap();
    let name = "blk.0.attn_q.weight";
    let (dtype_at, off_at) = tensor_info_fields(&bytes, name);
    let dtype = u32::from_le_bytes(bytes[dtype_at..dtype_at + 4].try_into().unwrap());
    // ggml's type ids as the file stores them: Q4_0 = 2, Q4_1 = 3, Q8_0 = 8.
    assert_eq!(dtype, 3, "the fixture stores {name} as Q4_1");
    let off = u64::from_le_bytes(bytes[off_at..off_at + 8].try_into().unwrap());
    let patched = |tag: &str, f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = bytes.clone();
        f(&mut b);
        let p = base.with_file_name(format!("{tag}.gguf"));
        std::fs::write(&p, b).unwrap();
        load_err(&p)
    };
    // Q4_1 → Q4_0 / Q8_0: the region's size changes, so the next tensor is no longer where it sits.
    for ty in [2u32, 8] {
        let e = patched(&format!("type-{ty}"), &|b| b[dtype_at..dtype_at + 4].copy_from_slice(&ty.to_le_bytes()));
        assert!(e.contains("a changed type, shape or offset?") || e.contains("run past the end"), "{ty:?}: {e}");
    }
    let e = patched("off+1", &|b| b[off_at..off_at + 8].copy_from_slice(&(off + 1).to_le_bytes()));
    assert!(e.contains(&format!("{name}: offset {} is not a multiple of the alignment 32", off + 1)), "{e}");
    let e = patched("off+32", &|b| b[off_at..off_at + 8].copy_from_slice(&(off + 32).to_le_bytes()));
    assert!(e.contains("overlaps the tensor before it") || e.contains("leaves a gap"), "{e}");
    let e = patched("truncated", &|b| b.truncate(b.len() - 40));
    assert!(e.contains("run past the end of the file"), "{e}");
}
