//! The CPU GEMMs' task runner (`packed_gemm`, `amx_gemm`, `dot_bf16_gemm`): tasks `0..n` over
//! rayon's pool with the calling thread claiming tasks too; `par_row_chunks` gives short
//! element-wise passes (RoAd's fused rotation) the same runner.
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// `ROAD_GEMM_POOL=rayon`: the GEMMs' tasks through rayon's `for_each` from any thread, as
/// before `par_tasks`, for comparisons.
fn plain_rayon() -> bool {
    static R: OnceLock<bool> = OnceLock::new();
    *R.get_or_init(|| std::env::var("ROAD_GEMM_POOL").is_ok_and(|v| v == "rayon"))
}

/// Multiply-adds up to which a GEMM takes `par_tasks`' claim loops (≈ 130 µs on two Zen 5
/// cores): every decode-step projection, 1×32 prefill's projections; not 16×32 prefill's.
const SHORT_GEMM_MACS: usize = 1 << 25;

/// Run tasks `0..n` of a GEMM of `macs` multiply-adds (here and in the bf16 GEMMs) on rayon's
/// pool with the calling thread working too. Why not `into_par_iter().for_each` from the
/// forward's (main) thread: that injects the whole loop into the pool and puts the caller to
/// sleep on a condvar until it is done — a futex wait and wake per GEMM, 20–40 µs in this VM,
/// as much as a decode step's whole GEMM at batch 8. Here the caller hands the pool `threads − 1` claim loops (`rayon::spawn`: no waiting), claims
/// tasks itself from the same cursor, and at the end waits only for tasks already claimed and
/// running. A pool thread that starts late finds the cursor past `n` and leaves without touching
/// the caller's data. Idle pool threads keep rayon's policy (yield, then sleep), so several
/// processes on few cores do not starve each other (candle's barrier pool, tried first, spins
/// ~0.7 ms after each call: four 2-thread runs on 2 cores took 112 s instead of 9 s).
pub(super) fn par_tasks(n: usize, macs: usize, f: impl Fn(usize) + Sync + Send) {
    let threads = rayon::current_num_threads();
    if n <= 1 || threads <= 1 {
        (0..n).for_each(f);
        return;
    }
    // On a pool thread rayon's own splitting is cheap (no sleeping caller); and a long GEMM
    // (prefill) pays the sleep once for milliseconds of work, while the claim loops' extra
    // awake thread cost 16×32 prefill 7–9% on 2 cores.
    if plain_rayon() || rayon::current_thread_index().is_some() || macs > SHORT_GEMM_MACS {
        (0..n).into_par_iter().for_each(f);
        return;
    }
    let local: &(dyn Fn(usize) + Sync) = &f;
    // SAFETY (lifetime): `Claims::f` is only called for a claimed task index < n, and this
    // function returns only after every claimed task has finished (`done == n`); once the cursor
    // has passed n nobody dereferences it again.
    let f_static = unsafe { std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const (dyn Fn(usize) + Sync + 'static)>(local) };
    let claims = Arc::new(Claims { cursor: AtomicUsize::new(0), done: AtomicUsize::new(0), panicked: AtomicBool::new(false), n, f: f_static });
    for _ in 1..threads.min(n) {
        let c = claims.clone();
        rayon::spawn(move || c.work());
    }
    claims.work();
    let mut spins = 0u32;
    while claims.done.load(Ordering::Acquire) < n {
        spins += 1;
        if spins < 1 << 12 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    assert!(!claims.panicked.load(Ordering::Relaxed), "a GEMM task panicked");
}

/// `f(first_row, chunk)` over `z` cut into whole `row`-wide rows, about two chunks per thread,
/// through `par_tasks`' claim loops: for passes of tens of µs (a prefill projection's RoAd
/// rotation), where rayon's `par_chunks_mut` from the forward's thread costs a futex sleep and
/// wake per call (measured: RoAd's mixed-batch prefill 10% over the plain model's).
pub fn par_row_chunks(z: &mut [f32], row: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    let rows = z.len() / row.max(1);
    let per = rows.div_ceil(2 * rayon::current_num_threads()).max(1);
    let n = rows.div_ceil(per);
    let out = SharedOut(z.as_mut_ptr());
    par_tasks(n, 0, |i| {
        let out = &out;
        let (r0, r1) = (i * per, ((i + 1) * per).min(rows));
        // SAFETY: task i owns rows r0..r1 only; the tasks' ranges are disjoint and inside `z`,
        // which stays mutably borrowed until `par_tasks` returns (after every task).
        let chunk = unsafe { std::slice::from_raw_parts_mut(out.0.add(r0 * row), (r1 - r0) * row) };
        f(r0, chunk);
    });
}

/// An output buffer shared by tasks that write disjoint parts of it (the GEMMs' columns,
/// `par_row_chunks`' rows). A task borrows the wrapper whole (`let out = &out;`): a closure that
/// named `out.0` directly would capture the raw pointer, which is not `Sync`.
pub(super) struct SharedOut<T>(pub(super) *mut T);
unsafe impl<T> Sync for SharedOut<T> {}

/// The shared claim cursor of one `par_tasks` call.
struct Claims {
    cursor: AtomicUsize,
    done: AtomicUsize,
    panicked: AtomicBool,
    n: usize,
    f: *const (dyn Fn(usize) + Sync + 'static),
}

// SAFETY: `f` points at a `Sync` closure, called from several threads only while its owner waits.
unsafe impl Send for Claims {}
unsafe impl Sync for Claims {}

impl Claims {
    fn work(&self) {
        loop {
            let i = self.cursor.fetch_add(1, Ordering::AcqRel);
            if i >= self.n {
                return;
            }
            // SAFETY: i < n is claimed, so the owner is still waiting (see `par_tasks`).
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { (*self.f)(i) })).is_ok();
            if !ok {
                self.panicked.store(true, Ordering::Relaxed);
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every task runs exactly once and has finished when `par_tasks` returns — with several
    /// callers at once (the claim loops of one call must not run another's tasks), short and
    /// long GEMMs (claim loops and rayon's `for_each`), and from inside the pool.
    #[test]
    fn par_tasks_runs_each_task_once_before_returning() {
        use std::sync::atomic::AtomicU32;
        let check = |n: usize, macs: usize| {
            let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
            par_tasks(n, macs, |i| {
                std::thread::sleep(std::time::Duration::from_micros((i % 3) as u64 * 50));
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n={n} macs={macs}");
        };
        std::thread::scope(|s| {
            for t in 0..4 {
                s.spawn(move || {
                    for n in [0, 1, 2, 7, 37] {
                        check(n + t, 1000);
                        check(n + t, SHORT_GEMM_MACS + 1);
                    }
                });
            }
        });
        rayon::scope(|_| check(19, 1000));
    }
}
