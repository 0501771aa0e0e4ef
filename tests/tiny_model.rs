//! The tiny ground-truth equality model (data/models/tiny-equality) and the equality task (fast).
use candle_core::{DType, Device, D};
use road_dii::model::{registry, Fwd, Loaded, LogitsAt};
use road_dii::tasks::equality::{self, Variable};
use road_dii::tasks::Pair;
use road_dii::tiny::{self, TinyArch, TrainOpts};
use road_dii::util::rng::Rng;
use std::collections::BTreeSet;
use std::sync::OnceLock;

fn shipped() -> &'static Loaded {
    static M: OnceLock<Loaded> = OnceLock::new();
    M.get_or_init(|| registry::load("tiny-equality", DType::F32, &Device::Cpu, false).expect("load data/models/tiny-equality"))
}

/// The high-level model, written out plainly from the prompt text.
fn words(text: &str) -> Vec<&str> {
    text.split_whitespace().collect()
}
fn v1(text: &str) -> bool {
    let w = words(text);
    w[0] == w[1]
}
fn v2(text: &str) -> bool {
    let w = words(text);
    w[2] == w[3]
}

#[test]
fn shipped_model_loads_and_solves_equality() {
    let l = shipped();
    let c = &l.model.cfg;
    assert!(c.num_layers >= 2 && c.num_layers <= 4 && c.hidden_size <= 128, "{c:?}");
    assert!(c.num_kv_heads < c.num_heads, "GQA expected");
    let t_id = l.tok.token_to_id("true").unwrap();
    let f_id = l.tok.token_to_id("false").unwrap();
    // 500 fresh examples over all 30 symbols, balanced over (a==b, c==d), built here from scratch.
    let mut rng = Rng::new(987_654);
    let mut prompts = Vec::new();
    let mut labels = Vec::new();
    for i in 0..500 {
        let (e1, e2) = (i % 2 == 0, (i / 2) % 2 == 0);
        let mut pick = |eq: bool| {
            let a = rng.below(30);
            let b = if eq { a } else { (a + 1 + rng.below(29)) % 30 };
            (format!("s{a}"), format!("s{b}"))
        };
        let (a, b) = pick(e1);
        let (c2, d) = pick(e2);
        let text = format!("{a} {b} {c2} {d} =");
        labels.push(if (a == b) == (c2 == d) { t_id } else { f_id });
        let ids = l.tok.encode(&text).unwrap();
        assert_eq!(ids.len(), 5, "{text:?} -> {ids:?}");
        prompts.push(ids);
    }
    let out = l.model.forward(&prompts, Fwd { logits: LogitsAt::Last, ..Default::default() }).unwrap();
    let pred = out.logits.unwrap().argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap();
    let correct = pred.iter().zip(&labels).filter(|(p, l)| p == l).count();
    assert!(correct as f64 / 500.0 >= 0.99, "accuracy {correct}/500");
}

#[test]
fn shipped_checkpoint_is_a_small_hf_directory() {
    let dir = registry::shipped_models_dir().join("tiny-equality");
    let mut total = 0;
    for f in ["config.json", "model.safetensors", "tokenizer.json", "training_config.json"] {
        let m = std::fs::metadata(dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        total += m.len();
    }
    assert!(total < 4_000_000, "{total} bytes");
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "llama");
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert!(cfg["rope_theta"].is_number() && cfg["max_position_embeddings"].is_number());
    let tok: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap()).unwrap();
    assert_eq!(tok["model"]["type"], "WordLevel");
    assert_eq!(tok["pre_tokenizer"]["type"], "Whitespace");
    let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(tensors.values().all(|t| t.dtype() == DType::F32));
    assert!(tensors.contains_key("model.layers.0.self_attn.q_proj.weight"));
}

fn check_dataset(variable: Variable) {
    let tok = &shipped().tok;
    let sizes = [320, 160, 160];
    let ds = equality::dataset(tok, variable, sizes, 7).unwrap();
    let t_id = tok.token_to_id("true").unwrap();
    let f_id = tok.token_to_id("false").unwrap();
    let mut sym_sets: Vec<BTreeSet<String>> = Vec::new();
    for (split, n) in [(&ds.train, sizes[0]), (&ds.dev, sizes[1]), (&ds.test, sizes[2])] {
        assert_eq!(split.len(), n);
        let mut syms = BTreeSet::new();
        let (mut n_v1, mut n_v2, mut n_cf, mut n_base) = (0, 0, 0, 0);
        for p in split.iter() {
            check_pair(p, variable, t_id, f_id);
            for w in words(&p.base.text)[..4].iter().chain(&words(&p.source.text)[..4]) {
                syms.insert(w.to_string());
            }
            n_v1 += v1(&p.base.text) as usize + v1(&p.source.text) as usize;
            n_v2 += v2(&p.base.text) as usize + v2(&p.source.text) as usize;
            n_cf += (p.cf_label == t_id) as usize;
            n_base += (p.base.label == t_id) as usize;
        }
        // Stratified over the 16 (V1, V2) x (V1, V2) cells: exactly balanced for n % 16 == 0.
        assert_eq!(n_v1, n, "{variable:?}: V1 true in {n_v1} of {} prompts", 2 * n);
        assert_eq!(n_v2, n);
        assert_eq!(n_cf * 2, n, "{variable:?}: cf label true in {n_cf} of {n}");
        assert_eq!(n_base * 2, n);
        sym_sets.push(syms);
    }
    for i in 0..3 {
        for j in i + 1..3 {
            assert!(sym_sets[i].is_disjoint(&sym_sets[j]), "splits {i} and {j} share symbols");
        }
    }
    assert_eq!(sym_sets.iter().map(|s| s.len()).sum::<usize>(), 30);
    // Same seed, same pairs; another seed, other pairs.
    let again = equality::dataset(tok, variable, sizes, 7).unwrap();
    assert_eq!(again.test.iter().map(|p| &p.base.text).collect::<Vec<_>>(), ds.test.iter().map(|p| &p.base.text).collect::<Vec<_>>());
    let other = equality::dataset(tok, variable, sizes, 8).unwrap();
    assert_ne!(other.test.iter().map(|p| &p.base.text).collect::<Vec<_>>(), ds.test.iter().map(|p| &p.base.text).collect::<Vec<_>>());
}

