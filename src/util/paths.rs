//! A model path checked before anything opens it: a symlink loop is named as one (not "no such
//! file"), and a FIFO, socket or device is refused at once instead of blocking a read forever.
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// Hops followed before a chain of symlinks counts as a loop (Linux's own limit is 40).
const MAX_HOPS: usize = 40;

/// For `what` (`--model`, `model.name`) naming `p`: Ok when `p` does not exist as a path (then
/// it is a registered name, resolved elsewhere) or is a regular file or a directory, possibly
/// through symlinks; an error naming the problem otherwise.
pub fn check_model_path(what: &str, p: &str) -> Result<()> {
    let path = Path::new(p);
    let Ok(meta) = std::fs::symlink_metadata(path) else { return Ok(()) };
    let mut cur: PathBuf = path.to_path_buf();
    let mut meta = meta;
    for _ in 0..MAX_HOPS {
        if !meta.file_type().is_symlink() {
            return check_type(what, p, &meta);
        }
        let target = std::fs::read_link(&cur)?;
        cur = match cur.parent() {
            Some(dir) if target.is_relative() => dir.join(target),
            _ => target,
        };
        meta = match std::fs::symlink_metadata(&cur) {
            Ok(m) => m,
            Err(_) => bail!("{what} {p:?} is a symlink to {}, which does not exist", cur.display()),
        };
    }
    bail!("{what} {p:?} is a symlink loop (more than {MAX_HOPS} links without reaching a file)")
}

fn check_type(what: &str, p: &str, meta: &std::fs::Metadata) -> Result<()> {
    let ft = meta.file_type();
    if ft.is_file() || ft.is_dir() {
        return Ok(());
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let kind = if ft.is_fifo() {
            "a FIFO (named pipe)"
        } else if ft.is_socket() {
            "a socket"
        } else if ft.is_char_device() || ft.is_block_device() {
            "a device"
        } else {
            "not a regular file"
        };
        bail!("{what} {p:?} is {kind}, not a model file or directory");
    }
    #[allow(unreachable_code)]
    {
        bail!("{what} {p:?} is not a regular file or directory")
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::check_model_path;

    #[test]
    fn loops_fifos_and_devices_are_named() {
        let d = std::env::temp_dir().join(format!("road-paths-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let (a, b) = (d.join("a"), d.join("b"));
        std::os::unix::fs::symlink(&b, &a).unwrap();
        std::os::unix::fs::symlink(&a, &b).unwrap();
        let e = check_model_path("--model", a.to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("symlink loop"), "{e}");
        std::os::unix::fs::symlink(d.join("missing"), d.join("dangling")).unwrap();
        let e = check_model_path("--model", d.join("dangling").to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
        let e = check_model_path("--model", "/dev/null").unwrap_err().to_string();
        assert!(e.contains("a device"), "{e}");
        std::fs::write(d.join("m.gguf"), b"x").unwrap();
        std::os::unix::fs::symlink(d.join("m.gguf"), d.join("link.gguf")).unwrap();
        assert!(check_model_path("--model", d.join("link.gguf").to_str().unwrap()).is_ok());
        assert!(check_model_path("--model", "smollm2-135m").is_ok());
        let _ = std::fs::remove_dir_all(&d);
    }
}
