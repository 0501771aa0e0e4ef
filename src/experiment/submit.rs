//! `road submit`: a sweep as a Slurm array job (one shard per task) plus a merge job that runs
//! after every task succeeded. The scripts' text is `runs::slurm`'s; this file resolves the spec,
//! names the run, freezes the spec into the run folder and calls `sbatch`.
//!
//! Layout: `notebooks-out/<name>/<run id>/slurm/` holds `spec.toml` (the resolved spec every
//! task runs: editing the experiment file later cannot change a requeued task's cells),
//! `array.sbatch`, `merge.sbatch` and the jobs' output files; the shards write
//! `<run id>/shards/<i>-of-<n>/` and the merge job joins them into `<run id>/` itself.
use super::spec::Spec;
use crate::runs::slurm::{self, Scripts};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// `road submit`'s flags.
#[derive(Debug, Clone, Default)]
pub struct SubmitOptions {
    pub file: PathBuf,
    pub sets: Vec<String>,
    pub shards: usize,
    /// A fixed run id (default: `<UTC timestamp>-<config hash>`). Submitting again with the same
    /// id and spec resubmits into the same folder: finished shards and cells are kept.
    pub run_id: Option<String>,
    /// Only these array tasks (`1,3`, `0-2`): resubmitting shards that were cancelled or failed.
    pub tasks: Option<String>,
    pub partition: Option<String>,
    pub gpus_per_task: Option<u32>,
    pub time: Option<String>,
    /// The global `--device` / `--dtype`, passed on to the tasks.
    pub device: Option<String>,
    pub dtype: Option<String>,
}

/// What a submission made.
#[derive(Debug, Clone)]
pub struct Plan {
    pub scripts: Scripts,
    /// `--array` for this submission (all tasks, or `--tasks`).
    pub array: String,
    pub slurm_dir: PathBuf,
    pub config: String,
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("cannot make {} absolute", p.display()))
}

fn text(what: &str, p: &Path) -> Result<String> {
    let s = p.to_str().with_context(|| format!("{what} {} is not UTF-8", p.display()))?.to_string();
    if slurm::check_word(what, &s).is_err() {
        bail!("{what} {s:?} has spaces or shell characters, which the job scripts cannot name (#SBATCH lines do not quote): use a folder (or ROAD_OUT) without them");
    }
    Ok(s)
}

/// Check the flags, resolve the spec and every path the scripts name (nothing is written).
pub fn plan(o: &SubmitOptions) -> Result<Plan> {
    slurm::check_shards(o.shards)?;
    let array = match &o.tasks {
        Some(t) => slurm::parse_tasks(t, o.shards)?,
        None => slurm::all_tasks(o.shards),
    };
    if let Some(p) = &o.partition {
        slurm::check_word("--partition", p)?;
    }
    if let Some(t) = &o.time {
        slurm::check_time(t)?;
    }
    if o.gpus_per_task == Some(0) {
        bail!("--gpus-per-task 0: leave the flag out for CPU-only tasks");
    }
    if let Some(d) = &o.device {
        slurm::check_word("--device", d)?;
    }
    if let Some(d) = &o.dtype {
        crate::runtime::parse_dtype(d)?;
    }
    let spec = Spec::load(&o.file, &o.sets)?;
    let config = spec.to_toml()?;
    let run_id = match &o.run_id {
        Some(id) => id.clone(),
        None => format!("{}-{}", crate::runs::timestamp(), crate::runs::short_hash(&config)),
    };
    crate::runs::check_name("--run-id", &run_id)?;
    slurm::check_word("--run-id", &run_id)?;
    let out_root = absolute(&crate::runs::out_root())?;
    let run_dir = out_root.join(&spec.name).join(&run_id);
    let slurm_dir = run_dir.join("slurm");
    let road = std::env::current_exe().context("cannot find the road binary's own path")?;
    let scripts = Scripts {
        name: spec.name.clone(),
        road: text("the road binary's path", &road)?,
        spec: text("the run folder's path", &slurm_dir.join("spec.toml"))?,
        workdir: Some(text("the working directory", &absolute(Path::new("."))?)?),
        out_root: Some(text("ROAD_OUT", &out_root)?),
        run_dir: text("the run folder's path", &run_dir)?,
        logs: text("the run folder's path", &slurm_dir)?,
        run_id,
        shards: o.shards,
        partition: o.partition.clone(),
        gpus_per_task: o.gpus_per_task,
        time: o.time.clone(),
        device: o.device.clone(),
        dtype: o.dtype.clone(),
    };
    Ok(Plan { scripts, array, slurm_dir, config })
}

/// The commands that submit a plan, for `--dry-run` and error messages.
pub fn commands(p: &Plan) -> (String, String) {
    let array = p.slurm_dir.join("array.sbatch");
    let merge = p.slurm_dir.join("merge.sbatch");
    (
        format!("sbatch --parsable --array={} {}", p.array, array.display()),
        format!("sbatch --parsable --dependency=afterok:<array job id> {}", merge.display()),
    )
}

/// Write the spec and scripts into the run folder (a resubmission must be of the same spec).
pub fn write(p: &Plan) -> Result<()> {
    std::fs::create_dir_all(&p.slurm_dir).with_context(|| format!("cannot create {}", p.slurm_dir.display()))?;
    let spec_file = p.slurm_dir.join("spec.toml");
    match std::fs::read_to_string(&spec_file) {
        Ok(old) if old != p.config => bail!(
            "--run-id {}: {} was submitted with a different spec; pick another --run-id (or leave it out)",
            p.scripts.run_id,
            spec_file.display()
        ),
        Ok(_) => {}
        Err(_) => crate::runs::atomic::write(&spec_file, p.config.as_bytes())?,
    }
    crate::runs::atomic::write(&p.slurm_dir.join("array.sbatch"), slurm::array_script(&p.scripts).as_bytes())?;
    crate::runs::atomic::write(&p.slurm_dir.join("merge.sbatch"), slurm::merge_script(&p.scripts).as_bytes())?;
    Ok(())
}

/// `sbatch --parsable ARGS`: the job id, or a one-line error (sbatch missing, refused).
fn sbatch(args: &[String]) -> Result<String> {
    let out = match Command::new("sbatch").arg("--parsable").args(args).output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("sbatch is not on PATH: road submit needs Slurm's client commands (run it on a cluster's login node, or pass --dry-run to see the scripts)")
        }
        Err(e) => bail!("cannot run sbatch: {e}"),
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!("sbatch {} failed: {}", args.join(" "), err.trim().replace('\n', "; "));
    }
    slurm::parse_job_id(&String::from_utf8_lossy(&out.stdout))
}

/// Submit the array job, then the merge job after it; returns (array job id, merge job id).
pub fn submit(p: &Plan) -> Result<(String, String)> {
    write(p)?;
    let array = sbatch(&[format!("--array={}", p.array), p.slurm_dir.join("array.sbatch").display().to_string()])?;
    let merge_script = p.slurm_dir.join("merge.sbatch").display().to_string();
    let merge = sbatch(&[format!("--dependency=afterok:{array}"), merge_script.clone()]).with_context(|| {
        format!("array job {array} is submitted but its merge job is not; submit it with: sbatch --dependency=afterok:{array} {merge_script}")
    })?;
    Ok((array, merge))
}
