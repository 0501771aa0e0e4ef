//! `road merge-runs`: join the shards of one sweep. The shards must be runs of one spec (their
//! config.toml equal but for the `# shard i/n` line), each shard once, all of them present and
//! complete (unless `allow_incomplete`). From the shards' stored cells the merged folder is
//! rebuilt in the unsharded cell order with the same writer as a run, so its metrics, examples,
//! train log and parameters have the bytes of the unsharded run of the same spec.
use super::cell_store;
use super::outputs::{self, MetricRow};
use super::runner::shard_of;
use super::spec::Spec;
use super::tables::{self, RunMeta};
use crate::runs::RunStatus;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One shard folder: its spec text without the shard line, and (i, n).
struct Shard {
    dir: PathBuf,
    base_config: String,
    at: Option<(usize, usize)>,
}

fn read_shard(dir: &Path) -> Result<Shard> {
    let config = std::fs::read_to_string(dir.join("config.toml")).with_context(|| format!("{} has no config.toml (not a run folder)", dir.display()))?;
    let at = shard_of(&config);
    let base_config = config.lines().filter(|l| !l.starts_with("# shard ")).collect::<Vec<_>>().join("\n").trim_end().to_string() + "\n";
    Ok(Shard { dir: dir.to_path_buf(), base_config, at })
}

/// The shard folders named: a submission's folder stands for all of its `shards/*`.
fn expand(dirs: &[PathBuf]) -> Result<(Vec<PathBuf>, Option<PathBuf>)> {
    if let [one] = dirs {
        let sh = one.join("shards");
        if sh.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(&sh)?.flatten().map(|e| e.path()).filter(|p| p.join("config.toml").exists()).collect();
            v.sort();
            if v.is_empty() {
                bail!("{}: no shard folders in shards/", one.display());
            }
            return Ok((v, Some(one.clone())));
        }
    }
    Ok((dirs.to_vec(), None))
}

/// Merge; returns the merged folder (the submission's own folder for `<run>/shards/*`, else a
/// new run folder named `name` or the experiment's).
pub fn merge_runs(dirs: &[PathBuf], name: Option<&str>, allow_incomplete: bool) -> Result<PathBuf> {
    if dirs.is_empty() {
        bail!("merge-runs needs run directories (the shards of one sweep) or a run folder with shards/");
    }
    let (dirs, into) = expand(dirs)?;
    let shards = dirs.iter().map(|d| read_shard(d)).collect::<Result<Vec<_>>>()?;
    let first = &shards[0];
    for s in &shards[1..] {
        if s.base_config != first.base_config {
            bail!("{} and {} are runs of different specs (config.toml differs): not shards of one sweep", first.dir.display(), s.dir.display());
        }
    }
    let mut seen: BTreeMap<usize, &Path> = BTreeMap::new();
    let n = first.at.map(|x| x.1);
    for s in &shards {
        match (s.at, n) {
            (Some((i, m)), Some(n)) if m == n => {
                if let Some(prev) = seen.insert(i, &s.dir) {
                    bail!("shard {i}/{n} is given twice ({} and {})", prev.display(), s.dir.display());
                }
            }
            (None, _) if shards.len() == 1 => {}
            _ => bail!("{}: not a shard of the same {}-way split (its config.toml has no matching `# shard i/n`)", s.dir.display(), n.unwrap_or(0)),
        }
    }
    let mut problems = Vec::new();
    if let Some(n) = n {
        let missing: Vec<String> = (0..n).filter(|i| !seen.contains_key(i)).map(|i| format!("{i}/{n}")).collect();
        if !missing.is_empty() {
            problems.push(format!("missing shards {}", missing.join(", ")));
        }
    }
    for s in &shards {
        let st = crate::runs::state::status(&s.dir);
        if st != RunStatus::Complete {
            problems.push(format!("{} is {}", s.dir.display(), st.label()));
        }
    }
    if !problems.is_empty() && !allow_incomplete {
        bail!("not merging an incomplete sweep: {} (finish the shards with `road run --resume DIR`, or pass --allow-incomplete)", problems.join("; "));
    }
    let spec = Spec::from_toml(&first.base_config, &format!("{}/config.toml", first.dir.display()))?;
    let out = match into {
        Some(d) => d,
        None => {
            let name = name.unwrap_or(&spec.name);
            crate::runs::new_run_dir(name, &crate::runs::short_hash(&first.base_config))?
        }
    };
    crate::runs::atomic::write(&out.join("config.toml"), first.base_config.as_bytes())?;
    if let Ok(p) = std::fs::read(first.dir.join("pairs.jsonl")) {
        crate::runs::atomic::write(&out.join("pairs.jsonl"), &p)?;
    }
    let mut cells = BTreeMap::new();
    for s in &shards {
        cells.extend(cell_store::load_all(&s.dir)?);
    }
    let summaries: Vec<serde_json::Value> = shards
        .iter()
        .filter_map(|s| std::fs::read_to_string(s.dir.join("summary.json")).ok())
        .filter_map(|t| serde_json::from_str(&t).ok())
        .collect();
    let num = |k: &str| summaries.first().and_then(|v| v.get(k)).and_then(|x| x.as_f64()).unwrap_or(f64::NAN);
    let kept = summaries
        .first()
        .and_then(|v| serde_json::from_value::<Vec<(String, f64)>>(v.get("kept_fraction")?.clone()).ok())
        .unwrap_or_default();
    let meta = RunMeta {
        complete: problems.is_empty(),
        seconds: summaries.iter().filter_map(|v| v.get("seconds")?.as_f64()).sum(),
        task_accuracy: num("task_accuracy"),
        kept_fraction: kept,
    };
    if cells.is_empty() {
        // Runs from before cells were stored: join their metrics tables.
        let mut all: Vec<MetricRow> = Vec::new();
        for s in &shards {
            all.extend(outputs::read_metrics(&s.dir.join("metrics.csv"))?);
        }
        all.sort_by(|a, b| (a.layer, &a.site, &a.position, &a.split).cmp(&(b.layer, &b.site, &b.position, &b.split)));
        crate::runs::write_csv(&out.join("metrics.csv"), &all, &outputs::METRIC_HEADER)?;
        tables::write_figures(&out, &spec, &all)?;
    } else {
        let results: Vec<Option<_>> = cells.into_values().map(Some).collect();
        tables::write_outputs(&out, &spec, &results, meta)?;
    }
    if !problems.is_empty() {
        crate::runs::state::mark_incomplete(&out, &format!("merged with --allow-incomplete: {}", problems.join("; ")))?;
    }
    Ok(out)
}
