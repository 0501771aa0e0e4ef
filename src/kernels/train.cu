// Forwards of the differentiable training ops (src/model/train_ops.rs) on CUDA, f32. On the
// GPU a fine-tuning step of a small model is bound by kernel launches: composed from candle's
// primitives, an RMSNorm is ~6 launches forward, RoPE ~7, the scaled masked softmax 7, the MLP
// gate 2, and more each way backward. Each kernel here is one launch; the backward passes reuse
// tail.cu's kernels. Row kernels take one block per row (blockDim a multiple of 32).
#include <math_constants.h>

// Sum (or max) over the block; every thread gets the result. Safe to call repeatedly.
__device__ __forceinline__ float block_reduce(float v, bool is_max) {
  __shared__ float sh[32];
  for (int o = 16; o > 0; o >>= 1) {
    float w = __shfl_xor_sync(0xffffffff, v, o);
    v = is_max ? fmaxf(v, w) : v + w;
  }
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
  __syncthreads();  // an earlier call's readers are done with sh
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  v = lane < nw ? sh[lane] : (is_max ? -CUDART_INF_F : 0.f);
  for (int o = 16; o > 0; o >>= 1) {
    float w = __shfl_xor_sync(0xffffffff, v, o);
    v = is_max ? fmaxf(v, w) : v + w;
  }
  return v;
}

// y = x / sqrt(mean(x²) + eps) · w, one block per row of d.
extern "C" __global__ void train_rms_fwd(const float* x, const float* w, float* y, unsigned int d, float eps) {
  const float* xr = x + (unsigned long long)blockIdx.x * d;
  float* yr = y + (unsigned long long)blockIdx.x * d;
  float s = 0.f;
  for (unsigned int j = threadIdx.x; j < d; j += blockDim.x) s += xr[j] * xr[j];
  s = block_reduce(s, false);
  float r = 1.f / sqrtf(s / d + eps);
  for (unsigned int j = threadIdx.x; j < d; j += blockDim.x) yr[j] = xr[j] * r * w[j];
}

// m = silu(g) · u.
extern "C" __global__ void train_silu_mul(const float* g, const float* u, float* m, unsigned long long n) {
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)blockDim.x * gridDim.x) {
    float gv = g[i];
    m[i] = gv / (1.f + expf(-gv)) * u[i];
  }
}

// Rotate-half RoPE of x [b, heads, t, 2·half] by tables [b, t, half] (sign −1: the inverse, the
// backward): y₁ = x₁c − x₂·sign·s, y₂ = x₂c + x₁·sign·s. One thread per pair.
extern "C" __global__ void train_rope(const float* x, const float* c, const float* s, float* y, unsigned int b,
                                      unsigned int heads, unsigned int t, unsigned int half, float sign,
                                      unsigned long long pairs) {
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < pairs;
       i += (unsigned long long)blockDim.x * gridDim.x) {
    unsigned long long row = i / half;  // (batch row · head, position)
    unsigned int k = (unsigned int)(i - row * half);
    unsigned int ti = (unsigned int)(row % t);
    unsigned long long bi = min((unsigned long long)(row / t) / heads, (unsigned long long)(b - 1));
    unsigned long long tab = (bi * t + ti) * half + k;
    unsigned long long base = row * 2 * half;
    float x1 = x[base + k], x2 = x[base + half + k], cc = c[tab], ss = sign * s[tab];
    y[base + k] = x1 * cc - x2 * ss;
    y[base + half + k] = x2 * cc + x1 * ss;
  }
}

// p = softmax(scale · x + mask) per row of n over scores [b, heads, t, n]; the additive mask
// [b, 1, t, n] is shared by the heads (has_mask 0: none). One block per row.
extern "C" __global__ void train_masked_softmax(const float* x, const float* mask, float* p, unsigned int heads,
                                                unsigned int t, unsigned int n, float scale, int has_mask) {
  unsigned long long row = blockIdx.x;
  unsigned long long ti = row % t, bh = row / t;
  const float* xr = x + row * n;
  const float* mr = mask + ((bh / heads) * t + ti) * n;
  float* pr = p + row * n;
  float mx = -CUDART_INF_F;
  for (unsigned int j = threadIdx.x; j < n; j += blockDim.x) {
    float v = xr[j] * scale + (has_mask ? mr[j] : 0.f);
    pr[j] = v;
    mx = fmaxf(mx, v);
  }
  mx = block_reduce(mx, true);
  float sum = 0.f;
  for (unsigned int j = threadIdx.x; j < n; j += blockDim.x) {
    float e = expf(pr[j] - mx);
    pr[j] = e;
    sum += e;
  }
  sum = block_reduce(sum, false);
  for (unsigned int j = threadIdx.x; j < n; j += blockDim.x) pr[j] /= sum;
}

// Inverted dropout, y = x · scale where u_i < keep, else 0: u_i is splitmix64's i-th uniform
// from state s0 (util::rng's `fill_uniform`), so the mask is the one the CPU draws from the same
// stream, and the backward is this kernel on the gradient with the same s0.
extern "C" __global__ void train_dropout(const float* x, float* y, unsigned long long s0, unsigned long long n, float keep,
                                         float scale) {
  const unsigned long long gamma = 0x9E3779B97F4A7C15ull;
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)blockDim.x * gridDim.x) {
    unsigned long long z = s0 + (i + 1) * gamma;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    float u = (float)((double)(z >> 11) / 9007199254740992.0);
    y[i] = u < keep ? x[i] * scale : 0.f;
  }
}
