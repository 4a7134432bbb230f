// Decode attention (flash-decoding): a few query rows against a long KV, bound by reading K and V
// once. Pass 1 gives each block one chunk of keys of one kv head and the query rows that read that
// kv head (GQA group x query tokens; 1, 8 or 16 rows per block); each of its 4 warps walks every
// 4th key group of the chunk and keeps per row the online state (m, l, u) of entropy.md in base 2.
// The warps combine in shared memory and write the chunk's (O, LSE, H) to the workspace. Pass 2
// merges the chunks per row with the exact shard merge of entropy.md, so splitting never changes
// the result beyond rounding.
//
// Budget (H200): the copy bandwidth, 4.25 TB/s over 132 SMs at ~1.8 GHz, is ~18 bytes per SM clock;
// a key of one kv head is 512 bytes of K and V at D = 128, so it may take ~29 SM clocks, i.e. ~115
// warp-instruction issues (4 schedulers), before the kernel stops being bandwidth-bound.
//
// Pass 1 has two kernels, chosen by rows = n_q x group (query rows per kv head):
//
// rows == 1 (MHA, one token): decode_simt_kernel, grid (splits, kv heads, row groups). A lane holds
//   D/32 dims of a key, a warp loads 8 keys (one coalesced row each) and reduces each dot product
//   with a 5-step shuffle. Per key ~30 warp instructions; 72 registers, 7 blocks per SM, 112 KB in
//   flight per SM. Measured 3.88 TB/s (91% of copy), so it is kept as it was. With 4 GQA rows the
//   same layout spends ~110 instructions per key (per row 4 + 4 FMA, 5 shuffles + 5 adds, ~8
//   softmax ops, all replicated on 32 lanes): the whole budget above; measured 1.49 TB/s.
//
// rows >= 2: decode_mma_kernel, tensor cores (mma.sync m16n8k16, bf16 in, fp32 accumulate). A warp
//   takes 16 keys per step and, per tile of 8 query rows (1 or 2 tiles per block),
//     S^T (16 keys x 8 rows)  = K (16 keys x D) Q^T       M = keys, N = rows, K = dims: D/16 mma
//     O^T (D x 8 rows)       += V^T (D x 16 keys) P^T     M = dims, N = rows, K = keys: D/16 mma
//   Keys, not rows, fill M: N = 8 rows is the smallest mma tile, so 4 GQA rows waste half of N, not
//   3/4 of M. No shared memory, no ldmatrix: the operands come from global loads into registers.
//   Fragment layouts (PTX ISA; g = lane / 4, t = lane % 4): A a0 (g, 2t..+1), a1 (g+8, 2t..),
//   a2 (g, 2t+8..), a3 (g+8, 2t+8..); B b0 (k 2t..+1, n g), b1 (k 2t+8.., n g); C c0, c1 (g, 2t..+1),
//   c2, c3 (g+8, 2t..+1).
//   - K (A operand): q.k is invariant under one permutation of the D dims applied to q and k, so
//     k step s, columns 2t + e and 2t + 8 + e, are dims 32 (s/2) + 8t + 4 (s%2) + e and + 2: lane
//     (g, t) loads 16 contiguous bytes per 32 dims of keys g and g + 8 (a warp load: 8 keys x 64
//     contiguous bytes), and its registers are the fragment as loaded. Q (B operand, row g of the
//     tile) is loaded the same way, once.
//   - V^T (A operand) needs the two keys of a k column pair in one register, at one dim: lane (g, t)
//     loads keys 2t, 2t+1, 2t+8, 2t+9 at dims 8g..8g+7 (and 64 + 8g.. at D = 128; a warp load: 4 keys
//     x 128 contiguous bytes), and one byte permute (PRMT) per register pairs two keys. M row g of
//     m tile i is dim v_dim(g, i), row g + 8 is v_dim(g, i + D/16); the combine puts dims back.
//   - P^T (B operand): the S^T accumulator holds (keys g, g+8; rows 2t, 2t+1) per lane, the B operand
//     (keys 2t.., row g): one movmatrix.trans per 8 x 8 bf16 block, 2 per row tile and step. P is
//     rounded to bf16 (|dO| <= 2^-9 max|v|); l, u and the LSE use the fp32 weights.
//   - Row max of a step: 3 shuffles (the 8 lanes g holding a row's keys); m is then common to those
//     lanes, so l and u stay per-lane partial sums (the rescale u' = c (u + (m - m') l), l' = c l is
//     linear with factors common to the row) and are added over g once at the end.
//   Cost per 16-key step (one 8-row tile, D = 128, one warp): 16 LDG.128 (8 KB), 16 mma, 32 PRMT,
//   2 MOVM, 6 SHFL and ~90 scalar ops (softmax of 4 scores per lane, masks, addresses): ~160
//   instructions, ~10 per key against the ~115 budget; 4096 mma FLOP per key, ~1.5 SM clocks at
//   mma.sync's ~2700 FLOP per clock. A second row tile adds 16 mma and its softmax: ~15 per key.
//   Latency: the next group's K is requested as soon as the QK^T mma have read kr, its V as soon as
//   the PV mma have read vr (a pipeline in the same registers), so a warp keeps ~8 KB in flight
//   nearly all the time. At D = 128, 158-164 registers give 3 blocks (12 warps, ~96 KB in flight)
//   per SM with one row tile, 232-237 give 2 (8 warps, ~64 KB) with two; Little's law asks for
//   ~18 B/clock x ~1500 clocks of loaded DRAM latency ~ 27 KB.
//   Prediction for 32 / 8 heads, D = 128, 1 token, 128K keys (4 rows: one row tile, then 256 splits
//   of 512 keys): bandwidth-bound like the MHA case, 85-90% of copy (3.6-3.8 TB/s); the workspace
//   adds ~4 MB written and read back (< 1% of the 537 MB of K and V). Measured 3.0 TB/s (71%): the
//   2048 blocks ran as 5.2 waves of 396. Sized to one wave (make_plan: 49 splits of 2688 keys), the
//   same shape read at 3.5 TB/s contiguous and 3.8 TB/s paged (83% / 91%).
//   Grid: (row groups, kv heads, splits), row groups fastest, so the blocks that read the same keys
//   for different rows (rows > 16) run together and share them through L2.
//
// Paged keys: a warp's group of keys (8 or 16) starts at a multiple of its size (chunks start at
// multiples of 64), so it lies in one page of >= 64 keys; the warp reads a page's pointer once
// when it enters the page and addresses its rows from there. Chunks need no page alignment.
//
// Sliding window: the launchers first drop the keys behind the window of the first query row (the
// lowest bound; by whole pages when paged) and shift the mask with them, so the splits cover the
// keys some row sees; the kernels then mask each row from below as from above. Soft-capping
// replaces each scaled score s by softcap tanh(s / softcap) (in base 2: c tanh(s2 / c), c =
// softcap log2 e) before the mask.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#include "kernels/attention/attention.h"
#include "kernels/attention/common.cuh"

