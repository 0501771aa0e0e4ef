//! Timing of one training step's pieces on SmolLM2 (forward, differentiable forward, backward).
use candle_core::{DType, Device};
use road_dii::model::{registry, Fwd, LogitsAt, Proj, LinearAdapter};
use road_dii::adapters::{RoadAdapter, Variant};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    road_dii::pin_thread_count();
    let l = registry::load("smollm2-135m", DType::F32, &Device::Cpu, true)?;
    let m = &l.model;
    let ids: Vec<Vec<u32>> = (0..8).map(|r| (0..48).map(|i| ((r * 31 + i * 97) % 40000 + 100) as u32).collect()).collect();
    let ad = RoadAdapter::new_identity(&m.cfg, Variant::Road1, 64, 0..m.cfg.num_layers, &Proj::ALL, m.device())?;
    for (name, diff, adp) in [("fwd", false, false), ("fwd diff", true, false), ("fwd diff+road", true, true)] {
        let t = Instant::now();
        let out = m.forward(&ids, Fwd { logits: LogitsAt::None, differentiable: diff, adapter: if adp { Some(&ad as &dyn LinearAdapter) } else { None }, ..Default::default() })?;
        let s = out.hidden.sum_all()?;
        println!("{name}: {:.2}s", t.elapsed().as_secs_f64());
        if adp {
            let t = Instant::now();
            let g = s.backward()?;
            println!("backward: {:.2}s ({} grads)", t.elapsed().as_secs_f64(), g.get_ids().count());
        }
    }
    Ok(())
}
