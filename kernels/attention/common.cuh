// Device building blocks shared by the attention kernels (prefill, decode, merge, and the
// baselines): base-2 constants, the launchers' checks of the key source (contiguous or page
// tables), cp.async copies, exp2, bf16 packing and paired stores, and the exact merge of (O, LSE, H)
// partials (entropy.md: LSE = M + ln D, H = sum w_h H_h - sum w_h (LSE_h - M) + ln D).
// The Hopper wrappers stay in wgmma.cuh beside this header rather than in it: they are sm_90a-only
// inline PTX (guarded by STARSERVE_WGMMA_ENABLED) for the one wgmma kernel, and describe the
// tensor-core ISA (descriptor bits, fences, instruction shapes) rather than attention; here they
// would reach every attention kernel's translation unit and mix the two levels.
#pragma once

#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/attention/attention.h"

namespace starserve::detail {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInfF = -INFINITY;

// Launcher check of the key source: a contiguous (k, v) pair or both page tables with a valid shift.
inline bool kv_source_ok(const AttentionGpuParams& p) {
  const bool paged = p.k_pages != nullptr || p.v_pages != nullptr;
  if (!paged) return p.n_kv == 0 || (p.k != nullptr && p.v != nullptr);
  return p.k_pages != nullptr && p.v_pages != nullptr && p.page_shift >= kMinPageShift &&
         p.page_shift <= kMaxPageShift;
}

// Whether a call needs the extended mask (sliding window) or score transform (soft-capping): the
// kernels that ship run such calls through separate instances, so the plain ones are untouched;
// the baselines refuse them (cudaErrorNotSupported).
inline bool mask_extended(const AttentionGpuParams& p) { return p.window > 0 || p.softcap > 0.0f; }

// Launcher check shared by the prefill kernels (block_m query rows per block): shapes, outputs, key source;
// per-row key limits only where the kernel takes them.
inline bool prefill_params_ok(const AttentionGpuParams& p, int block_m, bool takes_key_limit = false) {
  return (takes_key_limit || !p.key_limit) && p.n_heads > 0 && p.n_kv_heads > 0 && p.n_heads % p.n_kv_heads == 0 &&
         p.n_q >= 0 && p.n_kv >= 0 && p.out &&
         p.lse && p.q && kv_source_ok(p) && (p.n_q + block_m - 1) / block_m <= 0x7fffffff;
}

__device__ __forceinline__ void store_out(float* p, float x) { *p = x; }
__device__ __forceinline__ void store_out(__nv_bfloat16* p, float x) { *p = __float2bfloat16(x); }

// Shared-memory address of a generic pointer into shared memory.
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

// 2^x in one MUFU op (relative error ~2^-22); results below 2^-126 flush to 0, which the entropy
// term p t tolerates (p t -> 0 there).
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Logit soft-capping of one score: cap tanh(x in) (in = scale / cap), with tanh(y) = 1 - 2 / (e^2y
// + 1) through one MUFU.EX2 and a fast divide instead of tanhf's ~20 instructions (on the H200 the
// wgmma kernel soft-capped with tanhf ran at 350 TFLOP/s against 586 plain). Absolute error of
// the tanh ~2e-7 (ex2.approx 2^-22 relative, the divide's 2 ulps, 1 - 2/(e + 1) losing to the
// ulp of 1 near 0), so a capped score is within ~cap 2e-7 of cap tanhf (1e-5 at Gemma 2's cap of
// 50): its softmax weight moves by that relatively, far below the 2^-9 with which P is rounded to
// bf16 for P V. e^2y overflows to inf for y > 44 (tanh = 1) and flushes to 0 for y < -44 (-1).
__device__ __forceinline__ float softcap_score(float x, float cap, float in) {
  const float e = exp2_approx(x * (in * (2.0f * kLog2e)));
  return cap * (1.0f - __fdividef(2.0f, e + 1.0f));
}

// Two floats as one bf16x2 register: lo in the low half (the lower column of an A-fragment pair).
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t r;
  memcpy(&r, &v, sizeof(r));
  return r;
}

// Two adjacent output values, as fp32 or bf16.
__device__ __forceinline__ void store_pair(float* dst, float a, float b) {
  *reinterpret_cast<float2*>(dst) = make_float2(a, b);
}
__device__ __forceinline__ void store_pair(__nv_bfloat16* dst, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(a, b);
}

// Merges n_parts partials of one (token, head) row; one warp, lanes stride over head_dim.
// get_o(h, c), get_lse(h), get_ent(h) read part h (get_ent returns 0 when parts carry none).
// Empty parts (LSE = -inf) get weight 0 and are skipped, so no 0 * inf ever forms.
template <typename OutT, typename GetO, typename GetLse, typename GetEnt>
__device__ __forceinline__ void merge_row_warp(OutT* out, float* lse, float* entropy, int n_parts, int head_dim,
                                               GetO get_o, GetLse get_lse, GetEnt get_ent) {
  const int lane = threadIdx.x & 31;
  float m = kNegInfF;
  for (int h = 0; h < n_parts; ++h) m = fmaxf(m, get_lse(h));
  if (m == kNegInfF) {
    for (int c = lane; c < head_dim; c += 32) store_out(out + c, 0.0f);
    if (lane == 0) {
      *lse = kNegInfF;
      if (entropy) *entropy = 0.0f;
    }
    return;
  }
  float denom = 0.0f, h_mix = 0.0f, shift = 0.0f;
  for (int h = 0; h < n_parts; ++h) {
    const float lh = get_lse(h);
    if (lh == kNegInfF) continue;
    const float e = expf(lh - m);
    denom += e;
    h_mix += e * get_ent(h);
    shift += e * (lh - m);
  }
  const float inv = 1.0f / denom;  // denom >= 1: the part holding the max has e = 1
  for (int c = lane; c < head_dim; c += 32) {
    float acc = 0.0f;
    for (int h = 0; h < n_parts; ++h) {
      const float lh = get_lse(h);
      if (lh == kNegInfF) continue;
      acc += expf(lh - m) * get_o(h, c);
    }
    store_out(out + c, acc * inv);
  }
  if (lane == 0) {
    const float log_d = logf(denom);
    *lse = m + log_d;
    if (entropy) *entropy = fmaxf(0.0f, h_mix * inv - shift * inv + log_d);
  }
}

}  // namespace starserve::detail
