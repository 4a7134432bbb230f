// Prefill / block-local partial attention with LSE and entropy on Hopper's warpgroup MMA (wgmma,
// sm_90a), warp-specialised in the manner of FlashAttention-3 (Shah et al. 2024): the online
// softmax of prefill_mma.cuh, with both products issued by whole warpgroups and their
// operands read by the tensor cores straight from shared memory.
//
// The kernel template, included by the .cu files that instantiate it: attention/prefill_wgmma.cu
// (WsDefault with the TMA, what ships: launch_prefill_attention_wgmma) and
// baselines/prefill_wgmma_variants.cu (ping-pong, three consumers, cp.async copies always). As in
// prefill_mma.cuh, everything is in an anonymous namespace: each includer has its own kernels.
//
// One block = 128 query rows of one head, three warpgroups (384 threads):
//   warpgroup 0, the producer: Q once by cp.async; every K / V tile (128 keys), three stages deep,
//     by the tensor memory accelerator (TMA: one thread issues 64-column x 64-row boxes of a 2-D
//     tensor map over the keys, or over the pool that holds the pages, which the TMA writes in the
//     128-byte swizzled layout the wgmma descriptors describe, wgmma.cuh); a stage's mbarrier
//     counts the bytes. Where no map can be made (paged keys without their pool) the producer's
//     128 threads copy with cp.async instead. It keeps kProducerRegs registers and gives the rest
//     to the consumers (setmaxnreg).
//   warpgroups 1, 2, the consumers: 64 query rows each. Per key tile j:
//     wait for the stage; issue  S = Q K_j^T  (wgmma m64n128k16 x D/16, both from shared memory,
//     K-major) and then  O += P_{j-1} V_{j-1}  (wgmma m64nDk16 x 8, P bf16 from registers: the S
//     accumulator layout is the A-fragment layout; V from shared memory, MN-major) as two groups;
//     wait for S only, run the online softmax + entropy on it (the lean softmax: raw-score max,
//     one FFMA per score, O rescaled only when a row's max grows by more than kSlack) while P V
//     still multiplies; wait for P V, release stage j - 1 (its `empty` mbarrier), rescale O, and
//     turn P into A fragments.
//   The descriptors are uniform: one per operand and stage, each k16 step a constant added to it.
// No block-wide barrier sits in the loop. Shared memory at D = 128: Q 32 KB + 3 x (K 32 KB + V
// 32 KB) = 225 KB, one block per SM; at D = 64 half of that.
//
// Measured on the H200 (attention_bench, bf16, D = 128, entropy on; docs/perf.md): 590-610 TFLOP/s
// on 4K x 8K non-causal and 16K causal, contiguous or paged GQA 4 (cuDNN 645-656), 434 at D = 64
// (cuDNN 448). With cp.async copies (the cp_async baseline) 490-520; the earlier order (P V then Q K^T in one
// group, ping-pong) with cp.async and descriptors computed per step 485-500; the mma.sync kernel
// 340.
//
// Register layouts (PTX ISA, wgmma .m64nNk16, per warp w of the warpgroup, g = lane / 4, t = lane % 4):
//   accumulator: element 4 j + e of n-block j (columns 8 j ..): e = 0, 1 row 16 w + g, columns
//   8 j + 2 t + e; e = 2, 3 row 16 w + g + 8, same columns.
//   A from registers (k16 step): a0 (16 w + g, 2t..2t+1), a1 (+8 rows), a2 (cols + 8), a3 (both),
//   so P's fragment for keys 16 kk .. is S n-blocks 2 kk and 2 kk + 1, as with mma.sync.
//
// Masks, causal skipping, paged keys, empty rows and a negative scale behave as in the mma.sync
// kernel (same contract, same tests). Pages hold >= 64 keys, so a 128-key tile is loaded as two
// 64-key halves, one page-table read each. A paged tile that runs past n_kv is copied by cp.async,
// which zero-fills the rows past n_kv (the pool may hold NaN there, and 0 x NaN would reach O).
//
// Sliding window and soft-capping (kExt, separate instances of the shipped configuration): the
// producer starts at the first tile the block's first row sees (BlockGeom::first_tile) and every
// consumer walks the same tiles; tiles holding a key behind the bound of one of a warpgroup's
// rows are masked from below too (a warpgroup's rows span 64 keys of bounds, so at most one
// tile it sees nothing of is still multiplied, fully masked). Soft-capping turns the raw scores
// into softcap tanh(s |scale| / softcap) before the mask, and the softmax then runs with scale 1.
#pragma once

#include <cfloat>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <cuda.h>

#include "kernels/attention/attention.h"
#include "kernels/attention/common.cuh"
#include "kernels/attention/wgmma.cuh"

