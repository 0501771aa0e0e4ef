//! A seeded, portable RNG (splitmix64). candle's CPU RNG cannot be seeded, so everything that must
//! be reproducible (datasets, parameter init, shuffles) draws from this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rng(u64);

/// splitmix64's increment.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GAMMA);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
    /// `out[i] = f(u_i)` for the next `out.len()` uniforms `u_i`, in parallel: splitmix64's i-th
    /// output depends only on the state and i, so this equals drawing them one by one (and leaves
    /// the same state) at a fraction of the time. LoRA dropout draws one per activation element
    /// per projection per step: drawn one by one, a fifth of a LoRA fine-tuning step.
    pub fn fill_uniform<T: Send>(&mut self, out: &mut [T], f: impl Fn(f64) -> T + Sync) {
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 14;
        let s0 = self.0;
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
            for (j, o) in chunk.iter_mut().enumerate() {
                *o = f(Rng(s0.wrapping_add(((c * CHUNK + j) as u64).wrapping_mul(GAMMA))).uniform());
            }
        });
        self.0 = s0.wrapping_add((out.len() as u64).wrapping_mul(GAMMA));
    }
    /// Skips the next `n` draws and returns the state before them, from which a device kernel
    /// computes the same `n` uniforms `fill_uniform` would (the i-th: `next_u64` of state
    /// `s0 + i·GAMMA`).
    pub fn skip(&mut self, n: usize) -> u64 {
        let s0 = self.0;
        self.0 = s0.wrapping_add((n as u64).wrapping_mul(GAMMA));
        s0
    }
    /// A child stream, so adding draws in one place does not shift another's.
    pub fn fork(&mut self, tag: u64) -> Rng {
        Rng::new(self.next_u64() ^ tag.wrapping_mul(0xD6E8_FEB8_6659_FD93))
    }

    /// A tensor of i.i.d. U(-bound, bound) values.
    pub fn uniform_tensor(&mut self, shape: &[usize], bound: f32, device: &candle_core::Device) -> candle_core::Result<candle_core::Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| ((2.0 * self.uniform() - 1.0) as f32) * bound).collect();
        candle_core::Tensor::from_vec(v, shape, device)
    }

    /// A tensor of i.i.d. N(0, std²) values.
    pub fn normal_tensor(&mut self, shape: &[usize], std: f32, device: &candle_core::Device) -> candle_core::Result<candle_core::Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.normal() as f32 * std).collect();
        candle_core::Tensor::from_vec(v, shape, device)
    }
}

#[cfg(test)]
mod tests {
    use super::Rng;
    #[test]
    fn parallel_fill_equals_drawing_one_by_one() {
        let (mut a, mut b) = (Rng::new(9), Rng::new(9));
        let mut v = vec![0f64; 40_000];
        a.fill_uniform(&mut v, |u| u);
        assert!(v.iter().all(|&x| x == b.uniform()));
        assert_eq!(a.next_u64(), b.next_u64(), "the same state afterwards");
    }

    /// `skip` hands out the state a device kernel draws from (the i-th uniform: `next_u64` of
    /// state `s0 + i·GAMMA`) and leaves the stream where drawing them here would.
    #[test]
    fn skip_returns_the_state_of_the_skipped_draws() {
        let (mut a, mut b) = (Rng::new(3), Rng::new(3));
        let s0 = a.skip(1000);
        let drawn: Vec<f64> = (0..1000).map(|_| b.uniform()).collect();
        for (i, u) in drawn.iter().enumerate().step_by(97) {
            assert_eq!(Rng(s0.wrapping_add((i as u64).wrapping_mul(super::GAMMA))).uniform(), *u);
        }
        assert_eq!(a.next_u64(), b.next_u64(), "the same state afterwards");
    }

    #[test]
    fn same_seed_same_stream_and_uniform_in_range() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..100 {
            let x = a.uniform();
            assert_eq!(x, b.uniform());
            assert!((0.0..1.0).contains(&x));
        }
        assert_ne!(Rng::new(7).next_u64(), Rng::new(8).next_u64());
    }
}
