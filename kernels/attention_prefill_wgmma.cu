// Prefill / block-local partial attention with LSE and entropy on Hopper's warpgroup MMA (wgmma,
// sm_90a): the FlashAttention-2 loop of attention_prefill_mma.cu with its two products issued by
// whole warpgroups, operands read by the tensor cores straight from shared memory.
//
// One block = 128 query rows of one head, two warpgroups (256 threads) of 64 rows each. Per key
// tile of kBlockN = 128 keys, each warpgroup:
//   S (64 x 128, fp32 registers) = Q_wg K^T   wgmma m64n128k16, D / 16 steps, A and B from shared
//                                              memory (both K-major)
//   online softmax + entropy on S (the lean softmax of attention_prefill_mma.cu: raw-score max,
//   one FFMA per score, O rescaled only when a row's max grows by more than kSlack)
//   O (64 x D, fp32 registers) += P V         wgmma m64nDk16, 8 steps, P (bf16) from registers (the
//                                              S accumulator layout is the A-fragment layout), V
//                                              from shared memory (MN-major)
// K and V tiles stream through shared memory two stages deep with cp.async (tile i + 1 lands while
// tile i is multiplied), stored in the 128-byte swizzled panels the wgmma descriptors describe
// (wgmma.cuh). The two warpgroups are independent between barriers, so one's softmax overlaps the
// other's multiplies. Shared memory: Q 32 KB + 2 stages x (K 32 KB + V 32 KB) at D = 128 (161 KB,
// one block per SM); half that at D = 64.
//
// Register layouts (PTX ISA, wgmma .m64nNk16, per warp w of the warpgroup, g = lane / 4, t = lane % 4):
//   accumulator: element 4 j + e of n-block j (columns 8 j ..): e = 0, 1 row 16 w + g, columns
//   8 j + 2 t + e; e = 2, 3 row 16 w + g + 8, same columns.
//   A from registers (k16 step): a0 (16 w + g, 2t..2t+1), a1 (+8 rows), a2 (cols + 8), a3 (both),
//   so P's fragment for keys 16 kk .. is S n-blocks 2 kk and 2 kk + 1, as with mma.sync.
//
// Masks, causal skipping, paged keys, empty rows and a negative scale behave as in the mma.sync
// kernel (same contract, same tests). Pages hold >= 64 keys, so a 128-key tile is loaded as two
// 64-key halves, one page-table read each.
#include <cfloat>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels/attention.h"
#include "kernels/attention_common.cuh"
#include "kernels/wgmma.cuh"

