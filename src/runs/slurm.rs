//! Slurm job scripts for a sharded sweep, as text: an array job (one shard of the cells per
//! task) and a merge job that runs once every task succeeded. Pure functions, so the scripts
//! `road submit` writes, the templates in `scripts/slurm/` and the unit tests below are one text.
//!
//! The contract with the job's `road run`: the shard count (`ROAD_SHARD_COUNT`) and the run id
//! are written into the script, never read from the task's environment alone: a task
//! resubmitted by itself (`sbatch --array=1`) sees `SLURM_ARRAY_TASK_COUNT=1` and a new
//! `SLURM_ARRAY_JOB_ID`, and must still find its shard folder.
use anyhow::{bail, Result};

/// What a submission's scripts name. Paths are text: `road submit` gives absolute ones, the
/// templates relative ones (a job's working directory is then wherever `sbatch` was called).
#[derive(Debug, Clone)]
pub struct Scripts {
    /// The experiment's name (job names, comments).
    pub name: String,
    /// The `road` binary the jobs run.
    pub road: String,
    /// The experiment file the tasks run.
    pub spec: String,
    /// `--chdir` for the jobs (relative paths in the spec resolve against it), if any.
    pub workdir: Option<String>,
    /// `ROAD_OUT` for the jobs, if it must be set.
    pub out_root: Option<String>,
    /// The submission's run folder (`notebooks-out/<name>/<run id>`), what the merge joins.
    pub run_dir: String,
    /// Where Slurm writes the jobs' output files.
    pub logs: String,
    pub run_id: String,
    pub shards: usize,
    pub partition: Option<String>,
    pub gpus_per_task: Option<u32>,
    pub time: Option<String>,
    /// `--device` / `--dtype` for the tasks (None: the spec's; `auto` and f32 by default).
    pub device: Option<String>,
    pub dtype: Option<String>,
}

/// A value that goes into an `#SBATCH` line or the script: one word, no quoting needed, so the
/// script stays plain (`#SBATCH` lines are not shell and cannot quote).
pub fn check_word(flag: &str, v: &str) -> Result<()> {
    if v.is_empty() {
        bail!("{flag} is empty");
    }
    if let Some(c) = v.chars().find(|c| c.is_whitespace() || c.is_control() || matches!(c, '\'' | '"' | '\\' | '$' | '`' | ';' | '&' | '|' | '<' | '>' | '(' | ')' | '*' | '?' | '#' | '!')) {
        bail!("{flag} = {v:?}: {c:?} is not allowed here (the value goes into a job script; use letters, digits and - _ . / : , = @ + %)");
    }
    Ok(())
}

/// `--shards N`: at least one.
pub fn check_shards(n: usize) -> Result<()> {
    if n == 0 {
        bail!("--shards 0: need at least 1 shard (one array task per shard)");
    }
    Ok(())
}

/// `--time`: Slurm's forms (`MM`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`, `D-HH:MM:SS`), digits only.
pub fn check_time(t: &str) -> Result<()> {
    let (days, rest) = match t.split_once('-') {
        Some((d, r)) => (Some(d), r),
        None => (None, t),
    };
    let parts: Vec<&str> = rest.split(':').collect();
    let digits = |s: &str| !s.is_empty() && s.len() <= 4 && s.bytes().all(|b| b.is_ascii_digit());
    let ok = days.is_none_or(digits) && parts.iter().all(|p| digits(p)) && parts.len() <= 3 && (days.is_none() || !rest.is_empty());
    if !ok {
        bail!("--time {t:?}: expected a Slurm time limit such as 30, 2:00:00 or 1-12:00:00");
    }
    Ok(())
}

/// `--tasks 1,3` or `0-2`: the array tasks to (re)submit, each below `shards`; returned in
/// Slurm's `--array` syntax.
pub fn parse_tasks(s: &str, shards: usize) -> Result<String> {
    let mut items = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        let num = |x: &str| -> Result<usize> {
            let i: usize = x.trim().parse().map_err(|_| anyhow::anyhow!("--tasks {s:?}: {x:?} is not a task number"))?;
            if i >= shards {
                bail!("--tasks {s:?}: task {i} is not below --shards {shards} (tasks are 0..{})", shards - 1);
            }
            Ok(i)
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    bail!("--tasks {s:?}: range {a}-{b} is backwards");
                }
                items.push(format!("{a}-{b}"));
            }
            None => items.push(num(part)?.to_string()),
        }
    }
    Ok(items.join(","))
}

/// The `--array` of a whole submission.
pub fn all_tasks(shards: usize) -> String {
    if shards == 1 {
        "0".into()
    } else {
        format!("0-{}", shards - 1)
    }
}

/// How many tasks an `--array` value (as [`parse_tasks`] / [`all_tasks`] write it) names.
pub fn task_count(array: &str) -> usize {
    array
        .split(',')
        .map(|p| match p.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap_or(0).saturating_sub(a.parse().unwrap_or(0)) + 1,
            None => 1,
        })
        .sum()
}