namespace starserve {
namespace {

using detail::kLn2;
using detail::kLog2e;
using detail::kNegInfF;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kUnroll = 8;    // simt kernel: keys in flight per warp (memory-level parallelism, independent shuffles)
constexpr int kMmaKeys = 16;  // mma kernel: keys per warp step, the M of S^T and the K of O^T
static_assert(64 % kUnroll == 0 && 64 % kMmaKeys == 0,
              "a warp's key group must not straddle a page (chunks and pages are multiples of 64)");
constexpr int kMinChunk = 256;
// Upper bound on key splits (pass 2 keeps one weight per split in shared memory).
constexpr int64_t kMaxSplitsPerRow = 2048;

struct DecodePlan {
  int64_t n_rows = 0;       // n_q * n_heads
  int group = 1;            // query heads per kv head
  int rows_per_block = 1;   // 1: simt kernel; 8 or 16: mma kernel with 1 or 2 row tiles
  int row_groups = 1;       // ceil(n_q * group / rows_per_block)
  int64_t chunk = 0;        // keys per split
  int64_t n_splits = 1;
};

// Pass-1 blocks of the instance make_plan picks that the device holds at once (SM count x blocks
// per SM, from the occupancy calculator); defined after the kernels.
int64_t resident_blocks(int head_dim, int rows_per_block);

// Splits: as many as fill the device exactly once (one wave of resident blocks), bounded by
// kMinChunk keys per split. A fractional last wave leaves most SMs idle while a few finish: on the
// H200, 128K keys with GQA 4 read at 71% of copy bandwidth with 2048 blocks (5.2 waves of 396),
// 80% with 792 (2 waves) and 83% (91% paged) with 396 (one wave); MHA reads at 80% with 1.1
// waves and 95-96% with 0.86 or 4.4 (bench/gpu/attention_bench.cu, 2026-11-29). Depends on the
// shape and the device only (paged or not), as decode_attention_workspace_bytes requires.
// Rows per block for a call whose kv heads each serve `rows` (token, head) rows: the pass-1 kernel.
int rows_per_block_for(int64_t rows) { return rows <= 1 ? 1 : rows <= 8 ? 8 : 16; }

DecodePlan make_plan(const AttentionGpuParams& p) {
  DecodePlan plan;
  plan.group = p.n_heads / p.n_kv_heads;
  plan.n_rows = p.n_q * p.n_heads;
  const int64_t rows = p.n_q * plan.group;
  plan.rows_per_block = rows_per_block_for(rows);
  plan.row_groups = static_cast<int>(std::max<int64_t>(1, (rows + plan.rows_per_block - 1) / plan.rows_per_block));
  const int64_t per_split_blocks = static_cast<int64_t>(p.n_kv_heads) * plan.row_groups;
  const int64_t target = resident_blocks(p.head_dim, plan.rows_per_block);
  int64_t splits = std::clamp<int64_t>(target / per_split_blocks, 1, kMaxSplitsPerRow);
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, (p.n_kv + kMinChunk - 1) / kMinChunk));
  plan.chunk = std::max<int64_t>(1, (p.n_kv + splits - 1) / splits);
  plan.chunk = (plan.chunk + 63) / 64 * 64;
  plan.n_splits = std::max<int64_t>(1, (p.n_kv + plan.chunk - 1) / plan.chunk);  // <= kMaxSplitsPerRow
  return plan;
}

// Each warp's partial state for the block's rows, combined in shared memory at the end of pass 1.
template <int D, int kRows>
struct WarpPartials {
  float state[kWarps][kRows][3];    // m (base 2), l, u
  float acc[kWarps][kRows][D + 1];  // unnormalised O; the +1 spreads the mma kernel's column stores over banks
};

// After a barrier that publishes sp: one warp per row merges the warps' states (entropy.md rescale)
// and writes the chunk's (O, LSE, H) of the row. ws_o: (n_splits, n_rows, D) fp32, ws_lse / ws_ent:
// (n_splits, n_rows). Block rows r -> token (row0 + r) / group, head kv_head * group + (row0 + r) % group.
template <int D, int kRows>
__device__ __forceinline__ void write_chunk_rows(const WarpPartials<D, kRows>& sp, const AttentionGpuParams& p,
                                                 const DecodePlan& plan, int row0, int n_rows, int kv_head,
                                                 int64_t split, float* ws_o, float* ws_lse, float* ws_ent) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < n_rows; r += kWarps) {
    float mm = kNegInfF;
    for (int w = 0; w < kWarps; ++w) mm = fmaxf(mm, sp.state[w][r][0]);
    const int rr = row0 + r;
    const int64_t tok = rr / plan.group;
    const int head = kv_head * plan.group + rr % plan.group;
    const int64_t out_row = split * plan.n_rows + tok * p.n_heads + head;
    float* o = ws_o + out_row * D;
    if (mm == kNegInfF) {
      for (int c = lane; c < D; c += 32) o[c] = 0.0f;
      if (lane == 0) {
        ws_lse[out_row] = kNegInfF;
        ws_ent[out_row] = 0.0f;
      }
      continue;
    }
    float ll = 0.0f, uu = 0.0f;
    float a[kWarps];
    for (int w = 0; w < kWarps; ++w) {
      const float mw = sp.state[w][r][0];
      a[w] = mw == kNegInfF ? 0.0f : exp2f(mw - mm);
      if (a[w] == 0.0f) continue;
      ll += a[w] * sp.state[w][r][1];
      uu += a[w] * (sp.state[w][r][2] + (mw - mm) * sp.state[w][r][1]);
    }
    const float inv = 1.0f / ll;
    for (int c = lane; c < D; c += 32) {
      float x = 0.0f;
      for (int w = 0; w < kWarps; ++w)
        if (a[w] != 0.0f) x += a[w] * sp.acc[w][r][c];
      o[c] = x * inv;
    }
    if (lane == 0) {
      const float ln_l = logf(ll);
      ws_lse[out_row] = mm * kLn2 + ln_l;
      ws_ent[out_row] = fmaxf(0.0f, ln_l - uu * kLn2 * inv);
    }
  }
}

template <int D>
struct Vec;  // D / 32 bf16 per lane
template <>
struct Vec<64> {
  using T = __nv_bfloat162;
};
template <>
struct Vec<128> {
  using T = uint2;
};

template <int D>
__device__ __forceinline__ void to_float(const typename Vec<D>::T& v, float* f) {
  const auto* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < D / 64; ++i) {
    const float2 x = __bfloat1622float2(h[i]);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}

