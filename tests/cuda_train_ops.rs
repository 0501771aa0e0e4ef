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

/// Causal (+ window) attention in f32 on the CPU: `q` `[b, nh, t, hd]`, `k`, `v` `[b, nkv, s, hd]`,
/// query `i` at position `s − t + i`; output `[b, t, nh·hd]`.
fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor, window: Option<usize>, scale: f64) -> Tensor {
    let f = |x: &Tensor| x.to_device(&Device::Cpu).unwrap().to_dtype(candle_core::DType::F32).unwrap();
    let (q, k, v) = (f(q), f(k), f(v));
    let (b, nh, t, hd) = q.dims4().unwrap();
    let (_, nkv, s, _) = k.dims4().unwrap();
    let rep = nh / nkv;
    let mut mask = vec![0f32; t * s];
    for i in 0..t {
        let qpos = s - t + i;
        for j in 0..s {
            if j > qpos || window.is_some_and(|w| qpos >= j + w) {
                mask[i * s + j] = f32::NEG_INFINITY;
            }
        }
    }
    let mask = Tensor::from_vec(mask, (t, s), &Device::Cpu).unwrap();
    let mut heads = Vec::new();
    for h in 0..nh {
        let (qh, kh, vh) = (q.narrow(1, h, 1).unwrap(), k.narrow(1, h / rep, 1).unwrap(), v.narrow(1, h / rep, 1).unwrap());
        let sc = (qh.matmul(&kh.t().unwrap()).unwrap() * scale).unwrap().broadcast_add(&mask).unwrap();
        let p = candle_nn::ops::softmax(&sc, candle_core::D::Minus1).unwrap();
        heads.push(p.matmul(&vh).unwrap()); // [b, 1, t, hd]
    }
    Tensor::cat(&heads, 1).unwrap().transpose(1, 2).unwrap().reshape((b, t, nh * hd)).unwrap()
}

