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