namespace starserve {
namespace {

using detail::cp_async_16;
using detail::cp_async_wait;
using detail::exp2_approx;
using detail::kLn2;
using detail::kLog2e;
using detail::kNegInfF;
using detail::pack_bf16;
using detail::smem_u32;
using detail::store_pair;

constexpr int kWgRows = 64;             // wgmma M: query rows per consumer warpgroup
constexpr float kSlack = 8.0f;          // as in prefill_mma.cuh
constexpr int kCopyThreads = 128;       // the producer warpgroup

// Starts the copy of rows [row0, row0 + kRows) of one head (row stride `stride` elements) into rows
// [dst_row0, dst_row0 + kRows) of the swizzled matrix at `dst` (panels of panel_rows rows). Rows at
// or past row_end are zero-filled without a read. Thread i copies chunk i % (D / 8) of rows
// i / (D / 8) + n kRowsPerPass; a row's chunks land in one 128-byte row per panel, so the
// swizzle keeps the warp's stores free of bank conflicts.
template <int D, int kRows>
__device__ __forceinline__ void load_rows(uint32_t dst, int panel_rows, int dst_row0, const __nv_bfloat16* src,
                                          int64_t row0, int64_t row_end, int64_t stride, int tid) {
  constexpr int kChunks = D / 8;
  constexpr int kRowsPerPass = kCopyThreads / kChunks;
  static_assert(kRows % kRowsPerPass == 0 && kRowsPerPass % 8 == 0, "whole rows per pass, swizzle phase fixed");
  const int r = tid / kChunks, c = tid % kChunks;
  const int64_t rows_left = row_end - row0 - r;
  const __nv_bfloat16* g = src + (row0 + r) * stride + c * 8;
  const uint32_t d0 = dst + wgmma::swizzled_offset(dst_row0 + r, c, panel_rows);
#pragma unroll
  for (int n = 0; n < kRows / kRowsPerPass; ++n) {
    const bool ok = n * kRowsPerPass < rows_left;
    cp_async_16(d0 + static_cast<uint32_t>(n * kRowsPerPass * wgmma::kRowBytes),
                ok ? g + static_cast<int64_t>(n) * kRowsPerPass * stride : src, ok);
  }
}

// Flips the sign of the chunks load_rows<D, kRows> gave this thread (landed for it already).
template <int D, int kRows>
__device__ __forceinline__ void negate_rows(unsigned char* base, int panel_rows, int tid) {
  constexpr int kChunks = D / 8;
  constexpr int kRowsPerPass = kCopyThreads / kChunks;
  const int r = tid / kChunks, c = tid % kChunks;
#pragma unroll
  for (int n = 0; n < kRows / kRowsPerPass; ++n) {
    auto* chunk = reinterpret_cast<uint4*>(base + wgmma::swizzled_offset(r + n * kRowsPerPass, c, panel_rows));
    uint4 x = *chunk;
    x.x ^= 0x80008000u;
    x.y ^= 0x80008000u;
    x.z ^= 0x80008000u;
    x.w ^= 0x80008000u;
    *chunk = x;
  }
}

// mbarrier (shared::cta, 64-bit) operations: the producer warpgroup's cp.async completion and the
// consumers' release of a stage meet on these instead of block-wide barriers.
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar) : "memory");
}
// Arrives on `bar` once this thread's earlier cp.async copies have landed (counted in the
// barrier's expected arrivals: .noinc).
__device__ __forceinline__ void cp_async_arrive(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// Arrives on `bar` once this thread's earlier cp.async copies have landed, adding that arrival
// to the phase's expected ones first (no .noinc: a net zero, so another arrival completes the phase).
__device__ __forceinline__ void cp_async_arrive_counted(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// Arrives on `bar` and expects `bytes` more of asynchronous copies (the TMA's) in this phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// TMA: the box at column x, row y of the 2-D tensor `map` (a __grid_constant__ parameter) into
// shared memory at dst (1024-byte aligned for the 128-byte swizzle), counted on `bar`.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int x, int y, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(bar)
      : "memory");
}
// Named barriers 1.. (0 is __syncthreads): sync waits for `count` threads, arrive only signals.
__device__ __forceinline__ void named_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

// S (64 x N) = Q_wg K^T, issued (not waited for). dq, dk: descriptors of the first k16 step of
// this warpgroup's Q rows (panels of kQPanelBytes) and of the K tile (N keys, panels of N rows);
// a step's descriptor is the first one plus its byte offset / 16 (the address field's unit), so
// nothing but constant additions sits between the instructions.
template <int D, int N, uint32_t kQPanelBytes>
__device__ __forceinline__ void issue_qk(float (&s)[N / 2], uint64_t dq, uint64_t dk) {
#if STARSERVE_WGMMA_ENABLED
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const uint32_t koff = static_cast<uint32_t>((kk % 4) * 32);  // 16 columns = 32 bytes into the panel
    const uint64_t q_step = ((kk / 4) * kQPanelBytes + koff) >> 4;
    const uint64_t k_step = ((kk / 4) * (N * wgmma::kRowBytes) + koff) >> 4;
    if constexpr (N == 128) {
      wgmma::wgmma_m64n128k16_ss(s, dq + q_step, dk + k_step, kk > 0 ? 1 : 0);
    } else {
      static_assert(N == 96, "tiles of 128 or 96 keys");
      wgmma::wgmma_m64n96k16_ss(s, dq + q_step, dk + k_step, kk > 0 ? 1 : 0);
    }
  }
#endif
}

// O (64 x D) += P V, issued: P's A fragments per 16-key step; dv: descriptor of the V tile's first
// 16 keys (N keys, panels of N rows, MN-major).
template <int D, int N>
__device__ __forceinline__ void issue_pv(float (&o)[D / 2], const uint32_t (&pa)[N / 16][4], uint64_t dv) {
#if STARSERVE_WGMMA_ENABLED
#pragma unroll
  for (int kk = 0; kk < N / 16; ++kk) {
    const uint64_t step = static_cast<uint64_t>(kk * 16 * wgmma::kRowBytes) >> 4;
    if constexpr (D == 128) {
      wgmma::wgmma_m64n128k16_rs(o, pa[kk], dv + step);
    } else {
      wgmma::wgmma_m64n64k16_rs(o, pa[kk], dv + step);
    }
  }
#endif
}

// A thread's two rows (block rows 16 w + g and + 8 of its warpgroup): online softmax + entropy state.
struct RowState {
  float m[2] = {kNegInfF, kNegInfF}, l[2] = {0.0f, 0.0f}, u[2] = {0.0f, 0.0f};
};

// Sets to -inf the scores of this tile (keys kv0 ..) that the thread's rows (row_base, + 8) do not
// see; kExt: the window's lower bound too.
template <int N, bool kExt>
__device__ __forceinline__ void mask_tile(float (&s)[N / 2], const AttentionGpuParams& p, int64_t row_base,
                                          int64_t kv0, int t) {
  auto clamp_col = [](int64_t x, int64_t lo, int64_t hi) { return static_cast<int>(x < lo ? lo : (x > hi ? hi : x)); };
  const int tail = clamp_col(p.n_kv - 1 - kv0, -1, N);
  const int diag = p.causal ? clamp_col(row_base + p.causal_offset - kv0, -2 * N, 2 * N) : N;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int rel = min(tail, p.causal ? diag + 8 * i : N);
    const int last = rel < -1 ? -1 : (rel > N ? N : rel);
    int first = 0;  // the row's first visible column (window), clamped to [0, N]
    if constexpr (kExt) first = clamp_col(window_first_key(p, row_base + 8 * i) - kv0, 0, N);
#pragma unroll
    for (int nb = 0; nb < N / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = nb * 8 + 2 * t + e;
        if (col > last || (kExt && col < first)) s[4 * nb + 2 * i + e] = kNegInfF;
      }
  }
}

