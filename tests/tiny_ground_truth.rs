//! DAS ground truth on the shipped tiny equality model: the a==b variable can be found where a
//! causal model can hold it (position b after block 1) and not where it cannot (position a).
use road_dii::experiment::{outputs, run, RunOptions, Spec};

#[test]
fn das_finds_the_left_equality_at_b_and_not_at_a() {
    let out = std::env::temp_dir().join(format!("road-tiny-gt-{}", std::process::id()));
    std::env::set_var("ROAD_OUT", &out);
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/experiments/tiny-equality-das.toml");
    let spec = Spec::load(std::path::Path::new(file), &["sites.layers=[1]".to_string()]).unwrap();
    let s = run(&spec, &RunOptions::default(), &mut road_dii::experiment::events::Silent).unwrap();
    let m = outputs::read_metrics(&s.run_dir.join("metrics.csv")).unwrap();
    let test = |pos: &str| m.iter().find(|r| r.split == "test" && r.position == pos).unwrap().iia_answers;
    let (at_b, at_a) = (test("b"), test("a"));
    assert!(at_b >= 0.8, "IIA at b = {at_b}");
    assert!(at_a <= 0.6, "IIA at a = {at_a} (position a has not seen b)");
    assert!(at_b - at_a >= 0.25);
}
