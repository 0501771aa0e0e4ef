//! `road submit FILE --shards N`: a sweep as a Slurm array job and a dependent merge job (see
//! `experiment::submit`); this file only reads the flags and prints what was submitted.
use crate::experiment::submit::{self, SubmitOptions};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct SubmitArgs {
    /// The experiment file (an intervention sweep).
    pub file: PathBuf,
    /// Array tasks: the sweep's cells are split into this many shards, one per task.
    #[arg(long)]
    pub shards: usize,
    /// Override a key, e.g. --set train.steps=100 (repeatable; frozen into the run folder).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Slurm partition (#SBATCH --partition).
    #[arg(long)]
    pub partition: Option<String>,
    /// GPUs per task (#SBATCH --gpus-per-task); each task's `cuda` is then its own GPU.
    #[arg(long)]
    pub gpus_per_task: Option<u32>,
    /// Time limit per task, in Slurm's format (30, 2:00:00, 1-12:00:00).
    #[arg(long)]
    pub time: Option<String>,
    /// The run folder's name under notebooks-out/<name>/ (default <UTC timestamp>-<hash>).
    /// Submitting again with the same id resumes that sweep: finished cells are kept.
    #[arg(long)]
    pub run_id: Option<String>,
    /// Submit only these array tasks (e.g. 1,3 or 0-2): shards that were cancelled or failed.
    #[arg(long, requires = "run_id")]
    pub tasks: Option<String>,
    /// Print the scripts and the sbatch commands; submit nothing, write nothing.
    #[arg(long)]
    pub dry_run: bool,
}

pub fn submit_cmd(a: &SubmitArgs, device: Option<String>, dtype: Option<String>) -> Result<()> {
    let text = std::fs::read_to_string(&a.file).with_context(|| format!("cannot read experiment file {}", a.file.display()))?;
    if crate::pilot::is_pilot(&text) {
        bail!("road submit shards an intervention sweep's cells; {} is a pilot study (run it with `road run`)", a.file.display());
    }
    let o = SubmitOptions {
        file: a.file.clone(),
        sets: a.sets.clone(),
        shards: a.shards,
        run_id: a.run_id.clone(),
        tasks: a.tasks.clone(),
        partition: a.partition.clone(),
        gpus_per_task: a.gpus_per_task,
        time: a.time.clone(),
        device,
        dtype,
    };
    let plan = submit::plan(&o)?;
    let (array_cmd, merge_cmd) = submit::commands(&plan);
    if a.dry_run {
        println!("# {}/array.sbatch\n{}", plan.slurm_dir.display(), crate::runs::slurm::array_script(&plan.scripts));
        println!("# {}/merge.sbatch\n{}", plan.slurm_dir.display(), crate::runs::slurm::merge_script(&plan.scripts));
        println!("# would run (the spec frozen into {}/spec.toml first):\n{array_cmd}\n{merge_cmd}", plan.slurm_dir.display());
        return Ok(());
    }
    let (array, merge) = submit::submit(&plan)?;
    // One `key value` per line: easy to read, and to parse from a script.
    println!("array job {array}");
    println!("merge job {merge}");
    println!("run folder {}", plan.scripts.run_dir);
    eprintln!(
        "{} task(s) (--array={}) of {} shards; the merge job runs after all of them succeed. Logs: {}/",
        crate::runs::slurm::task_count(&plan.array),
        plan.array,
        plan.scripts.shards,
        plan.slurm_dir.display()
    );
    eprintln!("if a task is cancelled or fails, resubmit it: the same road submit command plus --run-id {} --tasks <i>", plan.scripts.run_id);
    Ok(())
}