fn check_pair(p: &Pair, variable: Variable, t_id: u32, f_id: u32) {
    let ans = |b: bool| if b { t_id } else { f_id };
    for pr in [&p.base, &p.source] {
        assert_eq!(pr.ids.len(), 5);
        assert_eq!(words(&pr.text)[4], "=");
        assert_eq!(pr.label, ans(v1(&pr.text) == v2(&pr.text)), "{:?}", pr.text);
        for (k, i) in [("a", 0), ("b", 1), ("c", 2), ("d", 3), ("eq", 4), ("last", 4)] {
            assert_eq!(pr.positions[k], i);
        }
    }
    let (b, s) = (&p.base.text, &p.source.text);
    let expected = match variable {
        Variable::Left => v1(s) == v2(b),
        Variable::Right => v1(b) == v2(s),
        Variable::Output => v1(s) == v2(s),
    };
    assert_eq!(p.cf_label, ans(expected), "{variable:?}: base {b:?} source {s:?}");
    assert_eq!(p.answers, vec![t_id, f_id]);
}

#[test]
fn equality_dataset_left() {
    check_dataset(Variable::Left);
}
#[test]
fn equality_dataset_right() {
    check_dataset(Variable::Right);
}
#[test]
fn equality_dataset_output() {
    check_dataset(Variable::Output);
}

#[test]
fn patching_the_final_residual_at_the_answer_position_transfers_the_output() {
    // Swapping the last block's output at `eq` replaces everything the head sees: the model then
    // answers for the source, which is the counterfactual label of `output`.
    let l = shipped();
    let cells = tiny::equality_patching(&l.model, &l.tok, Variable::Output, 128, 3).unwrap();
    let last = l.model.cfg.num_layers as i64 - 1;
    let c = cells.iter().find(|c| c.layer == last && c.position == "eq").unwrap();
    assert!(c.iia >= 0.99, "{c:?}");
    // Patching symbol `a` in the embeddings changes one input symbol, not the output variable.
    let e = cells.iter().find(|c| c.layer == -1 && c.position == "a").unwrap();
    assert!(e.iia < 0.9, "{e:?}");
}

#[test]
fn the_saved_iit_subspace_carries_a_eq_b_and_nothing_else_at_b_matters() {
    // The ground truth DAS is checked against: swapping the saved subspace at b of block 1
    // transfers a==b; swapping everything but it leaves the answer alone.
    let l = shipped();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/data/models/tiny-equality");
    let u = candle_core::safetensors::load(format!("{dir}/{}", tiny::IIT_SUBSPACE_FILE), &Device::Cpu).unwrap().remove("basis").unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(format!("{dir}/training_config.json")).unwrap()).unwrap();
    let layer = cfg["iit"]["layer"].as_u64().unwrap() as usize;
    assert_eq!(u.dims(), [cfg["iit"]["subspace_dims"].as_u64().unwrap() as usize, l.model.cfg.hidden_size]);
    let swap = tiny::iit_accuracy(&l.model, &l.tok, layer, Some(&u), false, Variable::Left, 1000, 77).unwrap();
    let rest = tiny::iit_accuracy(&l.model, &l.tok, layer, Some(&u), true, Variable::Left, 1000, 78).unwrap();
    assert!(swap >= 0.97 && rest >= 0.97, "subspace swap {swap}, complement swap {rest}");
    // And the subspace is not the whole story by accident: a random 2-dim subspace does nothing.
    let r = road_dii::intervene::orth::random_orthonormal(u.dim(0).unwrap(), l.model.cfg.hidden_size, 99, &Device::Cpu).unwrap();
    let other = tiny::iit_accuracy(&l.model, &l.tok, layer, Some(&r), false, Variable::Left, 1000, 79).unwrap();
    assert!(other <= 0.7, "a random subspace transfers a==b with accuracy {other}");
}

fn tiny_opts(seed: u64) -> TrainOpts {
    TrainOpts {
        arch: TinyArch { layers: 1, hidden: 32, heads: 2, kv_heads: 1, ffn: 64, ..Default::default() },
        iit_layer: 0,
        steps: 40,
        batch: 32,
        lr: 1e-2,
        warmup: 5,
        seed,
        eval_every: 0,
        ..Default::default()
    }
}

#[test]
fn short_training_run_reduces_the_loss_and_is_deterministic() {
    let a = tiny::train(&tiny_opts(5)).unwrap();
    let first: f32 = a.history[..5].iter().map(|h| h.1).sum::<f32>() / 5.0;
    let last: f32 = a.history[a.history.len() - 5..].iter().map(|h| h.1).sum::<f32>() / 5.0;
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    let b = tiny::train(&tiny_opts(5)).unwrap();
    let c = tiny::train(&tiny_opts(6)).unwrap();
    let flat = |t: &tiny::Trained| -> Vec<f32> {
        let mut v = Vec::new();
        for (_, w) in t.model.named_weights().unwrap() {
            v.extend(w.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        v
    };
    assert_eq!(flat(&a), flat(&b), "same seed, different weights");
    assert_ne!(flat(&a), flat(&c));
}