namespace starserve {
namespace {

using detail::kLn2;
using detail::kLog2e;
using detail::kNegInfF;

constexpr int kWarpgroups = 2;
constexpr int kWgRows = 64;                      // wgmma M
constexpr int kThreads = 128 * kWarpgroups;
constexpr int kBlockM = kWgRows * kWarpgroups;   // query rows per block
constexpr int kBlockN = 128;                     // keys per tile
constexpr int kHalfN = 64;                       // keys per paged load (pages hold >= 64)
constexpr float kSlack = 8.0f;                   // as in attention_prefill_mma.cu

template <int D>
struct WgSmem {
  static constexpr uint32_t kQBytes = kBlockM * D * 2;
  static constexpr uint32_t kTileBytes = kBlockN * D * 2;  // one K or V tile: D / 64 panels of 128 rows
  static constexpr uint32_t kPanelBytes = kBlockN * wgmma::kRowBytes;
  static constexpr uint32_t kQPanelBytes = kBlockM * wgmma::kRowBytes;
  static constexpr size_t kBytes = kQBytes + 4 * kTileBytes + wgmma::kSwizzleAtomBytes;  // + alignment slack
};

__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}
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
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
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

// Starts the copy of rows [row0, row0 + kRows) of one head (row stride `stride` elements) into rows
// [dst_row0, dst_row0 + kRows) of the swizzled matrix at `dst` (panels of panel_rows rows). Rows at
// or past row_end are zero-filled without a read. Thread i copies chunk i % (D / 8) of rows
// i / (D / 8) + n kRowsPerPass; a row's chunks land in one 128-byte row per panel, so the
// swizzle keeps the warp's stores free of bank conflicts.
template <int D, int kRows>
__device__ __forceinline__ void load_rows(uint32_t dst, int panel_rows, int dst_row0, const __nv_bfloat16* src,
                                          int64_t row0, int64_t row_end, int64_t stride) {
  constexpr int kChunks = D / 8;
  constexpr int kRowsPerPass = kThreads / kChunks;
  static_assert(kRows % kRowsPerPass == 0 && kRowsPerPass % 8 == 0, "whole rows per pass, swizzle phase fixed");
  const int tid = static_cast<int>(threadIdx.x);
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
__device__ __forceinline__ void negate_rows(unsigned char* base, int panel_rows) {
  constexpr int kChunks = D / 8;
  constexpr int kRowsPerPass = kThreads / kChunks;
  const int tid = static_cast<int>(threadIdx.x);
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

template <int D>
__device__ __forceinline__ void pv_step(float (&o)[D / 2], const uint32_t (&a)[4], uint64_t desc_v) {
#if STARSERVE_WGMMA_ENABLED
  if constexpr (D == 128) {
    wgmma::wgmma_m64n128k16_rs(o, a, desc_v);
  } else {
    wgmma::wgmma_m64n64k16_rs(o, a, desc_v);
  }
#endif
}

template <int D, typename OutT, bool kPaged>
__global__ void __launch_bounds__(kThreads, 1) prefill_attention_wgmma_kernel(AttentionGpuParams p) {
#if STARSERVE_WGMMA_ENABLED
  using L = WgSmem<D>;
  constexpr int kKSteps = D / 16;      // k16 steps of Q K^T
  constexpr int kPvSteps = kBlockN / 16;
  constexpr int kONb = D / 8;          // n-blocks of O
  constexpr int kSNb = kBlockN / 8;    // n-blocks of S
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + (wgmma::kSwizzleAtomBytes - 1)) & ~static_cast<uint32_t>(wgmma::kSwizzleAtomBytes - 1);
  unsigned char* base_ptr = smem_raw + (base - raw);
  const uint32_t s_q = base;
  auto s_k = [&](int stage) { return base + L::kQBytes + static_cast<uint32_t>(2 * stage) * L::kTileBytes; };

  const int tid = static_cast<int>(threadIdx.x);
  const int wg = tid / 128, warp = (tid / 32) % 4, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;

  const int64_t q0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * kBlockM;  // heaviest causal blocks first
  const int head = static_cast<int>(blockIdx.y);
  const int kv_head = head / (p.n_heads / p.n_kv_heads);
  const int64_t q_stride = static_cast<int64_t>(p.n_heads) * D;
  const int64_t kv_stride = static_cast<int64_t>(p.n_kv_heads) * D;

  int64_t kv_end = p.n_kv;
  if (p.causal) {
    const int64_t last_row = (q0 + kBlockM < p.n_q ? q0 + kBlockM : p.n_q) - 1;
    const int64_t last_key = last_row + p.causal_offset;
    kv_end = last_key + 1 < kv_end ? last_key + 1 : kv_end;
  }
  const int n_tiles = kv_end > 0 ? static_cast<int>((kv_end + kBlockN - 1) / kBlockN) : 0;

  auto load_kv = [&](int tile, int stage) {
    const int64_t kv0 = static_cast<int64_t>(tile) * kBlockN;
    const uint32_t dk = s_k(stage), dv = dk + L::kTileBytes;
    if constexpr (kPaged) {
#pragma unroll
      for (int half = 0; half < kBlockN / kHalfN; ++half) {
        const int64_t kv = kv0 + half * kHalfN;
        if (kv < p.n_kv) {
          const int64_t page = kv >> p.page_shift;
          const int64_t row0 = kv & ((int64_t{1} << p.page_shift) - 1);
          const int64_t row_end = row0 + p.n_kv - kv;
          load_rows<D, kHalfN>(dk, kBlockN, half * kHalfN, p.k_pages[page] + kv_head * D, row0, row_end, kv_stride);
          load_rows<D, kHalfN>(dv, kBlockN, half * kHalfN, p.v_pages[page] + kv_head * D, row0, row_end, kv_stride);
        } else {  // wholly past n_kv: zeros (the pool may hold NaN; no page to read)
          load_rows<D, kHalfN>(dk, kBlockN, half * kHalfN, p.q, 0, 0, 0);
          load_rows<D, kHalfN>(dv, kBlockN, half * kHalfN, p.q, 0, 0, 0);
        }
      }
    } else {
      load_rows<D, kBlockN>(dk, kBlockN, 0, p.k + kv_head * D, kv0, p.n_kv, kv_stride);
      load_rows<D, kBlockN>(dv, kBlockN, 0, p.v + kv_head * D, kv0, p.n_kv, kv_stride);
    }
  };

  // Prologue: Q (its own commit group), then tile 0 into stage 0.
  load_rows<D, kBlockM>(s_q, kBlockM, 0, p.q + head * D, q0, p.n_q, q_stride);
  cp_async_commit();
  if (n_tiles > 0) load_kv(0, 0);
  cp_async_commit();
  cp_async_wait<1>();
  // The lean softmax needs a positive scale: for scale < 0 use (-Q) K^T |scale| (exact sign flips).
  if (p.scale < 0.0f) negate_rows<D, kBlockM>(base_ptr, kBlockM);
  wgmma::fence_proxy_async();
  __syncthreads();

  // This warpgroup's key tiles: [0, wg_tiles) hold a key visible to some of its rows; from
  // mask_from on, some key is hidden from some row (causal diagonal, n_kv tail).
  int mask_from = static_cast<int>(p.n_kv / kBlockN), wg_tiles = n_tiles;
  if (p.causal) {
    const int64_t first_lim = q0 + wg * kWgRows + p.causal_offset;  // last key of the warpgroup's first row
    const int64_t last_lim = first_lim + kWgRows - 1;
    const int64_t first_from = first_lim < 0 ? 0 : (first_lim + 1) / kBlockN;
    if (first_from < mask_from) mask_from = static_cast<int>(first_from);
    const int64_t tiles = last_lim < 0 ? 0 : last_lim / kBlockN + 1;
    if (tiles < wg_tiles) wg_tiles = static_cast<int>(tiles);
  }

  const float scale2 = fmaxf(fabsf(p.scale) * kLog2e, FLT_MIN);
  // This thread's rows: r = 0, 1 -> block row wg 64 + 16 warp + g + 8 r.
  const int64_t row_base = q0 + wg * kWgRows + warp * 16 + g;
  float o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
  float s[kBlockN / 2];
#pragma unroll
  for (int i = 0; i < kBlockN / 2; ++i) s[i] = 0.0f;
  float m[2] = {kNegInfF, kNegInfF}, l[2] = {0.0f, 0.0f}, u[2] = {0.0f, 0.0f};

  const uint32_t q_wg = s_q + static_cast<uint32_t>(wg * kWgRows * wgmma::kRowBytes);

  for (int it = 0; it < n_tiles; ++it) {
    // Tile it has landed for every thread and every warpgroup is done with tile it - 1, whose
    // stage the prefetch below overwrites.
    cp_async_wait<0>();
    wgmma::fence_proxy_async();
    __syncthreads();
    if (it + 1 < n_tiles) load_kv(it + 1, (it + 1) % 2);
    cp_async_commit();
    if (it >= wg_tiles) continue;  // warpgroup-uniform: its rows see no key of this tile

    const int64_t kv0 = static_cast<int64_t>(it) * kBlockN;
    const uint32_t sk = s_k(it % 2), sv = sk + L::kTileBytes;

    // S = Q_wg K^T.
    wgmma::hold(s);
    wgmma::fence();
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      const uint32_t koff = static_cast<uint32_t>((kk % 4) * 32);  // 16 columns = 32 bytes into the panel
      const uint64_t dq = wgmma::make_desc(q_wg + (kk / 4) * L::kQPanelBytes + koff, 16, wgmma::kSwizzleAtomBytes);
      const uint64_t dk = wgmma::make_desc(sk + (kk / 4) * L::kPanelBytes + koff, 16, wgmma::kSwizzleAtomBytes);
      wgmma::wgmma_m64n128k16_ss(s, dq, dk, kk > 0 ? 1 : 0);
    }
    wgmma::commit();
    wgmma::wait<0>();
    wgmma::hold(s);

    // Online softmax + entropy state on raw scores (see attention_prefill_mma.cu, lean softmax).
    auto softmax = [&](auto masked) {
      float corr[2];
      bool grow_any = false;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float mx = kNegInfF;
#pragma unroll
        for (int nb = 0; nb < kSNb; ++nb) mx = fmaxf(mx, fmaxf(s[4 * nb + 2 * i], s[4 * nb + 2 * i + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float mx2 = mx * scale2;
        const bool grow = mx2 > m[i] + kSlack;
        grow_any |= grow;
        const float m_new = grow ? mx2 : m[i];
        const float m_use = m_new == kNegInfF ? 0.0f : m_new;
        corr[i] = grow ? exp2_approx(m[i] - m_new) : 1.0f;
        const float delta = grow && m[i] != kNegInfF ? m[i] - m_new : 0.0f;
        float ps = 0.0f, pu = 0.0f;
#pragma unroll
        for (int nb = 0; nb < kSNb; ++nb) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float tt = fmaf(s[4 * nb + 2 * i + e], scale2, -m_use);
            if constexpr (decltype(masked)::value) tt = fmaxf(tt, -256.0f);
            const float pe = exp2_approx(tt);
            s[4 * nb + 2 * i + e] = pe;
            ps += pe;
            pu = fmaf(pe, tt, pu);
          }
        }
        u[i] = corr[i] * fmaf(delta, l[i], u[i]) + pu;
        l[i] = corr[i] * l[i] + ps;
        m[i] = m_new;
      }
      if (__any_sync(0xffffffffu, grow_any)) {
#pragma unroll
        for (int nb = 0; nb < kONb; ++nb) {
          o[4 * nb + 0] *= corr[0];
          o[4 * nb + 1] *= corr[0];
          o[4 * nb + 2] *= corr[1];
          o[4 * nb + 3] *= corr[1];
        }
      }
    };
    if (it >= mask_from) {
      // Row i's last visible key as a column of this tile, clamped to [-1, kBlockN].
      auto clamp_col = [](int64_t x, int64_t lo, int64_t hi) {
        return static_cast<int>(x < lo ? lo : (x > hi ? hi : x));
      };
      const int tail = clamp_col(p.n_kv - 1 - kv0, -1, kBlockN);
      const int diag = p.causal ? clamp_col(row_base + p.causal_offset - kv0, -2 * kBlockN, 2 * kBlockN) : kBlockN;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int rel = min(tail, p.causal ? diag + 8 * i : kBlockN);
        const int last = rel < -1 ? -1 : (rel > kBlockN ? kBlockN : rel);
#pragma unroll
        for (int nb = 0; nb < kSNb; ++nb)
#pragma unroll
          for (int e = 0; e < 2; ++e)
            if (nb * 8 + 2 * t + e > last) s[4 * nb + 2 * i + e] = kNegInfF;
      }
      softmax(std::true_type{});
    } else {
      softmax(std::false_type{});
    }

    // O += P V.
    uint32_t pa[kPvSteps][4];
#pragma unroll
    for (int kk = 0; kk < kPvSteps; ++kk) {
      pa[kk][0] = pack_bf16(s[8 * kk + 0], s[8 * kk + 1]);
      pa[kk][1] = pack_bf16(s[8 * kk + 2], s[8 * kk + 3]);
      pa[kk][2] = pack_bf16(s[8 * kk + 4], s[8 * kk + 5]);
      pa[kk][3] = pack_bf16(s[8 * kk + 6], s[8 * kk + 7]);
    }
    wgmma::hold(o);
    wgmma::fence();
#pragma unroll
    for (int kk = 0; kk < kPvSteps; ++kk) {
      const uint64_t dv = wgmma::make_desc(sv + static_cast<uint32_t>(kk * 16 * wgmma::kRowBytes), L::kPanelBytes,
                                           wgmma::kSwizzleAtomBytes);
      pv_step<D>(o, pa[kk], dv);
    }
    wgmma::commit();
    wgmma::wait<0>();
    wgmma::hold(o);
  }

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    u[i] += __shfl_xor_sync(0xffffffffu, u[i], 1);
    u[i] += __shfl_xor_sync(0xffffffffu, u[i], 2);
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t qi = row_base + 8 * i;
    if (qi >= p.n_q) continue;
    const int64_t out_row = qi * p.n_heads + head;
    const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
    OutT* out = static_cast<OutT*>(p.out) + out_row * D + 2 * t;
#pragma unroll
    for (int nb = 0; nb < kONb; ++nb) store_pair(out + nb * 8, o[4 * nb + 2 * i] * inv, o[4 * nb + 2 * i + 1] * inv);
    if (t == 0) {
      if (l[i] > 0.0f) {
        const float ln_l = logf(l[i]);
        p.lse[out_row] = m[i] * kLn2 + ln_l;
        if (p.entropy) p.entropy[out_row] = fmaxf(0.0f, ln_l - u[i] * kLn2 * inv);
      } else {
        p.lse[out_row] = kNegInfF;
        if (p.entropy) p.entropy[out_row] = 0.0f;
      }
    }
  }
