//! A seeded mutation fuzzer on stable Rust (no cargo-fuzz, no extra dependency): mutants of seed
//! inputs, each run under `catch_unwind` and timed, counted as ok / error / panic / hang.
//! The parser fuzz tests (`tests/fuzz.rs`) use it for text formats; binary formats (GGUF,
//! safetensors headers) use [`Mutator::mutate_bytes`] and [`run_cases`] the same way.
use super::rng::Rng;
use std::time::{Duration, Instant};

/// Tokens that break parsers more often than random bytes: extremes, non-finite numbers, path
/// tricks, delimiters, a byte-order mark, range syntax.
pub const INTERESTING: &[&str] = &[
    "0", "-1", "1", "18446744073709551615", "18446744073709551616", "9223372036854775807", "-9223372036854775808",
    "100000000000", "4294967295", "1e308", "-1e308", "1e-308", "nan", "inf", "-inf", "+nan", "0.0", "-0.0",
    "\"..\"", "\".\"", "\"\"", "\"/\"", "\"a/../b\"", "\"\\u0000\"", "..", "..=", "0..100000000000", "0..=18446744073709551615",
    "\"0..100000000000\"", "\"5..2\"", "[]", "[[]]", "{}", "[1, 2, 3]", "[100000000000, 1, 1]", "\"\"\"", "'''", "=", "\n", "\r\n", "#",
    "\u{feff}", "\"\u{feff}\"", "true", "false", "null", "[x]", "[[x]]", "\\", "\"\\\"", "\u{0}", "é", "🦀",
];

/// Seeded mutations of text or bytes.
pub struct Mutator {
    rng: Rng,
}

impl Mutator {
    pub fn new(seed: u64) -> Self {
        Self { rng: Rng::new(seed) }
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            self.rng.below(n)
        }
    }

    /// 1–4 mutations of `seed`: byte flips, inserted/deleted/duplicated ranges, interesting
    /// tokens spliced in or replacing a value after `=` or `:`, swapped or dropped lines.
    pub fn mutate_bytes(&mut self, seed: &[u8]) -> Vec<u8> {
        let mut v = seed.to_vec();
        for _ in 0..1 + self.below(4) {
            let n = v.len();
            let at = self.below(n + 1);
            match self.below(9) {
                0 if n > 0 => {
                    let i = self.below(n);
                    v[i] = self.rng.next_u64() as u8;
                }
                1 => {
                    let k = 1 + self.below(8);
                    let bytes: Vec<u8> = (0..k).map(|_| self.rng.next_u64() as u8).collect();
                    v.splice(at..at, bytes);
                }
                2 if n > 0 => {
                    let len = 1 + self.below((n - at).max(1).min(64));
                    v.drain(at..(at + len).min(n));
                }
                3 if n > 0 => {
                    let len = 1 + self.below((n - at).max(1).min(64));
                    let chunk = v[at..(at + len).min(n)].to_vec();
                    v.splice(at..at, chunk);
                }
                4 | 5 => {
                    let t = INTERESTING[self.below(INTERESTING.len())].as_bytes().to_vec();
                    v.splice(at..at, t);
                }
                6 => {
                    // Replace the value of a random `key = value` / `"key": value` with a token.
                    let seps: Vec<usize> = v.iter().enumerate().filter(|(_, &b)| b == b'=' || b == b':').map(|(i, _)| i).collect();
                    if !seps.is_empty() {
                        let s = seps[self.below(seps.len())] + 1;
                        let end = v[s..].iter().position(|&b| b == b'\n' || b == b',' || b == b'}').map(|p| s + p).unwrap_or(v.len());
                        let t = format!(" {}", INTERESTING[self.below(INTERESTING.len())]).into_bytes();
                        v.splice(s..end, t);
                    }
                }
                7 => {
                    let mut lines: Vec<Vec<u8>> = v.split(|&b| b == b'\n').map(|l| l.to_vec()).collect();
                    let (i, j) = (self.below(lines.len()), self.below(lines.len()));
                    if self.below(2) == 0 {
                        lines.swap(i, j);
                    } else if lines.len() > 1 {
                        lines.remove(i);
                    }
                    v = lines.join(&b'\n');
                }
                _ => v.truncate(at),
            }
        }
        v
    }

    /// [`Mutator::mutate_bytes`] of a text, back to (lossy) UTF-8: what a file read as text gives.
    pub fn mutate_text(&mut self, seed: &str) -> String {
        String::from_utf8_lossy(&self.mutate_bytes(seed.as_bytes())).into_owned()
    }

    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

/// What a fuzz run saw.
#[derive(Debug, Default, Clone)]
pub struct FuzzStats {
    pub cases: usize,
    pub ok: usize,
    pub errors: usize,
    pub panics: usize,
    /// Cases slower than the per-case limit.
    pub hangs: usize,
    pub max_case: Duration,
    pub total: Duration,
    /// The first panic or hang: the input (lossy) and what happened, to reproduce it.
    pub first_failure: Option<(String, String)>,
}

impl FuzzStats {
    pub fn row(&self, name: &str) -> String {
        format!(
            "| {name} | {} | {} | {} | {} | {} | {:.1} ms | {:.1} s |",
            self.cases,
            self.ok,
            self.errors,
            self.panics,
            self.hangs,
            self.max_case.as_secs_f64() * 1e3,
            self.total.as_secs_f64()
        )
    }
}

/// Run `n` mutants of `seeds` through `case` (Ok = accepted and checked, Err = a clear error).
/// A panic inside `case` is caught and counted; so is a case slower than `limit`.
pub fn run_cases<F>(seeds: &[Vec<u8>], n: usize, seed: u64, limit: Duration, mut case: F) -> FuzzStats
where
    F: FnMut(&[u8]) -> Result<(), String>,
{
    let mut m = Mutator::new(seed);
    let mut st = FuzzStats::default();
    let start = Instant::now();
    // The default hook would print every caught panic; the stats report them instead.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for _ in 0..n {
        let parent = m.pick(seeds).clone();
        let input = m.mutate_bytes(&parent);
        let t = Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(&input)));
        let dt = t.elapsed();
        st.cases += 1;
        st.max_case = st.max_case.max(dt);
        let failure = match r {
            Ok(Ok(())) => {
                st.ok += 1;
                None
            }
            Ok(Err(_)) => {
                st.errors += 1;
                None
            }
            Err(p) => {
                st.panics += 1;
                let msg = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default();
                Some(format!("panic: {msg}"))
            }
        };
        let failure = failure.or_else(|| {
            (dt > limit).then(|| {
                st.hangs += 1;
                format!("took {dt:?} (limit {limit:?})")
            })
        });
        if let (Some(f), None) = (failure, &st.first_failure) {
            // Binary mutants are large: keep the start, enough to see which seed and where.
            let shown: String = String::from_utf8_lossy(&input).chars().take(400).collect();
            st.first_failure = Some((shown, f));
        }
    }
    std::panic::set_hook(hook);
    st.total = start.elapsed();
    st
}
