//! Integrity of cached artefacts at every use, not only at fetch: a flipped byte in a cached
//! model must not load silently. Hashing a model on every load would cost a second or more, so a
//! sidecar (`<file>.verified`) keeps the size, modification time and sha256 of the last check;
//! the file is hashed again whenever its size or mtime differ from the sidecar's (or the pinned
//! hash changed).
use super::sha256_file;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Stamp {
    size: u64,
    mtime_ns: u128,
    sha256: String,
}

/// How a check was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// The sidecar matched the file's size and mtime and the pinned hash.
    Sidecar,
    /// The file was hashed (and the sidecar written).
    Hashed,
}

fn sidecar(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".verified");
    PathBuf::from(s)
}

fn stamp_of(path: &Path) -> Result<(u64, u128)> {
    let m = std::fs::metadata(path)?;
    let mtime = m.modified()?.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    Ok((m.len(), mtime))
}

/// Record that `path` (as it is now) has sha256 `sha` — after a fetch, or a successful check.
pub fn record(path: &Path, sha: &str) -> Result<()> {
    let (size, mtime_ns) = stamp_of(path)?;
    let text = serde_json::to_string(&Stamp { size, mtime_ns, sha256: sha.into() })?;
    // Unique temporary name, then rename: loads from several threads may record at once.
    let side = sidecar(path);
    let tmp = side.with_extension(format!("verified.{}.{:?}.tmp", std::process::id(), std::thread::current().id()).replace(['(', ')'], ""));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &side)?;
    Ok(())
}

/// Check `path` against the pinned `want` sha256; `force` re-hashes even when the sidecar
/// matches. `refetch` is the command that replaces a corrupt file, for the error.
/// `on_hash` runs just before hashing (a progress note: it may take a moment).
pub fn verify(path: &Path, want: &str, force: bool, refetch: &str, on_hash: impl FnOnce()) -> Result<Checked> {
    let (size, mtime_ns) = stamp_of(path)?;
    let side = std::fs::read_to_string(sidecar(path)).ok().and_then(|t| serde_json::from_str::<Stamp>(&t).ok());
    if !force && side == Some(Stamp { size, mtime_ns, sha256: want.into() }) {
        return Ok(Checked::Sidecar);
    }
    on_hash();
    let got = sha256_file(path)?;
    if got != want {
        let _ = std::fs::remove_file(sidecar(path));
        bail!("cached {} is corrupt: sha256 {got} does not match the pinned {want}; `{refetch}` fetches it again", path.display());
    }
    // A read-only cache still loads; it is only hashed again next time.
    let _ = record(path, want);
    Ok(Checked::Hashed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecar_skips_rehash_until_the_file_changes_and_a_flip_is_caught() {
        let dir = std::env::temp_dir().join(format!("road-integrity-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("m.gguf");
        std::fs::write(&f, b"weights of a model").unwrap();
        let want = sha256_file(&f).unwrap();
        assert_eq!(verify(&f, &want, false, "road fetch-model m", || {}).unwrap(), Checked::Hashed);
        assert_eq!(verify(&f, &want, false, "road fetch-model m", || {}).unwrap(), Checked::Sidecar);
        assert_eq!(verify(&f, &want, true, "road fetch-model m", || {}).unwrap(), Checked::Hashed);
        // A different pinned hash (a registry update) is never settled by the old sidecar.
        assert!(verify(&f, &"0".repeat(64), false, "x", || {}).is_err());
        assert_eq!(verify(&f, &want, false, "x", || {}).unwrap(), Checked::Hashed);
        // One flipped byte, same size; the mtime moves as any write moves it.
        std::fs::write(&f, b"weights of a modem").unwrap();
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options().write(true).open(&f).unwrap().set_modified(later).unwrap();
        let e = verify(&f, &want, false, "road fetch-model m", || {}).unwrap_err().to_string();
        assert!(e.contains("is corrupt") && e.contains("`road fetch-model m` fetches it again"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
