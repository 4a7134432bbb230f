// Prefill / block-local partial attention with LSE and entropy, FlashAttention-2 style (Dao 2023,
// Algorithm 1) on mma.sync tensor cores (m16n8k16 bf16, fp32 accumulate), for sm_80 and later.
//
// One block = 64 query rows of one head, 4 warps x 16 rows. Each warp keeps in registers, for its
// 16 rows: the Q fragment (loaded once with ldmatrix), the score tile S (16 x 64 fp32), and the O
// accumulator (16 x D fp32). K and V stream through shared memory in 64-key tiles, two stages
// deep: cp.async fetches tile i + 1 while the block computes tile i. P never leaves registers: the
// S accumulator layout of m16n8k16 is exactly the A-operand layout of the next m16n8k16, so P is
// S rounded to bf16 pairs; V's B operand comes from ldmatrix.trans.
//
// Online softmax with the entropy state (m, l, u) of entropy.md, in base 2 (s2 = s * scale *
// log2 e, so each exponential is one MUFU.EX2); u = sum 2^t t with t = s2 - m. Each thread holds
// 16 of a row's 64 scores per tile; the row max needs the quad's shuffle every tile, but l and u
// stay per-thread partial sums until the end: the rescale u' = c (u + (m - m') l) + pu, l' = c l + ps
// is linear in (u, l) with factors (c, m - m') common to the row, so partials add up at the end.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 .bf16; g = lane / 4, t = lane % 4):
//   A (16 x 16): a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B (16 x 8):  b0 (k = 2t..2t+1, n = g), b1 (k = 2t+8.., n = g)
//   C (16 x 8):  c0, c1 (g, 2t..2t+1), c2, c3 (g+8, 2t..2t+1)
//
// Shared memory per block: K and V tiles of 64 x D bf16, two stages; rows padded by 16 bytes so the
// 8 row addresses of one ldmatrix phase fall in distinct bank groups. Q is staged once in stage 1's
// K buffer before the loop. 36 KB at D = 64, 68 KB at D = 128 (three blocks per SM).
//
// Causal: tiles wholly above the block's last visible key are never loaded; the mask is applied
// only on tiles that contain a hidden key for some row of the warp (the diagonal and the n_kv tail).
// Paged keys: a 64-key tile lies in one page (pages hold >= 64 keys): one page-table read per tile.
#include <cstdint>
#include <cstring>

#include "kernels/attention.h"
#include "kernels/attention_common.cuh"

namespace starserve {
namespace {

using detail::kLn2;
using detail::kLog2e;
using detail::kNegInfF;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockM = 16 * kWarps;  // query rows per block, 16 per warp
constexpr int kBlockN = 64;           // keys per tile
static_assert(kBlockM == kBlockN, "Q is staged in a K tile buffer");

template <int D>
struct MmaSmem {
  static constexpr int kLd = D + 8;  // bf16 elements per row; +16 bytes shifts each row by 4 banks
  static constexpr int kTileElems = kBlockN * kLd;
  // Stage s: K tile at element (2 s) kTileElems, V tile at (2 s + 1) kTileElems.
  static constexpr size_t kBytes = 4 * sizeof(__nv_bfloat16) * kTileElems;
};

// Three blocks per SM (12 warps): caps registers at 168 per thread. Uncapped, ptxas takes ~190
// (D = 64) and ~250 (D = 128), mostly to hoist ldmatrix loads; at 168 neither head dim spills
// (ptxas -v, nvcc 13.0, sm_90a). Shared memory allows it (3 x 68 KB at D = 128).
constexpr int kMinBlocks = 3;

__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16-byte global -> shared copy; valid == false writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(__cvta_generic_to_global(src)),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
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

// 2^x in one MUFU op (relative error ~2^-22); results below 2^-126 flush to 0, which the entropy
// term p t tolerates (p t -> 0 there).
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Two floats as one bf16x2 register: lo in the low half (the lower column of an A-fragment pair).
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t r;
  memcpy(&r, &v, sizeof(r));
  return r;
}

__device__ __forceinline__ void store_pair(float* dst, float a, float b) {
  *reinterpret_cast<float2*>(dst) = make_float2(a, b);
}
__device__ __forceinline__ void store_pair(__nv_bfloat16* dst, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(a, b);
}

// Starts the copy of rows [row0, row0 + 64) of one head (row stride `stride` elements) into a
// 64 x D tile of pitch kLd at shared address `tile`. Rows at or past row_end are zero-filled
// without a read, so padded scores are finite and padded V rows add 0 * 0 (the paged pool holds
// garbage, even NaN, there). Thread i copies chunk i % (D / 8) of rows i / (D / 8) + kRowsPerPass n.
template <int D>
__device__ __forceinline__ void load_tile_async(uint32_t tile, const __nv_bfloat16* src, int64_t row0,
                                                int64_t row_end, int64_t stride) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int kRowsPerPass = kThreads / kChunks;
  static_assert(kThreads % kChunks == 0 && kBlockN % kRowsPerPass == 0, "whole rows per pass");
  const int r = static_cast<int>(threadIdx.x) / kChunks, c = static_cast<int>(threadIdx.x) % kChunks;
  const int64_t rows_left = row_end - row0 - r;  // pass n's row is real iff n kRowsPerPass < rows_left
  const __nv_bfloat16* g = src + (row0 + r) * stride + c * 8;
  // Opaque to the optimiser: otherwise it keeps all 16 chunk addresses live across the key loop as
  // separate induction variables (64-bit each), which spilled at D = 128; recomputing them per tile
  // costs one IMAD.WIDE each.
  asm volatile("" : "+l"(g));
  const int64_t step = kRowsPerPass * stride;
  tile += static_cast<uint32_t>((r * MmaSmem<D>::kLd + c * 8) * sizeof(__nv_bfloat16));
#pragma unroll
  for (int n = 0; n < kBlockN / kRowsPerPass; ++n) {
    const bool ok = n * kRowsPerPass < rows_left;
    cp_async_16(tile + static_cast<uint32_t>(n * kRowsPerPass * MmaSmem<D>::kLd * sizeof(__nv_bfloat16)),
                ok ? g + n * step : src, ok);
  }
}