/// `sbatch --parsable` prints `<id>` or `<id>;<cluster>`.
pub fn parse_job_id(stdout: &str) -> Result<String> {
    let id = stdout.trim().split(';').next().unwrap_or("").trim();
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        bail!("sbatch printed {:?}, not a job id", stdout.trim());
    }
    Ok(id.to_string())
}

/// `#SBATCH` lines every job of the submission shares.
fn common(s: &Scripts, out: &mut String) {
    if let Some(d) = &s.workdir {
        out.push_str(&format!("#SBATCH --chdir={d}\n"));
    }
    if let Some(p) = &s.partition {
        out.push_str(&format!("#SBATCH --partition={p}\n"));
    }
    if let Some(t) = &s.time {
        out.push_str(&format!("#SBATCH --time={t}\n"));
    }
}

fn env_lines(s: &Scripts, out: &mut String) {
    if let Some(o) = &s.out_root {
        out.push_str(&format!("export ROAD_OUT={o}\n"));
    }
}

/// The array job: task i runs shard i of `shards` into `<run_dir>/shards/<i>-of-<n>/`.
pub fn array_script(s: &Scripts) -> String {
    let n = s.shards;
    let mut out = format!(
        "#!/bin/bash\n\
         # road-dii sweep {name:?}, run id {id}: one shard of its cells per array task.\n\
         # Task i runs shard i/{n} into {run}/shards/<i>-of-{n}/.\n\
         # --requeue: a pre-empted or requeued task runs again with the same run id and shard, and\n\
         # `road run` resumes its folder (finished cells are kept, an interrupted one is redone).\n\
         # Resubmit shards by hand (e.g. 1 and 3): sbatch --array=1,3 THIS_FILE, then the merge job.\n\
         #SBATCH --job-name=road-{name}\n\
         #SBATCH --array={array}\n\
         #SBATCH --requeue\n\
         #SBATCH --open-mode=append\n\
         #SBATCH --ntasks=1\n\
         #SBATCH --output={logs}/%A_%a.out\n",
        name = s.name,
        id = s.run_id,
        run = s.run_dir,
        array = all_tasks(n),
        logs = s.logs,
    );
    common(s, &mut out);
    if let Some(g) = s.gpus_per_task {
        out.push_str(&format!("#SBATCH --gpus-per-task={g}\n"));
    }
    out.push_str(
        "set -euo pipefail\n\n\
         # The shard count and run id are this submission's, not the task's environment's: a task\n\
         # resubmitted alone sees SLURM_ARRAY_TASK_COUNT=1 and a new SLURM_ARRAY_JOB_ID.\n",
    );
    out.push_str(&format!("export ROAD_SHARD_COUNT={n}\n"));
    env_lines(s, &mut out);
    let mut device = String::new();
    if let Some(d) = &s.device {
        device.push_str(&format!(" --device {d}"));
    }
    if let Some(d) = &s.dtype {
        device.push_str(&format!(" --dtype {d}"));
    }
    out.push_str(&format!(
        "\n# --shard auto: shard SLURM_ARRAY_TASK_ID of ROAD_SHARD_COUNT. With --gpus-per-task Slurm sets\n\
         # CUDA_VISIBLE_DEVICES to this task's GPUs; `cuda` (and `auto`) is the first of them.\n\
         exec {road}{device} run {spec} --shard auto --run-id {id}\n",
        road = s.road,
        spec = s.spec,
        id = s.run_id,
    ));
    out
}

/// The merge job, submitted with `--dependency=afterok:<array job id>` (the id exists only once
/// the array is submitted, so it goes on sbatch's command line, not in this script).
pub fn merge_script(s: &Scripts) -> String {
    let mut out = format!(
        "#!/bin/bash\n\
         # road-dii sweep {name:?}, run id {id}: join its {n} shards once every array task succeeded,\n\
         # into {run}/.\n\
         # Submit it as: sbatch --dependency=afterok:<array job id> THIS_FILE\n\
         # (road merge-runs refuses a missing or unfinished shard: it never merges half a sweep).\n\
         #SBATCH --job-name=road-{name}-merge\n\
         #SBATCH --ntasks=1\n\
         #SBATCH --output={logs}/merge-%j.out\n",
        name = s.name,
        id = s.run_id,
        n = s.shards,
        run = s.run_dir,
        logs = s.logs,
    );
    common(s, &mut out);
    out.push_str("set -euo pipefail\n");
    env_lines(s, &mut out);
    out.push_str(&format!("\nexec {road} merge-runs {run}\n", road = s.road, run = s.run_dir));
    out
}