#else
  __trap();  // built without sm_90a: the launcher refuses before launching (prefill_wgmma_supported)
#endif
}

template <int D, typename OutT, bool kPaged>
cudaError_t launch_wgmma_instance(const AttentionGpuParams& p, cudaStream_t stream) {
  constexpr size_t kSmem = WgSmem<D>::kBytes;
  static const cudaError_t attr = cudaFuncSetAttribute(prefill_attention_wgmma_kernel<D, OutT, kPaged>,
                                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                       static_cast<int>(kSmem));
  if (attr != cudaSuccess) return attr;
  const dim3 grid(static_cast<unsigned>((p.n_q + kBlockM - 1) / kBlockM), static_cast<unsigned>(p.n_heads));
  prefill_attention_wgmma_kernel<D, OutT, kPaged><<<grid, kThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

template <int D, typename OutT>
cudaError_t launch_wgmma_typed(const AttentionGpuParams& p, cudaStream_t stream) {
  return p.k_pages ? launch_wgmma_instance<D, OutT, true>(p, stream)
                   : launch_wgmma_instance<D, OutT, false>(p, stream);
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

}  // namespace

bool prefill_wgmma_supported() { return wgmma_device_ok(); }

cudaError_t launch_prefill_attention_wgmma(const AttentionGpuParams& p, cudaStream_t stream) {
  if (!detail::prefill_params_ok(p, kBlockM)) return cudaErrorInvalidValue;
  if (p.head_dim != 64 && p.head_dim != 128) return cudaErrorInvalidValue;
  if (p.n_q == 0) return cudaSuccess;
  if (!wgmma_device_ok()) return cudaErrorNotSupported;
  if (p.head_dim == 64) return p.out_fp32 ? launch_wgmma_typed<64, float>(p, stream)
                                          : launch_wgmma_typed<64, __nv_bfloat16>(p, stream);
  return p.out_fp32 ? launch_wgmma_typed<128, float>(p, stream) : launch_wgmma_typed<128, __nv_bfloat16>(p, stream);
}

}  // namespace starserve
