// Prefill / block-local partial attention with LSE and entropy, FlashAttention-2 style (Dao 2023,
// Algorithm 1) on mma.sync tensor cores (m16n8k16 bf16, fp32 accumulate), for sm_80 and later.
//
// One block = kBlockM query rows of one head, 4 warps; each warp owns kMTiles m16 row tiles (16 or
// 32 rows) and keeps in registers, for them: the score tile S (16 x 64 fp32 per m16 tile), the O
// accumulator (16 x D fp32 per m16 tile), and the Q fragment when it fits (else re-read from
// shared memory per k-step). K and V stream through shared memory in 64-key tiles, two stages
// deep: cp.async fetches tile i + 1 while the block computes tile i. P never leaves registers: the
// S accumulator layout of m16n8k16 is exactly the A-operand layout of the next m16n8k16, so P is
// S rounded to bf16 pairs; V's B operand comes from ldmatrix.trans.
//
// The kernel template, included by the .cu files that instantiate it: attention/prefill_mma.cu
// (m128, what ships: launch_prefill_attention_mma) and baselines/prefill_mma_variants.cu (m64,
// m64-lean). Everything is in an anonymous namespace, so each includer gets its own kernels with
// internal linkage, as when this was one file: no kernel instance is shared by two translation
// units (whose registrations with the CUDA runtime would then alias one host stub).
//
// Configurations (MmaConfig; ptxas -v, nvcc 13.0, sm_90a):
//   m64:      64 rows/block (16 per warp), Q in registers, 3 blocks/SM: 166-168 registers, no spill.
//   m128:     128 rows/block (32 per warp: every K / V fragment feeds two m16 tiles), lean softmax,
//             2 blocks/SM, 8 warps/SM. D = 128: 255 registers, Q re-read per k-step (O 128 + S 64 +
//             Q 64 would be 256), 4-8 bytes of spill stores before the loop, at most one 4-byte
//             reload per key tile (paged; none contiguous). D = 64: 250-254 registers, Q in
//             registers, no spill.
//   m64-lean: m64's tiling with m128's softmax: 145-168 registers; at D = 128 8 bytes spilled
//             outside the key loop. It separates the two effects when measuring.
//
// Why m128 should be faster (H100 / H200, per SM: 128 B/clk of shared memory; mma.sync bf16
// at ~660 TFLOP/s = 4096 FLOP per m16n8k16 every ~1.6 clk at 1.98 GHz on 132 SMs). Shared-memory
// bytes per m16n8k16 at D = 128, ldmatrix.x4 = 512 B:
//   m64:  Q K^T 1 ldmatrix per 2 mma (256 B), P V 1 per 2 (256 B), cp.async writes 32 KB of
//              K + V per 64 x 64 tile step = 512 mma (64 B): 320 B = 2.5 clk per mma > 1.6, so
//              shared memory bounds it at ~430 TFLOP/s (measured 249, 58%).
//   m128: Q K^T 2 Q + 4 K ldmatrix per 16 mma (192 B), P V 1 per 4 (128 B), cp.async 32 KB
//              per 1024 mma (32 B): 192 B = 1.5 clk per mma, below the tensor rate: the roofline
//              moves to the mma.sync peak. (D = 64, Q in registers: 160 B.) The L2 -> SM traffic
//              per FLOP halves too (twice the rows per K / V tile).
//   Issue slots per mma on an unmasked tile (SASS of the loop): m64 ~5.5 (~700 instructions
//   per 128 HMMA), m128 ~3.5 (~900 per 256 HMMA), from the two m16 tiles sharing address
//   and loop work, the lean softmax, and the predicate-free copy of full key tiles.
//   Prediction: m128 at 60-65% of the ~660 mma.sync peak, 330-400 TFLOP/s (m64
//   reaches 58% of its smem roofline; FA2 with the same 128 x 64 tiling measures 340).
//   Measured on the H200 (attention_bench, 4K x 8K non-causal / 16K causal, entropy on):
//   m128 350 / 340 TFLOP/s, m64-lean 283 / 281, m64 245 / 252; m128 ships.
//
// Online softmax with the entropy state (m, l, u) of entropy.md, in base 2 (s2 = s * scale *
// log2 e, so each exponential is one MUFU.EX2); u = sum 2^t t with t = s2 - m. Each thread holds
// 16 of a row's 64 scores per tile; the row max needs the quad's shuffle every tile, but l and u
// stay per-thread partial sums until the end: the rescale u' = c (u + (m - m') l) + pu, l' = c l + ps
// is linear in (u, l) with factors (c, m - m') common to the row, so partials add up at the end.
// Lean softmax (m128, m64-lean), per score 4 FP32 ops + EX2 instead of 6 + EX2, and per tile no
// O rescale in the common case: the max is taken on raw scores and t = s |scale| log2 e - m is
// one FFMA (for scale < 0, Q is negated once in shared memory: exact); the -inf clamp runs only on
// masked tiles (others hold finite scores only); m moves only when a tile's max exceeds it by more
// than kSlack = 8, so O (D / 2 or D registers per thread) is rescaled only when some row of the
// warp moved. p <= 2^8 then; LSE = m + log2 l and H = log2 l - u / l are exact for any m.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 .bf16; g = lane / 4, t = lane % 4):
//   A (16 x 16): a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B (16 x 8):  b0 (k = 2t..2t+1, n = g), b1 (k = 2t+8.., n = g)
//   C (16 x 8):  c0, c1 (g, 2t..2t+1), c2, c3 (g+8, 2t..2t+1)
//
// Shared memory per block: K and V tiles of 64 x D bf16, two stages; rows padded by 16 bytes so the
// 8 row addresses of one ldmatrix phase fall in distinct bank groups. m64 and m64-lean stage Q once in
// stage 1's K buffer before the loop: 36 KB at D = 64, 68 KB at D = 128 (three blocks per SM).
// m128 keeps Q (128 rows) in its own buffer: 54 KB at D = 64, 102 KB at D = 128 (two per SM).
//
// Causal: tiles wholly above the block's last visible key are never loaded; the mask is applied
// only on tiles that contain a hidden key for some row of the warp (the diagonal and the n_kv tail);
// with 128-row blocks a warp skips the block's last tile when it holds no key its rows see.
// Paged keys: a 64-key tile lies in one page (pages hold >= 64 keys): one page-table read per tile.
//
// Sliding window and soft-capping (kExt, a separate instance of the lean configurations so the
// plain loop is untouched): the block starts at the first tile its first row sees (the window's
// lower bound grows with the row), a warp skips the tiles before its own first row's bound, and
// tiles below its last row's bound are masked from below as well. Soft-capping turns the raw
// scores into softcap tanh(s |scale| / softcap) before the mask; the softmax then runs with the
// scale 1 (log2 e into base 2).
#pragma once