// One block's chunk of keys (split) for one kv head and one row group.
// kPaged: keys through p.k_pages / p.v_pages; a separate instance so the contiguous loop is untouched.
template <int D, int kRows, bool kPaged>
__device__ __forceinline__ void decode_simt_body(AttentionGpuParams p, DecodePlan plan, float* ws_o, float* ws_lse,
                                                 float* ws_ent, int64_t split, int kv_head, int row_group) {
  constexpr int E = D / 32;  // elements per lane
  using V = typename Vec<D>::T;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row0 = row_group * kRows;  // over n_q * group: r -> (token r / group, head kv_head * group + r % group)
  const int rows_total = static_cast<int>(p.n_q) * plan.group;
  const int n_rows = min(kRows, rows_total - row0);
  const float scale2 = p.scale * kLog2e;
  const float cap2 = p.softcap * kLog2e;  // soft-cap in base 2 (0: off)

  float q[kRows][E];
  int64_t limit[kRows];  // keys j < limit are visible
  int64_t first[kRows];  // ... and keys j >= first (the window; 0 without one)
  for (int r = 0; r < kRows; ++r) {
    const int rr = row0 + min(r, n_rows - 1);
    const int64_t tok = rr / plan.group;
    const int head = kv_head * plan.group + rr % plan.group;
    const V raw = *reinterpret_cast<const V*>(p.q + (tok * p.n_heads + head) * D + lane * E);
    to_float<D>(raw, q[r]);
    for (int e = 0; e < E; ++e) q[r][e] *= scale2;
    limit[r] = p.causal ? tok + p.causal_offset + 1 : p.n_kv;
    first[r] = window_first_key(p, tok);
  }

  const int64_t begin = split * plan.chunk;
  int64_t end = min(p.n_kv, begin + plan.chunk);
  int64_t max_limit = 0;
  for (int r = 0; r < n_rows; ++r) max_limit = max(max_limit, limit[r]);
  end = min(end, max_limit);

  float m[kRows], l[kRows], u[kRows], acc[kRows][E];
  for (int r = 0; r < kRows; ++r) {
    m[r] = kNegInfF;
    l[r] = 0.0f;
    u[r] = 0.0f;
    for (int e = 0; e < E; ++e) acc[r][e] = 0.0f;
  }

  const int64_t stride = static_cast<int64_t>(p.n_kv_heads) * D;
  const int64_t head_off = kv_head * D + lane * E;
  const __nv_bfloat16* kbase = kPaged ? nullptr : p.k + head_off;
  const __nv_bfloat16* vbase = kPaged ? nullptr : p.v + head_off;
  int64_t page_key0 = 0, page_end = 0;  // paged: keys [page_key0, page_end) of kbase / vbase's page (warp-uniform)
  for (int64_t j0 = begin + warp * kUnroll; j0 < end; j0 += kWarps * kUnroll) {
    float kf[kUnroll][E], vf[kUnroll][E];
    {
      if constexpr (kPaged) {
        if (j0 >= page_end) {  // j0 only grows, so this is entering a new page
          const int64_t page = j0 >> p.page_shift;
          page_key0 = page << p.page_shift;
          page_end = page_key0 + (int64_t{1} << p.page_shift);
          kbase = p.k_pages[page] + head_off;
          vbase = p.v_pages[page] + head_off;
        }
        __builtin_assume(__isGlobal(kbase) && __isGlobal(vbase));  // global loads, not generic ones
      }
      V kr[kUnroll], vr[kUnroll];
#pragma unroll
      for (int t = 0; t < kUnroll; ++t) {
        const int64_t j = min(j0 + t, end - 1);  // clamp: the duplicate is masked below (same group, same page)
        kr[t] = *reinterpret_cast<const V*>(kbase + (j - page_key0) * stride);
        vr[t] = *reinterpret_cast<const V*>(vbase + (j - page_key0) * stride);
      }
#pragma unroll
      for (int t = 0; t < kUnroll; ++t) {
        to_float<D>(kr[t], kf[t]);
        to_float<D>(vr[t], vf[t]);
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r >= n_rows) break;
      // Scores of kUnroll keys at once: their shuffle reductions are independent (ILP), and the
      // running max moves once per group of keys instead of once per key.
      float s[kUnroll];
#pragma unroll
      for (int t = 0; t < kUnroll; ++t) {
        s[t] = 0.0f;
#pragma unroll
        for (int e = 0; e < E; ++e) s[t] += q[r][e] * kf[t][e];
      }
#pragma unroll
      for (int off = 16; off > 0; off /= 2)
#pragma unroll
        for (int t = 0; t < kUnroll; ++t) s[t] += __shfl_xor_sync(0xffffffffu, s[t], off);
      if (cap2 > 0.0f) {
#pragma unroll
        for (int t = 0; t < kUnroll; ++t) s[t] = detail::softcap_score(s[t], cap2, 1.0f / cap2);
      }
      float smax = kNegInfF;
#pragma unroll
      for (int t = 0; t < kUnroll; ++t) {
        const int64_t j = j0 + t;
        s[t] = (j < end && j < limit[r] && j >= first[r]) ? s[t] : kNegInfF;  // masked: contributes nothing
        smax = fmaxf(smax, s[t]);
      }
      if (smax == kNegInfF) continue;  // warp-uniform
      const float m_new = fmaxf(m[r], smax);
      if (m[r] != kNegInfF && m_new > m[r]) {
        const float alpha = exp2f(m[r] - m_new);
        u[r] = alpha * (u[r] + (m[r] - m_new) * l[r]);
        l[r] *= alpha;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[r][e] *= alpha;
      }
      m[r] = m_new;
#pragma unroll
      for (int t = 0; t < kUnroll; ++t) {
        const float t2 = s[t] - m_new;
        const float w = s[t] == kNegInfF ? 0.0f : exp2f(t2);
        l[r] += w;
        u[r] += s[t] == kNegInfF ? 0.0f : w * t2;  // select, never 0 * -inf
#pragma unroll
        for (int e = 0; e < E; ++e) acc[r][e] += w * vf[t][e];
      }
    }
  }

  // Combine the warps: (m, l, u, acc) of each warp per row, then one warp per row writes.
  __shared__ WarpPartials<D, kRows> sp;
  for (int r = 0; r < kRows; ++r) {
    if (lane == 0) {
      sp.state[warp][r][0] = m[r];
      sp.state[warp][r][1] = l[r];
      sp.state[warp][r][2] = u[r];
    }
    for (int e = 0; e < E; ++e) sp.acc[warp][r][lane * E + e] = acc[r][e];
  }
  __syncthreads();
  write_chunk_rows<D, kRows>(sp, p, plan, row0, n_rows, kv_head, split, ws_o, ws_lse, ws_ent);
}

