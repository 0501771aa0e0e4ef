//! `road run FILE` and `road merge`: experiments headless.
use crate::runs::events::ProgressPrinter;
use crate::experiment::outputs::{self, MetricRow};
use crate::experiment::{run, RunOptions, Spec};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

pub fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let (i, n) = s.split_once('/').with_context(|| format!("--shard {s:?}: expected i/n, e.g. 0/4"))?;
    let (i, n): (usize, usize) = (i.trim().parse()?, n.trim().parse()?);
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

pub fn run_file(file: &Path, sets: &[String], shard: Option<&str>, jobs: usize, json: bool, fresh: bool) -> Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read experiment file {}", file.display()))?;
    if crate::pilot::is_pilot(&text) {
        if shard.is_some() {
            bail!("--shard applies to intervention sweeps, not to a pilot study");
        }
        return run_pilot_file(file, sets, json, fresh);
    }
    let spec = Spec::load(file, sets)?;
    let opts = RunOptions { shard: shard.map(parse_shard).transpose()?, jobs, ..Default::default() };
    let mut printer = ProgressPrinter::new(false);
    let summary = run(&spec, &opts, &mut printer)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("{} finished in {:.1}s; outputs in {}", spec.name, summary.seconds, summary.run_dir.display());
        let mut best: Vec<_> = summary.cells.iter().collect();
        best.sort_by(|a, b| b.test_iia_vocab.total_cmp(&a.test_iia_vocab));
        for c in best.iter().take(5) {
            println!("  {:<40} test IIA {:.3} (answers {:.3}), logit diff {:+.3}", c.label, c.test_iia_vocab, c.test_iia_answers, c.test_logit_diff);
        }
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

/// Join the metrics of several run directories (shards) into a new run directory.
pub fn merge(dirs: &[PathBuf], out_name: Option<&str>) -> Result<()> {
    if dirs.is_empty() {
        bail!("road merge needs at least one run directory");
    }
    let mut all: Vec<MetricRow> = Vec::new();
    let mut configs = String::new();
    for d in dirs {
        all.extend(outputs::read_metrics(&d.join("metrics.csv"))?);
        configs.push_str(&std::fs::read_to_string(d.join("config.toml")).with_context(|| format!("{} has no config.toml", d.display()))?);
    }
    let name = out_name.map(String::from).unwrap_or_else(|| all.first().map(|r| r.experiment.clone()).unwrap_or_else(|| "merged".into()));
    all.sort_by(|a, b| (a.layer, &a.site, &a.position, &a.split).cmp(&(b.layer, &b.site, &b.position, &b.split)));
    let dir = crate::runs::new_run_dir(&name, &crate::runs::short_hash(&configs))?;
    let sources: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    std::fs::write(dir.join("config.toml"), format!("# merged from: {}\n{}", sources.join(", "), std::fs::read_to_string(dirs[0].join("config.toml"))?))?;
    crate::runs::write_csv(&dir.join("metrics.csv"), &all, &outputs::METRIC_HEADER)?;
    if let Ok(spec) = Spec::from_toml(&std::fs::read_to_string(dirs[0].join("config.toml"))?, "config.toml") {
        crate::experiment::runner::write_figures(&dir, &spec, &all)?;
    }
    println!("merged {} rows from {} runs into {}", all.len(), dirs.len(), dir.display());
    Ok(())
}