// The lean online softmax of prefill_mma.cuh on one tile of raw scores: S becomes P
// (probabilities relative to the row's reference max), (m, l, u) are updated, and O is rescaled
// when some row of the warp raised its max by more than kSlack. kMasked: the tile holds -inf
// scores (t is clamped at -256 so that p t = 0 rather than NaN).
// O's rows times corr (the factors softmax_tile returns).
template <int D>
__device__ __forceinline__ void rescale_o(float (&o)[D / 2], const float (&corr)[2]) {
#pragma unroll
  for (int nb = 0; nb < D / 8; ++nb) {
    o[4 * nb + 0] *= corr[0];
    o[4 * nb + 1] *= corr[0];
    o[4 * nb + 2] *= corr[1];
    o[4 * nb + 3] *= corr[1];
  }
}

// Returns whether O must be rescaled by corr (some row of the warp raised its max); the caller
// does it, possibly later (after the P V product still reading the previous P has finished).
template <int N, bool kMasked>
__device__ __forceinline__ bool softmax_tile(float (&s)[N / 2], RowState& st, float scale2, float (&corr)[2]) {
  bool grow_any = false;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float mx = kNegInfF;
#pragma unroll
    for (int nb = 0; nb < N / 8; ++nb) mx = fmaxf(mx, fmaxf(s[4 * nb + 2 * i], s[4 * nb + 2 * i + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float mx2 = mx * scale2;
    const bool grow = mx2 > st.m[i] + kSlack;  // true on a row's first visible key (m = -inf)
    grow_any |= grow;
    const float m_new = grow ? mx2 : st.m[i];
    const float m_use = m_new == kNegInfF ? 0.0f : m_new;  // a row with no key yet: no -inf - -inf
    corr[i] = grow ? exp2_approx(st.m[i] - m_new) : 1.0f;
    const float delta = grow && st.m[i] != kNegInfF ? st.m[i] - m_new : 0.0f;
    float ps = 0.0f, pu = 0.0f;
#pragma unroll
    for (int nb = 0; nb < N / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float tt = fmaf(s[4 * nb + 2 * i + e], scale2, -m_use);
        if constexpr (kMasked) tt = fmaxf(tt, -256.0f);
        const float pe = exp2_approx(tt);
        s[4 * nb + 2 * i + e] = pe;
        ps += pe;
        pu = fmaf(pe, tt, pu);
      }
    }
    st.u[i] = corr[i] * fmaf(delta, st.l[i], st.u[i]) + pu;
    st.l[i] = corr[i] * st.l[i] + ps;
    st.m[i] = m_new;
  }
  return __any_sync(0xffffffffu, grow_any);
}

// P (bf16) as the A fragments of the 16-key steps: keys 16 kk .. are S n-blocks 2 kk, 2 kk + 1.
template <int N>
__device__ __forceinline__ void to_p_fragments(const float (&s)[N / 2], uint32_t (&pa)[N / 16][4]) {
#pragma unroll
  for (int kk = 0; kk < N / 16; ++kk) {
    pa[kk][0] = pack_bf16(s[8 * kk + 0], s[8 * kk + 1]);
    pa[kk][1] = pack_bf16(s[8 * kk + 2], s[8 * kk + 3]);
    pa[kk][2] = pack_bf16(s[8 * kk + 4], s[8 * kk + 5]);
    pa[kk][3] = pack_bf16(s[8 * kk + 6], s[8 * kk + 7]);
  }
}

// Soft-caps (kExt, when asked), masks (when the tile needs it) and runs the softmax on one tile.
// Returns whether O needs rescaling by corr.
template <int N, bool kExt>
__device__ __forceinline__ bool scores_to_p(float (&s)[N / 2], RowState& st, const AttentionGpuParams& p,
                                            bool masked, int64_t row_base, int64_t kv0, int t, float scale2,
                                            float (&corr)[2]) {
  if constexpr (kExt) {
    if (p.softcap > 0.0f) {
      // Raw s (Q negated for scale < 0) -> softcap tanh(s |scale| / softcap); scale2 is log2 e then.
      const float cap = p.softcap, in = fabsf(p.scale) / p.softcap;
#pragma unroll
      for (int i = 0; i < N / 2; ++i) s[i] = detail::softcap_score(s[i], cap, in);
    }
  }
  if (masked) {
    mask_tile<N, kExt>(s, p, row_base, kv0, t);
    return softmax_tile<N, true>(s, st, scale2, corr);
  }
  return softmax_tile<N, false>(s, st, scale2, corr);
}

// O normalised, LSE and entropy of the thread's two rows (quads sum their partial l and u first).
template <int D, typename OutT>
__device__ __forceinline__ void write_rows(const AttentionGpuParams& p, const float (&o)[D / 2], RowState& st,
                                           int64_t row_base, int head, int t) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    st.l[i] += __shfl_xor_sync(0xffffffffu, st.l[i], 1);
    st.l[i] += __shfl_xor_sync(0xffffffffu, st.l[i], 2);
    st.u[i] += __shfl_xor_sync(0xffffffffu, st.u[i], 1);
    st.u[i] += __shfl_xor_sync(0xffffffffu, st.u[i], 2);
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t qi = row_base + 8 * i;
    if (qi >= p.n_q) continue;
    const int64_t out_row = qi * p.n_heads + head;
    const float inv = st.l[i] > 0.0f ? 1.0f / st.l[i] : 0.0f;
    OutT* out = static_cast<OutT*>(p.out) + out_row * D + 2 * t;
#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb) store_pair(out + nb * 8, o[4 * nb + 2 * i] * inv, o[4 * nb + 2 * i + 1] * inv);
    if (t == 0) {
      if (st.l[i] > 0.0f) {
        const float ln_l = logf(st.l[i]);
        p.lse[out_row] = st.m[i] * kLn2 + ln_l;
        if (p.entropy) p.entropy[out_row] = fmaxf(0.0f, ln_l - st.u[i] * kLn2 * inv);  // H = ln l - u / l
      } else {
        p.lse[out_row] = kNegInfF;
        if (p.entropy) p.entropy[out_row] = 0.0f;
      }
    }
  }
}