#[test]
fn cuda_flash_attention_matches_f32_attention() {
    use candle_core::DType;
    use road_dii::model::flash_attn::try_flash_attention;
    let mut rng = Rng::new(9);
    // (b, nh, nkv, t, past, hd, window, strided): ragged tiles, GQA, a prefix, sliding windows
    // and the projections' [b, t, heads, hd] layout read through strides.
    let cases = [
        (2, 4, 4, 77, 0, 64, None, false),
        (1, 8, 2, 130, 0, 128, None, true),
        (2, 6, 2, 65, 40, 64, None, true),
        (1, 4, 1, 200, 0, 128, Some(48), true),
        (3, 2, 2, 3, 9, 64, Some(5), false),
    ];
    for (b, nh, nkv, t, past, hd, window, strided) in cases {
        let s = past + t;
        for dt in [DType::BF16, DType::F16] {
            let mut x = |heads: usize, rows: usize| {
                let raw = rng.normal_tensor(&[b, rows, heads, hd], 1.0, &Device::Cpu).unwrap().to_dtype(dt).unwrap().to_device(&gpu()).unwrap();
                if strided { raw.transpose(1, 2).unwrap() } else { raw.transpose(1, 2).unwrap().contiguous().unwrap() }
            };
            let (q, k, v) = (x(nh, t), x(nkv, s), x(nkv, s));
            let scale = 1.0 / (hd as f64).sqrt();
            let out = try_flash_attention(&q, &k, &v, window, scale).unwrap().expect("flash attention applies to these shapes");
            assert_eq!(out.dims(), &[b, t, nh * hd]);
            assert!(out.device().is_cuda() && out.dtype() == dt);
            let want = attention_reference(&q, &k, &v, window, scale);
            let got = out.to_dtype(DType::F32).unwrap();
            let err = rel(&got, &want);
            // bf16 rounds probabilities to 8 mantissa bits before the value product.
            let tol = if dt == DType::BF16 { 2e-2 } else { 4e-3 };
            assert!(err < tol, "flash {dt:?} b{b} nh{nh} nkv{nkv} t{t} past{past} hd{hd} window {window:?}: relative error {err}");
        }
    }
    // Off the kernel's domain it declines rather than answering wrongly.
    let q = rng.normal_tensor(&[1, 2, 8, 32], 1.0, &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap().to_device(&gpu()).unwrap();
    assert!(try_flash_attention(&q, &q, &q, None, 0.1).unwrap().is_none(), "head size 32 has no kernel");
}

#[test]
fn cuda_inference_silu_mul_matches_f32() {
    use candle_core::DType;
    use road_dii::model::infer_cuda::try_silu_mul;
    let mut rng = Rng::new(11);
    // 8-element vector loads plus a ragged tail.
    for shape in [[3usize, 5, 1000], [2, 7, 333]] {
        for dt in [DType::BF16, DType::F16] {
            let mut x = |s: f32| rng.normal_tensor(&shape, s, &Device::Cpu).unwrap().to_dtype(dt).unwrap();
            let (g, u) = (x(4.0), x(1.0));
            let got = try_silu_mul(&g.to_device(&gpu()).unwrap(), &u.to_device(&gpu()).unwrap()).unwrap().expect("applies to contiguous bf16/f16");
            assert_eq!(got.dtype(), dt);
            let (g32, u32_) = (g.to_dtype(DType::F32).unwrap(), u.to_dtype(DType::F32).unwrap());
            let want = (candle_nn::ops::silu(&g32).unwrap() * u32_).unwrap();
            let err = rel(&got.to_dtype(DType::F32).unwrap(), &want);
            let tol = if dt == DType::BF16 { 8e-3 } else { 1e-3 };
            assert!(err < tol, "silu·u {dt:?} {shape:?}: relative error {err}");
        }
    }
}

#[test]
fn cuda_inference_add_rms_matches_f32() {
    use candle_core::DType;
    use road_dii::model::infer_cuda::try_add_rms;
    let mut rng = Rng::new(12);
    for (rows, d) in [(37usize, 576usize), (3, 4096), (5, 8)] {
        for dt in [DType::BF16, DType::F16] {
            let mut x = |shape: &[usize]| rng.normal_tensor(shape, 1.0, &Device::Cpu).unwrap().to_dtype(dt).unwrap();
            let (a, b, w) = (x(&[rows, d]), x(&[rows, d]), x(&[d]));
            let on = |t: &Tensor| t.to_device(&gpu()).unwrap();
            let (s, n) = try_add_rms(&on(&a), &on(&b), &on(&w), 1e-5).unwrap().expect("applies to aligned bf16/f16 rows");
            assert_eq!((s.dims(), n.dims()), (a.dims(), a.dims()));
            // The sum is exactly the composed add; the norm is rms_norm of that stored sum.
            let want_s = (&a + &b).unwrap();
            assert_eq!(rel(&s.to_dtype(DType::F32).unwrap(), &want_s.to_dtype(DType::F32).unwrap()), 0.0, "sum {dt:?} {rows}x{d}");
            let s32 = want_s.to_dtype(DType::F32).unwrap();
            let want_n = candle_nn::ops::rms_norm_slow(&s32, &w.to_dtype(DType::F32).unwrap(), 1e-5).unwrap();
            let err = rel(&n.to_dtype(DType::F32).unwrap(), &want_n);
            let tol = if dt == DType::BF16 { 8e-3 } else { 1e-3 };
            assert!(err < tol, "add+rms {dt:?} {rows}x{d}: relative error {err}");
        }
    }
}

/// Replaces the residual stream at one (layer, site) with `x/2 + 1` (not scale-invariant, so
/// the next RMSNorm sees the change).
struct Halve(usize, road_dii::model::Site);
impl road_dii::model::Hooks for Halve {
    fn wants(&self, layer: usize, site: road_dii::model::Site) -> bool {
        (layer, site) == (self.0, self.1)
    }
    fn on(&mut self, _: usize, _: road_dii::model::Site, a: &Tensor, _: road_dii::model::SiteCtx) -> anyhow::Result<Option<Tensor>> {
        Ok(Some(a.affine(0.5, 1.0)?))
    }
}

/// A bf16 model on the GPU through road's inference kernels (flash attention, fused silu·up and
/// add+RMSNorm) against the same weights through candle's generic ops: no further from the f32
/// model than the generic bf16 path is, with hooks that replace the stream where the fused norm
/// would otherwise be reused, and with a KV cache (prefill, then one decode step).
#[test]
fn cuda_bf16_forward_with_road_kernels_tracks_f32() {
    use candle_core::DType;
    use road_dii::model::{Fwd, KvCache, Llama, LogitsAt, Site};
    let (cfg, weights) = random_smollm2_weights(13);
    let load = |dt: DType| {
        let ts = weights.iter().map(|(k, v)| (k.clone(), v.to_dtype(dt).unwrap().to_device(&gpu()).unwrap())).collect();
        Llama::load(candle_nn::VarBuilder::from_tensors(ts, dt, &gpu()), cfg.clone()).unwrap()
    };
    let (m32, m16) = (load(DType::F32), load(DType::BF16));
    let ids: Vec<Vec<u32>> = (0..2).map(|r| (0..77).map(|i| ((r * 7919 + i * 104729 + 17) % 40000 + 50) as u32).collect()).collect();
    let logits = |m: &Llama, hook: Option<(usize, Site)>| {
        let mut h = hook.map(|(l, s)| Halve(l, s));
        let fwd = Fwd { logits: LogitsAt::All, hooks: h.as_mut().map(|h| h as &mut dyn road_dii::model::Hooks), ..Default::default() };
        m.forward(&ids, fwd).unwrap().logits.unwrap().to_dtype(DType::F32).unwrap()
    };
    for hook in [None, Some((4, Site::ResidMid)), Some((7, Site::BlockOutput)), Some((29, Site::BlockOutput))] {
        let want = logits(&m32, hook);
        let fast = rel(&logits(&m16, hook), &want);
        let generic = road_dii::runtime::with_generic_ops(|| rel(&logits(&m16, hook), &want));
        assert!(fast <= 1.5 * generic + 1e-3, "hook {hook:?}: road's bf16 path is {fast} from f32, candle's generic bf16 path {generic}");
        if hook.is_some() {
            let moved = rel(&want, &logits(&m32, None));
            // bf16 noise is the yardstick: a hook the fast path ignored would be `moved` away.
            assert!(moved > 5.0 * fast.max(generic), "hook {hook:?} moves the logits by {moved}, bf16 noise is {fast}/{generic}: the check would not see it ignored");
        }
    }
    // Prefill 76 tokens into a cache, then decode the 77th: as close to the f32 model's last row
    // as the generic bf16 path's full forward is.
    let want = logits(&m32, None).narrow(1, 76, 1).unwrap().squeeze(1).unwrap();
    let generic = road_dii::runtime::with_generic_ops(|| rel(&logits(&m16, None).narrow(1, 76, 1).unwrap().squeeze(1).unwrap(), &want));
    let mut cache = KvCache::new(cfg.num_layers);
    let head: Vec<Vec<u32>> = ids.iter().map(|r| r[..76].to_vec()).collect();
    m16.forward(&head, Fwd { cache: Some(&mut cache), logits: LogitsAt::None, ..Default::default() }).unwrap();
    let tail: Vec<Vec<u32>> = ids.iter().map(|r| r[76..].to_vec()).collect();
    let step = m16.forward(&tail, Fwd { cache: Some(&mut cache), logits: LogitsAt::All, ..Default::default() }).unwrap().logits.unwrap();
    let err = rel(&step.to_dtype(DType::F32).unwrap().squeeze(1).unwrap(), &want);
    assert!(err <= 2.0 * generic + 1e-3, "cached decode is {err} from f32 (relative), the generic full forward {generic}");
}

/// A SmolLM2-shaped model with random weights (norm weights near 1, matrices std 0.02).
fn random_smollm2_weights(seed: u64) -> (road_dii::model::LlamaConfig, std::collections::HashMap<String, Tensor>) {
    let cfg = road_dii::model::random::preset("smollm2").unwrap();
    let mut rng = Rng::new(seed);
    let mut weights = std::collections::HashMap::new();
    for (name, shape) in road_dii::model::init::param_shapes(&cfg) {
        let t = if shape.len() == 1 { (Tensor::ones(shape.as_slice(), candle_core::DType::F32, &Device::Cpu).unwrap() + rng.normal_tensor(&shape, 0.1, &Device::Cpu).unwrap()).unwrap() } else { rng.normal_tensor(&shape, 0.02, &Device::Cpu).unwrap() };
        weights.insert(name, t);
    }
    (cfg, weights)
}

/// [`random_smollm2_weights`] as an f32 model on the GPU.
fn random_smollm2_f32_on_gpu(seed: u64) -> (road_dii::model::LlamaConfig, road_dii::model::Llama) {
    let (cfg, weights) = random_smollm2_weights(seed);
    let ts = weights.iter().map(|(k, v)| (k.clone(), v.to_device(&gpu()).unwrap())).collect();
    let m = road_dii::model::Llama::load(candle_nn::VarBuilder::from_tensors(ts, candle_core::DType::F32, &gpu()), cfg.clone()).unwrap();
    (cfg, m)
}

/// Intervention training (DAS, LoReFT, Boundless, RoAd-DII) on the GPU with its steps replayed from CUDA graphs
/// (`experiment::step_graph`) equals the eager steps: the same loss at every step and the same
/// trained parameters. Batches draw different rows every step from two position groups, so a
/// graph that had frozen the first batch's rows, targets, or a host-side value would drift at
/// once; the launch counter proves the replay really ran.
#[test]
fn cuda_graph_replayed_training_equals_eager_training() {
    use road_dii::experiment::cells::{train, Cell};
    use road_dii::experiment::data::cache_split;
    use road_dii::experiment::spec::TrainSpec;
    use road_dii::intervene::InterventionSpec;
    use road_dii::model::Site;
    use road_dii::tasks::{Pair, Prompt};
    let (cfg, m) = random_smollm2_f32_on_gpu(29);
    let mut rng = Rng::new(5);
    let mut prompt = |len: usize, x: usize| {
        let ids: Vec<u32> = (0..len).map(|_| 50 + rng.below(40000) as u32).collect();
        Prompt { text: String::new(), ids, label: 7, positions: [("x".to_string(), x)].into_iter().collect() }
    };
    // 24 pairs: 12 and 10 tokens, the intervened position 5 and 9 (two groups, two lengths).
    let pairs: Vec<Pair> = (0..24)
        .map(|i| {
            let (len, x) = if i % 2 == 0 { (12, 5) } else { (10, 9) };
            Pair { base: prompt(len, x), source: prompt(len, x), cf_label: 100 + (i as u32 * 37) % 900, answers: vec![100, 137] }
        })
        .collect();
    let layer = 20;
    // Boundless and RoAd-DII anneal a temperature every step: a replay reads it from the device.
    for (kind, site) in [("das", Site::BlockOutput), ("das", Site::ResidMid), ("loreft", Site::BlockOutput), ("boundless", Site::BlockOutput), ("road_dii", Site::BlockOutput)] {
        let sc = cache_split(&m, &pairs, &[(layer, site)]).unwrap();
        let cc = sc.cell(&pairs, layer, site, "x").unwrap();
        let cell = Cell { layer, site, position: "x".into(), cols: None, heads: String::new() };
        // Boundless trains a full d×d rotation: at DAS's rate its polar retraction diverges.
        let lr = if kind == "boundless" { 1e-3 } else { 2e-2 };
        let spec = TrainSpec { steps: 12, batch: 8, lr, eval_every: 0, ..Default::default() };
        let build = || InterventionSpec::from_kind(kind).unwrap().with_rank(2).build(cfg.hidden_size, 3, None, &gpu()).unwrap();
        let init: Vec<Tensor> = build().params().iter().map(|p| p.var.as_tensor().to_device(&Device::Cpu).unwrap()).collect();
        let run = || {
            let mut iv = build();
            let log = train(&m, &cell, &cc, &pairs, iv.as_mut(), &spec, 11, &std::sync::atomic::AtomicBool::new(false), None, &mut |_| {}).unwrap().log;
            let params: Vec<Tensor> = iv.params().iter().map(|p| p.var.as_tensor().to_device(&Device::Cpu).unwrap()).collect();
            (log.iter().map(|r| r.loss).collect::<Vec<f64>>(), params)
        };
        let (eager_loss, eager_params) = road_dii::runtime::graph::without(run);
        let before = road_dii::runtime::graph::launches();
        let (loss, params) = run();
        let label = format!("{kind} at {site}");
        assert_eq!(road_dii::runtime::graph::launches() - before, spec.steps, "{label}: every step should replay a graph");
        for (s, (a, b)) in loss.iter().zip(&eager_loss).enumerate() {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{label} step {s}: loss {a} replayed vs {b} eager");
        }
        for ((p, q), p0) in params.iter().zip(&eager_params).zip(&init) {
            let e = rel(p, q);
            assert!(e < 1e-4, "{label}: trained parameters differ by {e} (relative)");
            // The optimiser moved them (in place, where the graph reads them).
            assert!(rel(q, p0) > 1e-3, "{label}: training left a parameter at its initial value");
        }
    }
}

/// A patching sweep's cell evaluations replayed from CUDA graphs (`experiment::eval_graph`:
/// whole rows from the layer, one graph per base length, layer and site) equal the eager evaluations (the
/// clean prefix's cached keys/values): same predictions, logit differences and losses, at every
/// position, for the vanilla interchange and a trained-style kind (DAS at its initial rotation).
#[test]
fn cuda_graph_replayed_cell_evaluation_equals_eager_evaluation() {
    use road_dii::experiment::cells::Cell;
    use road_dii::experiment::data::{cache_split, Clean};
    use road_dii::experiment::evaluate::evaluate;
    use road_dii::intervene::InterventionSpec;
    use road_dii::model::Site;
    use road_dii::tasks::{Pair, Prompt};
    let (cfg, m) = random_smollm2_f32_on_gpu(31);
    let mut rng = Rng::new(9);
    let mut ids = |shared: &[u32], len: usize| -> Vec<u32> { shared.iter().copied().chain((shared.len()..len).map(|_| 50 + rng.below(40000) as u32)).collect() };
    // Bases and sources share their first 4 tokens: positions 0..4 are unchanged units.
    let pairs: Vec<Pair> = (0..40)
        .map(|i| {
            let shared = [11u32, 12, 13, 14];
            let p = |ids: Vec<u32>| Prompt { text: String::new(), ids, label: 300 + i as u32, positions: Default::default() };
            // Two base lengths (10 and 12 tokens): one graph each per layer and site.
            let len = if i % 3 == 0 { 12 } else { 10 };
            Pair { base: p(ids(&shared, len)), source: p(ids(&shared, 10)), cf_label: 100 + (i as u32 * 37) % 900, answers: vec![100, 137, 300 + i as u32] }
        })
        .collect();
    let clean: Vec<Clean> = vec![Clean { ld_base: 0.0, ld_source: 1.0, base_correct: true, source_correct: true }; pairs.len()];
    let clean: Vec<&Clean> = clean.iter().collect();
    let cells = [(0, Site::BlockOutput), (17, Site::BlockOutput), (29, Site::BlockOutput), (9, Site::ResidMid)];
    let sc = cache_split(&m, &pairs, &cells).unwrap();
    for kind in ["vanilla", "das"] {
        let iv = InterventionSpec::from_kind(kind).unwrap().with_rank(4).build(cfg.hidden_size, 3, None, &gpu()).unwrap();
        for &(layer, site) in &cells {
            for pos in 0..10 {
                let position = pos.to_string();
                let cc = sc.cell(&pairs, layer, site, &position).unwrap();
                let cell = Cell { layer, site, position: position.clone(), cols: None, heads: String::new() };
                let eager = road_dii::runtime::graph::without(|| evaluate(&m, &cell, &cc, &pairs, &clean, iv.as_ref()).unwrap());
                let before = road_dii::runtime::graph::launches();
                let e = evaluate(&m, &cell, &cc, &pairs, &clean, iv.as_ref()).unwrap();
                let label = format!("{kind} L{layer} {site} @{pos}");
                // Positions 0..4 hold the shared prefix: no row changes there, nothing is run.
                let launched = road_dii::runtime::graph::launches() - before;
                assert!(launched == 2 || (pos < 4 && launched == 0), "{label}: the evaluation replayed {launched} graphs, expected one per base length");
                assert!((e.logit_diff - eager.logit_diff).abs() < 1e-4, "{label}: logit diff {} replayed vs {} eager", e.logit_diff, eager.logit_diff);
                assert!((e.loss - eager.loss).abs() < 1e-4, "{label}: loss {} replayed vs {} eager", e.loss, eager.loss);
                assert_eq!((e.iia_vocab, e.iia_answers), (eager.iia_vocab, eager.iia_answers), "{label}: IIA");
                for (a, b) in e.examples.iter().zip(&eager.examples) {
                    assert_eq!((a.0, a.1), (b.0, b.1), "{label}: predicted token of example {}", b.0);
                    assert!((a.3 - b.3).abs() < 1e-4, "{label}: example {} logit diff {} vs {}", b.0, a.3, b.3);
                }
            }
        }
    }
}
