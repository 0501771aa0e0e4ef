//! Workloads beyond the forward on every family fixture: a RoAd adapter merged into the weights
//! (biases rotated too) equals it applied on the fly, and a saved HF checkpoint (config.json
//! with the family's keys, norms in the checkpoint's convention) reloads to the same logits.
mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use road_dii::adapters::{merge, AnyAdapter, RoadAdapter, Variant};
use road_dii::model::{load, Fwd, Llama, LogitsAt, Proj};

fn logits(m: &Llama, ids: &[u32], ad: Option<&RoadAdapter>) -> Tensor {
    let adapter = ad.map(|a| a as &dyn road_dii::model::LinearAdapter);
    m.forward(&[ids.to_vec()], Fwd { adapter, logits: LogitsAt::All, ..Default::default() }).unwrap().logits.unwrap()
}

#[test]
fn merged_road_and_saved_checkpoints_match_for_every_family() {
    for name in ["hf-tiny-mistral", "hf-tiny-qwen2", "hf-tiny-qwen3", "hf-tiny-gemma2"] {
        let mut l = load::load_path(&reference_dir().join(name), DType::F32, &Device::Cpu).unwrap();
        let ids = ids_of(&ref_json(&format!("{name}.reference.json"))["prompts"][2]["ids"]);
        let ad = RoadAdapter::new_identity(&l.model.cfg, Variant::Road2, 4, [0, 1], &[Proj::Q, Proj::K, Proj::V, Proj::Down], &Device::Cpu).unwrap();
        for (i, layer) in ad.layers.values().enumerate() {
            let n = layer.theta.elem_count();
            layer.theta.set(&Tensor::randn(0f32, 0.5, n, &Device::Cpu).unwrap()).unwrap();
            layer.alpha.set(&(Tensor::randn(0f32, 0.2, n, &Device::Cpu).unwrap() + (1.0 + i as f64 * 0.01)).unwrap()).unwrap();
        }
        let unmerged = logits(&l.model, &ids, Some(&ad));
        let plain = logits(&l.model, &ids, None);
        assert!(max_abs_diff(&unmerged, &plain) > 1e-2, "{name}: the adapter must change the logits");
        let any = AnyAdapter::Road(ad);
        merge::merge(&mut l.model, &any).unwrap();
        let merged = logits(&l.model, &ids, None);
        let d = max_abs_diff(&merged, &unmerged);
        assert!(d < 1e-4, "{name}: merged vs unmerged {d}");

        let dir = fresh_dir("families", name);
        merge::save_hf(&l.model, &l.tok, &dir).unwrap();
        let back = load::load_path(&dir, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(back.model.cfg.arch, l.model.cfg.arch, "{name}: knobs survive config.json");
        let d = max_abs_diff(&logits(&back.model, &ids, None), &merged);
        assert!(d < 1e-4, "{name}: reloaded checkpoint differs by {d}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