// Block geometry: query rows [q0, q0 + M) of head `head`; key tiles of N keys [0, n_tiles) hold a
// key some row sees; per consumer warpgroup (rows wg_row0 ..), [0, wg_tiles) hold a key one of
// its rows sees and from mask_from on some key is hidden from one of its rows.
template <int M, int N>
struct BlockGeom {
  int64_t q0;
  int head, kv_head, n_tiles;
  int first_tile = 0;  // tiles before it are behind the window of every row of the block (its first row's bound)
  __device__ BlockGeom(const AttentionGpuParams& p) {
    q0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * M;  // heaviest causal blocks first
    head = static_cast<int>(blockIdx.y);
    kv_head = head / (p.n_heads / p.n_kv_heads);
    int64_t kv_end = p.n_kv;
    if (p.causal) {
      const int64_t last_row = (q0 + M < p.n_q ? q0 + M : p.n_q) - 1;
      const int64_t last_key = last_row + p.causal_offset;
      kv_end = last_key + 1 < kv_end ? last_key + 1 : kv_end;
    }
    n_tiles = kv_end > 0 ? static_cast<int>((kv_end + N - 1) / N) : 0;
    if (p.window > 0) first_tile = static_cast<int>(window_first_key(p, q0) / N);
  }
  // Window: tiles before the returned index hold a key behind the bound of one of the
  // warpgroup's rows (its last row's bound is the highest); 0 without a window.
  __device__ int wg_window_mask_to(const AttentionGpuParams& p, int wg_row0) const {
    if (p.window <= 0) return 0;
    return static_cast<int>((window_first_key(p, q0 + wg_row0 + kWgRows - 1) + N - 1) / N);
  }
  __device__ void wg_tiles(const AttentionGpuParams& p, int wg_row0, int* tiles_out, int* mask_from_out) const {
    int mask_from = static_cast<int>(p.n_kv / N), tiles = n_tiles;
    if (p.causal) {
      const int64_t first_lim = q0 + wg_row0 + p.causal_offset;  // last key of the warpgroup's first row
      const int64_t last_lim = first_lim + kWgRows - 1;
      const int64_t first_from = first_lim < 0 ? 0 : (first_lim + 1) / N;
      if (first_from < mask_from) mask_from = static_cast<int>(first_from);
      const int64_t t = last_lim < 0 ? 0 : last_lim / N + 1;
      if (t < tiles) tiles = static_cast<int>(t);
    }
    *tiles_out = tiles;
    *mask_from_out = mask_from;
  }
};

// Starts the copies of key tile `tile` (K and V, N rows each) into dk, dv by the producer's
// threads (tid in [0, 128)). Paged keys go in chunks that never straddle a page (pages hold >= 64
// keys): 64 keys when N is a multiple of 64, else 32.
template <int D, int N, bool kPaged>
__device__ __forceinline__ void load_kv_tile(const AttentionGpuParams& p, int kv_head, int tile, uint32_t dk,
                                             uint32_t dv, int tid) {
  const int64_t kv_stride = static_cast<int64_t>(p.n_kv_heads) * D;
  const int64_t kv0 = static_cast<int64_t>(tile) * N;
  if constexpr (kPaged) {
    constexpr int kChunk = N % 64 == 0 ? 64 : 32;
#pragma unroll
    for (int part = 0; part < N / kChunk; ++part) {
      const int64_t kv = kv0 + part * kChunk;
      if (kv < p.n_kv) {
        const int64_t page = kv >> p.page_shift;
        const int64_t row0 = kv & ((int64_t{1} << p.page_shift) - 1);
        const int64_t row_end = row0 + p.n_kv - kv;
        load_rows<D, kChunk>(dk, N, part * kChunk, p.k_pages[page] + kv_head * D, row0, row_end, kv_stride, tid);
        load_rows<D, kChunk>(dv, N, part * kChunk, p.v_pages[page] + kv_head * D, row0, row_end, kv_stride, tid);
      } else {  // wholly past n_kv: zeros (the pool may hold NaN there; no page to read)
        load_rows<D, kChunk>(dk, N, part * kChunk, p.q, 0, 0, 0, tid);
        load_rows<D, kChunk>(dv, N, part * kChunk, p.q, 0, 0, 0, tid);
      }
    }
  } else {
    load_rows<D, N>(dk, N, 0, p.k + kv_head * D, kv0, p.n_kv, kv_stride, tid);
    load_rows<D, N>(dv, N, 0, p.v + kv_head * D, kv0, p.n_kv, kv_stride, tid);
  }
}

// The tensor maps of the tensor-memory-accelerator (TMA) copies: K and V as 2-D tensors of rows
// (n_kv_heads * D bf16 each), read in boxes of 64 columns (one 128-byte swizzled panel row) by
// kBox rows. Over the keys when contiguous (rows past n_kv read as zeros), over the pool that holds
// every page when paged. Passed by value as a __grid_constant__ kernel parameter.
struct KvTensorMaps {
  CUtensorMap k;
  CUtensorMap v;
};

