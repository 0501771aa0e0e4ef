// RoAd's z = f ⊙ h + s ⊙ rot(h) as one CUDA kernel (inference). The composed candle ops cost
// ~6 launches per adapted projection; in launch-bound decoding that is what separates RoAd
// from the plain model. Pairing: within each group of g dims, j < g/2 pairs with j + g/2;
// rot(h)_j = -h_{j+g/2} (first half), +h_{j-g/2} (second half).
// h, z: [rows, d]; f, s: [rows / rows_per_col, d] (one column row per block of rows).
#include "dtype.cuh"

template <typename T>
__device__ void road_rows(const T* h, const T* f, const T* s, T* z, unsigned int d, unsigned int g,
                          unsigned int rows_per_col, unsigned long long n) {
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)blockDim.x * gridDim.x) {
    unsigned long long r = i / d;
    unsigned int j = (unsigned int)(i - r * d);
    unsigned long long c = (r / rows_per_col) * d + j;
    unsigned int half = g / 2;
    bool first = (j % g) < half;
    unsigned int p = first ? j + half : j - half;
    float hp = to_f(h[r * d + p]);
    float rot = first ? -hp : hp;
    z[i] = from_f<T>(to_f(f[c]) * to_f(h[i]) + to_f(s[c]) * rot);
  }
}

#define ROAD_OP(T, NAME)                                                                          \
  extern "C" __global__ void NAME(const T* h, const T* f, const T* s, T* z, unsigned int d,        \
                                  unsigned int g, unsigned int rows_per_col, unsigned long long n) { \
    road_rows<T>(h, f, s, z, d, g, rows_per_col, n);                                              \
  }

ROAD_OP(float, road_rows_f32)
ROAD_OP(__nv_bfloat16, road_rows_bf16)
ROAD_OP(__half, road_rows_f16)

// Backward of the training apply (f32; f, s shared by all rows; fs = [f (d); s (d)], out =
// [dh (rows·d); df (d); ds (d)]): with c's pair partner p and sgn = +1 on first halves, −1 on
// second halves:
//   dh_c = g_c f_c + sgn · g_p s_p,  df_c = Σ_rows g_c h_c,  ds_c = −sgn · Σ_rows g_c h_p.
// Block (32, 16): 32 columns × 16 row lanes; the lanes' partial sums are added in a fixed order
// (no atomics), so a run is reproducible to the bit.
extern "C" __global__ void road_bwd_f32(const float* h, const float* gz, const float* fs, float* out, unsigned int d,
                                        unsigned int g, unsigned long long rows) {
  const float *f = fs, *s = fs + d;
  float *dh = out, *df = out + rows * d, *ds = df + d;
  __shared__ float pf[16][33], ps[16][33];
  unsigned int c = blockIdx.x * 32 + threadIdx.x;
  float af = 0.f, as = 0.f;
  bool first = true;
  if (c < d) {
    unsigned int half = g / 2;
    first = (c % g) < half;
    unsigned int p = first ? c + half : c - half;
    float fc = f[c], sp = first ? s[p] : -s[p];
    for (unsigned long long r = threadIdx.y; r < rows; r += 16) {
      unsigned long long o = r * d;
      float gc = gz[o + c];
      dh[o + c] = gc * fc + gz[o + p] * sp;
      af += gc * h[o + c];
      as += gc * h[o + p];
    }
  }
  pf[threadIdx.y][threadIdx.x] = af;
  ps[threadIdx.y][threadIdx.x] = as;
  __syncthreads();
  if (threadIdx.y == 0 && c < d) {
    float a = 0.f, b = 0.f;
    for (int y = 0; y < 16; y++) {
      a += pf[y][threadIdx.x];
      b += ps[y][threadIdx.x];
    }
    df[c] = a;
    ds[c] = first ? -b : b;
  }
}
