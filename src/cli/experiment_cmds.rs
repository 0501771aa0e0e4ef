//! `road run FILE` and `road merge-runs`: experiments headless, sharded, resumed.
use crate::runs::events::ProgressPrinter;
use crate::experiment::{run, RunOptions, Spec};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

pub fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let (i, n) = s.split_once('/').with_context(|| format!("--shard {s:?}: expected i/n, e.g. 0/4"))?;
    let num = |x: &str| -> Result<usize> {
        x.trim().parse().with_context(|| format!("--shard {s:?}: {x:?} is not a shard number (expected i/n, e.g. 0/4)"))
    };
    let (i, n) = (num(i)?, num(n)?);
    if n == 0 || i >= n {
        bail!("--shard {i}/{n}: need 0 <= i < n");
    }
    Ok((i, n))
}

/// `--jobs N` or `auto` (one per core).
pub fn parse_jobs(s: &str) -> Result<usize> {
    if s == "auto" {
        return Ok(std::thread::available_parallelism().map_or(1, |n| n.get()));
    }
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => bail!("--jobs {s:?}: expected a number >= 1 or `auto`"),
    }
}

/// How `road run` runs a sweep (its flags).
pub struct RunHow {
    pub shard: Option<String>,
    pub run_id: Option<String>,
    pub resume: Option<PathBuf>,
    pub jobs: usize,
    pub json: bool,
    pub fresh: bool,
}

/// `--shard auto` (and the default inside a Slurm array task): the shard from the scheduler's
/// environment. Slurm: SLURM_ARRAY_TASK_ID with SLURM_ARRAY_TASK_COUNT (or _MIN/_MAX); Kubernetes
/// Indexed Jobs: JOB_COMPLETION_INDEX with ROAD_SHARD_COUNT. `ROAD_SHARD_COUNT` overrides the
/// count everywhere, and with it the task id is the shard index as it is (the submission's array
/// is 0..n-1): a task resubmitted alone (`--array=1`) sees a count of 1 and a minimum of 1, so
/// neither may be read from the environment then. Without it an array `a-b` is shards 0..b-a.
pub fn shard_from_env(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<(usize, usize)>> {
    let num = |k: &str| -> Result<Option<usize>> {
        match get(k) {
            None => Ok(None),
            Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| anyhow::anyhow!("{k}={v:?} is not a number")),
        }
    };
    let (index, count) = if let Some(i) = num("SLURM_ARRAY_TASK_ID")? {
        let count = match (num("ROAD_SHARD_COUNT")?, num("SLURM_ARRAY_TASK_COUNT")?, num("SLURM_ARRAY_TASK_MIN")?, num("SLURM_ARRAY_TASK_MAX")?) {
            (Some(n), ..) => n,
            (None, Some(n), ..) => n,
            (None, None, Some(lo), Some(hi)) if hi >= lo => hi - lo + 1,
            _ => bail!("SLURM_ARRAY_TASK_ID is set but not the array's size (SLURM_ARRAY_TASK_COUNT / _MIN / _MAX, or ROAD_SHARD_COUNT)"),
        };
        let lo = if num("ROAD_SHARD_COUNT")?.is_some() { 0 } else { num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0) };
        (i.checked_sub(lo).unwrap_or(i), count)
    } else if let Some(i) = num("JOB_COMPLETION_INDEX")? {
        let Some(n) = num("ROAD_SHARD_COUNT")? else { bail!("JOB_COMPLETION_INDEX is set: give the number of shards in ROAD_SHARD_COUNT") };
        (i, n)
    } else {
        return Ok(None);
    };
    if count == 0 || index >= count {
        bail!("shard from the environment: index {index} is not below the count {count}");
    }
    Ok(Some((index, count)))
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

/// SIGINT / SIGTERM / SIGHUP ask the run to stop at its next step and mark its folder INCOMPLETE
/// (resumable); a second signal ends the process at once (the folder then reads as crashed and
/// still resumes from its stored cells).
fn stop_on_signals(cancel: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::Ordering;
    let _ = ctrlc::set_handler(move || {
        if cancel.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupted: stopping after the current step and marking the run INCOMPLETE (again to quit at once)");
    });
}