// kPaged: keys through p.k_pages / p.v_pages; a separate instance so the contiguous loop is untouched.
template <int D, typename OutT, bool kPaged>
__global__ void __launch_bounds__(kThreads, kMinBlocks) prefill_attention_mma_kernel(AttentionGpuParams p) {
  using L = MmaSmem<D>;
  constexpr int kLd = L::kLd;
  constexpr int kKSteps = D / 16;  // k-steps of Q K^T; also 16-column groups of O
  extern __shared__ __align__(128) unsigned char smem_raw[];
  auto* smem = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  const uint32_t smem_base = smem_u32(smem_raw);
  constexpr size_t kTileBytes = sizeof(__nv_bfloat16) * L::kTileElems;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int g = lane / 4, t = lane % 4;  // fragment row group and column pair
  const int mat = lane / 8, mat_row = lane % 8;  // ldmatrix: which 8 x 8 matrix this lane addresses, and its row

  // Heaviest causal tiles (last queries) first, so the tail of the grid is short.
  const int64_t q0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * kBlockM;
  const int head = static_cast<int>(blockIdx.y);
  const int kv_head = head / (p.n_heads / p.n_kv_heads);
  const int64_t q_stride = static_cast<int64_t>(p.n_heads) * D;
  const int64_t kv_stride = static_cast<int64_t>(p.n_kv_heads) * D;

  // Keys [0, kv_end) are visible to some row of the block.
  int64_t kv_end = p.n_kv;
  if (p.causal) {
    const int64_t last_row = (q0 + kBlockM < p.n_q ? q0 + kBlockM : p.n_q) - 1;
    const int64_t last_key = last_row + p.causal_offset;
    kv_end = last_key + 1 < kv_end ? last_key + 1 : kv_end;
  }
  const int n_tiles = kv_end > 0 ? static_cast<int>((kv_end + kBlockN - 1) / kBlockN) : 0;

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
      load_tile_async<D>(s_k, k_page + kv_head * D, row0, row0 + p.n_kv - kv0, kv_stride);
      load_tile_async<D>(s_v, v_page + kv_head * D, row0, row0 + p.n_kv - kv0, kv_stride);
    } else {
      load_tile_async<D>(s_k, p.k + kv_head * D, kv0, p.n_kv, kv_stride);
      load_tile_async<D>(s_v, p.v + kv_head * D, kv0, p.n_kv, kv_stride);
    }
  };

  // Prologue: Q into stage 1's K buffer (free until tile 1 is fetched), tile 0 into stage 0.
  const __nv_bfloat16* s_q = smem + 2 * L::kTileElems;
  load_tile_async<D>(smem_u32(s_q), p.q + head * D, q0, p.n_q, q_stride);
  cp_async_commit();
  if (n_tiles > 0) load_kv(0, 0);
  cp_async_commit();
  cp_async_wait<1>();  // Q has landed (tile 0 may still be in flight)
  __syncthreads();

  // Q fragment of this warp's 16 rows: per k-step, matrices (rows 0-7 | 8-15) x (cols 0-7 | 8-15)
  // in the a0..a3 order, so ldmatrix matrix `mat` is rows (mat % 2) * 8 + .., cols (mat / 2) * 8 + ..
  uint32_t q_frag[kKSteps][4];
  {
    const __nv_bfloat16* base = s_q + (warp * 16 + (mat % 2) * 8 + mat_row) * kLd + (mat / 2) * 8;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) ldmatrix_x4(q_frag[kk], smem_u32(base + kk * 16));
  }

  // This thread's two rows: g and g + 8 of the warp's 16. lim: last visible key (may be < 0).
  const int64_t row_w = q0 + warp * 16 + g;
  int64_t lim[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    lim[r] = p.n_kv - 1;
    if (p.causal) lim[r] = row_w + 8 * r + p.causal_offset < lim[r] ? row_w + 8 * r + p.causal_offset : lim[r];
  }
  // The warp's most restrictive row is its first: a tile needs the mask iff a key lies past its limit.
  int64_t warp_lim = p.n_kv - 1;
  if (p.causal) {
    const int64_t first = q0 + warp * 16 + p.causal_offset;
    warp_lim = first < warp_lim ? first : warp_lim;
  }

  const float scale2 = p.scale * kLog2e;
  float o[2 * kKSteps][4];  // O (16 x D): n-tile dn holds columns 8 dn .. 8 dn + 7