#include <cfloat>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels/attention/attention.h"
#include "kernels/attention/common.cuh"

namespace starserve {
namespace {

using detail::cp_async_16;
using detail::cp_async_commit;
using detail::cp_async_wait;
using detail::exp2_approx;
using detail::kLn2;
using detail::kLog2e;
using detail::kNegInfF;
using detail::pack_bf16;
using detail::smem_u32;
using detail::store_pair;

constexpr int kBlockN = 64;  // keys per tile (cp.async and S alike)

// One compile-time configuration of the kernel (m128 below; the baselines' in prefill_mma_variants.cu).
// kMTiles m16 row tiles per warp share every K / V fragment a warp loads with ldmatrix.
template <int kWarps_, int kMTiles_, int kMinBlocks_, bool kLeanSoftmax_>
struct MmaConfig {
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kMTiles = kMTiles_;
  static constexpr int kWarpRows = 16 * kMTiles;
  static constexpr int kBlockM = kWarpRows * kWarps;  // query rows per block
  // Blocks per SM that __launch_bounds__ asks for: caps registers at 65536 / (kThreads kMinBlocks).
  static constexpr int kMinBlocks = kMinBlocks_;
  // Softmax with fewer FP32 instructions per score (see the file comment): scale folded into one
  // FFMA, the -inf clamp only on masked tiles, O rescaled only when a row's max grows by > kSlack.
  static constexpr bool kLeanSoftmax = kLeanSoftmax_;
};

// m128, what ships: 128 rows per block, 32 per warp, two blocks per SM (255 registers, 8 warps per SM).
using MmaM128 = MmaConfig<4, 2, 2, true>;

// Lean softmax: a row's reference max m is raised only when a tile's max exceeds it by more than
// kSlack (log2 units), so p = 2^(s2 - m) <= 2^8, far inside the fp32 and bf16 ranges; l, O grow by at
// most 2^8 per key. LSE = m + log2 l and H = log2 l - u / l hold for any reference m (the shift
// cancels), so results differ from the exact-max update only by rounding.
constexpr float kSlack = 8.0f;

template <class C, int D>
struct MmaSmem {
  static constexpr int kLd = D + 8;  // bf16 elements per row; +16 bytes shifts each row by 4 banks
  static constexpr int kTileElems = kBlockN * kLd;
  // A warp's long-lived fragments take, per thread: Q kMTiles D / 4 registers, O kMTiles D / 2,
  // S kMTiles 32. Q stays in registers when the three fit in 160 (one m16 tile: 80 at D = 64, 128
  // at D = 128; two at D = 64: 160, 250-254 registers in all); else (two m16 tiles at D = 128:
  // 256) each k-step re-reads its Q fragment from shared memory.
  static constexpr bool kQInRegs = C::kMTiles * (D / 4 + D / 2 + 32) <= 160;
  // Q read only before the loop and no larger than a tile: staged in stage 1's K buffer (free until
  // tile 1 is fetched). Otherwise Q has its own buffer after the two stages, live all along.
  static constexpr bool kQInStage1 = kQInRegs && C::kBlockM <= kBlockN;
  static constexpr int kQOffset = kQInStage1 ? 2 * kTileElems : 4 * kTileElems;  // elements
  // Stage s: K tile at element (2 s) kTileElems, V tile at (2 s + 1) kTileElems.
  static constexpr size_t kBytes = sizeof(__nv_bfloat16) * (4 * kTileElems + (kQInStage1 ? 0 : C::kBlockM * kLd));
};

// threadIdx.x through an empty asm: values derived from it look new at each use, so the optimiser
// recomputes them (a few integer ops per key tile) rather than holding them live, or spilling
// them, across the key loop; m128 at D = 128 (255 registers) needs every register.
__device__ __forceinline__ int thread_index_opaque() {
  int x = static_cast<int>(threadIdx.x);
  asm volatile("" : "+r"(x));
  return x;
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c (16 x 8) += a (16 x 16) b (16 x 8)
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Starts the copy of rows [row0, row0 + kRows) of one head (row stride `stride` elements) into a
// kRows x D tile of pitch D + 8 at shared address `tile`, with kThreads threads. Rows at or past
// row_end are zero-filled without a read, so padded scores are finite and padded V rows add 0 * 0
// (the paged pool holds garbage, even NaN, there). Thread i copies chunk i % (D / 8) of rows
// i / (D / 8) + kRowsPerPass n. kSplitFull: a tile with all kRows rows in range (every key tile but
// the n_kv tail) takes a path without the per-row 64-bit compare and address select (about half
// of the ~120 instructions that issue the 16 copies of a D = 128 K + V tile).
template <int D, int kThreads, int kRows, bool kSplitFull = false>
__device__ __forceinline__ void load_tile_async(uint32_t tile, const __nv_bfloat16* src, int64_t row0,
                                                int64_t row_end, int64_t stride) {
  constexpr int kLd = D + 8;
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int kRowsPerPass = kThreads / kChunks;
  static_assert(kThreads % kChunks == 0 && kRows % kRowsPerPass == 0, "whole rows per pass");
  const int tid = thread_index_opaque();
  const int r = tid / kChunks, c = tid % kChunks;
  const int64_t rows_left = row_end - row0 - r;  // pass n's row is real iff n kRowsPerPass < rows_left
  const __nv_bfloat16* g = src + (row0 + r) * stride + c * 8;
  // Opaque to the optimiser: otherwise it keeps all 16 chunk addresses live across the key loop as
  // separate induction variables (64-bit each), which spilled at D = 128; recomputing them per tile
  // costs one IMAD.WIDE each.
  asm volatile("" : "+l"(g));
  const int64_t step = kRowsPerPass * stride;
  tile += static_cast<uint32_t>((r * kLd + c * 8) * sizeof(__nv_bfloat16));
  if constexpr (kSplitFull) {
    if (row_end - row0 >= kRows) {  // block-uniform
#pragma unroll
      for (int n = 0; n < kRows / kRowsPerPass; ++n)
        cp_async_16(tile + static_cast<uint32_t>(n * kRowsPerPass * kLd * sizeof(__nv_bfloat16)), g + n * step, true);
      return;
    }
  }
#pragma unroll
  for (int n = 0; n < kRows / kRowsPerPass; ++n) {
    const bool ok = n * kRowsPerPass < rows_left;
    cp_async_16(tile + static_cast<uint32_t>(n * kRowsPerPass * kLd * sizeof(__nv_bfloat16)), ok ? g + n * step : src,
                ok);
  }
}

// Flips the sign of the kRows x D tile (pitch D + 8) at `tile`: each thread the 16-byte chunks that
// load_tile_async<D, kThreads, kRows> assigns it (already landed for it: no barrier needed before).
template <int D, int kThreads, int kRows>
__device__ __forceinline__ void negate_tile(unsigned char* tile) {
  constexpr int kChunks = D / 8;
  constexpr int kRowsPerPass = kThreads / kChunks;
  const int r = static_cast<int>(threadIdx.x) / kChunks, c = static_cast<int>(threadIdx.x) % kChunks;
#pragma unroll
  for (int n = 0; n < kRows / kRowsPerPass; ++n) {
    auto* chunk = reinterpret_cast<uint4*>(tile + ((r + n * kRowsPerPass) * (D + 8) + c * 8) * sizeof(__nv_bfloat16));
    uint4 x = *chunk;
    x.x ^= 0x80008000u;
    x.y ^= 0x80008000u;
    x.z ^= 0x80008000u;
    x.w ^= 0x80008000u;
    *chunk = x;
  }
}

// kPaged: keys through p.k_pages / p.v_pages; a separate instance so the contiguous loop is untouched.
// Thread state for its fragment rows, indexed i = 2 mt + r: row g + 8 r of the warp's m16 tile mt.
template <class C, int D, typename OutT, bool kPaged, bool kExt>
__global__ void __launch_bounds__(C::kThreads, C::kMinBlocks) prefill_attention_mma_kernel(AttentionGpuParams p) {
  static_assert(!kExt || C::kLeanSoftmax, "the window / soft-cap instance is built on the lean softmax");
  using L = MmaSmem<C, D>;
  constexpr int kLd = L::kLd;
  constexpr int kThreads = C::kThreads;
  constexpr int kMT = C::kMTiles;
  constexpr int kRows = 2 * kMT;   // fragment rows per thread
  constexpr int kKSteps = D / 16;  // k-steps of Q K^T; also 16-column groups of O
  extern __shared__ __align__(128) unsigned char smem_raw[];
  auto* smem = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  const uint32_t smem_base = smem_u32(smem_raw);
  constexpr size_t kTileBytes = sizeof(__nv_bfloat16) * L::kTileElems;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int g = lane / 4, t = lane % 4;  // fragment row group and column pair
  const int mat = lane / 8, mat_row = lane % 8;  // ldmatrix: which 8 x 8 matrix this lane addresses, and its row

  // Heaviest causal tiles (last queries) first, so the tail of the grid is short.
  const int64_t q0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * C::kBlockM;
  const int head = static_cast<int>(blockIdx.y);
  const int kv_head = head / (p.n_heads / p.n_kv_heads);
  const int64_t q_stride = static_cast<int64_t>(p.n_heads) * D;
  const int64_t kv_stride = static_cast<int64_t>(p.n_kv_heads) * D;

  // Keys [0, kv_end) are visible to some row of the block.
  int64_t kv_end = p.n_kv;
  if (p.causal) {
    const int64_t last_row = (q0 + C::kBlockM < p.n_q ? q0 + C::kBlockM : p.n_q) - 1;
    const int64_t last_key = last_row + p.causal_offset;
    kv_end = last_key + 1 < kv_end ? last_key + 1 : kv_end;
  }
  const int n_tiles = kv_end > 0 ? static_cast<int>((kv_end + kBlockN - 1) / kBlockN) : 0;
  // Tiles before first_tile are behind the window of every row of the block (its first row's
  // bound is the lowest). Stage of tile it: (it - first_tile) % 2.
  const int first_tile = kExt ? static_cast<int>(window_first_key(p, q0) / kBlockN) : 0;

  auto load_kv = [&](int tile, int stage) {
    const int64_t kv0 = static_cast<int64_t>(tile) * kBlockN;
    const uint32_t s_k = smem_base + static_cast<uint32_t>(2 * stage * kTileBytes);
    const uint32_t s_v = s_k + static_cast<uint32_t>(kTileBytes);
    if constexpr (kPaged) {
      // Rows [row0, row0 + 64) of one page; keys past n_kv are rows past row0 + n_kv - kv0.
      const int64_t page = kv0 >> p.page_shift;
      const int64_t row0 = kv0 & ((int64_t{1} << p.page_shift) - 1);
      const __nv_bfloat16* k_page = p.k_pages[page];
      const __nv_bfloat16* v_page = p.v_pages[page];
      const int64_t row_end = row0 + p.n_kv - kv0;
      load_tile_async<D, kThreads, kBlockN, C::kLeanSoftmax>(s_k, k_page + kv_head * D, row0, row_end, kv_stride);
      load_tile_async<D, kThreads, kBlockN, C::kLeanSoftmax>(s_v, v_page + kv_head * D, row0, row_end, kv_stride);
    } else {
      load_tile_async<D, kThreads, kBlockN, C::kLeanSoftmax>(s_k, p.k + kv_head * D, kv0, p.n_kv, kv_stride);
      load_tile_async<D, kThreads, kBlockN, C::kLeanSoftmax>(s_v, p.v + kv_head * D, kv0, p.n_kv, kv_stride);
    }
  };

  // Prologue: Q (its own commit group), then tile 0 into stage 0.
  const __nv_bfloat16* s_q = smem + L::kQOffset;
  load_tile_async<D, kThreads, C::kBlockM>(smem_u32(s_q), p.q + head * D, q0, p.n_q, q_stride);
  cp_async_commit();
  if (first_tile < n_tiles) load_kv(first_tile, 0);
  cp_async_commit();
  cp_async_wait<1>();  // Q has landed (tile 0 may still be in flight)
  if constexpr (C::kLeanSoftmax) {
    // The lean softmax needs a positive scale (raw-score max, -inf masks): for scale < 0, use
    // (-Q) K^T |scale|. Flipping bf16 sign bits is exact; each thread flips the chunks it copied.
    if (p.scale < 0.0f) negate_tile<D, kThreads, C::kBlockM>(smem_raw + L::kQOffset * sizeof(__nv_bfloat16));
  }
  __syncthreads();

  // Q fragment of m16 tile mt, k-step kk: matrices (rows 0-7 | 8-15) x (cols 0-7 | 8-15) in the
  // a0..a3 order, so ldmatrix matrix `mat` is rows (mat % 2) * 8 + .., cols (mat / 2) * 8 + ..
  const uint32_t q_base =
      smem_u32(s_q + (warp * C::kWarpRows + (mat % 2) * 8 + mat_row) * kLd + (mat / 2) * 8);
  auto q_addr = [&](int mt, int kk) {
    return q_base + static_cast<uint32_t>((mt * 16 * kLd + kk * 16) * sizeof(__nv_bfloat16));
  };
  // Held in registers when L::kQInRegs (else unused: re-read per k-step inside the loop).
  uint32_t q_frag[L::kQInRegs ? kMT : 1][L::kQInRegs ? kKSteps : 1][4];
  if constexpr (L::kQInRegs) {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) ldmatrix_x4(q_frag[mt][kk], q_addr(mt, kk));
  }

  // Tiles [0, warp_tiles) hold a key visible to some row of the warp (its last row is the least
  // restricted); from tile mask_from on, some key is hidden from some row of the warp (its first
  // row is the most restricted; tiles past n_kv hold padding). Warp-uniform, in tile units (int):
  // no 64-bit row state stays live across the key loop.
  int mask_from = static_cast<int>(p.n_kv / kBlockN), warp_tiles = n_tiles;
  if (p.causal) {
    const int64_t first_lim = q0 + warp * C::kWarpRows + p.causal_offset;  // last key of the warp's first row
    const int64_t last_lim = first_lim + C::kWarpRows - 1;
    // Tile it (keys 64 it .. 64 it + 63) hides a key from the first row iff 64 it + 63 > first_lim.
    const int64_t first_from = first_lim < 0 ? 0 : (first_lim + 1) / kBlockN;
    if (first_from < mask_from) mask_from = static_cast<int>(first_from);
    // With 128-row blocks the block's last causal tile can lie wholly past the first warps' rows.
    if constexpr (C::kBlockM > kBlockN) {
      const int64_t tiles = last_lim < 0 ? 0 : last_lim / kBlockN + 1;
      if (tiles < warp_tiles) warp_tiles = static_cast<int>(tiles);
    }
  }
  // Window: tiles [first_tile, warp_first) lie wholly behind the bound of the warp's first row
  // (skipped); tiles before window_mask_to hold a key behind the bound of its last row (masked).
  int warp_first = first_tile, window_mask_to = 0;
  if constexpr (kExt) {
    if (p.window > 0) {
      const int64_t first_row = q0 + warp * C::kWarpRows;
      warp_first = static_cast<int>(window_first_key(p, first_row) / kBlockN);
      window_mask_to = static_cast<int>((window_first_key(p, first_row + C::kWarpRows - 1) + kBlockN - 1) / kBlockN);
    }
  }

  // Lean softmax: |scale| (Q was negated for scale < 0), at least FLT_MIN so that a masked -inf
  // score times scale2 stays -inf rather than NaN when scale = 0.
  // Soft-capped (kExt): the capped scores already carry the scale, so the softmax's is log2 e.
  const bool capped = kExt && p.softcap > 0.0f;
  const float scale2 = capped                ? kLog2e
                       : C::kLeanSoftmax ? fmaxf(fabsf(p.scale) * kLog2e, FLT_MIN)
                                         : p.scale * kLog2e;
  float o[kMT][2 * kKSteps][4];  // O (16 x D) per m16 tile: n-tile dn holds columns 8 dn .. 8 dn + 7
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int dn = 0; dn < 2 * kKSteps; ++dn)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mt][dn][e] = 0.0f;
  float m[kRows], l[kRows], u[kRows];  // row max of s2 (base 2); this thread's partial sums of 2^t, 2^t t
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    m[i] = kNegInfF;
    l[i] = 0.0f;
    u[i] = 0.0f;
  }

  // This thread's row g of the warp's m16 tile 0, recomputed where needed rather than held.
  const int64_t row_w = q0 + warp * C::kWarpRows + g;
  auto thread_row = [&] {
    if constexpr (C::kMTiles > 1) {
      const int tid = thread_index_opaque();
      return q0 + (tid / 32) * C::kWarpRows + (tid % 32) / 4;
    } else {
      return row_w;
    }
  };
  // Sets to -inf the scores of this tile (keys kv0 ..) that row i does not see.
  auto mask_tile = [&](float(&sc)[kMT][8][4], int64_t kv0) {
    // Row i's last visible key as a column of this tile, clamped to [-1, 64]:
    // min(n_kv - 1 - kv0, row0 + 16 mt + 8 r + causal_offset - kv0). Both terms are clamped once in
    // 64 bits (the causal one to [-128, 128], which keeps every clamped result since the row
    // step is < 64); the per-row work is 32-bit.
    auto clamp_col = [](int64_t x, int64_t lo, int64_t hi) {
      return static_cast<int>(x < lo ? lo : (x > hi ? hi : x));
    };
    const int tail = clamp_col(p.n_kv - 1 - kv0, -1, kBlockN);
    const int diag = p.causal ? clamp_col(thread_row() + p.causal_offset - kv0, -128, 128) : kBlockN;
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int rel = min(tail, p.causal ? diag + 16 * (i / 2) + 8 * (i % 2) : kBlockN);
      const int last = rel < -1 ? -1 : (rel > kBlockN ? kBlockN : rel);
      // Window (kExt): columns below the row's first visible key, clamped to [0, 64].
      int first = 0;
      if constexpr (kExt) first = clamp_col(window_first_key(p, thread_row() + 16 * (i / 2) + 8 * (i % 2)) - kv0, 0, kBlockN);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = nt * 8 + 2 * t + e;
          if (col > last || (kExt && col < first)) sc[i / 2][nt][2 * (i % 2) + e] = kNegInfF;
        }
    }
  };
  auto rescale_o = [&](const float(&corr)[kRows]) {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int dn = 0; dn < 2 * kKSteps; ++dn) {
        o[mt][dn][0] *= corr[2 * mt];
        o[mt][dn][1] *= corr[2 * mt];
        o[mt][dn][2] *= corr[2 * mt + 1];
        o[mt][dn][3] *= corr[2 * mt + 1];
      }
  };

  for (int it = first_tile; it < n_tiles; ++it) {
    // Tile it has landed for every thread, and every warp is done with tile it - 1 (and with Q,
    // when staged in stage 1), whose stage the prefetch below overwrites.
    cp_async_wait<0>();
    __syncthreads();
    if (it + 1 < n_tiles) load_kv(it + 1, (it + 1 - first_tile) % 2);
    cp_async_commit();

    if (it >= warp_tiles) continue;  // warp-uniform; only the block's last causal tile
    if (kExt && it < warp_first) continue;  // warp-uniform; behind the window of all its rows
    const int64_t kv0 = static_cast<int64_t>(it) * kBlockN;
    const __nv_bfloat16* s_k = smem + 2 * ((it - first_tile) % 2) * L::kTileElems;
    const __nv_bfloat16* s_v = s_k + L::kTileElems;

    // S (16 x 64 per m16 tile) = Q_w K^T. ldmatrix matrix `mat` of a 16-key group: keys
    // (mat / 2) * 8 + .., dims (mat % 2) * 8 + ..: b0, b1 of the keys' first n-tile, then of the
    // second. Each K fragment feeds the kMT m16 tiles.
    float s[kMT][8][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.0f;
    {
      const uint32_t k_base = smem_u32(s_k + ((mat / 2) * 8 + mat_row) * kLd + (mat % 2) * 8);
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
        uint32_t qa[kMT][4];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          if constexpr (L::kQInRegs) {
#pragma unroll
            for (int e = 0; e < 4; ++e) qa[mt][e] = q_frag[mt][kk][e];
          } else {
            ldmatrix_x4(qa[mt], q_addr(mt, kk));
          }
        }
#pragma unroll
        for (int np = 0; np < 4; ++np) {
          uint32_t b[4];
          ldmatrix_x4(b, k_base + static_cast<uint32_t>((np * 16 * kLd + kk * 16) * sizeof(__nv_bfloat16)));
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            mma_bf16(s[mt][2 * np], qa[mt], b[0], b[1]);
            mma_bf16(s[mt][2 * np + 1], qa[mt], b[2], b[3]);
          }
        }
      }
    }

    if constexpr (!C::kLeanSoftmax) {
      // Scale into base 2 first, then mask (a mask of -inf before a negative scale would flip sign).
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mt][nt][e] *= scale2;
      if (it >= mask_from) mask_tile(s, kv0);

      // Online softmax + entropy state per row (entropy.md): m' = max(m, max_j s2_j), c = 2^(m - m'),
      // t_j = s2_j - m', u' = c (u + (m - m') l) + sum 2^t_j t_j, l' = c l + sum 2^t_j.
      float corr[kRows];
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        float(&sr)[8][4] = s[i / 2];
        const int c0 = 2 * (i % 2);  // this row's two accumulator elements: c0, c0 + 1
        float mx = kNegInfF;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) mx = fmaxf(mx, fmaxf(sr[nt][c0], sr[nt][c0 + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[i], mx);
        // A row that has seen no key yet keeps m' = -inf; subtracting 0 instead gives t = -inf for
        // every (masked) score, so p = 0 and no -inf - -inf NaN forms.
        const float m_use = m_new == kNegInfF ? 0.0f : m_new;
        corr[i] = exp2_approx(m[i] - m_use);  // 0 when m = -inf (O, l, u are 0 then anyway)
        const float delta = m[i] == kNegInfF ? 0.0f : m[i] - m_use;  // never -inf * 0
        float ps = 0.0f, pu = 0.0f;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            // Clamped at -256: a masked score (-inf) gives p = 0 and p t = 0 rather than 0 * -inf;
            // any t below -126 already gives p = 0 through the flush, so the clamp changes nothing else.
            const float tt = fmaxf(sr[nt][c0 + e] - m_use, -256.0f);
            const float pe = exp2_approx(tt);
            sr[nt][c0 + e] = pe;
            ps += pe;
            pu = fmaf(pe, tt, pu);
          }
        }
        u[i] = corr[i] * fmaf(delta, l[i], u[i]) + pu;
        l[i] = corr[i] * l[i] + ps;
        m[i] = m_new;
      }
      rescale_o(corr);
    } else {
      // Same state update on raw scores s (scale2 > 0): the row max is taken on s, t_j = s_j scale2 - m
      // is one FFMA, and m moves only when max_j s_j scale2 > m + kSlack (else c = 1 and O, the
      // largest state, is left alone: after the first tiles almost always, for the whole warp).
      // Unmasked tiles hold only finite scores; masked ones clamp t at -256 as above.
      auto softmax = [&](auto masked) {
        float corr[kRows];
        bool grow_any = false;
#pragma unroll
        for (int i = 0; i < kRows; ++i) {
          float(&sr)[8][4] = s[i / 2];
          const int c0 = 2 * (i % 2);
          float mx = kNegInfF;
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) mx = fmaxf(mx, fmaxf(sr[nt][c0], sr[nt][c0 + 1]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          const float mx2 = mx * scale2;  // -inf when the row has seen no key in this tile
          const bool grow = mx2 > m[i] + kSlack;  // true on a row's first visible key (m = -inf)
          grow_any |= grow;
          const float m_new = grow ? mx2 : m[i];
          const float m_use = m_new == kNegInfF ? 0.0f : m_new;  // as above: no -inf - -inf
          corr[i] = grow ? exp2_approx(m[i] - m_new) : 1.0f;
          const float delta = grow && m[i] != kNegInfF ? m[i] - m_new : 0.0f;
          float ps = 0.0f, pu = 0.0f;
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float tt = fmaf(sr[nt][c0 + e], scale2, -m_use);
              if constexpr (decltype(masked)::value) tt = fmaxf(tt, -256.0f);
              const float pe = exp2_approx(tt);
              sr[nt][c0 + e] = pe;
              ps += pe;
              pu = fmaf(pe, tt, pu);
            }
          }
          u[i] = corr[i] * fmaf(delta, l[i], u[i]) + pu;
          l[i] = corr[i] * l[i] + ps;
          m[i] = m_new;
        }
        if (__any_sync(0xffffffffu, grow_any)) rescale_o(corr);
      };
      if constexpr (kExt) {
        if (capped) {
          // s (raw, Q negated for scale < 0) -> softcap tanh(s |scale| / softcap): the capped scaled score.
          const float cap = p.softcap, in = fabsf(p.scale) / p.softcap;
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
            for (int nt = 0; nt < 8; ++nt)
#pragma unroll
              for (int e = 0; e < 4; ++e) s[mt][nt][e] = detail::softcap_score(s[mt][nt][e], cap, in);
        }
      }
      if (it >= mask_from || (kExt && it < window_mask_to)) {
        mask_tile(s, kv0);
        softmax(std::true_type{});
      } else {
        softmax(std::false_type{});
      }
    }

    // O_w (16 x D per m16 tile) += P (16 x 64, bf16) V (64 x D). P's A fragment for keys
    // 16 kk .. 16 kk + 15 is S n-tiles 2 kk and 2 kk + 1. ldmatrix.trans matrix `mat`: keys
    // (mat % 2) * 8 + .., dims (mat / 2) * 8 + ..: b0, b1 of the first 8 output columns, then of
    // the next 8. Each V fragment feeds the kMT m16 tiles.
    {
      const uint32_t v_base = smem_u32(s_v + ((mat % 2) * 8 + mat_row) * kLd + (mat / 2) * 8);
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        uint32_t a[kMT][4];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          a[mt][0] = pack_bf16(s[mt][2 * kk][0], s[mt][2 * kk][1]);
          a[mt][1] = pack_bf16(s[mt][2 * kk][2], s[mt][2 * kk][3]);
          a[mt][2] = pack_bf16(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
          a[mt][3] = pack_bf16(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
        }
#pragma unroll
        for (int dp = 0; dp < kKSteps; ++dp) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, v_base + static_cast<uint32_t>((kk * 16 * kLd + dp * 16) * sizeof(__nv_bfloat16)));
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            mma_bf16(o[mt][2 * dp], a[mt], b[0], b[1]);
            mma_bf16(o[mt][2 * dp + 1], a[mt], b[2], b[3]);
          }
        }
      }
    }
  }

  // The quad's four partial l and u make the row's (all lanes shuffle, before any branch).
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    u[i] += __shfl_xor_sync(0xffffffffu, u[i], 1);
    u[i] += __shfl_xor_sync(0xffffffffu, u[i], 2);
  }
  const int64_t row0 = thread_row();
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int mt = i / 2, r = i % 2;
    const int64_t qi = row0 + 16 * mt + 8 * r;
    if (qi >= p.n_q) continue;
    const int64_t out_row = qi * p.n_heads + head;
    const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;  // l >= ~1 once a key is visible (the max has p ~ 1)
    OutT* out = static_cast<OutT*>(p.out) + out_row * D + 2 * t;