// d (16 x 8, fp32) += a (16 x 16, bf16, row-major) b (16 x 8, bf16, column-major); layouts in the header.
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Transpose of an 8 x 8 bf16 matrix held one register per lane (row lane / 4, columns 2 (lane % 4)
// and + 1, the lower column in the low half), returned in the same layout.
__device__ __forceinline__ uint32_t transpose_8x8(uint32_t x) {
  uint32_t y;
  asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

// 16 bytes (8 bf16, 16-byte aligned: rows are D elements, offsets multiples of 8) into r[0..3].
__device__ __forceinline__ void load_16b(uint32_t* r, const __nv_bfloat16* src) {
  const uint4 x = *reinterpret_cast<const uint4*>(src);
  r[0] = x.x;
  r[1] = x.y;
  r[2] = x.z;
  r[3] = x.w;
}

// The dim of value a (0 <= a < D / 8) of a V row as lane group g loads it: 8g..8g+7, then
// 64 + 8g..64 + 8g + 7. M row g of the O^T tile i is dim v_dim(g, i), row g + 8 is v_dim(g, i + D / 16).
__device__ __forceinline__ int v_dim(int g, int a) { return (a / 8) * 64 + 8 * g + a % 8; }

// Value a of two keys' loaded V rows as one bf16 pair (key x low): an A-operand register of V^T.
__device__ __forceinline__ uint32_t pair_keys(const uint32_t* x, const uint32_t* y, int a) {
  return __byte_perm(x[a / 2], y[a / 2], a % 2 ? 0x7632 : 0x5410);
}

// One block's chunk of keys (split) for one kv head and one row group; kRowTiles tiles of 8 query
// rows per block. Design and layouts in the header. Rows past the last one repeat it (finite
// scores, never written).
template <int D, int kRowTiles, bool kPaged>
__device__ __forceinline__ void decode_mma_body(AttentionGpuParams p, DecodePlan plan, float* ws_o, float* ws_lse,
                                                float* ws_ent, int64_t split, int kv_head, int row_group) {
  constexpr int kRows = 8 * kRowTiles;
  constexpr int kSteps = D / 16;   // k steps of S^T, m tiles of O^T
  constexpr int kKWords = D / 8;   // registers of a K (or Q) row per lane: D / 32 loads of 16 bytes
  constexpr int kVWords = D / 16;  // registers of a V row per lane: D / 64 loads of 16 bytes
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int row0 = row_group * kRows;  // over n_q * group: r -> (token r / group, head kv_head * group + r % group)
  const int n_rows = min(kRows, static_cast<int>(p.n_q) * plan.group - row0);
  const float scale2 = p.scale * kLog2e;
  const float cap2 = p.softcap * kLog2e;  // soft-cap in base 2 (0: off)

  uint32_t qf[kRowTiles][kKWords];  // B operand of S^T: row 8 nt + g, dims 32 c + 8 t .. + 7 in words 4c..4c+3
  int64_t limit[kRowTiles][2];      // keys j < limit are visible to row 8 nt + 2t + e (this lane's S columns)
  int64_t first[kRowTiles][2];      // ... and keys j >= first (the window; 0 without one)
#pragma unroll
  for (int nt = 0; nt < kRowTiles; ++nt) {
    const int rq = row0 + min(8 * nt + g, n_rows - 1);
    const int64_t tok = rq / plan.group;
    const int head = kv_head * plan.group + rq % plan.group;
    const __nv_bfloat16* src = p.q + (tok * p.n_heads + head) * D + 8 * t;
#pragma unroll
    for (int c = 0; c < D / 32; ++c) load_16b(&qf[nt][4 * c], src + 32 * c);
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int rr = row0 + min(8 * nt + 2 * t + e, n_rows - 1);
      limit[nt][e] = p.causal ? rr / plan.group + p.causal_offset + 1 : p.n_kv;
      first[nt][e] = window_first_key(p, rr / plan.group);
    }
  }

  // Rows are token-major, so the block's last row sees the most keys.
  const int64_t begin = split * plan.chunk;
  const int64_t last_tok = (row0 + n_rows - 1) / plan.group;
  const int64_t end =
      min(min(p.n_kv, begin + plan.chunk), p.causal ? last_tok + p.causal_offset + 1 : p.n_kv);

  float m[kRowTiles][2], l[kRowTiles][2], u[kRowTiles][2];
  float acc[kRowTiles][kSteps][4];  // O^T tile i: dims v_dim(g, i), v_dim(g, i + kSteps) x rows 2t, 2t + 1
#pragma unroll
  for (int nt = 0; nt < kRowTiles; ++nt) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      m[nt][e] = kNegInfF;
      l[nt][e] = 0.0f;
      u[nt][e] = 0.0f;
    }
#pragma unroll
    for (int i = 0; i < kSteps; ++i)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[nt][i][c] = 0.0f;
  }

  const int64_t stride = static_cast<int64_t>(p.n_kv_heads) * D;
  const int64_t head_off = static_cast<int64_t>(kv_head) * D;
  const __nv_bfloat16* kbase = kPaged ? nullptr : p.k + head_off;
  const __nv_bfloat16* vbase = kPaged ? nullptr : p.v + head_off;
  int64_t page_key0 = 0, page_end = 0;  // paged: keys [page_key0, page_end) of kbase / vbase's page (warp-uniform)
  // Keys j0 + 8h + g: A rows g (h = 0) and g + 8 (h = 1) of S^T.
  uint32_t kr[2][kKWords];
  // Keys j0 + 8h + 2t + e: k columns 2t + e (h = 0) and 2t + 8 + e (h = 1) of O^T.
  uint32_t vr[2][2][kVWords];
  // Loads of the warp's group at jg. Keys past end are clamped to end - 1 (same 16-key group, so
  // same page) and masked in the softmax. enter_page runs before the K loads of each group.
  auto enter_page = [&](int64_t jg) {
    if constexpr (kPaged) {
      if (jg >= page_end) {  // jg only grows, so this is entering a new page
        const int64_t page = jg >> p.page_shift;
        page_key0 = page << p.page_shift;
        page_end = page_key0 + (int64_t{1} << p.page_shift);
        kbase = p.k_pages[page] + head_off;
        vbase = p.v_pages[page] + head_off;
      }
      __builtin_assume(__isGlobal(kbase) && __isGlobal(vbase));  // global loads, not generic ones
    }
  };
  auto load_k = [&](int64_t jg) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t j = min(jg + 8 * h + g, end - 1);
      const __nv_bfloat16* src = kbase + (j - page_key0) * stride + 8 * t;
#pragma unroll
      for (int c = 0; c < D / 32; ++c) load_16b(&kr[h][4 * c], src + 32 * c);
    }
  };
  auto load_v = [&](int64_t jg) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t j = min(jg + 8 * h + 2 * t + e, end - 1);
        const __nv_bfloat16* src = vbase + (j - page_key0) * stride + 8 * g;
#pragma unroll
        for (int c = 0; c < D / 64; ++c) load_16b(&vr[h][e][4 * c], src + 64 * c);
      }
  };

  // Software pipeline in registers: the next group's K is requested as soon as the QK^T mma have
  // read kr, its V as soon as the PV mma have read vr, so each load overlaps a step of compute and
  // a warp has 8 KB (D = 128) in flight nearly all the time, with no extra registers.
  int64_t j0 = begin + warp * kMmaKeys;
  if (j0 < end) {
    enter_page(j0);
    load_k(j0);
    load_v(j0);
  }
  for (; j0 < end; j0 += kWarps * kMmaKeys) {
    const int64_t j_next = j0 + kWarps * kMmaKeys;
    // S^T = K Q^T: k step s uses words 2s, 2s + 1 (chunk s / 2, words 2 (s % 2) and + 1).
    float s[kRowTiles][4];
#pragma unroll
    for (int nt = 0; nt < kRowTiles; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) s[nt][c] = 0.0f;
#pragma unroll
    for (int st = 0; st < kSteps; ++st)
#pragma unroll
      for (int nt = 0; nt < kRowTiles; ++nt)
        mma_m16n8k16(s[nt], kr[0][2 * st], kr[1][2 * st], kr[0][2 * st + 1], kr[1][2 * st + 1], qf[nt][2 * st],
                     qf[nt][2 * st + 1]);
    if (j_next < end) {
      enter_page(j_next);
      load_k(j_next);
    }

    // Online softmax per row 8 nt + 2t + e over keys j0 + g (s[nt][e]) and j0 + 8 + g (s[nt][2 + e]).
    const int64_t ja = j0 + g, jb = j0 + 8 + g;
    float alpha[kRowTiles][2];
    uint32_t pb[kRowTiles][2];  // B operand of O^T: P^T keys 2t.. (b0) and 2t + 8.. (b1), row g
    bool rescale = false;
#pragma unroll
    for (int nt = 0; nt < kRowTiles; ++nt) {
      float w[2][2];  // [e][key g, key g + 8]
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float y0 = s[nt][e] * scale2, y1 = s[nt][2 + e] * scale2;
        if (cap2 > 0.0f) {
          y0 = detail::softcap_score(y0, cap2, 1.0f / cap2);
          y1 = detail::softcap_score(y1, cap2, 1.0f / cap2);
        }
        const float x0 = (ja < end && ja < limit[nt][e] && ja >= first[nt][e]) ? y0 : kNegInfF;
        const float x1 = (jb < end && jb < limit[nt][e] && jb >= first[nt][e]) ? y1 : kNegInfF;
        float mx = fmaxf(x0, x1);
#pragma unroll
        for (int off = 4; off < 32; off *= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        const float m_old = m[nt][e], m_new = fmaxf(m_old, mx);
        alpha[nt][e] = 1.0f;
        if (m_old != kNegInfF && m_new > m_old) {  // never 0 * -inf: the first visible key sets m without it
          const float a = exp2f(m_old - m_new);
          u[nt][e] = a * (u[nt][e] + (m_old - m_new) * l[nt][e]);
          l[nt][e] *= a;
          alpha[nt][e] = a;
          rescale = true;
        }
        m[nt][e] = m_new;
        const float t0 = x0 - m_new, t1 = x1 - m_new;
        w[e][0] = x0 == kNegInfF ? 0.0f : exp2f(t0);  // select, so an all-masked row (m -inf) stays 0
        w[e][1] = x1 == kNegInfF ? 0.0f : exp2f(t1);
        l[nt][e] += w[e][0] + w[e][1];
        u[nt][e] += (x0 == kNegInfF ? 0.0f : w[e][0] * t0) + (x1 == kNegInfF ? 0.0f : w[e][1] * t1);
      }
      // (key g, rows 2t, 2t + 1) pairs are the S^T layout; transposed they are (keys 2t, 2t + 1; row g).
      pb[nt][0] = transpose_8x8(detail::pack_bf16(w[0][0], w[1][0]));
      pb[nt][1] = transpose_8x8(detail::pack_bf16(w[0][1], w[1][1]));
    }
    if (__any_sync(0xffffffffu, rescale)) {  // m rarely grows after the first steps
#pragma unroll
      for (int nt = 0; nt < kRowTiles; ++nt)
#pragma unroll
        for (int i = 0; i < kSteps; ++i) {
          acc[nt][i][0] *= alpha[nt][0];
          acc[nt][i][1] *= alpha[nt][1];
          acc[nt][i][2] *= alpha[nt][0];
          acc[nt][i][3] *= alpha[nt][1];
        }
    }

    // O^T += V^T P^T: m tile i has dims v_dim(g, i) (rows g: a0, a2) and v_dim(g, i + kSteps) (rows g + 8).
#pragma unroll
    for (int i = 0; i < kSteps; ++i) {
      const uint32_t a0 = pair_keys(vr[0][0], vr[0][1], i);
      const uint32_t a1 = pair_keys(vr[0][0], vr[0][1], i + kSteps);
      const uint32_t a2 = pair_keys(vr[1][0], vr[1][1], i);
      const uint32_t a3 = pair_keys(vr[1][0], vr[1][1], i + kSteps);
#pragma unroll
      for (int nt = 0; nt < kRowTiles; ++nt) mma_m16n8k16(acc[nt][i], a0, a1, a2, a3, pb[nt][0], pb[nt][1]);
    }
    if (j_next < end) load_v(j_next);
  }

  // l and u are partial sums over this lane's keys: add them over the 8 lanes g of each row.
  __shared__ WarpPartials<D, kRows> sp;
