// Prefill / block-local partial attention with LSE and entropy, on tensor cores (WMMA bf16
// m16n16k16, fp32 accumulate): the first kernel, kept as launch_prefill_attention_wmma, the
// baseline of the mma.sync kernel (kernels/attention/prefill_mma.cuh). One block = 64 query
// rows of one head, 4 warps x 16 rows; the keys stream through shared memory in tiles of 64. Per
// row the online state (m, l, u) of entropy.md is kept in base 2: s2 = s * log2(e), so exp2 is one
// MUFU op; converted at the end.
//
// Shared memory per block (head_dim D): Q, K, V tiles (64 x D bf16 each), per warp S (16 x 64
// fp32), P (16 x 64 bf16) and the O accumulator (16 x D fp32). O lives in shared memory rather
// than in fragments because WMMA's accumulator layout is opaque and the online softmax rescales
// O by row. About 113 KB at D = 128, so two blocks per SM.
//
// Paged keys: each 64-key tile lies in one page (pages hold >= 64 keys), so a tile costs one
// page-table read and then loads like the contiguous case (a separate kernel instance).
#include <mma.h>

#include <algorithm>

#include "kernels/attention/attention.h"
#include "kernels/attention/common.cuh"
#include "kernels/baselines/prefill_baselines.h"