// Starts the TMA copies of key tile `tile` (K and V, N rows each) into dk, dv, completing on `bar`
// (2 N D bf16 bytes in all). One thread issues them. Paged keys go in boxes of kBox rows that never
// straddle a page; a page's first row in the pool is its byte offset from the pool's start over the
// row's bytes (the pool is under 4 GB, launch_ws checks).
template <int D, int N, bool kPaged>
__device__ __forceinline__ void tma_kv_tile(const AttentionGpuParams& p, const KvTensorMaps& maps, int kv_head,
                                            int tile, uint32_t dk, uint32_t dv, uint32_t bar) {
  constexpr int kBox = N % 64 == 0 ? 64 : 32;
  const int64_t kv0 = static_cast<int64_t>(tile) * N;
  const uint32_t row_bytes = static_cast<uint32_t>(p.n_kv_heads) * D * 2;
#pragma unroll
  for (int part = 0; part < N / kBox; ++part) {
    const int64_t kv = kv0 + part * kBox;
    int yk = static_cast<int>(kv), yv = static_cast<int>(kv);
    if constexpr (kPaged) {
      const int64_t page = kv >> p.page_shift;
      const int row0 = static_cast<int>(kv & ((int64_t{1} << p.page_shift) - 1));
      const auto offset = [](const void* page_ptr, const void* pool) {
        return static_cast<uint32_t>(static_cast<const char*>(page_ptr) - static_cast<const char*>(pool));
      };
      yk = static_cast<int>(offset(p.k_pages[page], p.k_pool) / row_bytes) + row0;
      yv = static_cast<int>(offset(p.v_pages[page], p.v_pool) / row_bytes) + row0;
    }
#pragma unroll
    for (int panel = 0; panel < D / 64; ++panel) {
      const uint32_t off = static_cast<uint32_t>(panel * N * wgmma::kRowBytes + part * kBox * wgmma::kRowBytes);
      tma_load_2d(dk + off, &maps.k, kv_head * D + panel * 64, yk, bar);
      tma_load_2d(dv + off, &maps.v, kv_head * D + panel * 64, yv, bar);
    }
  }
}

// Warp-specialised form: warpgroup 0 produces (Q by cp.async; every K / V tile C::kStages deep,
// completion signalled on per-stage mbarriers), warpgroups 1 .. kConsumers consume (64 query rows
// each). A consumer releases a stage on its `empty` mbarrier once its multiplies that read it are
// done, so no block-wide barrier sits in the loop.
//   kTma (the kernel's parameter): one producer thread copies each tile with the TMA (the stage's
//     mbarrier counts the bytes); a paged tail tile (past n_kv, where the pool may hold NaN) is
//     still copied with cp.async by the whole warpgroup, zero-filled past n_kv. Otherwise every tile
//     is cp.async by the 128 producer threads.
//   kBatched: per key tile j a consumer issues, as one batch, the P V product of tile j - 1 and
//     the Q K^T product of tile j, then runs tile j's softmax while the tensor cores work (S, O and
//     P live at once). Otherwise Q K^T, softmax, P V one after the other (fewer live registers; the
//     other consumers keep the tensor cores busy).
//   kQkFirst (with kBatched): Q K^T of tile j is issued first and P V of tile j - 1 second, as two
//     groups; the consumer waits for S only and runs the softmax while its own P V multiplies,
//     holding O and P unchanged until that product is done.
//   kPingpong: the consumers take turns issuing (named barriers, in a ring), so one's softmax
//     runs under the others' multiplies.
// Registers: the producer keeps kProducerRegs, the consumers take what is left of the SM's 65536,
// rounded down to setmaxnreg's multiple of 8 (setmaxnreg).
template <int kConsumers_, int kBlockN_, int kStages_, bool kBatched_, bool kPingpong_, int kProducerRegs_,
          bool kQkFirst_ = false>
struct WsConfig {
  static constexpr bool kQkFirst = kQkFirst_;
  static constexpr int kConsumers = kConsumers_;
  static constexpr int kBlockM = kWgRows * kConsumers;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kStages = kStages_;
  static constexpr bool kBatched = kBatched_;
  static constexpr bool kPingpong = kPingpong_;
  static constexpr int kThreads = 128 * (kConsumers + 1);
  static constexpr int kProducerRegs = kProducerRegs_;
  static constexpr int kConsumerRegs = ((65536 - 128 * kProducerRegs) / (128 * kConsumers)) / 8 * 8;
  static constexpr int kBox = kBlockN % 64 == 0 ? 64 : 32;  // TMA box rows (tma_kv_tile)
  static_assert(kConsumerRegs <= 256, "setmaxnreg takes at most 256");
  static_assert(!kQkFirst || kBatched, "Q K^T first is an order within the batched loop");
};
// What ships: two consumers, 128-key tiles, three stages, batched with Q K^T issued before P V of
// the previous tile (a consumer's softmax overlaps its own P V), no ping-pong; the producer keeps
// 40 registers and the consumers get 232. The other configurations are baselines
// (baselines/prefill_wgmma_variants.cu).
using WsDefault = WsConfig<2, 128, 3, true, false, 40, true>;

template <int D, class C>
struct WsSmem {
  static constexpr uint32_t kQBytes = C::kBlockM * D * 2;
  static constexpr uint32_t kTileBytes = C::kBlockN * D * 2;
  static constexpr uint32_t kBarOffset = kQBytes + 2 * C::kStages * kTileBytes;
  static constexpr size_t kBytes = kBarOffset + 8 * (2 * C::kStages + 1) + wgmma::kSwizzleAtomBytes;
};

// A ring position: stage index and the parity of its current use.
template <int kStages>
struct Ring {
  int stage = 0;
  uint32_t phase = 0;
  __device__ void next() {
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1u;
    }
  }
};

constexpr int kProducerBarrier = 7;  // named barrier of the producer warpgroup (1.. are the consumers')

