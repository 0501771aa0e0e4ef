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

// ---- RoAd from its parameters (f32, CUDA training and inference) ----
// The columns f = α cos θ, s = α sin θ are computed inside the kernels instead of by ~8 composed
// launches per adapted projection each way. variant 1 (RoAd1: one (θ, α) per pair, shared by
// both members), 2 (one per dim), 4 (per group: g values for f, then g for s).
__device__ __forceinline__ void road_param_idx(unsigned int c, unsigned int g, int variant, unsigned int* kf,
                                               unsigned int* ks) {
  unsigned int grp = c / g, j = c % g;
  if (variant == 1) {
    *kf = *ks = grp * (g / 2) + j % (g / 2);
  } else if (variant == 2) {
    *kf = *ks = c;
  } else {
    *kf = grp * 2 * g + j;
    *ks = grp * 2 * g + g + j;
  }
}

// z = f ⊙ h + s ⊙ rot(h), one thread per element of h [rows, d].
extern "C" __global__ void road_param_fwd(const float* h, const float* theta, const float* alpha, float* z,
                                          unsigned int d, unsigned int g, int variant, unsigned long long n) {
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)blockDim.x * gridDim.x) {
    unsigned long long r = i / d;
    unsigned int c = (unsigned int)(i - r * d), kf, ks;
    road_param_idx(c, g, variant, &kf, &ks);
    unsigned int half = g / 2;
    bool first = (c % g) < half;
    float hp = h[r * d + (first ? c + half : c - half)];
    z[i] = alpha[kf] * cosf(theta[kf]) * h[i] + alpha[ks] * sinf(theta[ks]) * (first ? -hp : hp);
  }
}

// Backward, step 1: dh and the columns' gradients df, ds (as road_bwd_f32, f and s from the
// parameters). ta = [θ (np); α (np)]; out = [dh (rows·d); dθ (np); dα (np)]; dfds = [df (d); ds (d)]
// (scratch for step 2).
extern "C" __global__ void road_param_bwd_cols(const float* h, const float* gz, const float* ta, float* out, float* dfds,
                                               unsigned int d, unsigned int g, int variant, unsigned int np,
                                               unsigned long long rows) {
  __shared__ float pf[16][33], ps[16][33];
  const float *theta = ta, *alpha = ta + np;
  float* dh = out;
  unsigned int c = blockIdx.x * 32 + threadIdx.x;
  float af = 0.f, as = 0.f;
  bool first = true;
  if (c < d) {
    unsigned int half = g / 2, kf, kp, unused;
    first = (c % g) < half;
    unsigned int p = first ? c + half : c - half;
    road_param_idx(c, g, variant, &kf, &unused);  // f of c
    road_param_idx(p, g, variant, &unused, &kp);  // s of its partner
    float fc = alpha[kf] * cosf(theta[kf]);
    float sp = alpha[kp] * sinf(theta[kp]);
    if (!first) sp = -sp;
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
    dfds[c] = a;
    dfds[d + c] = first ? -b : b;
  }
}

// Backward, step 2: one thread per parameter k, Df / Ds = the sums of df / ds over the columns
// that read k; dθ = α (Ds cos θ − Df sin θ), dα = Df cos θ + Ds sin θ. Written to out after dh.
extern "C" __global__ void road_param_bwd_params(const float* ta, const float* dfds, float* out, unsigned int d,
                                                 unsigned int g, int variant, unsigned int np,
                                                 unsigned long long rows) {
  unsigned int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= np) return;
  const float *df = dfds, *ds = dfds + d;
  float Df = 0.f, Ds = 0.f;
  if (variant == 1) {
    unsigned int c1 = (k / (g / 2)) * g + k % (g / 2), c2 = c1 + g / 2;
    Df = df[c1] + df[c2];
    Ds = ds[c1] + ds[c2];
  } else if (variant == 2) {
    Df = df[k];
    Ds = ds[k];
  } else {
    unsigned int grp = k / (2 * g), r = k % (2 * g);
    if (r < g) Df = df[grp * g + r];
    else Ds = ds[grp * g + r - g];
  }
  float t = ta[k], a = ta[np + k], ct = cosf(t), st = sinf(t);
  float* dtheta = out + rows * d;
  dtheta[k] = a * (Ds * ct - Df * st);
  dtheta[np + k] = Df * ct + Ds * st;
}