/// The values the committed templates (`scripts/slurm/*.sbatch`) are generated from.
pub fn template() -> Scripts {
    Scripts {
        name: "tiny-equality-das".into(),
        road: "road".into(),
        spec: "experiments/tiny-equality-das.toml".into(),
        workdir: None,
        out_root: None,
        run_dir: "notebooks-out/tiny-equality-das/my-sweep-1".into(),
        logs: ".".into(),
        run_id: "my-sweep-1".into(),
        shards: 4,
        partition: None,
        gpus_per_task: None,
        time: Some("01:00:00".into()),
        device: None,
        dtype: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> Scripts {
        Scripts {
            workdir: Some("/home/me/road".into()),
            out_root: Some("/scratch/me/out".into()),
            partition: Some("gpu".into()),
            gpus_per_task: Some(1),
            device: Some("cuda".into()),
            logs: "/scratch/me/out/x/r1/slurm".into(),
            ..template()
        }
    }

    #[test]
    fn array_script_names_everything_a_resubmitted_task_needs() {
        let a = array_script(&full());
        for line in [
            "#SBATCH --array=0-3\n",
            "#SBATCH --requeue\n",
            "#SBATCH --partition=gpu\n",
            "#SBATCH --gpus-per-task=1\n",
            "#SBATCH --time=01:00:00\n",
            "#SBATCH --chdir=/home/me/road\n",
            "#SBATCH --output=/scratch/me/out/x/r1/slurm/%A_%a.out\n",
            "export ROAD_SHARD_COUNT=4\n",
            "export ROAD_OUT=/scratch/me/out\n",
            "exec road --device cuda run experiments/tiny-equality-das.toml --shard auto --run-id my-sweep-1\n",
        ] {
            assert!(a.contains(line), "missing {line:?} in\n{a}");
        }
        // sbatch reads directives only before the first command.
        let first_cmd = a.lines().position(|l| l.starts_with("set ")).unwrap();
        assert!(a.lines().skip(first_cmd).all(|l| !l.starts_with("#SBATCH")));
        let m = merge_script(&full());
        assert!(m.contains("exec road merge-runs notebooks-out/tiny-equality-das/my-sweep-1\n"), "{m}");
        assert!(!m.contains("#SBATCH --array") && !m.contains("#SBATCH --gpus"), "{m}");
    }

    #[test]
    fn optional_lines_are_left_out() {
        let s = Scripts { time: None, ..template() };
        let a = array_script(&s);
        for absent in ["#SBATCH --partition", "#SBATCH --gpus", "#SBATCH --time", "#SBATCH --chdir", "export ROAD_OUT", "--device", "--dtype"] {
            assert!(!a.contains(absent), "{absent} in\n{a}");
        }
        assert!(array_script(&Scripts { shards: 1, ..template() }).contains("#SBATCH --array=0\n"));
    }

    #[test]
    fn committed_templates_are_the_generated_scripts() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/slurm");
        for (file, text) in [("array.sbatch", array_script(&template())), ("merge.sbatch", merge_script(&template()))] {
            if std::env::var_os("ROAD_WRITE_TEMPLATES").is_some() {
                // After changing the scripts: ROAD_WRITE_TEMPLATES=1 cargo test --lib slurm
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join(file), &text).unwrap();
            }
            let on_disk = std::fs::read_to_string(dir.join(file)).unwrap();
            assert_eq!(on_disk, text, "scripts/slurm/{file} is stale: regenerate it from runs::slurm::template()");
        }
    }

    #[test]
    fn flags_are_checked_with_one_line_errors() {
        assert!(check_shards(0).unwrap_err().to_string().contains("--shards 0"));
        check_shards(1).unwrap();
        for ok in ["30", "2:00:00", "1-12", "1-12:00:00", "90:00"] {
            check_time(ok).unwrap();
        }
        for bad in ["", "1h", "1-", "1:2:3:4", "2:00:00; rm -rf /"] {
            assert!(check_time(bad).unwrap_err().to_string().starts_with("--time"), "{bad}");
        }
        assert!(check_word("--partition", "gpu a").unwrap_err().to_string().contains("--partition"));
        assert!(check_word("--partition", "$(x)").is_err());
        check_word("--partition", "gpu-a100,gpu").unwrap();
        assert_eq!(parse_tasks("1, 3", 4).unwrap(), "1,3");
        assert_eq!(parse_tasks("0-2", 4).unwrap(), "0-2");
        assert_eq!((task_count("0-2,5"), task_count(&all_tasks(4)), task_count("1")), (4, 4, 1));
        assert!(parse_tasks("4", 4).unwrap_err().to_string().contains("not below --shards 4"));
        assert!(parse_tasks("2-1", 4).is_err() && parse_tasks("x", 4).is_err());
        assert_eq!(parse_job_id("1234\n").unwrap(), "1234");
        assert_eq!(parse_job_id("1234;cluster\n").unwrap(), "1234");
        assert!(parse_job_id("Submitted batch job 1").is_err());
    }
}