template <int D, typename OutT, bool kPaged, bool kTma, class C, bool kExt>
__global__ void __launch_bounds__(C::kThreads, 1)
    prefill_attention_wgmma_ws_kernel(AttentionGpuParams p, const __grid_constant__ KvTensorMaps maps) {
#if STARSERVE_WGMMA_ENABLED
  using L = WsSmem<D, C>;
  constexpr int N = C::kBlockN;
  constexpr int kStages = C::kStages;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + (wgmma::kSwizzleAtomBytes - 1)) & ~static_cast<uint32_t>(wgmma::kSwizzleAtomBytes - 1);
  unsigned char* base_ptr = smem_raw + (base - raw);
  const uint32_t s_q = base;
  auto s_k = [&](int stage) { return base + L::kQBytes + static_cast<uint32_t>(2 * stage) * L::kTileBytes; };
  auto full_bar = [&](int stage) { return base + L::kBarOffset + 8 * static_cast<uint32_t>(stage); };
  auto empty_bar = [&](int stage) { return base + L::kBarOffset + 8 * static_cast<uint32_t>(kStages + stage); };
  const uint32_t q_bar = base + L::kBarOffset + 16 * kStages;

  const int tid = static_cast<int>(threadIdx.x);
  // The warpgroup index, read from lane 0 so the compiler knows it is warp-uniform (the
  // descriptors and stage addresses derived from it then stay in uniform registers).
  const int wg = __shfl_sync(0xffffffffu, tid / 128, 0);
  const BlockGeom<C::kBlockM, N> geom(p);
  const int first_tile = kExt ? geom.first_tile : 0;  // tiles [first_tile, n_tiles) go through the ring
  if (tid == 0) {
    for (int st = 0; st < kStages; ++st) {
      // cp.async: the producer's 128 threads arrive (.noinc); TMA: the issuing thread's arrival
      // with the expected bytes (a cp.async tail adds its threads' pending arrivals itself).
      mbar_init(full_bar(st), kTma ? 1 : 128);
      mbar_init(empty_bar(st), 128 * C::kConsumers);  // every consumer thread
    }
    mbar_init(q_bar, 128);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(C::kProducerRegs));
    const int64_t q_stride = static_cast<int64_t>(p.n_heads) * D;
    load_rows<D, C::kBlockM>(s_q, C::kBlockM, 0, p.q + geom.head * D, geom.q0, p.n_q, q_stride, tid);
    cp_async_arrive(q_bar);
    // Tiles [0, n_tma) go by TMA (all of them when contiguous: rows past n_kv come back as zeros).
    const int n_tma = !kTma                                                           ? 0
                      : kPaged && static_cast<int64_t>(geom.n_tiles) * N > p.n_kv ? geom.n_tiles - 1
                                                                                     : geom.n_tiles;
    Ring<kStages> r;
    for (int it = first_tile; it < geom.n_tiles; r.next(), ++it) {
      if (it - first_tile >= kStages) mbar_wait(empty_bar(r.stage), r.phase ^ 1u);
      const uint32_t dk = s_k(r.stage), dv = dk + L::kTileBytes;
      if (it < n_tma) {
        if (tid == 0) {
          mbar_arrive_expect_tx(full_bar(r.stage), 2 * L::kTileBytes);
          tma_kv_tile<D, N, kPaged>(p, maps, geom.kv_head, it, dk, dv, full_bar(r.stage));
        }
      } else {
        load_kv_tile<D, N, kPaged>(p, geom.kv_head, it, dk, dv, tid);
        if constexpr (kTma) {
          cp_async_arrive_counted(full_bar(r.stage));  // pending +1 now, -1 when the copies land
          named_sync(kProducerBarrier, 128);           // every thread's +1 is in before the arrival
          if (tid == 0) mbar_arrive(full_bar(r.stage));
        } else {
          cp_async_arrive(full_bar(r.stage));
        }
      }
    }
    cp_async_wait<0>();
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(C::kConsumerRegs));
  const int c = wg - 1;  // consumer index
  const int ctid = tid - 128 * wg;
  const int warp = (tid / 32) % 4, lane = tid % 32;
  const int t = lane % 4;
  int wg_tiles = 0, mask_from = 0;
  geom.wg_tiles(p, c * kWgRows, &wg_tiles, &mask_from);
  const int window_mask_to = kExt ? geom.wg_window_mask_to(p, c * kWgRows) : 0;
  auto tile_masked = [&](int it) { return it >= mask_from || (kExt && it < window_mask_to); };
  const int64_t row_base = geom.q0 + c * kWgRows + warp * 16 + lane / 4;
  // Soft-capped (kExt): the capped scores already carry the scale, so the softmax's is log2 e.
  const float scale2 = kExt && p.softcap > 0.0f ? kLog2e : fmaxf(fabsf(p.scale) * kLog2e, FLT_MIN);
  const uint32_t q_wg = s_q + static_cast<uint32_t>(c * kWgRows * wgmma::kRowBytes);
  constexpr uint32_t kQPanelBytes = C::kBlockM * wgmma::kRowBytes;
  // Descriptors: Q's rows of this warpgroup, K and V of stage 0; a stage is 2 tiles further on.
  const uint64_t dq = wgmma::make_desc(q_wg, 16, wgmma::kSwizzleAtomBytes);
  const uint64_t dk0 = wgmma::make_desc(s_k(0), 16, wgmma::kSwizzleAtomBytes);
  const uint64_t dv0 = wgmma::make_desc(s_k(0) + L::kTileBytes, N * wgmma::kRowBytes, wgmma::kSwizzleAtomBytes);
  auto dk = [&](int stage) { return dk0 + static_cast<uint64_t>(stage) * ((2 * L::kTileBytes) >> 4); };
  auto dv = [&](int stage) { return dv0 + static_cast<uint64_t>(stage) * ((2 * L::kTileBytes) >> 4); };

  mbar_wait(q_bar, 0);
  wgmma::fence_proxy_async();  // Q came by cp.async
  if (p.scale < 0.0f) {
    // The lean softmax needs a positive scale: this warpgroup negates its own 64 rows of Q.
    negate_rows<D, kWgRows>(base_ptr + c * kWgRows * wgmma::kRowBytes, C::kBlockM, ctid);
    wgmma::fence_proxy_async();
    named_sync(8 + c, 128);
  }
  // Turns in a ring: consumer c waits on barrier 1 + c and hands the turn to the next consumer.
  // Consumer 0 goes first: the last consumer grants it.
  if (C::kPingpong && c == C::kConsumers - 1) named_arrive(1, 256);
  auto turn_begin = [&] {
    if constexpr (C::kPingpong) named_sync(1 + c, 256);
  };
  auto turn_end = [&] {
    if constexpr (C::kPingpong) named_arrive(1 + (c + 1) % C::kConsumers, 256);
  };
  // Tiles written by cp.async (all without the TMA; the paged tail with it) came through the
  // generic proxy: fence before the wgmma reads them.
  auto wait_full = [&](const Ring<kStages>& at, int it) {
    mbar_wait(full_bar(at.stage), at.phase);
    if (!kTma || (kPaged && static_cast<int64_t>(it + 1) * N > p.n_kv)) wgmma::fence_proxy_async();
  };

  float o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
  float s[N / 2];
