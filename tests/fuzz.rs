//! Mutation fuzzing of the spec and data parsers (seeded, stable Rust): every mutant must give a
//! clear error or a spec/dataset that passes its own checks — never a panic, never a hang.
//! Counts go to docs/RELIABILITY.md (`cargo test --release --test fuzz -- --nocapture`).
//! Model files (GGUF, HF config.json, safetensors) are fuzzed in tests/fuzz_models.rs.
mod common;
use common::fuzzing::*;
use road_dii::experiment::Spec;
use road_dii::tokenizer::Tok;
use road_dii::util::fuzz::run_cases;

#[test]
fn fuzz_experiment_toml() {
    let seeds: Vec<Vec<u8>> = ["ioi-das", "ioi-patching", "ioi-road-dii", "capitals-boundless", "tiny-equality-das"]
        .iter()
        .map(|n| read(&format!("experiments/{n}.toml")))
        .collect();
    fuzz("experiment TOML (`Spec::from_toml`)", move || {
        run_cases(&seeds, n_cases(), seed(0xE1), CASE_LIMIT, |b| {
            let spec = Spec::from_toml(&text(b), "fuzz.toml").map_err(|e| e.to_string())?;
            // Accepted: the resolved spec re-parses, and its layers/sites resolve or fail cleanly.
            let again = Spec::from_toml(&spec.to_toml().expect("serialises"), "resolved").expect("a resolved spec re-parses");
            assert_eq!(again.to_toml().unwrap(), spec.to_toml().unwrap());
            let _ = spec.layer_list(30);
            let _ = spec.site_list();
            assert!(spec.task.sizes.iter().all(|&n| n <= road_dii::tasks::MAX_PAIRS_PER_SPLIT));
            assert!((0.0..=1.0).contains(&spec.task.min_accuracy) && spec.train.lr.is_finite());
            Ok(())
        })
    });
}

#[test]
fn fuzz_set_overrides() {
    // Mutated `--set` assignments on a valid file (the file itself stays as it is).
    let file = text(&read("experiments/ioi-das.toml"));
    let seeds: Vec<Vec<u8>> = ["train.lr=3e-3", "sites.layers=8..16", "intervention.kind=\"vanilla\"", "task.sizes=[4, 2, 2]", "name=\"x\""]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
    fuzz("`--set` overrides (`Spec::from_toml_with`)", move || {
        run_cases(&seeds, n_cases(), seed(0x5E7), CASE_LIMIT, |b| {
            let spec = Spec::from_toml_with(&file, "ioi-das.toml", &[text(b)]).map_err(|e| e.to_string())?;
            Spec::from_toml(&spec.to_toml().unwrap(), "resolved").expect("a resolved spec re-parses");
            Ok(())
        })
    });
}

#[test]
fn fuzz_finetune_spec() {
    let seeds: Vec<Vec<u8>> = ["sentiment-road1", "sentiment-road4", "sentiment-lora", "sentiment-full"]
        .iter()
        .map(|n| read(&format!("experiments/{n}.toml")))
        .collect();
    fuzz("fine-tune spec (`train::spec::parse`)", move || {
        run_cases(&seeds, n_cases(), seed(0xF7), CASE_LIMIT, |b| {
            let spec = road_dii::train::spec::parse(&text(b), &[]).map_err(|e| e.to_string())?;
            let again = road_dii::train::spec::parse(&spec.to_toml().unwrap(), &[]).expect("a resolved spec re-parses");
            assert_eq!(again.to_toml().unwrap(), spec.to_toml().unwrap());
            let c = spec.train_cfg().expect("a parsed spec gives a training config");
            assert!(c.lr.is_finite() && c.lr > 0.0 && c.steps > 0 && (0.0..1.0).contains(&c.warmup_ratio));
            Ok(())
        })
    });
}

/// Pairs in the tiny equality model's vocabulary (word-level: unknown words are `<unk>`).
const PAIRS: &str = r#"{"base": "s1 s1 s2 s2 =", "source": "s1 s3 s2 s2 =", "base_label": "true", "cf_label": "false", "positions": {"b": 1}, "split": "train"}
{"base": "s4 s5 s6 s6 =", "source": "s4 s4 s6 s6 =", "base_label": "false", "cf_label": "true", "positions": {"b": -4}, "split": "test"}
{"base": "s7 s7 s8 s9 =", "source": "s7 s0 s8 s9 =", "base_label": "false", "cf_label": "true"}
{"base": "s2 s3 s2 s2 =", "source": "s2 s2 s2 s2 =", "base_label": "false", "cf_label": "true", "source_label": "true", "split": "dev"}
"#;

#[test]
fn fuzz_jsonl_pairs() {
    let tok = Tok::from_file(&root().join("data/models/tiny-equality/tokenizer.json"), None, &[]).unwrap();
    let seeds = vec![PAIRS.as_bytes().to_vec(), format!("\u{feff}{PAIRS}").into_bytes()];
    fuzz("JSONL pairs (`tasks::jsonl`)", move || {
        run_cases(&seeds, n_cases(), seed(0x15), CASE_LIMIT, |b| {
            let ds = road_dii::tasks::jsonl::dataset_from_text(&tok, &text(b), "fuzz.jsonl", 0).map_err(|e| e.to_string())?;
            let pairs: Vec<_> = ds.train.iter().chain(&ds.dev).chain(&ds.test).collect();
            assert!(!pairs.is_empty());
            for p in pairs {
                for q in [&p.base, &p.source] {
                    assert!(!q.ids.is_empty() && q.positions.values().all(|&i| i < q.ids.len()), "{q:?}");
                }
                assert!(p.answers.contains(&p.cf_label) && p.answers.contains(&p.base.label));
                assert!(!p.answers.contains(&1), "an unknown label word became <unk>: {p:?}");
            }
            Ok(())
        })
    });
}

#[test]
fn fuzz_finetune_jsonl() {
    // Classification and prompt/completion files for `road finetune` (`data.source = "x.jsonl"`).
    let cls = "{\"text\": \"a fine day\", \"label\": \"positive\"}\n{\"text\": \"awful\", \"label\": \"negative\"}\n{\"text\": \"ok\", \"label\": 1}\n";
    let lm = "{\"prompt\": \"2+2=\", \"completion\": \"4\"}\n{\"prompt\": \"Hi\", \"completion\": \" there\"}\n";
    let seeds = vec![cls.as_bytes().to_vec(), lm.as_bytes().to_vec()];
    let labels = vec!["negative".to_string(), "positive".to_string()];
    fuzz("fine-tune JSONL data (`train::data`)", move || {
        run_cases(&seeds, n_cases(), seed(0xDA7A), CASE_LIMIT, |b| {
            let t = text(b);
            let c = road_dii::train::data::parse_cls_text(&t, "jsonl", &labels, "fuzz.jsonl");
            let l = road_dii::train::data::parse_lm_text(&t, "fuzz.jsonl");
            if let Ok(s) = &c {
                assert!(s.train.iter().chain(&s.dev).chain(&s.test).all(|e| e.label < 2 && !e.text.trim().is_empty()));
            }
            if let Ok(v) = &l {
                assert!(v.iter().all(|e| !e.prompt.is_empty() && !e.completion.is_empty()));
            }
            match (c, l) {
                (Err(a), Err(b)) => Err(format!("{a} / {b}")),
                _ => Ok(()),
            }
        })
    });
}
