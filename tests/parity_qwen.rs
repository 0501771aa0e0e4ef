//! Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, qwen2: q/k/v bias, GPT-2 byte-level BPE with the
//! `qwen2` pre-tokenizer) against transformers' fixtures in ../shared/reference. The model is
//! fetched into the cache on first use and loaded once for this test binary (f32: ~2.5 GB).
mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use road_dii::model::{registry, Collector, Fwd, Loaded, LogitsAt, Site};
use road_dii::tokenizer::Tok;
use std::sync::OnceLock;

fn qwen() -> &'static Loaded {
    static M: OnceLock<Loaded> = OnceLock::new();
    M.get_or_init(|| registry::load("qwen2.5-coder-0.5b", DType::F32, &Device::Cpu, true).expect("load qwen2.5-coder-0.5b"))
}

#[test]
fn config_is_read_from_gguf_metadata() {
    let c = &qwen().model.cfg;
    assert_eq!(c.arch.family, road_dii::model::config::Family::Qwen2);
    assert!(c.arch.qkv_bias && !c.tie_word_embeddings);
    assert_eq!((c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim), (24, 896, 14, 2, 64));
    assert_eq!((c.intermediate_size, c.vocab_size), (4864, 151936));
    assert_eq!(c.rope_theta, 1e6);
}

#[test]
fn gguf_tokenizer_matches_transformers_tokenizer_json() {
    let m = qwen();
    let hf = Tok::from_file(&reference_dir().join("qwen2.5-tokenizer/tokenizer.json"), None, &[]).unwrap();
    let texts = [
        "Hello, world!",
        " leading space and  double  spaces\ttab\nnewline\n\n\n   trailing   ",
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<tool_call>",
        "naïve façade — “quotes” … Ünïcödé café résumé",
        "東京は日本の首都です。中文分词测试，한국어 텍스트",
        "emoji 🙂🚀👩‍👩‍👧 flags 🇯🇵",
        "don't won't it's I'm we've they'll WE'RE 12345 3.14159 1,000,000",
        "def fibonacci(n):\n    if n < 2:\n        return n\n\treturn fibonacci(n-1) + fibonacci(n-2)  # comment\r\n",
        "fn main() { let x: Vec<u8> = vec![0x1f; 32]; println!(\"{x:?}\"); }",
        "    \n\t\t  \u{a0}nbsp",
        "",
    ];
    for t in texts {
        let ids = hf.encode(t).unwrap();
        assert_eq!(m.tok.encode(t).unwrap(), ids, "text {t:?}");
        assert_eq!(m.tok.decode(&ids).unwrap(), hf.decode(&ids).unwrap(), "decode {t:?}");
    }
}

#[test]
fn last_logits_ids_and_hidden_norms_match_transformers() {
    let m = qwen();
    let refj = ref_json("qwen2.5-0.5b.json");
    let reft = ref_tensors("qwen2.5-0.5b.safetensors");
    let n_layers = m.model.cfg.num_layers;
    let mut worst = 0f32;
    for (i, p) in refj["prompts"].as_array().unwrap().iter().enumerate() {
        let ids = ids_of(&p["ids"]);
        assert_eq!(m.tok.encode(p["prompt"].as_str().unwrap()).unwrap(), ids, "prompt {i}: token ids");
        let mut wanted = vec![(0, Site::BlockInput)];
        wanted.extend((0..n_layers).map(|l| (l, Site::BlockOutput)));
        let mut col = Collector::new(wanted);
        let out = m.model.forward(&[ids.clone()], Fwd { hooks: Some(&mut col), logits: LogitsAt::Last, ..Default::default() }).unwrap();
        let logits = out.logits.unwrap().get(0).unwrap();
        let diff = max_abs_diff(&logits, &reft[&format!("p{i}.last_logits")]);
        assert!(diff < 2e-3, "prompt {i}: max |Δlogit| = {diff}");
        worst = worst.max(diff);
        let top: Vec<u32> = road_dii::generate::top_k(&logits.to_vec1::<f32>().unwrap(), 20).iter().map(|x| x.0).collect();
        // Near-ties below the tolerance may swap places at the tail of the top 20; the top 5 may not.
        assert_eq!(top[..5], ids_of(&p["top20_ids"])[..5], "prompt {i}: top-5 ids");
        let t = ids.len();
        let last = |x: &Tensor| x.get(0).unwrap().get(t - 1).unwrap();
        let mut hs = vec![last(col.get(0, Site::BlockInput).unwrap())];
        hs.extend((0..n_layers - 1).map(|l| last(col.get(l, Site::BlockOutput).unwrap())));
        hs.push(last(&out.hidden));
        let norms: Vec<f64> = p["hidden_norms_last_pos"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert_eq!(hs.len(), norms.len());
        for (l, h) in hs.iter().enumerate() {
            let n = h.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap() as f64;
            assert!((n - norms[l]).abs() / norms[l] < 1e-3, "prompt {i} layer {l}: norm {n} vs {}", norms[l]);
        }
    }
    eprintln!("qwen2.5-coder-0.5b: max |Δ last logit| over {} prompts = {worst:.2e}", refj["prompts"].as_array().unwrap().len());
}

#[test]
fn bf16_keeps_weights_bf16_and_the_answer() {
    let m = qwen();
    let bf = road_dii::model::load::load_path(&m.source, DType::BF16, &Device::Cpu).unwrap();
    assert_eq!(bf.model.dtype(), DType::BF16);
    assert_eq!(bf.model.proj_weight(0, road_dii::model::Proj::Q).dtype(), DType::BF16);
    let ids = m.tok.encode("When Mary and John went to the store, John gave a drink to").unwrap();
    let run = |l: &Loaded| {
        let lg = l.model.forward(&[ids.clone()], Fwd { logits: LogitsAt::Last, ..Default::default() }).unwrap().logits.unwrap();
        road_dii::generate::argmax(&lg.get(0).unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap())
    };
    let mary = m.tok.encode(" Mary").unwrap();
    assert_eq!(mary.len(), 1);
    assert_eq!(run(m) as u32, mary[0], "f32 answers \" Mary\"");
    assert_eq!(run(&bf) as u32, mary[0], "bf16 answers \" Mary\"");
}