/// `road run FILE --gpus N | --procs N`: N local worker processes, one shard each, then merged.
pub fn run_pool(file: &Path, sets: &[String], workers: usize, gpus: bool, run_id: Option<String>) -> Result<()> {
    if gpus {
        let visible = crate::runtime::cuda_device_count();
        if visible == 0 {
            bail!("--gpus {workers}: no CUDA device visible to this build (a CUDA build: scripts/build-cuda.sh; on the CPU use --procs {workers})");
        }
        if workers > visible {
            bail!("--gpus {workers}: only {visible} CUDA device(s) visible (CUDA_VISIBLE_DEVICES decides which)");
        }
    }
    let spec = Spec::load(file, sets)?;
    let run_id = run_id.unwrap_or_else(crate::experiment::local_pool::fresh_run_id);
    crate::runs::check_name("--run-id", &run_id)?;
    let pool = crate::experiment::local_pool::Pool { file, sets, workers, gpus, run_id: run_id.clone(), name: spec.name.clone() };
    let t0 = std::time::Instant::now();
    let merged = crate::experiment::local_pool::run(&pool, &mut |l| eprintln!("{l}"))?;
    println!("{} finished on {workers} {} in {:.1}s (run id {run_id}); merged outputs in {}", spec.name, if gpus { "GPUs" } else { "worker processes" }, t0.elapsed().as_secs_f64(), merged.display());
    Ok(())
}

pub fn run_file(file: Option<&Path>, sets: &[String], how: RunHow) -> Result<()> {
    let (spec, shard) = match (&how.resume, file) {
        (Some(dir), _) => {
            let config = std::fs::read_to_string(dir.join("config.toml")).with_context(|| format!("--resume {}: no config.toml there", dir.display()))?;
            let spec = Spec::from_toml(&config, &format!("{}/config.toml", dir.display()))?;
            (spec, crate::experiment::runner::shard_of(&config))
        }
        (None, Some(file)) => {
            let text = std::fs::read_to_string(file).with_context(|| format!("cannot read experiment file {}", file.display()))?;
            if crate::pilot::is_pilot(&text) {
                if how.shard.is_some() || how.run_id.is_some() {
                    bail!("--shard / --run-id apply to intervention sweeps, not to a pilot study");
                }
                return run_pilot_file(file, sets, how.json, how.fresh);
            }
            let shard = match how.shard.as_deref() {
                Some("auto") => Some(shard_from_env(&env)?.context("--shard auto: no SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX in the environment")?),
                Some(s) => Some(parse_shard(s)?),
                None => shard_from_env(&env)?,
            };
            (Spec::load(file, sets)?, shard)
        }
        (None, None) => bail!("road run needs an experiment file, or --resume RUN_DIR"),
    };
    let run_id = how.run_id.clone().or_else(|| if shard.is_some() { env("SLURM_ARRAY_JOB_ID") } else { None });
    let opts = RunOptions { shard, jobs: how.jobs, run_id, resume: how.resume.clone(), ..Default::default() };
    stop_on_signals(opts.cancel.clone());
    let mut printer = ProgressPrinter::new(false);
    let summary = run(&spec, &opts, &mut printer)?;
    if opts.cancel.load(std::sync::atomic::Ordering::Relaxed) && !summary.complete {
        bail!("interrupted; finished cells are kept: `road run --resume {}` finishes the run", summary.run_dir.display());
    }
    if how.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("{} finished in {:.1}s; outputs in {}", spec.name, summary.seconds, summary.run_dir.display());
        let mut best: Vec<_> = summary.cells.iter().collect();
        if spec.intervention.kind_name() == "atp" {
            // No IIA: the cells whose estimated patched logit difference is highest.
            best.sort_by(|a, b| b.test_logit_diff.total_cmp(&a.test_logit_diff));
            for c in best.iter().take(5) {
                println!("  {:<40} estimated logit diff {:+.3}", c.label, c.test_logit_diff);
            }
            if let Ok(v) = std::fs::read_to_string(summary.run_dir.join("verify_summary.json")) {
                println!("  verification: {}", summary.run_dir.join("verify.csv").display());
                let v: serde_json::Value = serde_json::from_str(&v)?;
                println!("  Pearson {:.3}, Spearman {:.3} over {} verified cells", v["pearson"].as_f64().unwrap_or(f64::NAN), v["spearman"].as_f64().unwrap_or(f64::NAN), v["verified"]);
            }
            return Ok(());
        }
        best.sort_by(|a, b| b.test_iia_vocab.total_cmp(&a.test_iia_vocab));
        for c in best.iter().take(5) {
            println!("  {:<40} test IIA {:.3} (answers {:.3}), logit diff {:+.3}", c.label, c.test_iia_vocab, c.test_iia_answers, c.test_logit_diff);
        }
    }
    Ok(())
}

