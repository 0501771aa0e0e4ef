//! road's CUDA training kernels against the same ops on the CPU (whose fused ops are checked
//! against candle's autograd in their unit tests): forward values and the gradients of a random
//! linear functional of the output, on ragged shapes; RoAd's backward; AdamW's in-place update
//! and the gradient norm. Built only with `--features cuda` and run on a GPU machine
//! (`scripts/build-cuda.sh`; BENCHMARKS.md's H200 section has the command).
#![cfg(feature = "cuda")]
use candle_core::{Device, Tensor, Var};
use road_dii::adapters::dropout::dropout;
use road_dii::adapters::fused::try_fused;
use road_dii::adapters::fused_cuda::try_road_params;
use road_dii::adapters::{Rotation, Variant};
use road_dii::model::train_ops::{masked_softmax, try_rms_norm, try_rope, try_silu_mul};
use road_dii::train::optim::{global_norm, AdamW, AdamWConfig};
use road_dii::util::rng::Rng;

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device (this test is built for the GPU machine)")
}

/// Largest |a − b| relative to max(1, max |b|), both moved to the CPU.
fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (a.to_device(&Device::Cpu).unwrap(), b.to_device(&Device::Cpu).unwrap());
    let d = (&a - &b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let s = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1.0);
    d / s
}

