// Flash-style attention forward for inference (the FlashAttention-2 recipe): scores, causal /
// sliding-window masking, an online softmax and the second matmul in one kernel, so the
// [b, heads, t, s] score and probability tensors never reach memory. Tensor-core MMAs
// (m16n8k16, bf16/f16 in, f32 accumulate); the softmax runs in f32 on the accumulators, the
// probabilities are rounded to the input type for P·V (as FlashAttention does).
//
// Layouts: q [b, nh, t, HD], k/v [b, nkv, s, HD], each with its own (batch, head, row) strides
// and contiguous rows, so [b, t, heads, HD] projections are read in place (already
// normalised/rotated; GQA: query head h reads KV head h / (nh / nkv)); out [b, t, nh·HD]
// contiguous (the layout the output projection takes, so no transpose copy follows). Query i sits at position past + i with
// past = s - t; it sees key j when j <= past + i and, with window > 0, past + i < j + window.
// One block: 64 query rows (4 warps × 16) of one (batch, head); keys in tiles of 64.
#include "dtype.cuh"
#include <stdint.h>

namespace {

constexpr int BM = 64, BN = 64, PAD = 8, THREADS = 128;

}  // namespace

// q's batch/head/row strides, then k's, then v's (elements); passed by value.
struct Strides {
  long long v[9];
};

namespace {

__device__ __forceinline__ uint32_t pack2(float lo, float hi, const __nv_bfloat16 *) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&v);
}
__device__ __forceinline__ uint32_t pack2(float lo, float hi, const __half *) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&v);
}

__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                    const __nv_bfloat16 *) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                    const __half *) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8×8 b16 matrices as stored: the B fragments (k 0–7, k 8–15) of two n8 tiles of a
// row-major [n][k] tile (K's rows), one instruction instead of four 32-bit loads.
__device__ __forceinline__ void ldmatrix_x4(uint32_t &r0, uint32_t &r1, uint32_t &r2, uint32_t &r3, const void *p) {
  uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(a));
}

// Four 8×8 b16 matrices, transposed: the B fragments of two n8 tiles of a row-major [k][n] tile.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t &r0, uint32_t &r1, uint32_t &r2, uint32_t &r3,
                                                  const void *p) {
  uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(a));
}

// Rows [r0, r0 + BM) of a [rows, HD] matrix (row stride `stride`) into shared memory (row
// stride HD + PAD: the padding makes the fragment loads below bank-conflict free); rows past
// `rows` are zero. Asynchronous (cp.async): the caller commits and waits, so a tile's load
// overlaps the other tile's math.
template <typename T, int HD>
__device__ __forceinline__ void load_tile(T *dst, const T *src, long long stride, int r0, int rows) {
  constexpr int CH = HD / 8, LD = HD + PAD;
  for (int i = threadIdx.x; i < BM * CH; i += THREADS) {
    int r = i / CH, c = (i % CH) * 8;
    const bool in = r0 + r < rows;
    const T *from = src + (in ? (r0 + r) * stride + c : 0);
    uint32_t to = static_cast<uint32_t>(__cvta_generic_to_shared(dst + r * LD + c));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(to), "l"(from), "r"(in ? 16 : 0));
  }
  asm volatile("cp.async.commit_group;\n");
}

__device__ __forceinline__ void wait_tiles() {
  asm volatile("cp.async.wait_group 0;\n");
  __syncthreads();
}

template <typename T, int HD>
__device__ void flash_fwd(const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v,
                          T *__restrict__ out, int nh, int nkv, int t, int s, int window, float scale_log2,
                          const Strides sv_) {
  const long long *st = sv_.v;
  constexpr int LD = HD + PAD, KS = HD / 16, DT = HD / 8, NT = BN / 8;
  // Q's tile is read into registers once, then its space holds K tiles; V has its own.
  __shared__ __align__(16) T sk[BM * LD];
  __shared__ __align__(16) T sv[BN * LD];
  const T *tag = nullptr;
  // Causal tiles further down see more keys: schedule them first, so the last wave is short.
  const int q0 = (gridDim.x - 1 - blockIdx.x) * BM, h = blockIdx.y, bi = blockIdx.z;
  const int kvh = h / (nh / nkv), past = s - t;
  const T *qb = q + bi * st[0] + h * st[1];
  const T *kb = k + bi * st[3] + kvh * st[4];
  const T *vb = v + bi * st[6] + kvh * st[7];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, tg = lane & 3;
  const int wr = warp * 16;

  load_tile<T, HD>(sk, qb, st[2], q0, t);
  wait_tiles();
  uint32_t qa[KS][4];
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
    const T *p = sk + (wr + g) * LD + kk * 16 + tg * 2;
    qa[kk][0] = *reinterpret_cast<const uint32_t *>(p);
    qa[kk][1] = *reinterpret_cast<const uint32_t *>(p + 8 * LD);
    qa[kk][2] = *reinterpret_cast<const uint32_t *>(p + 8);
    qa[kk][3] = *reinterpret_cast<const uint32_t *>(p + 8 * LD + 8);
  }
  float o[DT][4];
