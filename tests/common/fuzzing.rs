//! The fuzz tests' shared harness: case counts, seeds, time limits, and the run-and-assert step.
use road_dii::util::fuzz::FuzzStats;
use std::path::PathBuf;
use std::time::Duration;

/// Mutants per parser: at least 10,000 each (the floor); `ROAD_FUZZ_CASES` raises it and
/// `ROAD_FUZZ_SEED` draws other mutants (to re-check with cases CI has not seen).
pub fn n_cases() -> usize {
    std::env::var("ROAD_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000).max(10_000)
}

pub fn seed(tag: u64) -> u64 {
    tag ^ std::env::var("ROAD_FUZZ_SEED").ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}
/// Slower than this is a hang (generous: the CI machine is shared; a parse takes microseconds).
pub const CASE_LIMIT: Duration = Duration::from_secs(2);
/// A fuzzer that does not finish in this time is hung (the per-case clock cannot see a case
/// that never returns).
pub const RUN_LIMIT: Duration = Duration::from_secs(300);

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn read(p: &str) -> Vec<u8> {
    std::fs::read(root().join(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Run a fuzzer on its own thread under [`RUN_LIMIT`], print its table row, and assert.
pub fn fuzz(name: &'static str, f: impl FnOnce() -> FuzzStats + Send + 'static) -> FuzzStats {
    fuzz_accepting(name, 100, f)
}

/// [`fuzz`] requiring at least one accepted mutant in `one_in` (binary, length-prefixed formats
/// accept fewer: most byte edits break the framing).
pub fn fuzz_accepting(name: &'static str, one_in: usize, f: impl FnOnce() -> FuzzStats + Send + 'static) -> FuzzStats {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    let st = rx.recv_timeout(RUN_LIMIT).unwrap_or_else(|_| panic!("{name}: the fuzzer did not finish in {RUN_LIMIT:?} (a hang)"));
    println!("{}", st.row(name));
    let n = n_cases();
    assert_eq!(st.cases, n, "{name}");
    assert!(st.panics == 0 && st.hangs == 0, "{name}: {st:?}");
    // Mutants must exercise both paths, or the seeds/mutator are too weak to mean anything.
    assert!(st.errors > n / 10 && st.ok > n / one_in, "{name}: {st:?}");
    st
}


/// `n` cases split over `parts` runs (one per seed family), their stats added up.
pub fn split_cases(parts: usize, n: usize, mut run: impl FnMut(usize, usize) -> FuzzStats) -> FuzzStats {
    let mut all = FuzzStats::default();
    for i in 0..parts {
        let k = n / parts + usize::from(i < n % parts);
        let st = run(i, k);
        all.cases += st.cases;
        all.ok += st.ok;
        all.errors += st.errors;
        all.panics += st.panics;
        all.hangs += st.hangs;
        all.max_case = all.max_case.max(st.max_case);
        all.total += st.total;
        all.first_failure = all.first_failure.or(st.first_failure);
    }
    all
}
