//! Sharded runs without a scheduler: shards of one run id (`--shard i/n`, and `--shard auto`
//! from a Kubernetes Indexed Job's environment), one of them interrupted by SIGTERM mid-cell and
//! resumed, merged with `road merge-runs`: the merged folder equals the unsharded run
//! (`common::assert_same_outputs` says what "equal" means). tests/slurm.rs does the same under a
//! real Slurm.
mod common;
use common::{assert_same_outputs, fresh_dir, only_run, road_bin};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SPEC: &str = "experiments/tiny-equality-das.toml";

fn spec() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(SPEC).display().to_string()
}

#[test]
fn merged_shards_equal_the_unsharded_run_after_an_interrupted_shard_is_resumed() {
    let d = fresh_dir("road-shards", "merge");
    let (whole, split) = (d.join("whole"), d.join("split"));
    // 4 cells; 2 shards: shard 0 has cells 0 and 2, shard 1 cells 1 and 3.
    let (ok, _, err) = road_bin(&["run", &spec()], Some(&whole));
    assert!(ok, "{err}");
    let unsharded = only_run(&whole, "tiny-equality-das");

    let run = split.join("tiny-equality-das/r1");
    let shard0 = run.join("shards/0-of-2");
    // Shard 0, stopped by SIGTERM (what scancel and a pre-emption send) once its first cell is
    // stored, i.e. while its second cell trains.
    let mut child = Command::new(env!("CARGO_BIN_EXE_road"))
        .args(["run", &spec(), "--shard", "0/2", "--run-id", "r1"])
        .env("ROAD_OUT", &split)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !shard0.join("cells/0.toml").exists() {
        assert!(t0.elapsed() < Duration::from_secs(60), "shard 0 stored no cell within 60 s");
        assert!(child.try_wait().unwrap().is_none(), "shard 0 ended before its first cell was stored");
        std::thread::sleep(Duration::from_millis(10));
    }
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("interrupted"), "{err}");
    assert!(shard0.join("INCOMPLETE").exists() && !shard0.join("RUNNING").exists());
    assert!(!shard0.join("cells/2.toml").exists(), "the cut cell must not be stored as finished");

    // Shard 1 the way a Kubernetes Indexed Job runs it.
    let o = Command::new(env!("CARGO_BIN_EXE_road"))
        .args(["run", &spec(), "--shard", "auto", "--run-id", "r1"])
        .env("ROAD_OUT", &split)
        .env("JOB_COMPLETION_INDEX", "1")
        .env("ROAD_SHARD_COUNT", "2")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(run.join("shards/1-of-2/cells/3.toml").exists());

    let (ok, _, err) = road_bin(&["merge-runs", run.to_str().unwrap()], Some(&split));
    assert!(!ok && err.contains("incomplete") && err.contains("--allow-incomplete"), "{err}");

    // The same command again resumes shard 0: cell 0 is kept, cell 2 is redone.
    let (ok, _, err) = road_bin(&["run", &spec(), "--shard", "0/2", "--run-id", "r1"], Some(&split));
    assert!(ok, "{err}");
    assert!(err.contains("resuming: 1 of 2 cells left"), "{err}");
    let (ok, out, err) = road_bin(&["merge-runs", run.to_str().unwrap()], Some(&split));
    assert!(ok, "{err}");
    assert!(out.contains(&format!("into {}", run.display())), "{out}");
    assert_same_outputs(&unsharded, &run);
}

/// `road submit` without a cluster: `--dry-run` prints both scripts and writes nothing; bad
/// flags and a missing `sbatch` are one-line errors naming the cause.
#[test]
fn submit_dry_run_prints_the_scripts_and_errors_name_the_flag() {
    let d = fresh_dir("road-shards", "submit");
    let submit = |args: &[&str], path: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_road"));
        cmd.args(["submit", &spec()]).args(args).env("ROAD_OUT", d.join("out")).current_dir(env!("CARGO_MANIFEST_DIR"));
        if let Some(p) = path {
            cmd.env("PATH", p);
        }
        let o = cmd.output().unwrap();
        (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let (ok, out, err) = submit(&["--shards", "3", "--run-id", "r1", "--gpus-per-task", "1", "--partition", "gpu", "--dry-run"], None);
    assert!(ok, "{err}");
    let run = d.join("out/tiny-equality-das/r1");
    for want in [
        "#SBATCH --array=0-2\n".to_string(),
        "#SBATCH --requeue\n".into(),
        "#SBATCH --gpus-per-task=1\n".into(),
        "export ROAD_SHARD_COUNT=3\n".into(),
        format!("run {}/slurm/spec.toml --shard auto --run-id r1\n", run.display()),
        format!("merge-runs {}\n", run.display()),
        format!("sbatch --parsable --dependency=afterok:<array job id> {}/slurm/merge.sbatch", run.display()),
    ] {
        assert!(out.contains(&want), "no {want:?} in\n{out}");
    }
    assert!(!d.join("out").exists(), "--dry-run wrote files");

    for (args, want) in [
        (&["--shards", "0"][..], "--shards 0"),
        (&["--shards", "2", "--run-id", "r1", "--tasks", "2"][..], "task 2 is not below --shards 2"),
        (&["--shards", "2", "--time", "soon"][..], "--time \"soon\""),
        (&["--shards", "2", "--partition", "a b"][..], "--partition"),
        (&["--shards", "2", "--run-id", "../x"][..], "--run-id"),
    ] {
        let (ok, _, err) = submit(args, None);
        assert!(!ok && err.contains(want) && !err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: not one line: {err}");
    }
    let (ok, _, err) = submit(&["--shards", "2"], Some("/nonexistent"));
    assert!(!ok && err.contains("sbatch is not on PATH"), "{err}");
}

/// `road run FILE --procs 2`: two local worker processes, one shard each, merged — the same
/// outputs as the unsharded run; running it again with the same `--run-id` finds every cell done.
/// (`--gpus N` is the same pool with worker i on cuda:i; without a CUDA device it is refused.)
#[test]
fn a_local_worker_pool_equals_the_unsharded_run() {
    let d = fresh_dir("road-shards", "pool");
    let (whole, pooled) = (d.join("whole"), d.join("pooled"));
    let (ok, _, err) = road_bin(&["run", &spec()], Some(&whole));
    assert!(ok, "{err}");
    let unsharded = only_run(&whole, "tiny-equality-das");
    let (ok, out, err) = road_bin(&["run", &spec(), "--procs", "2", "--run-id", "p1"], Some(&pooled));
    assert!(ok, "{err}");
    assert!(out.contains("finished on 2 worker processes") && err.contains("worker 1/2 finished"), "{out}\n{err}");
    let run = pooled.join("tiny-equality-das/p1");
    assert_same_outputs(&unsharded, &run);
    let (ok, _, err) = road_bin(&["run", &spec(), "--procs", "2", "--run-id", "p1"], Some(&pooled));
    assert!(ok, "{err}");
    assert_same_outputs(&unsharded, &run);
    let (ok, _, err) = road_bin(&["run", &spec(), "--gpus", "2"], Some(&pooled));
    assert!(!ok && (err.contains("no CUDA device visible") || err.contains("only")), "{err}");
    let (ok, _, err) = road_bin(&["run", &spec(), "--procs", "0"], Some(&pooled));
    assert!(!ok && err.contains("--procs = 0"), "{err}");
}