/// `op` on CPU copies and on CUDA copies of `inputs` (the first `trained` of them as Vars):
/// outputs and every trained input's gradient must agree, and the gradients must not be zero.
fn check(name: &str, inputs: &[Tensor], trained: usize, op: impl Fn(&[Tensor]) -> Tensor, rng: &mut Rng) {
    let run = |dev: &Device, w: &Tensor| {
        let vars: Vec<Var> = inputs[..trained].iter().map(|t| Var::from_tensor(&t.to_device(dev).unwrap()).unwrap()).collect();
        let mut ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        ts.extend(inputs[trained..].iter().map(|t| t.to_device(dev).unwrap()));
        let y = op(&ts);
        let grads = (&y * w.to_device(dev).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
        let gs: Vec<Tensor> = vars.iter().map(|v| grads.get(v).unwrap_or_else(|| panic!("{name}: no gradient on {dev:?}")).clone()).collect();
        (y, gs)
    };
    let probe_shape = op(inputs).dims().to_vec();
    let w = rng.normal_tensor(&probe_shape, 1.0, &Device::Cpu).unwrap();
    let ((yc, gc), (yg, gg)) = (run(&Device::Cpu, &w), run(&gpu(), &w));
    assert!(yg.device().is_cuda(), "{name}: output left the GPU");
    let f = rel(&yg, &yc);
    assert!(f < 1e-5, "{name}: CUDA forward differs from the CPU's by {f} (relative)");
    for (i, (a, b)) in gg.iter().zip(&gc).enumerate() {
        let d = rel(a, b);
        assert!(d < 1e-5, "{name}: CUDA gradient of input {i} differs from the CPU's by {d} (relative)");
        assert!(rel(b, &b.zeros_like().unwrap()) > 0.0, "{name}: gradient of input {i} is zero");
    }
}

#[test]
fn cuda_training_ops_match_the_cpu() {
    let mut rng = Rng::new(5);
    let mut n = |shape: &[usize], s: f32| rng.normal_tensor(shape, s, &Device::Cpu).unwrap();
    let (x, w) = (n(&[3, 5, 40], 1.0), n(&[40], 1.0));
    let (g, u) = (n(&[7, 333], 6.0), n(&[7, 333], 1.0));
    let (b, h, t, hd) = (2, 3, 5, 8);
    let (xr, ang) = (n(&[b, h, t, hd], 1.0), n(&[b, t, hd / 2], 2.0));
    let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
    let (ts, s) = (4, 6);
    let scores = n(&[b, h, ts, s], 2.0);
    // Causal mask with a padded first key in batch row 1.
    let mut m = vec![0f32; b * ts * s];
    for bi in 0..b {
        for ti in 0..ts {
            for si in 0..s {
                if si > ti + (s - ts) || (bi == 1 && si == 0) {
                    m[(bi * ts + ti) * s + si] = -1e9;
                }
            }
        }
    }
    let mask = Tensor::from_vec(m, (b, 1, ts, s), &Device::Cpu).unwrap();
    let hh = n(&[4, 7, 64], 1.0);
    let mut rng = Rng::new(6);
    let fused = |o: Option<Tensor>, what: &str| o.unwrap_or_else(|| panic!("{what}: the fused op does not apply"));
    check("rms_norm (x and w trained)", &[x.clone(), w.clone()], 2, |t| fused(try_rms_norm(&t[0], &t[1], 1e-5).unwrap(), "rms"), &mut rng);
    check("rms_norm (w frozen)", &[x, w], 1, |t| fused(try_rms_norm(&t[0], &t[1], 1e-5).unwrap(), "rms"), &mut rng);
    check("silu_mul", &[g, u], 2, |t| fused(try_silu_mul(&t[0], &t[1]).unwrap(), "silu"), &mut rng);
    check("rope", &[xr, cos, sin], 1, |t| fused(try_rope(&t[0], &t[1], &t[2]).unwrap(), "rope"), &mut rng);
    check("masked_softmax", &[scores.clone(), mask], 1, |t| masked_softmax(&t[0], 0.35, Some(&t[1])).unwrap(), &mut rng);
    check("softmax (no mask)", &[scores], 1, |t| masked_softmax(&t[0], 0.35, None).unwrap(), &mut rng);
    // The device draws the mask the CPU draws from the same stream, and leaves it where the CPU does.
    let xd = Rng::new(8).normal_tensor(&[3, 7, 1000], 1.0, &Device::Cpu).unwrap();
    check("dropout", &[xd.clone()], 1, |t| dropout(&t[0], 0.25, &mut Rng::new(9)).unwrap(), &mut rng);
    let (mut a, mut b) = (Rng::new(9), Rng::new(9));
    dropout(&xd, 0.25, &mut a).unwrap();
    dropout(&xd.to_device(&gpu()).unwrap(), 0.25, &mut b).unwrap();
    assert_eq!(a.next_u64(), b.next_u64(), "dropout leaves the stream in another state on CUDA");
    // RoAd straight from (θ, α) on CUDA against the CPU's columns + fused apply, every variant.
    for (variant, g) in [(Variant::Road1, 16), (Variant::Road1, 64), (Variant::Road2, 16), (Variant::Road4, 16)] {
        let rot = Rotation { variant, group_size: g, dim: 64 };
        let np = variant.param_len(64);
        let (th, al) = (Rng::new(12).normal_tensor(&[np], 1.0, &Device::Cpu).unwrap(), (Rng::new(13).normal_tensor(&[np], 0.3, &Device::Cpu).unwrap() + 1.0).unwrap());
        check(&format!("road from params {variant:?} g={g}"), &[hh.clone(), th, al], 3, |t| {
            if t[0].device().is_cuda() {
                fused(try_road_params(&t[0], &t[1], &t[2], &rot).unwrap(), "road params")
            } else {
                let (f, s) = rot.columns(&t[1], &t[2]).unwrap();
                fused(try_fused(&t[0], &f, &s, g).unwrap(), "road")
            }
        }, &mut rng);
    }
}

/// Three AdamW steps (weight decay, a clip factor on the second) on both devices: parameters
/// and the gradient norm agree; the CUDA update is the in-place kernel.
#[test]
fn cuda_adamw_and_gradient_norm_match_the_cpu() {
    let mut rng = Rng::new(9);
    let shapes: [&[usize]; 3] = [&[1000], &[3, 5], &[1]];
    let init: Vec<Tensor> = shapes.iter().map(|s| rng.normal_tensor(s, 1.0, &Device::Cpu).unwrap()).collect();
    let grads: Vec<Vec<Tensor>> = (0..3).map(|_| shapes.iter().map(|s| rng.normal_tensor(s, 0.5, &Device::Cpu).unwrap()).collect()).collect();
    let run = |dev: &Device| {
        let params: Vec<(String, Var)> = init.iter().enumerate().map(|(i, t)| (format!("p{i}"), Var::from_tensor(&t.to_device(dev).unwrap()).unwrap())).collect();
        let mut opt = AdamW::new(params.clone(), AdamWConfig::with_weight_decay(0.01)).unwrap();
        let mut norms = Vec::new();
        for (k, gs) in grads.iter().enumerate() {
            let gs: Vec<Tensor> = gs.iter().map(|g| g.to_device(dev).unwrap()).collect();
            norms.push(global_norm(&gs).unwrap());
            opt.apply_scaled(&gs, 1e-2, if k == 1 { 0.5 } else { 1.0 }).unwrap();
        }
        (params.into_iter().map(|(_, v)| v.as_tensor().clone()).collect::<Vec<_>>(), norms)
    };
    let ((pc, nc), (pg, ng)) = (run(&Device::Cpu), run(&gpu()));
    for (a, b) in ng.iter().zip(&nc) {
        assert!((a - b).abs() / b < 1e-6, "gradient norm: CUDA {a} vs CPU {b}");
    }
    for (i, (a, b)) in pg.iter().zip(&pc).enumerate() {
        assert!(a.device().is_cuda());
        let d = rel(a, b);
        assert!(d < 1e-6, "parameter {i} after 3 AdamW steps: CUDA differs from the CPU by {d}");
        assert!(rel(b, &init[i]) > 1e-3, "parameter {i} did not move");
    }
}