namespace starserve {
namespace {

namespace wmma = nvcuda::wmma;
using detail::kLn2;
using detail::kLog2e;
using detail::kNegInfF;

constexpr int kBlockM = 64;
constexpr int kBlockN = 64;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;

template <int D>
struct PrefillSmem {
  static constexpr int kLdQkv = D + 8;       // bf16 elements; +8 keeps WMMA's 32-byte alignment, breaks bank conflicts
  static constexpr int kLdS = kBlockN + 4;   // fp32
  static constexpr int kLdP = kBlockN + 8;   // bf16
  static constexpr int kLdO = D + 4;         // fp32
  static constexpr size_t kQ = 0;
  static constexpr size_t kK = kQ + sizeof(__nv_bfloat16) * kBlockM * kLdQkv;
  static constexpr size_t kV = kK + sizeof(__nv_bfloat16) * kBlockN * kLdQkv;
  static constexpr size_t kS = kV + sizeof(__nv_bfloat16) * kBlockN * kLdQkv;
  static constexpr size_t kP = kS + sizeof(float) * kWarps * 16 * kLdS;
  static constexpr size_t kO = kP + sizeof(__nv_bfloat16) * kWarps * 16 * kLdP;
  static constexpr size_t kBytes = kO + sizeof(float) * kWarps * 16 * kLdO;
};

// Copies rows [row0, row0 + 64) of one head (row stride `stride` elements) into a 64 x D tile;
// rows past n_rows are zero so that padded scores are finite (they are masked anyway).
template <int D>
__device__ __forceinline__ void load_tile(__nv_bfloat16* tile, const __nv_bfloat16* src, int64_t row0, int64_t n_rows,
                                          int64_t stride) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  for (int idx = threadIdx.x; idx < kBlockM * kChunks; idx += kThreads) {
    const int r = idx / kChunks, c = idx % kChunks;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (row0 + r < n_rows) val = *reinterpret_cast<const uint4*>(src + (row0 + r) * stride + c * 8);
    *reinterpret_cast<uint4*>(tile + r * PrefillSmem<D>::kLdQkv + c * 8) = val;
  }
}

// kPaged: keys through p.k_pages / p.v_pages; a separate instance so the contiguous loop is untouched.
template <int D, typename OutT, bool kPaged>
__global__ void __launch_bounds__(kThreads) prefill_attention_kernel(AttentionGpuParams p) {
  using L = PrefillSmem<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  auto* s_q = reinterpret_cast<__nv_bfloat16*>(smem + L::kQ);
  auto* s_k = reinterpret_cast<__nv_bfloat16*>(smem + L::kK);
  auto* s_v = reinterpret_cast<__nv_bfloat16*>(smem + L::kV);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* s_s = reinterpret_cast<float*>(smem + L::kS) + warp * 16 * L::kLdS;
  auto* s_p = reinterpret_cast<__nv_bfloat16*>(smem + L::kP) + warp * 16 * L::kLdP;
  float* s_o = reinterpret_cast<float*>(smem + L::kO) + warp * 16 * L::kLdO;

  // Heaviest causal tiles (last queries) first, so the tail of the grid is short.
  const int64_t q0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * kBlockM;
  const int head = blockIdx.y;
  const int kv_head = head / (p.n_heads / p.n_kv_heads);
  const int64_t q_stride = static_cast<int64_t>(p.n_heads) * D;
  const int64_t kv_stride = static_cast<int64_t>(p.n_kv_heads) * D;

  load_tile<D>(s_q, p.q + head * D, q0, p.n_q, q_stride);
  for (int idx = lane; idx < 16 * L::kLdO; idx += 32) s_o[idx] = 0.0f;

  // This lane's row of the warp's 16 and which half of the 64 tile columns / D output dims it owns.
  const int row = lane / 2, half = lane % 2;
  const int64_t qi = q0 + warp * 16 + row;
  const float scale2 = p.scale * kLog2e;
  float m = kNegInfF, l = 0.0f, u = 0.0f;  // base 2: u = sum 2^t t, t = s2 - m

  int64_t kv_end = p.n_kv;
  if (p.causal) {
    const int64_t last = q0 + kBlockM + p.causal_offset;  // last row's last visible key + 1
    kv_end = last < kv_end ? last : kv_end;
  }
  for (int64_t kv0 = 0; kv0 < kv_end; kv0 += kBlockN) {
    __syncthreads();  // everyone is done with the previous K/V tile
    if constexpr (kPaged) {
      // kv0 is a multiple of 64 and pages hold >= 64 keys: the whole tile is in one page, rows
      // [row0, row0 + 64) of it; keys past n_kv are rows past row0 + n_kv - kv0.
      const int64_t page = kv0 >> p.page_shift;
      const int64_t row0 = kv0 & ((int64_t{1} << p.page_shift) - 1);
      const __nv_bfloat16* k_page = p.k_pages[page];
      const __nv_bfloat16* v_page = p.v_pages[page];
      // A pointer read from memory is generic: unless it is known to be global, the tile loads are
      // generic too and cannot move above the K tile's shared-memory stores (~20% slower, measured).
      __builtin_assume(__isGlobal(k_page) && __isGlobal(v_page));
      load_tile<D>(s_k, k_page + kv_head * D, row0, row0 + p.n_kv - kv0, kv_stride);
      load_tile<D>(s_v, v_page + kv_head * D, row0, row0 + p.n_kv - kv0, kv_stride);
    } else {
      load_tile<D>(s_k, p.k + kv_head * D, kv0, p.n_kv, kv_stride);
      load_tile<D>(s_v, p.v + kv_head * D, kv0, p.n_kv, kv_stride);
    }
    __syncthreads();

    // S (16 x 64) = Q_w (16 x D) K^T (D x 64)
    for (int nf = 0; nf < kBlockN / 16; ++nf) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
      for (int kk = 0; kk < D / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b;
        wmma::load_matrix_sync(a, s_q + warp * 16 * L::kLdQkv + kk * 16, L::kLdQkv);
        wmma::load_matrix_sync(b, s_k + nf * 16 * L::kLdQkv + kk * 16, L::kLdQkv);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(s_s + nf * 16, acc, L::kLdS, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax + entropy on this lane's 32 scores; the row's two lanes combine by shuffle.
    float* srow = s_s + row * L::kLdS + half * 32;
    float tmax = kNegInfF;
    for (int c = 0; c < 32; ++c) {
      const int64_t j = kv0 + half * 32 + c;
      const bool ok = j < p.n_kv && (!p.causal || j <= qi + p.causal_offset);
      const float s2 = ok ? srow[c] * scale2 : kNegInfF;
      srow[c] = s2;
      tmax = fmaxf(tmax, s2);
    }
    tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
    const float m_new = fmaxf(m, tmax);
    float alpha = 1.0f, psum = 0.0f, pu = 0.0f;
    __nv_bfloat16* prow = s_p + row * L::kLdP + half * 32;
    for (int c = 0; c < 32; ++c) {
      const float t = srow[c] - m_new;  // -inf for masked keys (and NaN-free: m_new = -inf only if all are)
      const bool live = m_new != kNegInfF && t != kNegInfF;
      const float e = live ? exp2f(t) : 0.0f;
      psum += e;
      pu += live ? e * t : 0.0f;  // select, never 0 * -inf
      prow[c] = __float2bfloat16(e);
    }
    // Outside any branch: rows of one warp may differ in whether they saw a key yet.
    psum += __shfl_xor_sync(0xffffffffu, psum, 1);
    pu += __shfl_xor_sync(0xffffffffu, pu, 1);
    if (m_new != kNegInfF) {  // else nothing visible yet: P = 0, state unchanged
      if (m == kNegInfF) {
        alpha = 0.0f;
        u = pu;
        l = psum;
      } else {
        alpha = exp2f(m - m_new);
        u = alpha * (u + (m - m_new) * l) + pu;
        l = alpha * l + psum;
      }
      m = m_new;
    }
    // Rescale this lane's half of its O row by alpha.
    float* orow = s_o + row * L::kLdO + half * (D / 2);
    if (alpha != 1.0f)
      for (int c = 0; c < D / 2; ++c) orow[c] *= alpha;
    __syncwarp();

    // O_w (16 x D) += P_w (16 x 64) V (64 x D)
    for (int nf = 0; nf < D / 16; ++nf) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, s_o + nf * 16, L::kLdO, wmma::mem_row_major);
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> b;
        wmma::load_matrix_sync(a, s_p + kk * 16, L::kLdP);
        wmma::load_matrix_sync(b, s_v + kk * 16 * L::kLdQkv + nf * 16, L::kLdQkv);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(s_o + nf * 16, acc, L::kLdO, wmma::mem_row_major);
    }
    __syncwarp();
  }

  if (qi >= p.n_q) return;
  const int64_t out_row = qi * p.n_heads + head;
  OutT* out = static_cast<OutT*>(p.out) + out_row * D + half * (D / 2);
  const float* orow = s_o + row * L::kLdO + half * (D / 2);
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  for (int c = 0; c < D / 2; ++c) detail::store_out(out + c, orow[c] * inv);
  if (half == 0) {
    if (l > 0.0f) {
      const float ln_l = logf(l);
      p.lse[out_row] = m * kLn2 + ln_l;
      if (p.entropy) p.entropy[out_row] = fmaxf(0.0f, ln_l - u * kLn2 * inv);  // H = ln l - u / l
    } else {
      p.lse[out_row] = kNegInfF;
      if (p.entropy) p.entropy[out_row] = 0.0f;
    }
  }
}

template <int D, typename OutT, bool kPaged>
cudaError_t launch_prefill_instance(const AttentionGpuParams& p, cudaStream_t stream) {
  constexpr size_t kSmem = PrefillSmem<D>::kBytes;
  static const cudaError_t attr = cudaFuncSetAttribute(prefill_attention_kernel<D, OutT, kPaged>,
                                                       cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (attr != cudaSuccess) return attr;
  const dim3 grid(static_cast<unsigned>((p.n_q + kBlockM - 1) / kBlockM), static_cast<unsigned>(p.n_heads));
  prefill_attention_kernel<D, OutT, kPaged><<<grid, kThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

template <int D, typename OutT>
cudaError_t launch_prefill_typed(const AttentionGpuParams& p, cudaStream_t stream) {
  return p.k_pages ? launch_prefill_instance<D, OutT, true>(p, stream)
                   : launch_prefill_instance<D, OutT, false>(p, stream);
}

}  // namespace

cudaError_t launch_prefill_attention_wmma(const AttentionGpuParams& p, cudaStream_t stream) {
  if (!detail::prefill_params_ok(p, kBlockM)) return cudaErrorInvalidValue;
  if (detail::mask_extended(p)) return cudaErrorNotSupported;  // no window or soft-cap here
  if (p.n_q == 0) return cudaSuccess;
  if (p.head_dim == 64) return p.out_fp32 ? launch_prefill_typed<64, float>(p, stream)
                                          : launch_prefill_typed<64, __nv_bfloat16>(p, stream);
  if (p.head_dim == 128) return p.out_fp32 ? launch_prefill_typed<128, float>(p, stream)
                                           : launch_prefill_typed<128, __nv_bfloat16>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace starserve