#pragma unroll
  for (int nt = 0; nt < kRowTiles; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float ll = l[nt][e], uu = u[nt][e];
#pragma unroll
      for (int off = 4; off < 32; off *= 2) {
        ll += __shfl_xor_sync(0xffffffffu, ll, off);
        uu += __shfl_xor_sync(0xffffffffu, uu, off);
      }
      if (g == 0) {
        const int r = 8 * nt + 2 * t + e;
        sp.state[warp][r][0] = m[nt][e];
        sp.state[warp][r][1] = ll;
        sp.state[warp][r][2] = uu;
      }
    }
#pragma unroll
  for (int nt = 0; nt < kRowTiles; ++nt)
#pragma unroll
    for (int i = 0; i < kSteps; ++i) {
      const int r = 8 * nt + 2 * t;
      const int d_lo = v_dim(g, i), d_hi = v_dim(g, i + kSteps);
      sp.acc[warp][r][d_lo] = acc[nt][i][0];
      sp.acc[warp][r + 1][d_lo] = acc[nt][i][1];
      sp.acc[warp][r][d_hi] = acc[nt][i][2];
      sp.acc[warp][r + 1][d_hi] = acc[nt][i][3];
    }
  __syncthreads();
  write_chunk_rows<D, kRows>(sp, p, plan, row0, n_rows, kv_head, split, ws_o, ws_lse, ws_ent);
}

// Several sequences in one launch (launch_decode_attention_batch): each sequence's call, plan and
// workspace, passed by value as the kernel's parameters (< 4 KB), read in place (__grid_constant__).
struct DecodeBatch {
  AttentionGpuParams p[kDecodeBatchMax];
  DecodePlan plan[kDecodeBatchMax];
  float* ws[kDecodeBatchMax];                 // sequence i's workspace: O, then LSE, then H
  int64_t row_begin[kDecodeBatchMax + 1];     // pass 2: rows of sequences 0..i-1 (prefix sums of n_rows)
  int n_seqs = 0;
  int row_groups = 1;                         // the grid's row-group extent per sequence (the largest)
};
static_assert(sizeof(DecodeBatch) <= 4000, "kernel parameters are limited to 4 KB");

__device__ __forceinline__ void batch_ws(const DecodeBatch& b, int seq, int d, float** o, float** lse, float** ent) {
  const DecodePlan& pl = b.plan[seq];
  *o = b.ws[seq];
  *lse = *o + pl.n_splits * pl.n_rows * d;
  *ent = *lse + pl.n_splits * pl.n_rows;
}

// Grid (splits, kv heads, row groups).
template <int D, int kRows, bool kPaged>
__global__ void __launch_bounds__(kThreads) decode_simt_kernel(AttentionGpuParams p, DecodePlan plan, float* ws_o,
                                                               float* ws_lse, float* ws_ent) {
  decode_simt_body<D, kRows, kPaged>(p, plan, ws_o, ws_lse, ws_ent, blockIdx.x, blockIdx.y, blockIdx.z);
}

// Grid (largest split count, kv heads, sequences x row groups); blocks past a sequence's own
// splits or row groups return at once.
template <int D, int kRows, bool kPaged>
__global__ void __launch_bounds__(kThreads) decode_simt_batch_kernel(const __grid_constant__ DecodeBatch b) {
  const int seq = blockIdx.z / b.row_groups, row_group = blockIdx.z % b.row_groups;
  if (blockIdx.x >= b.plan[seq].n_splits || row_group >= b.plan[seq].row_groups) return;
  float *o, *lse, *ent;
  batch_ws(b, seq, D, &o, &lse, &ent);
  decode_simt_body<D, kRows, kPaged>(b.p[seq], b.plan[seq], o, lse, ent, blockIdx.x, blockIdx.y, row_group);
}

// Grid (row groups, kv heads, splits), row groups fastest, so the blocks that read the same keys
// for different rows run together and share them through L2.
template <int D, int kRowTiles, bool kPaged>
__global__ void __launch_bounds__(kThreads, kRowTiles == 1 ? 3 : 2)
    decode_mma_kernel(AttentionGpuParams p, DecodePlan plan, float* ws_o, float* ws_lse, float* ws_ent) {
  decode_mma_body<D, kRowTiles, kPaged>(p, plan, ws_o, ws_lse, ws_ent, blockIdx.z, blockIdx.y, blockIdx.x);
}

// Grid (sequences x row groups, kv heads, largest split count).
template <int D, int kRowTiles, bool kPaged>
__global__ void __launch_bounds__(kThreads, kRowTiles == 1 ? 3 : 2)
    decode_mma_batch_kernel(const __grid_constant__ DecodeBatch b) {
  const int seq = blockIdx.x / b.row_groups, row_group = blockIdx.x % b.row_groups;
  if (blockIdx.z >= b.plan[seq].n_splits || row_group >= b.plan[seq].row_groups) return;
  float *o, *lse, *ent;
  batch_ws(b, seq, D, &o, &lse, &ent);
  decode_mma_body<D, kRowTiles, kPaged>(b.p[seq], b.plan[seq], o, lse, ent, blockIdx.z, blockIdx.y, row_group);
}