#pragma unroll
  for (int d = 0; d < DT; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
  float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.f, 0.f};
  // This thread's two query rows and their positions.
  const int qp[2] = {past + q0 + wr + g, past + q0 + wr + g + 8};

  // Keys any row of the block sees: [kstart, kend).
  const int kend = min(s, past + min(q0 + BM, t));
  int kstart = window > 0 ? max(0, past + q0 - window + 1) : 0;
  kstart = (kstart / BN) * BN;
  __syncthreads();  // every warp holds its Q fragments: K tiles may overwrite Q's
  if (kstart < kend) load_tile<T, HD>(sk, kb, st[5], kstart, s);
  for (int n0 = kstart; n0 < kend; n0 += BN) {
    wait_tiles();  // K(n0) has landed, and every warp is done with the previous V tile
    load_tile<T, HD>(sv, vb, st[8], n0, s);  // V(n0) loads during S = Q·K(n0)ᵀ

    float sc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
      for (int nt = 0; nt < NT; nt += 2) {
        // Lane l addresses row l % 8 of matrix l / 8: (n tile nt or nt + 1) × (k 0–7 or 8–15).
        const T *p = sk + (nt * 8 + ((lane >> 4) << 3) + (lane & 7)) * LD + kk * 16 + ((lane >> 3) & 1) * 8;
        uint32_t b0, b1, b2, b3;
        ldmatrix_x4(b0, b1, b2, b3, p);
        mma(sc[nt], qa[kk], b0, b1, tag);
        mma(sc[nt + 1], qa[kk], b2, b3, tag);
      }
    }
    wait_tiles();  // V(n0) has landed, and every warp is done with K(n0)
    if (n0 + BN < kend) load_tile<T, HD>(sk, kb, st[5], n0 + BN, s);  // during softmax and P·V
    // Masking is needed only in tiles that cross the causal edge, the window's edge or the end.
    const bool edge = (n0 + BN - 1 > past + q0 + wr) || window > 0 || (n0 + BN > s);
    float mx[2] = {m_r[0], m_r[1]};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = sc[nt][e] * scale_log2;
        if (edge) {
          const int col = n0 + nt * 8 + tg * 2 + (e & 1), p = qp[e >> 1];
          if (col > p || col >= s || (window > 0 && p >= col + window)) x = -INFINITY;
        }
        sc[nt][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    }
    float sub[2], corr[2], rs[2] = {0.f, 0.f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      // A row that has seen no key yet keeps max -inf: subtract 0 so exp2 gives 0, not NaN.
      sub[r] = mx[r] == -INFINITY ? 0.f : mx[r];
      corr[r] = exp2f(m_r[r] - sub[r]);
      m_r[r] = mx[r];
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float p = exp2f(sc[nt][e] - sub[e >> 1]);
        sc[nt][e] = p;
        rs[e >> 1] += p;
      }
    }
    // Per-thread partial row sums; the four threads of a row add theirs up at the end.
    l_r[0] = l_r[0] * corr[0] + rs[0];
    l_r[1] = l_r[1] * corr[1] + rs[1];
#pragma unroll
    for (int d = 0; d < DT; ++d) {
      o[d][0] *= corr[0];
      o[d][1] *= corr[0];
      o[d][2] *= corr[1];
      o[d][3] *= corr[1];
    }
    // O += P·V: the score accumulators of two n8 tiles are exactly the A fragment of one k16 step.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t pa[4] = {pack2(sc[2 * kk][0], sc[2 * kk][1], tag), pack2(sc[2 * kk][2], sc[2 * kk][3], tag),
                        pack2(sc[2 * kk + 1][0], sc[2 * kk + 1][1], tag),
                        pack2(sc[2 * kk + 1][2], sc[2 * kk + 1][3], tag)};
#pragma unroll
      for (int d = 0; d < DT; d += 2) {
        uint32_t b0, b1, b2, b3;
        const T *p = sv + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + d * 8 + (lane >> 4) * 8;
        ldmatrix_x4_trans(b0, b1, b2, b3, p);
        mma(o[d], pa, b0, b1, tag);
        mma(o[d + 1], pa, b2, b3, tag);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_r[r] += __shfl_xor_sync(0xffffffffu, l_r[r], 1);
    l_r[r] += __shfl_xor_sync(0xffffffffu, l_r[r], 2);
    l_r[r] = l_r[r] > 0.f ? 1.f / l_r[r] : 0.f;
  }
  const int row[2] = {q0 + wr + g, q0 + wr + g + 8};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row[r] >= t) continue;
    T *dst = out + ((size_t)bi * t + row[r]) * nh * HD + h * HD + tg * 2;
#pragma unroll
    for (int d = 0; d < DT; ++d)
      *reinterpret_cast<uint32_t *>(dst + d * 8) = pack2(o[d][2 * r] * l_r[r], o[d][2 * r + 1] * l_r[r], tag);
  }
}

}  // namespace

#define FLASH(NAME, T, HD)                                                                                    \
  extern "C" __global__ void __launch_bounds__(THREADS)                                                       \
      NAME(const T *q, const T *k, const T *v, T *out, int nh, int nkv, int t, int s, int window, float sl2,   \
           const Strides st) {                                                                               \
    flash_fwd<T, HD>(q, k, v, out, nh, nkv, t, s, window, sl2, st);                                            \
  }
FLASH(flash_attn_bf16_64, __nv_bfloat16, 64)
FLASH(flash_attn_bf16_128, __nv_bfloat16, 128)
FLASH(flash_attn_f16_64, __half, 64)
FLASH(flash_attn_f16_128, __half, 128)
