// The optimiser's per-tensor work on CUDA (src/train/optim_cuda.rs), f32. Composed from candle
// ops, one AdamW update was ~13 launches per parameter tensor and the gradient norm 2-3 more:
// for RoAd on SmolLM2's 420 tensors, ~7,000 launches, a quarter of an H200 step.

// In place: g' = gscale · g (the clip factor); m ← b1 m + (1−b1) g'; v ← b2 v + (1−b2) g'²;
// p ← p (1 − lr·wd) − lr · (m/c1) / (√(v/c2) + eps).
extern "C" __global__ void adamw_f32(float* p, float* m, float* v, const float* g, unsigned long long n, float lr,
                                     float b1, float b2, float c1, float c2, float eps, float wd, float gscale) {
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)blockDim.x * gridDim.x) {
    float gi = g[i] * gscale;
    float mi = b1 * m[i] + (1.f - b1) * gi;
    float vi = b2 * v[i] + (1.f - b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * (1.f - lr * wd) - lr * ((mi / c1) / (sqrtf(vi / c2) + eps));
  }
}

// Partial sums of squares: block b of the grid writes out[b] (256 threads a block). The host
// adds the partials of all tensors in f64, in order.
extern "C" __global__ void sumsq_f32(const float* g, unsigned long long n, float* out) {
  __shared__ float sh[8];
  float s = 0.f;
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)blockDim.x * gridDim.x)
    s += g[i] * g[i];
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
  if (threadIdx.x % 32 == 0) sh[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.f;
    for (int w = 0; w < 8; w++) t += sh[w];
    out[blockIdx.x] = t;
  }
}