// Pass 2: one block of D threads per row. The split weights e_h = exp(LSE_h - M) are computed once
// into shared memory by all threads together, then each thread sums its output dim over the splits
// with independent, coalesced loads (a warp walking the splits serially is latency bound: with 256
// splits that alone took most of the decode time). Empty splits have e_h = 0 and O_h = 0.
constexpr int kMaxSplits = static_cast<int>(kMaxSplitsPerRow);

template <int D>
__device__ __forceinline__ float block_reduce(float x, float* s_red, bool is_max) {
  for (int off = 16; off > 0; off /= 2) {
    const float y = __shfl_xor_sync(0xffffffffu, x, off);
    x = is_max ? fmaxf(x, y) : x + y;
  }
  __syncthreads();  // s_red free from any previous use
  if (threadIdx.x % 32 == 0) s_red[threadIdx.x / 32] = x;
  __syncthreads();
  x = s_red[0];
  for (int w = 1; w < D / 32; ++w) x = is_max ? fmaxf(x, s_red[w]) : x + s_red[w];
  return x;
}

template <typename OutT, int D>
__device__ __forceinline__ void decode_merge_body(OutT* out, float* lse, float* entropy, const float* ws_o,
                                                  const float* ws_lse, const float* ws_ent, int n_splits,
                                                  int64_t n_rows, int64_t r) {
  __shared__ float s_w[kMaxSplits];
  __shared__ float s_red[D / 32];
  const int tid = threadIdx.x;
  float m = kNegInfF;
  for (int h = tid; h < n_splits; h += D) m = fmaxf(m, ws_lse[h * n_rows + r]);
  m = block_reduce<D>(m, s_red, true);
  if (m == kNegInfF) {  // every split empty: O = 0, LSE = -inf, H = 0
    detail::store_out(out + r * D + tid, 0.0f);
    if (tid == 0) {
      lse[r] = kNegInfF;
      if (entropy) entropy[r] = 0.0f;
    }
    return;
  }
  float den = 0.0f, h_mix = 0.0f, shift = 0.0f;
  for (int h = tid; h < n_splits; h += D) {
    const float lh = ws_lse[h * n_rows + r];
    const float e = lh == kNegInfF ? 0.0f : expf(lh - m);
    s_w[h] = e;
    den += e;
    if (e != 0.0f) {
      h_mix += e * ws_ent[h * n_rows + r];
      shift += e * (lh - m);
    }
  }
  den = block_reduce<D>(den, s_red, false);
  h_mix = block_reduce<D>(h_mix, s_red, false);
  shift = block_reduce<D>(shift, s_red, false);  // its barriers also publish s_w
  float acc = 0.0f;
#pragma unroll 8
  for (int h = 0; h < n_splits; ++h) acc += s_w[h] * ws_o[(h * n_rows + r) * D + tid];
  const float inv = 1.0f / den;
  detail::store_out(out + r * D + tid, acc * inv);
  if (tid == 0) {
    const float log_d = logf(den);
    lse[r] = m + log_d;  // entropy.md merge: H = sum w_h H_h - sum w_h (LSE_h - M) + ln D
    if (entropy) entropy[r] = fmaxf(0.0f, h_mix * inv - shift * inv + log_d);
  }
}

template <typename OutT, int D>
__global__ void __launch_bounds__(D) decode_merge_kernel(OutT* out, float* lse, float* entropy, const float* ws_o,
                                                         const float* ws_lse, const float* ws_ent, int n_splits,
                                                         int64_t n_rows) {
  decode_merge_body<OutT, D>(out, lse, entropy, ws_o, ws_lse, ws_ent, n_splits, n_rows, blockIdx.x);
}

// One block per row of every sequence, in sequence order.
template <typename OutT, int D>
__global__ void __launch_bounds__(D) decode_merge_batch_kernel(const __grid_constant__ DecodeBatch b) {
  const int64_t row = blockIdx.x;
  int seq = 0;
  while (row >= b.row_begin[seq + 1]) ++seq;
  const AttentionGpuParams& p = b.p[seq];
  float *o, *lse, *ent;
  batch_ws(b, seq, D, &o, &lse, &ent);
  decode_merge_body<OutT, D>(static_cast<OutT*>(p.out), p.lse, p.entropy, o, lse, ent,
                             static_cast<int>(b.plan[seq].n_splits), b.plan[seq].n_rows, row - b.row_begin[seq]);
}

// Any number of sequences (launch_decode_attention_table): each sequence's call, plan and workspace
// in device memory, one entry per sequence.
struct DecodeTableEntry {
  AttentionGpuParams p;
  DecodePlan plan;
  float* ws;  // O, then LSE, then H
};

__device__ __forceinline__ void entry_ws(const DecodeTableEntry& e, int d, float** o, float** lse, float** ent) {
  *o = e.ws;
  *lse = *o + e.plan.n_splits * e.plan.n_rows * d;
  *ent = *lse + e.plan.n_splits * e.plan.n_rows;
}

// Grid as decode_simt_batch_kernel's.
template <int D, int kRows, bool kPaged>
__global__ void __launch_bounds__(kThreads) decode_simt_table_kernel(const DecodeTableEntry* t, int row_groups) {
  const int seq = blockIdx.z / row_groups, row_group = blockIdx.z % row_groups;
  const DecodeTableEntry& e = t[seq];
  if (blockIdx.x >= e.plan.n_splits || row_group >= e.plan.row_groups) return;
  float *o, *lse, *ent;
  entry_ws(e, D, &o, &lse, &ent);
  decode_simt_body<D, kRows, kPaged>(e.p, e.plan, o, lse, ent, blockIdx.x, blockIdx.y, row_group);
}

// Grid as decode_mma_batch_kernel's.
template <int D, int kRowTiles, bool kPaged>
__global__ void __launch_bounds__(kThreads, kRowTiles == 1 ? 3 : 2)
    decode_mma_table_kernel(const DecodeTableEntry* t, int row_groups) {
  const int seq = blockIdx.x / row_groups, row_group = blockIdx.x % row_groups;
  const DecodeTableEntry& e = t[seq];
  if (blockIdx.z >= e.plan.n_splits || row_group >= e.plan.row_groups) return;
  float *o, *lse, *ent;
  entry_ws(e, D, &o, &lse, &ent);
  decode_mma_body<D, kRowTiles, kPaged>(e.p, e.plan, o, lse, ent, blockIdx.z, blockIdx.y, row_group);
}

// Grid (largest row count, sequences): one block per row of a sequence.
template <typename OutT, int D>
__global__ void __launch_bounds__(D) decode_merge_table_kernel(const DecodeTableEntry* t) {
  const DecodeTableEntry& e = t[blockIdx.y];
  const int64_t row = blockIdx.x;
  if (row >= e.plan.n_rows) return;
  float *o, *lse, *ent;
  entry_ws(e, D, &o, &lse, &ent);
  decode_merge_body<OutT, D>(static_cast<OutT*>(e.p.out), e.p.lse, e.p.entropy, o, lse, ent,
                             static_cast<int>(e.plan.n_splits), e.plan.n_rows, row);
}

