//! SmolLM2-135M against transformers/peft fixtures in ../shared/reference.
mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use road_dii::model::{Collector, Fwd, LogitsAt, Site};
use road_dii::adapters::RoadAdapter;
use road_dii::tokenizer::Tok;

#[test]
fn gguf_tokenizer_matches_reference_ids() {
    let m = smollm2();
    let refj = ref_json("public.json");
    for p in refj["prompts"].as_array().unwrap() {
        let text = p["prompt"].as_str().unwrap();
        assert_eq!(m.tok.encode(text).unwrap(), ids_of(&p["ids"]), "prompt {text:?}");
    }
}

#[test]
fn gguf_tokenizer_matches_transformers_tokenizer_json() {
    let m = smollm2();
    let cfg = &m.model.cfg;
    let hf = Tok::from_file(&reference_dir().join("smollm2-tokenizer/tokenizer.json"), cfg.bos_token_id, &cfg.eos_token_ids).unwrap();
    let texts = [
        "Hello, world!",
        " leading space and  double  spaces\ttab\nnewline",
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
        "naïve façade — “quotes” … 日本語のテキスト 🙂🚀",
        "don't won't it's I'm we've they'll 12345 3.14159",
        "def f(x):\n    return x**2  # comment",
        "",
    ];
    for t in texts {
        assert_eq!(m.tok.encode(t).unwrap(), hf.encode(t).unwrap(), "text {t:?}");
        let ids = hf.encode(t).unwrap();
        assert_eq!(m.tok.decode(&ids).unwrap(), hf.decode(&ids).unwrap());
    }
}

#[test]
fn last_logits_and_hidden_norms_match_transformers() {
    let m = smollm2();
    let refj = ref_json("public.json");
    let reft = ref_tensors("public.safetensors");
    let n_layers = m.model.cfg.num_layers;
    for (i, p) in refj["prompts"].as_array().unwrap().iter().enumerate() {
        let ids = ids_of(&p["ids"]);
        let mut wanted = vec![(0, Site::BlockInput)];
        wanted.extend((0..n_layers).map(|l| (l, Site::BlockOutput)));
        let mut col = Collector::new(wanted);
        let out = m
            .model
            .forward(&[ids.clone()], Fwd { hooks: Some(&mut col), logits: LogitsAt::Last, ..Default::default() })
            .unwrap();
        let logits = out.logits.unwrap().get(0).unwrap();
        let expect = &reft[&format!("p{i}.last_logits")];
        let diff = max_abs_diff(&logits, expect);
        assert!(diff < 1e-3, "prompt {i}: max |Δlogit| = {diff}");

        let v = logits.to_vec1::<f32>().unwrap();
        let top = road_dii::generate::top_k(&v, 20);
        let top_ids: Vec<u32> = top.iter().map(|x| x.0).collect();
        assert_eq!(top_ids, ids_of(&p["top20_ids"]), "prompt {i}: top-20 ids");

        // Hidden states at the last position: embeddings, each block's output, final norm.
        let t = ids.len();
        let last = |x: &Tensor| x.get(0).unwrap().get(t - 1).unwrap();
        let mut hs = vec![last(col.get(0, Site::BlockInput).unwrap())];
        for l in 0..n_layers - 1 {
            hs.push(last(col.get(l, Site::BlockOutput).unwrap()));
        }
        hs.push(last(&out.hidden));
        let norms_ref: Vec<f64> = p["hidden_norms_last_pos"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert_eq!(hs.len(), norms_ref.len());
        let hidden_ref = &reft[&format!("p{i}.hidden_last_pos")];
        for (l, h) in hs.iter().enumerate() {
            let n = h.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap() as f64;
            let rel = (n - norms_ref[l]).abs() / norms_ref[l];
            assert!(rel < 1e-3, "prompt {i} layer {l}: norm {n} vs {}", norms_ref[l]);
            let hv = hidden_ref.get(l).unwrap();
            let d = max_abs_diff(h, &hv);
            assert!(d < 1e-3 * norms_ref[l] as f32 + 1e-4, "prompt {i} layer {l}: max |Δh| = {d}");
        }
    }
}

#[test]
fn peft_road_adapters_reproduce_peft_logits() {
    let m = smollm2();
    let refj = ref_json("public.json");
    let reft = ref_tensors("public.safetensors");
    for v in ["road_1", "road_2", "road_4"] {
        let info = &refj["peft_road"][v];
        let dir = reference_dir().join(info["adapter_dir"].as_str().unwrap());
        let ad = RoadAdapter::load_peft(&dir, &m.model.cfg, &Device::Cpu).unwrap();
        let ids = ids_of(&info["ids"]);
        let out = m
            .model
            .forward(&[ids], Fwd { adapter: Some(&ad), logits: LogitsAt::Last, ..Default::default() })
            .unwrap();
        let logits = out.logits.unwrap().get(0).unwrap();
        let diff = max_abs_diff(&logits, &reft[&format!("peft_{v}.last_logits")]);
        assert!(diff < 1e-3, "{v}: max |Δlogit| = {diff}");
        let top: Vec<u32> = road_dii::generate::top_k(&logits.to_vec1::<f32>().unwrap(), 5).iter().map(|x| x.0).collect();
        assert_eq!(top, ids_of(&info["top5_ids"]), "{v}: top-5");
    }
}

#[test]
fn bf16_logits_stay_close_to_f32() {
    let m = smollm2();
    let bf = road_dii::model::load::load_path(&m.source, DType::BF16, &Device::Cpu).unwrap();
    let ids = m.tok.encode("The capital of France is").unwrap();
    let a = m.model.forward(&[ids.clone()], Fwd { logits: LogitsAt::Last, ..Default::default() }).unwrap().logits.unwrap();
    let b = bf.model.forward(&[ids], Fwd { logits: LogitsAt::Last, ..Default::default() }).unwrap().logits.unwrap();
    let top_a = road_dii::generate::argmax(&a.get(0).unwrap().to_vec1::<f32>().unwrap());
    let top_b = road_dii::generate::argmax(&b.get(0).unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap());
    assert_eq!(top_a, top_b);
    assert!(max_abs_diff(&a, &b) < 1.0);
}
