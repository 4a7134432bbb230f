// One block per token: 16-byte loads, fp32 sum of squares reduced across the block, then a second
// pass over the same row (still in L1/L2: hidden <= 16K bf16 = 32 KB).
#include "kernels/rms_norm.h"

namespace starserve {
namespace {

constexpr int kThreads = 256;

// Sum of squares of one 16-byte vector of 8 bf16, added to ss.
__device__ __forceinline__ void add_squares(float& ss, const uint4& raw) {
  const auto* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
  for (int k = 0; k < 4; ++k) {
    const float2 f = __bfloat1622float2(h[k]);
    ss += f.x * f.x + f.y * f.y;
  }
}

// The block's total of every thread's ss, then the row's scale 1 / sqrt(mean + eps); every thread
// gets it. Warp sums first, then the warps' sums in warp order (the same order in every kernel).
__device__ __forceinline__ float row_scale(float ss, int hidden, float eps) {
  __shared__ float s_warp[kThreads / 32];
  for (int off = 16; off > 0; off /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  if (threadIdx.x % 32 == 0) s_warp[threadIdx.x / 32] = ss;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < kThreads / 32; ++w) total += s_warp[w];
  return rsqrtf(total / hidden + eps);
}

// y = x * inv * weight over the row's n_vec vectors, this thread's share (i = threadIdx.x + k kThreads).
__device__ __forceinline__ void write_scaled(uint4* y, const uint4* x, const uint4* wv, int n_vec, float inv) {
  for (int i = threadIdx.x; i < n_vec; i += kThreads) {
    const uint4 raw = x[i], wraw = wv[i];
    const auto* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
    const auto* g = reinterpret_cast<const __nv_bfloat162*>(&wraw);
    uint4 res;
    auto* r = reinterpret_cast<__nv_bfloat162*>(&res);
    for (int k = 0; k < 4; ++k) {
      const float2 f = __bfloat1622float2(h[k]), w = __bfloat1622float2(g[k]);
      r[k] = __floats2bfloat162_rn(f.x * inv * w.x, f.y * inv * w.y);
    }
    y[i] = res;
  }
}

__global__ void __launch_bounds__(kThreads) rms_norm_kernel(__nv_bfloat16* out, const __nv_bfloat16* in,
                                                           const __nv_bfloat16* weight, int hidden, float eps) {
  const int64_t t = blockIdx.x;
  const uint4* x = reinterpret_cast<const uint4*>(in + t * hidden);
  const int n_vec = hidden / 8;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < n_vec; i += kThreads) add_squares(ss, x[i]);
  const float inv = row_scale(ss, hidden, eps);
  write_scaled(reinterpret_cast<uint4*>(out + t * hidden), x, reinterpret_cast<const uint4*>(weight), n_vec, inv);
}

// One block per token, as rms_norm_kernel. Pass 1 forms the rounded sum x + h, stores it and sums
// its squares; pass 2 reads back the vectors this same thread stored (same i mapping, so no
// barrier is needed beyond the reduction's) and scales them.
__global__ void __launch_bounds__(kThreads) add_rms_norm_kernel(__nv_bfloat16* out, __nv_bfloat16* x_io,
                                                               const __nv_bfloat16* h_in,
                                                               const __nv_bfloat16* weight, int hidden, float eps) {
  const int64_t t = blockIdx.x;
  uint4* x = reinterpret_cast<uint4*>(x_io + t * hidden);
  const uint4* hv = reinterpret_cast<const uint4*>(h_in + t * hidden);
  const int n_vec = hidden / 8;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < n_vec; i += kThreads) {
    const uint4 ra = x[i], rb = hv[i];
    const auto* a = reinterpret_cast<const __nv_bfloat162*>(&ra);
    const auto* b = reinterpret_cast<const __nv_bfloat162*>(&rb);
    uint4 res;
    auto* r = reinterpret_cast<__nv_bfloat162*>(&res);
    for (int k = 0; k < 4; ++k) {
      const float2 fa = __bfloat1622float2(a[k]), fb = __bfloat1622float2(b[k]);
      r[k] = __floats2bfloat162_rn(fa.x + fb.x, fa.y + fb.y);
    }
    add_squares(ss, res);
    x[i] = res;
  }
  const float inv = row_scale(ss, hidden, eps);
  write_scaled(reinterpret_cast<uint4*>(out + t * hidden), x, reinterpret_cast<const uint4*>(weight), n_vec, inv);
}

}  // namespace

cudaError_t launch_add_rms_norm(__nv_bfloat16* out, __nv_bfloat16* x, const __nv_bfloat16* h,
                                const __nv_bfloat16* weight, int64_t n_tokens, int hidden, float eps,
                                cudaStream_t stream) {
  if (hidden <= 0 || hidden % 8 != 0 || n_tokens < 0 || n_tokens > 0x7fffffff || out == x || out == h)
    return cudaErrorInvalidValue;
  if (n_tokens == 0) return cudaSuccess;
  add_rms_norm_kernel<<<static_cast<unsigned>(n_tokens), kThreads, 0, stream>>>(out, x, h, weight, hidden, eps);
  return cudaGetLastError();
}

cudaError_t launch_rms_norm(__nv_bfloat16* out, const __nv_bfloat16* in, const __nv_bfloat16* weight, int64_t n_tokens,
                            int hidden, float eps, cudaStream_t stream) {
  if (hidden <= 0 || hidden % 8 != 0 || n_tokens < 0 || n_tokens > 0x7fffffff) return cudaErrorInvalidValue;
  if (n_tokens == 0) return cudaSuccess;
  rms_norm_kernel<<<static_cast<unsigned>(n_tokens), kThreads, 0, stream>>>(out, in, weight, hidden, eps);
  return cudaGetLastError();
}

}  // namespace starserve