template <int D>
cudaError_t launch_decode_table_typed(const DecodeTableEntry* t, const DecodeTableShape& s, cudaStream_t stream) {
  const unsigned seq_groups = static_cast<unsigned>(s.n_seqs * s.row_groups);
  const unsigned kv_heads = static_cast<unsigned>(s.n_kv_heads);
  if (s.rows_per_block == 1) {
    const dim3 grid(static_cast<unsigned>(s.max_splits), kv_heads, seq_groups);
    if (s.paged)
      decode_simt_table_kernel<D, 1, true><<<grid, kThreads, 0, stream>>>(t, s.row_groups);
    else
      decode_simt_table_kernel<D, 1, false><<<grid, kThreads, 0, stream>>>(t, s.row_groups);
  } else {
    const dim3 grid(seq_groups, kv_heads, static_cast<unsigned>(s.max_splits));
    const bool two_tiles = s.rows_per_block == 16;
    if (s.paged && two_tiles)
      decode_mma_table_kernel<D, 2, true><<<grid, kThreads, 0, stream>>>(t, s.row_groups);
    else if (s.paged)
      decode_mma_table_kernel<D, 1, true><<<grid, kThreads, 0, stream>>>(t, s.row_groups);
    else if (two_tiles)
      decode_mma_table_kernel<D, 2, false><<<grid, kThreads, 0, stream>>>(t, s.row_groups);
    else
      decode_mma_table_kernel<D, 1, false><<<grid, kThreads, 0, stream>>>(t, s.row_groups);
  }
  const dim3 merge_grid(static_cast<unsigned>(s.max_rows), static_cast<unsigned>(s.n_seqs));
  if (s.out_fp32)
    decode_merge_table_kernel<float, D><<<merge_grid, D, 0, stream>>>(t);
  else
    decode_merge_table_kernel<__nv_bfloat16, D><<<merge_grid, D, 0, stream>>>(t);
  return cudaGetLastError();
}

template <int D>
cudaError_t launch_decode_batch_typed(const DecodeBatch& b, cudaStream_t stream) {
  int64_t max_splits = 1;
  for (int i = 0; i < b.n_seqs; ++i) max_splits = std::max(max_splits, b.plan[i].n_splits);
  const DecodePlan& first = b.plan[0];
  const bool paged = b.p[0].k_pages != nullptr;
  const unsigned seq_groups = static_cast<unsigned>(b.n_seqs * b.row_groups);
  const unsigned kv_heads = static_cast<unsigned>(b.p[0].n_kv_heads);
  if (first.rows_per_block == 1) {
    const dim3 grid(static_cast<unsigned>(max_splits), kv_heads, seq_groups);
    if (paged)
      decode_simt_batch_kernel<D, 1, true><<<grid, kThreads, 0, stream>>>(b);
    else
      decode_simt_batch_kernel<D, 1, false><<<grid, kThreads, 0, stream>>>(b);
  } else {
    const dim3 grid(seq_groups, kv_heads, static_cast<unsigned>(max_splits));
    const bool two_tiles = first.rows_per_block == 16;
    if (paged && two_tiles)
      decode_mma_batch_kernel<D, 2, true><<<grid, kThreads, 0, stream>>>(b);
    else if (paged)
      decode_mma_batch_kernel<D, 1, true><<<grid, kThreads, 0, stream>>>(b);
    else if (two_tiles)
      decode_mma_batch_kernel<D, 2, false><<<grid, kThreads, 0, stream>>>(b);
    else
      decode_mma_batch_kernel<D, 1, false><<<grid, kThreads, 0, stream>>>(b);
  }
  const unsigned merge_blocks = static_cast<unsigned>(b.row_begin[b.n_seqs]);
  if (b.p[0].out_fp32)
    decode_merge_batch_kernel<float, D><<<merge_blocks, D, 0, stream>>>(b);
  else
    decode_merge_batch_kernel<__nv_bfloat16, D><<<merge_blocks, D, 0, stream>>>(b);
  return cudaGetLastError();
}

template <int D>
cudaError_t launch_decode_typed(const AttentionGpuParams& p, const DecodePlan& plan, void* workspace,
                                cudaStream_t stream) {
  float* ws_o = static_cast<float*>(workspace);
  float* ws_lse = ws_o + plan.n_splits * plan.n_rows * D;
  float* ws_ent = ws_lse + plan.n_splits * plan.n_rows;
  const bool paged = p.k_pages != nullptr;
  if (plan.rows_per_block == 1) {
    const dim3 grid(static_cast<unsigned>(plan.n_splits), static_cast<unsigned>(p.n_kv_heads),
                    static_cast<unsigned>(plan.row_groups));
    if (paged)
      decode_simt_kernel<D, 1, true><<<grid, kThreads, 0, stream>>>(p, plan, ws_o, ws_lse, ws_ent);
    else
      decode_simt_kernel<D, 1, false><<<grid, kThreads, 0, stream>>>(p, plan, ws_o, ws_lse, ws_ent);
  } else {
    const dim3 grid(static_cast<unsigned>(plan.row_groups), static_cast<unsigned>(p.n_kv_heads),
                    static_cast<unsigned>(plan.n_splits));
    const bool two_tiles = plan.rows_per_block == 16;
    if (paged && two_tiles)
      decode_mma_kernel<D, 2, true><<<grid, kThreads, 0, stream>>>(p, plan, ws_o, ws_lse, ws_ent);
    else if (paged)
      decode_mma_kernel<D, 1, true><<<grid, kThreads, 0, stream>>>(p, plan, ws_o, ws_lse, ws_ent);
    else if (two_tiles)
      decode_mma_kernel<D, 2, false><<<grid, kThreads, 0, stream>>>(p, plan, ws_o, ws_lse, ws_ent);
    else
      decode_mma_kernel<D, 1, false><<<grid, kThreads, 0, stream>>>(p, plan, ws_o, ws_lse, ws_ent);
  }
  const unsigned merge_blocks = static_cast<unsigned>(plan.n_rows);
  if (p.out_fp32)
    decode_merge_kernel<float, D><<<merge_blocks, D, 0, stream>>>(static_cast<float*>(p.out), p.lse, p.entropy, ws_o,
                                                                  ws_lse, ws_ent, static_cast<int>(plan.n_splits),
                                                                  plan.n_rows);
  else
    decode_merge_kernel<__nv_bfloat16, D><<<merge_blocks, D, 0, stream>>>(
        static_cast<__nv_bfloat16*>(p.out), p.lse, p.entropy, ws_o, ws_lse, ws_ent, static_cast<int>(plan.n_splits),
        plan.n_rows);
  return cudaGetLastError();
}

template <typename Kernel>
int blocks_per_sm(Kernel kernel) {
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, 0) != cudaSuccess) return 1;
  return std::max(1, n);
}

int64_t resident_blocks(int head_dim, int rows_per_block) {
  // Per instance (head_dim 64 / 128 x simt / one / two row tiles), computed once per process on the
  // device current at the first call: asking which device is current costs more than the rest of a
  // plan, and a decode step plans every sequence of every layer. The count only spreads the work
  // (any plan is exact), and every plan of the process uses the same count, so a workspace sized
  // here always fits its launch. The contiguous instances stand for the paged ones (same occupancy
  // on sm_90).
  static std::atomic<int64_t> cache[2][3];
  const int d = head_dim == 64 ? 0 : 1;
  const int k = rows_per_block == 1 ? 0 : rows_per_block == 8 ? 1 : 2;
  int64_t n = cache[d][k].load(std::memory_order_relaxed);
  if (n > 0) return n;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) device = 0;
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) sms = 1;
  int per_sm = 1;
  if (d == 0) {
    per_sm = k == 0 ? blocks_per_sm(decode_simt_kernel<64, 1, false>)
           : k == 1 ? blocks_per_sm(decode_mma_kernel<64, 1, false>)
                    : blocks_per_sm(decode_mma_kernel<64, 2, false>);
  } else {
    per_sm = k == 0 ? blocks_per_sm(decode_simt_kernel<128, 1, false>)
           : k == 1 ? blocks_per_sm(decode_mma_kernel<128, 1, false>)
                    : blocks_per_sm(decode_mma_kernel<128, 2, false>);
  }
  n = static_cast<int64_t>(sms) * per_sm;
  cache[d][k].store(n, std::memory_order_relaxed);
  return n;
}

