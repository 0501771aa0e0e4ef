//! The peft adapters the RoAd paper compares against (LoRA, DoRA, OFT, BOFT) on SmolLM2-135M,
//! against the logits peft 0.21.2 computed with them (`../shared/reference/public_peft_*`).
mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use road_dii::adapters::{merge, AnyAdapter, BoftAdapter, DoraAdapter, OftAdapter};
use road_dii::model::{load, Fwd, LinearAdapter, Llama, LogitsAt, Proj};

const KINDS: [(&str, &str); 4] = [("lora", "lora"), ("dora", "dora"), ("oft", "oft"), ("boft", "boft")];

fn last(model: &Llama, ids: &[u32], ad: Option<&dyn LinearAdapter>) -> Tensor {
    let out = model.forward(&[ids.to_vec()], Fwd { adapter: ad, logits: LogitsAt::Last, ..Default::default() }).unwrap();
    out.logits.unwrap().get(0).unwrap()
}

fn fixture(name: &str) -> (std::path::PathBuf, Vec<u32>, Tensor, Vec<u32>) {
    let j = ref_json("public_peft_family.json");
    let t = ref_tensors("public_peft_family.safetensors");
    let info = &j["adapters"][name];
    (
        reference_dir().join(info["adapter_dir"].as_str().unwrap()),
        ids_of(&j["ids"]),
        t[&format!("peft_{name}.last_logits")].clone(),
        ids_of(&info["top5_ids"]),
    )
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("road-peft-family-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn peft_family_adapters_reproduce_peft_logits() {
    let m = smollm2();
    let plain = last(&m.model, &fixture("lora").1, None);
    for (name, kind) in KINDS {
        let (dir, ids, want, top5) = fixture(name);
        let ad = AnyAdapter::load(&dir, &m.model.cfg, &Device::Cpu).unwrap();
        assert_eq!(ad.kind(), kind);
        let got = last(&m.model, &ids, Some(&ad));
        let d = max_abs_diff(&got, &want);
        eprintln!("{name}: max |Δlogit| vs peft = {d:.2e}");
        assert!(d < 1e-3, "{name}: max |Δlogit| = {d}");
        // The adapter really acts (random non-identity init), so the comparison is not vacuous.
        assert!(max_abs_diff(&got, &plain) > 0.1, "{name}: adapter left the logits unchanged");
        let top: Vec<u32> = road_dii::generate::top_k(&got.to_vec1::<f32>().unwrap(), 5).iter().map(|x| x.0).collect();
        assert_eq!(top, top5, "{name}: top-5");

        // Saved by road in peft format and read back: the same adapter, bit for bit.
        let out = tmp(name);
        ad.save_peft(&out, "SmolLM2-135M-Instruct.Q4_1.gguf").unwrap();
        let back = AnyAdapter::load(&out, &m.model.cfg, &Device::Cpu).unwrap();
        assert_eq!(back.kind(), kind);
        assert_eq!(back.num_params(), ad.num_params());
        assert_eq!(max_abs_diff(&last(&m.model, &ids, Some(&back)), &got), 0.0, "{name}: save/load changed the logits");
        let _ = std::fs::remove_dir_all(&out);
    }
}

#[test]
fn merge_matches_peft_and_unmerge_restores_weights() {
    let m = smollm2();
    let mut l = load::load_path(&m.source, DType::F32, &Device::Cpu).unwrap();
    let keys = [(0, Proj::Q), (7, Proj::V), (29, Proj::Down)];
    let w0: Vec<Tensor> = keys.iter().map(|&(i, p)| l.model.proj_weight(i, p).clone()).collect();
    for (name, _) in KINDS {
        let (dir, ids, want, _) = fixture(name);
        let ad = AnyAdapter::load(&dir, &l.model.cfg, &Device::Cpu).unwrap();
        merge::merge(&mut l.model, &ad).unwrap();
        let d = max_abs_diff(&last(&l.model, &ids, None), &want);
        eprintln!("{name}: merged max |Δlogit| vs peft = {d:.2e}");
        assert!(d < 1e-3, "{name}: merged logits differ from peft's by {d}");
        merge::unmerge(&mut l.model, &ad).unwrap();
        for (k, w) in keys.iter().zip(&w0) {
            let d = max_abs_diff(l.model.proj_weight(k.0, k.1), w);
            assert!(d < 1e-4, "{name}: unmerge left layer {} {} off by {d}", k.0, k.1.hf_name());
        }
    }
}

#[test]
fn dora_unmerge_without_merge_is_a_clear_error() {
    let m = smollm2();
    let mut l = load::load_path(&m.source, DType::F32, &Device::Cpu).unwrap();
    let ad = AnyAdapter::load(&fixture("dora").0, &l.model.cfg, &Device::Cpu).unwrap();
    let e = merge::unmerge(&mut l.model, &ad).unwrap_err().to_string();
    assert!(e.contains("was not merged"), "{e}");
}

/// Other targets and a family with q/k/v biases (Qwen2): new adapters start as the identity,
/// act once perturbed, and merge exactly (the bias is left out of DoRA's and BOFT's scaling).
#[test]
fn new_adapters_on_other_targets_merge_exactly_with_biases() {
    let mut l = load::load_path(&reference_dir().join("hf-tiny-qwen2"), DType::F32, &Device::Cpu).unwrap();
    let ids = ids_of(&ref_json("hf-tiny-qwen2.reference.json")["prompts"][2]["ids"]);
    let targets = [Proj::K, Proj::V, Proj::O, Proj::Up];
    let cfg = l.model.cfg.clone();
    let mut rng = road_dii::util::rng::Rng::new(7);
    let dora = DoraAdapter::new(&l.model, 4, 8.0, 0.0, [0, 1], &targets, &mut rng).unwrap();
    let oft = OftAdapter::new(&cfg, 4, Some(5), [0, 1], &targets, &Device::Cpu).unwrap();
    let boft = BoftAdapter::new(&cfg, 2, 2, [1], &targets, &Device::Cpu).unwrap();
    let plain = last(&l.model, &ids, None);
    let mut all = vec![AnyAdapter::Dora(dora), AnyAdapter::Oft(oft), AnyAdapter::Boft(boft)];
    for ad in &all {
        assert!(max_abs_diff(&last(&l.model, &ids, Some(ad)), &plain) < 1e-5, "{}: identity at init", ad.kind());
    }
    let mut rng = road_dii::util::rng::Rng::new(8);
    let jiggle = |v: &candle_core::Var, rng: &mut road_dii::util::rng::Rng, scale: f32| {
        let n = rng.normal_tensor(v.dims(), scale, &Device::Cpu).unwrap();
        v.set(&(v.as_tensor() + n).unwrap()).unwrap();
    };
    for ad in all.iter_mut() {
        match ad {
            AnyAdapter::Dora(a) => a.vars().iter().for_each(|v| jiggle(v, &mut rng, 0.1)),
            AnyAdapter::Oft(a) => a.vars().iter().for_each(|v| jiggle(v, &mut rng, 0.1)),
            AnyAdapter::Boft(a) => a.vars().iter().for_each(|v| jiggle(v, &mut rng, 0.2)),
            _ => unreachable!(),
        }
    }
    for ad in &all {
        let adapted = last(&l.model, &ids, Some(ad));
        assert!(max_abs_diff(&adapted, &plain) > 1e-3, "{}: perturbed adapter must act", ad.kind());
        merge::merge(&mut l.model, ad).unwrap();
        let d = max_abs_diff(&last(&l.model, &ids, None), &adapted);
        assert!(d < 1e-4, "{}: merged vs unmerged {d}", ad.kind());
        merge::unmerge(&mut l.model, ad).unwrap();
        let d = max_abs_diff(&last(&l.model, &ids, None), &plain);
        assert!(d < 1e-4, "{}: unmerged vs plain {d}", ad.kind());
    }
}

#[test]
fn bad_block_sizes_are_one_line_errors() {
    let cfg = tiny_a().model.cfg.clone();
    let width = cfg.hidden_size;
    let e = OftAdapter::new(&cfg, width + 1, Some(5), [0], &[Proj::Q], &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("oft_block_size") && e.contains("q_proj") && !e.contains('\n'), "{e}");
    let e = BoftAdapter::new(&cfg, 3, 1, [0], &[Proj::Down], &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("boft_block_size 3") && e.contains("down_proj"), "{e}");
    let e = BoftAdapter::new(&cfg, width / 2, 3, [0], &[Proj::Q], &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("boft_n_butterfly_factor 3"), "{e}");
}