/// `road search FILE`: the guided search (see `experiment::search`), its table printed.
pub fn search_file(file: &Path, sets: &[String], das_cells: usize, rank: usize, das_sizes: &[usize]) -> Result<()> {
    let sizes: [usize; 3] = das_sizes.try_into().map_err(|_| anyhow::anyhow!("--das-sizes: expected three numbers train,dev,test"))?;
    let spec = Spec::load(file, sets)?;
    let o = crate::experiment::search::SearchOptions { das_cells, rank, sizes, ..Default::default() };
    let mut printer = ProgressPrinter::new(false);
    let (dir, rows) = crate::experiment::search::search(&spec, &o, &mut printer)?;
    println!("search: {}", dir.join("search.csv").display());
    println!("| cell | AtP estimate | verified effect | DAS test IIA | best control | margin |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        let h = if r.heads.is_empty() { String::new() } else { format!(" h{}", r.heads) };
        println!(
            "| L{} {} @{}{h} | {:+.3} | {:+.3} | {:.3} | {:.3} | {:+.3} |",
            r.layer, r.site, r.position, r.effect_estimate, r.true_effect, r.das_test_iia, r.control_iia, r.margin
        );
    }
    Ok(())
}

fn run_pilot_file(file: &Path, sets: &[String], json: bool, fresh: bool) -> Result<()> {
    let spec = crate::pilot::PilotSpec::load(file, sets)?;
    let r = crate::pilot::run_pilot(&spec, crate::pilot::PilotOptions { fresh, cancel: None }, &mut crate::runs::events::Silent)?;
    if json {
        let v = serde_json::json!({
            "experiment": spec.name,
            "run_dir": r.run_dir,
            "seconds": r.seconds,
            "finetunes": r.finetunes,
            "disentangle": r.heads,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{} finished in {:.1}s; outputs in {}", spec.name, r.seconds, r.run_dir.display());
        println!("  summary: {}", r.run_dir.join("summary.md").display());
    }
    Ok(())
}

/// `road merge-runs`: join the shards of one sweep (see `experiment::merge`).
pub fn merge(dirs: &[PathBuf], out_name: Option<&str>, allow_incomplete: bool) -> Result<()> {
    let dir = crate::experiment::merge::merge_runs(dirs, out_name, allow_incomplete)?;
    println!("merged {} run folder(s) into {}", dirs.len(), dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn shard_from_slurm_and_kubernetes_environments() {
        let whole = [("SLURM_ARRAY_TASK_ID", "2"), ("SLURM_ARRAY_TASK_COUNT", "4"), ("SLURM_ARRAY_TASK_MIN", "0"), ("SLURM_ARRAY_TASK_MAX", "3")];
        assert_eq!(shard_from_env(&env_of(&whole)).unwrap(), Some((2, 4)));
        // A 1-based array without the submission's count: shards from the minimum.
        let one_based = [("SLURM_ARRAY_TASK_ID", "3"), ("SLURM_ARRAY_TASK_MIN", "1"), ("SLURM_ARRAY_TASK_MAX", "4")];
        assert_eq!(shard_from_env(&env_of(&one_based)).unwrap(), Some((2, 4)));
        // Task 1 resubmitted alone by `road submit --tasks 1` (or sbatch --array=1): the script's
        // ROAD_SHARD_COUNT wins over what the task sees.
        let alone = [("SLURM_ARRAY_TASK_ID", "1"), ("SLURM_ARRAY_TASK_COUNT", "1"), ("SLURM_ARRAY_TASK_MIN", "1"), ("SLURM_ARRAY_TASK_MAX", "1"), ("ROAD_SHARD_COUNT", "4")];
        assert_eq!(shard_from_env(&env_of(&alone)).unwrap(), Some((1, 4)));
        assert_eq!(shard_from_env(&env_of(&[("JOB_COMPLETION_INDEX", "3"), ("ROAD_SHARD_COUNT", "4")])).unwrap(), Some((3, 4)));
        assert!(shard_from_env(&env_of(&[("JOB_COMPLETION_INDEX", "3")])).unwrap_err().to_string().contains("ROAD_SHARD_COUNT"));
        assert!(shard_from_env(&env_of(&[("JOB_COMPLETION_INDEX", "4"), ("ROAD_SHARD_COUNT", "4")])).is_err());
        assert_eq!(shard_from_env(&env_of(&[])).unwrap(), None);
    }
}