#pragma unroll
  for (int i = 0; i < N / 2; ++i) s[i] = 0.0f;
  uint32_t pa[N / 16][4];
  RowState st;
  float corr[2];
  Ring<kStages> cur;  // the tile being read
  // Every consumer takes the same number of turns (tiles it does not multiply included), so none
  // waits on a turn that will not come. Each branch below holds a whole fence / issue / commit /
  // wait sequence, so every wgmma is issued by a converged warpgroup.
  if constexpr (C::kBatched) {
    if (wg_tiles > first_tile) {
      wait_full(cur, first_tile);
      turn_begin();
      wgmma::hold(s);
      wgmma::fence();
      issue_qk<D, N, kQPanelBytes>(s, dq, dk(0));
      wgmma::commit();
      turn_end();
      wgmma::wait<0>();
      wgmma::hold(s);
      // O is still 0: no rescale.
      scores_to_p<N, kExt>(s, st, p, tile_masked(first_tile), row_base, static_cast<int64_t>(first_tile) * N, t,
                           scale2, corr);
      to_p_fragments<N>(s, pa);
      for (int it = first_tile + 1; it < wg_tiles; ++it) {
        const int prev = cur.stage;
        cur.next();
        wait_full(cur, it);
        turn_begin();
        wgmma::hold(o);
        wgmma::hold(s);
        wgmma::fence();
        if constexpr (C::kQkFirst) {
          // S of tile j first, in its own group; the softmax on it runs while P V of tile j - 1
          // still multiplies. O and P stay untouched until that product is done (held across).
          issue_qk<D, N, kQPanelBytes>(s, dq, dk(cur.stage));
          wgmma::commit();
          issue_pv<D, N>(o, pa, dv(prev));
          wgmma::commit();
          turn_end();
          wgmma::wait<1>();
          wgmma::hold(s);
          const bool rescale =
              scores_to_p<N, kExt>(s, st, p, tile_masked(it), row_base, static_cast<int64_t>(it) * N, t, scale2, corr);
          wgmma::wait<0>();
          wgmma::hold(o);
          wgmma::hold(pa);
          mbar_arrive(empty_bar(prev));
          if (rescale) rescale_o<D>(o, corr);
        } else {
          issue_pv<D, N>(o, pa, dv(prev));
          issue_qk<D, N, kQPanelBytes>(s, dq, dk(cur.stage));
          wgmma::commit();
          turn_end();
          wgmma::wait<0>();
          wgmma::hold(o);
          wgmma::hold(s);
          mbar_arrive(empty_bar(prev));
          if (scores_to_p<N, kExt>(s, st, p, tile_masked(it), row_base, static_cast<int64_t>(it) * N, t, scale2,
                                   corr))
            rescale_o<D>(o, corr);
        }
        to_p_fragments<N>(s, pa);
      }
      turn_begin();
      wgmma::hold(o);
      wgmma::fence();
      issue_pv<D, N>(o, pa, dv(cur.stage));
      wgmma::commit();
      turn_end();
      wgmma::wait<0>();
      wgmma::hold(o);
      mbar_arrive(empty_bar(cur.stage));
      cur.next();
    } else {
      turn_begin();  // the turn of the final P V
      turn_end();
    }
  } else {
    for (int it = first_tile; it < wg_tiles; ++it, cur.next()) {
      wait_full(cur, it);
      turn_begin();
      wgmma::hold(s);
      wgmma::fence();
      issue_qk<D, N, kQPanelBytes>(s, dq, dk(cur.stage));
      wgmma::commit();
      turn_end();
      wgmma::wait<0>();
      wgmma::hold(s);
      if (scores_to_p<N, kExt>(s, st, p, tile_masked(it), row_base, static_cast<int64_t>(it) * N, t, scale2, corr))
        rescale_o<D>(o, corr);
      to_p_fragments<N>(s, pa);
      wgmma::hold(o);
      wgmma::fence();
      issue_pv<D, N>(o, pa, dv(cur.stage));
      wgmma::commit();
      wgmma::wait<0>();
      wgmma::hold(o);
      mbar_arrive(empty_bar(cur.stage));
    }
  }
  // Tiles past this warpgroup's rows (causal): release them in order, keep taking turns.
  for (int it = wg_tiles > first_tile ? wg_tiles : first_tile; it < geom.n_tiles; ++it, cur.next()) {
    wait_full(cur, it);
    turn_begin();
    turn_end();
    mbar_arrive(empty_bar(cur.stage));
  }
  write_rows<D, OutT>(p, o, st, row_base, geom.head, t);
#else
  __trap();  // built without sm_90a: the launcher refuses before launching (prefill_wgmma_supported)
#endif
}

// cuTensorMapEncodeTiled, from the driver through the runtime (no link against libcuda); null when
// the driver does not offer it.
using EncodeTiledFn = decltype(&cuTensorMapEncodeTiled);
EncodeTiledFn encode_tiled_fn() {
  static const EncodeTiledFn fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      return EncodeTiledFn{nullptr};
    return reinterpret_cast<EncodeTiledFn>(f);
  }();
  return fn;
}

