//! Checks every spec parser shares, each a one-line error naming the key: folder names and
//! numbers that would otherwise train on NaN or train nothing.
//!
//! Names that become folders (experiment, fine-tune, compose and pilot `name`, `merge-runs
//! --name`, pilot method labels) are one path component, so nothing is written outside
//! `notebooks-out/` or the cache. They are checked where specs are parsed (an early error) and
//! again where a folder is made (whatever produced the name).
use anyhow::{bail, Result};

/// The longest name accepted: file systems refuse components over 255 bytes, and the run folder
/// adds nothing to this one but the cache folder adds `-<method>-<hash>`.
pub const MAX_NAME_BYTES: usize = 128;

/// `what` names the key in the error (`name`, `--name`, `methods.label`).
pub fn check_name(what: &str, name: &str) -> Result<()> {
    if name.trim().is_empty() {
        bail!("{what} is empty: it names the output folder");
    }
    if name == "." || name == ".." {
        bail!("{what} = {name:?} is not a folder name (it would write outside its experiment's folder)");
    }
    if let Some(c) = name.chars().find(|c| matches!(c, '/' | '\\' | '\0') || c.is_control()) {
        bail!("{what} = {name:?} must be a single folder name: {c:?} is not allowed (no path separators or control characters)");
    }
    if name.len() > MAX_NAME_BYTES {
        bail!("{what} is {} bytes long; at most {MAX_NAME_BYTES}", name.len());
    }
    Ok(())
}

/// A finite number (NaN and ±inf are errors).
pub fn finite(key: &str, v: f64) -> Result<f64> {
    if !v.is_finite() {
        bail!("{key} = {v} must be a finite number");
    }
    Ok(v)
}

/// A finite number > 0 (learning rates).
pub fn positive(key: &str, v: f64) -> Result<f64> {
    if finite(key, v)? <= 0.0 {
        bail!("{key} = {v} must be > 0");
    }
    Ok(v)
}

/// A finite number >= 0 (weight decay, penalties, clip norms with 0 = off).
pub fn non_negative(key: &str, v: f64) -> Result<f64> {
    if finite(key, v)? < 0.0 {
        bail!("{key} = {v} must be >= 0");
    }
    Ok(v)
}

/// A fraction in [0, 1) (warm-up ratios, dropout).
pub fn fraction(key: &str, v: f64) -> Result<f64> {
    if !(0.0..1.0).contains(&finite(key, v)?) {
        bail!("{key} = {v} must be in [0, 1)");
    }
    Ok(v)
}

/// Optimiser steps a spec may ask for: logs are reserved per step, and a day of training is far
/// below this, so more is a typo (or `2^64 - 1`), not a plan.
pub const MAX_STEPS: usize = 10_000_000;
/// Rows in one batch (also bounds `batch × grad_accum` index arithmetic).
pub const MAX_BATCH: usize = 65_536;

/// Counts with an upper bound, given as (key, value, most): an error before anything is
/// allocated for them.
pub fn at_most(counts: &[(&str, usize, usize)]) -> Result<()> {
    if let Some((k, v, most)) = counts.iter().find(|(_, v, most)| v > most) {
        bail!("{k} = {v} is more than the {most} allowed");
    }
    Ok(())
}

/// Counts that must be at least 1 (steps, batch sizes), given as (key, value).
pub fn at_least_one(counts: &[(&str, usize)]) -> Result<()> {
    if let Some((k, _)) = counts.iter().find(|(_, v)| *v == 0) {
        bail!("{k} must be at least 1");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_name_their_key() {
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert!(finite("train.lr", v).unwrap_err().to_string().starts_with("train.lr = "));
            assert!(fraction("train.warmup_ratio", v).is_err());
        }
        assert!(positive("train.lr", 0.0).is_err() && positive("train.lr", 1e-3).is_ok());
        assert!(non_negative("penalty", -1.0).is_err() && non_negative("penalty", 0.0).is_ok());
        assert!(fraction("d", 1.0).is_err() && fraction("d", 0.0).is_ok());
        assert_eq!(at_least_one(&[("a", 1), ("b", 0)]).unwrap_err().to_string(), "b must be at least 1");
        assert_eq!(at_most(&[("s", 3, 3), ("t", 4, 3)]).unwrap_err().to_string(), "t = 4 is more than the 3 allowed");
    }

    #[test]
    fn names_are_single_components() {
        for ok in ["ioi-das", "a.b", "..x", "x..", "ünïcode"] {
            assert!(check_name("name", ok).is_ok(), "{ok}");
        }
        for bad in ["", " ", ".", "..", "a/b", "../x", "a\\b", "a\0b", "a\nb", "/abs"] {
            let e = check_name("name", bad).unwrap_err().to_string();
            assert!(e.starts_with("name") && !e.contains('\n'), "{bad:?}: {e}");
        }
        assert!(check_name("name", &"x".repeat(129)).is_err());
    }
}
