//! One process per GPU (or per CPU worker) on this machine: `road run FILE --gpus N` starts N
//! copies of this binary, worker i running shard i of N (`--shard i/N --run-id ID`, on
//! `cuda:i` with `--gpus`), waits for all, then merges the shards. It is the Slurm array's
//! contract run locally, so everything that holds there holds here: shards write disjoint
//! folders under one run id, a killed pool resumes by running the same command with the same
//! `--run-id` (finished cells are kept), and the merged folder equals an unsharded run.
use super::merge::merge_runs;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What `road run --gpus N | --procs N` asked for.
pub struct Pool<'a> {
    pub file: &'a Path,
    pub sets: &'a [String],
    pub workers: usize,
    /// Worker i on `cuda:i` (else every worker on the CPU, its cores split between them).
    pub gpus: bool,
    pub run_id: String,
    /// The sweep's name (its folder under the output root).
    pub name: String,
}

/// Largest pool: more processes than this on one machine is a typo, not a plan.
pub const MAX_WORKERS: usize = 64;

/// The run id a pool uses when none is given: a fresh one per invocation (printed, so the
/// same command with `--run-id` resumes it).
pub fn fresh_run_id() -> String {
    format!("local-{}", crate::runs::dirs::timestamp())
}

fn worker_args(p: &Pool, i: usize) -> Vec<String> {
    let mut a = Vec::new();
    if p.gpus {
        // A global flag: it must come before the subcommand.
        a.extend(["--device".to_string(), format!("cuda:{i}")]);
    }
    a.extend(["run".into(), p.file.display().to_string(), "--shard".into(), format!("{i}/{}", p.workers), "--run-id".into(), p.run_id.clone()]);
    for s in p.sets {
        a.extend(["--set".into(), s.clone()]);
    }
    a
}

/// Run the pool to the merged folder. `log` receives one line per event.
pub fn run(p: &Pool, log: &mut dyn FnMut(String)) -> Result<PathBuf> {
    if p.workers == 0 || p.workers > MAX_WORKERS {
        bail!("{} = {}: expected 1..={MAX_WORKERS} workers", if p.gpus { "--gpus" } else { "--procs" }, p.workers);
    }
    let exe = std::env::current_exe().context("cannot find the road binary to start the workers")?;
    let run_dir = crate::runs::dirs::out_root().join(&p.name).join(&p.run_id);
    let logs = run_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    // CPU workers share the cores: each gets its slice, so N workers do not oversubscribe them.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / p.workers).max(1);
    let mut children = Vec::with_capacity(p.workers);
    for i in 0..p.workers {
        let path = logs.join(format!("worker-{i}.log"));
        let f = std::fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut c = Command::new(&exe);
        c.args(worker_args(p, i)).stdout(Stdio::from(f.try_clone()?)).stderr(Stdio::from(f));
        if !p.gpus {
            c.env("RAYON_NUM_THREADS", threads.to_string());
        }
        // The scheduler variables of an enclosing job must not re-shard the workers.
        for k in ["SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX", "ROAD_SHARD_COUNT"] {
            c.env_remove(k);
        }
        let child = c.spawn().with_context(|| format!("starting worker {i}"))?;
        log(format!("worker {i}/{}: pid {}, {}, log {}", p.workers, child.id(), if p.gpus { format!("cuda:{i}") } else { format!("{threads} CPU threads") }, path.display()));
        children.push((i, child, path));
    }
    let mut failed = Vec::new();
    for (i, mut child, path) in children {
        let status = child.wait().with_context(|| format!("waiting for worker {i}"))?;
        if status.success() {
            log(format!("worker {i}/{} finished", p.workers));
        } else {
            let last = std::fs::read_to_string(&path).unwrap_or_default().lines().rev().find(|l| l.starts_with("error")).unwrap_or("").to_string();
            log(format!("worker {i}/{} failed ({status}): {last}", p.workers));
            failed.push(i);
        }
    }
    if !failed.is_empty() {
        bail!(
            "worker(s) {failed:?} of {} failed (logs in {}); finished cells are kept: run the same command with --run-id {} to resume",
            p.workers,
            logs.display(),
            p.run_id
        );
    }
    merge_runs(&[run_dir], None, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_get_their_shard_device_and_the_overrides() {
        let sets = vec!["train.steps=3".to_string()];
        let p = Pool { file: Path::new("x.toml"), sets: &sets, workers: 4, gpus: true, run_id: "r".into(), name: "x".into() };
        assert_eq!(worker_args(&p, 2).join(" "), "--device cuda:2 run x.toml --shard 2/4 --run-id r --set train.steps=3");
        let p = Pool { gpus: false, ..p };
        assert_eq!(worker_args(&p, 0).join(" "), "run x.toml --shard 0/4 --run-id r --set train.steps=3");
        let e = run(&Pool { workers: 0, ..p }, &mut |_| {}).unwrap_err().to_string();
        assert!(e.contains("--procs = 0"), "{e}");
    }
}