#pragma unroll
  for (int dn = 0; dn < 2 * kKSteps; ++dn)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[dn][e] = 0.0f;
  float m[2] = {kNegInfF, kNegInfF};  // row max of s2 (base 2)
  float l[2] = {0.0f, 0.0f};          // this thread's partial sum of 2^t
  float u[2] = {0.0f, 0.0f};          // this thread's partial sum of 2^t t

  for (int it = 0; it < n_tiles; ++it) {
    // Tile it has landed for every thread, and every warp is done with tile it - 1 (and with Q),
    // whose stage the prefetch below overwrites.
    cp_async_wait<0>();
    __syncthreads();
    if (it + 1 < n_tiles) load_kv(it + 1, (it + 1) % 2);
    cp_async_commit();

    const int64_t kv0 = static_cast<int64_t>(it) * kBlockN;
    const __nv_bfloat16* s_k = smem + 2 * (it % 2) * L::kTileElems;
    const __nv_bfloat16* s_v = s_k + L::kTileElems;

    // S (16 x 64) = Q_w K^T. ldmatrix matrix `mat` of a 16-key group: keys (mat / 2) * 8 + ..,
    // dims (mat % 2) * 8 + ..: b0, b1 of the keys' first n-tile, then of the second.
    float s[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.0f;
    {
      const uint32_t k_base = smem_u32(s_k + ((mat / 2) * 8 + mat_row) * kLd + (mat % 2) * 8);
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
        for (int np = 0; np < 4; ++np) {
          uint32_t b[4];
          ldmatrix_x4(b, k_base + static_cast<uint32_t>((np * 16 * kLd + kk * 16) * sizeof(__nv_bfloat16)));
          mma_bf16(s[2 * np], q_frag[kk], b[0], b[1]);
          mma_bf16(s[2 * np + 1], q_frag[kk], b[2], b[3]);
        }
      }
    }

    // Scale into base 2 first, then mask (a mask of -inf before a negative scale would flip sign).
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] *= scale2;
    if (kv0 + kBlockN - 1 > warp_lim) {  // warp-uniform: a diagonal or tail tile
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t rel = lim[r] - kv0;  // last visible column of this tile, clamped to [-1, 64]
        const int last = static_cast<int>(rel < -1 ? -1 : (rel > kBlockN ? kBlockN : rel));
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e)
            if (nt * 8 + 2 * t + e > last) s[nt][2 * r + e] = kNegInfF;
      }
    }

    // Online softmax + entropy state per row (entropy.md): m' = max(m, max_j s2_j), c = 2^(m - m'),
    // t_j = s2_j - m', u' = c (u + (m - m') l) + sum 2^t_j t_j, l' = c l + sum 2^t_j.
    float corr[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = kNegInfF;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[r], mx);
      // A row that has seen no key yet keeps m' = -inf; subtracting 0 instead gives t = -inf for
      // every (masked) score, so p = 0 and no -inf - -inf NaN forms.
      const float m_use = m_new == kNegInfF ? 0.0f : m_new;
      corr[r] = exp2_approx(m[r] - m_use);  // 0 when m = -inf (O, l, u are 0 then anyway)
      const float delta = m[r] == kNegInfF ? 0.0f : m[r] - m_use;  // never -inf * 0
      float ps = 0.0f, pu = 0.0f;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          // Clamped at -256: a masked score (-inf) gives p = 0 and p t = 0 rather than 0 * -inf;
          // any t below -126 already gives p = 0 through the flush, so the clamp changes nothing else.
          const float tt = fmaxf(s[nt][2 * r + e] - m_use, -256.0f);
          const float pe = exp2_approx(tt);
          s[nt][2 * r + e] = pe;
          ps += pe;
          pu = fmaf(pe, tt, pu);
        }
      }
      u[r] = corr[r] * fmaf(delta, l[r], u[r]) + pu;
      l[r] = corr[r] * l[r] + ps;
      m[r] = m_new;
    }
