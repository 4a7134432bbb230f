// One warp per output row. Each lane reads 16-byte vectors (8 bf16) of the weight row at stride
// 32 vectors, kUnroll vectors per step so that several loads are in flight per thread (an H200
// needs ~4-5 MB in flight across its 132 SMs to reach HBM bandwidth; 8 warps x 32 lanes x 4 x 16 B
// per block and ~8 resident blocks per SM give ~130 KB per SM). The token rows of `in` are small
// (k * 2 bytes each) and read by every warp, so they come from L1/L2. The weight loads are
// streamed (ld.global.cs): each weight is used once per step and should not evict `in` from L1.
// Sums are fp32 per lane, then a butterfly over the warp; lane 0 writes the n_tokens results.
#include "kernels/gemv.h"

namespace starserve {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;

__device__ __forceinline__ void dot8(float& acc, const uint4& w, const uint4& x) {
  const auto* wh = reinterpret_cast<const __nv_bfloat162*>(&w);
  const auto* xh = reinterpret_cast<const __nv_bfloat162*>(&x);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 a = __bfloat1622float2(wh[i]), b = __bfloat1622float2(xh[i]);
    acc = fmaf(a.x, b.x, acc);
    acc = fmaf(a.y, b.y, acc);
  }
}

template <int kTokens, bool kOutF32>
__global__ void __launch_bounds__(kThreads) gemv_kernel(void* out, const __nv_bfloat16* in,
                                                        const __nv_bfloat16* weight, int64_t n, int64_t k) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= n) return;
  const int64_t n_vec = k / 8;
  const uint4* w = reinterpret_cast<const uint4*>(weight + row * k);
  const uint4* x = reinterpret_cast<const uint4*>(in);
  float acc[kTokens];
#pragma unroll
  for (int t = 0; t < kTokens; ++t) acc[t] = 0.0f;
  int64_t i = lane;
  for (; i + 32 * (kUnroll - 1) < n_vec; i += 32 * kUnroll) {
    uint4 wv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) wv[u] = __ldcs(w + i + 32 * u);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int t = 0; t < kTokens; ++t) dot8(acc[t], wv[u], __ldg(x + t * n_vec + i + 32 * u));
    }
  }
  for (; i < n_vec; i += 32) {
    const uint4 wv = __ldcs(w + i);
#pragma unroll
    for (int t = 0; t < kTokens; ++t) dot8(acc[t], wv, __ldg(x + t * n_vec + i));
  }
#pragma unroll
  for (int t = 0; t < kTokens; ++t) {
    for (int off = 16; off > 0; off /= 2) acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], off);
  }
  if (lane != 0) return;
#pragma unroll
  for (int t = 0; t < kTokens; ++t) {
    if constexpr (kOutF32) {
      static_cast<float*>(out)[t * n + row] = acc[t];
    } else {
      static_cast<__nv_bfloat16*>(out)[t * n + row] = __float2bfloat16(acc[t]);
    }
  }
}

template <int kTokens>
cudaError_t launch_for(void* out, bool out_fp32, const __nv_bfloat16* in, const __nv_bfloat16* weight, int64_t n,
                       int64_t k, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((n + kWarps - 1) / kWarps);
  if (out_fp32) {
    gemv_kernel<kTokens, true><<<blocks, kThreads, 0, stream>>>(out, in, weight, n, k);
  } else {
    gemv_kernel<kTokens, false><<<blocks, kThreads, 0, stream>>>(out, in, weight, n, k);
  }
  return cudaGetLastError();
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

cudaError_t launch_gemv(void* out, bool out_fp32, const __nv_bfloat16* in, const __nv_bfloat16* weight,
                        int64_t n_tokens, int64_t n, int64_t k, cudaStream_t stream) {
  if (n_tokens < 1 || n_tokens > kGemvMaxTokens || n < 0 || k <= 0 || k % 8 != 0 || !aligned16(in) ||
      !aligned16(weight) || n > (int64_t{1} << 31) * kWarps || out == static_cast<const void*>(in) ||
      out == static_cast<const void*>(weight))
    return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  switch (n_tokens) {
    case 1: return launch_for<1>(out, out_fp32, in, weight, n, k, stream);
    case 2: return launch_for<2>(out, out_fp32, in, weight, n, k, stream);
    case 3: return launch_for<3>(out, out_fp32, in, weight, n, k, stream);
    case 4: return launch_for<4>(out, out_fp32, in, weight, n, k, stream);
    case 5: return launch_for<5>(out, out_fp32, in, weight, n, k, stream);
    case 6: return launch_for<6>(out, out_fp32, in, weight, n, k, stream);
    case 7: return launch_for<7>(out, out_fp32, in, weight, n, k, stream);
    default: return launch_for<8>(out, out_fp32, in, weight, n, k, stream);
  }
}

}  // namespace starserve
