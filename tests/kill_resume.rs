//! Kill -9 at random points of a sweep, resume, and compare with the uninterrupted run (issue 17):
//! `road run --resume` must finish a killed run without losing finished cells, and give the
//! same outputs as a run that was never killed (`common::assert_same_outputs`). Kill points
//! come from a seeded stream (`ROAD_KILL_SEED`, default 0), so a failure is reproducible.
mod common;
use road_dii::util::rng::Rng;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const SPEC: &str = "experiments/tiny-equality-das.toml";

fn road(out: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_road"));
    c.args(args).env("ROAD_OUT", out).current_dir(env!("CARGO_MANIFEST_DIR"));
    c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    c
}

/// The one run folder under `out` (None before the run created it).
fn run_dir(out: &Path) -> Option<PathBuf> {
    let d = std::fs::read_dir(out.join("tiny-equality-das")).ok()?;
    let mut v: Vec<PathBuf> = d.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect();
    v.sort();
    assert!(v.len() <= 1, "a resume must not start a second folder: {v:?}");
    v.pop()
}

#[test]
fn killed_at_random_points_and_resumed_equals_uninterrupted() {
    let root = std::env::temp_dir().join(format!("road-kill-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let clean_out = root.join("clean");
    let t = Instant::now();
    assert!(road(&clean_out, &["run", SPEC]).status().unwrap().success());
    let full = t.elapsed();
    let clean = run_dir(&clean_out).unwrap();

    let seed: u64 = std::env::var("ROAD_KILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut rng = Rng::new(seed);
    let out = root.join("killed");
    let (mut kills, mut resumes) = (0, 0);
    // Up to three kills, each at a random point of what is left; then run to the end.
    for round in 0..4 {
        let dir = run_dir(&out);
        let args: Vec<String> = match &dir {
            Some(d) => vec!["run".into(), "--resume".into(), d.display().to_string()],
            None => vec!["run".into(), SPEC.into()],
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        resumes += usize::from(dir.is_some());
        let mut child = road(&out, &args).spawn().unwrap();
        if round == 3 {
            assert!(child.wait().unwrap().success(), "the last resume must finish the run");
            break;
        }
        let at = full.mul_f64(0.1 + 0.8 * rng.uniform());
        std::thread::sleep(at);
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL: nothing runs on the way out
            kills += 1;
        }
        let _ = child.wait();
        if let Some(d) = run_dir(&out) {
            // The folder of a killed run is never taken for a complete one.
            let complete = serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(d.join("summary.json")).unwrap_or_default())
                .ok()
                .and_then(|v| v["complete"].as_bool())
                == Some(true);
            assert!(!complete || !d.join("RUNNING").exists(), "round {round}: complete but still marked RUNNING");
        }
    }
    let got = run_dir(&out).unwrap();
    assert!(kills >= 1 && resumes >= 1, "the test must kill and resume at least once (kills {kills}, resumes {resumes})");
    // Every top-level file equal to the uninterrupted run's (clock fields aside): the same
    // comparison the shard and Slurm tests make.
    eprintln!("comparing after {kills} kills and {resumes} resumes (ROAD_KILL_SEED={seed})");
    common::assert_same_outputs(&clean, &got);
    assert!(!got.join("RUNNING").exists() && !got.join("INCOMPLETE").exists());
    let _ = std::fs::remove_dir_all(&root);
}
