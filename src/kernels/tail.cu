// Backward kernels of the frozen tail (src/model/llama/tail.rs). An intervention training step
// on a small model is bound by kernel launches; each of these replaces 4-13 composed candle ops
// with one launch. Math in f32 whatever the storage type.
#include "dtype.cuh"

// Sum of a and b over the block (blockDim.x a multiple of 32, at most 1024); every thread gets them.
__device__ __forceinline__ void block_sum2(float& a, float& b) {
  __shared__ float sa[32], sb[32];
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_xor_sync(0xffffffff, a, o);
    b += __shfl_xor_sync(0xffffffff, b, o);
  }
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
  if (lane == 0) { sa[warp] = a; sb[warp] = b; }
  __syncthreads();
  a = lane < nw ? sa[lane] : 0.f;
  b = lane < nw ? sb[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_xor_sync(0xffffffff, a, o);
    b += __shfl_xor_sync(0xffffffff, b, o);
  }
}

// y = x · r · w with r = 1/sqrt(mean(x²) + eps); dx = r·(dy·w) − x · r³ · mean(dy·w·x).
// One block per row of d.
template <typename T>
__device__ void rms_bwd(const T* x, const T* w, const T* dy, T* dx, unsigned int d, float eps) {
  const unsigned long long row = blockIdx.x;
  const T* xr = x + row * d;
  const T* gr = dy + row * d;
  T* out = dx + row * d;
  float sxx = 0.f, sgx = 0.f;
  for (unsigned int j = threadIdx.x; j < d; j += blockDim.x) {
    float xv = to_f(xr[j]);
    sxx += xv * xv;
    sgx += to_f(gr[j]) * to_f(w[j]) * xv;
  }
  block_sum2(sxx, sgx);
  float r = rsqrtf(sxx / d + eps);
  float c = sgx / d * r * r * r;
  for (unsigned int j = threadIdx.x; j < d; j += blockDim.x) {
    out[j] = from_f<T>(to_f(gr[j]) * to_f(w[j]) * r - to_f(xr[j]) * c);
  }
}

// p = softmax(s) per row of n; ds = p · (dp − Σ dp·p). One block per row.
template <typename T>
__device__ void softmax_bwd(const T* p, const T* dp, T* ds, unsigned int n) {
  const unsigned long long row = blockIdx.x;
  const T* pr = p + row * n;
  const T* gr = dp + row * n;
  T* out = ds + row * n;
  float s = 0.f, unused = 0.f;
  for (unsigned int j = threadIdx.x; j < n; j += blockDim.x) s += to_f(gr[j]) * to_f(pr[j]);
  block_sum2(s, unused);
  for (unsigned int j = threadIdx.x; j < n; j += blockDim.x) out[j] = from_f<T>(to_f(pr[j]) * (to_f(gr[j]) - s));
}

// m = silu(g) · u; given dm: dg = dm · u · silu'(g), du = dm · silu(g). out = [dg (n); du (n)].
template <typename T>
__device__ void swiglu_bwd(const T* dm, const T* g, const T* u, T* out, unsigned long long n) {
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)blockDim.x * gridDim.x) {
    float gv = to_f(g[i]), m = to_f(dm[i]);
    float sg = 1.f / (1.f + __expf(-gv));
    float silu = gv * sg;
    out[i] = from_f<T>(m * to_f(u[i]) * (sg + silu * (1.f - sg)));
    out[n + i] = from_f<T>(m * silu);
  }
}

#define TAIL_OPS(T, S)                                                                                  \
  extern "C" __global__ void rms_bwd_##S(const T* x, const T* w, const T* dy, T* dx, unsigned int d,   \
                                         float eps) {                                                  \
    rms_bwd<T>(x, w, dy, dx, d, eps);                                                                  \
  }                                                                                                    \
  extern "C" __global__ void softmax_bwd_##S(const T* p, const T* dp, T* ds, unsigned int n) {         \
    softmax_bwd<T>(p, dp, ds, n);                                                                      \
  }                                                                                                    \
  extern "C" __global__ void swiglu_bwd_##S(const T* dm, const T* g, const T* u, T* out,               \
                                            unsigned long long n) {                                    \
    swiglu_bwd<T>(dm, g, u, out, n);                                                                   \
  }

TAIL_OPS(float, f32)
TAIL_OPS(__nv_bfloat16, bf16)
TAIL_OPS(__half, f16)