// A 2-D map of `rows` rows of row_elems bf16 at `base`, boxes of 64 columns x box_rows rows,
// 128-byte swizzle (the wgmma panels' layout), rows out of range read as zeros.
bool encode_rows(CUtensorMap* map, const void* base, uint64_t row_elems, int64_t rows, int box_rows) {
  const EncodeTiledFn encode = encode_tiled_fn();
  if (!encode || !base || reinterpret_cast<uintptr_t>(base) % 16 != 0 || rows <= 0 || rows > (int64_t{1} << 31))
    return false;
  const cuuint64_t dims[2] = {row_elems, static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {row_elems * 2};
  const cuuint32_t box[2] = {64, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(base), dims, strides, box,
                element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The maps of this call's keys, when the TMA can read them: contiguous keys, or pages inside a
// pool of under 4 GB (k_pool, v_pool, pool_rows given).
bool make_kv_maps(const AttentionGpuParams& p, int box_rows, KvTensorMaps* maps) {
  const uint64_t row_elems = static_cast<uint64_t>(p.n_kv_heads) * static_cast<uint64_t>(p.head_dim);
  if (p.k_pages) {
    if (!p.k_pool || !p.v_pool || p.pool_rows <= 0 ||
        static_cast<uint64_t>(p.pool_rows) * row_elems * 2 > uint64_t{0xffffffffu})
      return false;
    return encode_rows(&maps->k, p.k_pool, row_elems, p.pool_rows, box_rows) &&
           encode_rows(&maps->v, p.v_pool, row_elems, p.pool_rows, box_rows);
  }
  return encode_rows(&maps->k, p.k, row_elems, p.n_kv, box_rows) &&
         encode_rows(&maps->v, p.v, row_elems, p.n_kv, box_rows);
}

template <int D, typename OutT, bool kPaged, bool kTma, class C, bool kExt>
cudaError_t launch_ws_kernel(const AttentionGpuParams& p, const KvTensorMaps& maps, cudaStream_t stream) {
  constexpr size_t kSmem = WsSmem<D, C>::kBytes;
  auto* kernel = prefill_attention_wgmma_ws_kernel<D, OutT, kPaged, kTma, C, kExt>;
  static const cudaError_t attr =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmem));
  if (attr != cudaSuccess) return attr;
  const dim3 grid(static_cast<unsigned>((p.n_q + C::kBlockM - 1) / C::kBlockM), static_cast<unsigned>(p.n_heads));
  kernel<<<grid, C::kThreads, kSmem, stream>>>(p, maps);
  return cudaGetLastError();
}

// With the TMA where the keys allow (kAllowTma), else cp.async. A compile-time choice, so that a
// launcher without the TMA carries no TMA kernel.
template <int D, typename OutT, bool kPaged, class C, bool kAllowTma, bool kExt>
cudaError_t launch_ws(const AttentionGpuParams& p, cudaStream_t stream) {
  KvTensorMaps maps;
  std::memset(&maps, 0, sizeof(maps));
  if constexpr (kAllowTma) {
    if (make_kv_maps(p, C::kBox, &maps)) return launch_ws_kernel<D, OutT, kPaged, true, C, kExt>(p, maps, stream);
  }
  return launch_ws_kernel<D, OutT, kPaged, false, C, kExt>(p, maps, stream);
}

// 1 in the device code of a build for sm_90a (the kernel's body is there), 0 in any other.
__device__ const int kWgmmaBuilt = STARSERVE_WGMMA_ENABLED;

// Whether the current device runs this build's sm_90a code: compute capability 9.0 and a device
// image compiled with the wgmma body (read once per device).
bool wgmma_device_ok() {
  constexpr int kMaxDevices = 64;
  static int state[kMaxDevices] = {};  // 0 unknown, 1 yes, 2 no
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return false;
  if (state[device] == 0) {
    int major = 0, minor = 0;
    int built = 0;
    const bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
                    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) == cudaSuccess &&
                    major == 9 && minor == 0 &&
                    cudaMemcpyFromSymbol(&built, kWgmmaBuilt, sizeof(built)) == cudaSuccess && built == 1;
    state[device] = ok ? 1 : 2;
  }
  return state[device] == 1;
}

template <int D, typename OutT, class C, bool kAllowTma, bool kAllowExt>
cudaError_t launch_ws_typed(const AttentionGpuParams& p, cudaStream_t stream) {
  if constexpr (kAllowExt) {
    if (detail::mask_extended(p))
      return p.k_pages ? launch_ws<D, OutT, true, C, kAllowTma, true>(p, stream)
                       : launch_ws<D, OutT, false, C, kAllowTma, true>(p, stream);
  }
  return p.k_pages ? launch_ws<D, OutT, true, C, kAllowTma, false>(p, stream)
                   : launch_ws<D, OutT, false, C, kAllowTma, false>(p, stream);
}

// The launcher of configuration C: validation, then the instance for the head dim, output type
// and key source; with the TMA where the keys allow when kAllowTma, else cp.async always.
// kAllowExt: C has the window / soft-cap instances (else such calls get cudaErrorNotSupported).
template <class C, bool kAllowTma, bool kAllowExt = false>
cudaError_t launch_ws_config(const AttentionGpuParams& p, cudaStream_t stream) {
  if (!detail::prefill_params_ok(p, C::kBlockM)) return cudaErrorInvalidValue;
  if (p.head_dim != 64 && p.head_dim != 128) return cudaErrorInvalidValue;
  if (!kAllowExt && detail::mask_extended(p)) return cudaErrorNotSupported;
  if (p.n_q == 0) return cudaSuccess;
  if (!wgmma_device_ok()) return cudaErrorNotSupported;
  if (p.head_dim == 64) return p.out_fp32 ? launch_ws_typed<64, float, C, kAllowTma, kAllowExt>(p, stream)
                                          : launch_ws_typed<64, __nv_bfloat16, C, kAllowTma, kAllowExt>(p, stream);
  return p.out_fp32 ? launch_ws_typed<128, float, C, kAllowTma, kAllowExt>(p, stream)
                    : launch_ws_typed<128, __nv_bfloat16, C, kAllowTma, kAllowExt>(p, stream);
}

}  // namespace
}  // namespace starserve
