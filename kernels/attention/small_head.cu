// Partial attention for head sizes the tensor-core kernels do not take (head_dim other than 64 or
// 128, up to kSmallHeadMaxDim): one warp per (query row, head), lanes over the head's dims, keys
// one at a time with the online softmax of partial_attention_ref (natural base, m, l, u of
// entropy.md) in fp32. For small models (tiny test models, head_dim 16 / 32 / 256 families);
// bound by latency, not tuned: a key costs one warp reduction of the dot product.
#include "kernels/attention/attention.h"
#include "kernels/attention/common.cuh"

namespace starserve {
namespace {

using detail::kNegInfF;

constexpr int kWarpsPerBlock = 4;
constexpr int kPerLane = kSmallHeadMaxDim / 32;

__device__ __forceinline__ const __nv_bfloat16* key_row(const AttentionGpuParams& p,
                                                        const __nv_bfloat16* contiguous,
                                                        const __nv_bfloat16* const* pages, int64_t j,
                                                        int64_t stride) {
  if (pages) return pages[j >> p.page_shift] + (j & ((int64_t{1} << p.page_shift) - 1)) * stride;
  return contiguous + j * stride;
}

template <typename OutT>
__global__ void __launch_bounds__(32 * kWarpsPerBlock) small_head_attention_kernel(AttentionGpuParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;  // i * n_heads + h
  if (row >= p.n_q * p.n_heads) return;  // warp-uniform
  const int lane = threadIdx.x % 32;
  const int d = p.head_dim;
  const int64_t i = row / p.n_heads;
  const int h = static_cast<int>(row % p.n_heads);
  const int kvh = h / (p.n_heads / p.n_kv_heads);
  const int64_t stride = static_cast<int64_t>(p.n_kv_heads) * d;

  float q[kPerLane], acc[kPerLane];
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    const int c = lane + 32 * e;
    q[e] = c < d ? __bfloat162float(p.q[row * d + c]) : 0.0f;
    acc[e] = 0.0f;
  }
  // Visible keys: [first, last] (the window's bound, then causal and n_kv).
  int64_t last = p.n_kv - 1;
  if (p.causal && i + p.causal_offset < last) last = i + p.causal_offset;
  if (p.key_limit && p.key_limit[i] - 1 < last) last = p.key_limit[i] - 1;
  const int64_t first = window_first_key(p, i);
  float m = kNegInfF, l = 0.0f, u = 0.0f;
  for (int64_t j = first; j <= last; ++j) {
    const __nv_bfloat16* k = key_row(p, p.k, p.k_pages, j, stride) + kvh * d;
    const __nv_bfloat16* v = key_row(p, p.v, p.v_pages, j, stride) + kvh * d;
    float s = 0.0f;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      const int c = lane + 32 * e;
      if (c < d) s = fmaf(q[e], __bfloat162float(k[c]), s);
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
    s *= p.scale;
    if (p.softcap > 0.0f) s = p.softcap * tanhf(s / p.softcap);
    if (s > m) {
      // New running max m' = s: rescale by e^(m - m') and shift u by (m - m') l (none on the first key).
      if (m != kNegInfF) {
        const float a = expf(m - s);
        u = a * (u + (m - s) * l);
        l *= a;
#pragma unroll
        for (int e = 0; e < kPerLane; ++e) acc[e] *= a;
      }
      m = s;
    }
    const float w = expf(s - m);
    l += w;
    u += w * (s - m);
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      const int c = lane + 32 * e;
      if (c < d) acc[e] = fmaf(w, __bfloat162float(v[c]), acc[e]);
    }
  }
  OutT* out = static_cast<OutT*>(p.out) + row * d;
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;  // no visible key: O = 0
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    const int c = lane + 32 * e;
    if (c < d) detail::store_out(out + c, acc[e] * inv);
  }
  if (lane == 0) {
    if (l > 0.0f) {
      const float ln_l = logf(l);
      p.lse[row] = m + ln_l;
      if (p.entropy) p.entropy[row] = fmaxf(0.0f, ln_l - u * inv);
    } else {
      p.lse[row] = kNegInfF;
      if (p.entropy) p.entropy[row] = 0.0f;
    }
  }
}

}  // namespace

cudaError_t launch_attention_small_head(const AttentionGpuParams& p, cudaStream_t stream) {
  if (!detail::prefill_params_ok(p, kWarpsPerBlock, true) || p.head_dim < 1 || p.head_dim > kSmallHeadMaxDim)
    return cudaErrorInvalidValue;
  const int64_t rows = p.n_q * p.n_heads;
  if (rows == 0) return cudaSuccess;
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  if (p.out_fp32)
    small_head_attention_kernel<float><<<static_cast<unsigned>(blocks), 32 * kWarpsPerBlock, 0, stream>>>(p);
  else
    small_head_attention_kernel<__nv_bfloat16><<<static_cast<unsigned>(blocks), 32 * kWarpsPerBlock, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace starserve