#pragma unroll
    for (int dn = 0; dn < 2 * kKSteps; ++dn)
      store_pair(out + dn * 8, o[mt][dn][2 * r] * inv, o[mt][dn][2 * r + 1] * inv);
    if (t == 0) {
      if (l[i] > 0.0f) {
        const float ln_l = logf(l[i]);
        p.lse[out_row] = m[i] * kLn2 + ln_l;
        if (p.entropy) p.entropy[out_row] = fmaxf(0.0f, ln_l - u[i] * kLn2 * inv);  // H = ln l - u / l (nats)
      } else {
        p.lse[out_row] = kNegInfF;
        if (p.entropy) p.entropy[out_row] = 0.0f;
      }
    }
  }
}

template <class C, int D, typename OutT, bool kPaged, bool kExt>
cudaError_t launch_mma_instance(const AttentionGpuParams& p, cudaStream_t stream) {
  constexpr size_t kSmem = MmaSmem<C, D>::kBytes;
  // Once per process: the dynamic shared-memory limit above 48 KB, and the largest carveout so that
  // C::kMinBlocks blocks fit beside each other.
  static const cudaError_t attr = [] {
    cudaError_t e = cudaFuncSetAttribute(prefill_attention_mma_kernel<C, D, OutT, kPaged, kExt>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmem));
    if (e == cudaSuccess)
      e = cudaFuncSetAttribute(prefill_attention_mma_kernel<C, D, OutT, kPaged, kExt>,
                               cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
    return e;
  }();
  if (attr != cudaSuccess) return attr;
  const dim3 grid(static_cast<unsigned>((p.n_q + C::kBlockM - 1) / C::kBlockM), static_cast<unsigned>(p.n_heads));
  prefill_attention_mma_kernel<C, D, OutT, kPaged, kExt><<<grid, C::kThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

template <class C, int D, typename OutT, bool kAllowExt>
cudaError_t launch_mma_typed(const AttentionGpuParams& p, cudaStream_t stream) {
  if constexpr (kAllowExt) {
    if (detail::mask_extended(p))
      return p.k_pages ? launch_mma_instance<C, D, OutT, true, true>(p, stream)
                       : launch_mma_instance<C, D, OutT, false, true>(p, stream);
  }
  return p.k_pages ? launch_mma_instance<C, D, OutT, true, false>(p, stream)
                   : launch_mma_instance<C, D, OutT, false, false>(p, stream);
}

// The launcher of configuration C: validation, then the instance for the head dim, output type
// and key source. kAllowExt: C has the window / soft-cap instances (else such calls are refused
// with cudaErrorNotSupported).
template <class C, bool kAllowExt = false>
cudaError_t launch_mma_config(const AttentionGpuParams& p, cudaStream_t stream) {
  if (!detail::prefill_params_ok(p, C::kBlockM)) return cudaErrorInvalidValue;
  if (!kAllowExt && detail::mask_extended(p)) return cudaErrorNotSupported;
  if (p.n_q == 0) return cudaSuccess;
  if (p.head_dim == 64) return p.out_fp32 ? launch_mma_typed<C, 64, float, kAllowExt>(p, stream)
                                          : launch_mma_typed<C, 64, __nv_bfloat16, kAllowExt>(p, stream);
  if (p.head_dim == 128) return p.out_fp32 ? launch_mma_typed<C, 128, float, kAllowExt>(p, stream)
                                           : launch_mma_typed<C, 128, __nv_bfloat16, kAllowExt>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace
}  // namespace starserve