#pragma unroll
    for (int dn = 0; dn < 2 * kKSteps; ++dn) {
      o[dn][0] *= corr[0];
      o[dn][1] *= corr[0];
      o[dn][2] *= corr[1];
      o[dn][3] *= corr[1];
    }

    // O_w (16 x D) += P (16 x 64, bf16) V (64 x D). P's A fragment for keys 16 kk .. 16 kk + 15 is
    // S n-tiles 2 kk and 2 kk + 1. ldmatrix.trans matrix `mat`: keys (mat % 2) * 8 + ..,
    // dims (mat / 2) * 8 + ..: b0, b1 of the first 8 output columns, then of the next 8.
    {
      const uint32_t v_base = smem_u32(s_v + ((mat % 2) * 8 + mat_row) * kLd + (mat / 2) * 8);
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        const uint32_t a[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                               pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                               pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int dp = 0; dp < kKSteps; ++dp) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, v_base + static_cast<uint32_t>((kk * 16 * kLd + dp * 16) * sizeof(__nv_bfloat16)));
          mma_bf16(o[2 * dp], a, b[0], b[1]);
          mma_bf16(o[2 * dp + 1], a, b[2], b[3]);
        }
      }
    }
  }

  // The quad's four partial l and u make the row's (all lanes shuffle, before any branch).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    u[r] += __shfl_xor_sync(0xffffffffu, u[r], 1);
    u[r] += __shfl_xor_sync(0xffffffffu, u[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t qi = row_w + 8 * r;
    if (qi >= p.n_q) continue;
    const int64_t out_row = qi * p.n_heads + head;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;  // l >= 1 once a key is visible (the max has p = 1)
    OutT* out = static_cast<OutT*>(p.out) + out_row * D + 2 * t;
#pragma unroll
    for (int dn = 0; dn < 2 * kKSteps; ++dn) store_pair(out + dn * 8, o[dn][2 * r] * inv, o[dn][2 * r + 1] * inv);
    if (t == 0) {
      if (l[r] > 0.0f) {
        const float ln_l = logf(l[r]);
        p.lse[out_row] = m[r] * kLn2 + ln_l;
        if (p.entropy) p.entropy[out_row] = fmaxf(0.0f, ln_l - u[r] * kLn2 * inv);  // H = ln l - u / l (nats)
      } else {
        p.lse[out_row] = kNegInfF;
        if (p.entropy) p.entropy[out_row] = 0.0f;
      }
    }
  }
}

template <int D, typename OutT, bool kPaged>
cudaError_t launch_mma_instance(const AttentionGpuParams& p, cudaStream_t stream) {
  constexpr size_t kSmem = MmaSmem<D>::kBytes;
  // Once per process: the dynamic shared-memory limit above 48 KB, and the largest carveout so that
  // kMinBlocks blocks fit beside each other.
  static const cudaError_t attr = [] {
    cudaError_t e = cudaFuncSetAttribute(prefill_attention_mma_kernel<D, OutT, kPaged>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmem));
    if (e == cudaSuccess)
      e = cudaFuncSetAttribute(prefill_attention_mma_kernel<D, OutT, kPaged>,
                               cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
    return e;
  }();
  if (attr != cudaSuccess) return attr;
  const dim3 grid(static_cast<unsigned>((p.n_q + kBlockM - 1) / kBlockM), static_cast<unsigned>(p.n_heads));
  prefill_attention_mma_kernel<D, OutT, kPaged><<<grid, kThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

template <int D, typename OutT>
cudaError_t launch_mma_typed(const AttentionGpuParams& p, cudaStream_t stream) {
  return p.k_pages ? launch_mma_instance<D, OutT, true>(p, stream) : launch_mma_instance<D, OutT, false>(p, stream);
}

}  // namespace

cudaError_t launch_prefill_attention_mma(const AttentionGpuParams& p, cudaStream_t stream) {
  if (!detail::prefill_params_ok(p, kBlockM)) return cudaErrorInvalidValue;
  if (p.n_q == 0) return cudaSuccess;
  if (p.head_dim == 64) return p.out_fp32 ? launch_mma_typed<64, float>(p, stream)
                                          : launch_mma_typed<64, __nv_bfloat16>(p, stream);
  if (p.head_dim == 128) return p.out_fp32 ? launch_mma_typed<128, float>(p, stream)
                                           : launch_mma_typed<128, __nv_bfloat16>(p, stream);
  return cudaErrorInvalidValue;
}

cudaError_t launch_prefill_attention(const AttentionGpuParams& p, cudaStream_t stream) {
  return launch_prefill_attention_mma(p, stream);
}

}  // namespace starserve