// The call without the keys behind the window of its first query row (the lowest bound): dropped
// from the front, by any count when contiguous and by whole pages when paged, with the mask's
// indices shifted to match (key positions keep their distance to the queries' positions). At least
// one key stays. Without a window, the call itself.
AttentionGpuParams drop_keys_behind_window(const AttentionGpuParams& p) {
  if (p.window <= 0 || p.n_kv <= 1) return p;
  int64_t b = std::min(window_first_key(p, 0), p.n_kv - 1);
  if (p.k_pages) b = (b >> p.page_shift) << p.page_shift;
  if (b <= 0) return p;
  AttentionGpuParams q = p;
  if (p.k_pages) {
    q.k_pages += b >> p.page_shift;
    q.v_pages += b >> p.page_shift;
  } else {
    const int64_t stride = static_cast<int64_t>(p.n_kv_heads) * p.head_dim;
    q.k += b * stride;
    q.v += b * stride;
  }
  q.n_kv -= b;
  q.causal_offset -= b;
  q.window_offset -= b;  // kpos'(j) = kpos(j + b) - b: the same distances to the queries
  q.key_gap_from = std::max<int64_t>(0, p.key_gap_from - b);
  return q;
}

bool decode_shape_ok(const AttentionGpuParams& p) {
  return p.n_heads > 0 && p.n_kv_heads > 0 && p.n_heads % p.n_kv_heads == 0 && p.n_q >= 0 &&
         p.n_q <= kDecodeMaxQ && p.n_kv >= 0 && (p.head_dim == 64 || p.head_dim == 128);
}

}  // namespace

size_t decode_attention_workspace_bytes(const AttentionGpuParams& call) {
  if (!decode_shape_ok(call)) return 0;
  const AttentionGpuParams p = drop_keys_behind_window(call);
  const DecodePlan plan = make_plan(p);
  return sizeof(float) * static_cast<size_t>(plan.n_splits * plan.n_rows * (p.head_dim + 2));
}

int decode_attention_batch_key(const AttentionGpuParams& p) {
  if (!decode_shape_ok(p) || p.n_q == 0 || p.n_kv == 0) return -1;
  const int rpb = rows_per_block_for(p.n_q * (p.n_heads / p.n_kv_heads));  // make_plan's kernel choice
  const int kernel = rpb == 1 ? 0 : rpb == 8 ? 1 : 2;
  // Everything that selects the instance or the grid's kv-head extent.
  return ((((p.head_dim == 64 ? 0 : 1) * 3 + kernel) * 2 + (p.k_pages != nullptr)) * 2 + p.out_fp32) * 1024 +
         std::min(p.n_kv_heads, 1023);
}

cudaError_t launch_decode_attention_batch(const AttentionGpuParams* seqs, void* const* workspaces, int n_seqs,
                                          cudaStream_t stream) {
  if (n_seqs < 1 || n_seqs > kDecodeBatchMax || !seqs || !workspaces) return cudaErrorInvalidValue;
  DecodeBatch b;
  b.n_seqs = n_seqs;
  b.row_begin[0] = 0;
  const int key = decode_attention_batch_key(seqs[0]);
  for (int i = 0; i < n_seqs; ++i) {
    if (key < 0 || decode_attention_batch_key(seqs[i]) != key || seqs[i].n_kv_heads >= 1023 || !seqs[i].out ||
        !seqs[i].lse || !seqs[i].q || !detail::kv_source_ok(seqs[i]) || !workspaces[i] || seqs[i].key_limit)
      return cudaErrorInvalidValue;
    const AttentionGpuParams p = drop_keys_behind_window(seqs[i]);
    b.p[i] = p;
    b.plan[i] = make_plan(p);
    b.ws[i] = static_cast<float*>(workspaces[i]);
    b.row_begin[i + 1] = b.row_begin[i] + b.plan[i].n_rows;
    b.row_groups = std::max(b.row_groups, b.plan[i].row_groups);
  }
  if (seqs[0].head_dim == 64) return launch_decode_batch_typed<64>(b, stream);
  return launch_decode_batch_typed<128>(b, stream);
}

size_t decode_attention_table_bytes(int n_seqs) {
  return n_seqs <= 0 ? 0 : sizeof(DecodeTableEntry) * static_cast<size_t>(n_seqs);
}

cudaError_t build_decode_attention_table(const AttentionGpuParams* seqs, void* const* workspaces, int n_seqs,
                                         void* host_table, DecodeTableShape* shape) {
  if (n_seqs < 1 || n_seqs > kDecodeTableMax || !seqs || !workspaces || !host_table || !shape)
    return cudaErrorInvalidValue;
  auto* t = static_cast<DecodeTableEntry*>(host_table);
  const int key = decode_attention_batch_key(seqs[0]);
  DecodeTableShape s;
  s.n_seqs = n_seqs;
  for (int i = 0; i < n_seqs; ++i) {
    if (key < 0 || decode_attention_batch_key(seqs[i]) != key || seqs[i].n_kv_heads >= 1023 || !seqs[i].out ||
        !seqs[i].lse || !seqs[i].q || !detail::kv_source_ok(seqs[i]) || !workspaces[i] || seqs[i].key_limit)
      return cudaErrorInvalidValue;
    DecodeTableEntry& e = t[i];
    e.p = drop_keys_behind_window(seqs[i]);
    e.plan = make_plan(e.p);
    e.ws = static_cast<float*>(workspaces[i]);
    s.max_splits = std::max(s.max_splits, e.plan.n_splits);
    s.max_rows = std::max(s.max_rows, e.plan.n_rows);
    s.row_groups = std::max(s.row_groups, e.plan.row_groups);
  }
  if (static_cast<int64_t>(n_seqs) * s.row_groups > 65535) return cudaErrorInvalidValue;  // a grid's z extent
  s.head_dim = seqs[0].head_dim;
  s.n_kv_heads = seqs[0].n_kv_heads;
  s.rows_per_block = t[0].plan.rows_per_block;
  s.paged = seqs[0].k_pages != nullptr;
  s.out_fp32 = seqs[0].out_fp32;
  *shape = s;
  return cudaSuccess;
}

cudaError_t launch_decode_attention_table(const void* device_table, const DecodeTableShape& shape,
                                          cudaStream_t stream) {
  if (!device_table || shape.n_seqs < 1 || shape.n_seqs > kDecodeTableMax ||
      (shape.head_dim != 64 && shape.head_dim != 128))
    return cudaErrorInvalidValue;
  const auto* t = static_cast<const DecodeTableEntry*>(device_table);
  if (shape.head_dim == 64) return launch_decode_table_typed<64>(t, shape, stream);
  return launch_decode_table_typed<128>(t, shape, stream);
}

cudaError_t launch_decode_attention(const AttentionGpuParams& call, void* workspace, size_t workspace_bytes,
                                    cudaStream_t stream) {
  if (!decode_shape_ok(call) || !call.out || !call.lse || !call.q || !detail::kv_source_ok(call) || call.key_limit)
    return cudaErrorInvalidValue;
  if (call.n_q == 0) return cudaSuccess;
  if (workspace_bytes < decode_attention_workspace_bytes(call) || !workspace) return cudaErrorInvalidValue;
  const AttentionGpuParams p = drop_keys_behind_window(call);
  const DecodePlan plan = make_plan(p);
  if (p.head_dim == 64) return launch_decode_typed<64>(p, plan, workspace, stream);
  return launch_decode_typed<128>(p, plan, workspace, stream);
}

}  // namespace starserve
