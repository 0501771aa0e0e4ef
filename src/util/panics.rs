//! A panic as an error: a job (a TUI worker's, a headless run's) that panics fails like one
//! that returns an error, so its run folder gets an error.txt and the caller lives on.
use anyhow::Result;

pub fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_else(|| "unknown panic".into())
}

/// A job's panic, as an error: the worker thread lives on and the UI shows a failed entry.
#[derive(Debug)]
pub struct Panicked(pub String);

impl std::fmt::Display for Panicked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Panicked {}

/// Run a job on a worker thread; its error or panic (`"{what} panicked: …"`) comes back as the
/// error. Allocation aborts cannot be caught: the spec checks keep sizes bounded instead.
pub fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| Err(Panicked(format!("{what} panicked: {}", panic_text(&p))).into()))
}

#[cfg(test)]
mod tests {
    use super::{guarded, Panicked};

    #[test]
    fn a_panicking_job_is_an_error_and_the_thread_lives_on() {
        let t = std::thread::spawn(|| {
            let r: anyhow::Result<()> = guarded("the run", || panic!("index out of bounds"));
            let e = r.unwrap_err();
            assert!(e.downcast_ref::<Panicked>().is_some());
            assert_eq!(e.to_string(), "the run panicked: index out of bounds");
            guarded("the run", || Ok(7)).unwrap()
        });
        assert_eq!(t.join().unwrap(), 7);
        assert_eq!(guarded::<()>("x", || anyhow::bail!("plain error")).unwrap_err().to_string(), "plain error");
    }
}
